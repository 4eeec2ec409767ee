"""The stage runner: lock, run history, crash detection, signals, transactions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import psycopg
import pytest

from pipeline_cli import db
from pipeline_cli.db import Database
from pipeline_cli.errors import LockBusy, SchemaError, ValidationError
from pipeline_cli.runner import RunContext, StageResult, StageRunner
from pipeline_cli.stages.status import collect_status

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


def test_busy_lock_names_the_holder_run(database_url: str) -> None:
    proc = start_child(database_url)
    try:
        with pytest.raises(LockBusy) as err:
            StageRunner(Database(database_url)).run("sync-odata", lambda ctx: StageResult())
        assert f"pid {proc.pid}" in str(err.value) and "host " in str(err.value)
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
