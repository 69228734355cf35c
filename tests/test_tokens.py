"""TokenStore windows, sharing, failure memory and the botocore-style race.

No sleeps: time is a fake clock the test moves, STS is a counting fake fetch,
background refreshes are recorded and run when the test says. Threads only
appear where concurrency is the point, always with bounded waits.
"""

from __future__ import annotations

import logging
import threading
import typing as t

import pytest

from jwt_proxy.logs import JsonFormatter
from jwt_proxy.logs import LogfmtFormatter
from jwt_proxy.tokens import STALE_MIN_REMAINING_S
from jwt_proxy.tokens import AudienceSet
from jwt_proxy.tokens import Token
from jwt_proxy.tokens import TokenStore
from jwt_proxy.tokens import TokenUnavailable
from jwt_proxy.tokens import normalize_audiences

START_S = 1_700_000_000.0
DURATION_S = 3600.0
SKEW_S = 300.0
BACKOFF_S = 1.0
JOIN_TIMEOUT_S = 10.0
AUD: AudienceSet = ("https://api.example.com",)
OTHER_AUD: AudienceSet = ("https://other.example.com",)
SECRET_PREFIX = "eyJsecret"


class FakeClock:
    """Epoch seconds that only move when the test says; counts who looked."""

    def __init__(self, now: float = START_S) -> None:
        self.now = now
        self.calls = 0
        self._cond = threading.Condition()

    def __call__(self) -> float:
        with self._cond:
            self.calls += 1
            self._cond.notify_all()
            return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wait_for_calls(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.calls >= count, timeout=JOIN_TIMEOUT_S)


class FakeFetch:
    """Counts calls; returns tokens valid for ``duration_s`` from the fake now, or raises."""

    def __init__(self, clock: FakeClock, duration_s: float = DURATION_S) -> None:
        self.clock = clock
        self.duration_s = duration_s
        self.calls: list[AudienceSet] = []
        self.error: BaseException | None = None
        self.gate: threading.Event | None = None  # when set, fetch waits for it
        self.started = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, audiences: AudienceSet) -> Token:
        with self._lock:
            self.calls.append(audiences)
            n = len(self.calls)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(JOIN_TIMEOUT_S)
        if self.error is not None:
            raise self.error
        # Reads .now directly so only the store's own clock reads are counted.
        return Token(f"{SECRET_PREFIX}-{n}", self.clock.now + self.duration_s)


class RecordingSpawn:
    """Stands in for starting a thread: keeps the callable until run_all()."""

    def __init__(self) -> None:
        self.pending: list[t.Callable[[], None]] = []

    def __call__(self, target: t.Callable[[], None]) -> None:
        self.pending.append(target)

    def run_all(self) -> None:
        while self.pending:
            self.pending.pop(0)()


def unavailable(error_class: str = "Throttling", detail: str = "Rate exceeded") -> TokenUnavailable:
    return TokenUnavailable(AUD, error_class, detail, "slow down")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fetch(clock: FakeClock) -> FakeFetch:
    return FakeFetch(clock)


@pytest.fixture
def spawn() -> RecordingSpawn:
    return RecordingSpawn()


@pytest.fixture
def store(fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn) -> TokenStore:
    return TokenStore(
        fetch, refresh_skew_s=SKEW_S, clock=clock, failure_backoff_s=BACKOFF_S, spawn=spawn, background_refresh=False
    )


def run_in_thread(target: t.Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Start ``target`` in a thread; its return value or exception lands in the list."""
    out: list[object] = []

    def body() -> None:
        try:
            out.append(target())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def join(thread: threading.Thread) -> None:
    thread.join(JOIN_TIMEOUT_S)
    assert not thread.is_alive(), "thread still blocked"


# normalization


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["b", "a", "b"], ("a", "b")),
        (["a", "b"], ("a", "b")),
        (("https://z", "https://a"), ("https://a", "https://z")),
        ({"x"}, ("x",)),
    ],
)
def test_normalize_audiences_sorts_and_deduplicates(
    values: t.Iterable[str], expected: AudienceSet
) -> None:
    assert normalize_audiences(values) == expected


@pytest.mark.parametrize(
    ("values", "error"),
    [("https://a", TypeError), ([], ValueError), (["a", ""], ValueError)],
)
def test_normalize_audiences_rejects(values: t.Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        normalize_audiences(values)


def test_equivalent_audience_sets_share_one_entry_and_one_fetch(
    store: TokenStore, fetch: FakeFetch
) -> None:
    first = store.get(("b", "a", "b"))
    second = store.get(normalize_audiences(["a", "b"]))
    assert first is second
    assert fetch.calls == [("a", "b")]
    assert store.cached_count() == 1


# the three windows


def test_fresh_token_is_served_from_memory(
    store: TokenStore, fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn
) -> None:
    first = store.get(AUD)
    clock.advance(DURATION_S - SKEW_S - 1)  # remaining = skew + 1
    assert store.get(AUD) is first
    assert len(fetch.calls) == 1
    assert spawn.pending == []


def test_fresh_path_does_not_wait_for_a_running_fetch(
    store: TokenStore, fetch: FakeFetch
) -> None:
    cached = store.get(AUD)
    fetch.gate = threading.Event()
    fetch.started.clear()
    prewarming, _ = run_in_thread(lambda: store.prewarm(AUD))  # holds the set's lock
    assert fetch.started.wait(JOIN_TIMEOUT_S)
    reader, out = run_in_thread(lambda: store.get(AUD))
    join(reader)
    assert out == [cached]
    fetch.gate.set()
    join(prewarming)


def test_advisory_window_serves_cached_token_and_starts_exactly_one_refresh(
    store: TokenStore, fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn
) -> None:
    old = store.get(AUD)
    clock.advance(DURATION_S - SKEW_S)  # remaining == skew: advisory
    for _ in range(5):
        assert store.get(AUD) is old
    assert len(spawn.pending) == 1
    assert len(fetch.calls) == 1  # nothing fetched on the request path

    spawn.run_all()
    assert len(fetch.calls) == 2
    new = store.get(AUD)
    assert new is not old and new.expires_at == clock.now + DURATION_S
    assert spawn.pending == []


def test_advisory_refresh_is_one_per_audience_set(
    store: TokenStore, fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn
) -> None:
    store.get(AUD)
    store.get(OTHER_AUD)
    clock.advance(DURATION_S - SKEW_S + 1)
    for _ in range(3):
        store.get(AUD)
        store.get(OTHER_AUD)
    assert len(spawn.pending) == 2
    spawn.run_all()
    assert sorted(fetch.calls[2:]) == sorted([AUD, OTHER_AUD])


def test_failed_advisory_refresh_keeps_serving_and_retries_after_backoff(
    store: TokenStore,
    fetch: FakeFetch,
    clock: FakeClock,
    spawn: RecordingSpawn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = store.get(AUD)
    clock.advance(DURATION_S - SKEW_S + 1)
    store.get(AUD)
    fetch.error = unavailable()
    with caplog.at_level(logging.WARNING, logger="jwt_proxy.tokens"):
        spawn.run_all()  # the refresh fails in the background
    assert len(fetch.calls) == 2
    assert "Throttling" in caplog.text

    clock.advance(BACKOFF_S / 2)
    assert store.get(AUD) is old  # still served, no error
    assert spawn.pending == []  # and no new refresh while backing off

    clock.advance(BACKOFF_S)
    fetch.error = None
    assert store.get(AUD) is old
    assert len(spawn.pending) == 1
    spawn.run_all()
    assert store.get(AUD).value == f"{SECRET_PREFIX}-3"


def test_mandatory_window_waits_for_a_fetch(
    store: TokenStore, fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn
) -> None:
    old = store.get(AUD)
    clock.advance(DURATION_S - SKEW_S / 2)  # remaining == skew/2: mandatory
    new = store.get(AUD)
    assert new is not old
    assert len(fetch.calls) == 2
    assert spawn.pending == []


def test_mandatory_window_failure_serves_the_old_token_while_it_has_10_s_left(
    store: TokenStore, fetch: FakeFetch, clock: FakeClock
) -> None:
    old = store.get(AUD)
    clock.advance(DURATION_S - STALE_MIN_REMAINING_S)  # mandatory, exactly 10 s left
    fetch.error = unavailable("AccessDenied", "not authorized")
    assert store.get(AUD) is old
    assert len(fetch.calls) == 2
    assert store.get(AUD) is old  # within the failure memory: no STS call, still served
    assert len(fetch.calls) == 2


def test_mandatory_window_failure_is_raised_once_the_old_token_has_under_10_s_left(
    store: TokenStore, fetch: FakeFetch, clock: FakeClock
) -> None:
    store.get(AUD)
    clock.advance(DURATION_S - STALE_MIN_REMAINING_S + 0.5)
    fetch.error = unavailable("AccessDenied", "not authorized")
    with pytest.raises(TokenUnavailable) as info:
        store.get(AUD)
    assert (info.value.error_class, info.value.detail, info.value.hint) == (
        "AccessDenied",
        "not authorized",
        "slow down",
    )


def test_background_refresh_is_shared_with_a_mandatory_waiter(
    store: TokenStore, fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn
) -> None:
    store.get(AUD)
    clock.advance(DURATION_S - SKEW_S + 1)
    store.get(AUD)  # claims the refresh, not run yet
    clock.advance(SKEW_S / 2)  # now mandatory
    calls_before = clock.calls
    waiter, out = run_in_thread(lambda: store.get(AUD))
    clock.wait_for_calls(calls_before + 1)  # the waiter has decided to wait
    spawn.run_all()
    join(waiter)
    assert out == [Token(f"{SECRET_PREFIX}-2", clock.now + DURATION_S)]
    assert len(fetch.calls) == 2


def test_spawn_failure_still_serves_and_frees_the_set(
    fetch: FakeFetch, clock: FakeClock
) -> None:
    def broken_spawn(target: t.Callable[[], None]) -> None:
        raise RuntimeError("can't start new thread")

    store = TokenStore(fetch, refresh_skew_s=SKEW_S, clock=clock, spawn=broken_spawn, background_refresh=False)
    old = store.get(AUD)
    clock.advance(DURATION_S - SKEW_S + 1)
    assert store.get(AUD) is old
    clock.advance(SKEW_S)  # mandatory: would deadlock if the claim were not released
    reader, out = run_in_thread(lambda: store.get(AUD))
    join(reader)
    assert isinstance(out[0], Token) and out[0] is not old


# failures


def test_failure_is_remembered_for_the_backoff_then_retried(
    store: TokenStore, fetch: FakeFetch, clock: FakeClock
) -> None:
    fetch.error = unavailable()
    with pytest.raises(TokenUnavailable) as first:
        store.get(AUD)
    clock.advance(BACKOFF_S / 2)
    with pytest.raises(TokenUnavailable) as second:
        store.get(AUD)
    assert len(fetch.calls) == 1
    assert (second.value.error_class, second.value.detail, second.value.hint) == (
        first.value.error_class,
        first.value.detail,
        first.value.hint,
    )
    assert store.cached_count() == 0  # a failure is not a cached token

    clock.advance(BACKOFF_S / 2)
    fetch.error = None
    assert store.get(AUD).value == f"{SECRET_PREFIX}-2"
    assert store.cached_count() == 1


def test_failure_memory_is_per_audience_set(store: TokenStore, fetch: FakeFetch) -> None:
    fetch.error = unavailable()
    with pytest.raises(TokenUnavailable):
        store.get(AUD)
    fetch.error = None
    assert store.get(OTHER_AUD).expires_at > 0
    assert fetch.calls == [AUD, OTHER_AUD]


def test_unexpected_fetch_exception_becomes_token_unavailable(
    store: TokenStore, fetch: FakeFetch, caplog: pytest.LogCaptureFixture
) -> None:
    fetch.error = KeyError(f"{SECRET_PREFIX}-leaked")
    with caplog.at_level(logging.ERROR, logger="jwt_proxy.tokens"):
        with pytest.raises(TokenUnavailable) as info:
            store.get(AUD)
    assert info.value.error_class == "internal"
    assert SECRET_PREFIX not in str(info.value)
    # What the proxy writes for it (JSON or logfmt) names the exception and where it
    # was raised, never its message, which may quote a response body.
    (record,) = [r for r in caplog.records if r.name == "jwt_proxy.tokens"]
    for formatter in (JsonFormatter(), LogfmtFormatter()):
        line = formatter.format(record)
        assert SECRET_PREFIX not in line
        assert "KeyError" in line and "test_tokens.py" in line


@pytest.mark.parametrize("expires_in_s", [0.0, -30.0])
def test_already_expired_fetch_is_refused_and_remembered(
    store: TokenStore, fetch: FakeFetch, expires_in_s: float
) -> None:
    fetch.duration_s = expires_in_s
    with pytest.raises(TokenUnavailable) as info:
        store.get(AUD)
    assert info.value.error_class == "expired"
    assert info.value.hint
    assert store.cached_count() == 0
    with pytest.raises(TokenUnavailable):
        store.get(AUD)
    assert len(fetch.calls) == 1


@pytest.mark.parametrize("lifetime_s", [20.0, 60.0, SKEW_S / 4])
def test_a_token_shorter_than_expected_is_served_from_memory_for_half_its_life(
    store: TokenStore, fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn, lifetime_s: float
) -> None:
    fetch.duration_s = lifetime_s
    first = store.get(AUD)
    for _ in range(10):  # the whole first half: one STS call, no refresh started
        assert store.get(AUD) is first
        clock.advance(lifetime_s / 20)
    assert len(fetch.calls) == 1 and spawn.pending == []
    clock.advance(0.01)  # just past half its life: advisory, served and refreshed behind
    assert store.get(AUD) is first
    spawn.run_all()
    assert len(fetch.calls) == 2
    assert store.get(AUD).value == f"{SECRET_PREFIX}-2"


def test_a_short_token_waits_only_in_the_last_quarter_of_its_life(
    store: TokenStore, fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn
) -> None:
    fetch.duration_s = 20.0
    first = store.get(AUD)
    clock.advance(15.0)  # 5 s left: a quarter of 20 s, mandatory
    assert store.get(AUD) is not first
    assert len(fetch.calls) == 2 and spawn.pending == []


# bounds


def bounded_store(fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn, **kwargs: t.Any) -> tuple[TokenStore, list]:
    dropped: list[AudienceSet] = []
    store = TokenStore(
        fetch,
        refresh_skew_s=SKEW_S,
        clock=clock,
        failure_backoff_s=BACKOFF_S,
        spawn=spawn,
        background_refresh=False,
        on_drop=dropped.append,
        **kwargs,
    )
    return store, dropped


def test_past_the_cache_size_the_least_recently_used_set_is_dropped(
    fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn
) -> None:
    store, dropped = bounded_store(fetch, clock, spawn, max_sets=2)
    store.get(("a",))
    clock.advance(1)
    store.get(("b",))
    clock.advance(1)
    store.get(("a",))  # b is now the least recently used
    clock.advance(1)
    store.get(("c",))
    assert dropped == [("b",)]
    assert store.cached_count() == 2
    calls = len(fetch.calls)
    store.get(("a",))
    store.get(("c",))
    assert len(fetch.calls) == calls  # the kept ones are still cached
    store.get(("b",))  # b is fetched again, a (least recent now) goes
    assert len(fetch.calls) == calls + 1
    assert dropped == [("b",), ("a",)]


def test_configured_sets_are_never_dropped(fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn) -> None:
    store, dropped = bounded_store(fetch, clock, spawn, max_sets=1, idle_drop_s=DURATION_S, keep=[("k",)])
    store.prewarm(("k",))
    store.get(("x",))
    store.get(("y",))
    assert dropped == [("x",)]
    clock.advance(DURATION_S * 3)
    store.refresh_due()
    assert dropped == [("x",), ("y",)]
    assert len(store._slots) == 1 and ("k",) in store._slots  # type: ignore[attr-defined]


def test_a_set_unused_for_the_token_duration_is_dropped_not_refreshed(
    fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn
) -> None:
    fetch.duration_s = 600.0
    store, dropped = bounded_store(fetch, clock, spawn, idle_drop_s=900.0)
    store.get(AUD)
    clock.advance(600.0 - SKEW_S)  # advisory: the refresher refreshes it, unused as it is
    assert store.refresh_due() is not None
    spawn.run_all()
    assert len(fetch.calls) == 2
    clock.advance(600.0)  # 900 s since the only use
    assert store.refresh_due() is None
    assert dropped == [AUD] and spawn.pending == [] and store.cached_count() == 0
    assert len(fetch.calls) == 2


def test_a_set_dropped_while_its_fetch_runs_is_reported_dropped_again(
    fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn
) -> None:
    store, dropped = bounded_store(fetch, clock, spawn, max_sets=1)
    fetch.gate = threading.Event()
    thread, out = run_in_thread(lambda: store.get(("a",)))
    assert fetch.started.wait(JOIN_TIMEOUT_S)
    fetch.gate.set()
    store.get(("b",))  # a is dropped (maybe before its fetch publishes)
    join(thread)
    assert isinstance(out[0], Token)
    assert ("a",) in dropped  # its token is recorded nowhere as held


# the refresher's schedule


def test_refresher_refreshes_each_set_when_its_advisory_window_opens(
    fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn
) -> None:
    store, _ = bounded_store(fetch, clock, spawn)
    store.get(AUD)
    assert store.refresh_due() == START_S + DURATION_S - SKEW_S
    assert spawn.pending == []
    clock.advance(DURATION_S - SKEW_S)
    store.refresh_due()
    spawn.run_all()
    assert len(fetch.calls) == 2  # no request needed
    assert store.refresh_due() == clock.now + DURATION_S - SKEW_S


def test_refresher_follows_a_short_token_and_picks_the_earliest_set(
    fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn
) -> None:
    store, _ = bounded_store(fetch, clock, spawn)
    store.get(AUD)
    fetch.duration_s = 60.0
    store.get(OTHER_AUD)
    assert store.refresh_due() == START_S + 30.0  # half of a 60 s life
    clock.advance(30.0)
    store.refresh_due()
    spawn.run_all()
    assert fetch.calls[-1] == OTHER_AUD and len(fetch.calls) == 3


def test_refresher_retries_a_failing_set_with_growing_delays_and_serves_meanwhile(
    fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn
) -> None:
    store, _ = bounded_store(fetch, clock, spawn)
    old = store.get(AUD)
    clock.advance(DURATION_S - SKEW_S)
    fetch.error = unavailable()
    delays = []
    for _ in range(4):
        store.refresh_due()
        spawn.run_all()
        failed_at = clock.now
        next_due = store.refresh_due()
        assert spawn.pending == []  # not before its retry delay
        delays.append(next_due - failed_at)
        clock.now = next_due
    assert delays == [BACKOFF_S, 2 * BACKOFF_S, 4 * BACKOFF_S, 8 * BACKOFF_S]
    assert store.get(AUD) is old
    fetch.error = None
    store.refresh_due()
    spawn.run_all()
    assert store.get(AUD) is not old


def test_refresher_thread_refreshes_without_traffic_and_stops(clock: FakeClock) -> None:
    fetch = FakeFetch(clock, duration_s=DURATION_S)
    store = TokenStore(fetch, refresh_skew_s=SKEW_S, clock=clock)  # refresher on by default
    store.get(AUD)
    clock.advance(DURATION_S - SKEW_S)  # the thread sleeps up to its cap; wake it as a publish would
    store._wake.set()  # type: ignore[attr-defined]
    deadline = threading.Event()
    for _ in range(200):
        if len(fetch.calls) >= 2:
            break
        deadline.wait(0.05)
    assert len(fetch.calls) == 2
    thread = store._refresher  # type: ignore[attr-defined]
    store.stop_refresher(JOIN_TIMEOUT_S)
    assert thread is not None and not thread.is_alive() and thread.daemon


# concurrency


@pytest.mark.parametrize("outcome", ["token", "short token", "error"])
def test_concurrent_waiters_share_one_fetch(
    fetch: FakeFetch, clock: FakeClock, spawn: RecordingSpawn, outcome: str
) -> None:
    waiters = 8
    # No failure memory: only sharing can keep the waiters from calling STS again.
    store = TokenStore(
        fetch, refresh_skew_s=SKEW_S, clock=clock, failure_backoff_s=0.0, spawn=spawn, background_refresh=False
    )
    if outcome == "short token":
        fetch.duration_s = SKEW_S / 4
    if outcome == "error":
        fetch.error = unavailable()
    fetch.gate = threading.Event()
    threads = [run_in_thread(lambda: store.get(AUD)) for _ in range(waiters)]
    clock.wait_for_calls(waiters)  # every thread has looked and decided to wait
    assert fetch.started.wait(JOIN_TIMEOUT_S)
    fetch.gate.set()
    results = []
    for thread, out in threads:
        join(thread)
        results.extend(out)
    assert len(fetch.calls) == 1
    if outcome == "error":
        assert all(isinstance(r, TokenUnavailable) for r in results)
        assert {r.error_class for r in results} == {"Throttling"}  # type: ignore[union-attr]
    else:
        assert len({id(r) for r in results}) == 1 and isinstance(results[0], Token)


def test_different_audience_sets_fetch_concurrently(
    store: TokenStore, fetch: FakeFetch
) -> None:
    gate_a = threading.Event()
    started_a = threading.Event()

    def fetch_gated_for_a(audiences: AudienceSet) -> Token:
        if audiences == AUD:
            started_a.set()
            assert gate_a.wait(JOIN_TIMEOUT_S)
        return fetch(audiences)

    store._fetch = fetch_gated_for_a  # type: ignore[attr-defined] # same store, gated fetch
    slow, slow_out = run_in_thread(lambda: store.get(AUD))
    assert started_a.wait(JOIN_TIMEOUT_S)
    fast, fast_out = run_in_thread(lambda: store.get(OTHER_AUD))
    join(fast)  # finished while AUD's fetch is still blocked
    assert slow.is_alive()
    assert isinstance(fast_out[0], Token)
    gate_a.set()
    join(slow)
    assert isinstance(slow_out[0], Token)


def test_race_every_read_gets_an_unexpired_consistent_token() -> None:
    """botocore's TestCredentialRefreshRaces, with real refresh threads."""
    threads_n, reads_n, step_s = 20, 2000, 0.25
    lock = threading.Lock()
    now = [START_S]
    issued: dict[str, float] = {}
    spawned: list[threading.Thread] = []
    # Other threads keep moving the clock while a reader is descheduled, so a
    # reader judges its token against the last time the store read the clock
    # on its behalf, i.e. the moment the store decided what to return.
    last_read = threading.local()

    def clock() -> float:
        with lock:
            now[0] += step_s
            last_read.value = now[0]
            return now[0]

    def fetch(audiences: AudienceSet) -> Token:
        with lock:
            value = f"{SECRET_PREFIX}-{len(issued)}"
            issued[value] = now[0] + DURATION_S
            return Token(value, issued[value])

    def spawn(target: t.Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        spawned.append(thread)
        thread.start()

    store = TokenStore(fetch, refresh_skew_s=SKEW_S, clock=clock, spawn=spawn, background_refresh=False)
    problems: list[str] = []

    def reader() -> None:
        for _ in range(reads_n):
            token = store.get(AUD)
            if issued.get(token.value) != token.expires_at:
                problems.append(f"inconsistent snapshot {token!r}")
            if token.expires_at - last_read.value <= SKEW_S / 2:
                problems.append(f"{token!r} handed out at {last_read.value}")

    readers = [threading.Thread(target=reader, daemon=True) for _ in range(threads_n)]
    for thread in readers:
        thread.start()
    for thread in readers + spawned:
        join(thread)

    assert problems == []
    elapsed_s = now[0] - START_S  # every store clock read advanced it
    # Each fetch serves at least until the advisory window: DURATION_S - SKEW_S.
    max_fetches = 1 + int(elapsed_s // (DURATION_S - SKEW_S)) + 1
    assert 2 <= len(issued) <= max_fetches, (len(issued), max_fetches)


# misc API


def test_prewarm_fetches_now_and_get_reuses_it(store: TokenStore, fetch: FakeFetch) -> None:
    store.prewarm(AUD)
    assert len(fetch.calls) == 1
    assert store.get(AUD).value == f"{SECRET_PREFIX}-1"
    store.prewarm(AUD)  # explicit: fetches even when cached
    assert len(fetch.calls) == 2


def test_prewarm_raises_and_failure_is_remembered(store: TokenStore, fetch: FakeFetch) -> None:
    fetch.error = unavailable()
    with pytest.raises(TokenUnavailable):
        store.prewarm(AUD)
    with pytest.raises(TokenUnavailable):
        store.get(AUD)
    assert len(fetch.calls) == 1


def test_cached_count_counts_sets_with_unexpired_tokens(
    store: TokenStore, clock: FakeClock
) -> None:
    assert store.cached_count() == 0
    store.get(AUD)
    store.get(OTHER_AUD)
    assert store.cached_count() == 2
    clock.advance(DURATION_S)
    assert store.cached_count() == 0


@pytest.mark.parametrize(("skew", "backoff"), [(0.0, 1.0), (-1.0, 1.0), (10.0, -1.0)])
def test_constructor_rejects_nonsense_windows(skew: float, backoff: float) -> None:
    with pytest.raises(ValueError):
        TokenStore(lambda a: Token("x", 0.0), refresh_skew_s=skew, failure_backoff_s=backoff)


def test_default_spawn_runs_refresh_in_a_daemon_thread(fetch: FakeFetch, clock: FakeClock) -> None:
    store = TokenStore(fetch, refresh_skew_s=SKEW_S, clock=clock, background_refresh=False)
    store.get(AUD)
    clock.advance(DURATION_S - SKEW_S + 1)
    fetch.started.clear()
    store.get(AUD)
    assert fetch.started.wait(JOIN_TIMEOUT_S)
    refreshers = [th for th in threading.enumerate() if th.name == "jwt-proxy-token-refresh"]
    for thread in refreshers:
        assert thread.daemon
        join(thread)
    assert len(fetch.calls) == 2


# secrecy


def test_token_repr_and_str_hide_the_value() -> None:
    token = Token(f"{SECRET_PREFIX}.payload.sig", START_S)
    for text in (repr(token), str(token), f"{token}", f"{[token]}", repr({"t": token})):
        assert SECRET_PREFIX not in text
    assert str(START_S) in repr(token)


def test_token_unavailable_text_is_safe_and_useful() -> None:
    exc = TokenUnavailable(("https://a", "https://b"), "AccessDenied", "not authorized", "fix IAM")
    text = str(exc)
    assert "https://a,https://b" in text and "AccessDenied" in text and "not authorized" in text
    assert "AccessDenied" in repr(exc)
    copy = exc.copy()
    assert (copy.audiences, copy.error_class, copy.detail, copy.hint) == (
        exc.audiences,
        exc.error_class,
        exc.detail,
        exc.hint,
    )


def test_store_errors_never_carry_a_token(store: TokenStore, fetch: FakeFetch) -> None:
    fetch.duration_s = -1.0  # STS hands back an expired token
    with pytest.raises(TokenUnavailable) as info:
        store.get(AUD)
    for text in (str(info.value), repr(info.value), repr(info.value.args)):
        assert SECRET_PREFIX not in text
