"""Starting and stopping local processes by PID: shared by the tests and ``bench/``.

Both start the real ``jwt-proxy`` and its helpers as subprocesses on loopback ports, with
credentials that can reach nothing else, and must stop exactly what they started (never
by name) even when a test or a benchmark fails. No pytest here, so ``bench/`` can import
it with the repository root on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import typing as t
from pathlib import Path

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


#: Settings the proxy would read from the caller's environment; here they come from flags.
_PROXY_SETTINGS = ("LISTEN_ADDR", "UPSTREAM_HOST", "UPSTREAM_SCHEME", "TOKEN_AUDIENCE", "WORKERS", "THREADS")
_OUTBOUND_PROXIES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


def aws_env(sts_url: str | None = None, **extra: str) -> dict[str, str]:
    """An environment with dummy credentials that can reach nothing but loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PROMETHEUS_"))}
    for name in (*_PROXY_SETTINGS, *_OUTBOUND_PROXIES):
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


def stop_popen(popen: subprocess.Popen, signum: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """Send ``signum`` to the process by its PID, wait, and kill it if it has not exited
    in time; returns its exit status. Nothing happens to a process already reaped."""
    if popen.poll() is None:
        popen.send_signal(signum)
        try:
            popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout_s)
    return popen.returncode


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
        stop_popen(self.popen, signal.SIGTERM, timeout_s)
        self._stdout.close()
        self._stderr.close()
        return self.popen.returncode

    def cleanup(self) -> None:
        """Stop the process and remove its log files (for fixture teardown)."""
        self.stop()
        shutil.rmtree(self._log_dir, ignore_errors=True)
