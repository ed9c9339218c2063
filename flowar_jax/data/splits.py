"""Deterministic, stratified train/eval split for datasets that ship without an eval split."""
from __future__ import annotations

import numpy as np

# Fixed and unrelated to config.seed: changing the training seed must never move images between splits.
SPLIT_SEED = 20_240_601
SPLITS = ("train", "eval")


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")


def eval_mask(labels: np.ndarray, eval_fraction: float, seed: int = SPLIT_SEED) -> np.ndarray:
  """Marks the held-out examples: round(eval_fraction * n_c) per class c, chosen at random.

  Args:
    labels: int `[N]`, in the dataset's fixed order.
    eval_fraction: share held out per class, in [0, 1).
    seed: each class draws from its own generator seeded by (seed, class), so the choice within
      a class does not depend on the other classes.

  Returns:
    bool `[N]`, True for eval examples.
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
  labels = np.asarray(labels)
  mask = np.zeros(labels.shape[0], dtype=bool)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = int(np.floor(eval_fraction * members.size + 0.5))
    rng = np.random.default_rng([seed, int(label)])
    mask[rng.permutation(members)[:count]] = True
  return mask


def split_indices(labels: np.ndarray, split: str, eval_fraction: float) -> np.ndarray:
  """Sorted int64 `[M]` indices of `split` ('train' | 'eval') under `eval_mask`."""
  check_split(split)
  mask = eval_mask(labels, eval_fraction)
  return np.flatnonzero(mask if split == "eval" else ~mask)
