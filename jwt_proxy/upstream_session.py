"""The worker's upstream session: requests' transport with everything else switched off.

A default ``requests.Session`` is a browser-like client, and a proxy built on it would
rewrite what passes through it. This session keeps the transport (pooling, TLS,
egress proxies, timeouts) and drops the rest: no headers of its own, no ``.netrc``
credentials, no cookie jar shared between clients, no redirects followed, no retries
(a streamed body cannot be replayed). Its :class:`ProxyAdapter` carries the address
policy and the TLS context that every connection and tunnel of the worker uses.
"""

from __future__ import annotations

import ssl
import typing as t
from http.cookiejar import DefaultCookiePolicy

import requests
from requests.adapters import HTTPAdapter
from requests.exceptions import InvalidProxyURL
from requests.utils import prepend_scheme_if_needed
from requests.utils import select_proxy
from urllib3 import HTTPHeaderDict
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.util import Url
from urllib3.util import parse_url

from .routing import IPAddress
from .routing import canonical_address
from .upstream_connect import MAX_REMEMBERED_UPSTREAMS
from .upstream_connect import AddressPolicy
from .upstream_connect import Resolver
from .upstream_connect import environ_proxies
from .upstream_connect import make_ssl_context
from .upstream_pool import exchange
from .upstream_pool import pool_classes
from .upstream_response import FinalResponse

#: How many upstream host pools one session keeps (LRU). Pinned mode uses one; header
#: mode evicts the least recently used host's idle connections past this.
MAX_UPSTREAM_POOLS = 10
#: Largest read from a client body with a ``Content-Length``, and so largest send
#: upstream (urllib3's ``blocksize``). gunicorn's body reader re-buffers what it has
#: read ahead at every read, so small reads are expensive. One such block per busy
#: thread is held at a time.
REQUEST_BLOCK_BYTES = 1024 * 1024


def make_session(
    *,
    pool_maxsize: int,
    ca_file: str | None = None,
    allowed_addresses: t.Iterable[IPAddress] = (),
    resolver: Resolver | None = None,
) -> requests.Session:
    """A session for :func:`jwt_proxy.forward.send`, one per worker process.

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
    # request instead (ProxyAdapter.proxy_for).
    session.trust_env = False
    session.headers.clear()
    # One jar for every client of the worker would hand one client's cookies to the next.
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    session.verify = True
    policy = AddressPolicy(frozenset(canonical_address(a) for a in allowed_addresses), resolver)
    adapter = ProxyAdapter(pool_maxsize=pool_maxsize, ssl_context=make_ssl_context(ca_file), policy=policy)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class ProxyAdapter(HTTPAdapter):
    """requests' adapter with our pools, our TLS context and the raw request target."""

    def __init__(self, *, pool_maxsize: int, ssl_context: ssl.SSLContext, policy: AddressPolicy | None = None) -> None:
        self.ssl_context = ssl_context
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
        variables at every request is costly."""
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
        pool_kwargs["ssl_context"] = self.ssl_context
        # Verification is never off; the trust store is the context (no ca_certs file
        # reloaded into it at every new connection, as requests' verify=True would).
        pool_kwargs["cert_reqs"] = "CERT_REQUIRED"
        pool_kwargs["blocksize"] = REQUEST_BLOCK_BYTES
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = pool_classes(self.policy)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: t.Any) -> t.Any:
        if proxy.lower().startswith("socks"):
            # SOCKS pools are their own classes (and need PySocks); ours would bypass the
            # proxy. Such requests keep urllib3's target encoding.
            return super().proxy_manager_for(proxy, **proxy_kwargs)
        if proxy not in self.proxy_manager:
            proxy_kwargs["ssl_context"] = self.ssl_context  # for the upstream, inside the tunnel
            proxy_kwargs["cert_reqs"] = "CERT_REQUIRED"
            proxy_kwargs["blocksize"] = REQUEST_BLOCK_BYTES
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = pool_classes(self.policy)
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
        chunked: bool,
    ) -> tuple[FinalResponse, t.Callable[[bool], None]]:
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
        return exchange(pool, method, wire, headers, body, timeout_s, chunked=chunked)
