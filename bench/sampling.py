"""What a process tree costs while it serves: CPU time, memory, connections per worker,
and the CPU that other processes on the machine take meanwhile (all through psutil).

A target is a tree (a master and its workers, nginx and its workers), so every figure
is summed over the root and its live descendants.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
import typing as t

import psutil

_GONE = (psutil.NoSuchProcess, psutil.AccessDenied)


def tree(root: int) -> list[psutil.Process]:
    """``root`` and all its live descendants; empty when ``root`` is gone."""
    try:
        parent = psutil.Process(root)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_pids(root: int) -> list[int]:
    return [process.pid for process in tree(root)]


def tree_cpu_split_s(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``root`` and its descendants, all their threads."""
    user = system = 0.0
    for process in tree(root):
        with contextlib.suppress(*_GONE):
            times = process.cpu_times()
            user += times.user
            system += times.system
    return user, system


def tree_cpu_s(root: int) -> float:
    """user + system CPU seconds of ``root`` and its descendants."""
    return sum(tree_cpu_split_s(root))


def _rss_bytes(process: psutil.Process) -> int:
    with contextlib.suppress(*_GONE):
        return process.memory_info().rss
    return 0


def _pss_bytes(process: psutil.Process) -> int:
    with contextlib.suppress(*_GONE):
        return process.memory_full_info().pss
    return 0


def tree_rss_kib(root: int) -> int:
    return sum(_rss_bytes(process) for process in tree(root)) // 1024


def process_rss(root: int) -> dict[str, t.Any]:
    """RSS and PSS (MiB) of each process of the tree, and their sums."""
    per = [
        {"pid": process.pid, "rss_mib": _rss_bytes(process) / 2**20, "pss_mib": _pss_bytes(process) / 2**20}
        for process in tree(root)
    ]
    return {
        "processes": per,
        "rss_mib": sum(p["rss_mib"] for p in per),
        "pss_mib": sum(p["pss_mib"] for p in per),
    }


def _system_busy_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of all CPUs since boot; busy excludes idle, iowait and steal."""
    times = psutil.cpu_times()
    busy = times.user + times.nice + times.system + times.irq + times.softirq
    return busy, times.steal


class CpuAudit:
    """CPU used on the machine during a run by processes that are not the benchmark's.

    System busy time minus this process, its reaped children (wrk) and the live trees
    of every process it started (``roots()``). Other work on a 2-core machine (a test
    run, a build) skews every number, so the report warns when this is not near zero.
    Also records steal time (a busy neighbour on the hypervisor).
    """

    def __init__(self, roots: t.Callable[[], t.Iterable[int]]) -> None:
        self.roots = roots

    def _ours(self) -> float:
        own = os.times()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        live = sum(tree_cpu_s(root) for root in self.roots())
        return own.user + own.system + children.ru_utime + children.ru_stime + live

    def __enter__(self) -> CpuAudit:
        self._started = time.monotonic()
        self._busy, self._steal = _system_busy_s()
        self._ours_before = self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, steal = _system_busy_s()
        elapsed = max(1e-3, time.monotonic() - self._started)
        foreign = (busy - self._busy) - (self._ours() - self._ours_before)
        self.foreign_cores = max(0.0, foreign) / elapsed
        self.steal_cores = (steal - self._steal) / elapsed


def connections_per_process(root: int, port: int) -> list[int]:
    """Established client connections on ``port`` held by each process of the tree other
    than the root (the workers), busiest first; the root's own when it has no children."""
    processes = tree(root)
    holders = processes[1:] or processes
    counts = []
    for process in holders:
        count = 0
        with contextlib.suppress(*_GONE):
            # psutil 6 renamed connections() to net_connections(); 5.9 has only the old name.
            list_connections = getattr(process, "net_connections", None) or process.connections
            count = sum(
                1
                for conn in list_connections(kind="tcp")
                if conn.status == psutil.CONN_ESTABLISHED and conn.laddr and conn.laddr.port == port
            )
        counts.append(count)
    return sorted(counts, reverse=True)


class _Sampler:
    """A thread that samples while the ``with`` block runs, stopped when it ends."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> t.Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class ConnectionSampler(_Sampler):
    """Counts, once, ``at_s`` into a load run, the connections each worker holds."""

    def __init__(self, root: int, port: int, at_s: float) -> None:
        super().__init__()
        self.root, self.port, self.at_s = root, port, at_s
        self.counts: list[int] = []

    def _run(self) -> None:
        if not self._stop.wait(self.at_s):
            self.counts = connections_per_process(self.root, self.port)


class RssSampler(_Sampler):
    """Samples the RSS sum of a process tree every ``interval_s``; keeps the peak."""

    def __init__(self, root: int, interval_s: float = 0.05) -> None:
        super().__init__()
        self.root = root
        self.interval_s = interval_s
        self.baseline_kib = tree_rss_kib(root)
        self.peak_kib = self.baseline_kib

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, tree_rss_kib(self.root))
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.peak_kib = max(self.peak_kib, tree_rss_kib(self.root))
