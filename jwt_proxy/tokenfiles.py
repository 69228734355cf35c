"""Token files: a fresh JWT kept in a file, for SDKs that read their OIDC token themselves.

Google Cloud's ``credential_source.file``, Azure's ``AZURE_FEDERATED_TOKEN_FILE`` and AWS's
``AWS_WEB_IDENTITY_TOKEN_FILE`` re-read a file whenever they need a token. Such a reader
may look at any moment, so a file is only ever replaced whole: the token goes to a
temporary file in the same directory, which is then renamed over the old one (a rename
within one file system is atomic). A reader sees the old complete token or the new one,
never a partial or empty file.

One :class:`TokenFileKeeper` per audience serves all the files of that audience from the
shared token store, so each refresh costs one STS call however many files name it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
import time
import typing as t

from .tokens import Token
from .tokens import TokenStore
from .tokens import TokenUnavailable

__all__ = ["COMPACT_JWT", "TokenFileKeeper", "refresh_point", "write_token_file"]

log = logging.getLogger("jwt_proxy.tokenfiles")

# A compact JWS: three non-empty base64url parts. Anything else is never written.
COMPACT_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# After a failed refresh the old file stays (it is still valid); retries back off to this.
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0
# The files are refreshed this long before the token store's own refresh window opens:
# the keeper's fetch is then the refresh. Inside the window, the store's lookup would
# start a background refresh of its own, and the keeper's fetch would be a second call.
REFRESH_LEAD_S = 1.0


def write_token_file(path: str, value: str, mode: int) -> None:
    """Replace ``path`` with ``value`` (no trailing newline) in one rename, with ``mode``.

    The mode is set on the temporary file with ``fchmod`` before the rename, so it is
    exactly ``mode`` whatever the umask, and the file is never visible with another one.

    :raises ValueError: ``value`` is not a compact JWT (nothing is written).
    :raises OSError: the directory is gone or not writable; the old file is left as it was.
    """
    if not COMPACT_JWT.fullmatch(value):
        # Never the value itself in the message: it may be most of a token.
        raise ValueError(f"refusing to write {len(value)} characters that are not a compact JWT")
    directory, name = os.path.split(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(value.encode("ascii"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def refresh_point(token: Token, obtained_at: float, refresh_skew_s: float) -> float:
    """When a file holding ``token`` is rewritten: just before it enters the refresh window.

    The window is ``refresh_skew_s`` before expiry, or half the token's lifetime when the
    token is shorter than twice that (local-sts's short tokens, a fitted duration), so a
    reader is left at least half the window, and a short token is not refetched at once.
    """
    lifetime_s = token.expires_at - obtained_at
    window_s = min(refresh_skew_s, lifetime_s / 2)
    return max(obtained_at, token.expires_at - window_s - min(REFRESH_LEAD_S, window_s / 2))


class TokenFileKeeper:
    """Keeps every file of one audience holding a token that is not in its refresh window.

    :meth:`run` loops until ``stop`` is set: take the store's token (the first time) or
    force a fetch (after that), write each file, sleep until just before the token
    enters its refresh window. A failure (STS, or a write) leaves the files as they are
    and is retried with backoff.

    :param tokens: the process's token store; the files' audience is one set in it.
    :param on_written: called once, after the first time every file was written.
    :param clock: epoch seconds (``Token.expires_at`` is absolute).
    """

    def __init__(
        self,
        tokens: TokenStore,
        audience: str,
        paths: t.Sequence[str],
        *,
        mode: int,
        refresh_skew_s: float,
        on_written: t.Callable[[], None] | None = None,
        clock: t.Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self.paths = tuple(paths)
        self._tokens = tokens
        self._key = (audience,)
        self._mode = mode
        self._refresh_skew_s = refresh_skew_s
        self._on_written = on_written
        self._clock = clock
        self._written: Token | None = None

    def run(self, stop: threading.Event) -> None:
        retry_s = FIRST_RETRY_S
        while not stop.is_set():
            try:
                token = self._next_token()
                obtained_at = self._clock()
                for path in self.paths:
                    write_token_file(path, token.value, self._mode)
            except (TokenUnavailable, OSError, ValueError) as exc:
                self._log_failure(exc, retry_s)
                stop.wait(retry_s)
                retry_s = min(retry_s * 2, MAX_RETRY_S)
                continue
            retry_s = FIRST_RETRY_S
            first = self._written is None
            self._written = token
            log.info(
                "token file written",
                extra={"audience": self.audience, "paths": list(self.paths), "expires_in_s": int(token.expires_at - obtained_at)},
            )
            if first and self._on_written is not None:
                self._on_written()
            stop.wait(max(0.0, refresh_point(token, obtained_at, self._refresh_skew_s) - self._clock()))

    def _next_token(self) -> Token:
        """The first time, the store's token; after that, a freshly fetched one.

        The keeper wakes just before the store's refresh window, so nothing else has
        refreshed the set yet and the forced fetch is the refresh (a fetch already
        running for the set is shared, not repeated).
        """
        if self._written is not None:
            self._tokens.prewarm(self._key)
        return self._tokens.get(self._key)

    def _log_failure(self, exc: Exception, retry_s: float) -> None:
        fields: dict[str, t.Any] = {"audience": self.audience, "paths": list(self.paths), "retry_in_s": retry_s}
        if isinstance(exc, TokenUnavailable):
            fields.update(error_class=exc.error_class, error=exc.detail, hint=exc.hint)
        elif isinstance(exc, OSError):
            fields.update(error_class="write", error=f"{exc.filename or ''}: {exc.strerror or exc}")
        else:
            fields.update(error_class="InvalidToken", error=str(exc))
        log.error("could not refresh the token files; the files keep their last token", extra=fields)
