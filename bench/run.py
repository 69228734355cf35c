#!/usr/bin/env python3
"""Benchmark of jwt-proxy against a direct call, nginx, a naive Flask proxy (and Go).

Run from the repository with the project's venv::

    .venv/bin/python bench/run.py                  # full run, ~4 minutes
    .venv/bin/python bench/run.py --quick          # smoke run, ~1 minute
    .venv/bin/python bench/run.py --only jwt-proxy,direct --duration 10
    .venv/bin/python bench/run.py --sts-steady-state   # STS calls under load, ~80 s
    .venv/bin/python bench/run.py --profile        # py-spy profile of a worker

Prerequisites: ``wrk`` and ``nginx`` (Debian/Ubuntu: ``apt-get install -y nginx wrk``).
Without wrk a bounded Python load generator is used; without nginx a Python upstream
is used and the nginx proxy_pass target is skipped (both are slower, the output says
so). A Go ``httputil.ReverseProxy`` target is added when ``go`` is on PATH. This script
never installs anything.

Everything listens on 127.0.0.1 on free ports; every process started is stopped by
its PID (and any child it left behind, by PID) on exit, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import signal
import sys
import tempfile
import typing as t
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
# The bench modules import each other by name, and the process helpers shared with the
# tests from ``tests.processes``.
sys.path[:0] = [str(BENCH_DIR), str(BENCH_DIR.parent)]
if importlib.util.find_spec("psutil") is None:  # the process trees are read through it
    raise SystemExit("psutil not found: install the test extras: .venv/bin/pip install -e '.[test]'")

from common import INSTALL_HINT  # noqa: E402
from common import TARGET_ORDER  # noqa: E402
from common import log  # noqa: E402
from machine import find_tools  # noqa: E402
from machine import machine_info  # noqa: E402
from measure import run_bench  # noqa: E402
from procs import Processes  # noqa: E402
from profiling import run_profile  # noqa: E402
from steady_state import run_sts_steady_state  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark jwt-proxy against a direct call, nginx, a naive Flask proxy and Go.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Prerequisites: {INSTALL_HINT}. Run with the project's venv: .venv/bin/python bench/run.py",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s per level, 20 MiB bodies, 5 TTFB samples")
    parser.add_argument("--duration", type=float, default=None, help="seconds per load level (default 5; --quick 1)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of warm-up load per target (default 1)")
    parser.add_argument("--only", default="", help=f"comma-separated targets among {', '.join(TARGET_ORDER)}")
    parser.add_argument("--body-mib", type=int, default=None, help="upload/download size in MiB (default 200)")
    parser.add_argument(
        "--repeat", type=int, default=None,
        help="runs per load level, the median req/s reported (default 3; --quick 1): how gunicorn spreads "
        "keep-alive connections over its workers changes from run to run",
    )  # fmt: skip
    parser.add_argument("--ttfb-samples", type=int, default=None, help="slow chunked responses per target (default 20)")
    parser.add_argument("--workers", type=int, default=2, help="jwt-proxy workers (default: the proxy's default, 2)")
    parser.add_argument("--threads", type=int, default=32, help="jwt-proxy threads (default: the proxy's default, 32)")
    parser.add_argument("--naive-workers", type=int, default=2)
    parser.add_argument("--naive-threads", type=int, default=16)
    parser.add_argument(
        "--proxy-flag", action="append", default=[], metavar="FLAG", help="extra jwt-proxy flag (repeatable), e.g. --proxy-flag=--log-level=warn"
    )
    parser.add_argument(
        "--wait-quiet", type=float, default=60.0, metavar="SECONDS",
        help="before each target (and each mode), wait up to this long for other processes to leave the CPUs idle (default 60)",
    )  # fmt: skip
    parser.add_argument(
        "--noisy-retries", type=int, default=2, metavar="N",
        help="run a load level again (up to N times) when other processes used CPU during it (default 2)",
    )  # fmt: skip
    parser.add_argument("--output", help="also write the markdown report to this file")
    parser.add_argument("--json", help="also write the raw results as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    mode = parser.add_argument_group("STS steady state")
    mode.add_argument("--sts-steady-state", action="store_true", help="count STS calls per refresh cycle under constant load")
    mode.add_argument("--sts-duration", type=float, default=None, help="seconds of load (default 70; --quick 25)")
    mode.add_argument("--sts-rate", type=float, default=200.0, help="requests per second (default 200)")
    mode.add_argument("--sts-connections", type=int, default=16, help="keep-alive connections (default 16)")
    mode.add_argument("--sts-token-lifetime", type=float, default=20.0, help="local-sts --max-token-lifetime, s")
    mode.add_argument("--sts-refresh-skew", type=float, default=8.0, help="jwt-proxy --token-refresh-skew, s")
    mode.add_argument("--sts-stall-ms", type=float, default=250.0, help="local-sts --stall: STS answer delay, ms")
    prof = parser.add_argument_group("profile (needs py-spy in the venv)")
    prof.add_argument("--profile", action="store_true", help="py-spy profile of a jwt-proxy worker under load")
    prof.add_argument("--profile-seconds", type=float, default=10.0)
    prof.add_argument("--profile-rate", type=int, default=500, help="py-spy samples per second")
    prof.add_argument("--profile-repeat", type=int, default=3, help="runs per variant (median reported)")
    prof.add_argument("--profile-svg", help="also record a flame graph SVG to this path")
    prof.add_argument("--profile-raw", help="write py-spy's collapsed stacks to this path")
    prof.add_argument("--profile-variants", action="store_true", help="also measure flag variants (log level, metrics, threads)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration if args.duration is not None else (1.0 if quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if quick else 1.0)
    args.body_mib = args.body_mib if args.body_mib is not None else (20 if quick else 200)
    args.repeat = max(1, args.repeat if args.repeat is not None else (1 if quick else 3))
    args.ttfb_samples = args.ttfb_samples if args.ttfb_samples is not None else (5 if quick else 20)
    args.sts_duration = args.sts_duration if args.sts_duration is not None else (25.0 if quick else 70.0)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    for name in args.only:
        if name not in TARGET_ORDER:
            parser.error(f"--only: unknown target {name!r}; choose among {', '.join(TARGET_ORDER)}")
    if args.duration <= 0 or args.duration > 600 or args.body_mib < 1 or args.sts_duration > 1800:
        parser.error("durations must be in (0, 600] s (STS mode: up to 1800 s) and --body-mib >= 1")
    return args


def _work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="jwt-proxy-bench-"))


def _to_json(value: t.Any) -> t.Any:
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = find_tools()
    work = _work_dir()
    procs = Processes(work)

    def terminate(signum: int, _frame: t.Any) -> None:
        raise SystemExit(128 + signum)

    # Ctrl-C raises KeyboardInterrupt even when started with SIGINT ignored (from a
    # non-interactive shell's background job), so the cleanup below always runs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    status = 0
    failed = False
    try:
        if args.sts_steady_state:
            report, data = run_sts_steady_state(procs, tools, work, args)
            report += "\n\n### Machine\n\n" + "\n".join(f"- {k}: {v}" for k, v in machine_info(tools).items())
        elif args.profile:
            report, data = run_profile(procs, tools, work, args)
            report += "\n\n### Machine\n\n" + "\n".join(f"- {k}: {v}" for k, v in machine_info(tools).items())
        else:
            report, data = run_bench(procs, tools, work, args)
        print(report, flush=True)
        if args.output:
            Path(args.output).write_text(report + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(_to_json(data), indent=2, default=str) + "\n")
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        status, failed = 130, True
    except SystemExit as exc:
        log(f"stopping everything (exit {exc.code})")
        status, failed = (exc.code if isinstance(exc.code, int) else 1), True
    except Exception as exc:
        log(f"failed: {type(exc).__name__}: {exc}")
        status, failed = 1, True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Logs stay when asked or when something failed.
        if args.keep or failed:
            log(f"work directory (configs, logs) kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
