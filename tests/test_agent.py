"""``jwt-proxy agent`` against local-sts: files and endpoint, no proxy listener, clean SIGTERM."""

from __future__ import annotations

import os
import signal
import urllib.parse

import pytest
import requests

from tests.conftest import JWT_PROXY
from tests.conftest import STOP_TIMEOUT_S
from tests.conftest import aws_env
from tests.sdk_helpers import AZURE_AUDIENCE
from tests.sdk_helpers import GOOGLE_AUDIENCE
from tests.sdk_helpers import GUARD
from tests.sdk_helpers import HTTP_TIMEOUT_S
from tests.sdk_helpers import Agent
from tests.sdk_helpers import http_status
from tests.sdk_helpers import listening
from tests.sdk_helpers import verified_claims
from tests.sdk_helpers import wait_for_file
from tests.sdk_helpers import wait_for_status

pytestmark = pytest.mark.integration

STALL_S = 3


@pytest.fixture
def agents():
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.process.cleanup()


def test_agent_writes_files_and_serves_the_endpoint_without_a_proxy_listener(sts, tmp_path, agents):
    path = tmp_path / "azure"
    agent = Agent(sts.url, "--token-file", f"{path}={AZURE_AUDIENCE}", endpoint_audiences=[GOOGLE_AUDIENCE])
    agents.append(agent)
    agent.start()
    token = wait_for_file(str(path), process=agent.process)
    assert verified_claims(token, sts.url, AZURE_AUDIENCE)["aud"] == AZURE_AUDIENCE
    response = requests.get(
        f"{agent.endpoint_url}/token?" + urllib.parse.urlencode({"audience": GOOGLE_AUDIENCE}), headers=GUARD, timeout=HTTP_TIMEOUT_S
    )
    assert response.status_code == 200
    assert verified_claims(response.json()["token"], sts.url, GOOGLE_AUDIENCE)["aud"] == GOOGLE_AUDIENCE
    wait_for_status(f"{agent.metrics_url}/readyz", 200)
    assert http_status(f"{agent.metrics_url}/healthz") == 200
    metrics = requests.get(f"{agent.metrics_url}/metrics", timeout=HTTP_TIMEOUT_S).text
    assert f'token_fetch_count_total{{audience="{AZURE_AUDIENCE}",error_class="",result="ok"}} 1.0' in metrics
    assert f'token_fetch_count_total{{audience="{GOOGLE_AUDIENCE}",error_class="",result="ok"}} 1.0' in metrics
    assert not listening(agent.proxy_port)

    agent.process.signal(signal.SIGTERM)
    assert agent.process.popen.wait(STOP_TIMEOUT_S) == 0
    assert not listening(agent.endpoint_port) and not listening(agent.metrics_port)
    assert path.read_text() == token  # the file stays for its readers


def test_agent_is_ready_only_once_every_file_is_written(sts, tmp_path, agents):
    sts.configure(stall_s=STALL_S)
    path = tmp_path / "token"
    agent = Agent(sts.url, "--token-file", f"{path}={AZURE_AUDIENCE}")
    agents.append(agent)
    agent.start()
    assert http_status(f"{agent.metrics_url}/readyz") == 503
    assert not path.exists()
    wait_for_status(f"{agent.metrics_url}/readyz", 200)
    assert path.exists()


def test_proxy_readyz_waits_for_the_token_files_too(start_proxy, sts, tmp_path):
    sts.configure(stall_s=STALL_S)
    path = tmp_path / "token"
    proxy = start_proxy("--token-file", f"{path}={AZURE_AUDIENCE}")
    readyz = f"http://127.0.0.1:{proxy.metrics_port}/readyz"
    wait_for_status(readyz, 503)
    assert not path.exists()
    wait_for_status(readyz, 200)
    assert path.exists()


def test_agent_with_nothing_to_do_is_a_usage_error():
    from tests.test_token_files import run

    result = run([JWT_PROXY, "agent"], env=aws_env())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "jwt-proxy: error: agent needs --token-file or --token-listen-addr: it has nothing else to do"
    ]


def test_agent_stops_with_one_line_when_the_endpoint_port_is_taken(sts, tmp_path):
    import socket

    from tests.test_token_files import run

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run(
            [JWT_PROXY, "--token-listen-addr", f"127.0.0.1:{port}", "--token-endpoint-audience", "a", "--metrics-enabled=false", "agent"],
            env=aws_env(sts.url),
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"jwt-proxy: error: --token-listen-addr 127.0.0.1:{port}: cannot listen there: Address already in use"
    ]


def test_proxy_readyz_says_so_when_the_token_agent_has_exited(start_proxy, sts, tmp_path):
    path = tmp_path / "token"
    proxy = start_proxy("--token-file", f"{path}={AZURE_AUDIENCE}")
    readyz = f"http://127.0.0.1:{proxy.metrics_port}/readyz"
    wait_for_status(readyz, 200)
    agent_pid = proxy.wait_for_record(lambda r: r.get("msg") == "token agent started")["pid"]
    assert agent_pid != proxy.pid
    os.kill(agent_pid, signal.SIGKILL)
    wait_for_status(readyz, 503)
    reason = requests.get(readyz, timeout=HTTP_TIMEOUT_S).text
    assert reason == f"the token agent (pid {agent_pid}) has exited: token files are not refreshed (see the error log)\n"


def test_proxy_stops_with_one_line_before_binding_when_the_endpoint_port_is_taken(sts):
    import socket

    from tests.conftest import free_port
    from tests.test_token_files import run

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        token_port = taken.getsockname()[1]
        result = run(
            [JWT_PROXY, "--listen-addr", f"127.0.0.1:{port}", "--metrics-listen-addr", f"127.0.0.1:{free_port()}",
             "--token-listen-addr", f"127.0.0.1:{token_port}", "--token-endpoint-audience", "a"],
            env=aws_env(sts.url),
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"jwt-proxy: error: --token-listen-addr 127.0.0.1:{token_port}: cannot listen there: Address already in use"
    ]
    assert not listening(port)
