"""``jwt-proxy token``: the installed CLI mints one token from local-sts, as an operator would."""

from __future__ import annotations

import json
import subprocess

import jwt

from tests.conftest import JWT_PROXY
from tests.conftest import aws_env

RUN_TIMEOUT_S = 20


def run(sts, *args, **env):
    return subprocess.run(
        [JWT_PROXY, *args],
        env=aws_env(sts.url, **env),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def verified_claims(sts, token, algorithm, audience):
    key = jwt.PyJWKClient(f"{sts.url}/.well-known/jwks.json", timeout=5).get_signing_key_from_jwt(token)
    return jwt.decode(token, key.key, algorithms=[algorithm], audience=audience, issuer=sts.url)


def test_prints_a_verifiable_token_for_the_normalized_audiences_with_one_sts_call(sts):
    result = run(sts, "token", "--audience", "b", "--audience", "a,b")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    claims = verified_claims(sts, lines[0], "RS256", ["a", "b"])
    assert claims["aud"] == ["a", "b"]
    stats = sts.stats()
    assert stats["by_audience"] == {"a,b": 1}
    assert stats["last_params"]["Audience"] == ["a", "b"]


def test_decode_prints_the_header_and_claims_as_json(sts):
    result = run(sts, "token", "--audience", "https://api.example.com", "--decode")

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"header", "claims"}
    assert document["header"]["alg"] == "RS256"
    assert document["claims"]["aud"] == "https://api.example.com"
    assert isinstance(document["claims"]["exp"], int)
    assert result.stdout.startswith("{\n  ")  # pretty-printed


def test_root_options_before_the_subcommand_shape_the_token(sts):
    result = run(
        sts,
        "--token-signing-algorithm",
        "ES384",
        "--token-duration",
        "10m",
        "--token-tag",
        "team=payments",
        "token",
        "--audience",
        "x",
    )

    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == "ES384"
    claims = verified_claims(sts, token, "ES384", "x")
    assert claims["exp"] - claims["iat"] == 600
    assert sts.stats()["last_params"] == {
        "Audience": ["x"],
        "SigningAlgorithm": "ES384",
        "DurationSeconds": 600,
        "Tags": [{"Key": "team", "Value": "payments"}],
    }


def test_root_options_also_come_from_the_environment(sts):
    result = run(sts, "token", "--audience", "x", "--decode", TOKEN_SIGNING_ALGORITHM="ES384", TOKEN_DURATION="900")

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["header"]["alg"] == "ES384"
    assert document["claims"]["exp"] - document["claims"]["iat"] == 900


def test_an_sts_failure_exits_1_with_the_aws_error_code_and_a_hint(sts):
    sts.configure(fail_with="AccessDenied")

    result = run(sts, "token", "--audience", "x")

    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("jwt-proxy: error: AccessDenied: User: ")
    assert lines[1].startswith("hint: allow sts:GetWebIdentityToken")
    assert "Traceback" not in result.stderr


def test_a_bad_root_option_exits_2_with_one_line_and_calls_no_sts(sts):
    result = run(sts, "--token-duration", "2h", "token", "--audience", "x")

    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jwt-proxy: error: invalid value for --token-duration: '2h'")
    assert sts.calls() == 0


def test_a_bad_audience_is_named_as_audience(sts):
    result = run(sts, "token", "--audience", "a,,b")

    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jwt-proxy: error: invalid value for --audience: 'a,,b'")
    assert sts.calls() == 0


def test_audience_is_required(sts):
    result = run(sts, "token")

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "--audience" in result.stderr
    assert sts.calls() == 0
