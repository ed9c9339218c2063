"""Reading Hugging Face text-encoder checkpoints (safetensors + config.json) into the Flax modules."""
from __future__ import annotations

import json
from typing import Any, Iterable

import numpy as np
from flax import nnx

from flowar_jax.runs import fs

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def load_safetensors(data: bytes, where: str) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file's bytes; `where` names the file in errors."""
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
  try:
    return load(data)
  except Exception as e:  # safetensors raises its own error types for a corrupt header
    raise ValueError(f"{where} is not a readable safetensors file: {e}") from e


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
  """A Hugging Face model folder (`model.safetensors` + `config.json`) or a `.safetensors` file with
  `config.json` beside it -> (tensors, config, the weights file's path)."""
  if not fs.exists(path):
    raise FileNotFoundError(f"text encoder weights {path!r} do not exist")
  if fs.is_dir(path):
    weights, folder = fs.join(path, WEIGHTS_FILE), path
    if not fs.exists(weights):
      raise FileNotFoundError(f"the model folder {path!r} has no {WEIGHTS_FILE} (only safetensors checkpoints "
                              f"are read; found: {sorted(fs.listdir(path))[:10]})")
  else:
    if not path.endswith(".safetensors"):
      raise ValueError(f"text encoder weights {path!r}: expected a model folder or a .safetensors file")
    weights, folder = path, path.rsplit("/", 1)[0] if "/" in path else "."
  config_path = fs.join(folder, CONFIG_FILE)
  if not fs.exists(config_path):
    raise FileNotFoundError(f"no {CONFIG_FILE} beside {weights!r}: the encoder's sizes (heads, activation) "
                            "come from it")
  config = json.loads(fs.read_text(config_path))
  return load_safetensors(fs.read_bytes(weights), weights), config, weights


class Loader:
  """Copies checkpoint tensors into parameters, checking names and shapes, and which tensors went unused."""

  def __init__(self, tensors: dict[str, np.ndarray], where: str, prefix: str = ""):
    self.tensors, self.where, self.prefix = tensors, where, prefix
    self.used: set[str] = set()

  def get(self, name: str) -> np.ndarray:
    key = self.prefix + name
    if key not in self.tensors:
      raise KeyError(f"{self.where} has no tensor {key!r}: not a checkpoint of this encoder (it holds "
                     f"{len(self.tensors)} tensors, e.g. {sorted(self.tensors)[:4]})")
    self.used.add(key)
    return self.tensors[key]

  def param(self, param: nnx.Param, name: str, transpose: bool = False) -> None:
    value = np.asarray(self.get(name), np.float32)
    value = value.T if transpose else value
    expected = param.get_value().shape
    if value.shape != expected:
      raise ValueError(f"{self.where}: tensor {self.prefix + name!r} has shape {value.shape}, the encoder "
                       f"built from its config expects {expected}")
    param.set_value(value)

  def linear(self, layer: nnx.Linear, name: str) -> None:
    """PyTorch's Linear: weight `[out, in]` -> kernel `[in, out]`, and the bias if the layer has one."""
    self.param(layer.kernel, f"{name}.weight", transpose=True)
    if layer.bias is not None:
      self.param(layer.bias, f"{name}.bias")

  def layer_norm(self, layer: nnx.LayerNorm, name: str) -> None:
    self.param(layer.scale, f"{name}.weight")
    self.param(layer.bias, f"{name}.bias")

  def check_all_used(self, ignored: Iterable[str] = ()) -> None:
    """Every tensor under the prefix was read, except those whose names start with one of `ignored`."""
    ignored = tuple(ignored)
    left = sorted(k for k in self.tensors if k.startswith(self.prefix) and k not in self.used
                  and not k[len(self.prefix):].startswith(ignored))
    if left:
      raise ValueError(f"{self.where} holds {len(left)} tensors this encoder does not use, e.g. {left[:4]}: "
                       "its config does not describe it")
