"""One record per line on stdout, as JSON or logfmt, for our records and gunicorn's alike.

Fields are passed with ``extra=``; every attribute a record carries beyond the standard
:class:`logging.LogRecord` ones is written out as a field. Libraries that log request or
response bodies at debug level (botocore logs the STS response, which holds the token;
urllib3 logs request targets with their query strings) are held at ``WARNING`` whatever
``--log-level`` says, so that no token or secret query parameter reaches a log line.
"""

from __future__ import annotations

import datetime
import json
import logging
import typing as t

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}

# Loggers that would write tokens or query strings at debug level.
QUIET_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer", "werkzeug")

_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime", "taskName"}
)
_LEVEL_NAMES = {"WARNING": "warn", "CRITICAL": "error"}


def _fields(record: logging.LogRecord) -> dict[str, t.Any]:
    fields: dict[str, t.Any] = {
        "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
            timespec="milliseconds"
        ),
        "level": _LEVEL_NAMES.get(record.levelname, record.levelname.lower()),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in record.__dict__.items():
        if key not in _STANDARD_ATTRS and not key.startswith("_"):
            fields[key] = value
    if record.exc_info and record.exc_info[0] is not None:
        fields["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
    return fields


def exception_fields(exc: BaseException) -> dict[str, str]:
    """Log fields for an unexpected exception: its type and where it was raised.

    Not its message: an unexpected error can quote what it choked on (botocore's parser
    errors quote the raw STS response, which holds the token; http.client quotes header
    values), so records of errors nobody anticipated carry no message.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = ""
    if tb is not None:
        code = tb.tb_frame.f_code
        where = f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}"
    return {"error": type(exc).__name__, "raised_at": where}


class JsonFormatter(logging.Formatter):
    """A JSON object per record; non-JSON values are written with ``str()``."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str, ensure_ascii=False)


class LogfmtFormatter(logging.Formatter):
    """``key=value`` pairs per record; values with spaces, quotes or ``=`` are quoted."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in _fields(record).items())


def _logfmt_value(value: t.Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


def logging_config(level: str, fmt: str) -> dict[str, t.Any]:
    """A :func:`logging.config.dictConfig` dict for the proxy and gunicorn's loggers.

    gunicorn applies it in the master (its ``logconfig_dict`` setting) and the workers
    inherit it through the fork.
    """
    formatter = "json" if fmt == "json" else "text"
    handler = {"class": "logging.StreamHandler", "formatter": formatter, "stream": "ext://sys.stdout"}
    level_name = logging.getLevelName(LEVELS[level])
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": JsonFormatter},
            "text": {"()": LogfmtFormatter},
        },
        "handlers": {"stdout": handler},
        "root": {"level": level_name, "handlers": ["stdout"]},
        "loggers": {
            "gunicorn.error": {"level": level_name, "handlers": ["stdout"], "propagate": False},
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            **{name: {"level": "WARNING"} for name in QUIET_LOGGERS},
        },
    }


def configure(level: str, fmt: str) -> None:
    """Apply :func:`logging_config` in this process (subcommands and plain gunicorn)."""
    import logging.config

    logging.config.dictConfig(logging_config(level, fmt))
