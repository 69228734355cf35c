"""Every process the benchmark starts, and stopping them by PID, children included.

Targets are process trees (gunicorn, nginx): a master can exit before its workers, so
the tree seen while it ran is remembered and what it left behind is stopped too, those
very processes only (psutil checks that a PID still names the process it named).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import psutil
from common import BIN_DIR
from common import log
from sampling import tree
from tests.processes import START_TIMEOUT_S
from tests.processes import STOP_TIMEOUT_S
from tests.processes import stop_popen
from tests.processes import wait_for_port

LEFTOVER_WAIT_S = 5.0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    stop_signal: int = signal.SIGTERM
    known: dict[int, psutil.Process] = field(default_factory=dict)  # every process seen in its tree

    @property
    def pid(self) -> int:
        return self.popen.pid

    def remember_tree(self) -> None:
        for process in tree(self.pid):
            self.known.setdefault(process.pid, process)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Processes:
    """Every process the benchmark starts; stops them by PID, children included."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self._lock = threading.Lock()

    def roots(self) -> list[int]:
        return [proc.pid for proc in list(self.procs)]

    def start(
        self,
        name: str,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        stop_signal: int = signal.SIGTERM,
        stdout_path: Path | None = None,
    ) -> Proc:
        log_path = stdout_path or self.log_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(
                args,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
            )
        proc = Proc(name, popen, log_path, stop_signal)
        with self._lock:
            self.procs.append(proc)
        proc.remember_tree()
        return proc

    def stop(self, proc: Proc, timeout_s: float = STOP_TIMEOUT_S) -> None:
        proc.remember_tree()
        stop_popen(proc.popen, proc.stop_signal, timeout_s)
        # Children the master left behind (only the very processes seen in its tree).
        leftovers = [process for pid, process in proc.known.items() if pid != proc.pid]
        _gone, alive = psutil.wait_procs(leftovers, timeout=LEFTOVER_WAIT_S)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        with self._lock:
            if proc in self.procs:
                self.procs.remove(proc)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(reversed(self.procs))
        for proc in procs:
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                log(f"could not stop {proc.name} (pid {proc.pid}): {exc}")


def wait_listening(port: int, proc: Proc, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until ``proc`` listens on ``port``; fails with the end of its log otherwise."""
    try:
        wait_for_port(port, proc.popen, timeout_s)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{proc.name}: {exc}:\n{proc.log_tail()}") from None


def wait_for_workers(proc: Proc, workers: int, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(tree(proc.pid)) < 1 + workers:
        time.sleep(0.05)
    proc.remember_tree()


def venv_tool(name: str) -> str:
    path = BIN_DIR / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found next to {sys.executable}: run with the project's venv (.venv/bin/python)")
    return found
