"""A loopback upstream that records exactly what arrived on the wire.

Built on raw sockets, not ``http.server``, so that nothing is normalised before it is
recorded: the request line's target, header case, order and duplicates, and whether the
body came chunked are all kept as sent. Every test of the proxy's upstream side (unit and
integration) can use it::

    with RecordingUpstream() as upstream:
        ...  # send something to upstream.url
        [seen] = upstream.wait_for_requests(1)
        assert seen.target == "/a%2Fb"

Built-in behaviours by path prefix (HTTP/1.1, keep-alive unless the client or the
behaviour closes; a HEAD gets the GET headers and no body):

- ``/echo`` and any unknown path: 200 JSON ``{"method", "target", "headers", "body_len"}``;
- ``/gzip``: :data:`GZIP_BODY` with ``Content-Encoding: gzip`` and its exact length;
- ``/set-cookies``: two ``Set-Cookie`` lines, one with an ``Expires`` date (a comma);
- ``/redirect``: 302 to ``/elsewhere`` with a short body;
- ``/drip?n=3&delay=0.5``: chunked, ``n`` chunks ``chunk-<i>\\n`` ``delay`` seconds apart;
- ``/slow-headers?delay=2``: waits ``delay`` seconds before the status line;
- ``/status/<code>``: that status, empty body, framing right for 1xx/204/304;
- ``/bytes/<n>``: :func:`pattern_bytes` ``(n)`` with ``Content-Length``;
- ``/hop``: hop-by-hop lines (``Connection: close, X-Secret-Hop`` and friends) plus
  ``X-Kept: yes``; the connection is closed after it, as announced.

``handler=`` replaces the built-ins: it is called as ``handler(request, sock)`` for every
request, must write a complete response on ``sock`` (see :func:`send_response`), and the
connection is closed afterwards unless it returns ``True``.
"""

from __future__ import annotations

import gzip
import json
import selectors
import socket
import ssl
import threading
import time
import typing as t
from dataclasses import dataclass
from dataclasses import field
from urllib.parse import parse_qs

#: Per-socket timeout in the server's threads: bounds every read and write so that a test
#: that forgets to finish a request cannot hang a thread (stop() also unblocks them).
IO_TIMEOUT_S = 10.0
#: How long stop() waits for each thread.
JOIN_TIMEOUT_S = 5.0
#: Request heads larger than this are refused (a test bug, not a use case).
MAX_HEAD_BYTES = 64 * 1024

GZIP_PLAIN = b'{"compressed": true, "text": "' + b"jwt-proxy " * 20 + b'"}\n'
GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)
SET_COOKIES = (
    "session=alice-secret; Path=/",
    "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/",
)

Handler = t.Callable[["RecordedRequest", socket.socket], t.Any]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a throwaway CA and a server certificate it signed."""

    ca_file: str
    cert_file: str
    key_file: str

    def server_context(self) -> ssl.SSLContext:
        """A server-side context presenting the certificate (for ``ssl_context=``)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_tls_files(directory: str, names: t.Sequence[str] = ("127.0.0.1", "localhost")) -> TLSFiles:
    """A private CA and a server certificate for ``names`` (IPs or DNS names) in ``directory``.

    The extensions satisfy OpenSSL's strict X.509 checks (Python 3.13+ enables them).
    """
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwt-proxy test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = TLSFiles(
        ca_file=os.path.join(directory, "ca.pem"),
        cert_file=os.path.join(directory, "server.pem"),
        key_file=os.path.join(directory, "server-key.pem"),
    )
    with open(files.ca_file, "wb") as out:
        out.write(ca_cert.public_bytes(pem))
    with open(files.cert_file, "wb") as out:
        out.write(cert.public_bytes(pem))
    with open(files.key_file, "wb") as out:
        out.write(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return files


def pattern_bytes(n: int) -> bytes:
    """``n`` bytes of the deterministic pattern served by ``/bytes/<n>``."""
    return bytes(i % 251 for i in range(n))


@dataclass
class RecordedRequest:
    """One request as it arrived: nothing here is normalised."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool
    raw_head: bytes
    #: time.monotonic() when the head was complete, and when the body was.
    head_at: float = 0.0
    body_at: float = 0.0
    #: The sequence number of the TCP connection it came on (1 = first accepted).
    connection: int = 0
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The first value of ``name`` (any case), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        """Every value of ``name`` (any case), in wire order."""
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(self.target.split("?", 1)[1]) if "?" in self.target else {}


class _Closed(Exception):
    """The peer went away before a complete request."""


class _Reader:
    """Buffered reads on a socket that also keep the raw bytes of the head."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise _Closed()
        self.buffer += data

    def line(self, limit: int = MAX_HEAD_BYTES) -> bytes:
        while b"\n" not in self.buffer:
            if len(self.buffer) > limit:
                raise ValueError("line too long")
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data


def send_response(
    sock: socket.socket,
    status: int,
    headers: t.Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    reason: str = "",
    content_length: bool = True,
) -> None:
    """Write one complete response; adds ``Content-Length`` unless told not to."""
    head = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Status')}"]
    head += [f"{name}: {value}" for name, value in headers]
    if content_length:
        head.append(f"Content-Length: {len(body)}")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


def send_chunk(sock: socket.socket, data: bytes) -> None:
    """Write one chunk of a chunked body (an empty ``data`` ends the body)."""
    sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n")


def connect_tunnel(request: RecordedRequest, sock: socket.socket) -> bool:
    """A ``handler=`` that makes the upstream a CONNECT proxy (loopback targets only).

    Answers ``200`` to ``CONNECT 127.0.0.1:<port>`` and relays bytes both ways until
    either side closes (or nothing moves for ``IO_TIMEOUT_S``); other methods get 405.
    """
    host, _, port = request.target.rpartition(":")
    if request.method != "CONNECT" or host not in ("127.0.0.1", "localhost"):
        send_response(sock, 405, [], b"CONNECT to loopback only\n")
        return False
    with socket.create_connection((host, int(port)), timeout=IO_TIMEOUT_S) as far:
        sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ, far)
            selector.register(far, selectors.EVENT_READ, sock)
            while True:
                events = selector.select(IO_TIMEOUT_S)
                if not events:
                    return False
                for key, _ in events:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return False
                    key.data.sendall(data)


_REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    103: "Early Hints",
    200: "OK",
    201: "Created",
    204: "No Content",
    302: "Found",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class LoopbackServer:
    """A threaded server on ``127.0.0.1:0``: accept loop, one thread per connection,
    optional TLS; every thread and socket is joined or closed by :meth:`stop`.

    Subclasses implement :meth:`_serve` for one accepted (and, with ``ssl_context``,
    wrapped) connection, or :meth:`_serve_connection` to know its number too. ``_lock``
    is a condition, for subclasses that wait on state.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.host = "127.0.0.1"
        self.port = 0
        self.url = ""
        self.connections_opened = 0
        #: The client address of every accepted connection, in order.
        self.peers: list[tuple[t.Any, ...]] = []
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()

    def start(self) -> t.Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        scheme = "https" if self.ssl_context else "http"
        self.url = f"{scheme}://{self.host}:{self.port}"
        self._spawn(self._accept_loop, "upstream-accept")
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in list(self._threads):
            thread.join(JOIN_TIMEOUT_S)
        for sock in sockets:
            sock.close()

    def __enter__(self) -> t.Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def settle(self, timeout_s: float = 10.0) -> int:
        """The number of connections accepted so far, counted once every connection made
        before this call has been accepted: a marker connection of our own is made and
        waited for (the listen queue is first in, first out), so a connection that a
        proxy opened a moment ago is never counted late. The marker counts as one."""
        with socket.create_connection((self.host, self.port), timeout=timeout_s) as marker:
            local = marker.getsockname()
            deadline = time.monotonic() + timeout_s
            with self._lock:
                while local not in self.peers:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"the marker connection was not accepted within {timeout_s}s")
                    self._lock.wait(remaining)
                return self.connections_opened

    def sleep(self, seconds: float) -> bool:
        """Sleep in a handler; returns False (stop sleeping) as soon as stop() is called."""
        return not self._stopping.wait(seconds)

    def _spawn(self, target: t.Callable[..., None], name: str, *args: t.Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.peers.append(peer)
                self._lock.notify_all()
                self.connections_opened += 1
                number = self.connections_opened
                self._sockets.add(sock)
            self._spawn(self._serve_wrapped, f"upstream-conn-{number}", sock, number)

    def _serve_wrapped(self, sock: socket.socket, number: int) -> None:
        try:
            sock.settimeout(IO_TIMEOUT_S)
            if self.ssl_context is not None:
                tls = self.ssl_context.wrap_socket(sock, server_side=True)
                with self._lock:
                    self._sockets.add(tls)
                sock = tls
        except OSError:
            sock.close()
            return
        try:
            self._serve_connection(sock, number)
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _serve_connection(self, sock: socket.socket, number: int) -> None:
        self._serve(sock)

    def _serve(self, sock: socket.socket) -> None:
        raise NotImplementedError


class RecordingUpstream(LoopbackServer):
    """An HTTP/1.1 server on ``127.0.0.1:0`` that records every request.

    ``ssl_context`` (a server-side context) makes it speak HTTPS; ``url`` then starts with
    ``https://``.
    """

    def __init__(self, handler: Handler | None = None, *, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(ssl_context=ssl_context)
        self.handler = handler
        self.requests: list[RecordedRequest] = []

    def wait_for_requests(self, n: int, timeout_s: float = 5.0) -> list[RecordedRequest]:
        """The first ``n`` requests, waiting up to ``timeout_s`` for them to arrive."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while len(self.requests) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self.requests)} of {n} requests after {timeout_s}s")
                self._lock.wait(remaining)
            return list(self.requests[:n])

    def _serve_connection(self, sock: socket.socket, number: int) -> None:
        try:
            reader = _Reader(sock)
            while not self._stopping.is_set():
                request = self._read_request(reader, number)
                with self._lock:
                    self.requests.append(request)
                    self._lock.notify_all()
                if self.handler is not None:
                    keep_alive = self.handler(request, sock) is True
                else:
                    keep_alive = self._builtin(request, sock)
                if not keep_alive or (request.header("connection") or "").lower() == "close":
                    break
        except (_Closed, OSError, ValueError):
            pass

    def _read_request(self, reader: _Reader, number: int) -> RecordedRequest:
        head = reader.line()
        while head in (b"\r\n", b"\n"):  # tolerate stray CRLF between requests
            head = reader.line()
        raw = head
        headers: list[tuple[str, str]] = []
        while True:
            line = reader.line()
            raw += line
            if len(raw) > MAX_HEAD_BYTES:
                raise ValueError("head too large")
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("latin-1").rstrip("\r\n").partition(":")
            headers.append((name, value.strip(" \t")))
        method, target, version = head.decode("latin-1").rstrip("\r\n").split(" ", 2)
        request = RecordedRequest(
            method=method, target=target, version=version, headers=headers, body=b"",
            chunked=False, raw_head=raw, head_at=time.monotonic(), connection=number,
        )
        encoding = (request.header("transfer-encoding") or "").lower()
        if "chunked" in encoding:
            request.chunked = True
            body = b""
            while True:
                size_line = reader.line().split(b";", 1)[0].strip()
                size = int(size_line, 16)
                if size == 0:
                    break
                body += reader.exactly(size)
                reader.exactly(2)
            while True:
                line = reader.line()
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode("latin-1").rstrip("\r\n").partition(":")
                request.trailers.append((name, value.strip()))
            request.body = body
        elif request.header("content-length") is not None:
            request.body = reader.exactly(int(request.header("content-length") or "0"))
        request.body_at = time.monotonic()
        return request

    # -- built-in behaviours ----------------------------------------------------------

    def _builtin(self, request: RecordedRequest, sock: socket.socket) -> bool:
        """Answer ``request``; returns whether the connection may serve another one."""
        path = request.path
        head_only = request.method == "HEAD"

        def reply(status: int, headers: list[tuple[str, str]], body: bytes = b"") -> bool:
            if head_only:
                headers = [*headers, ("Content-Length", str(len(body)))]
                send_response(sock, status, headers, content_length=False)
            else:
                send_response(sock, status, headers, body)
            return True

        if path.startswith("/gzip"):
            return reply(200, [("Content-Type", "application/json"), ("Content-Encoding", "gzip")], GZIP_BODY)
        if path.startswith("/set-cookies"):
            return reply(200, [("Set-Cookie", cookie) for cookie in SET_COOKIES], b"ok\n")
        if path.startswith("/redirect"):
            return reply(302, [("Location", "/elsewhere")], b"redirecting\n")
        if path.startswith("/drip"):
            count = int(request.query.get("n", ["3"])[0])
            delay_s = float(request.query.get("delay", ["0.5"])[0])
            send_response(sock, 200, [("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked")],
                          content_length=False)
            if head_only:
                return True
            for i in range(count):
                if i and not self.sleep(delay_s):
                    return False
                send_chunk(sock, f"chunk-{i}\n".encode())
            send_chunk(sock, b"")
            return True
        if path.startswith("/slow-headers"):
            if not self.sleep(float(request.query.get("delay", ["2"])[0])):
                return False
            return reply(200, [("Content-Type", "text/plain")], b"slow\n")
        if path.startswith("/status/"):
            status = int(path[len("/status/"):].strip("/") or "200")
            if 100 <= status < 200 or status in (204, 304):
                send_response(sock, status, content_length=False)
                return status != 101
            return reply(status, [])
        if path.startswith("/bytes/"):
            size = int(path[len("/bytes/"):].strip("/") or "0")
            return reply(200, [("Content-Type", "application/octet-stream")], pattern_bytes(size))
        if path.startswith("/hop"):
            reply(
                200,
                [
                    ("Connection", "close, X-Secret-Hop"),
                    ("X-Secret-Hop", "1"),
                    ("Keep-Alive", "timeout=5"),
                    ("Proxy-Authenticate", "Basic"),
                    ("X-Kept", "yes"),
                ],
                b"hop\n",
            )
            return False
        echo = {
            "method": request.method,
            "target": request.target,
            "headers": [[name, value] for name, value in request.headers],
            "body_len": len(request.body),
        }
        return reply(200, [("Content-Type", "application/json")], json.dumps(echo).encode())
