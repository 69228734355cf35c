"""Loopback servers and probes for the streaming tests: nothing here buffers a body.

- :class:`SinkUpstream`: an HTTP/1.1 server whose every request body is streamed into a
  sha256 (``Content-Length`` or chunked), answered with ``{"sha256", "bytes"}``;
- :func:`source_handler`, :func:`event_stream_handler`: ``handler=`` functions for
  :class:`tests.upstream.RecordingUpstream` that send a large body or an endless event
  stream and count what they sent and when the connection broke;
- :class:`WebSocketEchoServer`: an RFC 6455 echo server (stdlib only) that records each
  opening handshake;
- :class:`TreeRSS`: samples the resident memory of a process and its descendants.

Every server binds ``127.0.0.1:0``, bounds each socket operation with a timeout and
joins its threads in ``stop()``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import socket
import ssl
import struct
import threading
import time
import typing as t
from pathlib import Path

from tests.upstream import LoopbackServer
from tests.upstream import RecordedRequest
from tests.upstream import send_chunk
from tests.upstream import send_response

IO_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = 5.0
MiB = 1024 * 1024
GiB = 1024 * MiB


def pattern_block(seed: int = 6, size: int = MiB) -> bytes:
    """``size`` pseudo-random bytes (incompressible; the same for the same ``seed``)."""
    return random.Random(seed).randbytes(size)


def pattern_digest(total: int, block: bytes) -> str:
    """The sha256 of ``block`` repeated to ``total`` bytes."""
    digest = hashlib.sha256()
    full, rest = divmod(total, len(block))
    for _ in range(full):
        digest.update(block)
    digest.update(block[:rest])
    return digest.hexdigest()


def send_pattern(sock: socket.socket, total: int, block: bytes, on_sent: t.Callable[[int], None] | None = None) -> None:
    """Write ``block`` repeated to ``total`` bytes on ``sock``."""
    view = memoryview(block)
    remaining = total
    while remaining:
        piece = view[: min(remaining, len(block))]
        sock.sendall(piece)
        remaining -= len(piece)
        if on_sent is not None:
            on_sent(len(piece))


class _Stream:
    """Buffered reads on a socket, for heads and bodies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError()
        self.buffer += data

    def until(self, marker: bytes, limit: int = 65536) -> bytes:
        while marker not in self.buffer:
            if len(self.buffer) > limit:
                raise ValueError("too long")
            self._fill()
        data, _, self.buffer = self.buffer.partition(marker)
        return data

    def some(self, n: int) -> bytes:
        """Up to ``n`` bytes (at least one)."""
        if not self.buffer:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def exactly(self, n: int) -> bytes:
        parts = []
        while n:
            piece = self.some(n)
            parts.append(piece)
            n -= len(piece)
        return b"".join(parts)


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    return first, headers


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((value for key, value in headers if key.lower() == name.lower()), None)


class SinkUpstream(LoopbackServer):
    """Hashes every request body as it streams in; answers ``{"sha256", "bytes"}``.

    ``results`` collects one dict per request (with ``headers``); ``received`` is the
    running byte count of the body being read.
    """

    def __init__(self) -> None:
        super().__init__()
        self.results: list[dict[str, t.Any]] = []
        self.received = 0

    def _serve(self, sock: socket.socket) -> None:
        stream = _Stream(sock)
        try:
            while not self._stopping.is_set():
                first, headers = parse_head(stream.until(b"\r\n\r\n"))
                digest = hashlib.sha256()
                count = 0

                def take(data: bytes) -> None:
                    nonlocal count
                    digest.update(data)
                    count += len(data)
                    self.received = count

                if "chunked" in (header(headers, "transfer-encoding") or "").lower():
                    while True:
                        size = int(stream.until(b"\r\n").split(b";")[0], 16)
                        if size == 0:
                            while stream.until(b"\r\n") != b"":  # trailer lines, then the empty line
                                pass
                            break
                        remaining = size
                        while remaining:
                            piece = stream.some(min(remaining, 1 << 20))
                            take(piece)
                            remaining -= len(piece)
                        stream.exactly(2)
                else:
                    remaining = int(header(headers, "content-length") or "0")
                    while remaining:
                        piece = stream.some(min(remaining, 1 << 20))
                        take(piece)
                        remaining -= len(piece)
                result = {"request_line": first, "sha256": digest.hexdigest(), "bytes": count, "headers": headers}
                with self._lock:
                    self.results.append(result)
                body = json.dumps({"sha256": result["sha256"], "bytes": count}).encode()
                send_response(sock, 200, [("Content-Type", "application/json")], body)
        except (EOFError, OSError, ValueError):
            pass


class SendProbe:
    """What a ``handler=`` sent on its connections, and when each connection broke."""

    def __init__(self) -> None:
        self.sent = 0
        self.broken_at: list[float] = []
        self.finished = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.sent += n

    def broke(self) -> None:
        with self.lock:
            self.broken_at.append(time.monotonic())

    def wait_broken(self, n: int, timeout_s: float) -> list[float]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.broken_at) >= n:
                    return list(self.broken_at)
            time.sleep(0.01)
        with self.lock:
            return list(self.broken_at)


def source_handler(total: int, block: bytes, probe: SendProbe, *, content_length: bool = True):
    """A ``handler=`` sending ``block`` repeated to ``total`` bytes (with ``Content-Length``,
    else chunked in block-sized chunks), counting into ``probe``."""

    def handle(request: RecordedRequest, sock: socket.socket) -> bool:
        try:
            if content_length:
                send_response(sock, 200, [("Content-Type", "application/octet-stream"),
                                          ("Content-Length", str(total))], content_length=False)
                send_pattern(sock, total, block, probe.add)
            else:
                send_response(sock, 200, [("Content-Type", "application/octet-stream"),
                                          ("Transfer-Encoding", "chunked")], content_length=False)
                remaining = total
                while remaining:
                    piece = block[: min(remaining, len(block))]
                    send_chunk(sock, piece)
                    probe.add(len(piece))
                    remaining -= len(piece)
                send_chunk(sock, b"")
        except OSError:
            probe.broke()
            return False
        with probe.lock:
            probe.finished += 1
        return True

    return handle


def event_stream_handler(interval_s: float, probe: SendProbe, *, gaps: t.Sequence[float] = (), limit: int = 600):
    """A ``handler=`` for a chunked ``text/event-stream``: event ``i`` every ``interval_s``
    (or after ``gaps[i]`` when given, then the stream ends), at most ``limit`` events.
    Records the send time of each event in ``probe.sent_at``."""

    def handle(request: RecordedRequest, sock: socket.socket) -> bool:
        probe.sent_at = []  # type: ignore[attr-defined]
        try:
            send_response(sock, 200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                                      ("Transfer-Encoding", "chunked")], content_length=False)
            count = len(gaps) if gaps else limit
            for i in range(count):
                time.sleep(gaps[i] if gaps else (interval_s if i else 0))
                send_chunk(sock, f"data: event-{i}\n\n".encode())
                probe.sent_at.append(time.monotonic())  # type: ignore[attr-defined]
                probe.add(1)
            send_chunk(sock, b"")
        except OSError:
            probe.broke()
            return False
        return True

    return handle


# -- WebSocket -------------------------------------------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def ws_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


def _unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def ws_frame(opcode: int, payload: bytes, mask: bytes = b"") -> bytes:
    """One frame, FIN set: unmasked (a server's), or masked with the 4-byte ``mask``."""
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, bit | 127, n)
    return head + mask + (_unmask(payload, mask) if mask else payload)


class WebSocketEchoServer(LoopbackServer):
    """Echoes text and binary messages and answers pings; records handshakes.

    Special text messages: ``"close-me"``: the server sends a close frame (1000) and
    closes the TCP connection; ``"drop-me"``: the server closes the TCP connection
    without a close frame. A request for ``/refuse`` gets ``403`` with a body instead of
    the upgrade; ``/greet`` gets a ``"welcome"`` text frame in the same write as the
    ``101``; a request without ``Upgrade`` gets ``200 plain``. ``ended`` is set (and
    ``end_reasons`` appended) when a connection ends.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(ssl_context=ssl_context)
        self.handshakes: list[tuple[str, list[tuple[str, str]]]] = []
        self.end_reasons: list[str] = []
        self.ended = threading.Event()
        self.pings: list[bytes] = []

    def _end(self, reason: str) -> None:
        with self._lock:
            self.end_reasons.append(reason)
        self.ended.set()

    def _serve(self, sock: socket.socket) -> None:
        stream = _Stream(sock)
        reason = "eof"
        try:
            first, headers = parse_head(stream.until(b"\r\n\r\n"))
            with self._lock:
                self.handshakes.append((first, headers))
            if header(headers, "upgrade") is None:
                send_response(sock, 200, [("Content-Type", "text/plain"), ("Connection", "close")], b"plain\n")
                reason = "plain"
                return
            if first.split(" ")[1].startswith("/refuse"):
                refusal = [("Content-Type", "text/plain"), ("X-Refused", "yes")]
                send_response(sock, 403, refusal, b"no upgrade for you\n")
                reason = "refused"
                return
            key = header(headers, "sec-websocket-key") or ""
            greeting = ws_frame(OP_TEXT, b"welcome") if first.split(" ")[1].startswith("/greet") else b""
            sock.sendall(  # a greeting goes in the same write as the head
                (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Accept: {ws_accept(key)}\r\nX-Upstream: echo\r\n\r\n"
                ).encode()
                + greeting
            )
            message: list[bytes] = []
            message_op = OP_TEXT
            while True:
                b1, b2 = stream.exactly(2)
                fin, opcode, length = b1 & 0x80, b1 & 0x0F, b2 & 0x7F
                if length == 126:
                    (length,) = struct.unpack("!H", stream.exactly(2))
                elif length == 127:
                    (length,) = struct.unpack("!Q", stream.exactly(8))
                mask = stream.exactly(4) if b2 & 0x80 else b""
                payload = stream.exactly(length)
                if mask:
                    payload = _unmask(payload, mask)
                if opcode == OP_PING:
                    self.pings.append(payload)
                    sock.sendall(ws_frame(OP_PONG, payload))
                    continue
                if opcode == OP_PONG:
                    continue
                if opcode == OP_CLOSE:
                    sock.sendall(ws_frame(OP_CLOSE, payload[:2]))
                    reason = "close-frame"
                    return
                if opcode != OP_CONT:
                    message_op = opcode
                message.append(payload)
                if not fin:
                    continue
                data, message = b"".join(message), []
                if message_op == OP_TEXT and data == b"close-me":
                    sock.sendall(ws_frame(OP_CLOSE, struct.pack("!H", 1000)))
                    reason = "server-close"
                    return
                if message_op == OP_TEXT and data == b"drop-me":
                    reason = "server-drop"
                    return
                sock.sendall(ws_frame(message_op, data))
        except (EOFError, OSError, ValueError):
            pass
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            self._end(reason)


# -- memory ------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from ``/proc/<pid>/task/*/children``."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue
    return found


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    return sum(rss_bytes(p) for p in process_tree(pid))


class TreeRSS:
    """Samples the summed VmRSS of ``pid`` and its descendants every ``interval_s`` while
    in a ``with`` block; ``growth`` is the peak minus the sample taken on entry."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeRSS:
        self.baseline = self.peak = tree_rss(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(JOIN_TIMEOUT_S)
        self.peak = max(self.peak, tree_rss(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline
