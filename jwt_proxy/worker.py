"""The gunicorn worker: gthread, with a deadline on request heads and request-free error logs;
and the logger, without gunicorn's access records.

gunicorn's gthread worker waits for a new connection's first byte without holding a
thread (``DEFAULT_WORKER_DATA_TIMEOUT``, 5 s, then the keep-alive poller), but once a
byte has arrived a pool thread reads the rest of the head with blocking reads that have
no timeout, and its ``timeout`` setting is only a liveness check of the worker process.
A client that sends its head one byte a second would hold that thread for as long as it
likes, and ``--threads`` such clients would stop the worker. :class:`ProxyWorker` gives
every head :data:`REQUEST_HEAD_TIMEOUT_S` from the moment a thread takes the connection
(a new one, or a kept-alive one whose next request has begun): the worker's main loop,
which wakes at least once a second, shuts down the socket of any connection still
without a complete head after that, so the blocked read ends and the thread is freed.

Two changes to how connections move between the main loop and the pool threads: a pool
thread that has answered on a kept-alive connection serves the client's next request
itself if it comes within :data:`KEEPALIVE_LINGER_MS` (see there), and a connection
that ends is closed by its pool thread, not in the main loop (:func:`_close_here`).

It also keeps request bytes out of the log. gunicorn describes a malformed request with
the bytes it choked on (``Invalid HTTP request line: 'GET /?secret=...'``, a partial
head with its ``Authorization`` line at debug level when a client leaves early); here the
record and the ``400`` body name the kind of error and, at most, a header name.
"""

from __future__ import annotations

import copy
import logging
import re
import select
import socket
import threading
import time
import typing as t

from gunicorn.glogging import Logger
from gunicorn.http import errors
from gunicorn.workers.gthread import ThreadWorker

#: The longest a pool thread waits for a complete request head (request line and header
#: lines), TLS handshake included. Clients of a sidecar send their head in one write; ten
#: seconds leave room for a loaded host and none for a client that drips it. The check
#: runs once a second, so a connection is closed 10 to 11 s after a thread took it.
REQUEST_HEAD_TIMEOUT_S = 10.0
#: How long a pool thread given a new connection polls for its first bytes itself (a
#: client sends its request right after connecting) before leaving the wait to gunicorn.
FIRST_BYTES_POLL_MS = 50
#: How often the worker tells the master it is alive (the heartbeat file's mtime).
HEARTBEAT_INTERVAL_S = 1.0
#: After answering on a kept-alive connection, the pool thread waits this long for the
#: client's next request before handing the connection back to gunicorn's main loop. A
#: busy client (a connection pool, a load generator) sends it within a fraction of a
#: millisecond, and serving it at once saves the hand-off (two thread wake-ups, a pipe
#: write and read, two epoll changes): about a quarter of the CPU of a small request
#: (bench/), and some latency. Idle clients cost a thread 2 ms.
KEEPALIVE_LINGER_MS = 2

# What a malformed request is called in the log and in the 400 body, instead of its bytes.
_DESCRIPTIONS: dict[type[BaseException], str] = {
    errors.InvalidRequestLine: "invalid request line",
    errors.InvalidRequestMethod: "invalid request method",
    errors.InvalidHTTPVersion: "invalid HTTP version",
    errors.InvalidHeaderName: "invalid header name",
    errors.InvalidHeader: "invalid header",
    errors.ObsoleteFolding: "obsolete line folding",
    errors.LimitRequestLine: "request line too long",
    errors.LimitRequestHeaders: "too many or too large header fields",
    errors.ExpectationFailed: "unsupported expectation",
    errors.InvalidChunkSize: "invalid chunked body",
    errors.ChunkMissingTerminator: "invalid chunked body",
    errors.InvalidChunkExtension: "invalid chunked body",
    errors.InvalidSchemeHeaders: "contradictory scheme headers",
    errors.InvalidProxyLine: "invalid PROXY line",
    errors.InvalidH2CPreface: "invalid HTTP/2 preface",
    errors.NoMoreData: "client closed the connection",
}
# A header name as gunicorn reports it once parsed (upper-cased token): safe to name. A
# raw line (no colon) or an invalid name is not.
_HEADER_NAME = re.compile(r"[A-Z0-9!#$%&'*+.^_`|~-]{1,64}")
_redacted_classes: dict[type[BaseException], type[BaseException]] = {}


class _Redacted:
    """Mixed into a copy of a gunicorn parse error: same class for gunicorn's status
    mapping, a message without request bytes."""

    _jwt_proxy_text = "bad request"

    def __str__(self) -> str:
        return self._jwt_proxy_text


def redact(exc: BaseException) -> BaseException:
    """``exc`` if it carries no request bytes, else a copy of the same class whose
    ``str()`` is a fixed description (plus the header name, when it is one).

    An unknown transfer coding becomes an invalid ``TRANSFER-ENCODING`` header, so every
    framing error gets the same ``400`` (gunicorn answers it alone with ``501``).
    """
    if isinstance(exc, errors.UnsupportedTransferCoding):
        exc = errors.InvalidHeader("TRANSFER-ENCODING")
    description = next((text for cls, text in _DESCRIPTIONS.items() if isinstance(exc, cls)), None)
    if description is None:
        return exc
    name = getattr(exc, "hdr", None)
    if isinstance(exc, (errors.InvalidHeader, errors.ObsoleteFolding)) and isinstance(name, str):
        if _HEADER_NAME.fullmatch(name):
            description = f"{description}: {name}"
    cls = type(exc)
    redacted_cls = _redacted_classes.get(cls)
    if redacted_cls is None:
        redacted_cls = _redacted_classes[cls] = type(cls.__name__, (_Redacted, cls), {"__module__": cls.__module__})
    redacted = copy.copy(exc)
    redacted.__class__ = redacted_cls
    redacted._jwt_proxy_text = description  # type: ignore[attr-defined]
    return redacted


class _ExceptionArgsFilter(logging.Filter):
    """Writes exceptions passed as ``%s`` arguments to gunicorn's records as their class
    name: ``NoMoreData`` carries the partial head of a client that left."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(arg, BaseException) for arg in record.args):
            record.args = tuple(type(arg).__name__ if isinstance(arg, BaseException) else arg for arg in record.args)
        return True


EXCEPTION_ARGS_FILTER = _ExceptionArgsFilter()


class ProxyWorker(ThreadWorker):
    """gunicorn's ``gthread`` worker with :data:`REQUEST_HEAD_TIMEOUT_S`, kept-alive
    requests served in the pool thread, closes off the main loop and redacted parse
    errors (see the module docstring)."""

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        # Connection -> monotonic deadline of the head being read on it by a pool thread.
        self._head_deadlines: dict[t.Any, float] = {}
        self._head_lock = threading.Lock()
        self._waiting = 0  # connections handed to the pool, not yet taken by a thread; under _head_lock
        self._next_heartbeat = 0.0

    def init_process(self) -> None:
        self.log.error_log.addFilter(EXCEPTION_ARGS_FILTER)
        super().init_process()  # runs the worker until it exits

    def enqueue_req(self, conn: t.Any) -> None:
        with self._head_lock:
            self._waiting += 1
        super().enqueue_req(conn)

    def handle(self, conn: t.Any) -> t.Any:
        """Serve requests on ``conn`` while its client keeps sending them (see
        :data:`KEEPALIVE_LINGER_MS`); then hand it back to the main loop."""
        with self._head_lock:
            self._waiting -= 1
        while True:
            result = self._handle_one(conn)
            if result is not True or not self._next_request_within_linger(conn):
                break
        if result is False:
            _close_here(conn)
        return result

    def _handle_one(self, conn: t.Any) -> t.Any:
        with self._head_lock:
            self._head_deadlines[conn] = time.monotonic() + REQUEST_HEAD_TIMEOUT_S
        if not conn.initialized and not conn.data_ready and _readable(conn.sock, FIRST_BYTES_POLL_MS):
            # A new connection whose client has sent: gunicorn's own wait for the first
            # bytes (a selector made and closed per connection) is skipped.
            conn.data_ready = True
        try:
            return super().handle(conn)
        finally:
            self._head_received(conn)

    def _next_request_within_linger(self, conn: t.Any) -> bool:
        """Whether the client's next request is there, or arrives within the linger.

        Only while the worker runs and no other connection waits for a thread: checked
        after every request, so a connection waits at most one request and one linger
        for a thread that its client's next request would otherwise keep.
        """
        if not self.alive or self._waiting > 0:
            return False
        if conn.parser.unreader.buf.getvalue():  # read ahead with the previous request
            return True
        pending = getattr(conn.sock, "pending", None)  # TLS: decrypted, not yet read
        if pending is not None and pending():
            return True
        return _readable(conn.sock, KEEPALIVE_LINGER_MS)

    def handle_request(self, req: t.Any, conn: t.Any) -> bool:
        self._head_received(conn)  # the head is in: from here the request is the app's
        return super().handle_request(req, conn)

    def notify(self) -> None:
        # gunicorn's main loop calls this at every turn, that is for every event: a
        # utime() of the heartbeat file each time. The master only needs one per
        # WORKER_LIVENESS_TIMEOUT_S (30 s); once a second is plenty.
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_INTERVAL_S
            super().notify()

    def murder_pending(self) -> None:
        super().murder_pending()
        self.close_slow_heads()

    def close_slow_heads(self) -> None:
        """Shut down every connection whose head is overdue (main loop, once a second).

        Under the lock, so that a head completing at this moment either is still listed
        and closed, or has been taken off the list by :meth:`handle_request` first.
        """
        now = time.monotonic()
        with self._head_lock:
            for conn, deadline in list(self._head_deadlines.items()):
                if deadline > now:
                    continue
                try:
                    # socket.socket's own method: SSLSocket.shutdown would also drop the
                    # TLS state that the pool thread is using at this moment.
                    socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
                except OSError:
                    continue  # the socket is being replaced (TLS wrap) or already closed
                del self._head_deadlines[conn]
                self.log.info(
                    "Closed a connection without a complete request head after %ss (client %s)",
                    REQUEST_HEAD_TIMEOUT_S,
                    conn.client[0] if isinstance(conn.client, tuple) else conn.client,
                )

    def handle_error(self, req: t.Any, client: t.Any, addr: t.Any, exc: BaseException) -> None:
        if req is not None and isinstance(getattr(req, "uri", None), str):
            req.uri = req.uri.partition("?")[0]  # logged with 500s; a query may hold secrets
        super().handle_error(req, client, addr, redact(exc))

    def _head_received(self, conn: t.Any) -> None:
        with self._head_lock:
            self._head_deadlines.pop(conn, None)


def _readable(sock: t.Any, timeout_ms: int) -> bool:
    """Whether ``sock`` has bytes (or EOF) to read within ``timeout_ms``; ``poll``, not
    ``select``, so that descriptors above 1024 work."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout_ms))


def _close_here(conn: t.Any) -> None:
    """Close a finished connection in the pool thread, not in gunicorn's main loop.

    The close is graceful (RFC 9112 9.6): half-close, then wait up to 2 s for the
    client's FIN so that unread request bytes do not turn into a reset. In the main
    loop, as gunicorn does it, a client that keeps its side open after a
    ``Connection: close`` response stalls every connection of the worker (no accept,
    no kept-alive request) for those 2 s; here it holds this one thread.
    """
    conn.close(graceful=True)
    conn.close = _already_closed  # gunicorn's finish_request calls it again


def _already_closed(graceful: bool = False) -> None:
    return None


class ServerLogger(Logger):
    """gunicorn's logger without gunicorn's access records.

    The proxy writes its own access record (``jwt_proxy.access``: method, path without
    the query, upstream, status, duration). gunicorn's would repeat it with the query
    string, so ``gunicorn.access`` is silenced; but with ``logconfig_dict`` set, gunicorn
    still builds every request's access-log atoms (a dict of some 30 entries and a date)
    before the record is dropped: about 3 % of a proxied request's CPU (bench/).
    """

    def access(self, resp: t.Any, req: t.Any, environ: t.Any, request_time: t.Any) -> None:
        return None

    def info(self, msg: str, *args: t.Any, **kwargs: t.Any) -> None:
        # With reuse_port the master has no listener of its own: gunicorn would write
        # "Listening at:  (pid)". Name the address, and that each worker binds it.
        if msg == _LISTENING_AT and args and not args[0]:
            args = (f"{','.join(self.cfg.bind)} (a socket per worker, SO_REUSEPORT)", *args[1:])
        super().info(msg, *args, **kwargs)


# gunicorn's arbiter's start-up line (gunicorn.arbiter.Arbiter.start).
_LISTENING_AT = "Listening at: %s (%s)"
