"""Every private name of gunicorn, urllib3, http.client and botocore that jwt_proxy uses.

The proxy reaches inside these libraries where no public way gives the speed or the
control it needs (each use has a comment saying why). ``setup.cfg`` caps those libraries
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
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "enqueue_req", "worker.ProxyWorker.enqueue_req counts connections waiting for a thread"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "handle", "worker.ProxyWorker.handle serves kept-alive requests in the pool thread"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "handle_request", "worker.ProxyWorker.handle_request ends the head deadline"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "notify", "worker.ProxyWorker.notify rate-limits the heartbeat"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "murder_pending", "worker.ProxyWorker.murder_pending closes overdue heads"),
    ("gunicorn", "gunicorn.workers.gthread:ThreadWorker", "handle_error", "worker.ProxyWorker.handle_error redacts parse errors"),
    ("gunicorn", "gunicorn.workers.gthread:TConn", "init", "worker: a pool thread initialises a new connection"),
    ("gunicorn", "gunicorn.workers.gthread:TConn", "close", "worker._close_here closes a finished connection in its pool thread"),
    ("gunicorn", "gunicorn.http.unreader:Unreader", "take_buffered", "inbound.read_ahead and inbound.DirectBody take the parser's read-ahead"),
    ("gunicorn", "gunicorn.http.unreader:Unreader", "unread", "inbound.DirectBody gives bytes past the body back to the parser"),
    ("gunicorn", "gunicorn.arbiter:Arbiter", "handle_term", "server: SIGTERM marks the server as shutting down (readiness)"),
    ("gunicorn", "gunicorn.arbiter:Arbiter", "handle_int", "server: SIGINT marks the server as shutting down (readiness)"),
    ("gunicorn", "gunicorn.arbiter:Arbiter", "handle_quit", "server: SIGQUIT marks the server as shutting down (readiness)"),
    ("gunicorn", "gunicorn.glogging:Logger", "access", "worker.ServerLogger drops gunicorn's access records"),
    ("urllib3", "urllib3.connectionpool:HTTPConnectionPool", "_get_conn", "forward: one request on a pooled connection, without urlopen"),
    ("urllib3", "urllib3.connectionpool:HTTPConnectionPool", "_put_conn", "forward: a connection goes back to its pool after the body"),
    ("urllib3", "urllib3.connectionpool:HTTPConnectionPool", "_prepare_proxy", "forward: CONNECT through an egress proxy"),
    ("urllib3", "urllib3.connection:HTTPConnection", "_new_conn", "forward: the address policy checks the address actually dialled"),
    ("urllib3", "urllib3.util.timeout", "_DEFAULT_TIMEOUT", "forward: the pool's default timeout marker"),
    ("python", "http.client:HTTPResponse", "_read_status", "forward: the upstream's status line read with the head deadline"),
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
        assert hasattr(pool, "pool"), moved("urllib3", "HTTPConnectionPool().pool", "forward")
    finally:
        pool.close()
    conn = HTTPConnection("[::1]", 1)
    assert str(getattr(conn, "_dns_host", "")).strip("[]") == "::1", moved("urllib3", "HTTPConnection()._dns_host", "forward", "no longer holds the host to resolve")


def test_http_client_limits() -> None:
    """The stdlib's head limits, kept for the upstream head parser."""
    for name in ("_MAXLINE", "_MAXHEADERS"):
        assert isinstance(getattr(http.client, name, None), int), moved("python", f"http.client.{name}", "forward")
