"""Finding and loading the FID Inception weights from a local file; nothing is downloaded.

Accepted files (same weights, three containers):
  pt_inception-2015-12-05-6726825d.pth  pytorch-fid's port (reading it needs torch: `pip install flowar_jax[torch]`)
  *.npz                                  the same state dict as numpy arrays (no torch needed), e.g. made with
                                         `python -m flowar_jax.evaluation.inception_weights IN.pth OUT.npz`
  classify_image_graph_def.pb            the TF graph ADM's evaluator runs (read without TensorFlow)

Without an explicit path, the first of those names found in `default_weights_dir()` is used.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys

import jax
import numpy as np
from flax import nnx

from flowar_jax.convert.params import params_from_state_dict
from flowar_jax.convert.state_dict import read_checkpoint, select_weights
from flowar_jax.evaluation.inception import InceptionV3
from flowar_jax.evaluation.tf_graph import graph_state_dict
from flowar_jax.models.params import flat_params

PT_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                  "pt_inception-2015-12-05-6726825d.pth")
TF_GRAPH_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
PT_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
NPZ_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.npz"
TF_GRAPH_NAME = "classify_image_graph_def.pb"
_CONV_TO_FLAX = (2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
_CONV_TO_TORCH = (3, 2, 0, 1)
_BN_NAMES = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))


def default_weights_dir() -> str:
  """$XDG_CACHE_HOME/flowar_jax, else ~/.cache/flowar_jax."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "flowar_jax")


def missing_weights_message(path: str | None) -> str:
  where = f"no file at {path!r}" if path else f"none of {NPZ_WEIGHTS_NAME}, {PT_WEIGHTS_NAME}, {TF_GRAPH_NAME} " \
                                                 f"in {default_weights_dir()!r}"
  return (f"the FID Inception weights are needed for FID/sFID/IS/precision/recall, but there is {where}. "
          f"Download pytorch-fid's weights from {PT_WEIGHTS_URL} (or ADM's TF graph from {TF_GRAPH_URL}) "
          f"into {default_weights_dir()}/, or pass --inception_weights PATH (config eval.inception_weights). "
          f"Reading the .pth needs torch; convert it once to .npz with "
          f"`python -m flowar_jax.evaluation.inception_weights {PT_WEIGHTS_NAME} {NPZ_WEIGHTS_NAME}`.")


def find_weights(path: str = "") -> str:
  """The weights file to use: `path` if given (it must exist), else the first standard name in the cache dir."""
  if path:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(missing_weights_message(path))
    return path
  for name in (NPZ_WEIGHTS_NAME, PT_WEIGHTS_NAME, TF_GRAPH_NAME):
    candidate = os.path.join(default_weights_dir(), name)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(missing_weights_message(None))


@functools.lru_cache(maxsize=8)
def file_digest(path: str) -> str:
  """sha256 prefix of a file (12 hex digits): names the weights in reports and caches."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()[:12]


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A weights file (.pth, .npz, .safetensors or the TF graph .pb) -> pytorch-fid's state dict."""
  if path.endswith(".pb"):
    with open(path, "rb") as f:
      return graph_state_dict(f.read())
  state_dict, _ = select_weights(read_checkpoint(path), use_ema=None, path=repr(path))
  return state_dict


def to_flax(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """One pytorch-fid state-dict entry -> (our dotted parameter name, array in our layout)."""
  if name.endswith(".conv.weight"):
    return name[:-len("weight")] + "kernel", array.transpose(_CONV_TO_FLAX)
  if name == "fc.weight":
    return "fc.kernel", array.T
  for theirs, ours in _BN_NAMES:
    if name.endswith(f".bn.{theirs}"):
      return name[:-len(theirs)] + ours, array
  return name, array


def to_torch(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """Inverse of `to_flax`."""
  if name.endswith(".conv.kernel"):
    return name[:-len("kernel")] + "weight", array.transpose(_CONV_TO_TORCH)
  if name == "fc.kernel":
    return "fc.weight", array.T
  for theirs, ours in _BN_NAMES:
    if name.endswith(f".bn.{ours}"):
      return name[:-len(ours)] + theirs, array
  return name, array


def _skipped(name: str) -> bool:
  return name.endswith("num_batches_tracked")  # a BatchNorm counter, not a weight


def inception_from_state_dict(state_dict: dict[str, np.ndarray], where: str = "the Inception weights"
                              ) -> InceptionV3:
  """pytorch-fid's state dict -> an InceptionV3 holding it (errors name missing, extra and misshapen keys)."""
  abstract = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  params = params_from_state_dict(state_dict, abstract_params, to_flax=to_flax, to_torch=to_torch,
                                  skipped=_skipped, where=where)
  return nnx.merge(graphdef, jax.tree.map(jax.numpy.asarray, params))


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """{pytorch-fid key: shape} that `inception_from_state_dict` needs, derived from the module."""
  _, abstract_params = nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))), nnx.Param)
  out = {}
  for name, leaf in flat_params(abstract_params).items():
    theirs, view = to_torch(name, np.broadcast_to(np.zeros((), np.float32), leaf.shape))
    out[theirs] = tuple(view.shape)
  return out


@functools.lru_cache(maxsize=2)
def load_inception(path: str = "") -> tuple[InceptionV3, str]:
  """-> (the network with the weights of `path` (or the default file), the file used). Cached per process."""
  path = find_weights(path)
  return inception_from_state_dict(read_state_dict(path), where=repr(path)), path


def save_npz(src: str, dst: str) -> None:
  """Writes the weights of any accepted file as an .npz state dict (so TPU hosts need no torch)."""
  state_dict = {k: np.asarray(v, np.float32) for k, v in read_state_dict(src).items() if not _skipped(k)}
  inception_from_state_dict(state_dict, where=repr(src))  # refuse to write weights that don't fit
  np.savez(dst, **state_dict)


if __name__ == "__main__":
  if len(sys.argv) != 3 or not sys.argv[2].endswith(".npz"):
    sys.exit("usage: python -m flowar_jax.evaluation.inception_weights WEIGHTS(.pth|.pb|.npz) OUT.npz")
  save_npz(sys.argv[1], sys.argv[2])
  print(f"wrote {sys.argv[2]}")
