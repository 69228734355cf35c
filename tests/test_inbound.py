"""inbound: reading a request body with a length straight from the client socket, with
gunicorn's own body objects over a real socket pair."""

from __future__ import annotations

import io
import socket
import threading

import pytest
from gunicorn.http.body import Body
from gunicorn.http.body import LengthReader
from gunicorn.http.unreader import SocketUnreader

from jwt_proxy import inbound

NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: proxy\r\n\r\n"


@pytest.fixture
def pair():
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def gunicorn_body(server: socket.socket, length: int) -> tuple[Body, SocketUnreader]:
    unreader = SocketUnreader(server)
    return Body(LengthReader(unreader, length)), unreader


def environ_for(body: Body, server: socket.socket) -> dict:
    return {"wsgi.input": body, "gunicorn.socket": server}


def read_all(reader: inbound.DirectBody, size: int) -> bytes:
    pieces = []
    while piece := reader.read(size):
        pieces.append(piece)
    return b"".join(pieces)


def test_a_body_spread_over_gunicorn_buffers_and_the_socket_is_read_exactly(pair):
    server, client = pair
    data = bytes(range(256)) * 4096  # 1 MiB
    body, unreader = gunicorn_body(server, len(data))
    client.sendall(data[:5000])
    assert body.read(10) == data[:10]  # gunicorn has now read ahead: some in Body, some in the unreader
    # The rest, then the next request right behind the body; from a thread, as it is
    # more than the socket buffers hold.
    sender = threading.Thread(target=client.sendall, args=(data[5000:] + NEXT_REQUEST,))
    sender.start()

    reader = inbound.direct_body(environ_for(body, server))
    assert reader is not None
    assert read_all(reader, 65536) == data[10:]
    sender.join(10)
    assert body.reader.length == 0
    # What came after the body is the next request, left to gunicorn's parser.
    rest = unreader.take_buffered()
    while len(rest) < len(NEXT_REQUEST):
        rest += server.recv(65536)
    assert rest == NEXT_REQUEST
    assert body.failed is False


def test_what_the_proxy_leaves_unread_is_still_drained_by_gunicorn(pair):
    server, client = pair
    data = b"0123456789" * 10_000
    body, _ = gunicorn_body(server, len(data))
    client.sendall(data + NEXT_REQUEST)
    reader = inbound.direct_body(environ_for(body, server))
    first = reader.read(30_000)
    assert data.startswith(first) and 0 < len(first) <= 30_000
    drained = b""
    while piece := body.read(8192):  # what gunicorn does before the next request
        drained += piece
    assert first + drained == data


def test_a_client_that_leaves_early_ends_the_body_and_the_connection(pair):
    server, client = pair
    body, _ = gunicorn_body(server, 1000)
    client.sendall(b"x" * 100)
    client.shutdown(socket.SHUT_WR)
    reader = inbound.direct_body(environ_for(body, server))
    assert read_all(reader, 4096) == b"x" * 100
    assert body.failed is True  # gunicorn must not reuse the connection


def test_other_bodies_are_left_to_the_server():
    assert inbound.direct_body({"wsgi.input": io.BytesIO(b"abc")}) is None
    body = Body(LengthReader(SocketUnreader(None), 3))
    assert inbound.direct_body({"wsgi.input": body}) is None  # no socket in the environ
