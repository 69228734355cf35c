"""``jwt-proxy healthcheck`` as a container runtime runs it: the installed CLI against a real proxy."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.conftest import JWT_PROXY
from tests.conftest import aws_env
from tests.conftest import free_port

RUN_TIMEOUT_S = 30
READY_TIMEOUT_S = 30


def healthcheck(*flags: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [JWT_PROXY, *flags, "healthcheck"],
        env=aws_env(**env),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def wait_until_healthy(*flags: str, **env: str) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + READY_TIMEOUT_S
    result = healthcheck(*flags, **env)
    while result.returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        result = healthcheck(*flags, **env)
    return result


@pytest.mark.integration
@pytest.mark.parametrize("how", ["flag", "env", "wildcard"])
def test_a_ready_proxy_is_healthy(start_proxy, how):
    proxy = start_proxy("--token-audience", "https://api.example.com")
    if how == "flag":
        result = wait_until_healthy("--metrics-listen-addr", f"127.0.0.1:{proxy.metrics_port}")
    elif how == "env":
        result = wait_until_healthy(METRICS_LISTEN_ADDR=f"127.0.0.1:{proxy.metrics_port}")
    else:  # the image's METRICS_LISTEN_ADDR=0.0.0.0:9090 is asked on loopback
        result = wait_until_healthy(METRICS_LISTEN_ADDR=f"0.0.0.0:{proxy.metrics_port}")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ready: http://127.0.0.1:{proxy.metrics_port}/readyz answered 200\n"
    assert result.stderr == ""


@pytest.mark.integration
def test_a_proxy_that_cannot_mint_its_token_is_unhealthy(start_proxy, sts):
    sts.configure(fail_with="AccessDenied")
    proxy = start_proxy("--token-audience", "https://api.example.com")
    proxy.wait_for_record(lambda record: record.get("level") == "error", timeout_s=READY_TIMEOUT_S)

    result = healthcheck("--metrics-listen-addr", f"127.0.0.1:{proxy.metrics_port}")

    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"jwt-proxy: not ready: http://127.0.0.1:{proxy.metrics_port}/readyz answered 503: ")
    assert "have minted the token" in lines[0]
    assert result.stdout == ""


def test_nothing_listening_is_unhealthy_with_one_line():
    port = free_port()
    result = healthcheck(METRICS_LISTEN_ADDR=f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr == f"jwt-proxy: not ready: nothing listens at http://127.0.0.1:{port}/readyz (connection refused)\n"
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("flags", "env", "line"),
    [
        ([], {"METRICS_LISTEN_ADDR": "nine"}, "jwt-proxy: not ready: invalid value for METRICS_LISTEN_ADDR: 'nine': "),
        (["--metrics-listen-addr", "nine"], {}, "jwt-proxy: not ready: invalid value for --metrics-listen-addr: 'nine': "),
        ([], {"METRICS_ENABLED": "false"}, "jwt-proxy: not ready: the metrics listener is off (METRICS_ENABLED=false)"),
        (["--metrics-enabled=no"], {}, "jwt-proxy: not ready: the metrics listener is off (--metrics-enabled=no)"),
    ],
)
def test_settings_that_name_no_listener_are_unhealthy_not_a_usage_error(flags, env, line):
    result = healthcheck(*flags, **env)
    assert result.returncode == 1  # Docker reserves 2; every failure is 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(line), result.stderr
