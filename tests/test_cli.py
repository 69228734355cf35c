"""The command line as an operator meets it: the installed scripts, their errors and exits."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from jwt_proxy import __version__
from jwt_proxy.cli import OPTIONS
from jwt_proxy.cli import config_from_environment
from jwt_proxy.cli import root

from tests.conftest import BIN_DIR
from tests.conftest import JWT_PROXY
from tests.conftest import aws_env
from tests.conftest import free_port

RUN_TIMEOUT_S = 20


def run(args, env=None):
    return subprocess.run(args, env=env or aws_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("script", ["jwt-proxy", "aws-outbound-jwt-proxy"])
@pytest.mark.parametrize("how", [["version"], ["--version"], ["-version"]])
def test_both_scripts_print_the_version(script, how):
    result = run([str(BIN_DIR / script), *how])
    assert result.returncode == 0
    assert result.stdout == f"jwt-proxy {__version__}\n"
    assert result.stderr == ""


def assert_nothing_listens(port):
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize(
    ("flags", "env", "flag", "value"),
    [
        (["--upstream-timeout", "0s"], {}, "--upstream-timeout", "0s"),
        (["--token-duration", "2h"], {}, "--token-duration", "2h"),
        (["--upstream-host", "https://api.example.com"], {}, "--upstream-host", "https://api.example.com"),
        (["--workers=0"], {}, "--workers", "0"),
        (["--shutdown-delay", "later"], {}, "--shutdown-delay", "later"),
        (["-log-format", "xml"], {}, "--log-format", "xml"),
        ([], {"UPSTREAM_TIMEOUT": "soon"}, "UPSTREAM_TIMEOUT", "soon"),
        ([], {"METRICS_ENABLED": "maybe"}, "METRICS_ENABLED", "maybe"),
        ([], {"TOKEN_AUDIENCE": "a,,b"}, "TOKEN_AUDIENCE", "a,,b"),
        ([], {"TOKEN_DURATION": "5s"}, "TOKEN_DURATION", "5s"),
        ([], {"WORKERS": "0"}, "WORKERS", "0"),
        ([], {"LOG_FORMAT": "xml"}, "LOG_FORMAT", "xml"),
        (["--token-duration", "5s"], {"TOKEN_DURATION": "1h"}, "--token-duration", "5s"),
        (["--token-cache-size", "0"], {}, "--token-cache-size", "0"),
        ([], {"TOKEN_CACHE_SIZE": "many"}, "TOKEN_CACHE_SIZE", "many"),
    ],
)
def test_a_bad_value_exits_before_binding_with_one_line(flags, env, flag, value):
    port = free_port()
    result = run([JWT_PROXY, "--listen-addr", f"127.0.0.1:{port}", *flags], aws_env(**env))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert flag in lines[0] and repr(value) in lines[0]
    assert result.stdout == ""
    assert_nothing_listens(port)


@pytest.mark.parametrize("variable", ["TOKEN_DURATION", "UPSTREAM_TIMEOUT", "METRICS_LISTEN_ADDR"])
def test_a_bad_value_from_the_environment_never_names_the_flag(variable):
    port = free_port()
    result = run([JWT_PROXY, "--listen-addr", f"127.0.0.1:{port}"], aws_env(**{variable: "5 s"}))
    assert result.returncode == 2
    assert result.stderr.startswith(f"jwt-proxy: error: invalid value for {variable}: '5 s': "), result.stderr
    assert "--" + variable.lower().replace("_", "-") not in result.stderr
    assert_nothing_listens(port)


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["token", "--audience", "a", "--token-duration", "10m"], "jwt-proxy --token-duration 10m token ..."),
        (["doctor", "--upstream-host=api.example.com"], "jwt-proxy --upstream-host api.example.com doctor ..."),
        (["token", "--audience", "a", "-token-scope", "read write"], "jwt-proxy --token-scope 'read write' token ..."),
    ],
)
def test_a_proxy_option_after_the_subcommand_says_where_it_goes(args, hint):
    result = run([JWT_PROXY, *args])
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jwt-proxy: error: No such option")
    assert "goes before the subcommand" in lines[0] and hint in lines[0]


def test_an_unknown_option_of_a_subcommand_gets_no_such_hint():
    result = run([JWT_PROXY, "token", "--audience", "a", "--no-such-flag"])
    assert result.returncode == 2
    assert "before the subcommand" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        # The user never set the skew: the line still names it, and says to lower it.
        (["--token-duration", "90", "token", "--audience", "a"], {}, ("--token-refresh-skew", "--token-duration")),
        (["--token-duration", "1m", "--token-refresh-skew", "1m"], {}, ("--token-refresh-skew", "--token-duration")),
        (["token", "--audience", "a"], {"TOKEN_DURATION": "90", "TOKEN_REFRESH_SKEW": "2m"}, ("TOKEN_REFRESH_SKEW", "TOKEN_DURATION")),
        (["--token-refresh-skew", "2m"], {"TOKEN_DURATION": "90"}, ("--token-refresh-skew", "TOKEN_DURATION")),
    ],
)
def test_a_duration_not_above_the_skew_names_both_and_what_to_change(args, env, names):
    port = free_port()
    result = run([JWT_PROXY, "--listen-addr", f"127.0.0.1:{port}", *args], aws_env(**env))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    skew, duration = names
    assert f"invalid value for {skew}:" in lines[0]
    assert f"lower {skew}" in lines[0] and f"raise {duration}" in lines[0]
    other_spelling = {"--token-refresh-skew": "TOKEN_REFRESH_SKEW", "TOKEN_REFRESH_SKEW": "--token-refresh-skew",
                      "--token-duration": "TOKEN_DURATION", "TOKEN_DURATION": "--token-duration"}
    assert other_spelling[skew] not in lines[0] and other_spelling[duration] not in lines[0]
    assert result.stdout == ""
    assert_nothing_listens(port)


def test_an_unknown_flag_is_one_line():
    result = run([JWT_PROXY, "--no-such-flag"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jwt-proxy: error:") and "--no-such-flag" in lines[0]


def test_no_region_says_to_set_aws_region():
    env = aws_env()
    del env["AWS_REGION"]
    port = free_port()
    result = run([JWT_PROXY, "--listen-addr", f"127.0.0.1:{port}"], env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "set AWS_REGION" in result.stderr
    assert_nothing_listens(port)


def test_every_option_has_its_environment_variable():
    names = {option.name: option.envvar for option in OPTIONS}
    assert names["upstream-host"] == "UPSTREAM_HOST"
    assert names["token-refresh-skew"] == "TOKEN_REFRESH_SKEW"
    assert names["shutdown-delay"] == "SHUTDOWN_DELAY"
    params = {param.name: param for param in root.params}
    for option in OPTIONS:
        assert params[option.name.replace("-", "_")].envvar == option.envvar


def test_flag_beats_environment_beats_default(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-2")
    monkeypatch.setenv("UPSTREAM_TIMEOUT", "10s")
    monkeypatch.setenv("TOKEN_AUDIENCE", "b,a")
    context = root.make_context("jwt-proxy", ["--upstream-timeout", "5s"])
    assert context.params["upstream_timeout"] == "5s"
    assert context.params["token_audience"] == ("b", "a")
    assert context.params["token_duration"] == "1h"
    config = config_from_environment()
    assert config.upstream_timeout_s == 10
    assert config.token_audiences == ("a", "b")
    assert config.region == "eu-west-2"


def test_repeated_audience_flags(monkeypatch):
    monkeypatch.setenv("TOKEN_AUDIENCE", "ignored")
    context = root.make_context("jwt-proxy", ["--token-audience", "x", "--token-audience", "y,z"])
    assert context.params["token_audience"] == ("x", "y,z")


@pytest.mark.parametrize("variable", ["AWS_REGION", "AWS_DEFAULT_REGION"])
def test_region_from_either_variable(monkeypatch, variable):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv(variable, "ap-southeast-2")
    assert config_from_environment().region == "ap-southeast-2"


def test_shutdown_delay_from_its_environment_variable(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-2")
    monkeypatch.setenv("SHUTDOWN_DELAY", "7s")
    assert config_from_environment().shutdown_delay_s == 7
