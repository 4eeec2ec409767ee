"""GPS file readers: GPX, GeoJSON and the CSV header; invalid rows carry their line.

CSV rows are split and checked by PostgreSQL: tests/stages/test_ingest_gps.py."""

from __future__ import annotations

import json
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
    # The fields go to PostgreSQL as text and are checked there (lat 95 too); a point without
    # a time is no point at all.
    assert [(r.device_id, r.latitude, r.line) for r in rows(items)] == [
        ("van-7", "60.17", 6), ("van-7", "60.171", 7), ("van-7", "95", 8)]
    assert [(p.line, p.message) for p in problems(items)] == [(9, "<trkpt> has no <time>")]
    assert rows(list(gpsfiles.read(path, device_id="other")))[0].device_id == "other"


def test_gpx_extension_times_are_not_the_points_time(tmp_path: Path) -> None:
    # An <e:time> inside <extensions> replaced the point's own <time>: 'unparseable time'.
    path = write(tmp_path, "ext.gpx", """<gpx xmlns:e="urn:x"><trk><trkseg>
<trkpt lat="60.17" lon="24.94"><time>2024-05-01T08:00:00Z</time>
<extensions><e:time>junk</e:time></extensions></trkpt>
<trkpt lat="60.17" lon="24.94"><extensions><e:time>2024-05-01T08:00:02Z</e:time></extensions>
</trkpt></trkseg></trk></gpx>
""")
    items = list(gpsfiles.read(path))
    assert [r.recorded_at for r in rows(items)] == ["2024-05-01T08:00:00Z"]
    assert [p.message for p in problems(items)] == ["<trkpt> has no <time>"]


def test_gpx_malformed_is_a_file_error_with_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.gpx", "<gpx>\n<trk>\n<trkpt lat='1' lon='2'>\n</gpx>\n")
    with pytest.raises(GpsFileError, match="line 4"):
        list(gpsfiles.read(path))


def test_gpx_not_utf8_without_its_encoding_declared_says_so(tmp_path: Path) -> None:
    # A Windows tool's GPX in windows-1252 without saying so: refused as "malformed GPX: not
    # well-formed (invalid token)", which sent the operator looking for a broken tag.
    path = tmp_path / "bus.gpx"
    path.write_bytes(b'<?xml version="1.0"?>\n<gpx version="1.1"><trk>\n<name>M\xfcller</name>'
                     b'<trkseg><trkpt lat="60.1" lon="24.9"><time>2024-05-01T08:00:00Z</time>'
                     b'</trkpt></trkseg></trk></gpx>\n')
    with pytest.raises(GpsFileError, match=r"^line 3: not UTF-8 text \(save it as UTF-8, or "
                       r"name its encoding in the XML declaration: encoding=\"windows-1252\"\)$"):
        list(gpsfiles.read(path))
    declared = tmp_path / "declared.gpx"
    declared.write_bytes(path.read_bytes().replace(b'"1.0"?', b'"1.0" encoding="windows-1252"?'))
    assert [item.device_id for item in gpsfiles.read(declared)] == ["M\xfcller"]


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
    assert [(r.device_id, r.recorded_at, r.longitude, r.where) for r in got] == [
        ("p1", "2024-05-01T08:00:00Z", "24.94", "feature 1"),
        ("p1", "1714550402", "24.941", "feature 2"),
        ("l1", "2024-05-01T08:00:00Z", "24.94", "feature 3, coordinate 1"),
        ("l1", "2024-05-01T08:00:02Z", "24.941", "feature 3, coordinate 2"),
        ("l1", "bad", "24.942", "feature 3, coordinate 3")]  # refused by the SQL checks
    bad = problems(items)
    assert [p.where for p in bad] == ["feature 4"]
    text = path.read_text()
    # Line numbers point at the feature in the file.
    assert text.splitlines()[bad[0].line - 1].strip() == "{"
    assert got[-1].line < bad[0].line


def test_geojson_multilinestring_of_a_track_in_segments(tmp_path: Path) -> None:
    """A GPX track of several segments, as togeojson writes it: one times array per line."""
    doc = {"type": "Feature", "properties": {"name": "van", "coordTimes": [
        ["2024-05-01T08:00:00Z", "2024-05-01T08:00:01Z"], ["2024-05-01T08:05:00Z"]]},
        "geometry": {"type": "MultiLineString", "coordinates": [
            [[24.94, 60.17], [24.941, 60.171]], [[24.95, 60.18]]]}}
    items = list(gpsfiles.read(write(tmp_path, "van.geojson", json.dumps(doc)), device_id="v"))
    assert [(r.device_id, r.recorded_at, r.latitude, r.where) for r in rows(items)] == [
        ("v", "2024-05-01T08:00:00Z", "60.17", "feature 1, segment 1, coordinate 1"),
        ("v", "2024-05-01T08:00:01Z", "60.171", "feature 1, segment 1, coordinate 2"),
        ("v", "2024-05-01T08:05:00Z", "60.18", "feature 1, segment 2, coordinate 1")]
    doc["properties"]["coordTimes"] = ["2024-05-01T08:00:00Z"]  # not one array per segment
    items = list(gpsfiles.read(write(tmp_path, "odd.geojson", json.dumps(doc))))
    assert [p.message for p in problems(items)] == [
        "MultiLineString needs coordinates and a times array per segment"]


def test_geojson_values_of_other_json_types_become_text(tmp_path: Path) -> None:
    doc = {"type": "Feature", "properties": {"device_id": 42, "time": True},
           "geometry": {"type": "Point", "coordinates": [[1], None]}}
    items = list(gpsfiles.read(write(tmp_path, "odd.geojson", json.dumps(doc))))
    assert items == [GpsRow("42", "true", None, "[1]", line=1, where="feature 1")]
    doc["properties"] = {"device_id": "a\u0000b", "time": 1}
    items = list(gpsfiles.read(write(tmp_path, "nul.geojson", json.dumps(doc))))
    assert items == [RowProblem(1, "device_id contains a NUL character", "feature 1")]
    # A null device is none: the file's name (or --device) stands in, as when it is absent.
    doc["properties"] = {"device_id": None, "time": 1}
    items = list(gpsfiles.read(write(tmp_path, "van-9.geojson", json.dumps(doc))))
    assert [i.device_id for i in items if isinstance(i, GpsRow)] == ["van-9"]
    # So is an empty one (Overland's device_id until one is set): every point was refused as
    # "device_id is empty", and --device could not stand in for it.
    doc["properties"] = {"device_id": "", "device": " ", "time": 1}
    items = list(gpsfiles.read(write(tmp_path, "van-9.geojson", json.dumps(doc)),
                               device_id="van-10"))
    assert [i.device_id for i in items if isinstance(i, GpsRow)] == ["van-10"]


def test_a_device_id_is_text_or_a_whole_number(tmp_path: Path) -> None:
    # 12.0 was stored as device "12.0" (the listener's is "12"), true as "true".
    feature = {"type": "Feature", "properties": {"device_id": 12.0, "time": 1714550400},
               "geometry": {"type": "Point", "coordinates": [24.9, 60.1]}}
    doc = {"type": "FeatureCollection", "features": [
        feature, {**feature, "properties": {"device_id": True, "time": 1714550400}},
        {**feature, "properties": {"device_id": 12.5, "time": 1714550400}}]}
    items = list(gpsfiles.read(write(tmp_path, "ids.geojson", json.dumps(doc))))
    assert [r.device_id for r in rows(items)] == ["12"]
    assert [p.message for p in problems(items)] == [
        "device_id true is not text or a whole number",
        "device_id 12.5 is not text or a whole number"]


def test_a_pipe_names_no_device(tmp_path: Path) -> None:
    """<(cat bus.gpx) is /dev/fd/63: its points were stored as device "63" (and /dev/stdin's
    as "stdin"), a second device beside the same track loaded from the file."""
    import os
    import threading
    gpx = ('<gpx version="1.1" xmlns="http://www.topografix.com/GPX/1/1"><trk><trkseg>'
           '<trkpt lat="60.17" lon="24.94"><time>2024-05-01T08:00:00Z</time></trkpt>'
           '</trkseg></trk></gpx>')
    fifo = tmp_path / "63"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=(gpx,))
    writer.start()
    items = list(gpsfiles.read(fifo, fmt="gpx"))
    writer.join()
    assert items == [RowProblem(1, "no device id: read from a pipe, the file has no name to "
                                   "take it from (--device)")]
    writer = threading.Thread(target=fifo.write_text, args=(gpx,))
    writer.start()
    assert [r.device_id for r in rows(list(gpsfiles.read(fifo, fmt="gpx", device_id="bus")))
            ] == ["bus"]
    writer.join()


def test_geojson_malformed_json(tmp_path: Path) -> None:
    path = write(tmp_path, "x.geojson", '{"type": "FeatureCollection",\n "features": [,]}')
    with pytest.raises(GpsFileError, match="line 2"):
        list(gpsfiles.read(path))


def test_geojson_nested_too_deeply(tmp_path: Path) -> None:
    path = write(tmp_path, "x.geojson", '{"type": "Feature", "properties": {"x": '
                 + "[" * 100_000 + "]" * 100_000 + "}}")
    with pytest.raises(GpsFileError, match="JSON nested too deeply to read"):
        list(gpsfiles.read(path))


def test_unknown_suffix_needs_format(tmp_path: Path) -> None:
    path = write(tmp_path, "points.dat", "d,1714550400,60.1,24.9\n")
    with pytest.raises(GpsFileError, match="--format"):
        list(gpsfiles.read(path))
    # "use --format" alone sent the operator of a KML, NMEA or FIT file looking for a format
    # option that does not exist: the message names the formats read.
    with pytest.raises(GpsFileError, match=r"^cannot tell the format from the name "
                       r"'track.kml': ingest-gps reads CSV \(.csv, .tsv, .txt\), GPX \(.gpx\) and "
                       r"GeoJSON \(.geojson, .json; .geojsonl, .geojsons: one Feature a line\), "
                       r"each also gzipped \(.gz\); --format names the format of such a file "
                       "under another name"):
        gpsfiles.detect_format("track.kml")
    assert gpsfiles.detect_format(path, "csv") == "csv"
    assert gpsfiles.detect_format("a.TSV") == "csv" and gpsfiles.detect_format("b.gpx.gz") == "gpx"


def test_csv_layout_from_the_first_line() -> None:
    """A header names the columns in any order (names compared without case, spaces or
    punctuation) and picks the delimiter; data lines take the delimiter they hold most of."""
    layout = gpsfiles.csv_layout("lat,lon,time,device", 1)
    assert layout == gpsfiles.CsvLayout(",", {"latitude": 0, "longitude": 1,
                                              "recorded_at": 2, "device_id": 3}, 1)
    assert gpsfiles.csv_layout("Device ID;Timestamp (UTC);Lat.;Lon.", 3).delimiter == ";"
    assert gpsfiles.csv_layout("Device ID;Time UTC;Lat.;Lon.", 3).columns == {
        "device_id": 0, "recorded_at": 1, "latitude": 2, "longitude": 3}
    assert gpsfiles.csv_layout("vehicle\tgps_time\tlatitude\tlong", 1).delimiter == "\t"
    data = gpsfiles.csv_layout("d,1714550400,60.1,24.9", 1)
    assert data.header_line == 0 and data.delimiter == ","
    assert data.columns == {c: i for i, c in enumerate(gpsfiles.CSV_COLUMNS)}
    assert gpsfiles.csv_layout("d;1714550400;60,1;24,9", 1).delimiter == ";"
    with pytest.raises(GpsFileError, match="line 2: header lacks column.s. longitude"):
        gpsfiles.csv_layout("device_id,recorded_at,latitude", 2)
    with pytest.raises(GpsFileError, match="device_id .--device"):
        gpsfiles.csv_layout("time,lat,lon", 1)
    assert "device_id" not in gpsfiles.csv_layout("time,lat,lon", 1, device_given=True).columns


def test_xml_that_is_not_gpx_is_refused_not_read_as_empty(tmp_path: Path) -> None:
    # A KML track given with --format gpx (or named .gpx) had no <trkpt>: a noop, exit 0,
    # every point of its <gx:Track> left behind in silence.
    path = write(tmp_path, "track.gpx", """<?xml version="1.0" encoding="UTF-8"?>
<kml xmlns="http://www.opengis.net/kml/2.2" xmlns:gx="http://www.google.com/kml/ext/2.2">
<Document><Placemark><gx:Track><when>2024-01-06T10:00:00Z</when>
<gx:coord>24.94 60.17 12</gx:coord></gx:Track></Placemark></Document></kml>
""")
    with pytest.raises(GpsFileError, match=r"^line 2: not GPX: its root element is <kml>; "
                       "ingest-gps reads CSV .*, GPX .* and GeoJSON"):
        list(gpsfiles.read(path))
    # A namespace prefix on the root is still GPX.
    gpx = write(tmp_path, "p.gpx", '<g:gpx xmlns:g="http://www.topografix.com/GPX/1/1"><g:wpt '
                'lat="60.17" lon="24.94"><g:time>2024-01-06T10:00:00Z</g:time></g:wpt></g:gpx>')
    assert [r.latitude for r in rows(list(gpsfiles.read(gpx)))] == ["60.17"]


def test_overland_locations_are_geojson_features(tmp_path: Path) -> None:
    # Overland posts and exports {"locations": [Feature, ...]}: GeoJSON Points under another
    # key. It was refused as "expected a GeoJSON FeatureCollection or Feature".
    path = write(tmp_path, "overland.json", """{"locations": [
 {"type": "Feature", "geometry": {"type": "Point", "coordinates": [24.94, 60.17]},
  "properties": {"timestamp": "2024-01-06T10:00:00Z", "device_id": "x", "speed": 0}},
 {"type": "Feature", "geometry": {"type": "Point", "coordinates": [24.941, 60.171]},
  "properties": {"timestamp": "2024-01-06T10:00:05Z"}}
]}
""")
    items = list(gpsfiles.read(path))
    assert [(r.device_id, r.recorded_at, r.latitude, r.line, r.where) for r in rows(items)] == [
        ("x", "2024-01-06T10:00:00Z", "60.17", 2, "feature 1"),
        ("overland", "2024-01-06T10:00:05Z", "60.171", 4, "feature 2")]
    assert problems(items) == []


def test_json_that_is_not_geojson_says_what_it_found(tmp_path: Path) -> None:
    # OwnTracks writes one JSON object a line: "line 2: malformed JSON: Extra data" did not
    # say the file is of a format ingest-gps does not read.
    lines = write(tmp_path, "owntracks.json",
                  '{"_type":"location","lat":60.17,"lon":24.94,"tid":"ab","tst":1704535200}\n'
                  '{"_type":"location","lat":60.18,"lon":24.95,"tid":"ab","tst":1704535205}\n')
    with pytest.raises(GpsFileError, match=r"^line 2: a second JSON value after the first "
                       r"\(JSON Lines\?\): not GeoJSON; ingest-gps reads CSV .*"):
        list(gpsfiles.read(lines))
    one = write(tmp_path, "one.json", '{"_type":"location","lat":60.17,"lon":24.94}')
    with pytest.raises(GpsFileError, match=r"^line 1: expected a GeoJSON FeatureCollection or "
                       r"Feature, found an object of _type 'location'; ingest-gps reads CSV"):
        list(gpsfiles.read(one))
    array = write(tmp_path, "array.json", '[{"_type":"location"}]')
    with pytest.raises(GpsFileError, match="found an array;"):
        list(gpsfiles.read(array))


def test_nmea_sentences_are_refused_as_nmea() -> None:
    # A logger's .txt of NMEA read as rows of device "$GPRMC" at epoch 100000: every row "a
    # date written YYYYMMDD?", which sent the operator looking at dates.
    with pytest.raises(GpsFileError, match=r"^line 3: NMEA sentences \(\$GPRMC\), not CSV; "
                       "ingest-gps reads CSV .*GPX"):
        gpsfiles.csv_layout("$GPRMC,100000,A,6010.200,N,02456.400,E,000.0,090.0,060124,,,A*6A",
                            3)
    assert gpsfiles.csv_layout("$bus,1714550400,60.1,24.9", 1).header_line == 0
    assert gpsfiles.csv_layout("$FLEET,1714550400,60.1,24.9", 1).header_line == 0


@pytest.mark.parametrize(("first", "found"), [
    ('<?xml version="1.0" encoding="UTF-8"?>', "XML"), ("<gpx>", "XML"),
    ("{", "JSON"), ('{"type": "FeatureCollection",', "JSON"), ('[{"_type":"location"}]', "JSON")])
def test_xml_or_json_read_as_csv_is_named(first: str, found: str) -> None:
    # A GPX file saved as .txt, or --format csv on a GeoJSON file: each line was a row
    # "expected 4 fields, got 1", a hundred of them listed.
    with pytest.raises(GpsFileError, match=rf"^line 2: {found}, not CSV; ingest-gps reads"):
        gpsfiles.csv_layout(first, 2)
    # A device written as a braced GUID is no JSON.
    assert gpsfiles.csv_layout("{6F9619FF-8B86},1714550400,60.1,24.9", 1).header_line == 0


def test_geojson_in_utf16_without_its_mark_is_named(tmp_path: Path) -> None:
    path = tmp_path / "u.geojson"
    path.write_bytes('{"type": "FeatureCollection", "features": []}'.encode("utf-16-le"))
    with pytest.raises(GpsFileError, match="^UTF-16 text without a byte-order mark: save it"):
        list(gpsfiles.read(path))
    path.write_bytes(b"\xff\xfe\x00\xd8")  # a lone surrogate: starts as UTF-16, is not
    with pytest.raises(GpsFileError, match="^not UTF-16 text, though it starts as UTF-16"):
        list(gpsfiles.read(path))


def test_geojson_text_sequences_one_feature_a_line(tmp_path: Path) -> None:
    # ogr2ogr's GeoJSONSeq (RFC 8142, each Feature after an RS) and newline-delimited GeoJSON
    # were refused as "malformed JSON": Features, one a line.
    feature = {"type": "Feature", "properties": {"device_id": "s", "time": "2024-01-06T10:00:00Z"},
               "geometry": {"type": "Point", "coordinates": [24.94, 60.17]}}
    later = {**feature, "properties": {"device_id": "s", "time": "2024-01-06T10:00:05Z"}}
    for name, sep in [("rs.geojsons", "\x1e"), ("nl.geojsonl", ""), ("nl.geojson", "")]:
        path = write(tmp_path, name, f"{sep}{json.dumps(feature)}\n\n{sep}{json.dumps(later)}\n")
        items = list(gpsfiles.read(path))
        assert [(r.recorded_at, r.line, r.where) for r in rows(items)] == [
            ("2024-01-06T10:00:00Z", 1, "feature 1"), ("2024-01-06T10:00:05Z", 3, "feature 2")]
    # A line that is no Feature: the file is no sequence of them.
    path = write(tmp_path, "mixed.geojsonl", json.dumps(feature) + '\n{"_type": "location"}\n')
    with pytest.raises(GpsFileError, match="^line 2: a second JSON value"):
        list(gpsfiles.read(path))


def test_geojson_not_utf8_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "latin.geojson"
    path.write_bytes('{"type": "Feature", "properties": {"device": "Gerät"}}'.encode("latin-1"))
    with pytest.raises(GpsFileError, match=r"^not UTF-8 text \(save it as UTF-8\)$"):
        list(gpsfiles.read(path))


@pytest.mark.parametrize(("header", "columns"), [
    ("device,Time (GMT),Latitude (deg),Longitude (deg),Speed (km/h)",
     {"device_id": 0, "recorded_at": 1, "latitude": 2, "longitude": 3}),
    ('"Device","Time (UTC)","lat [°]","lon [°]"',
     {"device_id": 0, "recorded_at": 1, "latitude": 2, "longitude": 3}),
    ("Device;Timestamp [Z];Latitude (degrees_north);Longitude (degrees_east)",
     {"device_id": 0, "recorded_at": 1, "latitude": 2, "longitude": 3}),
    ("Device\tLatitude(WGS84)\tLongitude(WGS84)\tTime (local)\tTime (UTC+00:00)",
     {"device_id": 0, "latitude": 1, "longitude": 2, "recorded_at": 4}),
    ("Time (UTC);Lat (deg, WGS84);Lon (deg., WGS 84);Unit ID",
     {"recorded_at": 0, "latitude": 1, "longitude": 2, "device_id": 3}),
    ("lat (decimal),lon (Decimal Degrees),date (UTC),time (UTC),imei",
     {"latitude": 0, "longitude": 1, "date": 2, "recorded_at": 3, "device_id": 4}),
    # a device's "unit" is the kind of id; "Device (name)" stays device_name, below an id
    ("Device (name),Vehicle (IMEI),Time,Lat,Lon",
     {"device_id": 1, "recorded_at": 2, "latitude": 3, "longitude": 4}),
])
def test_a_unit_that_keeps_the_meaning_is_the_plain_name(header: str,
                                                         columns: dict[str, int]) -> None:
    # "Latitude (deg)" and "Time (GMT)" were no column at all: "header lacks column(s)
    # recorded_at, latitude, longitude" for a file that names all of them.
    assert gpsfiles.csv_layout(header, 1).columns == columns


def test_a_unit_in_the_time_column_ranks_it_as_utc() -> None:
    # Beside a plain "Time" (a logger's local time), "Time (GMT)" is the UTC one, as time_utc.
    assert gpsfiles.csv_layout("device,Time,Time (GMT),lat,lon", 1).columns["recorded_at"] == 2


@pytest.mark.parametrize(("header", "message"), [
    ("device,Time (local),Latitude,Longitude",
     r"^line 1: header lacks column\(s\) recorded_at \('Time \(local\)': unit 'local' is not "
     r"one ingest-gps reads for recorded_at: UTC, an ISO-8601 offset or epoch seconds\)$"),
    ("device,Time,Latitude (rad),Longitude (rad)",
     r"^line 1: header lacks column\(s\) latitude, longitude \('Latitude \(rad\)': unit 'rad' "
     r"is not one ingest-gps reads for latitude: decimal degrees, north positive; "
     r"'Longitude \(rad\)': unit 'rad' is not one ingest-gps reads for longitude: decimal "
     r"degrees, east positive\)$"),
    ("device,Time (ms),lat,lon", r"^line 1: header lacks column\(s\) recorded_at \('Time "
     r"\(ms\)': unit 'ms' is not one"),
    ("device,time,Latitude [°S],Longitude [°W]", r"'Latitude \[°S\]': unit '°S' is not one"),
    ("device,Time (UTC+2),lat,lon", r"'Time \(UTC\+2\)': unit 'UTC\+2' is not one"),
    # A unit written into the name (an app's timestamp_ms, Google's timestampMs): the
    # message named no column of a header that has one.
    ("device_id,timestamp_ms,lat,lon", r"^line 1: header lacks column\(s\) recorded_at "
     r"\('timestamp_ms': unit 'ms' is not one ingest-gps reads for recorded_at: UTC, an "
     r"ISO-8601 offset or epoch seconds\)$"),
    ("device,timestampMs,lat,lon", r"'timestampMs': unit 'Ms' is not one"),
])
def test_a_unit_that_changes_the_meaning_is_refused_by_name(header: str, message: str) -> None:
    # Read as the plain name, radians or a local time would load wrong points with exit 0;
    # refused, the message named no column of a header that has one.
    with pytest.raises(GpsFileError, match=message):
        gpsfiles.csv_layout(header, 1)
