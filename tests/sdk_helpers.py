"""What the token-file, token-endpoint, agent and SDK tests share: waiting for a token file,
verifying a token against local-sts's JWKS, and starting ``jwt-proxy agent``."""

from __future__ import annotations

import os
import time
import urllib.error
import typing as t
import urllib.request

import jwt

from tests.conftest import JWT_PROXY
from tests.conftest import Process
from tests.conftest import aws_env
from tests.conftest import free_port

FILE_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 10.0
GUARD = {"X-JWT-Proxy-Request": "true"}
AZURE_AUDIENCE = "api://AzureADTokenExchange"
GOOGLE_AUDIENCE = "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/pool/providers/aws"


def wait_for_file(path: str, timeout_s: float = FILE_TIMEOUT_S, process: Process | None = None) -> str:
    """The file's content once it exists (it is written whole or not at all)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.popen.poll() is not None:
            raise AssertionError(f"exited with {process.popen.returncode} before writing {path}:\n{process.output()}")
        try:
            with open(path) as handle:
                return handle.read()
        except FileNotFoundError:
            time.sleep(0.05)
    raise AssertionError(f"{path} not written within {timeout_s}s" + (f":\n{process.output()}" if process else ""))


def verified_claims(token: str, sts_url: str, audience: str) -> dict[str, t.Any]:
    """The claims of ``token`` after checking its signature against local-sts's JWKS."""
    keys = jwt.PyJWKClient(f"{sts_url}/.well-known/jwks.json")
    key = keys.get_signing_key_from_jwt(token)
    return jwt.decode(token, key.key, algorithms=["RS256", "ES384"], audience=audience, issuer=sts_url)


def http_status(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_for_status(url: str, status: int, timeout_s: float = FILE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = http_status(url)
        except OSError:
            last = None
        if last == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"{url} answered {last}, not {status}, within {timeout_s}s")


class Agent:
    """``jwt-proxy [flags] agent`` against local-sts, with its metrics and endpoint ports."""

    def __init__(self, sts_url: str, *flags: str, endpoint_audiences: t.Sequence[str] = (), env: dict | None = None) -> None:
        self.metrics_port = free_port()
        self.proxy_port = free_port()  # set, so a test can check that nothing listens there
        args = [
            JWT_PROXY,
            "--listen-addr",
            f"127.0.0.1:{self.proxy_port}",
            "--metrics-listen-addr",
            f"127.0.0.1:{self.metrics_port}",
        ]
        self.endpoint_port = None
        if endpoint_audiences:
            self.endpoint_port = free_port()
            args += ["--token-listen-addr", f"127.0.0.1:{self.endpoint_port}"]
            for audience in endpoint_audiences:
                args += ["--token-endpoint-audience", audience]
        self.process = Process([*args, *flags, "agent"], aws_env(sts_url, **(env or {})), self.metrics_port)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.endpoint_port}"

    def start(self) -> Agent:
        self.process.wait_ready()
        return self


def listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def file_mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777
