"""The Flask app in-process: what a failure nobody anticipated leaves in the log and the body."""

from __future__ import annotations

import logging

from jwt_proxy.app import create_app
from jwt_proxy.config import Config
from jwt_proxy.upstream_session import make_session
from jwt_proxy.logs import JsonFormatter
from jwt_proxy.logs import LogfmtFormatter

SECRET = "eyJhbGciOiJSUzI1NiJ9.secret-in-a-message"


class ExplodingTokens:
    """A token store with a bug whose message quotes a secret."""

    def get(self, audiences):
        raise RuntimeError(f"could not parse {SECRET}")


def test_an_unexpected_error_is_a_fixed_500_and_its_message_is_not_logged(caplog):
    config = Config.from_options(
        upstream_host="127.0.0.1:9", upstream_scheme="http", metrics_enabled="false", region="us-east-1"
    )
    app = create_app(config, tokens=ExplodingTokens(), session=make_session(pool_maxsize=1))
    with caplog.at_level(logging.ERROR, logger="jwt_proxy.app"):
        response = app.test_client().get("/x?q=1")
    assert (response.status_code, response.data) == (500, b"internal error\n")
    (record,) = [r for r in caplog.records if r.name == "jwt_proxy.app"]
    for formatter in (JsonFormatter(), LogfmtFormatter()):
        line = formatter.format(record)
        assert SECRET not in line
        assert "RuntimeError" in line and "test_app.py" in line
