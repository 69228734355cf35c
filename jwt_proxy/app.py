"""The WSGI app: one catch-all Flask view that routes, attaches the token and streams.

Each gunicorn worker calls :func:`create_app` after the fork, so the STS client, the token
store and the ``requests.Session`` belong to one worker and are never shared across
processes. Errors are exceptions raised by the modules below (routing, tokens,
forwarding) and are turned into statuses with fixed one-line bodies in one place,
:func:`_register_error_handlers`; the detail goes to the error log record, never to the
client.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import typing as t

from flask import Flask
from flask import Response
from flask import g
from flask import request
from werkzeug.routing import BaseConverter

from . import forward
from .headers import append_forwarded_for
from .headers import filter_request_headers
from .routing import RoutingError
from .routing import choose_upstream
from .routing import request_target
from .routing import strip_query
from .tokens import TokenStore
from .tokens import TokenUnavailable

if t.TYPE_CHECKING:
    import requests

    from .config import Config

log = logging.getLogger("jwt_proxy.app")
access_log = logging.getLogger("jwt_proxy.access")

# Listed so that Flask neither answers OPTIONS itself nor refuses these; the rule's
# method filter is then lifted so that extension methods (PROPFIND, PURGE) pass too.
STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")

BODY_METHOD_NOT_ALLOWED = "method not allowed"
BODY_TOKEN_UNAVAILABLE = "token unavailable"
BODY_UPSTREAM_UNAVAILABLE = "upstream unavailable"
BODY_UPSTREAM_TIMEOUT = "upstream timeout"
BODY_INTERNAL_ERROR = "internal error"
BODY_BAD_REQUEST_BODY = "incomplete request body"


class ProxyResponse(Response):
    """A response that adds nothing the upstream did not send (no default Content-Type)."""

    default_mimetype = None
    automatically_set_content_length = False


class _AnyPathConverter(BaseConverter):
    """Matches every path, empty segments included: werkzeug's ``path`` refuses ``//a``."""

    regex = ".*"
    part_isolating = False


def _plain(status: int, body: str) -> ProxyResponse:
    return ProxyResponse(body + "\n", status=status, content_type="text/plain; charset=utf-8")


def make_token_store(config: Config) -> TokenStore:
    """A worker's token store, fetching from the regional STS endpoint of ``config.region``."""
    from . import sts

    client = sts.make_sts_client(config.region, timeout_s=config.upstream_timeout_s)
    fetch = sts.make_fetch(
        client,
        signing_algorithm=config.token_signing_algorithm,
        duration_s=config.token_duration_s,
        scope=config.token_scope,
        subject_mode=config.token_subject_mode,
        tags=config.token_tags,
    )
    return TokenStore(fetch, refresh_skew_s=config.token_refresh_skew_s)


# Pre-warming retries a failed start-up fetch after these waits, doubling up to the cap.
PREWARM_FIRST_RETRY_S = 1.0
PREWARM_MAX_RETRY_S = 60.0


def prewarm_in_background(tokens: TokenStore, audiences: tuple[str, ...], *, sleep=time.sleep) -> threading.Thread:
    """Mint the configured audience set's token off the request path, when a worker starts.

    The first request then finds a token instead of waiting for STS. A failure is
    logged with its hint and retried with backoff until a token is minted; the worker
    keeps serving meanwhile (its requests fetch on their own, within the failure memory).
    """

    def run() -> None:
        wait_s = PREWARM_FIRST_RETRY_S
        while True:
            try:
                tokens.prewarm(audiences)
            except TokenUnavailable as exc:
                log.error(
                    "could not mint the token at worker start; retrying",
                    extra={
                        "audience": ",".join(exc.audiences),
                        "error_class": exc.error_class,
                        "error": exc.detail,
                        "hint": exc.hint,
                        "retry_in_s": wait_s,
                    },
                )
                sleep(wait_s)
                wait_s = min(wait_s * 2, PREWARM_MAX_RETRY_S)
                continue
            log.info("token minted at worker start", extra={"audience": ",".join(audiences), "pid": os.getpid()})
            return

    thread = threading.Thread(target=run, name="jwt-proxy-prewarm", daemon=True)
    thread.start()
    return thread


class Proxy:
    """The catch-all view, holding what one worker needs for every request."""

    def __init__(self, config: Config, tokens: TokenStore, session: requests.Session) -> None:
        self.config = config
        self.tokens = tokens
        self.session = session
        # Replaced by the token; in header mode the routing header is ours, not the upstream's.
        self.dropped_headers = ("authorization",) + ((config.routing_header,) if config.routing_header else ())

    def __call__(self, **_: str) -> ProxyResponse:
        environ = request.environ
        if request.method == "CONNECT":
            raise RoutingError(405, BODY_METHOD_NOT_ALLOWED)
        target = request_target(environ.get("RAW_URI") or _target_from_path(environ))
        g.path = strip_query(target)
        config = self.config
        header_value = None
        if not config.pinned:
            header_value = request.headers.get(config.host_header)
        upstream = choose_upstream(
            pinned=config.upstream,
            scheme=config.upstream_scheme,
            header_name=config.host_header,
            header_value=header_value,
        )
        g.target = upstream.base_url + g.path
        token = self.tokens.get(config.token_audiences or (upstream.audience,))

        headers = filter_request_headers(request.headers.items(), also_drop=self.dropped_headers)
        if "Authorization" in request.headers:
            log.debug("replacing the inbound Authorization header", extra={"target": g.target})
        headers.insert(0, ("Host", upstream.host_header))
        headers = append_forwarded_for(headers, environ.get("REMOTE_ADDR", ""))
        headers.append(("Authorization", f"Bearer {token.value}"))

        content_length = request.content_length
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        has_body = chunked or content_length is not None
        upstream_response = forward.send(
            self.session,
            forward.UpstreamRequest(
                method=request.method,
                base_url=upstream.base_url,
                target=target,
                headers=headers,
                body=environ["wsgi.input"] if has_body else None,
                content_length=None if chunked else content_length,
            ),
            timeout_s=config.upstream_timeout_s,
        )
        response = ProxyResponse(
            upstream_response.iter_body(),
            status=f"{upstream_response.status} {upstream_response.reason}".rstrip(),
            headers=upstream_response.headers,
        )
        response.call_on_close(upstream_response.close)
        return response


def _target_from_path(environ: dict[str, t.Any]) -> str:
    """A request target for servers without ``RAW_URI`` (test clients): re-quoted PATH_INFO."""
    from urllib.parse import quote

    path = quote(environ.get("PATH_INFO", "").encode("latin-1"), safe="/!$&'()*+,:;=@%-._~")
    query = environ.get("QUERY_STRING", "")
    return f"{path}?{query}" if query else path


def _log_access(method: str, path: str, target: str, status: int, started: float) -> None:
    access_log.info(
        "request",
        extra={
            "method": method,
            "path": path,
            "target": target,
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        },
    )


def _register_error_handlers(app: Flask) -> None:
    """The one place where failures become statuses; bodies are fixed short lines."""

    @app.errorhandler(RoutingError)
    def routing_error(exc: RoutingError):
        return _plain(exc.status, exc.body)

    @app.errorhandler(TokenUnavailable)
    def token_unavailable(exc: TokenUnavailable):
        log.error(
            "token unavailable",
            extra={
                "target": g.get("target", ""),
                "audience": ",".join(exc.audiences),
                "error_class": exc.error_class,
                "error": exc.detail,
                "hint": exc.hint,
            },
        )
        return _plain(502, BODY_TOKEN_UNAVAILABLE)

    @app.errorhandler(forward.UpstreamError)
    def upstream_error(exc: forward.UpstreamError):
        log.error(
            "upstream request failed",
            extra={"target": g.get("target", ""), "error_type": exc.error_type, "error": str(exc)},
        )
        return _plain(exc.status, BODY_UPSTREAM_TIMEOUT if exc.status == 504 else BODY_UPSTREAM_UNAVAILABLE)

    @app.errorhandler(forward.RequestBodyError)
    def request_body_error(exc: forward.RequestBodyError):
        log.warning("request body not received", extra={"target": g.get("target", ""), "error": str(exc)})
        return _plain(400, BODY_BAD_REQUEST_BODY)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unexpected error", extra={"target": g.get("target", "")})
        return _plain(500, BODY_INTERNAL_ERROR)


def create_app(
    config: Config, *, tokens: TokenStore | None = None, session: requests.Session | None = None
) -> Flask:
    """The proxy app for one worker; ``tokens`` and ``session`` are injectable for tests."""
    if tokens is None:
        tokens = make_token_store(config)
    if session is None:
        session = forward.make_session(pool_maxsize=config.threads, ca_file=config.upstream_ca_file)
    log.debug("worker ready", extra={"pid": os.getpid()})
    if config.token_audiences:
        prewarm_in_background(tokens, config.token_audiences)

    app = Flask("jwt_proxy")
    app.url_map.converters["anypath"] = _AnyPathConverter
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.add_url_rule("/<anypath:_path>", "proxy", Proxy(config, tokens, session), methods=STANDARD_METHODS)
    for rule in app.url_map.iter_rules():
        rule.methods = None

    @app.before_request
    def start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def log_when_done(response: Response) -> Response:
        """The access record is written when the body has been sent (or the client left)."""
        method, path, target, started = request.method, g.get("path", ""), g.get("target", ""), g.started
        status = response.status_code
        response.call_on_close(lambda: _log_access(method, path, target, status, started))
        return response

    _register_error_handlers(app)
    return app
