"""The proxy's connections through its life, against the real ``jwt-proxy`` CLI: slow
clients that cost no thread, a SIGHUP under load that drops nothing, a SIGTERM that
answers what is already on the wire, and ``--shutdown-delay`` for sidecars.
"""

from __future__ import annotations

import errno
import http.client
import multiprocessing
import os
import resource
import selectors
import signal
import socket
import statistics
import threading
import time

import pytest
import requests

from tests.test_proxy import _tcp_sockets
from tests.test_proxy import children
from tests.upstream import RecordingUpstream

pytestmark = pytest.mark.integration

IO_TIMEOUT_S = 10.0


@pytest.fixture
def upstream():
    with RecordingUpstream() as server:
        yield server


def pinned(upstream) -> tuple[str, ...]:
    return ("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")


def wait_until(condition, timeout_s: float = 20.0, interval_s: float = 0.02, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)


def readyz(proxy) -> tuple[int, str]:
    try:
        response = requests.get(f"http://127.0.0.1:{proxy.metrics_port}/readyz", timeout=5)
    except requests.ConnectionError:
        return 0, ""
    return response.status_code, response.text


def listening(proxy) -> bool:
    return bool(_tcp_sockets(proxy.port, "0A"))


class KeptAlive:
    """A raw keep-alive connection: one request at a time, the response read whole
    (Content-Length framed), its status and ``Connection`` header kept."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
        self.buffered = b""

    def request(self, path: str) -> tuple[int, str]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buffered:
            self._receive()
        head, _, self.buffered = self.buffered.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        while len(self.buffered) < length:
            self._receive()
        self.buffered = self.buffered[length:]
        return int(lines[0].split()[1]), headers.get("connection", "")

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the proxy")
        self.buffered += data

    def closed_by_peer(self) -> bool:
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


# -- slow clients cost no thread -------------------------------------------------------------


class Drippers:
    """``count`` connections that each send an endless request head one byte per
    ``interval_s``, and reconnect when the proxy cuts them off. A process of its own (so
    that it does not compete with the measured client for this process's GIL), one
    selector; stopped by its PID."""

    HEAD = b"GET /drip HTTP/1.1\r\nHost: proxy\r\nX-Slow: " + b"a" * 10_000

    def __init__(self, port: int, count: int, interval_s: float) -> None:
        context = multiprocessing.get_context("fork")
        self.port, self.count, self.interval_s = port, count, interval_s
        self._reconnects = context.Value("q", 0)
        self._bytes_sent = context.Value("q", 0)
        self._stop = context.Event()
        self._process = context.Process(target=self._run, daemon=True)

    @property
    def reconnects(self) -> int:
        return self._reconnects.value

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent.value

    def __enter__(self) -> Drippers:
        self._process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)

    def _connect(self, selector: selectors.BaseSelector) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))
        selector.register(sock, selectors.EVENT_READ, [0, time.monotonic()])

    def _run(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 4096:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
        selector = selectors.DefaultSelector()
        for _ in range(self.count):
            self._connect(selector)
        while not self._stop.is_set():
            now = time.monotonic()
            for key, _ in selector.select(timeout=0.01):  # cut off, or refused
                try:
                    gone = key.fileobj.recv(1024) == b""
                except OSError:
                    gone = True
                if gone:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
                    self._reconnects.value += 1
                    self._connect(selector)
            sent = 0
            for key in list(selector.get_map().values()):
                position, due = key.data
                if now < due:
                    continue
                try:
                    key.fileobj.send(self.HEAD[position % len(self.HEAD) : position % len(self.HEAD) + 1])
                    key.data[0] += 1
                    sent += 1
                except OSError:
                    pass  # still connecting, or cut off: the read side says so
                key.data[1] = now + self.interval_s
            self._bytes_sent.value += sent


def test_clients_dripping_their_heads_do_not_slow_down_a_normal_client(start_proxy, upstream):
    """200 connections drip their heads (and reconnect when the head deadline cuts them
    off) on 2 workers of 32 threads: if each held a thread, the normal client would wait
    for the head deadline."""
    proxy = start_proxy(*pinned(upstream), "--workers", "2", "--threads", "32")
    wait_until(lambda: readyz(proxy)[0] == 200, what="both workers ready")
    with requests.Session() as session:
        assert session.get(proxy.url + "/warm", timeout=IO_TIMEOUT_S).status_code == 200
        with Drippers(proxy.port, 200, interval_s=0.25) as drippers:
            wait_until(lambda: drippers.bytes_sent >= 200 * 8, what="every dripper under way")
            durations = []
            for index in range(40):
                started = time.monotonic()
                if index % 2:  # a kept-alive connection, then a new one each time
                    response = session.get(proxy.url + "/normal", timeout=IO_TIMEOUT_S)
                else:
                    response = requests.get(proxy.url + "/normal", headers={"Connection": "close"}, timeout=IO_TIMEOUT_S)
                durations.append(time.monotonic() - started)
                assert response.status_code == 200
                time.sleep(0.3)  # 12 s in all: past the head deadline, so drippers are cut off and reconnect
            still_dripping = drippers.bytes_sent
            time.sleep(0.5)
            assert drippers.bytes_sent > still_dripping  # the drippers ran all along
            assert drippers.reconnects >= 200  # the head deadline still cuts them off
    median_ms, max_ms = statistics.median(durations) * 1000, max(durations) * 1000
    print(f"normal client among 200 drippers: median {median_ms:.1f} ms, max {max_ms:.1f} ms")
    assert max_ms < 100, f"median {median_ms:.1f} ms, max {max_ms:.1f} ms"
    assert all(r.target == "/normal" or r.target == "/warm" for r in upstream.requests)


def test_a_head_begun_in_the_linger_and_finished_slowly_holds_no_thread(start_proxy, upstream):
    """The one pool thread serves a kept-alive client's next request itself when it comes
    at once; a next head that then drips goes back to the main loop, and another client
    is served meanwhile."""
    proxy = start_proxy(*pinned(upstream), "--workers", "1", "--threads", "1")
    slow = KeptAlive(proxy.port)
    try:
        assert slow.request("/first") == (200, "keep-alive")
        slow.sock.sendall(b"GET /second HTTP/1.1\r\n")  # begun; the rest comes later
        time.sleep(0.3)
        started = time.monotonic()
        assert requests.get(proxy.url + "/other", headers={"Connection": "close"}, timeout=IO_TIMEOUT_S).status_code == 200
        assert time.monotonic() - started < 2.0
        slow.sock.sendall(b"Host: proxy\r\n\r\n")
        slow.buffered = b""
        while b"\r\n\r\n" not in slow.buffered:
            slow._receive()
        assert slow.buffered.startswith(b"HTTP/1.1 200")
    finally:
        slow.close()
    assert [r.target for r in upstream.requests] == ["/first", "/other", "/second"]


# -- SIGHUP: new workers, nothing dropped ------------------------------------------------------


class Load:
    """``clients`` threads sending requests back to back until stopped: even ones on a
    kept-alive connection, odd ones on a new connection each time. Any error or status
    other than 200 is a failure."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.done = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(index % 2 == 0,), daemon=True) for index in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self, keep_alive: bool) -> None:
        connection = None
        while not self._stop.is_set():
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=IO_TIMEOUT_S)
            try:
                connection.request("GET", "/load", headers={} if keep_alive else {"Connection": "close"})
                response = connection.getresponse()
                response.read()
                outcome = None if response.status == 200 else f"status {response.status}"
                if response.will_close or not keep_alive:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
                connection.close()
                connection = None
            with self._lock:
                self.done += 1
                if outcome:
                    self.failures.append(outcome)
        if connection is not None:
            connection.close()


def test_sighup_under_load_fails_no_request(start_proxy, upstream):
    proxy = start_proxy(*pinned(upstream), "--workers", "2", "--threads", "16")
    wait_until(lambda: readyz(proxy)[0] == 200, what="both workers ready")
    old_workers = children(proxy.pid)
    with Load(proxy.port, clients=8) as load:
        wait_until(lambda: load.done >= 1500, timeout_s=60, what="1500 requests before the SIGHUP")
        proxy.signal(signal.SIGHUP)
        wait_until(
            lambda: len(children(proxy.pid)) == 2 and not children(proxy.pid) & old_workers,
            timeout_s=60,
            what="the old workers replaced",
        )
        wait_until(lambda: readyz(proxy)[0] == 200, timeout_s=30, what="the new workers ready")
        served_at_hup = load.done
        wait_until(lambda: load.done >= served_at_hup + 1500, timeout_s=60, what="1500 requests after the SIGHUP")
    print(f"SIGHUP under load: {load.done} requests, {len(load.failures)} failed")
    assert load.failures == [], load.failures[:5]
    assert load.done >= 3000


# -- SIGTERM: what is on the wire is answered ----------------------------------------------------


def test_sigterm_answers_requests_sent_on_kept_alive_connections_with_connection_close(start_proxy, upstream):
    proxy = start_proxy(*pinned(upstream), "--workers", "2", "--threads", "8")
    wait_until(lambda: readyz(proxy)[0] == 200, what="both workers ready")
    clients = [KeptAlive(proxy.port) for _ in range(16)]
    try:
        for client in clients:
            assert client.request("/before") == (200, "keep-alive")
        proxy.signal(signal.SIGTERM)
        wait_until(lambda: not listening(proxy), timeout_s=10, interval_s=0.005, what="the drain to start")
        with socket.socket() as late:  # the drain has started: a new connection is refused
            assert late.connect_ex(("127.0.0.1", proxy.port)) == errno.ECONNREFUSED
        started = time.monotonic()
        answers = [client.request("/during-drain") for client in clients]
        elapsed = time.monotonic() - started
        assert answers == [(200, "close")] * len(clients)
        assert all(client.closed_by_peer() for client in clients)
    finally:
        for client in clients:
            client.close()
    assert elapsed < 2.0, f"the answers took {elapsed:.2f} s"
    assert proxy.popen.wait(30) == 0


def test_sigterm_serves_connections_queued_before_the_drain_and_refuses_later_ones(start_proxy, upstream):
    """Connections that the kernel accepted before the drain are answered; from the
    drain on, new connections are refused; none is reset."""
    proxy = start_proxy(*pinned(upstream), "--workers", "2", "--threads", "8")
    wait_until(lambda: readyz(proxy)[0] == 200, what="both workers ready")
    outcomes: list[str] = []
    stop = threading.Event()

    def connect_repeatedly() -> None:
        while not stop.is_set():
            try:
                response = requests.get(proxy.url + "/around-the-drain", headers={"Connection": "close"}, timeout=IO_TIMEOUT_S)
                outcomes.append(f"status {response.status_code}")
            except requests.ConnectionError as exc:
                refused = isinstance(exc.__context__, ConnectionRefusedError) or "Connection refused" in str(exc)
                outcomes.append("refused" if refused else f"failed: {exc}")
                if refused:
                    return

    threads = [threading.Thread(target=connect_repeatedly, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(outcomes) >= 200, timeout_s=60, what="traffic before the SIGTERM")
    proxy.signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)
    stop.set()
    assert not any(t.is_alive() for t in threads)
    assert set(outcomes) == {"status 200", "refused"}, [o for o in outcomes if o not in ("status 200", "refused")][:5]
    assert proxy.popen.wait(30) == 0


def test_sigterm_gives_a_connection_that_arrives_after_the_drain_began_no_handshake(start_proxy, upstream):
    """A worker that is slow to act on SIGTERM (stopped here) still holds its listening
    socket, but from the master's SIGTERM on the socket completes no new handshake: the
    client's SYN goes unanswered, and its retry is refused once the worker has closed
    the socket. Without that, the connection would be queued and, had it arrived just
    after the worker's last accept, reset by the close."""
    proxy = start_proxy(*pinned(upstream), "--workers", "1")
    wait_until(lambda: readyz(proxy)[0] == 200, what="the worker ready")
    (worker,) = children(proxy.pid)
    os.kill(worker, signal.SIGSTOP)
    # Stopped before the SIGTERM comes: a SIGTERM pending with the SIGSTOP would be taken first.
    wait_until(lambda: _process_state(worker) == "T", what="the worker stopped")
    outcome: list[int] = []
    try:
        proxy.signal(signal.SIGTERM)
        # The master signals the workers after it has set the drain up.
        wait_until(lambda: _sigterm_pending(worker), what="the master's SIGTERM to reach the worker")

        def connect_late() -> None:
            with socket.socket() as late:
                late.settimeout(IO_TIMEOUT_S)
                outcome.append(late.connect_ex(("127.0.0.1", proxy.port)))

        client = threading.Thread(target=connect_late, daemon=True)
        client.start()
        wait_until(lambda: _connecting_to(proxy.port), what="the late client's SYN")
        time.sleep(0.5)  # a handshake on loopback takes microseconds: none must come
        assert outcome == [] and _connecting_to(proxy.port), "the late connection got a handshake"
    finally:
        os.kill(worker, signal.SIGCONT)
    assert proxy.popen.wait(30) == 0
    client.join(IO_TIMEOUT_S)
    assert outcome == [errno.ECONNREFUSED]


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def _sigterm_pending(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
                return True
    return False


def _connecting_to(port: int) -> bool:
    """Whether a loopback client socket is waiting for the handshake (SYN_SENT) with ``port``."""
    with open("/proc/net/tcp") as table:
        next(table)
        return any(
            fields[3] == "02" and int(fields[2].rsplit(":", 1)[1], 16) == port for fields in map(str.split, table)
        )


# -- --shutdown-delay ---------------------------------------------------------------------


def test_shutdown_delay_keeps_serving_while_readyz_fails_then_drains_and_exits_0(start_proxy, upstream):
    delay_s = 3.0
    proxy = start_proxy(*pinned(upstream), "--workers", "2", "--shutdown-delay", f"{delay_s:g}s", "--graceful-timeout", "10s")
    wait_until(lambda: readyz(proxy)[0] == 200, what="both workers ready")
    kept = KeptAlive(proxy.port)
    try:
        assert kept.request("/before") == (200, "keep-alive")
        signalled = time.monotonic()
        proxy.signal(signal.SIGTERM)
        wait_until(lambda: readyz(proxy)[0] == 503, timeout_s=5, what="/readyz to fail")
        status, reason = readyz(proxy)
        assert len(reason.strip().splitlines()) == 1 and "shutting down" in reason
        served_new = served_kept = 0
        while time.monotonic() - signalled < delay_s - 1.0:  # well inside the delay
            response = requests.get(proxy.url + "/during-delay", headers={"Connection": "close"}, timeout=IO_TIMEOUT_S)
            assert response.status_code == 200
            served_new += 1
            assert kept.request("/during-delay-kept") == (200, "keep-alive")  # kept alive: not draining yet
            served_kept += 1
            assert readyz(proxy)[0] == 503
            time.sleep(0.1)
        assert served_new >= 3 and served_kept >= 3
        assert proxy.popen.poll() is None
        wait_until(lambda: not listening(proxy), timeout_s=delay_s + 5, interval_s=0.005, what="the drain to start")
        drained_after = time.monotonic() - signalled
        assert kept.request("/during-drain") == (200, "close")
    finally:
        kept.close()
    assert proxy.popen.wait(15) == 0
    exited_after = time.monotonic() - signalled
    assert delay_s - 0.5 <= drained_after <= delay_s + 3, drained_after
    assert exited_after <= delay_s + 10, exited_after
    proxy.wait_for_record(lambda r: "shutdown-delay" in r.get("msg", ""))


def test_no_shutdown_delay_by_default_readyz_fails_and_the_drain_starts_at_once(start_proxy, upstream):
    proxy = start_proxy(*pinned(upstream), "--workers", "1")
    wait_until(lambda: readyz(proxy)[0] == 200, what="the worker ready")
    signalled = time.monotonic()
    proxy.signal(signal.SIGTERM)
    wait_until(lambda: not listening(proxy), timeout_s=10, interval_s=0.005, what="the drain to start")
    assert time.monotonic() - signalled < 2.0
    assert proxy.popen.wait(15) == 0


def test_a_second_sigterm_ends_the_shutdown_delay(start_proxy, upstream):
    proxy = start_proxy(*pinned(upstream), "--workers", "1", "--shutdown-delay", "60s")
    wait_until(lambda: readyz(proxy)[0] == 200, what="the worker ready")
    proxy.signal(signal.SIGTERM)
    wait_until(lambda: readyz(proxy)[0] == 503, timeout_s=5, what="/readyz to fail")
    assert requests.get(proxy.url + "/during-delay", headers={"Connection": "close"}, timeout=IO_TIMEOUT_S).status_code == 200
    assert "still serving for the shutdown delay" in readyz(proxy)[1]
    proxy.signal(signal.SIGTERM)
    assert proxy.popen.wait(15) == 0
