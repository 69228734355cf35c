"""Security rules that need no running proxy: configuration, framing, the connect-time
address check (with an injected resolver), redacted gunicorn errors, server settings and
the systemd unit. The same rules end to end are in ``test_security_proxy.py`` and
``test_security_hostile.py``.
"""

from __future__ import annotations

import configparser
import ipaddress
import logging
import shutil
import socket
import subprocess

import pytest
from gunicorn.http import errors

from jwt_proxy import forward
from jwt_proxy import server
from jwt_proxy.config import Config
from jwt_proxy.config import ConfigError
from jwt_proxy.upstream_connect import AddressPolicy
from jwt_proxy.upstream_errors import UpstreamError
from jwt_proxy.upstream_errors import UpstreamForbidden
from jwt_proxy.forward import UpstreamRequest
from jwt_proxy.headers import filter_request_headers
from jwt_proxy.headers import request_framing_error
from jwt_proxy.worker import EXCEPTION_ARGS_FILTER
from jwt_proxy.worker import REQUEST_HEAD_TIMEOUT_S
from jwt_proxy.worker import ProxyWorker
from jwt_proxy.worker import redact
from jwt_proxy import upstream_session
from tests.conftest import BIN_DIR
from tests.conftest import REPO
from tests.upstream import RecordingUpstream

SECRET = "s3cr3t-query-value"
TIMEOUT_S = 5.0


@pytest.fixture(autouse=True)
def no_environment_proxies(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def upstream():
    with RecordingUpstream() as server_:
        yield server_


# -- configuration ------------------------------------------------------------------------


def test_allowlist_patterns_are_compiled_once_from_the_config():
    config = Config.from_options(allowed_upstream_hosts=["api.example.com,*.svc.example.com", "169.254.169.254:80"])
    assert config.allowed_upstream_hosts == ("api.example.com", "*.svc.example.com", "169.254.169.254:80")
    assert [p.text for p in config.allowlist.patterns] == list(config.allowed_upstream_hosts)
    assert config.allowlist is config.allowlist
    assert config.allowlist.addresses == {ipaddress.ip_address("169.254.169.254")}


@pytest.mark.parametrize("pattern", ["*", "api.*.com", "https://api.example.com", "a/b", "u@h", "2852039166", "h:0", "[::1"])
def test_a_bad_pattern_names_the_flag_and_the_pattern(pattern):
    with pytest.raises(ConfigError) as info:
        Config.from_options(allowed_upstream_hosts=["good.example.com", pattern])
    assert info.value.flag == "--allowed-upstream-hosts"
    assert repr(pattern) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("upstream_host", "allowed", "accepted"),
    [
        ("api.example.com", [], True),
        ("api.example.com", ["api.example.com"], True),
        ("API.example.com.:443", ["api.example.com:443"], True),
        ("a.svc.example.com", ["*.svc.example.com"], True),
        ("evil.example.com", ["api.example.com"], False),
        ("api.example.com:8443", ["api.example.com:443"], False),
        ("svc.example.com", ["*.svc.example.com"], False),
        ("169.254.169.254", [], False),
        ("2852039166", [], False),
        ("[fd00:ec2::254]", [], False),
        ("[::ffff:169.254.169.254]:80", [], False),
        ("169.254.169.254", ["169.254.169.254"], True),
        ("169.254.170.2:80", ["169.254.170.2:80"], True),
    ],
)
def test_the_pinned_upstream_is_checked_at_start(upstream_host, allowed, accepted):
    options = {"upstream_host": upstream_host, "allowed_upstream_hosts": allowed}
    if accepted:
        assert Config.from_options(**options).upstream is not None
        return
    with pytest.raises(ConfigError) as info:
        Config.from_options(**options)
    assert info.value.flag == "--upstream-host"
    assert "--allowed-upstream-hosts" in str(info.value)


@pytest.mark.parametrize(
    ("options", "warns"),
    [
        ({"upstream_scheme": "https"}, False),
        ({"upstream_scheme": "https", "upstream_host": "api.example.com"}, False),
        ({"upstream_scheme": "http"}, True),  # header mode: any host
        ({"upstream_scheme": "http", "allowed_upstream_hosts": ["127.0.0.1"]}, True),
        ({"upstream_scheme": "http", "upstream_host": "api.example.com"}, True),
        ({"upstream_scheme": "http", "upstream_host": "10.0.0.1:8080"}, True),
        ({"upstream_scheme": "http", "upstream_host": "127.0.0.1:8080"}, False),
        ({"upstream_scheme": "http", "upstream_host": "127.9.9.9"}, False),
        ({"upstream_scheme": "http", "upstream_host": "[::1]:8080"}, False),
        ({"upstream_scheme": "http", "upstream_host": "localhost:8080"}, False),
        ({"upstream_scheme": "http", "upstream_host": "LOCALHOST."}, False),
        ({"upstream_scheme": "http", "upstream_host": "localhost.example.com"}, True),
    ],
)
def test_plain_http_warns_unless_pinned_to_loopback(options, warns):
    warnings = [w for w in Config.from_options(**options).startup_warnings() if "clear text" in w]
    assert bool(warnings) is warns
    for warning in warnings:
        assert "--upstream-scheme=http" in warning


def test_the_warning_is_logged_in_the_proxy_log_format(caplog, monkeypatch):
    configured = []
    monkeypatch.setattr(server.logs, "configure", lambda level, fmt: configured.append((level, fmt)))
    config = Config.from_options(upstream_scheme="http", upstream_host="api.example.com", log_format="text")
    with caplog.at_level(logging.WARNING, logger="jwt_proxy.config"):
        server.log_startup_warnings(config)
    assert configured == [("info", "text")]
    assert [r.getMessage() for r in caplog.records if r.name == "jwt_proxy.config"] == list(config.startup_warnings())


# -- framing and hop-by-hop ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("transfer_encoding", "error"),
    [
        (None, None),
        ("chunked", None),
        ("Chunked", None),
        (" chunked\t", None),
        ("gzip, chunked", "unsupported transfer coding"),
        ("identity, chunked", "unsupported transfer coding"),
        ("chunked, chunked", "unsupported transfer coding"),
        ("gzip,chunked", "unsupported transfer coding"),
        ("deflate", "unsupported transfer coding"),
        ("", "unsupported transfer coding"),
        ("chunked;q=1", "unsupported transfer coding"),
    ],
)
def test_only_plain_chunked_is_forwarded(transfer_encoding, error):
    assert request_framing_error(transfer_encoding) == error


@pytest.mark.parametrize(
    ("content_length", "error"),
    [
        ("0", None),
        ("5", None),
        ("9223372036854775807", None),  # 2**63 - 1
        ("009223372036854775807", None),
        ("9223372036854775808", "invalid Content-Length"),  # 2**63
        ("18446744073709551621", "invalid Content-Length"),  # 2**64 + 5
        ("1" * 40, "invalid Content-Length"),
        ("1" * 5000, "invalid Content-Length"),  # more digits than int() takes by default
    ],
)
def test_a_content_length_must_fit_a_signed_64_bit_integer(content_length, error):
    assert request_framing_error(None, content_length) == error


def test_h2c_upgrade_lines_never_reach_the_upstream():
    lines = [
        ("Connection", "Upgrade"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ("X-Kept", "1"),
    ]
    assert filter_request_headers(lines) == [("X-Kept", "1")]


# -- the connect-time address check -------------------------------------------------------


class FakeResolver:
    """getaddrinfo for a few names, no DNS; counts its calls."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        self.calls.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        result = []
        for address in self.answers[host]:
            if ":" in address:
                result.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                result.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return result


def send(session, base_url, target="/x", timeout_s=TIMEOUT_S):
    request = UpstreamRequest(method="GET", base_url=base_url, target=target, headers=[("Host", "upstream.test")])
    response = forward.send(session, request, timeout_s=timeout_s)
    with response:
        body = b"".join(response.iter_body())
    return response, body


def test_a_name_is_resolved_once_and_only_the_checked_address_is_dialled(upstream):
    resolver = FakeResolver({"api.test": ["127.0.0.1"]})
    session = upstream_session.make_session(pool_maxsize=2, resolver=resolver)
    response, _ = send(session, f"http://api.test:{upstream.port}")
    assert response.status == 200
    assert resolver.calls == ["api.test"]
    assert upstream.wait_for_requests(1)[0].target == "/x"


@pytest.mark.parametrize(
    "answer",
    [
        ["169.254.169.254"],
        ["169.254.170.2"],
        ["127.0.0.1", "169.254.169.254"],  # every address is checked, not just the first
        ["::ffff:169.254.169.254"],
        ["fd00:ec2::254"],
        ["fd00:ec2::23"],
        ["fd20:ce::254"],
        ["fe80::1"],
        ["64:ff9b::a9fe:a9fe"],
        ["::a9fe:a9fe"],
        ["::169.254.169.254"],
        ["2002:a9fe:a9fe::1"],
    ],
)
def test_a_name_that_resolves_to_a_metadata_address_is_refused_before_dialling(upstream, answer):
    resolver = FakeResolver({"metadata.test": answer})
    session = upstream_session.make_session(pool_maxsize=2, resolver=resolver)
    with pytest.raises(UpstreamForbidden) as info:
        send(session, f"http://metadata.test:{upstream.port}", f"/latest/meta-data?{SECRET}")
    error = info.value
    assert isinstance(error, UpstreamError)
    assert (error.status, error.error_type) == (403, "forbidden")
    assert "metadata.test" in str(error) and SECRET not in str(error)
    assert upstream.connections_opened == 0  # 127.0.0.1 was in the answer, but nothing was dialled


def test_an_address_the_allowlist_names_is_let_through():
    policy = AddressPolicy(frozenset({ipaddress.ip_address("169.254.169.254")}))
    assert not policy.refuses(ipaddress.ip_address("169.254.169.254"))
    assert not policy.refuses(ipaddress.ip_address("::ffff:169.254.169.254"))
    assert policy.refuses(ipaddress.ip_address("169.254.170.2"))
    assert policy.refuses(ipaddress.ip_address("fd00:ec2::254"))
    assert not policy.refuses(ipaddress.ip_address("127.0.0.1"))


@pytest.mark.parametrize(
    "base_url",
    [
        "http://169.254.169.254",
        "http://2852039166",
        "http://0251.0376.0251.0376",
        "http://0xa9fea9fe",
        "http://169.254.43518",
        "http://[::ffff:169.254.169.254]",
        "http://[fd00:ec2::254]",
        "https://169.254.169.254",
    ],
)
def test_every_spelling_of_the_metadata_address_is_refused_with_the_real_resolver(base_url):
    """getaddrinfo reads these numerically (no DNS); the check sees what it returns."""
    session = upstream_session.make_session(pool_maxsize=1)
    with pytest.raises(UpstreamForbidden):
        send(session, base_url, timeout_s=1.0)


def test_a_restricted_literal_is_refused_before_an_environment_proxy_sees_it(monkeypatch):
    with RecordingUpstream() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        session = upstream_session.make_session(pool_maxsize=1)
        for base_url in ("http://169.254.169.254", "http://2852039166", "http://[fd00:ec2::254]"):
            with pytest.raises(UpstreamForbidden):
                send(session, base_url)
        # A name is the proxy's to resolve: it gets the request (our decision, see upstream_connect.py).
        send(session, "http://metadata.test", "/via-proxy")
        assert [r.target for r in proxy.wait_for_requests(1)] == ["http://metadata.test/via-proxy"]
        assert len(proxy.requests) == 1


def test_the_proxy_hop_itself_is_not_checked(monkeypatch, upstream):
    """HTTP_PROXY is the operator's choice: its connection is made as urllib3 makes it."""
    resolver = FakeResolver({})
    with RecordingUpstream() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        send(upstream_session.make_session(pool_maxsize=1, resolver=resolver), f"http://127.0.0.1:{upstream.port}")
        assert proxy.wait_for_requests(1)
    assert resolver.calls == []


# -- token hygiene in reprs -----------------------------------------------------------------


def test_an_upstream_request_repr_hides_its_headers():
    request = UpstreamRequest(
        method="GET", base_url="https://api.example.com", target="/", headers=[("Authorization", "Bearer eyJ.secret.sig")]
    )
    assert "eyJ" not in repr(request) and "eyJ" not in str(request)


# -- gunicorn errors without request bytes ------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (errors.InvalidRequestLine(f"GET /?token={SECRET} HTTP/1.1 x"), "invalid request line"),
        (errors.InvalidRequestMethod(f"G{SECRET}"), "invalid request method"),
        (errors.InvalidHTTPVersion(f"HTTP/{SECRET}"), "invalid HTTP version"),
        (errors.InvalidHeader(f"Authorization Bearer {SECRET}"), "invalid header"),
        (errors.InvalidHeader(f"AUTHORIZATION: {SECRET}"), "invalid header"),
        (errors.InvalidHeader("CONTENT-LENGTH"), "invalid header: CONTENT-LENGTH"),
        (errors.InvalidHeaderName(f"X {SECRET}"), "invalid header name"),
        (errors.ObsoleteFolding("COOKIE"), "obsolete line folding: COOKIE"),
        (errors.LimitRequestLine(9000, 8190), "request line too long"),
        (errors.LimitRequestHeaders("limit request headers fields size"), "too many or too large header fields"),
        (errors.ExpectationFailed(SECRET), "unsupported expectation"),
        (errors.InvalidChunkSize(SECRET.encode()), "invalid chunked body"),
        (errors.NoMoreData(f"GET / HTTP/1.1\r\nAuthorization: Bearer {SECRET}".encode()), "client closed the connection"),
    ],
)
def test_parse_errors_are_described_without_their_bytes(exc, text):
    redacted = redact(exc)
    assert isinstance(redacted, type(exc))  # gunicorn still picks the same status
    assert str(redacted) == text
    assert SECRET not in str(redacted)
    assert str(exc) != text  # the original is left alone


def test_an_unknown_transfer_coding_is_a_400_like_every_other_framing_error():
    redacted = redact(errors.UnsupportedTransferCoding(SECRET))
    assert isinstance(redacted, errors.InvalidHeader)
    assert not isinstance(redacted, errors.UnsupportedTransferCoding)
    assert str(redacted) == "invalid header: TRANSFER-ENCODING"


def test_other_exceptions_are_left_alone():
    exc = ValueError("not from the request")
    assert redact(exc) is exc


def test_exceptions_passed_as_log_arguments_are_written_as_their_class():
    record = logging.LogRecord(
        "gunicorn.error", logging.DEBUG, __file__, 1, "Ignored premature client disconnection. %s",
        (errors.NoMoreData(f"Authorization: Bearer {SECRET}".encode()),), None,
    )
    assert EXCEPTION_ARGS_FILTER.filter(record)
    assert record.getMessage() == "Ignored premature client disconnection. NoMoreData"


# -- gunicorn settings ----------------------------------------------------------------------


def test_the_listener_settings_are_explicit():
    config = Config.from_options(region="us-east-1", metrics_enabled="false")
    options = server.gunicorn_options(config)
    assert options["worker_class"] == "jwt_proxy.worker.ProxyWorker"
    assert options["limit_request_line"] == 8190
    assert options["limit_request_fields"] == 100
    assert options["limit_request_field_size"] == 8190
    assert options["permit_obsolete_folding"] is False
    assert options["header_map"] == "drop"
    assert options["http_protocols"] == "h1"
    assert options["http2_cleartext"] == "off"
    assert options["forwarded_allow_ips"] == ""
    cfg = server.GunicornApp(config).cfg
    assert cfg.worker_class is ProxyWorker
    assert cfg.forwarded_allow_ips == [] and cfg.http_protocols == ["h1"]
    assert REQUEST_HEAD_TIMEOUT_S == 10.0


def test_the_conf_file_gets_the_same_listener_settings(monkeypatch):
    for name in ("UPSTREAM_HOST", "LISTEN_ADDR", "TOKEN_AUDIENCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("METRICS_ENABLED", "false")
    namespace: dict = {}
    exec(compile((REPO / "conf" / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"), namespace)
    assert namespace["worker_class"] == "jwt_proxy.worker.ProxyWorker"
    assert namespace["http2_cleartext"] == "off" and namespace["forwarded_allow_ips"] == ""


# -- the systemd unit -----------------------------------------------------------------------

UNIT = REPO / "conf" / "jwt-proxy.service"
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "UMask": "0077",
}


def unit_service_section() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment]
    parser.read_string(UNIT.read_text())
    return dict(parser["Service"])


@pytest.mark.parametrize(("key", "value"), sorted(HARDENING.items()))
def test_the_systemd_unit_is_hardened(key, value):
    assert unit_service_section().get(key) == value


def test_the_readme_explains_every_hardening_setting():
    readme = (REPO / "README.md").read_text()
    security = readme.split("## Security", 1)[1].split("\n## ", 1)[0]
    for key in HARDENING:
        assert f"`{key}=" in security, key


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_finds_nothing(tmp_path):
    """``verify`` loads the unit as systemd would; it exits 0 even for unknown keys or bad
    values, so any output is a failure. ExecStart must exist to be verified: point it at
    this venv's gunicorn."""
    text = UNIT.read_text().replace("/opt/jwt-proxy/bin/gunicorn", str(BIN_DIR / "gunicorn"))
    unit = tmp_path / "jwt-proxy.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr
