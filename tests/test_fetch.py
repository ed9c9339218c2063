"""Fetching official checkpoints by path, URL or Hugging Face id, against a file server on 127.0.0.1."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from flowar_jax.convert import fetch
from flowar_jax.convert.fetch import DownloadError, fetch_checkpoint, source_kind
from loopback import FileServer

PAYLOAD = np.random.default_rng(0).bytes(3 << 20)  # more than one read chunk


@pytest.fixture
def server():
  with FileServer().running() as s:
    s.files["/w/FlowAR-S.pth"] = PAYLOAD
    yield s


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.setattr(fetch.time, "sleep", lambda s: None)  # no real backoff waits in tests
  return tmp_path / "xdg" / "flowar_jax" / "downloads"


def _cached_files(cache) -> list[str]:
  return sorted(os.listdir(cache)) if cache.exists() else []


def test_sources_are_told_apart(tmp_path):
  local = tmp_path / "a" / "b" / "c.pth"
  local.parent.mkdir(parents=True)
  local.write_bytes(b"x")
  assert source_kind(str(local)) == "local"
  assert source_kind("https://host/x.pth") == source_kind("HTTP://host/x.pth") == "url"
  assert source_kind("OliverRen/FlowAR/FlowAR-S.pth") == "hf"
  assert source_kind("hf://OliverRen/FlowAR/sub/FlowAR-S.pth@main") == "hf"
  assert source_kind("FlowAR-S.pth") == source_kind("weights/FlowAR-S.pth") == "local"
  assert source_kind("./a/b/c.pth") == "local"
  assert fetch_checkpoint(str(local)) == str(local)


def test_url_is_downloaded_once_then_cached(server, cache):
  url = server.url + "/w/FlowAR-S.pth"
  path = fetch_checkpoint(url)
  assert path.startswith(str(cache)) and path.endswith("-FlowAR-S.pth")
  with open(path, "rb") as f:
    assert f.read() == PAYLOAD
  assert fetch_checkpoint(url) == path
  assert server.count("/w/FlowAR-S.pth") == 1  # the second call made no request
  assert _cached_files(cache) == [os.path.basename(path)]  # no partial files left behind


def test_http_error_names_the_url(server, cache):
  url = server.url + "/w/absent.pth"
  with pytest.raises(DownloadError, match=rf"downloading {url} failed: HTTP 404"):
    fetch_checkpoint(url)
  assert server.count("/w/absent.pth") == 1  # a 404 is not retried
  assert _cached_files(cache) == []


def test_interrupted_transfer_is_not_cached(server, cache):
  url = server.url + "/w/FlowAR-S.pth"
  server.broken["/w/FlowAR-S.pth"] = 1000
  with pytest.raises(DownloadError, match=r"failed after 1 attempts"):
    fetch_checkpoint(url, retries=0)
  assert _cached_files(cache) == []
  # Retried: the second attempt (the server no longer breaks off) completes the file.
  server.broken["/w/FlowAR-S.pth"] = 1000
  with open(fetch_checkpoint(url, retries=2), "rb") as f:
    assert f.read() == PAYLOAD
  assert server.count("/w/FlowAR-S.pth") == 3


def test_transient_errors_are_retried_with_backoff(server, cache, monkeypatch):
  waits = []
  monkeypatch.setattr(fetch.time, "sleep", waits.append)
  server.flaky["/w/FlowAR-S.pth"] = 2
  path = fetch_checkpoint(server.url + "/w/FlowAR-S.pth", retries=3)
  assert os.path.getsize(path) == len(PAYLOAD)
  assert waits == [1.0, 2.0]
  server.flaky["/w/other.pth"] = 5
  server.files["/w/other.pth"] = b"x"
  with pytest.raises(DownloadError, match=r"other.pth failed after 3 attempts: HTTP 503"):
    fetch_checkpoint(server.url + "/w/other.pth", retries=2)


def test_sha256_is_checked(server, cache):
  url = server.url + "/w/FlowAR-S.pth"
  good = hashlib.sha256(PAYLOAD).hexdigest()
  with pytest.raises(DownloadError, match="does not match the expected"):
    fetch_checkpoint(url + "#sha256=" + "0" * 64)
  assert _cached_files(cache) == []  # a file that fails its check is not kept
  assert os.path.getsize(fetch_checkpoint(url + "#sha256=" + good)) == len(PAYLOAD)


def test_a_web_page_is_not_taken_for_a_checkpoint(server, cache):
  server.files["/share/kl16.ckpt"] = b"<html>sign in</html>"
  server.html.add("/share/kl16.ckpt")
  with pytest.raises(DownloadError, match=r"returned a web page .*direct download URL"):
    fetch_checkpoint(server.url + "/share/kl16.ckpt")
  assert _cached_files(cache) == []


def test_hugging_face_id_through_hf_endpoint(server, tmp_path, monkeypatch):
  """huggingface_hub itself, pointed at the loopback server by HF_ENDPOINT."""
  pytest.importorskip("huggingface_hub")
  monkeypatch.setenv("HF_ENDPOINT", server.url)
  monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
  server.files["/OliverRen/FlowAR/resolve/main/FlowAR-S.pth"] = PAYLOAD
  hf_cache = str(tmp_path / "hf")
  path = fetch_checkpoint("OliverRen/FlowAR/FlowAR-S.pth", cache_dir=hf_cache)
  with open(path, "rb") as f:
    assert f.read() == PAYLOAD
  assert server.count("/OliverRen/FlowAR/resolve/main/FlowAR-S.pth") == 1
  assert fetch.download_hf("OliverRen/FlowAR/FlowAR-S.pth", cache_dir=hf_cache) == path
  assert server.count("/OliverRen/FlowAR/resolve/main/FlowAR-S.pth") == 1  # cached: only metadata asked again
  with pytest.raises(DownloadError, match=r"OliverRen/FlowAR/FlowAR-X.pth"):
    fetch.download_hf("OliverRen/FlowAR/FlowAR-X.pth", cache_dir=hf_cache)


def test_convert_command_names_a_failed_download(server, cache, tmp_path):
  url = server.url + "/w/missing.pth"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-m", "flowar_jax", "convert", "--from_torch", url, "--config",
                           os.path.join(root, "configs", "digits.py"), "--workdir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2
  assert f"flowar-jax convert: error: downloading {url} failed: HTTP 404 Not Found" in result.stderr
  assert not (tmp_path / "out").exists()


def test_hugging_face_unreachable_is_named(tmp_path, monkeypatch):
  pytest.importorskip("huggingface_hub")
  with FileServer().running() as stopped:
    url = stopped.url
  monkeypatch.setenv("HF_ENDPOINT", url)  # nothing listens there any more
  monkeypatch.setattr(fetch.time, "sleep", lambda s: None)  # the hub client's retry backoff (the time module)
  with pytest.raises(DownloadError, match=rf"could not reach {url} to download runs/x/FlowAR-S.pth.*no local file"):
    fetch_checkpoint("runs/x/FlowAR-S.pth", cache_dir=str(tmp_path / "hf"))
