"""The WSGI entry point for plain gunicorn (``conf/gunicorn.conf.py`` names it).

Imported in each worker after the fork, so the app (and its STS client and HTTP
session) is built per worker, from the same environment variables as ``jwt-proxy``.
"""

from __future__ import annotations

from .app import create_app
from .cli import config_from_environment

application = create_app(config_from_environment())
