"""``--sts-steady-state``: STS calls per token refresh cycle under constant paced load,
and whether any request waited on STS (local-sts answers only after a stall, so a
request that waited would be at least that slow)."""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from pathlib import Path

import loadgen
from common import MIB
from common import log
from load import wait_for_quiet
from machine import Tools
from procs import Processes
from sampling import ConnectionSampler
from sampling import tree_cpu_s
from targets import sts_calls
from targets import start_jwt_proxy
from targets import start_upstreams


def _bursts(series: list[tuple[float, int]], gap_s: float) -> list[dict[str, float]]:
    """Group the increments of a (time, calls) series into bursts no more than gap_s apart."""
    bursts: list[dict[str, float]] = []
    for (_, before), (when, after) in zip(series, series[1:]):
        if after <= before:
            continue
        if bursts and when - bursts[-1]["end"] <= gap_s:
            bursts[-1]["end"] = when
            bursts[-1]["calls"] += after - before
        else:
            bursts.append({"start": when, "end": when, "calls": after - before})
    return bursts


def run_sts_steady_state(procs: Processes, tools: Tools, work: Path, args: argparse.Namespace) -> tuple[str, dict]:
    lifetime, skew, stall_ms = args.sts_token_lifetime, args.sts_refresh_skew, args.sts_stall_ms
    upstream = start_upstreams(procs, tools, work, MIB).fast
    running = start_jwt_proxy(
        procs,
        upstream,
        args,
        sts_extra=["--max-token-lifetime", f"{lifetime:g}s", "--stall", f"{stall_ms:g}ms"],
        proxy_extra=["--token-duration", "60s", "--token-refresh-skew", f"{skew:g}s"],
    )
    sts_url = running.sts_url  # type: ignore[attr-defined]
    series: list[tuple[float, int]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                series.append((time.time(), sts_calls(sts_url)))
            stop.wait(0.1)

    try:
        wait_for_quiet(procs, args.wait_quiet)
        loadgen.run_load("127.0.0.1", running.port, "/1k", connections=8, duration_s=1.0, rate_per_s=args.sts_rate)
        calls_before = sts_calls(sts_url)
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        log(
            f"STS steady state: {args.sts_duration:g} s at {args.sts_rate:g} req/s over {args.sts_connections} connections; "
            f"tokens live {lifetime:g} s, refresh skew {skew:g} s, local-sts answers after {stall_ms:g} ms"
        )
        cpu_before = tree_cpu_s(running.root.pid)
        with ConnectionSampler(running.root.pid, running.port, 2.0) as conn_sampler:
            stats = loadgen.run_load(
                "127.0.0.1", running.port, "/1k",
                connections=args.sts_connections, duration_s=args.sts_duration, rate_per_s=args.sts_rate,
            )  # fmt: skip
        cpu = tree_cpu_s(running.root.pid) - cpu_before
        time.sleep(0.3)
        stop.set()
        poller.join(5)
        calls_after = sts_calls(sts_url)
    finally:
        stop.set()
        running.stop()
    samples = stats.pop("samples")
    bursts = _bursts(series, gap_s=3.0)
    window_s = stall_ms / 1000 + 0.5
    near = [
        lat for wall, lat, _ in samples
        if any(b["start"] - window_s <= wall <= b["end"] + 0.5 for b in bursts)
    ]  # fmt: skip
    slow = sorted((lat for _, lat, _ in samples), reverse=True)[:5]
    intervals = [b2["start"] - b1["start"] for b1, b2 in zip(bursts, bursts[1:])]
    expected = args.workers  # one audience set
    spread = conn_sampler.counts
    serving = sum(1 for c in spread if c) or None
    data = {
        "duration_s": stats["duration_s"],
        "requests": stats["requests"],
        "errors": stats["errors"],
        "rps": stats["rps"],
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "p999_ms": stats["p999_ms"],
        "max_ms": stats["max_ms"],
        "slowest_ms": [s * 1000 for s in slow],
        "cpu_ms_per_request": cpu * 1000 / max(1, stats["requests"]),
        "sts_calls": calls_after - calls_before,
        "bursts": [{"at_s": b["start"] - samples[0][0] if samples else 0, "calls": b["calls"]} for b in bursts],
        "refresh_interval_s": intervals,
        "requests_near_refresh": len(near),
        "max_ms_near_refresh": max(near) * 1000 if near else None,
        "expected_calls_per_cycle": expected,
        "token_lifetime_s": lifetime,
        "refresh_skew_s": skew,
        "sts_stall_ms": stall_ms,
        "workers": args.workers,
        "threads": args.threads,
        "connections_per_worker": spread,
    }
    calls_per_cycle = [int(b["calls"]) for b in bursts]
    waited = data["max_ms"] >= stall_ms
    lines = [
        "### STS at steady state",
        "",
        f"jwt-proxy ({args.workers} workers × {args.threads} threads, one audience set) against "
        f"`jwt-proxy local-sts --max-token-lifetime {lifetime:g}s --stall {stall_ms:g}ms`, proxy flags "
        f"`--token-duration 60s --token-refresh-skew {skew:g}s`: tokens live {lifetime:g} s and are refreshed "
        f"off the request path {skew:g} s before expiry (every ~{lifetime - skew:g} s). Constant load: "
        f"{args.sts_rate:g} req/s over {args.sts_connections} keep-alive connections for {args.sts_duration:g} s "
        f"(≈{args.sts_duration / max(1e-9, lifetime - skew):.1f} refresh cycles). STS answers only after {stall_ms:g} ms, "
        "so a request that waited for STS would take at least that long.",
        "",
        "| | |",
        "|---|---|",
        f"| requests (errors) | {stats['requests']:,} ({stats['errors']}) at {stats['rps']:.0f} req/s |",
        f"| STS calls during the run | {calls_after - calls_before} |",
        f"| refresh cycles seen | {len(bursts)}, every {', '.join(f'{i:.1f}' for i in intervals) or '–'} s |",
        f"| STS calls per cycle | {', '.join(map(str, calls_per_cycle)) or '–'} (expected workers × audience sets = {expected}) |",
        f"| client connections per worker | {' + '.join(map(str, spread)) or '?'} (a worker refreshes only when it serves requests) |",
        f"| latency p50 / p99 / p99.9 | {stats['p50_ms']:.2f} / {stats['p99_ms']:.2f} / {stats['p999_ms']:.2f} ms |",
        f"| max latency (all requests) | {stats['max_ms']:.2f} ms (slowest five: {', '.join(f'{s * 1000:.1f}' for s in slow)}) |",
        f"| max latency of the {len(near):,} requests sent from {window_s:g} s before to 0.5 s after an STS call | "
        f"{(max(near) * 1000 if near else float('nan')):.2f} ms |",
        f"| CPU per request (idle-time work of the workers included) | {data['cpu_ms_per_request']:.3f} ms |",
        "",
        (
            f"No request waited on STS: the slowest took {stats['max_ms']:.1f} ms, below the {stall_ms:g} ms STS stall."
            if not waited
            else f"Some request took {stats['max_ms']:.1f} ms, at least the {stall_ms:g} ms STS stall: it may have waited on STS."
        ),
        (
            f"Calls per cycle match workers × audience sets ({expected})."
            if calls_per_cycle and all(c == expected for c in calls_per_cycle)
            else (
                f"Calls per cycle = serving workers × audience sets ({serving}): gunicorn put every connection "
                f"on {serving} of the {args.workers} workers, and an idle worker does not refresh (its next "
                "request, after the token's expiry, waits for a fetch)."
                if serving is not None and serving < args.workers and calls_per_cycle and all(c == serving for c in calls_per_cycle)
                else f"Calls per cycle differ from workers × audience sets ({expected}): see the bursts."
            )
        ),
        "",
        "Load: the bench's Python paced generator (timestamps needed to line requests up with refreshes); "
        "its own scheduling jitter is included in the latencies.",
    ]
    return "\n".join(lines), data


# Where a sample's time goes: walking up from the leaf frame, the first frame that
# matches a category names it (so json.dumps under the log formatter counts as logging,
