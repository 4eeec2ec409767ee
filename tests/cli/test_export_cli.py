"""`pipeline export geojson`: polylines that decode to the stored ones, stops in a box, and the
edges of a built graph, as RFC 7946 FeatureCollections."""

from __future__ import annotations

import io
import json
import math
import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline_cli import polyline
from pipeline_cli.errors import PipelineError
from pipeline_cli.export import BBox, write_collection
from tests.support.clirunner import Cli
from tests.support.graph_fixtures import add_dataset, add_generation, seed_network

Conn = psycopg.Connection[dict[str, Any]]
pytestmark = pytest.mark.s3
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def cli(run_cli: Cli, full_env: dict[str, str]) -> Cli:
    run_cli.env.update(full_env)
    return run_cli


def collection(text: str) -> list[dict[str, Any]]:
    obj = json.loads(text)
    assert obj["type"] == "FeatureCollection"
    return list(obj["features"])


def add_polylines(conn: Conn) -> list[dict[str, Any]]:
    rows = []
    for i, device in enumerate(["bus-1", "bus-1", "bus-2"]):
        # Helsinki: latitude 60, longitude 24, so a lat/lon swap cannot go unnoticed
        points = [(60.17 + i * 0.01 + k * 0.001, 24.94 + k * 0.002) for k in range(5 + i)]
        rows.append(conn.execute(
            "INSERT INTO cached_polylines (device_id, start_time, end_time, encoded_polyline, "
            "osrm_confidence, point_count, source_coordinates_count, batch_id) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, gen_random_uuid()) RETURNING *",
            (device, T0 + timedelta(hours=i), T0 + timedelta(hours=i, minutes=30),
             polyline.encode(points), 0.5 + i / 10, len(points), len(points) + 1)).fetchone())
    return rows


def test_polylines_one_feature_each_decoding_to_the_stored_polyline(cli: Cli, conn: Conn
                                                                    ) -> None:
    stored = {r["id"]: r for r in add_polylines(conn)}
    result = cli("export", "geojson", "polylines")
    assert result.exit_code == 0, result.output
    features = collection(result.stdout)
    assert sorted(f["properties"]["id"] for f in features) == sorted(stored)
    for f in features:
        row = stored[f["properties"]["id"]]
        assert f["geometry"]["type"] == "LineString"
        lon, lat = f["geometry"]["coordinates"][0]
        assert 24 < lon < 25 and 60 < lat < 61  # RFC 7946: longitude first
        assert polyline.encode([(la, lo) for lo, la in f["geometry"]["coordinates"]]) == (
            row["encoded_polyline"])
        p = f["properties"]
        assert p["device"] == row["device_id"] and p["point_count"] == row["point_count"]
        assert p["confidence"] == row["osrm_confidence"]
        assert p["batch_id"] == str(row["batch_id"])
        assert datetime.fromisoformat(p["start_time"]) == row["start_time"]
        assert datetime.fromisoformat(p["end_time"]) == row["end_time"]


def test_polylines_filters_and_atomic_output_file(cli: Cli, conn: Conn, tmp_path: Path) -> None:
    add_polylines(conn)
    out = tmp_path / "lines.geojson"
    result = cli("export", "geojson", "polylines", "--device", "bus-1",
                 "--since", (T0 + timedelta(minutes=45)).isoformat(), "--output", str(out))
    assert result.exit_code == 0 and result.stdout == ""
    features = collection(out.read_text())
    assert [f["properties"]["device"] for f in features] == ["bus-1"]
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left
    bad = cli("export", "geojson", "polylines", "--until", "yesterday", "--output", str(out))
    assert bad.exit_code == 2 and "malformed --until" in bad.stderr


def test_since_after_until_is_a_usage_error_not_an_empty_export(run_cli: Cli) -> None:
    # Swapped dates exported an empty collection with exit 0: "no polylines that day?"
    result = run_cli("export", "geojson", "polylines", "--since", "2026-12-02",
                     "--until", "2026-12-01T23:00:00+00:00")
    assert result.exit_code == 2
    assert "--since '2026-12-02' is after --until '2026-12-01T23:00:00+00:00'" in result.stderr
    assert result.stdout == ""


def test_failed_export_leaves_no_file(cli: Cli, tmp_path: Path) -> None:
    cli.env["PIPELINE_REDIS_PREFIX"] = "nothing-here"
    out = tmp_path / "graph.geojson"
    result = cli("export", "geojson", "graph", "--output", str(out))
    assert result.exit_code == 1 and "no active graph" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failure_known_at_the_start_writes_nothing_to_stdout(cli: Cli) -> None:
    # `... | gzip > graph.geojson.gz` was left with an opened collection.
    cli.env["PIPELINE_REDIS_PREFIX"] = "nothing-here"
    result = cli("export", "geojson", "graph")
    assert result.exit_code == 1 and "no active graph" in result.stderr
    assert result.stdout == ""


def test_a_full_disk_on_stdout_is_one_line_not_a_traceback(cli: Cli, conn: Conn) -> None:
    # `pipeline export geojson stops > /dev/full`: an OSError traceback, where every other
    # command says "cannot write the output" (the stream was named `out`, not `file`).
    add_dataset(conn)
    with open("/dev/full", "w") as full:
        proc = cli.subprocess("export", "geojson", "stops", stdout=full, stderr=-1)
    assert (proc.returncode, proc.stderr) == (
        1, "pipeline: cannot write the output: No space left on device\n")


def test_output_dash_is_stdout(cli: Cli, conn: Conn, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`-o - | jq` exited 0 with nothing on stdout: the export went to a file named "-"
    (found by tests/reliability/test_fuzz_cli.py)."""
    add_polylines(conn)
    monkeypatch.chdir(tmp_path)
    result = cli("export", "geojson", "polylines", "-o", "-")
    assert result.exit_code == 0, result.output
    assert len(collection(result.stdout)) == 3
    assert not (tmp_path / "-").exists()


def test_output_files_as_operators_name_them(cli: Cli, conn: Conn, tmp_path: Path) -> None:
    add_polylines(conn)
    export = ("export", "geojson", "polylines", "--output")
    # A missing folder was a traceback.
    missing = cli(*export, str(tmp_path / "no" / "x.geojson"))
    assert missing.exit_code == 1 and "Traceback" not in missing.stderr
    assert f"cannot write {tmp_path / 'no' / 'x.geojson'}: No such file or directory" in \
        missing.stderr
    # A symlink stays one, its target gets the export; an existing file keeps its mode (it
    # was 0600, whatever it had been).
    target = tmp_path / "real.geojson"
    target.write_text("old")
    target.chmod(0o644)
    link = tmp_path / "link.geojson"
    link.symlink_to(target)
    assert cli(*export, str(link)).exit_code == 0
    assert link.is_symlink() and len(collection(target.read_text())) == 3
    assert target.stat().st_mode & 0o777 == 0o644
    # A FIFO is written to, not replaced by a file.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    assert cli(*export, str(fifo)).exit_code == 0
    reader.join(10)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and len(collection(got[0])) == 3


def test_stops_with_bbox_and_virtual(cli: Cli, conn: Conn) -> None:
    net = seed_network(conn)
    every = collection(cli("export", "geojson", "stops").stdout)
    assert len(every) == len(net.real_stops)
    box = "24.2,60.2,24.8,60.8"
    inside = collection(cli("export", "geojson", "stops", "--bbox", box).stdout)
    expected = {f["properties"]["id"] for f in every
                if BBox.parse(box).contains(*f["geometry"]["coordinates"])}
    assert 0 < len(inside) < len(every)
    assert {f["properties"]["id"] for f in inside} == expected
    proc = cli.subprocess("export", "geojson", "stops", "--bbox", box)  # the installed script
    assert proc.returncode == 0 and collection(proc.stdout) == inside
    virtual = collection(cli("export", "geojson", "stops", "--virtual").stdout)
    assert len(virtual) == len(net.virtual_stops)
    assert {f["properties"]["kind"] for f in virtual} == {"MAIN_GRID"}
    # A new active dataset that gen-virtual has not reached (it failed on it): the older
    # dataset's virtual stops were exported beside the new real ones.
    conn.execute("UPDATE datasets SET active = false")
    conn.execute("INSERT INTO datasets (version, seq, hash, backup_prefix, active)"
                 " VALUES ('ds-v9', 9, 'h', 'datasets/ds-v9/', true)")
    assert collection(cli("export", "geojson", "stops", "--virtual").stdout) == []
    for bad in ("1,2,3", "a,b,c,d", "0,80,10,70", "200,0,10,10"):
        result = cli("export", "geojson", "stops", "--bbox", bad)
        assert result.exit_code == 2 and "malformed --bbox" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_bbox_across_the_antimeridian() -> None:
    box = BBox.parse("170,-20,-170,20")
    assert box.contains(175, 0) and box.contains(-175, 0)
    assert not box.contains(0, 0) and not box.contains(175, 30)


def test_a_box_that_ends_at_the_antimeridian_holds_the_points_on_it(cli: Cli, conn: Conn
                                                                   ) -> None:
    # 180 and -180 are one meridian, and gen-virtual's grid points on it are at -180: a box
    # of Fiji's west half, 170..180, left them out (and a box -180..-170 the stops at 180).
    version = add_dataset(conn)
    for sid, lon in {"E180": 180.0, "W180": -180.0, "E179": 179.5, "W179": -179.5}.items():
        conn.execute("INSERT INTO stops (id, name, latitude, longitude) VALUES (%s, %s, -17, %s)",
                     (sid, sid, lon))
    conn.execute("INSERT INTO virtual_stops (id, latitude, longitude, kind, dataset_version) "
                 "VALUES ('V:MAIN:-38:-400', -17.1, -180.0, 'MAIN_GRID', %s)", (version,))
    boxes = {"170,-20,180,20": {"E180", "W180", "E179"},
             "-180,-20,-170,20": {"E180", "W180", "W179"},
             "179.5,-20,-179.5,20": {"E180", "W180", "E179", "W179"}}
    for box, expected in boxes.items():
        got = collection(cli("export", "geojson", "stops", "--bbox", box).stdout)
        assert {f["properties"]["id"] for f in got} == expected, box
        assert {sid for sid, lon in (("E180", 180), ("W180", -180), ("E179", 179.5),
                                     ("W179", -179.5)) if BBox.parse(box).contains(lon, -17)
                } == expected, box  # the graph's edges are kept by BBox.contains
    west = collection(cli("export", "geojson", "stops", "--virtual", "--bbox",
                          "170,-20,180,20").stdout)
    assert [f["properties"]["id"] for f in west] == ["V:MAIN:-38:-400"]


def test_graph_edges_after_build_graph(cli: Cli, conn: Conn) -> None:
    net = seed_network(conn)
    built = json.loads(cli("build-graph", "--json").stdout)
    features = collection(cli("export", "geojson", "graph").stdout)
    assert len(features) == built["edges"]
    coords = {r["id"]: [round(r["longitude"], 6), round(r["latitude"], 6)] for r in conn.execute(
        "SELECT id, longitude, latitude FROM stops UNION ALL "
        "SELECT id, longitude, latitude FROM virtual_stops")}
    pairs = {(a, b) for _, a, b, *_ in net.routes} | {(a, b) for _, a, b, *_ in
                                                      net.virtual_routes}
    for f in features:
        p = f["properties"]
        assert (p["from"], p["to"]) in pairs and p["version"] == built["graph_version"]
        assert f["geometry"]["coordinates"] == [coords[p["from"]], coords[p["to"]]]
        assert p["weight"] > 0 and p["mode"]
    named = collection(cli("export", "geojson", "graph", "--version",
                           built["graph_version"]).stdout)
    assert named == features
    box = BBox.parse("24.0,60.0,24.5,60.5")
    boxed = collection(cli("export", "geojson", "graph", "--bbox", "24.0,60.0,24.5,60.5").stdout)
    assert boxed == [f for f in features if any(box.contains(*c) for c in
                                                f["geometry"]["coordinates"])]
    assert 0 < len(boxed) < len(features)
    gone = cli("export", "geojson", "graph", "--version", "graph-v99")
    assert gone.exit_code == 1 and "graph-v99" in gone.stderr
    # Stops the graph has and the read model no longer has (a graph of an older dataset):
    # their edges were left out in silence.
    victim = net.routes[0][2]
    lost = sum(1 for f in features if victim in (f["properties"]["from"],
                                                 f["properties"]["to"]))
    conn.execute("DELETE FROM flights WHERE route_id IN"
                 " (SELECT id FROM routes WHERE %s IN (from_stop_id, to_stop_id))", (victim,))
    conn.execute("DELETE FROM routes WHERE %s IN (from_stop_id, to_stop_id)", (victim,))
    conn.execute("DELETE FROM stops WHERE id = %s", (victim,))
    partial = cli("export", "geojson", "graph")
    assert len(collection(partial.stdout)) == len(features) - lost
    assert "edge(s) to stops not in the active dataset left out" in partial.stderr


def test_an_unmigrated_database_exits_78(cli: Cli, empty_database_url: str) -> None:
    # It was exit 1, 'relation "cached_polylines" does not exist'.
    cli.env["PIPELINE_DATABASE_URL"] = empty_database_url
    result = cli("export", "geojson", "polylines")
    assert result.exit_code == 78 and "pipeline db migrate" in result.stderr
    assert result.stdout == ""


def test_a_line_across_the_antimeridian_is_cut_there(cli: Cli, conn: Conn) -> None:
    # A ferry's matched track in Fiji: drawn as written it spanned the whole map.
    points = [(-17.0, 179.9), (-17.2, -179.9), (-17.3, -179.8)]
    conn.execute(
        "INSERT INTO cached_polylines (device_id, start_time, end_time, encoded_polyline, "
        "osrm_confidence, point_count, source_coordinates_count, batch_id) "
        "VALUES ('ferry', %s, %s, %s, 0.9, 3, 3, gen_random_uuid())",
        (T0, T0 + timedelta(hours=1), polyline.encode(points)))
    [feature] = collection(cli("export", "geojson", "polylines").stdout)
    assert feature["geometry"] == {"type": "MultiLineString", "coordinates": [
        [[179.9, -17.0], [180.0, -17.1]], [[-180.0, -17.1], [-179.9, -17.2], [-179.8, -17.3]]]}


def test_a_point_on_the_antimeridian_is_drawn_on_the_side_it_is_reached_from(
        cli: Cli, conn: Conn) -> None:
    # gen-virtual puts grid points at longitude -180.0, and stops may sit at 180.0: a line to
    # one from the other side got a part of zero length, [[-180, lat], [-180, lat]].
    tracks = {
        "through": [(-16.9, 179.8), (-17.0, -180.0), (-17.1, -179.8)],
        "from-it": [(63.4, -180.0), (63.4, 178.99)],
        "to-it": [(71.0, 179.5), (70.6, -180.0)],
        "along-it": [(10.0, 180.0), (11.0, -180.0)],
    }
    for i, (device, points) in enumerate(tracks.items()):
        conn.execute(
            "INSERT INTO cached_polylines (device_id, start_time, end_time, encoded_polyline, "
            "osrm_confidence, point_count, source_coordinates_count, batch_id) "
            "VALUES (%s, %s, %s, %s, 0.9, %s, %s, gen_random_uuid())",
            (device, T0 + timedelta(hours=i), T0 + timedelta(hours=i, minutes=30),
             polyline.encode(points), len(points), len(points)))
    got = {f["properties"]["device"]: f["geometry"]
           for f in collection(cli("export", "geojson", "polylines").stdout)}
    assert got == {
        "through": {"type": "MultiLineString", "coordinates": [
            [[179.8, -16.9], [180.0, -17.0]], [[-180.0, -17.0], [-179.8, -17.1]]]},
        "from-it": {"type": "LineString", "coordinates": [[180.0, 63.4], [178.99, 63.4]]},
        "to-it": {"type": "LineString", "coordinates": [[179.5, 71.0], [180.0, 70.6]]},
        "along-it": {"type": "LineString", "coordinates": [[180.0, 10.0], [180.0, 11.0]]},
    }


def test_a_graph_of_another_dataset_says_whose_positions_it_is_drawn_at(
        cli: Cli, conn: Conn) -> None:
    # After a rollback to a graph of an older dataset, the export drew it at the active
    # dataset's stops and said nothing unless an edge had lost its stop.
    net = seed_network(conn)
    assert cli("build-graph").exit_code == 0
    add_dataset(conn, "ds-v2", seq=2)
    moved = net.real_stops[0]
    conn.execute("UPDATE stops SET latitude = latitude + 1 WHERE id = %s", (moved,))
    conn.execute("UPDATE virtual_stops SET dataset_version = 'ds-v2'")
    conn.execute("UPDATE virtual_routes SET dataset_version = 'ds-v2'")
    generation = add_generation(conn, "ds-v2")
    assert cli("build-graph").exit_code == 0
    assert cli("graph", "activate", "graph-v1").exit_code == 0
    result = cli("export", "geojson", "graph")
    assert result.exit_code == 0 and collection(result.stdout)
    assert ("graph-v1 was built from dataset ds-v1, virtual generation "
            f"{net.generation_id}; it is drawn at the stops of dataset ds-v2, virtual "
            f"generation {generation} (stops that moved since are drawn where they are now)"
            ) in result.stderr
    current = cli("export", "geojson", "graph", "--version", "graph-v2")
    assert current.exit_code == 0 and "was built from" not in current.stderr


def test_coordinates_have_at_most_six_decimals(cli: Cli, conn: Conn) -> None:
    # RFC 7946 11.2: 6 decimals are about 10 cm. A stop stored at full double precision and
    # the point where a line is cut at the antimeridian were written with 15 to 17 digits.
    version = add_dataset(conn)
    conn.execute("INSERT INTO stops (id, name, latitude, longitude) VALUES "
                 "('P', 'P', 60.123456789012345, 24.98765432109876), "
                 "('E', 'E', -17.0, 179.93), ('W', 'W', -17.7, -179.81)")
    conn.execute("INSERT INTO routes (id, from_stop_id, to_stop_id, mode, distance_km) "
                 "VALUES ('R1', 'E', 'W', 'ferry', 30)")
    conn.execute("INSERT INTO virtual_stops (id, latitude, longitude, kind, dataset_version) "
                 "VALUES ('V:1', 60.5, 24.5, 'MAIN_GRID', %s)", (version,))
    add_generation(conn, version)
    [p] = [f for f in collection(cli("export", "geojson", "stops").stdout)
           if f["properties"]["id"] == "P"]
    assert p["geometry"]["coordinates"] == [24.987654, 60.123457]
    assert cli("build-graph").exit_code == 0
    [edge] = collection(cli("export", "geojson", "graph").stdout)
    cut = -17.0 + (-17.7 + 17.0) * 0.07 / 0.26
    assert edge["geometry"] == {"type": "MultiLineString", "coordinates": [
        [[179.93, -17.0], [180.0, round(cut, 6)]], [[-180.0, round(cut, 6)], [-179.81, -17.7]]]}


def test_a_weight_that_is_not_a_number_never_reaches_the_document(
        cli: Cli, conn: Conn, redis_url: str, redis_prefix: str) -> None:
    # json.dumps wrote NaN and Infinity as they are: no JSON parser reads the document. A
    # graph in Redis holds whatever was written there (by hand, by an older release).
    import redis

    net = seed_network(conn)
    assert cli("build-graph").exit_code == 0
    stop = net.routes[0][1]
    redis.Redis.from_url(redis_url).set(f"{redis_prefix}:graph:graph-v1:adj:{stop}",
                                        '[["S001", NaN, "R000", "bus"]]')
    for args in (("export", "geojson", "graph"), ("graph", "neighbors", stop, "--json"),
                 ("graph", "route", stop, "S001")):
        result = cli(*args)
        assert result.exit_code == 1, args
        said = result.stderr or json.loads(result.stdout)["error"]  # --json: on stdout
        assert "NaN" not in result.stdout and len(said.strip().splitlines()) == 1, args
        assert (f"graph version graph-v1 is damaged: the edges of stop '{stop}' are not "
                "[[to, weight_s, route_id, mode], ...] with finite weights >= 0") in said


def test_a_polyline_of_one_point_or_none_is_still_valid_geojson(cli: Cli, conn: Conn) -> None:
    # RFC 7946 3.1.4: a LineString has two or more positions. A cached polyline of one point
    # (a device that stood still) or none ('') was written as [[lon, lat]] or [], which
    # geojson.io and QGIS refuse: the one point is a line of length 0, and no point no
    # geometry (null, 3.2).
    for i, points in enumerate(([(60.17, 24.94)], [])):
        conn.execute(
            "INSERT INTO cached_polylines (device_id, start_time, end_time, encoded_polyline, "
            "osrm_confidence, point_count, source_coordinates_count, batch_id) "
            "VALUES (%s, %s, %s, %s, 0.9, 1, 1, gen_random_uuid())",
            (f"d{i}", T0, T0 + timedelta(minutes=5), polyline.encode(points)))
    got = {f["properties"]["device"]: f["geometry"]
           for f in collection(cli("export", "geojson", "polylines").stdout)}
    assert got == {"d0": {"type": "LineString", "coordinates": [[24.94, 60.17], [24.94, 60.17]]},
                   "d1": None}


def _peak_rss_kib(cli: Cli, *args: str) -> int:
    """The peak RSS of the installed `pipeline` running ``args``, its output read and dropped."""
    proc = cli.popen(*args)
    assert proc.stdout is not None and proc.stderr is not None
    while proc.stdout.read(1 << 20):
        pass
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return usage.ru_maxrss


def test_a_large_export_streams_and_a_reader_that_leaves_ends_it_quietly(
        cli: Cli, conn: Conn) -> None:
    # Memory stays flat with the table's size: 200 000 stops (about 30 MB of GeoJSON) peak
    # within a few MB of 2 000. And `| head -c 100` ends it as every command: exit 1, silent.
    add_dataset(conn)
    peaks = []
    for n in (2_000, 200_000):
        conn.execute("TRUNCATE stops CASCADE")
        conn.execute("INSERT INTO stops (id, name, latitude, longitude) SELECT 'S' || g, "
                     "'stop ' || g, random() * 180 - 90, random() * 360 - 180 "
                     "FROM generate_series(1, %s) g", (n,))
        peaks.append(_peak_rss_kib(cli, "export", "geojson", "stops"))
    assert peaks[1] - peaks[0] < 16 * 1024, peaks
    proc = cli.popen("export", "geojson", "stops")
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(100)) == 100
    proc.stdout.close()
    assert proc.wait(60) == 1 and proc.stderr.read() == ""
    proc.stderr.close()


def test_a_cached_polyline_off_the_globe_is_a_one_line_error(cli: Cli, conn: Conn) -> None:
    # A polyline's characters decode to any number: one written by another tool (or precision
    # 6 read as 5) gave longitude 241.9 and latitude 171.0, written to the map as they were.
    conn.execute(
        "INSERT INTO cached_polylines (id, device_id, start_time, end_time, encoded_polyline, "
        "osrm_confidence, point_count, source_coordinates_count, batch_id) "
        "VALUES (7, 'd', %s, %s, %s, 0.9, 2, 2, gen_random_uuid())",
        (T0, T0 + timedelta(minutes=5), polyline.encode([(60.17, 24.94), (171.0, 241.9)])))
    result = cli("export", "geojson", "polylines")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == ("pipeline export geojson polylines: error: cached polyline 7 is "
                             "malformed: point 2 (171.0, 241.9) is not a latitude and longitude"
                             "\n")


def test_the_writer_refuses_a_number_json_cannot_hold() -> None:
    # The last guard behind the checks of PostgreSQL and the graph's reader: json.dumps wrote
    # NaN as it is, and the document was no JSON any more.
    out = io.StringIO()
    features = [{"type": "Feature", "geometry": None, "properties": {"id": "a", "w": 1.0}},
                {"type": "Feature", "geometry": None, "properties": {"id": "b", "w": math.inf}}]
    with pytest.raises(PipelineError, match=r"^feature 2 \(properties \{'id': 'b', 'w': inf\}\) "
                                            r"holds a number JSON cannot hold"):
        write_collection(features, out)
    assert "Infinity" not in out.getvalue()
