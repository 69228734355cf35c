"""Streaming on the wire, through the real ``jwt-proxy`` CLI: gigabyte bodies in bounded
memory, backpressure, client disconnects, the two timeouts, HTTP/1.1 corners and
upstream connection reuse. (WebSocket: ``test_websocket.py``.)

Memory is the summed VmRSS of the proxy's whole process tree (gunicorn master and
workers), sampled every 50 ms during a transfer (:class:`TreeRSS`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.streaming_upstream import GiB
from tests.streaming_upstream import MiB
from tests.streaming_upstream import SendProbe
from tests.streaming_upstream import SinkUpstream
from tests.streaming_upstream import TreeRSS
from tests.streaming_upstream import _Stream
from tests.streaming_upstream import event_stream_handler
from tests.streaming_upstream import parse_head
from tests.streaming_upstream import pattern_block
from tests.streaming_upstream import pattern_digest
from tests.streaming_upstream import send_pattern
from tests.streaming_upstream import source_handler
from tests.upstream import RecordingUpstream
from tests.upstream import send_chunk
from tests.upstream import send_response

pytestmark = pytest.mark.integration

#: Most the proxy's process tree may grow by while moving a body of any size.
RSS_BOUND = 64 * MiB
BLOCK = pattern_block()
# How long an upstream handler waits for the test's go-ahead before it ends its response.
IO_WAIT_S = 5.0


def socket_buffers_bound() -> int:
    """Most that can sit in the four socket buffers between a paused client and the
    upstream (two receive, two send, at the kernel's autotuning maxima), plus the pieces
    in hand (the proxy's 64 KiB, the test client's 1 MiB read)."""
    rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return 2 * rmem + 2 * wmem + 2 * MiB


def pinned(start_proxy, server, *flags, **kwargs):
    return start_proxy("--upstream-host", f"127.0.0.1:{server.port}", "--upstream-scheme", "http", *flags, **kwargs)


def plain(request, sock) -> bool:
    send_response(sock, 200, [("Content-Type", "text/plain")], b"ok\n")
    return True


def routed(**routes):
    """A ``handler=`` choosing by the first path segment (``plain`` for the rest)."""

    def handle(request, sock):
        return routes.get(request.path.strip("/").split("/")[0], plain)(request, sock)

    return handle


class Client:
    """A raw HTTP/1.x client connection: exact bytes out, responses parsed by hand."""

    def __init__(self, port: int, timeout_s: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.stream = _Stream(self.sock)

    def send(self, data: bytes) -> Client:
        self.sock.sendall(data)
        return self

    def head(self) -> tuple[int, list[tuple[str, str]]]:
        first, headers = parse_head(self.stream.until(b"\r\n\r\n"))
        return int(first.split(" ")[1]), headers

    def body(self, headers: list[tuple[str, str]]) -> bytes:
        values = {name.lower(): value for name, value in headers}
        if "chunked" in values.get("transfer-encoding", ""):
            parts = []
            while size := int(self.stream.until(b"\r\n").split(b";")[0], 16):
                parts.append(self.stream.exactly(size))
                self.stream.exactly(2)
            trailer = self.stream.until(b"\r\n")
            assert trailer == b"", f"trailer line {trailer!r} reached the client"
            return b"".join(parts)
        if "content-length" in values:
            return self.stream.exactly(int(values["content-length"]))
        return self.rest()

    def response(self, *, head_only: bool = False) -> tuple[int, list[tuple[str, str]], bytes]:
        status, headers = self.head()
        return status, headers, b"" if head_only else self.body(headers)

    def rest(self) -> bytes:
        """Everything until the proxy closes the connection."""
        data = self.stream.buffer
        self.stream.buffer = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def closed_by_peer(self, timeout_s: float = 2.0) -> bool:
        """Whether the proxy closed the connection (EOF or reset) within ``timeout_s``;
        what arrived until then is kept in ``stream.buffer``."""
        self.sock.settimeout(timeout_s)
        try:
            while data := self.sock.recv(65536):
                self.stream.buffer += data
        except socket.timeout:
            return False
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def get(target: str, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"GET {target} HTTP/{version}", "Host: proxy", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def header(headers, name):
    return next((value for key, value in headers if key.lower() == name.lower()), None)


def abort(sock: socket.socket) -> None:
    """Close with unread data: the kernel answers further data with RST."""
    sock.close()


# -- size ---------------------------------------------------------------------------------


def test_a_gigabyte_download_streams_in_bounded_memory(start_proxy):
    probe = SendProbe()
    with RecordingUpstream(handler=routed(download=source_handler(GiB, BLOCK, probe))) as upstream:
        proxy = pinned(start_proxy, upstream)
        assert requests.get(proxy.url + "/warm-up", timeout=5).status_code == 200  # the token is fetched
        digest, received = hashlib.sha256(), 0
        with TreeRSS(proxy.pid) as rss:
            started = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            connection.request("GET", "/download")
            response = connection.getresponse()
            assert response.status == 200 and response.getheader("Content-Length") == str(GiB)
            while data := response.read1(MiB):
                digest.update(data)
                received += len(data)
            elapsed = time.monotonic() - started
            connection.close()
    print(f"\n1 GiB download: {elapsed:.1f}s, {GiB / elapsed / 1e6:.0f} MB/s, RSS +{rss.growth / MiB:.1f} MiB "
          f"({rss.samples} samples)")
    assert received == GiB
    assert digest.hexdigest() == pattern_digest(GiB, BLOCK)
    assert rss.samples > 10
    assert rss.growth < RSS_BOUND


def test_a_gigabyte_upload_streams_in_bounded_memory(start_proxy):
    with SinkUpstream() as upstream:
        proxy = pinned(start_proxy, upstream)
        assert requests.get(proxy.url + "/warm-up", timeout=5).status_code == 200  # the token is fetched
        with TreeRSS(proxy.pid) as rss:
            started = time.monotonic()
            client = Client(proxy.port, timeout_s=30)
            client.send(f"PUT /upload HTTP/1.1\r\nHost: proxy\r\nContent-Length: {GiB}\r\n\r\n".encode())
            send_pattern(client.sock, GiB, BLOCK)
            status, _, body = client.response()
            elapsed = time.monotonic() - started
            client.close()
    print(f"\n1 GiB upload: {elapsed:.1f}s, {GiB / elapsed / 1e6:.0f} MB/s, RSS +{rss.growth / MiB:.1f} MiB "
          f"({rss.samples} samples)")
    assert status == 200
    assert json.loads(body) == {"sha256": pattern_digest(GiB, BLOCK), "bytes": GiB}
    assert header(upstream.results[-1]["headers"], "Content-Length") == str(GiB)
    assert rss.samples > 10
    assert rss.growth < RSS_BOUND


# -- backpressure and disconnects ------------------------------------------------------------


def test_a_slow_client_slows_the_upstream_down(start_proxy):
    """While the client does not read, the upstream gets stuck too: what it has sent stops
    growing, bounded by the socket buffers on the way, and the proxy's memory does not
    grow (kernel socket buffers are not in RSS)."""
    probe = SendProbe()
    with RecordingUpstream(handler=routed(download=source_handler(GiB, BLOCK, probe))) as upstream:
        proxy = pinned(start_proxy, upstream)
        assert requests.get(proxy.url + "/warm-up", timeout=5).status_code == 200
        with TreeRSS(proxy.pid) as rss:
            client = Client(proxy.port).send(get("/download"))
            status, headers = client.head()
            assert status == 200
            received = len(client.stream.exactly(4 * MiB))
            time.sleep(1.0)  # paused: buffers fill up
            stalled_at = probe.sent
            time.sleep(1.0)
            assert probe.sent == stalled_at, "the upstream kept sending while the client was paused"
            in_flight = stalled_at - received
            received += len(client.stream.exactly(32 * MiB))  # reading again lets it go on
            assert probe.sent > stalled_at
            abort(client.sock)
    print(f"\nin flight while paused: {in_flight / MiB:.1f} MiB (socket buffers allow "
          f"{socket_buffers_bound() / MiB:.0f}); RSS +{rss.growth / MiB:.1f} MiB")
    assert in_flight <= socket_buffers_bound()
    assert rss.growth < RSS_BOUND
    assert probe.wait_broken(1, 1.0), "the upstream connection stayed open after the client left"


@pytest.mark.parametrize("kind", ["download", "events"])
def test_a_client_leaving_closes_the_upstream_within_a_second(start_proxy, kind):
    probe = SendProbe()
    handler = routed(download=source_handler(GiB, BLOCK, probe), events=event_stream_handler(0.1, probe))
    with RecordingUpstream(handler=handler) as upstream:
        proxy = pinned(start_proxy, upstream)
        client = Client(proxy.port).send(get(f"/{kind}"))
        status, headers = client.head()
        assert status == 200
        if kind == "download":
            client.stream.exactly(MiB)
        else:
            assert client.stream.until(b"data: event-1\n\n")
        left_at = time.monotonic()
        abort(client.sock)
        [broken_at] = probe.wait_broken(1, 2.0) or [float("inf")]
        print(f"\n{kind}: upstream saw the close after {broken_at - left_at:.3f}s")
        assert broken_at - left_at < 1.0


def test_aborted_downloads_leave_every_thread_free(start_proxy):
    workers, threads = 2, 2
    aborts = workers * threads * 2
    probe = SendProbe()
    with RecordingUpstream(handler=routed(download=source_handler(GiB, BLOCK, probe))) as upstream:
        proxy = pinned(start_proxy, upstream, "--workers", str(workers), "--threads", str(threads))
        for _ in range(aborts):
            client = Client(proxy.port).send(get("/download"))
            assert client.head()[0] == 200
            client.stream.exactly(256 * 1024)
            abort(client.sock)
        assert len(probe.wait_broken(aborts, 2.0)) == aborts
        started = time.monotonic()
        response = requests.get(proxy.url + "/after", timeout=3)
        assert (response.status_code, response.text) == (200, "ok\n")
        assert time.monotonic() - started < 1.0


# -- timeouts ---------------------------------------------------------------------------------


def test_upstream_timeout_bounds_only_the_wait_for_headers(start_proxy):
    """--upstream-timeout=1s: slow headers get 504, but a stream with 3 s gaps between
    events stays open and delivers each event as it is sent."""
    probe = SendProbe()

    def slow_headers(request, sock):
        time.sleep(1.5)
        return plain(request, sock)

    handler = routed(events=event_stream_handler(0, probe, gaps=(0, 3, 3)), slow=slow_headers)
    with RecordingUpstream(handler=handler) as upstream:
        proxy = pinned(start_proxy, upstream, "--upstream-timeout", "1s")
        assert requests.get(proxy.url + "/slow", timeout=5).status_code == 504
        client = Client(proxy.port).send(get("/events"))
        status, headers = client.head()
        assert (status, header(headers, "Content-Type")) == (200, "text/event-stream")
        arrived = []
        for i in range(3):
            client.stream.until(f"data: event-{i}\n\n".encode())
            arrived.append(time.monotonic())
        assert client.stream.until(b"0\r\n\r\n") == b"\r\n"  # the stream ended properly
        client.close()
    for sent, got in zip(probe.sent_at, arrived):
        assert got - sent < 1.0  # flushed as sent, not batched with the next, 3 s later
    assert arrived[2] - arrived[0] > 5.5


def test_the_head_goes_out_before_the_first_event(start_proxy):
    """The response head reaches the client when the upstream's does, not with the first
    body byte: an event stream may stay silent for long. The upstream sends its first
    event only once the client has the head, so a proxy that held the head back for a
    body byte would deliver it only with the stream's end, and no event."""
    head_at_client = threading.Event()

    def head_then_one_event(request, sock):
        send_response(sock, 200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")],
                      content_length=False)
        if head_at_client.wait(IO_WAIT_S):
            send_chunk(sock, b"data: event-0\n\n")
        send_chunk(sock, b"")
        return True

    with RecordingUpstream(handler=head_then_one_event) as upstream:
        proxy = pinned(start_proxy, upstream)
        client = Client(proxy.port).send(get("/events"))
        assert client.head()[0] == 200
        head_at_client.set()
        assert client.stream.until(b"data: event-0\n\n").lower() == b"f\r\n"  # its chunk-size line
        client.close()


# -- HTTP corners ---------------------------------------------------------------------------


def test_expect_100_continue_is_forwarded_and_the_body_arrives(start_proxy):
    """The proxy forwards Expect (RFC 9110 10.1.1); gunicorn answers the client's 100
    itself, the upstream's own 100 is absorbed, and the body streams upstream."""

    def continue_then_answer(request, sock):  # RecordingUpstream has read the body already
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        return plain(request, sock)

    with RecordingUpstream(handler=continue_then_answer) as upstream:
        proxy = pinned(start_proxy, upstream)
        client = Client(proxy.port)
        client.send(b"POST /expect HTTP/1.1\r\nHost: proxy\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n")
        assert client.head()[0] == 100  # before any body byte was sent
        client.send(b"hello world")
        status, _, body = client.response()
        assert (status, body) == (200, b"ok\n")
        [recorded] = upstream.wait_for_requests(1)
        assert recorded.header("Expect") == "100-continue"
        assert recorded.body == b"hello world"


def test_an_upstream_may_refuse_an_expect_early(start_proxy):
    """An upstream that answers 413 after the head, without reading the body: that answer
    reaches the client."""

    class Refusing(SinkUpstream):
        def _serve(self, sock):
            stream = _Stream(sock)
            try:
                stream.until(b"\r\n\r\n")
                sock.sendall(
                    b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n"
                )
                sock.shutdown(socket.SHUT_WR)  # lingering close: read and discard, as RFC 9112 9.6 advises
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline and sock.recv(MiB):
                    pass
            except OSError:
                pass
            finally:
                sock.close()

    with Refusing() as upstream:
        proxy = pinned(start_proxy, upstream)
        client = Client(proxy.port)
        size = 8 * MiB
        head = f"POST /big HTTP/1.1\r\nHost: proxy\r\nExpect: 100-continue\r\nContent-Length: {size}\r\n\r\n"
        client.send(head.encode())
        assert client.head()[0] == 100
        sender = threading.Thread(target=lambda: _send_quietly(client.sock, b"x" * size), daemon=True)
        sender.start()
        status, _, body = client.response()
        assert (status, body) == (413, b"too big\n")
        client.close()
        sender.join(5)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the proxy may close once it has answered


def test_head_keeps_content_length_and_sends_no_body(start_proxy):
    with RecordingUpstream() as upstream:
        proxy = pinned(start_proxy, upstream)
        client = Client(proxy.port)
        client.send(b"HEAD /bytes/12345 HTTP/1.1\r\nHost: proxy\r\n\r\n")
        status, headers, _ = client.response(head_only=True)
        assert (status, header(headers, "Content-Length")) == (200, "12345")
        # nothing follows the head: the next response on the connection is the next one
        status, headers, body = client.send(get("/bytes/5")).response()
        assert (status, body) == (200, bytes(range(5)))
        client.close()


@pytest.mark.parametrize("code", [204, 304])
def test_204_and_304_have_no_body(start_proxy, code):
    def no_body(request, sock):
        extra = [("ETag", '"v1"'), ("Content-Length", "42")] if code == 304 else []
        send_response(sock, code, extra, content_length=False)
        return True

    with RecordingUpstream(handler=routed(status=no_body)) as upstream:
        proxy = pinned(start_proxy, upstream)
        client = Client(proxy.port)
        status, headers = client.send(get("/status")).head()
        assert status == code
        assert header(headers, "Transfer-Encoding") is None
        status, _, body = client.send(get("/after")).response()
        assert (status, body) == (200, b"ok\n")
        client.close()


def test_103_early_hints_then_the_final_response(start_proxy):
    def early_hints(request, sock):
        sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        time.sleep(0.1)
        send_response(sock, 200, [("X-Final", "yes")], b"final\n")
        return True

    with RecordingUpstream(handler=early_hints) as upstream:
        proxy = pinned(start_proxy, upstream)
        client = Client(proxy.port)
        status, headers, body = client.send(get("/hints")).response()
        assert (status, header(headers, "X-Final"), body) == (200, "yes", b"final\n")
        status, _, body = client.send(get("/again")).response()  # nothing of the 103 left behind
        assert (status, body) == (200, b"final\n")
        client.close()


def test_http_1_0_client_gets_an_unchunked_body_then_close(start_proxy):
    with RecordingUpstream() as upstream:
        proxy = pinned(start_proxy, upstream)
        client = Client(proxy.port)
        data = client.send(b"GET /drip?n=3&delay=0.05 HTTP/1.0\r\n\r\n").rest()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200")
        assert b"transfer-encoding" not in head.lower()
        assert body == b"chunk-0\nchunk-1\nchunk-2\n"
        client.close()


def test_pipelined_and_keep_alive_requests(start_proxy):
    with RecordingUpstream() as upstream:
        proxy = pinned(start_proxy, upstream)
        client = Client(proxy.port)
        client.send(
            get("/one")
            + b"POST /two HTTP/1.1\r\nHost: proxy\r\nContent-Length: 3\r\n\r\nabc"
            + b"POST /three HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"
        )
        targets = []
        for _ in range(3):
            status, _, body = client.response()
            assert status == 200
            targets.append((json.loads(body)["target"], json.loads(body)["body_len"]))
        assert targets == [("/one", 0), ("/two", 3), ("/three", 2)]
        for i in range(3):  # then the same connection keeps serving
            status, _, body = client.send(get(f"/more/{i}")).response()
            assert json.loads(body)["target"] == f"/more/{i}"
        client.close()
    assert [r.body for r in upstream.requests[1:3]] == [b"abc", b"de"]


@pytest.mark.parametrize("kind", ["short-content-length", "chunked-cut", "closed-after-head"])
def test_an_upstream_stopping_short_closes_the_client_connection(start_proxy, kind):
    def short(request, sock):
        if kind == "short-content-length":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 500)
        elif kind == "chunked-cut":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        else:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        return False  # then the upstream closes

    with RecordingUpstream(handler=routed(short=short)) as upstream:
        proxy = pinned(start_proxy, upstream)
        client = Client(proxy.port, timeout_s=3)
        status, headers = client.send(get("/short/x?secret=1")).head()
        assert status == 200
        if header(headers, "Content-Length") is not None:
            assert client.closed_by_peer(2.0), "the client connection was left hanging"
            assert len(client.stream.buffer) < int(header(headers, "Content-Length"))
        else:
            assert client.stream.until(b"hello\r\n")
            assert client.closed_by_peer(2.0), "the client connection was left hanging"
            assert b"0\r\n\r\n" not in client.stream.buffer  # never a clean end of a cut body
        client.close()
        record = proxy.wait_for_record(lambda r: r.get("msg") == "upstream response body failed")
        assert record["target"] == f"{upstream.url}/short/x"
        assert record["level"] == "error"


def test_trailers_are_dropped_cleanly(start_proxy):
    def with_trailers(request, sock):
        send_response(sock, 200, [("Transfer-Encoding", "chunked"), ("Trailer", "X-Checksum")], content_length=False)
        send_chunk(sock, b"hello ")
        send_chunk(sock, b"world")
        sock.sendall(b"0\r\nX-Checksum: abc123\r\n\r\n")
        return True

    with RecordingUpstream(handler=with_trailers) as upstream:
        proxy = pinned(start_proxy, upstream)
        client = Client(proxy.port)
        client.send(get("/trailers", "TE: trailers"))
        status, headers, body = client.response()  # asserts no trailer line follows
        assert (status, body) == (200, b"hello world")
        assert header(headers, "Trailer") is None
        status, _, body = client.send(get("/again")).response()
        assert (status, body) == (200, b"hello world")
        client.close()


# -- connection reuse -----------------------------------------------------------------------


def test_a_thousand_requests_reuse_upstream_connections(start_proxy):
    workers, threads = 2, 2
    with RecordingUpstream(handler=plain) as upstream:
        proxy = pinned(start_proxy, upstream, "--workers", str(workers), "--threads", str(threads))
        for _ in range(1000):
            connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)  # new client connections:
            connection.request("GET", "/r")  # spread over both workers
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, b"ok\n")
            connection.close()
        assert len(upstream.requests) == 1000
        assert 1 <= upstream.connections_opened <= workers * threads
        assert "pool is full" not in proxy.output()


def test_the_upstream_pool_follows_threads(start_proxy):
    """12 requests at a time on one worker of 12 threads: the pool keeps all 12 upstream
    connections (urllib3's default of 10 would discard two each round, warning "pool is
    full", and open new ones)."""
    threads = 12

    def slow_plain(request, sock):
        time.sleep(0.1)  # so that all 12 are in flight together
        return plain(request, sock)

    with RecordingUpstream(handler=slow_plain) as upstream:
        proxy = pinned(start_proxy, upstream, "--workers", "1", "--threads", str(threads))
        barrier = threading.Barrier(threads)

        def client(_):
            with requests.Session() as session:
                for _ in range(4):
                    barrier.wait(5)
                    assert session.get(proxy.url + "/p", timeout=5).status_code == 200

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(client, range(threads)))
        assert len(upstream.requests) == 4 * threads
        assert upstream.connections_opened <= threads
        time.sleep(0.2)
        assert "pool is full" not in proxy.output()
