"""Through a real PgBouncer in ``pool_mode = transaction`` (``[database] pooler =
"transaction"``): racing singleton runs, match-gps workers sharing the queue, and kill -9.

Without the pooler setting psycopg prepares statements that another client's transaction then
finds (or misses) on the shared server session, and a session advisory lock stays on a server
session that the pooler hands to someone else. Sizes are small: the behaviour, not the volume,
is under test (bench/bench_reliability.py runs the large versions without a pooler).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools import traces
from pipeline_cli.adapters.osrm import OsrmClient
from tests.reliability.test_concurrency import RACERS, gps_rows, prepare, summary
from tests.support.reliability import (
    ForkServer,
    Sandbox,
    check_gps,
    kill_trials,
    run_concurrently,
    run_released,
)

SandboxFactory = Callable[..., Sandbox]

pytestmark = pytest.mark.s3


@pytest.fixture
def pooled(make_sandbox: SandboxFactory, pgbouncer_url: str) -> Callable[..., Sandbox]:
    """Sandboxes whose CLI reaches PostgreSQL through PgBouncer with the pooler setting; the
    checks keep their direct connection."""
    bouncer = psycopg.conninfo.conninfo_to_dict(pgbouncer_url)

    def make(**kw: Any) -> Sandbox:
        sb = make_sandbox(**kw)
        sb.env["PIPELINE_DATABASE_URL"] = psycopg.conninfo.make_conninfo(
            sb.database_url, host=bouncer["host"], port=bouncer["port"])
        sb.env["PIPELINE_DATABASE_POOLER"] = "transaction"
        return sb

    return make


def advisory_locks(sb: Sandbox) -> int:
    row = sb.connect().execute(
        "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()
    assert row is not None
    return int(row["n"])


def test_eight_racing_syncs_one_wins_then_the_lock_is_free(pooled: SandboxFactory) -> None:
    sb = pooled()
    prepare(sb, "sync-odata")  # the winner's first OData page answers late: a real race
    results = run_released([["sync-odata", "--json"]] * RACERS, sb.env)
    codes = sorted(r.exit_code for r in results)
    assert codes == [0] + [75] * (RACERS - 1), summary(results)
    assert advisory_locks(sb) == 0  # nothing left on a pooled server session
    later = sb.run("sync-odata", "--json")  # a later run still gets the lock
    assert later.exit_code == 0, later.describe()
    runs = sb.connect().execute(
        "SELECT status, count(*) AS n FROM stage_runs GROUP BY 1").fetchall()
    assert {r["status"]: r["n"] for r in runs} == {"success": 1, "noop": 1}
    assert sb.check() == []


@pytest.mark.osrm
def test_four_match_gps_workers_complete_each_batch_once(pooled: SandboxFactory,
                                                         osrm_url: str) -> None:
    with OsrmClient(osrm_url) as client:
        pool = traces.make_traces(client, 6, seed=5, min_points=30)
    sb = pooled(osrm_url=osrm_url)
    conn = sb.connect()
    rows = gps_rows(pool, devices=40, per_device=5)
    traces.insert_points(conn, rows)
    results = run_concurrently([["match-gps", "--json", "--concurrency", "2"]] * 4, sb.env,
                               timeout=600)
    assert all(r.exit_code == 0 for r in results), summary(results)
    outs = [r.json() for r in results]
    states = {r["status"]: r["n"] for r in conn.execute(
        "SELECT status, count(*) AS n FROM processing_batches GROUP BY 1").fetchall()}
    assert states == {"completed": 200}, states
    assert sum(o["counts"]["batches_completed"] for o in outs) == 200
    assert sum(o["counts"]["points_processed"] for o in outs) == len(rows)
    assert check_gps(conn) == []
    # a worker that starts after the others took every batch ends as a no-op, which is fine;
    # none may show as crashed or failed (a live worker taken for a crashed one)
    runs = {r["status"]: r["n"] for r in conn.execute(
        "SELECT status, count(*) AS n FROM stage_runs GROUP BY 1").fetchall()}
    assert set(runs) <= {"success", "noop"} and sum(runs.values()) == 4, runs


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    with ForkServer(tmp_path_factory.mktemp("forkserver")) as fs:
        yield fs


def test_kill_9_mid_run_leaves_no_lock(pooled: SandboxFactory, server: ForkServer,
                                       tmp_path: Path) -> None:
    sb = pooled()
    report = kill_trials(sb, server, "sync-odata", 6, seed=19)
    assert report.problems == [], "\n".join(report.problems[:20])
    # every trial's next run took the lock again, and the killed runs show as crashed
    assert report.recovered == report.trials == 6 and report.killed >= 1, report
    assert advisory_locks(sb) == 0
