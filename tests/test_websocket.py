"""WebSocket through the proxy: a real client (websocket-client) and a loopback echo server
on either side of the real ``jwt-proxy`` CLI, plus the relay and handshake as units."""

from __future__ import annotations

import socket
import threading
import time

import jwt
import pytest
import requests
import websocket

from jwt_proxy import tunnel
from jwt_proxy import upstream_errors
from jwt_proxy import upstream_session
from tests.streaming_upstream import OP_CLOSE
from tests.streaming_upstream import OP_TEXT
from tests.streaming_upstream import WebSocketEchoServer
from tests.streaming_upstream import ws_frame
from tests.upstream import RecordingUpstream
from tests.upstream import connect_tunnel
from tests.upstream import make_tls_files
from tests.upstream import send_response

SECRET = "client-own-secret-7d1e"
MiB = 1024 * 1024


@pytest.fixture
def echo():
    with WebSocketEchoServer() as server:
        yield server


def pinned(start_proxy, server, *flags, scheme="http", **kwargs):
    return start_proxy("--upstream-host", f"127.0.0.1:{server.port}", "--upstream-scheme", scheme, *flags, **kwargs)


def connect(proxy, path="/chat", **kwargs) -> websocket.WebSocket:
    scheme = kwargs.pop("scheme", "ws")
    return websocket.create_connection(
        f"{scheme}://127.0.0.1:{proxy.port}{path}", timeout=5, header=[f"Authorization: Bearer {SECRET}"], **kwargs
    )


def plain_request_is_answered_at_once(proxy) -> None:
    """With ``--threads 1`` this only passes once the tunnel's thread is free again."""
    started = time.monotonic()
    response = requests.get(proxy.url + "/plain", timeout=3)
    assert (response.status_code, response.text) == (200, "plain\n")
    assert time.monotonic() - started < 1.0


def handshake_header(server, name):
    _, headers = server.handshakes[-1]
    return [value for key, value in headers if key.lower() == name.lower()]


# -- integration ------------------------------------------------------------------------


@pytest.mark.integration
def test_frames_both_ways_with_the_token_on_the_handshake(start_proxy, echo, sts):
    proxy = pinned(start_proxy, echo, "--threads", "1")
    ws = connect(proxy, "/chat?room=1")
    try:
        assert ws.getstatus() == 101
        assert ws.getheaders().get("x-upstream") == "echo"  # the upstream's 101 headers reach the client
        ws.send("hello")
        assert ws.recv() == "hello"
        ws.send_binary(b"\x00\x01\xfe\xff")
        assert ws.recv() == b"\x00\x01\xfe\xff"
        big = bytes(range(256)) * (4 * 1024)  # 1 MiB
        ws.send_binary(big)
        assert ws.recv() == big
        text = "é" * (MiB // 2)  # 1 MiB of UTF-8
        ws.send(text)
        assert ws.recv() == text
        ws.ping(b"are-you-there")
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"are-you-there")
    finally:
        ws.close()
    assert echo.ended.wait(2)
    assert echo.end_reasons == ["close-frame"]

    request_line, _ = echo.handshakes[0]
    assert request_line == "GET /chat?room=1 HTTP/1.1"
    [authorization] = handshake_header(echo, "Authorization")
    assert SECRET not in authorization
    token = authorization.removeprefix("Bearer ")
    key = jwt.PyJWKClient(sts.url + "/.well-known/jwks.json").get_signing_key_from_jwt(token)
    claims = jwt.decode(token, key.key, algorithms=["RS256"], audience="http://127.0.0.1", issuer=sts.url)
    assert claims["aud"] == "http://127.0.0.1"
    assert handshake_header(echo, "Connection") == ["Upgrade"]
    assert handshake_header(echo, "Upgrade") == ["websocket"]
    assert handshake_header(echo, "Host") == [f"127.0.0.1:{echo.port}"]
    assert len(handshake_header(echo, "Sec-WebSocket-Key")) == 1
    plain_request_is_answered_at_once(proxy)
    assert proxy.wait_for_record(lambda r: r.get("msg") == "request" and r.get("status") == 101)["path"] == "/chat"


@pytest.mark.integration
@pytest.mark.parametrize("how", ["close-frame", "tcp"])
def test_client_closing_closes_the_upstream(start_proxy, echo, how):
    proxy = pinned(start_proxy, echo, "--threads", "1")
    ws = connect(proxy)
    ws.send("x")
    assert ws.recv() == "x"
    started = time.monotonic()
    if how == "close-frame":
        ws.close()
    else:  # the client vanishes without a close frame
        ws.sock.shutdown(socket.SHUT_RDWR)
        ws.sock.close()
    assert echo.ended.wait(1.0), "the upstream connection is still open"
    assert time.monotonic() - started < 1.0
    assert echo.end_reasons == ["close-frame" if how == "close-frame" else "eof"]
    plain_request_is_answered_at_once(proxy)


@pytest.mark.integration
@pytest.mark.parametrize("how", ["close-me", "drop-me"])
def test_upstream_closing_closes_the_client(start_proxy, echo, how):
    proxy = pinned(start_proxy, echo, "--threads", "1")
    ws = connect(proxy)
    started = time.monotonic()
    ws.send(how)
    if how == "close-me":  # a close frame, then TCP closed
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == OP_CLOSE and frame.data[:2] == b"\x03\xe8"
    # either way the client's connection ends: EOF, not a hang
    ws.sock.settimeout(2)
    assert ws.sock.recv(1) == b""
    assert time.monotonic() - started < 1.0
    ws.sock.close()
    plain_request_is_answered_at_once(proxy)


@pytest.mark.integration
def test_tls_on_both_sides(start_proxy, tmp_path):
    """wss to a TLS listener, relayed to a TLS upstream verified with --upstream-ca-file."""
    files = make_tls_files(str(tmp_path))
    with WebSocketEchoServer(ssl_context=files.server_context()) as echo:
        proxy = pinned(
            start_proxy, echo, "--threads", "1", "--upstream-ca-file", files.ca_file,
            "--tls-cert", files.cert_file, "--tls-key", files.key_file, scheme="https",
        )
        ws = connect(proxy, scheme="wss", sslopt={"ca_certs": files.ca_file})
        try:
            big = bytes(range(256)) * (4 * 1024)
            for _ in range(3):
                ws.send_binary(big)
                assert ws.recv() == big
            ws.send("small")
            assert ws.recv() == "small"
        finally:
            ws.close()
        assert echo.ended.wait(2)
        assert handshake_header(echo, "Authorization")[0].startswith("Bearer ey")
        response = requests.get(proxy.url.replace("http:", "https:") + "/plain", verify=files.ca_file, timeout=3)
        assert response.text == "plain\n"


@pytest.mark.integration
def test_bytes_right_behind_either_head_are_relayed(start_proxy, echo):
    """Nothing is lost at the switch: a frame the upstream sent in the same write as its
    101, and a frame the client sent without waiting for the 101."""
    proxy = pinned(start_proxy, echo)
    ws = connect(proxy, "/greet")
    try:
        assert ws.recv() == "welcome"
    finally:
        ws.close()

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(
            b"GET /eager HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            + ws_frame(OP_TEXT, b"too eager", mask=b"\x01\x02\x03\x04")
        )
        received = b""
        while not received.endswith(ws_frame(OP_TEXT, b"too eager")):
            data = sock.recv(4096)
            assert data, received
            received += data
        assert received.startswith(b"HTTP/1.1 101 ")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in received


@pytest.mark.integration
def test_handshake_timeout_and_refused_connection(start_proxy):
    def silent(request, sock):
        time.sleep(2.5)
        return False

    with RecordingUpstream(handler=silent) as upstream:
        proxy = pinned(start_proxy, upstream, "--upstream-timeout", "1s")
        started = time.monotonic()
        with pytest.raises(websocket.WebSocketBadStatusException) as raised:
            connect(proxy)
        assert raised.value.status_code == 504
        assert 1.0 <= time.monotonic() - started < 2.0
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connections are refused
        proxy = start_proxy("--upstream-host", f"127.0.0.1:{port}", "--upstream-scheme", "http")
        with pytest.raises(websocket.WebSocketBadStatusException) as raised:
            connect(proxy)
        assert raised.value.status_code == 502


@pytest.mark.integration
def test_refused_upgrade_is_passed_back_as_a_response(start_proxy, echo):
    proxy = pinned(start_proxy, echo)
    with pytest.raises(websocket.WebSocketBadStatusException) as raised:
        connect(proxy, "/refuse")
    assert raised.value.status_code == 403
    assert raised.value.resp_headers.get("x-refused") == "yes"
    assert raised.value.resp_body == b"no upgrade for you\n"
    assert echo.ended.wait(2) and echo.end_reasons == ["refused"]


@pytest.mark.integration
def test_a_101_to_another_protocol_is_a_502(start_proxy):
    def switch_to_h2c(request, sock):
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
        return False

    with RecordingUpstream(handler=switch_to_h2c) as upstream:
        proxy = pinned(start_proxy, upstream)
        with pytest.raises(websocket.WebSocketBadStatusException) as raised:
            connect(proxy)
        assert raised.value.status_code == 502
        assert proxy.wait_for_record(lambda r: r.get("msg") == "upstream request failed")["target"].endswith("/chat")


@pytest.mark.integration
def test_other_upgrades_and_non_handshakes_are_forwarded_without_upgrade(start_proxy):
    """h2c (and a websocket Upgrade on a request with a body) is not tunnelled: Upgrade and
    Connection are hop-by-hop and dropped, the request goes on as any other."""
    with RecordingUpstream() as upstream:
        proxy = pinned(start_proxy, upstream)
        h2c = requests.get(
            proxy.url + "/h2c",
            headers={"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABkAAQAAP__"},
            timeout=5,
        )
        assert h2c.status_code == 200
        post = requests.post(
            proxy.url + "/ws-post", data=b"body", headers={"Connection": "Upgrade", "Upgrade": "websocket"}, timeout=5
        )
        assert post.status_code == 200
        for recorded in upstream.wait_for_requests(2):
            assert recorded.header("Upgrade") is None
            assert recorded.header("Connection") is None
            assert recorded.header("HTTP2-Settings") is None
        assert upstream.requests[1].body == b"body"


@pytest.mark.integration
def test_through_an_https_proxy_from_the_environment(start_proxy, tmp_path):
    """With HTTPS_PROXY set the tunnel goes through it with CONNECT (TLS to the upstream
    inside it), as the operator asked; it never bypasses the egress proxy."""
    files = make_tls_files(str(tmp_path))
    echo = WebSocketEchoServer(ssl_context=files.server_context())
    with echo, RecordingUpstream(handler=connect_tunnel) as egress:
        proxy = pinned(
            start_proxy, echo, "--upstream-ca-file", files.ca_file, scheme="https", env={"HTTPS_PROXY": egress.url}
        )
        ws = connect(proxy)
        try:
            ws.send("via proxy")
            assert ws.recv() == "via proxy"
        finally:
            ws.close()
        [seen] = egress.wait_for_requests(1)
        assert (seen.method, seen.target) == ("CONNECT", f"127.0.0.1:{echo.port}")
        assert handshake_header(echo, "Authorization")[0].startswith("Bearer ey")


# -- units --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("GET", [("Connection", "Upgrade"), ("Upgrade", "websocket")], True),
        ("GET", [("connection", "keep-alive, UPGRADE"), ("upgrade", "WebSocket")], True),
        ("GET", [("Connection", "Upgrade"), ("Upgrade", "h2c")], False),
        ("GET", [("Upgrade", "websocket")], False),
        ("GET", [("Connection", "Upgrade")], False),
        ("POST", [("Connection", "Upgrade"), ("Upgrade", "websocket")], False),
    ],
)
def test_is_websocket_upgrade(method, headers, expected):
    assert tunnel.is_websocket_upgrade(method, headers) is expected


def test_a_name_resolving_to_a_metadata_address_is_never_dialled():
    dialled = []

    def resolver(host, port, family, type_):
        dialled.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]

    session = upstream_session.make_session(pool_maxsize=1, resolver=resolver)
    with pytest.raises(upstream_errors.UpstreamForbidden):
        tunnel.open_tunnel(
            tunnel.transport_of(session), base_url="http://metadata.example:80", target="/", headers=[], timeout_s=1
        )
    assert dialled == ["metadata.example"]


def _pairs():
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    return a, a_peer, b, b_peer


def _run_relay(a, b, **kwargs):
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=tunnel.relay(a, b, **kwargs)), daemon=True)
    thread.start()
    return thread, result


def test_relay_ends_after_the_idle_timeout():
    a, a_peer, b, b_peer = _pairs()
    with a, a_peer, b, b_peer:
        started = time.monotonic()
        thread, result = _run_relay(a, b, idle_timeout_s=0.3)
        a_peer.sendall(b"one")
        assert b_peer.recv(10) == b"one"
        thread.join(3)
        assert not thread.is_alive()
        assert result["r"].end == "idle"
        assert 0.3 <= time.monotonic() - started < 1.5


def test_relay_passes_a_half_close_on_and_lingers_for_the_rest():
    a, a_peer, b, b_peer = _pairs()
    with a, a_peer, b, b_peer:
        thread, result = _run_relay(a, b, idle_timeout_s=10, a_to_b=b"early:", linger_s=0.5)
        a_peer.sendall(b"last words")
        a_peer.shutdown(socket.SHUT_WR)
        received = b""
        while not received.endswith(b"last words"):
            received += b_peer.recv(100)
        assert received == b"early:last words"
        assert b_peer.recv(10) == b""  # the half close was passed on
        b_peer.sendall(b"reply")  # the other way still flows
        assert a_peer.recv(10) == b"reply"
        thread.join(3)
        assert result["r"].end == "linger"  # b never closed: bounded by the linger
        assert (result["r"].a_to_b, result["r"].b_to_a) == (len(b"early:last words"), 5)


def test_relay_reads_only_as_fast_as_the_other_side_takes():
    a, a_peer, b, b_peer = _pairs()
    with a, a_peer, b, b_peer:
        thread, result = _run_relay(a, b, idle_timeout_s=10, linger_s=1)
        sent = [0]
        payload = bytes(range(256)) * 256  # 64 KiB

        def write():
            try:
                for _ in range(160):  # 10 MiB
                    a_peer.sendall(payload)
                    sent[0] += len(payload)
                a_peer.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        time.sleep(0.5)
        paused_at = sent[0]
        time.sleep(0.3)
        assert sent[0] == paused_at < 10 * MiB  # the writer is blocked: socket buffers, not memory
        received = 0
        b_peer.settimeout(5)
        while received < 160 * len(payload):
            received += len(b_peer.recv(1 << 20))
        writer.join(3)
        assert received == 160 * len(payload)
        b_peer.close()
        thread.join(3)
        assert result["r"].a_to_b == 160 * len(payload)


def test_relay_ends_on_reset():
    a, a_peer, b, b_peer = _pairs()
    with a, a_peer, b, b_peer:
        thread, result = _run_relay(a, b, idle_timeout_s=10)
        b_peer.close()
        a_peer.sendall(b"x" * 1000)
        thread.join(3)
        assert result["r"].end in ("reset", "linger", "closed")
        assert not thread.is_alive()


def test_refusal_body_short_of_its_length_raises():
    def short(request, sock):
        send_response(sock, 401, [("Content-Length", "100")], b"", content_length=False)
        sock.sendall(b"x" * 10)
        return False

    with RecordingUpstream(handler=short) as upstream:
        session = upstream_session.make_session(pool_maxsize=1)
        opened = tunnel.open_tunnel(
            tunnel.transport_of(session), base_url=upstream.url, target="/", headers=[("Host", "h")], timeout_s=2
        )
        assert (opened.switched, opened.status) == (False, 401)
        body = opened.iter_body()
        assert next(body) == b"x" * 10
        with pytest.raises(upstream_errors.UpstreamUnavailable):
            next(body)
