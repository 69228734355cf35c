"""Prometheus metrics: what each worker records, and the listener the master serves them on.

The only module that imports prometheus_client. It runs in multiprocess mode: every
gunicorn worker writes its values to memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR``, and the master's metrics listener adds them up per scrape
with a fresh registry holding a ``MultiProcessCollector``. The mode is chosen when
prometheus_client is first imported, so this module must not be imported before that
variable is settled: ``jwt_proxy.cli`` (or, under plain gunicorn, the ``on_starting`` hook
of ``jwt_proxy.server``) sets it first, and ``app``/``server`` import this module lazily,
only when metrics are enabled.

Names and labels are the Go proxy's, so its dashboards work. Label
values come from bounded sets only: methods are folded to the nine standard ones or
``_OTHER``, and nothing ever carries a request path or a token. A label that "is only
there" on some observations (``server_port``, ``error_type``) has the empty value
elsewhere, because prometheus_client needs the same label names on every sample of a
family; Prometheus treats an empty label as an absent one.

How each gauge adds up over the workers (prometheus_client's multiprocess modes; the
``live`` ones forget a worker once the master calls :func:`mark_process_dead`):

=================================== =========== ========================================
``http_server_active_requests``     ``livesum`` requests in flight in all live workers
``token_cached_audiences``          ``livemax`` the most audience sets any worker holds
``token_expiry_timestamp_seconds``  ``livemax`` the latest expiry any worker serves
``jwt_proxy_workers``               ``livesum`` live workers whose app is built
``jwt_proxy_ready_workers``         ``livesum`` of those, the ones that are ready
=================================== =========== ========================================

Label values that clients choose are bounded as well: the first ``--token-cache-size``
distinct ``audience`` values (at most :data:`MAX_LABEL_LIMIT`) get their own series, and
as many ``server_address`` (with ``server_port``) values; later ones are all counted
under ``_other``. The workers share the admitted values through a small file in the
multiprocess directory, so the bound holds for the whole process tree, and neither the
files nor a scrape grow with the number of hosts clients name. A dropped audience set's expiry gauge is set to 0, which
the scrape leaves out: ``token_expiry_timestamp_seconds`` shows only sets really held.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import socket
import socketserver
import threading
import time
import typing as t
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler
from wsgiref.simple_server import WSGIServer
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client import make_wsgi_app
from prometheus_client import multiprocess
from prometheus_client.core import CounterMetricFamily
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from .serving import ServingThread
from .tokens import EXPIRED_ERROR_CLASS
from .tokens import INTERNAL_ERROR_CLASS
from .tokens import AudienceSet
from .tokens import Token
from .tokens import TokenUnavailable

if t.TYPE_CHECKING:
    from collections.abc import Iterable
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

__all__ = [
    "MULTIPROC_DIR_ENV",
    "MetricsListener",
    "WorkerMetrics",
    "mark_process_dead",
    "ready_workers",
]

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# The request methods OpenTelemetry's http_request_method keeps; any other is "_OTHER".
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))
OTHER_METHOD = "_OTHER"

# token_result: how getting the token for an upstream request went.
TOKEN_OK = "ok"
TOKEN_FETCH_ERROR = "fetch_error"
# Kept from the Go proxy's label values. jwt-proxy derives the audience from an upstream
# that routing has already accepted, which cannot fail, so it never records this one.
TOKEN_RESOLVER_ERROR = "resolver_error"

# token_fetch_count_total / token_fetch_duration_seconds: result of one STS call.
FETCH_OK = "ok"
FETCH_ERROR = "error"
# error_class on a successful fetch: empty, which Prometheus treats as no label.
NO_ERROR_CLASS = ""

# OpenTelemetry's advisory buckets for http.server/http.client.request.duration.
HTTP_DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# An STS call takes tens of milliseconds, or up to --upstream-timeout (30 s by default).
TOKEN_FETCH_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The label value that stands for every value past the bound.
OTHER_LABEL = "_other"
DEFAULT_LABEL_LIMIT = 256
# Whatever --token-cache-size is, no more values than this per label: a server_address
# costs a whole histogram (17 lines per error_type and token_result), and at 100 of
# them with their audiences /metrics stays well under 1 MB.
MAX_LABEL_LIMIT = 100
EXPIRY = "token_expiry_timestamp_seconds"
# An expiry gauge at this value means "not held": the scrape leaves it out.
NOT_HELD = 0.0

# token_cached_audiences counts sets whose token has not expired; a worker with no
# traffic re-counts this often, so a token that ran out while idle stops counting.
CACHED_AUDIENCES_RECOUNT_S = 15.0

WORKERS = "jwt_proxy_workers"
READY_WORKERS = "jwt_proxy_ready_workers"

# The metrics port answers these besides the metrics path.
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
# A metrics-port client that sends nothing is dropped after this long.
LISTENER_IO_TIMEOUT_S = 10.0

# process_* over the master and its live workers: these are added up, the others are the
# master's own (start time, fd limit).
_SUMMED_PROCESS_SAMPLES = (
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
)


def mark_process_dead(pid: int) -> None:
    """Forget a worker's ``live*`` gauges (from gunicorn's ``child_exit``/``worker_exit``).

    Its counters and histograms stay, so totals never go backwards.
    """
    path = os.environ.get(MULTIPROC_DIR_ENV)
    if path:
        multiprocess.mark_process_dead(pid, path)


def ready_workers(path: str | None = None) -> int:
    """How many live workers say they are ready: the ``jwt_proxy_ready_workers`` sum.

    Read by the master for ``/readyz``; only the ``livesum`` files are opened.
    """
    path = path or os.environ.get(MULTIPROC_DIR_ENV, "")
    files = glob.glob(os.path.join(path, "gauge_livesum_*.db"))
    for metric in multiprocess.MultiProcessCollector.merge(files, accumulate=False):
        if metric.name == READY_WORKERS:
            return int(sum(sample.value for sample in metric.samples))
    return 0


class WorkerMetrics:
    """The metric objects of one worker process, and cheap ways to record into them.

    Made once per worker, after the fork (by ``create_app``). The metric objects are not
    registered anywhere: in multiprocess mode the values live in files, and the master's
    listener reads those. Label children are looked up once and kept, so the request path
    does a dict lookup and a file write per observation, never registry work.

    :param clock: epoch seconds, for telling expired tokens from cached ones.
    :param recount_every_s: how often an idle worker re-counts its unexpired tokens;
        ``None`` never (tests).
    :param counts_as_worker: false for the token agent process, which records token
        metrics but is not a gunicorn worker (``jwt_proxy_workers`` stays as it is).
    """

    def __init__(
        self,
        *,
        clock: t.Callable[[], float] = time.time,
        recount_every_s: float | None = CACHED_AUDIENCES_RECOUNT_S,
        counts_as_worker: bool = True,
        label_limit: int = DEFAULT_LABEL_LIMIT,
    ) -> None:
        self._clock = clock
        self.set_label_limit(label_limit)
        self._recount_every_s = recount_every_s
        self.request_duration = Histogram(
            "http_server_request_duration_seconds",
            "Duration of inbound HTTP requests, until the response body is sent.",
            ("http_request_method", "http_response_status_code"),
            buckets=HTTP_DURATION_BUCKETS_S,
            registry=None,
        )
        self.active_requests = Gauge(
            "http_server_active_requests",
            "Inbound HTTP requests in flight.",
            multiprocess_mode="livesum",
            registry=None,
        )
        self.upstream_duration = Histogram(
            "http_client_request_duration_seconds",
            "Duration of upstream requests until their response headers (or the token wait, "
            "when no token could be had).",
            ("server_address", "server_port", "error_type", "token_result"),
            buckets=HTTP_DURATION_BUCKETS_S,
            registry=None,
        )
        self.token_fetches = Counter(
            "token_fetch_count_total",
            "STS GetWebIdentityToken calls, by audience set, result and AWS error code.",
            ("audience", "result", "error_class"),
            registry=None,
        )
        self.token_fetch_duration = Histogram(
            "token_fetch_duration_seconds",
            "Duration of STS GetWebIdentityToken calls.",
            ("audience", "result"),
            buckets=TOKEN_FETCH_BUCKETS_S,
            registry=None,
        )
        self.cache_hits = Counter(
            "token_cache_hit_count_total",
            "Token lookups answered from the cache.",
            ("audience",),
            registry=None,
        )
        self.cache_misses = Counter(
            "token_cache_miss_count_total",
            "Token lookups that had to wait for a fetch (or met a remembered failure).",
            ("audience",),
            registry=None,
        )
        self.cached_audiences = Gauge(
            "token_cached_audiences",
            "Audience sets with an unexpired token (the largest count of any live worker).",
            multiprocess_mode="livemax",
            registry=None,
        )
        self.token_expiry = Gauge(
            EXPIRY,
            "When the token served for an audience set expires (the latest of any live worker).",
            ("audience",),
            multiprocess_mode="livemax",
            registry=None,
        )
        self.workers = Gauge(WORKERS, "Live workers whose app is built.", multiprocess_mode="livesum", registry=None)
        self.ready = Gauge(
            READY_WORKERS,
            "Live workers that are ready: credentials resolve and the configured audiences' token is minted.",
            multiprocess_mode="livesum",
            registry=None,
        )
        self.workers.set(1 if counts_as_worker else 0)
        self.ready.set(0)
        self.cached_audiences.set(0)
        self._server_children: dict[tuple[str, str], t.Any] = {}
        self._upstream_children: dict[tuple[str, str, str, str], t.Any] = {}
        # Only sets whose label was admitted are remembered here; the rest share one entry.
        self._audience_children: dict[AudienceSet, tuple[str, t.Any, t.Any]] = {}
        self._other_audience: tuple[str, t.Any, t.Any] | None = None
        # Expiry of every set the token store holds (it reports drops), by set.
        self._expiries: dict[AudienceSet, float] = {}
        self._cached_count = 0
        self._count_lock = threading.Lock()
        self._recounter: threading.Thread | None = None

    def set_label_limit(self, limit: int) -> None:
        """How many distinct ``audience`` and ``server_address`` values get their own series:
        ``limit``, at most :data:`MAX_LABEL_LIMIT`.

        Called with ``--token-cache-size`` before anything is recorded.
        """
        limit = min(limit, MAX_LABEL_LIMIT)
        directory = os.environ.get(MULTIPROC_DIR_ENV) or None
        self._audience_labels = LabelBudget("audience", limit, directory)
        self._server_labels = LabelBudget("server_address", limit, directory)

    # -- inbound requests ----------------------------------------------------------------

    def request_started(self) -> None:
        """A request came in (``jwt_proxy.app.observe_exchanges``): one more in flight."""
        self.active_requests.inc()

    def request_finished(self, method: str, status: str, duration_s: float) -> None:
        """Its body was sent, or the client left: one fewer in flight, and its duration."""
        self.active_requests.dec()
        self.observe_request(method, status, duration_s)

    def observe_request(self, method: str, status: str, duration_s: float) -> None:
        if method not in HTTP_METHODS:
            method = OTHER_METHOD
        key = (method, status)
        child = self._server_children.get(key)
        if child is None:
            child = self._server_children[key] = self.request_duration.labels(method, status)
        child.observe(duration_s)

    # -- upstream requests ---------------------------------------------------------------

    def observe_upstream(
        self, address: str, port: str, error_type: str, token_result: str, duration_s: float
    ) -> None:
        """One upstream request: ``port`` is ``""`` for the scheme's default, ``error_type``
        ``""`` unless the exchange failed (``timeout``, ``connection_refused``, ``unknown``).
        An address past the label bound is counted as ``_other`` (with no port)."""
        if self._server_labels.label(f"{address}:{port}") == OTHER_LABEL:
            address, port = OTHER_LABEL, ""
        key = (address, port, error_type, token_result)
        child = self._upstream_children.get(key)
        if child is None:
            child = self._upstream_children[key] = self.upstream_duration.labels(*key)
        child.observe(duration_s)

    # -- tokens --------------------------------------------------------------------------

    def _audience(self, audiences: AudienceSet) -> tuple[str, t.Any, t.Any]:
        """The label of ``audiences`` and its cache hit and miss counters."""
        entry = self._audience_children.get(audiences)
        if entry is not None:
            return entry
        label = self._audience_labels.label(",".join(audiences))
        if label == OTHER_LABEL:
            if self._other_audience is None:
                self._other_audience = (label, self.cache_hits.labels(label), self.cache_misses.labels(label))
            return self._other_audience
        entry = (label, self.cache_hits.labels(label), self.cache_misses.labels(label))
        self._audience_children[audiences] = entry
        return entry

    def token_lookup(self, audiences: AudienceSet, hit: bool) -> None:
        """The ``on_lookup`` observer of :class:`~jwt_proxy.tokens.TokenStore`."""
        entry = self._audience(audiences)
        if hit:
            entry[1].inc()
        else:
            entry[2].inc()
            self._recount_cached()

    def instrument_fetch(self, fetch: t.Callable[[AudienceSet], Token]) -> t.Callable[[AudienceSet], Token]:
        """``fetch`` counted, timed, and remembered for the expiry and cached-sets gauges.

        A token that is already expired when it arrives counts as an ``error`` with
        ``error_class="expired"``, as the token store refuses it.
        """

        def fetch_and_record(audiences: AudienceSet) -> Token:
            label = self._audience(audiences)[0]
            started = time.perf_counter()
            try:
                token = fetch(audiences)
            except Exception as exc:
                error_class = exc.error_class if isinstance(exc, TokenUnavailable) else INTERNAL_ERROR_CLASS
                self._record_fetch(label, FETCH_ERROR, error_class, started)
                raise
            if token.expires_at <= self._clock():
                self._record_fetch(label, FETCH_ERROR, EXPIRED_ERROR_CLASS, started)
                return token
            self._record_fetch(label, FETCH_OK, NO_ERROR_CLASS, started)
            if label != OTHER_LABEL:
                self.token_expiry.labels(label).set(token.expires_at)
            self._expiries[audiences] = token.expires_at
            self._recount_cached()
            self._start_recounter()
            return token

        return fetch_and_record

    def token_dropped(self, audiences: AudienceSet) -> None:
        """The ``on_drop`` observer of the token store: the set is no longer held."""
        self._expiries.pop(audiences, None)
        label = self._audience(audiences)[0]
        if label != OTHER_LABEL:
            self.token_expiry.labels(label).set(NOT_HELD)
        self._recount_cached()

    def _record_fetch(self, label: str, result: str, error_class: str, started: float) -> None:
        self.token_fetches.labels(label, result, error_class).inc()
        self.token_fetch_duration.labels(label, result).observe(time.perf_counter() - started)

    def _recount_cached(self) -> None:
        now = self._clock()
        with self._count_lock:
            count = sum(1 for expires_at in list(self._expiries.values()) if expires_at > now)
            if count != self._cached_count:
                self._cached_count = count
                self.cached_audiences.set(count)

    def _start_recounter(self) -> None:
        if self._recounter is not None or self._recount_every_s is None:
            return
        interval_s = self._recount_every_s

        def recount_forever() -> None:
            while True:
                time.sleep(interval_s)
                self._recount_cached()

        with self._count_lock:
            if self._recounter is None:
                self._recounter = threading.Thread(target=recount_forever, name="jwt-proxy-metrics", daemon=True)
                self._recounter.start()

    # -- readiness -----------------------------------------------------------------------

    def mark_ready(self) -> None:
        """This worker can serve: credentials resolve and the configured token is minted."""
        self.ready.set(1)


# -- the master's listener -----------------------------------------------------------------


class LabelBudget:
    """The first ``limit`` distinct values of a label get their own series; later ones
    are all :data:`OTHER_LABEL`.

    With a ``directory`` (the multiprocess one) the admitted values live in a file there,
    one JSON string per line, appended under an exclusive ``flock``, so all workers share
    one budget. Each worker keeps the admitted values in memory (at most ``limit``) and,
    once the budget is full, answers ``_other`` for anything else without touching the
    file again: a value is decided by a set lookup on the request path.
    """

    def __init__(self, name: str, limit: int, directory: str | None) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")
        self._limit = limit
        # Named after the gunicorn master (the workers' parent): the master's start clears
        # the value files of an operator-provided directory but not this one, and a new
        # master must not inherit the previous one's admitted values.
        self._path = os.path.join(directory, f"labels_{name}_{os.getppid()}.jsonl") if directory else None
        self._admitted: set[str] = set()
        self._full = False
        self._lock = threading.Lock()

    def label(self, value: str) -> str:
        if value in self._admitted:
            return value
        if self._full:
            return OTHER_LABEL
        with self._lock:
            if self._path is None:
                if len(self._admitted) < self._limit:
                    self._admitted.add(value)
            else:
                self._admit_shared(value)
            if value in self._admitted:
                return value
            self._full = True
            return OTHER_LABEL

    def _admit_shared(self, value: str) -> None:
        """Add ``value`` to the shared file if there is room; reload what the others added."""
        with open(self._path, "a+", encoding="utf-8") as shared:  # type: ignore[arg-type]
            fcntl.flock(shared, fcntl.LOCK_EX)
            shared.seek(0)
            admitted = {json.loads(line) for line in shared.read().splitlines() if line}
            if value not in admitted and len(admitted) < self._limit:
                shared.write(json.dumps(value) + "\n")
                admitted.add(value)
            self._admitted = admitted
        if len(self._admitted) > self._limit:  # only if the file was edited by hand
            self._admitted = set(sorted(self._admitted)[: self._limit])


class _HeldTokensOnly:
    """The workers' merged metrics, minus the expiry gauges of sets no worker holds."""

    def __init__(self, collector: multiprocess.MultiProcessCollector) -> None:
        self._collector = collector

    def collect(self) -> Iterator[Metric]:
        for metric in self._collector.collect():
            if metric.name == EXPIRY:
                metric.samples = [sample for sample in metric.samples if sample.value != NOT_HELD]
            yield metric


class _ProcessGroupCollector:
    """The standard ``process_*`` families for the master and its live workers together.

    Memory and open files are added up over the master and the live workers; CPU also
    counts the workers that have exited (the master's reaped-children times), so it never
    goes backwards when a worker is replaced. Start time and the fd limit are the master's.
    """

    def __init__(self, worker_pids: t.Callable[[], Iterable[int]]) -> None:
        self._worker_pids = worker_pids

    def collect(self) -> Iterator[Metric]:
        master = _process_samples("self")
        if not master:
            return
        totals = dict(master)
        for pid in list(self._worker_pids()):
            worker = _process_samples(pid)
            for name in _SUMMED_PROCESS_SAMPLES:
                if name in totals and name in worker:
                    totals[name] += worker[name]
        if "process_cpu_seconds_total" in totals:
            times = os.times()
            totals["process_cpu_seconds_total"] += times.children_user + times.children_system
        for name, (family, help_text) in _PROCESS_FAMILIES.items():
            if name in totals:
                yield family(name.removesuffix("_total"), help_text, value=totals[name])


_PROCESS_FAMILIES: dict[str, tuple[type, str]] = {
    "process_cpu_seconds_total": (
        CounterMetricFamily,
        "User and system CPU seconds of the master and its workers, exited ones included.",
    ),
    "process_resident_memory_bytes": (GaugeMetricFamily, "Resident memory of the master and its live workers."),
    "process_virtual_memory_bytes": (GaugeMetricFamily, "Virtual memory of the master and its live workers."),
    "process_open_fds": (GaugeMetricFamily, "Open file descriptors of the master and its live workers."),
    "process_max_fds": (GaugeMetricFamily, "The master's limit on open file descriptors."),
    "process_start_time_seconds": (GaugeMetricFamily, "When the master started, in seconds since the epoch."),
}


def _process_samples(pid: int | str) -> dict[str, float]:
    """prometheus_client's ``process_*`` readings of one process from /proc, by sample name."""
    collector = ProcessCollector(pid=lambda: pid, registry=None)
    return {sample.name: sample.value for family in collector.collect() for sample in family.samples}


class _QuietHandler(WSGIRequestHandler):
    """No access lines on stderr, and a bound on how long a silent client holds a thread."""

    timeout = LISTENER_IO_TIMEOUT_S

    def log_message(self, format: str, *args: t.Any) -> None:
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a DNS lookup) just to name
        # itself in SERVER_NAME; the bind address is name enough.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsListener:
    """The metrics port: Prometheus text at ``path``, ``/healthz``, ``/readyz``, else 404.

    Runs in the gunicorn master, in a daemon thread: bound in ``on_starting`` (so a busy
    address stops the start before the proxy listener binds), served from
    ``when_ready``. Each scrape builds a fresh registry with a ``MultiProcessCollector``
    over ``multiproc_dir`` and the ``process_*`` of the master and its workers. Plain HTTP
    always: the proxy's TLS settings do not apply here.

    :param readiness: returns ``None`` when ready, else the one-line reason for ``503``.
    :param worker_pids: the live workers' pids, for ``process_*``.
    :raises OSError: the address cannot be bound.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        *,
        readiness: t.Callable[[], str | None],
        worker_pids: t.Callable[[], Iterable[int]],
        multiproc_dir: str,
    ) -> None:
        self.path = path
        self._readiness = readiness
        self._worker_pids = worker_pids
        self._multiproc_dir = multiproc_dir
        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        self._httpd = make_server(host, port, self.wsgi, server_class=server_class, handler_class=_QuietHandler)
        self._serving = ServingThread(self._httpd, "jwt-proxy-metrics-listener")

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> None:
        self._serving.start()

    def stop(self) -> None:
        self._serving.stop()

    def close_in_child(self) -> None:
        """Close the inherited listening socket in a forked worker (the master keeps it)."""
        self._httpd.socket.close()

    def wsgi(self, environ: dict[str, t.Any], start_response: t.Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == self.path:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_HeldTokensOnly(multiprocess.MultiProcessCollector(None, path=self._multiproc_dir)))
            registry.register(_ProcessGroupCollector(self._worker_pids))
            return make_wsgi_app(registry)(environ, start_response)
        if path not in (HEALTH_PATH, READY_PATH):
            return _plain(start_response, "404 Not Found", "not found", environ)
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", "method not allowed", environ, [("Allow", "GET, HEAD")])
        if path == HEALTH_PATH:
            return _plain(start_response, "200 OK", "ok", environ)
        try:
            reason = self._readiness()
        except Exception as exc:  # a broken check must read as "not ready", not as a crash
            reason = f"readiness check failed: {type(exc).__name__}"
        if reason is None:
            return _plain(start_response, "200 OK", "ready", environ)
        return _plain(start_response, "503 Service Unavailable", reason, environ)


def _plain(
    start_response: t.Callable,
    status: str,
    line: str,
    environ: dict[str, t.Any],
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    body = (line.replace("\n", " ") + "\n").encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *(extra or [])]
    start_response(status, headers)
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]
