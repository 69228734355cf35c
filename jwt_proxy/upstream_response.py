"""Reading an upstream's response: the head under one deadline, then the body.

The head is read by the package's own parser (:func:`read_head`, :func:`header_block`)
through the socket file's buffer, so the body's first bytes stay there for
http.client's body reads. It enforces what a proxy must (RFC 9112 6.3): one deadline
for the whole head, interim responses included; no ``101`` nobody asked for; no
ambiguous framing. :func:`iter_body` is the one body loop of forwarding and tunnelling.
"""

from __future__ import annotations

import email.parser
import http.client
import re
import time
import typing as t

from urllib3.exceptions import HTTPError as Urllib3Error

from .headers import response_framing
from .upstream_errors import describe_upstream_error

#: Socket read timeout once the response headers are in. ``--upstream-timeout`` bounds the
#: wait for the headers; after that a body may legitimately be idle for much longer (an
#: event stream whose events are minutes apart, a slow report download). It is per read,
#: not total: a stream lives as long as bytes keep coming. Five minutes is above common
#: SSE heartbeat intervals and load-balancer idle timeouts (AWS ALB: 60 s by default),
#: and still frees the thread of a stalled upstream, and notices a client that left
#: during the silence, in bounded time.
BODY_IDLE_TIMEOUT_S = 300.0
#: Default size of one read from the upstream body: an upper bound, read1 returns what
#: one recv gave.
BODY_CHUNK_BYTES = 65536
#: More interim (1xx) responses than this before the final one is an upstream fault
#: (Go's net/http stops at 5 too). ``100 Continue`` is counted apart: an upstream may
#: send one now and then while it works, and the head deadline bounds them.
MAX_INTERIM_RESPONSES = 5
#: More ``100 Continue`` responses than this in one head is an upstream looping on them.
MAX_CONTINUE_RESPONSES = 1000


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

    http.client hands header lines to ``email.parser``, a costly part of every proxied
    request (``bench/`` measures it). When every line is a plain ``name: value`` (no
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


class FinalResponse(http.client.HTTPResponse):
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


def iter_body(
    read: t.Callable[[int], bytes], response: http.client.HTTPResponse, host: str, chunk_size: int
) -> t.Iterator[bytes]:
    """The body of ``response``, one ``read(chunk_size)`` at a time, undecoded.

    A body that stops short of its ``Content-Length`` (which http.client ends quietly),
    breaks or stalls raises :class:`~jwt_proxy.upstream_errors.UpstreamUnavailable` or
    :class:`~jwt_proxy.upstream_errors.UpstreamTimeout` instead of ending, so the server
    drops the client connection rather than finishing a truncated body.
    """
    while True:
        error = None
        try:
            data = read(chunk_size)
            if not data and response.length:
                raise http.client.IncompleteRead(b"", response.length)
        except (Urllib3Error, OSError, http.client.HTTPException) as exc:
            error = describe_upstream_error(exc, host, "the response body")
        if error is not None:
            raise error  # outside the except block: no urllib3 message (with the URL) chained
        if not data:
            return
        yield data
