"""Shared fixtures: the real ``jwt-proxy`` CLI and ``jwt-proxy local-sts`` as subprocesses.

Integration tests start the console script installed in this venv, exactly as an
operator would, against loopback servers only. Every process started here is stopped by
its PID at teardown.
"""

from __future__ import annotations

import json
import sys
import typing as t
import urllib.request
from pathlib import Path

import pytest

# The generic process helpers live in tests/processes.py (bench/ uses them too); they are
# imported here under their old names so that ``from tests.conftest import X`` still works.
from tests.processes import START_TIMEOUT_S  # noqa: F401
from tests.processes import STOP_TIMEOUT_S  # noqa: F401
from tests.processes import Process
from tests.processes import aws_env
from tests.processes import free_port
from tests.processes import wait_for_port  # noqa: F401

BIN_DIR = Path(sys.executable).parent
JWT_PROXY = str(BIN_DIR / "jwt-proxy")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def local_sts():
    """``jwt-proxy local-sts`` on a free loopback port, shared by the session's tests."""
    port = free_port()
    process = Process([JWT_PROXY, "local-sts", "--listen-addr", f"127.0.0.1:{port}"], aws_env(), port).wait_ready()
    sts = LocalSTSHandle(f"http://127.0.0.1:{port}", process)
    yield sts
    process.cleanup()


class LocalSTSHandle:
    """The test side of a running local-sts: its URL, call counters and fault switches."""

    def __init__(self, url: str, process: Process) -> None:
        self.url = url
        self.process = process

    def _post(self, path: str, body: dict) -> None:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/_local-sts/stats", timeout=5) as response:
            return json.loads(response.read())

    def calls(self) -> int:
        return self.stats()["calls"]

    def reset(self) -> None:
        self._post("/_local-sts/reset", {})
        self._post(
            "/_local-sts/config",
            {"fail_with": None, "stall_s": 0, "max_token_lifetime_s": None, "max_session_duration_s": None},
        )

    def configure(self, **settings: t.Any) -> None:
        self._post("/_local-sts/config", settings)


@pytest.fixture
def sts(local_sts):
    """The shared local-sts, with counters zeroed and faults cleared for this test."""
    local_sts.reset()
    yield local_sts
    local_sts.reset()


@pytest.fixture
def start_proxy(sts):
    """Start ``jwt-proxy`` with the given flags against the local STS; stopped at teardown.

    Returns a function ``start(*flags, env=None, ready=True, command=None) -> Process``;
    ``command`` replaces the ``jwt-proxy`` command line (the listen addresses then go in
    the environment). The process has ``.port`` and ``.url`` (its listen address) and is
    stopped by PID at teardown.
    """
    started: list[Process] = []

    def start(*flags: str, env: dict[str, str] | None = None, ready: bool = True, command: list[str] | None = None) -> Process:
        port = free_port()
        metrics_port = free_port()
        args = command or [
            JWT_PROXY,
            "--listen-addr",
            f"127.0.0.1:{port}",
            "--metrics-listen-addr",
            f"127.0.0.1:{metrics_port}",
            "--workers",
            "1",
            "--threads",
            "8",
            *flags,
        ]
        environment = aws_env(sts.url, **(env or {}))
        if command:
            environment.update(LISTEN_ADDR=f"127.0.0.1:{port}", METRICS_LISTEN_ADDR=f"127.0.0.1:{metrics_port}")
        process = Process(args, environment, port)
        process.url = f"http://127.0.0.1:{port}"
        process.metrics_port = metrics_port
        started.append(process)
        return process.wait_ready() if ready else process

    yield start
    for process in started:
        process.cleanup()
