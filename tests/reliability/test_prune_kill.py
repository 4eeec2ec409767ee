"""kill -9 of `pipeline prune` at random moments: each drop and each chunk is one transaction,
so a kill leaves no partition half detached and no unprocessed point deleted; the run shows
as crashed and the next run finishes the work."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pipeline_cli.gps import batches, partitions
from pipeline_cli.settings import MatchSettings
from tests.support.reliability import run_killed, run_pipeline

Conn = psycopg.Connection[dict[str, Any]]
pytestmark = pytest.mark.s3
TRIALS = 8


def add(conn: Conn, device: str, start: datetime, points: int, status: str) -> None:
    """A batch of ``points`` points one second apart (a finished one read them)."""
    with conn.cursor() as cur, cur.copy("COPY gps_points (device_id, recorded_at, latitude, "
                                        "longitude) FROM STDIN") as cp:
        for i in range(points):
            cp.write_row((device, start + timedelta(seconds=i), 60.17, 24.94))
    conn.execute(
        "INSERT INTO processing_batches (device_id, start_time, end_time, status, "
        "coordinate_count, points_snapshot) VALUES (%s, %s, %s, %s, %s,"
        " CASE WHEN %s THEN txid_current_snapshot() END)",
        (device, start, start + timedelta(seconds=points - 1), status, points,
         status in ("completed", "too_short")))


def make_work(conn: Conn, trial: int) -> None:
    """An old day to drop, processed points to delete one per chunk in the default partition,
    and unprocessed points (pending, dead) that must stay."""
    day = (datetime.now(UTC) - timedelta(days=60 + trial)).date()
    start = datetime(day.year, day.month, day.day, 6, tzinfo=UTC)
    partitions.ensure(conn, [day])
    add(conn, f"day-{trial}", start, 30, "completed")
    old = datetime.now(UTC) - timedelta(days=400 + trial)  # the default partition
    add(conn, f"chunks-{trial}", old, 300, "completed")  # a chunk each: prune runs a while
    add(conn, f"pending-{trial}", old + timedelta(hours=1), 4, "pending")
    add(conn, f"dead-{trial}", old + timedelta(hours=2), 3, "dead")
    batches.make_batches(conn, MatchSettings())


def unprocessed(conn: Conn) -> int:
    return int(conn.execute("SELECT count(*) AS n FROM gps_point_status WHERE NOT processed"
                            ).fetchone()["n"])


def detached(conn: Conn) -> list[str]:
    """Daily tables that are no partition of gps_points (a drop stopped half way)."""
    return [r["relname"] for r in conn.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relkind = 'r'"
        " AND c.relname ~ '^gps_points_p[0-9]{8}$'"
        " AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid)")]


def test_kill_9_prune(conn: Conn, full_env: dict[str, str]) -> None:
    env = full_env | {"PIPELINE_RETENTION_CHUNK_SIZE": "1", "PIPELINE_RETENTION_DATASETS": "0"}
    rng = random.Random(9)
    killed = 0
    for trial in range(TRIALS):
        make_work(conn, trial)
        kept = unprocessed(conn)
        res = run_killed(["prune"], env, when_line=r"\] started",
                         after_line=rng.uniform(0, 0.3))
        assert "Traceback" not in res.stderr, res.stderr[-500:]
        killed += res.killed
        assert unprocessed(conn) == kept and detached(conn) == []
        nxt = run_pipeline(["prune", "--json"], env)
        assert nxt.exit_code == 0, nxt.stderr[-500:]
        assert unprocessed(conn) == kept and detached(conn) == []
        assert conn.execute("SELECT count(*) AS n FROM gps_point_status WHERE processed"
                            ).fetchone()["n"] == 0
        assert conn.execute("SELECT count(*) AS n FROM stage_runs WHERE status = 'running'"
                            ).fetchone()["n"] == 0
    # A kill after the runner recorded the result (while it printed) leaves a success. How
    # many kills land while prune works depends on the machine's speed: at least one must.
    crashed = conn.execute("SELECT count(*) AS n FROM stage_runs WHERE stage = 'prune'"
                           " AND status = 'crashed'").fetchone()["n"]
    assert 1 <= crashed <= killed
