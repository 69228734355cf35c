"""Bounded Python HTTP/1.1 load generators (loopback only), used when wrk is missing and
for the paced load of ``run.py --sts-steady-state``.

Both keep one keep-alive connection per thread and stop at a deadline and at a request
cap, whichever comes first. They are slower than wrk: in closed-loop mode on a small
machine the generator itself can be the bottleneck (run.py says so in its output).
"""

from __future__ import annotations

import http.client
import threading
import time
import typing as t

#: No thread sends more than this many requests, whatever the duration.
MAX_REQUESTS_PER_THREAD = 2_000_000
REQUEST_TIMEOUT_S = 10.0


def percentile(sorted_values: t.Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (``p`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-p * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


class _Worker(threading.Thread):
    def __init__(self, host: str, port: int, path: str, deadline: float, interval_s: float | None, start_at: float):
        super().__init__(daemon=True)
        self.host, self.port, self.path = host, port, path
        self.deadline = deadline
        self.interval_s = interval_s
        self.start_at = start_at
        # (wall-clock start, latency seconds, status or 0 for an error)
        self.samples: list[tuple[float, float, int]] = []

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
        conn.connect()
        return conn

    def run(self) -> None:
        conn = None
        next_at = self.start_at
        for _ in range(MAX_REQUESTS_PER_THREAD):
            if self.interval_s is not None:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at += self.interval_s
            if time.monotonic() >= self.deadline:
                break
            wall = time.time()
            started = time.perf_counter()
            status = 0
            try:
                if conn is None:
                    conn = self._connect()
                conn.request("GET", self.path)
                response = conn.getresponse()
                response.read()
                status = response.status
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
            self.samples.append((wall, time.perf_counter() - started, status))
        if conn is not None:
            conn.close()


def run_load(
    host: str,
    port: int,
    path: str,
    *,
    connections: int,
    duration_s: float,
    rate_per_s: float | None = None,
) -> dict[str, t.Any]:
    """Closed loop (``rate_per_s=None``: each thread sends as fast as answers come) or
    paced (``rate_per_s`` requests per second over all threads) load on one URL.

    Returns ``requests``, ``errors`` (transport errors and non-2xx/3xx), ``duration_s``,
    ``rps``, ``p50_ms``/``p90_ms``/``p99_ms``/``p999_ms``/``max_ms`` and ``samples``
    (``(wall start, latency s, status)`` per request).
    """
    interval = None if rate_per_s is None else connections / rate_per_s
    start = time.monotonic() + 0.05
    deadline = start + duration_s
    workers = [
        _Worker(host, port, path, deadline, interval, start + (i * interval / connections if interval else 0.0))
        for i in range(connections)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(duration_s + REQUEST_TIMEOUT_S + 5)
    elapsed = max(0.001, min(time.monotonic(), deadline + REQUEST_TIMEOUT_S) - start)
    samples = sorted((s for w in workers for s in w.samples), key=lambda s: s[0])
    latencies = sorted(s[1] for s in samples)
    errors = sum(1 for s in samples if not 200 <= s[2] < 400)
    return {
        "requests": len(samples),
        "errors": errors,
        "duration_s": elapsed,
        "rps": len(samples) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "p999_ms": percentile(latencies, 99.9) * 1000,
        "max_ms": (latencies[-1] if latencies else float("nan")) * 1000,
        "samples": samples,
    }
