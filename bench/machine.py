"""The machine and the tools the benchmark runs with: which of wrk, nginx and go are
installed (each is optional, with a fallback), and the facts printed under the results
(CPU, memory, versions, the commit measured)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from common import INSTALL_HINT
from common import MIB
from common import REPO
from common import log


@dataclass
class Tools:
    wrk: str | None
    nginx: str | None
    go: str | None


def find_tools() -> Tools:
    tools = Tools(shutil.which("wrk"), shutil.which("nginx") or _sbin("nginx"), shutil.which("go"))
    if not tools.wrk:
        log(f"wrk not found: using the Python load generator (slower; it may be the bottleneck). {INSTALL_HINT}")
    if not tools.nginx:
        log(f"nginx not found: Python upstream instead, no nginx proxy_pass target. {INSTALL_HINT}")
    if not tools.go:
        log("go not found: no Go httputil.ReverseProxy target (install Go to add it)")
    return tools


def _sbin(name: str) -> str | None:
    for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(directory, name)
        if candidate.exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _version(args: list[str]) -> str:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (result.stdout + result.stderr).strip().splitlines()
    return text[0] if text else "?"


def _git_state() -> str:
    """The commit measured, and whether jwt_proxy/ differs from it (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "jwt_proxy"], capture_output=True, timeout=10
        ).returncode
        untracked = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "--others", "--exclude-standard", "--", "jwt_proxy"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    dirty = dirty or bool(untracked)
    if not head:
        return "not a git checkout"
    return f"commit {head}" + (" with uncommitted changes in jwt_proxy/" if dirty else "")


def machine_info(tools: Tools) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])

    def pkg(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    info = {
        "jwt-proxy tree": _git_state(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{mem_kib / MIB:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gunicorn": pkg("gunicorn"),
        "flask": pkg("flask"),
        "werkzeug": pkg("werkzeug"),
        "requests": pkg("requests"),
        "urllib3": pkg("urllib3"),
        "jwt-proxy": pkg("jwt-proxy"),
        "nginx": _version([tools.nginx, "-v"]).replace("nginx version: ", "") if tools.nginx else "not installed",
        "wrk": _version([tools.wrk, "-v"]).split(" [")[0] if tools.wrk else "not installed (Python load generator)",
        "go": _version([tools.go, "version"]) if tools.go else "not installed",
    }
    return info
