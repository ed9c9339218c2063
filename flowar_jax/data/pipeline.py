"""grain input pipelines: an infinite, sharded, checkpointable train iterator and one ordered eval pass.

Train order, per process:
  source -> shuffle (one global permutation per epoch, same seed on every process)
         -> this process's strided share, cut to whole batches
         -> augment (grain random_map: per-example generator from the seed and the position)
         -> repeat (every epoch reshuffled and re-augmented) -> batch.
Cutting each process's share to a multiple of the local batch keeps batches inside one epoch and all
processes at the same number of steps per epoch; the few examples cut differ from epoch to epoch.

`num_workers == 0` reads everything serially in the calling thread (simple to debug, what tests use);
`num_workers > 0` runs the per-example work in that many processes (`mp_prefetch`), each reading with a
few threads, and batches in the calling process. Workers take interleaved examples and grain
re-interleaves them in order, so the stream is the same whatever `num_workers` is; both support
`get_state` / `set_state`.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterator

from absl import flags
import grain
import ml_collections
import numpy as np

from flowar_jax.data import preprocess
from flowar_jax.data import source as source_lib

_THREADS_PER_WORKER = 4
_BUFFER_PER_WORKER = 64  # examples, not batches


def _train_example(
    example: dict[str, np.ndarray],
    rng: np.random.Generator,
    *,
    image_size: int,
    resize_to: int,
    random_crop: bool,
    random_flip: bool,
) -> dict[str, np.ndarray]:
  """Resize shorter side, crop (random or central), maybe flip: float32 `[S, S, 3]` in [-1, 1]."""
  image = preprocess.resize_shorter_side(example["image"], resize_to)
  if random_crop:
    image = preprocess.random_crop(image, image_size, rng)
  else:
    image = preprocess.center_crop(image, image_size)
  if random_flip and rng.random() < 0.5:
    image = preprocess.flip(image)
  return _with_text(example, {"image": preprocess.to_float(image), "label": np.int32(example["label"])})


def _eval_example(
    example: dict[str, np.ndarray], *, image_size: int, resize_to: int
) -> dict[str, np.ndarray]:
  """Resize shorter side and center-crop: float32 `[S, S, 3]` in [-1, 1]."""
  image = preprocess.center_crop(preprocess.resize_shorter_side(example["image"], resize_to), image_size)
  return _with_text(example, {"image": preprocess.to_float(image), "label": np.int32(example["label"])})


def _with_text(example: dict, out: dict) -> dict:
  """Carries a captioned example's 'text' (str) through; batches then hold a str array `[B]` of captions."""
  if "text" in example:
    out["text"] = example["text"]
  return out


def _derived_seeds(seed: int, shard_index: int) -> tuple[int, int]:
  """(shuffle seed shared by all processes, augmentation seed distinct per process), both uint32."""
  shuffle_seed = np.random.SeedSequence([seed, 0]).generate_state(1)[0]
  augment_seed = np.random.SeedSequence([seed, 1, shard_index]).generate_state(1)[0]
  return int(shuffle_seed), int(augment_seed)


def _read_options(num_workers: int) -> grain.ReadOptions:
  if num_workers == 0:
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return grain.ReadOptions(num_threads=_THREADS_PER_WORKER, prefetch_buffer_size=_BUFFER_PER_WORKER)


def _maybe_multiprocess(dataset: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers == 0:
    return dataset
  if not flags.FLAGS.is_parsed():
    # grain 0.2.18 reads an absl flag when starting workers and fails outside an absl app
    # (google/grain#1355); accept the flag defaults, as an absl app would.
    flags.FLAGS.mark_as_parsed()
  return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def steps_per_epoch(num_examples: int, batch_size: int, shard_count: int = 1) -> int:
  """Batches each process yields per epoch (each process gets num_examples // shard_count)."""
  return (num_examples // shard_count) // (batch_size // shard_count)


def make_train_iterator(
    data_config: ml_collections.ConfigDict,
    batch_size: int,
    seed: int,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    batch_map: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> grain.DatasetIterator:
  """Infinite training batches for one process.

  Args:
    data_config: `config.data`.
    batch_size: global batch size; this process yields B = batch_size // shard_count.
    seed: non-negative; fixes the order and the augmentation of every epoch.
    shard_index: this process (e.g. `jax.process_index()`).
    shard_count: number of processes (e.g. `jax.process_count()`).
    batch_map: applied to each batch in this process, inside the grain iterator so that its position is
      still checkpointed (the text batches add the cached caption encodings this way).

  Returns:
    A grain iterator of `{'image': float32 [B, S, S, 3] in [-1, 1], 'label': int32 [B]}` (captioned
    datasets add `'text'`: str `[B]`) with `get_state()` / `set_state(state)` for checkpointing.
  """
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"Need 0 <= shard_index < shard_count, got {shard_index} and {shard_count}.")
  if batch_size <= 0 or batch_size % shard_count:
    raise ValueError(
        f"batch_size ({batch_size}) must be a positive multiple of shard_count ({shard_count})."
    )
  local_batch = batch_size // shard_count
  source = source_lib.build_source(data_config, "train")
  per_shard = len(source) // shard_count
  per_epoch = per_shard // local_batch * local_batch
  if per_epoch == 0:
    raise ValueError(
        f"The train split has {len(source)} examples, fewer than one batch of {local_batch} "
        f"for each of {shard_count} process(es)."
    )
  shuffle_seed, augment_seed = _derived_seeds(seed, shard_index)
  transform = functools.partial(
      _train_example,
      image_size=data_config.image_size,
      resize_to=source_lib.resize_size(data_config),
      random_crop=data_config.random_crop,
      random_flip=data_config.random_flip,
  )
  dataset = (
      grain.MapDataset.source(source)
      .shuffle(seed=shuffle_seed)
      .slice(slice(shard_index, shard_count * per_shard, shard_count))
      .slice(slice(0, per_epoch))
      .random_map(transform, seed=augment_seed)
      .repeat()
  )
  examples = dataset.to_iter_dataset(_read_options(data_config.num_workers))
  examples = _maybe_multiprocess(examples, data_config.num_workers)
  batches = examples.batch(local_batch, drop_remainder=True)
  return iter(batches.map(batch_map) if batch_map is not None else batches)


def make_eval_batches(
    data_config: ml_collections.ConfigDict, batch_size: int, split: str = "eval"
) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over a split (default eval), center-cropped, never flipped (the source is built now).

  Yields `{'image': float32 [B, S, S, 3] in [-1, 1], 'label': int32 [B], 'mask': bool [B]}` (and 'text'
  str `[B]` for captioned datasets, '' on padding rows). Every
  batch has exactly `batch_size` rows so a jitted eval step compiles once: the last one is padded
  with zero images and label 0, and `mask` is False on those padding rows.
  """
  source = source_lib.build_source(data_config, split)
  transform = functools.partial(
      _eval_example,
      image_size=data_config.image_size,
      resize_to=source_lib.resize_size(data_config),
  )
  dataset = grain.MapDataset.source(source).map(transform)
  examples = dataset.to_iter_dataset(_read_options(data_config.num_workers))
  examples = _maybe_multiprocess(examples, data_config.num_workers)
  return (_pad_batch(batch, batch_size) for batch in examples.batch(batch_size))


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads `{'image': [b, ...], 'label': [b]}` to batch_size rows and adds the bool `mask` `[B]`."""
  real = batch["label"].shape[0]
  pad = batch_size - real
  padded = dict(batch)
  if pad:
    padded = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
  padded["mask"] = np.arange(batch_size) < real
  return padded
