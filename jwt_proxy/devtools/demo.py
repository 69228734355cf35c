"""``jwt-proxy demo``: the whole product on loopback, with no AWS account.

Three pieces are wired together: :class:`~jwt_proxy.devtools.localsts.LocalSTS` (in a thread)
plays STS; :class:`EchoUpstream` (in a thread) plays the third-party API, verifying the
bearer JWT against the local STS's JWKS exactly as a real relying party would and
echoing the verified claims and the headers it received; and the real proxy runs as a
child process (``python -m jwt_proxy``, gunicorn and all) between a client and the echo.
A client that sends its old API key sees, in the echo, that the key never arrived and a
verified JWT did.

The child gets dummy AWS credentials, an isolated AWS config, ``AWS_ENDPOINT_URL_STS``
pointing at the local STS and none of the caller's proxy settings, so the demo can never
call a real AWS account or be rerouted by the shell it was started from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing as t

import jwt
from jwt.exceptions import InvalidTokenError
from jwt.exceptions import PyJWKClientError

from ..config import ConfigError
from ..config import connect_host
from ..config import parse_listen_addr
from .localsts import SIGNING_ALGORITHMS
from .localsts import DevHTTPServer
from .localsts import DevServer
from .localsts import DevRequestHandler
from .localsts import LocalSTS
from .localsts import format_url

AUDIENCE = "https://demo.jwt-proxy.local"
DEMO_REGION = "us-east-1"
# Not a real key pair: the demo talks to the local STS only, which accepts anything.
DEMO_ACCESS_KEY_ID = "AKIADEMOJWTPROXYLOCAL"
DEMO_SECRET_ACCESS_KEY = "demo-secret-access-key-for-local-sts-only"
CLIENT_API_KEY = "my-old-api-key"

PROXY_START_TIMEOUT_S = 30.0
PROXY_STOP_TIMEOUT_S = 20.0  # SIGTERM lets gunicorn drain; SIGKILL after this
PROXY_KILL_WAIT_S = 5.0
CONNECT_PROBE_TIMEOUT_S = 0.5
POLL_INTERVAL_S = 0.1
JWKS_FETCH_TIMEOUT_S = 5.0
JWKS_CACHE_LIFESPAN_S = 300.0
MAX_CHUNK_LINE_BYTES = 8 * 1024
DRAIN_READ_BYTES = 64 * 1024

access_log = logging.getLogger("jwt_proxy.echo_upstream")

# The child must see the demo's wiring, not the shell's: these would point boto3 at
# another account, endpoint or HTTP proxy (AWS_USE_FIPS_ENDPOINT even makes a custom
# endpoint an error), or override the flags below through their environment variables
# (the flag upper-cased). The log settings are passed as flags, the demo's own.
CHILD_ENV_DROPPED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CREDENTIAL_EXPIRATION",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_USE_FIPS_ENDPOINT",
    "AWS_USE_DUALSTACK_ENDPOINT",
    "AWS_STS_REGIONAL_ENDPOINTS",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "LISTEN_ADDR",
    "UPSTREAM_HOST",
    "UPSTREAM_SCHEME",
    "HOST_HEADER",
    "ALLOWED_UPSTREAM_HOSTS",
    "UPSTREAM_TIMEOUT",
    "UPSTREAM_CA_FILE",
    "TOKEN_AUDIENCE",
    "TOKEN_SIGNING_ALGORITHM",
    "TOKEN_DURATION",
    "TOKEN_REFRESH_SKEW",
    "TOKEN_SCOPE",
    "TOKEN_SUBJECT_MODE",
    "TOKEN_TAG",
    "TLS_CERT",
    "TLS_KEY",
    "METRICS_ENABLED",
    "METRICS_LISTEN_ADDR",
    "METRICS_PATH",
    "WORKERS",
    "THREADS",
    "GRACEFUL_TIMEOUT",
)


# -- the echo upstream ---------------------------------------------------------------


class Unauthorized(Exception):
    """The request's bearer token is missing or does not verify; ``str()`` says why."""


def redact_authorization(value: str) -> str:
    """Show the shape and size of a credential, never the credential."""
    scheme, _, credential = value.partition(" ")
    if scheme.lower() == "bearer" and credential:
        return f"Bearer <redacted, {len(credential.encode())} bytes>"
    return f"<redacted, {len(value.encode())} bytes>"


class _EchoHTTPServer(DevHTTPServer):
    echo: EchoUpstream


class _EchoHandler(DevRequestHandler):
    """Any method, any path: verify the bearer JWT, then echo what arrived."""

    server: _EchoHTTPServer
    source = "echo-upstream"

    def _handle(self) -> None:
        echo = self.server.echo
        try:
            body_bytes = self._drain_body()
        except ValueError as error:
            self.close_connection = True
            self._send(400, {"error": f"malformed request body: {error}"}, "-")
            return
        try:
            authorizations = self.headers.get_all("Authorization") or []
            if len(authorizations) > 1:
                # Ambiguous, and exactly what a proxy that forgot to drop the
                # client's own credential would send: never pick one.
                raise Unauthorized(f"{len(authorizations)} Authorization headers; expected exactly one")
            claims = echo.verify(authorizations[0] if authorizations else None)
        except Unauthorized as error:
            self._send(401, {"error": str(error)}, "-", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
            return
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            if name.lower() in ("authorization", "proxy-authorization"):
                value = redact_authorization(value)
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        document = {
            "verified_claims": claims,
            "method": self.command,
            "path": self.path,
            "headers_received": headers,
            "body_bytes": body_bytes,
        }
        self._send(200, document, str(claims.get("sub", "-")))

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_TRACE = _handle

    def _drain_body(self) -> int:
        """Read and count the request body (Content-Length or chunked) without keeping it."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            total = 0
            while True:
                size_line = self.rfile.readline(MAX_CHUNK_LINE_BYTES)
                size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
                if size == 0:
                    while self.rfile.readline(MAX_CHUNK_LINE_BYTES) not in (b"\r\n", b"\n", b""):
                        continue  # skip trailer lines
                    return total
                total += self._discard(size)
                self.rfile.readline(MAX_CHUNK_LINE_BYTES)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        return self._discard(length)

    def _discard(self, count: int) -> int:
        remaining = count
        while remaining:
            data = self.rfile.read(min(remaining, DRAIN_READ_BYTES))
            if not data:
                raise ValueError("body shorter than announced")
            remaining -= len(data)
        return count

    def _send(
        self, status: int, document: dict[str, t.Any], subject: str, headers: dict[str, str] | None = None
    ) -> None:
        outcome = {"error": document["error"]} if "error" in document else {"sub": subject}
        self.log_access(access_log, status, **outcome)
        body = (json.dumps(document, indent=2) + "\n").encode()
        self.write_response(status, body, "application/json", headers)


class EchoUpstream(DevServer):
    """A stand-in for the third-party API: it trusts only JWTs its issuer's JWKS verifies.

    :param host: address to bind.
    :param port: port to bind; 0 picks a free one, see :attr:`url`.
    :param jwks_url: where the issuer publishes its keys (``<sts url>/.well-known/jwks.json``).
    :param issuer: the required ``iss``.
    :param audience: the required ``aud`` (one of the token's audiences).

    Every request gets 200 with ``{"verified_claims", "method", "path",
    "headers_received", "body_bytes"}`` (credentials redacted), or 401 with
    ``{"error"}`` when the bearer token is missing or does not verify.
    """

    def __init__(self, host: str, port: int, *, jwks_url: str, issuer: str, audience: str) -> None:
        self.jwks_url = jwks_url
        self.issuer = issuer
        self.audience = audience
        self._jwks = jwt.PyJWKClient(
            jwks_url, cache_keys=True, lifespan=JWKS_CACHE_LIFESPAN_S, timeout=JWKS_FETCH_TIMEOUT_S
        )
        # PyJWKClient's cache is not documented as thread-safe; handlers share it.
        self._jwks_lock = threading.Lock()
        httpd = _EchoHTTPServer(host, port, _EchoHandler)
        httpd.echo = self
        self._serve(httpd, host, "echo-upstream")

    def verify(self, authorization: str | None) -> dict[str, t.Any]:
        """The claims of a ``Bearer`` JWT signed by the issuer's keys, for our audience."""
        if not authorization:
            raise Unauthorized("no Authorization header; expected 'Bearer <jwt>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Authorization is not 'Bearer <jwt>'")
        try:
            with self._jwks_lock:
                signing_key = self._jwks.get_signing_key_from_jwt(token)
            return jwt.decode(
                token,
                signing_key.key,
                algorithms=list(SIGNING_ALGORITHMS),
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["iss", "aud", "sub", "iat", "exp"]},
            )
        except (InvalidTokenError, PyJWKClientError) as error:
            raise Unauthorized(f"bearer token rejected: {error}") from None


# -- run_demo ------------------------------------------------------------------------


def proxy_command(
    *,
    listen_addr: str,
    upstream_hostport: str,
    metrics_listen_addr: str,
    log_level: str = "info",
    log_format: str = "json",
    token_file: str | None = None,
) -> list[str]:
    token_file_flags = ["--token-file", f"{token_file}={AUDIENCE}"] if token_file else []
    return [
        sys.executable,
        "-m",
        "jwt_proxy",
        "--listen-addr",
        listen_addr,
        "--upstream-host",
        upstream_hostport,
        "--upstream-scheme",
        "http",
        "--token-audience",
        AUDIENCE,
        "--metrics-listen-addr",
        metrics_listen_addr,
        "--workers",
        "1",
        "--threads",
        "8",
        "--log-level",
        log_level,
        "--log-format",
        log_format,
        *token_file_flags,
    ]


def proxy_environment(sts_url: str, base: t.Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: the caller's, minus anything that could reach real AWS."""
    env = dict(os.environ if base is None else base)
    for name in CHILD_ENV_DROPPED:
        env.pop(name, None)
    env.update(
        AWS_ENDPOINT_URL_STS=sts_url,
        AWS_REGION=DEMO_REGION,
        AWS_DEFAULT_REGION=DEMO_REGION,
        AWS_ACCESS_KEY_ID=DEMO_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=DEMO_SECRET_ACCESS_KEY,
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONUNBUFFERED="1",
    )
    return env


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_in_use(host: str, port: int) -> OSError | None:
    """Bind and release, as gunicorn will (SO_REUSEADDR), to fail early and clearly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            return error
    return None


def _say(message: str) -> None:
    print(f"jwt-proxy demo: {message}", file=sys.stderr, flush=True)


def _install_stop_handlers(stop: threading.Event) -> t.Callable[[], None]:
    """SIGINT/SIGTERM set ``stop``; returns the function that puts the old handlers back.

    Signal handlers can only be installed from the main thread; elsewhere (a test calling
    run_demo from a thread) Ctrl-C arrives as KeyboardInterrupt instead.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, lambda *_: stop.set())

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    return restore


def _wait_for_listener(
    host: str, port: int, child: subprocess.Popen[bytes], stop: threading.Event, timeout_s: float
) -> bool:
    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and child.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=CONNECT_PROBE_TIMEOUT_S):
                return True
        except OSError:
            stop.wait(POLL_INTERVAL_S)
    return False


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM (gunicorn drains and stops its workers), then SIGKILL after a bound."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(PROXY_STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            _say(f"jwt-proxy (pid {child.pid}) did not stop within {PROXY_STOP_TIMEOUT_S:.0f}s; killing it")
            child.kill()
    try:
        child.wait(PROXY_KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        _say(f"jwt-proxy (pid {child.pid}) is still running after SIGKILL")


def _banner(*, proxy_url: str, sts_url: str, upstream_url: str, metrics_url: str, token_file: str) -> str:
    return f"""
jwt-proxy demo: all running on this machine, no AWS account involved.

  local STS      {sts_url}  (issuer; keys at {sts_url}/.well-known/jwks.json)
  echo upstream  {upstream_url}  (accepts only JWTs from the local STS for {AUDIENCE})
  jwt-proxy      {proxy_url}  -> echo upstream   (metrics: {metrics_url}/metrics)
  token file     {token_file}  (a fresh JWT for {AUDIENCE}, rewritten before it expires)

Try:

  curl -s {proxy_url}/hello -H 'Authorization: Bearer {CLIENT_API_KEY}'

The echo upstream answers with the JWT claims it verified ("verified_claims": iss, aud,
sub, exp), and "headers_received" shows "Authorization": "Bearer <redacted, N bytes>":
the proxy replaced {CLIENT_API_KEY} with a short-lived JWT before it left this machine.
Without the proxy ({upstream_url}/hello) the same request gets 401.

SDKs that read their token themselves (Google Cloud, Azure, AWS web identity) are
pointed at a file like {token_file} (see the README, "Tokens for SDKs").

Press Ctrl-C to stop.
"""


def run_demo(
    *,
    listen_addr: str = "127.0.0.1:8080",
    sts_addr: str = "127.0.0.1:4599",
    upstream_addr: str = "127.0.0.1:8081",
    metrics_listen_addr: str = "127.0.0.1:9090",
    log_level: str = "info",
    log_format: str = "json",
) -> int:
    """Run local STS, echo upstream and proxy until SIGINT/SIGTERM; 0 on a clean stop.

    The three log records to stdout in ``log_format`` (the caller configures logging in
    this process; the proxy child gets the flags); what is said to the person running
    the demo (the banner, start-up failures) goes to stderr.

    Returns 2 for a bad address, 1 if something cannot start or the proxy dies. Whatever
    happens, the proxy child is stopped and both servers are shut down before returning.
    """
    stop = threading.Event()
    restore_signals = _install_stop_handlers(stop)
    sts: LocalSTS | None = None
    upstream: EchoUpstream | None = None
    child: subprocess.Popen[bytes] | None = None
    token_dir: str | None = None
    try:
        try:
            proxy_at = parse_listen_addr("--listen-addr", listen_addr)
            sts_at = parse_listen_addr("--sts-listen-addr", sts_addr)
            upstream_at = parse_listen_addr("--upstream-listen-addr", upstream_addr)
            metrics_at = parse_listen_addr("--metrics-listen-addr", metrics_listen_addr)
        except ConfigError as error:
            _say(str(error))
            return 2
        for flag, address in (("--listen-addr", proxy_at), ("--metrics-listen-addr", metrics_at)):
            error = _port_in_use(address.host, address.port)
            if error is not None:
                _say(f"cannot listen on {_hostport(address.host, address.port)} ({flag}): {error.strerror}")
                return 1
        try:
            sts = LocalSTS(sts_at.host, sts_at.port)
        except OSError as error:
            _say(f"cannot listen on {sts_addr} (--sts-listen-addr): {error.strerror}")
            return 1
        # sts.url is what the local STS writes in ``iss``; sts_url is where to reach it
        # (they differ only when it is bound to a wildcard address).
        sts_url = format_url(connect_host(sts_at.host), sts_at.port)
        try:
            upstream = EchoUpstream(
                upstream_at.host,
                upstream_at.port,
                jwks_url=f"{sts_url}/.well-known/jwks.json",
                issuer=sts.url,
                audience=AUDIENCE,
            )
        except OSError as error:
            _say(f"cannot listen on {upstream_addr} (--upstream-listen-addr): {error.strerror}")
            return 1
        sts.start()
        upstream.start()

        proxy_host = connect_host(proxy_at.host)
        token_dir = tempfile.mkdtemp(prefix="jwt-proxy-demo-")
        token_file = os.path.join(token_dir, "token")
        command = proxy_command(
            listen_addr=listen_addr,
            upstream_hostport=_hostport(connect_host(upstream_at.host), upstream_at.port),
            metrics_listen_addr=metrics_listen_addr,
            log_level=log_level,
            log_format=log_format,
            token_file=token_file,
        )
        child = subprocess.Popen(command, env=proxy_environment(sts_url), stdin=subprocess.DEVNULL)
        if not _wait_for_listener(proxy_host, proxy_at.port, child, stop, PROXY_START_TIMEOUT_S):
            if stop.is_set():
                return 0
            if child.poll() is not None:
                _say(
                    f"jwt-proxy exited with code {child.returncode} before accepting connections"
                    f" on {listen_addr}; its log is above"
                )
            else:
                _say(f"jwt-proxy did not accept connections on {listen_addr} within {PROXY_START_TIMEOUT_S:.0f}s")
            return 1

        print(
            _banner(
                proxy_url=format_url(proxy_host, proxy_at.port),
                sts_url=sts_url,
                upstream_url=format_url(connect_host(upstream_at.host), upstream_at.port),
                metrics_url=format_url(connect_host(metrics_at.host), metrics_at.port),
                token_file=token_file,
            ),
            file=sys.stderr,
            flush=True,
        )
        try:
            while not stop.wait(POLL_INTERVAL_S):
                if child.poll() is not None:
                    _say(f"jwt-proxy exited unexpectedly with code {child.returncode}; stopping the demo")
                    return 1
        except KeyboardInterrupt:  # only when the handlers could not be installed
            pass
        _say("stopping")
        return 0
    finally:
        if child is not None:
            _stop_child(child)
        if token_dir is not None:  # the demo's own directory: nothing else reads it
            shutil.rmtree(token_dir, ignore_errors=True)
        if upstream is not None:
            upstream.shutdown()
        if sts is not None:
            sts.shutdown()
        restore_signals()
