"""``--profile``: where a jwt-proxy worker's CPU goes under load (py-spy, GIL samples,
by layer and by function), and with ``--profile-variants`` the cost of flag variants
(log level, metrics, threads) measured without py-spy."""

from __future__ import annotations

import argparse
import shutil
import statistics
import threading
import time
import typing as t
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from common import BIN_DIR
from common import INSTALL_HINT
from common import MIB
from common import REPO
from common import log
from load import Load
from load import quiet_run
from load import wait_for_quiet
from machine import Tools
from procs import Processes
from sampling import tree_cpu_split_s
from sampling import tree_pids
from targets import Upstreams
from targets import start_jwt_proxy
from targets import start_upstreams
from wire import upload


PROFILE_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("access log record (logging, JSON formatter, stdout)", ("(logging/", "jwt_proxy/logs.py", "_log_access")),
    ("gunicorn access-log atoms (computed, then dropped)", ("gunicorn/glogging.py",)),
    ("metrics (prometheus_client multiprocess, jwt_proxy.metrics)", ("prometheus_client/", "jwt_proxy/metrics.py")),
    ("proxy settings read from os.environ per request", ("get_environ_proxies", "(urllib/request.py", "should_bypass_proxies")),
    ("token lookup (jwt_proxy.tokens)", ("jwt_proxy/tokens.py",)),
    ("header filtering (jwt_proxy.headers)", ("jwt_proxy/headers.py",)),
    ("routing (jwt_proxy.routing)", ("jwt_proxy/routing.py",)),
    ("jwt_proxy.forward and upstream_* (request framing, pool, head parser, body loop)", ("jwt_proxy/forward.py", "jwt_proxy/upstream_")),
    ("view (jwt_proxy.app)", ("jwt_proxy/app.py",)),
    ("http.client (request line, header lines, status and header parsing)", ("(http/client.py", "(email/")),
    ("urllib3 (pool, connection, response)", ("urllib3/",)),
    ("requests (adapter, models, hooks)", ("requests/",)),
    ("flask / werkzeug (request context, dispatch, response)", ("flask/", "werkzeug/")),
    ("gunicorn (event loop, HTTP parsing, response writing)", ("gunicorn/", "(selectors.py", "concurrent/futures/", "jwt_proxy/worker.py")),
    ("socket calls (GIL held around them)", ("(socket.py",)),
]


def _category(frame: str) -> str | None:
    for name, needles in PROFILE_CATEGORIES:
        if any(needle in frame for needle in needles):
            return name
    return None


def _short_frame(frame: str) -> str:
    """``func (path/file.py)``: the line number dropped, so a function is counted once."""
    for prefix in (str(REPO) + "/", "site-packages/"):
        if prefix in frame:
            frame = frame.split("(", 1)[0] + "(" + frame.split(prefix, 1)[1]
    head, sep, _line = frame.rpartition(":")
    return head + ")" if sep and _line.rstrip(")").isdigit() else frame


# Frames under which everything runs (thread start-up, the CLI, the arbiter): not listed.
_ANCESTOR_FRAMES = (
    "threading.py", "concurrent/futures/", "click/", "jwt_proxy/cli.py", "jwt_proxy/server.py",
    "jwt_proxy/__main__.py", "gunicorn/arbiter.py", "gunicorn/app/base.py", "<module>", "init_process",
)  # fmt: skip


def summarize_profile(raw: str, us_per_request: float, top: int = 30) -> tuple[str, dict]:
    """Self time by layer and the functions with the most inclusive time, from py-spy's raw
    (collapsed) output of GIL-holding samples, as shares and as microseconds per request
    (share × the Python CPU time per request)."""
    self_counts: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        total += count
        category = next((c for c in map(_category, reversed(frames)) if c), "other (interpreter, stdlib)")
        self_counts[category] = self_counts.get(category, 0) + count
        for frame in {_short_frame(f) for f in frames}:
            if not any(needle in frame for needle in _ANCESTOR_FRAMES):
                inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return "py-spy recorded no samples", {}
    lines = [
        "Self time by layer (the leaf frame's layer; stdlib frames count for the layer that called them):",
        "",
        "| layer | share of GIL time | ≈ µs per request |",
        "|---|---|---|",
    ]
    for name, count in sorted(self_counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {count / total:.1%} | {count / total * us_per_request:.0f} |")
    lines += [
        "",
        f"Top {top} functions by inclusive share of GIL time:",
        "",
        "| function | inclusive | ≈ µs per request |",
        "|---|---|---|",
    ]
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| `{frame}` | {count / total:.1%} | {count / total * us_per_request:.0f} |")
    data = {
        "total_samples": total,
        "self": self_counts,
        "inclusive_top": sorted(inclusive.items(), key=lambda kv: -kv[1])[:top],
    }
    return "\n".join(lines), data


@dataclass
class Variant:
    label: str
    flags: list[str] = field(default_factory=list)
    workers: int | None = None
    threads: int | None = None


PROFILE_VARIANTS = [
    Variant("defaults (32 threads, log info, metrics on)"),
    Variant("`--log-level warn` (no access records)", ["--log-level", "warn"]),
    Variant("`--metrics-enabled=false`", ["--metrics-enabled=false"]),
    Variant("`--log-level warn --metrics-enabled=false`", ["--log-level", "warn", "--metrics-enabled=false"]),
    Variant("`--threads 8`", threads=8),
    Variant("`--threads 16`", threads=16),
]


def _variant_args(args: argparse.Namespace, variant: Variant) -> argparse.Namespace:
    result = argparse.Namespace(**vars(args))
    result.proxy_flag = list(args.proxy_flag) + variant.flags
    # One worker: how gunicorn spreads keep-alive connections over several workers
    # changes from run to run (all 16 on one worker, or 9+7), which would drown the
    # differences measured here.
    result.workers = variant.workers or 1
    result.threads = variant.threads or args.threads
    return result


def run_variants(
    procs: Processes, upstreams: Upstreams, load: Load, args: argparse.Namespace
) -> tuple[list[str], dict[str, t.Any]]:
    """Each variant ``--profile-repeat`` times, round-robin (so drifts hit all alike):
    req/s, p50, CPU per request at 16 connections; upload throughput against the
    stream upstream. Reports medians."""
    body = args.body_mib * MIB
    runs: dict[str, list[dict[str, float]]] = {v.label: [] for v in PROFILE_VARIANTS}
    for round_ in range(args.profile_repeat):
        for variant in PROFILE_VARIANTS:
            vargs = _variant_args(args, variant)
            running = start_jwt_proxy(procs, upstreams.fast, vargs)
            try:
                wait_for_quiet(procs, args.wait_quiet)
                load.run(running.port, "/1k", 64, args.warmup)

                def measure(root: int = running.root.pid) -> dict[str, t.Any]:
                    user0, sys0 = tree_cpu_split_s(root)
                    stats = load.run(running.port, "/1k", 16, args.duration)
                    user1, sys1 = tree_cpu_split_s(root)
                    return {**stats, "user_s": user1 - user0, "system_s": sys1 - sys0}

                stats = quiet_run(procs, args, measure)
            finally:
                running.stop()
            running = start_jwt_proxy(procs, upstreams.stream, vargs)
            try:
                upload(running.port, MIB)
                upload_s = upload(running.port, body)
            finally:
                running.stop()
            n = max(1, stats["requests"])
            run = {
                "rps": stats["rps"],
                "p50_ms": stats["p50_ms"],
                "p99_ms": stats["p99_ms"],
                "user_ms": stats["user_s"] * 1000 / n,
                "system_ms": stats["system_s"] * 1000 / n,
                "upload_mib_s": args.body_mib / upload_s,
                "foreign_cpu_cores": stats["foreign_cpu_cores"],
            }
            runs[variant.label].append(run)
            log(
                f"round {round_ + 1}/{args.profile_repeat} {variant.label}: {run['rps']:.0f} req/s, "
                f"CPU {run['user_ms'] + run['system_ms']:.3f} ms/req, upload {run['upload_mib_s']:.0f} MiB/s"
            )
    lines = [
        f"Same load without py-spy, on **one worker** so that the spread of connections over workers does not "
        f"blur the comparison (wrk, 16 connections, `GET /1k`, {args.duration:g} s; upload {args.body_mib} MiB "
        f"with `Content-Length`), median of {args.profile_repeat} interleaved runs:",
        "",
        "| jwt-proxy | req/s | p50 ms | p99 ms | CPU ms/request (user + system) | upload MiB/s |",
        "|---|---|---|---|---|---|",
    ]
    medians: dict[str, dict[str, float]] = {}
    for variant in PROFILE_VARIANTS:
        rows = runs[variant.label]
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        medians[variant.label] = med
        lines.append(
            f"| {variant.label} | {med['rps']:,.0f} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} | "
            f"{med['user_ms'] + med['system_ms']:.3f} ({med['user_ms']:.3f} + {med['system_ms']:.3f}) | "
            f"{med['upload_mib_s']:,.0f} |"
        )
    worst = max(r["foreign_cpu_cores"] for rows in runs.values() for r in rows)
    lines += ["", f"Other processes used at most {worst:.2f} cores during these runs."]
    return lines, {"runs": runs, "medians": medians}


def run_profile(procs: Processes, tools: Tools, work: Path, args: argparse.Namespace) -> tuple[str, dict]:
    py_spy = shutil.which("py-spy") or (str(BIN_DIR / "py-spy") if (BIN_DIR / "py-spy").exists() else None)
    if not py_spy:
        raise SystemExit("py-spy not found: install it into the venv with: .venv/bin/pip install py-spy")
    if not tools.wrk:
        raise SystemExit(f"--profile needs wrk. {INSTALL_HINT}")
    upstreams = start_upstreams(procs, tools, work, args.body_mib * MIB)
    upstream = upstreams.fast
    load = Load(procs, tools, work)
    seconds = args.profile_seconds
    out = ["### Profile of jwt-proxy under load", ""]
    data: dict[str, t.Any] = {}
    running = start_jwt_proxy(procs, upstream, args)
    try:
        wait_for_quiet(procs, args.wait_quiet)
        load.run(running.port, "/1k", 64, args.warmup)
        # Unprofiled reference for the same load: req/s and the user/system CPU split.
        user0, sys0 = tree_cpu_split_s(running.root.pid)
        reference = load.run(running.port, "/1k", 16, args.duration)
        user1, sys1 = tree_cpu_split_s(running.root.pid)
        requests_ = max(1, reference["requests"])
        user_us, sys_us = (user1 - user0) * 1e6 / requests_, (sys1 - sys0) * 1e6 / requests_
        workers = [pid for pid in tree_pids(running.root.pid) if pid != running.root.pid]
        log(f"profiling workers {workers} for {seconds:g} s under 16 connections (py-spy --gil --nonblocking)")
        wrk_result: dict[str, t.Any] = {}
        thread = threading.Thread(
            target=lambda: wrk_result.update(load.run(running.port, "/1k", 16, seconds + 3)), daemon=True
        )
        thread.start()
        time.sleep(1)
        spies = []
        for worker in workers:
            spies.append(
                procs.start(
                    f"py-spy-{worker}",
                    [py_spy, "record", "--pid", str(worker), "--duration", f"{seconds:g}", "--rate", str(args.profile_rate),
                     "--gil", "--nonblocking", "--format", "raw", "--output", str(work / f"profile-{worker}.txt")],
                )  # fmt: skip
            )
        try:
            for spy in spies:
                spy.popen.wait(seconds + 60)
        finally:
            for spy in spies:
                procs.stop(spy)
        thread.join(seconds + 60)
        raw = "\n".join(
            (work / f"profile-{w}.txt").read_text(errors="replace") for w in workers if (work / f"profile-{w}.txt").exists()
        )
        if args.profile_raw:
            Path(args.profile_raw).write_text(raw)
        if args.profile_svg:
            log(f"flame graph: recording {min(seconds, 5):g} s more for {args.profile_svg}")
            thread = threading.Thread(target=lambda: load.run(running.port, "/1k", 16, min(seconds, 5) + 3), daemon=True)
            thread.start()
            time.sleep(1)
            spy = procs.start(
                "py-spy-svg",
                [py_spy, "record", "--pid", str(workers[0]), "--duration", f"{min(seconds, 5):g}", "--rate",
                 str(args.profile_rate), "--gil", "--nonblocking", "--output", str(Path(args.profile_svg).resolve())],
            )  # fmt: skip
            try:
                spy.popen.wait(seconds + 60)
            finally:
                procs.stop(spy)
            thread.join(seconds + 60)
        samples_possible = seconds * args.profile_rate * len(workers)
        text, summary = summarize_profile(raw, user_us)
        gil_share = summary.get("total_samples", 0) / max(1, samples_possible)
        out += [
            f"wrk, 16 connections, `GET /1k`, jwt-proxy defaults ({args.workers} workers × {args.threads} threads): "
            f"{reference['rps']:,.0f} req/s unprofiled, {wrk_result.get('rps', 0):,.0f} req/s while profiled.",
            f"CPU per request (whole tree, unprofiled): {(user_us + sys_us) / 1000:.3f} ms = "
            f"{user_us:.0f} µs user + {sys_us:.0f} µs system (kernel: sockets, scheduling of the threads).",
            f"py-spy `record --gil --nonblocking --rate {args.profile_rate}` on both workers for {seconds:g} s: "
            f"samples only the thread holding the GIL, i.e. where the Python CPU goes; the GIL was held "
            f"in {gil_share:.0%} of the samples. µs per request below = share × the {user_us:.0f} µs of user CPU.",
            "",
            text,
        ]
        data["profile"] = summary
        data["reference"] = {**reference, "user_us_per_request": user_us, "system_us_per_request": sys_us}
    finally:
        running.stop()
    if args.profile_variants:
        lines, data["variants"] = run_variants(procs, upstreams, load, args)
        out += [""] + lines
    return "\n".join(out), data
