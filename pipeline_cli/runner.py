"""The one mechanism that runs any stage: advisory lock, run history, signals, result.

Every stage goes through :meth:`StageRunner.run`. The runner keeps a "lock" transaction open on
a connection of its own for the whole run: it holds the stage's advisory lock (singleton stages)
and the run's own lock, both transaction-scoped, so they end with the transaction, or with the
process when it dies. That works the same through a transaction pooler (PgBouncer pins one
server session to an open transaction) and without one. The ``stage_runs`` row is written on a
second, autocommit connection, so it is visible at once; a ``running`` row whose run lock
nobody holds is recognised as ``crashed``. The stage's own database work happens in
transactions on its own connections, so a failure leaves no partial rows. Every run has a hard
limit (``[runner] timeout_<stage>``): when it passes, the run is stopped and recorded as failed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from . import db
from .errors import (
    EXIT_FAILED,
    EXIT_LOCK_BUSY,
    EXIT_OK,
    Interrupted,
    LockBusy,
    PipelineError,
    TimedOut,
    exit_code_for,
)
from .logs import utc_seconds

log = logging.getLogger("pipeline.runner")

SUCCESS, NOOP, FAILED, SKIPPED, CRASHED, RUNNING = (
    "success", "noop", "failed", "skipped", "crashed", "running"
)
DRY_RUN = "dry-run"  # the result of a dry run, which writes no run row

# Stages that take the singleton lock. match-gps is absent on purpose: any number of workers
# may run at once because each batch is claimed row by row (FOR UPDATE SKIP LOCKED).
SINGLETON_STAGES = ("sync-odata", "gen-virtual", "build-graph", "run-all", "prune")
ALL_STAGES = ("sync-odata", "gen-virtual", "build-graph", "match-gps", "run-all", "prune")


@dataclass
class StageResult:
    """What a stage function returns. ``extra`` keys appear at the top level of ``--json``."""

    status: str = SUCCESS
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    message: str = ""


@dataclass
class RunRecord:
    """A finished run as recorded in ``stage_runs`` and rendered by the CLI."""

    stage: str
    run_id: str
    status: str
    duration_ms: int
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    error: str | None = None
    exit_code: int = EXIT_OK
    recorded: bool = True  # False for a dry run: no stage_runs row has this run id

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "stage": self.stage,
            "status": self.status,
            "run_id": self.run_id if self.recorded else None,
            "duration_ms": self.duration_ms,
            "counts": self.counts,
        }
        out.update(self.extra)
        if self.error is not None:
            out["error"] = self.error
            out["exit_code"] = self.exit_code
        return out


class Progress(Protocol):
    def advance(self, n: int = 1) -> None: ...
    def set_total(self, total: int | None) -> None: ...


class _NoProgress:
    def advance(self, n: int = 1) -> None:
        pass

    def set_total(self, total: int | None) -> None:
        pass


ProgressFactory = Callable[[str, "int | None"], Any]  # returns a context manager of Progress


@contextmanager
def no_progress(description: str, total: int | None = None) -> Iterator[Progress]:
    yield _NoProgress()


# SIGHUP too: a hung-up SSH session or terminal stops a run as SIGTERM does, with its line and
# exit code (129), instead of killing it unrecorded (``running``, later ``crashed``).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _catch_stop_signals(handler: Callable[[int, FrameType | None], Any]) -> dict[int, Any]:
    """Install ``handler`` for the STOP_SIGNALS; returns the previous handlers. A SIGHUP that
    is ignored (``nohup``) stays ignored. ValueError outside the main thread."""
    saved: dict[int, Any] = {}
    for sig in STOP_SIGNALS:
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        saved[sig] = signal.signal(sig, handler)
    return saved


def _leave_terminal() -> None:
    """After a hangup the terminal is gone and every write to it fails (EIO): the run's last
    lines went nowhere and Python exited 120. Its streams now write to /dev/null, so the run
    ends with its own code (129); a pipe or file (cron's mail, a log) keeps its lines."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1, 2):
            with suppress(OSError):
                if stat.S_ISCHR(os.fstat(fd).st_mode):  # a terminal (or /dev/null itself)
                    os.dup2(null, fd)
    finally:
        os.close(null)


class StopFlag:
    """Set by SIGTERM/SIGINT/SIGHUP. Stages poll it between units of work via
    ``ctx.check_stop()``.

    The first signal asks the stage to finish or roll back its current unit; a second one
    interrupts at once (the open transaction rolls back because the exception unwinds it).
    Inside :meth:`RunContext.interruptible` the first one does too.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at_once = False  # a signal now interrupts where the stage stands
        self._depth = 0
        self._saved: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            _leave_terminal()
        if self.signum is not None or self.at_once:
            self.signum = signum
            db.cancel_statements()  # else the server runs the statement on, only to roll back
            raise Interrupted(signum)
        self.signum = signum
        log.warning("signal %s received: finishing the current unit, then stopping", signum)

    def __enter__(self) -> StopFlag:
        if self._depth == 0:
            self.signum = None
            try:
                self._saved = _catch_stop_signals(self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                self._saved.clear()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._saved.items():
                signal.signal(sig, handler)
            self._saved.clear()


# After the hard limit passes, the running statements are cancelled so their transactions roll
# back cleanly; a run that has not ended this many seconds later is interrupted where it stands.
CANCEL_GRACE_S = 5.0


@dataclass(eq=False)
class _Limit:
    stage: str
    seconds: float
    deadline: float
    expired: bool = False


class HardLimits:
    """The hard limits of the runs in progress, enforced with SIGALRM.

    Runs nest (run-all runs each stage through the runner), so the alarm is armed for the
    earliest deadline of all of them. When it fires, the running PostgreSQL statements are
    cancelled (the stage then fails with QueryCanceled, its transaction rolled back) or, when
    none is running, ``TimedOut`` is raised where the stage stands, as a second Ctrl-C does.
    Stages also see it at their next ``ctx.check_stop()``. Outside the main thread, where
    signals cannot be used, runs have no hard limit.
    """

    def __init__(self) -> None:
        self._active: list[_Limit] = []
        self._saved: Any = None

    def expired(self) -> _Limit | None:
        return next((lim for lim in self._active if lim.expired), None)

    @contextmanager
    def limit(self, stage: str, seconds: float | None) -> Iterator[_Limit | None]:
        if not seconds or threading.current_thread() is not threading.main_thread():
            yield None
            return
        lim = _Limit(stage, seconds, time.monotonic() + seconds)
        if not self._active:
            self._saved = signal.signal(signal.SIGALRM, self._fire)
        self._active.append(lim)
        self._arm()
        try:
            yield lim
        finally:
            self._active.remove(lim)
            if self._active:
                self._arm()
            else:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, self._saved)

    def _arm(self) -> None:
        pending = [lim.deadline for lim in self._active if not lim.expired]
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(min(pending) - time.monotonic(), 0.001))

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        first = self.expired() is None
        for each in self._active:
            each.expired = each.expired or each.deadline <= now + 0.001
        lim = self.expired()
        if lim is None:  # woken early (a nested run re-armed the timer): wait on
            self._arm()
            return
        log.debug("%s: hard limit of %g s passed: stopping the run", lim.stage, lim.seconds)
        if first and db.cancel_statements():
            signal.setitimer(signal.ITIMER_REAL, CANCEL_GRACE_S)
            return
        self._arm()  # a nested run's own limit may still be pending
        raise TimedOut(lim.stage, lim.seconds)


_LIMITS = HardLimits()


class StageLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds stage and run id to every record, keeping the caller's own ``extra`` fields."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


@dataclass
class RunContext:
    """Handed to a stage function: its run id, logger, stop flag and progress reporting."""

    stage: str
    run_id: str
    log: logging.LoggerAdapter[logging.Logger]
    stop: StopFlag
    progress: ProgressFactory = no_progress
    started: float = field(default_factory=time.monotonic)
    limits: HardLimits = field(default_factory=lambda: _LIMITS)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stretch where stopping at any point loses nothing (an open transaction that will
        roll back): the first stop signal interrupts at once instead of waiting for the next
        ``check_stop()``, which a server that never answers would hold off for minutes."""
        self.check_stop()
        before, self.stop.at_once = self.stop.at_once, True
        try:
            yield
        finally:
            self.stop.at_once = before

    def check_stop(self) -> None:
        """Raise Interrupted after a stop signal, TimedOut after the hard limit passed (this
        run's or an enclosing run-all's); call it between units of work."""
        if self.stop.signum is not None:
            raise Interrupted(self.stop.signum)
        expired = self.limits.expired()
        if expired is not None:
            raise TimedOut(expired.stage, expired.seconds, own=expired.stage == self.stage)

    @property
    def stop_requested(self) -> bool:
        return self.stop.requested


@dataclass
class LockHolder:
    stage: str | None
    host: str | None
    pid: int | None
    since: datetime | None
    backend_pid: int
    application_name: str

    def describe(self) -> str:
        if self.host is not None:
            since = utc_seconds(self.since) if self.since else "?"  # as the log lines
            pid = f" pid {self.pid}" if self.pid is not None else ""
            return f"host {self.host}{pid} since {since}"
        return f"session {self.backend_pid} ({self.application_name or 'unknown'})"


def lock_holders(conn: psycopg.Connection[Any], names: tuple[str, ...]) -> dict[str, LockHolder]:
    """Who holds each named stage lock right now (names without a holder are absent)."""
    keys = {db.advisory_key(n): n for n in names}
    with db.wrap_errors("reading lock holders"):
        rows = conn.execute(db.query("runner", "lock_holders"), {"keys": list(keys)}).fetchall()
    return {
        keys[r["key"]]: LockHolder(
            stage=r["stage"], host=r["host"], pid=r["pid"],
            since=r["started_at"] or r["backend_start"], backend_pid=r["backend_pid"],
            application_name=r["application_name"],
        )
        for r in rows
    }


def run_lock_key(run_id: str) -> int:
    """The advisory key a run holds while its process lives (see :func:`reap_crashed`)."""
    return db.advisory_key(f"run:{run_id}")


def _lock_alive(lock: psycopg.Connection[Any]) -> bool:
    """Whether the session that holds the run's locks is still there."""
    try:
        lock.execute(db.query("runner", "lock_alive")).fetchone()
    except psycopg.Error:
        return False
    return True


def reap_crashed(conn: psycopg.Connection[Any]) -> list[str]:
    """Mark runs whose process died as ``crashed``; returns their run ids."""
    with db.wrap_errors("reaping crashed runs"):
        running = [str(r["run_id"]) for r in conn.execute(db.query("runner", "running_runs"))]
        rows = conn.execute(db.query("runner", "reap_crashed"), {
            "run_ids": running, "keys": [run_lock_key(r) for r in running]}).fetchall() \
            if running else []
        if not conn.autocommit:
            conn.commit()
    for r in rows:
        log.warning("run %s of %s had crashed; recorded as crashed", r["run_id"], r["stage"])
    return [str(r["run_id"]) for r in rows]


_STOP = StopFlag()


def ignore_late_signals() -> Callable[[], None]:
    """From here on the stop signals (SIGTERM, SIGINT, SIGHUP) are logged and ignored;
    returns what restores the previous handlers (nothing changes outside the main thread).

    For the CLI once a run's result is recorded: a signal while it renders the result and
    closes its clients (cron's ``timeout``, a deploy) must leave the recorded result's exit
    code, not make it 143 with nothing said."""
    def late(signum: int, frame: FrameType | None) -> None:
        log.warning("signal %s after the run was recorded: exiting with its result", signum)

    saved: dict[int, Any] = {}
    with suppress(ValueError):  # not the main thread
        saved = _catch_stop_signals(late)

    def restore() -> None:
        for sig, handler in saved.items():
            signal.signal(sig, handler)

    return restore


def _redacted(value: Any, redact: Callable[[str], str]) -> Any:
    """``value`` (JSON-like: dicts, lists, scalars) with every string passed through ``redact``."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: _redacted(v, redact) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v, redact) for v in value]
    return value


class StageRunner:
    """Runs stage functions under the lock/history/signal discipline.

    ``redact`` removes secrets from error text before it is logged or stored; ``limits``
    maps a stage to its hard limit in seconds (a stage absent from it has none).
    """

    def __init__(
        self,
        database: db.Database,
        *,
        redact: Callable[[str], str] = lambda s: s,
        progress: ProgressFactory = no_progress,
        host: str | None = None,
        pid: int | None = None,
        limits: Mapping[str, float] | None = None,
    ) -> None:
        self.database = database
        self.redact = redact
        self.progress = progress
        self.host = host or socket.gethostname()
        self.pid = pid or os.getpid()
        self.stop = _STOP
        self.limits = dict(limits or {})

    def _connection(self, stage: str, *, autocommit: bool) -> psycopg.Connection[Any]:
        return self.database.connect(f"pipeline {stage} {self.host}:{self.pid}",
                                     autocommit=autocommit)

    def _acquire(self, lock: psycopg.Connection[Any], stage: str, wait: float | None) -> None:
        """Take the stage lock inside ``lock``'s transaction; between attempts the transaction
        ends, so a waiting run pins no server session of a pooler."""
        key = db.advisory_key(stage)
        deadline = time.monotonic() + (wait or 0)
        delay = 0.05
        while True:
            with db.wrap_errors("taking the stage lock"):
                row = lock.execute(db.query("runner", "try_lock"), {"key": key}).fetchone()
                if row and row["locked"]:
                    return
                lock.rollback()
            if time.monotonic() >= deadline or self.stop.requested:
                holder = lock_holders(lock, (stage,)).get(stage)
                lock.rollback()
                who = holder.describe() if holder else "another session (it just finished?)"
                raise LockBusy(f"{stage} is already running: lock held by {who}",
                               holder=holder)
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)

    def run(
        self,
        stage: str,
        fn: Callable[[RunContext], StageResult],
        *,
        singleton: bool | None = None,
        wait: float | None = None,
        options: dict[str, Any] | None = None,
        dry_run: bool = False,
    ) -> RunRecord:
        """Run ``fn`` as one recorded run of ``stage``.

        Raises SchemaError, LockBusy or DatabaseError before the run starts (nothing is
        recorded then). Once the run row exists, every failure is recorded and returned as a
        RunRecord with status ``failed`` and a non-zero ``exit_code``.

        A ``dry_run`` takes the lock (so it never races a real run) but is not a run of the
        stage: it writes no row in the run history, so status and health never see it and a
        failure streak before it stays visible.
        """
        singleton = stage in SINGLETON_STAGES if singleton is None else singleton
        control = self._connection(stage, autocommit=True)
        lock: psycopg.Connection[Any] | None = None
        try:
            db.check_schema(control)
            if not dry_run:  # a dry run writes nothing: it works on a standby too
                reap_crashed(control)
            lock = self._connection(stage, autocommit=False)
            if singleton:
                self._acquire(lock, stage, wait)
            return self._run_locked(control, lock, stage, fn, options or {},
                                    record_run=not dry_run)
        finally:
            if lock is not None:
                # Ending the transaction frees the locks; a pooler then reuses the server
                # session (closing mid-transaction would make it drop it). A connection that
                # broke has no transaction left to end.
                with suppress(psycopg.Error):
                    lock.rollback()
                lock.close()
            control.close()

    def _run_locked(
        self,
        conn: psycopg.Connection[Any],
        lock: psycopg.Connection[Any],
        stage: str,
        fn: Callable[[RunContext], StageResult],
        options: dict[str, Any],
        *,
        record_run: bool = True,
    ) -> RunRecord:
        run_id = str(uuid.uuid4())
        if record_run:
            self._start(conn, lock, stage, run_id, options)
        adapter = StageLogger(
            logging.getLogger(f"pipeline.{stage}"), {"stage": stage, "run_id": run_id}
        )
        ctx = RunContext(stage=stage, run_id=run_id, log=adapter, stop=self.stop,
                         progress=self.progress)
        started = time.monotonic()
        error: str | None = None
        exit_code = EXIT_OK
        result = StageResult()
        limit: _Limit | None = None
        with self.stop:
            adapter.info("started" if record_run else "started (dry run: not recorded)")
            try:
                with _LIMITS.limit(stage, self.limits.get(stage)) as limit:
                    result = fn(ctx)
            except PipelineError as exc:
                error, exit_code = self.redact(str(exc)), exc.exit_code
                result = exc.partial or StageResult()
            except Exception as exc:  # a bug: record it, never exit 0
                error = self.redact(f"internal error: {type(exc).__name__}: {exc}")
                exit_code = EXIT_FAILED
                result = StageResult(status=FAILED)
                adapter.debug("traceback:\n%s", self.redact(traceback.format_exc()))
            if error is None and not _lock_alive(lock):
                error = ("the stage lock was lost during the run (the database session holding "
                         "it ended); another run may have overlapped this one")
                exit_code = EXIT_FAILED
            expired = limit if limit is not None and limit.expired else _LIMITS.expired()
            if expired is not None:
                # Whatever the stage raised on its way out (QueryCanceled from the cancelled
                # statement, or nothing), the run ended because a hard limit passed: its own,
                # or that of the run-all it is part of.
                timed_out = TimedOut(expired.stage, expired.seconds, own=expired is limit)
                error, exit_code = str(timed_out), timed_out.exit_code
                result = StageResult(status=FAILED, counts=result.counts, extra=result.extra)
            # Still under the stop flag: a signal now lets the result be recorded as it is
            # (with the default handler back, it killed the process and the run "crashed").
            duration_ms = int((time.monotonic() - started) * 1000)
            # Busy (exit 75) inside the run: a run-all met a stage another run holds; that run
            # does the work, so this one is skipped, not a failure for status to count.
            status = (result.status if error is None
                      else SKIPPED if exit_code == EXIT_LOCK_BUSY else FAILED)
            # the extra holds text from outside (problems quote the feed's values): a secret
            # a service echoed is masked there as in the error
            record = RunRecord(stage=stage, run_id=run_id, status=status,
                               duration_ms=duration_ms, counts=result.counts,
                               extra=_redacted(result.extra, self.redact),
                               message=self.redact(result.message), error=error,
                               exit_code=exit_code if error else EXIT_OK, recorded=record_run)
            if record_run:
                self._finish(conn, record)
            if error and status == SKIPPED:  # only busy stages: another run does the work
                adapter.warning("skipped: %s", error)
            elif error:
                adapter.error("failed: %s", error)
            else:
                adapter.info("%s in %d ms %s", status, duration_ms, result.message)
            return record

    def _start(self, conn: psycopg.Connection[Any], lock: psycopg.Connection[Any], stage: str,
               run_id: str, options: dict[str, Any]) -> None:
        """Take the run's own lock in the lock transaction, then write the ``running`` row:
        so a row whose lock is free always means its process is gone."""
        with db.wrap_errors("recording the run start"):
            lock.execute(db.query("runner", "try_lock"), {"key": run_lock_key(run_id)})
            ident = lock.execute(db.query("runner", "backend_identity")).fetchone()
            assert ident is not None
            conn.execute(
                db.query("runner", "insert_run"),
                {"run_id": run_id, "stage": stage, "host": self.host, "pid": self.pid,
                 "backend_pid": ident["backend_pid"], "backend_start": ident["backend_start"],
                 "options": Jsonb(options)},
            )

    def _finish(self, conn: psycopg.Connection[Any], record: RunRecord) -> None:
        params = {"run_id": record.run_id, "status": record.status,
                  "duration_ms": record.duration_ms, "counts": Jsonb(record.counts),
                  "result": Jsonb(record.extra), "error": record.error}
        try:
            with db.wrap_errors("recording the run result"):
                conn.execute(db.query("runner", "finish_run"), params)
        except PipelineError:
            # The control session died (e.g. PostgreSQL restarted). Try once on a fresh one;
            # if that fails too the row stays 'running' and is reaped as 'crashed' later.
            try:
                with self._connection(record.stage, autocommit=True) as fresh, db.wrap_errors(
                    "recording the run result"
                ):
                    fresh.execute(db.query("runner", "finish_run"), params)
            except PipelineError as exc:
                log.error("could not record the result of run %s: %s", record.run_id, exc)
                if record.exit_code == EXIT_OK:
                    record.exit_code = exit_code_for(exc)
                    record.status = FAILED
                    record.error = str(exc)
