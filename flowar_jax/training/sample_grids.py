"""Sample grids while a generator trains: a periodic action that draws a fixed set of classes from fixed noise with
the EMA weights and writes the grid through the run's MetricWriter (TensorBoard image, PNG, JSONL path).

The sampler is compiled once, at the first grid; later grids load the new EMA weights into that program.
"""
from __future__ import annotations

import ml_collections
import numpy as np
from flax import nnx

from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.runs.images import enlarge
from flowar_jax.runs.metrics import MetricWriter
from flowar_jax.sampling.generate import settings_from
from flowar_jax.sampling.sampler import Sampler, image_sampler
from flowar_jax.training.state import TrainState

GRID_ROWS = 2
DEFAULT_GRID_CLASSES = 10


def grid_labels(config: ml_collections.ConfigDict) -> np.ndarray:
  """int32 `[rows * classes]`: `config.sample_grid_labels` (or up to 10 classes spread evenly over the label
  range), repeated for each row, so column j always shows the same class."""
  classes = tuple(config.sample_grid_labels)
  if not classes:
    count = min(config.model.num_classes, DEFAULT_GRID_CLASSES)
    classes = np.linspace(0, config.model.num_classes - 1, count).round().astype(int)
  return np.tile(np.asarray(classes, np.int32), GRID_ROWS)


class SampleGrids:
  """`action(step, state)` for `loop.Periodic`: writes the image `samples` at `step` through `writer`."""

  def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, vae: nnx.Module,
               writer: MetricWriter, plan: ShardingPlan | None = None):
    """`vae` is the tokenizer module; for FlowAR, `config.vae.latent_scale` must be concrete (measured before
    training starts, if it was 0). The sampler runs sharded by `plan` (the training run's; default one device)."""
    flowar = config.model.name == "flowar"
    if flowar and config.vae.latent_scale <= 0:
      raise ValueError("sample grids need a concrete vae.latent_scale: measure it before training")
    self._graphdef = graphdef
    self._vae = vae
    self._latent_scale = float(config.vae.latent_scale) if flowar else 1.0
    self._writer = writer
    self._labels = grid_labels(config)
    self._seed = config.seed
    self._settings = settings_from(config)
    self._sampler: Sampler | None = None
    self._plan = plan

  def __call__(self, step: int, state: TrainState) -> None:
    model = nnx.merge(self._graphdef, state.ema_params)
    if self._sampler is None:
      self._sampler = image_sampler(model, self._vae, self._settings, self._latent_scale, self._plan)
    else:
      self._sampler.set_weights(model, self._vae)
    images = enlarge(self._sampler(self._labels, self._seed))
    self._writer.write_images(step, {"samples": images}, columns=len(self._labels) // GRID_ROWS)
