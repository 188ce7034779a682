"""An image server on 127.0.0.1 with the faults of the web's image URLs, for tests and the URL fetching benchmark.

`ImageServer` (a `ThreadingHTTPServer` in a background thread, standard library only) serves:

| path | response |
|---|---|
| `/images/NAME` | an image registered with `add_image(NAME, image)` (PNG; JPEG when NAME ends in `.jpg`) |
| `/missing/...` | 404 |
| `/slow/NAME` | the image NAME after `slow_seconds` (past a client's read timeout) |
| `/truncated/NAME` | the first half of NAME's bytes, with the whole file's Content-Length |
| `/html/...` | an HTML page (200, `text/html`) |
| `/redirect/NAME` | 302 to `/images/NAME` |
| `/oversized/NAME` | NAME's bytes padded to `oversized_bytes`, no Content-Length (the cap must count the body) |
| `/flaky/NAME` | 503 the first `flaky_failures` times, then NAME |
| `/garbage/...` | 200 `image/png` whose bytes are not an image |

Every response waits `latency` seconds first (the benchmark's 50 ms). `requests` counts requests per path.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


class ImageServer:
    """Serves registered images (and faults) on 127.0.0.1; use as a context manager. See the module docstring."""

    def __init__(self, latency: float = 0.0, slow_seconds: float = 3.0, oversized_bytes: int = 2 * 1024 * 1024,
                 flaky_failures: int = 1) -> None:
        self.latency, self.slow_seconds = latency, slow_seconds
        self.oversized_bytes, self.flaky_failures = oversized_bytes, flaky_failures
        self.images: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_image(self, name: str, image: Image.Image) -> str:
        """Register `image` under `name`; returns its URL."""
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG" if name.endswith(".jpg") else "PNG")
        self.images[name] = buffer.getvalue()
        return f"{self.url}/images/{name}"

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with server._lock:
                    server.requests[self.path] += 1
                    count = server.requests[self.path]
                if server.latency:
                    time.sleep(server.latency)
                kind, _, name = self.path.lstrip("/").partition("/")
                image = server.images.get(name)
                content_type = "image/jpeg" if name.endswith(".jpg") else "image/png"
                if kind == "images" and image is not None:
                    self._send(200, image, content_type)
                elif kind == "slow" and image is not None:
                    time.sleep(server.slow_seconds)
                    self._send(200, image, content_type)
                elif kind == "truncated" and image is not None:
                    self.send_response(200)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    self.wfile.write(image[: len(image) // 2])
                    self.close_connection = True
                elif kind == "html":
                    self._send(200, b"<html><body>Not found, but 200</body></html>", "text/html; charset=utf-8")
                elif kind == "redirect" and image is not None:
                    self.send_response(302)
                    self.send_header("Location", f"/images/{name}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif kind == "oversized" and image is not None:
                    self.send_response(200)
                    self.send_header("Content-Type", content_type)
                    self.end_headers()  # no Content-Length: the body runs until the connection closes
                    self.wfile.write(image + b"\0" * max(server.oversized_bytes - len(image), 0))
                    self.close_connection = True
                elif kind == "flaky" and image is not None:
                    if count <= server.flaky_failures:
                        self._send(503, b"busy", "text/plain")
                    else:
                        self._send(200, image, content_type)
                elif kind == "garbage":
                    self._send(200, b"\x89PNG\r\n\x1a\n" + b"not really" * 20, "image/png")
                else:
                    self._send(404, b"not found", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
