"""LocalSTS in-process, driven by a real boto3 client as the proxy drives real STS."""

from __future__ import annotations

import json
import logging
import threading
import time
import typing as t
from datetime import datetime
from datetime import timezone

import boto3
import botocore.exceptions
import jwt
import pytest
import requests
from botocore.config import Config

from jwt_proxy.devtools.localsts import CALLER_ROLE_ARN
from jwt_proxy.devtools.localsts import CALLER_SESSION_ARN
from jwt_proxy.devtools.localsts import CLAIMS_NAMESPACE
from jwt_proxy.devtools.localsts import LocalSTS
from jwt_proxy.logs import JsonFormatter

HTTP_TIMEOUT_S = 5.0


def sts_client(url: str, **config: t.Any) -> t.Any:
    """A boto3 STS client for ``url`` that never retries, so each call is one request."""
    settings: dict[str, t.Any] = {
        "retries": {"total_max_attempts": 1},
        "connect_timeout": HTTP_TIMEOUT_S,
        "read_timeout": HTTP_TIMEOUT_S,
    }
    settings.update(config)
    return boto3.client(
        "sts",
        region_name="us-east-1",
        endpoint_url=url,
        aws_access_key_id="x",
        aws_secret_access_key="y",
        config=Config(**settings),
    )


def verify(url: str, token: str, audience: str) -> dict[str, t.Any]:
    """Verify ``token`` as a relying party would: keys from the server's JWKS, iss and aud."""
    signing_key = jwt.PyJWKClient(f"{url}/.well-known/jwks.json", timeout=HTTP_TIMEOUT_S).get_signing_key_from_jwt(token)
    return jwt.decode(token, signing_key.key, algorithms=["RS256", "ES384"], audience=audience, issuer=url)


def error_of(call: t.Callable[[], t.Any]) -> botocore.exceptions.ClientError:
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call()
    return caught.value


@pytest.fixture(scope="module")
def server() -> t.Iterator[LocalSTS]:
    with LocalSTS(port=0) as lsts:
        yield lsts


@pytest.fixture
def lsts(server: LocalSTS) -> t.Iterator[LocalSTS]:
    """The module's server with faults cleared and counters zeroed, before and after."""
    cleared = dict(fail_with=None, stall_s=None, max_token_lifetime_s=None, max_session_duration_s=None)
    server.configure(**cleared)
    server.reset_stats()
    yield server
    server.configure(**cleared)
    server.reset_stats()


@pytest.fixture
def client(lsts: LocalSTS) -> t.Any:
    return sts_client(lsts.url)


@pytest.mark.parametrize("algorithm", ["RS256", "ES384"])
@pytest.mark.parametrize(
    "audiences",
    [["https://api.example.com"], ["https://a.example.com", "https://b.example.com"]],
    ids=["one-audience", "two-audiences"],
)
def test_token_verifies_against_the_servers_jwks(lsts, client, algorithm, audiences):
    response = client.get_web_identity_token(Audience=audiences, SigningAlgorithm=algorithm, DurationSeconds=900)
    token = response["WebIdentityToken"]

    for audience in audiences:
        claims = verify(lsts.url, token, audience)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == algorithm
    assert header["typ"] == "JWT"
    assert header["kid"] in {key["kid"] for key in requests.get(f"{lsts.url}/.well-known/jwks.json", timeout=HTTP_TIMEOUT_S).json()["keys"]}
    assert claims["iss"] == lsts.url
    assert claims["aud"] == (audiences[0] if len(audiences) == 1 else audiences)
    assert claims["sub"] == CALLER_ROLE_ARN
    assert claims["exp"] - claims["iat"] == 900
    assert claims["nbf"] == claims["iat"]
    assert abs(claims["iat"] - time.time()) < 60
    assert response["Expiration"] == datetime.fromtimestamp(claims["exp"], timezone.utc)
    assert claims[CLAIMS_NAMESPACE] == {
        "aws_account": "000000000000",
        "source_region": "us-east-1",
        "principal_id": CALLER_ROLE_ARN,
    }


def test_duration_defaults_to_300_seconds_and_jti_is_unique(client, lsts):
    first = jwt.decode(client.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256")["WebIdentityToken"], options={"verify_signature": False})
    second = jwt.decode(client.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256")["WebIdentityToken"], options={"verify_signature": False})
    assert first["exp"] - first["iat"] == 300
    assert first["jti"] != second["jti"]


def test_scope_subject_mode_and_tags_become_claims(client, lsts):
    response = client.get_web_identity_token(
        Audience=["https://api.example.com"],
        SigningAlgorithm="ES384",
        Scope="read:things write",
        SubjectMode="OriginIdentity",
        Tags=[{"Key": "team", "Value": "data"}, {"Key": "empty", "Value": ""}],
    )
    claims = verify(lsts.url, response["WebIdentityToken"], "https://api.example.com")
    assert claims["scope"] == "read:things write"
    assert claims["subject_mode"] == "OriginIdentity"
    assert not claims["sub"].lower().startswith("arn:")
    assert claims[CLAIMS_NAMESPACE]["principal_id"] == CALLER_ROLE_ARN
    assert claims[CLAIMS_NAMESPACE]["request_tags"] == {"team": "data", "empty": ""}


UNVALIDATED = {"parameter_validation": False}


@pytest.mark.parametrize(
    ("kwargs", "client_config", "in_message"),
    [
        ({"Audience": ["a"], "SigningAlgorithm": "RS256", "DurationSeconds": 30}, UNVALIDATED, "durationSeconds"),
        ({"Audience": ["a"], "SigningAlgorithm": "RS256", "DurationSeconds": 3601}, UNVALIDATED, "durationSeconds"),
        ({"Audience": [f"https://{i}.example.com" for i in range(11)], "SigningAlgorithm": "RS256"}, {}, "audience"),
        ({"Audience": [], "SigningAlgorithm": "RS256"}, UNVALIDATED, "audience"),
        ({"Audience": ["x" * 1001], "SigningAlgorithm": "RS256"}, UNVALIDATED, "audience.1.member"),
        ({"Audience": ["a"], "SigningAlgorithm": "HS256"}, {}, "signingAlgorithm"),
        ({"Audience": ["a"]}, UNVALIDATED, "signingAlgorithm"),
        ({"Audience": ["a"], "SigningAlgorithm": "RS256", "SubjectMode": "Nobody"}, UNVALIDATED, "subjectMode"),
        ({"Audience": ["a"], "SigningAlgorithm": "RS256", "SubjectMode": "OriginIdentity", "Scope": 'say "hi"'}, UNVALIDATED, "scope"),
        ({"Audience": ["a"], "SigningAlgorithm": "RS256", "SubjectMode": "OriginIdentity", "Scope": "x" * 257}, UNVALIDATED, "scope"),
        ({"Audience": ["a"], "SigningAlgorithm": "RS256", "Scope": "read"}, {}, "OriginIdentity"),
        ({"Audience": ["a", "b"], "SigningAlgorithm": "RS256", "SubjectMode": "OriginIdentity", "Scope": "read"}, {}, "one Audience"),
        ({"Audience": ["a"], "SigningAlgorithm": "RS256", "SubjectMode": "OriginIdentity", "Scope": "read read"}, {}, "repeat"),
        ({"Audience": ["a"], "SigningAlgorithm": "RS256", "Tags": [{"Key": f"k{i}", "Value": "v"} for i in range(51)]}, UNVALIDATED, "tags"),
        ({"Audience": ["a"], "SigningAlgorithm": "RS256", "Tags": [{"Key": "k" * 129, "Value": "v"}]}, UNVALIDATED, "tags.1.member.key"),
        ({"Audience": ["a"], "SigningAlgorithm": "RS256", "Tags": [{"Key": "k!", "Value": "v"}]}, UNVALIDATED, "tags.1.member.key"),
        ({"Audience": ["a"], "SigningAlgorithm": "RS256", "Tags": [{"Key": "k", "Value": "v" * 257}]}, UNVALIDATED, "tags.1.member.value"),
        ({"Audience": ["a"], "SigningAlgorithm": "RS256", "Tags": [{"Key": "K", "Value": "1"}, {"Key": "k", "Value": "2"}]}, {}, "Duplicate tag keys"),
    ],
    ids=[
        "duration-30",
        "duration-3601",
        "eleven-audiences",
        "no-audience",
        "long-audience",
        "bad-algorithm",
        "missing-algorithm",
        "bad-subject-mode",
        "scope-bad-character",
        "scope-too-long",
        "scope-without-origin-identity",
        "scope-with-two-audiences",
        "scope-repeated-value",
        "fifty-one-tags",
        "long-tag-key",
        "bad-tag-key",
        "long-tag-value",
        "duplicate-tag-keys",
    ],
)
def test_invalid_parameters_are_a_validation_error(lsts, kwargs, client_config, in_message):
    client = sts_client(lsts.url, **client_config)
    error = error_of(lambda: client.get_web_identity_token(**kwargs))
    assert error.response["Error"]["Code"] == "ValidationError"
    assert error.response["Error"]["Type"] == "Sender"
    assert in_message in error.response["Error"]["Message"]
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert error.response["ResponseMetadata"]["RequestId"]
    assert lsts.stats()["issued"] == 0


def test_validation_errors_are_reported_together_in_sts_wording(lsts):
    client = sts_client(lsts.url, parameter_validation=False)
    error = error_of(lambda: client.get_web_identity_token(Audience=["a"], SigningAlgorithm="HS256", DurationSeconds=30))
    assert error.response["Error"]["Message"] == (
        "2 validation errors detected: "
        "Value 'HS256' at 'signingAlgorithm' failed to satisfy constraint: Member must satisfy enum value set: [RS256, ES384]; "
        "Value '30' at 'durationSeconds' failed to satisfy constraint: Member must have value greater than or equal to 60"
    )


@pytest.mark.parametrize(
    ("data", "headers", "status", "code"),
    [
        ("Action=GetWebIdentityToken&Version=2011-06-15&Audience.member.1=a&SigningAlgorithm=RS256", {}, 403, "MissingAuthenticationToken"),
        ("Action=AssumeRoot&Version=2011-06-15", {"Authorization": "AWS4-HMAC-SHA256 x"}, 400, "InvalidAction"),
        ("Action=GetWebIdentityToken&Version=2099-01-01&Audience.member.1=a&SigningAlgorithm=RS256", {"Authorization": "x"}, 400, "InvalidAction"),
        ("Version=2011-06-15", {"Authorization": "x"}, 400, "MissingAction"),
        ("Action=GetWebIdentityToken&Version=2011-06-15&Audience.1=a&SigningAlgorithm=RS256", {"Authorization": "x"}, 400, "ValidationError"),
        ("Action=GetWebIdentityToken&Version=2011-06-15&Audience.member.2=a&SigningAlgorithm=RS256", {"Authorization": "x"}, 400, "ValidationError"),
    ],
    ids=["no-authorization", "unknown-action", "unknown-version", "no-action", "malformed-list", "list-with-gap"],
)
def test_raw_query_requests_get_sts_error_documents(lsts, data, headers, status, code):
    response = requests.post(
        lsts.url + "/",
        data=data,
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8", **headers},
        timeout=HTTP_TIMEOUT_S,
    )
    assert response.status_code == status
    assert response.headers["Content-Type"] == "text/xml"
    assert f"<Code>{code}</Code>" in response.text
    assert response.text.startswith('<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>')
    assert response.headers["x-amzn-RequestId"] in response.text


@pytest.mark.parametrize(
    ("fail_with", "status"),
    [
        ("OutboundWebIdentityFederationDisabledException", 403),
        ("AccessDenied", 403),
        ("SessionDurationEscalationException", 403),
        ("ExpiredToken", 403),
        ("ValidationError", 400),
        ("JWTPayloadSizeExceededException", 400),
        ("Throttling", 400),
        ("InternalFailure", 500),
        ("SomethingUnheardOf", 500),
    ],
)
def test_fail_with_answers_that_error(lsts, client, fail_with, status):
    lsts.configure(fail_with=fail_with)
    error = error_of(lambda: client.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256"))
    assert error.response["Error"]["Code"] == fail_with
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert error.response["Error"]["Type"] == ("Sender" if status < 500 else "Receiver")
    assert lsts.stats()["errors"] == {fail_with: 1}


def test_fail_with_as_constructor_argument_and_modeled_exception():
    with LocalSTS(port=0, fail_with="OutboundWebIdentityFederationDisabledException") as lsts:
        client = sts_client(lsts.url)
        with pytest.raises(client.exceptions.OutboundWebIdentityFederationDisabledException):
            client.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256")
        assert client.get_caller_identity()["Account"] == "000000000000"


def test_session_duration_escalation_only_above_max_session_duration(lsts, client):
    lsts.configure(fail_with="SessionDurationEscalationException", max_session_duration_s=600)
    error = error_of(lambda: client.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256", DurationSeconds=3600))
    assert error.response["Error"]["Code"] == "SessionDurationEscalationException"
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    response = client.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256", DurationSeconds=600)
    claims = verify(lsts.url, response["WebIdentityToken"], "a")
    assert claims["exp"] - claims["iat"] == 600
    assert lsts.stats()["calls"] == 2


def test_stall_makes_the_client_time_out():
    # A server of its own: the stalled request must not finish inside a later test.
    with LocalSTS(port=0, stall_s=2.0) as lsts:
        client = sts_client(lsts.url, read_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(botocore.exceptions.ReadTimeoutError):
            client.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256")
        assert time.monotonic() - started < 1.5
        lsts.configure(stall_s=None)
        assert client.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256")["WebIdentityToken"]


def test_shutdown_cuts_a_stall_short():
    before = set(threading.enumerate())
    lsts = LocalSTS(port=0, stall_s=30.0)
    lsts.start()
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(sts_client(lsts.url, read_timeout=20).get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256"))
        except Exception as error:  # noqa: BLE001 - whatever it is, it must come quickly
            outcome.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 5
    while lsts.stats()["calls"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    lsts.shutdown()
    caller.join(10)
    assert not caller.is_alive()
    assert time.monotonic() - started < 3
    assert isinstance(outcome[0], Exception)
    assert set(threading.enumerate()) - before == set()


def test_max_token_lifetime_shortens_exp_and_expiration(lsts, client):
    lsts.configure(max_token_lifetime_s=90)
    response = client.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256", DurationSeconds=3600)
    claims = verify(lsts.url, response["WebIdentityToken"], "a")
    assert claims["exp"] - claims["iat"] == 90
    assert response["Expiration"] == datetime.fromtimestamp(claims["exp"], timezone.utc)

    short = client.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256", DurationSeconds=60)
    claims = jwt.decode(short["WebIdentityToken"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 60


def test_stats_count_calls_per_audience_and_reset(lsts, client):
    client.get_web_identity_token(Audience=["b", "a"], SigningAlgorithm="RS256")
    client.get_web_identity_token(Audience=["b", "a"], SigningAlgorithm="RS256")
    client.get_web_identity_token(
        Audience=["c"], SigningAlgorithm="ES384", DurationSeconds=120, Tags=[{"Key": "k", "Value": "v"}]
    )
    stats = requests.get(f"{lsts.url}/_local-sts/stats", timeout=HTTP_TIMEOUT_S).json()
    assert stats["calls"] == 3
    assert stats["issued"] == 3
    assert stats["by_audience"] == {"b,a": 2, "c": 1}
    assert stats["last_params"] == {
        "Audience": ["c"],
        "SigningAlgorithm": "ES384",
        "DurationSeconds": 120,
        "Tags": [{"Key": "k", "Value": "v"}],
    }

    reset = requests.post(f"{lsts.url}/_local-sts/reset", timeout=HTTP_TIMEOUT_S)
    assert reset.status_code == 200
    assert requests.get(f"{lsts.url}/_local-sts/stats", timeout=HTTP_TIMEOUT_S).json()["calls"] == 0


def test_runtime_config_endpoint_applies_partial_updates(lsts, client):
    url = f"{lsts.url}/_local-sts/config"
    answer = requests.post(url, json={"fail_with": "Throttling"}, timeout=HTTP_TIMEOUT_S)
    assert answer.status_code == 200
    assert answer.json() == {"fail_with": "Throttling", "stall_s": 0.0, "max_token_lifetime_s": None, "max_session_duration_s": None}
    assert error_of(lambda: client.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256")).response["Error"]["Code"] == "Throttling"

    answer = requests.post(url, json={"max_token_lifetime_s": 120}, timeout=HTTP_TIMEOUT_S)
    assert answer.json()["fail_with"] == "Throttling"  # partial: untouched knobs stay
    requests.post(url, json={"fail_with": None}, timeout=HTTP_TIMEOUT_S)
    token = client.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256", DurationSeconds=3600)["WebIdentityToken"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 120
    assert requests.get(url, timeout=HTTP_TIMEOUT_S).json()["max_token_lifetime_s"] == 120


@pytest.mark.parametrize(
    "body",
    [{"stall_s": -1}, {"max_token_lifetime_s": "soon"}, {"max_session_duration_s": 0}, {"fail_with": "no spaces"}, {"colour": "red"}, [1]],
)
def test_runtime_config_endpoint_rejects_bad_settings(lsts, body):
    answer = requests.post(f"{lsts.url}/_local-sts/config", json=body, timeout=HTTP_TIMEOUT_S)
    assert answer.status_code == 400
    assert answer.json()["error"]
    assert lsts.faults.as_dict() == {"fail_with": None, "stall_s": 0.0, "max_token_lifetime_s": None, "max_session_duration_s": None}


def test_constructor_rejects_bad_knobs():
    with pytest.raises(ValueError, match="stall_s"):
        LocalSTS(port=0, stall_s=-1)


def test_get_caller_identity(lsts, client):
    identity = client.get_caller_identity()
    assert identity["Account"] == "000000000000"
    assert identity["Arn"] == CALLER_SESSION_ARN
    assert identity["UserId"].endswith(":local-sts-session")
    assert lsts.stats()["caller_identity_calls"] == 1


def test_openid_configuration_names_the_issuer_and_its_jwks(lsts):
    document = requests.get(f"{lsts.url}/.well-known/openid-configuration", timeout=HTTP_TIMEOUT_S).json()
    assert document["issuer"] == lsts.url
    assert document["jwks_uri"] == f"{lsts.url}/.well-known/jwks.json"
    assert document["id_token_signing_alg_values_supported"] == ["RS256", "ES384"]
    keys = requests.get(document["jwks_uri"], timeout=HTTP_TIMEOUT_S).json()["keys"]
    assert sorted((key["kty"], key["alg"], key.get("crv")) for key in keys) == [("EC", "ES384", "P-384"), ("RSA", "RS256", None)]
    assert all("d" not in key for key in keys)  # public halves only


def test_port_zero_binds_a_real_port_and_shutdown_leaves_no_thread():
    before = set(threading.enumerate())
    lsts = LocalSTS(port=0)
    assert not lsts.url.endswith(":0")
    lsts.start()
    sts_client(lsts.url).get_caller_identity()  # leaves a keep-alive connection open
    lsts.shutdown()
    lsts.shutdown()  # idempotent
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{lsts.url}/.well-known/jwks.json", timeout=1)


def test_one_log_record_per_request_without_the_token(lsts, client, caplog):
    caplog.set_level(logging.INFO, logger="jwt_proxy.local_sts")
    token = client.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256")["WebIdentityToken"]
    deadline = time.monotonic() + 2
    while not any(getattr(r, "action", "") == "GetWebIdentityToken" for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.01)
    records = [r for r in caplog.records if getattr(r, "action", "") == "GetWebIdentityToken"]
    assert len(records) == 1
    fields = json.loads(JsonFormatter().format(records[0]))
    assert {k: fields[k] for k in ("logger", "msg", "method", "path", "status")} == {
        "logger": "jwt_proxy.local_sts",
        "msg": "request",
        "method": "POST",
        "path": "/",
        "status": 200,
    }
    written = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert token not in written
    assert token.split(".")[1] not in written


def test_control_endpoints_answer_json(lsts):
    response = requests.get(f"{lsts.url}/_local-sts/nothing", timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 404
    assert json.loads(response.text)["error"]
