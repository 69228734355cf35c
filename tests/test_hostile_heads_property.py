"""Generated request heads against the real CLI: never a 500, never a crashed worker,
nothing dialled for a refused head, and a normal request still gets its token after.

One ``jwt-proxy`` (one worker, pinned to a recording upstream). Hypothesis builds a
request line, a header block and one of a set of body framings (valid and broken), sent
over a raw socket. The worker's process id must stay the same throughout (a crash makes
gunicorn start another), and a ``4xx`` for anything but a body that broke off while
streaming must leave the upstream's connection count where it was.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import event
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from tests.conftest import Process
from tests.rawhttp import final_status
from tests.rawhttp import start_small_proxy
from tests.rawhttp import send_raw
from tests.upstream import RecordingUpstream

pytestmark = pytest.mark.integration

IO_TIMEOUT_S = 15.0
#: Enough cases to meet every framing with many request lines; the run stays well
#: under a minute on a loaded two-core machine.
MAX_EXAMPLES = 400


def worker_pids(master_pid: int) -> set[int]:
    """The gunicorn master's children (its workers), from /proc."""
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    return {int(pid) for pid in children}


class Target:
    def __init__(self, proxy: Process, upstream: RecordingUpstream) -> None:
        self.proxy = proxy
        self.upstream = upstream
        self.workers = self.wait_for_workers()

    def wait_for_workers(self, timeout_s: float = 30.0) -> set[int]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = worker_pids(self.proxy.pid)
            if pids:
                return pids
            time.sleep(0.05)
        raise AssertionError(f"no worker started:\n{self.proxy.output()}")

    def send(self, data: bytes) -> bytes:
        return send_raw(self.proxy.port, data, IO_TIMEOUT_S)


@pytest.fixture(scope="module")
def target(local_sts):
    with RecordingUpstream() as upstream:
        proxy = start_small_proxy(local_sts.url, ["--upstream-host", f"127.0.0.1:{upstream.port}"])
        try:
            yield Target(proxy, upstream)
        finally:
            proxy.cleanup()


METHODS = ["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH", "PROPFIND", "CONNECT", "get", "G@T", ""]
TARGETS = [
    "/", "/x", "//double//slash/?q=a+b", "///x", "/a%2Fb", "/%2E%2E/", "/a%zz", "/a%", "/p?", "/a#frag",
    "http://127.0.0.1:1", "http://127.0.0.1:1/x", "HTTP://169.254.169.254", "https://h", "*", "h:1",
    "/a b", "/caf\xe9", "/a\x00", "/a\x7f", "", "/" + "a" * 9000,
]  # fmt: skip
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "http/1.1", "HTTP/1.1 junk", "HTTP/1", ""]
HEADER_NAMES = st.one_of(
    st.sampled_from(
        ["Host", "Connection", "Upgrade", "Expect", "Authorization", "Cookie", "TE", "Trailer", "Keep-Alive",
         "Proxy-Connection", "X-Forwarded-For", "HTTP2-Settings", "X-Custom", "Content-Type", "X Bad", ""]
    ),  # fmt: skip
    st.text(alphabet="abcXYZ-_019!#$%&'*+.^`|~:", min_size=1, max_size=10),
)
HEADER_VALUES = st.one_of(
    st.sampled_from(
        ["close", "keep-alive", "upgrade", "Upgrade, Authorization", "websocket", "h2c", "100-continue",
         "Bearer inbound", "trailers", "", " ", "a\tb"]
    ),  # fmt: skip
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xFF, exclude_characters="\r\n"), max_size=16),
)


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


# (framing lines, body, whether a 4xx may come after the upstream was dialled: a body that
# breaks off or breaks its chunk syntax is only found while it streams)
FRAMINGS: dict[str, tuple[list[str], bytes, bool]] = {
    "none": ([], b"", False),
    "length": (["Content-Length: 5"], b"hello", False),
    "zero length": (["Content-Length: 0"], b"", False),
    "short body": (["Content-Length: 10"], b"hello", True),
    "length 2**63": (["Content-Length: 9223372036854775808"], b"hello", False),
    "length 2**64+5": (["Content-Length: 18446744073709551621"], b"hello", False),
    "length of 40 digits": (["Content-Length: " + "7" * 40], b"hello", False),
    "signed length": (["Content-Length: +5"], b"hello", False),
    "negative length": (["Content-Length: -1"], b"hello", False),
    "two lengths": (["Content-Length: 5", "Content-Length: 6"], b"hello!", False),
    "chunked": (["Transfer-Encoding: chunked"], chunked(b"hello", b"world"), False),
    "chunk of 2**64+5": (["Transfer-Encoding: chunked"], b"10000000000000005\r\nhello\r\n0\r\n\r\n", False),
    "chunk of 40 hex digits": (["Transfer-Encoding: chunked"], b"f" * 40 + b"\r\nhello\r\n0\r\n\r\n", False),
    "bad chunk size": (["Transfer-Encoding: chunked"], b"zz\r\nhello\r\n0\r\n\r\n", True),
    "unfinished chunk": (["Transfer-Encoding: chunked"], b"5\r\nhel", True),
    "gzip then chunked": (["Transfer-Encoding: gzip, chunked"], chunked(b"hello"), False),
    "identity": (["Transfer-Encoding: identity"], b"hello", False),
    "length and chunked": (["Content-Length: 5", "Transfer-Encoding: chunked"], chunked(b"hello"), False),
}


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    # Half the lines are well-formed, so that many requests get past the parser to the
    # framing, routing and forwarding checks.
    method=st.one_of(st.sampled_from(["GET", "POST", "PUT"]), st.sampled_from(METHODS)),
    target_text=st.one_of(st.sampled_from(["/", "/x?q=1", "//double//slash/?q=a+b"]), st.sampled_from(TARGETS)),
    version=st.one_of(st.just("HTTP/1.1"), st.sampled_from(VERSIONS)),
    headers=st.one_of(st.just([]), st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5)),
    framing=st.one_of(st.sampled_from(["none", "length", "chunked"]), st.sampled_from(sorted(FRAMINGS))),
)
def test_no_generated_head_gets_a_500_crashes_the_worker_or_dials_when_refused(
    target, method, target_text, version, headers, framing
):
    lines, body, found_while_streaming = FRAMINGS[framing]
    head = f"{method} {target_text} {version}".rstrip(" ") + "\r\nHost: p\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    head += "".join(f"{line}\r\n" for line in lines)
    opened = target.upstream.settle()
    answer = target.send(head.encode("latin-1") + b"\r\n" + body)
    status = final_status(answer)
    event(f"status {status}")
    event(f"framing {framing}")
    assert status != 500 and 200 <= status < 600, answer[:300]
    assert worker_pids(target.proxy.pid) == target.workers, target.proxy.output()[-3000:]
    if 400 <= status < 500 and not found_while_streaming:
        assert target.upstream.settle() == opened + 1, (status, answer[:200])


def test_a_normal_request_gets_a_token_after_the_generated_heads(target):
    answer = target.send(b"GET /after HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    assert final_status(answer) == 200
    assert worker_pids(target.proxy.pid) == target.workers
    (last,) = target.upstream.requests[-1:]
    assert last.target == "/after"
    assert last.header("Authorization").startswith("Bearer eyJ")  # a JWT from the local STS
