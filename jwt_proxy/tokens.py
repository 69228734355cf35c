"""Per-worker cache of STS web identity tokens, one entry per audience set.

Modelled on botocore's ``RefreshableCredentials`` (STYLE.md 1.2): an immutable
snapshot read without a lock, an advisory window in which one refresh runs off
the request path, and a mandatory window in which requests wait for a fetch.
Both windows derive from ``--token-refresh-skew`` (SPEC.md section 4), not from
botocore's fixed 15/10 minutes, which would put every short token in the
mandatory window. Two deliberate differences from botocore:

* waiters share the outcome of the fetch they waited for (token *or* error)
  instead of calling STS again one after another, and
* a failed fetch is remembered for ``failure_backoff_s``, so an STS outage costs
  one STS call per audience set per back-off period, not one per request.

This module is stdlib only: the STS call is injected as ``fetch`` (see
``jwt_proxy.sts.make_fetch``), the clock as ``clock``.
"""

from __future__ import annotations

import logging
import threading
import time
import typing as t
from dataclasses import dataclass
from dataclasses import field

from .logs import exception_fields

__all__ = [
    "AudienceSet",
    "Token",
    "TokenStore",
    "TokenUnavailable",
    "normalize_audiences",
]

log = logging.getLogger("jwt_proxy.tokens")

AudienceSet = tuple[str, ...]
"""Audiences as the cache key and the STS ``Audience`` list: sorted, de-duplicated."""

DEFAULT_FAILURE_BACKOFF_S = 1.0
EXPIRED_ERROR_CLASS = "expired"
INTERNAL_ERROR_CLASS = "internal"
EXPIRED_HINT = (
    "STS returned a token that had already expired by this host's clock: "
    "check time synchronisation (chrony/NTP) on this host"
)
INTERNAL_HINT = "the token fetch failed unexpectedly: report the error type and raised_at of the logged record"
REFRESH_THREAD_NAME = "jwt-proxy-token-refresh"


def normalize_audiences(values: t.Iterable[str]) -> AudienceSet:
    """Return ``values`` sorted and de-duplicated.

    The result is both the cache key and the ``Audience`` list sent to STS, so
    ``b,a,b`` and ``a,b`` share one cache entry and one STS call (SPEC.md
    section 4). A bare string is refused because iterating it would silently
    turn ``"https://x"`` into a set of single characters.

    :raises TypeError: ``values`` is a ``str``.
    :raises ValueError: no audience, or an empty one (STS needs 1 to 10
        non-empty values; the config layer enforces the rest).
    """
    if isinstance(values, str):
        raise TypeError("audiences must be an iterable of strings, not a single str")
    result = tuple(sorted(set(values)))
    if not result or "" in result:
        raise ValueError("an audience set needs at least one non-empty audience")
    return result


@dataclass(frozen=True, slots=True)
class Token:
    """One JWT and when it stops being valid.

    Frozen so that a reader holding it never sees a half-updated pair; the store
    swaps whole ``Token`` objects. ``value`` is kept out of ``repr`` (and so out
    of ``str``, tracebacks, ``pytest`` output and log records) because anyone who
    reads it can act as this machine's AWS identity at the audience.

    :param value: the compact JWT, sent upstream as ``Authorization: Bearer``.
    :param expires_at: STS ``Expiration`` as epoch seconds (UTC).
    """

    value: str = field(repr=False)
    expires_at: float


class TokenUnavailable(RuntimeError):
    """No token could be had for an audience set; the proxy answers ``502``.

    Raised by fetch functions (``jwt_proxy.sts``) and by :class:`TokenStore`.
    ``str()`` is meant for the error log record and carries only the audience
    set, the error class and the detail; the caller logs :attr:`hint` next to
    it. None of them ever holds a token.

    :param audiences: the audience set that was asked for.
    :param error_class: the AWS error code (``AccessDenied``, ...),
        ``"transport"`` when STS could not be reached in time, ``"expired"``
        when STS handed out a token already expired by our clock, or
        ``"internal"`` when the fetch function itself failed unexpectedly. It is
        also the ``error_class`` label of ``token_fetch_count_total``.
    :param detail: the AWS message or the exception text, for the error log.
    :param hint: one line telling the operator what to do, or ``""``.
    """

    def __init__(
        self,
        audiences: AudienceSet,
        error_class: str,
        detail: str = "",
        hint: str = "",
    ) -> None:
        # Passing every field to RuntimeError keeps the exception picklable.
        super().__init__(audiences, error_class, detail, hint)
        self.audiences = tuple(audiences)
        self.error_class = error_class
        self.detail = detail
        self.hint = hint

    def __str__(self) -> str:
        text = f"token unavailable for audience {','.join(self.audiences)}: {self.error_class}"
        return f"{text}: {self.detail}" if self.detail else text

    def __repr__(self) -> str:
        return (
            f"TokenUnavailable(audiences={self.audiences!r}, "
            f"error_class={self.error_class!r}, detail={self.detail!r})"
        )

    def copy(self) -> TokenUnavailable:
        """A fresh exception with the same fields.

        A remembered or shared failure is re-raised as a copy because raising
        one instance from many threads would keep growing (and interleave) its
        ``__traceback__``.
        """
        return TokenUnavailable(self.audiences, self.error_class, self.detail, self.hint)


@dataclass(frozen=True, slots=True)
class _State:
    """Everything a reader of one audience set needs, swapped as one object.

    ``generation`` counts finished fetches. A waiter remembers the generation it
    saw before waiting; if it has moved on by the time the waiter holds the
    lock, the waiter takes that fetch's outcome (the token, or ``failure`` if
    the fetch failed) instead of calling STS again.
    """

    token: Token | None = None
    failure: TokenUnavailable | None = None
    failed_at: float = 0.0
    generation: int = 0


class _Slot:
    """One audience set: its current state and the lock held while fetching it."""

    __slots__ = ("lock", "state")

    def __init__(self) -> None:
        # Held for the whole of one fetch, mandatory or background. A plain Lock
        # (not an RLock) because a background refresh is claimed by the request
        # thread and released by the refresh thread.
        self.lock = threading.Lock()
        self.state = _State()


def _start_daemon_thread(target: t.Callable[[], None]) -> None:
    """Run ``target`` in a daemon thread so a refresh never holds up shutdown."""
    threading.Thread(target=target, name=REFRESH_THREAD_NAME, daemon=True).start()


class TokenStore:
    """Cache of :class:`Token` per :data:`AudienceSet`, refreshed ahead of expiry.

    With ``remaining = token.expires_at - clock()``:

    * ``remaining > refresh_skew_s``: the cached token, with no lock taken.
    * ``refresh_skew_s >= remaining > refresh_skew_s / 2`` (advisory): the cached
      token at once; the first such request claims the set's lock without
      blocking and hands one refresh to ``spawn``. If it fails, the old token
      keeps being served and a request after ``failure_backoff_s`` starts
      another.
    * ``remaining <= refresh_skew_s / 2`` or no token (mandatory): wait for a
      fetch. Concurrent waiters on one set share one fetch and all get its
      token or its error; different sets have different locks and fetch
      concurrently.

    A fetched token already within ``refresh_skew_s / 2`` of expiry is still
    handed to its waiters (it is the best there is) and simply leaves the set in
    the mandatory window, so the next request fetches again. A fetched token
    already expired is refused with ``error_class="expired"``. After any failed
    fetch the same :class:`TokenUnavailable` is raised for ``failure_backoff_s``
    without calling ``fetch``; failures are never cached as tokens.

    Who fetches: in the mandatory window the first waiter calls ``fetch`` itself
    while holding the set's lock. That is enough for "the others still get the
    token if the first client disconnects" (SPEC.md section 4): a WSGI worker
    thread is not interrupted when its client goes away, gthread only notices
    when it next writes to the socket, so the fetch always runs to the end and
    publishes its outcome to everyone waiting.

    Waiters block on the lock without a timeout. The wait is bounded because
    every fetch is: the STS client has connect/read timeouts and a bounded
    number of attempts (``jwt_proxy.sts.make_sts_client``), adding up to about
    ``--upstream-timeout``. A ``fetch`` without such bounds would make waiters
    wait as long as it does.

    :param fetch: calls STS for a normalized audience set; raises
        :class:`TokenUnavailable` on failure. Called from request threads and
        from ``spawn``'s threads, for several sets at once.
    :param refresh_skew_s: ``--token-refresh-skew``; the advisory window starts
        this long before expiry, the mandatory window half as long.
    :param clock: epoch seconds; wall-clock because ``Expiration`` is absolute.
    :param failure_backoff_s: how long a failed fetch is remembered.
    :param spawn: runs a background refresh; defaults to a daemon thread.
    :param on_lookup: told of every :meth:`get` as ``on_lookup(audiences, hit)``:
        ``hit`` is true when a cached token was served without waiting, false when the
        call waited for a fetch or met a remembered failure. Called on the request
        thread, so it must be cheap and must not raise (the metrics' cache counters).
    """

    def __init__(
        self,
        fetch: t.Callable[[AudienceSet], Token],
        *,
        refresh_skew_s: float,
        clock: t.Callable[[], float] = time.time,
        failure_backoff_s: float = DEFAULT_FAILURE_BACKOFF_S,
        spawn: t.Callable[[t.Callable[[], None]], None] = _start_daemon_thread,
        on_lookup: t.Callable[[AudienceSet, bool], None] | None = None,
    ) -> None:
        if not refresh_skew_s > 0:
            raise ValueError(f"refresh_skew_s must be > 0, got {refresh_skew_s!r}")
        if not failure_backoff_s >= 0:
            raise ValueError(f"failure_backoff_s must be >= 0, got {failure_backoff_s!r}")
        self._fetch = fetch
        self._clock = clock
        self._spawn = spawn
        self._on_lookup = on_lookup
        # Refresh while more than this is left, but never block a request.
        self._advisory_s = float(refresh_skew_s)
        # At or below this much left, requests wait for a fresh token.
        self._mandatory_s = float(refresh_skew_s) / 2
        self._failure_backoff_s = float(failure_backoff_s)
        self._slots: dict[AudienceSet, _Slot] = {}
        # Guards insertion only; lookups are plain dict reads.
        self._slots_lock = threading.Lock()

    def get(self, audiences: AudienceSet) -> Token:
        """Return a usable token for ``audiences``, fetching only when needed.

        ``audiences`` is normalized again (cheap for a handful of values) so a
        caller that forgot cannot split one set into two cache entries.

        :raises TokenUnavailable: the fetch this call waited for failed, a fetch
            failed less than ``failure_backoff_s`` ago, or STS returned an
            expired token.
        """
        key = normalize_audiences(audiences)
        slot = self._slots.get(key) or self._insert(key)
        # Read the state before the clock: a waiter must know which generation
        # it saw before deciding to wait (see _State).
        state = slot.state
        now = self._clock()
        token = state.token
        if token is not None:
            remaining = token.expires_at - now
            if remaining > self._advisory_s:
                if self._on_lookup is not None:
                    self._on_lookup(key, True)
                return token
            if remaining > self._mandatory_s:
                self._refresh_in_background(key, slot, state, now)
                if self._on_lookup is not None:
                    self._on_lookup(key, True)
                return token
        if self._on_lookup is not None:
            self._on_lookup(key, False)
        if state.failure is not None and now - state.failed_at < self._failure_backoff_s:
            raise state.failure.copy()
        return self._wait_for_fetch(key, slot, state.generation)

    def cached_count(self) -> int:
        """How many audience sets hold a token that has not expired yet.

        Feeds the ``token_cached_audiences`` gauge; a set whose token ran out
        (idle, or failing) no longer counts, because it can serve nothing.
        """
        now = self._clock()
        return sum(
            1
            for slot in list(self._slots.values())
            if slot.state.token is not None and slot.state.token.expires_at > now
        )

    def prewarm(self, audiences: AudienceSet) -> None:
        """Fetch a token for ``audiences`` now, whatever is cached.

        Meant for worker start, so the first request finds a token and
        ``/readyz`` can tell that minting works. It blocks for as long as the
        fetch takes (bounded by the STS client's timeouts) and ignores the
        failure memory, since it is an explicit request to try.

        :raises TokenUnavailable: the fetch failed; the failure is remembered
            like any other.
        """
        key = normalize_audiences(audiences)
        slot = self._slots.get(key) or self._insert(key)
        self._wait_for_fetch(key, slot, slot.state.generation)

    def _insert(self, key: AudienceSet) -> _Slot:
        with self._slots_lock:
            return self._slots.setdefault(key, _Slot())

    def _wait_for_fetch(self, key: AudienceSet, slot: _Slot, seen_generation: int) -> Token:
        """Fetch under the set's lock, or share the fetch that finished while we waited."""
        with slot.lock:
            state = slot.state
            if state.generation != seen_generation:
                if state.failure is not None:
                    raise state.failure.copy()
                assert state.token is not None  # a finished fetch left a token or a failure
                return state.token
            return self._fetch_locked(key, slot)

    def _refresh_in_background(
        self, key: AudienceSet, slot: _Slot, state: _State, now: float
    ) -> None:
        """Start one background refresh for ``key`` unless one is running or backing off."""
        if state.failure is not None and now - state.failed_at < self._failure_backoff_s:
            return
        if not slot.lock.acquire(blocking=False):
            return  # a fetch for this set is already running
        if slot.state.generation != state.generation:
            slot.lock.release()  # a fetch finished since we looked: nothing to do
            return

        def refresh() -> None:
            try:
                self._fetch_locked(key, slot)
            except TokenUnavailable as exc:
                log.warning(
                    "background token refresh failed, serving the cached token until it "
                    "nears expiry: %s",
                    exc,
                    extra={"audience": ",".join(key), "error_class": exc.error_class},
                )
            finally:
                slot.lock.release()

        try:
            self._spawn(refresh)
        except Exception:
            # Can't start a thread (e.g. at the process's thread limit): the
            # cached token is still good, and the mandatory window will fetch.
            slot.lock.release()
            log.warning("could not start a background token refresh", exc_info=True)

    def _fetch_locked(self, key: AudienceSet, slot: _Slot) -> Token:
        """Call ``fetch`` and publish its outcome; the caller holds ``slot.lock``."""
        old = slot.state
        failure: TokenUnavailable | None = None
        token: Token | None = None
        try:
            token = self._fetch(key)
        except TokenUnavailable as exc:
            failure = exc
        except Exception as exc:  # a bug in fetch must still reach every waiter
            # Not exc_info: the message of an unexpected error (a botocore parser error
            # quotes the raw response) could hold a token. Its type and origin suffice.
            log.error(
                "token fetch raised unexpectedly",
                extra=exception_fields(exc),
            )
            failure = TokenUnavailable(key, INTERNAL_ERROR_CLASS, type(exc).__name__, INTERNAL_HINT)
            failure.__cause__ = exc
        now = self._clock()
        if token is not None and token.expires_at <= now:
            failure = TokenUnavailable(
                key,
                EXPIRED_ERROR_CLASS,
                f"the token STS returned expired {now - token.expires_at:.0f} s ago",
                EXPIRED_HINT,
            )
        if failure is not None:
            # Keep the old token: in the advisory window it is still worth serving.
            slot.state = _State(old.token, failure, now, old.generation + 1)
            # The fetching thread raises the original (its traceback shows the
            # fetch); everyone else gets a copy.
            raise failure
        assert token is not None
        slot.state = _State(token, None, 0.0, old.generation + 1)
        return token
