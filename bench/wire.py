"""Single-connection clients on raw sockets: the first byte of a slow chunked
response, and a large upload and download timed to the last byte. Raw sockets, so
that the client's own parsing costs next to nothing."""

from __future__ import annotations

import socket
import time
import typing as t

from common import MIB
from common import SLOW_DELAY_S


def ttfb_once(port: int, timeout_s: float = 5.0) -> tuple[float, float]:
    """Seconds from sending ``GET /slow`` to the first body bytes (``chunk-1``), and to
    the second chunk (sent by the upstream ``SLOW_DELAY_S`` later), on a raw socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = f"GET /slow?delay={SLOW_DELAY_S} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        buffer = b""
        first = second = None
        started = time.perf_counter()
        sock.sendall(request.encode())
        while True:
            data = sock.recv(65536)
            now = time.perf_counter()
            if not data:
                break
            buffer += data
            if first is None and b"chunk-1" in buffer:
                first = now - started
            if second is None and b"chunk-2" in buffer:
                second = now - started
                break
    if first is None or second is None or not buffer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected /slow answer: {buffer[:200]!r}")
    return first, second


def _read_head(reader: t.BinaryIO) -> tuple[int, dict[str, str]]:
    status_line = reader.readline(65536)
    if not status_line:
        raise RuntimeError("connection closed before the status line")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = reader.readline(65536)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def _skip(reader: t.BinaryIO, view: memoryview, count: int, ended_early: str) -> None:
    """Read and drop ``count`` bytes, a buffer's worth at a time."""
    remaining = count
    while remaining:
        n = reader.readinto(view[: min(remaining, len(view))])
        if not n:
            raise RuntimeError(ended_early)
        remaining -= n


def _read_body(reader: t.BinaryIO, headers: dict[str, str], status: int) -> int:
    buffer = bytearray(MIB)
    view = memoryview(buffer)
    total = 0
    if status in (204, 304):
        return 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int(reader.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while reader.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return total
            _skip(reader, view, size, "chunked body ended early")
            total += size
            reader.readline(16)
    if "content-length" in headers:
        length = int(headers["content-length"])
        _skip(reader, view, length, "body ended early")
        return length
    while True:
        n = reader.readinto(view)
        if not n:
            return total
        total += n


def download(port: int, body_bytes: int, timeout_s: float = 120.0) -> float:
    """Seconds to GET ``/download`` (``body_bytes`` long) to its last byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        reader = sock.makefile("rb", buffering=MIB)
        started = time.perf_counter()
        sock.sendall(b"GET /download HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        status, headers = _read_head(reader)
        got = _read_body(reader, headers, status)
        elapsed = time.perf_counter() - started
    if status != 200 or got != body_bytes:
        raise RuntimeError(f"download: status {status}, {got} of {body_bytes} bytes")
    return elapsed


def upload(port: int, body_bytes: int, timeout_s: float = 120.0) -> float:
    """Seconds to PUT ``body_bytes`` (``Content-Length``) to the sink and get its answer."""
    block = memoryview(b"\0" * MIB)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        reader = sock.makefile("rb", buffering=65536)
        head = (
            f"PUT /upload/blob HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {body_bytes}\r\nConnection: close\r\n\r\n"
        )
        started = time.perf_counter()
        sock.sendall(head.encode())
        remaining = body_bytes
        while remaining > 0:
            n = min(remaining, MIB)
            sock.sendall(block[:n])
            remaining -= n
        status, headers = _read_head(reader)
        while status == 100:
            status, headers = _read_head(reader)
        _read_body(reader, headers, status)
        elapsed = time.perf_counter() - started
    if not 200 <= status < 300:
        raise RuntimeError(f"upload: status {status}")
    return elapsed
