"""Generators by name: `config.model.name` picks the family whose builders training, sampling, conversion,
`summary` and `compile` construct their modules with.

A family is a generator (backbone + head), the tokenizer it works on, and what the tokenizer stage trains and
checkpoints (the tokenizer, possibly with a discriminator). `tokenizer_seam` turns a built tokenizer module into
the `flowar_jax.tokenizers.base.Tokenizer` the generator samples and trains through.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections
from flax import nnx

from flowar_jax.config import MODEL_NAMES
from flowar_jax.config_hart import residual_head_kwargs
from flowar_jax.config_text import encoder_widths, is_text
from flowar_jax.config_var import model_heads, model_width
from flowar_jax.models.flowar import FlowAR
from flowar_jax.models.hart import HARTTransformer
from flowar_jax.models.vae import AutoencoderKL
from flowar_jax.models.vae_trainable import VAETrainable
from flowar_jax.models.var import VAR
from flowar_jax.scales import ScaleSchedule
from flowar_jax.tokenizers.base import Tokenizer
from flowar_jax.tokenizers.hybrid import HybridTokenizer
from flowar_jax.tokenizers.kl_vae import KLTokenizer
from flowar_jax.tokenizers.msvq import MultiScaleVQVAE
from flowar_jax.tokenizers.vq_trainable import VQTrainable, vqvae_kwargs

# A builder: (config, seed) -> the module, its parameters initialised from `seed`.
Builder = Callable[[ml_collections.ConfigDict, int], nnx.Module]


@dataclasses.dataclass(frozen=True)
class Family:
  """How one generator is built: the model, the tokenizer module, and the tokenizer stage's trainable (whose
  `.vae` is the tokenizer module)."""

  build_model: Builder
  build_tokenizer: Builder
  build_tokenizer_trainable: Builder


def _flowar(config: ml_collections.ConfigDict, seed: int) -> FlowAR:
  if is_text(config):
    return FlowAR(config.model, config.vae.latent_channels, rngs=nnx.Rngs(seed),
                  text_widths=encoder_widths(config.text), text_drop_prob=config.text.drop_prob)
  return FlowAR(config.model, config.vae.latent_channels, rngs=nnx.Rngs(seed))


def _var(config: ml_collections.ConfigDict, seed: int) -> VAR:
  m, v = config.model, config.vae
  return VAR(depth=m.depth, width=model_width(m), num_heads=model_heads(m), num_classes=m.num_classes,
             vocab_size=v.vocab_size, cvae=v.z_channels, patch_nums=tuple(v.patch_nums), mlp_ratio=m.mlp_ratio,
             shared_aln=m.shared_aln, attn_l2_norm=m.attn_l2_norm, cond_drop_rate=m.cond_drop_rate,
             drop_path_rate=None if m.drop_path_rate < 0 else m.drop_path_rate, norm_eps=m.norm_eps,
             attention_impl=m.attention_impl, remat_policy=m.remat, rngs=nnx.Rngs(seed))


def _vqvae(config: ml_collections.ConfigDict, seed: int) -> MultiScaleVQVAE:
  return MultiScaleVQVAE(**vqvae_kwargs(config.vae), rngs=nnx.Rngs(seed))


def _hart(config: ml_collections.ConfigDict, seed: int) -> HARTTransformer:
  m, v = config.model, config.vae
  return HARTTransformer(
      depth=m.depth, conditioning="class", num_classes=m.num_classes, vocab_size=v.vocab_size, cvae=v.z_channels,
      patch_nums=tuple(v.patch_nums), mlp_ratio=m.mlp_ratio, mlp=m.mlp, adaln=m.adaln,
      timestep_level=m.timestep_level, attn_l2_norm=m.attn_l2_norm, cond_drop_rate=m.cond_drop_rate,
      drop_path_rate=m.drop_path_rate, norm_eps=m.norm_eps, width=model_width(m), num_heads=model_heads(m),
      attention_impl=m.attention_impl, residual_head=residual_head_kwargs(m), rngs=nnx.Rngs(seed))


def _hybrid(config: ml_collections.ConfigDict, seed: int) -> HybridTokenizer:
  return HybridTokenizer(**vqvae_kwargs(config.vae), rngs=nnx.Rngs(seed))


FAMILIES: dict[str, Family] = {
    "flowar": Family(_flowar, lambda config, seed: AutoencoderKL(config.vae, rngs=nnx.Rngs(seed)), VAETrainable),
    "var": Family(_var, _vqvae, lambda config, seed: VQTrainable(_vqvae(config, seed))),
    "hart": Family(_hart, _hybrid, lambda config, seed: VQTrainable(_hybrid(config, seed))),
}
assert tuple(FAMILIES) == MODEL_NAMES, "the config schema and the registry must know the same models"


def check_model_name(name: str) -> None:
  """A clear error for a `config.model.name` the registry does not know, listing the names it does."""
  if name not in FAMILIES:
    raise ValueError(f"config.model.name {name!r} is not a known model; known models: {', '.join(sorted(FAMILIES))}")


def family(config: ml_collections.ConfigDict) -> Family:
  check_model_name(config.model.name)
  return FAMILIES[config.model.name]


def build_model(config: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
  """The generator `config.model.name` names, built for `config`."""
  return family(config).build_model(config, seed)


def build_vae(config: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
  """The tokenizer module of `config`'s family: FlowAR's KL VAE, VAR's multi-scale VQVAE or HART's hybrid
  tokenizer."""
  return family(config).build_tokenizer(config, seed)


def build_tokenizer_trainable(config: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
  """What the tokenizer stage trains and checkpoints for `config`'s family."""
  return family(config).build_tokenizer_trainable(config, seed)


def tokenizer_seam(config: ml_collections.ConfigDict, module: nnx.Module, latent_scale: float = 1.0
                   ) -> Tokenizer:
  """A built tokenizer module -> the seam the generator uses: the KL VAE with the scale pyramid at
  `latent_scale` (FlowAR), or the VQVAE (VAR) or hybrid tokenizer (HART) itself."""
  if isinstance(module, AutoencoderKL):
    return KLTokenizer(ScaleSchedule(tuple(config.model.scales)), module, latent_scale,
                       config.vae.sample_posterior)
  return module
