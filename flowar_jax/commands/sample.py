"""`sample`: class-conditional samples from a trained (or converted) FlowAR, VAR or HART checkpoint ->
WORKDIR/samples/."""
from __future__ import annotations

import ml_collections
import numpy as np

from flowar_jax.sampling.generate import sample_to_workdir, settings_from


def run(config: ml_collections.ConfigDict, workdir: str, *, seed: int, labels: list[int] | None = None,
        num_samples: int | None = None, batch_size: int | None = None, use_ema: bool | None = None,
        settings=None, **setting_overrides) -> tuple[np.ndarray, np.ndarray]:
  """Samples from WORKDIR's latest checkpoint; returns (images, labels). Flags left None take the config's
  values (`use_ema` defaults to True); `settings`, or `config.sampling` with `setting_overrides` (cfg, ...)."""
  if settings is None:
    settings = settings_from(config, **setting_overrides)
  return sample_to_workdir(
      config, workdir, num_samples=config.sampling.num_samples if num_samples is None else num_samples,
      seed=seed, settings=settings, labels=labels,
      batch_size=config.sampling.batch_size if batch_size is None else batch_size,
      use_ema=True if use_ema is None else use_ema)
