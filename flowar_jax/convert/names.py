"""Official PyTorch parameter names and layouts <-> flowar_jax's dotted parameter names and layouts.

FlowAR (the official `FlowAR` module's state dict): backbone parameters sit at the top level there and under
`backbone.` here; `nn.Sequential` indices drop out (`ada_lin.1` -> `ada_lin`, `adaLN_modulation.1` ->
`adaLN_modulation`, `time_embed.mlp.2` -> `time_embed.mlp.1`); a Linear `weight [out, in]` is a `kernel
[in, out]`; the class embedding's `weight` is `embedding`. Rotary frequencies and the attention mask are
buffers computed from the config, so they are not read.

VAE (MAR's KL-16 `AutoencoderKL`): names match one to one; a conv `weight [O, I, kh, kw]` is a `kernel
[kh, kw, I, O]` and a GroupNorm `weight` is `scale`. Keys under `loss.` (the training loss's networks,
present in some LDM-style checkpoints) are not part of the autoencoder and are not read.
"""
from __future__ import annotations

import numpy as np

# (official segment, ours): nn.Sequential wrappers whose index has no counterpart here.
_FLOWAR_RENAMES = (("ada_lin.1.", "ada_lin."), ("adaLN_modulation.1.", "adaLN_modulation."),
                   ("time_embed.mlp.2.", "time_embed.mlp.1."))
_CLASS_EMB = ("class_emb.weight", "backbone.class_emb.embedding")
_CONV_TO_FLAX = (2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
_CONV_TO_TORCH = (3, 2, 0, 1)


def flowar_skipped(name: str) -> bool:
  """Official buffers that the config determines (RoPE frequencies, the scale-causal mask)."""
  return name == "mask" or name.endswith(".rope.freqs")


def flowar_to_flax(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """One official FlowAR state-dict entry -> (our dotted name, array in our layout)."""
  if name == _CLASS_EMB[0]:
    return _CLASS_EMB[1], array
  for theirs, ours in _FLOWAR_RENAMES:
    name = name.replace(theirs, ours)
  if not name.startswith("flownet."):
    name = "backbone." + name
  if name.endswith(".weight") and array.ndim == 2:
    return name[:-len("weight")] + "kernel", array.T
  return name, array


def flowar_to_torch(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """Inverse of `flowar_to_flax`: our dotted name and array -> the official name and layout."""
  if name == _CLASS_EMB[1]:
    return _CLASS_EMB[0], array
  if name.endswith(".kernel"):
    name, array = name[:-len("kernel")] + "weight", array.T
  if name.startswith("backbone."):
    name = name[len("backbone."):]
  for theirs, ours in _FLOWAR_RENAMES:
    # The head's own `res_blocks.N.ada_lin` has no Sequential, only the backbone blocks' does.
    if ours == "ada_lin." and name.startswith("flownet."):
      continue
    name = name.replace(ours, theirs)
  return name, array


def vae_skipped(name: str) -> bool:
  return name.startswith("loss.")


def vae_to_flax(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """One official VAE state-dict entry -> (our dotted name, array in our layout)."""
  if name.endswith(".weight") and array.ndim == 4:
    return name[:-len("weight")] + "kernel", array.transpose(_CONV_TO_FLAX)
  if name.endswith(".weight") and array.ndim == 1:
    return name[:-len("weight")] + "scale", array
  return name, array


def vae_to_torch(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """Inverse of `vae_to_flax`."""
  if name.endswith(".kernel"):
    return name[:-len("kernel")] + "weight", array.transpose(_CONV_TO_TORCH)
  if name.endswith(".scale"):
    return name[:-len("scale")] + "weight", array
  return name, array
