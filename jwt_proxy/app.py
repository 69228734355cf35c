"""The WSGI app: one catch-all Flask view that routes, attaches the token and streams.

Each gunicorn worker calls :func:`create_app` after the fork, so the STS client, the token
store and the ``requests.Session`` belong to one worker and are never shared across
processes. Errors are exceptions raised by the modules below (routing, tokens,
forwarding) and are turned into statuses with fixed one-line bodies in one place,
:func:`_register_error_handlers`; the detail goes to the error log record, never to the
client.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import typing as t

from flask import Flask
from flask import Response
from flask import request
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import NotFound
from werkzeug.routing import BaseConverter
from werkzeug.wsgi import ClosingIterator

from . import forward
from . import inbound
from . import sts
from . import tunnel
from .headers import append_forwarded_for
from .headers import filter_request_headers
from .headers import request_framing_error
from .inbound import limit_chunk_sizes
from .inbound import oversized_chunk_ahead
from .logs import exception_fields
from .routing import BODY_FORBIDDEN
from .routing import BODY_INVALID_TARGET
from .routing import DEFAULT_PORTS
from .routing import RoutingError
from .routing import choose_upstream
from .routing import request_target
from .routing import strip_query
from .tokens import TokenStore
from .tokens import TokenUnavailable
from .upstream_errors import RequestBodyError
from .upstream_errors import UpstreamError
from .upstream_errors import UpstreamForbidden
from .upstream_session import make_session

if t.TYPE_CHECKING:
    import requests

    from .config import Config
    from .metrics import WorkerMetrics
    from .routing import Upstream

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
BODY_INVALID_CHUNKED = "invalid chunked body"


class ProxyResponse(Response):
    """A response that adds nothing the upstream did not send (no default Content-Type)."""

    default_mimetype = None
    automatically_set_content_length = False


class UpgradeResponse(ProxyResponse):
    """A ``101``: the server sends the head, then runs the body iterable, the tunnel's
    relay (werkzeug would give any 1xx an empty body)."""

    def get_app_iter(self, environ: dict[str, t.Any]) -> t.Iterable[bytes]:
        return ClosingIterator(self.response, self.close)


class _AnyPathConverter(BaseConverter):
    """Matches every path, empty segments included: werkzeug's ``path`` refuses ``//a``."""

    regex = ".*"
    part_isolating = False


def _plain(status: int, body: str) -> ProxyResponse:
    return ProxyResponse(body + "\n", status=status, content_type="text/plain; charset=utf-8")


def make_sts_client(config: Config) -> t.Any:
    """A worker's STS client, for the regional endpoint of ``config.region``."""
    return sts.make_sts_client(config.region, timeout_s=config.upstream_timeout_s)


def make_token_store(config: Config, *, client: t.Any = None, recorder: WorkerMetrics | None = None) -> TokenStore:
    """A worker's token store, fetching from the regional STS endpoint of ``config.region``.

    It keeps at most ``--token-cache-size`` sets, drops a set unused for one
    ``--token-duration`` (never the configured audiences), and refreshes the rest in the
    background. With a ``recorder``, every fetch, lookup and drop is recorded in the
    worker's metrics, whose label values are bounded by the same cache size.
    """
    if client is None:
        client = make_sts_client(config)
    fetch = sts.make_fetch_for(client, config)
    bounds: dict[str, t.Any] = {
        "refresh_skew_s": config.token_refresh_skew_s,
        "max_sets": config.token_cache_size,
        "idle_drop_s": config.token_duration_s,
        "keep": (config.token_audiences,) if config.token_audiences else (),
    }
    if recorder is None:
        return TokenStore(fetch, **bounds)
    recorder.set_label_limit(config.token_cache_size)
    return TokenStore(
        recorder.instrument_fetch(fetch), on_lookup=recorder.token_lookup, on_drop=recorder.token_dropped, **bounds
    )


# Pre-warming retries a failed start-up fetch after these waits, doubling up to the cap.
PREWARM_FIRST_RETRY_S = 1.0
PREWARM_MAX_RETRY_S = 60.0


def prewarm_in_background(
    tokens: TokenStore,
    audiences: tuple[str, ...],
    *,
    sleep=time.sleep,
    on_minted: t.Callable[[], None] | None = None,
) -> threading.Thread:
    """Mint the configured audience set's token off the request path, when a worker starts.

    The first request then finds a token instead of waiting for STS. A failure is
    logged with its hint and retried with backoff until a token is minted; the worker
    keeps serving meanwhile (its requests fetch on their own, within the failure memory).
    ``on_minted`` is called once the token is there (the worker is then ready).
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
            if on_minted is not None:
                on_minted()
            return

    thread = threading.Thread(target=run, name="jwt-proxy-prewarm", daemon=True)
    thread.start()
    return thread


def await_credentials_in_background(
    check: t.Callable[[], bool], on_ready: t.Callable[[], None], *, sleep=time.sleep
) -> threading.Thread:
    """Without configured audiences: call ``on_ready`` once ``check`` (credentials) passes.

    Checked at worker start and then with the same backoff as :func:`prewarm_in_background`,
    logging each failure once with the hint that fixes it.
    """

    def run() -> None:
        wait_s = PREWARM_FIRST_RETRY_S
        while not check():
            log.error(
                "no usable AWS credentials at worker start; retrying",
                extra={"error_class": "NoCredentials", "retry_in_s": wait_s, "pid": os.getpid()},
            )
            sleep(wait_s)
            wait_s = min(wait_s * 2, PREWARM_MAX_RETRY_S)
        on_ready()

    thread = threading.Thread(target=run, name="jwt-proxy-credentials", daemon=True)
    thread.start()
    return thread


class Proxy:
    """The catch-all view, holding what one worker needs for every request."""

    def __init__(
        self, config: Config, tokens: TokenStore, session: requests.Session, recorder: WorkerMetrics | None = None
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.session = session
        self.recorder = recorder
        # Replaced by the token; in header mode the routing header is ours, not the upstream's.
        self.dropped_headers = ("authorization",) + ((config.routing_header,) if config.routing_header else ())
        # --upstream-host was checked at start-up: every request of the worker goes there.
        self.pinned_upstream = (
            choose_upstream(pinned=config.upstream, scheme=config.upstream_scheme, header_name="", header_value=None)
            if config.pinned
            else None
        )

    def __call__(self, **_: str) -> ProxyResponse:
        environ = request.environ
        method = environ["REQUEST_METHOD"]
        if method == "CONNECT":
            raise RoutingError(405, BODY_METHOD_NOT_ALLOWED)
        transfer_encoding = environ.get("HTTP_TRANSFER_ENCODING")
        framing_error = request_framing_error(transfer_encoding, environ.get("CONTENT_LENGTH"))
        if framing_error is None and transfer_encoding is not None and oversized_chunk_ahead(environ):
            framing_error = BODY_INVALID_CHUNKED
        if framing_error is not None:
            close_client_connection(environ)  # where its body ends is not known
            raise RoutingError(400, framing_error)
        target = request_target(environ.get("RAW_URI") or _target_from_path(environ))
        path = environ[PATH_KEY] = strip_query(target)
        config = self.config
        upstream = self.pinned_upstream or choose_upstream(
            pinned=None,
            scheme=config.upstream_scheme,
            header_name=config.host_header,
            header_value=request.headers.get(config.host_header),
            allowlist=config.allowlist,
        )
        target_url = environ[TARGET_KEY] = upstream.base_url + path
        started = time.perf_counter()
        try:
            token = self.tokens.get(config.token_audiences or (upstream.audience,))
        except TokenUnavailable:
            self._observe_upstream(upstream, "", TOKEN_FETCH_ERROR, started)
            raise

        inbound = list(request.headers.items())
        headers = filter_request_headers(inbound, also_drop=self.dropped_headers)
        if "HTTP_AUTHORIZATION" in environ:
            log.debug("replacing the inbound Authorization header", extra={"target": target_url})
        headers.insert(0, ("Host", upstream.host_header))
        headers = append_forwarded_for(headers, environ.get("REMOTE_ADDR", ""))
        headers.append(("Authorization", f"Bearer {token.value}"))

        chunked = transfer_encoding is not None  # exactly "chunked", see request_framing_error
        if chunked:
            limit_chunk_sizes(environ)
        content_length = None if chunked else request.content_length
        has_body = chunked or content_length is not None
        if not has_body and "gunicorn.socket" in environ and tunnel.is_websocket_upgrade(method, inbound):
            return self._tunnel(upstream, target, headers, environ)
        started = time.perf_counter()
        try:
            upstream_response = forward.send(
                self.session,
                forward.UpstreamRequest(
                    method=method,
                    base_url=upstream.base_url,
                    target=target,
                    headers=headers,
                    body=_request_body(environ, chunked) if has_body else None,
                    content_length=content_length,
                ),
                timeout_s=config.upstream_timeout_s,
            )
        except UpstreamForbidden:
            raise  # refused before connecting (a metadata address): no upstream request to observe
        except UpstreamError as exc:
            self._observe_upstream(upstream, exc.error_type, TOKEN_OK, started)
            raise
        self._observe_upstream(upstream, "", TOKEN_OK, started)
        return _passed_back(upstream_response, target_url)

    def _tunnel(
        self, upstream: Upstream, target: str, headers: list[tuple[str, str]], environ: dict[str, t.Any]
    ) -> ProxyResponse:
        """A WebSocket handshake (:mod:`jwt_proxy.tunnel`): after the upstream's ``101``, a
        ``101`` whose body relays the two connections; any other answer passed back."""
        started = time.perf_counter()
        try:
            opened = tunnel.open_tunnel(
                tunnel.transport_of(self.session),
                base_url=upstream.base_url,
                target=target,
                headers=headers,
                timeout_s=self.config.upstream_timeout_s,
            )
        except UpstreamForbidden:
            raise
        except UpstreamError as exc:
            self._observe_upstream(upstream, exc.error_type, TOKEN_OK, started)
            raise
        self._observe_upstream(upstream, "", TOKEN_OK, started)
        target_url = environ[TARGET_KEY]
        if opened.switched:
            relay = opened.relay(
                environ["gunicorn.socket"], client_bytes=lambda: inbound.read_ahead(environ), target=target_url
            )
            response = UpgradeResponse(
                relay,
                status=f"101 {opened.reason or 'Switching Protocols'}",
                headers=[*opened.headers, *tunnel.UPGRADE_HEADERS],
            )
            response.call_on_close(opened.close)
            return response
        return _passed_back(opened, target_url)

    def _observe_upstream(self, upstream: Upstream, error_type: str, token_result: str, started: float) -> None:
        """``http_client_request_duration_seconds``: until the response headers, the
        exchange's failure, or (``token_result="fetch_error"``) the token failure."""
        if self.recorder is None:
            return
        port = upstream.authority.port
        port_label = "" if port is None or port == DEFAULT_PORTS[upstream.scheme] else str(port)
        self.recorder.observe_upstream(
            upstream.authority.host, port_label, error_type, token_result, time.perf_counter() - started
        )


# token_result label values (the Go proxy's); see jwt_proxy.metrics.
TOKEN_OK = "ok"
TOKEN_FETCH_ERROR = "fetch_error"


class _UpstreamAnswer(t.Protocol):
    status: int
    reason: str
    headers: list[tuple[str, str]]

    def iter_body(self) -> t.Iterator[bytes]: ...

    def close(self) -> None: ...


def _passed_back(answer: _UpstreamAnswer, target: str) -> ProxyResponse:
    """The upstream's answer as the client's response: its status, header lines and
    streamed body; the upstream side is closed (or pooled) when the server is done."""
    response = ProxyResponse(
        _stream_body(answer.iter_body(), target),
        status=f"{answer.status} {answer.reason}".rstrip(),
        headers=answer.headers,
    )
    response.call_on_close(answer.close)
    return response


def _stream_body(body: t.Iterator[bytes], target: str) -> t.Iterator[bytes]:
    """The response body for the server: an empty piece first, so that gunicorn sends the
    head as soon as the upstream's is in (an event stream's first event may come much
    later), then ``body`` as it arrives. If the upstream breaks off, an error record
    naming the target, and the error goes on to the server, which drops the client
    connection rather than end a truncated body cleanly."""
    try:
        yield b""
        yield from body
    except UpstreamError as exc:
        log.error(
            "upstream response body failed",
            extra={"target": target, "error_type": exc.error_type, "error": str(exc)},
        )
        raise


def _request_body(environ: dict[str, t.Any], chunked: bool) -> t.IO[bytes]:
    """The client's body for the upstream: a chunked one as the server hands it out, one
    with a length read straight from the socket when the server is gunicorn
    (:class:`jwt_proxy.inbound.DirectBody`)."""
    if not chunked:
        direct = inbound.direct_body(environ)
        if direct is not None:
            return direct  # type: ignore[return-value]
    return environ["wsgi.input"]


def _target_from_path(environ: dict[str, t.Any]) -> str:
    """A request target for servers without ``RAW_URI`` (test clients): re-quoted PATH_INFO."""
    from urllib.parse import quote

    path = quote(environ.get("PATH_INFO", "").encode("latin-1"), safe="/!$&'()*+,:;=@%-._~")
    query = environ.get("QUERY_STRING", "")
    return f"{path}?{query}" if query else path


#: Set in the WSGI environ when the client connection must close after this response.
CLOSE_KEY = "jwt_proxy.close"


def close_client_connection(environ: dict[str, t.Any]) -> None:
    """Close the client connection after this response (it then says ``Connection:
    close``): its request's end is not known, or what the upstream did cannot be told."""
    environ[CLOSE_KEY] = True


def _must_close(environ: dict[str, t.Any]) -> bool:
    """Whether the server cannot serve another request on this connection: the app said
    so, or reading the request body failed (gunicorn's ``Body.failed``: where the next
    request would start is unknown, and gunicorn closes it)."""
    return environ.get(CLOSE_KEY) is True or getattr(environ.get("wsgi.input"), "failed", False) is True


# Where the view leaves the request's path (no query) and upstream URL (no query) in the
# WSGI environ, for the access record and the error records.
PATH_KEY = "jwt_proxy.path"
TARGET_KEY = "jwt_proxy.target"


def _target() -> str:
    return request.environ.get(TARGET_KEY, "")


def observe_exchanges(app: t.Callable, recorder: WorkerMetrics | None = None) -> t.Callable:
    """``app`` with every exchange observed once its body has been sent (or the client left).

    Writes the access record (``jwt_proxy.access``) and, with a ``recorder``, counts the
    request in flight and times it. A WSGI middleware rather than Flask hooks, so that a
    request is observed whatever happens inside the app, from its first to its last
    byte, with one object per request.
    """

    def observed(environ: dict[str, t.Any], start_response: t.Callable) -> t.Iterable[bytes]:
        exchange = _Exchange(environ, start_response, recorder)
        try:
            exchange.body = app(environ, exchange.start_response)
        except BaseException:
            exchange.close()
            raise
        return exchange

    return observed


class _Exchange:
    """One request's WSGI body, observed when the server closes it (PEP 3333)."""

    __slots__ = ("body", "_environ", "_start_response", "_recorder", "_started", "_status", "_open")

    def __init__(self, environ: dict[str, t.Any], start_response: t.Callable, recorder: WorkerMetrics | None) -> None:
        self.body: t.Iterable[bytes] = ()
        self._environ = environ
        self._start_response = start_response
        self._recorder = recorder
        self._status = "500"
        self._open = True
        if recorder is not None:
            recorder.request_started()
        self._started = time.perf_counter()

    def start_response(self, status: str, headers: list, exc_info: t.Any = None) -> t.Callable:
        self._status = status
        if _must_close(self._environ):
            # gunicorn's start_response is its Response's bound method; its force_close()
            # makes the head say "Connection: close". WSGI has no way to say it (the
            # server drops an app's Connection header).
            force_close = getattr(getattr(self._start_response, "__self__", None), "force_close", None)
            if force_close is not None:
                force_close()
        return self._start_response(status, headers, exc_info)

    def __iter__(self) -> t.Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            duration_s = time.perf_counter() - self._started
            environ = self._environ
            method = environ.get("REQUEST_METHOD", "")
            status = self._status[:3]
            if self._recorder is not None:
                self._recorder.request_finished(method, status, duration_s)
            if access_log.isEnabledFor(logging.INFO):
                fields = {
                    "method": method,
                    "path": environ.get(PATH_KEY, ""),
                    "target": environ.get(TARGET_KEY, ""),
                    "status": int(status),
                    "duration_ms": round(duration_s * 1000, 3),
                }
                # makeRecord + handle: what Logger.info does, without looking up the
                # caller's frame, which no record of ours prints.
                access_log.handle(access_log.makeRecord(access_log.name, logging.INFO, "", 0, "request", (), None, extra=fields))


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
                "target": _target(),
                "audience": ",".join(exc.audiences),
                "error_class": exc.error_class,
                "error": exc.detail,
                "hint": exc.hint,
            },
        )
        return _plain(502, BODY_TOKEN_UNAVAILABLE)

    @app.errorhandler(UpstreamError)
    def upstream_error(exc: UpstreamError):
        if exc.closes_client:
            close_client_connection(request.environ)
        log.error(
            "upstream request failed",
            extra={"target": _target(), "error_type": exc.error_type, "error": str(exc)},
        )
        return _plain(exc.status, BODY_UPSTREAM_TIMEOUT if exc.status == 504 else BODY_UPSTREAM_UNAVAILABLE)

    @app.errorhandler(UpstreamForbidden)
    def upstream_forbidden(exc: UpstreamForbidden):
        log.warning(
            "upstream address refused",
            extra={"target": _target(), "error_type": exc.error_type, "error": str(exc)},
        )
        return _plain(403, BODY_FORBIDDEN)

    @app.errorhandler(RequestBodyError)
    def request_body_error(exc: RequestBodyError):
        log.warning("request body not received", extra={"target": _target(), "error": str(exc)})
        close_client_connection(request.environ)
        if isinstance(exc.__cause__, inbound.CHUNK_ERRORS):
            return _plain(400, BODY_INVALID_CHUNKED)
        return _plain(400, BODY_BAD_REQUEST_BODY)

    @app.errorhandler(HTTPException)
    def routing_failure(exc: HTTPException):
        # The catch-all rule matches every path that starts with "/": what it does not
        # match is a target without one (absolute form without a path, "*").
        if isinstance(exc, NotFound):
            return _plain(400, BODY_INVALID_TARGET)
        return _plain(exc.code or 400, (exc.name or "bad request").lower())

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.error("unexpected error", extra={"target": _target(), **exception_fields(exc)})
        return _plain(500, BODY_INTERNAL_ERROR)


def create_app(
    config: Config,
    *,
    tokens: TokenStore | None = None,
    session: requests.Session | None = None,
    recorder: WorkerMetrics | None = None,
) -> Flask:
    """The proxy app for one worker; ``tokens``, ``session`` and ``recorder`` are injectable
    for tests.

    With ``--metrics-enabled`` (and no ``recorder`` given) the worker's metrics are made
    here, after the fork; with metrics off nothing imports prometheus_client and nothing
    is recorded. An injected ``tokens`` store is used as it is (not instrumented).
    """
    if recorder is None and config.metrics_enabled:
        from .metrics import WorkerMetrics

        recorder = WorkerMetrics()
    client = None
    if tokens is None:
        client = make_sts_client(config)
        tokens = make_token_store(config, client=client, recorder=recorder)
    if session is None:
        session = make_session(
            pool_maxsize=config.threads, ca_file=config.upstream_ca_file, allowed_addresses=config.allowlist.addresses
        )
    log.debug("worker ready", extra={"pid": os.getpid()})
    on_ready = recorder.mark_ready if recorder is not None else None
    if config.token_audiences:
        prewarm_in_background(tokens, config.token_audiences, on_minted=on_ready)
    elif on_ready is not None and client is None:
        on_ready()  # an injected store brings its own credentials
    elif on_ready is not None:
        await_credentials_in_background(functools.partial(sts.credentials_resolve, client), on_ready)

    app = Flask("jwt_proxy")
    app.url_map.converters["anypath"] = _AnyPathConverter
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    view = Proxy(config, tokens, session, recorder)
    app.add_url_rule("/<anypath:_path>", "proxy", view, methods=STANDARD_METHODS)
    # werkzeug routes a request with "Upgrade: websocket" only to websocket rules (else
    # 400 WebsocketMismatch); the same view decides (jwt_proxy.tunnel).
    app.add_url_rule("/<anypath:_path>", "proxy_websocket", view, websocket=True)
    for rule in app.url_map.iter_rules():
        rule.methods = None

    _register_error_handlers(app)
    app.wsgi_app = observe_exchanges(app.wsgi_app, recorder)  # type: ignore[method-assign]
    return app
