"""The token endpoint: ``GET /token?audience=AUD`` hands a fresh JWT to a local SDK.

Google Cloud's ``credential_source.url`` (and any tool that can fetch a URL) reads its
OIDC token from here. It listens on a port of its own, never the proxy's, and mints only
the audiences it was told (``--token-endpoint-audience``).

The header guard: a request must carry ``X-JWT-Proxy-Request: true`` and no
``X-Forwarded-For`` (nor ``Forwarded``). An application tricked into fetching a URL of the
attacker's choice (server-side request forgery) sends neither custom header, and a
request relayed by a proxy or load balancer carries a forwarding header; both are
refused with ``403``, as the EC2 and GCE metadata services do.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import socket
import time
import typing as t
import urllib.parse

from werkzeug.serving import WSGIRequestHandler
from werkzeug.serving import make_server

from .logs import exception_fields
from .serving import ServingThread
from .tokens import TokenStore
from .tokens import TokenUnavailable

if t.TYPE_CHECKING:
    from .config import ListenAddress

__all__ = ["GUARD_HEADER", "TOKEN_PATH", "EndpointServer", "TokenEndpoint", "bind_endpoint_socket"]

log = logging.getLogger("jwt_proxy.tokenendpoint")

TOKEN_PATH = "/token"
GUARD_HEADER = "X-JWT-Proxy-Request"
GUARD_VALUE = "true"
# WSGI environ keys of the headers that mark a relayed request.
FORWARDING_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED")
GUARD_ENVIRON_KEY = "HTTP_" + GUARD_HEADER.upper().replace("-", "_")

BODY_NOT_FOUND = "not found"
BODY_FORWARDED = "forwarded requests are refused"
BODY_NO_GUARD = f"missing {GUARD_HEADER}: {GUARD_VALUE}"
BODY_NO_AUDIENCE = "one audience query parameter is required"
BODY_AUDIENCE_REFUSED = "audience not allowed"
BODY_TOKEN_UNAVAILABLE = "token unavailable"
BODY_INTERNAL_ERROR = "internal error"

# A client that sends nothing is dropped after this long.
IO_TIMEOUT_S = 10.0
LISTEN_BACKLOG = 128


class TokenEndpoint:
    """The WSGI app of the token endpoint, over the process's token store.

    :param tokens: the store (its lookups and fetches feed the token metrics).
    :param audiences: the only audiences it mints.
    :param clock: epoch seconds, for ``expires_in``.
    """

    def __init__(
        self, tokens: TokenStore, audiences: t.Iterable[str], *, clock: t.Callable[[], float] = time.time
    ) -> None:
        self._tokens = tokens
        self._audiences = frozenset(audiences)
        self._clock = clock

    def __call__(self, environ: dict[str, t.Any], start_response: t.Callable) -> list[bytes]:
        started = time.perf_counter()
        audience, status, body = self._answer(environ)
        log.info(
            "token request",
            extra={
                "method": environ.get("REQUEST_METHOD", ""),
                "path": environ.get("PATH_INFO", ""),
                "audience": audience,
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            },
        )
        if isinstance(body, dict):
            payload = json.dumps(body).encode()
            content_type = "application/json"
        else:
            payload = (body + "\n").encode()
            content_type = "text/plain; charset=utf-8"
        start_response(
            f"{status} {_REASONS[status]}",
            [("Content-Type", content_type), ("Content-Length", str(len(payload))), ("Cache-Control", "no-store")],
        )
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [payload]

    def _answer(self, environ: dict[str, t.Any]) -> tuple[str, int, str | dict[str, t.Any]]:
        """(the audience to log, status, body): a JSON object for 200, else one line."""
        if environ.get("PATH_INFO") != TOKEN_PATH or environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return "", 404, BODY_NOT_FOUND
        if any(key in environ for key in FORWARDING_HEADERS):
            return "", 403, BODY_FORWARDED
        if environ.get(GUARD_ENVIRON_KEY, "").strip().lower() != GUARD_VALUE:
            return "", 403, BODY_NO_GUARD
        values = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).get("audience", [])
        if len(values) != 1 or not values[0]:
            return "", 400, BODY_NO_AUDIENCE
        audience = values[0]
        if audience not in self._audiences:
            return "", 403, BODY_AUDIENCE_REFUSED  # not logged: any string a client sent
        try:
            token = self._tokens.get((audience,))
        except TokenUnavailable as exc:
            log.error(
                "token endpoint: no token",
                extra={"audience": audience, "error_class": exc.error_class, "error": exc.detail, "hint": exc.hint},
            )
            return audience, 502, BODY_TOKEN_UNAVAILABLE
        except Exception as exc:  # a bug must still answer, and never with its message
            log.error("token endpoint: unexpected error", extra={"audience": audience, **exception_fields(exc)})
            return audience, 500, BODY_INTERNAL_ERROR
        expires_at = dt.datetime.fromtimestamp(token.expires_at, dt.timezone.utc)
        return audience, 200, {
            "token": token.value,
            "expires_at": expires_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "expires_in": max(0, math.floor(token.expires_at - self._clock())),
        }


_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    500: "Internal Server Error",
    502: "Bad Gateway",
}


def bind_endpoint_socket(address: ListenAddress) -> socket.socket:
    """A listening socket for the endpoint, bound now so a taken port stops the start.

    Bound before the process that serves it exists (the gunicorn master binds it, the
    token agent it forks serves it), so the error is one line before anything else binds.

    :raises OSError: the address cannot be listened on.
    """
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class _QuietHandler(WSGIRequestHandler):
    """No werkzeug access lines (the app logs its own record), a bound on silent clients,
    and no server or Python version in the ``Server`` header."""

    timeout = IO_TIMEOUT_S

    def log_request(self, *args: t.Any, **kwargs: t.Any) -> None:
        pass

    def version_string(self) -> str:
        return "jwt-proxy"


class EndpointServer:
    """Serves a WSGI app on an already-bound socket, in a daemon thread, one thread per client."""

    def __init__(self, sock: socket.socket, app: t.Callable) -> None:
        host, port = sock.getsockname()[:2]
        # werkzeug adopts the socket from its file descriptor and does not bind again.
        self._httpd = make_server(host, port, app, threaded=True, request_handler=_QuietHandler, fd=sock.fileno())
        self._socket = sock
        self._serving = ServingThread(self._httpd, "jwt-proxy-token-endpoint")

    def start(self) -> None:
        self._serving.start()

    def stop(self) -> None:
        self._serving.stop()
        self._socket.close()
