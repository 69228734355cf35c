"""WebSocket tunnels: an ``Upgrade: websocket`` request, relayed as bytes after the ``101``.

WSGI cannot hand a connection over to another protocol, but gunicorn lets a
``101 Switching Protocols`` response with ``Connection: Upgrade`` and ``Upgrade:
websocket`` through as it is (``gunicorn/http/wsgi.py``, ``Response.process_headers``),
and ``environ["gunicorn.socket"]`` is the client's socket. So for an opening handshake
(RFC 6455 4.1: ``GET``, ``Upgrade`` naming ``websocket``, ``Connection`` naming
``upgrade``) the proxy:

1. opens the upstream connection itself, with the checks of every other upstream
   connection: the host is resolved once and every address is checked against the
   session's :class:`~jwt_proxy.upstream_connect.AddressPolicy` (no link-local or
   metadata address unless allowed) before one is dialled, and an ``https`` upstream
   gets TLS with the session's context (:func:`jwt_proxy.upstream_connect.make_ssl_context`);
2. sends the handshake: the client's headers filtered as for any request, the token,
   then ``Connection: Upgrade`` and ``Upgrade: websocket`` added back;
3. reads the response head within ``--upstream-timeout`` (one deadline for all of
   it), skipping interim responses; anything but a ``101`` to ``websocket`` is an
   ordinary response (a refusal) and goes back to the client as one;
4. after a ``101``, relays bytes both ways (:func:`relay`) on the one worker thread
   that serves the request, until either side closes or nothing moves for
   :data:`~jwt_proxy.upstream_response.BODY_IDLE_TIMEOUT_S`, then closes both.

Other upgrades (``h2c``, ``TLS/1.0``...) are not tunnelled: ``Upgrade`` is hop-by-hop
and such requests are forwarded without it.

The connect path, the head parser and the body loop are the ones forwarding uses
(:mod:`jwt_proxy.upstream_connect`, :mod:`jwt_proxy.upstream_response`); the WSGI side
(the ``101`` response object) is in :mod:`jwt_proxy.app`.
"""

from __future__ import annotations

import errno
import http.client
import logging
import selectors
import socket
import ssl
import time
import typing as t
from dataclasses import dataclass
from urllib.parse import urlsplit

from requests.utils import select_proxy

from .forward import require_origin_form
from .headers import filter_response_headers
from .upstream_connect import AddressPolicy
from .upstream_connect import environ_proxies
from .upstream_errors import UpstreamError
from .upstream_errors import describe_upstream_error
from .upstream_response import BODY_CHUNK_BYTES
from .upstream_response import BODY_IDLE_TIMEOUT_S
from .upstream_response import FinalResponse
from .upstream_response import iter_body
from .upstream_session import ProxyAdapter

if t.TYPE_CHECKING:
    import requests

log = logging.getLogger("jwt_proxy.tunnel")

#: Largest piece read from one side before it is written to the other. Each direction
#: holds at most one such piece: a side that does not read makes the proxy stop reading
#: from the other one (backpressure through the socket buffers, not memory).
RELAY_CHUNK_BYTES = 65536
#: After one side has closed its half (EOF), how long bytes may still flow the other way
#: before both are closed. WebSocket peers end with a close frame each way, then the
#: server closes TCP; this only bounds a peer that never closes its half.
CLOSE_LINGER_S = 5.0
#: The handshake's Connection and Upgrade lines, added back after hop-by-hop filtering.
UPGRADE_HEADERS: tuple[tuple[str, str], ...] = (("Connection", "Upgrade"), ("Upgrade", "websocket"))

_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _tokens(headers: t.Iterable[tuple[str, str]], name: str) -> set[str]:
    lower = name.lower()
    found: set[str] = set()
    for key, value in headers:
        if key.lower() == lower:
            found.update(token.strip(" \t").lower() for token in value.split(","))
    return found


def is_websocket_upgrade(method: str, headers: t.Iterable[tuple[str, str]]) -> bool:
    """Whether a request is a WebSocket opening handshake (RFC 6455 4.1): ``GET`` with
    ``Upgrade`` naming ``websocket`` and ``Connection`` naming ``upgrade`` (any case)."""
    if method != "GET":
        return False
    lines = list(headers)
    return "websocket" in _tokens(lines, "upgrade") and "upgrade" in _tokens(lines, "connection")


@dataclass(frozen=True)
class Transport:
    """How upstream connections are made: the TLS context and the address policy."""

    ssl_context: ssl.SSLContext
    policy: AddressPolicy


def transport_of(session: requests.Session) -> Transport:
    """The TLS context and address policy of a session from
    :func:`jwt_proxy.upstream_session.make_session`, so a tunnel connects exactly as the
    session's own connections do."""
    adapter = session.get_adapter("https://")
    if not isinstance(adapter, ProxyAdapter):
        raise TypeError("tunnels need a session from upstream_session.make_session()")
    return Transport(adapter.ssl_context, adapter.policy)


class Tunnel:
    """The upstream's answer to a handshake, on the connection this module opened.

    ``switched`` is true after a ``101`` to ``websocket``: then :meth:`relay` carries the
    connection. Otherwise ``status``/``reason``/``headers`` and :meth:`iter_body` are the
    upstream's refusal, to be passed back as an ordinary response. :meth:`close` always.
    """

    def __init__(self, sock: socket.socket, response: http.client.HTTPResponse, host: str) -> None:
        self.status: int = response.status
        self.reason: str = response.reason or ""
        lines = list(response.msg.items())
        self.headers: list[tuple[str, str]] = filter_response_headers(lines)
        self.switched = self.status == 101
        self._sock = sock
        self._response = response
        self._host = host
        self._closed = False

    def iter_body(self, chunk_size: int = BODY_CHUNK_BYTES) -> t.Iterator[bytes]:
        """A refusal's body, as it arrives; a truncated one raises like
        :meth:`jwt_proxy.forward.UpstreamResponse.iter_body` does, so the client connection is
        dropped instead of finishing a short body."""
        try:
            if self.status in (204, 304) or self.status < 200:
                return
            yield from iter_body(self._response.read, self._response, self._host, chunk_size)
        finally:
            self.close()

    def relay(
        self, client: socket.socket, *, client_bytes: t.Callable[[], bytes] | None = None, target: str = ""
    ) -> t.Iterator[bytes]:
        """The body of the ``101`` response: one empty piece, so that the server sends the
        head, then the relay between ``client`` and the upstream until it ends.

        ``client_bytes`` returns what the server already read from the client past the
        handshake (sent upstream first). Never raises: the relay's end is logged and
        both connections are closed (the client's is shut down; the server closes it).
        """
        try:
            yield b""
            started = time.monotonic()
            try:
                _set_nodelay(client)
                early = client_bytes() if client_bytes is not None else b""
                result = relay(client, self._sock, idle_timeout_s=BODY_IDLE_TIMEOUT_S, a_to_b=early)
            except Exception as exc:  # noqa: BLE001 - a relay failure must not become a second response
                log.error("websocket tunnel failed", extra={"target": target, "error": f"{type(exc).__name__}: {exc}"})
                return
            record = {
                "target": target,
                "end": result.end,
                "client_bytes": result.a_to_b,
                "upstream_bytes": result.b_to_a,
                "duration_ms": round((time.monotonic() - started) * 1000, 3),
            }
            if result.end == "idle":
                record["idle_timeout_s"] = BODY_IDLE_TIMEOUT_S
                log.warning("websocket tunnel idle; closed", extra=record)
            else:
                log.debug("websocket tunnel closed", extra=record)
        finally:
            self.close()
            _shutdown(client)

    def close(self) -> None:
        """Close the upstream connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._response.close()
        finally:
            self._sock.close()


def open_tunnel(
    transport: Transport,
    *,
    base_url: str,
    target: str,
    headers: t.Sequence[tuple[str, str]],
    timeout_s: float,
) -> Tunnel:
    """Connect to ``base_url``, send the handshake for ``target`` and read the answer's head.

    ``headers`` are the final request lines (``Host``, ``Authorization``,
    ``X-Forwarded-For`` included) minus hop-by-hop ones; :data:`UPGRADE_HEADERS` are added
    here. ``timeout_s`` bounds the connection, the TLS handshake and each read, and the
    whole response head is due ``timeout_s`` after the start. Raises
    :class:`~jwt_proxy.upstream_errors.UpstreamForbidden` before dialling a refused
    address, and ``UpstreamTimeout``/``UpstreamUnavailable`` as
    :func:`jwt_proxy.forward.send` does, also for a ``101`` to another protocol.
    """
    require_origin_form(target)
    parts = urlsplit(base_url)
    host = parts.netloc
    hostname = parts.hostname or ""
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    head = _handshake_head(target, headers)
    deadline = time.monotonic() + timeout_s
    sock: socket.socket | None = None
    error: UpstreamError | None = None
    try:
        sock = _connect(transport.policy, base_url, hostname, port, timeout_s)
        if parts.scheme == "https":
            sock = transport.ssl_context.wrap_socket(sock, server_hostname=hostname)
        sock.sendall(head)
        response = FinalResponse(_Unbuffered(sock), method="GET", deadline=deadline, upgrade_requested=True)
        response.begin()
        if response.status == 101 and "websocket" not in _tokens(response.msg.items(), "upgrade"):
            raise http.client.HTTPException("101 to a protocol other than websocket")
    except UpstreamError:
        _close(sock)
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        _close(sock)
        error = describe_upstream_error(exc, host, f"the upgrade response (timeout {timeout_s:g}s)")
    else:
        sock.settimeout(BODY_IDLE_TIMEOUT_S)
        return Tunnel(sock, response, host)
    raise error


def _handshake_head(target: str, headers: t.Sequence[tuple[str, str]]) -> bytes:
    lines = [f"GET {target} HTTP/1.1"]
    for name, value in [*headers, *UPGRADE_HEADERS]:
        if any(c in name + value for c in "\r\n\0"):
            raise ValueError("header line with a line break")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _connect(policy: AddressPolicy, base_url: str, hostname: str, port: int, timeout_s: float) -> socket.socket:
    """A TCP connection to the upstream, made as every forwarded one is
    (:meth:`AddressPolicy.dial`). Through an ``HTTP(S)_PROXY`` (an ``http://`` one): a
    ``CONNECT`` tunnel, where only an address literal can be checked, as forwarding does."""
    proxy = select_proxy(base_url, environ_proxies(base_url))
    if proxy:
        policy.check_literal(hostname)
        return _connect_via_proxy(proxy, hostname, port, timeout_s)
    return policy.dial(hostname.strip("[]"), port, timeout_s, [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])


def _connect_via_proxy(proxy: str, hostname: str, port: int, timeout_s: float) -> socket.socket:
    parts = urlsplit(proxy)
    if parts.scheme != "http" or not parts.hostname:
        raise OSError(errno.EPROTONOSUPPORT, "WebSocket through a proxy needs an http:// proxy")
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout_s)
    try:
        authority = f"[{hostname}]:{port}" if ":" in hostname else f"{hostname}:{port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if parts.username is not None:
            import base64
            from urllib.parse import unquote

            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            lines.append("Proxy-Authorization: Basic " + base64.b64encode(credentials).decode())
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        answer = http.client.HTTPResponse(_Unbuffered(sock), method="CONNECT")  # type: ignore[arg-type]
        answer.begin()
        if not 200 <= answer.status < 300:
            raise OSError(errno.ECONNREFUSED, f"proxy refused CONNECT with {answer.status}")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except BaseException:
        sock.close()
        raise


class _Unbuffered:
    """Gives ``http.client`` an unbuffered file: the head is read byte by byte, so not one
    byte past it (the start of the upgraded stream) is taken off the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def makefile(self, mode: str) -> t.Any:
        return self._sock.makefile(mode, buffering=0)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


def _set_nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _shutdown(sock: socket.socket) -> None:
    """End the client connection without closing its descriptor (the server owns it).

    ``socket.socket.shutdown`` on purpose: ``SSLSocket.shutdown`` also drops the TLS
    state the server may still touch. The server then sees EOF and closes it.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.setblocking(True)
    except OSError:
        pass


# -- the relay ------------------------------------------------------------------------------


@dataclass
class RelayResult:
    """How a relay ended (``closed``, ``idle``, ``linger``, ``reset``) and bytes moved."""

    end: str
    a_to_b: int
    b_to_a: int


class _Direction:
    __slots__ = ("src", "dst", "buffer", "eof", "shut", "moved")

    def __init__(self, src: socket.socket, dst: socket.socket, buffer: bytes) -> None:
        self.src = src
        self.dst = dst
        self.buffer = buffer
        self.eof = False
        self.shut = False
        self.moved = 0


def relay(
    a: socket.socket,
    b: socket.socket,
    *,
    idle_timeout_s: float,
    a_to_b: bytes = b"",
    linger_s: float = CLOSE_LINGER_S,
    chunk_bytes: int = RELAY_CHUNK_BYTES,
    clock: t.Callable[[], float] = time.monotonic,
) -> RelayResult:
    """Copy bytes ``a`` -> ``b`` and ``b`` -> ``a`` on this thread until both have ended.

    Each direction holds at most ``chunk_bytes`` (plus ``a_to_b``, sent first) and reads
    from its source only once that is written, so a slow reader slows the writer down
    instead of filling memory. An EOF is passed on as a half close (``SHUT_WR``); then
    the other direction gets ``linger_s`` to finish. Ends with ``idle`` when nothing has
    moved either way for ``idle_timeout_s``, ``reset`` when a socket fails. Works on
    plain and TLS sockets; leaves both non-blocking and open (the caller closes them).
    """
    directions = (_Direction(a, b, a_to_b), _Direction(b, a, b""))
    for sock in (a, b):
        sock.setblocking(False)
    selector = selectors.DefaultSelector()
    registered: dict[socket.socket, int] = {}
    last_moved = clock()
    linger_until: float | None = None
    try:
        while True:
            wants = {a: 0, b: 0}
            moved = False
            for direction in directions:
                if direction.buffer:
                    try:
                        sent = direction.dst.send(direction.buffer)
                    except ssl.SSLWantReadError:
                        wants[direction.dst] |= selectors.EVENT_READ
                        sent = 0
                    except _WOULD_BLOCK:
                        wants[direction.dst] |= selectors.EVENT_WRITE
                        sent = 0
                    except OSError:
                        return _result("reset", directions)
                    if sent:
                        direction.buffer = direction.buffer[sent:]
                        direction.moved += sent
                        moved = True
                if direction.eof and not direction.buffer and not direction.shut:
                    direction.shut = True
                    try:
                        socket.socket.shutdown(direction.dst, socket.SHUT_WR)
                    except OSError:
                        pass
                if not direction.eof and not direction.buffer:
                    try:
                        data = direction.src.recv(chunk_bytes)
                    except ssl.SSLWantWriteError:
                        wants[direction.src] |= selectors.EVENT_WRITE
                        continue
                    except _WOULD_BLOCK:
                        wants[direction.src] |= selectors.EVENT_READ
                        continue
                    except ssl.SSLZeroReturnError:
                        data = b""
                    except OSError:
                        return _result("reset", directions)
                    moved = True
                    if data:
                        direction.buffer = data
                    else:
                        direction.eof = True
            if all(direction.shut for direction in directions):
                return _result("closed", directions)
            now = clock()
            if linger_until is None and any(direction.eof for direction in directions):
                linger_until = now + linger_s
            if moved:
                last_moved = now
                continue
            deadline = last_moved + idle_timeout_s
            end = "idle"
            if linger_until is not None and linger_until < deadline:
                deadline, end = linger_until, "linger"
            if now >= deadline:
                return _result(end, directions)
            for sock, events in wants.items():
                current = registered.get(sock, 0)
                if events == current:
                    continue
                if not events:
                    selector.unregister(sock)
                elif not current:
                    selector.register(sock, events)
                else:
                    selector.modify(sock, events)
                registered[sock] = events
            selector.select(deadline - now)
    finally:
        selector.close()


def _result(end: str, directions: tuple[_Direction, _Direction]) -> RelayResult:
    return RelayResult(end, directions[0].moved, directions[1].moved)
