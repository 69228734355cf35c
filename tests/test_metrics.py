"""The metrics port end to end: the real ``jwt-proxy`` CLI (gunicorn master and workers),
``jwt-proxy local-sts`` and a recording loopback upstream, scraped as Prometheus would.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BIN_DIR
from tests.conftest import REPO
from tests.conftest import free_port
from tests.upstream import RecordingUpstream
from tests.upstream import make_tls_files

pytestmark = pytest.mark.integration

POLL_TIMEOUT_S = 10.0
DASHBOARD = REPO / "conf" / "grafana-dashboard.json"
ALERTS = REPO / "conf" / "prometheus-alerts.yml"


@pytest.fixture
def upstream():
    with RecordingUpstream() as server:
        yield server


def metrics_url(proxy, path: str = "/metrics") -> str:
    return f"http://127.0.0.1:{proxy.metrics_port}{path}"


def get(url: str, **kwargs) -> requests.Response:
    return requests.get(url, timeout=10, **kwargs)


def scrape(proxy) -> str:
    response = get(metrics_url(proxy))
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return response.text


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return parse(text).get((name, frozenset(labels.items())))


def total(text: str, name: str) -> float:
    return sum(v for (sample, _), v in parse(text).items() if sample == name)


def wait_for_scrape(proxy, predicate, timeout_s: float = POLL_TIMEOUT_S) -> str:
    """The first scrape for which ``predicate(text)`` holds (request metrics are recorded
    when the server closes the response, a moment after the client has read it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = scrape(proxy)
        if predicate(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching scrape after {timeout_s}s:\n{text}")
        time.sleep(0.1)


def wait_for_status(url: str, status: int, timeout_s: float = POLL_TIMEOUT_S) -> requests.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        response = get(url)
        if response.status_code == status:
            return response
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} still {response.status_code} {response.text!r} after {timeout_s}s")
        time.sleep(0.05)


def worker_pids(master_pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{master_pid}/task").iterdir():
        found.update(int(pid) for pid in (task / "children").read_text().split())
    return found


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    return free_port()


def mixed_traffic(start_proxy, upstream, sts):
    """Header mode, one worker: 200, 404 from upstream, an extension method, a token
    failure (its own audience, so the good token stays cached) and a refused upstream."""
    proxy = start_proxy("--upstream-scheme", "http")
    good = f"127.0.0.1:{upstream.port}"
    refused = closed_port()

    def send(method, path, host):
        return requests.request(method, proxy.url + path, headers={"X-Upstream-Host": host}, timeout=10)

    assert send("GET", "/echo/secret-path-segment?q=1", good).status_code == 200
    assert send("GET", "/status/404", good).status_code == 404
    assert send("PURGE", "/echo", good).status_code == 200
    sts.configure(fail_with="AccessDenied")
    assert send("GET", "/echo", f"localhost:{upstream.port}").status_code == 502
    sts.configure(fail_with=None)
    assert send("GET", "/echo", f"127.0.0.1:{refused}").status_code == 502
    text = wait_for_scrape(proxy, lambda t: total(t, "http_server_request_duration_seconds_count") == 5)
    token = upstream.wait_for_requests(1)[0].header("Authorization").split(" ", 1)[1]
    return proxy, text, token, refused


def test_families_and_labels_after_mixed_traffic(start_proxy, upstream, sts):
    proxy, text, token, refused = mixed_traffic(start_proxy, upstream, sts)
    port = str(upstream.port)

    server_count = "http_server_request_duration_seconds_count"
    assert value(text, server_count, http_request_method="GET", http_response_status_code="200") == 1
    assert value(text, server_count, http_request_method="GET", http_response_status_code="404") == 1
    assert value(text, server_count, http_request_method="_OTHER", http_response_status_code="200") == 1
    assert value(text, server_count, http_request_method="GET", http_response_status_code="502") == 2
    assert value(text, "http_server_active_requests") == 0

    client_count = "http_client_request_duration_seconds_count"
    assert value(text, client_count, server_address="127.0.0.1", server_port=port, error_type="", token_result="ok") == 3
    assert value(text, client_count, server_address="localhost", server_port=port, error_type="", token_result="fetch_error") == 1
    assert value(
        text, client_count, server_address="127.0.0.1", server_port=str(refused), error_type="connection_refused", token_result="ok"
    ) == 1

    fetches = "token_fetch_count_total"
    assert value(text, fetches, audience="http://127.0.0.1", result="ok", error_class="") == 1
    assert value(text, fetches, audience="http://localhost", result="error", error_class="AccessDenied") == 1
    assert value(text, "token_fetch_duration_seconds_count", audience="http://127.0.0.1", result="ok") == 1
    assert value(text, "token_cache_miss_count_total", audience="http://127.0.0.1") == 1
    assert value(text, "token_cache_hit_count_total", audience="http://127.0.0.1") == 3
    assert value(text, "token_cache_miss_count_total", audience="http://localhost") == 1
    assert value(text, "token_cached_audiences") == 1
    expiry = value(text, "token_expiry_timestamp_seconds", audience="http://127.0.0.1")
    assert expiry is not None and time.time() < expiry <= time.time() + 3600 + 60
    assert value(text, "jwt_proxy_workers") == 1 and value(text, "jwt_proxy_ready_workers") == 1
    for family in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ):
        assert value(text, family) > 0, family

    # No path, query or token in any label.
    assert token not in text
    labels = {v for (_, pairs) in parse(text) for (_, v) in pairs}
    assert not any("/" in v and not v.startswith("http://") for v in labels), labels
    assert "secret-path-segment" not in text and "q=1" not in text


def test_request_counts_add_up_over_two_workers(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", "--workers", "2")
    sent = 0
    # Each worker fetches its own token on its first request: two fetches = both served.
    for _ in range(20):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: get(proxy.url + "/echo").status_code, range(8)))
        assert statuses == [200] * 8
        sent += 8
        text = scrape(proxy)
        if value(text, "token_fetch_count_total", audience="http://127.0.0.1", result="ok", error_class="") == 2:
            break
    else:
        pytest.fail("the requests never reached both workers")
    text = wait_for_scrape(proxy, lambda t: total(t, "http_server_request_duration_seconds_count") >= sent)
    assert total(text, "http_server_request_duration_seconds_count") == sent
    assert value(text, "http_server_request_duration_seconds_count", http_request_method="GET", http_response_status_code="200") == sent
    assert total(text, "http_client_request_duration_seconds_count") == sent
    assert value(text, "jwt_proxy_workers") == 2


def test_the_metrics_port_serves_only_its_paths_in_plain_http(start_proxy, upstream, tmp_path):
    tls = make_tls_files(str(tmp_path))
    proxy = start_proxy(
        "--upstream-host", f"127.0.0.1:{upstream.port}",
        "--upstream-scheme", "http",
        "--tls-cert", tls.cert_file,
        "--tls-key", tls.key_file,
        "--metrics-path", "/prom",
    )
    for path in ("/", "/metrics", "/echo", "/prom/x", "/healthz/x", "/readyz.json"):
        response = get(metrics_url(proxy, path), headers={"X-Upstream-Host": f"127.0.0.1:{upstream.port}"})
        assert response.status_code == 404, path
        assert response.text == "not found\n"
    health = get(metrics_url(proxy, "/healthz"))
    assert (health.status_code, health.text) == (200, "ok\n")
    assert "# TYPE process_cpu_seconds_total counter" in get(metrics_url(proxy, "/prom")).text
    assert upstream.requests == []
    # The proxy listener speaks TLS; the metrics listener does not.
    assert requests.get(f"https://127.0.0.1:{proxy.port}/echo", verify=tls.ca_file, timeout=10).status_code == 200


def test_readyz_is_503_until_every_worker_has_minted_its_token(start_proxy, sts):
    sts.configure(stall_s=2)
    proxy = start_proxy("--token-audience", "x", "--workers", "2")
    not_ready = get(metrics_url(proxy, "/readyz"))
    assert not_ready.status_code == 503
    assert re.fullmatch(r"[01] of 2 workers have minted the token for audience x \(see the error log\)\n", not_ready.text)
    assert get(metrics_url(proxy, "/healthz")).status_code == 200
    ready = wait_for_status(metrics_url(proxy, "/readyz"), 200)
    assert ready.text == "ready\n"
    assert sts.stats()["calls"] >= 2


def test_readyz_is_503_while_aws_credentials_do_not_resolve(start_proxy, sts):
    proxy = start_proxy(env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    proxy.wait_for_record(lambda r: r.get("msg", "").startswith("no usable AWS credentials"))
    response = get(metrics_url(proxy, "/readyz"))
    assert (response.status_code, response.text) == (503, "0 of 1 workers have resolved AWS credentials (see the error log)\n")
    assert get(metrics_url(proxy, "/healthz")).status_code == 200
    assert sts.calls() == 0


def test_readyz_is_503_while_draining_in_flight_requests(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    wait_for_status(metrics_url(proxy, "/readyz"), 200)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(lambda: get(proxy.url + "/drip?n=3&delay=0.7"))
        upstream.wait_for_requests(1)
        proxy.signal(signal.SIGTERM)
        draining = wait_for_status(metrics_url(proxy, "/readyz"), 503, timeout_s=2)
        assert not slow.done(), "the drain ended before /readyz said so"
        assert draining.text == "shutting down: finishing in-flight requests\n"
        assert get(metrics_url(proxy, "/healthz")).status_code == 200
        response = slow.result(timeout=15)
    assert response.status_code == 200 and response.content == b"chunk-0\nchunk-1\nchunk-2\n"
    assert proxy.popen.wait(15) == 0


def test_metrics_disabled_binds_nothing_and_records_nothing(start_proxy, upstream, tmp_path):
    directory = tmp_path / "multiproc"
    directory.mkdir()
    proxy = start_proxy(
        "--upstream-host", f"127.0.0.1:{upstream.port}",
        "--upstream-scheme", "http",
        "--metrics-enabled=false",
        env={"PROMETHEUS_MULTIPROC_DIR": str(directory), "TMPDIR": str(tmp_path)},
    )
    assert get(proxy.url + "/echo").status_code == 200
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", proxy.metrics_port)) != 0
    assert proxy.stop() == 0
    assert list(directory.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name != "multiproc"] == []


def test_a_killed_workers_gauges_disappear(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    wait_for_status(metrics_url(proxy, "/readyz"), 200)  # the worker is up
    [worker] = worker_pids(proxy.pid)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(lambda: requests.get(proxy.url + "/drip?n=20&delay=0.5", timeout=15, stream=True).raw.read())
        upstream.wait_for_requests(1)
        text = wait_for_scrape(proxy, lambda t: value(t, "http_server_active_requests") == 1)
        assert value(text, "token_cached_audiences") == 1
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(Exception):
            held.result(timeout=15)
    # The replacement worker starts at zero, and the dead one no longer counts (without
    # child_exit -> mark_process_dead its in-flight request would stay counted forever).
    text = wait_for_scrape(
        proxy,
        lambda t: value(t, "http_server_active_requests") == 0
        and value(t, "token_cached_audiences") == 0
        and value(t, "jwt_proxy_workers") == 1,
    )
    assert worker not in worker_pids(proxy.pid)
    # Counters keep what the dead worker recorded.
    assert value(text, "token_fetch_count_total", audience="http://127.0.0.1", result="ok", error_class="") == 1


def test_the_multiproc_dir_is_private_and_removed_at_exit(start_proxy, upstream, tmp_path):
    proxy = start_proxy(
        "--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", env={"TMPDIR": str(tmp_path)}
    )
    [directory] = tmp_path.glob("jwt-proxy-metrics-*")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert directory.stat().st_uid == os.getuid()
    assert get(proxy.url + "/echo").status_code == 200
    assert any(p.suffix == ".db" for p in directory.iterdir())
    assert proxy.stop() == 0
    assert not directory.exists()


def test_a_given_multiproc_dir_is_emptied_at_start_and_kept(start_proxy, upstream, tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"a previous run's values")
    (directory / "README").write_text("not a value file")
    proxy = start_proxy(
        "--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http",
        env={"PROMETHEUS_MULTIPROC_DIR": str(directory)},
    )
    assert not (directory / "counter_999999.db").exists()
    assert get(proxy.url + "/echo").status_code == 200
    wait_for_scrape(proxy, lambda t: total(t, "http_server_request_duration_seconds_count") == 1)
    assert proxy.stop() == 0
    assert (directory / "README").exists()


def test_plain_gunicorn_serves_the_same_metrics_port(start_proxy, upstream, tmp_path):
    proxy = start_proxy(
        command=[str(BIN_DIR / "gunicorn"), "-c", str(REPO / "conf" / "gunicorn.conf.py")],
        env={
            "UPSTREAM_HOST": f"127.0.0.1:{upstream.port}",
            "UPSTREAM_SCHEME": "http",
            "WORKERS": "1",
            "THREADS": "4",
            "TMPDIR": str(tmp_path),
        },
    )
    [directory] = tmp_path.glob("jwt-proxy-metrics-*")
    wait_for_status(metrics_url(proxy, "/readyz"), 200)
    assert get(proxy.url + "/echo").status_code == 200
    text = wait_for_scrape(proxy, lambda t: total(t, "http_server_request_duration_seconds_count") == 1)
    assert value(text, "token_fetch_count_total", audience="http://127.0.0.1", result="ok", error_class="") == 1
    assert proxy.stop() == 0
    assert not directory.exists()


# -- conf/: the dashboard and the alerts query only metrics that exist ---------------------

PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords dropped)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word = match.group()
        follows = expr[match.end():].lstrip()[:1]
        if word.lower() in PROMQL_WORDS or follows == "(" or word.startswith("$"):
            continue
        if expr[match.start() - 1:match.start()] == "$":
            continue  # a Grafana variable
        names.add(word)
    return names


def dashboard_exprs() -> list[str]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_metric_names_parse_out_of_promql():
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(x_bucket{instance=~"$instance"}[$__rate_interval])))'
        " / on (audience) y - time() > 0 and bool z"
    ) == {"x_bucket", "y", "z"}


def test_the_dashboard_and_alerts_query_only_metrics_a_scrape_has(start_proxy, upstream, sts):
    _, text, _, _ = mixed_traffic(start_proxy, upstream, sts)
    exposed = {name for (name, _) in parse(text)}
    dashboard, alerts = dashboard_exprs(), alert_exprs()
    assert len(dashboard) >= 7 and len(alerts) >= 4
    queried = set().union(*(metric_names(expr) for expr in dashboard + alerts))
    assert queried - exposed == set()
    for needed in (
        "http_server_request_duration_seconds_count",
        "http_server_request_duration_seconds_bucket",
        "http_client_request_duration_seconds_count",
        "token_fetch_count_total",
        "token_cache_hit_count_total",
        "token_cache_miss_count_total",
        "token_cached_audiences",
        "token_expiry_timestamp_seconds",
        "jwt_proxy_ready_workers",
    ):
        assert needed in queried, needed
    alert_names = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    assert len(alert_names) == len(alerts)
