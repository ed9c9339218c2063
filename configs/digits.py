"""The bundled default: a small VAE + FlowAR on scikit-learn's handwritten digits (1,797 real 8x8 images,
10 classes), trained end to end on a CPU in minutes.

  python -m flowar_jax train --config configs/digits.py --workdir runs/digits

Images are upscaled to 16x16 RGB (the digits hold 8x8 pixels of information); the VAE has stride 4
(latent 4x4x8), so FlowAR predicts scales of side 1, 2 and 4.
"""
from flowar_jax.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.stage = "both"
  c.batch_size = 64
  c.num_train_steps = 1600
  c.checkpoint_every_steps = 500
  c.log_every_steps = 100
  c.sample_every_steps = 400  # a 2 x 10 grid of EMA samples in TensorBoard and runs/digits/images/

  c.data.name = "digits"
  c.data.image_size = 16
  c.data.resize_size = 0
  c.data.random_crop = False
  c.data.random_flip = False  # a mirrored digit is another glyph
  c.data.eval_fraction = 0.1
  c.data.cache_latents = True

  c.vae.base_channels = 32
  c.vae.channel_multipliers = (1, 2, 2)
  c.vae.encoder_blocks = 1
  c.vae.decoder_blocks = 1
  c.vae.latent_channels = 8
  c.vae.norm_groups = 8
  c.vae.latent_scale = 0.0  # measured after the VAE stage: 1 / std of the train latents
  c.vae.train.batch_size = 64
  c.vae.train.num_train_steps = 500
  c.vae.train.learning_rate = 2e-3
  c.vae.train.warmup_steps = 100
  c.vae.train.kl_weight = 1e-4

  c.model.scales = (1, 2, 4)
  c.model.width = 128
  c.model.depth = 2
  c.model.num_heads = 2
  c.model.num_classes = 10
  c.model.attn_dropout = 0.0  # a small model on a small set: dropout only slows it down here
  c.model.proj_dropout = 0.0
  c.model.head.variant = "v1"
  c.model.head.depth = 2
  c.model.head.width = 128
  c.model.head.head_dim = 64

  c.optimizer.base_lr = 4e-3  # lr 1e-3 at batch 64
  c.optimizer.min_lr = 1e-5
  c.optimizer.warmup_steps = 200
  c.optimizer.ema_decay = 0.995

  c.sampling.cfg = 3.0
  c.sampling.guidance = 0.9
  c.sampling.num_steps = 25
  c.sampling.num_samples = 100
  c.sampling.batch_size = 100

  # `python -m flowar_jax evaluate`: the digits classifier metric, no downloads (docs/evaluation.md).
  c.eval.metrics = ("digits",)
  c.eval.num_samples = 1000
  c.eval.train_num_samples = 200
  return c
