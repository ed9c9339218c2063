"""Official HART state dicts (numpy arrays) <-> the parameters of `tokenizers.hybrid.HybridTokenizer` and
`heads.residual.ResidualHead`.

Tokenizer: HART's `hart_autoencoder` has VAR's VQVAE names, so the VQVAE mapping of `convert.var` applies. The
released tokenizer checkpoint is the autoencoder-with-discriminator wrapper: its names start with `vae.` (that
prefix is dropped) and its discriminator's with `disc.` (not read). `quantize.ema_vocab_hit_SV` is codebook
bookkeeping and is not read. A `double_decoder` checkpoint's `decoder2.*` / `post_quant_conv2.*` are not part of
the inference model and are reported as unexpected.

Transformer (`models.hart.HARTTransformer`, official `HARTForT2I`): `nn.Sequential` indices drop out
(`ada_lin.1` -> `ada_lin`, `lvl_embed.mlp.0` / `.2` -> `lvl_embed.linear_1` / `_2`), an embedding's `weight` is
`embedding`, a Linear `weight [out, in]` is a `kernel [in, out]`, and RMSNorm weights keep their name. The
buffers `lvl_1L`, `attn_bias_for_masking` and `blocks.N.attn.zero_k_bias` follow from the config and are not
read; `diffloss.*` and `decoder_norm.*` belong to the residual head (`load_residual_head`).

Residual head: the transformer's `diffloss.net.*` (the MLP) and `decoder_norm.*` (the norm of its condition).
`nn.Sequential` indices become names (`time_embed.mlp.0` / `.2` -> `time_embed.linear_1` / `_2`,
`res_blocks.N.mlp.0` / `.2` -> `res_blocks.N.fc1` / `fc2`, `adaLN_modulation.1` -> `adaLN_modulation`), a Linear
`weight [out, in]` is a `kernel [in, out]`, a LayerNorm `weight` is `scale` (an RMSNorm keeps `weight`). Other transformer entries are not
read by the head.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowar_jax.convert.params import params_from_state_dict, state_dict_from_params
from flowar_jax.convert.var import vqvae_skipped, vqvae_to_flax, vqvae_to_torch_for
from flowar_jax.heads.residual import ResidualHead
from flowar_jax.models.hart import HARTTransformer
from flowar_jax.tokenizers.hybrid import HybridTokenizer

_WRAPPER = "vae."
_HEAD_PREFIXES = ("diffloss.net.", "decoder_norm.")
# (official pattern, ours) for `re.sub`, and back.
_HEAD_NAMES = ((r"time_embed\.mlp\.0\.", "time_embed.linear_1."), (r"time_embed\.mlp\.2\.", "time_embed.linear_2."),
               (r"\.mlp\.0\.", ".fc1."), (r"\.mlp\.2\.", ".fc2."), (r"adaLN_modulation\.1\.", "adaLN_modulation."))
_HEAD_NAMES_BACK = ((r"time_embed.mlp.0.", r"time_embed\.linear_1\."), (r"time_embed.mlp.2.", r"time_embed\.linear_2\."),
                    (r".mlp.0.", r"\.fc1\."), (r".mlp.2.", r"\.fc2\."), (r"adaLN_modulation.1.", r"adaLN_modulation\."))
_LAYER_NORMS = ("decoder_norm.", ".in_ln.")


def tokenizer_state_dict_unwrapped(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops the autoencoder-with-discriminator wrapper: `vae.X` -> `X`, `disc.*` dropped; a bare autoencoder
  state dict passes through."""
  if not any(k.startswith(_WRAPPER) for k in state_dict):
    return dict(state_dict)
  return {k[len(_WRAPPER):]: v for k, v in state_dict.items() if k.startswith(_WRAPPER)}


def load_hybrid(state_dict: dict[str, np.ndarray], tokenizer_kwargs: dict) -> HybridTokenizer:
  """An official HART tokenizer state dict (bare, or wrapped with its discriminator) -> a HybridTokenizer."""
  state_dict = tokenizer_state_dict_unwrapped(state_dict)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: HybridTokenizer(**tokenizer_kwargs, rngs=nnx.Rngs(0))))
  params = params_from_state_dict(state_dict, abstract, to_flax=vqvae_to_flax,
                                  to_torch=vqvae_to_torch_for(tokenizer_kwargs.get("share_quant_resi", 4)),
                                  skipped=vqvae_skipped, where="the HART tokenizer state dict")
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def hybrid_state_dict(model: HybridTokenizer, share_quant_resi: int = 4) -> dict[str, np.ndarray]:
  """Our hybrid tokenizer's parameters -> a bare official-named state dict (no `ema_vocab_hit_SV`)."""
  return state_dict_from_params(nnx.state(model, nnx.Param), to_torch=vqvae_to_torch_for(share_quant_resi))


def head_to_flax(name: str, array: np.ndarray, norm: str = "layer") -> tuple[str, np.ndarray]:
  """One official head entry (`diffloss.net.*`, `decoder_norm.*`) -> (our name, array in our layout); `norm`
  is the head's condition norm ('layer' or 'rms': an RMSNorm keeps `weight`)."""
  if norm == "rms" and name == "decoder_norm.weight":
    return name, array
  if name.startswith("diffloss."):
    name = name[len("diffloss."):]
  for theirs, ours in _HEAD_NAMES:
    name = re.sub(theirs, ours, name)
  if name.endswith(".weight") and array.ndim == 2:
    return name[:-len("weight")] + "kernel", array.T
  if name.endswith(".weight") and any(n in name for n in _LAYER_NORMS):
    return name[:-len("weight")] + "scale", array
  return name, array


def head_to_torch(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """Inverse of `head_to_flax`."""
  if name.endswith(".kernel"):
    name, array = name[:-len("kernel")] + "weight", array.T
  elif name.endswith(".scale"):
    name = name[:-len("scale")] + "weight"
  for theirs, ours in _HEAD_NAMES_BACK:
    name = re.sub(ours, theirs, name)
  if name.startswith("net."):
    name = "diffloss." + name
  return name, array


def head_entries(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The residual head's entries of a HART transformer state dict (or of a head-only one)."""
  return {k: v for k, v in state_dict.items() if k.startswith(_HEAD_PREFIXES)}


def load_residual_head(state_dict: dict[str, np.ndarray], head_kwargs: dict) -> ResidualHead:
  """A HART transformer (or head-only) state dict -> a ResidualHead holding `diffloss.net` and `decoder_norm`."""
  # Built concretely (it is small): the head's schedule tables are numpy attributes, which a second
  # `nnx.eval_shape` in the same process compares as pytree metadata and fails on.
  graphdef, abstract = nnx.split(ResidualHead(**head_kwargs, rngs=nnx.Rngs(0)))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
  norm = head_kwargs.get("norm", "layer")
  params = params_from_state_dict(head_entries(state_dict), abstract,
                                  to_flax=lambda name, array: head_to_flax(name, array, norm), to_torch=head_to_torch,
                                  skipped=lambda name: False, where="the HART residual head state dict")
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def residual_head_state_dict(head: ResidualHead) -> dict[str, np.ndarray]:
  """Our residual head's parameters -> official-named entries (`diffloss.net.*`, `decoder_norm.*`)."""
  return state_dict_from_params(nnx.state(head, nnx.Param), to_torch=head_to_torch)


_TRANSFORMER_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
_TRANSFORMER_NAMES = ((r"ada_lin\.1\.", "ada_lin."), (r"^lvl_embed\.mlp\.0\.", "lvl_embed.linear_1."),
                      (r"^lvl_embed\.mlp\.2\.", "lvl_embed.linear_2."))
_TRANSFORMER_NAMES_BACK = ((r"ada_lin\.", "ada_lin.1."), (r"^lvl_embed\.linear_1\.", "lvl_embed.mlp.0."),
                           (r"^lvl_embed\.linear_2\.", "lvl_embed.mlp.2."))
_TRANSFORMER_EMBEDDINGS = ("class_emb", "lvl_embed")


def transformer_skipped(name: str) -> bool:
  """Config buffers, and the residual head's entries (read by `load_residual_head`)."""
  return name in _TRANSFORMER_BUFFERS or name.endswith(".zero_k_bias") or name.startswith(_HEAD_PREFIXES)


def transformer_to_flax(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """One official HART transformer entry -> (our dotted name, array in our layout)."""
  for theirs, ours in _TRANSFORMER_NAMES:
    name = re.sub(theirs, ours, name)
  for emb in _TRANSFORMER_EMBEDDINGS:
    if name == emb + ".weight" and array.ndim == 2:
      return emb + ".embedding", array
  if name.endswith(".weight") and array.ndim == 2:
    return name[:-len("weight")] + "kernel", array.T
  return name, array


def transformer_to_torch(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """Inverse of `transformer_to_flax`."""
  for emb in _TRANSFORMER_EMBEDDINGS:
    if name == emb + ".embedding":
      return emb + ".weight", array
  if name.endswith(".kernel"):
    name, array = name[:-len("kernel")] + "weight", array.T
  for ours, theirs in _TRANSFORMER_NAMES_BACK:
    name = re.sub(ours, theirs, name)
  return name, array


def load_transformer(state_dict: dict[str, np.ndarray], model_kwargs: dict) -> HARTTransformer:
  """An official HART transformer state dict (or one of ours, class-conditional) -> a HARTTransformer. With
  `residual_head` in `model_kwargs`, the model's residual head is read from the same state dict
  (`diffloss.net.*`, `decoder_norm.*`); without, those entries are left to `load_residual_head`."""
  kwargs = dict(model_kwargs)
  head_kwargs = kwargs.pop("residual_head", None)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: HARTTransformer(**kwargs, rngs=nnx.Rngs(0))))
  params = params_from_state_dict(state_dict, abstract, to_flax=transformer_to_flax, to_torch=transformer_to_torch,
                                  skipped=transformer_skipped, where="the HART transformer state dict")
  model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
  if head_kwargs is not None:
    width = kwargs.get("width") or 64 * kwargs.get("depth", 16)
    model.residual_head = nnx.data(load_residual_head(state_dict, dict(
        dict(channels=kwargs.get("cvae", 32), cond_dim=width, norm="rms", norm_eps=kwargs.get("norm_eps", 1e-6)),
        **head_kwargs)))
  return model


def transformer_state_dict(model: HARTTransformer) -> dict[str, np.ndarray]:
  """Our transformer's parameters -> official-named entries (without the config buffers); the residual head's,
  when the model has one, as `diffloss.net.*` and `decoder_norm.*`."""
  state = nnx.state(model, nnx.Param)
  head = None
  if model.residual_head is not None:
    head = residual_head_state_dict(model.residual_head)
    state = nnx.State({k: v for k, v in state.items() if k != "residual_head"})
  out = state_dict_from_params(state, to_torch=transformer_to_torch)
  if head is not None:
    out.update(head)
  return out
