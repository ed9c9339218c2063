"""A file server on 127.0.0.1 for download tests: plain files, errors, broken transfers, and Hugging Face's
`/{repo_id}/resolve/{revision}/{filename}` layout."""
from __future__ import annotations

import contextlib
import http.server
import threading

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FileServer:
  """Serves `files` {url path: bytes}; `broken` {path: bytes sent before the connection drops (the header
  promises the whole file)}; `flaky` {path: how many requests answer 503 first}; `html` paths answer as
  text/html. `requests` lists (method, path) of every request, in order."""

  def __init__(self):
    self.files: dict[str, bytes] = {}
    self.broken: dict[str, int] = {}
    self.flaky: dict[str, int] = {}
    self.html: set[str] = set()
    self.requests: list[tuple[str, str]] = []
    self.url = ""

  def count(self, path: str, method: str = "GET") -> int:
    return sum(1 for m, p in self.requests if (m, p) == (method, path))

  def _handler(self):
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):  # quiet
        pass

      def _answer(self, send_body: bool):
        path = self.path.split("?")[0]
        server.requests.append((self.command, path))
        if server.flaky.get(path, 0) > 0:
          server.flaky[path] -= 1
          self.send_error(503, "try again")
          return
        body = server.files.get(path)
        if body is None:
          self.send_error(404, "Not Found")
          return
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if path in server.html else "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{abs(hash(body)):x}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if not send_body:
          return
        if path in server.broken:
          self.wfile.write(body[:server.broken.pop(path)])
          self.wfile.flush()
          self.close_connection = True
          return
        self.wfile.write(body)

      def do_GET(self):  # noqa: N802
        self._answer(True)

      def do_HEAD(self):  # noqa: N802
        self._answer(False)

    return Handler

  @contextlib.contextmanager
  def running(self):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
      yield self
    finally:
      httpd.shutdown()
      httpd.server_close()
