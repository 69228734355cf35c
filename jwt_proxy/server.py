"""gunicorn, started from the CLI or from ``conf/gunicorn.conf.py``, with the same settings.

:func:`gunicorn_options` is the single place where a :class:`~jwt_proxy.config.Config`
becomes gunicorn settings, so ``jwt-proxy`` and ``gunicorn -c conf/gunicorn.conf.py``
cannot drift apart. The app is built in :meth:`GunicornApp.load`, which gunicorn calls in
each worker after the fork (``preload_app`` stays off), so boto3 clients, the
``requests.Session`` and the token store are per worker and never cross a fork.

With metrics enabled, :func:`metrics_hooks` adds the gunicorn server hooks that run the
metrics listener in the master (:class:`jwt_proxy.metrics.MetricsListener`) and keep
prometheus_client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``) in order:

* ``on_starting``: make a private directory if none is set, else create/empty the one
  set (only its ``*.db`` value files are removed); bind the metrics address, or stop
  with one line before the proxy listener binds;
* ``when_ready``: serve the metrics port (:func:`shutdown_hooks` notes
  SIGTERM/SIGINT/SIGQUIT so that ``/readyz`` answers ``503`` from then on);
* ``post_fork``: a worker closes its inherited copy of the metrics socket;
* ``child_exit`` (master) and ``worker_exit``: forget the worker's ``live*`` gauges;
* ``on_exit``: stop the listener and remove the private directory.

Always, :func:`listening_hooks` binds the proxy's listening sockets in the master, one
per worker, and hands each worker its own (so a restarted worker drops no queued
connection), and :func:`shutdown_hooks` marks the shutdown for ``/readyz``, waits out
``--shutdown-delay`` and stops the sockets from taking new connections before the
drain.

State shared by the hooks lives in this module, not in the hooks, because a SIGHUP
under plain gunicorn re-reads ``conf/gunicorn.conf.py`` and so makes new hooks.
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import typing as t

from gunicorn import sock as gunicorn_sock
from gunicorn.app.base import BaseApplication

from . import logs, syn_filter

if t.TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter

    from .config import Config
    from .metrics import MetricsListener

# How long the master waits for a silent worker before killing it. gthread workers
# heartbeat from their main loop, so this is a liveness check, not a request deadline.
WORKER_LIVENESS_TIMEOUT_S = 30
# Idle keep-alive connections from clients are closed after this long.
CLIENT_KEEPALIVE_S = 5
# Heartbeat files on disk can stall under I/O pressure (gunicorn FAQ); use RAM when present.
SHM_DIR = "/dev/shm"

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client at import
MULTIPROC_DIR_PREFIX = "jwt-proxy-metrics-"
# prometheus_client's value files: all that is removed from a directory we did not make.
MULTIPROC_FILES = "*.db"
# The master's signals that stop serving; from the first of them /readyz answers 503.
SHUTDOWN_HANDLERS = ("handle_term", "handle_int", "handle_quit")

# The private directory this process made: (path, pid). Workers unwind through the same
# Python frames as the master when they exit, so removal checks the pid.
_owned_multiproc_dir: tuple[str, int] | None = None
_listener: MetricsListener | None = None
_shutting_down = threading.Event()
# Monotonic end of the shutdown delay, while the master waits it out.
_serving_until = 0.0


def use_private_multiproc_dir() -> str | None:
    """Point prometheus_client at a fresh private directory if none is set.

    Must run before anything imports prometheus_client: its multiprocess mode is chosen
    at import. The directory is made by :func:`tempfile.mkdtemp` (mode 0700) and removed
    by :func:`remove_private_multiproc_dir`. A directory already named by the environment
    (systemd's ``RuntimeDirectory``, the container image) is left to its owner.

    :returns: the new directory, or ``None`` when the environment names one.
    """
    global _owned_multiproc_dir
    if os.environ.get(MULTIPROC_DIR_ENV):
        return None
    path = tempfile.mkdtemp(prefix=MULTIPROC_DIR_PREFIX)
    os.environ[MULTIPROC_DIR_ENV] = path
    _owned_multiproc_dir = (path, os.getpid())
    return path


def remove_private_multiproc_dir() -> None:
    """Remove the directory :func:`use_private_multiproc_dir` made, in the process that made it."""
    global _owned_multiproc_dir
    if _owned_multiproc_dir is None or _owned_multiproc_dir[1] != os.getpid():
        return
    path, _ = _owned_multiproc_dir
    _owned_multiproc_dir = None
    shutil.rmtree(path, ignore_errors=True)


def prepare_multiproc_dir(path: str) -> None:
    """Create ``path`` if needed and empty it of a previous run's value files.

    :raises OSError: it cannot be created, or this user cannot write to it.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"not writable by this user (uid {os.getuid()})")
    for name in glob.glob(os.path.join(glob.escape(path), MULTIPROC_FILES)):
        os.remove(name)


def readiness(config: Config, arbiter: Arbiter) -> str | None:
    """``None`` when the proxy is ready, else the one-line reason ``/readyz`` gives.

    Ready means: not shutting down, and every worker gunicorn is meant to run has said so
    through the ``jwt_proxy_ready_workers`` gauge (credentials resolve and, with
    configured audiences, the token is minted).
    """
    from . import metrics

    if _shutting_down.is_set():
        if _serving_until > time.monotonic():
            return "shutting down: still serving for the shutdown delay, then draining"
        return "shutting down: finishing in-flight requests"
    if config.serves_sdk_tokens:
        from .tokenagent import forked_agent_problem

        problem = forked_agent_problem()
        if problem is not None:
            return problem
    expected = arbiter.num_workers
    ready = metrics.ready_workers()
    if ready >= expected:
        return None
    if config.token_audiences:
        waiting_for = f"minted the token for audience {','.join(config.token_audiences)}"
    else:
        waiting_for = "resolved AWS credentials"
    return f"{ready} of {expected} workers have {waiting_for} (see the error log)"


def metrics_hooks(config: Config) -> dict[str, t.Callable[..., None]]:
    """The gunicorn server hooks of the metrics listener (see the module docstring)."""

    def fail(arbiter: Arbiter, message: str) -> t.NoReturn:
        print(f"{arbiter.cfg.proc_name}: error: {message}", file=sys.stderr, flush=True)
        remove_private_multiproc_dir()
        sys.exit(1)

    def on_starting(arbiter: Arbiter) -> None:
        global _listener
        path = os.environ.get(MULTIPROC_DIR_ENV, "")
        try:
            path = use_private_multiproc_dir() or path
            prepare_multiproc_dir(path)
        except OSError as exc:
            fail(arbiter, f"{MULTIPROC_DIR_ENV}={path or '(a new temporary directory)'}: {exc.strerror or exc}")
        from . import metrics

        address = config.metrics_listen
        try:
            _listener = metrics.MetricsListener(
                address.host,
                address.port,
                config.metrics_path,
                readiness=lambda: readiness(config, arbiter),
                worker_pids=lambda: list(arbiter.WORKERS),
                multiproc_dir=path,
            )
        except OSError as exc:
            fail(arbiter, f"--metrics-listen-addr {address.bind}: cannot listen there: {exc.strerror or exc}")

    def when_ready(arbiter: Arbiter) -> None:
        if _listener is not None:
            _listener.start()

    def post_fork(arbiter: Arbiter, worker: t.Any) -> None:
        if _listener is not None:
            _listener.close_in_child()

    def forget_worker(arbiter: Arbiter, worker: t.Any) -> None:
        from . import metrics

        metrics.mark_process_dead(worker.pid)

    def on_exit(arbiter: Arbiter) -> None:
        global _listener
        if _listener is not None:
            _listener.stop()
            _listener = None
        remove_private_multiproc_dir()

    return {
        "on_starting": on_starting,
        "when_ready": when_ready,
        "post_fork": post_fork,
        "child_exit": forget_worker,
        "worker_exit": forget_worker,
        "on_exit": on_exit,
    }


def shutdown_hooks(config: Config) -> dict[str, t.Callable[..., None]]:
    """The gunicorn server hook that notes the shutdown and waits out ``--shutdown-delay``.

    ``when_ready`` replaces the arbiter's SIGTERM, SIGINT and SIGQUIT handlers by ones
    that first mark the proxy as shutting down (``/readyz`` answers ``503``). SIGTERM then
    keeps every worker serving, new connections included, for the delay: a sidecar's
    application that is told to stop at the same moment may still send requests, and
    a load balancer needs a moment to see the failed readiness check. Only then does
    gunicorn's drain start.
    """

    def when_ready(arbiter: Arbiter) -> None:
        for name in SHUTDOWN_HANDLERS:
            handler = getattr(arbiter, name)

            def shut_down(handler: t.Callable[[], None] = handler, name: str = name) -> None:
                _shutting_down.set()
                if name == "handle_term" and config.shutdown_delay_s > 0:
                    _serve_through_delay(arbiter, config.shutdown_delay_s)
                _refuse_new_connections(arbiter)
                handler()

            # The arbiter looks its handlers up by name on itself, so this one is used.
            setattr(arbiter, name, shut_down)

    return {"when_ready": when_ready}


def _refuse_new_connections(arbiter: Arbiter) -> None:
    """Stop the listening sockets from taking new connections as the drain starts.

    Each stopping worker takes the connections queued on its socket, then closes it,
    and a connection queued in between would be reset with it. A socket filter that
    drops SYNs (:mod:`jwt_proxy.syn_filter`) closes that window: from now on a new
    client's SYN goes unanswered, and its retry a second later is refused, which is
    what a client of a stopped server should see. Where socket filters are missing,
    the backlog is cut to its minimum instead, so that at most one connection per
    socket can be reset. Only at a stop: after a SIGHUP the new workers keep using the
    sockets.
    """
    for listener in arbiter.LISTENERS:
        sock = getattr(listener, "sock", None)  # gunicorn's wrapper of the listening socket
        if sock is None or sock.fileno() < 0:
            continue  # already closed: nothing is queued on it any more
        try:
            syn_filter.refuse_new_connections(sock)
        except OSError:
            with contextlib.suppress(OSError):  # closed by a worker's exit in the meantime
                sock.listen(0)


def _serve_through_delay(arbiter: Arbiter, delay_s: float) -> None:
    """Keep the workers running for ``delay_s`` (the master's loop, minus new signals).

    Workers that exit meanwhile are replaced. SIGINT or SIGQUIT stops at once, as
    always; a second SIGTERM ends the delay.
    """
    global _serving_until
    arbiter.log.info("Still serving for %ss (--shutdown-delay), /readyz answers 503; then draining", delay_s)
    _serving_until = time.monotonic() + delay_s
    try:
        while (remaining := _serving_until - time.monotonic()) > 0:
            for sig in arbiter.wait_for_signals(timeout=min(1.0, remaining)):
                name = arbiter.SIG_NAMES.get(sig)
                if name in ("int", "quit"):
                    getattr(arbiter, f"handle_{name}")()  # raises StopIteration: a quick stop
                elif name == "term":
                    return
                elif name in ("chld", "cld"):
                    arbiter.handle_chld()
            arbiter.murder_workers()
            arbiter.manage_workers()
    finally:
        _serving_until = 0.0


def listening_hooks(config: Config) -> dict[str, t.Callable[..., None]]:
    """The gunicorn server hooks that give each worker a listening socket of its own,
    owned by the master.

    Each worker accepts on a socket of its own (``SO_REUSEPORT``; the kernel spreads
    new connections over them). On one shared socket the worker that wakes first takes
    most of a burst of keep-alive connections, and that one worker, held to one
    core by the GIL, then serves nearly all the traffic.

    The master binds these sockets, one per worker slot, and keeps them open for its
    whole life; a worker gets its slot's socket at the fork (``pre_fork`` picks the slot
    with the fewest live workers, ``post_fork`` closes the other slots in the child). So
    a worker that exits (SIGHUP, a crash) never takes an accept queue with it: the
    connections queued there wait for the worker that replaces it, which shares the
    socket while the old one drains. A socket bound in the worker itself would be
    closed with the worker, and the kernel resets every connection still queued on it.
    """

    def on_starting(arbiter: Arbiter) -> None:
        arbiter.LISTENERS = [_reuse_port_socket(config, arbiter) for _ in range(config.workers)]

    def pre_fork(arbiter: Arbiter, worker: t.Any) -> None:
        slots = len(arbiter.LISTENERS)
        live = [getattr(other, "listen_slot", None) for other in arbiter.WORKERS.values()]
        worker.listen_slot = min(range(slots), key=live.count) if slots else None

    def post_fork(arbiter: Arbiter, worker: t.Any) -> None:
        slot = getattr(worker, "listen_slot", None)
        if slot is None or len(worker.sockets) != len(arbiter.LISTENERS):
            return  # the arbiter made its own listeners (a reload with a new address)
        for index, listener in enumerate(worker.sockets):
            if index != slot:
                listener.close()  # the child's copy only: the master keeps it
        worker.sockets = [worker.sockets[slot]]

    return {"on_starting": on_starting, "pre_fork": pre_fork, "post_fork": post_fork}


def _reuse_port_socket(config: Config, arbiter: Arbiter) -> t.Any:
    """A listening socket on ``--listen-addr`` that shares the port (``SO_REUSEPORT``),
    in gunicorn's wrapper (its log line, TCP_NODELAY, the backlog setting)."""
    family, socktype, proto, _, sockaddr = socket.getaddrinfo(
        config.listen.host, config.listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    raw = socket.socket(family, socktype, proto)
    try:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        raw.bind(sockaddr)
        raw.listen(arbiter.cfg.backlog)
    except BaseException:
        raw.close()
        raise
    wrapper = gunicorn_sock.TCP6Socket if family == socket.AF_INET6 else gunicorn_sock.TCPSocket
    return wrapper(sockaddr, arbiter.cfg, arbiter.log, fd=raw.detach())


def _chain(*hooks: t.Callable[..., None] | None) -> t.Callable[..., None]:
    """One gunicorn hook that runs ``hooks`` (those not None) in order.

    gunicorn checks a hook's number of positional parameters, so the chain has the
    same number as the hooks (one for the arbiter's hooks, two with the worker's).
    """
    present = [hook for hook in hooks if hook is not None]
    if len(inspect.signature(present[0]).parameters) == 1:

        def run_all(arbiter: Arbiter) -> None:
            for hook in present:
                hook(arbiter)

        return run_all

    def run_all_with_worker(arbiter: Arbiter, worker: t.Any) -> None:
        for hook in present:
            hook(arbiter, worker)

    return run_all_with_worker


# gthread, plus a deadline on receiving each request head (jwt_proxy.worker).
WORKER_CLASS = "jwt_proxy.worker.ProxyWorker"
# gunicorn's logger minus its access records: the proxy writes its own (jwt_proxy.worker).
LOGGER_CLASS = "jwt_proxy.worker.ServerLogger"
# How requests are parsed: set explicitly, because these are part of what the listener
# promises (README, Security), whatever gunicorn's defaults or FORWARDED_ALLOW_IPS say.
REQUEST_PARSING_OPTIONS: dict[str, t.Any] = {
    # Longer request line: 414. More header lines, or a longer one: 431.
    "limit_request_line": 8190,
    "limit_request_fields": 100,
    "limit_request_field_size": 8190,
    # A folded header line (obs-fold) is refused with 400, never unfolded.
    "permit_obsolete_folding": False,
    # Header names with "_" are dropped: X_Upstream_Host must not pass for X-Upstream-Host.
    "header_map": "drop",
    # HTTP/1.1 only: no h2c upgrade or prior-knowledge HTTP/2 on the listener.
    "http_protocols": "h1",
    "http2_cleartext": "off",
    # No peer may set SCRIPT_NAME/PATH_INFO or the scheme through headers: the proxy is
    # the first hop, and gunicorn trusts loopback peers by default.
    "forwarded_allow_ips": "",
}


def gunicorn_options(config: Config) -> dict[str, t.Any]:
    """gunicorn settings for ``config``: settings, and the metrics hooks when metrics are on."""
    options: dict[str, t.Any] = {
        "bind": [config.listen.bind],
        "worker_class": WORKER_CLASS,
        "workers": config.workers,
        "threads": config.threads,
        "graceful_timeout": int(-(-config.graceful_timeout_s // 1)),  # gunicorn takes whole seconds; round up
        "timeout": WORKER_LIVENESS_TIMEOUT_S,
        "keepalive": CLIENT_KEEPALIVE_S,
        "preload_app": False,
        "accesslog": None,
        "logger_class": LOGGER_CLASS,
        "errorlog": "-",
        "loglevel": "warning" if config.log_level == "warn" else config.log_level,
        "logconfig_dict": logs.logging_config(config.log_level, config.log_format),
        "proc_name": "jwt-proxy",
        # No control socket: under a hardened unit there is no writable home for it, and
        # several proxies on one host would fight over one path.
        "control_socket_disable": True,
        # A socket per worker, with SO_REUSEPORT, but bound and kept by the master
        # (listening_hooks): gunicorn's reuse_port would bind it in the worker.
        "reuse_port": False,
        **REQUEST_PARSING_OPTIONS,
    }
    if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK):
        options["worker_tmp_dir"] = SHM_DIR
    if config.tls_cert:
        options["certfile"] = config.tls_cert
        options["keyfile"] = config.tls_key
    hook_sets = [shutdown_hooks(config), metrics_hooks(config) if config.metrics_enabled else {}]
    if config.serves_sdk_tokens:  # token files / token endpoint: one agent process for the tree
        from .tokenagent import add_agent_hooks

        hook_sets[1] = add_agent_hooks(config, hook_sets[1], close_in_child=_close_metrics_socket)
    listening = listening_hooks(config)
    for name in ("when_ready", "pre_fork", "post_fork", "child_exit", "worker_exit", "on_exit"):
        hooks = [hook_set[name] for hook_set in (*hook_sets, listening) if name in hook_set]
        if hooks:
            options[name] = _chain(*hooks)
    # The address is checked first, the metrics listener binds (and the token agent is
    # forked, holding none of the proxy's sockets), then the proxy listener.
    options["on_starting"] = _check_listen_address_first(
        config, _chain(hook_sets[1].get("on_starting"), listening["on_starting"])
    )
    return options


def _close_metrics_socket() -> None:
    if _listener is not None:
        _listener.close_in_child()


def _check_listen_address_first(
    config: Config, then: t.Callable[[Arbiter], None] | None
) -> t.Callable[[Arbiter], None]:
    """gunicorn's ``on_starting``: stop with one line if ``--listen-addr`` is taken, then ``then``.

    The proxy's sockets share their port (``SO_REUSEPORT``), so binding them would not
    notice a port that another jwt-proxy of the same user holds: they would join its
    sockets and share its traffic. A plain bind first, before anything else binds,
    refuses that as well as a port another program holds.
    """

    def on_starting(arbiter: Arbiter) -> None:
        problem = listen_address_problem(config.listen.host, config.listen.port)
        if problem is not None:
            print(
                f"{arbiter.cfg.proc_name}: error: --listen-addr {config.listen.bind}: cannot listen there: {problem}",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
        if then is not None:
            then(arbiter)

    return on_starting


def listen_address_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (in use, not a local address), or None.

    Binds a socket without ``SO_REUSEPORT`` and closes it: that fails while anything
    listens there, reuse-port sockets included.
    """
    try:
        family, socktype, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, socktype, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
            probe.bind(sockaddr)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


class GunicornApp(BaseApplication):
    """gunicorn's master and gthread workers serving :func:`jwt_proxy.app.create_app`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.options = gunicorn_options(config)
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        from .app import create_app

        return create_app(self.config)


def log_startup_warnings(config: Config) -> None:
    """Log :meth:`Config.startup_warnings` in the proxy's log format, before gunicorn starts."""
    warnings = config.startup_warnings()
    if warnings:
        logs.configure(config.log_level, config.log_format)
        for warning in warnings:
            logging.getLogger("jwt_proxy.config").warning(warning)


def run(config: Config) -> None:
    """Serve until SIGTERM or SIGINT; returns when gunicorn's master has exited."""
    log_startup_warnings(config)
    GunicornApp(config).run()
