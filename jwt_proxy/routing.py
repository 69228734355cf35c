"""Which upstream a request goes to, and what is sent as its request target.

Pure functions over strings: no Flask, no requests, no I/O, so every rule here is
unit-tested with a table.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")
_PORT = re.compile(r"[0-9]{1,5}")
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
_INVALID_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")

DEFAULT_PORTS = {"http": 80, "https": 443}


class RoutingError(Exception):
    """A request whose upstream can't be chosen; ``body`` is the fixed line the client gets."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


@dataclasses.dataclass(frozen=True)
class Authority:
    """A plain ``host[:port]``: ``host`` without brackets, ``port`` None when not given."""

    host: str
    port: int | None = None

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def host_for_url(self) -> str:
        return f"[{self.host}]" if self.is_ipv6 else self.host

    def __str__(self) -> str:
        if self.port is None:
            return self.host_for_url
        return f"{self.host_for_url}:{self.port}"


def parse_authority(text: str) -> Authority:
    """Parse a plain ``host[:port]``; anything else (scheme, path, ``@``, spaces) is refused.

    :raises ValueError: when ``text`` is not exactly a host name, IPv4 address or bracketed
        IPv6 address, optionally followed by a port from 1 to 65535.
    """
    if text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(text)
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise ValueError(text) from None
        if "%" in inside:
            raise ValueError(text)
        host = inside
        port_text = _port_suffix(text, rest)
    else:
        host, sep, port_text = text.partition(":")
        if sep and not port_text:
            raise ValueError(text)
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(text)
        port_text = port_text if sep else None
    port = None
    if port_text is not None:
        if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise ValueError(text)
        port = int(port_text)
    return Authority(host, port)


def _port_suffix(text: str, rest: str) -> str | None:
    if not rest:
        return None
    if not rest.startswith(":") or len(rest) == 1:
        raise ValueError(text)
    return rest[1:]


@dataclasses.dataclass(frozen=True)
class Upstream:
    """Where one request goes: the scheme and the authority it names."""

    scheme: str
    authority: Authority

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.authority}"

    @property
    def host_header(self) -> str:
        """``Host`` as sent upstream: the authority, without a port equal to the scheme's default."""
        if self.authority.port in (None, DEFAULT_PORTS[self.scheme]):
            return self.authority.host_for_url
        return str(self.authority)

    @property
    def audience(self) -> str:
        """The audience derived from the upstream: ``scheme://host`` lower-cased, port dropped."""
        return f"{self.scheme}://{self.authority.host_for_url.lower().rstrip('.')}"


def choose_upstream(
    *, pinned: Authority | None, scheme: str, header_name: str, header_value: str | None
) -> Upstream:
    """The upstream of one request.

    :param pinned: ``--upstream-host``; when set no header is consulted.
    :param header_name: ``--host-header`` as configured, for the error body.
    :param header_value: that header's value on this request (for ``Host`` mode, the Host line).
    :raises RoutingError: 400 when the header is missing or not a plain ``host[:port]``.
    """
    if pinned is not None:
        return Upstream(scheme, pinned)
    if not header_value:
        raise RoutingError(400, f"missing {header_name} header")
    try:
        return Upstream(scheme, parse_authority(header_value))
    except ValueError:
        raise RoutingError(400, f"invalid {header_name} header: want host[:port]") from None


def request_target(raw_uri: str) -> str:
    """The path and query to send upstream, exactly as the client wrote them.

    An absolute-form target (``http://other/x``) contributes only its path and query: the
    upstream is chosen by :func:`choose_upstream`, never by the request line.

    :raises RoutingError: 400 for a target that is neither origin- nor absolute-form, or
        that holds an invalid percent-escape.
    """
    if not raw_uri.startswith("/"):
        match = _ABSOLUTE_FORM.match(raw_uri)
        if match is None:
            raise RoutingError(400, "invalid request target")
        raw_uri = raw_uri[match.end() :]
        if not raw_uri.startswith("/"):
            raw_uri = "/" + raw_uri
    if "#" in raw_uri or _INVALID_ESCAPE.search(raw_uri):
        raise RoutingError(400, "invalid request target")
    return raw_uri


def strip_query(target: str) -> str:
    """The path of a target, for log records: a query string may carry secrets."""
    return target.partition("?")[0]
