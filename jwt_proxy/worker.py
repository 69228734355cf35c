"""The gunicorn worker: gthread, with request heads gathered off the pool, a deadline on
them, a drain that answers what is on the wire, and request-free error logs; and the
logger, without gunicorn's access records.

gunicorn's gthread worker hands a connection to a pool thread as soon as it has a byte to
read, and the thread then reads the rest of the head with blocking reads. A client that
sends its head one byte a second holds that thread for the whole drip, and ``--threads``
such clients stop the worker for everyone. :class:`ProxyWorker` gathers a plain-HTTP
head in the worker's main loop instead (non-blocking reads into a buffer of the
connection, woken by the same selector that accepts) and hands the connection to a pool
thread only once the head is complete (an empty line seen) or :data:`HEAD_GATHER_LIMIT`
bytes long, so that the parser can refuse it. A head not complete within
:data:`REQUEST_HEAD_TIMEOUT_S` is cut off, in the main loop or, for a TLS head (read by
the pool thread, which owns the handshake) or one beyond the gather limit, by shutting
down the socket the pool thread reads.

Two more changes to how connections move between the main loop and the pool threads: a
pool thread that has answered on a kept-alive connection serves the client's next request
itself if its head comes within :data:`KEEPALIVE_LINGER_MS` (see there; a head begun but
not finished by then goes back to the main loop), and a connection that ends is
half-closed by its pool thread and closed by the main loop once the client has closed
too, without holding a thread or blocking the loop (see :data:`CLOSE_LINGER_S`).

When the worker stops (SIGTERM, or the old generation after a SIGHUP) it first accepts
the connections already queued on its listening socket, then closes the socket, then
serves what it holds: every request already sent is answered, with ``Connection: close``.

It also keeps request bytes out of the log. gunicorn describes a malformed request with
the bytes it choked on (``Invalid HTTP request line: 'GET /?secret=...'``, a partial
head with its ``Authorization`` line at debug level when a client leaves early); here the
record and the ``400`` body name the kind of error and, at most, a header name.
"""

from __future__ import annotations

import copy
import errno
import functools
import logging
import math
import re
import select
import selectors
import socket
import threading
import time
import typing as t

from gunicorn.glogging import Logger
from gunicorn.http import errors
from gunicorn.workers.gthread import TConn
from gunicorn.workers.gthread import ThreadWorker

#: The longest a request head (request line and header lines, TLS handshake included)
#: may take: from the accept for a new connection, from its first byte for the next
#: request on a kept-alive one. Clients of a sidecar send their head in one write; ten
#: seconds leave room for a loaded host and none for a client that drips it. The check
#: runs once a second, so a connection is closed 10 to 11 s after its head began.
REQUEST_HEAD_TIMEOUT_S = 10.0
#: How many head bytes the main loop gathers before a pool thread takes over: the
#: parser then reads the rest, and refuses a line or a header block beyond its limits,
#: within the same head deadline. Far above any head a client of this proxy sends;
#: small enough that thousands of gathering connections cost little memory.
HEAD_GATHER_LIMIT = 64 * 1024
#: How long a pool thread given a new TLS connection polls for its first bytes itself (a
#: client sends its handshake right after connecting) before leaving the wait to gunicorn.
FIRST_BYTES_POLL_MS = 50
#: How often the worker tells the master it is alive (the heartbeat file's mtime).
HEARTBEAT_INTERVAL_S = 1.0
#: After answering on a kept-alive connection, the pool thread waits this long for the
#: client's next request before handing the connection back to gunicorn's main loop. A
#: busy client (a connection pool, a load generator) sends it within a fraction of a
#: millisecond, and serving it at once saves the hand-off (two thread wake-ups, a pipe
#: write and read, two epoll changes), a large share of a small request's CPU, and some
#: latency. Idle clients cost a thread 2 ms.
KEEPALIVE_LINGER_MS = 2
#: At most this many queued connections are taken from the listening socket when the
#: worker stops (then it is closed): a bound, should connections keep arriving meanwhile.
STOP_ACCEPT_MAX = 4096
#: How long a connection that the proxy ends waits, half-closed, for the client's FIN
#: before it is closed (RFC 9112 9.6: unread request bytes at close() would make the
#: kernel reset the connection, and the client could lose the response). gunicorn waits
#: with a blocking read, in the pool thread or in the main loop; here the main loop's
#: selector waits, so a client that keeps its side open holds neither a thread (during
#: a drain, every thread is needed for requests still on the wire) nor the other
#: connections; and it reads at most :data:`CLOSE_DRAIN_MAX` bytes meanwhile.
CLOSE_LINGER_S = 2.0
CLOSE_DRAIN_MAX = 64 * 1024
#: What a pool thread returns for a connection it has half-closed: the main loop waits
#: for the client's side to close.
_HALF_CLOSED = object()
#: What a pool thread returns for a connection whose next head has begun but is not
#: complete: the main loop gathers the rest.
_GATHER = object()
# What the next request on a kept-alive connection looks like after the linger.
_READY, _IDLE, _PARTIAL, _CLOSED = "ready", "idle", "partial", "closed"

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
    """gunicorn's ``gthread`` worker with heads gathered in the main loop,
    :data:`REQUEST_HEAD_TIMEOUT_S`, kept-alive requests served in the pool thread, a
    drain that takes the queued connections, closes off the main loop and redacted parse
    errors (see the module docstring)."""

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        # Connection -> monotonic deadline of the head being read on it by a pool thread.
        self._head_deadlines: dict[t.Any, float] = {}
        self._head_lock = threading.Lock()
        self._waiting = 0  # connections handed to the pool, not yet taken by a thread; under _head_lock
        self._next_heartbeat = 0.0
        # Connection -> deadline of the head the main loop gathers on it. Insertion order
        # is deadline order: every entry gets the same timeout from the moment it is added.
        self._gathering: dict[t.Any, float] = {}
        # Half-closed connection -> [deadline for the client's FIN, bytes drained]; same order.
        self._closing: dict[t.Any, list[float]] = {}

    def init_process(self) -> None:
        self.log.error_log.addFilter(EXCEPTION_ARGS_FILTER)
        super().init_process()  # runs the worker until it exits

    # -- the main loop: accept, gather heads, hand complete ones to the pool ----------

    def accept(self, listener: t.Any) -> bool:
        """Accept one connection and start gathering its head; whether there was one."""
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return False
            raise
        self.nr_conns += 1
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())  # non-blocking
        if self.cfg.is_ssl:
            self.enqueue_req(conn)  # the pool thread does the handshake (and reads the head)
        else:
            self._gather(conn, time.monotonic() + REQUEST_HEAD_TIMEOUT_S)
        return True

    def on_client_socket_readable(self, conn: t.Any, client: t.Any) -> None:
        """A kept-alive connection's next request has begun: gather its head."""
        if self.cfg.is_ssl:
            super().on_client_socket_readable(conn, client)
            return
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._gather(conn, time.monotonic() + REQUEST_HEAD_TIMEOUT_S)

    def _gather(self, conn: t.Any, deadline: float) -> None:
        """Read what the client has sent; hand the connection to the pool if the head is
        complete, else wait in the selector for more (main loop only)."""
        state = _read_head(conn)
        if state is True:
            self.enqueue_req(conn)
        elif state is None:
            self._drop(conn)
        else:
            self._gathering[conn] = deadline
            self.poller.register(conn.sock, selectors.EVENT_READ, functools.partial(self._on_head_bytes, conn))

    def _on_head_bytes(self, conn: t.Any, client: t.Any) -> None:
        state = _read_head(conn)
        if state is False:
            return
        self.poller.unregister(client)
        del self._gathering[conn]
        if state is True:
            self.enqueue_req(conn)
        else:
            self._drop(conn)

    def _drop(self, conn: t.Any) -> None:
        """Close a connection that the main loop holds (client gone, or too slow)."""
        self.nr_conns -= 1
        conn.close()

    def close_overdue(self) -> None:
        """Close every connection whose head the main loop has gathered for too long, and
        every half-closed one whose client has not closed its side in time."""
        for conn in _take_overdue(self._gathering):
            self._unregister(conn)
            self._drop(conn)
            self._log_slow_head(conn)
        for conn in _take_overdue(self._closing):
            self._unregister(conn)
            self._drop(conn)

    def _unregister(self, conn: t.Any) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _on_close_readable(self, conn: t.Any, client: t.Any) -> None:
        """Drain what a half-closed connection's client still sends; close at its FIN."""
        entry = self._closing[conn]
        while True:
            try:
                data = socket.socket.recv(conn.sock, 65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            entry[1] += len(data)
            if not data or entry[1] >= CLOSE_DRAIN_MAX:
                break
        del self._closing[conn]
        self.poller.unregister(client)
        self._drop(conn)

    def finish_request(self, conn: t.Any, fs: t.Any) -> None:
        result = None if fs.cancelled() or fs.exception() is not None else fs.result()
        if result is _GATHER:
            conn.sock.setblocking(False)
            self._gather(conn, time.monotonic() + REQUEST_HEAD_TIMEOUT_S)
        elif result is _HALF_CLOSED:
            self._closing[conn] = [time.monotonic() + CLOSE_LINGER_S, 0]
            self.poller.register(conn.sock, selectors.EVENT_READ, functools.partial(self._on_close_readable, conn))
        else:
            super().finish_request(conn, fs)

    def set_accept_enabled(self, enabled: bool) -> None:
        """When the worker stops: take the connections already queued on the listening
        socket, then close it, so that none of them is reset with it and later ones are
        refused (or, after a SIGHUP, queue for the new workers, which share the socket).
        Before a stop the master has made the sockets drop new SYNs (see
        ``jwt_proxy.server``), so that no connection can arrive between the last
        accept and the close, which would reset it.
        """
        super().set_accept_enabled(enabled)
        if enabled or self.alive:
            return
        for listener in self.sockets:
            if listener.sock is None:
                continue  # already closed
            for _ in range(STOP_ACCEPT_MAX):
                if not self.accept(listener):
                    break
            listener.close()

    # -- the pool threads ---------------------------------------------------------------

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
            if result is not True:
                break
            after_linger = self._next_request_within_linger(conn)
            if after_linger != _READY:
                break
        if result is True and after_linger == _PARTIAL:
            return _GATHER
        if result is True and after_linger == _CLOSED:
            result = False
        if result is False:
            return _half_close(conn)
        return result

    def _handle_one(self, conn: t.Any) -> t.Any:
        with self._head_lock:
            self._head_deadlines[conn] = time.monotonic() + REQUEST_HEAD_TIMEOUT_S
        gathered = getattr(conn, "head", None)
        if gathered:
            # The head the main loop (or the linger) gathered goes to the parser first.
            conn.data_ready = True
            conn.sock.setblocking(True)
            conn.init()  # the HTTP/1 parser: http2_cleartext is off, so init() reads nothing
            conn.parser.unreader.unread(bytes(gathered))
            conn.head = bytearray()
        elif not conn.initialized and not conn.data_ready and _readable(conn.sock, FIRST_BYTES_POLL_MS):
            # A new TLS connection whose client has sent: gunicorn's own wait for the
            # first bytes (a selector made and closed per connection) is skipped.
            conn.data_ready = True
        try:
            return super().handle(conn)
        finally:
            self._head_received(conn)

    def _next_request_within_linger(self, conn: t.Any) -> str:
        """Whether the client's next head is there (:data:`_READY`), arrives within the
        linger, has begun but is incomplete or is left to the main loop
        (:data:`_PARTIAL`), has not begun (:data:`_IDLE`), or the client has closed
        (:data:`_CLOSED`).

        Only while the worker runs and no other connection waits for a thread: checked
        after every request, so a connection waits at most one request and one linger
        for a thread that its client's next request would otherwise keep.
        """
        if self.cfg.is_ssl:  # TLS records cannot be read a head at a time; as gunicorn does
            if not self.alive or self._waiting > 0:
                return _IDLE
            if conn.parser.unreader.buf.getvalue() or conn.sock.pending():
                return _READY
            return _READY if _readable(conn.sock, KEEPALIVE_LINGER_MS) else _IDLE
        if conn.parser.unreader.buf.getvalue():  # read ahead with the previous request
            conn.head = bytearray(conn.parser.unreader.take_buffered())
        if not self.alive or self._waiting > 0:
            return _PARTIAL if conn.head else _IDLE  # the main loop serves a read-ahead head
        if _head_complete(conn.head):
            return _READY
        deadline = time.monotonic() + KEEPALIVE_LINGER_MS / 1000
        while True:
            remaining_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not _readable(conn.sock, remaining_ms):
                return _PARTIAL if conn.head else _IDLE
            state = _read_head(conn)
            if state is True:
                return _READY
            if state is None:
                return _CLOSED

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
        self.close_overdue()
        self.close_slow_heads()

    def close_slow_heads(self) -> None:
        """Shut down every connection whose head a pool thread reads and is overdue (main
        loop, once a second).

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
                self._log_slow_head(conn)

    def _log_slow_head(self, conn: t.Any) -> None:
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


def _read_head(conn: t.Any) -> bool | None:
    """Read, without waiting, what the client has sent into ``conn.head``: True once the
    head is complete (or :data:`HEAD_GATHER_LIMIT` long, or the client has finished
    sending after part of a head: the parser then answers or drops it as gunicorn
    would), False while it is not, None when the client has closed before sending
    anything or the socket failed.

    A head ends at the first empty line; a bare-LF one counts too, so that the parser
    can refuse it at once instead of the deadline closing it silently.
    """
    head = getattr(conn, "head", None)
    if head is None:
        head = conn.head = bytearray()
    if _head_complete(head):  # read ahead with the previous request
        return True
    while True:
        try:
            data = conn.sock.recv(HEAD_GATHER_LIMIT, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return None
        if not data:
            return True if head else None
        start = max(0, len(head) - 3)
        head += data
        if _head_complete(head, start):
            return True
        if len(data) < HEAD_GATHER_LIMIT:
            return False  # all there was


def _head_complete(head: bytearray, start: int = 0) -> bool:
    """Whether ``head`` holds an empty line at or after ``start``, or is as long as the
    main loop gathers."""
    return head.find(b"\r\n\r\n", start) >= 0 or head.find(b"\n\n", start) >= 0 or len(head) >= HEAD_GATHER_LIMIT


def _readable(sock: t.Any, timeout_ms: int) -> bool:
    """Whether ``sock`` has bytes (or EOF) to read within ``timeout_ms``; ``poll``, not
    ``select``, so that descriptors above 1024 work."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout_ms))


def _half_close(conn: t.Any) -> t.Any:
    """End a finished connection in its pool thread: send the FIN at once (the client
    sees the end of the response), and leave the wait for the client's own FIN to the
    main loop (:data:`CLOSE_LINGER_S`). A socket that is already gone is just closed."""
    try:
        # socket.socket's own method: on a TLS socket, SSLSocket.shutdown would also drop
        # the TLS state, which is no longer needed, but that is not what is meant here.
        socket.socket.shutdown(conn.sock, socket.SHUT_WR)
    except OSError:
        conn.close()
        conn.close = _already_closed  # gunicorn's finish_request calls it again
        return False
    conn.sock.setblocking(False)
    return _HALF_CLOSED


def _already_closed(graceful: bool = False) -> None:
    return None


def _take_overdue(deadlines: dict[t.Any, t.Any]) -> list[t.Any]:
    """Remove and return the connections of ``deadlines`` (in deadline order; the value
    is the deadline, or a list starting with it) whose deadline has passed."""
    now = time.monotonic()
    overdue = []
    for conn, value in deadlines.items():
        deadline = value[0] if isinstance(value, list) else value
        if deadline > now:
            break
        overdue.append(conn)
    for conn in overdue:
        del deadlines[conn]
    return overdue


class ServerLogger(Logger):
    """gunicorn's logger without gunicorn's access records.

    The proxy writes its own access record (``jwt_proxy.access``: method, path without
    the query, upstream, status, duration). gunicorn's would repeat it with the query
    string, so ``gunicorn.access`` is silenced; but with ``logconfig_dict`` set, gunicorn
    still builds every request's access-log atoms (a dict of some 30 entries and a date)
    before the record is dropped, for every request.
    """

    def access(self, resp: t.Any, req: t.Any, environ: t.Any, request_time: t.Any) -> None:
        return None

    def info(self, msg: str, *args: t.Any, **kwargs: t.Any) -> None:
        # The master holds a socket per worker on one address: gunicorn would name it
        # once per worker. Name it once, and say how it is shared.
        if msg == _LISTENING_AT and args:
            args = (f"{','.join(self.cfg.bind)} (a socket per worker, SO_REUSEPORT)", *args[1:])
        super().info(msg, *args, **kwargs)


# gunicorn's arbiter's start-up line (gunicorn.arbiter.Arbiter.start).
_LISTENING_AT = "Listening at: %s (%s)"
