"""What went wrong with an upstream exchange, as the client and the metrics see it.

Every failure reaching the proxy's view is one of these exceptions: its ``status`` is
the answer, its ``error_type`` the metric label, and its message names the upstream
and the underlying error without the URL (requests' and urllib3's messages carry the
query string).
"""

from __future__ import annotations

import requests
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

__all__ = [
    "RequestBodyError",
    "UpstreamError",
    "UpstreamForbidden",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "describe_upstream_error",
]


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
    :meth:`UpstreamResponse.iter_body`, a body idle for :data:`~jwt_proxy.upstream_response.BODY_IDLE_TIMEOUT_S`."""

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


def describe_upstream_error(exc: BaseException, host: str, waiting_for: str) -> UpstreamError:
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
