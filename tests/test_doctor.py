"""``jwt-proxy doctor``: end to end against local-sts, and its checks one by one in-process."""

from __future__ import annotations

import os
import subprocess
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from moto import mock_aws

from jwt_proxy import doctor
from jwt_proxy.sts import HINTS
from jwt_proxy.sts import make_fetch
from jwt_proxy.sts import make_sts_client

from tests.conftest import JWT_PROXY
from tests.conftest import aws_env

RUN_TIMEOUT_S = 20
AUDIENCE = "https://api.example.com"


def run(args, env):
    return subprocess.run(
        [JWT_PROXY, *args], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL
    )


def checks(stdout):
    """``[(status, name, detail), ...]`` from doctor's check lines; hint lines are skipped."""
    found = []
    for line in stdout.splitlines():
        if line.startswith("  hint: "):
            continue
        status, _, rest = line.partition(" ")
        name, _, detail = rest.partition(": ")
        found.append((status, name, detail))
    return found


def hint_after(stdout, name):
    lines = stdout.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(f"FAIL {name}: "):
            assert lines[index + 1].startswith("  hint: "), stdout
            return lines[index + 1][len("  hint: ") :]
    raise AssertionError(f"no FAIL {name} line in:\n{stdout}")


# -- end to end: the installed CLI against local-sts ---------------------------------


def test_all_checks_pass_in_order_against_local_sts(sts):
    result = run(["--token-audience", AUDIENCE, "doctor"], aws_env(sts.url))

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    found = checks(result.stdout)
    assert [(status, name) for status, name, _ in found] == [
        ("PASS", "region"),
        ("PASS", "credentials"),
        ("PASS", "token"),
        ("PASS", "claims"),
        ("PASS", "signature"),
    ]
    details = {name: detail for _, name, detail in found}
    assert details["region"] == f"us-east-1 (from AWS_REGION), STS endpoint {sts.url} (override from AWS_ENDPOINT_URL_STS)"
    assert details["credentials"].startswith("arn:aws:sts::000000000000:assumed-role/")
    assert "(account 000000000000)" in details["credentials"]
    assert "verified with key " in details["signature"]
    assert f"from {sts.url}/.well-known/jwks.json" in details["signature"]
    stats = sts.stats()
    assert stats["caller_identity_calls"] == 1
    assert stats["by_audience"] == {AUDIENCE: 1}


def test_offline_skips_the_signature(sts):
    result = run(["--token-audience", AUDIENCE, "doctor", "--offline"], aws_env(sts.url))

    assert result.returncode == 0, result.stdout + result.stderr
    assert checks(result.stdout)[-1] == ("SKIP", "signature", "--offline")
    assert [status for status, _, _ in checks(result.stdout)[:4]] == ["PASS"] * 4


def test_federation_disabled_fails_the_token_check_with_the_enable_hint(sts):
    sts.configure(fail_with="OutboundWebIdentityFederationDisabledException")

    result = run(["--token-audience", AUDIENCE, "doctor"], aws_env(sts.url))

    assert result.returncode == 1
    assert [(status, name) for status, name, _ in checks(result.stdout)] == [
        ("PASS", "region"),
        ("PASS", "credentials"),
        ("FAIL", "token"),
        ("SKIP", "claims"),
        ("SKIP", "signature"),
    ]
    token_detail = checks(result.stdout)[2][2]
    assert "OutboundWebIdentityFederationDisabledException" in token_detail
    assert "aws iam enable-outbound-web-identity-federation" in hint_after(result.stdout, "token")
    assert "Traceback" not in result.stderr


def test_no_region_fails_the_region_check_and_skips_the_rest(sts):
    env = aws_env(sts.url)
    del env["AWS_REGION"]

    result = run(["--token-audience", AUDIENCE, "doctor"], env)

    assert result.returncode == 1
    assert [(status, name) for status, name, _ in checks(result.stdout)] == [
        ("FAIL", "region"),
        ("SKIP", "credentials"),
        ("SKIP", "token"),
        ("SKIP", "claims"),
        ("SKIP", "signature"),
    ]
    assert "AWS_REGION" in hint_after(result.stdout, "region")
    stats = sts.stats()
    assert stats["caller_identity_calls"] == 0 and stats["calls"] == 0


def test_without_a_fixed_audience_the_token_check_is_skipped_with_a_note(sts):
    result = run(["doctor"], aws_env(sts.url))

    assert result.returncode == 0, result.stdout + result.stderr
    found = checks(result.stdout)
    assert found[2][:2] == ("SKIP", "token")
    assert "doctor --audience" in found[2][2]
    assert sts.calls() == 0


@pytest.mark.parametrize(
    ("args", "audience"),
    [
        (["--upstream-host", "API.example.com:8443", "doctor", "--offline"], AUDIENCE),
        (["doctor", "--offline", "--audience", "b,a", "--audience", "b"], "a,b"),
    ],
)
def test_the_audience_comes_from_a_pinned_upstream_or_doctor_audience(sts, args, audience):
    result = run(args, aws_env(sts.url))

    assert result.returncode == 0, result.stdout + result.stderr
    assert checks(result.stdout)[2][:2] == ("PASS", "token")
    assert sts.stats()["by_audience"] == {audience: 1}


@pytest.mark.parametrize(
    ("args", "env", "source"),
    [
        (["doctor", "--offline", "--audience", AUDIENCE], {}, "--audience"),
        (["--token-audience", "https://other.example.com", "doctor", "--offline", "--audience", AUDIENCE], {}, "--audience"),
        (["--token-audience", AUDIENCE, "doctor", "--offline"], {}, "--token-audience"),
        (["doctor", "--offline"], {"TOKEN_AUDIENCE": AUDIENCE}, "TOKEN_AUDIENCE"),
    ],
)
def test_the_token_check_names_where_its_audience_came_from(sts, args, env, source):
    result = run(args, aws_env(sts.url, **env))

    assert result.returncode == 0, result.stdout + result.stderr
    status, name, detail = checks(result.stdout)[2]
    assert (status, name) == ("PASS", "token")
    assert f"for audience {AUDIENCE} ({source})," in detail, detail


def test_a_bad_root_option_is_a_usage_error(sts):
    result = run(["--token-duration", "2h", "doctor"], aws_env(sts.url))

    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "--token-duration" in result.stderr


# -- the checks in-process -----------------------------------------------------------


@pytest.fixture
def clean_aws_env(monkeypatch):
    """No AWS setting from the developer's environment: no keys, no files, no IMDS."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def test_credentials_pass_with_the_caller_identity_from_moto(clean_aws_env):
    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", "testing")
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        region_check, client = doctor.check_region(timeout_s=5)
        check = doctor.check_credentials(client)

    assert region_check.status == "PASS"
    assert region_check.detail.endswith("STS endpoint https://sts.us-east-1.amazonaws.com (regional)")
    assert check.status == "PASS"
    assert check.detail == "arn:aws:sts::123456789012:user/moto (account 123456789012)"


def test_credentials_fail_with_a_hint_when_there_are_none(clean_aws_env):
    client = make_sts_client("us-east-1", timeout_s=5)

    check = doctor.check_credentials(client)

    assert check.status == "FAIL"
    assert check.detail.startswith("NoCredentials: ")
    assert check.hint == HINTS["NoCredentials"]
    assert check.lines() == [f"FAIL credentials: {check.detail}", f"  hint: {check.hint}"]


def test_the_global_endpoint_fails_and_overrides_are_named():
    assert doctor.classify_endpoint("us-east-1", "https://sts.amazonaws.com", {}) == (False, "global endpoint")
    assert doctor.classify_endpoint("eu-west-1", "https://sts.eu-west-1.amazonaws.com", {}) == (True, "regional")
    assert doctor.classify_endpoint(
        "eu-west-1", "http://127.0.0.1:4599", {"AWS_ENDPOINT_URL_STS": "http://127.0.0.1:4599/"}
    ) == (True, "override from AWS_ENDPOINT_URL_STS")


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP384R1())


def make_token(key, **claims):
    now = int(time.time())
    body = {"iss": "https://issuer.example", "aud": AUDIENCE, "sub": "arn:aws:iam::1:role/r", "iat": now, "exp": now + 3600}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm="ES384", headers={"kid": "k"})


def claims_check(token, audiences=(AUDIENCE,), duration_s=3600):
    check, _ = doctor.check_claims(token, audiences=audiences, signing_algorithm="ES384", duration_s=duration_s)
    return check


def test_claims_pass_and_warn_on_a_short_lifetime(ec_key):
    assert claims_check(make_token(ec_key)).status == "PASS"
    now = int(time.time())
    short = claims_check(make_token(ec_key, exp=now + 300))
    assert short.status == "PASS"
    assert "warning: lifetime 300 s is shorter than --token-duration 3600 s" in short.detail
    loopback = claims_check(make_token(ec_key, iss="http://127.0.0.1:4599"))
    assert loopback.status == "PASS"


@pytest.mark.parametrize(
    ("claims", "problem"),
    [
        ({"aud": ["other"]}, "aud is ['other'], asked for https://api.example.com"),
        ({"exp": int(time.time()) - 10}, "in the past"),
        ({"iss": "http://issuer.example"}, "is not an https URL"),
        ({"sub": None}, "sub is missing"),
    ],
)
def test_claims_fail_on_what_a_verifier_would_reject(ec_key, claims, problem):
    check = claims_check(make_token(ec_key, **claims))

    assert check.status == "FAIL"
    assert problem in check.detail
    assert check.hint


def test_the_signature_check_verifies_against_the_issuer_jwks(sts, clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL_STS", sts.url)
    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", "testing")
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    fetch = make_fetch(make_sts_client("us-east-1", timeout_s=5), signing_algorithm="RS256", duration_s=3600)
    first = fetch((AUDIENCE,)).value
    second = fetch((AUDIENCE,)).value
    # The first token's header and claims with the second's signature, by the same key.
    forged = first.rsplit(".", 1)[0] + "." + second.rsplit(".", 1)[1]

    good = doctor.check_signature(first, issuer=sts.url, audiences=(AUDIENCE,))
    bad = doctor.check_signature(forged, issuer=sts.url, audiences=(AUDIENCE,))

    assert good.status == "PASS", good.detail
    assert bad.status == "FAIL"
    assert bad.detail.startswith("signature does not verify with key ")
    assert bad.hint == doctor.BAD_SIGNATURE_HINT
