"""The demo's HTTP server (standard library): `GET /` the page, `GET /info` what it serves, `POST /grid` a PNG.

`POST /grid` takes `{"classes": [..], "per_class": N, "cfg": X, "seed": S}` (`grid_request`) and answers a PNG
grid, one column per class. Bad requests get a 4xx with a one-line message (text/plain); a full queue 503.
"""
from __future__ import annotations

import io
import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from flowar_jax.runs.images import enlarge, make_grid
from flowar_jax.serving.grid_request import Limits, RequestError, parse_grid_request
from flowar_jax.serving.page import PAGE
from flowar_jax.serving.worker import Busy, SamplerWorker

MAX_BODY = 64 * 1024
log = logging.getLogger("flowar_jax.serve")


def grid_png(images: np.ndarray, columns: int) -> bytes:
  """uint8 `[N, H, W, 3]` -> PNG bytes of a grid with `columns` columns (small images enlarged to 64 px)."""
  buffer = io.BytesIO()
  Image.fromarray(make_grid(enlarge(images), columns=columns)).save(buffer, format="PNG")
  return buffer.getvalue()


class DemoServer(ThreadingHTTPServer):
  """A ThreadingHTTPServer whose handlers share one SamplerWorker; `grid_log` records every grid request
  (its fields, status and seconds)."""

  daemon_threads = True
  request_queue_size = 128  # the listen backlog: many users may connect at once

  def __init__(self, address: tuple[str, int], worker: SamplerWorker, limits: Limits, info: dict,
               timeout: float = 600.0):
    super().__init__(address, _Handler)
    self.worker, self.limits, self.timeout_s = worker, limits, timeout
    self.info = dict(info, num_classes=limits.num_classes, max_samples=limits.max_samples,
                     cfg_choices=list(limits.cfg_choices), default_cfg=limits.default_cfg,
                     batch_size=worker.batch_size)
    self.grid_log: list[dict] = []
    self._log_lock = threading.Lock()

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"

  def record(self, entry: dict) -> None:
    with self._log_lock:
      self.grid_log.append(entry)
    log.info("grid %s", json.dumps(entry))


class _Handler(BaseHTTPRequestHandler):
  server: DemoServer
  protocol_version = "HTTP/1.1"

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    log.debug("%s " + format, self.address_string(), *args)

  def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    for key, value in (extra or {}).items():
      self.send_header(key, value)
    self.end_headers()
    self.wfile.write(body)

  def _error(self, status: int, message: str) -> None:
    self._send(status, (message + "\n").encode(), "text/plain; charset=utf-8")

  def do_GET(self):  # noqa: N802
    path = self.path.split("?")[0]
    if path == "/":
      self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
    elif path == "/info":
      self._send(HTTPStatus.OK, json.dumps(self.server.info).encode(), "application/json")
    elif path == "/grid":
      self._error(HTTPStatus.METHOD_NOT_ALLOWED, "POST a JSON grid request to /grid")
    else:
      self._error(HTTPStatus.NOT_FOUND, f"no page {path!r}: the demo serves /, /info and POST /grid")

  def do_POST(self):  # noqa: N802
    if self.path.split("?")[0] != "/grid":
      self._error(HTTPStatus.NOT_FOUND, f"no endpoint {self.path!r}: POST grid requests to /grid")
      return
    length = self.headers.get("Content-Length")
    if length is None or not length.isdigit():
      self._error(HTTPStatus.LENGTH_REQUIRED, "a grid request needs a Content-Length header")
      return
    if int(length) > MAX_BODY:
      self.close_connection = True  # the body is not read
      self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request body is {length} bytes, at most {MAX_BODY}")
      return
    body = self.rfile.read(int(length))
    start = time.monotonic()
    try:
      request = parse_grid_request(body, self.server.limits)
    except RequestError as e:
      self.server.record({"status": e.status, "error": str(e)})
      self._error(e.status, str(e))
      return
    entry = {"classes": list(request.classes), "per_class": request.per_class, "cfg": request.cfg,
             "seed": request.seed}
    try:
      images = self.server.worker.sample(request.labels, request.seed, request.cfg, timeout=self.server.timeout_s)
      png = grid_png(images, columns=len(request.classes))
    except Busy as e:
      self.server.record(dict(entry, status=503))
      self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(e))
      return
    except TimeoutError as e:
      self.server.record(dict(entry, status=503))
      self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(e))
      return
    except Exception as e:  # pylint: disable=broad-except  # the user gets a message, the log the traceback
      log.exception("grid request %s failed", entry)
      self.server.record(dict(entry, status=500, error=str(e)))
      self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"sampling failed: {e}")
      return
    seconds = time.monotonic() - start
    self.server.record(dict(entry, status=200, seconds=round(seconds, 3), png_bytes=len(png)))
    self._send(HTTPStatus.OK, png, "image/png", {"X-Samples": str(len(images)), "X-Seconds": f"{seconds:.3f}"})
