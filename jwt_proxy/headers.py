"""Which header lines cross the proxy, in each direction.

Pure functions over ``(name, value)`` pairs: no I/O, no framework, standard library only.
Order, case and duplicates of the lines that are kept never change, so what the upstream
(or the client) receives is what was sent, minus the lines that describe one hop of the
connection rather than the message (RFC 9110 section 7.6.1).
"""

from __future__ import annotations

import typing as t

#: Lower-case names that describe one connection, never the message. werkzeug's set plus
#: ``proxy-connection`` (a non-standard name clients still send) and ``http2-settings``
#: (RFC 7540 3.2.1: it only belongs to an ``Upgrade: h2c`` of this one hop, and the
#: upgrade is not passed on); RFC 9110 7.6.1 also makes every name listed in a
#: ``Connection`` value hop-by-hop, see :func:`connection_named`.
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "http2-settings",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Set again by the caller for the upstream hop: the upstream's own Host, and the framing
# that forward.send derives from the body it actually streams (a copied Content-Length next
# to a chunked body is a request-smuggling desync).
_REQUEST_ONLY_DROPPED = frozenset({"host", "content-length", "transfer-encoding"})

Headers = t.List[t.Tuple[str, str]]


def connection_named(headers: t.Iterable[tuple[str, str]]) -> frozenset[str]:
    """Lower-case names listed in any ``Connection`` line (comma separated, any case)."""
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(token.strip().lower() for token in value.split(","))
    named.discard("")
    return frozenset(named)


def filter_request_headers(
    headers: t.Iterable[tuple[str, str]], *, also_drop: t.Iterable[str] = ()
) -> Headers:
    """The client's header lines that may go to the upstream.

    Drops hop-by-hop names, every name the client listed in ``Connection``, ``Host``,
    ``Content-Length``, ``Transfer-Encoding`` and the names in ``also_drop`` (the routing
    header), compared case-insensitively. The caller adds ``Host``, ``Authorization`` and
    ``X-Forwarded-For`` *after* this, so a client that names ``Authorization`` in its
    ``Connection`` header strips only its own copy, never the injected token.
    """
    lines = list(headers)
    dropped = HOP_BY_HOP | _REQUEST_ONLY_DROPPED | connection_named(lines)
    dropped |= {name.lower() for name in also_drop}
    return [(name, value) for name, value in lines if name.lower() not in dropped]


def filter_response_headers(headers: t.Iterable[tuple[str, str]]) -> Headers:
    """The upstream's header lines that may go to the client.

    Drops hop-by-hop names and the names the upstream listed in ``Connection``. Keeps
    duplicates as separate lines (each ``Set-Cookie`` on its own: merged cookies break on
    ``Expires=Wed, 21 Oct ...``), the upstream's case, ``Content-Encoding`` and
    ``Content-Length``. One exception: a ``Content-Length`` next to a ``Transfer-Encoding``
    is dropped, because the body arrives de-chunked and RFC 9112 section 6.3 requires an
    intermediary to remove such a length before forwarding (it is a smuggling signature).
    """
    lines = list(headers)
    dropped = HOP_BY_HOP | connection_named(lines)
    if any(name.lower() == "transfer-encoding" for name, _ in lines):
        dropped |= {"content-length"}
    kept = []
    length_kept = False
    for name, value in lines:
        lower = name.lower()
        if lower in dropped:
            continue
        if lower == "content-length":
            if length_kept:
                continue  # repeated lines of one length (checked equal before): one is enough
            length_kept = True
        kept.append((name, value))
    return kept


#: Largest body length (``Content-Length``, chunk size) either side may announce: what a
#: signed 64-bit integer holds. A larger one wraps around in a peer that parses it into
#: one, and the two then disagree on where the message ends.
MAX_BODY_LENGTH = 2**63 - 1


class ResponseFraming(t.NamedTuple):
    """How a response's body is delimited: ``length`` (``None`` when not given),
    ``chunked``, ``close`` (the connection ends after it); ``error`` when that cannot be
    known for sure (RFC 9112 6.3)."""

    length: int | None
    chunked: bool
    close: bool
    error: str | None = None


def response_framing(headers: t.Iterable[tuple[str, str]], *, http_1_0: bool = False) -> ResponseFraming:
    """The framing of a response with header ``headers``.

    An error for several ``Content-Length`` values that differ, one that is not plain
    digits (``+5``, ``-1``, ``5, 6``) or is above :data:`MAX_BODY_LENGTH`, and a
    ``Content-Length`` next to a ``Transfer-Encoding``. An error too for a
    ``Transfer-Encoding`` other than exactly ``chunked`` over all its lines: the
    header is hop-by-hop, so another coding (``gzip, chunked``, ``gzip``) would reach
    the client undecoded and unnamed. Repeated lines with the same length are one
    length. ``close`` follows ``Connection`` (and, for HTTP/1.0, ``Keep-Alive``).
    """
    length: int | None = None
    transfer_encodings: list[str] = []
    connection = ""
    keep_alive_header = False
    for name, value in headers:
        lower = name.lower()
        if lower == "content-length":
            number = _decimal_length(value)
            if number is None:
                return ResponseFraming(None, False, True, "invalid Content-Length")
            if length is not None and number != length:
                return ResponseFraming(None, False, True, "differing Content-Length values")
            length = number
        elif lower == "transfer-encoding":
            transfer_encodings.append(value.strip(" \t").lower())
        elif lower == "connection":
            connection += "," + value.lower()
        elif lower == "keep-alive":
            keep_alive_header = True
    if length is not None and transfer_encodings:
        return ResponseFraming(None, False, True, "Content-Length with Transfer-Encoding")
    if transfer_encodings not in ([], ["chunked"]):
        return ResponseFraming(None, False, True, "unsupported Transfer-Encoding")
    chunked = bool(transfer_encodings)
    if http_1_0:
        close = not (keep_alive_header or "keep-alive" in connection)
    else:
        close = "close" in connection
    return ResponseFraming(length, chunked, close)


def _decimal_length(value: str) -> int | None:
    """A ``Content-Length`` value as a number: ASCII digits only (no sign, no list),
    at most :data:`MAX_BODY_LENGTH`; else None."""
    value = value.strip(" \t")
    if not value.isdigit() or not value.isascii() or len(value.lstrip("0")) > 19:
        return None
    number = int(value)
    return number if number <= MAX_BODY_LENGTH else None


def append_forwarded_for(headers: list[tuple[str, str]], client_addr: str) -> Headers:
    """``headers`` with ``client_addr`` appended to ``X-Forwarded-For``.

    Several inbound ``X-Forwarded-For`` lines are one list (RFC 9110 5.3), so they are
    joined with ``", "`` into one line that stays where the first one was; without one,
    the line is added at the end. An empty ``client_addr`` (no peer address known)
    leaves the chain as it is rather than appending an empty hop.
    """
    previous = [value.strip() for name, value in headers if name.lower() == "x-forwarded-for"]
    chain = ", ".join(part for part in [*previous, client_addr] if part)
    result: Headers = []
    placed = False
    for name, value in headers:
        if name.lower() != "x-forwarded-for":
            result.append((name, value))
        elif not placed:
            result.append((name, chain))
            placed = True
    if not placed and chain:
        result.append(("X-Forwarded-For", chain))
    return result


def request_framing_error(transfer_encoding: str | None, content_length: str | None = None) -> str | None:
    """Why a request body's framing cannot be forwarded as it is, or None.

    The server in front (gunicorn) already refuses a ``Content-Length`` next to a
    ``Transfer-Encoding``, two ``Content-Length`` lines, a length that is not a plain
    number, stacked ``chunked``, unknown codings and obsolete line folding. It does
    accept ``gzip, chunked`` or ``identity, chunked`` and hands the app the de-chunked
    bytes, which are still gzip-coded: the upstream hop is re-framed as plain
    ``chunked``, so such a body would arrive with a different meaning. Only a
    ``Transfer-Encoding`` of exactly ``chunked`` (any case, once) is forwarded. It also
    accepts any number of digits as a length: one above :data:`MAX_BODY_LENGTH` would
    wrap around in an upstream that reads it into a 64-bit integer.

    :param transfer_encoding: the request's ``Transfer-Encoding`` lines, comma-joined.
    :param content_length: its ``Content-Length``, as gunicorn let it through.
    """
    if content_length is not None and _decimal_length(content_length) is None:
        return "invalid Content-Length"
    if transfer_encoding is None:
        return None
    codings = [coding.strip(" \t").lower() for coding in transfer_encoding.split(",")]
    if codings != ["chunked"]:
        return "unsupported transfer coding"
    return None
