"""The one way the proxy reaches an upstream: resolve, check, dial, TLS.

Every new connection, forwarded or tunnelled, is checked before it is made
(:class:`AddressPolicy`): the host is resolved once, every address it resolves to is
checked, and only those checked addresses are dialled (:func:`dial`), so a link-local
or metadata address (169.254.169.254 in any spelling, ``fd00:ec2::254``, a DNS name
that resolves there) is refused with
:class:`~jwt_proxy.upstream_errors.UpstreamForbidden` unless
``--allowed-upstream-hosts`` names it. Through an ``HTTP(S)_PROXY`` the connection goes
to the proxy, which resolves the target: there a target written as an IP address is
checked, a name is left to the proxy. TLS uses one context per session
(:func:`make_ssl_context`).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import ssl
import typing as t
from dataclasses import dataclass

import requests.certs
from requests.utils import get_environ_proxies
from urllib3.util.connection import allowed_gai_family
from urllib3.util.ssl_ import create_urllib3_context
from urllib3.util.timeout import _DEFAULT_TIMEOUT

from .routing import IPAddress
from .routing import is_refused_address
from .routing import literal_address
from .upstream_errors import UpstreamForbidden

#: Upstreams (base URLs) whose proxy decision and pool a worker remembers; pinned mode
#: needs one, header mode without an allowlist is bounded by this.
MAX_REMEMBERED_UPSTREAMS = 256


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
            address = sockaddr_address(info[4])
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

    def dial(self, host: str, port: int, timeout: t.Any, socket_options: t.Any = (), source_address: t.Any = None) -> socket.socket:
        """A socket connected to ``host`` (a name or an address literal, unbracketed),
        resolved once and checked (:meth:`resolve_checked`), dialled only at checked
        addresses. Raises :class:`UpstreamForbidden` before any connect, ``gaierror`` or
        ``OSError`` as :func:`socket.create_connection` does."""
        return connect_first(self.resolve_checked(host, port), timeout, source_address, socket_options)


def sockaddr_address(sockaddr: tuple[t.Any, ...]) -> IPAddress | None:
    try:
        return ipaddress.ip_address(sockaddr[0])
    except (ValueError, IndexError, TypeError):
        return None


def connect_first(
    infos: list[tuple[t.Any, ...]],
    timeout: t.Any,
    source_address: tuple[str, int] | None,
    socket_options: t.Any,
) -> socket.socket:
    """A socket connected to the first of ``infos`` that accepts, as urllib3's
    ``create_connection`` does, but without resolving anything. (``_DEFAULT_TIMEOUT``:
    urllib3's marker for "no timeout given", which its connections may carry.)"""
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


def environ_proxies(base_url: str) -> dict[str, str]:
    """``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` for one upstream (``scheme://host:port``).

    The decision depends only on the upstream and those variables, and working it out
    (``requests.utils.get_environ_proxies``) is costly, so it is made once per upstream
    and variable values, not per request.
    """
    return dict(_environ_proxies(base_url, tuple(os.environ.get(name) for name in _PROXY_VARIABLES)))


@functools.lru_cache(maxsize=MAX_REMEMBERED_UPSTREAMS)
def _environ_proxies(base_url: str, _variables: tuple[str | None, ...]) -> dict[str, str]:
    return get_environ_proxies(base_url)
