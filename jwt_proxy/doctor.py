"""``jwt-proxy doctor``: the AWS-side checks, in order, one :class:`Check` each.

1. ``region``: a region resolves and the STS client's endpoint is regional (or an
   explicit override such as ``AWS_ENDPOINT_URL_STS``);
2. ``credentials``: ``GetCallerIdentity`` on that same client;
3. ``token``: ``GetWebIdentityToken`` for the audience set the proxy would use, with the
   proxy's own settings (:func:`jwt_proxy.sts.make_fetch_for`);
4. ``claims``: the token's header and claims match what was asked for;
5. ``signature``: the token verifies against the issuer's published keys
   (``<iss>/.well-known/openid-configuration`` -> ``jwks_uri``), unless offline.

A check that needs the outcome of a failed one is reported ``SKIP``. Everything here is
a plain function returning :class:`Check` objects; the CLI only prints them, so each
check is testable without a command line. A token is never put in a :class:`Check`.

This is a development and operations tool, never on the proxy's request path. Every
AWS call and its error classification go through :mod:`jwt_proxy.sts`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
import typing as t
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import jwt

from .routing import Upstream
from .routing import is_loopback_host
from .sts import HINTS
from .sts import caller_identity
from .sts import make_fetch_for
from .sts import make_sts_client
from .sts import resolve_region
from .tokens import TokenUnavailable

if t.TYPE_CHECKING:
    from collections.abc import Iterator
    from collections.abc import Mapping

    from botocore.client import BaseClient

    from .config import Config
    from .tokens import AudienceSet
    from .tokens import Token

__all__ = [
    "CHECK_NAMES",
    "Check",
    "check_claims",
    "check_credentials",
    "check_region",
    "check_signature",
    "check_token",
    "choose_audiences",
    "classify_endpoint",
    "run_checks",
]

PASS = "PASS"
FAIL = "FAIL"
SKIP = "SKIP"

REGION = "region"
CREDENTIALS = "credentials"
TOKEN = "token"
CLAIMS = "claims"
SIGNATURE = "signature"
CHECK_NAMES = (REGION, CREDENTIALS, TOKEN, CLAIMS, SIGNATURE)

# Each of the two issuer fetches (discovery document, JWKS) gets this long.
ISSUER_FETCH_TIMEOUT_S = 5.0
MAX_DISCOVERY_BYTES = 256 * 1024
# Between minting and checking a token, plus ordinary clock differences with STS.
CLOCK_TOLERANCE_S = 60
ENDPOINT_OVERRIDE_VARIABLES = ("AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL")
GLOBAL_STS_HOSTS = frozenset({"sts.amazonaws.com"})

NO_REGION_HINT = (
    "set AWS_REGION (or AWS_DEFAULT_REGION, or region in the AWS profile); "
    "GetWebIdentityToken is only served by regional STS endpoints"
)
PROFILE_HINT = "set AWS_PROFILE to a profile that exists in AWS_CONFIG_FILE (~/.aws/config), or unset it"
BAD_REGION_HINT = "set AWS_REGION to a region name such as us-east-1"
GLOBAL_ENDPOINT_HINT = (
    "GetWebIdentityToken does not exist on the global endpoint sts.amazonaws.com: remove that "
    "endpoint_url / AWS_ENDPOINT_URL_STS, or point it at https://sts.<region>.amazonaws.com"
)
NO_AUDIENCE_NOTE = (
    "no --token-audience and no pinned --upstream-host: the proxy derives the audience per "
    "request from the upstream; name one to check with `jwt-proxy doctor --audience https://api.example.com`"
)
WRONG_ISSUER_HINT = (
    "the token does not look like one from AWS STS (AWS issuers are https URLs): check that "
    "AWS_ENDPOINT_URL_STS, if set, points at STS or jwt-proxy local-sts"
)
CLAIMS_HINT = (
    "STS returned a token that does not match the request: check that AWS_ENDPOINT_URL_STS, "
    "if set, points at STS or jwt-proxy local-sts"
)
EXPIRED_CLAIMS_HINT = HINTS["expired"]
ISSUER_UNREACHABLE_HINT = (
    "this host could not fetch the issuer's keys, which the third party must do to verify "
    "tokens; check DNS, egress and proxies to the issuer, or run `jwt-proxy doctor --offline` "
    "where this host has no egress to it"
)
BAD_SIGNATURE_HINT = (
    "the token does not verify against the keys its issuer publishes, so the third party "
    "will reject it: check that tokens and keys come from the same STS (AWS_ENDPOINT_URL_STS)"
)
INTERNAL_HINT = "an unexpected error in the check itself: report it with this line"


@dataclasses.dataclass(frozen=True)
class Check:
    """The outcome of one check.

    :param name: one of :data:`CHECK_NAMES`.
    :param status: ``PASS``, ``FAIL`` or ``SKIP``.
    :param detail: one line: what was found (on ``PASS``) or what is wrong.
    :param hint: one line telling the operator what to do; shown on ``FAIL`` only.
    """

    name: str
    status: str
    detail: str
    hint: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def lines(self) -> list[str]:
        """``STATUS name: detail``, then ``  hint: ...`` for a failure that has one."""
        lines = [f"{self.status} {self.name}: {_one_line(self.detail)}"]
        if self.status == FAIL and self.hint:
            lines.append(f"  hint: {_one_line(self.hint)}")
        return lines


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _skipped(name: str, reason: str) -> Check:
    return Check(name, SKIP, reason)


# -- 1. region -----------------------------------------------------------------------


def _region_source(environ: Mapping[str, str]) -> str:
    """Where :func:`resolve_region` found the region (same order)."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if environ.get(name, "").strip():
            return name
    return "AWS profile"


def classify_endpoint(region: str, endpoint_url: str, environ: Mapping[str, str]) -> tuple[bool, str]:
    """Whether an STS endpoint can serve ``GetWebIdentityToken``, and what kind it is.

    Regional (``https://sts.<region>.amazonaws.com``, FIPS and other partitions' suffixes
    too) and explicit overrides pass; the global ``sts.amazonaws.com`` fails.
    """
    parts = urlsplit(endpoint_url)
    host = (parts.hostname or "").lower()
    labels = host.split(".")
    if parts.scheme == "https" and len(labels) >= 3 and labels[0] in ("sts", "sts-fips") and labels[1] == region:
        return True, "regional"
    if host in GLOBAL_STS_HOSTS:
        return False, "global endpoint"
    for name in ENDPOINT_OVERRIDE_VARIABLES:
        value = environ.get(name, "").strip()
        if value and value.rstrip("/") == endpoint_url.rstrip("/"):
            return True, f"override from {name}"
    return True, "override from endpoint_url in the AWS config file"


def check_region(*, timeout_s: float, environ: Mapping[str, str] = os.environ) -> tuple[Check, BaseClient | None]:
    """Resolve the region and make the regional STS client the proxy would use.

    :returns: the check, and the client (``None`` when the check failed).
    """
    try:
        region = resolve_region()
    except ValueError as exc:
        return Check(REGION, FAIL, f"AWS configuration: {exc}", PROFILE_HINT), None
    if not region:
        return Check(REGION, FAIL, "no AWS region found", NO_REGION_HINT), None
    try:
        client = make_sts_client(region, timeout_s=timeout_s)
    except ValueError as exc:  # botocore.exceptions.InvalidRegionError is a ValueError
        return Check(REGION, FAIL, f"{region}: {exc}", BAD_REGION_HINT), None
    endpoint = client.meta.endpoint_url
    ok, kind = classify_endpoint(region, endpoint, environ)
    detail = f"{region} (from {_region_source(environ)}), STS endpoint {endpoint} ({kind})"
    if not ok:
        return Check(REGION, FAIL, detail, GLOBAL_ENDPOINT_HINT), None
    return Check(REGION, PASS, detail), client


# -- 2. credentials ------------------------------------------------------------------


def check_credentials(client: BaseClient) -> Check:
    """``GetCallerIdentity`` on ``client``: who the proxy will be to STS."""
    try:
        identity = caller_identity(client)
    except TokenUnavailable as exc:
        return Check(CREDENTIALS, FAIL, f"{exc.error_class}: {exc.detail}", exc.hint)
    return Check(CREDENTIALS, PASS, f"{identity.get('Arn')} (account {identity.get('Account')})")


# -- 3. token ------------------------------------------------------------------------


def choose_audiences(config: Config, audience_source: str = "--token-audience") -> tuple[AudienceSet | None, str]:
    """The audience set the proxy would mint for, and where it comes from.

    The configured audiences when there are some (``audience_source`` says who set them:
    ``--token-audience``, ``TOKEN_AUDIENCE``, or ``doctor --audience``), else
    the audience derived from a pinned ``--upstream-host``, else ``None``: the proxy then
    derives one per request and there is nothing fixed to check.
    """
    if config.token_audiences:
        return config.token_audiences, audience_source
    if config.upstream is not None:
        return (Upstream(config.upstream_scheme, config.upstream).audience,), "derived from --upstream-host"
    return None, ""


def check_token(
    fetch: t.Callable[[AudienceSet], Token], audiences: AudienceSet, *, source: str = ""
) -> tuple[Check, Token | None]:
    """Mint one token for ``audiences`` with ``fetch`` (:func:`jwt_proxy.sts.make_fetch`)."""
    label = ",".join(audiences) + (f" ({source})" if source else "")
    try:
        token = fetch(audiences)
    except TokenUnavailable as exc:
        detail = f"audience {label}: {exc.error_class}"
        if exc.detail:
            detail += f": {exc.detail}"
        return Check(TOKEN, FAIL, detail, exc.hint), None
    expires = dt.datetime.fromtimestamp(token.expires_at, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Check(TOKEN, PASS, f"minted for audience {label}, expires {expires}"), token


# -- 4. claims -----------------------------------------------------------------------


def _issuer_problem(issuer: object) -> str | None:
    """Why ``issuer`` is not an https URL (or http on loopback, for local-sts); None if fine."""
    if not isinstance(issuer, str) or not issuer:
        return "iss is missing"
    parts = urlsplit(issuer)
    if not parts.hostname:
        return f"iss {issuer!r} is not a URL"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return None
    return f"iss {issuer!r} is not an https URL"


def check_claims(
    token: str,
    *,
    audiences: AudienceSet,
    signing_algorithm: str,
    duration_s: int,
    now: float | None = None,
) -> tuple[Check, dict[str, t.Any] | None]:
    """Read the token's header and claims (unverified) and compare them with the request.

    Fails on: a different ``alg``, ``aud`` other than ``audiences``, ``exp`` not in the
    future, ``iss`` not an https URL (http is allowed on loopback, for local-sts), no
    ``sub``. A lifetime shorter than ``duration_s`` (STS capped it) or a clock that
    differs from the issuer's is a warning in the detail, not a failure.

    :returns: the check, and the claims when it passed.
    """
    now = time.time() if now is None else now
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        return Check(CLAIMS, FAIL, f"not a readable JWT: {exc}", CLAIMS_HINT), None

    problems: list[str] = []
    warnings: list[str] = []
    hint = CLAIMS_HINT
    if header.get("alg") != signing_algorithm:
        problems.append(f"alg is {header.get('alg')!r}, asked for {signing_algorithm}")

    aud = claims.get("aud")
    aud_list = [aud] if isinstance(aud, str) else aud
    if (
        not isinstance(aud_list, list)
        or not all(isinstance(item, str) for item in aud_list)
        or tuple(sorted(set(aud_list))) != tuple(sorted(set(audiences)))
    ):
        problems.append(f"aud is {aud!r}, asked for {','.join(audiences)}")

    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        problems.append("exp is missing")
    elif exp <= now:
        problems.append(f"exp is {now - exp:.0f} s in the past by this host's clock")
        hint = EXPIRED_CLAIMS_HINT
    else:
        iat = claims.get("iat")
        lifetime_s = exp - iat if isinstance(iat, (int, float)) and not isinstance(iat, bool) else exp - now
        if lifetime_s < duration_s - CLOCK_TOLERANCE_S:
            warnings.append(
                f"lifetime {lifetime_s:.0f} s is shorter than --token-duration {duration_s} s "
                "(STS capped it, e.g. to the caller's own session)"
            )
        if isinstance(iat, (int, float)) and abs(iat - now) > CLOCK_TOLERANCE_S:
            warnings.append(
                f"iat differs from this host's clock by {now - iat:+.0f} s: check time synchronisation"
            )

    issuer = claims.get("iss")
    issuer_problem = _issuer_problem(issuer)
    if issuer_problem:
        problems.append(issuer_problem)
        hint = WRONG_ISSUER_HINT

    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        problems.append("sub is missing")

    if problems:
        return Check(CLAIMS, FAIL, "; ".join(problems), hint), None
    detail = f"alg={header['alg']} aud={','.join(audiences)} sub={sub} iss={issuer}"
    if isinstance(exp, (int, float)):
        detail += f", expires in {exp - now:.0f} s"
    if warnings:
        detail += "; warning: " + "; ".join(warnings)
    return Check(CLAIMS, PASS, detail), claims


# -- 5. signature --------------------------------------------------------------------


def _fetch_json(url: str, timeout_s: float) -> t.Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http(s) checked)
        body = response.read(MAX_DISCOVERY_BYTES + 1)
    if len(body) > MAX_DISCOVERY_BYTES:
        raise ValueError(f"more than {MAX_DISCOVERY_BYTES} bytes")
    return json.loads(body)


def check_signature(
    token: str,
    *,
    issuer: str,
    audiences: AudienceSet,
    timeout_s: float = ISSUER_FETCH_TIMEOUT_S,
) -> Check:
    """Verify ``token`` the way a third party would: discovery, JWKS, signature.

    Fetches ``<issuer>/.well-known/openid-configuration``, checks that it names the
    same ``issuer``, then verifies the signature with the ``jwks_uri`` key whose ``kid``
    the token names, for the token's ``alg``, along with ``aud`` and ``iss``.
    """
    problem = _issuer_problem(issuer)
    if problem:
        return Check(SIGNATURE, FAIL, problem, WRONG_ISSUER_HINT)
    discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        discovery = _fetch_json(discovery_url, timeout_s)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Check(SIGNATURE, FAIL, f"could not fetch {discovery_url}: {reason}", ISSUER_UNREACHABLE_HINT)
    except ValueError as exc:  # json.JSONDecodeError included
        return Check(SIGNATURE, FAIL, f"{discovery_url} is not a JSON discovery document: {exc}", BAD_SIGNATURE_HINT)
    if not isinstance(discovery, dict):
        return Check(SIGNATURE, FAIL, f"{discovery_url} is not a JSON object", BAD_SIGNATURE_HINT)
    if discovery.get("issuer") != issuer:
        return Check(
            SIGNATURE,
            FAIL,
            f"{discovery_url} names issuer {discovery.get('issuer')!r}, the token says {issuer!r}",
            BAD_SIGNATURE_HINT,
        )
    jwks_uri = discovery.get("jwks_uri")
    if _issuer_problem(jwks_uri):
        return Check(SIGNATURE, FAIL, f"{discovery_url}: jwks_uri {jwks_uri!r} is not usable", BAD_SIGNATURE_HINT)

    try:
        header = jwt.get_unverified_header(token)
        algorithm = header.get("alg")
        client = jwt.PyJWKClient(jwks_uri, cache_keys=False, cache_jwk_set=False, timeout=timeout_s)
        signing_key = client.get_signing_key_from_jwt(token)
        jwt.decode(
            token,
            signing_key.key,
            algorithms=[algorithm],
            audience=list(audiences),
            issuer=issuer,
            leeway=CLOCK_TOLERANCE_S,
        )
    except jwt.PyJWKClientConnectionError as exc:
        return Check(SIGNATURE, FAIL, f"could not fetch {jwks_uri}: {exc}", ISSUER_UNREACHABLE_HINT)
    except jwt.PyJWKClientError as exc:  # no key with the token's kid, or an unusable JWKS
        return Check(SIGNATURE, FAIL, f"{jwks_uri}: {exc}", BAD_SIGNATURE_HINT)
    except jwt.InvalidSignatureError:
        return Check(
            SIGNATURE, FAIL, f"signature does not verify with key {header.get('kid')} from {jwks_uri}", BAD_SIGNATURE_HINT
        )
    except jwt.InvalidTokenError as exc:
        return Check(SIGNATURE, FAIL, f"verification failed: {type(exc).__name__}: {exc}", BAD_SIGNATURE_HINT)
    return Check(SIGNATURE, PASS, f"verified with key {header.get('kid')} ({algorithm}) from {jwks_uri}")


# -- all of them ---------------------------------------------------------------------


def run_checks(
    config: Config,
    *,
    offline: bool = False,
    environ: Mapping[str, str] = os.environ,
    audience_source: str = "--token-audience",
) -> Iterator[Check]:
    """Run the checks in order, yielding each as it finishes (so the CLI prints as it goes).

    ``config`` is validated but need not carry a region: finding one is the first check.
    Always yields exactly one :class:`Check` per name in :data:`CHECK_NAMES`, in order.
    """
    region_check, client = check_region(timeout_s=config.upstream_timeout_s, environ=environ)
    yield region_check
    if client is None:
        yield from (_skipped(name, "needs a region and its STS endpoint") for name in CHECK_NAMES[1:])
        return

    credentials_check = check_credentials(client)
    yield credentials_check
    if credentials_check.failed:
        yield from (_skipped(name, "needs working credentials") for name in CHECK_NAMES[2:])
        return

    audiences, source = choose_audiences(config, audience_source)
    if audiences is None:
        yield _skipped(TOKEN, NO_AUDIENCE_NOTE)
        yield from (_skipped(name, "needs a token") for name in CHECK_NAMES[3:])
        return
    fetch = make_fetch_for(client, config)
    try:
        token_check, token = check_token(fetch, audiences, source=source)
    except Exception as exc:  # a bug must not hide the checks already printed
        token_check, token = Check(TOKEN, FAIL, f"internal: {type(exc).__name__}", INTERNAL_HINT), None
    yield token_check
    if token is None:
        yield from (_skipped(name, "needs a token") for name in CHECK_NAMES[3:])
        return

    claims_check, claims = check_claims(
        token.value,
        audiences=audiences,
        signing_algorithm=config.token_signing_algorithm,
        duration_s=config.token_duration_s,
    )
    yield claims_check
    if claims is None:
        yield _skipped(SIGNATURE, "needs valid claims")
        return
    if offline:
        yield _skipped(SIGNATURE, "--offline")
        return
    yield check_signature(token.value, issuer=claims["iss"], audiences=audiences)
