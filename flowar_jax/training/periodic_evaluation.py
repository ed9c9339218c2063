"""Evaluation on a schedule inside FlowAR training (`config.eval.every_steps`, 0 = off).

After the step's checkpoint, the current weights (EMA unless `sampling.use_ema` is off) sample
`eval.train_num_samples` images with the config's sampling settings and seed; the metrics go to
WORKDIR/eval/metrics.jsonl (and TensorBoard under WORKDIR/eval/tensorboard) as `eval/<metric>`, the full report
to WORKDIR/eval/<settings>/report.json, exactly as `evaluate` would write for that step.
"""
from __future__ import annotations

from typing import Callable

import jax
import ml_collections
from flax import nnx

from flowar_jax.evaluation import runner, suite
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.runs import fs
from flowar_jax.runs.metrics import MetricWriter
from flowar_jax.sampling.generate import settings_from
from flowar_jax.sampling.sampler import image_sampler
from flowar_jax.training.state import TrainState


def periodic_evaluation(config: ml_collections.ConfigDict, workdir: str, graphdef: nnx.GraphDef,
                        vae: nnx.Module, plan: ShardingPlan | None = None) -> Callable[[int, TrainState], None]:
  """-> `action(step, state)` for `loop.Periodic`. Weights and reference are checked now, before training.
  Samples are drawn sharded by `plan` (the training run's; default one device)."""
  setup = suite.prepare(config, metrics=config.eval.metrics, cache_dir=suite.default_cache_dir(workdir))
  settings = settings_from(config)
  latent_scale = config.vae.latent_scale if config.model.name == "flowar" else 1.0
  use_ema = config.sampling.use_ema
  samplers = []  # built at the first evaluation, then reused with new weights (compiled once)

  def action(step: int, state: TrainState) -> None:
    flowar = nnx.merge(graphdef, state.ema_params if use_ema else state.params)
    if not samplers:
      samplers.append(image_sampler(flowar, vae, settings, latent_scale, plan))
    sampler = samplers[0]
    sampler.set_weights(flowar, vae)
    sampling_plan = runner.SamplingPlan(num_samples=config.eval.train_num_samples, num_classes=config.model.num_classes,
                               seed=config.seed, settings=settings, use_ema=use_ema, checkpoint_step=step)
    directory = fs.join(workdir, "eval", sampling_plan.name)
    report = runner.evaluate_sampler(sampler, sampling_plan, setup, config, directory, batch_size=config.sampling.batch_size)
    with MetricWriter(fs.join(workdir, "eval")) as writer:
      writer.write_scalars(step, {f"eval/{k}": v for k, v in report["metrics"].items()})
    if jax.process_index() == 0:
      print(f"eval at step {step}: {runner.format_metrics(report['metrics'])}", flush=True)

  return action
