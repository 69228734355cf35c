"""The boto3 edge: region lookup, the STS client, and the ``fetch`` for :class:`TokenStore`.

The only proxy module that imports boto3/botocore. Everything
that leaves it is stdlib-typed: :class:`~jwt_proxy.tokens.Token` on success,
:class:`~jwt_proxy.tokens.TokenUnavailable` (with an operator hint) on failure.
A token value is never logged and never put in an exception. That includes
botocore's own records: at DEBUG ``botocore.parsers`` logs every response body
(the JWT) and ``botocore.endpoint`` every signed request (the session token), so
importing this module raises the ``botocore`` and ``boto3`` loggers to at least
:data:`AWS_SDK_MIN_LOG_LEVEL`, whatever ``--log-level`` the root logger gets.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import time
import typing as t
import weakref

import boto3.session
import botocore.config
import botocore.exceptions
import botocore.session

from jwt_proxy import __version__
from jwt_proxy.tokens import AudienceSet
from jwt_proxy.tokens import Token
from jwt_proxy.tokens import TokenUnavailable

if t.TYPE_CHECKING:
    from botocore.client import BaseClient

    from .config import Config

__all__ = [
    "HINTS",
    "STS_MAX_ATTEMPTS",
    "credentials_expiry",
    "hint_for",
    "make_fetch",
    "make_fetch_for",
    "make_sts_client",
    "resolve_region",
]

log = logging.getLogger("jwt_proxy.sts")

# Each client made here -> the botocore session whose credentials it signs with.
_SESSIONS: weakref.WeakKeyDictionary[BaseClient, botocore.session.Session] = weakref.WeakKeyDictionary()

AWS_SDK_MIN_LOG_LEVEL = logging.INFO
AWS_SDK_LOGGERS = ("botocore", "boto3")

# Two attempts in all: one retry absorbs a dropped connection or a single
# throttle without letting an outage multiply the wait (standard mode's first
# backoff is under 50 ms, or under 1 s after a throttling error). Passed as
# botocore's ``total_max_attempts``: its client-config ``max_attempts`` counts
# retries and adds one, which would silently make this three.
STS_MAX_ATTEMPTS = 2
# Connecting to a regional STS endpoint takes milliseconds; a connect that has
# not succeeded in this long is not going to, so the rest of each attempt's
# budget goes to the read.
STS_CONNECT_TIMEOUT_MAX_S = 5.0
STS_MIN_DURATION_S = 60  # GetWebIdentityToken's DurationSeconds minimum
# Left between a retried token's expiry and the end of the caller's session, for
# clock differences between this host and STS and for the call's own latency.
SESSION_EXPIRY_MARGIN_S = 10
# The longest AWS session (a role's maximum session duration): a credential expiry
# further away than this is searched no further.
SESSION_LONGEST_S = 12 * 3600
TRANSPORT_ERROR_CLASS = "transport"
NO_CREDENTIALS_ERROR_CLASS = "NoCredentials"
VALIDATION_ERROR_CLASS = "ValidationError"
SESSION_DURATION_ESCALATION = "SessionDurationEscalationException"

_THROTTLING_HINT = (
    "STS is throttling GetWebIdentityToken: use a longer --token-duration or fewer audience "
    "sets/workers (each worker caches its own tokens), or request a higher STS quota"
)
_ACCESS_DENIED_HINT = (
    "allow sts:GetWebIdentityToken (and sts:TagGetWebIdentityToken when sending --token-tag) "
    "for this identity, and check that policy/SCP conditions on sts:IdentityTokenAudience, "
    "sts:DurationSeconds and sts:SigningAlgorithm match --token-audience, --token-duration "
    "and --token-signing-algorithm"
)
_EXPIRED_CREDENTIALS_HINT = (
    "the AWS session credentials this process uses have expired: renew them "
    "(aws sso login, new env keys); instance, task and pod roles renew on their own"
)

HINTS: dict[str, str] = {
    # IAM EnableOutboundWebIdentityFederation (botocore iam 2010-05-08 service model).
    "OutboundWebIdentityFederationDisabledException": (
        "outbound identity federation is off for this AWS account: an administrator enables "
        "it once with `aws iam enable-outbound-web-identity-federation` "
        "(IAM EnableOutboundWebIdentityFederation) or in the IAM console"
    ),
    "AccessDenied": _ACCESS_DENIED_HINT,
    "AccessDeniedException": _ACCESS_DENIED_HINT,
    SESSION_DURATION_ESCALATION: (
        "the token would outlive the caller's own AWS session even for the shortest retry: "
        "lower --token-duration or give the role a longer session"
    ),
    "JWTPayloadSizeExceededException": (
        "the JWT would be too large: send fewer --token-tag values or shorter ones"
    ),
    "Throttling": _THROTTLING_HINT,
    "ThrottlingException": _THROTTLING_HINT,
    "RequestLimitExceeded": _THROTTLING_HINT,
    "ExpiredToken": _EXPIRED_CREDENTIALS_HINT,
    "ExpiredTokenException": _EXPIRED_CREDENTIALS_HINT,
    NO_CREDENTIALS_ERROR_CLASS: (
        "no AWS credentials found: attach an instance/task/pod role, or set AWS_PROFILE or "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for this process"
    ),
    "InvalidClientTokenId": (
        "AWS does not know this access key: check AWS_ACCESS_KEY_ID / the profile's keys, and "
        "that AWS_SESSION_TOKEN is set for temporary keys"
    ),
    "SignatureDoesNotMatch": (
        "AWS rejected the request signature: check the secret key and this host's clock"
    ),
    "RegionDisabledException": (
        "STS is not activated for this account in AWS_REGION: activate the region in IAM "
        "account settings or use another region"
    ),
    "InvalidAction": (
        "this STS endpoint does not know GetWebIdentityToken: check AWS_ENDPOINT_URL_STS "
        "points at a regional STS endpoint (or jwt-proxy local-sts)"
    ),
    TRANSPORT_ERROR_CLASS: (
        "STS could not be reached in time: check DNS, routing, security groups or the egress "
        "proxy to the regional endpoint sts.<region>.amazonaws.com (or AWS_ENDPOINT_URL_STS)"
    ),
    VALIDATION_ERROR_CLASS: (
        "STS rejected a parameter: check --token-audience (1-10 values), --token-duration "
        "(60s-1h), --token-scope (needs --token-subject-mode=OriginIdentity and one audience) "
        "and --token-tag"
    ),
    "expired": (
        "STS returned a token that had already expired by this host's clock: check time "
        "synchronisation (chrony/NTP) on this host"
    ),
}


def _keep_secrets_out_of_sdk_logs() -> None:
    """Stop botocore's DEBUG records (response bodies, signed headers) reaching any handler."""
    for name in AWS_SDK_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < AWS_SDK_MIN_LOG_LEVEL:  # NOTSET (0) included
            logger.setLevel(AWS_SDK_MIN_LOG_LEVEL)


_keep_secrets_out_of_sdk_logs()


def hint_for(error_class: str) -> str:
    """The operator hint for an AWS error code or ``"transport"``; ``""`` if none."""
    return HINTS.get(error_class, "")


def resolve_region() -> str | None:
    """Find the STS region the way the AWS CLI would, or ``None``.

    Order: ``AWS_REGION``, ``AWS_DEFAULT_REGION``, then the ``region`` of the
    shared-config profile (``AWS_PROFILE``, ``AWS_CONFIG_FILE``). ``AWS_REGION``
    is checked first because botocore's own chain ignores it, while the other
    AWS SDKs read it and Lambda sets it. Instance metadata is deliberately not asked:
    a missing region should fail fast at startup with "set AWS_REGION", not
    after an IMDS timeout. Empty values count as unset.

    :raises ValueError: ``AWS_PROFILE`` names a profile the config files lack.
    """
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    session = botocore.session.Session()
    try:
        region = session.get_config_variable("region")
    except botocore.exceptions.ProfileNotFound as exc:
        raise ValueError(f"AWS_PROFILE: {exc}") from exc
    if isinstance(region, str) and region.strip():
        return region.strip()
    return None


def make_sts_client(
    region: str, *, timeout_s: float, botocore_session: botocore.session.Session | None = None
) -> BaseClient:
    """A thread-safe STS client for ``region`` whose calls end within about ``timeout_s``.

    Make one per worker, after the fork. Each call builds its own session
    because boto3 sessions are not thread-safe; the client is (boto/boto3#1592).

    Timeouts: ``--upstream-timeout`` is passed as ``timeout_s`` and split over
    ``STS_MAX_ATTEMPTS`` attempts, each allowed ``connect + read`` seconds::

        per_attempt = timeout_s / STS_MAX_ATTEMPTS
        connect     = min(per_attempt / 2, STS_CONNECT_TIMEOUT_MAX_S)
        read        = per_attempt - connect

    An attempt either fails to connect within ``connect`` or connects and then
    waits at most ``read`` for the (small, single-read) response, so the
    attempts together take at most ``timeout_s``, plus the standard retry
    mode's jittered pause before the retry (under 50 ms, under 1 s after
    throttling). With the default 30 s: 2 attempts of 5 s connect + 10 s read.
    Fetching credentials themselves (IMDS, container endpoint) can add their
    own short timeouts on the rare call that refreshes them.

    The endpoint is always the regional one: ``GetWebIdentityToken`` does not
    exist on the global ``sts.amazonaws.com``, which botocore would pick for
    ``us-east-1`` and the other legacy regions under
    ``AWS_STS_REGIONAL_ENDPOINTS=legacy``. Setting ``sts_regional_endpoints``
    on the session outranks the environment and config file; an explicit
    ``AWS_ENDPOINT_URL_STS`` (or ``endpoint_url`` in the profile) still wins,
    which is how ``local-sts`` and tests are reached.

    ``botocore_session`` (tests) brings its own credential chain.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    per_attempt_s = timeout_s / STS_MAX_ATTEMPTS
    connect_timeout_s = min(per_attempt_s / 2, STS_CONNECT_TIMEOUT_MAX_S)
    read_timeout_s = per_attempt_s - connect_timeout_s
    config = botocore.config.Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"mode": "standard", "total_max_attempts": STS_MAX_ATTEMPTS},
        user_agent_extra=f"jwt-proxy/{__version__}",
    )
    core = botocore_session or botocore.session.Session()
    core.set_config_variable("sts_regional_endpoints", "regional")
    session = boto3.session.Session(botocore_session=core, region_name=region)
    client = session.client("sts", region_name=region, config=config)
    _SESSIONS[client] = core
    return client


def _credentials(client: BaseClient) -> t.Any:
    """The credentials object ``client`` signs with: its botocore session's.

    A client has no public accessor for its credentials, but its session does
    (``Session.get_credentials``, cached, so the very object the client was made
    with); :func:`make_sts_client` remembers each client's session.
    """
    core = _SESSIONS.get(client)
    if core is None:
        raise TypeError("the STS client was not made by jwt_proxy.sts.make_sts_client")
    return core.get_credentials()


def credentials_resolve(client: BaseClient) -> bool:
    """Whether the client has AWS credentials to sign with (no network call; for /readyz).

    botocore resolves the credential chain when the client is made; refreshable ones
    (role, SSO) are refreshed here if they are due, and a failure to get them reads as
    ``False``. Anything else (a botocore change) raises instead of reading as "not yet".
    """
    try:
        credentials = _credentials(client)
        return credentials is not None and bool(credentials.get_frozen_credentials().access_key)
    except botocore.exceptions.BotoCoreError:
        return False


def credentials_expiry(client: BaseClient) -> float | None:
    """When the client's AWS session ends (epoch seconds, to the second), if botocore knows.

    Used only to pick a shorter token after ``SessionDurationEscalationException``.
    Temporary credentials are a ``RefreshableCredentials``, whose public
    ``refresh_needed(refresh_in)`` tells whether they end within ``refresh_in``
    seconds: a bisection over that finds the end without reading its private expiry.
    Static keys (env, shared credentials file) have no expiry: ``None``.
    """
    try:
        credentials = _credentials(client)
    except botocore.exceptions.BotoCoreError:
        return None
    ends_within = getattr(credentials, "refresh_needed", None)
    if not callable(ends_within) or not ends_within(refresh_in=SESSION_LONGEST_S):
        return None
    low, high = -1, SESSION_LONGEST_S  # ends within ``high`` seconds, not within ``low``
    while high - low > 1:
        middle = (low + high) // 2
        if ends_within(refresh_in=middle):
            high = middle
        else:
            low = middle
    return time.time() + high


def make_fetch(
    client: BaseClient,
    *,
    signing_algorithm: str,
    duration_s: int,
    scope: str | None = None,
    subject_mode: str | None = None,
    tags: tuple[tuple[str, str], ...] = (),
) -> t.Callable[[AudienceSet], Token]:
    """Build the ``fetch`` for :class:`~jwt_proxy.tokens.TokenStore` from an STS client.

    The returned function calls ``GetWebIdentityToken`` for one normalized
    audience set and returns the token with the response's ``Expiration``.
    Every failure becomes :class:`TokenUnavailable` with ``error_class`` set to
    the AWS error code, ``"NoCredentials"`` (no usable credentials),
    ``"ValidationError"`` (botocore refused the parameters before sending) or
    ``"transport"`` (connection, timeout or any other botocore error), and the
    matching hint from :data:`HINTS`.

    If STS answers ``SessionDurationEscalationException`` (the token would
    outlive the caller's session), the call is retried once with a duration
    that ends :data:`SESSION_EXPIRY_MARGIN_S` before the session does, at least
    :data:`STS_MIN_DURATION_S`, and a warning is logged; the token keeps its
    real, shorter ``Expiration``, so the store refreshes it in time. A request
    that was already for the minimum is not retried.
    """
    base_params: dict[str, t.Any] = {"SigningAlgorithm": signing_algorithm}
    if scope:
        base_params["Scope"] = scope
    if subject_mode:
        base_params["SubjectMode"] = subject_mode
    if tags:
        base_params["Tags"] = [{"Key": key, "Value": value} for key, value in tags]

    def call(audiences: AudienceSet, duration: int) -> Token:
        response = client.get_web_identity_token(
            Audience=list(audiences), DurationSeconds=duration, **base_params
        )
        expiration = response["Expiration"]
        if expiration.tzinfo is None:  # botocore parses to aware UTC; be safe anyway
            expiration = expiration.replace(tzinfo=dt.timezone.utc)
        return Token(response["WebIdentityToken"], expiration.timestamp())

    def fetch(audiences: AudienceSet) -> Token:
        try:
            try:
                return call(audiences, duration_s)
            except botocore.exceptions.ClientError as exc:
                if _error_code(exc) != SESSION_DURATION_ESCALATION:
                    raise
                shorter_s = _duration_within_session(client, duration_s)
                if shorter_s >= duration_s:
                    raise  # already the shortest STS allows: nothing shorter to try
                log.warning(
                    "STS refused a %d s token for audience %s because it would outlive this "
                    "process's AWS session; retrying once with %d s",
                    duration_s,
                    ",".join(audiences),
                    shorter_s,
                    extra={
                        "audience": ",".join(audiences),
                        "requested_duration_s": duration_s,
                        "retry_duration_s": shorter_s,
                    },
                )
                return call(audiences, shorter_s)
        except botocore.exceptions.BotoCoreError as exc:
            raise _unavailable(audiences, *classify_error(exc)) from exc
        except botocore.exceptions.ClientError as exc:
            raise _unavailable(audiences, *classify_error(exc)) from exc

    return fetch


def classify_error(exc: botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError) -> tuple[str, str]:
    """``(error_class, detail)`` of a failed STS call: the AWS error code and its message,
    ``"NoCredentials"``, ``"ValidationError"`` (refused by botocore before sending), or
    ``"transport"`` (connection, timeout or any other botocore error)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return _error_code(exc), exc.response.get("Error", {}).get("Message", "")
    if isinstance(
        exc,
        (
            botocore.exceptions.NoCredentialsError,
            botocore.exceptions.PartialCredentialsError,
            botocore.exceptions.CredentialRetrievalError,
        ),
    ):
        return NO_CREDENTIALS_ERROR_CLASS, str(exc)
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        return VALIDATION_ERROR_CLASS, str(exc)
    return TRANSPORT_ERROR_CLASS, str(exc)  # EndpointConnectionError, ConnectTimeoutError, ...


def caller_identity(client: BaseClient) -> dict[str, str]:
    """``GetCallerIdentity`` on ``client``: who the proxy is to STS (for ``doctor``).

    :raises TokenUnavailable: with the error class and hint of :func:`classify_error`.
    """
    try:
        return client.get_caller_identity()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise _unavailable((), *classify_error(exc)) from exc


def make_fetch_for(client: BaseClient, config: Config) -> t.Callable[[AudienceSet], Token]:
    """:func:`make_fetch` with the token settings of ``config``: the proxy, ``jwt-proxy
    token`` and ``jwt-proxy doctor`` mint exactly the same tokens."""
    return make_fetch(
        client,
        signing_algorithm=config.token_signing_algorithm,
        duration_s=config.token_duration_s,
        scope=config.token_scope,
        subject_mode=config.token_subject_mode,
        tags=config.token_tags,
    )


def _error_code(exc: botocore.exceptions.ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "") or "Unknown"


def _unavailable(audiences: AudienceSet, error_class: str, detail: str) -> TokenUnavailable:
    return TokenUnavailable(audiences, error_class, detail, hint_for(error_class))


def _duration_within_session(client: BaseClient, duration_s: int) -> int:
    """A token duration that ends before the caller's session does.

    Falls back to the shortest duration STS allows when the session's expiry is
    unknown, or when by our clock the requested duration should have fitted
    (then STS and we disagree, and only a much shorter token can help).
    """
    expiry = credentials_expiry(client)
    if expiry is None:
        return STS_MIN_DURATION_S
    fitting_s = math.floor(expiry - time.time()) - SESSION_EXPIRY_MARGIN_S
    if fitting_s >= duration_s:
        return STS_MIN_DURATION_S
    return max(STS_MIN_DURATION_S, fitting_s)
