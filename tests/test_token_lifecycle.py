"""Token lifecycle against the real CLI and local-sts: what an STS failure, stall or limit costs."""

from __future__ import annotations

import concurrent.futures
import math
import socket
import time

import jwt
import pytest
import requests

from jwt_proxy.sts import STS_MAX_ATTEMPTS
from tests.upstream import RecordingUpstream

pytestmark = pytest.mark.integration


@pytest.fixture
def upstream():
    with RecordingUpstream() as server:
        yield server


def pinned(upstream, *flags):
    return ("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", *flags)


def claims_seen(upstream, index=-1):
    value = upstream.requests[index].header("Authorization")
    return jwt.decode(value.split(" ", 1)[1], options={"verify_signature": False})


@pytest.mark.parametrize(
    ("code", "attempts_per_fetch"),
    [("AccessDenied", 1), ("InternalFailure", STS_MAX_ATTEMPTS)],  # botocore retries a 500 once
)
def test_sts_outage_burst_costs_at_most_one_call_per_worker_per_second(start_proxy, upstream, sts, code, attempts_per_fetch):
    sts.configure(fail_with=code)
    proxy = start_proxy(*pinned(upstream, "--workers", "2", "--threads", "16"))

    def burst(count):
        with requests.Session() as session:
            return [session.get(proxy.url + "/", timeout=10).status_code for _ in range(count)]

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = [s for batch in pool.map(burst, [10] * 20) for s in batch]
    elapsed_s = time.monotonic() - started
    assert statuses == [502] * 200
    assert upstream.requests == []
    # Failure memory: one STS call per worker, then the same 502 for a second.
    fetches_allowed = 2 * max(1, math.ceil(elapsed_s))
    assert 1 <= sts.calls() <= fetches_allowed * attempts_per_fetch


def test_shared_fetch_survives_the_client_that_started_it(start_proxy, upstream, sts):
    sts.configure(stall_s=1.5)
    proxy = start_proxy(*pinned(upstream))
    first = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    first.sendall(b"GET /first HTTP/1.1\r\nHost: proxy\r\n\r\n")
    time.sleep(0.3)  # let the first request start the STS call
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(requests.get, proxy.url + f"/waiter{i}", timeout=15) for i in range(4)]
        time.sleep(0.2)
        first.close()  # the client that started the fetch goes away
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * 4
    assert sts.calls() == 1


def test_a_stalled_sts_costs_about_the_upstream_timeout(start_proxy, upstream, sts):
    sts.configure(stall_s=20)
    proxy = start_proxy(*pinned(upstream, "--upstream-timeout", "2s"))
    started = time.monotonic()
    response = requests.get(proxy.url + "/", timeout=15)
    elapsed_s = time.monotonic() - started
    assert (response.status_code, response.text) == (502, "token unavailable\n")
    assert elapsed_s < 2 + 1.5
    record = proxy.wait_for_record(lambda r: r.get("msg") == "token unavailable")
    assert record["error_class"] == "transport" and record["hint"]


def test_session_duration_escalation_retries_once_with_a_shorter_duration(start_proxy, upstream, sts):
    sts.configure(max_session_duration_s=900)
    proxy = start_proxy(*pinned(upstream, "--token-duration", "1h", "--token-refresh-skew", "20s"))
    assert requests.get(proxy.url + "/one", timeout=10).status_code == 200
    assert requests.get(proxy.url + "/two", timeout=10).status_code == 200
    stats = sts.stats()
    assert stats["calls"] == 2  # the refused hour, then one shorter retry; the second request hits the cache
    claims = claims_seen(upstream)
    assert claims["exp"] - claims["iat"] == stats["last_params"]["DurationSeconds"] < 900
    warning = proxy.wait_for_record(lambda r: r.get("level") == "warn" and r.get("logger") == "jwt_proxy.sts")
    assert "SessionDuration" in warning["msg"] or "session" in warning["msg"].lower()


def test_each_worker_mints_its_token_at_start(start_proxy, upstream, sts):
    proxy = start_proxy(*pinned(upstream, "--token-audience", "warm", "--workers", "2"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sts.stats()["by_audience"].get("warm", 0) < 2:
        time.sleep(0.05)
    assert sts.stats()["by_audience"] == {"warm": 2}
    assert upstream.requests == []
    for _ in range(4):
        assert requests.get(proxy.url + "/", timeout=10).status_code == 200
    assert sts.calls() == 2


def test_a_failed_start_is_logged_with_a_hint_retried_and_the_worker_stays_up(start_proxy, upstream, sts):
    sts.configure(fail_with="OutboundWebIdentityFederationDisabledException")
    proxy = start_proxy(*pinned(upstream, "--token-audience", "warm"))
    record = proxy.wait_for_record(lambda r: r.get("msg", "").startswith("could not mint the token at worker start"))
    assert record["error_class"] == "OutboundWebIdentityFederationDisabledException"
    assert "enable-outbound-web-identity-federation" in record["hint"]
    assert requests.get(proxy.url + "/", timeout=10).status_code == 502
    sts.configure(fail_with=None)
    proxy.wait_for_record(lambda r: r.get("msg") == "token minted at worker start", timeout_s=10)
    assert proxy.popen.poll() is None
    assert requests.get(proxy.url + "/", timeout=10).status_code == 200


def test_scope_subject_mode_and_tags_reach_sts(start_proxy, upstream, sts):
    proxy = start_proxy(
        *pinned(
            upstream,
            "--token-audience", "https://api.example.com",
            "--token-subject-mode", "OriginIdentity",
            "--token-scope", "read:orders write",
            "--token-tag", "team=payments,env=prod",
            "--token-signing-algorithm", "ES384",
            "--token-duration", "15m",
        )
    )
    assert requests.get(proxy.url + "/", timeout=10).status_code == 200
    params = sts.stats()["last_params"]
    assert params["Audience"] == ["https://api.example.com"]
    assert params["SubjectMode"] == "OriginIdentity"
    assert params["Scope"] == "read:orders write"
    assert params["Tags"] == [{"Key": "team", "Value": "payments"}, {"Key": "env", "Value": "prod"}]
    assert params["SigningAlgorithm"] == "ES384" and params["DurationSeconds"] == 900
    assert claims_seen(upstream)["scope"] == "read:orders write"


@pytest.mark.parametrize(
    ("code", "hint_part"),
    [
        ("AccessDenied", "sts:GetWebIdentityToken"),
        ("OutboundWebIdentityFederationDisabledException", "enable-outbound-web-identity-federation"),
        ("Throttling", ""),
        ("ExpiredToken", ""),
        ("JWTPayloadSizeExceededException", ""),
    ],
)
def test_error_records_carry_the_aws_code_and_a_hint(start_proxy, upstream, sts, code, hint_part):
    sts.configure(fail_with=code)
    proxy = start_proxy("--upstream-scheme", "http")
    response = requests.get(proxy.url + "/x?secret=s3", headers={"X-Upstream-Host": "api.example.test"}, timeout=15)
    assert (response.status_code, response.text) == (502, "token unavailable\n")
    record = proxy.wait_for_record(lambda r: r.get("msg") == "token unavailable")
    assert record["error_class"] == code
    assert record["hint"] and hint_part in record["hint"]
    assert "s3" not in record["target"]
    access = proxy.wait_for_record(lambda r: r.get("logger") == "jwt_proxy.access")
    assert access["status"] == 502


def test_short_tokens_are_refreshed_before_they_expire(start_proxy, upstream, sts):
    """Tokens that live 6 s with a 4 s skew: requests over 7 s never carry an expired token."""
    sts.configure(max_token_lifetime_s=6)
    proxy = start_proxy(*pinned(upstream, "--token-duration", "60s", "--token-refresh-skew", "4s"))
    sent_at = []
    deadline = time.monotonic() + 7
    with requests.Session() as session:
        while time.monotonic() < deadline:
            sent_at.append(time.time())
            assert session.get(proxy.url + "/", timeout=10).status_code == 200
            time.sleep(0.1)
    expiries = [claims_seen(upstream, i)["exp"] for i in range(len(sent_at))]
    assert all(exp > sent for exp, sent in zip(expiries, sent_at))
    assert len(set(expiries)) >= 2
    assert 2 <= sts.calls() <= 4
