"""The client side of a request under gunicorn: bytes its parser has read ahead, and a
faster reader for request bodies with a ``Content-Length``.

Both reach into gunicorn's request body object (``wsgi.input``: ``Body``, its
``LengthReader`` and the parser's ``Unreader``), and both fall back to plain WSGI
behaviour when ``wsgi.input`` is anything else (another server, a test client).
"""

from __future__ import annotations

import io
import typing as t

from gunicorn.http import errors
from gunicorn.http.body import Body
from gunicorn.http.body import ChunkedReader
from gunicorn.http.body import LengthReader

from .headers import MAX_BODY_LENGTH

#: gunicorn's errors for a chunked body that breaks its framing.
CHUNK_ERRORS = (errors.InvalidChunkSize, errors.ChunkMissingTerminator, errors.InvalidChunkExtension)


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
    writes, ``getvalue``, slices): about six copies of each byte, most of an upload's
    CPU. This reader hands out what gunicorn has already read
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


def oversized_chunk_ahead(environ: dict[str, t.Any]) -> bool:
    """Whether a chunk-size line among the bytes gunicorn has already read past the head
    announces more than :data:`MAX_BODY_LENGTH` bytes.

    A client sends its first chunk with its head: looking at those bytes (never waiting
    for more) lets such a body be refused before the upstream is dialled. Sizes further
    on are checked as the body streams (:func:`limit_chunk_sizes`).
    """
    # The chunked reader keeps no reference to the parser's unreader; its request does.
    request = getattr(getattr(environ.get("wsgi.input"), "reader", None), "req", None)
    buffered = getattr(getattr(request, "unreader", None), "buf", None)
    if not isinstance(buffered, io.BytesIO):
        return False
    data = buffered.getvalue()
    position = 0
    while position < len(data):
        end = data.find(b"\r\n", position)
        digits = data[position : len(data) if end < 0 else end].split(b";", 1)[0].strip(b" \t")
        try:
            size = int(digits, 16) if digits else 0
        except ValueError:
            return False  # not a size: gunicorn refuses it when the body is read
        if size > MAX_BODY_LENGTH:
            return True
        if end < 0 or size == 0:
            return False
        position = end + 2 + size + 2
    return False


def limit_chunk_sizes(environ: dict[str, t.Any]) -> None:
    """Make gunicorn's chunked reader of this request refuse a chunk size above
    :data:`MAX_BODY_LENGTH` (it takes any number of hex digits): the body read then
    fails with ``InvalidChunkSize``. gunicorn has no setting for this; its reader calls
    ``parse_chunk_size`` through the instance, so the check is wrapped around it there."""
    reader = getattr(environ.get("wsgi.input"), "reader", None)
    parse = getattr(reader, "parse_chunk_size", None)
    if not isinstance(reader, ChunkedReader) or parse is None:
        return

    def parse_checked(unreader: t.Any, data: bytes | None = None) -> tuple[int, bytes | None]:
        size, rest = parse(unreader, data=data)
        if size > MAX_BODY_LENGTH:
            raise errors.InvalidChunkSize(b"chunk size above 2**63-1")
        return size, rest

    reader.parse_chunk_size = parse_checked


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
