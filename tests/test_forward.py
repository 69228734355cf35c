"""forward: what reaches the upstream's wire, and what comes back.

Everything (target, framing, injected headers, pooling, timeouts, TLS, the mapping of a
response) is tested against ``tests.upstream``, a real loopback server that records
what arrived and answers with exact bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import ssl
import threading
import time
import typing as t

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from jwt_proxy import forward
from jwt_proxy.upstream_errors import RequestBodyError
from jwt_proxy.upstream_errors import UpstreamError
from jwt_proxy.forward import UpstreamRequest
from jwt_proxy.upstream_errors import UpstreamTimeout
from jwt_proxy.upstream_errors import UpstreamUnavailable
from jwt_proxy import upstream_connect
from jwt_proxy import upstream_errors
from jwt_proxy import upstream_response
from jwt_proxy import upstream_session
from tests.upstream import GZIP_BODY
from tests.upstream import SET_COOKIES
from tests.upstream import RecordedRequest
from tests.upstream import RecordingUpstream
from tests.upstream import connect_tunnel
from tests.upstream import make_tls_files
from tests.upstream import pattern_bytes
from tests.upstream import send_chunk
from tests.upstream import send_response

TIMEOUT_S = 5.0
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def no_environment_proxies(monkeypatch):
    """A CI runner's proxy settings must not reroute loopback test traffic."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def session():
    session = upstream_session.make_session(pool_maxsize=4)
    yield session
    session.close()


@pytest.fixture
def upstream():
    with RecordingUpstream() as server:
        yield server


def request(upstream_url: str, target: str = "/echo", method: str = "GET", **kwargs: t.Any) -> UpstreamRequest:
    headers = kwargs.pop("headers", [("Host", "upstream.test")])
    return UpstreamRequest(method=method, base_url=upstream_url, target=target, headers=headers, **kwargs)


def fetch(session, upstream_url: str, target: str = "/echo", *, timeout_s: float = TIMEOUT_S, **kwargs: t.Any):
    """Send, read the whole body, close; returns (response, body)."""
    response = forward.send(session, request(upstream_url, target, **kwargs), timeout_s=timeout_s)
    with response:
        body = b"".join(response.iter_body())
    return response, body


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the request target -------------------------------------------------------------------

TARGETS = [
    "/a%2Fb",
    "/x/%2E%2E/y",
    "/x/../y",
    "/./a",
    "//a//b",
    "/p?",
    "/p?q=1&q=2",
    "/a%2fb?x=%2f%3d",  # lower-case escapes stay lower-case
    "/q?filter[a]=1|2&s=\"x\"",  # urllib3 would encode [ ] | "
    "/bad%zz/%2F",  # urllib3 would turn every % of the path into %25
    "/p?a=b?c=%3F&",
    "/~user/;params,x=1@host:80",
]


@pytest.mark.parametrize("target", TARGETS)
def test_target_reaches_the_wire_byte_for_byte(session, upstream, target):
    response, body = fetch(session, upstream.url, target)
    [seen] = upstream.wait_for_requests(1)
    assert seen.raw_head.startswith(f"GET {target} HTTP/1.1\r\n".encode())
    assert seen.target == target
    assert json.loads(body)["target"] == target


@pytest.mark.parametrize("target", ["", "x", "http://other/x", "*", "/a b", "/tab\t", "/caf\u00e9", "/nl\r\nX: 1"])
def test_a_target_that_is_not_origin_form_printable_ascii_is_refused(session, upstream, target):
    with pytest.raises(ValueError):
        forward.send(session, request(upstream.url, target), timeout_s=TIMEOUT_S)
    assert upstream.requests == []


def test_a_leading_double_slash_cannot_change_the_host(session, upstream):
    response, body = fetch(session, upstream.url, "//evil.example:1/x")
    [seen] = upstream.wait_for_requests(1)
    assert seen.target == "//evil.example:1/x"


# -- body framing -------------------------------------------------------------------------


def test_content_length_body_is_byte_identical_and_never_chunked(session, upstream):
    data = pattern_bytes(300_000)
    stream = io.BytesIO(data + b"NEXT REQUEST")  # bytes after the body are not ours
    headers = [("Host", "h"), ("Content-Length", "999"), ("Transfer-Encoding", "chunked")]
    fetch(session, upstream.url, "/up", method="PUT", headers=headers, body=stream, content_length=len(data))
    [seen] = upstream.wait_for_requests(1)
    assert seen.body == data
    assert seen.header_all("Content-Length") == [str(len(data))]
    assert seen.header("Transfer-Encoding") is None and not seen.chunked
    assert stream.tell() == len(data)


class GeneratorStream(io.RawIOBase):
    """A file-like body backed by a generator, like a chunked WSGI input."""

    def __init__(self, pieces: t.Iterable[bytes]) -> None:
        self._pieces = iter(pieces)
        self._pending = b""
        self.reads: list[int] = []

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.reads.append(size)
        if not self._pending:
            self._pending = next(self._pieces, b"")
        if size is None or size < 0:
            size = len(self._pending)
        data, self._pending = self._pending[:size], self._pending[size:]
        return data


def test_body_without_length_goes_chunked_without_content_length(session, upstream):
    pieces = [b"first,", b"second,", pattern_bytes(40_000), b"last"]
    stream = GeneratorStream(pieces)
    headers = [("Host", "h"), ("Content-Length", "5")]  # a stale client line is ignored
    fetch(session, upstream.url, "/up", method="POST", headers=headers, body=stream, content_length=None)
    [seen] = upstream.wait_for_requests(1)
    assert seen.chunked
    assert seen.header_all("Transfer-Encoding") == ["chunked"]
    assert seen.header("Content-Length") is None
    assert seen.body == b"".join(pieces)
    assert all(0 < size <= forward.STREAM_BLOCK_BYTES for size in stream.reads), "the body is read in bounded pieces"


def test_a_content_length_body_is_read_in_blocks_of_at_most_one_mib(session, upstream):
    data = pattern_bytes(3 * upstream_session.REQUEST_BLOCK_BYTES + 5)
    stream = GeneratorStream([data])
    fetch(session, upstream.url, "/up", method="PUT", headers=[("Host", "h")], body=stream, content_length=len(data))
    [seen] = upstream.wait_for_requests(1)
    assert seen.body == data
    assert upstream_session.REQUEST_BLOCK_BYTES == 1024 * 1024
    assert max(stream.reads) == upstream_session.REQUEST_BLOCK_BYTES, "whole blocks (small reads cost throughput)"
    assert all(size <= upstream_session.REQUEST_BLOCK_BYTES for size in stream.reads), "never more than a block at a time"


def test_no_body_has_no_framing_lines(session, upstream):
    fetch(session, upstream.url, "/get")
    fetch(session, upstream.url, "/delete", method="DELETE")
    for seen in upstream.wait_for_requests(2):
        assert seen.header("Content-Length") is None and seen.header("Transfer-Encoding") is None
        assert seen.body == b""


def test_bodyless_post_gets_content_length_zero(session, upstream):
    """urllib3 (like Go's net/http) frames a bodyless POST/PUT/PATCH with an explicit
    ``Content-Length: 0``: the same message (RFC 9112 6.3), pinned here so it stays known."""
    fetch(session, upstream.url, "/post", method="POST")
    [seen] = upstream.wait_for_requests(1)
    assert seen.header_all("Content-Length") == ["0"] and seen.header("Transfer-Encoding") is None


def test_expect_continue_is_forwarded_and_the_interim_100_skipped(session):
    def continue_first(seen: RecordedRequest, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        send_response(sock, 201, [], seen.body)
        return True

    with RecordingUpstream(continue_first) as upstream:
        headers = [("Host", "h"), ("Expect", "100-continue")]
        response, body = fetch(session, upstream.url, "/up", method="PUT", headers=headers,
                               body=io.BytesIO(b"payload"), content_length=7)
        [seen] = upstream.wait_for_requests(1)
    assert (response.status, body) == (201, b"payload")
    assert seen.header("Expect") == "100-continue"


def test_client_content_length_zero_is_kept(session, upstream):
    stream = io.BytesIO(b"never read")
    fetch(session, upstream.url, "/post", method="POST", body=stream, content_length=0)
    fetch(session, upstream.url, "/get", method="GET", body=None, content_length=0)
    for seen in upstream.wait_for_requests(2):
        assert seen.header_all("Content-Length") == ["0"]
        assert seen.header("Transfer-Encoding") is None and seen.body == b""
    assert stream.tell() == 0


def test_short_client_body_raises_request_body_error(session, upstream):
    with pytest.raises(RequestBodyError, match="3 of 10"):
        forward.send(session, request(upstream.url, "/up", "POST", body=io.BytesIO(b"abc"), content_length=10),
                     timeout_s=TIMEOUT_S)
    fetch(session, upstream.url, "/after")  # the half-sent request's connection is not reused
    assert upstream.wait_for_requests(1)[0].target == "/after"
    assert upstream.connections_opened == 2


def test_failing_client_stream_raises_request_body_error(session, upstream):
    class Broken:
        def read(self, size: int = -1) -> bytes:
            raise OSError("client went away")

    with pytest.raises(RequestBodyError, match="OSError"):
        forward.send(session, request(upstream.url, "/up", "POST", body=Broken()), timeout_s=TIMEOUT_S)


def test_a_length_without_a_body_is_a_caller_error(session, upstream):
    with pytest.raises(ValueError):
        forward.send(session, request(upstream.url, "/up", "POST", content_length=5), timeout_s=TIMEOUT_S)


# -- headers on the wire ------------------------------------------------------------------


def test_nothing_is_added_to_the_request_headers(session, upstream):
    headers = [("Host", "api.example.com:8443"), ("Authorization", "Bearer jwt"), ("X-Forwarded-For", "10.0.0.1")]
    fetch(session, upstream.url, "/echo", headers=headers)
    [seen] = upstream.wait_for_requests(1)
    assert seen.headers == headers
    assert seen.raw_head == (
        b"GET /echo HTTP/1.1\r\nHost: api.example.com:8443\r\nAuthorization: Bearer jwt\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\n\r\n"
    )


def test_client_user_agent_and_accept_encoding_pass_once(session, upstream):
    headers = [("Host", "h"), ("User-Agent", "curl/8.5"), ("Accept-Encoding", "gzip"), ("Accept", "text/csv")]
    fetch(session, upstream.url, "/echo", headers=headers)
    [seen] = upstream.wait_for_requests(1)
    assert sorted(seen.headers) == sorted(headers)


def test_duplicate_request_lines_keep_their_relative_order(session, upstream):
    headers = [("Host", "h"), ("X-Dup", "1"), ("X-Other", "a"), ("X-Dup", "2"), ("X-CaSe-KePt", "v")]
    fetch(session, upstream.url, "/echo", headers=headers)
    [seen] = upstream.wait_for_requests(1)
    assert seen.header_all("x-dup") == ["1", "2"]
    assert ("X-CaSe-KePt", "v") in seen.headers


def test_cookies_from_one_response_are_not_sent_with_the_next_request(session, upstream):
    response, _ = fetch(session, upstream.url, "/set-cookies")
    fetch(session, upstream.url, "/echo")
    first, second = upstream.wait_for_requests(2)
    assert second.header("Cookie") is None
    assert len(session.cookies) == 0


def test_netrc_credentials_are_never_used(session, upstream, tmp_path, monkeypatch):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login bob password hunter2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    fetch(session, upstream.url, "/echo", headers=[("Host", "h"), ("Authorization", "Bearer jwt")])
    fetch(session, upstream.url, "/echo", headers=[("Host", "h")])
    with_token, without = upstream.wait_for_requests(2)
    assert with_token.header_all("Authorization") == ["Bearer jwt"]
    assert without.header("Authorization") is None


def test_the_session_itself_keeps_no_cookies_and_reads_no_netrc(upstream, tmp_path, monkeypatch):
    """For code that uses the session directly rather than through send()."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login bob password hunter2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    session = upstream_session.make_session(pool_maxsize=2)
    session.get(upstream.url + "/set-cookies", timeout=TIMEOUT_S).close()
    session.get(upstream.url + "/echo", timeout=TIMEOUT_S).close()
    _, second = upstream.wait_for_requests(2)
    assert len(session.cookies) == 0
    assert second.header("Cookie") is None and second.header("Authorization") is None
    assert second.header("User-Agent") is None or "python-requests" not in second.header("User-Agent")


def test_make_session_recipe():
    session = upstream_session.make_session(pool_maxsize=7)
    assert session.trust_env is False
    assert dict(session.headers) == {}
    adapter = session.get_adapter("https://api.example.com/")
    assert session.get_adapter("http://api.example.com/") is adapter
    assert adapter.poolmanager.connection_pool_kw["maxsize"] == 7
    assert adapter.poolmanager.connection_pool_kw["block"] is False
    assert adapter.max_retries.total == 0
    with pytest.raises(ValueError):
        upstream_session.make_session(pool_maxsize=0)


def test_send_needs_a_session_from_make_session(upstream):
    import requests

    with pytest.raises(TypeError):
        forward.send(requests.Session(), request(upstream.url), timeout_s=TIMEOUT_S)


# -- the response -------------------------------------------------------------------------


def test_redirects_are_returned_not_followed(session, upstream):
    response, body = fetch(session, upstream.url, "/redirect")
    assert response.status == 302
    assert ("Location", "/elsewhere") in response.headers
    assert body == b"redirecting\n"  # requests' Session.send would have consumed it
    assert [seen.target for seen in upstream.wait_for_requests(1)] == ["/redirect"]
    time.sleep(0.1)
    assert len(upstream.requests) == 1


def test_gzip_body_passes_through_untouched(session, upstream):
    response, body = fetch(session, upstream.url, "/gzip")
    assert body == GZIP_BODY
    assert ("Content-Encoding", "gzip") in response.headers
    assert ("Content-Length", str(len(GZIP_BODY))) in response.headers


def test_set_cookie_lines_stay_separate(session, upstream):
    response, _ = fetch(session, upstream.url, "/set-cookies")
    assert [value for name, value in response.headers if name.lower() == "set-cookie"] == list(SET_COOKIES)


def test_hop_by_hop_response_lines_are_dropped(session, upstream):
    response, body = fetch(session, upstream.url, "/hop")
    assert response.headers == [("X-Kept", "yes"), ("Content-Length", "4")]
    assert body == b"hop\n"


def test_chunks_are_delivered_as_they_arrive(session, upstream):
    delay_s = 0.4
    response = forward.send(session, request(upstream.url, f"/drip?n=3&delay={delay_s}"), timeout_s=TIMEOUT_S)
    arrivals = []
    with response:
        for chunk in response.iter_body():
            arrivals.append((time.monotonic(), chunk))
    assert [chunk for _, chunk in arrivals] == [b"chunk-0\n", b"chunk-1\n", b"chunk-2\n"]
    gaps = [later - earlier for (earlier, _), (later, _) in zip(arrivals, arrivals[1:])]
    assert all(gap > delay_s / 2 for gap in gaps), gaps


def test_a_content_length_body_is_yielded_per_recv(session):
    """read1, not read(n): a Content-Length body trickling in is not held back. The
    upstream sends the rest only once the first part has been yielded, so a read that
    waited for more would yield both parts together, after the upstream gave up waiting."""
    first_yielded = threading.Event()

    def trickle(seen: RecordedRequest, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nevent-1\n")
        first_yielded.wait(TIMEOUT_S / 2)
        sock.sendall(b"end\n")
        return False

    with RecordingUpstream(trickle) as upstream:
        response = forward.send(session, request(upstream.url, "/"), timeout_s=TIMEOUT_S)
        with response:
            body = response.iter_body()
            first = next(body)
            first_yielded.set()
            rest = b"".join(body)
    assert (first, rest) == (b"event-1\n", b"end\n")


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [("HEAD", "/bytes/10", 200), ("GET", "/status/204", 204), ("GET", "/status/304", 304)],
)
def test_no_body_is_read_for_head_204_304(session, upstream, method, target, status):
    response = forward.send(session, request(upstream.url, target, method), timeout_s=TIMEOUT_S)
    with response:
        assert response.status == status
        assert list(response.iter_body()) == []
    if method == "HEAD":
        assert ("Content-Length", "10") in response.headers


def test_sequential_requests_share_one_connection(session, upstream):
    fetch(session, upstream.url, "/echo")
    fetch(session, upstream.url, "/gzip")
    fetch(session, upstream.url, "/bytes/100000")
    fetch(session, upstream.url, "/drip?n=2&delay=0")
    fetch(session, upstream.url, "/bytes/10", method="HEAD")
    fetch(session, upstream.url, "/status/204")
    fetch(session, upstream.url, "/status/304")
    fetch(session, upstream.url, "/redirect")
    fetch(session, upstream.url, "/up", method="POST", body=io.BytesIO(b"12345"), content_length=5)
    fetch(session, upstream.url, "/up", method="POST", body=GeneratorStream([b"ab", b"cd"]))
    response, body = fetch(session, upstream.url, "/echo")
    assert json.loads(body)["target"] == "/echo"
    assert len(upstream.wait_for_requests(11)) == 11
    assert upstream.connections_opened == 1


def test_more_concurrent_requests_than_pool_slots_do_not_wait_for_a_slot():
    """pool_block stays off: six requests on a two-slot pool must all be in flight at once."""
    import threading

    together = threading.Barrier(6, timeout=3.0)

    def answer_when_all_arrived(seen: RecordedRequest, sock: socket.socket) -> bool:
        try:
            together.wait()
        except threading.BrokenBarrierError:
            send_response(sock, 503, [], b"not concurrent")
            return False
        send_response(sock, 200, [], b"ok")
        return True

    session = upstream_session.make_session(pool_maxsize=2)
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        response, _ = fetch(session, upstream.url, "/")
        with lock:
            statuses.append(response.status)

    with RecordingUpstream(answer_when_all_arrived) as upstream:
        threads = [threading.Thread(target=one, daemon=True) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
    session.close()
    assert statuses == [200] * 6


def test_closing_the_body_generator_closes_a_partly_read_connection(session, upstream):
    response = forward.send(session, request(upstream.url, "/bytes/2000000"), timeout_s=TIMEOUT_S)
    body = response.iter_body(chunk_size=1024)
    assert len(next(body)) <= 1024
    body.close()  # what gunicorn does when the client goes away
    response, data = fetch(session, upstream.url, "/bytes/5")
    assert data == pattern_bytes(5)
    assert upstream.connections_opened == 2


def test_a_partly_read_body_is_never_pooled_even_if_the_rest_comes_later(session):
    """urllib3 drops a pooled connection with bytes waiting, but not bytes still on the way."""

    def late_remainder(seen: RecordedRequest, sock: socket.socket) -> bool:
        if seen.target == "/first":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n0123456789")
            time.sleep(0.3)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nSTALE")
        else:
            send_response(sock, 200, [], seen.target.encode())
        return True

    with RecordingUpstream(late_remainder) as upstream:
        response = forward.send(session, request(upstream.url, "/first"), timeout_s=TIMEOUT_S)
        assert next(response.iter_body()) == b"0123456789"
        response.close()
        second, body = fetch(session, upstream.url, "/second")
        assert (second.status, body) == (200, b"/second")
        assert upstream.connections_opened == 2


def test_a_204_claiming_a_chunked_body_is_not_read_and_not_pooled(session, monkeypatch):
    monkeypatch.setattr(upstream_response, "BODY_IDLE_TIMEOUT_S", 2.0)

    def odd_204(seen: RecordedRequest, sock: socket.socket) -> bool:
        if seen.target == "/odd":
            sock.sendall(b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            send_response(sock, 200, [], b"fine")
        return True

    with RecordingUpstream(odd_204) as upstream:
        started = time.monotonic()
        response, body = fetch(session, upstream.url, "/odd")
        assert (response.status, body) == (204, b"")
        assert time.monotonic() - started < 1.0
        assert fetch(session, upstream.url, "/next")[1] == b"fine"
        assert upstream.connections_opened == 2


def test_a_101_to_a_request_without_upgrade_is_an_upstream_error_and_never_pooled(session):
    def switch(seen: RecordedRequest, sock: socket.socket) -> bool:
        if seen.target == "/ws":
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        else:
            send_response(sock, 200, [], b"plain")
        return True

    with RecordingUpstream(switch) as upstream:
        with pytest.raises(UpstreamUnavailable, match="101") as raised:
            fetch(session, upstream.url, "/ws")
        assert raised.value.status == 502 and raised.value.closes_client
        assert fetch(session, upstream.url, "/plain")[1] == b"plain"
        assert upstream.connections_opened == 2


def test_an_unread_response_closed_early_is_not_reused(session, upstream):
    response = forward.send(session, request(upstream.url, "/bytes/500000"), timeout_s=TIMEOUT_S)
    response.close()
    response.close()  # idempotent
    assert list(response.iter_body()) == []
    _, data = fetch(session, upstream.url, "/bytes/7")
    assert data == pattern_bytes(7)
    assert upstream.connections_opened == 2


def test_interim_responses_are_skipped_and_the_connection_stays_in_sync(session):
    def early_hints(seen: RecordedRequest, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        sock.sendall(b"HTTP/1.1 102 Processing\r\n\r\n")
        send_response(sock, 200, [("X-Target", seen.target)], seen.target.encode())
        return True

    with RecordingUpstream(early_hints) as upstream:
        first, first_body = fetch(session, upstream.url, "/one")
        second, second_body = fetch(session, upstream.url, "/two")
        assert upstream.connections_opened == 1
    assert (first.status, first_body) == (200, b"/one")
    assert (second.status, second_body) == (200, b"/two")


def test_endless_interim_responses_are_an_upstream_error(session):
    def hints_forever(seen: RecordedRequest, sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 103 Early Hints\r\n\r\n" * 10)

    with RecordingUpstream(hints_forever) as upstream:
        with pytest.raises(UpstreamUnavailable):
            forward.send(session, request(upstream.url, "/"), timeout_s=TIMEOUT_S)


def test_a_stream_of_100_continue_is_bounded_by_the_head_deadline_not_a_count(session):
    """Ten and more ``100``s (more than the limit on other interim responses) end in a
    timeout at the deadline, not earlier and not later."""

    def continues(seen: RecordedRequest, sock: socket.socket) -> bool:
        for _ in range(40):
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            time.sleep(0.1)
        return False

    with RecordingUpstream(continues) as upstream:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            forward.send(session, request(upstream.url, "/"), timeout_s=1.5)
        assert 1.4 < time.monotonic() - started < 2.5


def test_a_head_dripped_byte_by_byte_is_bounded_by_the_head_deadline(session):
    def drip(seen: RecordedRequest, sock: socket.socket) -> bool:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 100 + b"\r\nContent-Length: 0\r\n\r\n":
            sock.sendall(bytes([byte]))
            time.sleep(0.05)
        return False

    with RecordingUpstream(drip) as upstream:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            forward.send(session, request(upstream.url, "/"), timeout_s=1.5)
        assert time.monotonic() - started < 2.5


# -- failures -----------------------------------------------------------------------------


def test_connection_refused_is_502(session):
    port = closed_port()
    with pytest.raises(UpstreamUnavailable) as caught:
        forward.send(session, request(f"http://127.0.0.1:{port}", "/x?secret=s3cr3t"), timeout_s=TIMEOUT_S)
    error = caught.value
    assert (error.status, error.error_type) == (502, "connection_refused")
    assert f"127.0.0.1:{port}" in str(error)
    assert "s3cr3t" not in str(error) and "/x" not in str(error)
    assert error.__cause__ is None and error.__context__ is None


def test_no_headers_within_the_timeout_is_504(session, upstream):
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        forward.send(session, request(upstream.url, "/slow-headers?delay=3&secret=s3cr3t"), timeout_s=0.3)
    assert time.monotonic() - started < 2.0
    error = caught.value
    assert isinstance(error, UpstreamError)
    assert (error.status, error.error_type) == (504, "timeout")
    assert upstream.host in str(error) and "s3cr3t" not in str(error)


def test_dns_failure_is_502(session, monkeypatch):
    def no_such_host(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)  # no resolver traffic from tests
    with pytest.raises(UpstreamUnavailable) as caught:
        forward.send(session, request("http://api.example.invalid"), timeout_s=TIMEOUT_S)
    assert (caught.value.status, caught.value.error_type) == (502, "unknown")
    assert "api.example.invalid" in str(caught.value) and "gaierror" in str(caught.value)


def test_connect_timeout_is_504_and_its_message_has_no_target():
    """A blackholed address cannot be reproduced on loopback: classify requests' own chain."""
    import requests
    from urllib3.exceptions import ConnectTimeoutError
    from urllib3.exceptions import MaxRetryError

    try:
        try:
            raise TimeoutError("timed out")
        except TimeoutError as socket_error:
            reason = ConnectTimeoutError(None, "Connection to api.example.com timed out. (connect timeout=0.3)")
            reason.__cause__ = socket_error
            raise requests.exceptions.ConnectTimeout(MaxRetryError(None, "/x?secret=s3cr3t", reason))
    except requests.exceptions.ConnectTimeout as exc:
        error = upstream_errors.describe_upstream_error(exc, "api.example.com:443", "response headers")
    assert isinstance(error, UpstreamTimeout)
    assert (error.status, error.error_type) == (504, "timeout")
    assert "api.example.com:443" in str(error) and "s3cr3t" not in str(error)


def test_reset_before_headers_is_502(session):
    with RecordingUpstream(lambda seen, sock: None) as upstream:  # closes without answering
        with pytest.raises(UpstreamUnavailable) as caught:
            forward.send(session, request(upstream.url, "/"), timeout_s=TIMEOUT_S)
    assert (caught.value.status, caught.value.error_type) == (502, "unknown")


def test_stream_gaps_longer_than_the_header_timeout_are_fine(session, upstream):
    response = forward.send(session, request(upstream.url, "/drip?n=3&delay=0.5"), timeout_s=0.2)
    with response:
        assert list(response.iter_body()) == [b"chunk-0\n", b"chunk-1\n", b"chunk-2\n"]


def test_read_until_close_stream_also_gets_the_body_idle_timeout(session):
    """``Connection: close`` makes http.client drop conn.sock before we could reach it."""

    def events_then_close(seen: RecordedRequest, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        for number in range(2):
            time.sleep(0.5)
            sock.sendall(b"data: %d\n\n" % number)
        return False

    with RecordingUpstream(events_then_close) as upstream:
        response = forward.send(session, request(upstream.url, "/events"), timeout_s=0.2)
        with response:
            assert b"".join(response.iter_body()) == b"data: 0\n\ndata: 1\n\n"


def test_a_body_idle_past_the_body_timeout_raises(session, upstream, monkeypatch):
    monkeypatch.setattr(upstream_response, "BODY_IDLE_TIMEOUT_S", 0.2)
    response = forward.send(session, request(upstream.url, "/drip?n=2&delay=1.5&secret=s3cr3t"), timeout_s=TIMEOUT_S)
    body = response.iter_body()
    assert next(body) == b"chunk-0\n"
    with pytest.raises(UpstreamTimeout) as caught:
        next(body)
    assert caught.value.error_type == "timeout" and "s3cr3t" not in str(caught.value)


def test_a_body_shorter_than_its_content_length_raises(session):
    def short(seen: RecordedRequest, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..")
        return False

    with RecordingUpstream(short) as upstream:
        response = forward.send(session, request(upstream.url, "/"), timeout_s=TIMEOUT_S)
        received = []
        with pytest.raises(UpstreamUnavailable, match="IncompleteRead"):
            for chunk in response.iter_body():
                received.append(chunk)
    assert b"".join(received) == b"only ten.."


def test_a_chunked_body_cut_before_its_last_chunk_raises(session):
    def cut(seen: RecordedRequest, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        send_chunk(sock, b"partial")
        return False

    with RecordingUpstream(cut) as upstream:
        response = forward.send(session, request(upstream.url, "/"), timeout_s=TIMEOUT_S)
        with pytest.raises(UpstreamUnavailable):
            list(response.iter_body())


# -- environment proxies ------------------------------------------------------------------


def test_http_proxy_from_the_environment_gets_the_raw_absolute_target(session, upstream, monkeypatch):
    with RecordingUpstream() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        fetch(session, upstream.url, "/a%2Fb/./c?")
        [seen] = proxy.wait_for_requests(1)
    assert seen.target == upstream.url + "/a%2Fb/./c?"
    assert upstream.requests == []


def test_no_proxy_bypasses_the_environment_proxy(session, upstream, monkeypatch):
    with RecordingUpstream() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        fetch(session, upstream.url, "/direct")
        assert proxy.requests == []
    assert upstream.wait_for_requests(1)[0].target == "/direct"


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_tls_files(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def tls_upstream(tls_files):
    with RecordingUpstream(ssl_context=tls_files.server_context()) as server:
        yield server


def test_ca_file_is_trusted_for_https_upstreams(tls_files, tls_upstream):
    session = upstream_session.make_session(pool_maxsize=2, ca_file=tls_files.ca_file)
    response, body = fetch(session, tls_upstream.url, "/a%2Fb?")
    assert response.status == 200
    assert tls_upstream.wait_for_requests(1)[0].target == "/a%2Fb?"


def test_https_is_verified_without_the_ca_file(session, tls_upstream):
    with pytest.raises(UpstreamUnavailable, match="CERTIFICATE_VERIFY_FAILED") as caught:
        fetch(session, tls_upstream.url, "/")
    assert caught.value.error_type == "unknown"


def test_host_name_is_verified_with_the_ca_file(tls_files, tmp_path):
    other = make_tls_files(str(tmp_path), names=("other.example",))
    session = upstream_session.make_session(pool_maxsize=2, ca_file=other.ca_file)
    with RecordingUpstream(ssl_context=other.server_context()) as upstream:
        with pytest.raises(UpstreamUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            fetch(session, upstream.url, "/")


def test_ca_file_adds_to_the_default_roots(tls_files):
    context = upstream_connect.make_ssl_context(tls_files.ca_file)
    issuers = {
        value for cert in context.get_ca_certs() for rdn in cert["subject"] for key, value in rdn if key == "commonName"
    }
    assert "jwt-proxy test CA" in issuers
    assert "ISRG Root X1" in issuers  # from requests' certifi bundle
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_certifi_roots_are_kept_when_the_system_store_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "none"))
    names = {
        value for cert in upstream_connect.make_ssl_context().get_ca_certs() for rdn in cert["subject"] for key, value in rdn
        if key == "commonName"
    }
    assert "ISRG Root X1" in names


def test_the_system_store_is_trusted(tls_files, tls_upstream, tmp_path, monkeypatch):
    """A CA installed in the system store (here via SSL_CERT_FILE) works without --upstream-ca-file."""
    monkeypatch.setenv("SSL_CERT_FILE", tls_files.ca_file)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "none"))
    response, _ = fetch(upstream_session.make_session(pool_maxsize=1), tls_upstream.url, "/")
    assert response.status == 200


def test_https_through_an_environment_connect_proxy_uses_the_ca_file(tls_files, tls_upstream, monkeypatch):
    session = upstream_session.make_session(pool_maxsize=2, ca_file=tls_files.ca_file)
    with RecordingUpstream(connect_tunnel) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        response, body = fetch(session, tls_upstream.url, "/x/%2E%2E/y?")
        [tunnel] = proxy.wait_for_requests(1)
    assert tunnel.method == "CONNECT" and tunnel.target == f"127.0.0.1:{tls_upstream.port}"
    assert tls_upstream.wait_for_requests(1)[0].target == "/x/%2E%2E/y?"


# -- response mapping -----------------------------------------------------------------------


def test_status_reason_and_header_lines_are_mapped(session):
    def teapot(seen: RecordedRequest, sock: socket.socket) -> bool:
        send_response(
            sock,
            418,
            [
                ("Set-Cookie", "a=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
                ("Set-Cookie", "b=2"),
                ("X-Custom-HEADER", "v"),
                ("Connection", "X-Hop"),
                ("X-Hop", "1"),
            ],
            b"teapot",
            reason="I'm a Teapot",
        )
        return True

    with RecordingUpstream(teapot) as upstream:
        response = forward.send(session, request(upstream.url, "/items?x=1"), timeout_s=TIMEOUT_S)
        with response:
            assert (response.status, response.reason) == (418, "I'm a Teapot")
            assert response.headers == [
                ("Set-Cookie", "a=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
                ("Set-Cookie", "b=2"),
                ("X-Custom-HEADER", "v"),
                ("Content-Length", "6"),
            ]
            assert b"".join(response.iter_body()) == b"teapot"


def test_interleaved_duplicate_header_lines_keep_their_order_and_case(session):
    lines = [("Set-Cookie", "a=1"), ("X-One", "1"), ("set-cookie", "b=2"), ("Link", "</a>"), ("X-One", "again")]

    def interleaved(seen: RecordedRequest, sock: socket.socket) -> bool:
        send_response(sock, 200, lines, b"ok")
        return True

    with RecordingUpstream(interleaved) as upstream:
        response, body = fetch(session, upstream.url, "/h")
    assert response.headers == [*lines, ("Content-Length", "2")]
    assert body == b"ok"


def test_a_compressed_body_is_yielded_compressed(session):
    compressed = gzip.compress(b"hello " * 100, mtime=0)

    def gzipped(seen: RecordedRequest, sock: socket.socket) -> bool:
        send_response(sock, 200, [("Content-Encoding", "gzip")], compressed)
        return True

    with RecordingUpstream(gzipped) as upstream:
        response = forward.send(session, request(upstream.url, "/z"), timeout_s=TIMEOUT_S)
        with response:
            assert b"".join(response.iter_body()) == compressed
    assert ("Content-Encoding", "gzip") in response.headers


# -- response header parsing -------------------------------------------------------------


def _stdlib_message(block: bytes):
    import http.client

    return http.client.parse_headers(io.BytesIO(block))


def _header_lines(block: bytes) -> list[bytes]:
    """The lines of a header block as a reader takes them: up to the blank line, or
    ending with ``b""`` when the stream ends first."""
    lines = []
    for line in io.BytesIO(block):
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return lines
    return [*lines, b""]


def _same_message(block: bytes) -> None:
    ours = upstream_response.header_block_message(_header_lines(block))
    theirs = _stdlib_message(block)
    assert ours.items() == theirs.items()
    assert [type(d) for d in ours.defects] == [type(d) for d in theirs.defects]
    assert (ours.get_payload() or "") == (theirs.get_payload() or "")


@pytest.mark.parametrize(
    "block",
    [
        b"Content-Type: text/plain\r\nContent-Length: 3\r\n\r\n",
        b"Set-Cookie: a=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT\r\nSet-Cookie: b=2\r\nX-UPPER-lower: v\r\n\r\n",
        b"X-Empty:\r\nX-Spaces:   padded value  \r\nX-Tab:\tv\r\n\r\n",
        b"X-Folded: one\r\n  two\r\nNext: 1\r\n\r\n",  # obs-fold: the email parser's way
        b"X-Bare-LF: v\nY: w\n\n",
        b"X-CR: a\rb\r\n\r\n",
        b"Bad Name: v\r\nAfter: 1\r\n\r\n",  # not a header line: the rest is unparsed data
        b": no name\r\n\r\n",
        b"From someone\r\nX: y\r\n\r\n",
        b"X-Latin: caf\xe9\r\n\r\n",
        b"X: v\r\n",  # the stream ended before the blank line
        b"\r\n",
    ],
)
def test_response_header_blocks_parse_as_http_client_parses_them(block):
    _same_message(block)


@given(st.lists(st.text(alphabet="aZ-_:; \t\r\nF\xe9ro0=", max_size=12), max_size=6))
@settings(max_examples=400, deadline=None)
def test_any_response_header_block_parses_as_http_client_parses_it(lines):
    block = b"".join(line.encode("latin-1") + b"\r\n" for line in lines if line) + b"\r\n"
    _same_message(block)
