from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from jwt_proxy.routing import Allowlist
from jwt_proxy.routing import Authority
from jwt_proxy.routing import HostPattern
from jwt_proxy.routing import RoutingError
from jwt_proxy.routing import Upstream
from jwt_proxy.routing import choose_upstream
from jwt_proxy.routing import is_restricted_address
from jwt_proxy.routing import literal_address
from jwt_proxy.routing import parse_authority
from jwt_proxy.routing import parse_host_pattern
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
        ("/x//a//b", "/x//a//b"),
        ("/", "/"),
        ("/p?", "/p?"),
        ("/p?q=1&q=2", "/p?q=1&q=2"),
        ("/p?next=//evil.example/x", "/p?next=//evil.example/x"),
        ("/a\\b", "/a\\b"),
        # "//" first is a path like any other: nothing here parses it into a URL
        ("//double//slash/?q=a+b", "//double//slash/?q=a+b"),
        ("//other.example/x", "//other.example/x"),
        ("///x", "///x"),
        ("//", "//"),
    ],
)
def test_request_target_kept_byte_for_byte(raw, target):
    assert request_target(raw) == target


@pytest.mark.parametrize(
    "raw",
    [
        "*",
        "other.example:443",
        "/bad%zz",
        "/bad%",
        "/frag#x",
        # absolute form: what a client sends a forward proxy
        "http://other.example/x?y=1",
        "https://other.example",
        "HTTP://other.example/",
        "http://other.example?q",
        # characters a request line never carries unencoded
        "/a b",
        "/a\tb",
        "/a\x00b",
        "/a\rb",
        "/a\nb",
        "/a\x7fb",
        "/caf\xe9",
        "",
    ],
)
def test_request_target_refused(raw):
    with pytest.raises(RoutingError) as info:
        request_target(raw)
    assert (info.value.status, info.value.body) == (400, "invalid request target")


# -- link-local and metadata addresses ----------------------------------------------------


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("169.254.169.254", "169.254.169.254"),
        ("2852039166", "169.254.169.254"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("0xa9fea9fe", "169.254.169.254"),
        ("0XA9FEA9FE", "169.254.169.254"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("169.254.43518", "169.254.169.254"),
        ("169.16689662", "169.254.169.254"),
        ("0251.0376.0xa9fe", "169.254.169.254"),
        ("127.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("4294967295", "255.255.255.255"),
        ("::ffff:169.254.169.254", "::ffff:169.254.169.254"),
        ("[fd00:ec2::254]", "fd00:ec2::254"),
        ("api.example.com", None),
        ("4294967296", None),
        ("256.1.1.1", None),
        ("1.2.3.4.5", None),
        ("08", None),
        ("0x", None),
        ("1e2", None),
        ("169.254.169.254.", None),
        ("a9fe.a9fe", None),
    ],
)
def test_literal_address_reads_every_spelling_a_resolver_accepts(host, address):
    expected = ipaddress.ip_address(address) if address else None
    assert literal_address(host) == expected


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(alphabet="0123456789xXabcdefABCDEF.", min_size=1, max_size=16))
def test_literal_address_agrees_with_the_c_library(host):
    """The same reading as libc's inet_aton, which getaddrinfo uses for numeric hosts."""
    try:
        expected = ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        expected = None
    assert literal_address(host) == expected


@pytest.mark.parametrize(
    ("address", "restricted"),
    [
        ("169.254.169.254", True),
        ("169.254.170.2", True),
        ("169.254.0.0", True),
        ("169.254.255.255", True),
        ("169.253.255.255", False),
        ("169.255.0.0", False),
        ("fe80::1", True),
        ("fe80::1%eth0", True),
        ("febf:ffff::1", True),
        ("fec0::1", False),
        ("fd00:ec2::254", True),
        ("fd00:ec2::23", True),
        ("fd20:ce::254", True),
        ("fd00:ec2::1", False),
        ("::ffff:169.254.169.254", True),
        ("::ffff:a9fe:a9fe", True),
        ("64:ff9b::a9fe:a9fe", True),
        # IPv4-compatible (deprecated), SIIT-translated, local-use NAT64 and 6to4 forms
        ("::169.254.169.254", True),
        ("::a9fe:a9fe", True),
        ("::ffff:0:a9fe:a9fe", True),
        ("64:ff9b:1::a9fe:a9fe", True),
        ("2002:a9fe:a9fe::1", True),
        ("::7f00:1", False),
        ("2002:7f00:1::1", False),
        ("::ffff:127.0.0.1", False),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("::1", False),
        ("2001:db8::1", False),
    ],
)
def test_restricted_addresses(address, restricted):
    assert is_restricted_address(ipaddress.ip_address(address)) is restricted


# -- the allowlist ------------------------------------------------------------------------

ALLOWLIST = Allowlist.parse(
    ["api.example.com", "*.svc.example.com", "pinned.example.com:8443", "10.0.0.1", "[FD00:EC2::254]", "Upper.Example.COM."]
)


@pytest.mark.parametrize(
    ("scheme", "host", "allowed"),
    [
        ("https", "api.example.com", True),
        ("https", "API.EXAMPLE.COM", True),
        ("https", "api.example.com.", True),
        ("https", "api.example.com:8443", True),  # no port in the pattern: any port
        ("http", "api.example.com:80", True),
        ("https", "x.api.example.com", False),
        ("https", "api.example.com.evil.net", False),
        ("https", "apiXexample.com", False),
        ("https", "example.com", False),
        # wildcards: one or more labels, never the bare parent
        ("https", "a.svc.example.com", True),
        ("https", "a.b.svc.example.com", True),
        ("https", "A.SVC.Example.Com.", True),
        ("https", "svc.example.com", False),
        ("https", "asvc.example.com", False),
        ("https", "a.svc.example.com.evil.net", False),
        # a port in the pattern: that port only (the scheme's default when none is given)
        ("https", "pinned.example.com:8443", True),
        ("https", "pinned.example.com", False),
        ("https", "pinned.example.com:443", False),
        ("http", "pinned.example.com:80", False),
        # IP addresses: their canonical spelling only
        ("https", "10.0.0.1", True),
        ("https", "10.0.0.1:9000", True),
        ("https", "10.0.0.1.", False),
        ("https", "[::ffff:10.0.0.1]", False),
        ("https", "[::ffff:a00:1]", False),
        ("https", "012.0.0.1", False),
        ("https", "167772161", False),
        ("https", "10.0.0.2", False),
        ("https", "[fd00:ec2::254]", True),
        ("https", "[fd00:0ec2:0:0:0:0:0:254]", True),
        ("https", "[fd00:ec2::253]", False),
        ("https", "upper.example.com", True),
        ("https", "evil.example", False),
    ],
)
def test_allowlist_table(scheme, host, allowed):
    assert ALLOWLIST.allows(Upstream(scheme, parse_authority(host))) is allowed


def test_an_empty_allowlist_allows_any_host():
    empty = Allowlist.parse([])
    assert not empty
    assert empty.allows(Upstream("https", parse_authority("anything.example:1")))


def test_a_port_in_the_pattern_matches_the_default_port_of_the_scheme():
    allowlist = Allowlist.parse(["api.example.com:443"])
    assert allowlist.allows(Upstream("https", parse_authority("api.example.com")))
    assert not allowlist.allows(Upstream("http", parse_authority("api.example.com")))


def test_wildcards_never_match_ip_addresses():
    with pytest.raises(ValueError):
        parse_host_pattern("*.0.0.1")  # the suffix of an address is an address
    allowlist = Allowlist([HostPattern("*.0.0.1", "0.0.1", wildcard=True)])  # built by hand
    assert not allowlist.allows(Upstream("http", parse_authority("127.0.0.1")))
    assert not allowlist.allows(Upstream("http", parse_authority("10.0.0.1")))


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "*",
        "*.",
        "**.example.com",
        "*example.com",
        "api.*.example.com",
        "api.example.*",
        "https://api.example.com",
        "api.example.com/path",
        "user@api.example.com",
        "api.example.com:0",
        "api.example.com:65536",
        "api.example.com:",
        "api.example.com:https",
        "api example.com",
        "api\\example.com",
        "fd00:ec2::254",
        "[fd00:ec2::254",
        "[fe80::1%25eth0]",
        "2852039166",
        "0xa9fea9fe",
        "010.0.0.1",
        "*.10.0.0.1",
        "*.[fd00::1]",
        "-api.example.com",
        "a..b",
    ],
)
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(ValueError):
        parse_host_pattern(pattern)


def test_ip_patterns_name_their_address_and_host_names_do_not():
    allowlist = Allowlist.parse(["169.254.169.254", "[::ffff:169.254.170.2]", "[FD00:EC2::254]", "metadata.example"])
    assert allowlist.names_address(ipaddress.ip_address("169.254.169.254"))
    assert allowlist.names_address(ipaddress.ip_address("::ffff:169.254.169.254"))
    assert allowlist.names_address(ipaddress.ip_address("169.254.170.2"))
    assert allowlist.names_address(ipaddress.ip_address("fd00:ec2::254"))
    assert not allowlist.names_address(ipaddress.ip_address("169.254.169.253"))
    assert allowlist.addresses == {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("169.254.170.2"),
        ipaddress.ip_address("fd00:ec2::254"),
    }


# -- choose_upstream with an allowlist -----------------------------------------------------


def choose(value, allowlist=()):
    return choose_upstream(
        pinned=None,
        scheme="http",
        header_name="X-Upstream-Host",
        header_value=value,
        allowlist=Allowlist.parse(allowlist),
    )


@pytest.mark.parametrize(
    "value",
    [
        "169.254.169.254",
        "169.254.169.254:80",
        "2852039166",
        "0251.0376.0251.0376",
        "0xa9fea9fe",
        "169.254.43518",
        "[::ffff:169.254.169.254]",
        "[::ffff:a9fe:a9fe]",
        "[64:ff9b::a9fe:a9fe]",
        "[fd00:ec2::254]",
        "[FD00:EC2::254]:80",
        "[fd20:ce::254]",
        "[fe80::1]",
        "169.254.170.2",
    ],
)
def test_metadata_addresses_in_any_spelling_are_403_without_the_allowlist(value):
    with pytest.raises(RoutingError) as info:
        choose(value)
    assert (info.value.status, info.value.body) == (403, "upstream not allowed")


def test_a_metadata_address_named_in_the_allowlist_is_allowed():
    assert choose("169.254.169.254", ["169.254.169.254"]).authority.host == "169.254.169.254"
    assert choose("[fd00:ec2::254]", ["[fd00:ec2::254]:80"]).authority.port is None
    with pytest.raises(RoutingError):  # the allowlist names the dotted quad, not this spelling
        choose("2852039166", ["169.254.169.254"])


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("api.example.com", None),
        ("a.svc.example.com:8443", None),
        ("evil.example.com", 403),
        ("svc.example.com", 403),
        ("api.example.com@evil.example", 400),
        ("api.example.com\\@evil.example", 400),
        ("evil.example\\api.example.com", 400),
        ("api.example.com/x", 400),
        ("api.example.com\x00", 400),
        ("api.example.com\r\nX: y", 400),
        ("api.example.com ", 400),
        ("http://api.example.com", 400),
        ("", 400),
        (None, 400),
    ],
)
def test_header_mode_allowlist(value, status):
    allowlist = ["api.example.com", "*.svc.example.com"]
    if status is None:
        assert choose(value, allowlist).authority == parse_authority(value)
        return
    with pytest.raises(RoutingError) as info:
        choose(value, allowlist)
    assert info.value.status == status


def test_pinned_mode_consults_neither_header_nor_allowlist_per_request():
    """The pinned host was checked at start-up (Config.from_options)."""
    upstream = choose_upstream(
        pinned=Authority("api.example.com"),
        scheme="https",
        header_name="X-Upstream-Host",
        header_value="169.254.169.254",
        allowlist=Allowlist.parse(["other.example"]),
    )
    assert upstream.base_url == "https://api.example.com"
