"""Hostile input against one running proxy: a table of raw requests and two property tests.

One ``jwt-proxy`` in header mode whose ``--allowed-upstream-hosts`` names only the
recording upstream. Every hostile request must be answered with a ``4xx`` (never a
``5xx``, a hang or a crash), the upstream must see none of them, no other host may be
dialled (there is no ``upstream request failed`` record), and a normal request must
still be answered afterwards.
"""

from __future__ import annotations


import pytest
from hypothesis import HealthCheck
from hypothesis import event
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from jwt_proxy.headers import HOP_BY_HOP
from jwt_proxy.routing import Allowlist
from jwt_proxy.routing import RoutingError
from jwt_proxy.routing import choose_upstream
from tests.conftest import Process
from tests.rawhttp import final_status
from tests.rawhttp import start_small_proxy
from tests.rawhttp import send_raw
from tests.upstream import RecordingUpstream

pytestmark = pytest.mark.integration

IO_TIMEOUT_S = 10.0
PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class Target:
    """The running proxy and the only upstream it may reach."""

    def __init__(self, proxy: Process, upstream: RecordingUpstream) -> None:
        self.proxy = proxy
        self.upstream = upstream
        self.authority = f"127.0.0.1:{upstream.port}"
        self.route = f"X-Upstream-Host: {self.authority}\r\n".encode()

    def send(self, data: bytes) -> tuple[int, bytes]:
        """Send raw bytes, half-close, read the answer until the proxy closes."""
        answer = send_raw(self.proxy.port, data, IO_TIMEOUT_S)
        return final_status(answer), answer

    def assert_healthy(self) -> None:
        assert self.proxy.popen.poll() is None, self.proxy.output()
        status, _ = self.send(b"GET /healthy HTTP/1.1\r\nHost: p\r\n" + self.route + b"Connection: close\r\n\r\n")
        assert status == 200


@pytest.fixture(scope="module")
def target(local_sts):
    with RecordingUpstream() as upstream:
        proxy = start_small_proxy(local_sts.url, ["--allowed-upstream-hosts", f"127.0.0.1:{upstream.port}"])
        try:
            yield Target(proxy, upstream)
        finally:
            proxy.stop()
    failures = [r for r in proxy.records() if r.get("msg") == "upstream request failed"]
    proxy.cleanup()
    assert not failures, failures  # nothing but the recording upstream was ever dialled


# -- the table --------------------------------------------------------------------------------

R = b"{ROUTE}"  # replaced by the routing header naming the recording upstream


def req(line: bytes, *headers: bytes, body: bytes = b"", route: bool = True) -> bytes:
    head = line + b"\r\nHost: proxy\r\n" + (R if route else b"") + b"".join(h + b"\r\n" for h in headers)
    return head + b"\r\n" + body


def routed(value: bytes) -> bytes:
    return b"GET /x HTTP/1.1\r\nHost: proxy\r\nX-Upstream-Host: " + value + b"\r\n\r\n"


CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"

HOSTILE: list[tuple[str, bytes, int]] = [
    # request line
    ("absolute-form http", req(b"GET http://127.0.0.1:1/x HTTP/1.1"), 400),
    ("absolute-form https", req(b"GET https://127.0.0.1:1/x HTTP/1.1"), 400),
    ("absolute-form upper-case scheme", req(b"GET HTTP://127.0.0.1:1/ HTTP/1.1"), 400),
    ("absolute-form ipv6", req(b"GET http://[::1]:1/ HTTP/1.1"), 400),
    ("absolute-form metadata", req(b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1"), 400),
    ("absolute-form without a path", req(b"GET http://127.0.0.1:1 HTTP/1.1"), 400),
    ("absolute-form metadata without a path", req(b"GET http://169.254.169.254 HTTP/1.1"), 400),
    ("asterisk form", req(b"OPTIONS * HTTP/1.1"), 400),
    ("asterisk with GET", req(b"GET * HTTP/1.1"), 400),
    ("authority form with GET", req(b"GET 127.0.0.1:1 HTTP/1.1"), 400),
    ("CONNECT", req(b"CONNECT 127.0.0.1:1 HTTP/1.1"), 405),
    ("CONNECT metadata", req(b"CONNECT 169.254.169.254:80 HTTP/1.1"), 405),
    ("scheme without slashes", req(b"GET http:/x HTTP/1.1"), 400),
    ("backslash host", req(b"GET \\\\evil\\x HTTP/1.1"), 400),
    ("space in target", b"GET /a b HTTP/1.1\r\nHost: p\r\n\r\n", 400),
    ("tab in target", req(b"GET /a\tb HTTP/1.1"), 400),
    ("NUL in target", req(b"GET /a\x00b HTTP/1.1"), 400),
    ("DEL in target", req(b"GET /a\x7fb HTTP/1.1"), 400),
    ("non-ASCII in target", req(b"GET /caf\xe9 HTTP/1.1"), 400),
    ("CR in target", req(b"GET /a\rb HTTP/1.1"), 400),
    ("fragment", req(b"GET /a#frag HTTP/1.1"), 400),
    ("invalid escape", req(b"GET /a%zz HTTP/1.1"), 400),
    ("truncated escape", req(b"GET /a% HTTP/1.1"), 400),
    ("request line too long", req(b"GET /" + b"a" * 8300 + b" HTTP/1.1"), 414),
    ("no version", b"GET /\r\nHost: p\r\n\r\n", 400),
    ("HTTP/0.9", b"GET /\r\n\r\n", 400),
    ("HTTP/2.0 version", req(b"GET / HTTP/2.0"), 400),
    ("HTTP/3 version", req(b"GET / HTTP/3"), 400),
    ("lower-case version", req(b"GET / http/1.1"), 400),
    ("lower-case method", req(b"get / HTTP/1.1"), 400),
    ("method with #", req(b"GE#T / HTTP/1.1"), 400),
    ("method too long", req(b"A" * 21 + b" / HTTP/1.1"), 400),
    ("method of two letters", req(b"GE / HTTP/1.1"), 400),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("bare LF line ends", b"GET / HTTP/1.1\nHost: p\n\n", 400),
    ("two spaces after the method", req(b"GET  / HTTP/1.1"), 400),
    ("leading space", req(b" GET / HTTP/1.1"), 400),
    ("two empty lines first", b"\r\n\r\n" + req(b"GET / HTTP/1.1"), 400),
    ("TLS client hello on a plain port", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", 400),
    ("binary garbage", bytes(range(256)), 400),
    # the routing header
    ("routing header missing", req(b"GET /x HTTP/1.1", route=False), 400),
    ("routing header empty", routed(b""), 400),
    ("routing header blank", routed(b"   "), 400),
    ("routing header with path", routed(b"{AUTH}/path"), 400),
    ("routing header with query", routed(b"{AUTH}?x=1"), 400),
    ("routing header with fragment", routed(b"{AUTH}#x"), 400),
    ("userinfo", routed(b"user@{AUTH}"), 400),
    ("userinfo with password", routed(b"user:pw@{AUTH}"), 400),
    ("@ after the host", routed(b"{AUTH}@evil.example"), 400),
    ("backslash after the host", routed(b"{AUTH}\\evil.example"), 400),
    ("backslash before @", routed(b"evil.example\\@{AUTH}"), 400),
    ("backslash only", routed(b"\\\\evil.example"), 400),
    ("scheme", routed(b"http://{AUTH}"), 400),
    ("scheme-relative", routed(b"//{AUTH}"), 400),
    ("space inside", routed(b"127.0.0.1 :80"), 400),
    ("tab inside", routed(b"127.0.0.1\t:80"), 400),
    ("NUL", routed(b"{AUTH}\x00"), 400),
    ("SOH", routed(b"{AUTH}\x01"), 400),
    ("DEL", routed(b"{AUTH}\x7f"), 400),
    ("lone CR", routed(b"{AUTH}\rX-Evil: 1"), 400),
    ("lone LF", routed(b"{AUTH}\nX-Evil: 1"), 400),
    ("non-ASCII", routed(b"caf\xe9.example"), 400),
    ("UTF-8 host", routed("bücher.example".encode()), 400),
    ("port 0", routed(b"127.0.0.1:0"), 400),
    ("port 65536", routed(b"127.0.0.1:65536"), 400),
    ("port with letters", routed(b"127.0.0.1:http"), 400),
    ("empty port", routed(b"127.0.0.1:"), 400),
    ("two ports", routed(b"{AUTH}:80"), 400),
    ("IPv6 without brackets", routed(b"::1"), 400),
    ("unterminated bracket", routed(b"[::1"), 400),
    ("IPv6 zone", routed(b"[fe80::1%25eth0]"), 400),
    ("not IPv6 in brackets", routed(b"[evil.example]"), 400),
    ("leading hyphen", routed(b"-evil.example"), 400),
    ("empty label", routed(b"a..example"), 400),
    ("name of 300 characters", routed(b"a" * 60 + (b".b" * 120)), 400),
    ("two routing headers", req(b"GET /x HTTP/1.1", R), 400),
    ("two routing headers, one evil", req(b"GET /x HTTP/1.1", b"X-Upstream-Host: evil.example"), 400),
    ("underscore routing header only", req(b"GET /x HTTP/1.1", b"X_Upstream_Host: {AUTH}", route=False), 400),
    ("routing header folded", b"GET /x HTTP/1.1\r\nHost: p\r\nX-Upstream-Host:\r\n {AUTH}\r\n\r\n", 400),
    # outside the allowlist, or a link-local / metadata address: nothing is dialled
    ("allowed host, other port", routed(b"127.0.0.1:1"), 403),
    ("same address, a name", routed(b"localhost:{PORT}"), 403),
    ("same address, decimal", routed(b"2130706433:{PORT}"), 403),
    ("same address, trailing dot", routed(b"127.0.0.1.:{PORT}"), 403),
    ("same address, mapped IPv6", routed(b"[::ffff:127.0.0.1]:{PORT}"), 403),
    ("other host", routed(b"evil.example"), 403),
    ("metadata", routed(b"169.254.169.254"), 403),
    ("metadata decimal", routed(b"2852039166"), 403),
    ("metadata octal", routed(b"0251.0376.0251.0376"), 403),
    ("metadata hex", routed(b"0xa9fea9fe"), 403),
    ("metadata mixed", routed(b"0xa9.254.0251.0xfe"), 403),
    ("metadata mapped IPv6", routed(b"[::ffff:169.254.169.254]"), 403),
    ("metadata IPv4-compatible IPv6", routed(b"[::169.254.169.254]"), 403),
    ("metadata IPv4-compatible IPv6 in hex", routed(b"[::a9fe:a9fe]"), 403),
    ("metadata 6to4", routed(b"[2002:a9fe:a9fe::1]"), 403),
    ("metadata IPv6", routed(b"[fd00:ec2::254]"), 403),
    ("ECS credentials", routed(b"169.254.170.2"), 403),
    ("link-local IPv6", routed(b"[fe80::1]"), 403),
    ("metadata by name", routed(b"metadata.google.internal"), 403),
    # header lines
    ("header without colon", req(b"GET /x HTTP/1.1", b"Authorization Bearer x"), 400),
    ("empty header name", req(b"GET /x HTTP/1.1", b": value"), 400),
    ("space in header name", req(b"GET /x HTTP/1.1", b"X Y: z"), 400),
    ("space before colon", req(b"GET /x HTTP/1.1", b"X-Y : z"), 400),
    ("parenthesis in name", req(b"GET /x HTTP/1.1", b"X(Y): z"), 400),
    ("NUL in name", req(b"GET /x HTTP/1.1", b"X\x00Y: z"), 400),
    ("non-ASCII name", req(b"GET /x HTTP/1.1", b"X\xe9: z"), 400),
    ("NUL in value", req(b"GET /x HTTP/1.1", b"X-A: a\x00b"), 400),
    ("ESC in value", req(b"GET /x HTTP/1.1", b"X-A: a\x1bb"), 400),
    ("DEL in value", req(b"GET /x HTTP/1.1", b"X-A: a\x7fb"), 400),
    ("CR in Authorization", req(b"GET /x HTTP/1.1", b"Authorization: Bearer a\rb"), 400),
    ("control in Cookie", req(b"GET /x HTTP/1.1", b"Cookie: a=\x02"), 400),
    ("obsolete line fold", req(b"GET /x HTTP/1.1", b"X-A: a", b" b"), 400),
    ("fold with a tab", req(b"GET /x HTTP/1.1", b"X-A: a", b"\tb"), 400),
    ("fold first line", b"GET /x HTTP/1.1\r\n X-A: a\r\nHost: p\r\n\r\n", 400),
    ("header line too long", req(b"GET /x HTTP/1.1", b"X-Big: " + b"a" * 8200), 431),
    ("too many headers", req(b"GET /x HTTP/1.1", *[b"X-%d: 1" % i for i in range(120)]), 431),
    ("two Host lines", req(b"GET /x HTTP/1.1", b"Host: other"), 400),
    ("two Content-Type lines", req(b"POST /x HTTP/1.1", b"Content-Type: a/b", b"Content-Type: c/d", b"Content-Length: 0"), 400),
    ("unknown expectation", req(b"GET /x HTTP/1.1", b"Expect: 200-ok"), 417),
    # framing
    ("content-length and chunked", req(b"POST /x HTTP/1.1", b"Content-Length: 5", b"Transfer-Encoding: chunked", body=CHUNKED_HELLO), 400),
    ("chunked and content-length", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: chunked", b"Content-Length: 5", body=CHUNKED_HELLO), 400),
    ("two content-lengths", req(b"POST /x HTTP/1.1", b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"), 400),
    ("two equal content-lengths", req(b"POST /x HTTP/1.1", b"Content-Length: 5", b"Content-Length: 5", body=b"hello"), 400),
    ("content-length list", req(b"POST /x HTTP/1.1", b"Content-Length: 5, 5", body=b"hello"), 400),
    ("negative content-length", req(b"POST /x HTTP/1.1", b"Content-Length: -1"), 400),
    ("signed content-length", req(b"POST /x HTTP/1.1", b"Content-Length: +5", body=b"hello"), 400),
    ("hex content-length", req(b"POST /x HTTP/1.1", b"Content-Length: 0x5", body=b"hello"), 400),
    ("content-length with a space", req(b"POST /x HTTP/1.1", b"Content-Length: 1 0", body=b"hello"), 400),
    ("superscript-digit content-length", req(b"POST /x HTTP/1.1", b"Content-Length: \xb2", body=b"hi"), 400),
    ("content-length of 2**63", req(b"POST /x HTTP/1.1", b"Content-Length: 9223372036854775808", body=b"hello"), 400),
    ("content-length of 2**64+5", req(b"POST /x HTTP/1.1", b"Content-Length: 18446744073709551621", body=b"hello"), 400),
    ("content-length of 40 digits", req(b"POST /x HTTP/1.1", b"Content-Length: " + b"9" * 40, body=b"hello"), 400),
    ("chunk size of 2**64+5", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: chunked", body=b"10000000000000005\r\nhello\r\n0\r\n\r\n"), 400),
    ("content-length larger than the body", req(b"POST /x HTTP/1.1", b"Content-Length: 10", body=b"hello"), 400),
    ("unknown transfer coding", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: foo", body=b"hello"), 400),
    ("xchunked", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: xchunked", body=CHUNKED_HELLO), 400),
    ("chunked twice", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: chunked, chunked", body=CHUNKED_HELLO), 400),
    ("chunked on two lines", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=CHUNKED_HELLO), 400),
    ("gzip then chunked", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: gzip, chunked", body=CHUNKED_HELLO), 400),
    ("identity then chunked", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: identity, chunked", body=CHUNKED_HELLO), 400),
    ("identity alone", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: identity", body=b"hello"), 400),
    ("chunked then gzip", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: chunked, gzip", body=CHUNKED_HELLO), 400),
    ("chunked in HTTP/1.0", b"POST /x HTTP/1.0\r\nHost: p\r\n" + R + b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED_HELLO, 400),
    ("transfer-encoding folded", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: gzip,", b" chunked", body=CHUNKED_HELLO), 400),
    ("transfer-encoding with a space before the colon", req(b"POST /x HTTP/1.1", b"Transfer-Encoding : chunked", body=CHUNKED_HELLO), 400),
    ("content-length folded", req(b"POST /x HTTP/1.1", b"Content-Length:", b" 5", body=b"hello"), 400),
    ("invalid chunk size", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: chunked", body=b"zz\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk size overflow", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: chunked", body=b"f" * 40 + b"\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk without its CRLF", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: chunked", body=b"5\r\nhelloXX0\r\n\r\n"), 400),
    ("chunk extension with a control", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: chunked", body=b"5;a=\x01\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunked body never finished", req(b"POST /x HTTP/1.1", b"Transfer-Encoding: chunked", body=b"5\r\nhel"), 400),
]


def render(data: bytes, target: Target) -> bytes:
    return (
        data.replace(R, target.route)
        .replace(b"{AUTH}", target.authority.encode())
        .replace(b"{PORT}", str(target.upstream.port).encode())
    )


def test_the_table_has_at_least_a_hundred_requests():
    assert len(HOSTILE) >= 100
    assert len({name for name, _, _ in HOSTILE}) == len(HOSTILE)


@pytest.mark.parametrize(("data", "status"), [pytest.param(d, s, id=n) for n, d, s in HOSTILE])
def test_a_hostile_request_gets_a_4xx_and_reaches_nothing(target, data, status):
    seen = len(target.upstream.requests)
    got, answer = target.send(render(data, target))
    assert got == status, answer[:300]
    assert len(target.upstream.requests) == seen
    assert target.proxy.popen.poll() is None


def test_the_framing_requests_never_opened_an_upstream_connection_for_a_refused_head(target):
    """Framing is refused before anything is dialled (gunicorn, or our own checks).

    Counted between two marker connections (:meth:`RecordingUpstream.settle`), so that a
    connection an earlier case opened is never counted here late."""
    opened = target.upstream.settle()
    for name, data, _ in HOSTILE:
        if "content-length" in name or "transfer" in name or "chunked" in name or "coding" in name:
            if name == "invalid chunk size" or "CRLF" in name or "never finished" in name or "extension" in name:
                continue  # a broken chunk is found while the body streams
            if "larger than the body" in name:
                continue  # a short body is found while it streams
            target.send(render(data, target))
    assert target.upstream.settle() == opened + 1  # the second marker only


def test_a_normal_request_is_answered_after_the_table(target):
    target.assert_healthy()
    (last,) = target.upstream.requests[-1:]
    assert last.target == "/healthy" and last.header("Authorization").startswith("Bearer eyJ")


# -- properties ---------------------------------------------------------------------------------

# Pieces a routing header is made of: valid fragments and every separator that matters.
FRAGMENTS = [
    "127.0.0.1", "{PORT}", ":", ".", "@", "\\", "/", "?", "#", "[", "]", "%", "::1", "::ffff:", "localhost",
    "169.254.169.254", "2852039166", "0x", "a9fe", "fd00:ec2::254", "evil.example", "-", "_", " ", "\t",
    "\x00", "\x01", "\x7f", "\xe9", "0", "65536", "http:", "user",
]
HOSTS = [
    "127.0.0.1:{PORT}", "127.0.0.1", "127.0.0.1:1", "localhost:{PORT}", "LOCALHOST:{PORT}", "[::1]:{PORT}",
    "[::ffff:127.0.0.1]:{PORT}", "2130706433:{PORT}", "0x7f000001:{PORT}", "169.254.169.254", "evil.example:{PORT}",
]
ROUTING_VALUES = st.one_of(
    st.tuples(
        st.sampled_from(["", " ", "\t", "@", "user@"]),
        st.sampled_from(HOSTS),
        st.sampled_from(["", "", " ", "\t", ".", ":80", "/", "/x", "?", "@evil.example", "\\", "%00"]),
    ).map("".join),
    st.lists(st.sampled_from(FRAGMENTS), min_size=0, max_size=6).map("".join),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255, exclude_characters="\r\n"), max_size=30),
)


def expected_route(value: str, target: Target) -> int:
    """What the routing rules say about a header value, after gunicorn's own checks."""
    stripped = value.strip(" \t")
    if any(ord(c) < 0x20 and c != "\t" or c == "\x7f" for c in value):
        return 400  # gunicorn: a control character in a field value
    try:
        choose_upstream(
            pinned=None,
            scheme="http",
            header_name="X-Upstream-Host",
            header_value=stripped,
            allowlist=Allowlist.parse([target.authority]),
        )
    except RoutingError as exc:
        return exc.status
    return 200


@PROPERTY_SETTINGS
@given(value=ROUTING_VALUES)
def test_any_routing_header_value_gets_a_4xx_unless_it_names_the_allowed_upstream(target, value):
    value = value.replace("{PORT}", str(target.upstream.port))
    seen = len(target.upstream.requests)
    status, answer = target.send(
        b"GET /prop HTTP/1.1\r\nHost: p\r\nX-Upstream-Host: " + value.encode("latin-1") + b"\r\nConnection: close\r\n\r\n"
    )
    expected = expected_route(value, target)
    event(f"status {status}")
    assert status == expected, (value, answer[:200])
    if expected == 200:
        (recorded,) = target.upstream.wait_for_requests(seen + 1)[seen:]
        assert recorded.header("Host") == target.authority
    else:
        assert 400 <= status < 500
        assert len(target.upstream.requests) == seen


INTERESTING_NAMES = [
    "Host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade", "HTTP2-Settings", "Authorization",
    "Proxy-Authorization", "Cookie", "X-Upstream-Host", "X_Upstream_Host", "Expect", "TE", "Trailer", "Keep-Alive",
    "Proxy-Connection", "X-Forwarded-For", "Content-Type", "SCRIPT_NAME", "X-Custom", "x-custom", "Accept-Encoding",
]
HEADER_NAMES = st.one_of(
    st.sampled_from(INTERESTING_NAMES), st.text(alphabet="abcXYZ-_019!#$%&'*+.^`|~", min_size=1, max_size=12)
)
HEADER_VALUES = st.one_of(
    st.sampled_from(
        ["chunked", "gzip, chunked", "5", "0", "-1", "close", "keep-alive", "Authorization, X-Custom", "h2c", "websocket",
         "100-continue", "Bearer inbound", "trailers", "Upgrade, HTTP2-Settings", "evil.example", "127.0.0.1:1", ""]
    ),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=20),
)


@PROPERTY_SETTINGS
@given(headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=8))
def test_any_header_set_is_refused_or_forwarded_without_hop_by_hop_lines_and_with_our_token(target, headers):
    seen = len(target.upstream.requests)
    lines = b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers)
    status, answer = target.send(b"POST /headers HTTP/1.1\r\nHost: p\r\n" + target.route + lines + b"\r\n")
    event(f"status {status}")
    assert status == 200 or 400 <= status < 500, answer[:300]
    if status != 200:
        assert len(target.upstream.requests) == seen
        return
    (recorded,) = target.upstream.wait_for_requests(seen + 1)[seen:]
    names = [name.lower() for name, _ in recorded.headers]
    connection_named = {
        token.strip().lower() for name, value in headers if name.lower() == "connection" for token in value.split(",")
    }
    assert not set(names) & (HOP_BY_HOP - {"transfer-encoding"})
    assert not set(names) & (connection_named - {"", "host", "authorization", "x-forwarded-for"})
    assert "x-upstream-host" not in names
    assert recorded.header_all("Host") == [target.authority]
    (authorization,) = recorded.header_all("Authorization")
    assert authorization.startswith("Bearer eyJ") and "inbound" not in authorization


def test_still_healthy_after_the_properties(target):
    target.assert_healthy()
