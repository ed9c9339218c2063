"""Official VAR and VQVAE state dicts (numpy arrays) <-> the parameters of `models.var.VAR` and
`tokenizers.msvq.MultiScaleVQVAE`.

VAR: names match one to one except that `nn.Sequential` indices drop out (`ada_lin.1` -> `ada_lin`,
`shared_ada_lin.1` -> `shared_ada_lin`), an embedding's `weight` is `embedding`, and a Linear `weight [out, in]`
is a `kernel [in, out]`. The buffers `lvl_1L`, `attn_bias_for_masking` and `blocks.N.attn.zero_k_bias` follow
from the config and are not read.

VQVAE: a conv `weight [O, I, kh, kw]` is a `kernel [kh, kw, I, O]`, a GroupNorm `weight` is `scale`, the codebook
`quantize.embedding.weight` is `quantize.embedding.embedding`, and the phi convolutions
`quantize.quant_resi.qresi_ls.K` (partially shared), `quantize.quant_resi.K` (one per scale) or
`quantize.quant_resi.qresi` (one shared) are `quantize.quant_resi.K.conv`. The codebook-usage buffer
`quantize.ema_vocab_hit_SV` is training bookkeeping and is not read.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowar_jax.convert.params import params_from_state_dict, state_dict_from_params
from flowar_jax.models.var import VAR
from flowar_jax.tokenizers.msvq import MultiScaleVQVAE

_VAR_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
_SEQUENTIAL = (("ada_lin.1.", "ada_lin."),)
_EMBEDDINGS = ("class_emb", "lvl_embed", "quantize.embedding")
_CONV_TO_FLAX = (2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
_CONV_TO_TORCH = (3, 2, 0, 1)
_PHI = re.compile(r"^quantize\.quant_resi\.(?:qresi_ls\.(\d+)|(\d+)|(qresi))\.(weight|bias)$")
_OUR_PHI = re.compile(r"^quantize\.quant_resi\.(\d+)\.conv\.(kernel|bias)$")


def var_skipped(name: str) -> bool:
  return name in _VAR_BUFFERS or name.endswith(".zero_k_bias")


def var_to_flax(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """One official VAR state-dict entry -> (our dotted name, array in our layout)."""
  for theirs, ours in _SEQUENTIAL:
    name = name.replace(theirs, ours)
  for emb in _EMBEDDINGS:
    if name == emb + ".weight":
      return emb + ".embedding", array
  if name.endswith(".weight") and array.ndim == 2:
    return name[:-len("weight")] + "kernel", array.T
  return name, array


def var_to_torch(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """Inverse of `var_to_flax`."""
  for emb in _EMBEDDINGS:
    if name == emb + ".embedding":
      return emb + ".weight", array
  if name.endswith(".kernel"):
    name, array = name[:-len("kernel")] + "weight", array.T
  for theirs, ours in _SEQUENTIAL:
    name = name.replace(ours, theirs)
  return name, array


def vqvae_skipped(name: str) -> bool:
  return name == "quantize.ema_vocab_hit_SV"


def _vqvae_phi_layout(share_quant_resi: int):
  """The official phi container's name for phi K: partially shared, non-shared, or fully shared."""
  if share_quant_resi == 0:
    return lambda k: f"quantize.quant_resi.{k}"
  if share_quant_resi == 1:
    return lambda k: "quantize.quant_resi.qresi"
  return lambda k: f"quantize.quant_resi.qresi_ls.{k}"


def vqvae_to_flax(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """One official VQVAE state-dict entry -> (our dotted name, array in our layout)."""
  phi = _PHI.match(name)
  if phi:
    k = phi.group(1) or phi.group(2) or "0"
    name = f"quantize.quant_resi.{k}.conv.{phi.group(4)}"
  if name == "quantize.embedding.weight":
    return "quantize.embedding.embedding", array
  if name.endswith(".weight") and array.ndim == 4:
    return name[:-len("weight")] + "kernel", array.transpose(_CONV_TO_FLAX)
  if name.endswith(".weight") and array.ndim == 1:  # GroupNorm
    return name[:-len("weight")] + "scale", array
  return name, array


def vqvae_to_torch_for(share_quant_resi: int):
  """Inverse of `vqvae_to_flax` for a VQVAE with `share_quant_resi` (which names the phi container)."""
  phi_name = _vqvae_phi_layout(share_quant_resi)

  def to_torch(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    if name == "quantize.embedding.embedding":
      return "quantize.embedding.weight", array
    phi = _OUR_PHI.match(name)
    if name.endswith(".kernel"):
      name, array = name[:-len("kernel")] + "weight", array.transpose(_CONV_TO_TORCH)
    elif name.endswith(".scale"):
      name = name[:-len("scale")] + "weight"
    if phi:
      name = f"{phi_name(phi.group(1))}.{'bias' if phi.group(2) == 'bias' else 'weight'}"
    return name, array
  return to_torch


def load_var(state_dict: dict[str, np.ndarray], model_kwargs: dict) -> VAR:
  """An official VAR state dict -> a VAR module holding its weights."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VAR(**model_kwargs, rngs=nnx.Rngs(0))))
  params = params_from_state_dict(state_dict, abstract, to_flax=var_to_flax, to_torch=var_to_torch,
                                  skipped=var_skipped, where="the VAR state dict")
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def load_vqvae(state_dict: dict[str, np.ndarray], tokenizer_kwargs: dict) -> MultiScaleVQVAE:
  """An official VQVAE state dict -> a MultiScaleVQVAE module holding its weights."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MultiScaleVQVAE(**tokenizer_kwargs, rngs=nnx.Rngs(0))))
  params = params_from_state_dict(state_dict, abstract, to_flax=vqvae_to_flax,
                                  to_torch=vqvae_to_torch_for(tokenizer_kwargs.get("share_quant_resi", 4)),
                                  skipped=vqvae_skipped, where="the VQVAE state dict")
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def var_state_dict(model: VAR) -> dict[str, np.ndarray]:
  """Our VAR's parameters -> an official-named state dict (without the config-derived buffers)."""
  return state_dict_from_params(nnx.state(model, nnx.Param), to_torch=var_to_torch)


def vqvae_state_dict(model: MultiScaleVQVAE, share_quant_resi: int = 4) -> dict[str, np.ndarray]:
  """Our VQVAE's parameters -> an official-named state dict (without `quantize.ema_vocab_hit_SV`)."""
  return state_dict_from_params(nnx.state(model, nnx.Param), to_torch=vqvae_to_torch_for(share_quant_resi))
