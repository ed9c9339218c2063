"""Text-to-image sampling: prompts -> the frozen encoder's encodings -> a text FlowAR's compiled sampler.

Classifier-free guidance runs against the empty prompt's encoding (the null condition the model was trained
with). Prompts are encoded by the encoder the run's `config.text` names: an over-long prompt is an error naming
it, or with `text.truncate` is cut to `text.max_length` tokens (end token kept) with a warning; a word the
encoder's vocabulary cannot spell (MiniLM's [UNK]) is an error naming the prompt.
"""
from __future__ import annotations

from typing import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from flowar_jax.config_text import is_text
from flowar_jax.parallel.batch import round_up_to_data_parallel
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.runs import fs
from flowar_jax.runs.images import write_samples
from flowar_jax.runs.progress import Progress
from flowar_jax.sampling.sampler import Sampler, SamplingSettings, image_sampler
from flowar_jax.text.base import TextEncoder, TextEncoding


def check_prompts(prompts: Sequence[str]) -> list[str]:
  """A non-empty list of non-blank prompts (the empty prompt is the null condition, not a request)."""
  if isinstance(prompts, str) or not prompts:
    raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str) or not prompt.strip():
      raise ValueError(f"prompt {i} is {prompt!r}: prompts must be non-empty text (the empty prompt is the "
                       f"unconditional branch of CFG)")
  return list(prompts)


def read_prompts_file(path: str) -> list[str]:
  """One prompt per line; blank lines are skipped."""
  if not fs.exists(path):
    raise FileNotFoundError(f"--prompts_file {path!r} does not exist")
  prompts = [line.strip() for line in fs.read_text(path).splitlines() if line.strip()]
  if not prompts:
    raise ValueError(f"--prompts_file {path!r} holds no prompts (one per line)")
  return prompts


def encode_prompts(encoder: TextEncoder, prompts: Sequence[str]) -> TextEncoding:
  """B prompts -> their encoding as host arrays (`states [B, T, D]`, `mask [B, T]`, `pooled [B, P]`)."""
  tokens = encoder.tokenize(list(prompts))
  return TextEncoding(*(np.asarray(x) for x in encoder(tokens.ids, tokens.mask)))


def null_encoding(encoder: TextEncoder) -> TextEncoding:
  """The empty prompt's encoding, batch 1: the null condition of a text FlowAR."""
  tokens = encoder.tokenize([""])
  return TextEncoding(*(np.asarray(x) for x in encoder(tokens.ids, tokens.mask)))


class PromptSampler:
  """`sampler(prompts, seed)` -> uint8 images `[B, H, W, 3]`: the prompts encoded, then a compiled `Sampler`."""

  def __init__(self, encoder: TextEncoder, sampler: Sampler):
    self.encoder = encoder
    self.sampler = sampler
    self.plan = sampler.plan

  def __call__(self, prompts: Sequence[str], seed: int, first_index: int = 0) -> np.ndarray:
    return self.sampler(encode_prompts(self.encoder, check_prompts(prompts)), seed, first_index)


def prompt_sampler(model, vae, encoder: TextEncoder, settings: SamplingSettings, latent_scale: float,
                   plan: ShardingPlan | None = None) -> PromptSampler:
  """A text FlowAR and its VAE, with the frozen `encoder` it was trained with -> a `PromptSampler`."""
  if getattr(model, "conditioning", "class") != "text":
    raise ValueError("this model is class-conditional (config.model.conditioning = 'class'): it samples from "
                     "class labels (--labels), not prompts")
  return PromptSampler(encoder, image_sampler(model, vae, settings, latent_scale, plan, null=null_encoding(encoder)))


def load_prompt_sampler(config: ml_collections.ConfigDict, workdir: str, settings: SamplingSettings,
                        use_ema: bool = True, plan: ShardingPlan | None = None) -> PromptSampler:
  """`prompt_sampler` for the latest checkpoint in WORKDIR, its VAE and the encoder `config.text` names."""
  from flowar_jax.sampling.generate import load_trained, sampling_plan  # pylint: disable=g-import-not-at-top
  from flowar_jax.text.registry import build_text_encoder  # pylint: disable=g-import-not-at-top
  require_text(config, "prompts")
  plan = plan or sampling_plan(config)
  model, vae, latent_scale = load_trained(config, workdir, use_ema, plan)
  encoder = build_text_encoder(config.text)
  # Training captions with a word the encoder cannot spell only warn; a prompt asked for is refused instead of
  # being sampled as [UNK].
  encoder.tokenizer.unknown = "error"
  return prompt_sampler(model, vae, encoder, settings, latent_scale, plan)


def require_text(config: ml_collections.ConfigDict, what: str = "--prompt / --prompts_file") -> None:
  """A clear error when `config` (a run's) is class-conditional but prompts were given."""
  if not is_text(config):
    raise ValueError(f"{what}: this run is class-conditional (config.model.conditioning = 'class'); it samples "
                     f"from class labels (--labels)")


def generate_from_prompts(sampler: PromptSampler, prompts: Sequence[str], *, seed: int, batch_size: int
                          ) -> np.ndarray:
  """-> uint8 images `[N, H, W, 3]`, image i from prompts[i] with noise from (seed, i); batches of `batch_size`
  (rounded up to the data-parallel devices; the last one padded so one program serves every batch)."""
  prompts = check_prompts(prompts)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  encoding = encode_prompts(sampler.encoder, prompts)  # every prompt checked before the first sample
  batch_size = round_up_to_data_parallel(sampler.plan, min(batch_size, len(prompts)))
  out = []
  progress = Progress(len(prompts), desc="sample", unit="image")
  for start in range(0, len(prompts), batch_size):
    rows = np.resize(np.arange(start, min(start + batch_size, len(prompts))), batch_size)
    real = min(batch_size, len(prompts) - start)
    out.append(sampler.sampler(TextEncoding(*(x[rows] for x in encoding)), seed, first_index=start)[:real])
    progress.update(start + real, {})
  progress.close()
  return np.concatenate(out)


def sample_prompts_to_workdir(config: ml_collections.ConfigDict, workdir: str, prompts: Sequence[str], *,
                              num_samples: int, seed: int, settings: SamplingSettings, batch_size: int = 64,
                              use_ema: bool = True) -> tuple[np.ndarray, list[str]]:
  """`num_samples` images per prompt (grouped by prompt, one grid column each) -> WORKDIR/samples/
  {samples.npz (labels = the prompt's index), grid*.png, prompts.json}; returns (images, their prompts)."""
  prompts = check_prompts(prompts)
  require_text(config)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  sampler = load_prompt_sampler(config, workdir, settings, use_ema)
  index = np.tile(np.arange(len(prompts)), num_samples)
  per_image = [prompts[i] for i in index]
  images = generate_from_prompts(sampler, per_image, seed=seed, batch_size=batch_size)
  if jax.process_index() == 0:
    directory = fs.join(workdir, "samples")
    paths = write_samples(directory, images, index)
    fs.write_json(fs.join(directory, "prompts.json"), {"prompts": prompts, "per_image": per_image})
    paths.append(fs.join(directory, "prompts.json"))
    logging.info("wrote %s", ", ".join(paths))
    print("wrote " + ", ".join(paths), flush=True)
  return images, per_image
