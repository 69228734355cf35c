"""Raw-socket HTTP for the hostile-request tests: send bytes, read what comes back, to a
proxy of one worker that can reach only a loopback upstream."""

from __future__ import annotations

import socket

from tests.conftest import JWT_PROXY
from tests.processes import Process
from tests.processes import aws_env
from tests.processes import free_port


def start_small_proxy(sts_url: str, routing: list[str]) -> Process:
    """``jwt-proxy`` with one worker of 8 threads, no metrics, plain-HTTP upstreams and a
    5 s upstream timeout; ``routing`` pins or allowlists the upstream. Started and ready."""
    port = free_port()
    command = [
        JWT_PROXY,
        "--listen-addr", f"127.0.0.1:{port}",
        "--metrics-enabled=false",
        "--workers", "1",
        "--threads", "8",
        "--upstream-scheme", "http",
        "--upstream-timeout", "5s",
        *routing,
    ]  # fmt: skip
    return Process(command, aws_env(sts_url), port).wait_ready()


def send_raw(port: int, data: bytes, timeout_s: float) -> bytes:
    """Send ``data`` to ``127.0.0.1:port``, half-close, and read until the peer closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        answer = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return answer
                answer += chunk
        except ConnectionResetError:
            return answer  # closed with our unread bytes still queued: the answer is in


def final_status(answer: bytes) -> int:
    """The status of the first final (non-1xx) response in ``answer``; 0 if none."""
    for line in answer.split(b"\r\n"):
        if line[:7] == b"HTTP/1." and line[9:10] != b"1":
            return int(line[9:12])
    return 0
