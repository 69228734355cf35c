"""gunicorn settings for ``gunicorn -c conf/gunicorn.conf.py`` (the systemd unit uses it).

Configured by the same environment variables as ``jwt-proxy`` (LISTEN_ADDR,
UPSTREAM_HOST, ...), validated the same way before anything binds, and turned into
gunicorn settings by the same function, so the two ways of starting cannot drift apart.
"""

import sys

import click

from jwt_proxy.cli import PROG
from jwt_proxy.cli import config_from_environment
from jwt_proxy.server import gunicorn_options

try:
    _config = config_from_environment()
except click.UsageError as exc:
    print(f"{PROG}: error: {exc.format_message()}", file=sys.stderr)
    sys.exit(2)

globals().update(gunicorn_options(_config))
wsgi_app = "jwt_proxy.wsgi:application"
