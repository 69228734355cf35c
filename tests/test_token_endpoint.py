"""The token endpoint against the real CLI and local-sts: answers, refusals and metrics."""

from __future__ import annotations

import datetime as dt
import http.client
import time
import urllib.parse

import pytest
import requests

from tests.conftest import free_port
from tests.sdk_helpers import GOOGLE_AUDIENCE
from tests.sdk_helpers import GUARD
from tests.sdk_helpers import HTTP_TIMEOUT_S
from tests.sdk_helpers import verified_claims

pytestmark = pytest.mark.integration

ALLOWED = ("https://api.example.com", GOOGLE_AUDIENCE)


@pytest.fixture
def endpoint(start_proxy):
    """A proxy with the token endpoint; returns (proxy, endpoint base URL)."""
    port = free_port()
    flags = ["--token-listen-addr", f"127.0.0.1:{port}"]
    for audience in ALLOWED:
        flags += ["--token-endpoint-audience", audience]
    proxy = start_proxy(*flags)
    return proxy, f"http://127.0.0.1:{port}"


def token_url(base: str, audience: str) -> str:
    return f"{base}/token?" + urllib.parse.urlencode({"audience": audience})


def metric(proxy, name: str, audience: str) -> float:
    text = requests.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=HTTP_TIMEOUT_S).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'audience="{audience}"' in line and 'result="error"' not in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_listed_audience_gets_a_verified_token_with_its_expiry(endpoint, sts):
    proxy, base = endpoint
    response = requests.get(token_url(base, GOOGLE_AUDIENCE), headers=GUARD, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Server"] == "jwt-proxy"
    body = response.json()
    assert sorted(body) == ["expires_at", "expires_in", "token"]
    claims = verified_claims(body["token"], sts.url, GOOGLE_AUDIENCE)
    assert claims["aud"] == GOOGLE_AUDIENCE
    assert body["expires_at"].endswith("Z")
    expires_at = dt.datetime.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert abs(expires_at.timestamp() - claims["exp"]) <= 1
    assert isinstance(body["expires_in"], int) and 3500 < body["expires_in"] <= 3600
    assert abs(body["expires_in"] - (claims["exp"] - time.time())) <= 2

    again = requests.get(token_url(base, GOOGLE_AUDIENCE), headers=GUARD, timeout=HTTP_TIMEOUT_S)
    assert again.json()["token"] == body["token"]  # served from the cache
    assert sts.stats()["by_audience"] == {GOOGLE_AUDIENCE: 1}
    # Counted in the proxy's token metrics.
    assert metric(proxy, "token_fetch_count_total", GOOGLE_AUDIENCE) == 1
    assert metric(proxy, "token_cache_miss_count_total", GOOGLE_AUDIENCE) == 1
    assert metric(proxy, "token_cache_hit_count_total", GOOGLE_AUDIENCE) == 1


@pytest.mark.parametrize(
    ("path", "headers", "status", "body"),
    [
        (f"/token?audience={urllib.parse.quote('https://other.example.com')}", GUARD, 403, "audience not allowed"),
        ("/token?audience=https://api.example.com", {}, 403, "missing X-JWT-Proxy-Request: true"),
        ("/token?audience=https://api.example.com", {"X-JWT-Proxy-Request": "false"}, 403, "missing X-JWT-Proxy-Request: true"),
        ("/token?audience=https://api.example.com", {**GUARD, "X-Forwarded-For": "10.0.0.1"}, 403, "forwarded requests are refused"),
        ("/token?audience=https://api.example.com", {**GUARD, "X-Forwarded-For": ""}, 403, "forwarded requests are refused"),
        ("/token", GUARD, 400, "one audience query parameter is required"),
        ("/tokens?audience=https://api.example.com", GUARD, 404, "not found"),
        ("/", GUARD, 404, "not found"),
        ("/metrics", GUARD, 404, "not found"),
    ],
)
def test_refusals(endpoint, sts, path, headers, status, body):
    _, base = endpoint
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=HTTP_TIMEOUT_S)
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    assert (response.status, response.read().decode()) == (status, body + "\n")
    connection.close()
    assert sts.calls() == 0


def test_other_methods_are_not_found(endpoint, sts):
    _, base = endpoint
    response = requests.post(token_url(base, "https://api.example.com"), headers=GUARD, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 404
    assert sts.calls() == 0


def test_an_sts_failure_is_502_token_unavailable_without_aws_detail(endpoint, sts):
    proxy, base = endpoint
    sts.configure(fail_with="AccessDenied")
    response = requests.get(token_url(base, "https://api.example.com"), headers=GUARD, timeout=HTTP_TIMEOUT_S)
    assert (response.status_code, response.text) == (502, "token unavailable\n")
    record = proxy.wait_for_record(lambda r: r.get("msg") == "token endpoint: no token")
    assert record["error_class"] == "AccessDenied" and record["level"] == "error"


def test_the_endpoint_must_not_share_a_listener(tmp_path):
    from tests.test_token_files import run
    from tests.conftest import JWT_PROXY

    port = free_port()
    result = run([JWT_PROXY, "--listen-addr", f"127.0.0.1:{port}", "--token-listen-addr", f"127.0.0.1:{port}", "--token-endpoint-audience", "a"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"jwt-proxy: error: invalid value for --token-listen-addr: '127.0.0.1:{port}': must differ from --listen-addr"
    ]
