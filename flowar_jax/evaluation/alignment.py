"""Text-image alignment of composed digits (position and counting, as GenEval scores them).

For each image and the slots of its caption (`data.compositions.Slots`: a relation and a digit per cell),
the digits classifier (`evaluation.digits`, fitted at the cell's side) reads each cell where the caption puts
a digit; the image scores 1 when every cell reads as its caption says, else 0. Scores are reported over all
images, over captions whose (relation, a, b) the train split holds ('seen') and over the held-out
combinations ('heldout', compositional generalisation), and per relation. Real eval compositions scored by
the same function (`real_alignment_metrics`) give the ceiling the classifier allows.

  metrics = alignment_metrics(images, slots)                 # images uint8 [N, S, S, 3]
  prompts, slots = eval_prompts(64)                          # what to sample: half held-out, half seen
  report = alignment_report(images, slots)                   # samples' and real compositions' metrics

Figures: `python -c "from flowar_jax.evaluation import alignment; print(alignment.real_alignment_metrics())"`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from flowar_jax.data import compositions
from flowar_jax.data.compositions import Slots
from flowar_jax.evaluation import digits as digits_eval

WHICH = ("both", "seen", "heldout")
_PROMPT_SEED = 7  # fixes the order seen combinations are prompted in


def as_slots(specs: Sequence[Slots | str]) -> list[Slots]:
  """Slots as they are, captions parsed (`compositions.parse_caption`; an unparseable one is an error)."""
  return [spec if isinstance(spec, Slots) else compositions.parse_caption(spec) for spec in specs]


def read_cells(images: np.ndarray, slots: Sequence[Slots]) -> np.ndarray:
  """uint8 `[N, S, S, C]` and each image's slots -> the digit the classifier reads in each cell, int64 `[N, 2]`."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[1] % 4:
    raise ValueError(f"alignment needs square images [N, S, S, C] with S divisible by 4, got {images.shape}")
  if len(slots) != len(images):
    raise ValueError(f"{len(images)} images but {len(slots)} slot specs")
  side = images.shape[1]
  half = side // 2
  crops = np.stack([images[i, top:top + half, left:left + half]
                    for i, s in enumerate(slots) for top, left, _ in s.cells(side)])
  classifier = digits_eval.digit_classifier(half)
  return classifier.predict(crops).reshape(len(images), 2)


def alignment_metrics(images: np.ndarray, slot_specs: Sequence[Slots | str], prefix: str = "alignment"
                      ) -> dict[str, float]:
  """Images uint8 `[N, S, S, C]` and each one's slots (or caption) -> scores in [0, 1] and counts.

  Keys (with `prefix`): `{prefix}` (all images), `_seen`, `_heldout`, `_{relation}_seen`,
  `_{relation}_heldout`, `_slot_accuracy` (share of cells read right) and `_num_seen` / `_num_heldout`.
  A group without images is left out rather than reported as 0.
  """
  slots = as_slots(slot_specs)
  wanted = np.array([(s.a, s.b) for s in slots], np.int64).reshape(-1, 2)
  hits = read_cells(images, slots) == wanted
  scores = hits.all(axis=1).astype(np.float64)
  held_out = compositions.held_out_combos()
  is_held_out = np.array([s in held_out for s in slots], bool)
  relations = np.array([s.relation for s in slots])
  out = {prefix: float(scores.mean()), f"{prefix}_slot_accuracy": float(hits.mean())}
  for group, members in (("seen", ~is_held_out), ("heldout", is_held_out)):
    out[f"{prefix}_num_{group}"] = int(members.sum())
    if members.any():
      out[f"{prefix}_{group}"] = float(scores[members].mean())
    for relation in compositions.RELATIONS:
      chosen = members & (relations == relation)
      if chosen.any():
        out[f"{prefix}_{relation}_{group}"] = float(scores[chosen].mean())
  return out


def eval_prompts(num_samples: int, which: str = "both") -> tuple[list[str], list[Slots]]:
  """Prompts to sample for alignment, with their slots: 'heldout' cycles through every held-out combination,
  'seen' through the seen ones (fixed shuffled order), 'both' alternates them (held-out first); paraphrases
  cycle too. The same arguments give the same prompts."""
  if which not in WHICH:
    raise ValueError(f"which must be one of {WHICH}, got {which!r}")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  held_out = compositions.held_out_combos()
  order = compositions.all_combos()
  unseen = [c for c in order if c in held_out]
  seen = [c for c in order if c not in held_out]
  seen = [seen[i] for i in np.random.default_rng(_PROMPT_SEED).permutation(len(seen))]

  def nth(combos: list[Slots], n: int) -> tuple[str, Slots]:
    combo = combos[n % len(combos)]
    return combo.caption((n // len(combos)) % len(compositions.TEMPLATES[combo.relation])), combo

  if which == "both":
    pairs = [nth(unseen if i % 2 == 0 else seen, i // 2) for i in range(num_samples)]
  else:
    pairs = [nth(unseen if which == "heldout" else seen, i) for i in range(num_samples)]
  return [p for p, _ in pairs], [s for _, s in pairs]


def real_alignment_metrics(image_size: int = compositions.CANVAS_SIZE, num_examples: int | None = None,
                           eval_fraction: float = 0.1) -> dict[str, float]:
  """The metrics of real eval compositions (held-out digits; half seen, half held-out combinations): the score
  a generator that drew perfect compositions would get."""
  source = compositions.CompositionSource("eval", image_size, eval_fraction, num_examples)
  images = np.stack([source[i]["image"] for i in range(len(source))])
  return alignment_metrics(images, source.slots, prefix="alignment_real")


def alignment_report(images: np.ndarray, slot_specs: Sequence[Slots | str], eval_fraction: float = 0.1
                     ) -> dict[str, float]:
  """`alignment_metrics` of the samples with the real compositions' (`alignment_real_*`) beside them."""
  out = alignment_metrics(images, slot_specs)
  out.update(real_alignment_metrics(np.asarray(images).shape[1], eval_fraction=eval_fraction))
  return out
