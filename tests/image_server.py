"""A plain HTTP server on 127.0.0.1 that serves input images and counts every request it gets.

What the input-URL tests need to tell "refused before any fetch" from "fetched": `hits` lists the paths
requested, in order. `/seed.png` is a real PNG, `/huge.png` streams more bytes than an input may have,
`redirects` maps a path to a Location, and any other path is a 404.
"""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

__all__ = ["ImageServer", "png_bytes"]


def png_bytes(size: int = 64, color: tuple[int, int, int] = (200, 40, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


class ImageServer:
    def __init__(self, huge_bytes: int = 0, declare_length: bool = True) -> None:
        self.hits: list[str] = []
        self.redirects: dict[str, str] = {}
        self.image = png_bytes()
        self.huge_bytes = huge_bytes
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits.append(self.path)
                if self.path in outer.redirects:
                    self._head(302, {"Location": outer.redirects[self.path], "Content-Length": "0"})
                elif self.path == "/seed.png":
                    self._head(200, {"Content-Type": "image/png", "Content-Length": str(len(outer.image))})
                    self.wfile.write(outer.image)
                elif self.path == "/huge.png" and outer.huge_bytes:
                    headers = {"Content-Type": "image/png"}
                    if declare_length:
                        headers["Content-Length"] = str(outer.huge_bytes)
                    else:
                        self.close_connection = True  # the end of the body is the end of the connection
                    self._head(200, headers)
                    chunk, left = b"\0" * 2**20, outer.huge_bytes
                    try:
                        while left > 0:
                            self.wfile.write(chunk[: min(left, len(chunk))])
                            left -= len(chunk)
                    except OSError:
                        pass  # the client stopped reading: what a refusal of an oversized body does
                else:
                    self._head(404, {"Content-Length": "0"})

            def _head(self, status: int, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.origin}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ImageServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
