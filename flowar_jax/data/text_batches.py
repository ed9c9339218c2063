"""Text training batches: a captioned dataset's images (or their cached VAE latents) with their captions'
cached encodings.

  {'image': float32 [B, S, S, 3] or 'moments': float32 [B, h, w, 2C], 'text_states': float32 [B, T, D],
   'text_mask': bool [B, T], 'text_pooled': float32 [B, P], 'label': int32 [B] (-1, unused)}

Image batches carry their captions (`with_encodings`); latent-cache batches carry their examples' indices into
the train split, which `with_example_encodings` maps to the split's captions and so to their rows.

The captions of a split are encoded once, by the frozen encoder, into WORKDIR/text_cache/<split>/
(`data.text_cache`); batches then read only their rows. The cache records the encoder settings
(`config.text.encoder`, `weights`, `tokenizer`, `max_length`, `truncate`) and refuses to serve a run with
other ones. Replacing a condition by the empty prompt's encoding (`cache.null()`, classifier-free guidance)
is the training step's business, not the data's.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Iterator, Sequence

import grain
import ml_collections
import numpy as np

from flowar_jax.data import pipeline
from flowar_jax.data import source as source_lib
from flowar_jax.data import text_cache
from flowar_jax.runs import fs
from flowar_jax.text.base import TextEncoder

# The text config's keys that decide the encodings (clip_size only where the config has it).
IDENTITY_KEYS = ("encoder", "weights", "tokenizer", "max_length", "truncate", "clip_size")
_ORIGINS_NAMED = 3


def cache_dir(workdir: str, split: str) -> str:
  return fs.join(workdir, "text_cache", split)


def encoder_identity(text_config: ml_collections.ConfigDict) -> dict:
  """What the cache's manifest records of `config.text`."""
  return {key: text_config[key] for key in IDENTITY_KEYS if key in text_config}


def _origins(source: source_lib.ImageSource) -> Callable[[str], str] | None:
  """caption -> the first few rows holding it, for sources that say where their examples come from."""
  if not hasattr(source, "origins"):
    return None
  where: dict[str, list[str]] = {}
  for caption, origin in zip(source.captions, source.origins):
    where.setdefault(caption, []).append(origin)

  def origins(caption: str) -> str:
    rows = where.get(caption, [])
    more = f" and {len(rows) - _ORIGINS_NAMED} more" if len(rows) > _ORIGINS_NAMED else ""
    return ", ".join(rows[:_ORIGINS_NAMED]) + more
  return origins


def load_or_encode(config: ml_collections.ConfigDict, encoder: TextEncoder, workdir: str, split: str = "train",
                   shard_index: int = 0, shard_count: int = 1, source: source_lib.ImageSource | None = None
                   ) -> text_cache.TextCache:
  """The text cache of `split`'s captions in WORKDIR, encoding whatever it lacks (split over the processes).
  `source`: the split's source where the caller has built it already (listing a large dataset is not free).

  Raises:
    ValueError when config.data names a dataset without captions, when the cache there was built with another
    encoder setting or caption set, or when the encoder refuses a caption (too long, without truncation).
  """
  if config.data.name not in source_lib.TEXT_DATASET_NAMES:
    raise ValueError(f"text batches need a captioned dataset (config.data.name in "
                     f"{source_lib.TEXT_DATASET_NAMES}), got {config.data.name!r}")
  if source is None:
    source = source_lib.build_source(config.data, split)
  cache, _ = text_cache.build(cache_dir(workdir, split), encoder, encoder_identity(config.text), source.captions,
                              origins=_origins(source), shard_index=shard_index, shard_count=shard_count)
  return cache


def with_encodings(batch: dict[str, np.ndarray], cache: text_cache.TextCache) -> dict[str, np.ndarray]:
  """A batch with captions `'text'` str `[B]` -> the same batch with the captions' encodings instead
  (`text_states` `[B, T, D]`, `text_mask` `[B, T]`, `text_pooled` `[B, P]`); other keys pass through."""
  if "text" not in batch:
    raise ValueError(f"a text batch needs its captions under 'text', got keys {sorted(batch)}")
  out = {key: value for key, value in batch.items() if key != "text"}
  out.update(cache.encodings(batch["text"]))
  return out


def with_example_encodings(batch: dict[str, np.ndarray], cache: text_cache.TextCache, rows: np.ndarray
                           ) -> dict[str, np.ndarray]:
  """A batch with its examples' indices into the split, `'index'` int `[B]` (a latent cache's batches) -> the
  same batch with those examples' caption encodings instead (`text_states` `[B, T, D]`, `text_mask` `[B, T]`,
  `text_pooled` `[B, P]`). `rows` int64 `[N]`: example i's caption's row in `cache` (`cache.rows(captions)`)."""
  if "index" not in batch:
    raise ValueError(f"a batch of cached latents needs its examples' indices under 'index', got keys {sorted(batch)}")
  index = np.asarray(batch["index"], np.int64)
  if index.size and (index.min() < 0 or index.max() >= len(rows)):
    raise IndexError(f"example indices must lie in [0, {len(rows)}) (the split's captions), got "
                     f"{index.min()}..{index.max()}")
  out = {key: value for key, value in batch.items() if key != "index"}
  out.update(cache.read(rows[index]))
  return out


def example_encodings(cache: text_cache.TextCache, captions: Sequence[str]
                      ) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
  """The `batch_map` that gives a latent cache's train batches (`{'moments', 'label', 'index'}`, record i being
  train example i) their captions' encodings from the train split's complete text `cache`
  (`load_or_encode`), as `with_example_encodings`. `captions`: the train split's, example i's at i."""
  return functools.partial(with_example_encodings, cache=cache, rows=cache.rows(captions))


def text_batches(config: ml_collections.ConfigDict, encoder: TextEncoder, split: str,
                 examples: Iterable[dict[str, np.ndarray]], workdir: str) -> Iterator[dict[str, np.ndarray]]:
  """Batches of `split` with captions (e.g. `data.make_eval_batches(config.data, B, split)`) -> text batches;
  the split's cache is completed first."""
  cache = load_or_encode(config, encoder, workdir, split)
  return (with_encodings(batch, cache) for batch in examples)


def make_text_train_iterator(config: ml_collections.ConfigDict, cache: text_cache.TextCache,
                             shard_index: int = 0, shard_count: int = 1) -> grain.DatasetIterator:
  """Infinite, shuffled, checkpointable text training batches of process `shard_index` of `shard_count`
  (`data.make_train_iterator`'s order and augmentation, B = config.batch_size // shard_count), their captions
  encoded from the train split's complete text `cache` (`load_or_encode`)."""
  return pipeline.make_train_iterator(config.data, config.batch_size, config.seed, shard_index=shard_index,
                                      shard_count=shard_count, batch_map=functools.partial(with_encodings, cache=cache))
