"""Peak host memory and time of the sharded latent cache: building it, and reading it for training.

  python benchmarks/latent_cache_memory.py                          # 10k and 100k images (a few minutes)
  python benchmarks/latent_cache_memory.py --counts 2000,8000       # quicker

Synthetic RGB images (default 8x8; image i depends on i alone) are encoded by the VAE of configs/digits.py
(stride 4, 8 latent channels: moments 2 x 2 x 16 at 8x8, one 260-byte record per image) into shards of
`--shard_size` records. Each phase runs in its own process, so its peak RSS (`ru_maxrss`) is its own:

  encode     build the cache from scratch (after one warm-up batch compiled the encoder)
  train      `--epochs` epochs of the training iterator (global shuffle, batch `--batch_size`)
  in_memory  the whole cache read into one array, as every process held it before the cache was sharded

`--no_vae` fills the cache with random moments of the same shape instead of encoding ("fill"), so the reading
phases can be measured on a million images in a minute:

  python benchmarks/latent_cache_memory.py --no_vae --counts 10000,100000,1000000

For each phase and image count it prints the RSS before the phase (imports, VAE, compiled encoder), the peak
RSS during it (VmHWM, reset at the phase's start; `ru_maxrss` where /proc is missing) and their difference;
encode also prints seconds per 10k images. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SyntheticSource:
  """`count` random `[size, size, 3]` uint8 images, labels i % 10."""

  num_classes = 10
  class_names = [str(i) for i in range(10)]

  def __init__(self, count: int, size: int):
    self.count, self.size = count, size

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    return {"image": rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8), "label": np.int32(index % 10)}


class RandomMoments:
  """Stands in for the VAE (`--no_vae`): moments `[b, *shape]` drawn at random, to fill large caches quickly."""

  batch_size = 64

  def __init__(self, shape: tuple[int, ...]):
    self.shape, self.rng = shape, np.random.default_rng(0)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return self.rng.standard_normal((len(images), *self.shape)).astype(np.float32)


def _status_mib(field: str) -> float | None:
  """VmRSS (now) or VmHWM (peak) of this process from /proc, in MiB; None where /proc is not there."""
  try:
    with open("/proc/self/status") as status:
      line = next(line for line in status if line.startswith(field + ":"))
  except (OSError, StopIteration):
    return None
  return int(line.split()[1]) / 1024


def _start_measuring() -> float:
  """Resets the peak RSS to the current RSS (Linux) and returns it in MiB, so the phase's peak is its own."""
  try:
    with open("/proc/self/clear_refs", "w") as refs:
      refs.write("5")  # resets VmHWM
  except OSError:
    pass
  return _status_mib("VmRSS") or _peak_rss_mib()


def _peak_rss_mib() -> float:
  peak = _status_mib("VmHWM")
  return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config(image_size: int):
  sys.path.insert(0, ROOT)
  from configs import digits  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.data.name = "synthetic"
  config.data.image_size = image_size
  return config


def run_phase(phase: str, directory: str, count: int, args: argparse.Namespace) -> dict:
  """One phase in this process -> its figures."""
  from flowar_jax.runs import fs  # pylint: disable=g-import-not-at-top
  from flowar_jax.training import latent_cache  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.registry import build_vae  # pylint: disable=g-import-not-at-top
  config = _config(args.image_size)
  vae = build_vae(config)
  manifest = latent_cache.expected_manifest(config, vae.stride, count, args.shard_size)
  figures = {"phase": phase, "count": count, "record_bytes": manifest.record_dtype.itemsize,
             "data_mib": count * manifest.record_dtype.itemsize / 2**20}
  if phase == "encode":
    encoder = RandomMoments(manifest.shape) if args.no_vae else latent_cache.LocalEncoder(vae)
    source = SyntheticSource(count, args.image_size)
    encoder(np.zeros((1, args.image_size, args.image_size, 3), np.float32))  # compile before measuring
    before = _start_measuring()
    start = time.perf_counter()
    latent_cache.build(directory, manifest, lambda: encoder, source, config.data)
    seconds = time.perf_counter() - start
    figures["s_per_10k_images"] = seconds / count * 10_000
  else:
    cache = latent_cache.LatentCache(directory, manifest)
    if not fs.exists(fs.join(directory, manifest.shard_name(manifest.num_shards - 1, "npy"))):
      raise FileNotFoundError(f"no complete cache of {count} images in {directory}: run the encode phase first")
    before = _start_measuring()
    start = time.perf_counter()
    if phase == "train":
      iterator = cache.train_iterator(args.batch_size, seed=0)
      steps = args.epochs * (count // args.batch_size)
      for _ in range(steps):
        next(iterator)
      figures["batches_per_s"] = steps / (time.perf_counter() - start)
    else:
      everything = cache.read(np.arange(count))
      figures["held_mib"] = sum(v.nbytes for v in everything.values()) / 2**20
  figures.update(rss_before_mib=before, rss_peak_mib=_peak_rss_mib())
  figures["rss_growth_mib"] = figures["rss_peak_mib"] - before
  return figures


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--counts", default="10000,100000", help="comma-separated image counts")
  parser.add_argument("--image_size", type=int, default=8)
  parser.add_argument("--shard_size", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--phases", default="encode,train,in_memory")
  parser.add_argument("--no_vae", action="store_true", help="write random moments instead of encoding (fast)")
  parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
  parser.add_argument("--directory", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.phase:
    print(json.dumps(run_phase(args.phase, args.directory, int(args.counts), args)), flush=True)
    return
  results = []
  with tempfile.TemporaryDirectory() as root:
    for count in (int(c) for c in args.counts.split(",")):
      directory = os.path.join(root, f"cache_{count}")
      for phase in args.phases.split(","):
        command = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--directory", directory,
                   "--counts", str(count), "--image_size", str(args.image_size), "--shard_size",
                   str(args.shard_size), "--batch_size", str(args.batch_size), "--epochs", str(args.epochs)]
        command += ["--no_vae"] if args.no_vae else []
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get(
                                  "PYTHONPATH")]))))
        if done.returncode:
          raise RuntimeError(f"{phase} of {count} images failed:\n{done.stderr[-3000:]}")
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(figures)
        extra = (f", {figures['s_per_10k_images']:.1f} s per 10k images" if phase == "encode" else
                 f", {figures['batches_per_s']:.0f} batches/s" if phase == "train" else "")
        print(f"{phase if phase != 'encode' or not args.no_vae else 'fill':9s} {count:7d} images ({figures['data_mib']:.1f} MiB of records): RSS "
              f"{figures['rss_before_mib']:.0f} MiB before, peak {figures['rss_peak_mib']:.0f} MiB "
              f"(+{figures['rss_growth_mib']:.1f}){extra}", flush=True)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
