"""`pipeline prune` at the CLI edge: --json counts, --dry-run records no run and keeps a failure
streak visible, status shows the last prune, a bad setting, and the installed script."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from devtools.odata_server import ODataServer, sample_network
from tests.support.clirunner import Cli
from tests.support.standby import as_a_standby

Conn = psycopg.Connection[dict[str, Any]]
pytestmark = pytest.mark.s3


@pytest.fixture
def cli(run_cli: Cli, full_env: dict[str, str]) -> Cli:
    run_cli.env.update(full_env)
    return run_cli


def old_batch(conn: Conn) -> None:
    """Two points and the completed batch that read them (its snapshot sees them)."""
    start = datetime.now(UTC) - timedelta(days=60)
    for i in range(2):
        conn.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude)"
                     " VALUES ('bus', %s, 60.1, 24.9)", (start + timedelta(seconds=i),))
    conn.execute(
        "INSERT INTO processing_batches (device_id, start_time, end_time, status, "
        "coordinate_count, points_snapshot) VALUES ('bus', %s, %s, 'completed', 2,"
        " txid_current_snapshot())", (start, start + timedelta(seconds=1)))


def runs(conn: Conn) -> list[tuple[str, str]]:
    return [(r["stage"], r["status"]) for r in conn.execute(
        "SELECT stage, status FROM stage_runs ORDER BY started_at")]


def test_dry_run_then_prune_then_noop(cli: Cli, conn: Conn) -> None:
    old_batch(conn)
    # A failed prune before: the dry run must not end the streak.
    conn.execute("INSERT INTO stage_runs (run_id, stage, host, pid, backend_pid, backend_start, "
                 "finished_at, status, error) VALUES (gen_random_uuid(), 'prune', 'h', 1, 1, "
                 "now(), now(), 'failed', 'boom')")
    dry = cli("prune", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    out = json.loads(dry.stdout)
    assert out["status"] == "dry-run" and out["dry_run"] is True and out["run_id"] is None
    assert "prune: dry-run in" in (text := cli("prune", "--dry-run").stdout)
    assert "(dry run, not recorded): would delete 2 gps points, 1 gps batches" in text
    assert out["counts"]["gps_points"] == 2 and out["counts"]["gps_batches"] == 1
    assert runs(conn) == [("prune", "failed")]
    assert conn.execute("SELECT count(*) AS n FROM gps_points").fetchone() == {"n": 2}
    status = json.loads(cli("status", "--json").stdout)
    assert status["stages"]["prune"]["consecutive_failures"] == 1

    real = json.loads(cli("prune", "--json").stdout)
    assert real["status"] == "success" and real["counts"]["gps_points"] == 2
    assert conn.execute("SELECT count(*) AS n FROM gps_points").fetchone() == {"n": 0}
    status = json.loads(cli("status", "--json").stdout)
    assert status["prune"]["removed"] == {"gps_points": 2, "gps_batches": 1}
    assert "removed 2 gps points, 1 gps batches" in cli("status").stdout

    again = cli("prune")
    assert again.exit_code == 0 and "noop" in again.stdout
    assert runs(conn) == [("prune", "failed"), ("prune", "success"), ("prune", "noop")]


def test_bad_setting_is_one_line(cli: Cli, conn: Conn) -> None:
    cli.env["PIPELINE_RETENTION_GPS_DAYS"] = "-1"
    result = cli("prune")
    assert result.exit_code == 78
    assert "[retention] gps_days" in result.stderr and "Traceback" not in result.output
    assert runs(conn) == []


def test_installed_script(cli: Cli) -> None:
    proc = cli.subprocess("-q", "prune")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_without_dataset_retention_s3_is_not_needed(run_cli: Cli, conn: Conn) -> None:
    old_batch(conn)
    run_cli.env["PIPELINE_RETENTION_DATASETS"] = "0"  # no [s3] settings at all
    out = json.loads(run_cli("prune", "--json").stdout)
    assert out["status"] == "success" and out["counts"]["gps_points"] == 2


def test_credentials_that_may_not_delete_fail_prune_and_keep_everything(
        cli: Cli, conn: Conn, s3_deny: Callable[..., None]) -> None:
    """S3 credentials with Read/Write but no Delete: prune fails on its first delete with one
    line naming the action, exit 78 (a policy to fix), and keeps every dataset row (S3 goes
    first)."""
    with ODataServer(sample_network(30), page_size=20) as server:
        cli.env.update({"PIPELINE_ODATA_URL": server.url, "PIPELINE_RETENTION_DATASETS": "1"})
        assert cli("sync-odata").exit_code == 0
        s3_deny("s3:DeleteObject")
        server.update_row("Stops", 2, name="Other name")
        assert cli("sync-odata").exit_code == 0
        proc = cli.subprocess("prune")
    assert proc.returncode == 78, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("pipeline prune: error: S3 ") and "delete of datasets/ds-v1/" in error
    assert error.endswith("AccessDenied: the credentials of [s3] access_key may not "
                          f"s3:DeleteObject in bucket '{cli.env['PIPELINE_S3_BUCKET']}' (the "
                          "S3 user's or bucket's policy)"), error
    assert [r["version"] for r in conn.execute("SELECT version FROM datasets ORDER BY seq")] \
        == ["ds-v1", "ds-v2"]
    assert runs(conn)[-1] == ("prune", "failed")


def test_a_dry_run_counts_on_a_read_only_database(cli: Cli, conn: Conn,
                                                   database_url: str) -> None:
    """A dry run only reads: on a standby, or with default_transaction_read_only = on, it
    counts what the primary would delete. It failed "the database is read-only" (exit 78):
    the GPS count ran as the chunk delete with a flag, and a DELETE in a statement is refused
    in a read-only transaction even when it deletes nothing."""
    old_batch(conn)
    with ODataServer(sample_network(30), page_size=20) as server:
        cli.env.update({"PIPELINE_ODATA_URL": server.url, "PIPELINE_RETENTION_DATASETS": "1"})
        assert cli("sync-odata").exit_code == 0
        server.update_row("Stops", 2, name="Other name")
        assert cli("sync-odata").exit_code == 0
    writable = json.loads(cli("prune", "--dry-run", "--json").stdout)
    assert writable["counts"]["gps_points"] == 2 and writable["counts"]["datasets"] == 1
    # A run in progress on the primary, as a standby sees it (no lock of its own here): the
    # dry run's runner marked it crashed, an UPDATE, refused too (and wrong on a standby).
    as_a_standby(conn, database_url)
    dry = cli.subprocess("prune", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["counts"] == writable["counts"]
    assert ("match-gps", "running") in runs(conn)
    real = cli.subprocess("prune")  # a real prune still says why it cannot
    assert real.returncode == 78
    assert "the database is read-only" in real.stderr.strip().splitlines()[-1]
    assert conn.execute("SELECT count(*) AS n FROM gps_points").fetchone() == {"n": 2}
