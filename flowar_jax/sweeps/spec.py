"""Declaring sweeps: a base config file and the points to train, as a grid, a random search or a list.

A sweep file (configs/sweeps/NAME.py) defines `get_sweep()`:

  from flowar_jax.sweeps import LogUniform, Sweep

  def get_sweep():
    return Sweep(config="configs/digits.py",
                 grid={"optimizer.base_lr": [2e-3, 4e-3], "model.width": [64, 128]},
                 fixed={"num_train_steps": 800})

`grid` trains every combination (the last key varies fastest); `random={key: distribution}` draws
`num_points` points from `seed`; `points=[{key: value}, ...]` lists them. `fixed` applies to every point.
Each point gets a name from its index and values, e.g. `03_base_lr=0.004_width=128`, which is its workdir.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from flowar_jax.config_files import call_file_function


def _round(value: float) -> float:
  """4 significant digits: what a point's name shows is the value it trains with."""
  return float(f"{value:.4g}")


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of `values`, uniformly."""
  values: Sequence[Any]

  def sample(self, rng: np.random.Generator) -> Any:
    if not self.values:
      raise ValueError("Choice needs at least one value")
    return self.values[int(rng.integers(len(self.values)))]


@dataclasses.dataclass(frozen=True)
class Uniform:
  """A float in [low, high], uniformly (rounded to 4 significant digits)."""
  low: float
  high: float

  def sample(self, rng: np.random.Generator) -> float:
    if not self.low < self.high:
      raise ValueError(f"Uniform needs low < high, got ({self.low}, {self.high})")
    return _round(rng.uniform(self.low, self.high))


@dataclasses.dataclass(frozen=True)
class LogUniform:
  """A float in [low, high] whose log is uniform (learning rates, weight decays), rounded to 4 significant
  digits."""
  low: float
  high: float

  def sample(self, rng: np.random.Generator) -> float:
    if not 0 < self.low < self.high:
      raise ValueError(f"LogUniform needs 0 < low < high, got ({self.low}, {self.high})")
    return _round(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: its name (and workdir below the sweep's) and the config keys it sets."""
  name: str
  values: dict[str, Any]  # what sets this point apart
  overrides: dict[str, Any]  # every key it sets: the sweep's fixed values, then its own


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A base config file ("FILE" or "FILE:ARG") and exactly one of `grid`, `random` or `points`."""
  config: str
  grid: Mapping[str, Sequence[Any]] | None = None
  random: Mapping[str, Choice | Uniform | LogUniform] | None = None
  num_points: int = 0  # random search: how many points
  seed: int = 0  # random search: the draw
  points: Sequence[Mapping[str, Any]] | None = None
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    given = [kind for kind in ("grid", "random", "points") if getattr(self, kind) is not None]
    if len(given) != 1:
      raise ValueError(f"a Sweep needs exactly one of grid, random or points, got {given or 'none'}")
    if self.grid is not None:
      empty = [key for key, values in self.grid.items() if isinstance(values, str) or not len(values)]
      if empty:
        raise ValueError(f"grid values must be non-empty lists, not for {empty}")
    if self.random is not None and self.num_points < 1:
      raise ValueError(f"a random search needs num_points >= 1, got {self.num_points}")

  def _values(self) -> list[dict[str, Any]]:
    if self.grid is not None:
      keys = list(self.grid)
      return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]
    if self.random is not None:
      rng = np.random.default_rng(self.seed)
      return [{key: dist.sample(rng) for key, dist in self.random.items()} for _ in range(self.num_points)]
    return [dict(point) for point in self.points]

  def expand(self) -> list[Point]:
    """The points in order, each with `fixed` then its own values."""
    values = self._values()
    if not values:
      raise ValueError("the sweep has no points")
    width = max(2, len(str(len(values) - 1)))
    short = _short_names(list(dict.fromkeys(k for v in values for k in v)))
    return [Point(name=f"{i:0{width}d}" + "".join(f"_{short[k]}={_format(x)}" for k, x in v.items()),
                  values=v, overrides={**self.fixed, **v}) for i, v in enumerate(values)]


def _short_names(keys: list[str]) -> dict[str, str]:
  """The last part of each dotted key, or the whole key where two keys share that last part."""
  last = [key.rsplit(".", 1)[-1] for key in keys]
  return {key: tail if last.count(tail) == 1 else key for key, tail in zip(keys, last)}


def _format(value: Any) -> str:
  if isinstance(value, float):
    text = repr(value) if len(repr(value)) <= 8 else f"{value:.4g}"
  elif isinstance(value, (tuple, list)):
    text = "-".join(_format(v) for v in value)
  else:
    text = str(value)
  return re.sub(r"[^A-Za-z0-9.+-]", "-", text)


def load_sweep(path: str) -> Sweep:
  """Runs `get_sweep()` of the sweep file at `path`."""
  sweep = call_file_function(path, "get_sweep", kind="sweep")
  if not isinstance(sweep, Sweep):
    raise TypeError(f"get_sweep() of {path!r} must return a flowar_jax.sweeps.Sweep, got {type(sweep).__name__}")
  return sweep
