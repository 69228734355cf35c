from __future__ import annotations

import pytest

from jwt_proxy.routing import Authority
from jwt_proxy.routing import RoutingError
from jwt_proxy.routing import Upstream
from jwt_proxy.routing import choose_upstream
from jwt_proxy.routing import parse_authority
from jwt_proxy.routing import request_target


@pytest.mark.parametrize(
    ("text", "authority"),
    [
        ("api.example.com", Authority("api.example.com")),
        ("api.example.com:8443", Authority("api.example.com", 8443)),
        ("127.0.0.1:80", Authority("127.0.0.1", 80)),
        ("[2001:db8::1]:8443", Authority("2001:db8::1", 8443)),
        ("[::1]", Authority("::1")),
        ("localhost", Authority("localhost")),
        ("example.com.", Authority("example.com.")),
    ],
)
def test_plain_authorities(text, authority):
    assert parse_authority(text) == authority


@pytest.mark.parametrize(
    "text",
    [
        "",
        "https://api.example.com",
        "api.example.com/path",
        "user@api.example.com",
        "api.example.com:0",
        "api.example.com:65536",
        "api.example.com:",
        "api.example.com:http",
        "api example.com",
        "api.example.com\r\nX: y",
        "api\\example.com",
        "[::1",
        "[notv6]:80",
        "2001:db8::1",
        "-bad.example.com",
        "a..b",
        "host:80:90",
    ],
)
def test_not_plain_authorities(text):
    with pytest.raises(ValueError):
        parse_authority(text)


def test_pinned_mode_ignores_the_header():
    upstream = choose_upstream(pinned=Authority("api.example.com"), scheme="https", header_name="X-Upstream-Host", header_value="evil.example")
    assert upstream.base_url == "https://api.example.com"


def test_header_mode_missing_header_names_it():
    with pytest.raises(RoutingError) as info:
        choose_upstream(pinned=None, scheme="https", header_name="X-Upstream-Host", header_value=None)
    assert info.value.status == 400
    assert "X-Upstream-Host" in info.value.body


def test_header_mode_rejects_non_plain_values():
    with pytest.raises(RoutingError) as info:
        choose_upstream(pinned=None, scheme="https", header_name="X-Upstream-Host", header_value="evil.example/x")
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("scheme", "authority", "audience", "host_header"),
    [
        ("https", Authority("API.Example.com", 443), "https://api.example.com", "API.Example.com"),
        ("https", Authority("api.example.com", 8443), "https://api.example.com", "api.example.com:8443"),
        ("http", Authority("2001:db8::1", 8443), "http://[2001:db8::1]", "[2001:db8::1]:8443"),
        ("http", Authority("example.com.", None), "http://example.com", "example.com."),
    ],
)
def test_derived_audience_and_host_header(scheme, authority, audience, host_header):
    upstream = Upstream(scheme, authority)
    assert upstream.audience == audience
    assert upstream.host_header == host_header


@pytest.mark.parametrize(
    ("raw", "target"),
    [
        ("/a%2Fb", "/a%2Fb"),
        ("/x/%2E%2E/y", "/x/%2E%2E/y"),
        ("/./a/../b", "/./a/../b"),
        ("//a//b", "//a//b"),
        ("/p?", "/p?"),
        ("/p?q=1&q=2", "/p?q=1&q=2"),
        ("http://other.example/x?y=1", "/x?y=1"),
        ("https://other.example", "/"),
        ("http://other.example?q", "/?q"),
    ],
)
def test_request_target_kept_byte_for_byte(raw, target):
    assert request_target(raw) == target


@pytest.mark.parametrize("raw", ["*", "other.example:443", "/bad%zz", "/frag#x"])
def test_request_target_refused(raw):
    with pytest.raises(RoutingError) as info:
        request_target(raw)
    assert info.value.status == 400
