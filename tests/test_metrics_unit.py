"""metrics.py without gunicorn: several "workers" are faked in one process.

As prometheus_client's own tests do (``tests/test_multiprocess.py``), each fake worker
swaps ``values.ValueClass`` for a ``MultiProcessValue`` with its own pid, over a private
temporary ``PROMETHEUS_MULTIPROC_DIR``; the master's side is a ``MultiProcessCollector``
over that directory, or the listener's WSGI app called directly.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import threading
import types
import typing as t
import urllib.request
from wsgiref.util import setup_testing_defaults

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest
from prometheus_client import values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from jwt_proxy import metrics
from jwt_proxy.app import observe_exchanges
from jwt_proxy import server
from jwt_proxy.tokens import Token
from jwt_proxy.tokens import TokenStore
from jwt_proxy.tokens import TokenUnavailable

NOW = 1_800_000_000.0


@pytest.fixture
def multiproc(tmp_path, monkeypatch):
    """Returns ``worker(pid) -> WorkerMetrics`` writing as process ``pid`` into ``tmp_path``."""
    monkeypatch.setenv(metrics.MULTIPROC_DIR_ENV, str(tmp_path))
    original = values.ValueClass
    made = []

    def worker(pid: int, clock=lambda: NOW) -> metrics.WorkerMetrics:
        values.ValueClass = values.MultiProcessValue(lambda: pid)
        made.append(values.ValueClass)
        return metrics.WorkerMetrics(clock=clock, recount_every_s=None)

    yield worker
    for value_class in made:
        value_class.close_all_files()
    values.ValueClass = original


def scrape(path) -> str:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def call(app, method="GET", path="/", status="200 OK"):
    """Run a WSGI request through ``app``; returns (status, body, closed-flag holder)."""
    environ = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD=method, PATH_INFO=path, QUERY_STRING="")
    seen = {}

    def start_response(line, headers, exc_info=None):
        seen["status"] = line
        seen["headers"] = headers

    body = app(environ, start_response)
    data = b"".join(body)
    if hasattr(body, "close"):
        body.close()
    return seen.get("status"), data


# -- recording ------------------------------------------------------------------------


def test_request_counts_add_up_over_workers_and_unknown_methods_fold_to_other(multiproc, tmp_path):
    def app(environ, start_response):
        start_response("404 Not Found" if environ["PATH_INFO"] == "/missing" else "200 OK", [])
        return [b"x"]

    first = observe_exchanges(app, multiproc(101))
    call(first, "GET", "/a")
    call(first, "PURGE", "/a")
    second = observe_exchanges(app, multiproc(102))
    call(second, "GET", "/b")
    call(second, "get", "/missing")  # methods are case-sensitive: "get" is not GET

    text = scrape(tmp_path)
    count = "http_server_request_duration_seconds_count"
    assert value(text, count, http_request_method="GET", http_response_status_code="200") == 2
    assert value(text, count, http_request_method="_OTHER", http_response_status_code="200") == 1
    assert value(text, count, http_request_method="_OTHER", http_response_status_code="404") == 1
    assert "/a" not in text and "/missing" not in text


def test_in_flight_requests_are_summed_over_live_workers_and_a_dead_one_drops_out(multiproc, tmp_path):
    def app(environ, start_response):
        start_response("200 OK", [])
        return iter([b"streaming"])

    environ = {}
    setup_testing_defaults(environ)
    open_bodies = []
    for pid in (201, 202):
        wrapped = observe_exchanges(app, multiproc(pid))
        open_bodies.append(wrapped(dict(environ), lambda *a: None))  # body not closed: in flight
    assert value(scrape(tmp_path), "http_server_active_requests") == 2

    metrics.mark_process_dead(201)
    assert value(scrape(tmp_path), "http_server_active_requests") == 1
    open_bodies[1].close()
    text = scrape(tmp_path)
    assert value(text, "http_server_active_requests") == 0
    assert value(text, "http_server_request_duration_seconds_count", http_request_method="GET", http_response_status_code="200") == 1


def test_an_app_that_raises_is_counted_as_500_and_leaves_nothing_in_flight(multiproc, tmp_path):
    def broken(environ, start_response):
        raise RuntimeError("boom")

    wrapped = observe_exchanges(broken, multiproc(301))
    with pytest.raises(RuntimeError):
        call(wrapped)
    text = scrape(tmp_path)
    assert value(text, "http_server_active_requests") == 0
    assert value(text, "http_server_request_duration_seconds_count", http_request_method="GET", http_response_status_code="500") == 1


def test_the_wrapped_body_is_closed_once_and_observed_once_however_often_the_server_closes_it(multiproc, tmp_path):
    closed = []

    class Body:
        def __iter__(self):
            return iter([b"a", b"b"])

        def close(self):
            closed.append(True)

    def app(environ, start_response):
        start_response("201 Created", [])
        return Body()

    wrapped = observe_exchanges(app, multiproc(401))
    environ = {}
    setup_testing_defaults(environ)
    body = wrapped(environ, lambda *a: None)
    assert b"".join(body) == b"ab"
    body.close()
    body.close()
    assert closed == [True]
    assert value(scrape(tmp_path), "http_server_request_duration_seconds_count", http_request_method="GET", http_response_status_code="201") == 1


def test_upstream_labels_are_empty_rather_than_missing(multiproc, tmp_path):
    recorder = multiproc(501)
    recorder.observe_upstream("api.example.com", "", "", metrics.TOKEN_OK, 0.2)
    recorder.observe_upstream("api.example.com", "8443", "timeout", metrics.TOKEN_OK, 30.0)
    recorder.observe_upstream("api.example.com", "", "", metrics.TOKEN_FETCH_ERROR, 0.01)
    text = scrape(tmp_path)
    count = "http_client_request_duration_seconds_count"
    assert value(text, count, server_address="api.example.com", server_port="", error_type="", token_result="ok") == 1
    assert value(text, count, server_address="api.example.com", server_port="8443", error_type="timeout", token_result="ok") == 1
    assert value(text, count, server_address="api.example.com", server_port="", error_type="", token_result="fetch_error") == 1
    # The exposition writes the empty label out; Prometheus drops empty labels at ingestion.
    assert 'server_port=""' in text


def test_fetches_are_counted_by_result_and_error_class(multiproc, tmp_path):
    recorder = multiproc(601)
    outcomes = iter(
        [
            Token("jwt-ok", NOW + 3600),
            TokenUnavailable(("a", "b"), "AccessDenied", "denied"),
            RuntimeError("bug"),
            Token("jwt-stale", NOW - 1),
        ]
    )

    def fetch(audiences):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    fetch_and_record = recorder.instrument_fetch(fetch)
    assert fetch_and_record(("a", "b")).value == "jwt-ok"
    for _ in range(2):
        with pytest.raises(Exception):
            fetch_and_record(("a", "b"))
    fetch_and_record(("a", "b"))

    text = scrape(tmp_path)
    fetches = "token_fetch_count_total"
    assert value(text, fetches, audience="a,b", result="ok", error_class="") == 1
    assert value(text, fetches, audience="a,b", result="error", error_class="AccessDenied") == 1
    assert value(text, fetches, audience="a,b", result="error", error_class="internal") == 1
    assert value(text, fetches, audience="a,b", result="error", error_class="expired") == 1
    assert value(text, "token_fetch_duration_seconds_count", audience="a,b", result="error") == 3
    # The expiry is that of the token being served: the stale one was refused.
    assert value(text, "token_expiry_timestamp_seconds", audience="a,b") == NOW + 3600
    assert "jwt-ok" not in text and "jwt-stale" not in text


def recorded_store(recorder: t.Any, now: list[float], **options: t.Any) -> TokenStore:
    """A store of hour-long tokens on the clock ``now[0]``, observed by ``recorder``."""
    return TokenStore(
        recorder.instrument_fetch(lambda audiences: Token("jwt", now[0] + 3600)),
        refresh_skew_s=300,
        clock=lambda: now[0],
        on_lookup=recorder.token_lookup,
        **options,
    )


def test_cache_hits_and_misses_come_from_the_token_store_observer(multiproc, tmp_path):
    recorder = multiproc(701)
    now = [NOW]
    store = recorded_store(recorder, now)
    store.get(("b", "a", "b"))
    store.get(("a", "b"))
    store.get(("a", "b"))
    text = scrape(tmp_path)
    assert value(text, "token_cache_miss_count_total", audience="a,b") == 1
    assert value(text, "token_cache_hit_count_total", audience="a,b") == 2
    assert value(text, "token_fetch_count_total", audience="a,b", result="ok", error_class="") == 1
    assert value(text, "token_cached_audiences") == 1


def test_cached_audiences_is_the_largest_count_and_expiry_the_latest_of_live_workers(multiproc, tmp_path):
    clock = lambda: NOW  # noqa: E731
    first = multiproc(801, clock)
    fetch = first.instrument_fetch(lambda audiences: Token("jwt", NOW + 600))
    fetch(("a",))
    fetch(("b",))
    second = multiproc(802, clock)
    second.instrument_fetch(lambda audiences: Token("jwt", NOW + 3600))(("a",))

    text = scrape(tmp_path)
    assert value(text, "token_cached_audiences") == 2
    assert value(text, "token_expiry_timestamp_seconds", audience="a") == NOW + 3600
    assert value(text, "token_expiry_timestamp_seconds", audience="b") == NOW + 600

    metrics.mark_process_dead(801)
    text = scrape(tmp_path)
    assert value(text, "token_cached_audiences") == 1
    assert value(text, "token_expiry_timestamp_seconds", audience="b") is None


def test_an_expired_token_stops_counting_as_cached(multiproc, tmp_path):
    now = [NOW]
    recorder = multiproc(901, lambda: now[0])
    recorder.instrument_fetch(lambda audiences: Token("jwt", NOW + 60))(("a",))
    assert value(scrape(tmp_path), "token_cached_audiences") == 1
    now[0] = NOW + 61
    recorder.token_lookup(("a",), False)
    assert value(scrape(tmp_path), "token_cached_audiences") == 0


def test_ready_workers_counts_live_ready_workers(multiproc, tmp_path):
    multiproc(1001).mark_ready()
    multiproc(1002)  # built, not ready yet
    assert metrics.ready_workers(str(tmp_path)) == 1
    text = scrape(tmp_path)
    assert value(text, "jwt_proxy_workers") == 2
    assert value(text, "jwt_proxy_ready_workers") == 1
    metrics.mark_process_dead(1001)
    assert metrics.ready_workers(str(tmp_path)) == 0


def test_ready_workers_is_zero_in_an_empty_directory(tmp_path):
    assert metrics.ready_workers(str(tmp_path)) == 0


# -- the master's listener --------------------------------------------------------------


@pytest.fixture
def listener(multiproc, tmp_path):
    state = {"reason": None}
    recorder = multiproc(1101)
    recorder.observe_request("GET", "200", 0.1)
    made = metrics.MetricsListener(
        "127.0.0.1",
        0,
        "/custom-metrics",
        readiness=lambda: state["reason"],
        worker_pids=lambda: [os.getpid()],
        multiproc_dir=str(tmp_path),
    )
    made.state = state
    yield made
    made.stop()


def test_the_listener_serves_metrics_only_at_its_path(listener):
    status, body = call(listener.wsgi, path="/custom-metrics")
    assert status.startswith("200")
    text = body.decode()
    assert value(text, "http_server_request_duration_seconds_count", http_request_method="GET", http_response_status_code="200") == 1
    for family in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"):
        assert f"\n{family} " in text
    for path in ("/metrics", "/", "/custom-metrics/x", "/healthz/"):
        status, body = call(listener.wsgi, path=path)
        assert status.startswith("404"), path
        assert body == b"not found\n"


def test_process_metrics_add_up_master_and_workers(listener):
    alone = metrics._ProcessGroupCollector(lambda: [])
    doubled = metrics._ProcessGroupCollector(lambda: [os.getpid()])

    def read(collector):
        return {sample.name: sample.value for family in collector.collect() for sample in family.samples}

    one, two = read(alone), read(doubled)
    assert two["process_resident_memory_bytes"] > one["process_resident_memory_bytes"] * 1.5
    assert two["process_start_time_seconds"] == one["process_start_time_seconds"]
    assert two["process_max_fds"] == one["process_max_fds"]


def test_healthz_and_readyz(listener):
    assert call(listener.wsgi, path="/healthz") == ("200 OK", b"ok\n")
    assert call(listener.wsgi, path="/readyz") == ("200 OK", b"ready\n")
    listener.state["reason"] = "0 of 2 workers have resolved AWS credentials\nsecond line"
    status, body = call(listener.wsgi, path="/readyz")
    assert status.startswith("503")
    assert body == b"0 of 2 workers have resolved AWS credentials second line\n"
    assert call(listener.wsgi, method="HEAD", path="/healthz") == ("200 OK", b"")
    assert call(listener.wsgi, method="POST", path="/healthz")[0].startswith("405")


def test_a_readiness_check_that_raises_reads_as_not_ready(listener):
    def broken():
        raise OSError("gone")

    listener._readiness = broken
    status, body = call(listener.wsgi, path="/readyz")
    assert status.startswith("503")
    assert body == b"readiness check failed: OSError\n"


def test_the_listener_serves_over_http_and_refuses_a_busy_address(listener, tmp_path):
    listener.start()
    with urllib.request.urlopen(f"http://127.0.0.1:{listener.port}/healthz", timeout=5) as response:
        assert response.read() == b"ok\n"
    with pytest.raises(OSError):
        metrics.MetricsListener(
            "127.0.0.1", listener.port, "/metrics", readiness=lambda: None, worker_pids=list, multiproc_dir=str(tmp_path)
        )


# -- server.py: the multiprocess directory and readiness ------------------------------------


def test_a_private_directory_is_made_when_none_is_set_and_removed_only_by_its_maker(monkeypatch, tmp_path):
    monkeypatch.delenv(metrics.MULTIPROC_DIR_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(server, "_owned_multiproc_dir", None)
    path = server.use_private_multiproc_dir()
    assert path is not None and os.environ[metrics.MULTIPROC_DIR_ENV] == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert os.path.dirname(path) == str(tmp_path)

    # A worker unwinding through the CLI's ``finally`` has another pid: it must not remove it.
    owner = server._owned_multiproc_dir
    monkeypatch.setattr(server, "_owned_multiproc_dir", (path, owner[1] + 1))
    server.remove_private_multiproc_dir()
    assert os.path.isdir(path)
    monkeypatch.setattr(server, "_owned_multiproc_dir", owner)
    server.remove_private_multiproc_dir()
    assert not os.path.exists(path)


def test_a_directory_named_by_the_environment_is_kept_and_only_its_value_files_wiped(monkeypatch, tmp_path):
    given = tmp_path / "run"
    monkeypatch.setenv(metrics.MULTIPROC_DIR_ENV, str(given))
    monkeypatch.setattr(server, "_owned_multiproc_dir", None)
    assert server.use_private_multiproc_dir() is None
    server.prepare_multiproc_dir(str(given))  # made when missing
    (given / "counter_123.db").write_bytes(b"stale")
    (given / "gauge_livesum_123.db").write_bytes(b"stale")
    (given / "notes.txt").write_text("not ours")
    server.prepare_multiproc_dir(str(given))
    assert sorted(p.name for p in given.iterdir()) == ["notes.txt"]
    server.remove_private_multiproc_dir()
    assert given.is_dir()


def test_readiness_reasons(monkeypatch, multiproc, tmp_path):
    from jwt_proxy.config import Config

    arbiter = types.SimpleNamespace(num_workers=2)
    with_audience = Config.from_options(token_audience=["https://api.example.com"], region="us-east-1")
    derived = Config.from_options(region="us-east-1")
    monkeypatch.setattr(server, "_shutting_down", threading.Event())

    multiproc(1201).mark_ready()
    multiproc(1202)
    assert server.readiness(with_audience, arbiter) == (
        "1 of 2 workers have minted the token for audience https://api.example.com (see the error log)"
    )
    assert server.readiness(derived, arbiter) == "1 of 2 workers have resolved AWS credentials (see the error log)"
    multiproc(1203).mark_ready()
    assert server.readiness(derived, arbiter) is None
    server._shutting_down.set()
    assert server.readiness(derived, arbiter) == "shutting down: finishing in-flight requests"


def test_metrics_hooks_are_in_the_gunicorn_options_only_when_enabled():
    from jwt_proxy.config import Config

    enabled = server.gunicorn_options(Config.from_options(region="us-east-1"))
    disabled = server.gunicorn_options(Config.from_options(metrics_enabled="false", region="us-east-1"))
    metrics_only = {"child_exit", "worker_exit", "on_exit"}
    assert metrics_only <= enabled.keys()
    assert not metrics_only & disabled.keys()
    # Always: on_starting checks and binds --listen-addr (with metrics it also prepares
    # them), pre_fork/post_fork give each worker its socket, when_ready notes SIGTERM.
    always = {"on_starting", "pre_fork", "post_fork", "when_ready"}
    assert always <= enabled.keys() and always <= disabled.keys()
    assert enabled["on_starting"] is not disabled["on_starting"]



def test_nothing_imports_prometheus_client_before_the_multiproc_dir_is_settled():
    code = (
        "import sys, jwt_proxy.cli, jwt_proxy.server, jwt_proxy.app;"
        "assert 'prometheus_client' not in sys.modules, 'imported too early'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# -- bounded labels and gauges that follow the token store --------------------------------


def listener_scrape(tmp_path) -> str:
    made = metrics.MetricsListener(
        "127.0.0.1", 0, "/metrics", readiness=lambda: None, worker_pids=lambda: [], multiproc_dir=str(tmp_path)
    )
    try:
        status, body = call(made.wsgi, path="/metrics")
    finally:
        made.stop()
    assert status.startswith("200")
    return body.decode()


def label_values(text: str, family: str, label: str) -> set[str]:
    return {
        sample.labels[label]
        for parsed in text_string_to_metric_families(text)
        if parsed.name == family
        for sample in parsed.samples
        if label in sample.labels
    }


def test_audience_and_server_labels_stop_at_the_limit_across_workers(multiproc, tmp_path):
    # One fake worker after the other: label children take the value class current when made.
    for index in range(40):
        if index in (0, 20):
            recorder = multiproc(1201 + index)
            recorder.set_label_limit(3)
        audiences = (f"http://127.0.0.{index}",)
        recorder.instrument_fetch(lambda a: Token("jwt", NOW + 3600))(audiences)
        recorder.token_lookup(audiences, True)
        recorder.observe_upstream(f"127.0.0.{index}", "8080", "", "ok", 0.01)
    text = listener_scrape(tmp_path)
    for family in ("token_fetch_count", "token_fetch_duration_seconds", "token_cache_hit_count", "token_cache_miss_count", "token_expiry_timestamp_seconds"):
        audiences = label_values(text, family, "audience")
        named = audiences - {metrics.OTHER_LABEL}
        assert len(named) <= 3, (family, audiences)
    fetches = sum(v for (name, _), v in samples(text).items() if name == "token_fetch_count_total")
    assert fetches == 40  # nothing lost: the rest is counted under _other
    assert value(text, "token_cache_hit_count_total", audience=metrics.OTHER_LABEL) == 37
    servers = label_values(text, "http_client_request_duration_seconds", "server_address")
    assert len(servers - {metrics.OTHER_LABEL}) == 3 and metrics.OTHER_LABEL in servers
    assert value(
        text, "http_client_request_duration_seconds_count", server_address="_other", server_port="", error_type="", token_result="ok"
    ) == 37


def test_a_dropped_set_leaves_the_expiry_gauge_and_the_cached_count(multiproc, tmp_path):
    recorder = multiproc(1301)
    now = [NOW]
    store = recorded_store(recorder, now, on_drop=recorder.token_dropped, max_sets=2, background_refresh=False)
    for name in ("a", "b", "c"):
        store.get((name,))
        now[0] += 1
    text = listener_scrape(tmp_path)
    assert label_values(text, "token_expiry_timestamp_seconds", "audience") == {"b", "c"}
    assert value(text, "token_cached_audiences") == 2
    assert value(text, "token_expiry_timestamp_seconds", audience="c") == NOW + 2 + 3600


def test_label_budget_without_a_directory_is_per_process():
    budget = metrics.LabelBudget("audience", 2, None)
    assert [budget.label(v) for v in ("a", "b", "c", "a", "d", "b")] == ["a", "b", "_other", "a", "_other", "b"]
