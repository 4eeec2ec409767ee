"""GPS file readers: CSV (ISO and epoch), GPX, GeoJSON; invalid rows carry their line."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline_cli.gps import files as gpsfiles
from pipeline_cli.gps.files import GpsFileError, GpsRow, RowProblem


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def rows(items: list[GpsRow | RowProblem]) -> list[GpsRow]:
    return [i for i in items if isinstance(i, GpsRow)]


def problems(items: list[GpsRow | RowProblem]) -> list[RowProblem]:
    return [i for i in items if isinstance(i, RowProblem)]


def test_csv_iso_and_epoch_with_header(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "device_id,recorded_at,latitude,longitude\n"
                 "bus-1,2024-05-01T08:00:00Z,60.17,24.94\n"
                 "bus-1,1714550401,60.171,24.941\n"
                 "bus-1,2024-05-01 08:00:02+03:00,60.172,24.942\n")
    got = rows(list(gpsfiles.read(path)))
    assert [r.recorded_at for r in got] == [
        datetime(2024, 5, 1, 8, 0, 0, tzinfo=UTC), datetime(2024, 5, 1, 8, 0, 1, tzinfo=UTC),
        datetime(2024, 5, 1, 5, 0, 2, tzinfo=UTC)]
    assert [r.line for r in got] == [2, 3, 4]
    assert got[0] == GpsRow("bus-1", got[0].recorded_at, 60.17, 24.94, 2)


def test_csv_header_in_another_order_and_without_header(tmp_path: Path) -> None:
    reordered = write(tmp_path, "b.csv", "lat,lon,time,device\n60.1,24.9,1714550400,d\n")
    assert rows(list(gpsfiles.read(reordered)))[0].device_id == "d"
    bare = write(tmp_path, "c.csv", "d,1714550400,60.1,24.9\n")
    assert rows(list(gpsfiles.read(bare)))[0].latitude == 60.1


def test_csv_invalid_rows_name_their_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.csv", "device_id,recorded_at,latitude,longitude\n"
                 "d,2024-05-01T08:00:00Z,NaN,24.9\n"
                 "d,2024-05-01T08:00:01Z,91,24.9\n"
                 "d,yesterday,60.1,24.9\n"
                 "d,2024-05-01T08:00:03Z,60.1\n"
                 "\n"
                 ",2024-05-01T08:00:04Z,60.1,24.9\n"
                 "d,1714550400000,60.1,24.9\n"
                 "d,2024-05-01T08:00:05Z,60.1,-181\n"
                 "d,2024-05-01T08:00:06Z,60.1,24.9\n")
    items = list(gpsfiles.read(path))
    assert [r.line for r in rows(items)] == [10]
    found = {p.line: p.message for p in problems(items)}
    assert sorted(found) == [2, 3, 4, 5, 7, 8, 9]
    assert "latitude" in found[2] and "out of range" in found[3]
    assert "unparseable time" in found[4] and "fields" in found[5]
    assert "device_id" in found[7]
    assert "milliseconds" in found[8] and "longitude" in found[9]
    assert problems(items)[0].describe("bad.csv").startswith("bad.csv:2: ")


def test_csv_header_missing_a_column_is_a_file_error(tmp_path: Path) -> None:
    path = write(tmp_path, "h.csv", "device_id,recorded_at,latitude\n")
    with pytest.raises(GpsFileError, match="longitude"):
        list(gpsfiles.read(path))


def test_gpx_track_points_with_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "ride.gpx", """<?xml version="1.0" encoding="UTF-8"?>
<gpx version="1.1" creator="t" xmlns="http://www.topografix.com/GPX/1/1">
  <trk>
    <name>van-7</name>
    <trkseg>
      <trkpt lat="60.17" lon="24.94"><ele>3</ele><time>2024-05-01T08:00:00Z</time></trkpt>
      <trkpt lat="60.171" lon="24.941"><time>2024-05-01T08:00:02Z</time></trkpt>
      <trkpt lat="95" lon="24.941"><time>2024-05-01T08:00:04Z</time></trkpt>
      <trkpt lat="60.172" lon="24.942"></trkpt>
    </trkseg>
  </trk>
</gpx>
""")
    items = list(gpsfiles.read(path))
    assert [(r.device_id, r.line) for r in rows(items)] == [("van-7", 6), ("van-7", 7)]
    assert [p.line for p in problems(items)] == [8, 9]
    assert rows(list(gpsfiles.read(path, device_id="other")))[0].device_id == "other"


def test_gpx_malformed_is_a_file_error_with_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.gpx", "<gpx>\n<trk>\n<trkpt lat='1' lon='2'>\n</gpx>\n")
    with pytest.raises(GpsFileError, match="line 4"):
        list(gpsfiles.read(path))


def test_geojson_points_and_linestring(tmp_path: Path) -> None:
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"device_id": "p1", "time": "2024-05-01T08:00:00Z"},
         "geometry": {"type": "Point", "coordinates": [24.94, 60.17]}},
        {"type": "Feature", "properties": {"device_id": "p1", "time": 1714550402},
         "geometry": {"type": "Point", "coordinates": [24.941, 60.171]}},
        {"type": "Feature", "properties": {"device": "l1", "coordinateProperties": {
            "times": ["2024-05-01T08:00:00Z", "2024-05-01T08:00:02Z", "bad"]}},
         "geometry": {"type": "LineString",
                      "coordinates": [[24.94, 60.17], [24.941, 60.171, 5.0], [24.942, 60.172]]}},
        {"type": "Feature", "properties": {"times": [1714550400]},
         "geometry": {"type": "LineString", "coordinates": [[24.94, 60.17], [24.95, 60.18]]}},
    ]}
    path = write(tmp_path, "t.geojson", json.dumps(doc, indent=1))
    items = list(gpsfiles.read(path))
    got = rows(items)
    assert [(r.device_id, r.longitude) for r in got] == [
        ("p1", 24.94), ("p1", 24.941), ("l1", 24.94), ("l1", 24.941)]
    bad = problems(items)
    assert [p.where for p in bad] == ["feature 3, coordinate 3", "feature 4"]
    text = path.read_text()
    # Line numbers point at the feature in the file.
    assert text.splitlines()[bad[1].line - 1].strip() == "{"
    assert bad[0].line < bad[1].line


def test_geojson_malformed_json(tmp_path: Path) -> None:
    path = write(tmp_path, "x.geojson", '{"type": "FeatureCollection",\n "features": [,]}')
    with pytest.raises(GpsFileError, match="line 2"):
        list(gpsfiles.read(path))


def test_unknown_suffix_needs_format(tmp_path: Path) -> None:
    path = write(tmp_path, "points.dat", "d,1714550400,60.1,24.9\n")
    with pytest.raises(GpsFileError, match="--format"):
        list(gpsfiles.read(path))
    assert len(rows(list(gpsfiles.read(path, "csv")))) == 1


def test_device_ids_are_kept_literally(tmp_path: Path) -> None:
    evil = "x'); DROP TABLE gps_points; --"
    path = write(tmp_path, "e.csv", f'"{evil}",1714550400,60.1,24.9\n')
    assert rows(list(gpsfiles.read(path)))[0].device_id == evil
