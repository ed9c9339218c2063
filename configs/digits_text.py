"""The bundled text-to-image default: a small VAE + text-conditional FlowAR on composed scikit-learn digits
("a 3 to the left of a 7", "a 5 above a 2", "two 4s", with paraphrases), prompts encoded by the bundled,
frozen all-MiniLM-L6-v2; trained end to end on a 2-core CPU in about 10 minutes (docs/text.md).

  make digits-text   # = python -m flowar_jax train --config configs/digits_text.py --workdir runs/digits_text
  python -m flowar_jax sample --workdir runs/digits_text --prompt "a 4 to the left of a 9"
  python -m flowar_jax evaluate --workdir runs/digits_text --metrics alignment --num_samples 400

Two digits on a 32x32 canvas; the VAE has stride 4 (latent 8x8x8), so FlowAR predicts scales of side 1, 2, 4
and 8. A fixed tenth of the (relation, digit, digit) combinations is held out of training; `evaluate
--metrics alignment` scores seen and held-out combinations apart (docs/text.md).
"""
from flowar_jax.config import base_config
from flowar_jax.config_text import add_text_section


def get_config():
  c = add_text_section(base_config(), "minilm")
  c.seed = 0
  c.stage = "both"
  c.batch_size = 64
  c.num_train_steps = 800
  c.checkpoint_every_steps = 200
  c.log_every_steps = 100

  c.data.name = "digits_text"
  c.data.image_size = 32
  c.data.resize_size = 0
  c.data.random_crop = False
  c.data.random_flip = False  # a mirrored pair swaps left and right
  c.data.eval_fraction = 0.1
  c.data.cache_latents = True  # encode the train split once; each cached latent's batch carries its caption

  c.vae.base_channels = 16
  c.vae.channel_multipliers = (1, 2, 2)
  c.vae.encoder_blocks = 1
  c.vae.decoder_blocks = 1
  c.vae.latent_channels = 8
  c.vae.norm_groups = 8
  c.vae.latent_scale = 0.0  # measured after the VAE stage: 1 / std of the train latents
  c.vae.train.batch_size = 64
  c.vae.train.num_train_steps = 300
  c.vae.train.learning_rate = 2e-3
  c.vae.train.warmup_steps = 100
  c.vae.train.kl_weight = 1e-4

  c.model.scales = (1, 2, 4, 8)
  c.model.width = 128
  c.model.depth = 2
  c.model.num_heads = 2
  c.model.attn_dropout = 0.0
  c.model.proj_dropout = 0.0
  c.model.head.variant = "v1"
  c.model.head.depth = 2
  c.model.head.width = 128
  c.model.head.head_dim = 64

  c.text.max_length = 16  # the longest caption is 11 tokens with [CLS] and [SEP]
  c.text.drop_prob = 0.1

  c.optimizer.base_lr = 8e-3  # lr 2e-3 at batch 64
  c.optimizer.min_lr = 1e-5
  c.optimizer.warmup_steps = 100
  c.optimizer.ema_decay = 0.995

  c.sampling.cfg = 3.0
  c.sampling.guidance = 0.9
  c.sampling.num_steps = 25
  c.sampling.num_samples = 64
  c.sampling.batch_size = 64

  c.eval.metrics = ("alignment",)
  c.eval.num_samples = 400
  return c
