"""Shared fixtures: the real ``jwt-proxy`` CLI and ``jwt-proxy local-sts`` as subprocesses.

Integration tests start the console script installed in this venv, exactly as an
operator would, against loopback servers only. Every process started here is stopped by
its PID at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing as t
import urllib.request
from pathlib import Path

import pytest

BIN_DIR = Path(sys.executable).parent
JWT_PROXY = str(BIN_DIR / "jwt-proxy")
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never the same twice in one test run.

    The kernel may hand a just-released port out again, so two calls in a row (listener
    and metrics port of one proxy) could otherwise collide.
    """
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port
    raise RuntimeError("no fresh loopback port")


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


def aws_env(sts_url: str | None = None, **extra: str) -> dict[str, str]:
    """An environment with dummy credentials that can reach nothing but loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PROMETHEUS_"))}
    for name in ("LISTEN_ADDR", "UPSTREAM_HOST", "TOKEN_AUDIENCE", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        env.pop(name, None)
    env.update(
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="AKIDTESTING",
        AWS_SECRET_ACCESS_KEY="testing-secret",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONUNBUFFERED="1",
    )
    if sts_url:
        env["AWS_ENDPOINT_URL_STS"] = sts_url
    env.update(extra)
    return env


class Process:
    """A subprocess whose stdout and stderr go to files, stopped by PID."""

    def __init__(self, args: list[str], env: dict[str, str], port: int | None = None) -> None:
        self.args = args
        self.port = port
        self._log_dir = tempfile.mkdtemp(prefix="jwt-proxy-test-")
        self.stdout_path = Path(self._log_dir, "stdout")
        self.stderr_path = Path(self._log_dir, "stderr")
        self._stdout = self.stdout_path.open("wb")
        self._stderr = self.stderr_path.open("wb")
        self.popen = subprocess.Popen(args, env=env, stdout=self._stdout, stderr=self._stderr, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_ready(self) -> Process:
        if self.port is not None:
            try:
                wait_for_port(self.port, self.popen)
            except Exception:
                self.stop()
                raise RuntimeError(f"{self.args} did not start:\n{self.output()}") from None
        return self

    def output(self) -> str:
        self._stdout.flush()
        self._stderr.flush()
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def records(self) -> list[dict[str, t.Any]]:
        """The JSON log records written to stdout so far."""
        records = []
        for line in self.stdout_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
        return records

    def wait_for_record(self, predicate: t.Callable[[dict], bool], timeout_s: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for record in self.records():
                if predicate(record):
                    return record
            time.sleep(0.05)
        raise AssertionError(f"no matching log record in:\n{self.output()}")

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout_s)
        self._stdout.close()
        self._stderr.close()
        return self.popen.returncode

    def cleanup(self) -> None:
        """Stop the process and remove its log files (for fixture teardown)."""
        self.stop()
        shutil.rmtree(self._log_dir, ignore_errors=True)


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
