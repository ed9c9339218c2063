"""HART's config sections: `model` (the class-conditional transformer with its residual head), `vae` (the hybrid
tokenizer: VAR's multi-scale VQVAE layout plus the continuous residual) and `sampling` (the categorical rules
plus the residual head's), in place of FlowAR's. The other sections are the shared schema of
`flowar_jax.config.base_config`.

The defaults are a class-conditional HART-d16 (Llama blocks, as the official `attn_type='llama'`, with its
residual head of width 1024, depth 6, 8 sampling steps) over VAR's `vae_ch160v4096z32` layout on ImageNet 256,
with the official sampler's categorical settings (cfg 1.5, top-k 600, top-p 0).
"""
from __future__ import annotations

import ml_collections

from flowar_jax.config_var import add_var_sections, model_heads, model_width, validate_var_sections

MLP_KINDS = ("llama", "gpt2")
RESIDUAL_KINDS = ("diffusion", "flow")
TRAIN_DIFFUSION_STEPS = 1000  # the residual head's training diffusion; sampling respaces it


def add_hart_sections(c: ml_collections.ConfigDict) -> None:
  """Replaces `c`'s model, vae and sampling sections with HART's (and sets VAR's optimizer recipe)."""
  add_var_sections(c)  # the tokenizer's layout and training keys, the optimizer and the categorical settings
  c.stage = "hart"

  c.model = ml_collections.ConfigDict()
  c.model.name = "hart"
  c.model.depth = 16
  c.model.width = 0  # 0 = 64 x depth
  c.model.num_heads = 0  # 0 = depth; the head size must divide by 4 (2-D rotary positions)
  c.model.num_classes = 1000
  c.model.mlp_ratio = 4.0
  c.model.mlp = "llama"  # 'llama' (SwiGLU, hidden round_up(2/3 x ratio x width, 256)) | 'gpt2' (VAR's GELU MLP)
  c.model.adaln = True  # False = the official `disable_aln`
  c.model.timestep_level = False  # the level embedding as the timestep MLP of the level index (official option)
  c.model.attn_l2_norm = False  # cosine attention with a learned per-head scale (VAR's); HART's llama: off
  c.model.cond_drop_rate = 0.1  # label dropout in training (the null class feeds guidance's unconditional rows)
  c.model.drop_path_rate = 0.0  # stochastic depth, linear from 0 at the first block to this at the last
  c.model.norm_eps = 1e-6
  c.model.attention_impl = "xla"  # as FlowAR's: 'xla' | 'pallas' | 'auto'
  c.model.compute_dtype = "float32"  # as FlowAR's: 'float32' | 'bfloat16'
  c.model.remat = "none"  # HART's blocks have no rematerialisation yet: only 'none'
  # The residual head (official `diffloss`): an adaLN MLP denoising the last scale's continuous residual.
  c.model.residual = ml_collections.ConfigDict()
  # 'diffusion': the official head (epsilon and variance, respaced ancestral steps); 'flow': the same MLP trained
  # by flow matching and sampled with Euler steps (`heads.residual_flow`). num_steps is either one's step count.
  c.model.residual.kind = "diffusion"
  c.model.residual.width = 1024
  c.model.residual.depth = 6
  c.model.residual.num_steps = 8  # sampling steps: respaced diffusion steps, or the flow head's Euler steps
  c.model.residual.batch_mul = 4  # training repeats of each token with fresh steps and noise

  # The hybrid tokenizer is VAR's VQVAE layout (`tokenizers.hybrid.HybridTokenizer`); its stage trains as VAR's.
  c.vae.train.skip_continuous_prob = 0.5  # probability that a training step decodes the discrete sum only

  c.sampling.top_k = 600
  c.sampling.top_p = 0.0
  c.sampling.residual_steps = 0  # the residual head's sampling steps; 0 = model.residual.num_steps
  c.sampling.residual_cfg = -1.0  # the residual head's guidance scale; < 0 = sampling.cfg (the official sampler)
  c.sampling.residual_temperature = 1.0  # of the residual head's per-step noise


def hart_preset(depth: int) -> ml_collections.ConfigDict:
  """HART-d`depth` (width 64 x depth, depth heads), class-conditional, over VAR's VQVAE layout on ImageNet 256."""
  from flowar_jax.config import base_config  # pylint: disable=g-import-not-at-top  (config imports this module)
  if depth < 1:
    raise ValueError(f"depth must be positive, got {depth}")
  c = base_config("hart")
  c.model.depth = depth
  return c


def residual_head_kwargs(model: ml_collections.ConfigDict) -> dict:
  """`config.model.residual` -> the `residual_head=` keyword of `HARTTransformer`."""
  r = model.residual
  return dict(kind=r.get("kind", "diffusion"),  # configs stored before the key had the diffusion head
              width=r.width, depth=r.depth, num_steps=r.num_steps, batch_mul=r.batch_mul)


def validate_hart_sections(config: ml_collections.ConfigDict) -> None:
  """Values of HART's sections, and their agreement with `data`; errors name the key."""
  validate_var_sections(config)  # the shared keys: sizes, scales, image side, cfg, top-k / top-p, VQ training
  m, v, s = config.model, config.vae, config.sampling
  if m.mlp not in MLP_KINDS:
    raise ValueError(f"config.model.mlp must be one of {MLP_KINDS}, got {m.mlp!r}")
  head_dim = model_width(m) // model_heads(m)
  if head_dim % 4:
    raise ValueError(f"HART's 2-D rotary positions need a head size divisible by 4; config.model.width "
                     f"{model_width(m)} / config.model.num_heads {model_heads(m)} = {head_dim}")
  if not 0.0 <= m.drop_path_rate < 1.0:
    raise ValueError(f"config.model.drop_path_rate must lie in [0, 1), got {m.drop_path_rate}")
  if m.remat != "none":
    raise ValueError(f"config.model.remat {m.remat!r}: HART's blocks have no rematerialisation; use 'none'")
  kind = m.residual.get("kind", "diffusion")
  if kind not in RESIDUAL_KINDS:
    raise ValueError(f"config.model.residual.kind must be one of {RESIDUAL_KINDS}, got {kind!r}")
  if kind == "flow" and s.residual_temperature != 1.0:
    raise ValueError(f"config.sampling.residual_temperature {s.residual_temperature}: the flow residual head "
                     "samples by an ODE with no per-step noise; leave it at 1.0")
  for key, value in (("model.residual.width", m.residual.width), ("model.residual.depth", m.residual.depth),
                     ("model.residual.batch_mul", m.residual.batch_mul)):
    if value < 1:
      raise ValueError(f"config.{key} must be >= 1, got {value}")
  if not 1 <= m.residual.num_steps <= TRAIN_DIFFUSION_STEPS:
    raise ValueError(f"config.model.residual.num_steps must lie in [1, {TRAIN_DIFFUSION_STEPS}], got "
                     f"{m.residual.num_steps}")
  if not 0 <= s.residual_steps <= TRAIN_DIFFUSION_STEPS:
    raise ValueError(f"config.sampling.residual_steps must lie in [1, {TRAIN_DIFFUSION_STEPS}] (0: "
                     f"model.residual.num_steps), got {s.residual_steps}")
  if s.residual_temperature < 0:
    raise ValueError(f"config.sampling.residual_temperature must be >= 0, got {s.residual_temperature}")
  if v.using_znorm:
    raise ValueError("config.vae.using_znorm must be False: HART's hybrid tokenizer takes the nearest code by "
                     "squared L2")
  if not 0.0 <= v.train.skip_continuous_prob <= 1.0:
    raise ValueError(f"config.vae.train.skip_continuous_prob must lie in [0, 1], got "
                     f"{v.train.skip_continuous_prob}")
