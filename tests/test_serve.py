"""`serve`: the demo server against 127.0.0.1, on a converted random-weight tiny FlowAR (1000 classes, 16 px).

The browser test drives Debian's `chromium --headless` and is skipped where it is not installed
(`make test-browser` installs it and runs this module).
"""
import concurrent.futures
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import compilation_cache_env, persistent_compilation_cache
from flowar_jax.commands import convert, serve
from flowar_jax.runs.stored_config import stored_config
from flowar_jax.sampling import generate as sampling
from flowar_jax.serving.grid_request import Limits, RequestError, parse_grid_request
from flowar_jax.serving.server import grid_png
from flowar_jax.serving.worker import Busy, SamplerWorker
from test_convert import flowar_config, official_flowar_state_dict, official_vae_state_dict

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 2


def tiny_served_config():
  config = flowar_config("v1")
  config.vae.encoder_blocks, config.vae.decoder_blocks = 1, 2  # the official KL-16 layout
  config.sampling.cfg, config.sampling.num_steps = 2.0, 2
  return config


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A workdir converted from random official-format FlowAR and VAE state dicts."""
  config = tiny_served_config()
  root = tmp_path_factory.mktemp("served")
  flowar_file, vae_file = str(root / "flowar.npz"), str(root / "kl16.npz")
  np.savez(flowar_file, **official_flowar_state_dict(config, seed=1)[1])
  np.savez(vae_file, **{f"model/{k}": v for k, v in official_vae_state_dict(config, seed=2)[1].items()})
  workdir = str(root / "run")
  convert.run(config, workdir, flowar_path=flowar_file, vae_path=vae_file)
  return stored_config(workdir), workdir


@pytest.fixture(scope="module")
def server(converted, compilation_cache_dir):
  config, workdir = converted
  with persistent_compilation_cache(compilation_cache_dir):
    demo = serve.make_server(config, workdir, settings=sampling.settings_from(config), cfg_choices=(1.0, 2.0),
                             batch_size=BATCH, max_samples=8, port=0)
  thread = threading.Thread(target=demo.serve_forever, daemon=True)
  thread.start()
  yield demo
  demo.shutdown()
  demo.server_close()
  demo.worker.close()


def post(url: str, body, timeout: float = 300) -> tuple[int, bytes, dict]:
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  request = urllib.request.Request(url + "/grid", data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.status, response.read(), dict(response.headers)
  except urllib.error.HTTPError as e:
    return e.code, e.read(), dict(e.headers)


def grid_side(count: int) -> int:
  return count * (64 + 2) + 2  # 16 px images enlarged to 64, 2 px padding


def test_page_and_info(server):
  with urllib.request.urlopen(server.url + "/", timeout=30) as response:
    page = response.read().decode()
  assert response.headers["Content-Type"].startswith("text/html") and 'id="generate"' in page
  with urllib.request.urlopen(server.url + "/info", timeout=30) as response:
    info = json.loads(response.read())
  assert info["num_classes"] == 1000 and info["cfg_choices"] == [1.0, 2.0] and info["default_cfg"] == 2.0
  assert (info["max_samples"], info["batch_size"], info["image_size"]) == (8, BATCH, 16)


def test_grid_matches_the_sample_command(server, converted):
  config, workdir = converted
  status, png, headers = post(server.url, {"classes": [3, 999, 7], "per_class": 2, "cfg": 2, "seed": 5})
  assert status == 200 and headers["Content-Type"] == "image/png" and headers["X-Samples"] == "6"
  grid = np.asarray(Image.open(io.BytesIO(png)))
  assert grid.shape == (grid_side(2), grid_side(3), 3)
  # The same images as `sample` draws for these labels and seed (its own program, another batch size).
  labels = np.array([3, 999, 7, 3, 999, 7])
  images = sampling.generate(config, workdir, labels=labels, seed=5, batch_size=6,
                             settings=sampling.settings_from(config, cfg=2.0))
  assert grid_png(images, columns=3) == png
  assert post(server.url, {"classes": [3, 999, 7], "per_class": 2, "cfg": 2, "seed": 5})[1] == png
  assert post(server.url, {"classes": [3, 999, 7], "per_class": 2, "cfg": 2, "seed": 6})[1] != png
  assert post(server.url, {"classes": [3, 999, 7], "per_class": 2, "cfg": 1, "seed": 5})[1] != png
  # One compiled program per sampler serves every request size.
  assert all(s._fn._jitted._cache_size() == 1 for s in server.worker.samplers.values())  # pylint: disable=protected-access


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    ({"classes": [1], "colour": "red"}, "unknown field 'colour'; the fields are classes, per_class, cfg, seed"),
    ({"per_class": 2}, "classes is required"),
    ({"classes": []}, "non-empty list"),
    ({"classes": [1000]}, "class label 1000 is out of range: the model has 1000 classes"),
    ({"classes": [-1]}, "class label -1 is out of range"),
    ({"classes": [True]}, "classes must hold integers"),
    ({"classes": [1, 2, 3], "per_class": 3}, "too many samples: 3 classes x 3 per class = 9, at most 8"),
    ({"classes": [1], "per_class": 0}, r"per_class must lie in \[1, 8\]"),
    ({"classes": [1], "cfg": 3.5}, "cfg 3.5 is not served here; choose one of 1, 2"),
    ({"classes": [1], "cfg": "2"}, "cfg must be a number"),
    ({"classes": [1], "seed": -3}, r"seed must lie in \[0, 2147483647\]"),
    ({"classes": [1], "seed": 1.5}, "seed must be an integer"),
])
def test_malformed_requests_get_400_with_a_message(server, body, message):
  status, text, _ = post(server.url, body)
  assert status == 400
  assert re.search(message, text.decode()), text
  assert server.grid_log[-1]["status"] == 400


def test_wrong_paths_methods_and_sizes(server):
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(server.url + "/grid", timeout=30)
  assert e.value.code == 405
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(server.url + "/nothing", timeout=30)
  assert e.value.code == 404 and b"serves /, /info and POST /grid" in e.value.read()
  status, text, _ = post(server.url, b"{" + b" " * 70000 + b"}")
  assert status == 413 and b"at most 65536" in text
  connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
  connection.putrequest("POST", "/grid")
  connection.endheaders()
  response = connection.getresponse()
  assert response.status == 411 and b"Content-Length" in response.read()
  connection.close()


def test_fifty_concurrent_requests_are_all_answered_in_turn(server):
  active, peak, lock = [0], [0], threading.Lock()

  def one_at_a_time(fn):
    def wrapped(labels, seed, first):
      with lock:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
      try:
        assert labels.shape == (BATCH,)  # always the compiled batch size
        return fn(labels, seed, first)
      finally:
        with lock:
          active[0] -= 1
    return wrapped

  originals = dict(server.worker.samplers)
  server.worker.samplers = {cfg: one_at_a_time(fn) for cfg, fn in originals.items()}
  try:
    bodies = [{"classes": [i % 1000, (7 * i) % 1000], "per_class": 1 + i % 2, "cfg": [1, 2][i % 2], "seed": i}
              for i in range(50)]
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
      results = list(pool.map(lambda b: post(server.url, b, timeout=600), bodies))
  finally:
    server.worker.samplers = originals
  assert [status for status, _, _ in results] == [200] * 50
  for body, (_, png, _) in zip(bodies, results):
    assert Image.open(io.BytesIO(png)).size == (grid_side(2), grid_side(body["per_class"]))
  assert peak[0] == 1


def test_worker_pads_to_one_batch_size_and_refuses_when_full():
  calls, release = [], threading.Event()

  def fake(labels, seed, first):
    calls.append((labels.copy(), seed, first))
    release.wait(10)
    return np.repeat(labels[:, None, None, None], 3, axis=3).astype(np.uint8) + np.uint8(first)

  worker = SamplerWorker({1.0: fake}, batch_size=4, max_queue=1)
  try:
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("a", worker.sample(np.arange(6), 9, 1.0)))
    first.start()
    while not calls:  # the worker is busy with the first request
      time.sleep(0.01)
    second = threading.Thread(target=lambda: results.setdefault("b", worker.sample(np.array([5]), 1, 1.0)))
    second.start()
    while worker._jobs.qsize() < 1:  # pylint: disable=protected-access
      time.sleep(0.01)
    with pytest.raises(Busy, match="1 requests are already waiting"):
      worker.sample(np.array([1]), 0, 1.0)
    release.set()
    first.join(10)
    second.join(10)
  finally:
    release.set()
    worker.close()
  assert [c[0].tolist() for c in calls] == [[0, 1, 2, 3], [4, 5, 4, 5], [5, 5, 5, 5]]
  assert [c[2] for c in calls] == [0, 4, 0]  # sample i keeps its noise index across batches
  assert results["a"][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 8, 9]
  assert results["b"].shape == (1, 1, 1, 3)


def test_request_parsing_defaults():
  limits = Limits(num_classes=10, max_samples=4, cfg_choices=(1.0, 4.3), default_cfg=4.3)
  request = parse_grid_request(b'{"classes": [2, 5], "per_class": 2}', limits)
  assert (request.cfg, request.seed) == (4.3, 0)
  assert request.labels.tolist() == [2, 5, 2, 5]
  with pytest.raises(RequestError, match="too many samples"):
    parse_grid_request(b'{"classes": [1, 2, 3, 4, 5]}', limits)


def test_serve_command_line(converted, compilation_cache_dir):
  _, workdir = converted
  env = dict(os.environ, PYTHONPATH=_REPO, JAX_PLATFORMS="cpu", **compilation_cache_env(compilation_cache_dir))
  process = subprocess.Popen([sys.executable, "-m", "flowar_jax", "serve", "--workdir", workdir, "--port", "0",
                              "--batch_size", str(BATCH), "--cfg_choices", "1,2", "--max_samples", "4"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  try:
    lines = []
    for line in process.stdout:  # library warnings may come first
      lines.append(line)
      if match := re.search(r"on (http://127\.0\.0\.1:\d+)/", line):
        break
    assert match, "".join(lines)
    status, png, _ = post(match.group(1), {"classes": [1, 2], "per_class": 2, "seed": 3})
    assert status == 200 and Image.open(io.BytesIO(png)).size == (grid_side(2), grid_side(2))
    status, text, _ = post(match.group(1), {"classes": [1, 2], "per_class": 3})
    assert status == 400 and b"at most 4 per request" in text
  finally:
    process.send_signal(2)  # Ctrl-C
    try:  # reads what it prints on the way out: a full pipe would hold up its exit
      output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      process.kill()
      output, _ = process.communicate()
      raise AssertionError("serve did not exit within 120 s of Ctrl-C:\n" + "".join(lines) + output) from None
  assert process.returncode == 0, "".join(lines) + output


def test_serve_flag_mistakes_are_one_line(converted):
  _, workdir = converted
  env = dict(os.environ, PYTHONPATH=_REPO, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "flowar_jax", "serve", "--workdir", workdir, "--cfg_choices",
                           "1,high"], capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 2
  assert "--cfg_choices must be comma-separated numbers, got '1,high'" in result.stderr


def _chromium() -> str | None:
  return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (`make test-browser` installs it)")
def test_headless_browser_requests_a_grid(server, tmp_path):
  query = "classes=4,5&per_class=2&cfg=1&seed=11&run=1"
  result = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=120000",
                           "--dump-dom", f"{server.url}/?{query}"], capture_output=True, text=True, timeout=300)
  status = re.search(r'<div id="status"[^>]*>[^<]*</div>', result.stdout)
  assert status, result.stdout[-2000:] + result.stderr[-2000:]
  attributes = dict(re.findall(r'data-([\w-]+)="([^"]*)"', status.group(0)))
  assert attributes["state"] == "done", status.group(0)
  assert (attributes["http"], attributes["width"], attributes["height"]) == ("200", str(grid_side(2)),
                                                                             str(grid_side(2)))
  # The page got the very PNG this request gives, and the server logged the page's request.
  _, png, _ = post(server.url, {"classes": [4, 5], "per_class": 2, "cfg": 1, "seed": 11})
  assert attributes["sha256"] == hashlib.sha256(png).hexdigest()
  logged = [e for e in server.grid_log if e.get("seed") == 11 and e.get("classes") == [4, 5]]
  assert len(logged) == 2 and logged[0]["status"] == 200 and logged[0]["cfg"] == 1.0
