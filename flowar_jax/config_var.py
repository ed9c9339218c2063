"""VAR's config sections: `model` (the transformer), `vae` (the multi-scale residual VQVAE, VAR's tokenizer) and
`sampling` (the categorical head's rules), in place of FlowAR's. The other sections are the shared schema of
`flowar_jax.config.base_config`.

The defaults are VAR-d16 over `vae_ch160v4096z32` on ImageNet 256 with the sampling settings of the official
FID evaluation (cfg 1.5, top-k 900, top-p 0.96, no smoothing).
"""
from __future__ import annotations

import ml_collections

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PUBLISHED_DEPTHS = (16, 20, 24, 30)


def add_var_sections(c: ml_collections.ConfigDict) -> None:
  """Replaces `c`'s model, vae and sampling sections with VAR's (and sets VAR's optimizer recipe)."""
  c.stage = "var"

  c.model = ml_collections.ConfigDict()
  c.model.name = "var"
  c.model.depth = 16
  c.model.width = 0  # 0 = 64 x depth
  c.model.num_heads = 0  # 0 = depth
  c.model.num_classes = 1000
  c.model.mlp_ratio = 4.0
  c.model.shared_aln = False  # one adaLN projection shared by every block, plus a per-block gain and shift
  c.model.attn_l2_norm = True  # cosine attention with a learned per-head scale
  c.model.cond_drop_rate = 0.1  # label dropout in training (the null class feeds CFG's unconditional branch)
  c.model.drop_path_rate = -1.0  # stochastic depth at the last block; < 0 = 0.1 x depth / 24
  c.model.norm_eps = 1e-6
  c.model.attention_impl = "xla"  # as FlowAR's: 'xla' | 'pallas' | 'auto'
  c.model.compute_dtype = "float32"  # as FlowAR's: 'float32' | 'bfloat16'
  c.model.remat = "none"  # as FlowAR's, per block (the blocks differ in drop-path rate, so there is no scan)

  # The tokenizer: keyword arguments of `flowar_jax.tokenizers.msvq.MultiScaleVQVAE`, and how it trains.
  c.vae = ml_collections.ConfigDict()
  c.vae.vocab_size = 4096
  c.vae.z_channels = 32
  c.vae.ch = 160
  c.vae.ch_mult = (1, 1, 2, 2, 4)
  c.vae.num_res_blocks = 2
  c.vae.quant_resi = 0.5  # phi(x) = (1 - q) x + q conv3x3(x)
  c.vae.share_quant_resi = 4  # phi convolutions shared by tick: 0 = one per scale, 1 = one for all
  c.vae.using_znorm = False  # nearest code by cosine instead of L2
  c.vae.quant_conv_ks = 3
  c.vae.patch_nums = PATCH_NUMS  # token-map sides, coarse to fine: VAR's scales
  c.vae.train = ml_collections.ConfigDict()
  c.vae.train.batch_size = 64
  c.vae.train.num_train_steps = 100_000
  c.vae.train.learning_rate = 1e-4
  c.vae.train.warmup_steps = 1_000
  c.vae.train.l1_weight = 1.0
  c.vae.train.l2_weight = 1.0
  c.vae.train.commitment_weight = 0.25  # beta of the VQ commitment loss
  c.vae.train.usage_decay = 0.99  # EMA decay of each code's hit rate
  c.vae.train.restart_every_steps = 100  # dead codes restart from encoder features this often; 0 = never
  c.vae.train.dead_code_threshold = 0.03  # a code hit below this share of the uniform rate is dead

  c.optimizer.base_lr = 1e-4  # VAR's recipe: lr 1e-4 x batch / 256, betas (0.9, 0.95), wd 0.05, clip 2
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip = 2.0

  c.sampling = ml_collections.ConfigDict()
  c.sampling.cfg = 1.5  # guidance at the last scale, ramped from 0 at the first
  c.sampling.top_k = 900  # 0 = off
  c.sampling.top_p = 0.96  # 0 = off
  c.sampling.more_smooth = False  # Gumbel-softmax code mixtures (VAR uses it for pictures, not for FID)
  c.sampling.compute_dtype = "float32"
  c.sampling.num_samples = 64
  c.sampling.batch_size = 64
  c.sampling.use_ema = True


def var_preset(depth: int) -> ml_collections.ConfigDict:
  """VAR-d`depth` (width 64 x depth, depth heads) over `vae_ch160v4096z32` on ImageNet 256."""
  from flowar_jax.config import base_config  # pylint: disable=g-import-not-at-top  (config imports this module)
  if depth < 1:
    raise ValueError(f"depth must be positive, got {depth}")
  c = base_config("var")
  c.model.depth = depth
  return c


def model_width(model: ml_collections.ConfigDict) -> int:
  return model.width or 64 * model.depth


def model_heads(model: ml_collections.ConfigDict) -> int:
  return model.num_heads or model.depth


def image_side(vae: ml_collections.ConfigDict) -> int:
  """The image side the VQVAE takes: the last scale times its stride."""
  return vae.patch_nums[-1] * 2 ** (len(vae.ch_mult) - 1)


def validate_var_sections(config: ml_collections.ConfigDict) -> None:
  """Values of VAR's sections, and their agreement with `data`; errors name the key."""
  m, v, s = config.model, config.vae, config.sampling
  for key, value in (("model.depth", m.depth), ("model.num_classes", m.num_classes),
                     ("vae.vocab_size", v.vocab_size), ("vae.z_channels", v.z_channels), ("vae.ch", v.ch),
                     ("vae.num_res_blocks", v.num_res_blocks), ("sampling.num_samples", s.num_samples),
                     ("sampling.batch_size", s.batch_size)):
    if value < 1:
      raise ValueError(f"config.{key} must be >= 1, got {value}")
  for key, value in (("model.width", m.width), ("model.num_heads", m.num_heads)):
    if value < 0:
      raise ValueError(f"config.{key} must be >= 1, or 0 for VAR's default, got {value}")
  width, heads = model_width(m), model_heads(m)
  if width % heads:
    raise ValueError(f"the VAR width {width} (config.model.width, 0 = 64 x depth) is not divisible by the number "
                     f"of heads {heads} (config.model.num_heads, 0 = depth)")
  patch_nums = tuple(v.patch_nums)
  if len(patch_nums) < 2 or list(patch_nums) != sorted(set(patch_nums)) or patch_nums[0] < 1:
    raise ValueError(f"config.vae.patch_nums must be at least two strictly increasing positive sides, got "
                     f"{patch_nums}")
  if config.data.image_size != image_side(v):
    raise ValueError(f"config.data.image_size {config.data.image_size} must equal the last scale x the VQVAE's "
                     f"stride = {v.patch_nums[-1]} x {2 ** (len(v.ch_mult) - 1)} = {image_side(v)} "
                     "(config.vae.patch_nums, config.vae.ch_mult)")
  if abs(v.quant_resi) <= 1e-6:
    raise ValueError("config.vae.quant_resi 0 (phi = identity) is not supported; the published VQVAE uses 0.5")
  if v.share_quant_resi < 0:
    raise ValueError(f"config.vae.share_quant_resi must be >= 0, got {v.share_quant_resi}")
  if not 0.0 <= m.cond_drop_rate <= 1.0:
    raise ValueError(f"config.model.cond_drop_rate must lie in [0, 1], got {m.cond_drop_rate}")
  if m.drop_path_rate >= 1.0:
    raise ValueError(f"config.model.drop_path_rate must be < 1 (or < 0 for 0.1 x depth / 24), got "
                     f"{m.drop_path_rate}")
  if s.cfg < 0:
    raise ValueError(f"config.sampling.cfg must be >= 0, got {s.cfg}")
  if not 0 <= s.top_k <= v.vocab_size:
    raise ValueError(f"config.sampling.top_k must lie in [0, vae.vocab_size = {v.vocab_size}] (0: off), got "
                     f"{s.top_k}")
  if not 0.0 <= s.top_p < 1.0:
    raise ValueError(f"config.sampling.top_p must lie in [0, 1) (0: off), got {s.top_p}")
  if config.data.cache_latents:
    raise ValueError("config.data.cache_latents caches a KL VAE's posterior, which VAR has none of; VAR encodes "
                     "its images on the fly (set it to False)")
  t = v.train
  if t.batch_size < 1 or t.num_train_steps < 1:
    raise ValueError("config.vae.train.batch_size and num_train_steps must be >= 1")
  if not 0.0 <= t.usage_decay < 1.0:
    raise ValueError(f"config.vae.train.usage_decay must lie in [0, 1), got {t.usage_decay}")
  if t.restart_every_steps < 0 or t.dead_code_threshold < 0:
    raise ValueError("config.vae.train.restart_every_steps and dead_code_threshold must be >= 0")
