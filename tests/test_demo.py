"""The demo's echo upstream in-process, and ``jwt-proxy demo`` end to end."""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import boto3
import jwt
import pytest
import requests
from botocore.config import Config
from cryptography.hazmat.primitives.asymmetric import rsa

from jwt_proxy.devtools.demo import AUDIENCE
from jwt_proxy.devtools.demo import CLIENT_API_KEY
from jwt_proxy.devtools.demo import EchoUpstream
from jwt_proxy.devtools.demo import proxy_environment
from jwt_proxy.devtools.localsts import LocalSTS
from tests.sdk_helpers import wait_for_file

HTTP_TIMEOUT_S = 5.0
DEMO_BANNER_TIMEOUT_S = 60.0
DEMO_EXIT_TIMEOUT_S = 45.0
DESCENDANT_GONE_TIMEOUT_S = 10.0


def mint(sts_url: str, audiences: list[str], algorithm: str = "RS256") -> str:
    client = boto3.client(
        "sts",
        region_name="us-east-1",
        endpoint_url=sts_url,
        aws_access_key_id="x",
        aws_secret_access_key="y",
        config=Config(retries={"total_max_attempts": 1}, read_timeout=HTTP_TIMEOUT_S),
    )
    return client.get_web_identity_token(Audience=audiences, SigningAlgorithm=algorithm)["WebIdentityToken"]


@pytest.fixture(scope="module")
def sts() -> t.Iterator[LocalSTS]:
    with LocalSTS(port=0) as server:
        yield server


@pytest.fixture(scope="module")
def echo(sts: LocalSTS) -> t.Iterator[EchoUpstream]:
    with EchoUpstream(
        "127.0.0.1", 0, jwks_url=f"{sts.url}/.well-known/jwks.json", issuer=sts.url, audience=AUDIENCE
    ) as server:
        yield server


@pytest.fixture(scope="module")
def other_sts() -> t.Iterator[LocalSTS]:
    """Another issuer, with keys of its own."""
    with LocalSTS(port=0) as server:
        yield server


@pytest.mark.parametrize("algorithm", ["RS256", "ES384"])
def test_echo_answers_a_verified_token_with_its_claims(sts, echo, algorithm):
    token = mint(sts.url, [AUDIENCE], algorithm)
    response = requests.post(
        f"{echo.url}/hello/a%2Fb?x=1",
        headers={"Authorization": f"Bearer {token}", "X-Custom": "kept"},
        data=b"abc",
        timeout=HTTP_TIMEOUT_S,
    )
    assert response.status_code == 200
    document = response.json()
    assert document["verified_claims"]["aud"] == AUDIENCE
    assert document["verified_claims"]["iss"] == sts.url
    assert document["method"] == "POST"
    assert document["path"] == "/hello/a%2Fb?x=1"
    assert document["body_bytes"] == 3
    assert document["headers_received"]["X-Custom"] == "kept"
    assert document["headers_received"]["Authorization"] == f"Bearer <redacted, {len(token)} bytes>"
    assert token not in response.text


def test_echo_accepts_a_token_naming_its_audience_among_others(sts, echo):
    token = mint(sts.url, ["https://other.example.com", AUDIENCE])
    response = requests.get(f"{echo.url}/", headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200
    assert response.json()["verified_claims"]["aud"] == ["https://other.example.com", AUDIENCE]


def test_echo_counts_a_chunked_body_and_answers_head(sts, echo):
    token = mint(sts.url, [AUDIENCE])
    headers = {"Authorization": f"Bearer {token}"}
    chunked = requests.put(f"{echo.url}/up", headers=headers, data=iter([b"hello ", b"world"]), timeout=HTTP_TIMEOUT_S)
    assert chunked.json()["body_bytes"] == 11
    head = requests.head(f"{echo.url}/up", headers=headers, timeout=HTTP_TIMEOUT_S)
    assert head.status_code == 200
    assert head.content == b""


def forged_token(sts_url: str, kid: str, **changes: t.Any) -> str:
    """A token with the right claims and ``kid`` but signed by a key the issuer never had."""
    now = int(time.time())
    claims = {"iss": sts_url, "aud": AUDIENCE, "sub": "arn:aws:iam::000000000000:role/x", "iat": now, "exp": now + 300}
    claims.update(changes)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


@pytest.mark.parametrize(
    "make_authorization",
    [
        lambda sts, other: None,
        lambda sts, other: f"Bearer {CLIENT_API_KEY}",
        lambda sts, other: "Basic dXNlcjpwYXNz",
        lambda sts, other: f"Bearer {mint(sts.url, ['https://someone-else.example.com'])}",
        lambda sts, other: f"Bearer {mint(other.url, [AUDIENCE])}",
        lambda sts, other: f"Bearer {forged_token(sts.url, sts.jwks['keys'][0]['kid'])}",
        lambda sts, other: "Bearer "
        + jwt.encode(
            {"iss": sts.url, "aud": AUDIENCE, "sub": "x", "iat": int(time.time()), "exp": int(time.time()) + 60},
            None,
            algorithm="none",
            headers={"kid": sts.jwks["keys"][0]["kid"]},
        ),
    ],
    ids=["absent", "old-api-key", "basic-auth", "other-audience", "other-issuer", "forged-signature", "alg-none"],
)
def test_echo_refuses_what_does_not_verify(sts, echo, other_sts, make_authorization):
    authorization = make_authorization(sts, other_sts)
    headers = {"Authorization": authorization} if authorization else {}
    response = requests.get(f"{echo.url}/hello", headers=headers, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 401
    assert set(response.json()) == {"error"}
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_echo_refuses_two_authorization_headers(sts, echo):
    """A proxy that appends its JWT but forgets to drop the client's key must not pass."""
    token = mint(sts.url, [AUDIENCE])
    connection = http.client.HTTPConnection("127.0.0.1", int(echo.url.rsplit(":", 1)[1]), timeout=HTTP_TIMEOUT_S)
    try:
        connection.putrequest("GET", "/hello")
        connection.putheader("Authorization", f"Bearer {CLIENT_API_KEY}")
        connection.putheader("Authorization", f"Bearer {token}")
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 401
        assert "2 Authorization headers" in json.loads(response.read())["error"]
    finally:
        connection.close()


def test_proxy_environment_cannot_reach_a_real_account():
    env = proxy_environment(
        "http://127.0.0.1:4599",
        {"AWS_PROFILE": "prod", "AWS_SESSION_TOKEN": "s", "AWS_ACCESS_KEY_ID": "AKIAREAL", "HTTPS_PROXY": "http://p:3128", "TLS_CERT": "/c.pem", "LOG_FORMAT": "text", "PATH": "/bin"},
    )
    assert env["AWS_ENDPOINT_URL_STS"] == "http://127.0.0.1:4599"
    assert env["AWS_REGION"] == "us-east-1"
    assert env["AWS_ACCESS_KEY_ID"] != "AKIAREAL"
    assert env["AWS_CONFIG_FILE"] == env["AWS_SHARED_CREDENTIALS_FILE"] == os.devnull
    for dropped in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTPS_PROXY", "TLS_CERT"):
        assert dropped not in env
    assert env["LOG_FORMAT"] == "text"
    assert env["PATH"] == "/bin"


# -- end to end ----------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open together, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat, to tell a process from a later one with its PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def is_running(pid: int, started: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] == started and fields[0] != "Z"  # a zombie no longer runs


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (children, their children...), with its start time."""
    found: dict[int, str] = {}
    pending = [pid]
    while pending:
        parent = pending.pop()
        for children_file in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                children = [int(child) for child in children_file.read_text().split()]
            except OSError:
                continue
            for child in children:
                started = start_time(child)
                if started is not None and child not in found:
                    found[child] = started
                    pending.append(child)
    return found


KEPT_ALIVE_REQUESTS = 10
# Nagle's algorithm with the client's delayed ACK costs 40 ms a request; a demo request
# takes a few milliseconds, so the median has a wide margin on a loaded machine.
MEDIAN_REQUEST_LIMIT_S = 0.020


@pytest.mark.integration
def test_demo_end_to_end(tmp_path):
    proxy_port, sts_port, upstream_port, metrics_port = free_ports(4)
    command = [
        sys.executable,
        "-m",
        "jwt_proxy",
        "demo",
        "--listen-addr",
        f"127.0.0.1:{proxy_port}",
        "--sts-listen-addr",
        f"127.0.0.1:{sts_port}",
        "--upstream-listen-addr",
        f"127.0.0.1:{upstream_port}",
        "--metrics-listen-addr",
        f"127.0.0.1:{metrics_port}",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "LOG_FORMAT", "LOG_LEVEL")}
    env["PYTHONUNBUFFERED"] = "1"
    stdout_path = tmp_path / "demo.stdout"
    lines: queue.Queue[str] = queue.Queue()
    said: list[str] = []

    with stdout_path.open("wb") as stdout:
        demo = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True)

    def read_stderr() -> None:
        assert demo.stderr is not None
        for line in demo.stderr:
            said.append(line)
            lines.put(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    watched: dict[int, str] = {}
    try:
        curl_line = None
        deadline = time.monotonic() + DEMO_BANNER_TIMEOUT_S
        while curl_line is None and time.monotonic() < deadline and demo.poll() is None:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if "curl" in line:
                curl_line = line
        assert curl_line is not None, f"no curl line; exit={demo.poll()}\n{''.join(said)}\n{stdout_path.read_text()}"
        match = re.search(r"curl -s (\S+) -H 'Authorization: Bearer ([^']+)'", curl_line)
        assert match, curl_line
        assert match.group(1) == f"http://127.0.0.1:{proxy_port}/hello"

        response = requests.get(match.group(1), headers={"Authorization": f"Bearer {match.group(2)}"}, timeout=30)
        assert response.status_code == 200, response.text
        document = response.json()
        assert document["verified_claims"]["aud"] == AUDIENCE
        assert document["verified_claims"]["iss"] == f"http://127.0.0.1:{sts_port}"
        assert document["path"] == "/hello"
        seen = document["headers_received"]["Authorization"]
        assert re.fullmatch(r"Bearer <redacted, \d+ bytes>", seen)
        assert int(seen.split(", ")[1].split()[0]) > 100  # a JWT, not the 14-byte API key
        assert match.group(2) not in response.text

        durations_s = kept_alive_request_durations(match.group(1), match.group(2))
        assert statistics.median(durations_s) < MEDIAN_REQUEST_LIMIT_S, durations_s

        # The demo keeps a token file too, and says where.
        token_line = next(line for line in said if line.strip().startswith("token file"))
        token_path = token_line.split()[2]
        token = wait_for_file(token_path)
        keys = jwt.PyJWKClient(f"http://127.0.0.1:{sts_port}/.well-known/jwks.json")
        claims = jwt.decode(token, keys.get_signing_key_from_jwt(token).key, algorithms=["RS256"], audience=AUDIENCE)
        assert claims["iss"] == f"http://127.0.0.1:{sts_port}"

        watched = descendants(demo.pid)
        assert watched, "the proxy should be a child process of the demo"
        demo.send_signal(signal.SIGINT)
        assert demo.wait(DEMO_EXIT_TIMEOUT_S) == 0, "".join(said)
        deadline = time.monotonic() + DESCENDANT_GONE_TIMEOUT_S
        while any(is_running(pid, started) for pid, started in watched.items()) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid, started in watched.items() if is_running(pid, started)]
        assert left == [], f"processes left behind: {left}"

        records = [json.loads(line) for line in stdout_path.read_text().splitlines()]  # every line is JSON
        loggers = {record["logger"] for record in records}
        assert {"jwt_proxy.local_sts", "jwt_proxy.echo_upstream", "jwt_proxy.access", "gunicorn.error"} <= loggers
        echoed = [r for r in records if r["logger"] == "jwt_proxy.echo_upstream" and r["msg"] == "request"]
        assert len(echoed) == 2 + KEPT_ALIVE_REQUESTS
        assert {(r["method"], r["path"], r["status"]) for r in echoed} == {("GET", "/hello", 200)}
        assert match.group(2) not in stdout_path.read_text()
    finally:
        for pid, started in {**descendants(demo.pid), **watched}.items():
            if is_running(pid, started):
                os.kill(pid, signal.SIGKILL)
        if demo.poll() is None:
            demo.kill()
            demo.wait(HTTP_TIMEOUT_S)
        reader.join(HTTP_TIMEOUT_S)
        if demo.stderr is not None:
            demo.stderr.close()


def kept_alive_request_durations(url: str, api_key: str) -> list[float]:
    """Seconds each of KEPT_ALIVE_REQUESTS sequential requests took on one connection
    (after one that opens it)."""
    durations_s = []
    with requests.Session() as session:
        session.get(url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30).raise_for_status()
        for _ in range(KEPT_ALIVE_REQUESTS):
            started = time.perf_counter()
            response = session.get(url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
            durations_s.append(time.perf_counter() - started)
            assert response.status_code == 200
    return durations_s


@pytest.mark.integration
def test_demo_logs_in_the_chosen_format(tmp_path):
    """With --log-format text, the local STS and the echo write logfmt lines too."""
    ports = free_ports(4)
    sts_port, upstream_port = ports[1], ports[2]
    command = [
        sys.executable, "-m", "jwt_proxy", "--log-format", "text", "demo",
        "--listen-addr", f"127.0.0.1:{ports[0]}",
        "--sts-listen-addr", f"127.0.0.1:{sts_port}",
        "--upstream-listen-addr", f"127.0.0.1:{upstream_port}",
        "--metrics-listen-addr", f"127.0.0.1:{ports[3]}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "LOG_FORMAT", "LOG_LEVEL")}
    stdout_path = tmp_path / "demo.stdout"
    with stdout_path.open("wb") as stdout:
        demo = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{sts_port}/.well-known/jwks.json")
        requests.get(f"http://127.0.0.1:{upstream_port}/direct", timeout=HTTP_TIMEOUT_S)
        deadline = time.monotonic() + DEMO_BANNER_TIMEOUT_S
        while "logger=jwt_proxy.echo_upstream" not in stdout_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(DEMO_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait(HTTP_TIMEOUT_S)
    lines = stdout_path.read_text().splitlines()
    assert lines and not any(line.startswith("{") for line in lines), lines
    assert all(line.startswith("time=") for line in lines), lines
    assert any("logger=jwt_proxy.local_sts" in line and "path=/.well-known/jwks.json" in line for line in lines)
    assert any("logger=jwt_proxy.echo_upstream" in line and "status=401" in line for line in lines)


def wait_for_http(url: str) -> None:
    deadline = time.monotonic() + DEMO_BANNER_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=HTTP_TIMEOUT_S)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(f"nothing answered at {url}")


TEST_ONLY_PACKAGES = ("pytest", "moto", "hypothesis", "websocket", "yaml", "responses", "kubernetes_validate")


def test_the_demo_needs_none_of_the_test_extras():
    """``pip install .`` then ``jwt-proxy demo``: nothing the demo imports is a test extra."""
    program = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TEST_ONLY_PACKAGES!r}:
            raise ImportError("test extra imported: " + name)
sys.meta_path.insert(0, Refuse())
import jwt_proxy.cli, jwt_proxy.devtools.demo, jwt_proxy.devtools.localsts, jwt_proxy.logs
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
