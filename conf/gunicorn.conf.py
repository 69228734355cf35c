"""gunicorn settings for ``gunicorn -c conf/gunicorn.conf.py`` (the systemd unit uses it).

Configured by the same environment variables as ``jwt-proxy`` (LISTEN_ADDR,
UPSTREAM_HOST, ...), validated the same way before anything binds, and turned into
gunicorn settings by the same function, so the two ways of starting cannot drift apart.
That includes the metrics hooks (``jwt_proxy.server.metrics_hooks``): the metrics
listener in the master, and ``PROMETHEUS_MULTIPROC_DIR`` (the unit's RuntimeDirectory,
or a private temporary directory when it is not set) emptied at start.
"""

import sys

import click

from jwt_proxy.cli import PROG
from jwt_proxy.cli import config_from_environment
from jwt_proxy.server import gunicorn_options
from jwt_proxy.server import log_startup_warnings

try:
    _config = config_from_environment()
except click.UsageError as exc:
    print(f"{PROG}: error: {exc.format_message()}", file=sys.stderr)
    sys.exit(2)

log_startup_warnings(_config)  # e.g. tokens in clear text with UPSTREAM_SCHEME=http
globals().update(gunicorn_options(_config))
wsgi_app = "jwt_proxy.wsgi:application"
