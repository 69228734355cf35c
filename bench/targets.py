"""Starting what is measured: the upstreams (nginx or the Python server) and each
target in front of them (nginx proxy_pass, jwt-proxy with its local STS, the naive
Flask proxy, the Go proxy), all on free loopback ports, all stopped by PID."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import typing as t
import urllib.error
import urllib.request
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from common import AUDIENCE
from common import BENCH_DIR
from machine import Tools
from procs import Proc
from procs import Processes
from procs import venv_tool
from procs import wait_for_workers
from procs import wait_listening
from tests.processes import START_TIMEOUT_S
from tests.processes import aws_env
from tests.processes import free_port


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


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
    wait_listening(port, proc)
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
    wait_listening(port, proc)
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
        wait_listening(port, proc)
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
        wait_listening(port, proc)
        return Running(name, port, proc, lambda: procs.stop(proc), ["GOMAXPROCS = cores"])
    raise ValueError(name)


def start_local_sts(procs: Processes, extra: list[str] | None = None) -> tuple[Proc, str]:
    port = free_port()
    proc = procs.start(
        "local-sts",
        [venv_tool("jwt-proxy"), "local-sts", "--listen-addr", f"127.0.0.1:{port}", *(extra or [])],
        env=aws_env(f"http://127.0.0.1:{port}"),
    )
    wait_listening(port, proc)
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
        wait_listening(port, proc)
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
