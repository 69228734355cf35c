"""Tokens bounded and always fresh, against the real CLI and local-sts.

An idle worker keeps its tokens fresh, a short token is still cached, a still-valid token
is served while STS is down, the cache and the metric labels stay bounded, and header
mode without an allowlist says so at start. The tests that stop STS run their own
local-sts and stop it by PID; the others use the shared one.
"""

from __future__ import annotations

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import JWT_PROXY
from tests.conftest import Process
from tests.conftest import aws_env
from tests.conftest import free_port
from tests.test_token_lifecycle import claims_seen
from tests.test_token_lifecycle import pinned
from tests.upstream import RecordingUpstream

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 15
# A request served from the cache takes milliseconds; waiting on STS, even a dead one
# answering at once, means a retried fetch first. Generous for a loaded machine.
NO_STS_WAIT_S = 2.0


@pytest.fixture
def upstream():
    with RecordingUpstream() as server:
        yield server


@pytest.fixture
def own_sts():
    """Starts a local-sts of the test's own (so it can be stopped by PID): ``start(*flags)``."""
    started: list[Process] = []

    def start(*flags: str) -> Process:
        port = free_port()
        process = Process([JWT_PROXY, "local-sts", "--listen-addr", f"127.0.0.1:{port}", *flags], aws_env(), port)
        started.append(process)
        process.wait_ready()
        process.url = f"http://127.0.0.1:{port}"
        return process

    yield start
    for process in started:
        process.cleanup()


def scrape(proxy) -> list:
    response = requests.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200
    return list(text_string_to_metric_families(response.text))


def samples_of(families, name):
    return [sample for family in families for sample in family.samples if sample.name == name]


def sleep_until(epoch_s: float) -> None:
    time.sleep(max(0.0, epoch_s - time.time()))


def timed_get(url: str) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.get(url, timeout=REQUEST_TIMEOUT_S)
    return response, time.monotonic() - started


def test_an_idle_worker_refreshes_so_its_next_request_needs_no_sts(start_proxy, upstream, own_sts):
    """60 s tokens, 20 s skew: idle past the first token's expiry, then STS is stopped."""
    sts = own_sts("--max-token-lifetime", "60s")
    proxy = start_proxy(*pinned(upstream, "--token-refresh-skew", "20s"), env={"AWS_ENDPOINT_URL_STS": sts.url})
    assert requests.get(proxy.url + "/first", timeout=REQUEST_TIMEOUT_S).status_code == 200
    first = claims_seen(upstream)
    assert first["exp"] - first["iat"] == 60
    sleep_until(first["exp"] + 2)  # no traffic at all meanwhile
    sts.stop()
    assert sts.popen.returncode is not None

    response, elapsed_s = timed_get(proxy.url + "/after-idle")
    assert response.status_code == 200
    assert elapsed_s < NO_STS_WAIT_S
    served = claims_seen(upstream)
    assert served["iat"] > first["iat"] and served["exp"] > time.time()
    assert len(upstream.requests) == 2


def test_a_still_valid_token_is_served_while_sts_is_down_in_the_mandatory_window(start_proxy, upstream, own_sts):
    """60 s tokens, default 5m skew: the windows follow the token (30 s advisory, 15 s
    mandatory); STS stops right after the first fetch, and with 13 s left the request
    still gets the old token, not a 502."""
    sts = own_sts("--max-token-lifetime", "60s")
    proxy = start_proxy(*pinned(upstream), env={"AWS_ENDPOINT_URL_STS": sts.url})
    assert requests.get(proxy.url + "/first", timeout=REQUEST_TIMEOUT_S).status_code == 200
    first = claims_seen(upstream)
    sts.stop()
    sleep_until(first["exp"] - 13)  # inside the mandatory window, more than 10 s left
    response, elapsed_s = timed_get(proxy.url + "/stale")
    assert time.time() < first["exp"] - 10, "the machine was too slow to test the window"
    assert response.status_code == 200
    assert claims_seen(upstream)["jti"] == first["jti"]
    assert elapsed_s < REQUEST_TIMEOUT_S
    proxy.wait_for_record(lambda r: r.get("logger") == "jwt_proxy.tokens" and r.get("level") == "warn")


@pytest.mark.parametrize(
    ("faults", "sts_calls_per_fetch"),
    [
        ({"max_token_lifetime_s": 20}, 1),
        # The hour is refused, the retry with the shortest duration (60 s) fits the session.
        ({"fail_with": "SessionDurationEscalationException", "max_session_duration_s": 120}, 2),
    ],
    ids=["local-sts-20s-tokens", "fitted-after-SessionDurationEscalationException"],
)
def test_short_tokens_cost_one_fetch_per_worker_not_one_per_request(start_proxy, upstream, sts, faults, sts_calls_per_fetch):
    workers = 2
    sts.configure(**faults)
    proxy = start_proxy(*pinned(upstream, "--workers", str(workers)))
    statuses = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(statuses) < 20:
        # A new connection each time, so both workers serve some.
        statuses.append(requests.get(proxy.url + "/", timeout=REQUEST_TIMEOUT_S, headers={"Connection": "close"}).status_code)
    assert statuses == [200] * len(statuses) and len(statuses) >= 6
    families = scrape(proxy)
    fetches = sum(s.value for s in samples_of(families, "token_fetch_count_total"))
    assert 1 <= fetches <= workers
    assert sts.calls() <= workers * sts_calls_per_fetch
    hits = sum(s.value for s in samples_of(families, "token_cache_hit_count_total"))
    assert hits >= len(statuses) - workers


def test_the_cache_and_the_metric_labels_stay_bounded(start_proxy, upstream, sts):
    """--token-cache-size 3, twelve upstream hosts named by clients (127.0.0.2..13)."""
    proxy = start_proxy("--upstream-scheme", "http", "--token-cache-size", "3")
    hosts = [f"127.0.0.{n}:{upstream.port}" for n in range(2, 14)]
    for host in hosts:
        # Nothing listens there (502 from the upstream side) but the token is minted first.
        response = requests.get(proxy.url + "/", headers={"X-Upstream-Host": host}, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 502 and response.text != "token unavailable\n"
    # The first host again: its label is one of the three admitted, and it is held again.
    requests.get(proxy.url + "/", headers={"X-Upstream-Host": hosts[0]}, timeout=REQUEST_TIMEOUT_S)
    families = scrape(proxy)
    for family in families:
        for label in ("audience", "server_address"):
            values = {s.labels[label] for s in family.samples if label in s.labels}
            assert len(values - {"_other"}) <= 3, (family.name, values)
    fetch_audiences = {s.labels["audience"] for s in samples_of(families, "token_fetch_count_total")}
    assert "_other" in fetch_audiences
    assert sum(s.value for s in samples_of(families, "token_fetch_count_total")) == len(hosts) + 1
    servers = {s.labels["server_address"] for s in samples_of(families, "http_client_request_duration_seconds_count")}
    assert "_other" in servers
    # Gauges follow what is held: three sets, and the only admitted one held is the first.
    assert [s.value for s in samples_of(families, "token_cached_audiences")] == [3]
    assert {s.labels["audience"] for s in samples_of(families, "token_expiry_timestamp_seconds")} == {"http://127.0.0.2"}
    assert sts.calls() == len(hosts) + 1


@pytest.mark.parametrize(
    ("flags", "warns"),
    [
        ((), True),
        (("--allowed-upstream-hosts", "api.example.com"), False),
        (("--upstream-host", "api.example.com"), False),
    ],
    ids=["header-mode", "header-mode-with-allowlist", "pinned"],
)
def test_header_mode_without_an_allowlist_warns_at_start(start_proxy, flags, warns):
    proxy = start_proxy(*flags)
    time.sleep(0.5)  # the warning comes before the listener binds; let the buffer reach the file
    warnings = [
        r for r in proxy.records() if r.get("level") == "warn" and "--allowed-upstream-hosts" in r.get("msg", "")
    ]
    if not warns:
        assert warnings == []
        return
    assert len(warnings) == 1
    message = warnings[0]["msg"]
    assert "any host" in message and "mint tokens" in message and "set --allowed-upstream-hosts" in message
    assert "\n" not in message
