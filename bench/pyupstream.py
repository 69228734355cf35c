"""A small stdlib HTTP/1.1 upstream for the benchmark (loopback only).

Two uses:

* behind nginx, it serves only ``/slow`` (nginx proxies to it unbuffered), because
  nginx has no built-in way to send a chunked body slowly;
* without nginx, it is the whole upstream: ``/1k``, ``/slow``, ``/download``,
  ``/upload/...``. It is then slower than nginx and can become the bottleneck of the
  requests-per-second numbers (run.py says so).

Endpoints:

- ``GET /1k``: 1024 bytes, ``Content-Length``;
- ``GET /slow?delay=0.2``: chunked; ``chunk-1`` at once, ``chunk-2`` after ``delay``
  seconds, then the end;
- ``GET /download?bytes=N`` (or ``/download`` with ``--download-bytes``): N bytes,
  ``Content-Length``;
- ``PUT``/``POST /upload...``: reads the whole body (``Content-Length`` or chunked),
  discards it, then answers ``201`` with the byte count.

Usage: ``python bench/pyupstream.py --port 8081 [--download-bytes N]``; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs
from urllib.parse import urlsplit

ONE_KIB = b"x" * 1023 + b"\n"
BLOCK = b"\0" * (1024 * 1024)
IO_TIMEOUT_S = 60.0
MAX_SLOW_DELAY_S = 5.0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = IO_TIMEOUT_S
    download_bytes = 200 * 1024 * 1024

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def do_GET(self):  # noqa: N802
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/1k":
            self._send_fixed(200, ONE_KIB, "text/plain")
        elif url.path == "/slow":
            delay = min(float(query.get("delay", ["0.2"])[0]), MAX_SLOW_DELAY_S)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._chunk(b"chunk-1\n")
            time.sleep(delay)
            self._chunk(b"chunk-2\n")
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/download":
            size = int(query.get("bytes", [str(self.download_bytes)])[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            view = memoryview(BLOCK)
            while size > 0:
                n = min(size, len(BLOCK))
                self.wfile.write(view[:n])
                size -= n
        else:
            self._send_fixed(404, b"not found\n", "text/plain")

    def do_HEAD(self):  # noqa: N802
        self._send_fixed(200, b"", "text/plain")

    def _upload(self):
        received = 0
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                remaining = size
                while remaining:
                    data = self.rfile.read(min(remaining, 1024 * 1024))
                    if not data:
                        raise ConnectionError("chunked body ended early")
                    remaining -= len(data)
                received += size
                self.rfile.readline(16)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            buffer = bytearray(1024 * 1024)
            view = memoryview(buffer)
            while remaining:
                n = self.rfile.readinto(view[: min(remaining, len(buffer))])
                if not n:
                    raise ConnectionError("body ended early")
                remaining -= n
                received += n
        self._send_fixed(201, f"{received}\n".encode(), "text/plain")

    do_PUT = _upload  # noqa: N815
    do_POST = _upload  # noqa: N815

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _send_fixed(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_response(self, code, message=None):
        # No Server/Date headers: less work, and nothing that differs between runs.
        self.log_request(code)
        self.send_response_only(code, message)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def server_bind(self):
        # HTTPServer.server_bind does a reverse DNS lookup of the host; skip it.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_name, self.server_port = self.server_address[:2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--download-bytes", type=int, default=Handler.download_bytes)
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("loopback only")
    Handler.download_bytes = args.download_bytes
    server = Server((args.host, args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever(poll_interval=0.2)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
