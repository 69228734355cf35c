"""What 10,000 distinct upstream hosts cost jwt-proxy in header mode without an allowlist.

A script, not a test: CI does not run it. Clients name ``127.0.a.b:PORT`` in
``X-Upstream-Host``, each host once; every one of them is a new audience set (a token
fetch), a new upstream address and new metric label values. Reported: RSS of the proxy's
master and workers before and after, the size of ``/metrics`` and how long a scrape
takes, STS calls, and the statuses.

The upstream answers on every 127.0.0.0/8 address, so it listens on 0.0.0.0 (a socket
bound to 127.0.0.1 only answers that one address); it closes at once any connection
whose peer is not on loopback. local-sts and the proxy listen on 127.0.0.1 only. Every
process started is stopped by its PID (children included), also on failure or Ctrl-C.

    .venv/bin/python bench/many_hosts.py                 # 10,000 hosts, about a minute
    .venv/bin/python bench/many_hosts.py --hosts 2000 --json
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import socketserver
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR), str(BENCH_DIR.parent)]  # as run.py: bench modules, tests.processes

from common import MIB  # noqa: E402
from common import log  # noqa: E402
from procs import Processes  # noqa: E402
from procs import venv_tool  # noqa: E402
from procs import wait_for_workers  # noqa: E402
from procs import wait_listening  # noqa: E402
from sampling import tree  # noqa: E402
from sampling import tree_rss_kib  # noqa: E402
from targets import http_get  # noqa: E402
from targets import start_local_sts  # noqa: E402
from targets import sts_calls  # noqa: E402

from tests.processes import aws_env  # noqa: E402
from tests.processes import free_port  # noqa: E402

SCRAPES = 5
# The figures the proxy must stay within (its README states them).
RSS_GROWTH_LIMIT_MIB = 64
METRICS_LIMIT_BYTES = 1_000_000
SCRAPE_LIMIT_S = 0.5


class _LoopbackOnlyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _LoopbackOnlyServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def verify_request(self, request, client_address) -> bool:
        return ipaddress.ip_address(client_address[0]).is_loopback


def start_upstream() -> _LoopbackOnlyServer:
    server = _LoopbackOnlyServer(("0.0.0.0", 0), _LoopbackOnlyHandler)
    threading.Thread(target=server.serve_forever, name="upstream", daemon=True).start()
    return server


def host_names(count: int, port: int) -> list[str]:
    """``127.0.a.b:port`` for ``count`` distinct (a, b), never 127.0.0.0 or .255."""
    names = []
    for index in range(count):
        a, b = divmod(index, 254)
        names.append(f"127.0.{a + 1}.{b + 1}:{port}")
    return names


def send_all(proxy_port: int, hosts: list[str], concurrency: int) -> dict[int, int]:
    """One GET per host over ``concurrency`` keep-alive connections; counts by status."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    chunks = [hosts[i::concurrency] for i in range(concurrency)]

    def worker(chunk: list[str]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)
        for host in chunk:
            try:
                connection.request("GET", "/", headers={"X-Upstream-Host": host})
                response = connection.getresponse()
                response.read()
                status = response.status
                if response.getheader("Connection", "").lower() == "close":
                    connection.close()
            except (OSError, http.client.HTTPException):
                connection.close()
                status = 0
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
        connection.close()

    threads = [threading.Thread(target=worker, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def scrape(metrics_url: str) -> tuple[int, float]:
    """Size of ``/metrics`` in bytes and the median time of :data:`SCRAPES` scrapes."""
    times, size = [], 0
    for _ in range(SCRAPES):
        started = time.perf_counter()
        status, body = http_get(metrics_url, timeout_s=60)
        times.append(time.perf_counter() - started)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        size = len(body)
    return size, statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=10_000, help="distinct upstream hosts (default 10000)")
    parser.add_argument("--concurrency", type=int, default=16, help="client connections (default 16)")
    parser.add_argument("--workers", type=int, default=2, help="proxy workers (default 2, the proxy's default)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="jwt-proxy-many-hosts-"))
    procs = Processes(work)
    upstream = start_upstream()
    try:
        _, sts_url = start_local_sts(procs)
        port, metrics_port = free_port(), free_port()
        proxy = procs.start(
            "jwt-proxy",
            [
                venv_tool("jwt-proxy"),
                "--listen-addr", f"127.0.0.1:{port}",
                "--metrics-listen-addr", f"127.0.0.1:{metrics_port}",
                "--upstream-scheme", "http",
                "--workers", str(args.workers),
                "--log-level", "warn",
            ],
            env=aws_env(sts_url),
        )  # fmt: skip
        wait_listening(port, proxy)
        wait_for_workers(proxy, args.workers)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        upstream_port = upstream.server_address[1]
        # Warm up: imports, pools and metric files as after a little ordinary traffic.
        send_all(port, [f"127.0.0.1:{upstream_port}"] * 50, 4)
        time.sleep(1)
        rss_before = tree_rss_kib(proxy.pid) * 1024
        metrics_before, scrape_before = scrape(metrics_url)
        calls_before = sts_calls(sts_url)

        log(f"{args.hosts} requests, one per host, {args.concurrency} connections")
        started = time.monotonic()
        statuses = send_all(port, host_names(args.hosts, upstream_port), args.concurrency)
        elapsed_s = time.monotonic() - started
        time.sleep(1)
        rss_after = tree_rss_kib(proxy.pid) * 1024
        metrics_after, scrape_after = scrape(metrics_url)
        figures = {
            "hosts": args.hosts,
            "workers": args.workers,
            "processes": len(tree(proxy.pid)),
            "seconds": round(elapsed_s, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "sts_calls": sts_calls(sts_url) - calls_before,
            "rss_before_mib": round(rss_before / MIB, 1),
            "rss_after_mib": round(rss_after / MIB, 1),
            "rss_growth_mib": round((rss_after - rss_before) / MIB, 1),
            "metrics_before_bytes": metrics_before,
            "metrics_after_bytes": metrics_after,
            "scrape_before_s": round(scrape_before, 3),
            "scrape_after_s": round(scrape_after, 3),
        }
        figures["within_limits"] = (
            figures["rss_growth_mib"] < RSS_GROWTH_LIMIT_MIB
            and metrics_after < METRICS_LIMIT_BYTES
            and scrape_after < SCRAPE_LIMIT_S
        )
    finally:
        procs.stop_all()
        upstream.shutdown()
        upstream.server_close()
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            print(f"{key:22} {value}")
    return 0 if figures["within_limits"] else 1


if __name__ == "__main__":
    sys.exit(main())
