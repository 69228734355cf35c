"""Which upstream a request goes to, and what is sent as its request target.

Pure functions over strings: no Flask, no requests, no I/O, so every rule here is
unit-tested with a table.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import typing as t

_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")
_PORT = re.compile(r"[0-9]{1,5}")
# RFC 9112 3.2: a request target is printable ASCII; anything else is percent-encoded.
_ORIGIN_FORM = re.compile(r"/[\x21-\x7e]*")
_INVALID_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")

DEFAULT_PORTS = {"http": 80, "https": 443}

BODY_INVALID_TARGET = "invalid request target"
#: The one line a client gets for an upstream outside ``--allowed-upstream-hosts`` or at
#: a link-local or metadata address: it does not say which rule refused it.
BODY_FORBIDDEN = "upstream not allowed"

#: Never dialled unless ``--allowed-upstream-hosts`` names the address: link-local
#: networks hold the EC2 instance metadata service (169.254.169.254), the ECS task
#: metadata and credential endpoints (169.254.170.2) and the EKS Pod Identity agent
#: (169.254.170.23).
RESTRICTED_NETWORKS = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
#: The IPv6 metadata and credential addresses, which are not link-local: EC2 instance
#: metadata (``fd00:ec2::254``), the EKS Pod Identity agent (``fd00:ec2::23``) and the
#: Google Compute Engine metadata server (``fd20:ce::254``).
RESTRICTED_ADDRESSES = frozenset(
    ipaddress.IPv6Address(text) for text in ("fd00:ec2::254", "fd00:ec2::23", "fd20:ce::254")
)
# IPv6 forms that carry an IPv4 address and reach (or route towards) it: IPv4-compatible
# (::a9fe:a9fe, deprecated but still parsed and routed by some stacks), SIIT
# IPv4-translated (::ffff:0:a9fe:a9fe) and the NAT64 prefixes (RFC 6052, RFC 8215), all
# with the IPv4 address in the last 32 bits; 6to4 (2002::/16) has it in bits 16 to 48.
# (IPv4-mapped ::ffff:a9fe:a9fe is read by canonical_address.)
_LOW_32_IPV4 = (
    ipaddress.ip_network("::/96"),
    ipaddress.ip_network("::ffff:0:0:0/96"),
    ipaddress.ip_network("64:ff9b::/96"),
    ipaddress.ip_network("64:ff9b:1::/48"),
)
_IPV4_PART = re.compile(r"0[xX][0-9A-Fa-f]+|0[0-7]*|[1-9][0-9]*")

IPAddress = t.Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


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

    # Cached: in pinned mode one Upstream serves every request of a worker.
    @functools.cached_property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.authority}"

    @functools.cached_property
    def host_header(self) -> str:
        """``Host`` as sent upstream: the authority, without a port equal to the scheme's default."""
        if self.authority.port in (None, DEFAULT_PORTS[self.scheme]):
            return self.authority.host_for_url
        return str(self.authority)

    @functools.cached_property
    def audience(self) -> str:
        """The audience derived from the upstream: ``scheme://host`` lower-cased, port dropped."""
        return f"{self.scheme}://{self.authority.host_for_url.lower().rstrip('.')}"


def choose_upstream(
    *,
    pinned: Authority | None,
    scheme: str,
    header_name: str,
    header_value: str | None,
    allowlist: Allowlist | None = None,
) -> Upstream:
    """The upstream of one request.

    :param pinned: ``--upstream-host``; when set no header is consulted (it was checked
        against ``allowlist`` and the restricted addresses at start-up).
    :param header_name: ``--host-header`` as configured, for the error body.
    :param header_value: that header's value on this request (for ``Host`` mode, the Host line).
    :param allowlist: ``--allowed-upstream-hosts``; empty or None allows any host.
    :raises RoutingError: 400 when the header is missing or not a plain ``host[:port]``;
        403 when it is outside ``allowlist``, or is a link-local or metadata address in
        any spelling (:func:`literal_address`) that ``allowlist`` does not name.
    """
    if pinned is not None:
        return Upstream(scheme, pinned)
    if not header_value:
        raise RoutingError(400, f"missing {header_name} header")
    try:
        upstream = Upstream(scheme, parse_authority(header_value))
    except ValueError:
        raise RoutingError(400, f"invalid {header_name} header: want host[:port]") from None
    allowlist = allowlist or Allowlist(())
    if not allowlist.allows(upstream):
        raise RoutingError(403, BODY_FORBIDDEN)
    address = literal_address(upstream.authority.host)
    if address is not None and allowlist.refuses_address(address):
        raise RoutingError(403, BODY_FORBIDDEN)
    return upstream


# -- addresses ------------------------------------------------------------------------


def literal_address(host: str) -> IPAddress | None:
    """The address ``host`` denotes without DNS, in every spelling a resolver accepts.

    Besides dotted quads and IPv6, ``getaddrinfo`` (``inet_aton``) reads one to four
    dot-separated parts in decimal, octal (leading ``0``) or hex (``0x``), the last part
    filling the remaining bytes: ``2852039166``, ``0251.0376.0251.0376``, ``0xa9fea9fe``
    and ``169.254.43518`` are all 169.254.169.254. ``None`` for a host name.
    """
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.strip("[]"))
        except ValueError:
            return None
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.fullmatch(part) for part in parts):
        return None
    values = []
    for part in parts:
        if part[:2] in ("0x", "0X"):
            values.append(int(part[2:], 16))
        elif len(part) > 1 and part[0] == "0":
            values.append(int(part, 8))
        else:
            values.append(int(part))
    *leading, last = values
    if any(value > 0xFF for value in leading) or last >= 1 << (8 * (5 - len(values))):
        return None
    number = last
    for index, value in enumerate(leading):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def canonical_address(address: IPAddress) -> IPAddress:
    """``address`` as the host it reaches: IPv4-mapped IPv6 as IPv4, without a zone."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id:
            return ipaddress.IPv6Address(int(address))
    return address


def is_restricted_address(address: IPAddress) -> bool:
    """Whether ``address`` is link-local or a cloud metadata / credential address.

    An IPv6 address that carries an IPv4 address (mapped ``::ffff:169.254.169.254``,
    compatible ``::169.254.169.254``, NAT64 ``64:ff9b::a9fe:a9fe``, 6to4
    ``2002:a9fe:a9fe::``) counts as that IPv4 address too.
    """
    address = canonical_address(address)
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None and _in_restricted_ranges(embedded):
            return True
    return _in_restricted_ranges(address)


def is_refused_address(address: IPAddress | None, allowed: frozenset[IPAddress] = frozenset()) -> bool:
    """The one rule for every upstream address, written or resolved: refused when it is
    not an address at all (``None``: an unparseable resolver answer), or restricted
    (:func:`is_restricted_address`) and not named by ``--allowed-upstream-hosts``
    (``allowed``, in :func:`canonical_address` form)."""
    if address is None:
        return True
    return is_restricted_address(address) and canonical_address(address) not in allowed


def _in_restricted_ranges(address: IPAddress) -> bool:
    return address in RESTRICTED_ADDRESSES or any(address in network for network in RESTRICTED_NETWORKS)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in _LOW_32_IPV4):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


# -- the allowlist --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostPattern:
    """One ``--allowed-upstream-hosts`` item, compiled by :func:`parse_host_pattern`.

    ``host`` is lower-case without a trailing dot; for ``*.example.com`` it is
    ``example.com`` with ``wildcard`` set; for an IP address it is the address's
    compressed text and ``address`` holds it (an upstream matches it only when written
    the same way: a dotted quad, or the same IPv6 address). ``port`` None matches any port.
    """

    text: str
    host: str
    port: int | None = None
    wildcard: bool = False
    address: IPAddress | None = None

    def matches(self, upstream: Upstream) -> bool:
        authority = upstream.authority
        if self.port is not None and self.port != (authority.port or DEFAULT_PORTS[upstream.scheme]):
            return False
        if self.address is not None:
            # The pattern's own spelling only: no trailing dot ("10.0.0.1." is a name to a
            # resolver), no decimal or IPv4-mapped forms of it.
            return _ip_literal(authority.host) == self.address
        host = _normalized_host(authority.host)
        if self.wildcard:
            return literal_address(host) is None and host.endswith("." + self.host)
        return host == self.host


#: What ``--allowed-upstream-hosts`` accepts, for the start-up error line.
PATTERN_HELP = "patterns like api.example.com, *.example.com, 10.0.0.1 or [fd00::1], optionally with :port"


def parse_host_pattern(text: str) -> HostPattern:
    """Compile one allowlist item.

    Accepted: a host name, ``*.`` and a host name (one or more extra labels, never the
    bare parent), a dotted-quad IPv4 address or a bracketed IPv6 address, each with an
    optional ``:port``. Case and a trailing dot do not matter.

    :raises ValueError: for anything else (a scheme, path, ``@``, another ``*``, an IPv4
        address in another spelling than four decimal numbers, a bad port).
    """
    wildcard = text.startswith("*.")
    try:
        authority = parse_authority(text[2:] if wildcard else text)
    except ValueError:
        raise ValueError(text) from None
    host = _normalized_host(authority.host)
    if not host:
        raise ValueError(text)
    address = None
    if authority.is_ipv6:
        address = ipaddress.IPv6Address(host)
    elif literal_address(host) is not None:
        # Only the dotted quad: 2852039166 as a pattern would read as a host name to
        # some people and as 169.254.169.254 to the resolver.
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(text) from None
    if wildcard and address is not None:
        raise ValueError(text)
    return HostPattern(text, str(address) if address else host, authority.port, wildcard, address)


class Allowlist:
    """``--allowed-upstream-hosts``, compiled: an upstream is allowed when any pattern
    matches it; with no patterns every upstream is.

    IP-address patterns also *name* their address, which is what lets a link-local or
    metadata address through (:meth:`names_address`); host-name patterns never do, even
    when the name resolves there.
    """

    def __init__(self, patterns: t.Iterable[HostPattern]) -> None:
        self.patterns = tuple(patterns)
        self.addresses = frozenset(canonical_address(p.address) for p in self.patterns if p.address is not None)

    @classmethod
    def parse(cls, texts: t.Iterable[str]) -> Allowlist:
        """:raises ValueError: with the first bad pattern as its argument."""
        return cls(parse_host_pattern(text) for text in texts)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"Allowlist({[p.text for p in self.patterns]!r})"

    def allows(self, upstream: Upstream) -> bool:
        return not self.patterns or any(pattern.matches(upstream) for pattern in self.patterns)

    def names_address(self, address: IPAddress) -> bool:
        return canonical_address(address) in self.addresses

    def refuses_address(self, address: IPAddress) -> bool:
        """Whether ``address`` may not be reached (:func:`is_refused_address`)."""
        return is_refused_address(address, self.addresses)


def _normalized_host(host: str) -> str:
    return host.lower().rstrip(".")


def _ip_literal(host: str) -> IPAddress | None:
    """The address of a host written as a dotted quad or an IPv6 address, else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def request_target(raw_uri: str) -> str:
    """The path and query to send upstream, exactly as the client wrote them.

    Only the origin form (``/path?query``) is accepted. An absolute-form target
    (``http://other/x``) is what a client sends to a *forward* proxy: it is refused
    rather than reinterpreted, so the request line can never name a host. A target that
    starts with ``//`` is a path like any other: it is never parsed into a URL here, and
    goes upstream as it came.

    :raises RoutingError: 400 for any other form, a fragment, control or non-ASCII
        characters, or an invalid percent-escape.
    """
    if not _ORIGIN_FORM.fullmatch(raw_uri) or "#" in raw_uri or _INVALID_ESCAPE.search(raw_uri):
        raise RoutingError(400, BODY_INVALID_TARGET)
    return raw_uri


def strip_query(target: str) -> str:
    """The path of a target, for log records: a query string may carry secrets."""
    return target.partition("?")[0]


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address, no brackets) is ``localhost`` or a loopback address."""
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
