"""Composed digits with captions: the bundled text-to-image dataset.

Two real scikit-learn digits share a square canvas of side S (32 by default), each upscaled to a cell of side
S / 2 as `digits.DigitsSource` upscales them, ink bright on black:

  'left'   "a 3 to the left of a 7": a horizontal pair, rows S/4..3S/4, cells at cols 0..S/2 and S/2..S
  'above'  "a 5 above a 2":          a vertical pair, cols S/4..3S/4, cells at rows 0..S/2 and S/2..S
  'two'    "two 4s":                 the horizontal pair of two different images of the same digit

Each relation has a few paraphrases ("a 7 to the right of a 3", "a 2 below a 5", "a pair of 4s"); every
caption parses back to its slots (`parse_caption`). A fixed, seeded tenth of the (relation, a, b)
combinations (`held_out_combos`) never appears in the train split: the eval split draws half its examples
from them and half from the seen ones, so alignment can be reported on seen captions and on held-out
combinations apart (compositional generalisation).

Train compositions use only the digits' train split and eval compositions only its eval split
(`splits.split_indices`, the same held-out digits as `digits.DigitsSource`). Which combination, caption and
digit images example i holds is drawn once per source from a fixed seed, unrelated to the training seed.
"""
from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
from PIL import Image

from flowar_jax.data import digits
from flowar_jax.data import splits

RELATIONS = ("left", "above", "two")
LAYOUTS = {"left": "horizontal", "above": "vertical", "two": "horizontal"}
# {a} / {b} are a digit with its article ("a 3", "an 8"); {A} is a bare digit (for plurals: "two 4s").
TEMPLATES = {
    "left": ("{a} to the left of {b}", "{b} to the right of {a}", "{a} left of {b}",
             "{A} on the left and {B} on the right"),
    "above": ("{a} above {b}", "{b} below {a}", "{a} on top of {b}", "{A} at the top and {B} at the bottom"),
    "two": ("two {A}s", "a pair of {A}s", "two {A}s side by side"),
}
COMPOSITION_SEED = 20_261_206  # fixed: the held-out combinations and the examples never move with config.seed
HELD_OUT_FRACTION = 0.1  # of each relation's combinations, at least one
NUM_EXAMPLES = {"train": 8192, "eval": 1024}
CANVAS_SIZE = 32


@dataclasses.dataclass(frozen=True)
class Slots:
  """What a caption asks for: a relation and the digit in each of its two cells (a = left / top)."""

  relation: str
  a: int
  b: int

  def __post_init__(self):
    if self.relation not in RELATIONS:
      raise ValueError(f"unknown relation {self.relation!r}; expected one of {RELATIONS}")
    for digit in (self.a, self.b):
      if not (isinstance(digit, (int, np.integer)) and 0 <= digit < digits.NUM_CLASSES):
        raise ValueError(f"slot digits must be ints in 0..9, got {self.a!r} and {self.b!r}")
    if (self.relation == "two") != (self.a == self.b):
      raise ValueError(f"relation 'two' needs two equal digits and 'left' / 'above' two different ones, got "
                       f"{self.relation!r} with {self.a} and {self.b}")

  @property
  def layout(self) -> str:
    return LAYOUTS[self.relation]

  def cells(self, image_size: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(top row, left col, digit) of each cell of side image_size // 2 on a canvas of side `image_size`."""
    half, quarter = image_size // 2, image_size // 4
    if self.layout == "horizontal":
      return (quarter, 0, self.a), (quarter, half, self.b)
    return (0, quarter, self.a), (half, quarter, self.b)

  def caption(self, template: int = 0) -> str:
    """The caption of these slots in paraphrase `template` (0 .. len(TEMPLATES[relation]) - 1)."""
    def article(d):
      return f"{'an' if d == 8 else 'a'} {d}"
    return TEMPLATES[self.relation][template].format(a=article(self.a), b=article(self.b), A=self.a, B=self.b)


@functools.cache
def all_combos() -> tuple[Slots, ...]:
  """Every (relation, a, b) the captions can name, in a fixed order: 90 'left', 90 'above', 10 'two'."""
  return tuple(Slots(relation, a, b) for relation in RELATIONS for a in range(digits.NUM_CLASSES)
               for b in range(digits.NUM_CLASSES) if (relation == "two") == (a == b))


@functools.cache
def held_out_combos(seed: int = COMPOSITION_SEED) -> frozenset[Slots]:
  """The combinations kept out of training: round(HELD_OUT_FRACTION * n) (at least 1) per relation, seeded."""
  rng = np.random.default_rng(seed)
  chosen = []
  for relation in RELATIONS:
    combos = [c for c in all_combos() if c.relation == relation]
    count = max(1, int(np.floor(HELD_OUT_FRACTION * len(combos) + 0.5)))
    chosen.extend(combos[i] for i in rng.choice(len(combos), count, replace=False))
  return frozenset(chosen)


def _template_pattern(template: str) -> re.Pattern:
  """A template as a regex over normalised captions, capturing the digits as groups a and b."""
  groups = {"{a}": r"an? (?P<a>\d)", "{b}": r"an? (?P<b>\d)", "{A}": r"(?P<a>\d)", "{B}": r"(?P<b>\d)"}
  parts = re.split(r"(\{[abAB]\})", template)
  return re.compile("".join(groups.get(part, re.escape(part)) for part in parts))


_PATTERNS = [(relation, _template_pattern(t)) for relation in RELATIONS for t in TEMPLATES[relation]]


def parse_caption(caption: str) -> Slots:
  """A caption of this dataset (any case, surrounding spaces and a final '.' ignored) -> its slots.

  Raises:
    ValueError naming the caption when it matches no template, or names an impossible pair ("a 3 to the
    left of a 3": two equal digits are captioned 'two 3s').
  """
  text = " ".join(caption.lower().strip().rstrip(".").split())
  for relation, pattern in _PATTERNS:
    match = pattern.fullmatch(text)
    if match:
      a = int(match.group("a"))
      b = int(match.group("b")) if "b" in match.groupdict() else a
      try:
        return Slots(relation, a, b)
      except ValueError as error:
        raise ValueError(f"caption {caption!r}: {error}") from None
  examples = "; ".join(repr(t.format(a="a 3", b="a 7", A=4, B=7)) for r in RELATIONS for t in TEMPLATES[r][:1])
  raise ValueError(f"caption {caption!r} matches none of the composed digits' templates, e.g. {examples}")


def compose(cells: list[tuple[int, int, np.ndarray]], image_size: int) -> np.ndarray:
  """Grey uint8 cells `[S/2, S/2]` placed at (top, left) on a black canvas -> uint8 RGB `[S, S, 3]`."""
  canvas = np.zeros((image_size, image_size), np.uint8)
  for top, left, cell in cells:
    canvas[top:top + cell.shape[0], left:left + cell.shape[1]] = cell
  return np.repeat(canvas[:, :, None], 3, axis=2)


def upscale(images: np.ndarray, side: int) -> np.ndarray:
  """Raw digits float `[N, 8, 8]` in 0..16 -> uint8 `[N, side, side]`, PIL bicubic (as `DigitsSource`)."""
  out = [Image.fromarray(image) for image in digits.to_uint8(images)]
  if side != images.shape[1]:
    out = [image.resize((side, side), Image.Resampling.BICUBIC) for image in out]
  return np.stack([np.asarray(image) for image in out])


class CompositionSource:
  """Random access to one split as `{'image': uint8 [S, S, 3], 'label': int32 -1, 'text': str}`.

  `slots[i]` and `captions[i]` say what example i holds without composing it (the text cache and the
  alignment metric read them).
  """

  num_classes = 0
  class_names: list[str] = []

  def __init__(self, split: str, image_size: int = CANVAS_SIZE, eval_fraction: float = 0.1,
               num_examples: int | None = None, seed: int = COMPOSITION_SEED):
    splits.check_split(split)
    if image_size < 8 or image_size % 4:
      raise ValueError(f"composed digits need an image_size divisible by 4 and >= 8, got {image_size}")
    num_examples = NUM_EXAMPLES[split] if num_examples is None else num_examples
    if num_examples < 1:
      raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    raw, labels = digits.load_digits_split(split, eval_fraction)
    by_digit = [np.flatnonzero(labels == d) for d in range(digits.NUM_CLASSES)]
    if min(map(len, by_digit)) < 2:  # 'two 4s' shows two different images of a 4
      raise ValueError(f"composed digits need >= 2 images of every digit in the digits' {split!r} split; "
                       f"eval_fraction={eval_fraction} leaves {min(map(len, by_digit))}")
    self.image_size = image_size
    self._cells = upscale(raw, image_size // 2)
    held_out = held_out_combos(seed)
    seen = [c for c in all_combos() if c not in held_out]
    unseen = [c for c in all_combos() if c in held_out]
    # One generator per split: train and eval draw independently, each the same on every call.
    rng = np.random.default_rng([seed, splits.SPLITS.index(split)])
    if split == "train":
      combos = [seen[i] for i in rng.integers(len(seen), size=num_examples)]
    else:  # even examples a held-out combination, odd ones a seen one
      combos = [unseen[rng.integers(len(unseen))] if i % 2 == 0 else seen[rng.integers(len(seen))]
                for i in range(num_examples)]
    self.slots: list[Slots] = combos
    self.held_out = np.array([c in held_out for c in combos])
    templates = [int(rng.integers(len(TEMPLATES[c.relation]))) for c in combos]
    self.captions: list[str] = [c.caption(t) for c, t in zip(combos, templates)]
    self._members = np.empty((num_examples, 2), np.int64)
    for i, c in enumerate(combos):
      if c.a == c.b:
        self._members[i] = rng.choice(by_digit[c.a], 2, replace=False)
      else:
        self._members[i] = rng.choice(by_digit[c.a]), rng.choice(by_digit[c.b])

  def __len__(self) -> int:
    return len(self.slots)

  def __getitem__(self, index: int) -> dict:
    slots = self.slots[index]
    (top_a, left_a, _), (top_b, left_b, _) = slots.cells(self.image_size)
    first, second = self._members[index]
    image = compose([(top_a, left_a, self._cells[first]), (top_b, left_b, self._cells[second])], self.image_size)
    return {"image": image, "label": np.int32(-1), "text": self.captions[index]}

  def __repr__(self) -> str:
    return f"CompositionSource(len={len(self)}, image_size={self.image_size})"
