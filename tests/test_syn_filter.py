"""The SYN filter that a stopping proxy puts on its listening sockets: the connections
already queued stay and are accepted, a new one gets no handshake, and once the socket is
closed its retry is refused rather than reset."""

from __future__ import annotations

import errno
import socket
import sys
import threading
import time

import pytest

from jwt_proxy import syn_filter

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_ATTACH_FILTER is Linux's")


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def test_a_connection_queued_before_the_filter_is_accepted_and_served(listener):
    queued = socket.create_connection(listener.getsockname(), timeout=2)
    syn_filter.refuse_new_connections(listener)
    queued.sendall(b"ping")
    listener.settimeout(2)
    accepted, _ = listener.accept()
    with accepted, queued:
        assert accepted.recv(4) == b"ping"
        accepted.sendall(b"pong")
        assert queued.recv(4) == b"pong"


def test_a_new_connection_gets_no_handshake_once_the_filter_is_on(listener):
    syn_filter.refuse_new_connections(listener)
    with socket.socket() as late:
        late.settimeout(0.3)
        with pytest.raises(TimeoutError):
            late.connect(listener.getsockname())
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing reached the queue


def test_a_client_whose_syn_was_dropped_is_refused_after_the_close_not_reset(listener):
    syn_filter.refuse_new_connections(listener)
    address = listener.getsockname()
    outcome: list[object] = []

    def connect() -> None:
        with socket.socket() as late:
            late.settimeout(5)
            outcome.append(late.connect_ex(address))

    client = threading.Thread(target=connect)
    client.start()
    time.sleep(0.2)  # the first SYN is sent and dropped; the kernel retries after about 1 s
    listener.close()
    client.join(10)
    assert outcome == [errno.ECONNREFUSED]
