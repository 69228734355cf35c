"""Which header lines cross the proxy: tables of lines in, lines out."""

from __future__ import annotations

import pytest

from jwt_proxy.headers import HOP_BY_HOP
from jwt_proxy.headers import append_forwarded_for
from jwt_proxy.headers import filter_request_headers
from jwt_proxy.headers import filter_response_headers
from jwt_proxy.headers import response_framing


def test_hop_by_hop_names_are_the_rfc_set_plus_proxy_connection_and_http2_settings():
    assert HOP_BY_HOP == {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "http2-settings",
    }


REQUEST_CASES = [
    pytest.param(
        [("Accept", "*/*"), ("X-Custom", "1")],
        (),
        [("Accept", "*/*"), ("X-Custom", "1")],
        id="plain lines kept",
    ),
    pytest.param(
        [(name.title(), "v") for name in sorted(HOP_BY_HOP)] + [("X-Kept", "1")],
        (),
        [("X-Kept", "1")],
        id="every hop-by-hop name dropped",
    ),
    pytest.param(
        [("CONNECTION", "keep-alive"), ("kEEp-aLIVE", "timeout=5"), ("TE", "trailers"), ("X-Kept", "1")],
        (),
        [("X-Kept", "1")],
        id="names compared in any case",
    ),
    pytest.param(
        [("Host", "proxy:8080"), ("Content-Length", "5"), ("Transfer-Encoding", "chunked"), ("X-Kept", "1")],
        (),
        [("X-Kept", "1")],
        id="host and framing dropped for the caller to set",
    ),
    pytest.param(
        [("Connection", "X-Foo, x-bar"), ("X-Foo", "1"), ("X-Bar", "2"), ("X-Baz", "3")],
        (),
        [("X-Baz", "3")],
        id="names listed in Connection dropped",
    ),
    pytest.param(
        [("Connection", "close"), ("Connection", " X-One ,,X-Two "), ("X-One", "1"), ("X-Two", "2"), ("X-Three", "3")],
        (),
        [("X-Three", "3")],
        id="several Connection lines, spaces and empty items",
    ),
    pytest.param(
        [("Connection", "Authorization"), ("Authorization", "Basic client"), ("X-Kept", "1")],
        (),
        [("X-Kept", "1")],
        id="client naming Authorization only strips its own copy",
    ),
    pytest.param(
        [("X-Upstream-Host", "api.example.com"), ("x-upstream-host", "other"), ("X-Kept", "1")],
        ("X-Upstream-Host",),
        [("X-Kept", "1")],
        id="routing header dropped in any case",
    ),
    pytest.param(
        [("X-Dup", "1"), ("Accept", "a"), ("X-Dup", "2"), ("x-dup", "3"), ("X-CaSe", "v")],
        (),
        [("X-Dup", "1"), ("Accept", "a"), ("X-Dup", "2"), ("x-dup", "3"), ("X-CaSe", "v")],
        id="order case and duplicates kept",
    ),
    pytest.param(
        [("Expect", "100-continue"), ("Cookie", "a=1"), ("Authorization", "Basic x")],
        (),
        [("Expect", "100-continue"), ("Cookie", "a=1"), ("Authorization", "Basic x")],
        id="end-to-end lines kept (caller replaces Authorization)",
    ),
    pytest.param([], ("X-Upstream-Host",), [], id="empty"),
]


@pytest.mark.parametrize(("lines", "also_drop", "expected"), REQUEST_CASES)
def test_filter_request_headers(lines, also_drop, expected):
    assert filter_request_headers(lines, also_drop=also_drop) == expected


def test_filter_request_headers_accepts_any_iterable():
    lines = iter([("Connection", "X-Foo"), ("X-Foo", "1"), ("X-Kept", "1")])
    assert filter_request_headers(lines) == [("X-Kept", "1")]


def test_injected_token_survives_a_connection_header_naming_authorization():
    """The caller's order of operations: filter first, then set the token."""
    inbound = [("Connection", "Authorization, close"), ("Authorization", "Basic client")]
    outbound = filter_request_headers(inbound)
    outbound.append(("Authorization", "Bearer jwt"))
    assert outbound == [("Authorization", "Bearer jwt")]


RESPONSE_CASES = [
    pytest.param(
        [("Content-Type", "text/plain"), ("Content-Length", "5")],
        [("Content-Type", "text/plain"), ("Content-Length", "5")],
        id="content-length kept",
    ),
    pytest.param(
        [("Set-Cookie", "a=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT"), ("Set-Cookie", "b=2")],
        [("Set-Cookie", "a=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT"), ("Set-Cookie", "b=2")],
        id="set-cookie lines stay separate",
    ),
    pytest.param(
        [("Content-Encoding", "gzip"), ("Content-Length", "34"), ("X-Custom-HEADER", "v")],
        [("Content-Encoding", "gzip"), ("Content-Length", "34"), ("X-Custom-HEADER", "v")],
        id="encoding and case kept",
    ),
    pytest.param(
        [
            ("Connection", "close, X-Secret-Hop"), ("X-Secret-Hop", "1"), ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"), ("X-Kept", "yes"),
        ],
        [("X-Kept", "yes")],
        id="hop-by-hop and connection-named dropped",
    ),
    pytest.param(
        [("Transfer-Encoding", "chunked"), ("Trailer", "X-Sum"), ("Upgrade", "h2c"), ("X-Kept", "1")],
        [("X-Kept", "1")],
        id="transfer-encoding trailer upgrade dropped",
    ),
    pytest.param(
        [("Content-Length", "10"), ("Transfer-Encoding", "chunked"), ("X-Kept", "1")],
        [("X-Kept", "1")],
        id="content-length next to transfer-encoding dropped (RFC 9112 6.3)",
    ),
    pytest.param(
        [("Location", "/elsewhere"), ("Vary", "Accept"), ("Vary", "Origin")],
        [("Location", "/elsewhere"), ("Vary", "Accept"), ("Vary", "Origin")],
        id="duplicates in order",
    ),
]


@pytest.mark.parametrize(("lines", "expected"), RESPONSE_CASES)
def test_filter_response_headers(lines, expected):
    assert filter_response_headers(lines) == expected


XFF_CASES = [
    pytest.param([("Host", "h")], "10.0.0.9", [("Host", "h"), ("X-Forwarded-For", "10.0.0.9")], id="added"),
    pytest.param(
        [("X-Forwarded-For", "1.1.1.1"), ("Host", "h")],
        "10.0.0.9",
        [("X-Forwarded-For", "1.1.1.1, 10.0.0.9"), ("Host", "h")],
        id="appended in place",
    ),
    pytest.param(
        [("x-forwarded-for", "1.1.1.1, 2.2.2.2"), ("Host", "h"), ("X-Forwarded-For", "3.3.3.3")],
        "10.0.0.9",
        [("x-forwarded-for", "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9"), ("Host", "h")],
        id="several lines combined into the first",
    ),
    pytest.param(
        [("X-Forwarded-For", "")], "::1", [("X-Forwarded-For", "::1")], id="empty inbound value"
    ),
    pytest.param(
        [("X-Forwarded-For", "1.1.1.1")], "", [("X-Forwarded-For", "1.1.1.1")], id="unknown client kept as is"
    ),
    pytest.param([("Host", "h")], "", [("Host", "h")], id="nothing to add"),
]


@pytest.mark.parametrize(("lines", "client_addr", "expected"), XFF_CASES)
def test_append_forwarded_for(lines, client_addr, expected):
    assert append_forwarded_for(lines, client_addr) == expected


def test_append_forwarded_for_does_not_mutate_its_input():
    lines = [("X-Forwarded-For", "1.1.1.1")]
    append_forwarded_for(lines, "10.0.0.9")
    assert lines == [("X-Forwarded-For", "1.1.1.1")]


def test_repeated_equal_content_length_lines_reach_the_client_as_one():
    lines = [("Content-Length", "5"), ("X-A", "1"), ("content-length", "5")]
    assert filter_response_headers(lines) == [("Content-Length", "5"), ("X-A", "1")]


@pytest.mark.parametrize(
    ("lines", "framing"),
    [
        ([], (None, False, False, None)),
        ([("Content-Length", "5")], (5, False, False, None)),
        ([("Content-Length", "5"), ("Content-Length", "5")], (5, False, False, None)),
        ([("Content-Length", " 007 ")], (7, False, False, None)),
        ([("Transfer-Encoding", "chunked")], (None, True, False, None)),
        ([("Transfer-Encoding", " Chunked ")], (None, True, False, None)),
        ([("Transfer-Encoding", "gzip, chunked")], (None, False, True, "unsupported Transfer-Encoding")),
        ([("Transfer-Encoding", "gzip")], (None, False, True, "unsupported Transfer-Encoding")),
        ([("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")], (None, False, True, "unsupported Transfer-Encoding")),
        ([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], (None, False, True, "unsupported Transfer-Encoding")),
        ([("Connection", "close")], (None, False, True, None)),
        ([("Content-Length", "5"), ("Content-Length", "30")], (None, False, True, "differing Content-Length values")),
        ([("Content-Length", "+5")], (None, False, True, "invalid Content-Length")),
        ([("Content-Length", "-1")], (None, False, True, "invalid Content-Length")),
        ([("Content-Length", "5, 5")], (None, False, True, "invalid Content-Length")),
        ([("Content-Length", "abc")], (None, False, True, "invalid Content-Length")),
        ([("Content-Length", "")], (None, False, True, "invalid Content-Length")),
        ([("Content-Length", "9223372036854775808")], (None, False, True, "invalid Content-Length")),
        (
            [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
            (None, False, True, "Content-Length with Transfer-Encoding"),
        ),
        (
            [("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
            (None, False, True, "Content-Length with Transfer-Encoding"),
        ),
    ],
)
def test_response_framing(lines, framing):
    assert tuple(response_framing(lines)) == framing


def test_an_http_1_0_response_closes_unless_it_asks_to_stay():
    assert response_framing([], http_1_0=True).close
    assert not response_framing([("Connection", "Keep-Alive")], http_1_0=True).close
    assert not response_framing([("Keep-Alive", "timeout=5")], http_1_0=True).close
