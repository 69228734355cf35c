"""A local stand-in for AWS STS ``GetWebIdentityToken``, for development and tests.

The real API needs an AWS account with outbound identity federation enabled; this
server lets the proxy, its tests and ``jwt-proxy demo`` run with none. It speaks the
AWS Query protocol as botocore serializes it, applies the STS service model's
constraints, answers in the XML shapes botocore parses, and signs RS256 / ES384 JWTs
with keys made at start and AWS-shaped claims (``iss`` is :attr:`LocalSTS.url`). Point
an SDK at it with ``AWS_ENDPOINT_URL_STS``; any credentials are accepted.

Besides ``POST /`` (``GetWebIdentityToken``, ``GetCallerIdentity``) it serves
``/.well-known/openid-configuration`` and ``/.well-known/jwks.json`` for verifiers, and
loopback-only control endpoints under ``/_local-sts/``: ``stats`` (call counts, last
parameters), ``config`` (read or set the fault knobs as JSON; ``null`` clears one) and
``reset``. The fault knobs (:class:`Faults`) make it answer an AWS error code
(``fail_with``), refuse durations past a session (``max_session_duration_s``, the
``SessionDurationEscalationException`` case), stall (``stall_s``) or issue short
tokens (``max_token_lifetime_s``).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import math
import re
import socket
import socketserver
import sys
import threading
import time
import typing as t
import uuid
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from datetime import timezone
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import ECAlgorithm
from jwt.algorithms import RSAAlgorithm

from ..config import MAX_AUDIENCE_CHARS
from ..config import MAX_AUDIENCES
from ..config import MAX_SCOPE_CHARS
from ..config import MAX_TAG_KEY_CHARS
from ..config import MAX_TAG_VALUE_CHARS
from ..config import MAX_TAGS
from ..config import MAX_TOKEN_DURATION_S
from ..config import MIN_TOKEN_DURATION_S
from ..config import SCOPE_PATTERN
from ..config import SIGNING_ALGORITHMS
from ..config import SUBJECT_MODES
from ..config import is_tag_text

STS_API_VERSION = "2011-06-15"
STS_XML_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
CLAIMS_NAMESPACE = "https://sts.amazonaws.com/"

ACCOUNT_ID = "000000000000"
CALLER_ROLE_NAME = "local-sts-caller"
CALLER_SESSION_NAME = "local-sts-session"
# The principal that "calls" STS: AWS puts the role ARN in ``sub`` and ``principal_id``
# for a role session, while GetCallerIdentity shows the assumed-role session ARN.
CALLER_ROLE_ARN = f"arn:aws:iam::{ACCOUNT_ID}:role/{CALLER_ROLE_NAME}"
CALLER_SESSION_ARN = (
    f"arn:aws:sts::{ACCOUNT_ID}:assumed-role/{CALLER_ROLE_NAME}/{CALLER_SESSION_NAME}"
)
CALLER_USER_ID = f"AROALOCALSTSCALLER000:{CALLER_SESSION_NAME}"
# SubjectMode=OriginIdentity puts the propagated origin subject in ``sub``; a local
# caller has no trusted identity propagation context, so this stands in for it.
ORIGIN_SUBJECT = "local-sts-origin-user"
DEFAULT_SOURCE_REGION = "us-east-1"

# Constraints of the STS service model, shared with the proxy's start-up validation.
MIN_DURATION_S = MIN_TOKEN_DURATION_S
MAX_DURATION_S = MAX_TOKEN_DURATION_S
DEFAULT_DURATION_S = 300  # STS's default when DurationSeconds is absent

RSA_KEY_BITS = 2048
MAX_REQUEST_BODY_BYTES = 1024 * 1024
IDLE_CONNECTION_TIMEOUT_S = 60.0
SERVE_POLL_INTERVAL_S = 0.1
SHUTDOWN_JOIN_TIMEOUT_S = 5.0
# Holds a whole JSON or XML answer, so that it leaves in one send with its head.
RESPONSE_BUFFER_BYTES = 64 * 1024

access_log = logging.getLogger("jwt_proxy.local_sts")

# HTTP status STS uses for each error code, for ``fail_with``; unknown codes get 500.
FAULT_STATUS_BY_CODE: dict[str, int] = {
    "OutboundWebIdentityFederationDisabledException": 403,
    "AccessDenied": 403,
    "SessionDurationEscalationException": 403,
    "ExpiredToken": 403,
    "InvalidClientTokenId": 403,
    "RegionDisabledException": 403,
    "ValidationError": 400,
    "JWTPayloadSizeExceededException": 400,
    "Throttling": 400,
    "InternalFailure": 500,
    "ServiceUnavailable": 503,
}
UNKNOWN_FAULT_STATUS = 500
FAULT_MESSAGES: dict[str, str] = {
    "OutboundWebIdentityFederationDisabledException": (
        "Outbound web identity federation is not enabled for this account."
    ),
    "AccessDenied": (
        f"User: {CALLER_SESSION_ARN} is not authorized to perform: "
        "sts:GetWebIdentityToken because no identity-based policy allows the "
        "sts:GetWebIdentityToken action"
    ),
    "SessionDurationEscalationException": (
        "The requested token duration would extend the session beyond its "
        "original expiration time."
    ),
    "ExpiredToken": "The security token included in the request is expired",
    "InvalidClientTokenId": "The security token included in the request is invalid.",
    "JWTPayloadSizeExceededException": (
        "The requested token payload size exceeds the maximum allowed size."
    ),
    "Throttling": "Rate exceeded",
}
FAULT_NOTE = " (local-sts fault injection)"

CONTROL_PREFIX = "/_local-sts/"
CONFIG_KEYS = ("fail_with", "stall_s", "max_token_lifetime_s", "max_session_duration_s")


class STSError(Exception):
    """An AWS error answer: botocore turns it into ``ClientError`` with this code."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


def validation_error(message: str) -> STSError:
    return STSError("ValidationError", message, 400)


@dataclass(frozen=True)
class Tag:
    key: str
    value: str


@dataclass(frozen=True)
class TokenRequest:
    """A validated ``GetWebIdentityToken`` request."""

    audiences: tuple[str, ...]
    signing_algorithm: str
    duration_s: int = DEFAULT_DURATION_S
    scope: str | None = None
    subject_mode: str | None = None
    tags: tuple[Tag, ...] = ()


@dataclass(frozen=True)
class Faults:
    """The fault knobs; replaced whole on every change so a request sees one snapshot.

    ``fail_with``: every ``GetWebIdentityToken`` fails with this AWS error code, with
    the HTTP status STS uses (:data:`FAULT_STATUS_BY_CODE`, else 500); with
    ``max_session_duration_s`` set, ``SessionDurationEscalationException`` is answered
    only for longer durations, so a shorter retry works. ``stall_s``: wait before
    answering (shutdown cuts it short). ``max_token_lifetime_s``: tokens expire sooner
    than asked, and ``Expiration`` says so.
    """

    fail_with: str | None = None
    stall_s: float = 0.0
    max_token_lifetime_s: int | None = None
    max_session_duration_s: int | None = None

    def __post_init__(self) -> None:
        if self.fail_with is not None and (
            not isinstance(self.fail_with, str)
            or not re.fullmatch(r"[A-Za-z][A-Za-z0-9.]*", self.fail_with)
        ):
            raise ValueError(
                f"fail_with must be an AWS error code like 'AccessDenied', got {self.fail_with!r}"
            )
        if (
            isinstance(self.stall_s, bool)
            or not isinstance(self.stall_s, (int, float))
            or not math.isfinite(self.stall_s)
            or self.stall_s < 0
        ):
            raise ValueError(f"stall_s must be a number >= 0, got {self.stall_s!r}")
        for name in ("max_token_lifetime_s", "max_session_duration_s"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")

    def as_dict(self) -> dict[str, t.Any]:
        return {key: getattr(self, key) for key in CONFIG_KEYS}


@dataclass
class _Stats:
    calls: int = 0
    issued: int = 0
    caller_identity_calls: int = 0
    by_audience: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    last_params: dict[str, t.Any] = field(default_factory=dict)


# -- Query protocol parsing and validation (pure) ------------------------------------


def parse_query_params(body: str) -> dict[str, str]:
    """Form-decode a Query request; the first value wins for a repeated name."""
    pairs = parse_qs(body, keep_blank_values=True)
    return {name: values[0] for name, values in pairs.items()}


def _list_members(params: dict[str, str], name: str, suffix: str = "") -> list[str] | None:
    """Collect ``Name.member.N[suffix]`` values in index order.

    None when the list is absent; [] for botocore's spelling of an empty list
    (``Name=``). Malformed member names are refused rather than ignored, so a
    serializer mismatch shows up as an error instead of silently dropped values.
    """
    prefix = f"{name}.member."
    if name in params and params[name] == "":
        return []
    found: dict[int, str] = {}
    for key, value in params.items():
        if not key.startswith(f"{name}."):
            continue
        index = key[len(prefix) :].split(".", 1)[0] if key.startswith(prefix) else ""
        if not index.isdigit() or int(index) < 1:
            raise validation_error(f"Invalid parameter name: {key}")
        if suffix and key != f"{prefix}{index}{suffix}":
            continue
        if not suffix and key != f"{prefix}{index}":
            raise validation_error(f"Invalid parameter name: {key}")
        found[int(index)] = value
    if not found:
        return None
    if sorted(found) != list(range(1, len(found) + 1)):
        raise validation_error(f"{name} members must be numbered from 1 without gaps")
    return [found[i] for i in range(1, len(found) + 1)]


def parse_get_web_identity_token(params: dict[str, str]) -> TokenRequest:
    """Validate a GetWebIdentityToken request the way STS does, or raise ValidationError.

    Constraint failures are collected and reported together in STS's wording
    (``N validation errors detected: Value ... at 'member' failed to satisfy
    constraint: ...``); the rules that span several parameters come after.
    """
    errors: list[str] = []

    def fail(value: str, member: str, constraint: str) -> None:
        errors.append(
            f"Value {value} at '{member}' failed to satisfy constraint: Member must {constraint}"
        )

    audiences = _list_members(params, "Audience")
    if audiences is None:
        fail("null", "audience", "not be null")
        audiences = []
    elif not 1 <= len(audiences) <= MAX_AUDIENCES:
        fail(
            f"'[{len(audiences)} members]'",
            "audience",
            f"have length between 1 and {MAX_AUDIENCES}",
        )
    for index, audience in enumerate(audiences, start=1):
        if not 1 <= len(audience) <= MAX_AUDIENCE_CHARS:
            fail(
                f"'{audience[:64]}'",
                f"audience.{index}.member",
                f"have length between 1 and {MAX_AUDIENCE_CHARS}",
            )

    algorithm = params.get("SigningAlgorithm")
    if algorithm is None:
        fail("null", "signingAlgorithm", "not be null")
    elif algorithm not in SIGNING_ALGORITHMS:
        fail(
            f"'{algorithm[:64]}'",
            "signingAlgorithm",
            f"satisfy enum value set: [{', '.join(SIGNING_ALGORITHMS)}]",
        )

    duration_s = DEFAULT_DURATION_S
    raw_duration = params.get("DurationSeconds")
    if raw_duration is not None:
        if not re.fullmatch(r"-?[0-9]{1,10}", raw_duration):
            fail(f"'{raw_duration[:64]}'", "durationSeconds", "be an integer")
        else:
            duration_s = int(raw_duration)
            if duration_s < MIN_DURATION_S:
                fail(
                    f"'{duration_s}'",
                    "durationSeconds",
                    f"have value greater than or equal to {MIN_DURATION_S}",
                )
            elif duration_s > MAX_DURATION_S:
                fail(
                    f"'{duration_s}'",
                    "durationSeconds",
                    f"have value less than or equal to {MAX_DURATION_S}",
                )

    scope = params.get("Scope")
    if scope is not None:
        if not 1 <= len(scope) <= MAX_SCOPE_CHARS:
            fail(f"'{scope[:64]}'", "scope", f"have length between 1 and {MAX_SCOPE_CHARS}")
        elif not SCOPE_PATTERN.fullmatch(scope):
            fail(
                f"'{scope[:64]}'",
                "scope",
                f"satisfy regular expression pattern: {SCOPE_PATTERN.pattern}",
            )

    subject_mode = params.get("SubjectMode")
    if subject_mode is not None and subject_mode not in SUBJECT_MODES:
        fail(
            f"'{subject_mode[:64]}'",
            "subjectMode",
            f"satisfy enum value set: [{', '.join(SUBJECT_MODES)}]",
        )

    tags: list[Tag] = []
    keys = _list_members(params, "Tags", ".Key")
    values = _list_members(params, "Tags", ".Value")
    if keys is not None or values is not None:
        keys = keys or []
        values = values or []
        if len(keys) != len(values):
            raise validation_error("Every tag needs both a Key and a Value")
        if len(keys) > MAX_TAGS:
            fail(f"'{len(keys)} tags'", "tags", f"have length less than or equal to {MAX_TAGS}")
        for index, (key, value) in enumerate(zip(keys, values), start=1):
            if not 1 <= len(key) <= MAX_TAG_KEY_CHARS:
                fail(
                    f"'{key[:64]}'",
                    f"tags.{index}.member.key",
                    f"have length between 1 and {MAX_TAG_KEY_CHARS}",
                )
            elif not is_tag_text(key):
                fail(
                    f"'{key[:64]}'",
                    f"tags.{index}.member.key",
                    r"satisfy regular expression pattern: [\p{L}\p{Z}\p{N}_.:/=+\-@]+",
                )
            if len(value) > MAX_TAG_VALUE_CHARS:
                fail(
                    f"'{value[:64]}'",
                    f"tags.{index}.member.value",
                    f"have length less than or equal to {MAX_TAG_VALUE_CHARS}",
                )
            elif not is_tag_text(value):
                fail(
                    f"'{value[:64]}'",
                    f"tags.{index}.member.value",
                    r"satisfy regular expression pattern: [\p{L}\p{Z}\p{N}_.:/=+\-@]*",
                )
            tags.append(Tag(key, value))

    if errors:
        noun = "error" if len(errors) == 1 else "errors"
        raise validation_error(f"{len(errors)} validation {noun} detected: " + "; ".join(errors))

    lowered = [tag.key.lower() for tag in tags]
    if len(set(lowered)) != len(lowered):
        raise validation_error(
            "Duplicate tag keys found. Please note that Tag keys are case insensitive."
        )
    if scope is not None:
        if subject_mode != "OriginIdentity" or len(audiences) != 1:
            raise validation_error(
                "Scope can be specified only when SubjectMode is OriginIdentity "
                "and exactly one Audience is requested."
            )
        values_in_scope = scope.split(" ")
        if len(set(values_in_scope)) != len(values_in_scope):
            raise validation_error("Scope must not repeat a scope value.")

    assert algorithm is not None
    return TokenRequest(
        audiences=tuple(audiences),
        signing_algorithm=algorithm,
        duration_s=duration_s,
        scope=scope,
        subject_mode=subject_mode,
        tags=tuple(tags),
    )


def describe_params(params: dict[str, str]) -> dict[str, t.Any]:
    """The request's parameters as a JSON-friendly dict, for ``/_local-sts/stats``.

    Lenient (never raises): it also describes requests that fail validation.
    """
    described: dict[str, t.Any] = {}
    try:
        audiences = _list_members(params, "Audience")
    except STSError:
        audiences = None
    if audiences is not None:
        described["Audience"] = audiences
    for name in ("SigningAlgorithm", "DurationSeconds", "Scope", "SubjectMode"):
        if name in params:
            value: t.Any = params[name]
            if name == "DurationSeconds" and re.fullmatch(r"-?[0-9]{1,10}", value):
                value = int(value)
            described[name] = value
    try:
        keys = _list_members(params, "Tags", ".Key") or []
        values = _list_members(params, "Tags", ".Value") or []
    except STSError:
        keys, values = [], []
    if keys:
        described["Tags"] = [
            {"Key": key, "Value": value} for key, value in zip(keys, values)
        ]
    return described


def _audience_key(params: dict[str, str]) -> str:
    try:
        return ",".join(_list_members(params, "Audience") or [])
    except STSError:
        return ""


# -- XML answers ---------------------------------------------------------------------


def _format_timestamp(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _result_xml(action: str, fields: dict[str, str], request_id: str) -> bytes:
    inner = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in fields.items())
    return (
        f'<{action}Response xmlns="{STS_XML_NAMESPACE}">'
        f"<{action}Result>{inner}</{action}Result>"
        f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata>"
        f"</{action}Response>\n"
    ).encode()


def _error_xml(error: STSError, request_id: str) -> bytes:
    fault_type = "Sender" if error.status < 500 else "Receiver"
    return (
        f'<ErrorResponse xmlns="{STS_XML_NAMESPACE}">'
        f"<Error><Type>{fault_type}</Type><Code>{escape(error.code)}</Code>"
        f"<Message>{escape(error.message)}</Message></Error>"
        f"<RequestId>{request_id}</RequestId></ErrorResponse>\n"
    ).encode()


def _region_from_authorization(authorization: str) -> str:
    """The region of the SigV4 credential scope: what STS reports as ``source_region``."""
    match = re.search(r"Credential=[^/,\s]*/[0-9]{8}/([a-z0-9-]+)/sts/", authorization)
    return match.group(1) if match else DEFAULT_SOURCE_REGION


# -- keys ----------------------------------------------------------------------------


def _jwk_thumbprint(jwk: dict[str, t.Any]) -> str:
    """RFC 7638 thumbprint: a ``kid`` that names the key itself, not a counter."""
    required = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({name: jwk[name] for name in required}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True)
class _SigningKey:
    algorithm: str
    kid: str
    private_key: t.Any
    public_jwk: dict[str, t.Any]


def _make_signing_keys() -> dict[str, _SigningKey]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    ec_key = ec.generate_private_key(ec.SECP384R1())
    keys: dict[str, _SigningKey] = {}
    for algorithm, private_key, to_jwk in (
        ("RS256", rsa_key, RSAAlgorithm.to_jwk),
        ("ES384", ec_key, ECAlgorithm.to_jwk),
    ):
        jwk = dict(to_jwk(private_key.public_key(), as_dict=True))
        kid = _jwk_thumbprint(jwk)
        jwk.update({"kid": kid, "alg": algorithm, "use": "sig"})
        keys[algorithm] = _SigningKey(algorithm, kid, private_key, jwk)
    return keys


# -- HTTP server plumbing shared with demo.py ----------------------------------------


def format_url(host: str, port: int) -> str:
    """``http://host:port``, bracketing IPv6 literals."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback_client(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class DevHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose shutdown cannot hang and leaves no thread behind.

    The stdlib server either forgets its handler threads (``daemon_threads``) or
    joins them without a bound, and a keep-alive client (botocore pools its
    connections) keeps a handler thread blocked in ``recv`` forever. This one
    remembers each handler thread with its socket, and :meth:`close_connections`
    shuts those sockets down and joins the threads with a bound.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.stopping = threading.Event()
        self._connections_lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        super().__init__((host, port), handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(host), a reverse DNS lookup
        # that can stall start-up for seconds on a host without working DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: t.Any, client_address: t.Any) -> None:
        # Registered here, in the serving thread, so that once serve_forever has
        # returned every handler thread is known to close_connections.
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"{type(self).__name__}-handler",
            daemon=True,
        )
        with self._connections_lock:
            self._connections[thread] = request
        thread.start()

    def process_request_thread(self, request: t.Any, client_address: t.Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(threading.current_thread(), None)

    def handle_error(self, request: t.Any, client_address: t.Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)) or (
            self.stopping.is_set() and isinstance(error, OSError)
        ):
            return  # the client went away, or we closed its socket on shutdown
        super().handle_error(request, client_address)

    def close_connections(self, timeout_s: float = SHUTDOWN_JOIN_TIMEOUT_S) -> None:
        with self._connections_lock:
            connections = list(self._connections.items())
        for _, sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for thread, _ in connections:
            thread.join(max(0.0, deadline - time.monotonic()))


class ServerThread:
    """Runs a DevHTTPServer in a daemon thread; start/stop are idempotent and bounded."""

    def __init__(self, httpd: DevHTTPServer, name: str) -> None:
        self.httpd = httpd
        self._name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.stopped = threading.Event()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self.stopped.is_set():
                return
            self._thread = threading.Thread(
                target=self.httpd.serve_forever,
                kwargs={"poll_interval": SERVE_POLL_INTERVAL_S},
                name=self._name,
                daemon=True,
            )
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            if self.stopped.is_set():
                return
            self.httpd.stopping.set()
            if self._thread is not None:
                # BaseServer.shutdown waits for the loop, which never ran if not started.
                self.httpd.shutdown()
                self._thread.join(SHUTDOWN_JOIN_TIMEOUT_S)
            self.httpd.close_connections()
            self.httpd.server_close()
            self.stopped.set()

    def wait(self) -> None:
        """Block until stop(); wakes periodically so the main thread can run signal handlers."""
        while not self.stopped.wait(SERVE_POLL_INTERVAL_S):
            pass


class DevServer:
    """A development server served by a :class:`ServerThread`: ``url``, start, shutdown,
    and a context manager that does both."""

    url: str
    _server: ServerThread

    def _serve(self, httpd: DevHTTPServer, host: str, name: str) -> None:
        """The URL (with ``host`` as asked for) and the serving thread of ``httpd``,
        already bound to its port."""
        bound_port = httpd.server_address[1]
        self.url = format_url(host, bound_port)
        self._server = ServerThread(httpd, name=f"{name}-{bound_port}")

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._server.start()

    def shutdown(self) -> None:
        """Stop serving, cut stalled answers short, close client connections, join the threads."""
        self._server.stop()

    def __enter__(self) -> t.Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def log_record(logger: logging.Logger, msg: str, **fields: t.Any) -> None:
    """One info record with ``fields``, through whatever logging the process configured.

    The CLI configures the proxy's own formatter (``--log-format``), so the demo's local
    STS and echo upstream write the same one-record-per-line stdout as the proxy.
    """
    logger.info(msg, extra=fields)


# -- the local STS -------------------------------------------------------------------


class _STSHTTPServer(DevHTTPServer):
    local_sts: LocalSTS


class DevRequestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive with an idle bound, one log record per request written by the
    subclass (with what it knows, e.g. the STS action), and ``source`` naming the server
    in the server header. Shared by local-sts and the demo's echo.

    A response leaves in one send: the head and body are buffered together, and Nagle's
    algorithm is off. Written in two sends with Nagle on, the body waits for the client's
    delayed ACK of the head, which costs every kept-alive request about 40 ms on Linux.
    """

    source = "dev-server"
    protocol_version = "HTTP/1.1"
    timeout = IDLE_CONNECTION_TIMEOUT_S
    wbufsize = RESPONSE_BUFFER_BYTES
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return self.source

    def log_request(self, code: t.Any = "-", size: t.Any = "-") -> None:
        """Silenced: the subclass writes the request's one record itself."""

    def log_message(self, format: str, *args: t.Any) -> None:
        logging.getLogger(f"jwt_proxy.{self.source.replace('-', '_')}").warning(
            format % args, extra={"client": self.client_address[0]}
        )

    def log_access(self, logger: logging.Logger, status: int, **fields: t.Any) -> None:
        """The request's one access record: client, method, path (no query), status."""
        log_record(
            logger,
            "request",
            client=self.client_address[0],
            method=self.command,
            path=urlsplit(self.path).path,
            status=status,
            **fields,
        )

    def write_response(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        """Status line, headers and body (none for HEAD), flushed as one write."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()


class _STSHandler(DevRequestHandler):
    """One HTTP request to the local STS; the logic lives in :class:`LocalSTS`."""

    server: _STSHTTPServer
    source = "local-sts"

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _handle(self) -> None:
        self._started = time.monotonic()
        self._action = "-"
        self.server.local_sts._dispatch(self)

    def read_body(self) -> bytes | None:
        """The request body, or None after answering 411/413 (the connection closes)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self.send_plain(411, {"error": "send the body with a Content-Length"})
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REQUEST_BODY_BYTES:
            self.close_connection = True
            self.send_plain(413, {"error": f"body over {MAX_REQUEST_BODY_BYTES} bytes"})
            return None
        return self.rfile.read(length) if length else b""

    def send_bytes(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        # Logged before the answer leaves, so the record is out before the client moves on.
        self.log_access(
            access_log, status, action=self._action, duration_ms=int((time.monotonic() - self._started) * 1000)
        )
        self.write_response(status, body, content_type, headers)

    def send_plain(self, status: int, document: t.Any) -> None:
        body = (json.dumps(document, indent=2) + "\n").encode()
        self.send_bytes(status, body, "application/json")

    def send_sts(self, status: int, body: bytes, request_id: str) -> None:
        self.send_bytes(status, body, "text/xml", {"x-amzn-RequestId": request_id})


class LocalSTS(DevServer):
    """STS ``GetWebIdentityToken`` on loopback, with keys made at start.

    :param host: address to bind (``127.0.0.1``; an IPv6 literal binds IPv6).
    :param port: port to bind; 0 picks a free one, see :attr:`url`.
    :param fail_with: AWS error code to answer every GetWebIdentityToken with.
    :param stall_s: seconds to wait before answering.
    :param max_token_lifetime_s: cap on the lifetime of issued tokens.
    :param max_session_duration_s: DurationSeconds above this fails with
        ``SessionDurationEscalationException``.

    The socket is bound here, so :attr:`url` is final before :meth:`start`.
    Usable as a context manager (start on enter, shutdown on exit).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 4599,
        *,
        fail_with: str | None = None,
        stall_s: float = 0.0,
        max_token_lifetime_s: int | None = None,
        max_session_duration_s: int | None = None,
    ) -> None:
        self._faults = Faults(
            fail_with=fail_with or None,
            stall_s=stall_s,
            max_token_lifetime_s=max_token_lifetime_s,
            max_session_duration_s=max_session_duration_s,
        )
        self._lock = threading.Lock()
        self._stats = _Stats()
        self._keys = _make_signing_keys()
        httpd = _STSHTTPServer(host, port, _STSHandler)
        httpd.local_sts = self
        self._serve(httpd, host, "local-sts")

    # -- lifecycle -------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (from a signal handler or another thread) or Ctrl-C."""
        self.start()
        try:
            self._server.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    # -- runtime control -------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._faults

    def configure(self, **changes: t.Any) -> Faults:
        """Change some fault knobs (None clears one); all or nothing, ValueError if bad."""
        unknown = sorted(set(changes) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {list(CONFIG_KEYS)}")
        if changes.get("stall_s", 0.0) is None:
            changes["stall_s"] = 0.0
        if changes.get("fail_with") == "":
            changes["fail_with"] = None
        with self._lock:
            self._faults = Faults(**{**self._faults.as_dict(), **changes})
            return self._faults

    def stats(self) -> dict[str, t.Any]:
        """What ``/_local-sts/stats`` answers: ``calls`` counts every authenticated
        ``GetWebIdentityToken`` request, failed ones included; ``by_audience`` is keyed by
        the audiences joined with ``,`` in request order."""
        with self._lock:
            return {
                "calls": self._stats.calls,
                "by_audience": dict(self._stats.by_audience),
                "last_params": dict(self._stats.last_params),
                "issued": self._stats.issued,
                "errors": dict(self._stats.errors),
                "caller_identity_calls": self._stats.caller_identity_calls,
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = _Stats()

    @property
    def jwks(self) -> dict[str, t.Any]:
        return {"keys": [key.public_jwk for key in self._keys.values()]}

    @property
    def openid_configuration(self) -> dict[str, t.Any]:
        return {
            "issuer": self.url,
            "jwks_uri": f"{self.url}/.well-known/jwks.json",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": list(SIGNING_ALGORITHMS),
            "scopes_supported": ["openid"],
            "claims_supported": ["aud", "exp", "iat", "iss", "jti", "nbf", "sub"],
        }

    # -- request handling ------------------------------------------------------------

    def _dispatch(self, handler: _STSHandler) -> None:
        path = urlsplit(handler.path).path
        if path.startswith(CONTROL_PREFIX):
            self._control(handler, path)
        elif handler.command in ("GET", "HEAD") and path == "/.well-known/openid-configuration":
            handler.send_plain(200, self.openid_configuration)
        elif handler.command in ("GET", "HEAD") and path == "/.well-known/jwks.json":
            handler.send_plain(200, self.jwks)
        elif handler.command == "POST":
            body = handler.read_body()
            if body is not None:
                params = parse_query_params(body.decode("utf-8", "replace"))
                self._query_api(handler, params)
        else:
            handler.send_plain(404, {"error": "not found; STS answers POST /"})

    def _control(self, handler: _STSHandler, path: str) -> None:
        handler._action = path[len(CONTROL_PREFIX) :] or "-"
        if not is_loopback_client(handler.client_address[0]):
            handler.send_plain(403, {"error": "control endpoints answer loopback clients only"})
            return
        if path == "/_local-sts/stats" and handler.command in ("GET", "HEAD"):
            handler.send_plain(200, self.stats())
        elif path == "/_local-sts/config" and handler.command in ("GET", "HEAD"):
            handler.send_plain(200, self.faults.as_dict())
        elif path == "/_local-sts/config" and handler.command == "POST":
            body = handler.read_body()
            if body is None:
                return
            try:
                changes = json.loads(body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("the body must be a JSON object")
                faults = self.configure(**changes)
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                handler.send_plain(400, {"error": str(error)})
                return
            log_record(access_log, "config changed", faults=faults.as_dict())
            handler.send_plain(200, faults.as_dict())
        elif path == "/_local-sts/reset" and handler.command == "POST":
            if handler.read_body() is not None:
                self.reset_stats()
                handler.send_plain(200, self.stats())
        else:
            handler.send_plain(404, {"error": "unknown control endpoint"})

    def _query_api(self, handler: _STSHandler, params: dict[str, str]) -> None:
        request_id = str(uuid.uuid4())
        action = params.get("Action")
        handler._action = action or "-"
        try:
            authorization = handler.headers.get("Authorization", "")
            if not authorization and "X-Amz-Signature" not in params:
                raise STSError(
                    "MissingAuthenticationToken", "Request is missing Authentication Token", 403
                )
            version = params.get("Version", STS_API_VERSION)
            if action is None:
                raise STSError("MissingAction", "Missing Action", 400)
            if action == "GetWebIdentityToken" and version == STS_API_VERSION:
                region = _region_from_authorization(authorization)
                fields = self._get_web_identity_token(params, region)
            elif action == "GetCallerIdentity" and version == STS_API_VERSION:
                with self._lock:
                    self._stats.caller_identity_calls += 1
                fields = {"Arn": CALLER_SESSION_ARN, "UserId": CALLER_USER_ID, "Account": ACCOUNT_ID}
            else:
                raise STSError(
                    "InvalidAction",
                    f"Could not find operation {action} for version {version}",
                    400,
                )
        except STSError as error:
            handler.send_sts(error.status, _error_xml(error, request_id), request_id)
            return
        handler.send_sts(200, _result_xml(action, fields, request_id), request_id)

    def _get_web_identity_token(self, params: dict[str, str], region: str) -> dict[str, str]:
        with self._lock:
            self._stats.calls += 1
            audience_key = _audience_key(params)
            self._stats.by_audience[audience_key] = self._stats.by_audience.get(audience_key, 0) + 1
            self._stats.last_params = describe_params(params)
            faults = self._faults
        try:
            if faults.stall_s and self._server.httpd.stopping.wait(faults.stall_s):
                raise STSError("ServiceUnavailable", "local-sts is shutting down", 503)
            request = parse_get_web_identity_token(params)
            self._inject_faults(request, faults)
            token, expires_at = self._issue(request, faults, region)
        except STSError as error:
            with self._lock:
                self._stats.errors[error.code] = self._stats.errors.get(error.code, 0) + 1
            raise
        with self._lock:
            self._stats.issued += 1
        return {"WebIdentityToken": token, "Expiration": _format_timestamp(expires_at)}

    @staticmethod
    def _inject_faults(request: TokenRequest, faults: Faults) -> None:
        escalation = "SessionDurationEscalationException"
        if faults.max_session_duration_s is not None:
            if request.duration_s > faults.max_session_duration_s:
                raise STSError(escalation, FAULT_MESSAGES[escalation] + FAULT_NOTE, 403)
            if faults.fail_with == escalation:
                return  # conditional: the duration fits the session
        if faults.fail_with is not None:
            code = faults.fail_with
            message = FAULT_MESSAGES.get(code, f"{code} error") + FAULT_NOTE
            raise STSError(code, message, FAULT_STATUS_BY_CODE.get(code, UNKNOWN_FAULT_STATUS))

    def _issue(self, request: TokenRequest, faults: Faults, region: str) -> tuple[str, int]:
        """Sign a JWT shaped like AWS's; returns it with its ``exp``."""
        issued_at = int(time.time())
        lifetime_s = request.duration_s
        if faults.max_token_lifetime_s is not None:
            lifetime_s = min(lifetime_s, faults.max_token_lifetime_s)
        expires_at = issued_at + lifetime_s
        origin = request.subject_mode == "OriginIdentity"
        aws_claims: dict[str, t.Any] = {
            "aws_account": ACCOUNT_ID,
            "source_region": region,
            "principal_id": CALLER_ROLE_ARN,
        }
        if request.tags:
            aws_claims["request_tags"] = {tag.key: tag.value for tag in request.tags}
        claims: dict[str, t.Any] = {
            "iss": self.url,
            "aud": request.audiences[0] if len(request.audiences) == 1 else list(request.audiences),
            "sub": ORIGIN_SUBJECT if origin else CALLER_ROLE_ARN,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": expires_at,
            "jti": str(uuid.uuid4()),
            CLAIMS_NAMESPACE: aws_claims,
        }
        if origin:
            claims["subject_mode"] = "OriginIdentity"
        if request.scope is not None:
            claims["scope"] = request.scope
        key = self._keys[request.signing_algorithm]
        token = jwt.encode(
            claims,
            key.private_key,
            algorithm=key.algorithm,
            headers={"kid": key.kid, "typ": "JWT"},
        )
        return token, expires_at
