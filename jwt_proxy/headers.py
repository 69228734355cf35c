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
    return [(name, value) for name, value in lines if name.lower() not in dropped]


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


def request_framing_error(transfer_encoding: str | None) -> str | None:
    """Why a request body's framing cannot be forwarded as it is, or None.

    The server in front (gunicorn) already refuses a ``Content-Length`` next to a
    ``Transfer-Encoding``, two ``Content-Length`` lines, a length that is not a plain
    number, stacked ``chunked``, unknown codings and obsolete line folding. It does
    accept ``gzip, chunked`` or ``identity, chunked`` and hands the app the de-chunked
    bytes, which are still gzip-coded: the upstream hop is re-framed as plain
    ``chunked``, so such a body would arrive with a different meaning. Only a
    ``Transfer-Encoding`` of exactly ``chunked`` (any case, once) is forwarded.

    :param transfer_encoding: the request's ``Transfer-Encoding`` lines, comma-joined.
    """
    if transfer_encoding is None:
        return None
    codings = [coding.strip(" \t").lower() for coding in transfer_encoding.split(",")]
    if codings != ["chunked"]:
        return "unsupported transfer coding"
    return None
