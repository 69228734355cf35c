#!/usr/bin/env python3
"""Benchmark of jwt-proxy against a direct call, nginx, a naive Flask proxy (and Go).

Run from the repository with the project's venv (issue 7)::

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
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
import urllib.error
import urllib.request
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import loadgen  # noqa: E402

BIN_DIR = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
SLOW_DELAY_S = 0.2
TTFB_WARMUP = 3
FOREIGN_CPU_WARN_CORES = 0.1
AUDIENCE = "https://bench.example.com"
CONCURRENCY = (1, 16, 64)
TARGET_ORDER = ("direct", "nginx", "jwt-proxy", "naive", "go")
TARGET_LABELS = {
    "direct": "direct (upstream)",
    "nginx": "nginx proxy_pass",
    "jwt-proxy": "jwt-proxy",
    "naive": "naive Flask+requests",
    "go": "Go ReverseProxy",
}
INSTALL_HINT = "install with: apt-get install -y nginx wrk   (Debian/Ubuntu; brew install nginx wrk on macOS)"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- /proc -----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is field 3, state)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, from the ppid in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    if _stat_fields(root) is None:
        return []
    result, queue = [], [root]
    while queue:
        pid = queue.pop()
        result.append(pid)
        queue.extend(children.get(pid, ()))
    return result


def tree_cpu_s(root: int) -> float:
    """utime + stime of ``root`` and its descendants, in seconds (all their threads)."""
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(root: int) -> int:
    return sum(rss_kib(pid) for pid in tree_pids(root))


def _system_ticks() -> tuple[int, int]:
    """(busy, steal) jiffies of all CPUs from /proc/stat; busy excludes idle, iowait and steal."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


class CpuAudit:
    """CPU used on the machine during a run by processes that are not the benchmark's.

    Busy time from /proc/stat minus this process, its reaped children (wrk) and the
    live trees of every process it started. Other work on a 2-core machine (a test run,
    a build) skews every number, so the report warns when this is not near zero. Also
    records steal time (a busy neighbour on the hypervisor).
    """

    def __init__(self, procs: Processes) -> None:
        self.procs = procs

    def _ours(self) -> float:
        own = os.times()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        live = sum(tree_cpu_s(p.pid) for p in list(self.procs.procs))
        return own.user + own.system + children.ru_utime + children.ru_stime + live

    def __enter__(self) -> CpuAudit:
        self._started = time.monotonic()
        self._busy, self._steal = _system_ticks()
        self._ours_before = self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, steal = _system_ticks()
        elapsed = max(1e-3, time.monotonic() - self._started)
        foreign = (busy - self._busy) / CLK_TCK - (self._ours() - self._ours_before)
        self.foreign_cores = max(0.0, foreign) / elapsed
        self.steal_cores = (steal - self._steal) / CLK_TCK / elapsed


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes of established TCP connections whose local port is ``port``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def connections_per_process(root: int, port: int) -> list[int]:
    """Established client connections on ``port`` held by each process of the tree other
    than the root (the workers), busiest first; the root's own when it has no children."""
    inodes = _listening_inodes(port)
    pids = tree_pids(root)
    holders = [pid for pid in pids if pid != root] or pids
    counts = []
    for pid in holders:
        count = 0
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        count += 1
        counts.append(count)
    return sorted(counts, reverse=True)


class ConnectionSampler:
    """Counts, once, ``at_s`` into a load run, the connections each worker holds."""

    def __init__(self, root: int, port: int, at_s: float) -> None:
        self.counts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(root, port, at_s), daemon=True)

    def _run(self, root: int, port: int, at_s: float) -> None:
        if not self._stop.wait(at_s):
            self.counts = connections_per_process(root, port)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class RssSampler:
    """Samples the VmRSS sum of a process tree every ``interval_s`` in a thread."""

    def __init__(self, root: int, interval_s: float = 0.05) -> None:
        self.root = root
        self.interval_s = interval_s
        self.baseline_kib = tree_rss_kib(root)
        self.peak_kib = self.baseline_kib
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, tree_rss_kib(self.root))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak_kib = max(self.peak_kib, tree_rss_kib(self.root))


# -- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    stop_signal: int = signal.SIGTERM
    known: dict[int, int | None] = field(default_factory=dict)  # pid -> start time

    @property
    def pid(self) -> int:
        return self.popen.pid

    def remember_tree(self) -> None:
        for pid in tree_pids(self.pid):
            self.known.setdefault(pid, start_time(pid))

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
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, proc.stop_signal)
            try:
                proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(5)
        # Children the master left behind (only the very processes seen in its tree).
        deadline = time.monotonic() + 5
        for pid, started in proc.known.items():
            if pid == proc.pid:
                continue
            while start_time(pid) == started and started is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if start_time(pid) == started and started is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: Proc, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not listening on 127.0.0.1:{port} after {timeout_s}s:\n{proc.log_tail()}")


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def aws_env(sts_url: str) -> dict[str, str]:
    """Dummy credentials, a region, local-sts as the endpoint; nothing but loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PROMETHEUS_"))}
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    # The proxy's own settings come from flags here, never from the caller's environment.
    from_flags = {"LISTEN_ADDR", "UPSTREAM_HOST", "UPSTREAM_SCHEME", "TOKEN_AUDIENCE", "WORKERS", "THREADS"}
    env = {k: v for k, v in env.items() if k not in from_flags}
    env.update(
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="AKIDBENCHMARK",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL_STS=sts_url,
        PYTHONUNBUFFERED="1",
    )
    return env


def venv_tool(name: str) -> str:
    path = BIN_DIR / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found next to {sys.executable}: run with the project's venv (.venv/bin/python)")
    return found


# -- tools and machine ------------------------------------------------------------------------


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


# -- the upstream ------------------------------------------------------------------------------

NGINX_COMMON = """\
daemon off;
master_process on;
worker_processes {workers};
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {work}/{name}-body;
    proxy_temp_path {work}/{name}-proxy;
    fastcgi_temp_path {work}/{name}-fastcgi;
    uwsgi_temp_path {work}/{name}-uwsgi;
    scgi_temp_path {work}/{name}-scgi;
{servers}
}}
"""

NGINX_UPSTREAM_SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        root {work}/www;
        location = /1k {{ }}
    }}
"""

NGINX_PROXY_SERVER = """\
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer nginx-fixed-token";
            # Streaming both ways, as the Python proxies do; buffers sized like theirs
            # (64 KiB reads), not nginx's 4-8 KiB defaults.
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;
            client_body_buffer_size 64k;
        }}
    }}
"""


def nginx_config(work: Path, name: str, servers: str, workers: int) -> Path:
    user = ""
    if os.geteuid() == 0:  # workers would run as nobody and could not read the work dir
        import grp
        import pwd

        user = f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(0).gr_name};"
    for suffix in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / f"{name}-{suffix}").mkdir(exist_ok=True)
    path = work / f"{name}.conf"
    path.write_text(NGINX_COMMON.format(work=work, name=name, servers=servers, user=user, workers=workers))
    return path


def start_nginx(procs: Processes, tools: Tools, work: Path, name: str, servers: str, port: int, workers: int) -> Proc:
    conf = nginx_config(work, name, servers, workers)
    args = [tools.nginx, "-p", str(work), "-e", str(work / f"{name}-error.log"), "-c", str(conf)]
    check = subprocess.run(args + ["-t"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed for {name}:\n{check.stderr}")
    proc = procs.start(name, args, stop_signal=signal.SIGQUIT)
    wait_for_port(port, proc)
    proc.remember_tree()
    return proc


@dataclass
class Upstream:
    port: int
    root: Proc  # the process tree doing the serving
    kind: str


@dataclass
class Upstreams:
    """``fast`` serves ``GET /1k`` for the req/s runs (nginx, else Python); ``stream``
    (Python, reads and writes 1 MiB at a time) serves the slow chunked response, the
    upload sink and the download. Measured alone, ``stream`` moves 3+ GB/s each way on
    loopback, well above any proxy here; nginx's own WebDAV PUT sink to tmpfs was
    slower and erratic (0.3-1.8 GB/s), and nginx cannot send a chunked body slowly."""

    fast: Upstream
    stream: Upstream


def start_upstreams(procs: Processes, tools: Tools, work: Path, body_bytes: int) -> Upstreams:
    port = free_port()
    proc = procs.start(
        "stream-upstream",
        [sys.executable, str(BENCH_DIR / "pyupstream.py"), "--port", str(port), "--download-bytes", str(body_bytes)],
    )
    wait_for_port(port, proc)
    stream = Upstream(port, proc, "Python")
    if not tools.nginx:
        return Upstreams(stream, stream)
    www = work / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "1k").write_bytes(b"x" * 1023 + b"\n")
    port = free_port()
    servers = NGINX_UPSTREAM_SERVER.format(port=port, work=work)
    proc = start_nginx(procs, tools, work, "upstream-nginx", servers, port, workers=2)
    return Upstreams(Upstream(port, proc, "nginx"), stream)


# -- targets -----------------------------------------------------------------------------------


@dataclass
class Running:
    name: str
    port: int
    root: Proc
    stop: t.Callable[[], None]
    notes: list[str] = field(default_factory=list)


def start_target(
    name: str, procs: Processes, tools: Tools, work: Path, upstream: Upstream, args: argparse.Namespace
) -> Running:
    if name == "direct":
        return Running(name, upstream.port, upstream.root, lambda: None, ["the upstreams themselves"])
    if name == "nginx":
        port = free_port()
        servers = NGINX_PROXY_SERVER.format(port=port, upstream_port=upstream.port)
        proc = start_nginx(procs, tools, work, f"proxy-nginx-{port}", servers, port, workers=2)
        return Running(name, port, proc, lambda: procs.stop(proc), ["2 workers, keepalive 64, unbuffered"])
    if name == "naive":
        port = free_port()
        env = dict(os.environ, NAIVE_UPSTREAM=f"http://127.0.0.1:{upstream.port}", PYTHONUNBUFFERED="1")
        gunicorn_args = [
            venv_tool("gunicorn"),
            "--worker-class", "gthread",
            "--workers", str(args.naive_workers),
            "--threads", str(args.naive_threads),
            "--bind", f"127.0.0.1:{port}",
            "--keep-alive", "5",
            "--log-level", "warning",
            "--chdir", str(BENCH_DIR),
            "naive_proxy:app",
        ]  # fmt: skip
        if os.access("/dev/shm", os.W_OK):
            gunicorn_args[1:1] = ["--worker-tmp-dir", "/dev/shm"]
        proc = procs.start("naive-proxy", gunicorn_args, env=env)
        wait_for_port(port, proc)
        wait_for_workers(proc, args.naive_workers)
        return Running(
            name, port, proc, lambda: procs.stop(proc), [f"{args.naive_workers} workers x {args.naive_threads} threads"]
        )
    if name == "jwt-proxy":
        return start_jwt_proxy(procs, upstream, args)
    if name == "go":
        binary = work / "go_proxy"
        env = dict(os.environ, GOTOOLCHAIN="local", GOPROXY="off", GOFLAGS="-mod=mod", CGO_ENABLED="0")
        env.setdefault("GOCACHE", str(work / "gocache"))
        build = subprocess.run(
            [tools.go, "build", "-o", str(binary), str(BENCH_DIR / "go_proxy.go")],
            capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if build.returncode != 0:
            raise RuntimeError(f"go build failed:\n{build.stderr}")
        port = free_port()
        proc = procs.start(
            "go-proxy", [str(binary), "-listen", f"127.0.0.1:{port}", "-upstream", f"http://127.0.0.1:{upstream.port}"]
        )
        wait_for_port(port, proc)
        return Running(name, port, proc, lambda: procs.stop(proc), ["GOMAXPROCS = cores"])
    raise ValueError(name)


def wait_for_workers(proc: Proc, workers: int, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(tree_pids(proc.pid)) < 1 + workers:
        time.sleep(0.05)
    proc.remember_tree()


def start_local_sts(procs: Processes, extra: list[str] | None = None) -> tuple[Proc, str]:
    port = free_port()
    proc = procs.start(
        "local-sts",
        [venv_tool("jwt-proxy"), "local-sts", "--listen-addr", f"127.0.0.1:{port}", *(extra or [])],
        env=aws_env(f"http://127.0.0.1:{port}"),
    )
    wait_for_port(port, proc)
    return proc, f"http://127.0.0.1:{port}"


def sts_calls(sts_url: str) -> int:
    status, body = http_get(sts_url + "/_local-sts/stats")
    if status != 200:
        raise RuntimeError(f"local-sts stats: {status}")
    return int(json.loads(body)["calls"])


def start_jwt_proxy(
    procs: Processes, upstream: Upstream, args: argparse.Namespace, *, sts_extra: list[str] | None = None,
    proxy_extra: list[str] | None = None,
) -> Running:  # fmt: skip
    """local-sts and jwt-proxy (pinned to ``upstream``, one configured audience, so each
    worker pre-warms its token); returns once every worker has minted it."""
    sts_proc, sts_url = start_local_sts(procs, sts_extra)
    port, metrics_port = free_port(), free_port()
    workers = args.workers
    flags = [
        "--listen-addr", f"127.0.0.1:{port}",
        "--metrics-listen-addr", f"127.0.0.1:{metrics_port}",
        "--upstream-host", f"127.0.0.1:{upstream.port}",
        "--upstream-scheme", "http",
        "--token-audience", AUDIENCE,
        "--workers", str(workers),
        "--threads", str(args.threads),
        *(proxy_extra or []),
        *args.proxy_flag,
    ]  # fmt: skip
    env = aws_env(sts_url)
    command = [venv_tool("jwt-proxy")]
    proc = procs.start("jwt-proxy", [*command, *flags], env=env)

    def stop() -> None:
        procs.stop(proc)
        procs.stop(sts_proc)

    try:
        wait_for_port(port, proc)
        wait_for_workers(proc, workers)
        # Warm token: every worker mints at start (pre-warm); wait until they all have.
        deadline = time.monotonic() + START_TIMEOUT_S
        while sts_calls(sts_url) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        if "--metrics-enabled=false" not in args.proxy_flag:
            while http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
        if sts_calls(sts_url) < workers:
            raise RuntimeError(f"jwt-proxy workers did not mint their tokens:\n{proc.log_tail()}")
    except BaseException:
        stop()
        raise
    running = Running("jwt-proxy", port, proc, stop, [f"{workers} workers x {args.threads} threads, warm token"])
    running.sts_url = sts_url  # type: ignore[attr-defined]
    running.metrics_port = metrics_port  # type: ignore[attr-defined]
    return running


# -- load --------------------------------------------------------------------------------------

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
        with CpuAudit(self.procs) as audit:
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


# -- single-connection measurements -----------------------------------------------------------


def ttfb_once(port: int, timeout_s: float = 5.0) -> tuple[float, float]:
    """Seconds from sending ``GET /slow`` to the first body bytes (``chunk-1``), and to
    the second chunk (sent by the upstream ``SLOW_DELAY_S`` later), on a raw socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = f"GET /slow?delay={SLOW_DELAY_S} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        buffer = b""
        first = second = None
        started = time.perf_counter()
        sock.sendall(request.encode())
        while True:
            data = sock.recv(65536)
            now = time.perf_counter()
            if not data:
                break
            buffer += data
            if first is None and b"chunk-1" in buffer:
                first = now - started
            if second is None and b"chunk-2" in buffer:
                second = now - started
                break
    if first is None or second is None or not buffer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected /slow answer: {buffer[:200]!r}")
    return first, second


def _read_head(reader: t.BinaryIO) -> tuple[int, dict[str, str]]:
    status_line = reader.readline(65536)
    if not status_line:
        raise RuntimeError("connection closed before the status line")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = reader.readline(65536)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def _read_body(reader: t.BinaryIO, headers: dict[str, str], status: int) -> int:
    buffer = bytearray(MIB)
    view = memoryview(buffer)
    total = 0
    if status in (204, 304):
        return 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int(reader.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while reader.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return total
            remaining = size
            while remaining:
                n = reader.readinto(view[: min(remaining, MIB)])
                if not n:
                    raise RuntimeError("chunked body ended early")
                remaining -= n
            total += size
            reader.readline(16)
    if "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining:
            n = reader.readinto(view[: min(remaining, MIB)])
            if not n:
                raise RuntimeError("body ended early")
            remaining -= n
            total += n
        return total
    while True:
        n = reader.readinto(view)
        if not n:
            return total
        total += n


def download(port: int, body_bytes: int, timeout_s: float = 120.0) -> float:
    """Seconds to GET ``/download`` (``body_bytes`` long) to its last byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        reader = sock.makefile("rb", buffering=MIB)
        started = time.perf_counter()
        sock.sendall(b"GET /download HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        status, headers = _read_head(reader)
        got = _read_body(reader, headers, status)
        elapsed = time.perf_counter() - started
    if status != 200 or got != body_bytes:
        raise RuntimeError(f"download: status {status}, {got} of {body_bytes} bytes")
    return elapsed


def upload(port: int, body_bytes: int, timeout_s: float = 120.0) -> float:
    """Seconds to PUT ``body_bytes`` (``Content-Length``) to the sink and get its answer."""
    block = memoryview(b"\0" * MIB)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        reader = sock.makefile("rb", buffering=65536)
        head = (
            f"PUT /upload/blob HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {body_bytes}\r\nConnection: close\r\n\r\n"
        )
        started = time.perf_counter()
        sock.sendall(head.encode())
        remaining = body_bytes
        while remaining > 0:
            n = min(remaining, MIB)
            sock.sendall(block[:n])
            remaining -= n
        status, headers = _read_head(reader)
        while status == 100:
            status, headers = _read_head(reader)
        _read_body(reader, headers, status)
        elapsed = time.perf_counter() - started
    if not 200 <= status < 300:
        raise RuntimeError(f"upload: status {status}")
    return elapsed


# -- one target --------------------------------------------------------------------------------


def process_rss(root: int) -> dict[str, t.Any]:
    pids = tree_pids(root)
    per = [{"pid": pid, "rss_mib": rss_kib(pid) / 1024, "pss_mib": pss_kib(pid) / 1024} for pid in pids]
    return {
        "processes": per,
        "rss_mib": sum(p["rss_mib"] for p in per),
        "pss_mib": sum(p["pss_mib"] for p in per),
    }


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


# -- report ------------------------------------------------------------------------------------


def _get(result: dict[str, t.Any], *keys: t.Any) -> float | None:
    value: t.Any = result
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


ROWS: list[tuple[str, tuple[t.Any, ...], str]] = [
    *[(f"requests/s, {c} conn", ("load", c, "rps"), "{:,.0f}") for c in CONCURRENCY],
    *[
        row
        for c in CONCURRENCY
        for row in (
            (f"p50 latency, {c} conn (ms)", ("load", c, "p50_ms"), "{:.2f}"),
            (f"p99 latency, {c} conn (ms)", ("load", c, "p99_ms"), "{:.2f}"),
        )
    ],
    *[(f"CPU per request, {c} conn (ms)", ("load", c, "cpu_ms_per_request"), "{:.3f}") for c in CONCURRENCY],
    ("first byte, slow chunked (ms, median)", ("ttfb", "first_ms_median"), "{:.2f}"),
    ("upload (MiB/s)", ("upload", "mib_per_s"), "{:,.0f}"),
    ("download (MiB/s)", ("download", "mib_per_s"), "{:,.0f}"),
    ("peak RSS during upload (MiB, growth)", ("upload", "rss_peak_mib"), "{:.1f}"),
    ("peak RSS during download (MiB, growth)", ("download", "rss_peak_mib"), "{:.1f}"),
    ("idle RSS, all processes (MiB)", ("idle", "rss_mib"), "{:.1f}"),
]


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "–"
    return f"{value / reference:.2f}×"


def format_table(results: dict[str, dict[str, t.Any]], body_mib: int) -> str:
    names = [n for n in TARGET_ORDER if n in results]
    header = "| metric | " + " | ".join(TARGET_LABELS[n] for n in names) + " |"
    lines = [header, "|---" * (len(names) + 1) + "|"]
    for label, keys, fmt in ROWS:
        label = label.replace("upload (", f"upload {body_mib} MiB (").replace("download (", f"download {body_mib} MiB (")
        cells = []
        for name in names:
            value = _get(results[name], *keys)
            if value is None:
                cells.append("–")
                continue
            text = fmt.format(value)
            if keys[0] in ("upload", "download") and keys[-1] == "rss_peak_mib":
                text += f" (+{_get(results[name], keys[0], 'rss_growth_mib'):.1f})"
            refs = []
            if name != "direct" and "direct" in results:
                refs.append(_ratio(value, _get(results["direct"], *keys)))
            if name not in ("direct", "nginx") and "nginx" in results:
                refs.append(_ratio(value, _get(results["nginx"], *keys)))
            if refs and "RSS" not in label:
                text += " (" + " · ".join(refs) + ")"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(results: dict[str, dict[str, t.Any]], body_mib: int) -> list[tuple[str, str, str, bool | None]]:
    """The targets of issue 7 for jwt-proxy: (target, measured, verdict text, met)."""
    checks: list[tuple[str, str, str, bool | None]] = []
    jp = results.get("jwt-proxy")
    if jp is None:
        return checks

    def add(target: str, measured: str, met: bool | None) -> None:
        checks.append((target, measured, {True: "met", False: "NOT met", None: "not measured"}[met], met))

    cpu16 = _get(jp, "load", 16, "cpu_ms_per_request")
    cpu_all = ", ".join(f"{_get(jp, 'load', c, 'cpu_ms_per_request'):.3f} @{c}" for c in CONCURRENCY)
    add("CPU per proxied request ≤ 1.0 ms (16 conn)", f"{cpu16:.3f} ms ({cpu_all})", cpu16 <= 1.0)
    naive = results.get("naive")
    if naive:
        ratio = _get(jp, "load", 16, "rps") / _get(naive, "load", 16, "rps")
        add(
            "req/s at 16 conn ≥ 2× naive proxy",
            f"{_get(jp, 'load', 16, 'rps'):,.0f} vs {_get(naive, 'load', 16, 'rps'):,.0f} = {ratio:.2f}×",
            ratio >= 2.0,
        )
    else:
        add("req/s at 16 conn ≥ 2× naive proxy", "naive not run", None)
    direct = results.get("direct")
    if direct:
        added = _get(jp, "load", 1, "p50_ms") - _get(direct, "load", 1, "p50_ms")
        add("p50 added over direct at 1 conn ≤ 1.0 ms", f"+{added:.2f} ms", added <= 1.0)
        added_ttfb = _get(jp, "ttfb", "first_ms_median") - _get(direct, "ttfb", "first_ms_median")
        add("first byte of slow chunked ≤ direct + 2 ms", f"+{added_ttfb:.2f} ms", added_ttfb <= 2.0)
    nginx = results.get("nginx")
    if nginx:
        ratio = _get(jp, "upload", "mib_per_s") / _get(nginx, "upload", "mib_per_s")
        add(
            "upload ≥ 0.5× nginx proxy_pass",
            f"{_get(jp, 'upload', 'mib_per_s'):,.0f} vs {_get(nginx, 'upload', 'mib_per_s'):,.0f} MiB/s = {ratio:.2f}×",
            ratio >= 0.5,
        )
    else:
        add("upload ≥ 0.5× nginx proxy_pass", "nginx not available", None)
    growth = max(_get(jp, "upload", "rss_growth_mib"), _get(jp, "download", "rss_growth_mib"))
    # "Flat": a buffering proxy grows by about the body size; allow 5% of it (pools, buffers).
    add(
        f"RSS flat for any body size ({body_mib} MiB up/down)",
        f"peak growth +{_get(jp, 'upload', 'rss_growth_mib'):.1f} MiB up, +{_get(jp, 'download', 'rss_growth_mib'):.1f} MiB down",
        growth <= max(8.0, body_mib * 0.05),
    )
    idle = jp["idle"]
    per = ", ".join(f"{p['rss_mib']:.0f}" for p in idle["processes"])
    add(
        "idle RSS master + 2 workers ≤ 200 MiB",
        f"{idle['rss_mib']:.0f} MiB RSS ({per}); PSS {idle['pss_mib']:.0f} MiB",
        idle["rss_mib"] <= 200,
    )
    return checks


def format_report(
    results: dict[str, dict[str, t.Any]], machine: dict[str, str], args: argparse.Namespace, skipped: list[str]
) -> str:
    out = ["### Results", ""]
    out.append(
        f"Load: `GET /1k` (1 KiB static file) for {args.duration:g} s per level, "
        f"{args.repeat} run{'s' if args.repeat > 1 else ''} per level ({'the median by req/s' if args.repeat > 1 else 'one run'}) "
        f"({'wrk' if machine['wrk'] != 'not installed (Python load generator)' else 'Python load generator'}); "
        f"bodies: {args.body_mib} MiB; ratios in brackets: (to direct · to nginx proxy_pass)."
    )
    out.append("")
    out.append(format_table(results, args.body_mib))
    out.append("")
    for name in TARGET_ORDER:
        if name in results:
            out.append(f"- {TARGET_LABELS[name]}: {'; '.join(results[name]['notes'])}")
    for note in skipped:
        out.append(f"- {note}")
    for name in ("jwt-proxy", "naive"):
        if name in results and args.repeat > 1:
            spread = "; ".join(
                f"{c} conn: "
                + ", ".join(
                    f"{r['rps']:,.0f} ({'+'.join(map(str, r['connections_per_worker']))})"
                    for r in results[name]["load"][c]["runs"]
                )
                for c in CONCURRENCY[1:]
            )
            out.append(f"- {TARGET_LABELS[name]}, req/s of each run (connections per worker): {spread}")
    out.append(
        "- CPU is utime+stime of the target's whole process tree (master and workers) over the run, "
        "divided by the requests; for *direct* it is the upstream's own cost."
    )
    out.append(
        "- Upstreams: `GET /1k` is a static file served by nginx (2 workers); the slow chunked response "
        f"(first chunk at once, the next {SLOW_DELAY_S * 1000:.0f} ms later), the upload sink (reads the whole "
        "body, then answers) and the download come from a Python server doing 1 MiB reads/writes "
        "(3+ GB/s each way alone); each proxy is restarted against it for those rows. Without nginx, "
        "the Python server serves everything."
    )
    out.append(
        "- First byte: from sending the request to receiving the first body chunk, new connection each time. "
        "Upload: `Content-Length` body. RSS: VmRSS summed over the process tree, sampled every 50 ms; "
        "growth over the value before the transfer."
    )
    disturbed = [
        f"{TARGET_LABELS[name]} @{c} conn: {stats['foreign_cpu_cores']:.2f} cores"
        for name, result in results.items()
        for c, stats in result["load"].items()
        if stats.get("foreign_cpu_cores", 0) > FOREIGN_CPU_WARN_CORES
    ]
    worst_steal = max((s.get("steal_cores", 0) for r in results.values() for s in r["load"].values()), default=0)
    worst_foreign = max((s.get("foreign_cpu_cores", 0) for r in results.values() for s in r["load"].values()), default=0)
    if disturbed:
        out.append("- **Warning**: other processes on the machine used CPU during: " + "; ".join(disturbed) + ".")
    else:
        out.append(
            f"- Other processes used at most {worst_foreign:.2f} cores during any load run; "
            f"hypervisor steal at most {worst_steal:.2f} cores."
        )
    errors = [
        f"{TARGET_LABELS[name]} @{c}: {stats['errors']}"
        for name, result in results.items()
        for c, stats in result["load"].items()
        if stats["errors"]
    ]
    if errors:
        out.append("- **Errors** (socket errors or non-2xx/3xx): " + "; ".join(errors))
    checks = check_targets(results, args.body_mib)
    if checks:
        out += ["", "### Issue 7 targets (jwt-proxy)", "", "| target | measured | |", "|---|---|---|"]
        out += [f"| {target} | {measured} | {verdict} |" for target, measured, verdict, _ in checks]
    out += ["", "### Machine", ""]
    out += [f"- {key}: {value}" for key, value in machine.items()]
    return "\n".join(out)


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
        with CpuAudit(procs) as audit:
            time.sleep(2)
        if audit.foreign_cores < FOREIGN_CPU_WARN_CORES:
            return
        if time.monotonic() >= deadline:
            log(f"other processes still use {audit.foreign_cores:.2f} cores: measuring anyway (numbers will suffer)")
            return
        log(f"other processes use {audit.foreign_cores:.2f} cores: waiting for the machine to be quiet")


# -- modes -------------------------------------------------------------------------------------


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
# os.environ iteration under get_environ_proxies as the proxy lookup). Order matters
# within one frame only.
PROFILE_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("access log record (logging, JSON formatter, stdout)", ("(logging/", "jwt_proxy/logs.py", "_log_access")),
    ("gunicorn access-log atoms (computed, then dropped)", ("gunicorn/glogging.py",)),
    ("metrics (prometheus_client multiprocess, jwt_proxy.metrics)", ("prometheus_client/", "jwt_proxy/metrics.py")),
    ("proxy settings read from os.environ per request", ("get_environ_proxies", "(urllib/request.py", "should_bypass_proxies")),
    ("token lookup (jwt_proxy.tokens)", ("jwt_proxy/tokens.py",)),
    ("header filtering (jwt_proxy.headers)", ("jwt_proxy/headers.py",)),
    ("routing (jwt_proxy.routing)", ("jwt_proxy/routing.py",)),
    ("jwt_proxy.forward (request building, raw target, body iterator)", ("jwt_proxy/forward.py",)),
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


def tree_cpu_split_s(root: int) -> tuple[float, float]:
    """(utime, stime) of ``root`` and its descendants, in seconds."""
    user = system = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields:
            user += int(fields[11])
            system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


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


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark jwt-proxy against a direct call, nginx, a naive Flask proxy and Go (issue 7).",
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
    mode = parser.add_argument_group("STS steady state (issue 7 point 4)")
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
