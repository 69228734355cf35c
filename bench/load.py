"""Closed-loop load on one URL (wrk, else the Python generator of ``loadgen.py``), and
keeping other processes' CPU out of it: each run is audited, re-run when disturbed, and
started only once the machine is quiet."""

from __future__ import annotations

import argparse
import json
import os
import time
import typing as t
from pathlib import Path

import loadgen
from common import FOREIGN_CPU_WARN_CORES
from common import log
from machine import Tools
from procs import Processes
from sampling import CpuAudit


WRK_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "JSONRESULT {\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d," ..
    "\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d,\\"max_us\\":%d}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


class Load:
    """Closed-loop load on one URL: wrk if present, else the Python generator."""

    def __init__(self, procs: Processes, tools: Tools, work: Path) -> None:
        self.procs = procs
        self.wrk = tools.wrk
        self.script = work / "report.lua"
        self.script.write_text(WRK_SCRIPT)

    def run(self, port: int, path: str, connections: int, duration_s: float) -> dict[str, t.Any]:
        with CpuAudit(self.procs.roots) as audit:
            result = self._run(port, path, connections, duration_s)
        result["foreign_cpu_cores"] = audit.foreign_cores
        result["steal_cores"] = audit.steal_cores
        return result

    def _run(self, port: int, path: str, connections: int, duration_s: float) -> dict[str, t.Any]:
        if not self.wrk:
            result = loadgen.run_load("127.0.0.1", port, path, connections=connections, duration_s=duration_s)
            result.pop("samples")
            return result
        duration_s = max(1, round(duration_s))  # wrk takes whole seconds
        threads = 1 if connections == 1 else min(2, os.cpu_count() or 1, connections)
        out = self.procs.log_dir / f"wrk-{port}-{connections}.out"
        out.unlink(missing_ok=True)
        proc = self.procs.start(
            "wrk",
            [self.wrk, "-t", str(threads), "-c", str(connections), "-d", f"{duration_s}s", "--latency",
             "--timeout", "10s", "-s", str(self.script), f"http://127.0.0.1:{port}{path}"],
            stdout_path=out,
        )  # fmt: skip
        try:
            proc.popen.wait(duration_s + 30)
        finally:
            self.procs.stop(proc)
        text = out.read_text(errors="replace")
        line = next((ln for ln in text.splitlines() if ln.startswith("JSONRESULT ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result:\n{text}")
        raw = json.loads(line[len("JSONRESULT ") :])
        duration = raw["duration_us"] / 1e6
        errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
        return {
            "requests": raw["requests"],
            "errors": errors,
            "duration_s": duration,
            "rps": raw["requests"] / duration,
            "p50_ms": raw["p50_us"] / 1000,
            "p90_ms": raw["p90_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
            "max_ms": raw["max_us"] / 1000,
        }


def quiet_run(procs: Processes, args: argparse.Namespace, measure: t.Callable[[], dict[str, t.Any]]) -> dict[str, t.Any]:
    """``measure()`` (a load run returning ``foreign_cpu_cores``), run again up to
    ``--noisy-retries`` times, after waiting for quiet, while other processes used
    CPU during it; the least disturbed attempt is returned."""
    best = measure()
    for _ in range(args.noisy_retries):
        if best["foreign_cpu_cores"] <= FOREIGN_CPU_WARN_CORES:
            break
        log(f"other processes used {best['foreign_cpu_cores']:.2f} cores during the run: measuring again")
        wait_for_quiet(procs, args.wait_quiet)
        attempt = measure()
        if attempt["foreign_cpu_cores"] < best["foreign_cpu_cores"]:
            best = attempt
    return best


def wait_for_quiet(procs: Processes, max_wait_s: float) -> None:
    """Wait (at most ``max_wait_s``) until other processes use < 0.1 cores for 2 s in a row."""
    deadline = time.monotonic() + max_wait_s
    while True:
        with CpuAudit(procs.roots) as audit:
            time.sleep(2)
        if audit.foreign_cores < FOREIGN_CPU_WARN_CORES:
            return
        if time.monotonic() >= deadline:
            log(f"other processes still use {audit.foreign_cores:.2f} cores: measuring anyway (numbers will suffer)")
            return
        log(f"other processes use {audit.foreign_cores:.2f} cores: waiting for the machine to be quiet")
