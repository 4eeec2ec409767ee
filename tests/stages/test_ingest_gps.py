"""ingest-gps against a real PostgreSQL: COPY, duplicates, invalid rows, --strict."""

from __future__ import annotations

import gzip
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline_cli.db import Database
from pipeline_cli.gps.files import READ_FORMATS
from pipeline_cli.runner import RunRecord, StageRunner
from pipeline_cli.stages import ingest_gps as ingest_module
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
                            "conflicting_duplicates": 1, "invalid_rows": 0}
    row = conn.execute("SELECT latitude, source, processed FROM gps_point_status"
                       " ORDER BY recorded_at LIMIT 1").fetchone()
    assert (row["latitude"], row["source"], row["processed"]) == (60.17, "file:a.csv", False)
    again = ingest(database_url, [path])
    assert again.status == "noop" and again.counts["duplicates"] == 3
    assert count(conn) == 2
    # Overlapping globs name a file twice: read once (the counts were of one entry per name).
    twice = ingest(database_url, [path, tmp_path / "." / "a.csv", path])
    assert twice.counts == {"files": 1, "rows_read": 3, "rows_loaded": 0, "duplicates": 3,
                            "conflicting_duplicates": 1, "invalid_rows": 0}


def test_a_point_of_a_stored_device_and_time_with_other_coordinates_is_named(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    """Two fixes of one device in one second (a tracker's time in whole seconds), in the file or
    against a stored point: the first is kept, and the other position is named, not only
    counted with the repeats of the same point."""
    conn.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude)"
                 " VALUES ('bus 7', '2024-05-01T08:00:09Z', 60.17, 24.94)")
    path = tmp_path / "c.csv"
    path.write_text(HEADER + "bus 7,2024-05-01T08:00:00Z,60.17,24.94\n"
                    "bus 7,2024-05-01T08:00:00Z,60.17,24.94\n"  # the same point again
                    "bus 7,2024-05-01T08:00:00Z,60.175,24.945\n"  # another place
                    "bus 7,2024-05-01T08:00:09Z,60.18,24.95\n")  # another than stored
    record = ingest(database_url, [path])
    assert record.exit_code == 0, record.error
    assert record.counts["rows_loaded"] == 1 and record.counts["duplicates"] == 3
    assert record.counts["conflicting_duplicates"] == 2
    assert "2 with other coordinates" in record.message
    conflicts = record.extra["conflicts"]
    assert conflicts[0].startswith("c.csv:4: ") or f"{path}:4: " in conflicts[0]
    assert "other coordinates (60.175, 24.945) than the point kept (60.17, 24.94)" in \
        conflicts[0]
    assert ":5: " in conflicts[1] and "(60.18, 24.95)" in conflicts[1]
    stored = conn.execute("SELECT latitude FROM gps_points ORDER BY recorded_at").fetchall()
    assert [r["latitude"] for r in stored] == [60.17, 60.17]


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
    assert (record.counts["rows_read"], record.counts["invalid_rows"]) == (3, 1)


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


def test_gzipped_files_are_read_as_they_are(tmp_path: Path, database_url: str,
                                            conn: psycopg.Connection[Any]) -> None:
    """Trackers and portals export .gz: any file that is gzip is decompressed as it is read
    (told by its first bytes), and its format is the suffix before .gz."""
    csv_gz = tmp_path / "points.csv.gz"
    csv_gz.write_bytes(gzip.compress((HEADER + "".join(
        f"d,2024-05-01T08:00:{s:02d}Z,60.1,24.9\r\n" for s in range(50))).encode()))
    gpx_gz = tmp_path / "ride.gpx.gz"
    gpx_gz.write_bytes(gzip.compress(b"""<gpx><trk><name>van</name><trkseg>
<trkpt lat="60.17" lon="24.94"><time>2024-05-01T08:00:00Z</time></trkpt></trkseg></trk></gpx>"""))
    record = ingest(database_url, [csv_gz, gpx_gz])
    assert record.counts["rows_loaded"] == 51, record.error
    damaged = tmp_path / "damaged.csv.gz"
    damaged.write_bytes(csv_gz.read_bytes()[:-20])
    failed = ingest(database_url, [damaged])
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.startswith(f"{damaged}: cannot read: ") and "nothing loaded" in failed.error
    assert count(conn) == 51


def test_gpx_and_geojson_fields_meet_the_csv_checks(tmp_path: Path, database_url: str) -> None:
    gpx = tmp_path / "ride.gpx"
    gpx.write_text("""<gpx><trk><name>van</name><trkseg>
<trkpt lat="95" lon="24.94"><time>2024-05-01T08:00:00Z</time></trkpt>
<trkpt lat="60.1" lon="24.94"><time>1714550400000</time></trkpt>
<trkpt lat="60.1" lon="24.94"><time>2024-05-01T08:00:00Z</time></trkpt>
</trkseg></trk></gpx>
""")
    geo = tmp_path / "line.geojson"
    geo.write_text(json.dumps({"type": "Feature", "properties": {
        "device_id": "tram", "times": ["2024-05-01T08:00:00Z", "noon"]},
        "geometry": {"type": "LineString", "coordinates": [[24.94, 60.17], [True, 60.18]]}}))
    record = ingest(database_url, [gpx, geo])
    assert record.counts["rows_loaded"] == 2 and record.counts["invalid_rows"] == 3
    assert record.extra["problems"] == [
        f"{gpx}:2: latitude 95 out of range (-90..90)",
        f"{gpx}:3: epoch time '1714550400000' out of range (1980-01-06..2099; milliseconds?)",
        f"{geo}:1 (feature 1, coordinate 2): unparseable time 'noon'"]


def stored(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return [tuple(r.values()) for r in conn.execute(
        "SELECT device_id, recorded_at, latitude, longitude FROM gps_points"
        " ORDER BY device_id, recorded_at")]


def test_csv_iso_and_epoch_times(tmp_path: Path, database_url: str,
                                 conn: psycopg.Connection[Any]) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(("\ufeff" + HEADER + "bus-1,2024-05-01T08:00:00Z,60.17,24.94\n"
                      "bus-1,1714550401,60.171,24.941\n"
                      "bus-1,2024-05-01 08:00:02+03:00,60.172,24.942\n"
                      "bus-1,2024-05-01T09:00:00.25,6e1,2.5e1\n").encode())
    windows = tmp_path / "w.csv"  # CRLF line ends throughout
    windows.write_bytes(b"w,2024-05-01T08:00:00Z,1,2\r\nw,2024-05-01T08:00:01Z,1,2\r\n")
    lower = tmp_path / "l.csv"  # RFC 3339 allows a lower-case t and z
    lower.write_bytes(b"l,2024-05-01t08:00:00z,1,2\n")
    mixed = tmp_path / "m.csv"  # edited on two systems: LF and CRLF line ends in one file
    mixed.write_bytes(b"m,2024-05-01T08:00:00Z,1,2\nm,2024-05-01T08:00:01Z,1,2\r\n"
                      b"m,2024-05-01T08:00:02Z,1,2\n")
    record = ingest(database_url, [path, windows, mixed, lower])
    assert record.counts["rows_loaded"] == 10, record.extra
    assert stored(conn)[:4] == [
        ("bus-1", datetime(2024, 5, 1, 5, 0, 2, tzinfo=UTC), 60.172, 24.942),
        ("bus-1", datetime(2024, 5, 1, 8, 0, 0, tzinfo=UTC), 60.17, 24.94),
        ("bus-1", datetime(2024, 5, 1, 8, 0, 1, tzinfo=UTC), 60.171, 24.941),
        ("bus-1", datetime(2024, 5, 1, 9, 0, 0, 250000, tzinfo=UTC), 60.0, 25.0)]


def test_csv_line_ends_split_across_copy_blocks(tmp_path: Path, database_url: str,
                                                 conn: psycopg.Connection[Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest_module, "COPY_BLOCK", 7)  # many CRLFs fall on a block edge
    path = tmp_path / "crlf.csv"
    lines = [f"d,2024-05-01T08:00:{s:02d}Z,60.1,24.9" for s in range(40)]
    path.write_bytes(("\r\n".join(lines[:20]) + "\n" + "\r\n".join(lines[20:]) + "\r\n")
                     .encode())
    record = ingest(database_url, [path])
    assert record.counts == {"files": 1, "rows_read": 40, "rows_loaded": 40,
                             "duplicates": 0, "conflicting_duplicates": 0,
                             "invalid_rows": 0}, record.extra


@pytest.mark.parametrize("block", [7, 1 << 20])
def test_lines_copy_would_not_read_as_one_field_are_bad_rows_not_the_end(
        tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    # COPY reads a line '\.' as the end of its data: the rows after it were lost, exit 0.
    # A control byte that is the raw COPY's delimiter or quote refused the whole file.
    monkeypatch.setattr(ingest_module, "COPY_BLOCK", block)
    path = tmp_path / "eod.csv"
    rows = [f"d,2024-05-01T08:00:{s:02d}Z,60.1,24.9" for s in range(6)]
    path.write_text("\n".join([*rows[:3], "\\.", rows[3], "d,x\x01y,\x02,1", *rows[4:]])
                    + "\n\\.")
    record = ingest(database_url, [path])
    assert (record.counts["rows_loaded"], record.counts["invalid_rows"]) == (6, 3), record.extra
    assert [p.split(":")[1] for p in record.extra["problems"]] == ["4", "6", "9"]


def test_a_number_of_a_million_digits_is_a_bad_row(tmp_path: Path, database_url: str) -> None:
    # numeric overflowed: the whole run failed with a bare database error, no file:line.
    path = tmp_path / "big.csv"
    huge = "6" * 1_048_576
    path.write_text(f"d,2024-05-01T08:00:00Z,60.1,24.9\nd,2024-05-01T08:00:05Z,{huge},24.9\n"
                    f"d,{huge},60.1,24.9\nd,2024-05-01T08:00:10Z,60.1,24.9\n")
    record = ingest(database_url, [path])
    assert (record.counts["rows_loaded"], record.counts["invalid_rows"]) == (2, 2), record.error
    assert record.extra["problems"][0].endswith(f"big.csv:2: latitude '{huge[:64]}' is not a "
                                                "number")
    assert record.extra["problems"][1].endswith(f"big.csv:3: epoch time '{huge[:64]}' out of "
                                                "range (1980-01-06..2099; milliseconds?)")


def test_a_first_line_with_a_cell_above_128_kib_is_read(tmp_path: Path,
                                                       database_url: str) -> None:
    # The header was split by Python's csv module, whose field limit (128 KiB) failed the run
    # as "internal error: Error: field larger than field limit (131072)", naming no file.
    note = "x" * 200_000
    headed, bare = tmp_path / "headed.csv", tmp_path / "bare.csv"
    headed.write_text(f"device,time,lat,lon,{note}\nd,2024-05-01T08:00:00Z,60.1,24.9,n\n")
    bare.write_text(f"e,2024-05-01T08:00:00Z,60.1,24.9,{note}\n")
    record = ingest(database_url, [headed, bare])
    assert (record.counts["rows_loaded"], record.counts["invalid_rows"]) == (2, 0), record.error


def test_a_date_written_yyyymmdd_is_not_read_as_epoch_seconds(tmp_path: Path,
                                                               database_url: str) -> None:
    # 20240109 was stored as 1970-08-23T06:01:49Z, with exit 0.
    path = tmp_path / "compact.csv"
    path.write_text("device,time,lat,lon\nd,20240109,60.1,24.9\nd,0,60.1,24.9\n"
                    "d,315964800,60.1,24.9\nd,1714550400.5,60.1,24.9\n")
    record = ingest(database_url, [path])
    assert (record.counts["rows_loaded"], record.counts["invalid_rows"]) == (2, 2), record.error
    assert record.extra["problems"] == [
        f"{path}:2: epoch time '20240109' before 1980-01-06, when GPS time began (a date "
        "written YYYYMMDD?)",
        f"{path}:3: epoch time '0' before 1980-01-06, when GPS time began (a date written "
        "YYYYMMDD?)"]


def test_a_headerless_file_whose_device_is_named_like_a_column(tmp_path: Path,
                                                                database_url: str) -> None:
    # "long" (a longitude alias) made the first row a header lacking three columns.
    path = tmp_path / "long.csv"
    path.write_text("long,2024-05-01T08:00:00Z,60.1,24.9\nlong,2024-05-01T08:00:05Z,60.1,24.9\n")
    record = ingest(database_url, [path])
    assert record.counts["rows_loaded"] == 2, record.error


def test_csv_header_in_another_order_and_without_header(tmp_path: Path, database_url: str,
                                                        conn: psycopg.Connection[Any]) -> None:
    reordered = tmp_path / "b.csv"
    reordered.write_text("lat,lon,time,device\n60.1,24.9,1714550400,d\n")
    bare = tmp_path / "c.dat"
    bare.write_text("e,1714550400,60.2,24.8\n")
    record = ingest(database_url, [reordered, bare], fmt="csv")
    assert record.counts["rows_loaded"] == 2
    assert [(r[0], r[2]) for r in stored(conn)] == [("d", 60.1), ("e", 60.2)]


def test_csv_from_a_spreadsheet_semicolons_tabs_decimal_commas_and_device(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    """Semicolon- and tab-separated files, as spreadsheets export them where the comma is the
    decimal mark; a file of one device without a device column takes --device."""
    semi = tmp_path / "semi.csv"
    semi.write_text("Device ID;Timestamp;Lat;Lon\n"
                    "d;2024-05-01T08:00:00Z;60,17;24,94\n"
                    '"e;2";2024-05-01T08:00:00Z;-33,5;-70.25\n'
                    "d;2024-05-01T08:00:01Z;60,1,7;24,94\n"
                    ";;;\n")
    tabs = tmp_path / "tabs.csv"
    tabs.write_text("time\tlat\tlon\n2024-05-01T08:00:02Z\t60.5\t24,5\n")
    record = ingest(database_url, [semi, tabs], device_id="tracker")
    assert record.counts["rows_loaded"] == 3 and record.counts["invalid_rows"] == 1
    assert record.extra["problems"] == [f"{semi}:4: latitude '60,1,7' is not a number"]
    assert [(r[0], r[2], r[3]) for r in stored(conn)] == [
        ("d", 60.17, 24.94), ("e;2", -33.5, -70.25), ("tracker", 60.5, 24.5)]
    no_device = ingest(database_url, [tabs])
    assert no_device.status == "failed" and no_device.error is not None
    assert "header lacks column(s) device_id (--device" in no_device.error


def test_a_header_this_reader_does_not_know_is_refused_not_read_as_data(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    # Read as data, the default column order put 24.94 into the latitude: valid, and wrong.
    german = tmp_path / "export.csv"
    german.write_text("Gerät,Zeit,Länge,Breite\nsx,2024-03-06T10:00:00Z,24.94,60.17\n")
    record = ingest(database_url, [german])
    assert record.status == "failed" and record.exit_code == 1
    assert record.error == (f"{german}: line 1: neither a header naming the columns nor a row "
                            "of data: 'Gerät,Zeit,Länge,Breite' (header names: device_id, "
                            "recorded_at, latitude, longitude, or their aliases); nothing loaded")
    # A spreadsheet's separator line above the header is its own convention.
    excel = tmp_path / "excel.csv"
    excel.write_text("sep=;\ndevice;time;lon;lat\nsx;2024-03-06T10:00:00Z;24,94;60,17\n")
    headless = tmp_path / "headless.csv"
    headless.write_text("sep=,\nsy,2024-03-06T10:00:00Z,60.17,24.94\n")
    record = ingest(database_url, [excel, headless])
    assert record.counts["rows_loaded"] == 2 and record.counts["invalid_rows"] == 0
    assert [(r[0], r[2], r[3]) for r in stored(conn)] == [("sx", 60.17, 24.94),
                                                          ("sy", 60.17, 24.94)]


def test_the_first_of_a_repeated_time_wins_within_a_line(tmp_path: Path, database_url: str,
                                                         conn: psycopg.Connection[Any]) -> None:
    # A LineString's coordinates (or a GPX file on one line) share a line number: which of two
    # points with one time was kept depended on the sort, about half each way.
    times = [f"2024-01-06T10:{m:02d}:{s:02d}Z" for m in range(10) for s in range(0, 60, 2)]
    coords = [[24.93, 60.17]] * len(times) + [[24.94, 60.18]] * len(times)
    path = tmp_path / "line.geojson"
    path.write_text(json.dumps({"type": "Feature", "properties": {"device_id": "d",
                                "times": times + times},
                                "geometry": {"type": "LineString", "coordinates": coords}}))
    record = ingest(database_url, [path])
    assert record.counts["rows_loaded"] == len(times), record.counts
    assert {(r[2], r[3]) for r in stored(conn)} == {(60.17, 24.93)}


def test_comment_lines_above_the_header_are_skipped(tmp_path: Path, database_url: str,
                                                   conn: psycopg.Connection[Any]) -> None:
    # "# exported by MyTracker 2.1" was read as the first row: the file went in the default
    # column order and its lon,lat header became a bad row, so every point was swapped.
    tracker = tmp_path / "tracker.csv"
    # "# Time (UTC)" names one column: it is a comment, not a header lacking three columns.
    tracker.write_text("# exported by MyTracker 2.1\n#\n# Time (UTC)\ndevice,time,lon,lat\n"
                       "sw,2024-01-06T10:00:00Z,24.93,60.17\n")
    headless = tmp_path / "headless.csv"  # comments above the first row of data
    headless.write_text("# no header\nhl,2024-01-06T10:00:00Z,60.17,24.93\n")
    commented = tmp_path / "commented.csv"  # a header behind a "#" is still the header
    commented.write_text("#device\ttime\tlon\tlat\nch\t2024-01-06T10:00:00Z\t24.93\t60.17\n")
    traccar = tmp_path / "traccar.csv"  # Traccar's export names the time fixTime
    traccar.write_text("deviceId,fixTime,latitude,longitude,speed\n"
                       "tr,2024-01-06T10:00:00Z,60.17,24.93,3.5\n")
    tabs = tmp_path / "tabs.csv"  # a spreadsheet's "sep=<tab>" line (it was refused)
    tabs.write_text("sep=\t\ndevice\ttime\tlon\tlat\ntb\t2024-01-06T10:00:00Z\t24.93\t60.17\n")
    record = ingest(database_url, [tracker, headless, commented, tabs, traccar], strict=True)
    assert record.status == "success", record.error
    assert sorted((r[0], r[2], r[3]) for r in stored(conn)) == [
        ("ch", 60.17, 24.93), ("hl", 60.17, 24.93), ("sw", 60.17, 24.93), ("tb", 60.17, 24.93),
        ("tr", 60.17, 24.93)]


def _write_and_close(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as pipe:
        pipe.write(data)


def test_a_pipe_is_read_once(tmp_path: Path, database_url: str,
                             conn: psycopg.Connection[Any]) -> None:
    # <(zcat day.csv.gz) and /dev/stdin: the gzip probe read the pipe dry, then the file was
    # opened again and found empty; noop, exit 0, every point lost.
    rows = "".join(f"p,2024-01-06T10:00:{s:02d}Z,60.17,24.93\n" for s in range(50))
    for data in (rows.encode(), gzip.compress(rows.encode())):
        read_end, write_end = os.pipe()  # what bash's <(...) hands over as /dev/fd/N
        writer = threading.Thread(target=_write_and_close, args=(write_end, data))
        writer.start()
        try:
            record = ingest(database_url, [f"/dev/fd/{read_end}"], fmt="csv")
        finally:
            writer.join()
            os.close(read_end)
        assert record.counts["rows_read"] == 50, record
    assert count(conn) == 50


def test_a_lone_cr_and_a_nul_byte(tmp_path: Path, database_url: str,
                                  conn: psycopg.Connection[Any]) -> None:
    last = tmp_path / "last.csv"  # LF lines, the last ended by a CR alone
    last.write_bytes(b"d,2024-05-01T08:00:00Z,1,2\nd,2024-05-01T08:00:01Z,1,2\r")
    assert ingest(database_url, [last]).counts["rows_loaded"] == 2
    nul = tmp_path / "nul.csv"
    # A NUL byte (a logger's power-loss padding) refused the whole file, even without
    # --strict; it is a bad row like any other now.
    nul.write_bytes(b"d,2024-05-01T08:00:02Z,1,2\nd,2024-05-01T08:00:03Z,1\x00,2\n"
                    b"\x00\x00\x00\x00\n")
    record = ingest(database_url, [nul])
    assert record.status == "success" and record.counts["rows_loaded"] == 1, record.error
    assert record.extra["problems"] == [f"{nul}:{n}: a NUL byte (no text holds one)"
                                        for n in (2, 3)]


def test_a_file_without_one_valid_row_rejects_the_run(tmp_path: Path, database_url: str,
                                                      conn: psycopg.Connection[Any]) -> None:
    """Not one good row: another layout, not a few bad rows to skip (a cron run under -q would
    otherwise succeed silently having loaded nothing)."""
    good = tmp_path / "good.csv"
    good.write_text(HEADER + "d,2024-05-01T08:00:00Z,60.1,24.9\n")
    piped = tmp_path / "piped.csv"
    piped.write_text("d|2024-05-01T08:00:00Z|60.1|24.9\nd|2024-05-01T08:00:01Z|60.1|24.9\n")
    record = ingest(database_url, [good, piped])
    assert record.status == "failed" and record.exit_code == 1
    assert record.error == (f"{piped}: none of its 2 row(s) is valid (first: line 1: expected "
                            "4 fields, got 1); nothing loaded")
    assert count(conn) == 0


def test_csv_invalid_rows_name_their_lines(tmp_path: Path, database_url: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + "d,2024-05-01T08:00:00Z,NaN,24.9\n"
                    "d,2024-05-01T08:00:01Z,91,24.9\n"
                    "d,yesterday,60.1,24.9\n"
                    "d,2024-05-01T08:00:03Z,60.1\n"
                    "\n"
                    ",2024-05-01T08:00:04Z,60.1,24.9\n"
                    "d,1714550400000,60.1,24.9\n"
                    "d,2024-05-01T08:00:05Z,60.1,-181\n"
                    "d,2024-05-01T08:00:06Z,60.1,24.9\n"
                    "d,2024-02-30T08:00:00Z,60.1,24.9\n"
                    "d,2024-05-01T25:00:00Z,60.1,24.9\n"
                    "d,1960-05-01T08:00:00Z,60.1,24.9\n"
                    "d,2024-05-01T08:00:07Z,1e999,abc\n")
    record = ingest(database_url, [path])
    assert record.counts["rows_loaded"] == 1 and record.counts["invalid_rows"] == 11
    found = {int(p.split(":")[1]): p.split(": ", 1)[1] for p in record.extra["problems"]}
    assert sorted(found) == [2, 3, 4, 5, 7, 8, 9, 11, 12, 13, 14]
    assert "latitude" in found[2] and "out of range" in found[3]
    assert "unparseable time" in found[4] and "fields" in found[5]
    assert "device_id" in found[7]
    assert "milliseconds" in found[8] and "longitude" in found[9]
    assert "unparseable time" in found[11] and "unparseable time" in found[12]
    assert "out of range" in found[13] and "latitude" in found[14]
    assert record.extra["problems"][0].startswith(f"{path}:2: ")


def test_csv_unreadable_files_load_nothing(tmp_path: Path, database_url: str,
                                           conn: psycopg.Connection[Any]) -> None:
    good = tmp_path / "good.csv"
    good.write_text(HEADER + "d,2024-05-01T08:00:00Z,60.1,24.9\n")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"d,2024-05-01T08:00:00Z,60.1,24.9\nd\xe9,2024-05-01T08:00:01Z,60,24\n")
    record = ingest(database_url, [good, latin])
    # Excel on Windows saves "CSV" in the machine's code page: the message says what to do.
    assert record.exit_code == 1 and record.error == (
        f"{latin}: line 2: not UTF-8 text (save it as UTF-8; Excel: 'CSV UTF-8'); nothing loaded")
    headless = tmp_path / "h.csv"
    headless.write_text("device_id,recorded_at,latitude\n")
    record = ingest(database_url, [good, headless])
    assert record.exit_code == 1 and "longitude" in (record.error or "")
    assert count(conn) == 0


def test_csv_quoted_fields_are_kept_literally(tmp_path: Path, database_url: str,
                                              conn: psycopg.Connection[Any]) -> None:
    evil = 'x\'); DROP TABLE gps_points; --, "quoted"'
    path = tmp_path / "e.csv"
    path.write_text('"' + evil.replace('"', '""') + '",1714550400,60.1,24.9\n')
    record = ingest(database_url, [path])
    assert record.counts["rows_loaded"] == 1
    assert stored(conn)[0][0] == evil


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_csv_empty_first_field_of_a_quoted_line_keeps_its_place(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any], delimiter: str) -> None:
    # The empty first field was dropped and every column moved left: the device became
    # 2024-01-06T10:00:00Z at epoch 60.17 s, latitude 24.93, with --strict too.
    path = tmp_path / "e.csv"
    path.write_text(delimiter.join(["note", "device_id", "recorded_at", "latitude", "longitude",
                                    "speed"]) + "\n"
                    + delimiter.join(["", '"Bus 1, north"', "2024-01-06T10:00:00Z", "60.17",
                                      "24.93", "12.5"]) + "\n"
                    + delimiter.join(['""', "b", "2024-01-06T10:00:01Z", '"60.5"', "24.9", ""])
                    + "\n")
    record = ingest(database_url, [path], strict=True)
    assert record.status == "success", record.error
    assert set(stored(conn)) == {
        ("Bus 1, north", datetime(2024, 1, 6, 10, tzinfo=UTC), 60.17, 24.93),
        ("b", datetime(2024, 1, 6, 10, 0, 1, tzinfo=UTC), 60.5, 24.9)}
    fields = conn.execute("SELECT gps_csv_fields(%s, %s) AS f", (',"a",,"",b,', ",")).fetchone()
    assert fields["f"] == ["", "a", "", "", "b", ""]


def test_csv_quoted_field_across_lines_is_refused_by_line(tmp_path: Path,
                                                          database_url: str) -> None:
    # Lines are split in SQL one by one: a quoted field that runs past a line end (found by the
    # fuzzer: a device id of "\n") is named as a bad row, never a database error or a guess.
    path = tmp_path / "q.csv"
    path.write_text(HEADER + '"\n",2024-05-01T08:00:00Z,60.1,24.9\n'
                    "d,2024-05-01T08:00:01Z,60.1,24.9\n")
    record = ingest(database_url, [path])
    assert record.status == "success", record.error
    assert record.counts["rows_loaded"] == 1 and record.counts["invalid_rows"] == 2
    assert all("unbalanced quotes" in p for p in record.extra["problems"])
    assert record.extra["problems"][0].startswith(f"{path}:2: ")


def test_an_empty_file_of_any_format_is_a_noop(tmp_path: Path, database_url: str) -> None:
    # An exporter's quiet hour leaves an empty file: a noop for CSV, but "malformed JSON:
    # Expecting value" and "malformed GPX: no element found", exit 1, for the others.
    files = []
    for name, data in [("a.csv", b""), ("b.gpx", b""), ("c.geojson", b"\n \r\n"),
                       ("d.json", b"\xef\xbb\xbf"), ("e.gpx.gz", gzip.compress(b""))]:
        files.append(tmp_path / name)
        files[-1].write_bytes(data)
    record = ingest(database_url, files)
    assert record.status == "noop" and record.exit_code == 0, record.error
    assert record.counts["rows_read"] == 0


@pytest.mark.parametrize("block", [7, 1 << 20])
def test_utf16_files_from_windows_tools_load(tmp_path: Path, database_url: str,
                                             conn: psycopg.Connection[Any],
                                             monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    # Excel's "Unicode text" and PowerShell write UTF-16 with a byte-order mark: refused as
    # "line 1: not UTF-8 text" (a GPX file in UTF-16 loaded, its parser reads the mark).
    monkeypatch.setattr(ingest_module, "COPY_BLOCK", block)
    text = ("device_id\trecorded_at\tlatitude\tlongitude\r\n"
            + "".join(f"ü{s}\t2024-01-06T10:00:{s:02d}Z\t60.17\t24.94\r\n" for s in range(5)))
    little = tmp_path / "le.csv"
    little.write_bytes(text.encode("utf-16"))  # with a BOM, in this machine's (little) order
    big = tmp_path / "be.csv.gz"
    big.write_bytes(gzip.compress(b"\xfe\xff" + text.replace("ü", "b").encode("utf-16-be")))
    geo = tmp_path / "g.geojson"
    geo.write_bytes(json.dumps({"type": "Feature", "properties": {
        "device_id": "gé", "time": "2024-01-06T10:00:00Z"},
        "geometry": {"type": "Point", "coordinates": [24.94, 60.17]}}).encode("utf-16"))
    record = ingest(database_url, [little, big, geo], strict=True)
    assert record.counts["rows_loaded"] == 11, record.error
    assert {r[0] for r in stored(conn)} == {"gé", *(f"ü{s}" for s in range(5)),
                                           *(f"b{s}" for s in range(5))}
    # Without the mark, every other byte of it is NUL: named, not read as one bad row a line.
    bare = tmp_path / "bare.csv"
    bare.write_bytes(text.encode("utf-16-le"))
    record = ingest(database_url, [bare])
    assert record.status == "failed" and record.error == (
        f"{bare}: UTF-16 text without a byte-order mark: save it as UTF-8 (or UTF-16 with "
        "the mark); nothing loaded")


def test_a_header_naming_the_time_twice_takes_the_utc_or_fix_time(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    # Loggers write the local time beside the UTC one, trackers' portals the server's time
    # beside the fix: the first of the columns was taken, and a local time without a zone was
    # stored as UTC, two hours off, with exit 0.
    local = tmp_path / "logger.csv"
    local.write_text("device,time,time_utc,lat,lon\nd,2024-01-06 12:00:00,2024-01-06 10:00:00,"
                     "60.17,24.94\n")
    portal = tmp_path / "portal.csv"
    portal.write_text("imei,timestamp,gps_time,lat,lon\np,2024-01-06T10:00:09Z,"
                      "2024-01-06T10:00:00Z,60.17,24.94\n")
    app = tmp_path / "app.csv"  # of two generic names, the first column: ISO before millis
    app.write_text("unit_id,time,timestamp,lat,lon\ns,2024-01-06T10:00:00Z,1704535200000,"
                   "60.17,24.94\n")
    record = ingest(database_url, [local, portal, app], strict=True)
    assert record.status == "success", record.error
    assert [(r[0], r[1]) for r in stored(conn)] == [
        ("d", datetime(2024, 1, 6, 10, tzinfo=UTC)), ("p", datetime(2024, 1, 6, 10, tzinfo=UTC)),
        ("s", datetime(2024, 1, 6, 10, tzinfo=UTC))]


@pytest.mark.timeout(60, method="thread")
def test_a_point_another_load_commits_meanwhile_is_a_duplicate_not_an_error(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    # Two ingests (or an ingest and the listener) of the same points at once: the rule that
    # skips stored points cannot see the other's uncommitted rows, so the primary key waited
    # for it and then failed the run: "duplicate key value violates unique constraint".
    path = tmp_path / "late.csv"
    path.write_text(HEADER + "bus,2024-05-01T08:00:00Z,60.17,24.94\n"
                    "bus,2024-05-01T08:00:05Z,60.171,24.941\n")
    with psycopg.connect(database_url) as other:
        other.execute("SELECT gps_add_partition('2024-05-01')")
        other.commit()
        other.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude)"
                      " VALUES ('bus', '2024-05-01T08:00:00Z', 60.0, 24.0)")
        threading.Timer(1.0, other.commit).start()  # once the ingest waits on this row
        record = ingest(database_url, [path])
    assert record.status == "success", record.error
    assert record.counts["rows_loaded"] == 1 and record.counts["duplicates"] == 1
    assert count(conn) == 2


def test_geojson_of_traccar_positions_takes_the_fix_time_and_device_id(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    # Traccar's positions as GeoJSON properties (its API's names): "Point has no time
    # property" though it had three, and the device was the file's name, not deviceId. A
    # property is named as a CSV column is (the same aliases and ranks): the fix time wins
    # over the device's and the server's, whatever their order.
    path = tmp_path / "export.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [24.940001, 60.170001,
                                                                          12.5]},
         "properties": {"deviceId": 7, "serverTime": "2024-01-06T08:00:09.000+00:00",
                        "deviceTime": "2024-01-06T08:00:05.000+00:00",
                        "fixTime": "2024-01-06T08:00:00.250+00:00"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [24.940002, 60.170002]},
         "properties": {"Device ID": "bus-3", "Time": "2024-01-06T10:00:01+02:00"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [24.940003, 60.170003]},
         "properties": {"imei": "356938035643809", "gps_time": 1704528002,
                        "timestamp": "2024-01-06T08:00:09Z"}}]}))
    record = ingest(database_url, [path], strict=True)
    assert record.status == "success", record.error
    assert stored(conn) == [
        ("356938035643809", datetime(2024, 1, 6, 8, 0, 2, tzinfo=UTC), 60.170003, 24.940003),
        ("7", datetime(2024, 1, 6, 8, 0, 0, 250000, tzinfo=UTC), 60.170001, 24.940001),
        ("bus-3", datetime(2024, 1, 6, 8, 0, 1, tzinfo=UTC), 60.170002, 24.940002)]


def test_a_csv_time_column_named_utc_and_a_device_name_beside_the_id(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    # A logger's "UTC" column (beside its local "Time") was no time column at all: "header
    # lacks column(s) recorded_at".
    logger = tmp_path / "logger.csv"
    logger.write_text("Index;Time;UTC;Latitude;Longitude;Device Name;DeviceId\n"
                      "1;2024-01-06 10:00:00;2024-01-06 08:00:00;60,170001;24,940001;Van 3;v3\n")
    named = tmp_path / "named.csv"  # a name alone is the device
    named.write_text("Device Name,UTC Time,lat,lng\nVan 4,2024-01-06T08:00:01.5Z,60.1,24.9\n")
    record = ingest(database_url, [logger, named], strict=True)
    assert record.status == "success", record.error
    assert stored(conn) == [
        ("Van 4", datetime(2024, 1, 6, 8, 0, 1, 500000, tzinfo=UTC), 60.1, 24.9),
        ("v3", datetime(2024, 1, 6, 8, tzinfo=UTC), 60.170001, 24.940001)]


def test_phyphox_seconds_since_the_start_are_refused_by_name(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    # phyphox's "Location (GPS)" export counts time from the start of the measurement (the
    # clock time is in another file of its export): "header lacks column(s) recorded_at"
    # named no column, though the file has a "Time (s)".
    path = tmp_path / "Location.csv"
    path.write_text('"Time (s)","Latitude (°)","Longitude (°)","Height (m)","Velocity (m/s)",'
                    '"Direction (°)","Distance (km)","Horizontal Accuracy (m)",'
                    '"Vertical Accuracy (m)","Satellites"\n'
                    "0.000000000E0,6.017000100E1,2.494000100E1,1.2E1,0,0,0,5,5,9\n")
    record = ingest(database_url, [path], device_id="phone")
    assert record.status == "failed" and record.exit_code == 1
    assert record.error == (
        f"{path}: line 1: header lacks column(s) recorded_at ('Time (s)' counts seconds from "
        "the start of the recording, not a date and time); nothing loaded")
    assert count(conn) == 0


def test_gpx_waypoints_and_route_points_without_a_time_say_what_they_are(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    # Garmin's and OsmAnd's files keep marked places (<wpt>) and a planned route (<rte>) beside
    # the recorded track. Without a <time> they are no recorded position: invalid rows, so
    # --strict refuses the file, and the problem says why ("<wpt> has no <time>" alone read
    # as a damaged recording).
    path = tmp_path / "ride.gpx"
    path.write_text("""<?xml version="1.0" encoding="UTF-8"?>
<gpx version="1.1" creator="Garmin Desktop App" xmlns="http://www.topografix.com/GPX/1/1">
  <wpt lat="60.1" lon="24.9"><name>Depot</name></wpt>
  <rte><name>Plan</name><rtept lat="60.2" lon="24.8"/></rte>
  <trk><name>bus-12</name><trkseg>
    <trkpt lat="60.170001" lon="24.940001"><time>2024-01-06T08:00:00Z</time></trkpt>
    <trkpt lat="60.170002" lon="24.940002"></trkpt>
  </trkseg></trk>
</gpx>
""")
    record = ingest(database_url, [path])
    assert record.status == "success" and record.counts["invalid_rows"] == 3
    assert record.extra["problems"] == [
        f"{path}:3: <wpt> has no <time>: a marked place, not a recorded position",
        f"{path}:4: <rtept> has no <time>: a planned route's point, not a recorded position",
        f"{path}:7: <trkpt> has no <time>"]
    assert stored(conn) == [("bus-12", datetime(2024, 1, 6, 8, tzinfo=UTC), 60.170001,
                             24.940001)]
    strict = ingest(database_url, [path], strict=True)
    assert strict.status == "failed" and strict.error == (
        f"3 invalid row(s) (--strict): nothing loaded; first: {path}:3: <wpt> has no <time>: "
        "a marked place, not a recorded position")


def test_gpx_points_of_one_line_are_told_apart_in_problems(
        tmp_path: Path, database_url: str) -> None:
    # A GPX written without line breaks: every problem named line 1, whichever of thousands
    # of points it was. Such points also name their track, segment and number.
    path = tmp_path / "oneline.gpx"
    path.write_text('<gpx version="1.1" xmlns="http://www.topografix.com/GPX/1/1">'
                    '<wpt lat="60.1" lon="24.9"/><trk><name>van</name><trkseg>'
                    '<trkpt lat="60.1" lon="24.9"><time>2024-01-06T08:00:00Z</time></trkpt>'
                    '</trkseg><trkseg><trkpt lat="60.1" lon="24.9"><time>2024-01-06T08:00:01Z'
                    '</time></trkpt><trkpt lat="91" lon="24.9"><time>2024-01-06T08:00:02Z'
                    '</time></trkpt></trkseg></trk>\n'
                    '<trk><trkseg><trkpt lat="60.1" lon="24.9"></trkpt></trkseg></trk></gpx>\n')
    record = ingest(database_url, [path])
    assert record.counts["rows_loaded"] == 2
    assert record.extra["problems"] == [
        f"{path}:1 (waypoint 1): <wpt> has no <time>: a marked place, not a recorded position",
        f"{path}:1 (track 1, segment 2, point 2): latitude 91 out of range (-90..90)",
        f"{path}:2: <trkpt> has no <time>"]


def test_a_date_and_a_time_of_day_in_two_columns_are_one_time(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    # GPSBabel's unicsv, i-gotU and Qstarz loggers write the date and the time of day in two
    # columns: the "Time" column alone was taken, and every row refused as "unparseable time
    # '08:00:00'", the file rejected without a word about its date column.
    path = tmp_path / "unicsv.csv"
    path.write_text("No,Latitude,Longitude,Name,Altitude,Date,Time\n"
                    "1,60.170001,24.940001,,12.0,2024/01/06,08:00:00\n"
                    "2,60.170002,24.940002,,12.0,2024-01-06,08:00:01.5\n")
    record = ingest(database_url, [path], device_id="logger", strict=True)
    assert record.status == "success", record.error
    assert stored(conn) == [
        ("logger", datetime(2024, 1, 6, 8, tzinfo=UTC), 60.170001, 24.940001),
        ("logger", datetime(2024, 1, 6, 8, 0, 1, 500000, tzinfo=UTC), 60.170002, 24.940002)]
    # A time column that holds a whole time is taken as it is, a date column beside it or not.
    whole = tmp_path / "whole.csv"
    whole.write_text("device,date,time,lat,lon\n"
                     "van,2024-01-07,2024-01-06T09:00:00Z,60.1,24.9\n")
    assert ingest(database_url, [whole], strict=True).status == "success"
    assert stored(conn)[-1] == ("van", datetime(2024, 1, 6, 9, tzinfo=UTC), 60.1, 24.9)


def test_a_gpx_with_blank_lines_before_its_xml_declaration(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    # A web export that printed a line break before the declaration: refused as "malformed
    # GPX: XML or text declaration not at start of entity", a file every point of which was
    # good. Lines are still counted from the file's first.
    path = tmp_path / "web.gpx"
    path.write_bytes(b"\xef\xbb\xbf\r\n\n  <?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                     b"<gpx version=\"1.1\"><trk><name>van</name><trkseg>\n"
                     b"<trkpt lat=\"60.170001\" lon=\"24.940001\"><time>2024-01-06T08:00:00Z"
                     b"</time></trkpt>\n<trkpt lat=\"91\" lon=\"24.9\"><time>2024-01-06T08:00:01Z"
                     b"</time></trkpt></trkseg></trk></gpx>\n")
    record = ingest(database_url, [path])
    assert record.status == "success", record.error
    assert record.extra["problems"] == [f"{path}:6: latitude 91 out of range (-90..90)"]
    assert stored(conn) == [("van", datetime(2024, 1, 6, 8, tzinfo=UTC), 60.170001, 24.940001)]
    broken = tmp_path / "broken.gpx"
    broken.write_text("\n\n<?xml version=\"1.0\"?>\n<gpx><trk>\n</gpx>\n")
    failed = ingest(database_url, [broken])
    assert failed.error == (f"{broken}: line 5: malformed GPX: mismatched tag; "
                            "nothing loaded")


def test_google_location_history_is_refused_as_not_geojson(
        tmp_path: Path, database_url: str) -> None:
    # Google Takeout's Records.json holds {"locations": [...]} as Overland's batches do, but
    # of its own objects: each was "not a Feature with a geometry", as if the file were
    # GeoJSON with bad rows.
    path = tmp_path / "Records.json"
    path.write_text(json.dumps({"locations": [
        {"latitudeE7": 601700000, "longitudeE7": 249400000, "timestamp": "2024-01-06T08:00:00Z"},
        {"latitudeE7": 601700010, "longitudeE7": 249400010, "timestamp": "2024-01-06T08:00:01Z"}]}))
    record = ingest(database_url, [path])
    assert record.status == "failed" and record.error == (
        f"{path}: line 1: expected a GeoJSON FeatureCollection or Feature, found an object "
        "whose locations are not GeoJSON Features (Google's location history?); "
        f"{READ_FORMATS}; nothing loaded")


def test_headers_with_units_load_and_a_unit_that_changes_the_meaning_is_refused(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    # "Latitude (deg)", "Time (GMT)": "header lacks column(s) recorded_at, latitude, longitude"
    # for a file that names them all.
    units = tmp_path / "units.csv"
    units.write_text("device,Time (GMT),Latitude (deg),Longitude (deg),Speed (km/h)\n"
                     "u1,2024-01-06T10:00:00,60.17,24.94,12\n")
    brackets = tmp_path / "brackets.csv"
    brackets.write_text('"Device";"Time (UTC)";"lat [°]";"lon [°]"\n'
                        "u2;2024-01-06 10:00:01;60,17;24,94\n")
    record = ingest(database_url, [units, brackets], strict=True)
    assert record.status == "success", record.error
    assert stored(conn) == [("u1", datetime(2024, 1, 6, 10, tzinfo=UTC), 60.17, 24.94),
                            ("u2", datetime(2024, 1, 6, 10, 0, 1, tzinfo=UTC), 60.17, 24.94)]
    radians = tmp_path / "radians.csv"
    radians.write_text("device,time,Latitude (rad),Longitude (deg)\nu3,2024-01-06T10:00:02Z,"
                       "1.0502,24.94\n")
    refused = ingest(database_url, [radians])
    assert refused.status == "failed" and refused.exit_code == 1
    assert refused.error == (
        f"{radians}: line 1: header lacks column(s) latitude ('Latitude (rad)': unit 'rad' is "
        "not one ingest-gps reads for latitude: decimal degrees, north positive); "
        "nothing loaded")
    assert count(conn) == 2


def test_hemisphere_columns_give_the_sign(tmp_path: Path, database_url: str,
                                          conn: psycopg.Connection[Any]) -> None:
    # Qstarz's QTravel writes unsigned coordinates and the hemisphere in a column of its own
    # (N/S, E/W): a point in Madrid, 3.69 W, was stored at 3.69 E, with exit 0.
    path = tmp_path / "qstarz.csv"
    path.write_text("INDEX,RCR,DATE,TIME,VALID,LATITUDE,N/S,LONGITUDE,E/W,HEIGHT,SPEED,\n"
                    "1,T,2010/06/11,09:01:13,SPS,40.453932,N,3.688268,W,679.436 M,0.000 km/h,\n"
                    "2,T,2010/06/11,09:01:14,SPS,33.9,S,151.2,E,12 M,0.000 km/h,\n"
                    "3,T,2010/06/11,09:01:15,SPS,33.9,s,151.2,east,12 M,0.000 km/h,\n"
                    "4,T,2010/06/11,09:01:16,SPS,40.45,X,3.69,W,679.436 M,0.000 km/h,\n"
                    "5,T,2010/06/11,09:01:17,SPS,40.45,N,3.69,,679.436 M,0.000 km/h,\n"
                    "6,T,2010/06/11,09:01:18,SPS,-40.45,S,3.69,W,679.436 M,0.000 km/h,\n"
                    "7,T,2010/06/11,09:01:19,SPS,40.45,N,-3.69,E,679.436 M,0.000 km/h,\n")
    semi = tmp_path / "semi.csv"  # with decimal commas
    semi.write_text("time;lat;Lat Dir;lon;GPSLongitudeRef\n2010-06-11T09:01:19Z;40,45;N;3,69;W\n")
    record = ingest(database_url, [path, semi], device_id="q")
    assert record.status == "success", record.error
    assert record.extra["problems"] == [
        f"{path}:5: hemisphere 'X' is not N or S",
        f"{path}:6: hemisphere '' is not E or W",
        f"{path}:7: latitude '-40.45' is signed beside its hemisphere 'S'",
        f"{path}:8: longitude '-3.69' is signed beside its hemisphere 'E'"]
    assert [r[2:] for r in stored(conn)] == [(40.453932, -3.688268), (-33.9, 151.2),
                                             (-33.9, 151.2), (40.45, -3.69)]
    strict = ingest(database_url, [path], device_id="r", strict=True)
    assert strict.status == "failed" and "--strict" in (strict.error or "")
    assert count(conn) == 4


def test_a_title_line_above_the_header_is_skipped_not_read_as_the_first_row(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    # "GPS export 2024" above a lon,lat header was read as the first row: the file went in the
    # default column order, its header became a bad row, and every point was stored with its
    # latitude and longitude swapped, exit 0.
    path = tmp_path / "titled.csv"
    path.write_text("GPS export 2024\n\n\"Tracker: van, 3\"\ndevice,time,lon,lat\n"
                    "t,2024-01-06T10:00:00Z,24.94,60.17\n")
    record = ingest(database_url, [path], strict=True)
    assert record.status == "success", record.error
    assert stored(conn) == [("t", datetime(2024, 1, 6, 10, tzinfo=UTC), 60.17, 24.94)]
    # A file in a separator ingest-gps does not split at is one cell a line: still refused.
    pipes = tmp_path / "pipes.csv"
    pipes.write_text("".join(f"p|2024-01-06T10:00:{s:02d}Z|60.17|24.94\n" for s in range(30)))
    refused = ingest(database_url, [pipes])
    assert refused.status == "failed" and refused.error is not None
    assert refused.error == (f"{pipes}: none of its 30 row(s) is valid (first: line 1: "
                             "expected 4 fields, got 1); nothing loaded")
    # The start of a quoted field that goes on past the line end is a bad row, not a title.
    spans = tmp_path / "spans.csv"
    spans.write_text('"a\nb",2024-01-06T10:00:00Z,60.17,24.94\ns,2024-01-06T10:00:01Z,60.17,24.94\n')
    record = ingest(database_url, [spans])
    assert record.status == "success" and record.counts["invalid_rows"] == 2, record.error
    assert record.extra["problems"][0].startswith(f"{spans}:1: unbalanced quotes")
    few = tmp_path / "few.csv"  # as few lines as a title may have: not a file without rows
    few.write_text("p|2024-01-06T10:00:00Z|60.17|24.94\np|2024-01-06T10:00:01Z|60.17|24.94\n")
    refused = ingest(database_url, [few])
    assert refused.status == "failed" and refused.error == (
        f"{few}: none of its 2 row(s) is valid (first: line 1: expected 4 fields, got 1); "
        "nothing loaded")
    assert count(conn) == 2


def test_dates_written_day_first_with_dots_are_read(
        tmp_path: Path, database_url: str, conn: psycopg.Connection[Any]) -> None:
    # German, Nordic and Russian tools write 06.01.2024 (the day first: no country writes the
    # month first with dots); every row was refused as an unparseable time.
    path = tmp_path / "fahrtenbuch.csv"
    path.write_text("device;time;lat;lon\n"
                    "bus;06.01.2024 08:00:00;60,17;24,94\n"
                    "bus;6.1.2024 8:00:05;60,171;24,941\n")
    record = ingest(database_url, [path], strict=True)
    assert record.status == "success", record.error
    split = tmp_path / "split.csv"
    split.write_text("device,date,time,lat,lon\n"
                     "van,31.12.2023,23:59:59.5,60.1,24.9\n")
    assert ingest(database_url, [split], strict=True).status == "success"
    assert stored(conn) == [
        ("bus", datetime(2024, 1, 6, 8, tzinfo=UTC), 60.17, 24.94),
        ("bus", datetime(2024, 1, 6, 8, 0, 5, tzinfo=UTC), 60.171, 24.941),
        ("van", datetime(2023, 12, 31, 23, 59, 59, 500000, tzinfo=UTC), 60.1, 24.9)]
    # A day its month has not, or a year of two digits, is refused quoting the file's text.
    bad = tmp_path / "bad.csv"
    bad.write_text("device,time,lat,lon\nbus,31.02.2024 08:00,60.1,24.9\n"
                   "bus,06.01.24 08:00,60.1,24.9\nbus,07.01.2024 08:00,60.1,24.9\n")
    record = ingest(database_url, [bad])
    assert record.counts["invalid_rows"] == 2 and record.counts["rows_loaded"] == 1
    assert record.extra["problems"] == [f"{bad}:2: unparseable time '31.02.2024 08:00'",
                                        f"{bad}:3: unparseable time '06.01.24 08:00'"]
