"""The proxy end to end: the real ``jwt-proxy`` CLI (gunicorn and all) between a client and a
loopback upstream that records what arrives on the wire, with ``jwt-proxy local-sts``
reached by boto3 over HTTP.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import http.client
import socket
import time

import jwt
import pytest
import requests

from tests.upstream import RecordingUpstream

pytestmark = pytest.mark.integration

SECRET = "inbound-secret-api-key-5e3f"


@pytest.fixture
def upstream():
    with RecordingUpstream() as server:
        yield server


def bearer(recorded) -> str:
    value = recorded.header("Authorization")
    assert value is not None and value.startswith("Bearer "), value
    return value[len("Bearer ") :]


def verify(token: str, sts, audience) -> dict:
    keys = jwt.PyJWKClient(sts.url + "/.well-known/jwks.json")
    key = keys.get_signing_key_from_jwt(token)
    return jwt.decode(token, key.key, algorithms=["RS256", "ES384"], audience=audience, issuer=sts.url)


def send_raw(port: int, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None = None):
    """A request whose target and headers go on the wire exactly as given."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
    for name, value in headers:
        connection.putheader(name, value)
    connection.endheaders(body)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response, data


# -- tokens and routing ------------------------------------------------------------


def test_pinned_upstream_gets_a_verified_bearer_instead_of_the_clients(start_proxy, upstream, sts):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    response = requests.get(proxy.url + "/hello", headers={"Authorization": f"Bearer {SECRET}"}, timeout=10)
    assert response.status_code == 200
    (recorded,) = upstream.wait_for_requests(1)
    assert recorded.header_all("Authorization") == [recorded.header("Authorization")]
    claims = verify(bearer(recorded), sts, "http://127.0.0.1")
    assert claims["aud"] == "http://127.0.0.1"
    assert recorded.header("Host") == f"127.0.0.1:{upstream.port}"
    assert recorded.header("X-Forwarded-For") == "127.0.0.1"
    assert SECRET not in recorded.raw_head.decode("latin-1")


def test_header_mode_routes_by_header_and_strips_it(start_proxy, upstream):
    proxy = start_proxy("--upstream-scheme", "http")
    response = requests.get(
        proxy.url + "/x", headers={"X-Upstream-Host": f"127.0.0.1:{upstream.port}", "X-Forwarded-For": "10.1.2.3"}, timeout=10
    )
    assert response.status_code == 200
    (recorded,) = upstream.wait_for_requests(1)
    assert recorded.header("X-Upstream-Host") is None
    assert recorded.header("Host") == f"127.0.0.1:{upstream.port}"
    assert recorded.header("X-Forwarded-For") == "10.1.2.3, 127.0.0.1"


def test_header_mode_errors(start_proxy, upstream):
    proxy = start_proxy("--upstream-scheme", "http")
    missing = requests.get(proxy.url + "/x", timeout=10)
    assert missing.status_code == 400
    assert "X-Upstream-Host" in missing.text
    for bad in (f"127.0.0.1:{upstream.port}/path", f"user@127.0.0.1:{upstream.port}", "http://127.0.0.1", "127.0.0.1:99999"):
        response = requests.get(proxy.url + "/x", headers={"X-Upstream-Host": bad}, timeout=10)
        assert response.status_code == 400, bad
    assert upstream.requests == []


def test_host_mode_uses_the_host_line(start_proxy, upstream):
    proxy = start_proxy("--upstream-scheme", "http", "--host-header", "Host")
    response, _ = send_raw(proxy.port, "GET", "/via-host", [("Host", f"127.0.0.1:{upstream.port}")])
    assert response.status == 200
    (recorded,) = upstream.wait_for_requests(1)
    assert recorded.target == "/via-host"
    assert recorded.header("Host") == f"127.0.0.1:{upstream.port}"


def test_connect_is_refused(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n\r\n".encode())
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert b" 405 " in status_line + b" "
    assert upstream.requests == []


def test_absolute_form_target_never_changes_the_upstream(start_proxy, upstream):
    """A forward-proxy request line is refused (400), not reduced to its path: neither the
    host it names nor the pinned upstream sees anything. A target starting with ``//``
    is a path: it goes to the pinned upstream as it was sent."""
    with RecordingUpstream() as other:
        proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
        for target in (f"http://127.0.0.1:{other.port}/abs?x=1", f"http://127.0.0.1:{other.port}"):
            response, body = send_raw(proxy.port, "GET", target, [("Host", f"127.0.0.1:{other.port}")])
            assert (response.status, body) == (400, b"invalid request target\n"), target
        response, _ = send_raw(proxy.port, "GET", f"//127.0.0.1:{other.port}/abs", [("Host", "p")])
        assert response.status == 200
        assert requests.get(proxy.url + "/after", timeout=10).status_code == 200
        assert [r.target for r in upstream.wait_for_requests(2)] == [f"//127.0.0.1:{other.port}/abs", "/after"]
        assert other.requests == []


def test_static_audiences_are_normalized_into_one_sts_call(start_proxy, upstream, sts):
    proxy = start_proxy(
        "--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", "--token-audience", "b,a", "--token-audience", "b"
    )
    for _ in range(3):
        assert requests.get(proxy.url + "/", timeout=10).status_code == 200
    stats = sts.stats()
    assert stats["calls"] == 1
    assert stats["by_audience"] == {"a,b": 1}
    claims = verify(bearer(upstream.wait_for_requests(3)[-1]), sts, "a")
    assert sorted(claims["aud"]) == ["a", "b"]


def test_derived_audiences_one_entry_per_host(start_proxy, upstream, sts):
    proxy = start_proxy("--upstream-scheme", "http")
    for host in (f"127.0.0.1:{upstream.port}", f"LOCALHOST:{upstream.port}", f"127.0.0.1:{upstream.port}", f"localhost:{upstream.port}"):
        assert requests.get(proxy.url + "/", headers={"X-Upstream-Host": host}, timeout=10).status_code == 200
    assert sts.stats()["by_audience"] == {"http://127.0.0.1": 1, "http://localhost": 1}
    tokens = [bearer(r) for r in upstream.wait_for_requests(4)]
    assert verify(tokens[1], sts, "http://localhost")["aud"] == "http://localhost"


def test_cold_cache_burst_costs_one_sts_call_per_worker(start_proxy, upstream, sts):
    sts.configure(stall_s=0.5)
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", "--workers", "2", "--threads", "32")
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(lambda _: requests.get(proxy.url + "/", timeout=20).status_code, range(50)))
    assert statuses == [200] * 50
    assert 1 <= sts.calls() <= 2


def test_failed_fetch_gives_502_calls_no_upstream_and_caches_nothing(start_proxy, upstream, sts):
    sts.configure(fail_with="AccessDenied")
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    response = requests.get(proxy.url + "/q?secret=1", timeout=10)
    assert (response.status_code, response.text) == (502, "token unavailable\n")
    assert "AccessDenied" not in response.text
    assert upstream.requests == []
    record = proxy.wait_for_record(lambda r: r.get("level") == "error" and r.get("error_class") == "AccessDenied")
    assert record["target"].endswith("/q")
    sts.configure(fail_with=None)
    time.sleep(1.1)  # the failure memory holds the 502 for one second
    assert requests.get(proxy.url + "/", timeout=10).status_code == 200


# -- forwarding on the wire --------------------------------------------------------


@pytest.mark.parametrize("target", ["/a%2Fb", "/x/%2E%2E/y", "/./a/../b", "/x//a//b", "/p?", "/p?q=1&q=2&r=%20"])
def test_request_target_reaches_the_upstream_unchanged(start_proxy, upstream, target):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    response, _ = send_raw(proxy.port, "GET", target, [("Host", "proxy")])
    assert response.status == 200
    (recorded,) = upstream.wait_for_requests(1)
    assert recorded.target == target


def test_content_length_upload_is_byte_identical(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    body = bytes(range(256)) * 4000
    response, _ = send_raw(proxy.port, "PUT", "/upload", [("Host", "proxy"), ("Content-Length", str(len(body)))], body)
    assert response.status == 200
    (recorded,) = upstream.wait_for_requests(1)
    assert recorded.body == body
    assert recorded.header("Content-Length") == str(len(body))
    assert recorded.header("Transfer-Encoding") is None and not recorded.chunked


def test_chunked_upload_goes_chunked(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    parts = [b"first-part-", b"x" * 70000, b"-last"]
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    connection.request("POST", "/chunks", body=iter(parts), headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
    assert connection.getresponse().status == 200
    connection.close()
    (recorded,) = upstream.wait_for_requests(1)
    assert recorded.chunked and recorded.body == b"".join(parts)
    assert recorded.header("Content-Length") is None


def test_hop_by_hop_headers_dropped_both_ways_and_token_kept(start_proxy, upstream, sts):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    response, _ = send_raw(
        proxy.port,
        "GET",
        "/echo",
        [
            ("Host", "proxy"),
            ("Connection", "keep-alive, Authorization, X-Drop-Me"),
            ("X-Drop-Me", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("Authorization", f"Bearer {SECRET}"),
            ("X-Kept", "yes"),
        ],
    )
    assert response.status == 200
    (recorded,) = upstream.wait_for_requests(1)
    names = {name.lower() for name, _ in recorded.headers}
    assert not names & {"x-drop-me", "keep-alive", "te", "proxy-authorization"}
    assert recorded.header("X-Kept") == "yes"
    verify(bearer(recorded), sts, "http://127.0.0.1")

    hop, _ = send_raw(proxy.port, "GET", "/hop", [("Host", "proxy")])
    assert hop.getheader("X-Kept") == "yes"
    for name in ("X-Secret-Hop", "Keep-Alive", "Proxy-Authenticate"):
        assert hop.getheader(name) is None, name


def test_response_headers_and_bodies_pass_through(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    cookies, _ = send_raw(proxy.port, "GET", "/set-cookies", [("Host", "proxy")])
    set_cookies = cookies.headers.get_all("Set-Cookie")
    assert len(set_cookies) == 2 and any("Expires=Wed, 21 Oct 2037 07:28:00 GMT" in c for c in set_cookies)

    gz, raw_body = send_raw(proxy.port, "GET", "/gzip", [("Host", "proxy"), ("Accept-Encoding", "gzip")])
    assert gz.getheader("Content-Encoding") == "gzip"
    assert gz.getheader("Content-Length") == str(len(raw_body))
    gzip.decompress(raw_body)

    redirect = requests.get(proxy.url + "/redirect", timeout=10, allow_redirects=False)
    assert redirect.status_code == 302 and redirect.headers["Location"] == "/elsewhere"

    later = requests.get(proxy.url + "/echo", timeout=10)
    assert later.status_code == 200
    recorded = upstream.wait_for_requests(4)
    assert all(r.target != "/elsewhere" for r in recorded)
    assert recorded[-1].header("Cookie") is None


def test_nothing_added_that_the_client_did_not_send(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    response, _ = send_raw(proxy.port, "POST", "/bare", [("Host", "proxy"), ("Content-Length", "2")], b"{}")
    assert response.status == 200
    (recorded,) = upstream.wait_for_requests(1)
    names = {name.lower() for name, _ in recorded.headers}
    assert not names & {"user-agent", "accept-encoding", "content-type", "accept", "cookie"}
    empty, _ = send_raw(proxy.port, "GET", "/status/204", [("Host", "proxy")])
    assert empty.status == 204 and empty.getheader("Content-Type") is None


def test_netrc_is_never_read(start_proxy, upstream, tmp_path, sts):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login bob password hunter2\n")
    netrc.chmod(0o600)
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", env={"NETRC": str(netrc), "HOME": str(tmp_path)})
    (tmp_path / ".netrc").write_text(netrc.read_text())
    assert requests.get(proxy.url + "/", timeout=10).status_code == 200
    verify(bearer(upstream.wait_for_requests(1)[0]), sts, "http://127.0.0.1")


def test_slow_chunked_response_reaches_the_client_chunk_by_chunk(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    arrivals = []
    with requests.get(proxy.url + "/drip?n=3&delay=0.6", stream=True, timeout=10) as response:
        started = time.monotonic()
        for chunk in response.raw.stream(1024, decode_content=False):
            arrivals.append((time.monotonic() - started, chunk))
    assert b"".join(c for _, c in arrivals) == b"chunk-0\nchunk-1\nchunk-2\n"
    assert len(arrivals) == 3
    assert arrivals[0][0] < 0.4 and arrivals[1][0] > 0.4 and arrivals[2][0] > 1.0


def test_refused_upstream_is_502_and_slow_headers_are_504(start_proxy, upstream):
    closed_port = upstream.port
    with RecordingUpstream() as slow:
        refused = start_proxy("--upstream-host", "127.0.0.1:1", "--upstream-scheme", "http")
        response = requests.get(refused.url + "/", timeout=10)
        assert (response.status_code, response.text) == (502, "upstream unavailable\n")
        timing_out = start_proxy("--upstream-host", f"127.0.0.1:{slow.port}", "--upstream-scheme", "http", "--upstream-timeout", "1s")
        started = time.monotonic()
        response = requests.get(timing_out.url + "/slow-headers?delay=3", timeout=10)
        assert (response.status_code, response.text) == (504, "upstream timeout\n")
        assert time.monotonic() - started < 2.5
    assert closed_port


# -- logs --------------------------------------------------------------------------


def test_json_access_records_and_gunicorn_records(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    requests.get(proxy.url + "/logged/path?token=abc", timeout=10)
    record = proxy.wait_for_record(lambda r: r.get("logger") == "jwt_proxy.access")
    assert record["level"] == "info"
    assert record["method"] == "GET" and record["path"] == "/logged/path" and record["status"] == 200
    assert record["target"] == f"http://127.0.0.1:{upstream.port}/logged/path"
    assert isinstance(record["duration_ms"], (int, float))
    assert any(r["logger"].startswith("gunicorn") for r in proxy.records())
    lines = [line for line in proxy.stdout_path.read_text().splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), lines


def test_logfmt_with_log_format_text(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", "--log-format", "text")
    requests.get(proxy.url + "/text", timeout=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "logger=jwt_proxy.access" not in proxy.output():
        time.sleep(0.05)
    lines = [line for line in proxy.stdout_path.read_text().splitlines() if line.strip()]
    access = [line for line in lines if "logger=jwt_proxy.access" in line]
    assert access and "method=GET" in access[0] and "path=/text" in access[0] and "status=200" in access[0]
    assert all(line.startswith("time=") for line in lines), lines


def test_debug_logs_never_show_a_token_or_inbound_authorization(start_proxy, upstream, sts):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", "--log-level", "debug")
    for path in ("/a", "/b?x=1", "/gzip", "/redirect", "/status/204"):
        requests.post(proxy.url + path, data=b"body", headers={"Authorization": f"Bearer {SECRET}", "Cookie": "c=1"}, timeout=10)
    tokens = {bearer(r) for r in upstream.wait_for_requests(5)}
    proxy.wait_for_record(lambda r: r.get("path") == "/status/204")
    output = proxy.output()
    assert '"level": "debug"' in output
    for token in tokens:
        assert token not in output
        assert token.split(".")[2] not in output
    assert SECRET not in output


# -- TLS and process ---------------------------------------------------------------


def make_self_signed(tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_listener(start_proxy, upstream, tmp_path):
    cert, key = make_self_signed(tmp_path)
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", "--tls-cert", str(cert), "--tls-key", str(key))
    response = requests.get(f"https://127.0.0.1:{proxy.port}/tls", verify=str(cert), timeout=10)
    assert response.status_code == 200
    assert upstream.wait_for_requests(1)[0].target == "/tls"
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{proxy.port}/plain", timeout=5)


def children(pid: int) -> set[int]:
    found = set()
    from pathlib import Path

    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(p) for p in text)
    return found


def test_workers_each_build_their_clients_after_the_fork(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", "--workers", "2", "--threads", "4", "--log-level", "debug")
    deadline = time.monotonic() + 10
    ready = set()
    while time.monotonic() < deadline and len(ready) < 2:
        ready = {r["pid"] for r in proxy.records() if r.get("msg") == "worker ready"}
        time.sleep(0.1)
    assert len(ready) == 2
    assert ready == children(proxy.pid)
    assert proxy.pid not in ready


def test_sigterm_lets_an_in_flight_request_finish_then_exits_0(start_proxy, upstream):
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: requests.get(proxy.url + "/drip?n=3&delay=0.7", timeout=15))
        upstream.wait_for_requests(1)
        proxy.signal(15)
        response = future.result(timeout=15)
    assert response.status_code == 200 and response.content == b"chunk-0\nchunk-1\nchunk-2\n"
    assert proxy.popen.wait(15) == 0


def test_plain_gunicorn_with_the_conf_file(start_proxy, upstream, sts):
    from tests.conftest import BIN_DIR
    from tests.conftest import REPO

    proxy = start_proxy(
        command=[str(BIN_DIR / "gunicorn"), "-c", str(REPO / "conf" / "gunicorn.conf.py")],
        env={"UPSTREAM_HOST": f"127.0.0.1:{upstream.port}", "UPSTREAM_SCHEME": "http", "WORKERS": "1", "THREADS": "4", "TOKEN_AUDIENCE": "conf-file"},
    )
    assert requests.get(proxy.url + "/conf", timeout=10).status_code == 200
    assert verify(bearer(upstream.wait_for_requests(1)[0]), sts, "conf-file")["aud"] == "conf-file"
    proxy.wait_for_record(lambda r: r.get("logger") == "jwt_proxy.access" and r.get("path") == "/conf")
    assert proxy.stop() == 0


def test_plain_gunicorn_with_a_bad_variable_fails_before_binding(start_proxy):
    from tests.conftest import BIN_DIR
    from tests.conftest import REPO

    proxy = start_proxy(
        command=[str(BIN_DIR / "gunicorn"), "-c", str(REPO / "conf" / "gunicorn.conf.py")],
        env={"UPSTREAM_TIMEOUT": "never"},
        ready=False,
    )
    assert proxy.popen.wait(20) != 0
    assert "UPSTREAM_TIMEOUT" in proxy.output() and "'never'" in proxy.output()  # the variable, not a flag


# -- listening: a socket per worker --------------------------------------------------------


def _tcp_sockets(port: int, state: str) -> set[str]:
    """Inodes of loopback TCP sockets on local ``port`` in ``state`` (``0A`` listen, ``01`` established)."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


class _BusyClients:
    """``count`` keep-alive clients that connect and send their first request in one
    burst (as wrk or a fresh connection pool does), then each sends its next request as
    soon as its response is in. One thread, raw sockets: the burst is tight."""

    REQUEST = b"GET /spread HTTP/1.1\r\nHost: proxy\r\n\r\n"

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.served = [0] * count

    def __enter__(self) -> _BusyClients:
        import selectors

        self.selector = selectors.DefaultSelector()
        self.sockets = []
        for index in range(self.count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.sendall(self.REQUEST)
            self.sockets.append(sock)
            self.selector.register(sock, selectors.EVENT_READ, [index, b""])
        return self

    def run_for(self, seconds: float) -> None:
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            for key, _ in self.selector.select(timeout=1.0):
                index, buffered = key.data
                data = key.fileobj.recv(65536)
                assert data, "the proxy closed a kept-alive connection"
                buffered += data
                head, sep, body = buffered.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), None)
                if sep and length is not None and len(body) >= length:
                    assert head.startswith(b"HTTP/1.1 200"), head
                    self.served[index] += 1
                    buffered = body[length:]
                    key.fileobj.sendall(self.REQUEST)
                key.data[1] = buffered

    def __exit__(self, *exc: object) -> None:
        self.selector.close()
        for sock in self.sockets:
            sock.close()


def _ready(proxy) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{proxy.metrics_port}/readyz", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def _sockets_held(pid: int, inodes: set[str]) -> int:
    from pathlib import Path

    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = fd.readlink().name
        except OSError:
            continue
        held += link.startswith("socket:[") and link[8:-1] in inodes
    return held


def test_each_worker_listens_on_its_own_socket_and_busy_clients_land_on_both(start_proxy, upstream):
    """With one shared socket the worker that wakes first may take most of a burst of
    keep-alive connections (14 of 16 with wrk), and one GIL-bound worker then serves
    them all. With a socket per worker (SO_REUSEPORT) the kernel hashes each new
    connection to one of them."""
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", "--workers", "2", "--threads", "16")
    deadline = time.monotonic() + 10
    while not _ready(proxy):  # both workers up
        assert time.monotonic() < deadline, proxy.output()
        time.sleep(0.05)
    workers = children(proxy.pid)
    listening = _tcp_sockets(proxy.port, "0A")
    assert len(listening) == 2
    assert [_sockets_held(pid, listening) for pid in sorted(workers)] == [1, 1]
    assert _sockets_held(proxy.pid, listening) == 2  # the master keeps them for the next workers

    clients = 32
    with _BusyClients(proxy.port, clients) as load:
        load.run_for(1.0)
        held = sorted(_sockets_held(pid, _tcp_sockets(proxy.port, "01")) for pid in workers)
        load.run_for(0.5)
    assert min(load.served) > 0, load.served
    assert sum(held) == clients, held
    # Binomial(32, 1/2): below 4 on either side has a chance of about 3 in a million.
    assert held[0] >= 4, f"connections per worker: {held}"


@pytest.mark.parametrize("flag", ["--listen-addr", "--metrics-listen-addr"])
def test_an_address_in_use_stops_the_start_with_one_line(start_proxy, flag):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proxy = start_proxy(flag, f"127.0.0.1:{port}", ready=False)
        assert proxy.popen.wait(20) == 1
    stderr = proxy.stderr_path.read_text().strip().splitlines()
    assert stderr == [f"jwt-proxy: error: {flag} 127.0.0.1:{port}: cannot listen there: Address already in use"]
    if flag == "--metrics-listen-addr":
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", proxy.port)) != 0  # the proxy never listened


def test_a_second_proxy_on_the_same_address_is_refused_and_the_first_keeps_serving(start_proxy, upstream):
    """Worker sockets share a port with SO_REUSEPORT; another jwt-proxy must not join them
    (it would take half of the first one's connections)."""
    first = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http")
    second = start_proxy("--listen-addr", f"127.0.0.1:{first.port}", "--upstream-host", "127.0.0.1:9", "--upstream-scheme", "http", ready=False)
    assert second.popen.wait(20) == 1
    assert "--listen-addr" in second.stderr_path.read_text() and "in use" in second.stderr_path.read_text()
    for _ in range(20):  # new connections, each hashed anew by the kernel: all reach the first
        assert requests.get(first.url + "/still-mine", headers={"Connection": "close"}, timeout=10).status_code == 200


def test_a_client_that_keeps_its_side_open_after_connection_close_stalls_nobody(start_proxy, upstream):
    """After a ``Connection: close`` response the server half-closes and waits up to 2 s
    for the client's FIN. gunicorn does that in the worker's main loop, where it would
    hold up every other connection of the worker (no accept, no kept-alive request)."""
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", "--workers", "1")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as lingering:
        lingering.sendall(b"GET /first HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):  # the upstream's JSON echo, Content-Length framed
            data = lingering.recv(65536)
            assert data, answer
            answer += data
        assert answer.startswith(b"HTTP/1.1 200") and b'"/first"' in answer
        time.sleep(0.2)  # the proxy is now waiting for this client's FIN
        started = time.monotonic()
        response = requests.get(proxy.url + "/second", timeout=10)
        elapsed = time.monotonic() - started
        assert lingering.recv(1) == b""  # the proxy closed its side; this client never closed its own
    assert response.status_code == 200
    assert elapsed < 1.0, f"the second client waited {elapsed:.2f} s"


def test_clients_that_keep_every_thread_busy_do_not_lock_out_a_new_one(start_proxy, upstream):
    """A pool thread keeps serving its kept-alive client while the next request follows
    within the linger; once another connection waits for a thread, it lets go."""
    proxy = start_proxy("--upstream-host", f"127.0.0.1:{upstream.port}", "--upstream-scheme", "http", "--workers", "1", "--threads", "2")
    with _BusyClients(proxy.port, 2) as load:
        load.run_for(0.5)
        waits = []
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            for _ in range(3):
                started = time.monotonic()
                newcomer = pool.submit(requests.get, proxy.url + "/newcomer", headers={"Connection": "close"}, timeout=10)
                while not newcomer.done():
                    load.run_for(0.02)  # both threads' clients keep sending meanwhile
                assert newcomer.result().status_code == 200
                waits.append(time.monotonic() - started)
        load.run_for(0.2)
    assert min(load.served) > 10, load.served
    assert max(waits) < 1.0, f"the new client waited {max(waits):.2f} s"
