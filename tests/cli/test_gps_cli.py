"""The GPS commands end to end: ingest-gps, match-gps (in-process and as the installed
script, with SIGKILL, SIGTERM and four concurrent processes), batches list/requeue."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
import pytest

from devtools import traces
from devtools.procs import free_port
from devtools.services import LocalServices
from pipeline_cli import polyline
from pipeline_cli.adapters.osrm import OsrmClient
from tests.support.clirunner import Cli
from tests.support.proxy import CountingHttpProxy

pytestmark = pytest.mark.osrm

OLD = datetime(2024, 5, 1, 8, tzinfo=UTC)


@pytest.fixture
def gps_cli(run_cli: Cli, osrm_url: str) -> Cli:
    run_cli.env["PIPELINE_OSRM_URL"] = osrm_url
    return run_cli


@pytest.fixture(scope="module")
def road_points(osrm_url: str) -> list[tuple[float, float]]:
    """Noisy points along a real route: every 3 consecutive ones make a matchable batch."""
    with OsrmClient(osrm_url) as c:
        return traces.make_trace(c, random.Random(21), min_points=60).points


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A TCP port that accepts connections and never answers: an OSRM that hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def small_batches(conn: psycopg.Connection[Any], road: list[tuple[float, float]],
                  devices: int, per_device: int) -> None:
    """``devices * per_device`` batches of 3 points each, 400 s apart."""
    rows = []
    for d in range(devices):
        for b in range(per_device):
            base = OLD + timedelta(seconds=400 * b)
            start = (d * 7 + b * 3) % (len(road) - 3)
            rows += [(f"dev-{d}", base + timedelta(seconds=2 * k), *road[start + k])
                     for k in range(3)]
    traces.insert_points(conn, rows)


def states(conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = conn.execute("SELECT status, count(*) AS n FROM processing_batches GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


def test_ingest_gps_json_text_and_strict(gps_cli: Cli, tmp_path: Path,
                                         conn: psycopg.Connection[Any]) -> None:
    path = tmp_path / "points.csv"
    path.write_text("device_id,recorded_at,latitude,longitude\n"
                    "bus-1,2024-05-01T08:00:00Z,60.17,24.94\n"
                    "bus-1,2024-05-01T08:00:02Z,nan,24.94\n")
    strict = gps_cli("ingest-gps", str(path), "--strict")
    assert strict.exit_code == 1
    assert f"{path}:3" in strict.output and "Traceback" not in strict.output
    result = gps_cli("ingest-gps", str(path), "--json")
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    assert out["counts"]["rows_loaded"] == 1 and out["counts"]["invalid_rows"] == 1
    assert out["problems"] == [f"{path}:3: latitude is 'nan'"]
    text = gps_cli("ingest-gps", str(path))
    assert "skipped" in text.output and "0 point(s) loaded" in text.output


def test_ingest_gps_help_says_what_names_the_device_as_it_is_done(
        run_cli: Cli, tmp_path: Path) -> None:
    # The help said a file's name names its device without --device: a CSV file without a
    # device column is refused instead, and a GPX track's name wins over the file's.
    help_text = " ".join(run_cli("ingest-gps", "--help").output.split())
    assert "a CSV file without a device column needs it" in help_text
    path = tmp_path / "bus-7.csv"
    path.write_text("time,lat,lon\n2024-05-01T08:00:00Z,60.17,24.94\n")
    refused = run_cli("ingest-gps", str(path))
    assert refused.exit_code == 1 and "(--device names the device" in refused.output


def test_a_file_name_that_is_not_utf8_loads_and_is_recorded_escaped(
        gps_cli: Cli, tmp_path: Path, conn: psycopg.Connection[Any]) -> None:
    # It failed with "invalid input syntax for type json": nothing loaded, no run recorded.
    path = os.path.join(os.fsencode(tmp_path), b"pts-\xe9.csv")
    with open(path, "w") as fh:
        fh.write("device_id,recorded_at,latitude,longitude\n"
                 "bus-1,2024-05-01T08:00:00Z,60.17,24.94\n"
                 "bus-1,2024-05-01T08:00:02Z,nan,24.94\n")
    result = gps_cli("ingest-gps", os.fsdecode(path), "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["counts"]["rows_loaded"] == 1
    shown = f"{tmp_path}/pts-\\xe9.csv"
    assert out["problems"] == [f"{shown}:3: latitude is 'nan'"]
    run = conn.execute("SELECT options FROM stage_runs WHERE stage = 'ingest-gps'").fetchone()
    assert run is not None and run["options"]["files"] == [shown]


def test_ctrl_c_during_an_ingest_stops_at_once_with_nothing_loaded(
        gps_cli: Cli, tmp_path: Path, conn: psycopg.Connection[Any]) -> None:
    # The first Ctrl-C waited for the whole load to finish (15 s for 1.5 M rows), then rolled
    # it back; the server went on with its statement after the client had gone.
    fifo = tmp_path / "points.csv"
    os.mkfifo(fifo)
    proc = gps_cli.popen("ingest-gps", str(fifo))
    try:
        with open(fifo, "w") as writer:  # a load still being read: the pipe stays open
            writer.write("device_id,recorded_at,latitude,longitude\n"
                         "bus-1,2024-05-01T08:00:00Z,60.17,24.94\n")
            writer.flush()
            deadline = time.monotonic() + 30
            while not conn.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = "
                                   "'pipeline ingest-gps' AND state = 'active'").fetchone():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted by signal 2" in err and "Traceback" not in err
    assert conn.execute("SELECT count(*) AS n FROM gps_points").fetchone() == {"n": 0}
    run = conn.execute("SELECT status FROM stage_runs WHERE stage = 'ingest-gps'").fetchone()
    assert run == {"status": "failed"}


def test_match_gps_installed_script_json(gps_cli: Cli, conn: psycopg.Connection[Any],
                                         road_points: list[tuple[float, float]]) -> None:
    small_batches(conn, road_points, devices=2, per_device=3)
    result = gps_cli.subprocess("match-gps", "--json", "--concurrency", "2")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["stage"] == "match-gps" and out["status"] == "success"
    counts = out["counts"]
    assert counts["batches_created"] == 6 and counts["batches_completed"] == 6
    assert counts["osrm_requests"] == 6 and counts["batches_failed"] == 0
    assert counts["points_processed"] == 18 and out["points_per_second"] > 0
    again = gps_cli.subprocess("match-gps", "--json")
    assert json.loads(again.stdout)["status"] == "noop"


def test_osrm_down_gives_one_short_error_line(gps_cli: Cli, conn: psycopg.Connection[Any],
                                              road_points: list[tuple[float, float]]) -> None:
    small_batches(conn, road_points, devices=1, per_device=2)
    down = f"http://127.0.0.1:{free_port()}"  # a stopped osrm-routed
    gps_cli.env.update({"PIPELINE_OSRM_URL": down, "PIPELINE_OSRM_RETRIES": "1"})
    result = gps_cli.subprocess("-v", "match-gps")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    error = lines[-1]
    assert error.startswith(f"pipeline match-gps: error: stopped: OSRM {down} unavailable: "
                            "connection refused;"), error
    assert len(error) < 200
    # The driver's text (with the request's polyline) is in the debug lines only.
    assert any("polyline6(" in line for line in lines if " debug " in line)
    assert not any("polyline" in line for line in lines if " debug " not in line)
    status = gps_cli.subprocess("status").stdout
    assert f"OSRM {down} unavailable: connection refused" in status
    assert "polyline" not in status and max(map(len, status.splitlines())) < 200


def test_a_dead_batch_beside_completed_ones_exits_1_with_counts(
        gps_cli: Cli, conn: psycopg.Connection[Any], osrm_url: str,
        road_points: list[tuple[float, float]]) -> None:
    small_batches(conn, road_points, devices=2, per_device=1)  # dev-1 starts at road[7]
    with CountingHttpProxy(osrm_url) as proxy:
        proxy.refuse("polyline6(" + polyline.encode(road_points[7:8], 6))
        gps_cli.env.update({"PIPELINE_OSRM_URL": proxy.url, "PIPELINE_OSRM_RETRIES": "1",
                            "PIPELINE_MATCH_MAX_ATTEMPTS": "1"})
        result = gps_cli("match-gps", "--json")
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "failed" and out["exit_code"] == 1
    assert (out["counts"]["batches_completed"], out["counts"]["batches_dead"]) == (1, 1)
    assert out["error"].startswith(f"1 batch(es) completed; last error: OSRM {proxy.url} ")
    assert out["error"].endswith("; 1 batch(es) failed for the last time ([match] "
                                 "max_attempts; `pipeline batches requeue` retries them)")
    assert states(conn) == {"completed": 1, "dead": 1}


def test_osrm_behind_a_path_prefix(gps_cli: Cli, conn: psycopg.Connection[Any], osrm_url: str,
                                   road_points: list[tuple[float, float]]) -> None:
    """[osrm] url may carry a path: a reverse proxy serving osrm-routed under /osrm/."""
    small_batches(conn, road_points, devices=1, per_device=2)
    with CountingHttpProxy(osrm_url, prefix="/osrm") as proxy:
        gps_cli.env["PIPELINE_OSRM_URL"] = f"{proxy.url}/osrm/"
        result = gps_cli("match-gps", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["batches_completed"] == 2
    assert proxy.count("/match/v1/driving/") == 2


def test_a_server_radius_cap_is_one_line_naming_the_settings(
        gps_cli: Cli, conn: psycopg.Connection[Any], services: LocalServices,
        road_points: list[tuple[float, float]]) -> None:
    small_batches(conn, road_points, devices=1, per_device=2)
    capped = services.osrm(max_matching_radius=3)
    gps_cli.env.update({"PIPELINE_OSRM_URL": capped, "PIPELINE_MATCH_CONCURRENCY": "1"})
    result = gps_cli("match-gps")
    assert result.exit_code == 78, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output
    assert lines[-1].startswith(f"pipeline match-gps: error: stopped: OSRM {capped} refuses "
                                "/match radiuses of 5 m"), lines[-1]
    assert "[match] radius_m" in lines[-1] and "--max-matching-radius" in lines[-1]


def test_a_wrong_osrm_url_path_is_one_line_and_costs_no_attempt(
        gps_cli: Cli, conn: psycopg.Connection[Any], osrm_url: str,
        road_points: list[tuple[float, float]]) -> None:
    """Repeated runs under a wrong [osrm] url path walked good batches to dead; now each run
    stops at once, exit 78, and gives the batches back as they were."""
    small_batches(conn, road_points, devices=2, per_device=2)
    scheme, rest = osrm_url.split("://", 1)
    gps_cli.env.update({"PIPELINE_OSRM_URL": f"{scheme}://u:s3cret-pw@{rest}/v5/osrm",
                        "PIPELINE_MATCH_MAX_ATTEMPTS": "1"})
    for _ in range(2):
        result = gps_cli("match-gps")
        assert result.exit_code == 78, result.output
        assert "Traceback" not in result.output and "s3cret-pw" not in result.output
        lines = result.output.strip().splitlines()
        assert lines[-1].startswith(f"pipeline match-gps: error: stopped: OSRM {osrm_url}/v5/"
                                    "osrm answered Invalid"), lines[-1]
        assert "check the path in [osrm] url" in lines[-1], lines[-1]
        assert states(conn) == {"pending": 4}
    row = conn.execute("SELECT max(retry_count) AS r, count(*) FILTER (WHERE NOT processed)"
                       " AS left FROM processing_batches JOIN gps_point_status USING (batch_id)"
                       ).fetchone()
    assert (row["r"], row["left"]) == (0, 12)


def test_match_gps_needs_an_osrm_url(run_cli: Cli) -> None:
    result = run_cli("match-gps")
    assert result.exit_code == 78 and "PIPELINE_OSRM_URL" in result.output


def test_batches_list_and_requeue(gps_cli: Cli, conn: psycopg.Connection[Any],
                                  road_points: list[tuple[float, float]]) -> None:
    small_batches(conn, road_points, devices=1, per_device=2)
    gps_cli.env.update({"PIPELINE_OSRM_URL": "http://127.0.0.1:9", "PIPELINE_OSRM_RETRIES": "1",
                        "PIPELINE_MATCH_MAX_ATTEMPTS": "1"})
    down = gps_cli("match-gps")
    assert down.exit_code == 1 and "unavailable" in down.output
    listed = json.loads(gps_cli("batches", "list", "--status", "dead", "--json").stdout)
    assert len(listed["batches"]) == 2
    assert "unavailable" in listed["batches"][0]["error_message"]
    table = gps_cli("batches", "list", "--device", "dev-0")
    assert table.exit_code == 0 and "dead" in table.output
    requeued = gps_cli("batches", "requeue", "--dead", "--device", "nobody")
    assert requeued.exit_code == 0 and "requeued 0" in requeued.output
    assert json.loads(gps_cli("batches", "requeue", "--json").stdout)["requeued"] == 2
    assert states(conn) == {"pending": 2}


def test_sigkill_during_a_batch_then_lease_expiry(gps_cli: Cli, blackhole: str,
                                                  conn: psycopg.Connection[Any],
                                                  road_points: list[tuple[float, float]],
                                                  osrm_url: str) -> None:
    small_batches(conn, road_points, devices=1, per_device=1)
    gps_cli.env.update({"PIPELINE_MATCH_LEASE_SECONDS": "2", "PIPELINE_OSRM_URL": blackhole,
                        "PIPELINE_OSRM_TIMEOUT": "60"})
    proc = gps_cli.popen("match-gps", "--concurrency", "1")
    try:
        deadline = time.monotonic() + 30
        while states(conn).get("processing") != 1:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert states(conn) == {"processing": 1}
    time.sleep(2.2)
    gps_cli.env["PIPELINE_OSRM_URL"] = osrm_url
    result = gps_cli("match-gps", "--json")
    assert result.exit_code == 0
    counts = json.loads(result.stdout)["counts"]
    assert counts["leases_rescued"] == 1 and counts["batches_completed"] == 1
    row = conn.execute("SELECT status, retry_count, polyline_count FROM processing_batches"
                       ).fetchone()
    assert (row["status"], row["retry_count"]) == ("completed", 1)
    lines = conn.execute("SELECT count(*) AS n, count(DISTINCT (device_id, start_time)) AS d"
                         " FROM cached_polylines").fetchone()
    assert lines["n"] == lines["d"] == row["polyline_count"]


def test_sigterm_finishes_in_flight_and_releases(gps_cli: Cli, conn: psycopg.Connection[Any],
                                                 road_points: list[tuple[float, float]]) -> None:
    small_batches(conn, road_points, devices=20, per_device=20)
    proc = gps_cli.popen("match-gps", "--concurrency", "2", "--json")
    try:
        deadline = time.monotonic() + 30
        while states(conn).get("completed", 0) < 5:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    record = json.loads(out)
    got = states(conn)
    assert "processing" not in got and got.get("pending", 0) > 0
    assert record["counts"]["batches_completed"] == got["completed"]
    unprocessed = conn.execute("SELECT count(*) AS n FROM gps_point_status WHERE NOT processed")
    assert unprocessed.fetchone()["n"] == 3 * got["pending"]


@pytest.mark.slow
def test_four_processes_complete_each_batch_once(gps_cli: Cli, osrm_url: str,
                                                 conn: psycopg.Connection[Any],
                                                 road_points: list[tuple[float, float]]) -> None:
    small_batches(conn, road_points, devices=100, per_device=20)
    with CountingHttpProxy(osrm_url) as proxy:
        gps_cli.env["PIPELINE_OSRM_URL"] = proxy.url
        procs = [gps_cli.popen("match-gps", "--json", "--concurrency", "2") for _ in range(4)]
        outs = [p.communicate(timeout=600) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
        requests = proxy.count("/match/")
    records = [json.loads(o[0]) for o in outs]
    completed = [r["counts"].get("batches_completed", 0) for r in records]
    assert sum(completed) == 2000 == states(conn)["completed"]
    assert requests == 2000  # each batch went to OSRM exactly once
    assert sum(1 for c in completed if c > 0) >= 2  # the work really was shared
    per_batch = conn.execute("SELECT sum(polyline_count) AS s FROM processing_batches"
                             ).fetchone()["s"]
    total = conn.execute("SELECT count(*) AS n FROM cached_polylines").fetchone()["n"]
    assert total == per_batch  # no batch wrote its polylines twice


def test_match_gps_dry_run_shows_the_backlog_and_claims_nothing(run_cli: Cli, conn: Any
                                                                ) -> None:
    for i in range(3):
        conn.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude) "
                     "VALUES ('bus', now() - make_interval(secs => %s), 60.17, 24.94)", (i,))
    result = run_cli("match-gps", "--dry-run", "--json")  # no OSRM needed: nothing is matched
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "dry-run" and out["would_run"] is True
    assert out["counts"]["unbatched_points"] == 3 and out["counts"]["pending_batches"] == 0
    assert conn.execute("SELECT count(*) AS n FROM processing_batches").fetchone() == {"n": 0}
    assert conn.execute("SELECT count(*) AS n FROM stage_runs").fetchone() == {"n": 0}
    assert conn.execute("SELECT count(*) AS n FROM gps_point_status WHERE batch_id IS NOT NULL"
                        ).fetchone() == {"n": 0}


def test_a_database_whose_client_encoding_is_latin1_stores_text_as_utf8(
        run_cli: Cli, tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    # ALTER DATABASE ... SET client_encoding = LATIN1 (an old application's default): the
    # UTF-8 bytes of a file were read as Latin-1 and stored garbled ('ÐÐ¾ÑÐºÐ²Ð°-1'), in
    # silence, and `batches list --device Москва-1` ended in a UnicodeEncodeError traceback.
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    conn.execute(psycopg.sql.SQL("ALTER DATABASE {} SET client_encoding = 'LATIN1'").format(
        psycopg.sql.Identifier(name)))
    path = tmp_path / "points.csv"
    path.write_text("Москва-1,2024-05-01T08:00:00Z,60.17,24.94\n", encoding="utf-8")
    loaded = run_cli.subprocess("ingest-gps", str(path))
    assert loaded.returncode == 0, loaded.stderr
    stored = conn.execute("SELECT device_id FROM gps_points").fetchall()
    assert stored == [{"device_id": "Москва-1"}]
    listed = run_cli.subprocess("batches", "list", "--device", "Москва-1")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr


@pytest.mark.parametrize("json_", [["--json"], []])
def test_a_reader_that_stops_reading_leaves_the_runs_exit_code(
        run_cli: Cli, tmp_path: Path, conn: psycopg.Connection[Any], json_: list[str]) -> None:
    # `pipeline ingest-gps ... | head -1` under pipefail: the load was done and recorded a
    # success, but the closed pipe made it exit 1, "the stage failed", to cron.
    path = tmp_path / "points.csv"
    path.write_text("bus-1,2024-05-01T08:00:00Z,60.17,24.94\n")
    proc = run_cli.popen(*json_, "ingest-gps", str(path))
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the result is written
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Broken pipe" not in err
    run = conn.execute("SELECT status FROM stage_runs WHERE stage = 'ingest-gps'").fetchone()
    assert run == {"status": "success"}


def test_a_device_id_with_control_characters_is_listed_escaped(
        gps_cli: Cli, conn: psycopg.Connection[Any]) -> None:
    """A fleet's device id holding a line break, a tab or a right-to-left override (U+202E)
    is stored literally; in a table it broke the row over two lines, or turned the rest of
    the line around on the operator's terminal. JSON keeps it as it is."""
    device = "bus\n12\t\u202eevil"
    traces.insert_points(conn, [(device, datetime(2024, 5, 1, 8, tzinfo=UTC), 60.17, 24.94)])
    gps_cli("match-gps")  # a lone point: too_short, no OSRM needed
    table = gps_cli("batches", "list")
    assert table.exit_code == 0
    assert "bus\\n12\\t\\u202eevil" in table.output and "\u202e" not in table.output
    listed = json.loads(gps_cli("batches", "list", "--json").stdout)
    assert listed["batches"][0]["device_id"] == device
