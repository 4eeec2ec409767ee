"""The one exception hierarchy of the pipeline and the exit codes it maps to.

Adapters wrap driver errors (psycopg, redis, minio, requests) into these classes; the CLI edge
turns them into an exit code through :data:`EXIT_CODES`. docs/architecture.md repeats the table.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCK_BUSY = 75  # EX_TEMPFAIL: someone else is doing this work right now
EXIT_CONFIG = 78  # EX_CONFIG: settings or database schema are not usable
EXIT_TIMED_OUT = 124  # as timeout(1): the stage's hard limit passed
EXIT_INTERRUPTED = 130  # 128 + SIGINT; SIGTERM gives 143


class PipelineError(Exception):
    """Base class: an operator-meaningful failure with a one-line message."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
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

    def __init__(self, message: str, problems: list[str] | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.problems = problems or []


class NothingToDo(PipelineError):
    """A precondition for the stage is not met (e.g. no active dataset); nothing was written."""


class Interrupted(PipelineError):
    """SIGTERM/SIGINT arrived; the current unit was finished or rolled back."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
        self.exit_code = 128 + signum


class TimedOut(PipelineError):
    """The run passed its hard limit ([runner] timeout_<stage>) and was stopped."""

    exit_code = EXIT_TIMED_OUT

    def __init__(self, stage: str, seconds: float, *, own: bool = True) -> None:
        # A stage inside run-all may be stopped by run-all's limit: say whose limit it was.
        prefix = "" if own else f"{stage}'s "
        super().__init__(f"{prefix}hard limit of {seconds:g} s passed")
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
    EXIT_INTERRUPTED: "interrupted by SIGINT (SIGTERM gives 143); the run is recorded as failed",
}
