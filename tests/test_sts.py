"""The boto3 edge: request shape, error mapping, escalation retry, region and endpoint.

Nothing here reaches AWS: credentials are dummies from the environment, IMDS is
disabled, the config files point at an empty temp dir, and a guard refuses any
connection or DNS lookup that is not loopback. Calls are answered by
``botocore.stub.Stubber`` (moto does not implement GetWebIdentityToken) or by a
tiny Query-protocol server on 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import http.server
import logging
import socket
import threading
import time
import typing as t
import urllib.parse

import boto3.session
import botocore
import botocore.credentials
import botocore.session
import pytest
from botocore.stub import Stubber

from jwt_proxy import sts
from jwt_proxy.sts import HINTS
from jwt_proxy.sts import credentials_expiry
from jwt_proxy.sts import hint_for
from jwt_proxy.sts import make_fetch
from jwt_proxy.sts import make_sts_client
from jwt_proxy.sts import resolve_region
from jwt_proxy.tokens import TokenUnavailable
from jwt_proxy.tokens import normalize_audiences

REGION = "eu-west-1"
TIMEOUT_S = 2.0
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzZWNyZXQiOiJ5ZXMifQ.c2lnbmF0dXJl"
EXPIRATION = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
AUDIENCES = normalize_audiences(["https://b.example", "https://a.example", "https://b.example"])
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
JOIN_TIMEOUT_S = 5.0

AWS_ENV_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_STS",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_STS_REGIONAL_ENDPOINTS",
    "AWS_USE_FIPS_ENDPOINT",
    "AWS_USE_DUALSTACK_ENDPOINT",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_RETRY_MODE",
    "AWS_MAX_ATTEMPTS",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


@pytest.fixture(autouse=True)
def offline_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: t.Any) -> None:
    """Dummy credentials, no config files, no IMDS, loopback-only sockets."""
    for name in AWS_ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("BOTO_CONFIG", str(tmp_path / "no-boto-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def loopback_getaddrinfo(host: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
        if host not in LOOPBACK:
            raise AssertionError(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def loopback_connect(self: socket.socket, address: t.Any) -> t.Any:
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            raise AssertionError(f"test tried to connect to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", loopback_connect)


@pytest.fixture
def client() -> t.Any:
    return make_sts_client(REGION, timeout_s=TIMEOUT_S)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Between:
    """Matches an int in [low, high] inside Stubber's expected_params."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.seen: int | None = None

    def __eq__(self, other: object) -> bool:
        self.seen = other if isinstance(other, int) else None
        return isinstance(other, int) and self.low <= other <= self.high

    def __repr__(self) -> str:
        return f"Between({self.low}, {self.high})"


def expected_params(**overrides: t.Any) -> dict[str, t.Any]:
    params: dict[str, t.Any] = {
        "Audience": list(AUDIENCES),
        "SigningAlgorithm": "RS256",
        "DurationSeconds": 3600,
    }
    params.update(overrides)
    return params


def ok_response() -> dict[str, t.Any]:
    return {"WebIdentityToken": JWT, "Expiration": EXPIRATION}


# request shape


def test_fetch_sends_normalized_audiences_and_returns_expiration(client: t.Any) -> None:
    fetch = make_fetch(client, signing_algorithm="RS256", duration_s=3600)
    with Stubber(client) as stub:
        stub.add_response("get_web_identity_token", ok_response(), expected_params())
        token = fetch(AUDIENCES)
        stub.assert_no_pending_responses()
    assert token.value == JWT
    assert token.expires_at == EXPIRATION.timestamp()
    assert list(AUDIENCES) == ["https://a.example", "https://b.example"]


def test_fetch_sends_scope_subject_mode_and_tags(client: t.Any) -> None:
    fetch = make_fetch(
        client,
        signing_algorithm="ES384",
        duration_s=900,
        scope="read:data write:data",
        subject_mode="OriginIdentity",
        tags=(("team", "payments"), ("env", "prod")),
    )
    params = expected_params(
        SigningAlgorithm="ES384",
        DurationSeconds=900,
        Scope="read:data write:data",
        SubjectMode="OriginIdentity",
        Tags=[{"Key": "team", "Value": "payments"}, {"Key": "env", "Value": "prod"}],
    )
    with Stubber(client) as stub:
        stub.add_response("get_web_identity_token", ok_response(), params)
        assert fetch(AUDIENCES).value == JWT


# errors


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("OutboundWebIdentityFederationDisabledException", 403),
        ("AccessDenied", 403),
        ("JWTPayloadSizeExceededException", 400),
        ("Throttling", 400),
        ("ExpiredToken", 403),
        ("InvalidClientTokenId", 403),
        ("ValidationError", 400),
        ("SomethingNew", 500),
    ],
)
def test_client_errors_become_token_unavailable_with_code_and_hint(
    client: t.Any, code: str, status: int
) -> None:
    fetch = make_fetch(client, signing_algorithm="RS256", duration_s=3600)
    with Stubber(client) as stub:
        stub.add_client_error(
            "get_web_identity_token",
            service_error_code=code,
            service_message=f"{code} happened",
            http_status_code=status,
        )
        with pytest.raises(TokenUnavailable) as info:
            fetch(AUDIENCES)
    exc = info.value
    assert exc.error_class == code
    assert exc.detail == f"{code} happened"
    assert exc.hint == HINTS.get(code, "")
    assert exc.audiences == AUDIENCES
    assert code in str(exc) and "https://a.example" in str(exc)


def test_param_validation_error_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # No Stubber: it would answer before botocore validates. Nothing is sent
    # either way; the closed port is a backstop.
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{closed_port()}")
    client = make_sts_client(REGION, timeout_s=TIMEOUT_S)
    fetch = make_fetch(client, signing_algorithm="RS256", duration_s=3600)
    with pytest.raises(TokenUnavailable) as info:
        fetch(())  # botocore checks the list's minimum of one before sending
    assert info.value.error_class == "ValidationError"
    assert info.value.hint == HINTS["ValidationError"]


def test_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{closed_port()}")
    client = make_sts_client(REGION, timeout_s=TIMEOUT_S)
    fetch = make_fetch(client, signing_algorithm="RS256", duration_s=3600)
    with pytest.raises(TokenUnavailable) as info:
        fetch(AUDIENCES)
    assert info.value.error_class == "NoCredentials"
    assert info.value.hint == HINTS["NoCredentials"]


def test_connection_refused_is_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{closed_port()}")
    fetch = make_fetch(
        make_sts_client(REGION, timeout_s=TIMEOUT_S), signing_algorithm="RS256", duration_s=3600
    )
    with pytest.raises(TokenUnavailable) as info:
        fetch(AUDIENCES)
    assert info.value.error_class == "transport"
    assert "127.0.0.1" in info.value.detail
    assert info.value.hint == HINTS["transport"]


def test_silent_endpoint_times_out_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts but never answers: the read timeout ends the wait."""
    budget_s = 0.4
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes the handshake; nobody ever reads
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{listener.getsockname()[1]}")
        fetch = make_fetch(
            make_sts_client(REGION, timeout_s=budget_s), signing_algorithm="RS256", duration_s=3600
        )
        started = time.monotonic()
        with pytest.raises(TokenUnavailable) as info:
            fetch(AUDIENCES)
        elapsed_s = time.monotonic() - started
    assert info.value.error_class == "transport"
    assert "timeout" in info.value.detail.lower()
    assert elapsed_s < budget_s + 1.0  # attempts fit the budget; +1 s for retry pause and CI


# SessionDurationEscalationException


def client_with_session_expiring_in(seconds: float) -> tuple[t.Any, float]:
    """An STS client whose credentials are temporary and end in ``seconds``."""
    expiry = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
    credentials = botocore.credentials.RefreshableCredentials.create_from_metadata(
        metadata={
            "access_key": "testing",
            "secret_key": "testing",
            "token": "testing",
            "expiry_time": expiry.isoformat(),
        },
        refresh_using=lambda: pytest.fail("credentials should not be refreshed"),
        method="test",
    )

    class Provider(botocore.credentials.CredentialProvider):
        METHOD = "test"

        def load(self) -> botocore.credentials.Credentials:
            return credentials

    core = botocore.session.Session()
    resolver = botocore.credentials.CredentialResolver([Provider()])
    core.register_component("credential_provider", resolver)
    return make_sts_client(REGION, timeout_s=TIMEOUT_S, botocore_session=core), expiry.timestamp()


def test_credentials_expiry_reads_refreshable_credentials() -> None:
    client, expiry = client_with_session_expiring_in(1800)
    assert credentials_expiry(client) == pytest.approx(expiry)


def test_credentials_expiry_is_none_for_static_keys(client: t.Any) -> None:
    assert credentials_expiry(client) is None


def escalation(stub: Stubber, duration: t.Any) -> None:
    stub.add_client_error(
        "get_web_identity_token",
        service_error_code="SessionDurationEscalationException",
        service_message="The requested token duration would extend the session",
        http_status_code=403,
        expected_params=expected_params(DurationSeconds=duration),
    )


def test_escalation_retries_once_with_a_duration_inside_the_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session_left_s = 1800
    client, _ = client_with_session_expiring_in(session_left_s)
    fetch = make_fetch(client, signing_algorithm="RS256", duration_s=3600)
    longest_fit_s = session_left_s - sts.SESSION_EXPIRY_MARGIN_S
    fits = Between(longest_fit_s - 5, longest_fit_s)  # a few seconds pass before the retry
    short_expiration = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1790)
    with Stubber(client) as stub, caplog.at_level(logging.WARNING, logger="jwt_proxy.sts"):
        escalation(stub, 3600)
        stub.add_response(
            "get_web_identity_token",
            {"WebIdentityToken": JWT, "Expiration": short_expiration},
            expected_params(DurationSeconds=fits),
        )
        token = fetch(AUDIENCES)
        stub.assert_no_pending_responses()
    assert token.expires_at == short_expiration.timestamp()  # the real, shorter expiry
    [record] = [r for r in caplog.records if r.name == "jwt_proxy.sts"]
    assert record.levelno == logging.WARNING
    assert "3600" in record.getMessage() and str(fits.seen) in record.getMessage()
    assert JWT not in record.getMessage()


def test_escalation_with_unknown_session_end_retries_with_the_minimum(client: t.Any) -> None:
    fetch = make_fetch(client, signing_algorithm="RS256", duration_s=3600)
    with Stubber(client) as stub:
        escalation(stub, 3600)
        stub.add_response(
            "get_web_identity_token", ok_response(), expected_params(DurationSeconds=60)
        )
        assert fetch(AUDIENCES).value == JWT
        stub.assert_no_pending_responses()


def test_escalation_is_retried_only_once(client: t.Any) -> None:
    fetch = make_fetch(client, signing_algorithm="RS256", duration_s=3600)
    with Stubber(client) as stub:
        escalation(stub, 3600)
        escalation(stub, 60)
        with pytest.raises(TokenUnavailable) as info:
            fetch(AUDIENCES)
        stub.assert_no_pending_responses()
    assert info.value.error_class == "SessionDurationEscalationException"
    assert info.value.hint == HINTS["SessionDurationEscalationException"]


def test_escalation_at_the_minimum_duration_is_not_retried(client: t.Any) -> None:
    fetch = make_fetch(client, signing_algorithm="RS256", duration_s=60)
    with Stubber(client) as stub:
        escalation(stub, 60)
        with pytest.raises(TokenUnavailable) as info:
            fetch(AUDIENCES)
        stub.assert_no_pending_responses()
    assert info.value.error_class == "SessionDurationEscalationException"


# hints


REQUIRED_HINTS = (
    "OutboundWebIdentityFederationDisabledException",
    "AccessDenied",
    "AccessDeniedException",
    "SessionDurationEscalationException",
    "JWTPayloadSizeExceededException",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ExpiredToken",
    "ExpiredTokenException",
    "NoCredentials",
    "InvalidClientTokenId",
    "transport",
    "ValidationError",
)


@pytest.mark.parametrize("error_class", REQUIRED_HINTS)
def test_every_expected_error_has_a_one_line_hint(error_class: str) -> None:
    hint = hint_for(error_class)
    assert hint and "\n" not in hint


def test_unknown_error_has_no_hint() -> None:
    assert hint_for("NoSuchThing") == ""


def test_access_denied_hint_names_the_permission_and_condition_keys() -> None:
    for needle in (
        "sts:GetWebIdentityToken",
        "sts:IdentityTokenAudience",
        "sts:DurationSeconds",
        "sts:SigningAlgorithm",
    ):
        assert needle in HINTS["AccessDenied"]


def test_federation_hint_cites_the_real_iam_operation() -> None:
    iam = boto3.session.Session().client("iam", region_name=REGION)
    operation = "EnableOutboundWebIdentityFederation"
    assert operation in iam.meta.service_model.operation_names
    hint = HINTS["OutboundWebIdentityFederationDisabledException"]
    assert f"aws iam {botocore.xform_name(operation, '-')}" in hint
    assert operation in hint


# region and endpoint


@pytest.mark.parametrize(
    ("env", "profile_region", "expected"),
    [
        ({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-west-2"}, "ap-south-1", "eu-west-1"),
        ({"AWS_REGION": "", "AWS_DEFAULT_REGION": "us-west-2"}, "ap-south-1", "us-west-2"),
        ({}, "ap-south-1", "ap-south-1"),
        ({}, None, None),
    ],
)
def test_resolve_region_order(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: t.Any,
    env: dict[str, str],
    profile_region: str | None,
    expected: str | None,
) -> None:
    config = tmp_path / "config"
    config.write_text(
        "[default]\nregion = sa-east-1\n\n[profile work]\n"
        + (f"region = {profile_region}\n" if profile_region else "output = json\n")
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "work")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert resolve_region() == expected


def test_resolve_region_unknown_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "missing")
    with pytest.raises(ValueError, match="missing"):
        resolve_region()


def test_legacy_setting_would_pick_the_global_endpoint_without_our_override(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_STS_REGIONAL_ENDPOINTS", "legacy")
    plain = boto3.session.Session().client("sts", region_name="us-east-1")
    assert plain.meta.endpoint_url == "https://sts.amazonaws.com"  # what we must avoid


@pytest.mark.parametrize("setting", ["legacy", "regional", None])
def test_client_always_uses_the_regional_endpoint(
    monkeypatch: pytest.MonkeyPatch, setting: str | None
) -> None:
    if setting:
        monkeypatch.setenv("AWS_STS_REGIONAL_ENDPOINTS", setting)
    client = make_sts_client("us-east-1", timeout_s=TIMEOUT_S)
    assert client.meta.endpoint_url == "https://sts.us-east-1.amazonaws.com"
    assert client.meta.region_name == "us-east-1"


def test_endpoint_url_env_wins_even_with_legacy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_STS_REGIONAL_ENDPOINTS", "legacy")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:4599")
    client = make_sts_client("us-east-1", timeout_s=TIMEOUT_S)
    assert client.meta.endpoint_url == "http://127.0.0.1:4599"


@pytest.mark.parametrize(
    ("timeout_s", "connect_s", "read_s"),
    [(30.0, 5.0, 10.0), (2.0, 0.5, 0.5), (120.0, 5.0, 55.0)],
)
def test_client_timeouts_add_up_to_the_budget(
    timeout_s: float, connect_s: float, read_s: float
) -> None:
    config = make_sts_client(REGION, timeout_s=timeout_s).meta.config
    assert (config.connect_timeout, config.read_timeout) == (connect_s, read_s)
    assert config.retries == {"mode": "standard", "total_max_attempts": sts.STS_MAX_ATTEMPTS}
    per_attempt_s = config.connect_timeout + config.read_timeout
    assert sts.STS_MAX_ATTEMPTS * per_attempt_s == pytest.approx(timeout_s)


def test_client_rejects_a_non_positive_budget() -> None:
    with pytest.raises(ValueError):
        make_sts_client(REGION, timeout_s=0)


# on the wire, against a tiny Query-protocol STS on loopback


class FakeSTS(http.server.BaseHTTPRequestHandler):
    """Answers GetWebIdentityToken like STS's Query protocol; records the form."""

    forms: list[dict[str, list[str]]] = []
    error_code: str | None = None

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        form = urllib.parse.parse_qs(body)
        type(self).forms.append(form)
        if self.error_code:
            status = 403
            payload = (
                '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
                f"<Type>Sender</Type><Code>{self.error_code}</Code>"
                "<Message>denied by policy</Message>"
                "</Error><RequestId>req-1</RequestId></ErrorResponse>"
            )
        else:
            status = 200
            payload = (
                '<GetWebIdentityTokenResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
                f"<GetWebIdentityTokenResult><WebIdentityToken>{JWT}</WebIdentityToken>"
                "<Expiration>2030-01-01T12:00:00Z</Expiration></GetWebIdentityTokenResult>"
                "<ResponseMetadata><RequestId>req-1</RequestId></ResponseMetadata>"
                "</GetWebIdentityTokenResponse>"
            )
        data = payload.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: t.Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def fake_sts(monkeypatch: pytest.MonkeyPatch) -> t.Iterator[type[FakeSTS]]:
    handler = type("Handler", (FakeSTS,), {"forms": [], "error_code": None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("AWS_STS_REGIONAL_ENDPOINTS", "legacy")
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(JOIN_TIMEOUT_S)


def test_wire_request_and_response(
    fake_sts: type[FakeSTS], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_sts_client("us-east-1", timeout_s=TIMEOUT_S)
    fetch = make_fetch(client, signing_algorithm="ES384", duration_s=600, tags=(("k", "v"),))
    with caplog.at_level(logging.DEBUG):  # botocore would log the body at DEBUG
        token = fetch(AUDIENCES)
    assert token.value == JWT
    assert token.expires_at == EXPIRATION.timestamp()
    [form] = fake_sts.forms
    assert form["Action"] == ["GetWebIdentityToken"]
    assert form["Audience.member.1"] == ["https://a.example"]
    assert form["Audience.member.2"] == ["https://b.example"]
    assert form["SigningAlgorithm"] == ["ES384"]
    assert form["DurationSeconds"] == ["600"]
    assert form["Tags.member.1.Key"] == ["k"] and form["Tags.member.1.Value"] == ["v"]
    assert all(JWT not in record.getMessage() for record in caplog.records)


def test_wire_error_code_is_parsed(fake_sts: type[FakeSTS]) -> None:
    fake_sts.error_code = "AccessDenied"
    client = make_sts_client(REGION, timeout_s=TIMEOUT_S)
    fetch = make_fetch(client, signing_algorithm="RS256", duration_s=600)
    with pytest.raises(TokenUnavailable) as info:
        fetch(AUDIENCES)
    assert (info.value.error_class, info.value.detail) == ("AccessDenied", "denied by policy")
    assert len(fake_sts.forms) == 1  # AccessDenied is not retried


def test_botocore_debug_records_stay_off_even_with_a_debug_root(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):  # as --log-level=debug would set the root
        assert not logging.getLogger("botocore.parsers").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("botocore.endpoint").isEnabledFor(logging.DEBUG)


def test_credentials_expiry_is_found_to_the_second_through_public_methods() -> None:
    client, expiry = client_with_session_expiring_in(7 * 3600 + 123)
    assert credentials_expiry(client) == pytest.approx(expiry, abs=1.5)


def test_credentials_resolve_reports_missing_credentials_as_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert sts.credentials_resolve(make_sts_client(REGION, timeout_s=TIMEOUT_S)) is False


def test_credentials_of_a_client_made_elsewhere_fail_loudly() -> None:
    """Not a silent "no credentials yet", which readiness would retry for ever."""
    foreign = botocore.session.Session().create_client("sts", region_name=REGION)
    with pytest.raises(TypeError, match="make_sts_client"):
        sts.credentials_resolve(foreign)
