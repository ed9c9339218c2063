"""`sample`: images from a trained (or converted) FlowAR, VAR or HART checkpoint -> WORKDIR/samples/: by class
label, or for a text-conditional FlowAR by prompt (`--prompt`, `--prompts_file`)."""
from __future__ import annotations

import ml_collections
import numpy as np

from flowar_jax.config_text import is_text
from flowar_jax.sampling.generate import sample_to_workdir, settings_from
from flowar_jax.sampling.prompts import read_prompts_file, require_text, sample_prompts_to_workdir


def run(config: ml_collections.ConfigDict, workdir: str, *, seed: int, labels: list[int] | None = None,
        num_samples: int | None = None, batch_size: int | None = None, use_ema: bool | None = None,
        settings=None, prompts: list[str] | None = None, prompts_file: str | None = None,
        **setting_overrides) -> tuple[np.ndarray, np.ndarray | list[str]]:
  """Samples from WORKDIR's latest checkpoint; returns (images, labels), or (images, each image's prompt) for
  prompts. Flags left None take the config's values (`use_ema` defaults to True); `settings`, or
  `config.sampling` with `setting_overrides` (cfg, ...). With prompts, `num_samples` counts images per prompt."""
  if settings is None:
    settings = settings_from(config, **setting_overrides)
  batch_size = config.sampling.batch_size if batch_size is None else batch_size
  use_ema = True if use_ema is None else use_ema
  if prompts or prompts_file:
    require_text(config)
    if labels:
      raise ValueError("--labels and --prompt / --prompts_file exclude each other")
    prompts = list(prompts or []) + (read_prompts_file(prompts_file) if prompts_file else [])
    per_prompt = num_samples or max(1, config.sampling.num_samples // len(prompts))
    return sample_prompts_to_workdir(config, workdir, prompts, num_samples=per_prompt, seed=seed,
                                     settings=settings, batch_size=batch_size, use_ema=use_ema)
  if is_text(config):
    raise ValueError("this run is text-conditional (config.model.conditioning = 'text'): give --prompt TEXT or "
                     "--prompts_file FILE")
  return sample_to_workdir(
      config, workdir, num_samples=config.sampling.num_samples if num_samples is None else num_samples,
      seed=seed, settings=settings, labels=labels, batch_size=batch_size, use_ema=use_ema)
