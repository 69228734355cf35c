"""Security end to end: the real ``jwt-proxy`` CLI between a client and loopback upstreams.

Covers the allowlist, the link-local and metadata refusals (literal spellings and a name
that resolves there), request framing and h2c on the wire, the slow-client bound, token
hygiene over a mixed workload at debug level, the plain-HTTP warning, upstream TLS with a
private CA, ``HTTPS_PROXY``/``NO_PROXY``, and running under ``MemoryDenyWriteExecute``.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import requests

from jwt_proxy.worker import REQUEST_HEAD_TIMEOUT_S
from tests.conftest import JWT_PROXY
from tests.conftest import aws_env
from tests.conftest import free_port
from tests.upstream import RecordingUpstream
from tests.upstream import connect_tunnel
from tests.upstream import make_tls_files

pytestmark = pytest.mark.integration

INBOUND_SECRET = "inbound-authorization-7f3a9c"
COOKIE_SECRET = "cookie-session-b41d2e"
QUERY_SECRET = "query-secret-91c0aa"
FORBIDDEN = (403, "upstream not allowed\n")
RUN_TIMEOUT_S = 20

# Makes one name resolve to 169.254.169.254 inside the proxy process, through
# socket.getaddrinfo itself (no DNS server or /etc/hosts entry can be made for a test).
SITECUSTOMIZE = '''
import socket
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if isinstance(host, str) and host.lower().rstrip(".") == "metadata.test":
        host = "169.254.169.254"
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
'''


@pytest.fixture
def upstream():
    with RecordingUpstream() as server:
        yield server


@pytest.fixture
def metadata_name(tmp_path):
    """Environment for a proxy in which ``metadata.test`` resolves to 169.254.169.254."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}


def send_raw(port: int, data: bytes, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """Send ``data``, half-close, read until the proxy closes: (final status, whole answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return final_status(answer), answer


def final_status(answer: bytes) -> int:
    """The status of the first non-1xx response in ``answer`` (0 if there is none)."""
    for line in answer.split(b"\r\n"):
        if line.startswith(b"HTTP/1.1 ") and not line[9:10] == b"1":
            return int(line[9:12])
    return 0


def get(proxy, path: str = "/", host: str | None = None, **kwargs) -> requests.Response:
    headers = kwargs.pop("headers", {})
    if host is not None:
        headers["X-Upstream-Host"] = host
    return requests.get(proxy.url + path, headers=headers, timeout=10, **kwargs)


def run_cli(*flags: str) -> subprocess.CompletedProcess:
    port = free_port()
    return subprocess.run(
        [JWT_PROXY, "--listen-addr", f"127.0.0.1:{port}", "--metrics-enabled=false", *flags],
        env=aws_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


# -- 1. the allowlist ---------------------------------------------------------------------


def test_a_client_chosen_upstream_outside_the_allowlist_gets_403_and_nothing_is_dialled(start_proxy, upstream, sts):
    with RecordingUpstream() as other:
        proxy = start_proxy(
            "--upstream-scheme", "http", "--allowed-upstream-hosts", f"127.0.0.1:{upstream.port},*.allowed.test"
        )
        assert get(proxy, "/in", f"127.0.0.1:{upstream.port}").status_code == 200
        for host in (
            f"127.0.0.1:{other.port}",  # allowed host, other port
            f"localhost:{upstream.port}",  # same address, a name the list does not hold
            f"LOCALHOST.:{other.port}",
            "allowed.test",  # the bare parent of the wildcard
            "evil.test",
            f"127.0.0.1.:{upstream.port}",
        ):
            response = get(proxy, "/out", host)
            assert (response.status_code, response.text) == FORBIDDEN, host
        assert other.connections_opened == 0
        assert [r.target for r in upstream.requests] == ["/in"]
        assert sts.stats()["by_audience"] == {"http://127.0.0.1": 1}  # no token for refused hosts
        assert not [r for r in proxy.records() if r.get("msg") == "upstream request failed"]


@pytest.mark.parametrize(
    ("flags", "flag", "value"),
    [
        (["--upstream-host", "evil.example.com", "--allowed-upstream-hosts", "api.example.com"], "--upstream-host", "evil.example.com"),
        (["--upstream-host", "api.example.com:8443", "--allowed-upstream-hosts", "api.example.com:443"], "--upstream-host", "api.example.com:8443"),
        (["--upstream-host", "169.254.169.254"], "--upstream-host", "169.254.169.254"),
        (["--upstream-host", "0xa9fea9fe"], "--upstream-host", "0xa9fea9fe"),
        (["--allowed-upstream-hosts", "api.*.example.com"], "--allowed-upstream-hosts", "api.*.example.com"),
        (["--allowed-upstream-hosts", "ok.example.com,https://api.example.com"], "--allowed-upstream-hosts", "https://api.example.com"),
    ],
)
def test_a_bad_allowlist_or_a_pinned_host_outside_it_stops_the_start_with_one_line(flags, flag, value):
    result = run_cli(*flags)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert flag in lines[0] and repr(value) in lines[0]


def test_allowed_upstream_hosts_from_the_environment(start_proxy, upstream):
    proxy = start_proxy("--upstream-scheme", "http", env={"ALLOWED_UPSTREAM_HOSTS": f"other.test, 127.0.0.1:{upstream.port}"})
    assert get(proxy, "/", f"127.0.0.1:{upstream.port}").status_code == 200
    assert (get(proxy, "/", "localhost").status_code) == 403


# -- 2. link-local and metadata addresses ---------------------------------------------------


def test_metadata_addresses_are_refused_in_every_spelling_and_by_name(start_proxy, upstream, sts, metadata_name):
    proxy = start_proxy("--upstream-scheme", "http", env=metadata_name)
    for host in (
        "169.254.169.254",
        "169.254.169.254:80",
        "2852039166",
        "0251.0376.0251.0376",
        "0xa9fea9fe",
        "169.254.43518",
        "[::ffff:169.254.169.254]",
        "[fd00:ec2::254]",
        "[fd20:ce::254]",
        "[fe80::1]",
        "169.254.170.2",
    ):
        response = get(proxy, "/latest/meta-data/", host)
        assert (response.status_code, response.text) == FORBIDDEN, host
    assert sts.calls() == 0  # refused before a token is minted

    # A name: only the address it resolves to tells; refused at connect time.
    response = get(proxy, f"/latest/meta-data/iam?{QUERY_SECRET}", "metadata.test")
    assert (response.status_code, response.text) == FORBIDDEN
    record = proxy.wait_for_record(lambda r: r.get("msg") == "upstream address refused")
    assert record["level"] == "warn" and record["error_type"] == "forbidden"
    assert record["target"] == "http://metadata.test/latest/meta-data/iam"
    assert "169.254.169.254" in record["error"] and QUERY_SECRET not in json.dumps(record)
    assert get(proxy, "/fine", f"127.0.0.1:{upstream.port}").status_code == 200


def test_a_pinned_name_that_resolves_to_the_metadata_address_is_refused(start_proxy, sts, metadata_name):
    proxy = start_proxy("--upstream-host", "metadata.test", "--upstream-scheme", "http", env=metadata_name)
    response = get(proxy, "/latest/api/token")
    assert (response.status_code, response.text) == FORBIDDEN


# -- 3, 4, 5. request targets, framing and h2c on the wire ---------------------------------


FRAMING = [
    ("content-length and transfer-encoding", b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("transfer-encoding and content-length", b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("two different content-lengths", b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
    ("two equal content-lengths", b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
    ("a content-length list", b"Content-Length: 5, 5\r\n\r\nhello"),
    ("unknown transfer coding", b"Transfer-Encoding: foo\r\n\r\nhello"),
    ("gzip under chunked", b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("identity under chunked", b"Transfer-Encoding: identity, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("two transfer-encoding lines", b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("obsolete line fold", b"X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    ("folded transfer-encoding", b"Transfer-Encoding: gzip,\r\n chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("space before the colon", b"Transfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
]


def test_ambiguous_framing_is_refused_with_400_and_never_forwarded(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    for name, rest in FRAMING:
        status, _ = send_raw(proxy.port, b"POST /framing HTTP/1.1\r\nHost: proxy\r\n" + rest)
        assert status == 400, name
    for target in (b"http://127.0.0.1:1/x", b"http://127.0.0.1:1", b"/a\x00b", b"*"):
        status, _ = send_raw(proxy.port, b"GET " + target + b" HTTP/1.1\r\nHost: proxy\r\n\r\n")
        assert status == 400, target
    assert upstream.connections_opened == 0
    status, _ = send_raw(proxy.port, b"POST /ok HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert status == 200
    (recorded,) = upstream.wait_for_requests(1)
    assert recorded.target == "/ok" and recorded.chunked and recorded.body == b"hello"


def test_h2c_is_neither_served_nor_passed_on(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    for connection in (b"Upgrade, HTTP2-Settings", b"Upgrade"):
        status, answer = send_raw(
            proxy.port,
            b"GET /h2c HTTP/1.1\r\nHost: proxy\r\nConnection: " + connection + b"\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        )
        assert status == 200 and b" 101 " not in answer
    for recorded in upstream.wait_for_requests(2):
        names = {name.lower() for name, _ in recorded.headers}
        assert not names & {"upgrade", "http2-settings", "connection"}, recorded.headers
    # Prior knowledge: the HTTP/2 preface is not a request line.
    status, _ = send_raw(proxy.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert status == 400
    assert len(upstream.requests) == 2


def test_no_client_is_trusted_with_forwarding_headers(start_proxy, upstream):
    """gunicorn trusts loopback peers with SCRIPT_NAME/PATH_INFO and scheme headers by
    default: SCRIPT_NAME: /other then made a 500 and contradictory scheme headers a 400."""
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    status, _ = send_raw(proxy.port, b"GET /y HTTP/1.1\r\nHost: p\r\nSCRIPT_NAME: /other\r\nPATH_INFO: /admin\r\n\r\n")
    assert status == 200
    status, _ = send_raw(proxy.port, b"GET /z HTTP/1.1\r\nHost: p\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Ssl: off\r\n\r\n")
    assert status == 200
    first, second = upstream.wait_for_requests(2)
    assert first.target == "/y" and first.header("SCRIPT_NAME") is None
    assert second.target == "/z" and second.header("X-Forwarded-Proto") == "https"


# -- 10. slow clients -------------------------------------------------------------------------


def test_a_client_dripping_its_head_is_cut_off_and_the_thread_freed(start_proxy, upstream):
    proxy = start_proxy(
        "--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", "--workers", "1", "--threads", "1"
    )
    head = b"GET /drip HTTP/1.1\r\nHost: proxy\r\nX-Slow: " + b"a" * 40  # never finished
    closed_after: list[float] = []
    started = time.monotonic()

    def drip() -> None:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            try:
                for byte in head:
                    sock.sendall(bytes([byte]))
                    readable, _, _ = select.select([sock], [], [], 1.0)  # one byte a second
                    if readable and not sock.recv(1):
                        break
                else:
                    return  # never cut off
            except OSError:
                pass
            closed_after.append(time.monotonic() - started)

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    time.sleep(1.5)  # the only thread is now reading the dripped head
    response = requests.get(proxy.url + "/normal", timeout=25)
    answered_after = time.monotonic() - started
    dripper.join(30)
    assert response.status_code == 200
    assert closed_after, "the dripping connection was never closed"
    assert REQUEST_HEAD_TIMEOUT_S - 0.5 <= closed_after[0] <= REQUEST_HEAD_TIMEOUT_S + 2.5
    assert answered_after <= REQUEST_HEAD_TIMEOUT_S + 3.5
    assert [r.target for r in upstream.wait_for_requests(1)] == ["/normal"]
    record = proxy.wait_for_record(lambda r: "without a complete request head" in r.get("msg", ""))
    assert record["level"] == "info"


# -- 6. token hygiene -------------------------------------------------------------------------


def test_no_secret_reaches_any_output_over_a_mixed_workload_at_debug(start_proxy, upstream, sts, metadata_name):
    proxy = start_proxy("--upstream-scheme", "http", "--log-level", "debug", "--upstream-timeout", "1s", env=metadata_name)
    ours = f"127.0.0.1:{upstream.port}"
    secret_headers = {"Authorization": f"Bearer {INBOUND_SECRET}", "Cookie": f"session={COOKIE_SECRET}"}
    bodies: list[bytes] = []
    statuses: list[int] = []

    def call(method: str, path: str, host: str | None, **kwargs) -> None:
        headers = dict(secret_headers, **({"X-Upstream-Host": host} if host else {}))
        response = requests.request(method, proxy.url + path, headers=headers, timeout=10, allow_redirects=False, **kwargs)
        statuses.append(response.status_code)
        bodies.append(response.content)

    def raw(data: bytes) -> None:
        status, answer = send_raw(proxy.port, data)
        statuses.append(status)
        bodies.append(answer)

    # successes
    # (paths that do not echo: the body of /echo holds what the upstream received, token included)
    call("GET", f"/status/200?key={QUERY_SECRET}", ours)
    call("POST", f"/status/201?key={QUERY_SECRET}", ours, data=b"x" * 5000)
    call("GET", "/gzip", ours)
    call("GET", "/redirect", ours)
    call("HEAD", "/status/204", ours)
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    connection.request(
        "POST", f"/status/200?key={QUERY_SECRET}", body=iter([b"a" * 100, b"b" * 100]),
        headers={**secret_headers, "X-Upstream-Host": ours, "Transfer-Encoding": "chunked"}, encode_chunked=True,
    )
    statuses.append(connection.getresponse().status)
    connection.close()
    # 4xx
    call("GET", f"/no-routing-header?key={QUERY_SECRET}", None)
    call("GET", f"/bad?key={QUERY_SECRET}", f"user:{INBOUND_SECRET}@{ours}")
    call("GET", f"/bad?key={QUERY_SECRET}", f"{ours}/{INBOUND_SECRET}")
    call("GET", f"/meta?key={QUERY_SECRET}", "2852039166")
    call("GET", f"/meta?key={QUERY_SECRET}", "metadata.test")
    # token failure (a new audience, so nothing cached)
    sts.configure(fail_with="AccessDenied")
    call("GET", f"/token-failure?key={QUERY_SECRET}", f"localhost:{upstream.port}")
    sts.configure(fail_with=None)
    # upstream refused, and a timeout
    call("GET", f"/refused?key={QUERY_SECRET}", f"127.0.0.1:{free_port()}")
    call("GET", f"/slow-headers?delay=2&key={QUERY_SECRET}", ours)
    # hostile requests, and one client that leaves in the middle of its head
    auth = f"Authorization: Bearer {INBOUND_SECRET}\r\nCookie: session={COOKIE_SECRET}\r\n".encode()
    route = f"X-Upstream-Host: {ours}\r\n".encode()
    raw(f"GET /?key={QUERY_SECRET} HTTP/1.1 junk\r\nHost: p\r\n".encode() + auth + b"\r\n")
    raw(f"GET http://{ours}/?key={QUERY_SECRET} HTTP/1.1\r\nHost: p\r\n".encode() + route + auth + b"\r\n")
    # a path starting with "//" is forwarded (HEAD: the upstream's echo would hold the token)
    raw(f"HEAD //{ours}/?key={QUERY_SECRET} HTTP/1.1\r\nHost: p\r\n".encode() + route + auth + b"\r\n")
    raw(f"GET /bad%zz?key={QUERY_SECRET} HTTP/1.1\r\nHost: p\r\n".encode() + route + auth + b"\r\n")
    raw(f"GET /?key={QUERY_SECRET} HTTP/1.1\r\nHost: p\r\nAuthorization Bearer {INBOUND_SECRET}\r\n\r\n".encode())
    raw(f"GET /?key={QUERY_SECRET} HTTP/1.1\r\nHost: p\r\nCookie: s={COOKIE_SECRET}\x01\r\n\r\n".encode())
    raw(f"GET /?key={QUERY_SECRET} HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer\r\n {INBOUND_SECRET}\r\n\r\n".encode())
    raw(f"GET /?key={QUERY_SECRET} HTTP/1.1\r\nHost: p\r\nX-Big: {INBOUND_SECRET}{'a' * 9000}\r\n\r\n".encode())
    raw(f"GET /?key={QUERY_SECRET} HTTP/1.1\r\nHost: p\r\n".encode() + route + auth)  # no end of head: client leaves
    raw(f"POST /?key={QUERY_SECRET} HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n".encode() + route + auth + b"\r\n")

    assert statuses[:6] == [200, 201, 200, 302, 204, 200]
    assert statuses[6:14] == [400, 400, 400, 403, 403, 502, 502, 504]
    assert statuses[16] == 200  # the "//" path
    # the client that left gets nothing
    assert all(400 <= s < 500 for i, s in enumerate(statuses[14:]) if i not in (2, 8))

    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=10) as scrape:
        metrics_text = scrape.read().decode()
    proxy.wait_for_record(lambda r: r.get("path") == "/slow-headers")
    time.sleep(0.3)  # the last records
    tokens = {r.header("Authorization").split(" ", 1)[1] for r in upstream.requests}
    assert len(tokens) == 1 and all(t.startswith("eyJ") for t in tokens)
    output = proxy.output()
    assert '"level": "debug"' in output and "Ignored premature client disconnection" in output
    everything = output + metrics_text + b"".join(bodies).decode("latin-1")
    for secret in [INBOUND_SECRET, COOKIE_SECRET, QUERY_SECRET, *tokens, *(t.split(".")[2] for t in tokens)]:
        assert secret not in everything, secret
    for record in proxy.records():
        assert "?" not in str(record.get("target", "")) and "?" not in str(record.get("path", ""))


# -- 7. plain HTTP ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "warns"),
    [
        (["--upstream-scheme", "http"], True),
        (["--upstream-scheme", "http", "--upstream-host", "api.example.com"], True),
        (["--upstream-scheme", "http", "--upstream-host", "127.0.0.1:8081"], False),
        (["--upstream-scheme", "http", "--upstream-host", "localhost:8081"], False),
        (["--upstream-host", "api.example.com"], False),
    ],
)
def test_plain_http_warns_at_start_unless_pinned_to_loopback(start_proxy, flags, warns):
    proxy = start_proxy(*flags, "--log-format", "json")
    proxy.wait_for_record(lambda r: r.get("msg", "").startswith("Booting worker"))
    warnings = [r for r in proxy.records() if r.get("logger") == "jwt_proxy.config" and r.get("level") == "warn"]
    warnings = [r for r in warnings if "clear text" in r["msg"]]  # not the header-mode allowlist warning
    assert bool(warnings) is warns


def test_plain_gunicorn_with_the_conf_file_warns_too(start_proxy):
    from tests.conftest import BIN_DIR
    from tests.conftest import REPO

    proxy = start_proxy(
        command=[str(BIN_DIR / "gunicorn"), "-c", str(REPO / "conf" / "gunicorn.conf.py")],
        env={"UPSTREAM_SCHEME": "http", "WORKERS": "1", "THREADS": "2"},
    )
    record = proxy.wait_for_record(lambda r: r.get("logger") == "jwt_proxy.config" and "clear text" in r.get("msg", ""))
    assert record["level"] == "warn" and "clear text to any upstream" in record["msg"]


# -- 8. upstream TLS, environment proxies ------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_tls_files(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def tls_upstream(tls_files):
    with RecordingUpstream(ssl_context=tls_files.server_context()) as server:
        yield server


def test_upstream_ca_file_adds_a_private_ca_and_verification_stays_on(start_proxy, tls_files, tls_upstream):
    pinned = ("--upstream-host", f"127.0.0.1:{tls_upstream.port}")
    trusting = start_proxy(*pinned, "--upstream-ca-file", tls_files.ca_file)
    assert get(trusting, "/private-ca").status_code == 200
    assert tls_upstream.wait_for_requests(1)[0].target == "/private-ca"
    default_roots = start_proxy(*pinned)
    response = get(default_roots, "/unknown-ca")
    assert (response.status_code, response.text) == (502, "upstream unavailable\n")
    record = default_roots.wait_for_record(lambda r: r.get("msg") == "upstream request failed")
    assert "CERTIFICATE_VERIFY_FAILED" in record["error"]
    assert len(tls_upstream.requests) == 1


def test_https_proxy_and_no_proxy_are_honoured_and_netrc_is_not_read(start_proxy, tls_files, tls_upstream, tmp_path, sts):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login bob password hunter2\n")
    netrc.chmod(0o600)
    flags = ("--upstream-host", f"127.0.0.1:{tls_upstream.port}", "--upstream-ca-file", tls_files.ca_file)
    with RecordingUpstream(connect_tunnel) as forward_proxy:
        env = {"HTTPS_PROXY": forward_proxy.url, "NETRC": str(netrc), "HOME": str(tmp_path)}
        tunnelled = start_proxy(*flags, env=env)
        assert get(tunnelled, "/through-the-proxy?x=1").status_code == 200
        (connect,) = forward_proxy.wait_for_requests(1)
        assert (connect.method, connect.target) == ("CONNECT", f"127.0.0.1:{tls_upstream.port}")
        assert connect.header("Authorization") is None
        direct = start_proxy(*flags, env={**env, "NO_PROXY": "127.0.0.1"})
        assert get(direct, "/direct").status_code == 200
        assert len(forward_proxy.requests) == 1
    seen = tls_upstream.wait_for_requests(2)
    assert [r.target for r in seen] == ["/through-the-proxy?x=1", "/direct"]
    for recorded in seen:
        assert recorded.header("Authorization").startswith("Bearer eyJ")  # not netrc's Basic


# -- 11. W^X -----------------------------------------------------------------------------------

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
MDWE_WRAPPER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")
os.execv(sys.argv[1], sys.argv[1:])
"""


def mdwe_supported() -> bool:
    """Linux 6.3+ can refuse writable+executable memory per process (what systemd's
    MemoryDenyWriteExecute= does with a seccomp filter on older kernels)."""
    if not sys.platform.startswith("linux"):
        return False
    probe = subprocess.run(
        [sys.executable, "-c", "import ctypes; print(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0))"],
        capture_output=True, text=True, timeout=10,
    )
    return probe.returncode == 0 and probe.stdout.strip() != "-1"


@pytest.mark.skipif(not mdwe_supported(), reason="PR_SET_MDWE needs Linux 6.3 or later")
def test_the_proxy_runs_without_writable_executable_memory(start_proxy, tls_files, tls_upstream, sts):
    """MemoryDenyWriteExecute=yes in the unit: STS over boto3, TLS to the upstream and the
    gunicorn worker all work when the kernel refuses W+X mappings to the whole process tree."""
    command = [
        sys.executable, "-c", MDWE_WRAPPER, JWT_PROXY, "--workers", "1", "--threads", "4",
        "--upstream-host", f"127.0.0.1:{tls_upstream.port}", "--upstream-ca-file", tls_files.ca_file,
    ]
    proxy = start_proxy(command=command)
    assert get(proxy, "/wx").status_code == 200
    assert tls_upstream.wait_for_requests(1)[0].header("Authorization").startswith("Bearer eyJ")
    # The setting is inherited over exec and fork, so the master and its workers have it.
    inherited = subprocess.run(
        [sys.executable, "-c", MDWE_WRAPPER, sys.executable, "-c", "import ctypes; print(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0))"],
        capture_output=True, text=True, timeout=10,
    )
    assert inherited.stdout.strip() == str(PR_MDWE_REFUSE_EXEC_GAIN)
