"""gunicorn, started from the CLI or from ``conf/gunicorn.conf.py``, with the same settings.

:func:`gunicorn_options` is the single place where a :class:`~jwt_proxy.config.Config`
becomes gunicorn settings, so ``jwt-proxy`` and ``gunicorn -c conf/gunicorn.conf.py``
cannot drift apart. The app is built in :meth:`GunicornApp.load`, which gunicorn calls in
each worker after the fork (``preload_app`` stays off), so boto3 clients, the
``requests.Session`` and the token store are per worker and never cross a fork.
"""

from __future__ import annotations

import os
import typing as t

from gunicorn.app.base import BaseApplication

from . import logs

if t.TYPE_CHECKING:
    from .config import Config

# How long the master waits for a silent worker before killing it. gthread workers
# heartbeat from their main loop, so this is a liveness check, not a request deadline.
WORKER_LIVENESS_TIMEOUT_S = 30
# Idle keep-alive connections from clients are closed after this long.
CLIENT_KEEPALIVE_S = 5
# Heartbeat files on disk can stall under I/O pressure (gunicorn FAQ); use RAM when present.
SHM_DIR = "/dev/shm"


def gunicorn_options(config: Config) -> dict[str, t.Any]:
    """gunicorn settings for ``config``; no hooks and no application, just settings."""
    options: dict[str, t.Any] = {
        "bind": [config.listen.bind],
        "worker_class": "gthread",
        "workers": config.workers,
        "threads": config.threads,
        "graceful_timeout": int(-(-config.graceful_timeout_s // 1)),  # gunicorn takes whole seconds; round up
        "timeout": WORKER_LIVENESS_TIMEOUT_S,
        "keepalive": CLIENT_KEEPALIVE_S,
        "preload_app": False,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning" if config.log_level == "warn" else config.log_level,
        "logconfig_dict": logs.logging_config(config.log_level, config.log_format),
        "proc_name": "jwt-proxy",
        # No control socket: under a hardened unit there is no writable home for it, and
        # several proxies on one host would fight over one path.
        "control_socket_disable": True,
    }
    if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK):
        options["worker_tmp_dir"] = SHM_DIR
    if config.tls_cert:
        options["certfile"] = config.tls_cert
        options["keyfile"] = config.tls_key
    return options


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


def run(config: Config) -> None:
    """Serve until SIGTERM or SIGINT; returns when gunicorn's master has exited."""
    GunicornApp(config).run()
