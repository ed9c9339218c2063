"""`summary`: parameters per module of a config's FlowAR (and its VAE), without allocating any."""
from __future__ import annotations

import functools

import ml_collections
import numpy as np
from flax import nnx

from flowar_jax.config import validate_config
from flowar_jax.models.params import flat_params
from flowar_jax.models.registry import build_model, build_vae


def count_params(module_factory) -> dict[str, int]:
  """Parameter counts keyed by dotted path, from `nnx.eval_shape` (nothing is allocated)."""
  abstract = nnx.eval_shape(module_factory)
  return {name: int(np.prod(leaf.shape)) for name, leaf in flat_params(nnx.state(abstract, nnx.Param)).items()}


def group(counts: dict[str, int], depth: int) -> dict[str, int]:
  """Sums counts by the first `depth` parts of the path (block indices are folded into their stack)."""
  grouped: dict[str, int] = {}
  for name, n in counts.items():
    key = ".".join([p for p in name.split(".") if not p.isdigit()][:depth])
    grouped[key] = grouped.get(key, 0) + n
  return grouped


def summarize(config: ml_collections.ConfigDict) -> str:
  validate_config(config)
  flowar = count_params(functools.partial(build_model, config))
  vae = count_params(functools.partial(build_vae, config))
  lines = [f"{'module':<48}{'params':>16}"]
  for name, n in group(flowar, 2).items():
    lines.append(f"{name:<48}{n:>16,}")
  total = sum(flowar.values())
  vae_total = sum(vae.values())
  lines.append(f"{'vae (not in total_params)':<48}{vae_total:>16,}")
  lines.append(f"total_params {total} ({total / 1e6:.2f}M)")
  lines.append(f"vae_params {vae_total} ({vae_total / 1e6:.2f}M)")
  return "\n".join(lines)
