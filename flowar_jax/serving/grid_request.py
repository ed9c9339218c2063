"""Parsing and checking a grid request: `{"classes": [...], "per_class": N, "cfg": X, "seed": S}`.

Every mistake is a `RequestError` whose message names the field and what it takes, for a 400 answer.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np

FIELDS = ("classes", "per_class", "cfg", "seed")
MAX_SEED = 2**31 - 1


class RequestError(ValueError):
  """A request the server refuses; `status` is its HTTP status (4xx)."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
  """What the server accepts: labels in [0, num_classes), at most max_samples images, cfg one of cfg_choices."""
  num_classes: int
  max_samples: int
  cfg_choices: tuple[float, ...]
  default_cfg: float


@dataclasses.dataclass(frozen=True)
class GridRequest:
  classes: tuple[int, ...]
  per_class: int
  cfg: float
  seed: int

  @property
  def labels(self) -> np.ndarray:
    """int32 `[per_class * len(classes)]`: row r of the grid is every class once, in order."""
    return np.tile(np.asarray(self.classes, np.int32), self.per_class)


def _integer(name: str, value: Any, low: int, high: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise RequestError(f"{name} must be an integer, got {json.dumps(value)}")
  if not low <= value <= high:
    raise RequestError(f"{name} must lie in [{low}, {high}], got {value}")
  return value


def _classes(value: Any, limits: Limits) -> tuple[int, ...]:
  if not isinstance(value, list) or not value:
    raise RequestError(f"classes must be a non-empty list of class labels, got {json.dumps(value)}")
  for label in value:
    if isinstance(label, bool) or not isinstance(label, int):
      raise RequestError(f"classes must hold integers, got {json.dumps(label)}")
    if not 0 <= label < limits.num_classes:
      raise RequestError(f"class label {label} is out of range: the model has {limits.num_classes} classes "
                         f"(0..{limits.num_classes - 1})")
  return tuple(value)


def _cfg(value: Any, choices: Sequence[float]) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise RequestError(f"cfg must be a number, got {json.dumps(value)}")
  for choice in choices:
    if abs(choice - value) < 1e-6:
      return choice
  raise RequestError(f"cfg {value} is not served here; choose one of {', '.join(f'{c:g}' for c in choices)} "
                     f"(the server compiles one sampler per value at start: `serve --cfg_choices`)")


def parse_grid_request(body: bytes, limits: Limits) -> GridRequest:
  """The JSON object `body` -> a checked GridRequest (fields other than classes have defaults)."""
  try:
    data = json.loads(body.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RequestError(f"the request body is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise RequestError(f"the request body must be a JSON object with fields {', '.join(FIELDS)}")
  unknown = sorted(set(data) - set(FIELDS))
  if unknown:
    raise RequestError(f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
  if "classes" not in data:
    raise RequestError("classes is required: a list of class labels, e.g. [207, 360]")
  classes = _classes(data["classes"], limits)
  per_class = _integer("per_class", data.get("per_class", 1), 1, limits.max_samples)
  if len(classes) * per_class > limits.max_samples:
    raise RequestError(f"too many samples: {len(classes)} classes x {per_class} per class = "
                       f"{len(classes) * per_class}, at most {limits.max_samples} per request")
  cfg = _cfg(data.get("cfg", limits.default_cfg), limits.cfg_choices)
  seed = _integer("seed", data.get("seed", 0), 0, MAX_SEED)
  return GridRequest(classes, per_class, cfg, seed)
