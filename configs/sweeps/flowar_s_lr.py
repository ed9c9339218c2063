"""A random search around FlowAR-S's recipe on ImageNet 256 (a pod job per point; see docs/sweeps.md):
shorter runs (100 epochs) ranking peak learning rate, warmup and EMA decay.

  python launch/sweep.py configs/sweeps/flowar_s_lr.py --workdir gs://BUCKET/sweeps/flowar_s_lr \
      --pod POD_NAME --dry_run
"""
from flowar_jax.config import IMAGENET_TRAIN_IMAGES
from flowar_jax.sweeps import Choice, LogUniform, Sweep

_STEPS_PER_EPOCH = IMAGENET_TRAIN_IMAGES // 2048


def get_sweep():
  return Sweep(
      config="configs/flowar_s.py",
      random={
          "optimizer.base_lr": LogUniform(2e-5, 2e-4),
          "optimizer.warmup_steps": Choice([10 * _STEPS_PER_EPOCH, 25 * _STEPS_PER_EPOCH]),
          "optimizer.ema_decay": Choice([0.999, 0.9999]),
      },
      num_points=8, seed=0,
      fixed={"num_train_steps": 100 * _STEPS_PER_EPOCH, "data.cache_latents": True, "sample_every_steps": 5000})
