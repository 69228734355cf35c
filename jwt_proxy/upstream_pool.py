"""Driving urllib3's pools: one request on one pooled connection, up to the response head.

urllib3's ``urlopen`` re-encodes the request target and wraps every response in its
own object (header dict, decoder, length bookkeeping). A proxy must send the target as
the client wrote it and needs none of the rest, so :func:`exchange` takes a connection
from the pool, sends the raw target on it and hands back http.client's response,
whose head was read by :class:`~jwt_proxy.upstream_response.FinalResponse`.
"""

from __future__ import annotations

import errno
import functools
import http.client
import socket
import sys
import time
import typing as t

from urllib3 import HTTPHeaderDict
from urllib3.connection import HTTPConnection
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.connectionpool import HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError
from urllib3.exceptions import NameResolutionError
from urllib3.exceptions import NewConnectionError
from urllib3.util.proxy import connection_requires_http_tunnel

from . import upstream_response
from .upstream_connect import AddressPolicy
from .upstream_response import FinalResponse


class RawTargetConnection(HTTPConnection):
    """A connection that dials only checked addresses and reads the response head with
    :class:`~jwt_proxy.upstream_response.FinalResponse`, then sets the body idle timeout.

    The request target is the raw one: :func:`exchange` passes it to ``request``
    directly, past urllib3's ``urlopen``, which would re-encode it. ``http.client``
    still refuses control characters and spaces in it.
    """

    #: When the response head must be complete (``time.monotonic``), set by
    #: :func:`exchange` for each request.
    head_deadline: float | None = None

    def __init__(self, *args: t.Any, address_policy: AddressPolicy, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.address_policy = address_policy

    def response_class(self, sock: t.Any, debuglevel: int = 0, method: str | None = None) -> FinalResponse:
        """What ``getresponse`` reads the head with (any callable may stand here): a
        :class:`~jwt_proxy.upstream_response.FinalResponse` bound to this request's deadline."""
        return FinalResponse(sock, debuglevel, method=method, deadline=self.head_deadline)

    def _new_conn(self) -> socket.socket:
        """Resolve once, check every address, then dial only the checked ones.

        urllib3's own ``create_connection`` would resolve the name again, and a second
        answer need not be the first (DNS rebinding). urllib3 offers no hook for the
        dial, hence the override of its ``_new_conn``. The hop to an ``HTTP(S)_PROXY`` is
        not checked: the operator chose it, and the session checks the target.
        """
        if self.proxy is not None:
            return super()._new_conn()
        try:
            sock = self.address_policy.dial(
                self._dns_host.strip("[]"), self.port, self.timeout, self.socket_options, self.source_address
            )
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except socket.timeout as exc:
            raise ConnectTimeoutError(
                self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
            ) from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock

    def read_head(self) -> FinalResponse:
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
            settimeout(upstream_response.BODY_IDLE_TIMEOUT_S)  # looked up here: tests shorten it
        return response


class RawTargetHTTPSConnection(RawTargetConnection, HTTPSConnection):
    pass


class HTTPPool(HTTPConnectionPool):
    """urllib3's pool of :class:`RawTargetConnection`; ``address_policy`` goes to every
    connection it makes (through urllib3's public ``**conn_kw``)."""

    ConnectionCls = RawTargetConnection

    def __init__(self, *args: t.Any, address_policy: AddressPolicy, **kwargs: t.Any) -> None:
        super().__init__(*args, address_policy=address_policy, **kwargs)


class HTTPSPool(HTTPSConnectionPool):
    """:class:`HTTPPool` for ``https`` upstreams."""

    ConnectionCls = RawTargetHTTPSConnection

    def __init__(self, *args: t.Any, address_policy: AddressPolicy, **kwargs: t.Any) -> None:
        super().__init__(*args, address_policy=address_policy, **kwargs)


def pool_classes(policy: AddressPolicy) -> dict[str, t.Callable[..., HTTPConnectionPool]]:
    """The ``pool_classes_by_scheme`` of a pool manager whose connections obey ``policy``."""
    return {
        "http": functools.partial(HTTPPool, address_policy=policy),
        "https": functools.partial(HTTPSPool, address_policy=policy),
    }


def exchange(
    pool: HTTPConnectionPool, method: str, wire: str, headers: HTTPHeaderDict, body: t.Any, timeout_s: float, *, chunked: bool
) -> tuple[FinalResponse, t.Callable[[bool], None]]:
    """One request on one of ``pool``'s connections, up to the response head.

    What urllib3's ``urlopen`` does for a streamed request without retries or redirects,
    minus its response object (header dict, decoder, length bookkeeping) and its
    re-encoding of the target: the body is read from http.client's response directly.
    The connection comes from and goes back to the pool as with ``urlopen`` (through
    its ``_get_conn``/``_put_conn``, which have no public equivalent outside
    ``urlopen``): one that failed, or whose body was not read to its end, is closed first.
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
                method, wire, body=body, headers=headers, chunked=chunked,
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
