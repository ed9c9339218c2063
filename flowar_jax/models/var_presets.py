"""VAR configs: the published sizes on ImageNet 256 and builders that read a config's sections.

A VAR config has three sections, each the keyword arguments of one object, so builders pass them through
(`VAR(**config.model)`, `MultiScaleVQVAE(**config.tokenizer)`, `CategoricalSampling(**config.sampling)`), plus
`data` (name, image size). Training is not wired to these configs yet.
"""
from __future__ import annotations

import ml_collections
from flax import nnx

from flowar_jax.heads.categorical import CategoricalSampling
from flowar_jax.models.var import VAR
from flowar_jax.tokenizers.msvq import PATCH_NUMS, MultiScaleVQVAE

PUBLISHED_DEPTHS = (16, 20, 24, 30)


def var_config(depth: int, *, shared_aln: bool = False) -> ml_collections.ConfigDict:
  """VAR-d`depth` (width 64 x depth, depth heads) over `vae_ch160v4096z32` on ImageNet 256, with the sampling
  settings the official FID evaluation uses (cfg 1.5, top-k 900, top-p 0.96, no smoothing)."""
  if depth < 1:
    raise ValueError(f"depth must be positive, got {depth}")
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(name="imagenet", image_size=256, num_classes=1000))
  c.tokenizer = ml_collections.ConfigDict(dict(
      vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, quant_resi=0.5,
      share_quant_resi=4, using_znorm=False, quant_conv_ks=3, patch_nums=PATCH_NUMS))
  c.model = ml_collections.ConfigDict(dict(
      depth=depth, num_classes=1000, vocab_size=4096, cvae=32, patch_nums=PATCH_NUMS, mlp_ratio=4.0,
      shared_aln=shared_aln, attn_l2_norm=True, cond_drop_rate=0.1, drop_path_rate=0.1 * depth / 24,
      norm_eps=1e-6, attention_impl="auto"))
  c.sampling = ml_collections.ConfigDict(dict(cfg=1.5, top_k=900, top_p=0.96, more_smooth=False))
  return c


def check_config(config: ml_collections.ConfigDict) -> None:
  """The sections must agree: scales, vocabulary, code width, classes, image size."""
  t, m = config.tokenizer, config.model
  problems = []
  if tuple(t.patch_nums) != tuple(m.patch_nums):
    problems.append(f"tokenizer.patch_nums {tuple(t.patch_nums)} != model.patch_nums {tuple(m.patch_nums)}")
  if t.vocab_size != m.vocab_size:
    problems.append(f"tokenizer.vocab_size {t.vocab_size} != model.vocab_size {m.vocab_size}")
  if t.z_channels != m.cvae:
    problems.append(f"tokenizer.z_channels {t.z_channels} != model.cvae {m.cvae}")
  if config.data.num_classes != m.num_classes:
    problems.append(f"data.num_classes {config.data.num_classes} != model.num_classes {m.num_classes}")
  side = t.patch_nums[-1] * 2 ** (len(t.ch_mult) - 1)
  if config.data.image_size != side:
    problems.append(f"data.image_size {config.data.image_size} != last scale x tokenizer stride = {side}")
  if config.sampling.top_k > m.vocab_size:
    problems.append(f"sampling.top_k {config.sampling.top_k} exceeds the vocabulary {m.vocab_size}")
  if problems:
    raise ValueError("inconsistent VAR config: " + "; ".join(problems))


def build_var(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> VAR:
  return VAR(**config.model.to_dict(), rngs=rngs)


def build_tokenizer(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MultiScaleVQVAE:
  return MultiScaleVQVAE(**config.tokenizer.to_dict(), rngs=rngs)


def sampling_settings(config: ml_collections.ConfigDict) -> CategoricalSampling:
  return CategoricalSampling(**config.sampling.to_dict())
