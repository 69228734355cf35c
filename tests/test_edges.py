"""Strict framing both ways and a real deadline on upstream heads, against the real CLI.

Each test sends raw bytes to a running ``jwt-proxy`` and looks at what a client sees
(status, ``Connection`` header, whether the connection stays open) and at what reached
the upstream (a raw-socket upstream from :mod:`tests.upstream` that answers with exact,
sometimes broken, bytes).
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.upstream import RecordedRequest
from tests.upstream import RecordingUpstream
from tests.upstream import send_response

pytestmark = pytest.mark.integration

IO_TIMEOUT_S = 15.0
UPSTREAM_TIMEOUT_S = 2.0


class Answer:
    """One response as read off the client connection."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)


class Client:
    """A raw client connection that reads responses one at a time (keep-alive aware)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError("closed inside a head")
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._fill():
                raise ConnectionError("closed inside a body")
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, method: str = "GET") -> Answer:
        while True:
            status_line = self._line()
            status = int(status_line.split(b" ")[1])
            headers = []
            while True:
                line = self._line().decode("latin-1")
                if not line:
                    break
                name, _, value = line.partition(":")
                headers.append((name, value.strip()))
            if not 100 <= status < 200:
                break
        answer = Answer(status, headers, b"")
        if method == "HEAD" or status in (204, 304):
            return answer
        if (answer.header("Transfer-Encoding") or "").lower() == "chunked":
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    self._line()
                    break
                answer.body += self._exactly(size)
                self._exactly(2)
        elif answer.header("Content-Length") is not None:
            answer.body = self._exactly(int(answer.header("Content-Length") or "0"))
        return answer

    def closed_by_peer(self) -> bool:
        """Whether the proxy closed the connection (EOF with nothing more to read)."""
        try:
            return not self.buffer and not self.sock.recv(1)
        except ConnectionResetError:
            return True


def get(target: str, *extra: str) -> bytes:
    return (f"GET {target} HTTP/1.1\r\nHost: p\r\n" + "".join(f"{line}\r\n" for line in extra) + "\r\n").encode()


def assert_closes_with_connection_close(client: Client, answer: Answer) -> None:
    assert answer.header("Connection") == "close", answer.headers
    assert client.closed_by_peer()


# -- a raw upstream whose answers are chosen by path ------------------------------------------

BAD_FRAMING = {
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 30\r\n\r\nhello" + b"x" * 25,
    "plus-length": b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    "minus-length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello",
    "word-length": b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello",
    "length-and-chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "gzip-under-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "gzip-only": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    "unasked-101": b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
}


def raw_answers(seen: RecordedRequest, sock: socket.socket) -> bool:
    name = seen.path.strip("/")
    if name in BAD_FRAMING:
        sock.sendall(BAD_FRAMING[name])
        return True  # the proxy must be the one to close
    if name == "continue-forever":
        for _ in range(30):
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            time.sleep(1.0)
        return False
    if name == "drip-head":
        head = b"HTTP/1.1 200 OK\r\nX-Dripped: " + b"d" * 100 + b"\r\nContent-Length: 2\r\n\r\nok"
        for byte in head:
            sock.sendall(bytes([byte]))
            time.sleep(0.25)
        return False
    send_response(sock, 200, [("X-Connection", str(seen.connection))], f"own answer to {seen.target}".encode())
    return True


@pytest.fixture
def raw_upstream():
    with RecordingUpstream(raw_answers) as upstream:
        yield upstream


@pytest.fixture
def proxy(start_proxy, raw_upstream):
    return start_proxy(
        "--upstream-host", f"127.0.0.1:{raw_upstream.port}",
        "--upstream-scheme", "http",
        "--upstream-timeout", f"{UPSTREAM_TIMEOUT_S:g}s",
        "--threads", "4",
    )  # fmt: skip


# -- 1. lengths that do not fit a signed 64-bit integer ---------------------------------------


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        ("Content-Length: 9223372036854775808", b"hello"),  # 2**63
        ("Content-Length: 18446744073709551621", b"hello"),  # 2**64 + 5: wraps to 5
        ("Content-Length: " + "1" * 40, b"hello"),
        ("Transfer-Encoding: chunked", b"10000000000000005\r\nhello\r\n0\r\n\r\n"),  # chunk of 2**64 + 5
        ("Transfer-Encoding: chunked", b"8000000000000000\r\nhello\r\n0\r\n\r\n"),  # chunk of 2**63
    ],
)
def test_a_length_above_a_signed_64_bit_integer_is_a_400_before_anything_is_dialled(proxy, raw_upstream, framing, body):
    opened = raw_upstream.settle()
    client = Client(proxy.port)
    try:
        client.send(f"POST /upload HTTP/1.1\r\nHost: p\r\n{framing}\r\n\r\n".encode() + body)
        answer = client.response()
        assert answer.status == 400
        assert answer.body.count(b"\n") == 1 and answer.body.startswith(b"invalid ")
        assert_closes_with_connection_close(client, answer)
    finally:
        client.close()
    assert raw_upstream.settle() == opened + 1  # only the second marker
    assert raw_upstream.requests == []


def test_a_chunk_size_too_large_further_in_the_body_is_a_400_and_closes(proxy, raw_upstream):
    client = Client(proxy.port)
    try:
        client.send(b"POST /upload HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        time.sleep(0.5)  # the first chunk went upstream alone; the next size comes later
        client.send(b"10000000000000005\r\nhello\r\n0\r\n\r\n")
        answer = client.response()
        assert (answer.status, answer.body) == (400, b"invalid chunked body\n")
        assert_closes_with_connection_close(client, answer)
    finally:
        client.close()


# -- 2 and 3. targets -----------------------------------------------------------------------


@pytest.mark.parametrize("target", ["http://127.0.0.1:18081", "HTTP://169.254.169.254", "http://127.0.0.1:18081?q"])
def test_a_target_without_a_path_is_a_400_naming_it_never_a_500(proxy, raw_upstream, target):
    client = Client(proxy.port)
    try:
        client.send(get(target))
        answer = client.response()
        assert (answer.status, answer.body) == (400, b"invalid request target\n")
        client.send(get("/after"))  # the connection serves the next request
        assert client.response().body == b"own answer to /after"
    finally:
        client.close()
    assert [r.target for r in raw_upstream.requests] == ["/after"]


def test_a_target_starting_with_two_slashes_is_forwarded_byte_for_byte(proxy, raw_upstream):
    client = Client(proxy.port)
    try:
        client.send(get("//double//slash/?q=a+b"))
        answer = client.response()
    finally:
        client.close()
    assert (answer.status, answer.body) == (200, b"own answer to //double//slash/?q=a+b")
    (seen,) = raw_upstream.requests
    assert seen.target == "//double//slash/?q=a+b"
    assert seen.header("Host") == f"127.0.0.1:{raw_upstream.port}"


# -- 4 and 5. ambiguous upstream framing, an unasked 101 --------------------------------------


@pytest.mark.parametrize("case", sorted(BAD_FRAMING))
def test_an_ambiguous_upstream_answer_is_a_502_and_its_connection_is_never_reused(proxy, raw_upstream, case):
    client = Client(proxy.port)
    try:
        client.send(get(f"/{case}"))
        answer = client.response()
        assert (answer.status, answer.body) == (502, b"upstream unavailable\n")
        if case == "unasked-101":
            assert_closes_with_connection_close(client, answer)
            client.close()
            client = Client(proxy.port)
        else:
            assert answer.header("Connection") == "keep-alive"
        # The next request would take the pooled connection: it gets its own answer, on
        # a new upstream connection (the broken one was closed, never pooled).
        client.send(get("/next"))
        following = client.response()
    finally:
        client.close()
    assert (following.status, following.body) == (200, b"own answer to /next")
    bad, good = raw_upstream.requests
    assert bad.connection != good.connection
    assert following.header("X-Connection") == str(good.connection)
    assert "/smuggled" not in [r.target for r in raw_upstream.requests]
    record = proxy.wait_for_record(lambda r: r.get("msg") == "upstream request failed")
    assert record["error_type"] == "unknown"


# -- 6. one deadline for the whole response head ----------------------------------------------


@pytest.mark.parametrize("path", ["/continue-forever", "/drip-head"])
def test_the_upstream_timeout_bounds_the_whole_head(proxy, raw_upstream, path):
    client = Client(proxy.port)
    try:
        started = time.monotonic()
        client.send(get(path))
        answer = client.response()
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert (answer.status, answer.body) == (504, b"upstream timeout\n")
    assert elapsed < UPSTREAM_TIMEOUT_S + 1.0, elapsed


# -- 7. every response after which the connection closes says so -------------------------------


def test_the_incomplete_body_answer_says_connection_close(proxy, raw_upstream):
    client = Client(proxy.port)
    try:
        client.send(b"POST /upload HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n\r\nhello")
        client.sock.shutdown(socket.SHUT_WR)
        answer = client.response()
        assert (answer.status, answer.body) == (400, b"incomplete request body\n")
        assert_closes_with_connection_close(client, answer)
    finally:
        client.close()


# -- 8. restricted addresses in every spelling ---------------------------------------------------


@pytest.mark.parametrize(
    "host", ["[::169.254.169.254]", "[::a9fe:a9fe]", "[::ffff:0:a9fe:a9fe]", "[64:ff9b:1::a9fe:a9fe]", "[2002:a9fe:a9fe::]"]
)
def test_an_ipv6_spelling_of_the_metadata_address_is_refused_before_any_connect(start_proxy, host):
    proxy = start_proxy("--upstream-scheme", "http")
    client = Client(proxy.port)
    try:
        client.send(get("/latest/meta-data/", f"X-Upstream-Host: {host}"))
        answer = client.response()
    finally:
        client.close()
    assert (answer.status, answer.body) == (403, b"upstream not allowed\n")
    time.sleep(0.3)  # the records of the request
    assert "upstream request failed" not in proxy.output()  # no connect was attempted


#: Loaded by the proxy's Python (``PYTHONPATH``): names that resolve to IPv6 spellings of
#: the metadata address, as a DNS answer could.
RESOLVES_TO_METADATA = """
import socket
_getaddrinfo = socket.getaddrinfo
_ANSWERS = {"compat.test": "::a9fe:a9fe", "sixtofour.test": "2002:a9fe:a9fe::1"}
def getaddrinfo(host, *args, **kwargs):
    if isinstance(host, str):
        host = _ANSWERS.get(host.lower().rstrip("."), host)
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
"""


@pytest.mark.parametrize("name", ["compat.test", "sixtofour.test"])
def test_a_name_resolving_to_an_ipv6_spelling_of_the_metadata_address_is_refused_before_dialling(
    start_proxy, tmp_path, name
):
    (tmp_path / "sitecustomize.py").write_text(RESOLVES_TO_METADATA)
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    proxy = start_proxy("--upstream-scheme", "http", env={"PYTHONPATH": pythonpath})
    client = Client(proxy.port)
    try:
        client.send(get("/latest/meta-data/", f"X-Upstream-Host: {name}"))
        answer = client.response()
    finally:
        client.close()
    assert (answer.status, answer.body) == (403, b"upstream not allowed\n")
    record = proxy.wait_for_record(lambda r: r.get("msg") == "upstream address refused")
    assert name in record["error"]
