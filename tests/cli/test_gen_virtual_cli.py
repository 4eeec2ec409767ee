"""`pipeline gen-virtual` at the CLI edge: --json counts by kind, noop, --force, --dry-run,
no active dataset, a dataset without stops, and the installed script as a subprocess."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import psycopg
import pytest

from pipeline_cli import db, geo
from tests.support.clirunner import Cli

Conn = psycopg.Connection[dict[str, Any]]


@pytest.fixture
def cli(run_cli: Cli, full_env: dict[str, str]) -> Cli:
    run_cli.env.update(full_env)
    return run_cli


def activate(conn: Conn, n_stops: int) -> None:
    """An active ds-v1 with ``n_stops`` stops on a line north of Helsinki, one an airport."""
    conn.execute("INSERT INTO datasets (version, seq, hash, backup_prefix, active) "
                 "VALUES ('ds-v1', 1, 'h1', 'datasets/ds-v1/', true)")
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO stops (id, name, latitude, longitude, is_airport, city) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            [(f"s{i:02d}", f"Stop {i}", 60.2 + 0.05 * i, 24.9 + 0.01 * i, i == 0,
              "Helsinki" if i < 12 else None) for i in range(n_stops)])


def count(conn: Conn, table: str) -> int:
    row = conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()  # noqa: S608
    assert row is not None
    return int(row["n"])


def test_json_counts_by_kind_then_noop_then_force(cli: Cli, conn: Conn) -> None:
    activate(conn, 30)
    result = cli("gen-virtual", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["stage"] == "gen-virtual" and out["status"] == "success"
    by_kind = out["counts"]["by_kind"]
    assert set(by_kind) == {"MAIN_GRID", "CITY_GRID", "AIRPORT_GRID"}
    assert all(v > 0 for v in by_kind.values())
    assert out["counts"]["virtual_stops"] == sum(by_kind.values()) == count(conn,
                                                                            "virtual_stops")
    assert out["dataset_version"] == "ds-v1" and out["generation_id"] >= 1
    assert out["backup_prefix"].startswith("datasets/ds-v1/virtual/")

    again = json.loads(cli("gen-virtual", "--json").stdout)
    assert again["status"] == "noop" and again["generation_id"] == out["generation_id"]

    forced = cli("gen-virtual", "--force", "--json")
    assert forced.exit_code == 0
    assert json.loads(forced.stdout)["generation_id"] > out["generation_id"]
    assert count(conn, "virtual_generations") == 2


def test_dry_run_writes_nothing(cli: Cli, conn: Conn) -> None:
    activate(conn, 30)
    result = cli("gen-virtual", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "dry-run" and out["would_run"] is True
    assert out["counts"]["by_kind"]["MAIN_GRID"] > 0
    for table in ("virtual_generations", "virtual_stops", "virtual_routes", "virtual_flights",
                  "stage_runs"):
        assert count(conn, table) == 0, table
    text = cli("gen-virtual", "--dry-run")
    assert text.exit_code == 0 and "would write for ds-v1" in text.output
    # The dry run agrees with the real run.
    real = json.loads(cli("gen-virtual", "--json").stdout)
    assert real["counts"] == out["counts"]
    # Once generated, a run is a noop: the dry run said "would write" all the same.
    again = cli("gen-virtual", "--dry-run")
    assert again.exit_code == 0 and (
        f"would do nothing: ds-v1 already has virtual generation {real['generation_id']} "
        "(--force would write: ") in again.output


def test_dry_run_takes_the_lock_like_the_other_stages(cli: Cli, conn: Conn,
                                                      database_url: str) -> None:
    """It took no lock: while a real run held it, the dry run answered from a state about to
    change, unlike every other stage's dry run (75 when busy)."""
    activate(conn, 30)
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("gen-virtual"),))
        busy = cli("gen-virtual", "--dry-run")
        assert busy.exit_code == 75 and "already running" in busy.output
    out = json.loads(cli("gen-virtual", "--dry-run", "--json").stdout)
    assert out["run_id"] is None and out["status"] == "dry-run"
    text = cli("gen-virtual", "--dry-run")
    assert "(dry run, not recorded): would write for ds-v1" in text.output
    assert count(conn, "stage_runs") == 0


def test_no_active_dataset_is_skipped_exit_0(cli: Cli, conn: Conn) -> None:
    result = cli("gen-virtual", "--json")
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    assert out["status"] == "skipped"
    assert count(conn, "virtual_generations") == 0


def test_no_stop_is_one_line_exit_1_via_installed_script(cli: Cli, conn: Conn) -> None:
    activate(conn, 0)
    proc = cli.subprocess("-q", "gen-virtual")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("pipeline gen-virtual:")]
    assert len(errors) == 1 and "ds-v1 has 0 stops" in errors[0], proc.stderr
    assert proc.stdout == ""
    assert count(conn, "virtual_stops") == 0 and count(conn, "virtual_generations") == 0


def test_installed_script_generates(cli: Cli, conn: Conn) -> None:
    activate(conn, 20)
    proc = cli.subprocess("gen-virtual", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "success"
    assert count(conn, "virtual_routes") > 0 and count(conn, "virtual_flights") > 0


def test_quiet_success_with_unreached_stops_prints_nothing(cli: Cli, conn: Conn) -> None:
    """Unreached real stops (no virtual stop within max_route_km) are logged at info,
    counted, shown by `status`; `-q` (cron) prints nothing on a success."""
    # Nine stops on the points of a 3 x 3 block of main grid cells: the threshold drops every
    # main grid point of the block, so the middle stop's nearest virtual stop is 100 km away.
    grid = geo.Grid(50.0)
    rows, cols = np.repeat(np.arange(134, 137), 3), np.tile(np.arange(14, 17), 3)
    lat, lon = grid.points(rows, cols)
    conn.execute("INSERT INTO datasets (version, seq, hash, backup_prefix, active) "
                 "VALUES ('ds-v1', 1, 'h1', 'datasets/ds-v1/', true)")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO stops (id, latitude, longitude) VALUES (%s, %s, %s)",
                        [(f"g{i}", la, lo) for i, (la, lo) in enumerate(zip(
                            lat.tolist(), lon.tolist(), strict=True))])
    proc = cli.subprocess("-q", "gen-virtual")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    gen = conn.execute("SELECT counts, unreached_stops FROM virtual_generations").fetchone()
    assert gen is not None
    unreached = gen["counts"]["unreached_real_stops"]
    assert gen["unreached_stops"] == ["g4"] and unreached == 1
    status = json.loads(cli("status", "--json").stdout)
    assert status["virtual"]["generation"]["counts"]["unreached_real_stops"] == unreached
    assert f"{unreached} real stops unreached" in cli("status").output
