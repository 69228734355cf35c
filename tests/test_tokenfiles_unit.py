"""Token files without a process: the atomic write, the refresh point, and the keeper's loop
on a fake clock (no sleeps)."""

from __future__ import annotations

import os
import threading

import pytest

from jwt_proxy.tokenfiles import FIRST_RETRY_S
from jwt_proxy.tokenfiles import TokenFileKeeper
from jwt_proxy.tokenfiles import refresh_point
from jwt_proxy.tokenfiles import write_token_file
from jwt_proxy.tokens import Token
from jwt_proxy.tokens import TokenStore
from jwt_proxy.tokens import TokenUnavailable

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJhIn0.c2lnbmF0dXJl"
AUDIENCE = "api://AzureADTokenExchange"


def test_write_replaces_the_file_whole_with_the_mode_whatever_the_umask(tmp_path):
    path = tmp_path / "token"
    path.write_text("old")
    old_inode = path.stat().st_ino
    previous = os.umask(0o077)
    try:
        write_token_file(str(path), JWT, 0o644)
    finally:
        os.umask(previous)
    assert path.read_bytes() == JWT.encode()  # no trailing newline
    assert path.stat().st_mode & 0o777 == 0o644
    assert path.stat().st_ino != old_inode  # a new file renamed over the old one
    assert os.listdir(tmp_path) == ["token"]


@pytest.mark.parametrize("value", ["", "abc", "a.b", "a..c", f"{JWT}\n", "a.b.c.d", "a.b.c d", "<html>.x.y"])
def test_anything_but_a_compact_jwt_is_never_written(tmp_path, value):
    path = tmp_path / "token"
    path.write_text(JWT)
    with pytest.raises(ValueError) as raised:
        write_token_file(str(path), value, 0o600)
    assert value.strip() == "" or value not in str(raised.value)
    assert path.read_text() == JWT
    assert os.listdir(tmp_path) == ["token"]


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    directory = tmp_path / "gone"
    with pytest.raises(OSError):
        write_token_file(str(directory / "token"), JWT, 0o600)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("lifetime_s", "skew_s", "rewrite_at_left_s"),
    [(3600, 300, 301), (20, 300, 11), (20, 10, 11), (60, 10, 11), (1, 10, 0.75)],
)
def test_refresh_point_is_just_before_the_window_or_half_a_short_lifetime(lifetime_s, skew_s, rewrite_at_left_s):
    token = Token(JWT, 1000.0 + lifetime_s)
    assert token.expires_at - refresh_point(token, 1000.0, skew_s) == rewrite_at_left_s


class FakeClock:
    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class StopAfter(threading.Event):
    """A stop event whose ``wait`` moves the fake clock on instead of sleeping, and is set
    after ``waits`` waits."""

    def __init__(self, clock: FakeClock, waits: int) -> None:
        super().__init__()
        self.clock = clock
        self.waits_left = waits
        self.waited: list[float] = []

    def wait(self, timeout=None):
        self.waited.append(timeout)
        self.clock.now += timeout
        self.waits_left -= 1
        if self.waits_left <= 0:
            self.set()
        return self.is_set()


class FakeSTS:
    """Mints ``h.p<n>.s`` tokens of ``lifetime_s``, or fails as told."""

    def __init__(self, clock: FakeClock, lifetime_s: float, outcomes: list | None = None) -> None:
        self.clock = clock
        self.lifetime_s = lifetime_s
        self.outcomes = list(outcomes or [])
        self.calls = 0

    def __call__(self, audiences):
        self.calls += 1
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if isinstance(outcome, Exception):
            raise outcome
        value = outcome if outcome != "ok" else f"h.p{self.calls}.s"
        return Token(value, self.clock() + self.lifetime_s)


def immediate(run):
    run()  # background refreshes run inline: deterministic on the fake clock


def keeper_for(tmp_path, clock, fetch, skew_s=300.0, paths=("a", "b"), on_written=None):
    store = TokenStore(fetch, refresh_skew_s=skew_s, clock=clock, spawn=immediate)
    return TokenFileKeeper(
        store,
        AUDIENCE,
        [str(tmp_path / name) for name in paths],
        mode=0o600,
        refresh_skew_s=skew_s,
        clock=clock,
        on_written=on_written,
    )


def test_keeper_rewrites_every_file_as_the_token_enters_its_window_with_one_fetch_each_time(tmp_path):
    clock = FakeClock()
    fetch = FakeSTS(clock, lifetime_s=3600)
    written = []
    keeper = keeper_for(tmp_path, clock, fetch, on_written=lambda: written.append(clock.now))
    stop = StopAfter(clock, waits=3)
    keeper.run(stop)
    assert stop.waited == [3299, 3299, 3299]  # from each write to just before 300 s are left
    assert fetch.calls == 3  # the first write, then one per refresh (the third wait stops it)
    assert (tmp_path / "a").read_text() == (tmp_path / "b").read_text() == "h.p3.s"
    assert written == [10_000.0]  # ready once, after the first write


def test_keeper_with_short_tokens_rewrites_at_half_their_lifetime(tmp_path):
    clock = FakeClock()
    fetch = FakeSTS(clock, lifetime_s=20)
    keeper = keeper_for(tmp_path, clock, fetch, skew_s=10.0, paths=("a",))
    stop = StopAfter(clock, waits=4)
    keeper.run(stop)
    assert stop.waited == [9, 9, 9, 9]
    assert fetch.calls == 4


def test_keeper_keeps_the_old_file_while_sts_fails_and_backs_off(tmp_path):
    clock = FakeClock()
    failure = TokenUnavailable((AUDIENCE,), "AccessDenied", "not allowed")
    fetch = FakeSTS(clock, lifetime_s=3600, outcomes=["ok", failure, failure, "ok"])
    keeper = keeper_for(tmp_path, clock, fetch, paths=("a",))
    stop = StopAfter(clock, waits=4)
    keeper.run(stop)
    # written, slept to the window; failed twice (1 s, 2 s backoff, the store's failure
    # memory lasting 1 s); then a new token was written and the next wait is to its window.
    assert stop.waited[0] == 3299
    assert stop.waited[1:3] == [FIRST_RETRY_S, 2 * FIRST_RETRY_S]
    assert (tmp_path / "a").read_text() == "h.p4.s"
    assert fetch.calls == 4  # one call per attempt: no background refresh on top of a retry


def test_keeper_never_writes_what_sts_returned_if_it_is_not_a_jwt(tmp_path, caplog):
    clock = FakeClock()
    fetch = FakeSTS(clock, lifetime_s=3600, outcomes=["<html>oops</html>"])
    keeper = keeper_for(tmp_path, clock, fetch, paths=("a",))
    stop = StopAfter(clock, waits=1)
    keeper.run(stop)
    assert not (tmp_path / "a").exists()
    assert stop.waited == [FIRST_RETRY_S]
    assert "oops" not in caplog.text
    assert any(record.error_class == "InvalidToken" for record in caplog.records)
