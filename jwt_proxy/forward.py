"""One upstream exchange, streamed both ways: what the proxy's view calls.

:func:`send` frames the request for the upstream hop and returns once the response
head is in, as an :class:`UpstreamResponse` whose body is streamed as it arrives:

- nothing is added to the request: no ``User-Agent``, ``Accept``, ``Accept-Encoding`` or
  ``Content-Type`` the client did not send;
- the request target reaches the wire byte for byte (``%2F``, ``%2E%2E``, ``/./``,
  ``//``, a trailing ``?``, ``[``...), past requests' and urllib3's URL handling
  (:mod:`jwt_proxy.upstream_pool`);
- body framing is decided here from the body actually streamed, never copied from the
  client's headers: ``Content-Length`` for a known length, chunked otherwise;
- responses are read undecoded, one ``recv`` at a time, with the upstream's header lines
  as they came (:mod:`jwt_proxy.upstream_response`); redirects are returned, never followed.

Connections are made by the session's adapter (:mod:`jwt_proxy.upstream_session`) through
the one checked connect path (:mod:`jwt_proxy.upstream_connect`). Failures before the
response head are :class:`~jwt_proxy.upstream_errors.UpstreamError` (mapped to a status
by the caller); failures while streaming the body are raised from
:meth:`UpstreamResponse.iter_body` so the server aborts the client connection instead of
finishing a truncated body.
"""

from __future__ import annotations

import functools
import http.client
import re
import typing as t
from dataclasses import dataclass
from dataclasses import field

import requests
from urllib3 import HTTPHeaderDict
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.util import SKIP_HEADER
from urllib3.util import Url
from urllib3.util import parse_url

from .headers import filter_response_headers
from .upstream_connect import MAX_REMEMBERED_UPSTREAMS
from .upstream_errors import RequestBodyError
from .upstream_errors import describe_upstream_error
from .upstream_response import BODY_CHUNK_BYTES
from .upstream_response import FinalResponse
from .upstream_response import UnexpectedUpgrade
from .upstream_response import iter_body
from .upstream_session import ProxyAdapter

#: Largest read from a chunked client body. gunicorn returns a read only once it has that
#: many bytes (or the body ended), and a chunked body is often a stream whose pieces
#: should move on as they come, so its reads stay small.
STREAM_BLOCK_BYTES = BODY_CHUNK_BYTES

# A request target as gunicorn accepts it (RFC 9112 3.2: printable ASCII, origin-form).
_ORIGIN_FORM_RE = re.compile(r"/[\x21-\x7e]*\Z")


def require_origin_form(target: str) -> None:
    """Refuse (``ValueError``) a target the caller should not have built: one that is not
    origin-form printable ASCII, starting with ``/``, as gunicorn accepts it."""
    if not _ORIGIN_FORM_RE.match(target):
        raise ValueError("request target must be origin-form printable ASCII (starting with '/')")


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
        self, raw: FinalResponse, *, method: str, host: str, release: t.Callable[[bool], None]
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
            yield from iter_body(self._raw.read1, self._raw, self._host, chunk_size)
            self._complete = True
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


def send(session: requests.Session, request: UpstreamRequest, *, timeout_s: float) -> UpstreamResponse:
    """Send ``request`` and return once the upstream's response headers are in.

    ``timeout_s`` bounds the connection and the whole response head (time spent
    streaming the client's body aside); the body then has
    :data:`~jwt_proxy.upstream_response.BODY_IDLE_TIMEOUT_S` between reads. Proxies come from
    ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` (see :meth:`~jwt_proxy.upstream_session.ProxyAdapter.proxy_for`). Raises
    :class:`UpstreamTimeout`, :class:`UpstreamUnavailable`, :class:`RequestBodyError`,
    or ``ValueError`` for a request the caller should not have built (a target that is
    not origin-form printable ASCII, a length without a body).
    """
    require_origin_form(request.target)
    adapter = session.get_adapter(request.base_url)
    if not isinstance(adapter, ProxyAdapter):
        raise TypeError("send() needs a session from make_session()")
    upstream = _parse_base_url(request.base_url)
    headers, body = _wire_message(request)
    proxy = adapter.proxy_for(request.base_url)
    if proxy:
        # The proxy resolves and dials the target: only an address literal can be
        # checked here (a direct connection is checked when it is dialled).
        adapter.policy.check_literal(upstream.host or "")
    try:
        raw, release = adapter.open(
            request.method, upstream, request.target, headers, body,
            timeout_s=timeout_s, proxy=proxy, chunked=isinstance(body, _StreamBody),
        )  # fmt: skip
    except RequestBodyError:
        raise
    except (requests.RequestException, Urllib3Error, OSError, http.client.HTTPException) as exc:
        error = describe_upstream_error(exc, upstream.netloc, f"response headers (timeout {timeout_s:g}s)")
        error.closes_client = isinstance(exc, UnexpectedUpgrade)
    else:
        return UpstreamResponse(raw, method=request.method, host=upstream.netloc, release=release)
    # Raised outside the except block so that neither __cause__ nor __context__ holds
    # urllib3's exception, whose message has the full URL, query string included.
    raise error


# -- request building --------------------------------------------------------------------


@functools.lru_cache(maxsize=MAX_REMEMBERED_UPSTREAMS)
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
    # "Accept-Encoding: identity".
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
        body = _StreamBody(request.body)  # sent chunked
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
