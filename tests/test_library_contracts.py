"""Every private name of gunicorn, urllib3, http.client and botocore that jwt_proxy uses.

The proxy reaches inside these libraries where no public way gives the speed or the
control it needs (each use has a comment saying why). Some names below have no
underscore but are undocumented internals all the same (gunicorn's worker loop and
arbiter): they are fenced the same way. ``setup.cfg`` caps those libraries
below their next minor release, and this module is what tells, after an upgrade
(``.ci/try-upgrades``), which internal moved: each failure names the library, the
version found, the name and the jwt_proxy code that uses it.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import inspect
import io
import socket
import typing as t

import pytest

CONTRACTS: list[tuple[str, str, str, str]] = [
    # (distribution, "module:Owner", attribute, used by)
    # gunicorn's gthread worker: its main loop, overridden in worker.ProxyWorker.
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "accept", "worker.ProxyWorker.accept gathers a new connection's head in the main loop"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "on_client_socket_readable", "worker.ProxyWorker: a kept-alive connection's next head is gathered in the main loop"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "finish_request", "worker.ProxyWorker.finish_request waits for a closing client in the main loop"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "set_accept_enabled", "worker.ProxyWorker: a stopping worker takes what is queued, then closes its socket"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "enqueue_req", "worker.ProxyWorker.enqueue_req counts connections waiting for a thread"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "handle", "worker.ProxyWorker.handle serves kept-alive requests in the pool thread"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "handle_request", "worker.ProxyWorker.handle_request ends the head deadline"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "notify", "worker.ProxyWorker.notify rate-limits the heartbeat"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "murder_pending", "worker.ProxyWorker.murder_pending closes overdue heads"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "handle_error", "worker.ProxyWorker.handle_error redacts parse errors"),
    ("gunicorn", "gunicorn.workers.gthread:TConn", "init", "worker: a pool thread initialises a new connection"),
    ("gunicorn", "gunicorn.workers.gthread:TConn", "close", "worker._close_here closes a finished connection"),
    # gunicorn's request parsing and response.
    ("gunicorn", "gunicorn.http.unreader:Unreader", "take_buffered", "inbound.read_ahead and inbound.DirectBody take the parser's read-ahead"),
    ("gunicorn", "gunicorn.http.unreader:Unreader", "unread", "inbound.DirectBody and worker give bytes back to the parser"),
    ("gunicorn", "gunicorn.http.body:ChunkedReader", "parse_chunk_size", "inbound.limit_chunk_sizes refuses chunk sizes past a signed 64-bit integer"),
    ("gunicorn", "gunicorn.http.wsgi:Response", "force_close", "app: a response after which the client connection closes says Connection: close"),
    # gunicorn's arbiter: the listening sockets it keeps, and its shutdown.
    ("gunicorn", "gunicorn.arbiter:Arbiter", "LISTENERS", "server.listening_hooks: the master holds one SO_REUSEPORT socket per worker"),
    ("gunicorn", "gunicorn.arbiter:Arbiter", "WORKERS", "server: which worker holds which listening socket"),
    ("gunicorn", "gunicorn.arbiter:Arbiter", "SIG_NAMES", "server.shutdown_hooks: signals during --shutdown-delay"),
    ("gunicorn", "gunicorn.arbiter:Arbiter", "wait_for_signals", "server.shutdown_hooks: the arbiter's loop during --shutdown-delay"),
    ("gunicorn", "gunicorn.arbiter:Arbiter", "handle_chld", "server.shutdown_hooks: exited workers reaped during --shutdown-delay"),
    ("gunicorn", "gunicorn.arbiter:Arbiter", "murder_workers", "server.shutdown_hooks: stuck workers replaced during --shutdown-delay"),
    ("gunicorn", "gunicorn.arbiter:Arbiter", "manage_workers", "server.shutdown_hooks: the worker count kept during --shutdown-delay"),
    ("gunicorn", "gunicorn.arbiter:Arbiter", "handle_term", "server: SIGTERM marks the server as shutting down (readiness)"),
    ("gunicorn", "gunicorn.arbiter:Arbiter", "handle_int", "server: SIGINT marks the server as shutting down (readiness)"),
    ("gunicorn", "gunicorn.arbiter:Arbiter", "handle_quit", "server: SIGQUIT marks the server as shutting down (readiness)"),
    ("gunicorn", "gunicorn.glogging:Logger", "access", "worker.ServerLogger drops gunicorn's access records"),
    # urllib3: one request on a pooled connection, dialled through the address policy.
    ("urllib3", "urllib3.connectionpool:HTTPConnectionPool", "_get_conn", "upstream_pool.exchange: one request on a pooled connection, without urlopen"),
    ("urllib3", "urllib3.connectionpool:HTTPConnectionPool", "_put_conn", "upstream_pool.exchange: a connection goes back to its pool"),
    ("urllib3", "urllib3.connectionpool:HTTPConnectionPool", "_prepare_proxy", "upstream_pool.exchange: CONNECT through an egress proxy"),
    ("urllib3", "urllib3.connection:HTTPConnection", "_new_conn", "upstream_pool.RawTargetConnection dials only checked addresses"),
    ("urllib3", "urllib3.util.timeout", "_DEFAULT_TIMEOUT", "upstream_connect.connect_first: urllib3's no-timeout marker"),
    # http.client: the response whose head the package reads itself.
    ("python", "http.client", "_MAXLINE", "upstream_response: the longest header line"),
    ("python", "http.client", "_MAXHEADERS", "upstream_response: the most header lines"),
    # botocore: when the caller's session ends.
    ("botocore", "botocore.credentials:RefreshableCredentials", "refresh_needed", "sts.credentials_expiry: when the caller's session ends"),
    ("botocore", "botocore.session:Session", "get_credentials", "sts: the credentials the STS client signs with"),
]


def version_of(distribution: str) -> str:
    if distribution == "python":
        import platform

        return platform.python_version()
    return importlib.metadata.version(distribution)


def resolve(target: str) -> t.Any:
    module_name, _, owner = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, owner) if owner else module


def moved(distribution: str, what: str, used_by: str, detail: str = "is gone") -> str:
    return f"{distribution} {version_of(distribution)}: {what} {detail}; used by jwt_proxy.{used_by}"


@pytest.mark.parametrize(
    ("distribution", "target", "attribute", "used_by"),
    CONTRACTS,
    ids=[f"{target.split(':')[-1]}.{attribute}" for _, target, attribute, _ in CONTRACTS],
)
def test_each_private_name_is_still_there(distribution: str, target: str, attribute: str, used_by: str) -> None:
    owner = resolve(target)
    assert hasattr(owner, attribute), moved(distribution, f"{target}.{attribute}", used_by)


def test_message_names_library_version_and_user() -> None:
    """The failure text an upgrade produces: library, version found, what moved, who uses it."""
    text = moved("gunicorn", "gunicorn.workers.gthread:ThreadWorker.enqueue_req", "worker.ProxyWorker")
    assert text.startswith(f"gunicorn {importlib.metadata.version('gunicorn')}: ")
    assert "ThreadWorker.enqueue_req is gone" in text and "jwt_proxy.worker.ProxyWorker" in text


def test_gunicorn_connection_and_body_state() -> None:
    """Instance state read or written by worker.py and inbound.py: a connection's parser
    buffer and flags, a request body's buffer, failure flag and remaining length."""
    from gunicorn.config import Config
    from gunicorn.http.body import Body
    from gunicorn.http.body import LengthReader
    from gunicorn.http.unreader import IterUnreader
    from gunicorn.workers.gthread import TConn

    ours, theirs = socket.socketpair()
    try:
        conn = TConn(Config(), ours, ("127.0.0.1", 1), ("127.0.0.1", 2))
        for name in ("initialized", "data_ready", "sock", "client"):
            assert hasattr(conn, name), moved("gunicorn", f"TConn().{name}", "worker.ProxyWorker")
        conn.init()
        buffer = getattr(getattr(getattr(conn, "parser", None), "unreader", None), "buf", None)
        assert isinstance(buffer, io.BytesIO), moved("gunicorn", "TConn().parser.unreader.buf", "worker.ProxyWorker._next_request_within_linger", "is not a BytesIO")
        assert "graceful" in inspect.signature(conn.close).parameters, moved("gunicorn", "TConn.close(graceful=)", "worker._close_here", "lost its graceful parameter")
    finally:
        ours.close()
        theirs.close()

    reader = LengthReader(IterUnreader([b"abc"]), 3)
    body = Body(reader)
    assert isinstance(getattr(body, "buf", None), io.BytesIO), moved("gunicorn", "Body().buf", "inbound.DirectBody", "is not a BytesIO")
    assert getattr(body, "failed", None) is False, moved("gunicorn", "Body().failed", "inbound.DirectBody")
    assert getattr(reader, "length", None) == 3, moved("gunicorn", "LengthReader().length", "inbound.DirectBody")
    assert hasattr(reader, "unreader"), moved("gunicorn", "LengthReader().unreader", "inbound.DirectBody")


def test_gunicorn_defer_return_value() -> None:
    """``ThreadWorker.handle`` returns True (keep alive), False (close) or a third value
    that defers a connection to the poller; ProxyWorker.handle passes it through."""
    from gunicorn.workers import gthread

    source = inspect.getsource(gthread.ThreadWorker.handle)
    assert "return _DEFER" in source and hasattr(gthread, "_DEFER"), moved("gunicorn", "gthread._DEFER (handle's deferral result)", "worker.ProxyWorker.handle")


def test_gunicorn_listening_line() -> None:
    """worker.ServerLogger rewrites the arbiter's start-up line by its exact format."""
    from gunicorn.arbiter import Arbiter

    from jwt_proxy import worker

    source = inspect.getsource(Arbiter.start)
    assert repr(worker._LISTENING_AT)[1:-1] in source, moved("gunicorn", f"Arbiter.start's line {worker._LISTENING_AT!r}", "worker.ServerLogger.info", "changed")


def test_urllib3_pool_and_connection_state() -> None:
    """A pool's queue of idle connections, and a connection's unbracketed host."""
    from urllib3.connection import HTTPConnection
    from urllib3.connectionpool import HTTPConnectionPool

    pool = HTTPConnectionPool("127.0.0.1", 1)
    try:
        assert hasattr(pool, "pool"), moved("urllib3", "HTTPConnectionPool().pool", "upstream_session.ProxyAdapter._pool")
    finally:
        pool.close()
    conn = HTTPConnection("[::1]", 1)
    assert str(getattr(conn, "_dns_host", "")).strip("[]") == "::1", moved("urllib3", "HTTPConnection()._dns_host", "upstream_pool.RawTargetConnection", "no longer holds the host to resolve")


def test_http_client_limits_and_response_state() -> None:
    """The stdlib's head limits, and the response state upstream_response.FinalResponse
    sets after reading the head itself (its body reads use them)."""
    for name in ("_MAXLINE", "_MAXHEADERS"):
        assert isinstance(getattr(http.client, name, None), int), moved("python", f"http.client.{name}", "upstream_response")
    ours, theirs = socket.socketpair()
    try:
        response = http.client.HTTPResponse(ours, method="HEAD")
        for name in ("_method", "chunked", "chunk_left", "length", "will_close"):
            assert hasattr(response, name), moved("python", f"http.client.HTTPResponse().{name}", "upstream_response.FinalResponse.begin")
        assert response._method == "HEAD", moved("python", "http.client.HTTPResponse()._method", "upstream_response.FinalResponse.begin", "no longer holds the method")
    finally:
        ours.close()
        theirs.close()


def test_gunicorn_worker_loop_state() -> None:
    """ThreadWorker state the worker's main loop uses (set in its constructor)."""
    from gunicorn.workers.gthread import ThreadWorker

    source = inspect.getsource(ThreadWorker.__init__)
    for name in ("poller", "keepalived_conns", "nr_conns"):
        assert f"self.{name}" in source, moved("gunicorn", f"ThreadWorker().{name}", "worker.ProxyWorker")


def test_gunicorn_arbiter_binds_after_on_starting() -> None:
    """The master's listening sockets are set in on_starting; Arbiter.start binds its own
    only when none are set after that hook."""
    from gunicorn.arbiter import Arbiter
    from gunicorn.sock import BaseSocket

    source = inspect.getsource(Arbiter.start)
    assert "if not self.LISTENERS" in source and source.index("on_starting") < source.index("if not self.LISTENERS"), moved(
        "gunicorn", "Arbiter.start's 'if not self.LISTENERS' after on_starting", "server.listening_hooks", "changed"
    )
    assert "fd" in inspect.signature(BaseSocket.__init__).parameters, moved("gunicorn", "BaseSocket(fd=)", "server._reuse_port_socket")
    assert "self.sock" in inspect.getsource(BaseSocket.__init__), moved("gunicorn", "BaseSocket().sock", "server._reuse_port_socket")


def test_gunicorn_chunked_reader_request() -> None:
    """inbound.oversized_chunk_ahead reads the bytes already read past the head through
    the chunked reader's request."""
    from gunicorn.http.body import ChunkedReader

    assert "self.req" in inspect.getsource(ChunkedReader.__init__), moved("gunicorn", "ChunkedReader().req", "inbound.oversized_chunk_ahead")


def test_urllib3_pool_passes_conn_kw_to_connections() -> None:
    """upstream_pool.HTTPPool hands the address policy to each connection through the
    pool's ``**conn_kw``, documented as going to every new connection."""
    from urllib3.connectionpool import HTTPConnectionPool

    assert "**self.conn_kw" in inspect.getsource(HTTPConnectionPool._new_conn), moved(
        "urllib3", "HTTPConnectionPool._new_conn(**conn_kw)", "upstream_pool.HTTPPool", "no longer passes conn_kw"
    )
