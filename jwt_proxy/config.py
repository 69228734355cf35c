"""The proxy's configuration: parsed and validated once, then passed around frozen.

Every option arrives as the raw string (or tuple of strings, for repeatable options) that
the command line or the environment gave; :meth:`Config.from_options` turns them into
typed values and raises :class:`ConfigError` naming the flag, the value and what is
allowed. Nothing downstream re-validates or reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
import tempfile
import typing as t
import unicodedata

from .routing import PATTERN_HELP
from .routing import Allowlist
from .routing import Authority
from .routing import Upstream
from .routing import is_loopback_host
from .routing import literal_address
from .routing import parse_authority

if t.TYPE_CHECKING:
    from collections.abc import Iterable

# STS GetWebIdentityToken limits (botocore's sts service model).
MIN_TOKEN_DURATION_S = 60
MAX_TOKEN_DURATION_S = 3600
MAX_AUDIENCES = 10
MAX_AUDIENCE_CHARS = 1000
MAX_SCOPE_CHARS = 256
MAX_TAGS = 50
MAX_TAG_KEY_CHARS = 128
MAX_TAG_VALUE_CHARS = 256
# Scope values: printable ASCII except space, '"', ',' and '\' (STS's Scope pattern).
SCOPE_PATTERN = re.compile(r"[\x21\x23-\x2B\x2D-\x5B\x5D-\x7E]+( [\x21\x23-\x2B\x2D-\x5B\x5D-\x7E]+)*")
# Tag keys and values: letters, separators, numbers and _.:/=+-@ (STS's \p{L}\p{Z}\p{N} pattern).
TAG_EXTRA_CHARS = frozenset("_.:/=+-@")

SIGNING_ALGORITHMS = ("RS256", "ES384")
SUBJECT_MODES = ("AWSIdentity", "OriginIdentity")
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("json", "text")
UPSTREAM_SCHEMES = ("http", "https")
# Token files: readable by their owner only unless the operator says otherwise.
DEFAULT_TOKEN_FILE_MODE = 0o600
TOKEN_FILE_MODE_PATTERN = re.compile(r"(?:0o?)?([0-7]{1,3})")

_DURATION_UNITS_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_DURATION_HELP = "a duration such as 500ms, 30s, 5m, 1h, 1m30s or whole seconds"


class ConfigError(ValueError):
    """A bad option value; ``str()`` is the one line the CLI prints."""

    def __init__(self, flag: str, value: object, allowed: str) -> None:
        self.flag = flag
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid value for {flag}: {value!r}: {allowed}")


def parse_duration(text: str) -> float:
    """Seconds from a Go-style duration (``1m30s``, ``500ms``) or plain whole seconds.

    :raises ValueError: for anything else, including a negative value.
    """
    text = text.strip()
    if text.isdigit():
        return float(text)
    position = 0
    total_s = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total_s += float(match.group(1)) * _DURATION_UNITS_S[match.group(2)]
        position = match.end()
    if position == 0 or position != len(text):
        raise ValueError(text)
    return total_s


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(text)


def split_list(values: Iterable[str]) -> list[str]:
    """Items of a repeatable option, each of which may itself be comma-separated."""
    items: list[str] = []
    for value in values:
        items.extend(item.strip() for item in value.split(","))
    return items


@dataclasses.dataclass(frozen=True)
class ListenAddress:
    """Where a listener binds; ``host`` is ``0.0.0.0`` for ``:port``."""

    host: str
    port: int

    @property
    def connect_host(self) -> str:
        """Where a client on this machine connects to reach it: loopback for a wildcard."""
        return connect_host(self.host)

    @property
    def bind(self) -> str:
        """The gunicorn ``bind`` spelling, with brackets for IPv6."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def connect_host(host: str) -> str:
    """The address that reaches a listener bound to ``host`` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def parse_listen_addr(flag: str, text: str) -> ListenAddress:
    allowed = "use host:port, [v6]:port or :port (all interfaces), with a port from 1 to 65535"
    if not text or any(c.isspace() for c in text):
        raise ConfigError(flag, text, allowed)
    if text.startswith(":"):
        host, port_text = "0.0.0.0", text[1:]
    elif text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(flag, text, allowed)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(flag, text, allowed) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host or "/" in host:
            raise ConfigError(flag, text, allowed)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(flag, text, allowed)
    return ListenAddress(host, int(port_text))


@dataclasses.dataclass(frozen=True)
class TokenFile:
    """A file kept holding a fresh JWT for one audience (``--token-file PATH=AUDIENCE``)."""

    path: str
    audience: str


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the proxy was told, typed and validated.

    Built only by :meth:`from_options`; ``region`` is resolved by the caller from the AWS
    chain (it is not a flag) and checked here so that every start-up error has one path.
    """

    listen: ListenAddress
    upstream: Authority | None
    upstream_scheme: str
    host_header: str
    allowed_upstream_hosts: tuple[str, ...]
    upstream_timeout_s: float
    upstream_ca_file: str | None
    token_audiences: tuple[str, ...]
    token_signing_algorithm: str
    token_duration_s: int
    token_refresh_skew_s: float
    token_scope: str | None
    token_subject_mode: str | None
    token_tags: tuple[tuple[str, str], ...]
    tls_cert: str | None
    tls_key: str | None
    log_level: str
    log_format: str
    metrics_enabled: bool
    metrics_listen: ListenAddress
    metrics_path: str
    workers: int
    threads: int
    graceful_timeout_s: float
    token_cache_size: int = 256
    shutdown_delay_s: float = 0.0
    region: str | None = None
    token_files: tuple[TokenFile, ...] = ()
    token_file_mode: int = DEFAULT_TOKEN_FILE_MODE
    token_listen: ListenAddress | None = None
    token_endpoint_audiences: tuple[str, ...] = ()

    @property
    def serves_sdk_tokens(self) -> bool:
        """Token files or the token endpoint are configured (the token agent runs)."""
        return bool(self.token_files) or self.token_listen is not None

    @property
    def pinned(self) -> bool:
        return self.upstream is not None

    @functools.cached_property
    def allowlist(self) -> Allowlist:
        """``--allowed-upstream-hosts`` compiled (validated in :meth:`from_options`)."""
        return Allowlist.parse(self.allowed_upstream_hosts)

    def startup_warnings(self) -> tuple[str, ...]:
        """What the operator should hear about this configuration when the proxy starts.

        ``--upstream-scheme=http`` sends every token in clear text: that is only quiet
        when pinned to a loopback address or ``localhost`` (header mode can reach any host).
        Header mode without ``--allowed-upstream-hosts`` lets whoever reaches the port
        mint tokens for, and send requests to, any host it names.
        """
        warnings: list[str] = []
        if not self.pinned and not self.allowed_upstream_hosts:
            warnings.append(
                f"header mode without --allowed-upstream-hosts: any client that reaches {self.listen.bind}"
                f" can mint tokens for, and send requests to, any host it names in {self.host_header};"
                " set --allowed-upstream-hosts to the upstreams clients may use"
            )
        if self.upstream_scheme == "http" and not (self.upstream is not None and is_loopback_host(self.upstream.host)):
            where = f"to {self.upstream}" if self.upstream is not None else "to any upstream a client names"
            warnings.append(
                f"--upstream-scheme=http: tokens travel in clear text {where};"
                " use https unless the upstream is on loopback"
            )
        return tuple(warnings)

    @property
    def routing_header(self) -> str | None:
        """The lower-cased header a client names its upstream in; None when pinned or Host."""
        if self.pinned or self.host_header.lower() == "host":
            return None
        return self.host_header.lower()

    @classmethod
    def from_options(
        cls,
        *,
        listen_addr: str = "127.0.0.1:8080",
        upstream_host: str = "",
        upstream_scheme: str = "https",
        host_header: str = "X-Upstream-Host",
        allowed_upstream_hosts: Iterable[str] = (),
        upstream_timeout: str = "30s",
        upstream_ca_file: str = "",
        token_audience: Iterable[str] = (),
        token_signing_algorithm: str = "RS256",
        token_duration: str = "1h",
        token_refresh_skew: str = "5m",
        token_scope: str = "",
        token_subject_mode: str = "",
        token_tag: Iterable[str] = (),
        tls_cert: str = "",
        tls_key: str = "",
        log_level: str = "info",
        log_format: str = "json",
        metrics_enabled: str = "true",
        metrics_listen_addr: str = "127.0.0.1:9090",
        metrics_path: str = "/metrics",
        workers: str = "2",
        threads: str = "32",
        graceful_timeout: str = "30s",
        token_cache_size: str = "256",
        token_file: Iterable[str] = (),
        token_file_mode: str = "0600",
        token_listen_addr: str = "",
        token_endpoint_audience: Iterable[str] = (),
        shutdown_delay: str = "0s",
        region: str | None = None,
    ) -> Config:
        """Parse raw option strings (flag or environment) into a validated Config.

        :raises ConfigError: on the first bad value, naming its flag.
        """
        listen = parse_listen_addr("--listen-addr", listen_addr)
        metrics_listen = parse_listen_addr("--metrics-listen-addr", metrics_listen_addr)
        if metrics_listen == listen:
            raise ConfigError(
                "--metrics-listen-addr", metrics_listen_addr, "must differ from --listen-addr"
            )

        token_listen = None
        if token_listen_addr:
            token_listen = parse_listen_addr("--token-listen-addr", token_listen_addr)
            for other_flag, other in (("--listen-addr", listen), ("--metrics-listen-addr", metrics_listen)):
                if _same_listener(token_listen, other):
                    raise ConfigError("--token-listen-addr", token_listen_addr, f"must differ from {other_flag}")
        endpoint_audiences = _parse_endpoint_audiences(token_endpoint_audience, token_listen is not None)

        upstream = None
        if upstream_host:
            try:
                upstream = parse_authority(upstream_host)
            except ValueError:
                raise ConfigError(
                    "--upstream-host",
                    upstream_host,
                    "use host[:port] only (no scheme, path, user or spaces);"
                    " set the scheme with --upstream-scheme",
                ) from None

        scheme = _choice("--upstream-scheme", upstream_scheme, UPSTREAM_SCHEMES)
        if not host_header.strip() or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", host_header):
            raise ConfigError("--host-header", host_header, "must be a non-empty header name")

        allowed_hosts = tuple(split_list(allowed_upstream_hosts))
        try:
            allowlist = Allowlist.parse(allowed_hosts)
        except ValueError as exc:
            raise ConfigError(
                "--allowed-upstream-hosts",
                exc.args[0],
                PATTERN_HELP,
            ) from None
        if upstream is not None:
            _check_pinned(upstream_host, upstream, scheme, allowlist)

        timeout_s = _positive_duration("--upstream-timeout", upstream_timeout)

        audiences = split_list(token_audience)
        for audience in audiences:
            if not audience or any(c.isspace() for c in audience):
                raise ConfigError(
                    "--token-audience", ",".join(audiences), "audiences must be non-empty, with no spaces"
                )
            if len(audience) > MAX_AUDIENCE_CHARS:
                raise ConfigError(
                    "--token-audience", audience, f"at most {MAX_AUDIENCE_CHARS} characters each"
                )
        normalized = tuple(sorted(set(audiences)))
        if len(normalized) > MAX_AUDIENCES:
            raise ConfigError(
                "--token-audience", ",".join(normalized), f"at most {MAX_AUDIENCES} audiences"
            )

        algorithm = _choice("--token-signing-algorithm", token_signing_algorithm, SIGNING_ALGORITHMS)

        duration_s = _duration("--token-duration", token_duration)
        if duration_s != int(duration_s) or not MIN_TOKEN_DURATION_S <= duration_s <= MAX_TOKEN_DURATION_S:
            raise ConfigError(
                "--token-duration",
                token_duration,
                f"whole seconds from {MIN_TOKEN_DURATION_S}s to {MAX_TOKEN_DURATION_S}s",
            )
        skew_s = _duration("--token-refresh-skew", token_refresh_skew)
        if not skew_s > 0:
            raise ConfigError("--token-refresh-skew", token_refresh_skew, "must be greater than 0")
        if not skew_s < duration_s:
            raise ConfigError(
                "--token-refresh-skew",
                token_refresh_skew,
                f"must be less than --token-duration ({token_duration!r}), or every token is due for"
                f" refresh as soon as it is minted: lower --token-refresh-skew (for example to"
                f" {_format_seconds(duration_s // 4)}) or raise --token-duration above it",
            )

        subject_mode = None
        if token_subject_mode:
            subject_mode = _choice("--token-subject-mode", token_subject_mode, SUBJECT_MODES)
        scope = _parse_scope(token_scope, subject_mode, normalized) if token_scope else None
        tags = _parse_tags(token_tag)

        if bool(tls_cert) != bool(tls_key):
            flag = "--tls-key" if tls_cert else "--tls-cert"
            raise ConfigError(flag, "", "set both --tls-cert and --tls-key, or neither")
        for flag, path in (("--upstream-ca-file", upstream_ca_file), ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
            if path and not os.access(path, os.R_OK):
                raise ConfigError(flag, path, "a readable PEM file")

        level = _choice("--log-level", log_level.lower(), LOG_LEVELS)
        fmt = _choice("--log-format", log_format.lower(), LOG_FORMATS)
        try:
            enabled = parse_bool(metrics_enabled)
        except ValueError:
            raise ConfigError("--metrics-enabled", metrics_enabled, "one of true, false, 1, 0, yes, no") from None
        if not metrics_path.startswith("/") or any(c.isspace() for c in metrics_path):
            raise ConfigError("--metrics-path", metrics_path, "must start with / and have no spaces")

        return cls(
            listen=listen,
            upstream=upstream,
            upstream_scheme=scheme,
            host_header=host_header,
            allowed_upstream_hosts=allowed_hosts,
            upstream_timeout_s=timeout_s,
            upstream_ca_file=upstream_ca_file or None,
            token_audiences=normalized,
            token_signing_algorithm=algorithm,
            token_duration_s=int(duration_s),
            token_refresh_skew_s=skew_s,
            token_scope=scope,
            token_subject_mode=subject_mode,
            token_tags=tags,
            tls_cert=tls_cert or None,
            tls_key=tls_key or None,
            log_level=level,
            log_format=fmt,
            metrics_enabled=enabled,
            metrics_listen=metrics_listen,
            metrics_path=metrics_path,
            workers=_at_least_one("--workers", workers),
            threads=_at_least_one("--threads", threads),
            graceful_timeout_s=_positive_duration("--graceful-timeout", graceful_timeout),
            token_cache_size=_at_least_one("--token-cache-size", token_cache_size),
            shutdown_delay_s=_duration("--shutdown-delay", shutdown_delay),
            region=region,
            token_files=_parse_token_files(token_file),
            token_file_mode=_parse_file_mode("--token-file-mode", token_file_mode),
            token_listen=token_listen,
            token_endpoint_audiences=endpoint_audiences,
        )


def _same_listener(a: ListenAddress, b: ListenAddress) -> bool:
    """Two listen addresses would collide: equal, or one port on all interfaces."""
    wildcards = ("0.0.0.0", "::")
    return a.port == b.port and (a.host == b.host or a.host in wildcards or b.host in wildcards)


def _audience_problem(audience: str) -> str | None:
    """Why one audience cannot be sent to STS, or None."""
    if not audience or any(c.isspace() for c in audience):
        return "audiences must be non-empty, with no spaces"
    if len(audience) > MAX_AUDIENCE_CHARS:
        return f"at most {MAX_AUDIENCE_CHARS} characters each"
    return None


def _parse_token_files(values: Iterable[str]) -> tuple[TokenFile, ...]:
    """``PATH=AUDIENCE`` items, split at the first ``=``; each directory exists and is writable.

    Checked here so that a mistyped directory stops the start, before anything binds,
    rather than leaving an SDK without its token.
    """
    files: list[TokenFile] = []
    for item in split_list(values):
        path, sep, audience = item.partition("=")
        if not sep or not path:
            raise ConfigError("--token-file", item, "use PATH=AUDIENCE")
        problem = _audience_problem(audience)
        if problem is not None:
            raise ConfigError("--token-file", item, problem)
        absolute = os.path.abspath(path)
        directory = os.path.dirname(absolute)
        if os.path.isdir(absolute):
            raise ConfigError("--token-file", item, f"{absolute} is a directory; name a file in it")
        if not os.path.isdir(directory):
            raise ConfigError("--token-file", item, f"directory {directory} does not exist")
        problem = _cannot_create_in(directory)
        if problem is not None:
            raise ConfigError("--token-file", item, f"directory {directory} is not writable by this user: {problem}")
        if any(existing.path == absolute for existing in files):
            raise ConfigError("--token-file", item, "each path at most once")
        files.append(TokenFile(absolute, audience))
    return tuple(files)


def _cannot_create_in(directory: str) -> str | None:
    """Why a file cannot be created in ``directory``, found by creating (and removing) one.

    A real attempt, not ``os.access``: that says yes to root, and on a read-only mount.
    """
    try:
        fd, probe = tempfile.mkstemp(prefix=".jwt-proxy-probe-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def _parse_file_mode(flag: str, text: str) -> int:
    match = TOKEN_FILE_MODE_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ConfigError(flag, text, "an octal file mode such as 0600, 0640 or 0644")
    return int(match.group(1), 8)


def _parse_endpoint_audiences(values: Iterable[str], listening: bool) -> tuple[str, ...]:
    audiences = split_list(values)
    if not listening:
        if audiences:
            raise ConfigError("--token-endpoint-audience", ",".join(audiences), "only used with --token-listen-addr; set that too")
        return ()
    if not audiences:
        raise ConfigError("--token-endpoint-audience", "", "required with --token-listen-addr: the audiences the endpoint may mint")
    for audience in audiences:
        problem = _audience_problem(audience)
        if problem is not None:
            raise ConfigError("--token-endpoint-audience", ",".join(audiences), problem)
    return tuple(sorted(set(audiences)))


def _check_pinned(text: str, upstream: Authority, scheme: str, allowlist: Allowlist) -> None:
    """The pinned upstream obeys the rules a client-chosen one would."""
    if not allowlist.allows(Upstream(scheme, upstream)):
        raise ConfigError("--upstream-host", text, "not matched by --allowed-upstream-hosts")
    address = literal_address(upstream.host)
    if address is not None and allowlist.refuses_address(address):
        raise ConfigError(
            "--upstream-host",
            text,
            "a link-local or metadata address; name it in --allowed-upstream-hosts to allow it",
        )


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(flag, value, "one of " + ", ".join(allowed))
    return value


def _duration(flag: str, text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise ConfigError(flag, text, _DURATION_HELP) from None


def _positive_duration(flag: str, text: str) -> float:
    seconds = _duration(flag, text)
    if seconds <= 0:
        raise ConfigError(flag, text, "must be greater than 0")
    return seconds


def _format_seconds(seconds: float) -> str:
    """``90`` as ``1m30s``: a duration spelled the way the flags take it."""
    minutes, rest = divmod(int(seconds), 60)
    return (f"{minutes}m" if minutes else "") + (f"{rest}s" if rest or not minutes else "")


def _at_least_one(flag: str, text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ConfigError(flag, text, "a whole number >= 1")
    return int(text)


def _parse_scope(scope: str, subject_mode: str | None, audiences: tuple[str, ...]) -> str:
    """Check ``--token-scope`` by STS's rules, so that a bad one fails at start, not per request.

    With no configured audience every request derives exactly one, which STS accepts.
    """
    if not 1 <= len(scope) <= MAX_SCOPE_CHARS or not SCOPE_PATTERN.fullmatch(scope):
        raise ConfigError(
            "--token-scope",
            scope,
            f"space-separated values of printable ASCII without '\"', ',' or '\\', at most {MAX_SCOPE_CHARS} characters",
        )
    values = scope.split(" ")
    if len(set(values)) != len(values):
        raise ConfigError("--token-scope", scope, "no scope value may repeat")
    if subject_mode != "OriginIdentity":
        raise ConfigError("--token-scope", scope, "needs --token-subject-mode=OriginIdentity")
    if len(audiences) > 1:
        raise ConfigError("--token-scope", scope, "needs exactly one --token-audience")
    return scope


def is_tag_text(text: str) -> bool:
    """Letters, separators, numbers and ``_.:/=+-@``: STS's tag key and value characters."""
    return all(c in TAG_EXTRA_CHARS or unicodedata.category(c)[0] in "LZN" for c in text)


def _parse_tags(values: Iterable[str]) -> tuple[tuple[str, str], ...]:
    tags = []
    for item in split_list(values):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--token-tag", item, "use KEY=VALUE")
        if len(key) > MAX_TAG_KEY_CHARS or not is_tag_text(key):
            raise ConfigError(
                "--token-tag", item, f"keys are 1 to {MAX_TAG_KEY_CHARS} letters, digits, spaces or _.:/=+-@"
            )
        if len(value) > MAX_TAG_VALUE_CHARS or not is_tag_text(value):
            raise ConfigError(
                "--token-tag", item, f"values are at most {MAX_TAG_VALUE_CHARS} letters, digits, spaces or _.:/=+-@"
            )
        tags.append((key, value))
    if len(tags) > MAX_TAGS:
        raise ConfigError("--token-tag", f"{len(tags)} tags", f"at most {MAX_TAGS} tags")
    keys = [key.lower() for key, _ in tags]
    if len(set(keys)) != len(keys):
        raise ConfigError("--token-tag", ",".join(k for k, _ in tags), "each tag key at most once")
    return tuple(tags)
