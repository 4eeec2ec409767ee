"""ingest-gps against a real PostgreSQL: COPY, duplicates, invalid rows, --strict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg

from pipeline_cli.db import Database
from pipeline_cli.runner import RunRecord, StageRunner
from pipeline_cli.stages.ingest_gps import ingest_gps

HEADER = "device_id,recorded_at,latitude,longitude\n"


def ingest(database_url: str, files: list[Path], **kw: Any) -> RunRecord:
    database = Database(database_url)
    return StageRunner(database).run(
        "ingest-gps", lambda ctx: ingest_gps(database, files, ctx, **kw), singleton=False)


def count(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT count(*) AS n FROM gps_points").fetchone()["n"])


def test_csv_loads_and_duplicates_are_stored_once(tmp_path: Path, database_url: str,
                                                  conn: psycopg.Connection[Any]) -> None:
    path = tmp_path / "a.csv"
    path.write_text(HEADER + "bus,2024-05-01T08:00:00Z,60.17,24.94\n"
                    "bus,1714550400,60.99,24.99\n"  # the same second again, as epoch
                    "bus,2024-05-01T08:00:05Z,60.171,24.941\n")
    first = ingest(database_url, [path])
    assert first.exit_code == 0
    assert first.counts == {"files": 1, "rows_read": 3, "rows_loaded": 2, "duplicates": 1,
                            "invalid_rows": 0}
    row = conn.execute("SELECT latitude, source, processed FROM gps_points"
                       " ORDER BY recorded_at LIMIT 1").fetchone()
    assert (row["latitude"], row["source"], row["processed"]) == (60.17, "file:a.csv", False)
    again = ingest(database_url, [path])
    assert again.status == "noop" and again.counts["duplicates"] == 3
    assert count(conn) == 2


def test_invalid_rows_are_reported_and_skipped(tmp_path: Path, database_url: str,
                                               conn: psycopg.Connection[Any]) -> None:
    path = tmp_path / "b.csv"
    path.write_text(HEADER + "d,2024-05-01T08:00:00Z,NaN,24.9\n"
                    "d,2024-05-01T08:00:01Z,60.1,24.9\n"
                    "d,not-a-time,60.1,24.9\n")
    record = ingest(database_url, [path])
    assert record.exit_code == 0 and record.counts["invalid_rows"] == 2
    assert record.counts["rows_loaded"] == 1 and count(conn) == 1
    problems = record.extra["problems"]
    assert problems[0].startswith(f"{path}:2: ") and problems[1].startswith(f"{path}:4: ")


def test_strict_rejects_everything(tmp_path: Path, database_url: str,
                                   conn: psycopg.Connection[Any]) -> None:
    good = tmp_path / "good.csv"
    good.write_text(HEADER + "d,2024-05-01T08:00:00Z,60.1,24.9\n")
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "d,2024-05-01T08:00:01Z,60.1,24.9\nd,2024-05-01T08:00:02Z,99,1\n")
    record = ingest(database_url, [good, bad], strict=True)
    assert record.exit_code == 1 and "--strict" in (record.error or "")
    assert f"{bad}:3" in (record.error or "")
    assert count(conn) == 0


def test_malformed_file_loads_nothing(tmp_path: Path, database_url: str,
                                      conn: psycopg.Connection[Any]) -> None:
    good = tmp_path / "good.csv"
    good.write_text(HEADER + "d,2024-05-01T08:00:00Z,60.1,24.9\n")
    broken = tmp_path / "broken.geojson"
    broken.write_text('{"type": "FeatureCollection", "features": [')
    record = ingest(database_url, [good, broken])
    assert record.exit_code == 1 and "broken.geojson" in (record.error or "")
    assert count(conn) == 0


def test_gpx_and_geojson(tmp_path: Path, database_url: str,
                         conn: psycopg.Connection[Any]) -> None:
    gpx = tmp_path / "ride.gpx"
    gpx.write_text("""<gpx xmlns="http://www.topografix.com/GPX/1/1"><trk><name>van</name>
<trkseg><trkpt lat="60.17" lon="24.94"><time>2024-05-01T08:00:00Z</time></trkpt>
<trkpt lat="60.171" lon="24.941"><time>2024-05-01T08:00:03Z</time></trkpt></trkseg></trk></gpx>
""")
    geo = tmp_path / "line.geojson"
    geo.write_text(json.dumps({"type": "Feature", "properties": {
        "device_id": "tram", "times": ["2024-05-01T08:00:00Z", "2024-05-01T08:00:02Z"]},
        "geometry": {"type": "LineString", "coordinates": [[24.94, 60.17], [24.95, 60.18]]}}))
    record = ingest(database_url, [gpx, geo])
    assert record.counts["rows_loaded"] == 4
    devices = {r["device_id"]: r["n"] for r in conn.execute(
        "SELECT device_id, count(*) AS n FROM gps_points GROUP BY device_id")}
    assert devices == {"van": 2, "tram": 2}
