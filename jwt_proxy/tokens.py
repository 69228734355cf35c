"""Per-worker cache of STS web identity tokens, one entry per audience set.

Modelled on botocore's ``RefreshableCredentials``: an immutable snapshot read
without a lock, an advisory window in which one refresh runs off the request
path, and a mandatory window in which requests wait for a fetch. Both windows
derive from ``--token-refresh-skew`` and from each token's real lifetime, not
from botocore's fixed 15/10 minutes, which would put every short token in the
mandatory window. Deliberate differences from botocore:

* waiters share the outcome of the fetch they waited for (token *or* error)
  instead of calling STS again one after another;
* a failed fetch is remembered for ``failure_backoff_s``, so an STS outage costs
  one STS call per audience set per back-off period, not one per request;
* a token that is still valid for a while is served when a fetch fails
  (stale while valid), because an expiring token beats a ``502``;
* the store is bounded (least recently used sets dropped first, idle sets
  dropped) and a background refresher keeps every kept set fresh, so a worker
  with no traffic never lets its tokens run out.

This module is stdlib only: the STS call is injected as ``fetch`` (see
``jwt_proxy.sts.make_fetch``), the clock as ``clock``.
"""

from __future__ import annotations

import logging
import math
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
REFRESHER_THREAD_NAME = "jwt-proxy-token-refresher"

DEFAULT_MAX_SETS = 256
# A token with at least this long left is served when a fetch for its set fails: long
# enough for the upstream to receive and check it.
STALE_MIN_REMAINING_S = 10.0
# The refresher retries a failing set after failure_backoff_s, doubling up to this.
REFRESH_RETRY_MAX_S = 60.0
# The refresher wakes at least this often (a wall-clock jump moves every due time) and
# at most this often (a set whose refresh is running is looked at again later).
REFRESHER_MAX_SLEEP_S = 60.0
REFRESHER_MIN_SLEEP_S = 0.05


def normalize_audiences(values: t.Iterable[str]) -> AudienceSet:
    """Return ``values`` sorted and de-duplicated.

    The result is both the cache key and the ``Audience`` list sent to STS, so
    ``b,a,b`` and ``a,b`` share one cache entry and one STS call. A bare string
    is refused because iterating it would silently turn ``"https://x"`` into a
    set of single characters.

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

    ``advisory_s`` and ``mandatory_s`` are the windows of ``token``, fixed when it
    arrived from its real lifetime. ``failures`` counts fetches failed in a row,
    for the refresher's growing retry delay.
    """

    token: Token | None = None
    failure: TokenUnavailable | None = None
    failed_at: float = 0.0
    generation: int = 0
    advisory_s: float = 0.0
    mandatory_s: float = 0.0
    failures: int = 0


class _Slot:
    """One audience set: its current state, the lock held while fetching it, its last use."""

    __slots__ = ("last_used", "lock", "state")

    def __init__(self, now: float) -> None:
        # Held for the whole of one fetch, mandatory or background. A plain Lock
        # (not an RLock) because a background refresh is claimed by the request
        # thread and released by the refresh thread.
        self.lock = threading.Lock()
        self.state = _State()
        # Written without a lock by every get(): a float store is atomic, and the
        # readers (eviction, idle drop) only need a recent value.
        self.last_used = now


def _start_daemon_thread(target: t.Callable[[], None]) -> None:
    """Run ``target`` in a daemon thread so a refresh never holds up shutdown."""
    threading.Thread(target=target, name=REFRESH_THREAD_NAME, daemon=True).start()


class TokenStore:
    """Cache of :class:`Token` per :data:`AudienceSet`, refreshed ahead of expiry.

    Each token gets an advisory window, ``min(refresh_skew_s, lifetime / 2)`` before
    its expiry, and a mandatory window half as long (``lifetime``: its real one, so a
    short token is still served from memory for half its life). Before the advisory
    window :meth:`get` returns the cached token without a lock; inside it, at once,
    while one refresh runs in the background; inside the mandatory window (or with no
    token) it waits for a fetch that concurrent waiters share. When that fetch fails, a
    token with :data:`STALE_MIN_REMAINING_S` left is still returned. The wait is bounded
    because every ``fetch`` is (the STS client's timeouts), and a fetch runs to its end
    even if the client that started it has gone, so the others still get its outcome.

    At most ``max_sets`` sets are kept (least recently used dropped first); a set unused
    for ``idle_drop_s`` is dropped, not refreshed; sets in ``keep`` never are. A
    refresher thread (:meth:`start_refresher`, or the first token) refreshes every kept
    set as its advisory window opens, with no traffic needed; :meth:`refresh_due` is
    one pass of it.

    :param fetch: calls STS for a normalized audience set; raises
        :class:`TokenUnavailable` on failure. Called from request threads and
        from background threads, for several sets at once.
    :param refresh_skew_s: ``--token-refresh-skew``; the longest the advisory
        window can be.
    :param clock: epoch seconds; wall-clock because ``Expiration`` is absolute.
    :param failure_backoff_s: how long a failed fetch is remembered.
    :param spawn: runs a background refresh; defaults to a daemon thread.
    :param on_lookup: told of every :meth:`get` as ``on_lookup(audiences, hit)``:
        ``hit`` is true when a cached token was served without waiting, false when the
        call waited for a fetch or met a remembered failure. Called on the request
        thread, so it must be cheap and must not raise (the metrics' cache counters).
    :param max_sets: ``--token-cache-size``, the most sets kept.
    :param idle_drop_s: ``--token-duration``; ``None`` never drops idle sets.
    :param keep: sets never dropped.
    :param on_drop: told of every dropped set; must be cheap and must not raise.
    :param background_refresh: start the refresher with the first token.
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
        max_sets: int = DEFAULT_MAX_SETS,
        idle_drop_s: float | None = None,
        keep: t.Iterable[AudienceSet] = (),
        on_drop: t.Callable[[AudienceSet], None] | None = None,
        background_refresh: bool = True,
    ) -> None:
        if not refresh_skew_s > 0:
            raise ValueError(f"refresh_skew_s must be > 0, got {refresh_skew_s!r}")
        if not failure_backoff_s >= 0:
            raise ValueError(f"failure_backoff_s must be >= 0, got {failure_backoff_s!r}")
        if not max_sets >= 1:
            raise ValueError(f"max_sets must be >= 1, got {max_sets!r}")
        if idle_drop_s is not None and not idle_drop_s > 0:
            raise ValueError(f"idle_drop_s must be > 0, got {idle_drop_s!r}")
        self._fetch = fetch
        self._clock = clock
        self._spawn = spawn
        self._on_lookup = on_lookup
        self._on_drop = on_drop
        self._skew_s = float(refresh_skew_s)
        self._failure_backoff_s = float(failure_backoff_s)
        self._max_sets = max_sets
        self._idle_drop_s = idle_drop_s
        self._keep = frozenset(normalize_audiences(audiences) for audiences in keep)
        self._background_refresh = background_refresh
        self._slots: dict[AudienceSet, _Slot] = {}
        # Guards insertion and removal; lookups are plain dict reads.
        self._slots_lock = threading.Lock()
        self._refresher: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._short_lifetime_logged = False

    def get(self, audiences: AudienceSet) -> Token:
        """Return a usable token for ``audiences``, fetching only when needed.

        ``audiences`` is normalized again (cheap for a handful of values) so a
        caller that forgot cannot split one set into two cache entries.

        :raises TokenUnavailable: the fetch this call waited for failed, or a
            fetch failed less than ``failure_backoff_s`` ago, and no cached token
            has :data:`STALE_MIN_REMAINING_S` left; or STS returned an expired
            token.
        """
        key = normalize_audiences(audiences)
        # Read the state before the clock: a waiter must know which generation
        # it saw before deciding to wait (see _State).
        slot = self._slots.get(key) or self._insert(key)
        state = slot.state
        now = self._clock()
        slot.last_used = now
        token = state.token
        if token is not None:
            remaining = token.expires_at - now
            if remaining > state.advisory_s:
                if self._on_lookup is not None:
                    self._on_lookup(key, True)
                return token
            if remaining > state.mandatory_s:
                self._refresh_in_background(key, slot, state, now)
                if self._on_lookup is not None:
                    self._on_lookup(key, True)
                return token
        if self._on_lookup is not None:
            self._on_lookup(key, False)
        try:
            if state.failure is not None and now - state.failed_at < self._failure_backoff_s:
                raise state.failure.copy()
            return self._wait_for_fetch(key, slot, state.generation)
        except TokenUnavailable:
            stale = slot.state.token
            if stale is not None and stale.expires_at - self._clock() >= STALE_MIN_REMAINING_S:
                return stale
            raise

    def cached_count(self) -> int:
        """How many audience sets hold a token that has not expired yet.

        Feeds the ``token_cached_audiences`` gauge; a set whose token ran out
        (failing) no longer counts, because it can serve nothing.
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
        failure memory, since it is an explicit request to try. It counts as a
        use of the set.

        :raises TokenUnavailable: the fetch failed; the failure is remembered
            like any other.
        """
        key = normalize_audiences(audiences)
        slot = self._slots.get(key) or self._insert(key)
        slot.last_used = self._clock()
        self._wait_for_fetch(key, slot, slot.state.generation)

    # -- the refresher ---------------------------------------------------------------

    def start_refresher(self) -> None:
        """Start the refresher thread if it is not running (idempotent, thread-safe)."""
        with self._slots_lock:
            if self._refresher is not None:
                return
            self._stopping.clear()
            thread = threading.Thread(target=self._run_refresher, name=REFRESHER_THREAD_NAME, daemon=True)
            self._refresher = thread
        thread.start()

    def stop_refresher(self, timeout_s: float | None = None) -> None:
        """Stop the refresher thread and wait up to ``timeout_s`` for it to end.

        A refresh it already started runs to its end in its own thread. A later
        token does not restart it; :meth:`start_refresher` does.
        """
        with self._slots_lock:
            thread, self._refresher = self._refresher, None
            self._background_refresh = False
            self._stopping.set()
            self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def refresh_due(self) -> float | None:
        """One pass of the refresher: drop idle sets, refresh the ones in their window.

        A set whose token has entered its advisory window (or whose last refresh
        failed and whose retry delay has passed) gets one background refresh.
        Sets with no token at all are left to requests: their first fetch failed,
        and only a request proves someone still wants them.

        :returns: when the next pass is due (epoch seconds), or ``None`` when
            nothing is held.
        """
        now = self._clock()
        next_due = math.inf
        for key, slot in list(self._slots.items()):
            if self._idle_drop_s is not None and key not in self._keep:
                idle_until = slot.last_used + self._idle_drop_s
                if idle_until <= now:
                    self._drop(key, slot)
                    continue
                next_due = min(next_due, idle_until)
            state = slot.state
            if state.token is None:
                continue
            due = state.token.expires_at - state.advisory_s
            if state.failure is not None:
                due = max(due, state.failed_at + self._retry_delay_s(state.failures))
            if due <= now:
                self._refresh_in_background(key, slot, state, now, ignore_backoff=True)
                # Looked at again after a back-off: by then the refresh has
                # published (which wakes the refresher) or is still running.
                due = now + max(self._failure_backoff_s, REFRESHER_MIN_SLEEP_S)
            next_due = min(next_due, due)
        return None if next_due == math.inf else next_due

    def _retry_delay_s(self, failures: int) -> float:
        return min(self._failure_backoff_s * 2 ** max(failures - 1, 0), REFRESH_RETRY_MAX_S)

    def _run_refresher(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                next_due = self.refresh_due()
            except Exception:  # a bug here must not end refreshing for good
                log.exception("token refresher pass failed")
                next_due = None
            if next_due is None:
                wait_s = REFRESHER_MAX_SLEEP_S
            else:
                wait_s = min(max(next_due - self._clock(), REFRESHER_MIN_SLEEP_S), REFRESHER_MAX_SLEEP_S)
            self._wake.wait(wait_s)

    # -- internals -------------------------------------------------------------------

    def _insert(self, key: AudienceSet) -> _Slot:
        """Add ``key``'s slot, dropping the least recently used sets past ``max_sets``."""
        dropped: list[AudienceSet] = []
        with self._slots_lock:
            slot = self._slots.get(key)
            if slot is not None:
                return slot
            slot = self._slots[key] = _Slot(self._clock())
            while len(self._slots) > self._max_sets:
                victim = min(
                    (k for k in self._slots if k != key and k not in self._keep),
                    key=lambda k: self._slots[k].last_used,
                    default=None,
                )
                if victim is None:
                    break
                del self._slots[victim]
                dropped.append(victim)
        if self._on_drop is not None:
            for victim in dropped:
                self._on_drop(victim)
        return slot

    def _drop(self, key: AudienceSet, slot: _Slot) -> None:
        with self._slots_lock:
            if self._slots.get(key) is not slot:
                return
            del self._slots[key]
        if self._on_drop is not None:
            self._on_drop(key)

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
        self, key: AudienceSet, slot: _Slot, state: _State, now: float, *, ignore_backoff: bool = False
    ) -> None:
        """Start one background refresh for ``key`` unless one is running or backing off."""
        if not ignore_backoff and state.failure is not None and now - state.failed_at < self._failure_backoff_s:
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
                    "background token refresh failed, serving the cached token while it is valid: %s",
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
        started = self._clock()
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
            # Keep the old token: while valid it is still worth serving.
            slot.state = _State(
                old.token, failure, now, old.generation + 1, old.advisory_s, old.mandatory_s, old.failures + 1
            )
            # The fetching thread raises the original (its traceback shows the
            # fetch); everyone else gets a copy.
            raise failure
        assert token is not None
        advisory_s = min(self._skew_s, (token.expires_at - started) / 2)
        if advisory_s < self._skew_s:
            self._say_token_is_short(key, token.expires_at - started)
        slot.state = _State(token, None, 0.0, old.generation + 1, advisory_s, advisory_s / 2, 0)
        if self._slots.get(key) is not slot and self._on_drop is not None:
            self._on_drop(key)  # dropped while fetching: whatever recorded this token must forget it
        if self._background_refresh and self._refresher is None:
            self.start_refresher()
        self._wake.set()
        return token

    def _say_token_is_short(self, key: AudienceSet, lifetime_s: float) -> None:
        """Warn once per store that tokens live shorter than the refresh skew."""
        if self._short_lifetime_logged:
            return
        self._short_lifetime_logged = True
        log.warning(
            "STS issued a token living %.0f s, less than twice --token-refresh-skew (%.0f s): "
            "it is refreshed when half its life is left",
            lifetime_s,
            self._skew_s,
            extra={"audience": ",".join(key), "lifetime_s": round(lifetime_s), "refresh_skew_s": self._skew_s},
        )
