"""Logging for cron and terminals: text or one JSON object per line, always on stderr.

Every record passes a redaction filter, so a secret that slips into a message (a URL with a
password, a token in an error body) is masked before it reaches a log file or a cron mail.
"""

from __future__ import annotations

import codecs
import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "stage", "run_id"}
# A control character in text from outside (a feed's key holding a newline) would forge lines
# of its own in a text log or error line: it is shown escaped.
ESCAPES = ({c: f"\\x{c:02x}" for c in (*range(32), *range(127, 160))}
            | {9: "\\t", 10: "\\n", 13: "\\r"})


def one_line(text: str) -> str:
    return text.translate(ESCAPES)


def utc_seconds(value: datetime) -> str:
    """A time in text as the log lines give it, in UTC with a Z (``2026-12-07T02:21:03Z``):
    a timestamptz comes in the database session's zone (the server's, or PGTZ), which is not
    the reader's. A naive time is shown as it is."""
    if value.tzinfo is None:
        return value.isoformat(timespec="seconds")
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class RedactFilter(logging.Filter):
    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redact(record.getMessage())
        record.args = None
        for key, value in vars(record).items():  # extra= fields reach JSON logs too
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, self.redact(value))
        return True


class JsonFormatter(logging.Formatter):
    """ts, level, stage, run_id, msg, fields: one object per line."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return json_line(record.levelname.lower(), record.getMessage(), logger=record.name,
                         stage=getattr(record, "stage", None),
                         run_id=getattr(record, "run_id", None), fields=fields,
                         created=record.created, exc=exc)


def json_line(level: str, msg: str, *, logger: str = "pipeline", stage: str | None = None,
              run_id: str | None = None, fields: dict[str, Any] | None = None,
              created: float | None = None, exc: str | None = None) -> str:
    """One log object: ts, level, stage, run_id, logger, msg, fields (and exc). The CLI's own
    error lines use it too, so under ``--log-format json`` every stderr line is one object."""
    when = datetime.fromtimestamp(created, UTC) if created is not None else datetime.now(UTC)
    out: dict[str, Any] = {
        "ts": when.isoformat(timespec="milliseconds"),
        "level": level,
        "stage": stage,
        "run_id": run_id,
        "logger": logger,
        "msg": msg,
        "fields": fields or {},
    }
    if exc:
        out["exc"] = exc
    # On a stderr that is not UTF-8 (LC_ALL=C with PYTHONUTF8=0) Python escapes what it
    # cannot encode, and "ä" became \xe4, which is not JSON: JSON's own escapes instead.
    return json.dumps(out, default=str, ensure_ascii=not _utf8(sys.stderr))


def _utf8(stream: Any) -> bool:
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "ascii").name == "utf-8"
    except LookupError:
        return False


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        stage = getattr(record, "stage", None)
        where = f" [{stage}]" if stage else ""
        return f"{ts} {record.levelname.lower():7s}{where} {one_line(record.getMessage())}"


def setup_logging(fmt: str, verbosity: int, redact: Callable[[str], str]) -> None:
    """Configure the ``pipeline`` logger tree. verbosity: -1 quiet, 0 normal, 1+ debug.

    Quiet is errors only: cron mails whatever a job prints, and a success must not mail.
    """
    level = {-1: logging.ERROR, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactFilter(redact))
    # psycopg's own warnings ("error ignored terminating <Pipeline ...>") repeat an error the
    # run reports anyway; unhandled they went to stderr raw, even under -q and in JSON logs.
    for name, at in (("pipeline", level), ("psycopg", max(level, logging.ERROR))):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(at)
        logger.propagate = False
