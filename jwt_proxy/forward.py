"""One upstream exchange, streamed both ways: the proxy's only requests/urllib3 module.

A default ``requests.Session`` is a browser-like client, and a proxy built on it would
rewrite what passes through it. This module keeps the transport (pooling, TLS, proxies,
timeouts) and switches the rest off:

- nothing is added to the request: no ``User-Agent``, ``Accept``, ``Accept-Encoding`` or
  ``Content-Type`` the client did not send; no ``.netrc`` credentials; no cookie jar
  shared between clients;
- the request target reaches the wire byte for byte (``%2F``, ``%2E%2E``, ``/./``,
  ``//``, a trailing ``?``, ``[``...): requests normalises URLs and urllib3 re-encodes
  targets (``_encode_target``: ``[`` becomes ``%5B``, a stray ``%`` turns every escape of
  that component into ``%25..``, ``#...`` is cut), so the raw target is handed to the
  connection directly, see :func:`_exchange`;
- body framing is decided here from the body actually streamed, never copied (P2);
- responses are read undecoded, one ``recv`` at a time, with the upstream's header lines
  as they came; redirects are returned, never followed;
- the response head is read by :class:`_FinalResponse` under one deadline
  (``timeout_s`` from the connect or the reuse of a pooled connection to its last
  byte), interim ``1xx`` responses skipped (``http.client`` would return a ``103`` as
  *the* response and leave the real one in the pooled socket, to be read as the answer
  to another client's request); ambiguous framing and a ``101`` nobody asked for make
  the exchange fail and the connection close (RFC 9112 6.3).

Every new connection is checked before it is made (:class:`AddressPolicy`): the host is
resolved once, every address it resolves to is checked, and only those checked
addresses are dialled, so a link-local or metadata address (169.254.169.254 in any
spelling, ``fd00:ec2::254``, a DNS name that resolves there) is refused with
:class:`UpstreamForbidden` unless ``--allowed-upstream-hosts`` names it. Through an
``HTTP(S)_PROXY`` the connection goes to the proxy, which resolves the target: there a
target written as an IP address is checked, a name is left to the proxy.

Failures before the response head is complete become :class:`UpstreamError` (mapped to
502/504 by the caller); failures while streaming the body are raised from
:meth:`UpstreamResponse.iter_body` so the server aborts the client connection instead of
finishing a truncated body.
"""

from __future__ import annotations

import contextvars
import email.parser
import errno
import functools
import http.client
import ipaddress
import os
import re
import socket
import ssl
import sys
import time
import typing as t
from dataclasses import dataclass
from dataclasses import field
from http.cookiejar import DefaultCookiePolicy

import requests
import requests.certs
from requests.adapters import HTTPAdapter
from requests.exceptions import InvalidProxyURL
from requests.utils import get_environ_proxies
from requests.utils import prepend_scheme_if_needed
from requests.utils import select_proxy
from urllib3 import HTTPHeaderDict
from urllib3.connection import HTTPConnection
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.connectionpool import HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NameResolutionError
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util import SKIP_HEADER
from urllib3.util import Url
from urllib3.util import parse_url
from urllib3.util.connection import allowed_gai_family
from urllib3.util.proxy import connection_requires_http_tunnel
from urllib3.util.ssl_ import create_urllib3_context
from urllib3.util.timeout import _DEFAULT_TIMEOUT

from .headers import filter_response_headers
from .headers import response_framing
from .routing import IPAddress
from .routing import canonical_address
from .routing import is_refused_address
from .routing import literal_address

#: Socket read timeout once the response headers are in. ``--upstream-timeout`` bounds the
#: wait for the headers; after that a body may legitimately be idle for much longer (an
#: event stream whose events are minutes apart, a slow report download). It is per read,
#: not total: a stream lives as long as bytes keep coming. Five minutes is above common
#: SSE heartbeat intervals and load-balancer idle timeouts (AWS ALB: 60 s by default),
#: and still frees the thread of a stalled upstream, and notices a client that left
#: during the silence, in bounded time.
BODY_IDLE_TIMEOUT_S = 300.0
#: How many upstream host pools one session keeps (LRU). Pinned mode uses one; header
#: mode evicts the least recently used host's idle connections past this.
MAX_UPSTREAM_POOLS = 10
#: More interim (1xx) responses than this before the final one is an upstream fault
#: (Go's net/http stops at 5 too). ``100 Continue`` is counted apart: an upstream may
#: send one now and then while it works, and the head deadline bounds them.
MAX_INTERIM_RESPONSES = 5
#: More ``100 Continue`` responses than this in one head is an upstream looping on them.
MAX_CONTINUE_RESPONSES = 1000
#: Default size of one read from the upstream body: an upper bound, read1 returns what
#: one recv gave.
BODY_CHUNK_BYTES = 65536
#: Largest read from a client body with a ``Content-Length``, and so largest send
#: upstream. gunicorn's body reader re-buffers what it has read ahead at every read, so
#: small reads are expensive: urllib3's default of 16 KiB gave about 200 MiB/s, 1 MiB
#: about 600 (bench/, 2 cores). One such block per busy thread is held at a time.
REQUEST_BLOCK_BYTES = 1024 * 1024
#: Largest read from a chunked client body. gunicorn returns a read only once it has that
#: many bytes (or the body ended), and a chunked body is often a stream whose pieces
#: should move on as they come, so its reads stay small.
STREAM_BLOCK_BYTES = BODY_CHUNK_BYTES

# A request target as gunicorn accepts it (RFC 9112 3.2: printable ASCII, origin-form).
_ORIGIN_FORM_RE = re.compile(r"/[\x21-\x7e]*\Z")



class UpstreamError(Exception):
    """The upstream exchange failed; ``status`` is what the client should get.

    ``error_type`` is the ``error_type`` metric label: ``timeout``,
    ``connection_refused`` or ``unknown``. The message names the upstream host and the
    underlying error, never a query string or a header value.
    """

    status: int = 502

    def __init__(self, message: str, *, error_type: str, closes_client: bool = False) -> None:
        super().__init__(message)
        self.error_type = error_type
        #: The client connection must close too (the upstream switched protocols).
        self.closes_client = closes_client


class UpstreamTimeout(UpstreamError):
    """No response headers (or no connection) within ``timeout_s``; or, raised from
    :meth:`UpstreamResponse.iter_body`, a body idle for :data:`BODY_IDLE_TIMEOUT_S`."""

    status = 504


class UpstreamForbidden(UpstreamError):
    """The upstream's address is link-local or a metadata address that
    ``--allowed-upstream-hosts`` does not name. Nothing was sent: the check comes before
    the connection is made."""

    status = 403

    def __init__(self, message: str, *, error_type: str = "forbidden") -> None:
        super().__init__(message, error_type=error_type)


class UpstreamUnavailable(UpstreamError):
    """Connection refused, DNS or TLS failure, or the connection broke (before the
    headers when raised by :func:`send`, mid-body when raised by ``iter_body``)."""

    status = 502


class RequestBodyError(Exception):
    """The client's request body could not be read to its end (the client left, or sent
    fewer bytes than its ``Content-Length``). Not an upstream failure: the upstream
    connection is closed, and the client is most likely gone (400 if it is not)."""


@dataclass(frozen=True)
class UpstreamRequest:
    """What to send upstream, already routed and filtered by the caller.

    ``target`` is the raw path and query (``RAW_URI``), starting with ``/``; ``headers``
    are the final lines, ``Host``/``Authorization``/``X-Forwarded-For`` included, and any
    ``Content-Length``/``Transfer-Encoding`` among them is ignored: framing follows
    ``body``/``content_length`` (a length means exactly that many bytes, ``None`` with a
    body means chunked). ``body`` is read in bounded pieces, never whole.
    """

    method: str
    base_url: str
    target: str
    headers: list[tuple[str, str]] = field(repr=False)  # they hold the token
    body: t.IO[bytes] | None = None
    content_length: int | None = None


class UpstreamResponse:
    """The upstream's status and header lines, and a generator over its body bytes.

    ``headers`` are the raw header lines minus hop-by-hop ones (order, duplicates, case
    and ``Content-Encoding``/``Content-Length`` kept). Call :meth:`close` when done: a
    body read to its end gives the connection back to the pool, anything else closes it.
    """

    def __init__(
        self, raw: _FinalResponse, *, method: str, host: str, release: t.Callable[[bool], None]
    ) -> None:
        lines = raw.header_lines
        self.status: int = raw.status
        self.reason: str = raw.reason or ""
        self.headers: list[tuple[str, str]] = filter_response_headers(lines)
        self._raw = raw
        self._host = host
        self._release = release
        status = self.status
        # RFC 9110 6.4.1: these never have a body, whatever their headers say.
        self._has_body = not (method == "HEAD" or status in (204, 304) or 100 <= status < 200)
        # Reusable without reading: nothing may follow on the socket. A 101 hands the
        # socket to another protocol; a 204/304 claiming chunked is not to be trusted.
        framed = any(name.lower() == "transfer-encoding" for name, _ in lines)
        self._complete = not self._has_body and (method == "HEAD" or (status != 101 and not framed))
        self._closed = False

    def iter_body(self, chunk_size: int = BODY_CHUNK_BYTES) -> t.Iterator[bytes]:
        """Yield the body as it arrives, undecoded (gzip stays gzip), one recv at a time.

        Nothing is read for HEAD, 1xx, 204 and 304. A broken or stalled body raises
        :class:`UpstreamUnavailable` / :class:`UpstreamTimeout` instead of ending early, so
        the server drops the client connection rather than finishing a truncated body.
        The connection is released (or closed) when the generator ends or is closed.
        """
        try:
            if not self._has_body or self._closed:
                return
            raw = self._raw
            while True:
                error = None
                try:
                    data = raw.read1(chunk_size)
                    if not data and raw.length:
                        # http.client ends a Content-Length body that stops short quietly.
                        raise http.client.IncompleteRead(b"", raw.length)
                except (Urllib3Error, OSError, http.client.HTTPException) as exc:
                    error = _upstream_error(exc, self._host, "the response body")
                if error is not None:
                    raise error
                if not data:
                    self._complete = True
                    return
                yield data
        finally:
            self.close()

    def close(self) -> None:
        """Give the connection back if the body was read to its end, else close it.

        Idempotent. An unread or partly read body stays in the socket, and the next
        request on that connection would read it as its own response, so such a
        connection is closed, never pooled.
        """
        if self._closed:
            return
        self._closed = True
        # No socket I/O: this only marks http.client's response done (the connection
        # can then send again), or drops a body nobody will read.
        self._raw.close()
        self._release(self._complete)

    def __enter__(self) -> UpstreamResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: ``getaddrinfo(host, port, family, type)``, as :func:`socket.getaddrinfo`.
Resolver = t.Callable[..., t.List[t.Tuple[t.Any, ...]]]


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a new upstream connection may be made to, and how names resolve.

    ``allowed`` are the restricted addresses (link-local, metadata) that
    ``--allowed-upstream-hosts`` names; every other restricted address is refused.
    ``resolver`` defaults to :func:`socket.getaddrinfo`, looked up at each call.
    """

    allowed: frozenset[IPAddress] = frozenset()
    resolver: Resolver | None = None

    def resolve(self, host: str, port: int) -> list[tuple[t.Any, ...]]:
        resolver = self.resolver or socket.getaddrinfo
        return list(resolver(host, port, allowed_gai_family(), socket.SOCK_STREAM))

    def refuses(self, address: IPAddress | None) -> bool:
        return is_refused_address(address, self.allowed)

    def resolve_checked(self, host: str, port: int) -> list[tuple[t.Any, ...]]:
        """``host`` resolved once, every address checked: :class:`UpstreamForbidden` if
        any is refused, else the ``getaddrinfo`` entries to dial (and only those)."""
        infos = self.resolve(host, port)
        for info in infos:
            address = _sockaddr_address(info[4])
            if self.refuses(address):
                raise UpstreamForbidden(
                    f"upstream {host}:{port}: resolves to {address or info[4]!r}, a link-local or metadata address"
                )
        return infos

    def check_literal(self, host: str) -> None:
        """Through an egress proxy, which resolves names itself: refuse ``host`` when it
        is written as a refused address (a name is left to the proxy)."""
        address = literal_address(host)
        if address is not None and self.refuses(address):
            raise UpstreamForbidden(f"upstream {host}: {address} is a link-local or metadata address")


# The policy of the session whose request this thread is sending; set only around
# _ProxyAdapter.open. Unset (a connection made some other way): the default, which
# refuses every restricted address.
_ADDRESS_POLICY: contextvars.ContextVar[AddressPolicy | None] = contextvars.ContextVar(
    "jwt_proxy_address_policy", default=None
)


def make_session(
    *,
    pool_maxsize: int,
    ca_file: str | None = None,
    allowed_addresses: t.Iterable[IPAddress] = (),
    resolver: Resolver | None = None,
) -> requests.Session:
    """A session for :func:`send`, one per worker process (P6/P8/P9/P10/P19).

    ``pool_maxsize`` is the number of kept-alive connections per upstream host (the
    worker's thread count); more concurrent requests still proceed, their connections
    are just not kept. ``ca_file`` is a PEM bundle trusted *in addition to* the default
    roots, see :func:`make_ssl_context`. Verification is never off.
    ``allowed_addresses`` and ``resolver`` make the :class:`AddressPolicy` of every
    connection: the link-local and metadata addresses the allowlist names, and a
    ``getaddrinfo`` stand-in (for tests).
    """
    if pool_maxsize < 1:
        raise ValueError(f"pool_maxsize must be >= 1, got {pool_maxsize}")
    session = requests.Session()
    # trust_env would read ~/.netrc (and send its password instead of our token), and
    # REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE; proxies from the environment are resolved per
    # request in send() instead.
    session.trust_env = False
    session.headers.clear()
    # One jar for every client of the worker would hand one client's cookies to the next.
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    session.verify = True
    policy = AddressPolicy(frozenset(canonical_address(a) for a in allowed_addresses), resolver)
    adapter = _ProxyAdapter(pool_maxsize=pool_maxsize, ssl_context=make_ssl_context(ca_file), policy=policy)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def make_ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """The TLS client context for every upstream: default roots plus ``ca_file``.

    Default roots are the system store (OpenSSL's default paths, so a corporate CA added
    with ``update-ca-certificates`` works, and ``SSL_CERT_FILE``/``SSL_CERT_DIR`` are
    honoured) and requests' certifi bundle (so a host with an empty system store behaves
    like plain requests). ``ca_file`` adds to them and never replaces them: a private CA
    for one upstream must not cost the public ones. Certificates and host names are
    always verified (urllib3's defaults: TLS 1.2 minimum). Loaded once per session, not
    per connection.
    """
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    context.check_hostname = True
    context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.load_verify_locations(cafile=requests.certs.where())
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


# The variables requests reads to pick an egress proxy (either case).
_PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY")
#: Upstreams (base URLs) whose proxy decision and pool a worker remembers; pinned mode
#: needs one, header mode without an allowlist is bounded by this.
MAX_REMEMBERED_UPSTREAMS = 256


def environ_proxies(base_url: str) -> dict[str, str]:
    """``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` for one upstream (``scheme://host:port``).

    The decision depends only on the upstream and those variables, and working it out
    (``requests.utils.get_environ_proxies``) cost about a tenth of a proxied request's CPU
    (bench/), so it is made once per upstream and variable values, not per request.
    """
    return dict(_environ_proxies(base_url, tuple(os.environ.get(name) for name in _PROXY_VARIABLES)))


@functools.lru_cache(maxsize=MAX_REMEMBERED_UPSTREAMS)
def _environ_proxies(base_url: str, _variables: tuple[str | None, ...]) -> dict[str, str]:
    return get_environ_proxies(base_url)


def send(session: requests.Session, request: UpstreamRequest, *, timeout_s: float) -> UpstreamResponse:
    """Send ``request`` and return once the upstream's response headers are in.

    ``timeout_s`` bounds the connection and the whole response head (time spent
    streaming the client's body aside); the body then has :data:`BODY_IDLE_TIMEOUT_S` between reads. Proxies come from
    ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` (see :meth:`_ProxyAdapter.proxy_for`). Raises
    :class:`UpstreamTimeout`, :class:`UpstreamUnavailable`, :class:`RequestBodyError`,
    or ``ValueError`` for a request the caller should not have built (a target that is
    not origin-form printable ASCII, a length without a body).
    """
    if not _ORIGIN_FORM_RE.match(request.target):
        raise ValueError("request target must be origin-form printable ASCII (starting with '/')")
    adapter = session.get_adapter(request.base_url)
    if not isinstance(adapter, _ProxyAdapter):
        raise TypeError("send() needs a session from make_session()")
    upstream = _parse_base_url(request.base_url)
    headers, body = _wire_message(request)
    proxy = adapter.proxy_for(request.base_url)
    if proxy:
        # The proxy resolves and dials the target: only an address literal can be
        # checked here (a direct connection is checked in _RawTargetConnection).
        adapter.policy.check_literal(upstream.host or "")
    try:
        raw, release = adapter.open(
            request.method, upstream, request.target, headers, body, timeout_s=timeout_s, proxy=proxy
        )
    except RequestBodyError:
        raise
    except (requests.RequestException, Urllib3Error, OSError, http.client.HTTPException) as exc:
        error = _upstream_error(exc, upstream.netloc, f"response headers (timeout {timeout_s:g}s)")
        error.closes_client = isinstance(exc, UnexpectedUpgrade)
    else:
        return UpstreamResponse(raw, method=request.method, host=upstream.netloc, release=release)
    # Raised outside the except block so that neither __cause__ nor __context__ holds
    # urllib3's exception, whose message has the full URL, query string included.
    raise error


# -- request building --------------------------------------------------------------------


@functools.lru_cache(maxsize=MAX_UPSTREAM_POOLS * 4)
def _parse_base_url(base_url: str) -> Url:
    """``scheme://host[:port]``, parsed once per upstream."""
    return parse_url(base_url)


def _wire_message(request: UpstreamRequest) -> tuple[HTTPHeaderDict, _ExactBody | _StreamBody | None]:
    """The header lines and body reader for the upstream hop.

    Framing follows the body: ``Content-Length`` for a known length (``0`` included),
    none and a chunked body for a body without one, neither without a body.
    """
    headers = HTTPHeaderDict()
    for name, value in request.headers:
        if name.lower() not in ("content-length", "transfer-encoding"):
            headers.add(name, value)
    # Without these, urllib3 adds "User-Agent: python-urllib3/..." and http.client adds
    # "Accept-Encoding: identity" (P19).
    for name in ("User-Agent", "Accept-Encoding"):
        if name not in headers:
            headers[name] = SKIP_HEADER
    body: _ExactBody | _StreamBody | None = None
    length = request.content_length
    if length is not None:
        if length < 0:
            raise ValueError(f"content_length must be >= 0, got {length}")
        if length and request.body is None:
            raise ValueError("content_length given without a body")
        headers["Content-Length"] = str(length)
        if length:
            body = _ExactBody(request.body, length)  # type: ignore[arg-type]
    elif request.body is not None:
        body = _StreamBody(request.body)  # sent chunked, see _ProxyAdapter.open
    return headers, body


class _ExactBody:
    """The client's body, exactly ``length`` bytes of it, in the pieces urllib3 asks for.

    Never reads past ``length`` (the next bytes on the client socket are not ours) and
    raises if the client stops short: a short body under a ``Content-Length`` would leave
    the upstream waiting and the connection unusable.
    """

    def __init__(self, stream: t.IO[bytes], length: int) -> None:
        self._stream = stream
        self._length = length
        self._remaining = length

    def read(self, size: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        want = self._remaining if size is None or size < 0 else min(size, self._remaining)
        data = _read_client(self._stream, want)
        if not data:
            sent = self._length - self._remaining
            raise RequestBodyError(f"request body ended after {sent} of {self._length} bytes")
        if len(data) > want:
            raise RequestBodyError("request body stream returned more bytes than asked for")
        self._remaining -= len(data)
        return data


class _StreamBody:
    """A chunked client body: read in pieces until the stream ends."""

    def __init__(self, stream: t.IO[bytes]) -> None:
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        return _read_client(self._stream, STREAM_BLOCK_BYTES if size is None or size < 0 else min(size, STREAM_BLOCK_BYTES))


def _read_client(stream: t.IO[bytes], size: int) -> bytes:
    try:
        return stream.read(size)
    except Exception as exc:  # gunicorn's readers raise their own types when a client leaves
        raise RequestBodyError(f"reading the request body failed: {type(exc).__name__}") from exc


# -- transport -----------------------------------------------------------------------------


# A header line the email parser reads as "name: value" and nothing else: a name of
# printable ASCII without ":" (the email parser's headerRE), then the colon.
_PLAIN_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+:")
_MAX_HEADER_LINE = getattr(http.client, "_MAXLINE", 65536)
_MAX_HEADERS = getattr(http.client, "_MAXHEADERS", 100)


def header_block_message(lines: list[bytes]) -> http.client.HTTPMessage:
    """The :class:`http.client.HTTPMessage` for header ``lines`` (the terminating blank
    line, or ``b""`` at the end of the stream, last), as ``email.parser`` makes it."""
    return header_block(lines)[0]


def header_block(lines: list[bytes]) -> tuple[http.client.HTTPMessage, list[tuple[str, str]]]:
    """:func:`header_block_message`, and the message's ``items()``.

    http.client hands header lines to ``email.parser``, which costs about a twentieth
    of a proxied request's CPU (bench/). When every line is a plain ``name: value`` (no
    folding, no stray CR, no odd name), the message is built here, with exactly the
    values the parser would give (``compat32``: leading blanks and the line end
    stripped, nothing else), and the items are the pairs just parsed (``compat32``
    hands such values back unchanged); any other block goes to the parser, so defects
    and odd lines are handled exactly as http.client handles them.
    """
    message = http.client.HTTPMessage()
    items = []
    for raw in lines[:-1]:
        text = raw.decode("iso-8859-1")
        body = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
        name = _PLAIN_HEADER_NAME.match(body)
        if name is None or "\r" in body or "\n" in body or body.startswith("From "):
            message = email.parser.Parser(_class=http.client.HTTPMessage).parsestr(
                b"".join(lines).decode("iso-8859-1")
            )
            return message, message.items()
        pair = (body[: name.end() - 1], body[name.end() :].lstrip(" \t"))
        message.set_raw(*pair)
        items.append(pair)
    return message, items


#: Largest response head (status line and header lines) taken from an upstream.
MAX_RESPONSE_HEAD_BYTES = 1024 * 1024


class UnexpectedUpgrade(http.client.HTTPException):
    """A ``101 Switching Protocols`` to a request that asked for no upgrade: what follows
    on the connection is not HTTP the proxy could pass on."""


class AmbiguousFraming(http.client.HTTPException):
    """A response whose body length cannot be known for sure (RFC 9112 6.3): several
    differing ``Content-Length`` values, an invalid one, or one next to
    ``Transfer-Encoding``. Its connection is closed, never reused."""


class _FinalResponse(http.client.HTTPResponse):
    """http.client's response whose head is read here, under one deadline.

    :meth:`begin` reads status lines and header blocks through the socket file's buffer
    (so the body's first bytes stay there for http.client's body reads), skips up to
    :data:`MAX_INTERIM_RESPONSES` interim responses (and ``100 Continue``s), refuses
    a ``101`` nobody asked for and ambiguous framing, then sets the attributes
    http.client's own ``begin`` sets and its body reads use (``chunked``, ``length``,
    ``will_close``...): there is no public way to hand it a head read elsewhere.
    ``deadline`` (``time.monotonic``) bounds the whole head, every read included, so an
    upstream dripping its head or sending ``100`` after ``100`` cannot extend it.
    """

    def __init__(
        self,
        sock: t.Any,
        debuglevel: int = 0,
        method: str | None = None,
        url: str | None = None,
        *,
        deadline: float | None = None,
        upgrade_requested: bool = False,
    ) -> None:
        super().__init__(sock, debuglevel, method, url)
        self._settimeout = getattr(sock, "settimeout", None)
        self._deadline = deadline
        self._upgrade_requested = upgrade_requested

    def begin(self) -> None:
        if self.headers is not None:
            return
        interim = continues = 0
        while True:
            head = read_head(self.fp, self._deadline, self._settimeout)
            lines = _split_lines(head)
            if len(lines) > _MAX_HEADERS + 2:
                raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
            if len(head) > _MAX_HEADER_LINE and max(map(len, lines)) > _MAX_HEADER_LINE:
                raise http.client.LineTooLong("header line")
            version, status, reason = parse_status_line(lines[0])
            if not 100 <= status < 200 or status == 101:
                break
            if status == 100:
                continues += 1
            else:
                interim += 1
            if interim > MAX_INTERIM_RESPONSES or continues > MAX_CONTINUE_RESPONSES:
                raise http.client.HTTPException("too many interim responses")
        if status == 101 and not self._upgrade_requested:
            raise UnexpectedUpgrade("101 Switching Protocols to a request without Upgrade")
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.code = self.status = status
        self.reason = reason.strip()
        self.headers, self.header_lines = header_block(lines[1:])
        self.msg = self.headers
        framing = response_framing(self.header_lines, http_1_0=self.version == 10)
        if framing.error is not None:
            raise AmbiguousFraming(framing.error)
        self.chunked = framing.chunked
        self.chunk_left = None
        self.length = framing.length
        self.will_close = framing.close
        # RFC 9110 6.4.1: no body, whatever the headers say. (_method: the request method
        # http.client's own begin reads; the response offers no public name for it.)
        if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.chunked and self.length is None:
            self.will_close = True  # the body ends when the connection does


def read_head(fp: t.Any, deadline: float | None, settimeout: t.Callable[[float], None] | None) -> bytes:
    """One response head from ``fp``, status line to blank line included.

    Through ``fp``'s buffer (``peek``, then ``read`` of what belongs to the head), so
    nothing past the head is taken; an unbuffered ``fp`` is read a byte at a time. Before
    every read the socket's timeout is set to what is left until ``deadline``.
    """
    block = bytearray()
    peek = getattr(fp, "peek", None)
    while True:
        if deadline is not None and settimeout is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the response head did not complete before the deadline")
            settimeout(remaining)
        data = peek(1) if peek is not None else fp.read(1)
        if not data:
            if not block:
                raise http.client.RemoteDisconnected("Remote end closed connection without response")
            raise http.client.IncompleteRead(bytes(block))
        searched = max(0, len(block) - 2)
        block += data
        end = _head_end(block, searched)
        if end < 0:
            if peek is not None:
                fp.read(len(data))
            if len(block) > MAX_RESPONSE_HEAD_BYTES:
                raise http.client.LineTooLong("response head")
            continue
        if peek is not None:
            fp.read(len(data) - (len(block) - end))
        del block[end:]
        return bytes(block)


def _head_end(block: bytearray, start: int) -> int:
    """Where the head in ``block`` ends (after its blank line), or -1."""
    crlf = block.find(b"\n\r\n", start)
    lf = block.find(b"\n\n", start)
    if crlf < 0:
        return lf + 2 if lf >= 0 else -1
    if 0 <= lf < crlf:
        return lf + 2
    return crlf + 3


def _split_lines(head: bytes) -> list[bytes]:
    """The head's lines with their line ends, split on LF only (as ``readline`` does: a
    lone CR stays inside its line)."""
    parts = head.split(b"\n")
    parts.pop()  # the head ends with LF
    return [part + b"\n" for part in parts]


def parse_status_line(line: bytes) -> tuple[str, int, str]:
    """``(version, status, reason)`` of a status line, as http.client reads it, but the
    status must be three digits."""
    text = str(line, "iso-8859-1")
    version, _, rest = text.partition(" ")
    code, _, reason = rest.lstrip(" ").partition(" ")
    code = code.rstrip("\r\n")
    if not version.startswith("HTTP/") or len(code) != 3 or not code.isdigit() or not code.isascii():
        raise http.client.BadStatusLine(text)
    return version, int(code), reason.rstrip("\r\n")


class _RawTargetConnection(HTTPConnection):
    """A connection that dials only checked addresses and reads the response head with
    :class:`_FinalResponse`, then sets the body idle timeout.

    The request target is the raw one: :func:`_exchange` passes it to ``request``
    directly, past urllib3's ``urlopen``, which would re-encode it. ``http.client``
    still refuses control characters and spaces in it.
    """

    #: When the response head must be complete (``time.monotonic``), set by
    #: :func:`_exchange` for each request.
    head_deadline: float | None = None

    def response_class(self, sock: t.Any, debuglevel: int = 0, method: str | None = None) -> _FinalResponse:
        """What ``getresponse`` reads the head with (any callable may stand here): a
        :class:`_FinalResponse` bound to this request's deadline."""
        return _FinalResponse(sock, debuglevel, method=method, deadline=self.head_deadline)

    def _new_conn(self) -> socket.socket:
        """Resolve once, check every address, then dial only the checked ones.

        urllib3's own ``create_connection`` would resolve the name again, and a second
        answer need not be the first (DNS rebinding). The hop to an ``HTTP(S)_PROXY`` is
        not checked: the operator chose it, and :func:`send` checks the target.
        """
        if self.proxy is not None:
            return super()._new_conn()
        policy = _ADDRESS_POLICY.get() or AddressPolicy()
        try:
            infos = policy.resolve_checked(self._dns_host.strip("[]"), self.port)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        try:
            sock = _connect_first(infos, self.timeout, self.source_address, self.socket_options)
        except socket.timeout as exc:
            raise ConnectTimeoutError(
                self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
            ) from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock

    def read_head(self) -> _FinalResponse:
        """http.client's response to the request just sent, once its head is in (by
        :attr:`head_deadline`); then the socket gets the body idle timeout.

        Taken before: http.client drops ``self.sock`` when the response says
        ``Connection: close``, and such a body (read until close) must get the long
        timeout too. The next request on a kept connection resets the timeout.
        """
        sock = self.sock
        response = http.client.HTTPConnection.getresponse(self)
        settimeout = getattr(sock, "settimeout", None)
        if settimeout is not None:
            settimeout(BODY_IDLE_TIMEOUT_S)
        return response


class _RawTargetHTTPSConnection(_RawTargetConnection, HTTPSConnection):
    pass


def _sockaddr_address(sockaddr: tuple[t.Any, ...]) -> IPAddress | None:
    try:
        return ipaddress.ip_address(sockaddr[0])
    except (ValueError, IndexError, TypeError):
        return None


def _connect_first(
    infos: list[tuple[t.Any, ...]],
    timeout: t.Any,
    source_address: tuple[str, int] | None,
    socket_options: t.Any,
) -> socket.socket:
    """A socket connected to the first of ``infos`` that accepts, as urllib3's
    ``create_connection`` does, but without resolving anything."""
    error: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = None
        try:
            sock = socket.socket(family, socktype, proto)
            for option in socket_options or ():
                sock.setsockopt(*option)
            if timeout is not _DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            error = exc
            if sock is not None:
                sock.close()
    if error is not None:
        try:
            raise error
        finally:
            error = None
    raise OSError("getaddrinfo returned no addresses")


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _RawTargetConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _RawTargetHTTPSConnection


_POOL_CLASSES = {"http": _HTTPPool, "https": _HTTPSPool}


class _ProxyAdapter(HTTPAdapter):
    """requests' adapter with our pools, our TLS context and the raw request target."""

    def __init__(self, *, pool_maxsize: int, ssl_context: ssl.SSLContext, policy: AddressPolicy | None = None) -> None:
        self._ssl_context = ssl_context
        self.policy = policy or AddressPolicy()
        # Per upstream (base URL): the egress proxy decided at the first request, and the
        # pool last used (looking it up in the pool manager costs a key normalisation).
        self._proxies: dict[str, str | None] = {}
        self._pools: dict[tuple[str | None, str, str | None, int | None], HTTPConnectionPool] = {}
        # max_retries=0: a streamed body cannot be replayed. pool_block stays False:
        # requests passes no pool timeout, so a blocked pool would wait forever.
        super().__init__(pool_connections=MAX_UPSTREAM_POOLS, pool_maxsize=pool_maxsize, max_retries=0)

    def proxy_for(self, base_url: str) -> str | None:
        """The egress proxy for ``base_url`` (``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``),
        or None, as requests decides it; decided once per upstream, at the first request
        to it. A running proxy's environment does not change, and reading its eight
        variables cost a few percent of each request's CPU (bench/)."""
        try:
            return self._proxies[base_url]
        except KeyError:
            pass
        proxy = select_proxy(base_url, environ_proxies(base_url)) or None
        if len(self._proxies) < MAX_REMEMBERED_UPSTREAMS:
            self._proxies[base_url] = proxy
        return proxy

    def _pool(self, manager: t.Any, proxy: str | None, upstream: Url) -> HTTPConnectionPool:
        """``manager``'s pool for ``upstream``, remembered while the manager keeps it open
        (past :data:`MAX_UPSTREAM_POOLS` hosts it closes the least recently used)."""
        key = (proxy, upstream.scheme or "", upstream.host, upstream.port)
        pool = self._pools.get(key)
        if pool is None or pool.pool is None:
            pool = manager.connection_from_host(upstream.host, upstream.port, upstream.scheme)
            if len(self._pools) >= MAX_REMEMBERED_UPSTREAMS:
                self._pools.clear()
            self._pools[key] = pool
        return pool

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: t.Any) -> None:
        pool_kwargs["ssl_context"] = self._ssl_context
        # Verification is never off; the trust store is the context (no ca_certs file
        # reloaded into it at every new connection, as requests' verify=True would).
        pool_kwargs["cert_reqs"] = "CERT_REQUIRED"
        pool_kwargs["blocksize"] = REQUEST_BLOCK_BYTES
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: t.Any) -> t.Any:
        if proxy.lower().startswith("socks"):
            # SOCKS pools are their own classes (and need PySocks); ours would bypass the
            # proxy. Such requests keep urllib3's target encoding.
            return super().proxy_manager_for(proxy, **proxy_kwargs)
        if proxy not in self.proxy_manager:
            proxy_kwargs["ssl_context"] = self._ssl_context  # for the upstream, inside the tunnel
            proxy_kwargs["cert_reqs"] = "CERT_REQUIRED"
            proxy_kwargs["blocksize"] = REQUEST_BLOCK_BYTES
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOL_CLASSES
        return manager

    def open(
        self,
        method: str,
        upstream: Url,
        target: str,
        headers: HTTPHeaderDict,
        body: t.Any,
        *,
        timeout_s: float,
        proxy: str | None,
    ) -> tuple[_FinalResponse, t.Callable[[bool], None]]:
        """Send one request on a pooled connection; return when the response head is in,
        with the function that gives the connection back (``True``: it can be reused).

        The request line carries ``target`` exactly; towards a plain-http forward proxy
        it is the absolute URL, as requests would send it.
        """
        wire = target
        if proxy:
            proxy = prepend_scheme_if_needed(proxy, "http")
            if not parse_url(proxy).host:
                raise InvalidProxyURL("the proxy URL has no host")
            manager = self.proxy_manager_for(proxy)
            if upstream.scheme == "http" and not proxy.lower().startswith("socks"):
                wire = f"{upstream.scheme}://{upstream.netloc}{target}"
        else:
            manager = self.poolmanager
        pool = self._pool(manager, proxy, upstream)
        policy_token = _ADDRESS_POLICY.set(self.policy)
        try:
            return _exchange(pool, method, wire, headers, body, timeout_s)
        finally:
            _ADDRESS_POLICY.reset(policy_token)


def _exchange(
    pool: HTTPConnectionPool, method: str, wire: str, headers: HTTPHeaderDict, body: t.Any, timeout_s: float
) -> tuple[_FinalResponse, t.Callable[[bool], None]]:
    """One request on one of ``pool``'s connections, up to the response head.

    What urllib3's ``urlopen`` does for a streamed request without retries or redirects,
    minus its response object (header dict, decoder, length bookkeeping) and its
    re-encoding of the target: the body is read from http.client's response directly.
    Together with skipping requests' ``Response``, about a fifth of a proxied request's
    CPU (bench/). The connection comes from and goes back to the pool as with
    ``urlopen``: one that failed, or whose body was not read to its end, is closed first.
    """
    tunnel = pool.proxy is not None and connection_requires_http_tunnel(pool.proxy, pool.proxy_config, pool.scheme)
    if not tunnel and pool.proxy_headers:  # a plain-http forward proxy's credentials
        headers = headers.copy()
        headers.update(pool.proxy_headers)
    started = time.monotonic()
    conn = pool._get_conn()
    try:
        conn.timeout = timeout_s
        if conn.is_closed:  # new, or dropped while pooled: connect (through a CONNECT tunnel)
            if tunnel:
                pool._prepare_proxy(conn)
            else:
                conn.connect()
        sending = time.monotonic()
        try:
            conn.request(
                method, wire, body=body, headers=headers, chunked=isinstance(body, _StreamBody),
                preload_content=False, decode_content=False,
            )  # fmt: skip
        except OSError as exc:
            # An upstream may answer (413, 401) and close before it has read the whole
            # body; its answer is read below all the same.
            if not isinstance(exc, BrokenPipeError) and exc.errno not in (errno.EPROTOTYPE, errno.ECONNRESET):
                raise
        # The head is due timeout_s after the connect began (or the pooled connection was
        # taken); the time the client takes to stream its body is not the upstream's.
        paused = time.monotonic() - sending if body is not None else 0.0
        conn.head_deadline = started + timeout_s + paused
        response = conn.read_head()
    except BaseException:
        conn.close()
        pool._put_conn(conn)
        raise

    def release(reusable: bool) -> None:
        if not reusable:
            conn.close()
        pool._put_conn(conn)

    return response, release


# -- errors --------------------------------------------------------------------------------


def _exception_chain(exc: BaseException, limit: int = 32) -> list[BaseException]:
    """``exc`` and what it wraps (``reason``, ``args``, ``__cause__``, ``__context__``),
    breadth first: requests wraps urllib3 which wraps the socket error."""
    seen: list[BaseException] = []
    queue = [exc]
    while queue and len(seen) < limit:
        current = queue.pop(0)
        if any(current is known for known in seen):
            continue
        seen.append(current)
        nested = [getattr(current, "reason", None), current.__cause__, current.__context__, *current.args]
        queue.extend(item for item in nested if isinstance(item, BaseException))
    return seen


def _upstream_error(exc: BaseException, host: str, waiting_for: str) -> UpstreamError:
    """Classify ``exc`` and describe it without the URL (requests' and urllib3's messages
    carry the full target, query string included)."""
    chain = _exception_chain(exc)
    # The innermost errors from the standard library (socket, ssl, http.client) and ours
    # (a response head refused) say what happened and never carry the target.
    stdlib = [e for e in chain if type(e).__module__.split(".")[0] in ("builtins", "socket", "ssl", "http", "jwt_proxy")]
    detail = f"{type(stdlib[-1]).__name__}: {stdlib[-1]}" if stdlib else type(chain[-1]).__name__
    if any(_is_timeout(e) for e in chain):
        return UpstreamTimeout(f"upstream {host}: timed out waiting for {waiting_for} ({detail})", error_type="timeout")
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return UpstreamUnavailable(f"upstream {host}: connection refused ({detail})", error_type="connection_refused")
    return UpstreamUnavailable(f"upstream {host}: failed while waiting for {waiting_for} ({detail})", error_type="unknown")


def _is_timeout(exc: BaseException) -> bool:
    # urllib3 2.x makes NewConnectionError (refused, DNS) a subclass of its TimeoutError.
    if isinstance(exc, NewConnectionError):
        return False
    return isinstance(exc, (TimeoutError, Urllib3Timeout, requests.exceptions.Timeout))
