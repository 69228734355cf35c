"""The command line: ``jwt-proxy [OPTIONS]`` serves; subcommands are tools around it.

Options are declared once, in :data:`OPTIONS`, with their environment variable (the flag
upper-cased, dashes to underscores), default and help; that table is what ``--help``
shows and what the README lists. Every option is read as a string and validated by
:meth:`jwt_proxy.config.Config.from_options`, so a bad value from a flag or from the
environment fails the same way: one line naming the flag, before anything binds. Each
flag is also accepted with a single dash (``-upstream-host``), as Go's flag package
does, so the Go proxy's command lines work unchanged.
"""

from __future__ import annotations

import dataclasses
import shlex
import re
import signal
import sys
import threading
import typing as t

import click
from click.core import ParameterSource

from . import __version__
from .config import Config
from .config import ConfigError
from .config import parse_duration
from .config import parse_listen_addr

PROG = "jwt-proxy"
NO_REGION = (
    "no AWS region found: set AWS_REGION (or AWS_DEFAULT_REGION, or region in the AWS profile);"
    " GetWebIdentityToken is only served by regional STS endpoints"
)


class _CommaList(click.ParamType):
    """A repeatable option's item; from the environment the value is split on commas only."""

    name = "text"
    envvar_list_splitter = ","

    def convert(self, value, param, ctx):
        return value


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    default: str
    help: str
    repeatable: bool = False
    flag_value: str | None = None

    @property
    def envvar(self) -> str:
        return self.name.upper().replace("-", "_")


OPTIONS = (
    Option("listen-addr", "127.0.0.1:8080", "host:port, [v6]:port or :port (all interfaces) the proxy listens on."),
    Option("upstream-host", "", "Pin every request to this host[:port]; empty: the client names it in --host-header."),
    Option("upstream-scheme", "https", "http or https, for the upstream connection."),
    Option("host-header", "X-Upstream-Host", "Header that names the upstream when not pinned; Host means the Host line."),
    Option("allowed-upstream-hosts", "", "Patterns (api.example.com, *.example.com, optional :port) a client-chosen upstream must match.", repeatable=True),
    Option("upstream-timeout", "30s", "How long to wait for the upstream's response headers."),
    Option("upstream-ca-file", "", "PEM bundle of extra CAs trusted for HTTPS upstreams."),
    Option("token-audience", "", "Audience(s) of the JWT; empty: derived from the upstream as scheme://host.", repeatable=True),
    Option("token-signing-algorithm", "RS256", "RS256 or ES384."),
    Option("token-duration", "1h", "Token lifetime asked of STS, 60s to 1h."),
    Option("token-refresh-skew", "5m", "Refresh a token this long before it expires."),
    Option("token-scope", "", "OAuth scope sent to STS as Scope (needs OriginIdentity and one audience)."),
    Option("token-subject-mode", "", "AWSIdentity or OriginIdentity; empty: STS's default."),
    Option("token-tag", "", "KEY=VALUE tag sent to STS as Tags.", repeatable=True),
    Option("tls-cert", "", "PEM certificate; with --tls-key the listener speaks HTTPS."),
    Option("tls-key", "", "PEM private key for --tls-cert."),
    Option("log-level", "info", "debug, info, warn or error."),
    Option("log-format", "json", "json or text (logfmt)."),
    Option("metrics-enabled", "true", "Serve Prometheus metrics on a separate listener.", flag_value="true"),
    Option("metrics-listen-addr", "127.0.0.1:9090", "host:port of the metrics listener; must differ from --listen-addr."),
    Option("metrics-path", "/metrics", "Path of the Prometheus text on the metrics listener."),
    Option("workers", "2", "gunicorn worker processes."),
    Option("threads", "32", "Threads per worker: concurrent requests per worker."),
    Option("graceful-timeout", "30s", "How long SIGTERM waits for in-flight requests."),
    Option("shutdown-delay", "0s", "After SIGTERM, keep serving this long (/readyz answers 503), then drain."),
    Option("token-cache-size", "256", "The most audience sets one worker keeps tokens for; least recently used dropped first."),
    Option("token-file", "", "PATH=AUDIENCE: keep a fresh JWT for AUDIENCE in the file PATH (for SDKs that read one).", repeatable=True),
    Option("token-file-mode", "0600", "Octal file mode of the token files."),
    Option("token-listen-addr", "", "host:port of the token endpoint (GET /token?audience=AUD); empty: off."),
    Option("token-endpoint-audience", "", "The only audiences the token endpoint mints; required with --token-listen-addr.", repeatable=True),
)
# A flag named in an error message (``--token-duration``), not part of a longer word.
_FLAG_IN_TEXT = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def _add_options(command: t.Callable) -> t.Callable:
    for option in reversed(OPTIONS):
        python_name = option.name.replace("-", "_")
        extra: dict[str, t.Any] = {}
        if option.repeatable:
            extra = {"multiple": True, "type": _CommaList(), "default": ()}
        else:
            extra = {"default": option.default}
        if option.flag_value is not None:
            extra["flag_value"] = option.flag_value
            extra["is_flag"] = False
        command = click.option(
            f"--{option.name}",
            f"-{option.name}",
            python_name,
            envvar=option.envvar,
            show_default=bool(option.default),
            show_envvar=True,
            help=option.help,
            **extra,
        )(command)
    return command


def _option_named(flag: str) -> Option | None:
    return next((option for option in OPTIONS if f"--{option.name}" == flag), None)


def usage_error(ctx: click.Context, exc: ConfigError) -> click.UsageError:
    """The one-line error for a bad root option, naming what the operator actually set.

    Every option the message names whose value came from the environment is named by
    its variable (``TOKEN_DURATION``), not by a flag nobody typed: an error about two
    options (a duration at or below the skew) names each as it was set.
    """

    def as_set(match: re.Match[str]) -> str:
        option = _option_named(match.group(0))
        if option is not None and ctx.get_parameter_source(option.name.replace("-", "_")) is ParameterSource.ENVIRONMENT:
            return option.envvar
        return match.group(0)

    return click.UsageError(_FLAG_IN_TEXT.sub(as_set, str(exc)))


def validated_config(ctx: click.Context, **overrides: t.Any) -> Config:
    """A Config from the root command's parameters (``ctx`` is the root's context).

    :raises click.UsageError: one line naming the bad flag or environment variable.
    """
    try:
        return Config.from_options(**{**ctx.params, **overrides})
    except ConfigError as exc:
        raise usage_error(ctx, exc) from None


def build_config(ctx: click.Context, **overrides: t.Any) -> Config:
    """A validated Config from the root command's parameters, with the AWS region.

    ``ctx`` (the root command's context) tells which values came from the environment.

    :raises click.UsageError: one line naming the bad flag (or variable), or saying to set
        AWS_REGION.
    """
    from .sts import resolve_region

    config = validated_config(ctx, **overrides)
    try:
        region = resolve_region()
    except ValueError as exc:  # AWS_PROFILE names a profile that does not exist
        raise click.UsageError(f"AWS configuration: {exc}") from None
    if not region:
        raise click.UsageError(NO_REGION)
    return dataclasses.replace(config, region=region)


def config_from_environment() -> Config:
    """The Config that ``jwt-proxy`` with no flags would build: for ``conf/gunicorn.conf.py``."""
    context = root.make_context(PROG, [], resilient_parsing=False)
    return build_config(context)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_add_options
@click.version_option(__version__, "--version", "-version", prog_name=PROG, message="%(prog)s %(version)s")
@click.pass_context
def root(ctx: click.Context, **params: t.Any) -> None:
    """Proxy HTTP requests to an upstream with an AWS STS web identity JWT as bearer token.

    With no subcommand, serves on --listen-addr until SIGTERM.
    """
    ctx.obj = params
    if ctx.invoked_subcommand is not None:
        return
    config = build_config(ctx)
    # Imports gunicorn, not prometheus_client: the multiprocess directory must be settled
    # before anything imports that (its mode is chosen at import).
    from . import server

    if config.metrics_enabled:
        server.use_private_multiproc_dir()
    try:
        server.run(config)
    finally:
        server.remove_private_multiproc_dir()


@root.command()
def version() -> None:
    """Print the version."""
    click.echo(f"{PROG} {__version__}")


def _check_audience_option(audience: tuple[str, ...]) -> None:
    """A subcommand's ``--audience`` values, by ``--token-audience``'s rules, named as ``--audience``."""
    try:
        Config.from_options(token_audience=audience)
    except ConfigError as exc:
        raise click.UsageError(str(ConfigError("--audience", exc.value, exc.allowed))) from None


def _listen_addr(flag: str, value: str):
    try:
        return parse_listen_addr(flag, value)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _seconds(flag: str, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise click.UsageError(f"invalid value for {flag}: {value!r}: a duration such as 500ms, 30s or 5m") from None


def _wait_for_stop_signal() -> None:
    """Block until SIGINT or SIGTERM, so servers in threads can be shut down in order."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


@root.command()
@click.pass_context
def healthcheck(ctx: click.Context) -> None:
    """Exit 0 if the proxy's metrics listener answers /readyz with 200, else 1.

    Reads the same options as the proxy (--metrics-listen-addr / METRICS_LISTEN_ADDR; a
    wildcard address is asked on loopback), for container health checks:

    \b
        HEALTHCHECK CMD ["jwt-proxy", "healthcheck"]

    Prints one line either way. Every failure exits 1, as Docker and ECS expect.
    """
    from .config import parse_bool
    from .healthcheck import probe_readiness

    params = ctx.parent.params
    try:
        enabled = parse_bool(params["metrics_enabled"])
    except ValueError:
        enabled = True  # the proxy would not have started; the probe says nothing listens
    if not enabled:
        from_env = ctx.parent.get_parameter_source("metrics_enabled") is ParameterSource.ENVIRONMENT
        setting = "METRICS_ENABLED" if from_env else "--metrics-enabled"
        click.echo(f"{PROG}: not ready: the metrics listener is off ({setting}={params['metrics_enabled']}), nothing serves /readyz", err=True)
        ctx.exit(1)
    try:
        address = parse_listen_addr("--metrics-listen-addr", params["metrics_listen_addr"])
    except ConfigError as exc:
        click.echo(f"{PROG}: not ready: {usage_error(ctx.parent, exc).format_message()}", err=True)
        ctx.exit(1)
    result = probe_readiness(address)
    if not result.ready:
        click.echo(f"{PROG}: {result.line}", err=True)
        ctx.exit(1)
    click.echo(result.line)


def _configure_logging(ctx: click.Context) -> Config:
    """Log as the proxy does (``--log-level``, ``--log-format``), for subcommands that serve.

    Only the log options are read: the others are the proxy's, which these commands do
    not use, and a bad one in the environment must not stop them.
    """
    from .logs import configure

    params = ctx.parent.params
    try:
        config = Config.from_options(log_level=params["log_level"], log_format=params["log_format"])
    except ConfigError as exc:
        raise usage_error(ctx.parent, exc) from None
    configure(config.log_level, config.log_format)
    return config


@root.command("agent")
@click.pass_context
def agent_command(ctx: click.Context) -> None:
    """Keep token files fresh and serve the token endpoint, without the proxy listener.

    For workloads whose SDKs read an OIDC token themselves (Google Cloud, Azure, AWS in
    another account). Takes the proxy's options, before the subcommand:

    \b
        jwt-proxy --token-file /run/jwt/azure=api://AzureADTokenExchange agent

    Serves /metrics, /healthz and /readyz (ready once every token file is written) on
    --metrics-listen-addr. SIGTERM or SIGINT stops it (exit 0); the files stay.
    """
    config = build_config(ctx.parent)
    if not config.serves_sdk_tokens:
        raise click.UsageError("agent needs --token-file or --token-listen-addr: it has nothing else to do")
    from . import server

    if config.metrics_enabled:
        server.use_private_multiproc_dir()
    try:
        from .tokenagent import AgentStartError
        from .tokenagent import StandaloneAgent

        try:
            agent = StandaloneAgent(config)
        except AgentStartError as exc:
            click.echo(f"{PROG}: error: {exc}", err=True)
            ctx.exit(1)
        agent.start()
        try:
            _wait_for_stop_signal()
        finally:
            agent.stop()
    finally:
        server.remove_private_multiproc_dir()


@root.command("local-sts")
@click.option("--listen-addr", default="127.0.0.1:4599", show_default=True, help="host:port to serve on.")
@click.option("--fail-with", default=None, help="Answer every GetWebIdentityToken with this AWS error code.")
@click.option("--stall", default=None, help="Wait this long before answering (a duration).")
@click.option("--max-token-lifetime", default=None, help="Issue tokens that expire sooner than asked (a duration).")
@click.option(
    "--max-session-duration",
    default=None,
    help="With --fail-with=SessionDurationEscalationException: fail only above this duration.",
)
@click.pass_context
def local_sts(
    ctx: click.Context,
    listen_addr: str,
    fail_with: str | None,
    stall: str | None,
    max_token_lifetime: str | None,
    max_session_duration: str | None,
) -> None:
    """Serve a local stand-in for STS GetWebIdentityToken, with its JWKS (for development).

    Point the proxy at it with AWS_ENDPOINT_URL_STS=http://127.0.0.1:4599; any credentials
    are accepted. Logs one record per request to stdout, as the proxy does.
    """
    from .devtools.localsts import LocalSTS

    _configure_logging(ctx)
    address = _listen_addr("--listen-addr", listen_addr)
    lifetime_s = _seconds("--max-token-lifetime", max_token_lifetime)
    session_s = _seconds("--max-session-duration", max_session_duration)
    server = LocalSTS(
        address.host,
        address.port,
        fail_with=fail_with,
        stall_s=_seconds("--stall", stall) or 0.0,
        max_token_lifetime_s=int(lifetime_s) if lifetime_s is not None else None,
        max_session_duration_s=int(session_s) if session_s is not None else None,
    )
    server.start()
    click.echo(f"local-sts listening on {server.url} (AWS_ENDPOINT_URL_STS={server.url})", err=True)
    try:
        _wait_for_stop_signal()
    finally:
        server.shutdown()


@root.command()
@click.option("--listen-addr", default="127.0.0.1:8080", show_default=True, help="Where the proxy listens.")
@click.option("--sts-listen-addr", default="127.0.0.1:4599", show_default=True, help="Where local-sts listens.")
@click.option("--upstream-listen-addr", default="127.0.0.1:8081", show_default=True, help="Where the echo upstream listens.")
@click.option("--metrics-listen-addr", default="127.0.0.1:9090", show_default=True, help="Where the proxy's metrics listen.")
@click.pass_context
def demo(ctx: click.Context, listen_addr: str, sts_listen_addr: str, upstream_listen_addr: str, metrics_listen_addr: str) -> int:
    """Run local-sts, a JWT-verifying echo upstream and the proxy, wired on loopback.

    All three log to stdout in --log-format (JSON by default), one record per line; the
    banner with the curl to try goes to stderr.
    """
    for flag, value in (
        ("--listen-addr", listen_addr),
        ("--sts-listen-addr", sts_listen_addr),
        ("--upstream-listen-addr", upstream_listen_addr),
        ("--metrics-listen-addr", metrics_listen_addr),
    ):
        _listen_addr(flag, value)
    from .devtools.demo import run_demo

    log_config = _configure_logging(ctx)
    return run_demo(
        listen_addr=listen_addr,
        sts_addr=sts_listen_addr,
        upstream_addr=upstream_listen_addr,
        metrics_listen_addr=metrics_listen_addr,
        log_level=log_config.log_level,
        log_format=log_config.log_format,
    )


@root.command("token")
@click.option(
    "--audience",
    "audience",
    multiple=True,
    required=True,
    help="Audience of the token; repeatable and comma-separated (sorted and de-duplicated, as the proxy does).",
)
@click.option("--decode", is_flag=True, help="Print the token's header and claims as JSON (signature not verified).")
@click.pass_context
def token_command(ctx: click.Context, audience: tuple[str, ...], decode: bool) -> None:
    """Mint one token with the proxy's settings and credentials, and print it.

    The proxy's options go before the subcommand, as for the proxy itself:

    \b
        jwt-proxy --token-duration 10m token --audience https://api.example.com

    On failure: exit status 1 and the AWS error code, with a hint, on stderr.
    """
    import json

    import jwt

    from .sts import make_fetch_for
    from .sts import make_sts_client
    from .tokens import TokenUnavailable

    def fail(error_class: str, detail: str, hint: str) -> t.NoReturn:
        detail = " ".join(detail.split())
        click.echo(f"{PROG}: error: {error_class}" + (f": {detail}" if detail else ""), err=True)
        if hint:
            click.echo(f"hint: {hint}", err=True)
        ctx.exit(1)

    _check_audience_option(audience)
    # --token-scope is checked against the audiences this token is for.
    config = build_config(ctx.parent, token_audience=audience)
    try:
        client = make_sts_client(config.region, timeout_s=config.upstream_timeout_s)
    except Exception as exc:  # e.g. botocore's InvalidRegionError
        raise click.UsageError(f"AWS configuration: {exc}") from None
    fetch = make_fetch_for(client, config)
    try:
        minted = fetch(config.token_audiences)
    except TokenUnavailable as exc:
        fail(exc.error_class, exc.detail, exc.hint)
    except Exception as exc:  # only the class name: the message of a bug could hold anything
        fail("internal", type(exc).__name__, "the token fetch failed unexpectedly: report it with this line")
    if not decode:
        click.echo(minted.value)
        return
    try:
        header = jwt.get_unverified_header(minted.value)
        claims = jwt.decode(minted.value, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        fail(
            "InvalidToken",
            f"STS returned a token that is not a readable JWT: {exc}",
            "check that AWS_ENDPOINT_URL_STS, if set, points at STS or jwt-proxy local-sts",
        )
    click.echo(json.dumps({"header": header, "claims": claims}, indent=2))


@root.command("doctor")
@click.option("--offline", is_flag=True, help="Skip the signature check (no request to the token's issuer).")
@click.option(
    "--audience",
    "audience",
    multiple=True,
    help="Check this audience set instead of --token-audience (repeatable, comma-separated).",
)
@click.pass_context
def doctor_command(ctx: click.Context, offline: bool, audience: tuple[str, ...]) -> None:
    """Check the AWS side: region, credentials, a token, its claims and its signature.

    One line per check (PASS, FAIL with a hint, or SKIP when an earlier check failed);
    exit status 1 if any check fails. Uses the proxy's options, given before the
    subcommand:

    \b
        jwt-proxy --token-audience https://api.example.com doctor
    """
    from .doctor import run_checks

    overrides: dict[str, t.Any] = {}
    audience_source = "--token-audience"
    if audience:
        _check_audience_option(audience)
        overrides["token_audience"] = audience
        audience_source = "--audience"
    elif ctx.parent.get_parameter_source("token_audience") is ParameterSource.ENVIRONMENT:
        audience_source = "TOKEN_AUDIENCE"
    # build_config's validation without its region lookup: a missing region is the
    # first check's FAIL here, not a usage error.
    config = validated_config(ctx.parent, **overrides)
    failed = False
    for check in run_checks(config, offline=offline, audience_source=audience_source):
        for line in check.lines():
            click.echo(line)
        failed = failed or check.failed
    if failed:
        ctx.exit(1)


def _proxy_option_after_subcommand(exc: click.NoSuchOption, argv: list[str]) -> str:
    """A hint when a subcommand was given one of the proxy's options, else ``""``.

    The proxy's options belong to the root command, so ``jwt-proxy token --token-duration
    10m`` is an unknown option of ``token``; say where it goes, with the value given.
    (click reports a single-dash ``-token-scope`` as ``-t``, so argv is searched.)
    """
    if exc.ctx is None or exc.ctx.parent is None or exc.ctx.info_name not in argv:
        return ""
    subcommand = exc.ctx.info_name
    after = argv[argv.index(subcommand) + 1 :]
    for position, arg in enumerate(after):
        name, equals, inline_value = arg.lstrip("-").partition("=")
        option = _option_named(f"--{name}") if arg.startswith("-") else None
        if option is None:
            continue
        if equals:
            value = shlex.quote(inline_value)
        elif position + 1 < len(after):
            value = shlex.quote(after[position + 1])
        else:
            value = "VALUE"
        return f" (an option of {PROG} itself: it goes before the subcommand, {PROG} --{option.name} {value} {subcommand} ...)"
    return ""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; click's errors become one line on stderr and exit status 2."""
    args = sys.argv[1:] if argv is None else argv
    try:
        result = root.main(args=args, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.NoSuchOption as exc:
        hint = _proxy_option_after_subcommand(exc, args)
        message = exc.format_message().rstrip(".") + hint if hint else exc.format_message()
        click.echo(f"{PROG}: error: {message}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"{PROG}: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        return 130
    return result if isinstance(result, int) else 0
