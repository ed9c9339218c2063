"""Inception Score and k-NN precision / recall, computed as ADM's evaluator computes them.

Inception Score: softmax over all 1008 outputs of pool3 @ W (the classifier *without its bias*: ADM takes the
graph's `softmax/logits/MatMul`), split into consecutive chunks of 5000 samples (10 splits for 50k; fewer
samples give fewer splits), exp(mean KL(p(y|x) || p(y))) per split, averaged. Computed in float64 from
log-softmax, so probabilities that underflow in float32 don't turn the score into NaN.

Precision / recall (Kynkaanniemi et al. 2019, as ADM configures it): each set's manifold is the union of
balls around its points with radius = squared distance to the k-th nearest neighbour (k = 3; the point
itself is the 0th). Precision = share of samples inside the reference manifold, recall = share of
references inside the sample manifold. Distances are computed on device in row blocks (float32, highest
precision); ADM computes them in float16 where finite, which can flip points that lie on a ball's surface.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from jax.sharding import Mesh, NamedSharding, PartitionSpec

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
_BLOCK_ELEMENTS = 1 << 26  # entries of one [rows, N] distance block (256 MiB in float32)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """logits `[N, C]` (for ADM parity: Inception's unbiased logits) -> the Inception Score."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) == 0:
    raise ValueError(f"inception_score needs logits [N, C], got shape {logits.shape}")
  scores = []
  for start in range(0, len(logits), split_size):
    log_p = scipy.special.log_softmax(logits[start:start + split_size], axis=1)
    log_marginal = scipy.special.logsumexp(log_p, axis=0) - np.log(len(log_p))
    kl = np.sum(np.exp(log_p) * (log_p - log_marginal), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores))


def _squared_distances(u: jax.Array, v: jax.Array) -> jax.Array:
  """`[R, D]`, `[M, D]` -> `[R, M]` squared Euclidean distances, clamped at 0 (as ADM)."""
  uu = jnp.sum(u * u, axis=1)[:, None]
  vv = jnp.sum(v * v, axis=1)[None, :]
  return jnp.maximum(uu - 2.0 * jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST) + vv, 0.0)


def _row_block(num_rows: int, num_cols: int, multiple: int) -> int:
  """Rows per distance block: within the memory budget, at most all rows, a multiple of the device count."""
  rows = min(num_rows, max(1, _BLOCK_ELEMENTS // max(num_cols, 1)))
  return -(-rows // multiple) * multiple


def _blocks(features: np.ndarray, rows: int, fill: float = 0.0):
  """Yields (start, real rows, padded block `[rows, ...]`) over the first axis."""
  for start in range(0, len(features), rows):
    block = features[start:start + rows]
    real = len(block)
    if real < rows:
      pad = np.full((rows - real,) + block.shape[1:], fill, block.dtype)
      block = np.concatenate([block, pad])
    yield start, real, block


def _placement(mesh: Mesh | None):
  """(sharding of a row block, replicated sharding), or Nones without a mesh."""
  if mesh is None:
    return None, None
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0])), NamedSharding(mesh, PartitionSpec())


@functools.partial(jax.jit, static_argnames="k")
def _kth_distance(block: jax.Array, features: jax.Array, k: int) -> jax.Array:
  return -jax.lax.top_k(-_squared_distances(block, features), k + 1)[0][:, k]


def manifold_radii(features: np.ndarray, k: int = PR_NEIGHBOURS, mesh: Mesh | None = None) -> np.ndarray:
  """features `[N, D]` -> `[N]` squared distance of each point to its k-th nearest neighbour (self = 0th)."""
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or len(features) <= k:
    raise ValueError(f"a k={k} manifold needs features [N > {k}, D], got shape {features.shape}")
  multiple = mesh.size if mesh is not None else 1
  rows = _row_block(len(features), len(features), multiple)
  row_sharding, replicated = _placement(mesh)
  all_features = jax.device_put(features, replicated)
  radii = np.empty(len(features), np.float32)
  for start, real, block in _blocks(features, rows):
    out = _kth_distance(jax.device_put(block, row_sharding), all_features, k)
    radii[start:start + real] = np.asarray(out)[:real]
  return radii


@jax.jit
def _inside(block: jax.Array, block_radii: jax.Array, ref: jax.Array, ref_radii: jax.Array):
  """-> (block rows inside any ref ball `[R]`, refs inside any block ball `[M]`)."""
  d = _squared_distances(block, ref)
  return jnp.any(d <= ref_radii[None, :], axis=1), jnp.any(d <= block_radii[:, None], axis=0)


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURS,
                     mesh: Mesh | None = None) -> tuple[float, float]:
  """reference features `[N, D]`, sample features `[M, D]` -> (precision, recall) with k-NN manifolds."""
  reference, samples = np.asarray(reference, np.float32), np.asarray(samples, np.float32)
  if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
    raise ValueError(f"precision/recall need features [N, D] and [M, D], got {reference.shape} and {samples.shape}")
  ref_radii = manifold_radii(reference, k, mesh)
  sample_radii = manifold_radii(samples, k, mesh)
  multiple = mesh.size if mesh is not None else 1
  rows = _row_block(len(samples), len(reference), multiple)
  row_sharding, replicated = _placement(mesh)
  ref_dev = jax.device_put(reference, replicated)
  ref_radii_dev = jax.device_put(ref_radii, replicated)
  sample_in = np.zeros(len(samples), bool)
  ref_in = np.zeros(len(reference), bool)
  radii_blocks = _blocks(sample_radii, rows, fill=-1.0)  # padded samples' balls contain nothing
  for (start, real, block), (_, _, block_radii) in zip(_blocks(samples, rows), radii_blocks):
    inside, covered = _inside(jax.device_put(block, row_sharding), jax.device_put(block_radii, row_sharding),
                              ref_dev, ref_radii_dev)
    sample_in[start:start + real] = np.asarray(inside)[:real]
    ref_in |= np.asarray(covered)
  return float(sample_in.mean()), float(ref_in.mean())
