"""Measuring the targets one after the other: req/s, latency, CPU per request and RSS
under load, then the first byte of a slow response and the upload/download throughput."""

from __future__ import annotations

import argparse
import statistics
import time
import typing as t
from pathlib import Path

from common import CONCURRENCY
from common import FOREIGN_CPU_WARN_CORES
from common import INSTALL_HINT
from common import MIB
from common import TARGET_LABELS
from common import TARGET_ORDER
from common import log
from load import Load
from load import quiet_run
from load import wait_for_quiet
from machine import Tools
from machine import machine_info
from procs import Processes
from report import format_report
from sampling import ConnectionSampler
from sampling import RssSampler
from sampling import process_rss
from sampling import tree_cpu_s
from targets import Running
from targets import Upstream
from targets import Upstreams
from targets import start_target
from targets import start_upstreams
from wire import download
from wire import ttfb_once
from wire import upload

TTFB_WARMUP = 3


def measure_target(
    name: str, start: t.Callable[[Upstream], Running], upstreams: Upstreams, load: Load, args: argparse.Namespace
) -> dict[str, t.Any]:
    """Req/s, latency, CPU and idle RSS against the fast upstream; then (restarted
    against the stream upstream) first byte of a slow chunked response and the
    upload/download throughput with peak RSS."""
    result: dict[str, t.Any] = {"load": {}}
    running = start(upstreams.fast)
    try:
        result["notes"] = running.notes
        root = running.root.pid
        log(f"{name}: warm-up")
        load.run(running.port, "/1k", max(CONCURRENCY), args.warmup)
        time.sleep(0.5)
        running.root.remember_tree()
        result["idle"] = process_rss(root)
        for connections in CONCURRENCY:
            runs = []
            for _ in range(args.repeat):

                def measure(connections: int = connections) -> dict[str, t.Any]:
                    cpu_before = tree_cpu_s(root)
                    with ConnectionSampler(root, running.port, min(1.0, args.duration / 2)) as sampler:
                        run = load.run(running.port, "/1k", connections, args.duration)
                    cpu = tree_cpu_s(root) - cpu_before
                    run["cpu_ms_per_request"] = cpu * 1000 / max(1, run["requests"])
                    run["cpu_cores"] = cpu / run["duration_s"]
                    run["connections_per_worker"] = sampler.counts
                    return run

                runs.append(quiet_run(load.procs, args, measure))
            # The run with the median req/s, whole (its latencies and CPU belong together).
            stats = dict(sorted(runs, key=lambda r: r["rps"])[len(runs) // 2])
            stats["runs"] = [
                {"rps": r["rps"], "connections_per_worker": r["connections_per_worker"], "cpu_ms_per_request": r["cpu_ms_per_request"]}
                for r in runs
            ]
            result["load"][connections] = stats
            log(
                f"{name}: c={connections}: {stats['rps']:.0f} req/s (runs: "
                + ", ".join(f"{r['rps']:.0f} {'+'.join(map(str, r['connections_per_worker']))}" for r in stats["runs"])
                + f"), p50 {stats['p50_ms']:.2f} ms, "
                f"p99 {stats['p99_ms']:.2f} ms, CPU {stats['cpu_ms_per_request']:.3f} ms/req, errors {stats['errors']}"
                + (
                    f"; WARNING: other processes used {stats['foreign_cpu_cores']:.2f} cores meanwhile"
                    if stats["foreign_cpu_cores"] > FOREIGN_CPU_WARN_CORES
                    else ""
                )
            )
        result["after_load"] = process_rss(root)
        if upstreams.stream is not upstreams.fast:
            running.stop()
            running = start(upstreams.stream)
            root = running.root.pid
        firsts, seconds = [], []
        for _ in range(TTFB_WARMUP):
            ttfb_once(running.port)
        for _ in range(args.ttfb_samples):
            first, second = ttfb_once(running.port)
            firsts.append(first * 1000)
            seconds.append(second * 1000)
        result["ttfb"] = {
            "first_ms_median": statistics.median(firsts),
            "first_ms_min": min(firsts),
            "first_ms_max": max(firsts),
            "second_ms_median": statistics.median(seconds),
            "samples": len(firsts),
        }
        log(f"{name}: first byte of a slow chunked response {statistics.median(firsts):.2f} ms (median)")
        body = args.body_mib * MIB
        upload(running.port, MIB)  # warm the path (buffers, pools) before measuring RSS growth
        for kind, func in (("upload", upload), ("download", download)):
            with RssSampler(root) as sampler:
                elapsed = func(running.port, body)
            result[kind] = {
                "mib_per_s": args.body_mib / elapsed,
                "seconds": elapsed,
                "rss_before_mib": sampler.baseline_kib / 1024,
                "rss_peak_mib": sampler.peak_kib / 1024,
                "rss_growth_mib": (sampler.peak_kib - sampler.baseline_kib) / 1024,
            }
            log(
                f"{name}: {kind} {args.body_mib} MiB: {args.body_mib / elapsed:.0f} MiB/s, RSS peak "
                f"{sampler.peak_kib / 1024:.1f} MiB (+{(sampler.peak_kib - sampler.baseline_kib) / 1024:.1f})"
            )
    finally:
        running.stop()
    return result


def run_bench(procs: Processes, tools: Tools, work: Path, args: argparse.Namespace) -> tuple[str, dict]:
    selected = [n for n in TARGET_ORDER if n in args.only] if args.only else list(TARGET_ORDER)
    skipped = []
    if "nginx" in selected and not tools.nginx:
        selected.remove("nginx")
        skipped.append(f"nginx proxy_pass: skipped, nginx is not installed ({INSTALL_HINT})")
    if "go" in selected and not tools.go:
        selected.remove("go")
        skipped.append("Go httputil.ReverseProxy: skipped, Go is not installed (`which go` found nothing)")
    if not tools.nginx:
        skipped.append("direct: the Python upstream (nginx missing); it can be the bottleneck of req/s")
    if not tools.wrk:
        skipped.append(f"load: Python generator (wrk missing); it can be the bottleneck of req/s ({INSTALL_HINT})")
    log(f"targets: {', '.join(selected)}")
    upstreams = start_upstreams(procs, tools, work, args.body_mib * MIB)
    load = Load(procs, tools, work)
    results: dict[str, dict[str, t.Any]] = {}
    for name in selected:
        wait_for_quiet(procs, args.wait_quiet)
        log(f"starting {TARGET_LABELS[name]}")
        results[name] = measure_target(
            name,
            lambda upstream, name=name: start_target(name, procs, tools, work, upstream, args),
            upstreams,
            load,
            args,
        )
    machine = machine_info(tools)
    report = format_report(results, machine, args, skipped)
    return report, {"machine": machine, "results": results, "skipped": skipped}
