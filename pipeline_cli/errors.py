"""The one exception hierarchy of the pipeline and the exit codes it maps to.

Adapters wrap driver errors (psycopg, redis, minio, requests) into these classes; the CLI edge
turns them into an exit code through :data:`EXIT_CODES`. docs/architecture.md repeats the table.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .runner import StageResult

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCK_BUSY = 75  # EX_TEMPFAIL: someone else is doing this work right now
EXIT_CONFIG = 78  # EX_CONFIG: settings or database schema are not usable
EXIT_TIMED_OUT = 124  # as timeout(1): the stage's hard limit passed
EXIT_INTERRUPTED = 130  # 128 + SIGINT; SIGTERM gives 143, SIGHUP 129


class PipelineError(Exception):
    """Base class: an operator-meaningful failure with a one-line message.

    ``partial`` is what the stage had done when it failed (counts, problems): the runner
    records it with the failure, so a failed run still shows how far it got.
    """

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, partial: StageResult | None = None,
                 **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.partial = partial
        self.details = details

    def __str__(self) -> str:
        return self.message


class ConfigError(PipelineError):
    """A setting is missing or malformed. The message names the key."""

    exit_code = EXIT_CONFIG


class SchemaError(PipelineError):
    """The database schema is missing or not the version this code expects."""

    exit_code = EXIT_CONFIG


class LockBusy(PipelineError):
    """Another run holds the stage's advisory lock."""

    exit_code = EXIT_LOCK_BUSY


class ServiceError(PipelineError):
    """An outside system (PostgreSQL, Redis, S3, OSRM, OData) failed or is unreachable."""


class DatabaseError(ServiceError):
    pass


class ReadOnlyDatabase(DatabaseError):
    """[database] url names a database that refuses writes (a standby, or
    ``default_transaction_read_only``): a setting to fix, not an outage the next run outlives."""

    exit_code = EXIT_CONFIG


class MissingPrivilege(DatabaseError):
    """The role of [database] url lacks a privilege the command needs (CREATE on the schema
    for db migrate, SELECT for status, writes for the stages): a grant to fix."""

    exit_code = EXIT_CONFIG


class LoginRefused(DatabaseError):
    """PostgreSQL refuses the login of [database] url: a wrong or missing password, an unknown
    or NOLOGIN role, no pg_hba.conf entry. A setting to fix, as Redis's and S3's refused
    credentials, not an outage the next run outlives (exit 78)."""

    exit_code = EXIT_CONFIG


class RedisError(ServiceError):
    pass


class BackupError(ServiceError):
    """The S3 backup store failed."""


class SourceError(ServiceError):
    """The OData source failed: HTTP error, malformed page, cap exceeded."""


class OsrmError(ServiceError):
    # Requests the failing trace had sent when this was raised (set by match_trace), so a
    # failed batch records the OSRM calls it cost like a completed one.
    osrm_calls: int = 0


class ValidationError(PipelineError):
    """Input data broke a rule. Nothing was written."""

    def __init__(self, message: str, problems: list[str] | None = None, *,
                 partial: StageResult | None = None, **details: Any) -> None:
        super().__init__(message, partial=partial, **details)
        self.problems = problems or []


class UsageError(PipelineError):
    """A malformed option value that Click's own types cannot check (e.g. a --bbox)."""

    exit_code = EXIT_USAGE


class NothingToDo(PipelineError):
    """A precondition for the stage is not met (e.g. no active dataset); nothing was written."""


class Interrupted(PipelineError):
    """SIGTERM/SIGINT/SIGHUP arrived; the current unit was finished or rolled back."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
        self.exit_code = 128 + signum


S = TypeVar("S", bound="ServiceError")

_log = logging.getLogger("pipeline.services")

# Driver texts (requests, urllib3, minio, redis-py, psycopg) name the failure somewhere inside a
# long message that also holds the request URL (an OSRM polyline, an S3 query string). These
# markers turn it into the short phrase an operator needs; the full text goes to the debug log.
_CAUSES = (
    ("connection refused", "connection refused"),
    ("name or service not known", "host name not found"),
    ("nodename nor servname", "host name not found"),
    ("temporary failure in name resolution", "host name not found"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network unreachable"),
    ("connection reset", "connection reset"),
    ("remote end closed connection", "connection closed by the server"),
    ("server closed the connection", "connection closed by the server"),
    ("connection aborted", "connection aborted"),
    ("certificate verify failed", "TLS certificate not trusted"),
    # TLS asked of a plain server (rediss://, [s3] secure = true): an HTTP server answers the
    # handshake with plain text, Redis waits for a command and never answers it.
    ("wrong version number", "the server does not speak TLS on this port"),
    ("handshake operation timed out", "TLS handshake timed out (does the server speak TLS "
     "on this port?)"),
    ("timed out", "timed out"),
    ("timeout reading", "timed out"),
    ("timeout connecting", "timed out"),
)
# psycopg's 'connection failed: ' / 'connection is bad: ' and libpq's 'connection to server at
# "h", port p failed: ' (or 'on socket "..." failed: '): said twice after 'PostgreSQL h:p/db
# connection failed'.
_LIBPQ_PREFIX = re.compile(r'^(?:connection (?:failed|is bad): )?connection to server '
                           r'(?:at "[^"]*", port \d+|on socket "[^"]*") failed: ')
MAX_CAUSE = 200  # whole sentences: S3 SignatureDoesNotMatch is 130


def endpoint(url: str) -> str:
    """``scheme://host:port`` of a URL: no credentials, path or query (a ``host:port`` or
    ``host:port/dbname`` that is not a URL stays as it is)."""
    if "://" not in url:
        return url.rsplit("@", 1)[-1]
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}"


def public_url(url: str) -> str:
    """A URL with its path but without credentials, query or fragment, for a message that
    must name the path (a wrong ``[osrm] url`` prefix)."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return endpoint(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path.rstrip('/')}"


def cause(exc: BaseException | str) -> str:
    """A short phrase for a driver error (``connection refused``, ``timed out``), or the first
    line of its text (or of a given text) without URLs, cut to MAX_CAUSE characters."""
    if isinstance(exc, BaseException):
        chain = [str(exc)]
        inner: BaseException | None = exc.__cause__ or exc.__context__
        while inner is not None and len(chain) < 5:
            chain.append(str(inner))
            inner = inner.__cause__ or inner.__context__
        lowered = " ".join(chain).lower()
        for marker, phrase in _CAUSES:
            if marker in lowered:
                return phrase
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "FATAL:" in first:  # libpq: 'connection failed: connection to server at ... failed:
        first = first[first.index("FATAL:"):]  # FATAL: database "x" does not exist'
    else:  # the server tried, which the line names already: only libpq's reason
        first = _LIBPQ_PREFIX.sub("", first, count=1)
    if isinstance(exc, BaseException):  # drop the request's URL and query string
        first = " ".join(w for w in first.split() if "://" not in w and "?" not in w)
        first = first or type(exc).__name__
    return first if len(first) <= MAX_CAUSE else first[:MAX_CAUSE - 1] + "…"


def service_error(cls: type[S], system: str, where: str, what: str,
                  exc: BaseException | str | None = None, **details: Any) -> S:
    """The one shape of an outside system's failure: ``SYSTEM ENDPOINT WHAT: CAUSE``, e.g.
    ``OSRM http://127.0.0.1:5055 unreachable: connection refused``. ``where`` is passed through
    :func:`endpoint`; the driver's full text is logged at debug (``-v``), never in the line."""
    message = f"{system} {endpoint(where)} {what}"
    if exc is not None:
        message += f": {cause(exc)}"
        _log.debug("%s %s %s: %s: %s", system, endpoint(where), what,
                   type(exc).__name__ if isinstance(exc, BaseException) else "detail", exc)
    return cls(" ".join(message.split()), **details)


class TimedOut(PipelineError):
    """The run passed its hard limit ([runner] timeout_<stage>) and was stopped."""

    exit_code = EXIT_TIMED_OUT

    def __init__(self, stage: str, seconds: float, *, own: bool = True) -> None:
        # A stage inside run-all may be stopped by run-all's limit: say whose limit it was,
        # and name the setting, so an operator knows what to raise.
        prefix = "" if own else f"{stage}'s "
        setting = f"[runner] timeout_{stage.replace('-', '_')}"
        super().__init__(f"{prefix}hard limit of {seconds:g} s passed ({setting})")
        self.stage = stage
        self.seconds = seconds


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, PipelineError):
        return exc.exit_code
    return EXIT_FAILED


EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success, or nothing to do (noop)",
    EXIT_FAILED: "the stage failed (source, service, validation or data error)",
    EXIT_USAGE: "usage error (bad option or argument)",
    EXIT_LOCK_BUSY: "another run holds the stage lock; nothing was touched",
    EXIT_CONFIG: "configuration or database-schema error (run `pipeline db migrate`)",
    EXIT_TIMED_OUT: "the stage's hard limit ([runner] timeout_<stage>) passed; recorded as failed",
    EXIT_INTERRUPTED: "interrupted by SIGINT (SIGTERM gives 143, SIGHUP 129); the run is recorded "
                      "as failed",
}
