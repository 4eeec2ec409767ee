"""The stage runner: lock, run history, crash detection, signals, transactions."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import psycopg
import pytest

from pipeline_cli import db
from pipeline_cli.db import Database
from pipeline_cli.errors import LockBusy, SchemaError, ValidationError
from pipeline_cli.health import collect_status
from pipeline_cli.runner import RunContext, StageResult, StageRunner

# A stand-in stage run in a child process: it writes rows in one transaction, announces
# that it is mid-transaction, then sleeps until killed or signalled.
CHILD = textwrap.dedent("""
    import sys, time
    from pipeline_cli import db
    from pipeline_cli.runner import StageRunner, StageResult

    url = sys.argv[1]

    def stage(ctx):
        with db.connect(url) as conn, conn.transaction():
            conn.execute("CREATE TABLE IF NOT EXISTS scratch (n int)")
            conn.execute("INSERT INTO scratch SELECT generate_series(1, 1000)")
            print("IN-TRANSACTION", flush=True)
            for _ in range(600):
                time.sleep(0.05)
                ctx.check_stop()
        return StageResult(counts={"rows": 1000})

    record = StageRunner(db.Database(url)).run("sync-odata", stage)
    print("STATUS", record.status, record.exit_code, flush=True)
    sys.exit(record.exit_code)
""")


def start_child(url: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, url], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "IN-TRANSACTION", proc.stderr.read() if proc.stderr else line
    return proc


def scratch_rows(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT to_regclass('scratch') IS NOT NULL AS t").fetchone()
    if not row or not row["t"]:
        return 0
    return int(conn.execute("SELECT count(*) AS n FROM scratch").fetchone()["n"])  # type: ignore[index]


def test_success_is_recorded(database_url: str, conn: psycopg.Connection[Any]) -> None:
    record = StageRunner(Database(database_url)).run(
        "gen-virtual", lambda ctx: StageResult(counts={"stops": 3}, extra={"x": 1}))
    assert record.status == "success" and record.exit_code == 0
    assert record.to_json()["x"] == 1
    row = conn.execute("SELECT * FROM stage_runs WHERE run_id = %s", (record.run_id,)).fetchone()
    assert row is not None
    assert row["status"] == "success" and row["counts"] == {"stops": 3}
    assert row["finished_at"] is not None and row["pid"] == os.getpid()


def test_failure_is_recorded_with_exit_code(database_url: str,
                                            conn: psycopg.Connection[Any]) -> None:
    def failing(ctx: RunContext) -> StageResult:
        raise ValidationError("stops ID=7: latitude 91 out of range")

    record = StageRunner(Database(database_url)).run("sync-odata", failing)
    assert record.status == "failed" and record.exit_code == 1
    row = conn.execute("SELECT status, error FROM stage_runs").fetchone()
    assert row == {"status": "failed", "error": "stops ID=7: latitude 91 out of range"}


def test_bug_in_stage_is_failed_not_exit_0(database_url: str) -> None:
    def buggy(ctx: RunContext) -> StageResult:
        return {}["missing"]  # type: ignore[no-any-return]

    record = StageRunner(Database(database_url)).run("gen-virtual", buggy)
    assert record.status == "failed" and record.exit_code == 1
    assert record.error is not None and "KeyError" in record.error


def test_errors_are_redacted_in_history(database_url: str, conn: psycopg.Connection[Any]) -> None:
    def leaky(ctx: RunContext) -> StageResult:
        raise ValidationError("token hunter2 rejected")

    StageRunner(Database(database_url), redact=lambda s: s.replace("hunter2", "***")).run(
        "sync-odata", leaky)
    row = conn.execute("SELECT error FROM stage_runs").fetchone()
    assert row is not None and "hunter2" not in row["error"]


def test_busy_lock_exits_at_once_and_touches_nothing(database_url: str,
                                                     conn: psycopg.Connection[Any]) -> None:
    holder = db.connect(database_url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("build-graph"),))
    called = []
    try:
        started = time.monotonic()
        with pytest.raises(LockBusy, match="build-graph is already running"):
            StageRunner(Database(database_url)).run("build-graph",
                                          lambda ctx: called.append(1) or StageResult())
        assert time.monotonic() - started < 1.0
    finally:
        holder.close()
    assert called == []
    assert conn.execute("SELECT count(*) AS n FROM stage_runs").fetchone() == {"n": 0}


def test_busy_lock_names_the_holder_run(database_url: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    proc = start_child(database_url)
    # The holder's start time is in UTC with a Z, as log lines and tables give times: it came
    # in the database session's zone, "since 2026-12-07T17:21:03+02:00" (PGTZ, the server's).
    monkeypatch.setenv("PGTZ", "Europe/Helsinki")
    try:
        with pytest.raises(LockBusy) as err:
            StageRunner(Database(database_url)).run("sync-odata", lambda ctx: StageResult())
        assert f"pid {proc.pid}" in str(err.value) and "host " in str(err.value)
        assert re.search(r" since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", str(err.value)), \
            str(err.value)
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            assert stream is not None
            stream.close()


def test_wait_takes_the_lock_once_free(database_url: str) -> None:
    holder = db.connect(database_url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("gen-virtual"),))
    import threading

    threading.Timer(0.5, holder.close).start()
    record = StageRunner(Database(database_url)).run(
        "gen-virtual", lambda ctx: StageResult(status="noop"), wait=10)
    assert record.status == "noop"


def test_match_gps_is_not_a_singleton(database_url: str) -> None:
    holder = db.connect(database_url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("match-gps"),))
    try:
        record = StageRunner(Database(database_url)).run("match-gps", lambda ctx: StageResult())
        assert record.status == "success"
    finally:
        holder.close()


def test_refuses_unmigrated_schema(empty_database_url: str) -> None:
    with pytest.raises(SchemaError, match="pipeline db migrate"):
        StageRunner(Database(empty_database_url)).run("sync-odata", lambda ctx: StageResult())


def test_sigkill_mid_transaction_leaves_no_rows_and_shows_crashed(
        database_url: str, conn: psycopg.Connection[Any]) -> None:
    proc = start_child(database_url)
    proc.kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        assert stream is not None
        stream.close()
    # The server notices the dead client when its socket closes; give it a moment.
    for _ in range(100):
        report = collect_status(conn)
        if report.stages["sync-odata"]["last_status"] == "crashed":
            break
        time.sleep(0.05)
    assert report.stages["sync-odata"]["last_status"] == "crashed"
    assert "sync-odata" not in report.locks
    assert scratch_rows(conn) == 0
    # and the next run is free to go
    rerun = StageRunner(Database(database_url)).run("sync-odata", lambda c: StageResult())
    assert rerun.status == "success"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_rolls_back_and_records(database_url: str, conn: psycopg.Connection[Any],
                                       sig: signal.Signals) -> None:
    proc = start_child(database_url)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert f"STATUS failed {128 + sig}" in out
    assert scratch_rows(conn) == 0
    row = conn.execute("SELECT status, error FROM stage_runs").fetchone()
    assert row is not None and row["status"] == "failed"
    assert f"signal {int(sig)}" in row["error"]


@pytest.mark.timeout(60, method="thread")
def test_the_first_signal_interrupts_an_interruptible_stretch(
        database_url: str, conn: psycopg.Connection[Any]) -> None:
    # sync-odata waited for its next unit while a server never answered: 5 min of retries
    # after a Ctrl-C, then exit 1. Where stopping loses nothing, the first signal stops it.
    def hung(ctx: RunContext) -> StageResult:
        with ctx.interruptible():
            time.sleep(600)  # a request to a server that never answers
        return StageResult()

    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    record = StageRunner(Database(database_url)).run("sync-odata", hung)
    assert (record.status, record.exit_code) == ("failed", 130)
    assert record.error == "interrupted by signal 2"


@pytest.mark.timeout(60, method="thread")
def test_a_signal_in_an_interruptible_stretch_cancels_its_statement(
        database_url: str, conn: psycopg.Connection[Any]) -> None:
    # The process stopped at once, but the server ran the statement on to its end (minutes
    # of an ingest's checks), holding its locks, only to roll it back.
    def loading(ctx: RunContext) -> StageResult:
        with ctx.interruptible(), db.connect(database_url) as own, own.transaction(), \
                db.wrap_errors("sleeping"):
            own.execute("CREATE TABLE scratch (n int)")
            own.execute("SELECT pg_sleep(600)")
        return StageResult()

    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    record = StageRunner(Database(database_url)).run("ingest-gps", loading)
    assert (record.status, record.exit_code) == ("failed", 130)
    assert scratch_rows(conn) == 0
    sleeping = conn.execute("SELECT count(*) AS n FROM pg_stat_activity "
                            "WHERE query = 'SELECT pg_sleep(600)' AND state = 'active'")
    assert sleeping.fetchone() == {"n": 0}


# ---------------------------------------------------------------- hard limit


@pytest.mark.timeout(120, method="thread")  # the runner's hard limit owns SIGALRM
def test_hard_limit_stops_a_stage_blocked_in_postgresql(
        database_url: str, conn: psycopg.Connection[Any]) -> None:
    def hung(ctx: RunContext) -> StageResult:
        with db.connect(database_url) as own, own.transaction(), db.wrap_errors("sleeping"):
            own.execute("CREATE TABLE scratch (n int)")
            own.execute("SELECT pg_sleep(600)")
        return StageResult()

    record = StageRunner(Database(database_url), limits={"sync-odata": 2}).run("sync-odata", hung)
    assert record.status == "failed" and record.exit_code == 124
    # It said "hard limit of 2 s passed": which setting to raise, the operator had to guess.
    error = "hard limit of 2 s passed ([runner] timeout_sync_odata)"
    assert record.error == error
    row = conn.execute("SELECT status, error FROM stage_runs").fetchone()
    assert row == {"status": "failed", "error": error}
    # The statement was cancelled on the server and its transaction rolled back.
    assert scratch_rows(conn) == 0
    sleeping = conn.execute("SELECT count(*) AS n FROM pg_stat_activity "
                            "WHERE query = 'SELECT pg_sleep(600)' AND state = 'active'")
    assert sleeping.fetchone() == {"n": 0}
    stage = collect_status(conn).stages["sync-odata"]
    assert stage["last_status"] == "failed" and stage["consecutive_failures"] == 1
    assert stage["last_error"] == error


@pytest.mark.timeout(120, method="thread")
def test_hard_limit_interrupts_a_stage_blocked_outside_postgresql(database_url: str) -> None:
    def hung(ctx: RunContext) -> StageResult:
        time.sleep(600)  # e.g. a read from a service that never answers
        return StageResult()

    runner = StageRunner(Database(database_url), limits={"gen-virtual": 1})
    record = runner.run("gen-virtual", hung)
    assert (record.status, record.exit_code, record.error) == (
        "failed", 124, "hard limit of 1 s passed ([runner] timeout_gen_virtual)")
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL
    # A run within its limit is untouched by it.
    assert runner.run("gen-virtual", lambda ctx: StageResult()).status == "success"


@pytest.mark.timeout(120, method="thread")
def test_run_all_limit_stops_the_stage_inside_it(database_url: str) -> None:
    runner = StageRunner(Database(database_url), limits={"run-all": 1, "sync-odata": 600})

    def inner(ctx: RunContext) -> StageResult:
        while True:
            time.sleep(0.05)
            ctx.check_stop()

    def chain(ctx: RunContext) -> StageResult:
        record = runner.run("sync-odata", inner)
        return StageResult(extra={"inner": record.error})

    record = runner.run("run-all", chain)
    assert (record.status, record.exit_code) == ("failed", 124)
    assert record.error == "hard limit of 1 s passed ([runner] timeout_run_all)"
    assert record.extra["inner"] == ("run-all's hard limit of 1 s passed "
                                     "([runner] timeout_run_all)")


def test_dry_run_takes_the_lock_but_records_nothing(
        database_url: str, conn: psycopg.Connection[Any]) -> None:
    def failing(ctx: RunContext) -> StageResult:
        raise ValidationError("bad feed")

    runner = StageRunner(Database(database_url))
    runner.run("sync-odata", failing)
    holder = db.connect(database_url, autocommit=True)
    try:
        holder.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("sync-odata"),))
        with pytest.raises(LockBusy):
            runner.run("sync-odata", lambda ctx: StageResult(), dry_run=True)
    finally:
        holder.close()
    record = runner.run("sync-odata", lambda ctx: StageResult(status="skipped"), dry_run=True)
    assert record.status == "skipped" and record.exit_code == 0
    rows = conn.execute("SELECT status FROM stage_runs").fetchall()
    assert rows == [{"status": "failed"}]
    assert collect_status(conn).stages["sync-odata"]["consecutive_failures"] == 1


def test_a_running_row_is_crashed_when_its_run_lock_is_free_whatever_its_backend(
        database_url: str, conn: psycopg.Connection[Any]) -> None:
    """Through a transaction pooler the backend pid a run recorded belongs to a shared server
    session that outlives the process: only the run's own lock tells a live run from a dead one."""
    from pipeline_cli.runner import reap_crashed

    seen: dict[str, Any] = {}

    def stage(ctx: RunContext) -> StageResult:
        # a live run is never reaped, even by a reaper on another connection
        with db.connect(database_url, autocommit=True) as other:
            seen["reaped_while_live"] = reap_crashed(other)
        return StageResult()

    record = StageRunner(Database(database_url)).run("match-gps", stage)
    assert record.status == "success" and seen["reaped_while_live"] == []
    # A row left 'running' by a process that died, recorded with the backend of a session that
    # is still alive (this very connection: what a pooler's shared server session looks like).
    conn.execute(
        "INSERT INTO stage_runs (run_id, stage, host, pid, backend_pid, backend_start) "
        "SELECT gen_random_uuid(), 'match-gps', 'h1', 1, pid, backend_start "
        "FROM pg_stat_activity WHERE pid = pg_backend_pid()")
    assert len(reap_crashed(conn)) == 1
    assert conn.execute("SELECT status FROM stage_runs WHERE host = 'h1'").fetchone() == {
        "status": "crashed"}


def test_a_run_whose_lock_session_ends_is_recorded_failed(
        database_url: str, conn: psycopg.Connection[Any]) -> None:
    """The stage lock lives in the runner's own session; if that session ends mid-run (an
    administrator, a restart of a pooler) another run may start, so the run must not record
    success."""
    def stage(ctx: RunContext) -> StageResult:
        with db.connect(database_url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(backend_pid) FROM stage_runs"
                          " WHERE run_id = %s", (ctx.run_id,))
        return StageResult(counts={"rows": 1})

    record = StageRunner(Database(database_url)).run("gen-virtual", stage)
    assert record.status == "failed" and record.exit_code == 1
    assert record.error is not None and "stage lock was lost" in record.error
    row = conn.execute("SELECT status, error FROM stage_runs WHERE run_id = %s",
                       (record.run_id,)).fetchone()
    assert row is not None and row["status"] == "failed" and "lock was lost" in row["error"]


def test_the_lock_outlives_an_idle_in_transaction_timeout(
        database_url: str, conn: psycopg.Connection[Any]) -> None:
    """The lock's transaction sits idle for the whole run: a server's or role's
    idle_in_transaction_session_timeout must not end it (and free the lock) mid-run."""
    url = psycopg.conninfo.make_conninfo(
        database_url, options="-c idle_in_transaction_session_timeout=200")

    def stage(ctx: RunContext) -> StageResult:
        time.sleep(0.8)
        with db.connect(database_url, autocommit=True) as other:
            held = other.execute(
                "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND pid = (SELECT backend_pid FROM stage_runs WHERE run_id = %s)",
                (ctx.run_id,)).fetchone()
        return StageResult(counts={"locks": held["n"] if held else 0})

    record = StageRunner(Database(url)).run("gen-virtual", stage)
    assert record.status == "success", record.error
    assert record.counts["locks"] == 2  # the stage lock and the run's own
