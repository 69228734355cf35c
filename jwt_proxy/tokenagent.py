"""The token agent: token files and the token endpoint, over one token store, in one process.

Why one process for the whole tree. Every gunicorn worker has a token store of its own; if
each worker kept the files, every refresh would cost one STS call per worker and the
workers would race each other on the same files. The gunicorn master is not the place
either: it forks workers (at start, on SIGHUP, after a crash), and an AWS client, its
connection pool and its credential refresher are not safe across a fork, so the master
never makes one. The master therefore forks this agent from its ``on_starting`` hook,
before it has bound a worker socket, started a thread, made a worker or an AWS client;
the agent then makes its own STS client, and holds the only token store the files and
the endpoint use: one STS call per audience per refresh for the whole process tree.

The master binds the endpoint's socket before the fork, so a taken port stops the start
with one line before the proxy listener binds. It stops the agent in ``on_exit``, after
the workers have drained; an agent whose master disappears (``SIGKILL``) stops by itself.
``/readyz`` answers ``503`` until every token file has been written, or when the agent
has exited.

``jwt-proxy agent`` runs the same :class:`TokenAgent` in its own process, with the
metrics listener and without gunicorn (:class:`StandaloneAgent`).
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import sys
import threading
import time
import typing as t

from . import logs
from . import server
from .logs import exception_fields
from .tokenendpoint import EndpointServer
from .tokenendpoint import TokenEndpoint
from .tokenendpoint import bind_endpoint_socket
from .tokenfiles import TokenFileKeeper

if t.TYPE_CHECKING:
    import socket

    from gunicorn.arbiter import Arbiter

    from .config import Config
    from .metrics import MetricsListener
    from .metrics import WorkerMetrics

__all__ = ["StandaloneAgent", "AgentStartError", "TokenAgent", "add_agent_hooks", "forked_agent_problem"]

log = logging.getLogger("jwt_proxy.tokenagent")

# How often the forked agent checks that its master is still there.
PARENT_CHECK_S = 1.0
# How long the master waits for the agent to stop before killing it.
AGENT_STOP_TIMEOUT_S = 5.0
STOP_POLL_S = 0.05


class AgentStartError(RuntimeError):
    """A listener of the agent cannot start; ``str()`` is the one line to print."""


class TokenAgent:
    """The token files and the token endpoint of one process, over one token store.

    Made after any fork, in the process that serves: :meth:`start` makes the STS client.

    :param endpoint_socket: the bound endpoint socket, or ``None`` without an endpoint.
    :param recorder: the process's metrics, or ``None`` when metrics are off.
    :param on_ready: called once every token file has been written (at start when there
        are none).
    """

    def __init__(
        self,
        config: Config,
        endpoint_socket: socket.socket | None,
        *,
        recorder: WorkerMetrics | None = None,
        on_ready: t.Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._endpoint_socket = endpoint_socket
        self._recorder = recorder
        self._on_ready = on_ready
        self._stop = threading.Event()
        self._endpoint: EndpointServer | None = None
        self._paths_by_audience: dict[str, list[str]] = {}
        for token_file in config.token_files:
            self._paths_by_audience.setdefault(token_file.audience, []).append(token_file.path)
        self._written: set[str] = set()
        self._written_lock = threading.Lock()

    def start(self) -> None:
        from .app import make_sts_client
        from .app import make_token_store

        tokens = make_token_store(self._config, client=make_sts_client(self._config), recorder=self._recorder)
        for audience, paths in self._paths_by_audience.items():
            keeper = TokenFileKeeper(
                tokens,
                audience,
                paths,
                mode=self._config.token_file_mode,
                refresh_skew_s=self._config.token_refresh_skew_s,
                on_written=lambda audience=audience: self._file_written(audience),
            )
            threading.Thread(target=keeper.run, args=(self._stop,), name="jwt-proxy-token-file", daemon=True).start()
        if self._endpoint_socket is not None:
            app = TokenEndpoint(tokens, self._config.token_endpoint_audiences)
            self._endpoint = EndpointServer(self._endpoint_socket, app)
            self._endpoint.start()
        if not self._paths_by_audience and self._on_ready is not None:
            self._on_ready()
        log.info(
            "token agent started",
            extra={
                "pid": os.getpid(),
                "token_files": [token_file.path for token_file in self._config.token_files],
                "token_endpoint": self._config.token_listen.bind if self._config.token_listen else None,
            },
        )

    def stop(self) -> None:
        """Stop refreshing and serving; the files stay (a reader may still need them)."""
        self._stop.set()
        if self._endpoint is not None:
            self._endpoint.stop()
            self._endpoint = None

    def readiness_problem(self) -> str | None:
        """``None`` once every token file has been written, else the reason."""
        with self._written_lock:
            waiting = len(self._paths_by_audience) - len(self._written)
        if waiting <= 0:
            return None
        return f"{waiting} of {len(self._paths_by_audience)} token file audiences not written yet (see the error log)"

    def _file_written(self, audience: str) -> None:
        with self._written_lock:
            self._written.add(audience)
            done = len(self._written) == len(self._paths_by_audience)
        if done and self._on_ready is not None:
            self._on_ready()


def _endpoint_socket(config: Config) -> socket.socket | None:
    """The endpoint's bound socket, or ``None`` without ``--token-listen-addr``.

    :raises AgentStartError: it cannot be bound.
    """
    if config.token_listen is None:
        return None
    try:
        return bind_endpoint_socket(config.token_listen)
    except OSError as exc:
        raise AgentStartError(
            f"--token-listen-addr {config.token_listen.bind}: cannot listen there: {exc.strerror or exc}"
        ) from None


# -- forked from the gunicorn master -------------------------------------------------------


class _ForkedAgent:
    """The master's handle on the agent it forked: its pid and its ready flag."""

    def __init__(self, config: Config, endpoint_socket: socket.socket | None, close_in_child: t.Callable[[], None]) -> None:
        # One shared byte: the child sets it when every file is written; the master reads it.
        self._ready = mmap.mmap(-1, 1)
        master_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            _run_forked(config, endpoint_socket, self._ready, close_in_child, master_pid)
        self.pid = pid
        self._exited = False
        if endpoint_socket is not None:
            endpoint_socket.close()  # the agent serves it; workers must not inherit it

    def exited(self) -> bool:
        """Whether the agent has exited; once seen, remembered (its pid may be reused)."""
        if not self._exited:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # gunicorn's reaper collected it first
                done = self.pid
            self._exited = done == self.pid
        return self._exited

    def problem(self) -> str | None:
        if self.exited():
            return f"the token agent (pid {self.pid}) has exited: token files are not refreshed (see the error log)"
        if self._ready[0] != 1:
            return "the token agent has not written every token file yet (see the error log)"
        return None

    def stop(self) -> None:
        if self.exited():
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + AGENT_STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.exited():
                return
            time.sleep(STOP_POLL_S)
        os.kill(self.pid, signal.SIGKILL)
        self.exited()


def _run_forked(
    config: Config,
    endpoint_socket: socket.socket | None,
    ready: mmap.mmap,
    close_in_child: t.Callable[[], None],
    master_pid: int,
) -> t.NoReturn:
    """The forked agent's whole life; never returns into the master's code."""
    code = 1
    try:
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload of the master's workers, not ours
        close_in_child()
        recorder = None
        if config.metrics_enabled:
            from .metrics import WorkerMetrics

            recorder = WorkerMetrics(counts_as_worker=False)

        def mark_ready() -> None:
            ready[0] = 1

        agent = TokenAgent(config, endpoint_socket, recorder=recorder, on_ready=mark_ready)
        agent.start()
        while not stop.wait(PARENT_CHECK_S):
            if os.getppid() != master_pid:
                log.error("the jwt-proxy master has gone; the token agent stops")
                break
        agent.stop()
        code = 0
    except BaseException as exc:
        log.error("the token agent failed", extra=exception_fields(exc))
    finally:
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)


_forked: _ForkedAgent | None = None


def forked_agent_problem() -> str | None:
    """For the master's ``/readyz``: why the forked agent is not ready, or ``None``."""
    return _forked.problem() if _forked is not None else None


def add_agent_hooks(
    config: Config, hooks: dict[str, t.Callable[..., None]], *, close_in_child: t.Callable[[], None]
) -> dict[str, t.Callable[..., None]]:
    """``hooks`` with the agent forked at the end of ``on_starting`` and stopped in ``on_exit``.

    :param close_in_child: closes what the agent must not keep of the master's (the
        metrics listener's socket).
    """
    starting = hooks.get("on_starting")
    exiting = hooks.get("on_exit")

    def on_starting(arbiter: Arbiter) -> None:
        global _forked
        if starting is not None:
            starting(arbiter)
        try:
            endpoint_socket = _endpoint_socket(config)
        except AgentStartError as exc:
            print(f"{arbiter.cfg.proc_name}: error: {exc}", file=sys.stderr, flush=True)
            server.remove_private_multiproc_dir()
            sys.exit(1)
        _forked = _ForkedAgent(config, endpoint_socket, close_in_child)

    def on_exit(arbiter: Arbiter) -> None:
        global _forked
        if _forked is not None:
            _forked.stop()
            _forked = None
        if exiting is not None:
            exiting(arbiter)

    return {**hooks, "on_starting": on_starting, "on_exit": on_exit}


# -- jwt-proxy agent -----------------------------------------------------------------------


class StandaloneAgent:
    """``jwt-proxy agent``: the token agent and the metrics listener, without gunicorn.

    Both listeners are bound by the constructor, so a bad address stops the start with
    one line; :meth:`start` serves, :meth:`stop` stops (the files stay).

    :raises AgentStartError: a listener cannot be bound, or the metrics directory is unusable.
    """

    def __init__(self, config: Config) -> None:
        logs.configure(config.log_level, config.log_format)
        self._listener: MetricsListener | None = None
        recorder = None
        if config.metrics_enabled:
            self._listener, recorder = self._metrics(config)
        try:
            endpoint_socket = _endpoint_socket(config)
        except AgentStartError:
            if self._listener is not None:
                self._listener.stop()
            raise
        self._agent = TokenAgent(config, endpoint_socket, recorder=recorder)

    def _metrics(self, config: Config) -> tuple[MetricsListener, WorkerMetrics]:
        path = os.environ.get(server.MULTIPROC_DIR_ENV, "")
        try:
            server.prepare_multiproc_dir(path)
        except OSError as exc:
            raise AgentStartError(f"{server.MULTIPROC_DIR_ENV}={path}: {exc.strerror or exc}") from None
        from . import metrics

        address = config.metrics_listen
        try:
            listener = metrics.MetricsListener(
                address.host,
                address.port,
                config.metrics_path,
                readiness=lambda: self._agent.readiness_problem(),
                worker_pids=tuple,
                multiproc_dir=path,
            )
        except OSError as exc:
            raise AgentStartError(
                f"--metrics-listen-addr {address.bind}: cannot listen there: {exc.strerror or exc}"
            ) from None
        return listener, metrics.WorkerMetrics(counts_as_worker=False)

    def start(self) -> None:
        self._agent.start()
        if self._listener is not None:
            self._listener.start()

    def stop(self) -> None:
        self._agent.stop()
        if self._listener is not None:
            self._listener.stop()
        log.info("token agent stopped")
