"""The client side of a request under gunicorn: bytes its parser has read ahead, and a
faster reader for request bodies with a ``Content-Length``.

Both reach into gunicorn's request body object (``wsgi.input``: ``Body``, its
``LengthReader`` and the parser's ``Unreader``), and both fall back to plain WSGI
behaviour when ``wsgi.input`` is anything else (another server, a test client).
"""

from __future__ import annotations

import io
import typing as t

from gunicorn.http.body import Body
from gunicorn.http.body import LengthReader


def read_ahead(environ: dict[str, t.Any]) -> bytes:
    """What gunicorn already read from the client past the request's head, taken out of
    its parser's buffer (``Unreader.take_buffered``): for a WebSocket, bytes of a client
    that did not wait for the ``101`` (RFC 6455 says it must). ``b""`` under another
    server."""
    unreader = getattr(getattr(environ.get("wsgi.input"), "reader", None), "unreader", None)
    take = getattr(unreader, "take_buffered", None)
    return take() if callable(take) else b""


class DirectBody:
    """A request body with a ``Content-Length``, read from the client socket itself.

    gunicorn's ``wsgi.input`` re-buffers what it receives at every read (``BytesIO``
    writes, ``getvalue``, slices): about six copies of each byte, two thirds of the CPU
    of an upload (bench/, py-spy). This reader hands out what gunicorn has already read
    of the body, then one ``recv`` per read. It keeps gunicorn's own count of the body
    (``LengthReader.length``) in step, byte for byte, so that whatever the proxy does
    not read is still drained by gunicorn before the connection serves its next
    request, and bytes read ahead past the body go back to gunicorn's parser.
    """

    def __init__(self, body: Body, sock: t.Any) -> None:
        self._body = body
        self._reader: LengthReader = body.reader
        self._sock = sock
        # Already counted off the reader's length by gunicorn: the Body's own buffer.
        self._pending = body.buf.getvalue()
        body.buf = io.BytesIO()

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of the body (all that is left for a negative ``size``);
        ``b""`` at its end, or when the client closed the connection early."""
        if self._pending:
            data = self._pending if size < 0 else self._pending[:size]
            self._pending = self._pending[len(data) :]
            return data
        remaining = self._reader.length
        if remaining <= 0 or size == 0:
            return b""
        want = remaining if size < 0 else min(size, remaining)
        data = self._reader.unreader.take_buffered()
        if data:
            # Read ahead by gunicorn's parser: the body's next bytes, and perhaps the
            # start of the next request, which goes back.
            data, rest = data[:want], data[want:]
            if rest:
                self._reader.unreader.unread(rest)
        else:
            try:
                data = self._sock.recv(want)
            except BaseException:
                self._body.failed = True  # where the next request starts is unknown now
                raise
            if not data:
                self._body.failed = True
        self._reader.length = remaining - len(data)
        return data


def direct_body(environ: dict[str, t.Any]) -> DirectBody | None:
    """A :class:`DirectBody` for this request's ``wsgi.input``, or ``None`` when it is
    not gunicorn's body of a known length (chunked, another server)."""
    body = environ.get("wsgi.input")
    sock = environ.get("gunicorn.socket")
    if (
        sock is None
        or not isinstance(body, Body)
        or not isinstance(getattr(body, "reader", None), LengthReader)
        or not isinstance(getattr(body, "buf", None), io.BytesIO)
        or not callable(getattr(body.reader.unreader, "take_buffered", None))
    ):
        return None
    return DirectBody(body, sock)
