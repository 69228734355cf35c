from __future__ import annotations

import pytest

from jwt_proxy.config import Config
from jwt_proxy.config import ConfigError
from jwt_proxy.config import parse_bool
from jwt_proxy.config import parse_duration
from jwt_proxy.routing import Authority


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("5m", 300), ("1h", 3600), ("1m30s", 90), ("30", 30), ("1.5h", 5400), ("2h45m", 9900)],
)
def test_go_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "-5s", "5 s", "5d", "1m30", "m5", "1.2.3s"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("text", "value"), [("true", True), ("FALSE", False), ("1", True), ("0", False), ("yes", True), ("No", False)])
def test_booleans(text, value):
    assert parse_bool(text) is value


def test_defaults():
    config = Config.from_options()
    assert config.listen.bind == "127.0.0.1:8080"
    assert config.upstream is None
    assert config.upstream_scheme == "https"
    assert config.host_header == "X-Upstream-Host"
    assert config.upstream_timeout_s == 30
    assert config.token_signing_algorithm == "RS256"
    assert config.token_duration_s == 3600
    assert config.token_refresh_skew_s == 300
    assert config.log_level == "info" and config.log_format == "json"
    assert config.metrics_enabled is True and config.metrics_listen.bind == "127.0.0.1:9090"
    assert config.metrics_path == "/metrics"
    assert (config.workers, config.threads, config.graceful_timeout_s) == (2, 32, 30)
    assert config.shutdown_delay_s == 0


def test_audiences_are_split_sorted_and_deduplicated():
    config = Config.from_options(token_audience=["b,a", "b", "c"])
    assert config.token_audiences == ("a", "b", "c")


def test_listen_addresses():
    assert Config.from_options(listen_addr=":9000").listen.bind == "0.0.0.0:9000"
    assert Config.from_options(listen_addr="[::1]:9000").listen.bind == "[::1]:9000"


def test_pinned_upstream_and_routing_header():
    config = Config.from_options(upstream_host="API.example.com:8443")
    assert config.upstream == Authority("API.example.com", 8443)
    assert config.routing_header is None
    assert Config.from_options().routing_header == "x-upstream-host"
    assert Config.from_options(host_header="Host").routing_header is None


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"listen_addr": "8080"}, "--listen-addr"),
        ({"listen_addr": "host:99999"}, "--listen-addr"),
        ({"upstream_host": "https://api.example.com"}, "--upstream-host"),
        ({"upstream_host": "api.example.com/v1"}, "--upstream-host"),
        ({"upstream_host": "user@api.example.com"}, "--upstream-host"),
        ({"upstream_host": "api example.com"}, "--upstream-host"),
        ({"upstream_scheme": "ftp"}, "--upstream-scheme"),
        ({"host_header": ""}, "--host-header"),
        ({"upstream_timeout": "0s"}, "--upstream-timeout"),
        ({"upstream_timeout": "soon"}, "--upstream-timeout"),
        ({"token_audience": ["a,,b"]}, "--token-audience"),
        ({"token_audience": ["a b"]}, "--token-audience"),
        ({"token_audience": [f"a{i}" for i in range(11)]}, "--token-audience"),
        ({"token_audience": ["x" * 1001]}, "--token-audience"),
        ({"token_signing_algorithm": "HS256"}, "--token-signing-algorithm"),
        ({"token_duration": "59s"}, "--token-duration"),
        ({"token_duration": "61m"}, "--token-duration"),
        ({"token_refresh_skew": "0s"}, "--token-refresh-skew"),
        ({"token_duration": "5m", "token_refresh_skew": "5m"}, "--token-refresh-skew"),
        ({"token_subject_mode": "Me"}, "--token-subject-mode"),
        ({"token_tag": ["novalue"]}, "--token-tag"),
        ({"tls_cert": "cert.pem"}, "--tls-key"),
        ({"tls_key": "key.pem"}, "--tls-cert"),
        ({"log_level": "verbose"}, "--log-level"),
        ({"log_format": "xml"}, "--log-format"),
        ({"metrics_enabled": "maybe"}, "--metrics-enabled"),
        ({"metrics_listen_addr": "127.0.0.1:8080"}, "--metrics-listen-addr"),
        ({"metrics_path": "metrics"}, "--metrics-path"),
        ({"workers": "0"}, "--workers"),
        ({"threads": "x"}, "--threads"),
        ({"graceful_timeout": "-1s"}, "--graceful-timeout"),
        ({"shutdown_delay": "-1s"}, "--shutdown-delay"),
        ({"shutdown_delay": "soon"}, "--shutdown-delay"),
    ],
)
def test_bad_values_name_their_flag(options, flag):
    with pytest.raises(ConfigError) as info:
        Config.from_options(**options)
    assert info.value.flag == flag
    assert "\n" not in str(info.value)
    assert flag in str(info.value)


@pytest.mark.parametrize(("text", "seconds"), [("0s", 0), ("0", 0), ("1m30s", 90), ("500ms", 0.5), ("15", 15)])
def test_shutdown_delay_takes_go_durations_and_zero(text, seconds):
    assert Config.from_options(shutdown_delay=text).shutdown_delay_s == seconds


def test_log_level_any_case():
    assert Config.from_options(log_level="WARN").log_level == "warn"


def test_scope_subject_mode_and_tags_pass_sts_rules():
    config = Config.from_options(
        token_scope="read:orders write", token_subject_mode="OriginIdentity", token_audience=["a"], token_tag=["team=payments", "env=prod eu"]
    )
    assert config.token_scope == "read:orders write"
    assert config.token_tags == (("team", "payments"), ("env", "prod eu"))


@pytest.mark.parametrize(
    "options",
    [
        {"token_scope": "read", "token_audience": ["a"]},
        {"token_scope": "read", "token_subject_mode": "AWSIdentity", "token_audience": ["a"]},
        {"token_scope": "read", "token_subject_mode": "OriginIdentity", "token_audience": ["a,b"]},
        {"token_scope": "read read", "token_subject_mode": "OriginIdentity"},
        {"token_scope": "read,write", "token_subject_mode": "OriginIdentity"},
        {"token_scope": "read  write", "token_subject_mode": "OriginIdentity"},
        {"token_scope": "x" * 257, "token_subject_mode": "OriginIdentity"},
    ],
)
def test_bad_scopes(options):
    with pytest.raises(ConfigError) as info:
        Config.from_options(**options)
    assert info.value.flag == "--token-scope"


@pytest.mark.parametrize(
    "tags",
    [
        ["k=v!"],
        ["k;=v"],
        ["k" * 129 + "=v"],
        ["k=" + "v" * 257],
        [f"k{i}=v" for i in range(51)],
        ["team=a", "TEAM=b"],
    ],
)
def test_bad_tags(tags):
    with pytest.raises(ConfigError) as info:
        Config.from_options(token_tag=tags)
    assert info.value.flag == "--token-tag"


def test_fifty_tags_are_fine():
    assert len(Config.from_options(token_tag=[f"k{i}=v" for i in range(50)]).token_tags) == 50


@pytest.mark.parametrize("flag", ["upstream_ca_file", "tls_cert"])
def test_unreadable_pem_files_are_refused_at_start(tmp_path, flag):
    options = {flag: str(tmp_path / "missing.pem")}
    if flag == "tls_cert":
        options["tls_key"] = str(tmp_path / "key.pem")
    with pytest.raises(ConfigError) as info:
        Config.from_options(**options)
    assert info.value.flag == "--" + flag.replace("_", "-")
