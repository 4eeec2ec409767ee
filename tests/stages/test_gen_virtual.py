"""gen-virtual against real PostgreSQL and S3: grids, thresholds, determinism, noop, backup,
edge cases (0 and 1 stops, no dataset, antimeridian at latitude 70) and the backup-failure path."""

from __future__ import annotations

import gzip
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psycopg
import pytest

from devtools.services import S3Endpoint
from pipeline_cli import geo
from pipeline_cli.adapters.backups import BackupStore
from pipeline_cli.db import Database
from pipeline_cli.runner import RunRecord, StageRunner
from pipeline_cli.settings import VirtualSettings
from pipeline_cli.stages import gen_virtual
from pipeline_cli.stages.gen_virtual import generate, status_section
from tests.support.proxy import TcpProxy

Conn = psycopg.Connection[dict[str, Any]]
Stop = tuple[str, float, float, bool, str | None]


def add_dataset(conn: Conn, stops: list[Stop], version: str = "ds-v1") -> None:
    """An active dataset row plus its stops, as sync-odata would leave them."""
    seq = int(version.rsplit("v", 1)[1])
    conn.execute("UPDATE datasets SET active = false WHERE active")
    conn.execute(
        "INSERT INTO datasets (version, seq, hash, backup_prefix, active) "
        "VALUES (%s, %s, %s, %s, true)", (version, seq, f"hash-{version}", f"datasets/{version}/"))
    conn.execute("DELETE FROM stops")
    with conn.cursor() as cur, cur.copy(
        "COPY stops (id, latitude, longitude, is_airport, city) FROM STDIN"
    ) as copy:
        for row in stops:
            copy.write_row(row)


def helsinki_stops() -> list[Stop]:
    """A city of 40 stops, an airport, and 60 scattered stops without a city."""
    rng = np.random.default_rng(42)
    stops: list[Stop] = []
    for i in range(40):
        stops.append((f"hki-{i:03d}", 60.17 + rng.normal(0, 0.03), 24.94 + rng.normal(0, 0.06),
                      False, "Helsinki"))
    stops.append(("HEL", 60.3172, 24.9633, True, "Vantaa"))
    for i in range(60):
        stops.append((f"rural-{i:03d}", float(rng.uniform(60.4, 61.6)),
                      float(rng.uniform(22.0, 28.0)), False, None))
    return stops


def antimeridian_stops() -> list[Stop]:
    """Stops at latitude ~70 on both sides of 180 degrees, one of them an airport."""
    stops: list[Stop] = [("AIR", 70.0, 179.95, True, "Dateline")]
    for i, lon in enumerate(np.linspace(178.5, 181.5, 16).tolist()):
        stops.append((f"am-{i:02d}", 69.6 + 0.05 * i, float((lon + 180) % 360 - 180), False,
                      "Dateline"))
    return stops


@pytest.fixture
def backups(s3: S3Endpoint, s3_bucket: str) -> BackupStore:
    return BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                               secure=s3.secure, region=s3.region)


@pytest.fixture
def run(database_url: str, backups: BackupStore
        ) -> Iterator[Callable[..., RunRecord]]:
    def _run(settings: VirtualSettings | None = None, *, force: bool = False,
             store: BackupStore | None = None) -> RunRecord:
        s = settings or VirtualSettings(city_min_stops=10)
        return StageRunner(Database(database_url)).run(
            "gen-virtual", lambda ctx: generate(Database(database_url), store or backups, s, ctx,
                                                force=force))

    yield _run


def table_rows(conn: Conn) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    for table in ("virtual_stops", "virtual_routes", "virtual_flights"):
        with conn.cursor(row_factory=psycopg.rows.tuple_row) as cur:
            out[table] = cur.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()  # noqa: S608
    return out


def count(conn: Conn, sql: str) -> int:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return int(next(iter(row.values())))


def test_generates_all_kinds_records_and_backs_up(conn: Conn, run: Callable[..., RunRecord],
                                                  backups: BackupStore) -> None:
    add_dataset(conn, helsinki_stops())
    rec = run()
    assert rec.status == "success", rec.error
    by_kind = rec.counts["by_kind"]
    assert all(by_kind[k] > 0 for k in ("MAIN_GRID", "CITY_GRID", "AIRPORT_GRID")), by_kind
    assert rec.counts["virtual_stops"] == sum(by_kind.values()) == count(
        conn, "SELECT count(*) FROM virtual_stops")
    assert rec.counts["virtual_routes"] == count(conn, "SELECT count(*) FROM virtual_routes")
    assert rec.counts["virtual_flights"] == count(conn, "SELECT count(*) FROM virtual_flights")
    kinds = {r["kind"]: r["n"] for r in conn.execute(
        "SELECT kind, count(*) AS n FROM virtual_stops GROUP BY kind")}
    assert kinds == by_kind
    # anchor_id names the city or airport; the main grid has none.
    anchors = {(r["kind"], r["anchor_id"]) for r in conn.execute(
        "SELECT DISTINCT kind, anchor_id FROM virtual_stops")}
    assert ("CITY_GRID", "Helsinki") in anchors and ("AIRPORT_GRID", "HEL") in anchors
    assert ("MAIN_GRID", None) in anchors
    # One flight per non-walking route, and no flight names a missing route.
    assert rec.counts["virtual_flights"] == count(
        conn, "SELECT count(*) FROM virtual_routes WHERE mode <> 'walk'")
    assert count(conn, """SELECT count(*) FROM virtual_flights f WHERE NOT EXISTS (
        SELECT 1 FROM virtual_routes r WHERE r.id = f.route_id)""") == 0
    # Every route has its reverse; travel time follows the mode's speed.
    assert count(conn, """SELECT count(*) FROM virtual_routes r WHERE NOT EXISTS (
        SELECT 1 FROM virtual_routes b
        WHERE b.from_stop_id = r.to_stop_id AND b.to_stop_id = r.from_stop_id)""") == 0
    for r in conn.execute("SELECT mode, distance_km, travel_time_s FROM virtual_routes"):
        speed = 5.0 if r["mode"] == "walk" else 50.0
        assert r["travel_time_s"] == pytest.approx(r["distance_km"] / speed * 3600, abs=0.06)
        assert 0 < r["distance_km"] <= 75.0
    gen = conn.execute("SELECT * FROM virtual_generations").fetchone()
    assert gen is not None and gen["dataset_version"] == "ds-v1"
    assert gen["settings"]["main_spacing_km"] == 50.0 and gen["counts"] == rec.counts
    assert gen["run_id"] is not None and str(gen["run_id"]) == rec.run_id
    assert gen["unreached_stops"] == sorted(gen["unreached_stops"])
    assert len(gen["unreached_stops"]) == rec.counts["unreached_real_stops"]
    stats = conn.execute("SELECT stats FROM datasets WHERE version = 'ds-v1'").fetchone()
    assert stats is not None and stats["stats"]["virtual"]["generation_id"] == gen["id"]
    assert stats["stats"]["virtual"]["by_kind"] == by_kind
    # S3: three COPY-text files and a manifest under datasets/<version>/virtual/.
    prefix = f"datasets/ds-v1/virtual/gen-{gen['id']}/"
    assert rec.extra["backup_prefix"] == gen["backup_prefix"] == prefix
    assert sorted(backups.list("datasets/ds-v1/virtual/")) == [
        prefix + n for n in ("manifest.json", "virtual_frequencies.tsv.gz",
                             "virtual_routes.tsv.gz", "virtual_stops.tsv.gz")]
    manifest = backups.get_json(prefix + "manifest.json")
    assert manifest["generation_id"] == gen["id"] and manifest["counts"] == rec.counts
    stops_text = gzip.decompress(backups.get_bytes(prefix + "virtual_stops.tsv.gz")).decode()
    assert len(stops_text.splitlines()) == manifest["files"]["virtual_stops.tsv.gz"]["rows"]
    assert len(stops_text.splitlines()) == rec.counts["virtual_stops"]
    # The service is stored (and backed up) once; each virtual route's flight derives from it.
    assert gzip.decompress(backups.get_bytes(prefix + "virtual_frequencies.tsv.gz")) == (
        f"{gen['id']}\tvirtual\t05:00:00\t23:00:00\t1800\t1234567\tds-v1\n".encode())
    assert manifest["files"]["virtual_frequencies.tsv.gz"]["rows"] == 1
    for f in conn.execute("SELECT f.*, r.id AS rid FROM virtual_flights f "
                          "JOIN virtual_routes r ON r.id = f.route_id"):
        assert f["id"] == "VF:" + f["rid"].removeprefix("VR:")
        assert (str(f["start_time"]), str(f["end_time"]), f["headway_s"], f["days_of_week"],
                f["dataset_version"]) == ("05:00:00", "23:00:00", 1800, "1234567", "ds-v1")
    # Every file is in primary-key order (byte order of the ids, which is the order of the
    # C.UTF-8 collation), so the COPY appends to the b-tree indexes.
    for table, rows in table_rows(conn).items():
        if table == "virtual_flights":
            continue
        lines = gzip.decompress(backups.get_bytes(f"{prefix}{table}.tsv.gz")).splitlines()
        ids = [line.split(b"\t", 1)[0] for line in lines]
        assert ids == sorted(ids) == [r[0].encode() for r in rows], table


def test_no_virtual_stop_within_threshold_of_a_real_or_denser_point(
        conn: Conn, run: Callable[..., RunRecord]) -> None:
    stops = helsinki_stops()
    add_dataset(conn, stops)
    assert run().status == "success"
    real = np.array([(s[1], s[2]) for s in stops])
    virt = conn.execute("SELECT kind, latitude, longitude FROM virtual_stops").fetchall()
    spacing = {"MAIN_GRID": 50.0, "CITY_GRID": 10.0, "AIRPORT_GRID": 5.0}
    denser = {"MAIN_GRID": ("CITY_GRID", "AIRPORT_GRID"), "CITY_GRID": ("AIRPORT_GRID",),
              "AIRPORT_GRID": ()}
    pts = {k: np.array([(v["latitude"], v["longitude"]) for v in virt if v["kind"] == k])
           for k in spacing}
    for kind, p in pts.items():
        threshold = 0.2 * spacing[kind]
        d_real = geo.haversine_km(p[:, :1], p[:, 1:], real[None, :, 0], real[None, :, 1])
        assert d_real.min() >= threshold, kind
        for other in denser[kind]:
            q = pts[other]
            d = geo.haversine_km(p[:, :1], p[:, 1:], q[None, :, 0], q[None, :, 1])
            assert d.min() >= threshold, (kind, other)
    # The dense grids stay within their radius of the anchor.
    air = pts["AIRPORT_GRID"]
    assert geo.haversine_km(air[:, 0], air[:, 1], 60.3172, 24.9633).max() <= 15.0 + 1e-6


def test_rerun_is_noop_and_force_gives_identical_rows(
        conn: Conn, run: Callable[..., RunRecord]) -> None:
    add_dataset(conn, helsinki_stops())
    first = run()
    assert first.status == "success"
    before = table_rows(conn)
    again = run()
    assert again.status == "noop" and again.extra["generation_id"] == first.extra[
        "generation_id"]
    assert again.extra["settings_changed"] is False and again.counts == first.counts
    forced = run(force=True)
    assert forced.status == "success"
    assert forced.extra["generation_id"] > first.extra["generation_id"]
    assert table_rows(conn) == before  # same ids, same rows, no leftovers
    assert count(conn, "SELECT count(*) FROM virtual_generations") == 2
    changed = run(VirtualSettings(city_min_stops=10, main_spacing_km=40.0))
    assert changed.status == "noop" and changed.extra["settings_changed"] is True
    assert "--force" in changed.message


def test_new_dataset_replaces_the_previous_generation(
        conn: Conn, run: Callable[..., RunRecord]) -> None:
    add_dataset(conn, helsinki_stops())
    assert run().status == "success"
    add_dataset(conn, antimeridian_stops(), version="ds-v2")
    rec = run()
    assert rec.status == "success" and rec.extra["dataset_version"] == "ds-v2"
    versions = {r["dataset_version"] for r in conn.execute(
        "SELECT DISTINCT dataset_version FROM virtual_stops UNION "
        "SELECT DISTINCT dataset_version FROM virtual_routes UNION "
        "SELECT DISTINCT dataset_version FROM virtual_flights")}
    assert versions == {"ds-v2"}


def test_no_stop_fails_clearly_and_writes_nothing(
        conn: Conn, run: Callable[..., RunRecord], backups: BackupStore) -> None:
    add_dataset(conn, [])
    backups.ensure_bucket()
    rec = run()
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.error is not None and "\n" not in rec.error
    assert "has 0 stops" in rec.error and "nothing was written" in rec.error
    for table in ("virtual_generations", "virtual_stops", "virtual_routes", "virtual_flights"):
        assert count(conn, f"SELECT count(*) FROM {table}") == 0  # noqa: S608
    assert list(backups.list("datasets/")) == []


def test_one_stop_gets_its_coverage(conn: Conn, run: Callable[..., RunRecord]) -> None:
    # A network of one station failed ("needs at least 2 to span a region", a rule of the
    # bounding-box grid), so build-graph was skipped on every run after it.
    add_dataset(conn, [("HEL", 60.3172, 24.9633, True, None)])
    rec = run()
    assert rec.status == "success", rec.error
    assert rec.counts["by_kind"]["MAIN_GRID"] > 0 and rec.counts["by_kind"]["AIRPORT_GRID"] > 0
    assert rec.counts["unreached_real_stops"] == 0
    assert count(conn, "SELECT count(*) FROM virtual_routes WHERE from_stop_id = 'HEL'") > 0


def test_no_active_dataset_is_skipped(conn: Conn, run: Callable[..., RunRecord]) -> None:
    rec = run()
    assert rec.status == "skipped" and rec.exit_code == 0
    assert "no active dataset" in rec.message
    assert count(conn, "SELECT count(*) FROM virtual_generations") == 0


def test_antimeridian_at_latitude_70(conn: Conn, run: Callable[..., RunRecord]) -> None:
    stops = antimeridian_stops()
    add_dataset(conn, stops)
    rec = run(VirtualSettings(city_min_stops=10))
    assert rec.status == "success", rec.error
    assert all(rec.counts["by_kind"][k] > 0 for k in rec.counts["by_kind"]), rec.counts
    virt = conn.execute("SELECT id, latitude, longitude, kind FROM virtual_stops").fetchall()
    lons = np.array([v["longitude"] for v in virt])
    assert (lons > 179).any() and (lons < -179).any()
    # The main grid spans the short way across 180 degrees, not around the world (a ring at
    # latitude 70 holds 274 cells): the reach of 200 km around the stops on both sides.
    main = [v for v in virt if v["kind"] == "MAIN_GRID"]
    assert all(abs(v["longitude"]) > 170 for v in main) and len(main) < 100
    assert any(v["longitude"] > 0 for v in main) and any(v["longitude"] < 0 for v in main)
    # Routes cross the antimeridian with their true, short great-circle length.
    pos = {v["id"]: (v["latitude"], v["longitude"]) for v in virt}
    pos.update({s[0]: (s[1], s[2]) for s in stops})
    crossing = 0
    for r in conn.execute("SELECT from_stop_id, to_stop_id, distance_km FROM virtual_routes"):
        (la1, lo1), (la2, lo2) = pos[r["from_stop_id"]], pos[r["to_stop_id"]]
        assert r["distance_km"] == pytest.approx(geo.haversine_km(la1, lo1, la2, lo2), abs=2e-3)
        crossing += abs(lo1 - lo2) > 180
    assert crossing > 0
    # Grid neighbours at latitude 70 are one spacing apart, measured by haversine.
    city = np.array([(v["latitude"], v["longitude"]) for v in virt if v["kind"] == "CITY_GRID"])
    d = geo.haversine_km(city[:, None, 0], city[:, None, 1], city[None, :, 0], city[None, :, 1])
    np.fill_diagonal(d, np.inf)
    same_row = np.isclose(city[:, None, 0], city[None, :, 0])
    adjacent = d[same_row & (d < 15.0)]
    assert adjacent.size >= len(city) and np.all(np.abs(adjacent / 10.0 - 1) < 0.01)
    assert d.min() >= 10.0 * 0.99  # no two grid points closer than the spacing


def test_fiji_with_stops_on_the_antimeridian_itself(conn: Conn,
                                                    run: Callable[..., RunRecord]) -> None:
    """South of the equator, with stops at 180.0 and -180.0 (one meridian): one grid around
    the islands, routes the short way round."""
    stops: list[Stop] = [("NAN", -17.755, 177.443, True, "Nadi"), ("SUV", -18.14, 178.44, False,
                         None), ("TAV", -16.84, -179.98, False, None), ("E180", -16.9, 180.0,
                         False, None), ("W180", -17.0, -180.0, False, None),
                         ("LAU", -17.6, -179.9, False, None)]
    add_dataset(conn, stops)
    rec = run(VirtualSettings(city_min_stops=10))
    assert rec.status == "success", rec.error
    virt = conn.execute("SELECT id, latitude, longitude FROM virtual_stops").fetchall()
    assert virt and all(abs(v["longitude"]) > 174 for v in virt)
    assert all(-21 < v["latitude"] < -14 for v in virt)
    pos = {v["id"]: (v["latitude"], v["longitude"]) for v in virt}
    pos.update({s[0]: (s[1], s[2]) for s in stops})
    crossing = 0
    for r in conn.execute("SELECT from_stop_id, to_stop_id, distance_km FROM virtual_routes"):
        (la1, lo1), (la2, lo2) = pos[r["from_stop_id"]], pos[r["to_stop_id"]]
        assert r["distance_km"] == pytest.approx(geo.haversine_km(la1, lo1, la2, lo2), abs=2e-3)
        assert 0 < r["distance_km"] <= 75.0
        crossing += abs(lo1 - lo2) > 180
    assert crossing > 0


def two_continent_stops() -> list[Stop]:
    """A network with a region around Paris and one around Sao Paulo, 9,400 km apart."""
    rng = np.random.default_rng(11)
    stops: list[Stop] = []
    for name, (lat, lon) in {"Paris": (48.85, 2.35), "Sao Paulo": (-23.55, -46.63)}.items():
        for i in range(40):
            stops.append((f"{name[:3]}-{i:02d}", lat + rng.normal(0, 0.8),
                          lon + rng.normal(0, 1.2), False, name if i < 20 else None))
    return stops


@pytest.mark.parametrize("reach", [None, 120.0])
def test_two_continents_get_two_main_grids_not_the_ocean_between(
        conn: Conn, run: Callable[..., RunRecord], reach: float | None) -> None:
    stops = two_continent_stops()
    add_dataset(conn, stops)
    # The max_virtual_stops guard counts the grids around the stops too, not the band.
    s = (VirtualSettings(city_min_stops=10, max_virtual_stops=3000) if reach is None
         else VirtualSettings(city_min_stops=10, max_virtual_stops=3000, grid_reach_km=reach))
    reach_km = s.grid_reach_km
    assert reach_km <= 400
    rec = run(s)
    assert rec.status == "success", rec.error
    main = np.array([(v["latitude"], v["longitude"]) for v in conn.execute(
        "SELECT latitude, longitude FROM virtual_stops WHERE kind = 'MAIN_GRID'")])
    assert len(main) == rec.counts["by_kind"]["MAIN_GRID"]
    # Every main grid stop lies within the reach of a real stop: none over the Atlantic.
    real = np.array([(st[1], st[2]) for st in stops])
    km, _ = geo.PointIndex(real[:, 0], real[:, 1]).nearest(main[:, 0], main[:, 1])
    assert km[:, 0].max() <= reach_km + 1e-6
    # Each region gets its own grid, reaching out past its stops...
    europe = geo.haversine_km(main[:, 0], main[:, 1], 48.85, 2.35) < 2000
    brazil = geo.haversine_km(main[:, 0], main[:, 1], -23.55, -46.63) < 2000
    assert np.all(europe ^ brazil)
    assert europe.sum() > 20 and brazil.sum() > 20
    assert km[:, 0].max() > reach_km - s.main_spacing_km
    # ...and the count is at most two discs of the reach around regions a few hundred km
    # across (155 + 222 cells by default), not the 18,566 cells of the band between them.
    disc = np.pi * (reach_km + 250.0) ** 2 / s.main_spacing_km ** 2
    assert len(main) < 2 * disc
    assert rec.counts["virtual_stops"] < 2 * disc + 1000


def test_a_city_name_used_in_two_places_is_two_cities(
        conn: Conn, run: Callable[..., RunRecord]) -> None:
    # One centroid for both put a city grid in the South China Sea, thousands of km from any
    # stop, and build-graph then reported it as a component of its own.
    rng = np.random.default_rng(7)
    stops: list[Stop] = [(f"{place}-{i:02d}", lat + rng.normal(0, 0.02), lon + rng.normal(0, 0.02),
                          False, "Springfield")
                         for place, lat, lon in (("fi", 60.17, 24.94), ("au", -33.87, 151.2))
                         for i in range(12)]
    add_dataset(conn, stops)
    rec = run(VirtualSettings(city_min_stops=10))
    assert rec.status == "success", rec.error
    city = np.array([(v["latitude"], v["longitude"]) for v in conn.execute(
        "SELECT latitude, longitude FROM virtual_stops WHERE kind = 'CITY_GRID'")])
    real = np.array([(st[1], st[2]) for st in stops])
    km, nearest = geo.PointIndex(real[:, 0], real[:, 1]).nearest(city[:, 0], city[:, 1])
    assert km[:, 0].max() < 50
    assert {stops[i][0][:2] for i in nearest[:, 0].tolist()} == {"fi", "au"}


@pytest.mark.parametrize("spellings, where", [
    # 16 stops of one city, its name in three spellings: no spelling had 10 stops, so the
    # city got no grid at all.
    (["Helsinki", "HELSINKI", "helsinki ", "Helsinki"], (60.17, 24.94)),
    # A feed merged from two sources writes 'Zürich' as one code point for ü (NFC) and as u
    # plus a combining diaeresis (NFD, as macOS files do): two names of 8 stops each.
    (["Z\u00fcrich", "Zu\u0308rich"], (47.37, 8.54)),
])
def test_a_city_spelled_several_ways_is_one_city(
        conn: Conn, run: Callable[..., RunRecord], spellings: list[str],
        where: tuple[float, float]) -> None:
    rng = np.random.default_rng(5)
    stops: list[Stop] = [(f"c-{i:02d}", where[0] + rng.normal(0, 0.02),
                          where[1] + rng.normal(0, 0.04), False, spellings[i % len(spellings)])
                         for i in range(16)]
    add_dataset(conn, stops)
    rec = run(VirtualSettings(city_min_stops=10))
    assert rec.status == "success", rec.error
    assert rec.extra["anchors"]["cities"] == 1
    # Named after the spelling of its first stop by id.
    assert {r["anchor_id"] for r in conn.execute(
        "SELECT DISTINCT anchor_id FROM virtual_stops WHERE kind = 'CITY_GRID'")} == {
            spellings[0]}


def test_a_region_name_along_a_coast_is_no_city(
        conn: Conn, run: Callable[..., RunRecord]) -> None:
    # 40 stops named after their region along a 1,200 km arc of coast, a stop every 30 km:
    # chained into one place, they put a city grid around their centroid, inland, 60 km
    # from the nearest of them.
    t = np.linspace(0, np.pi, 40)
    stops: list[Stop] = [(f"no-{i:02d}", 64 + 5 * float(np.sin(x)), 15 + 12 * float(np.cos(x)),
                          False, "Nordland") for i, x in enumerate(t)]
    add_dataset(conn, stops)
    rec = run(VirtualSettings(city_min_stops=10))
    assert rec.status == "success", rec.error
    assert rec.extra["anchors"]["cities"] == 0 and rec.counts["by_kind"]["CITY_GRID"] == 0


@pytest.mark.parametrize("named", [False, True])
def test_stops_of_small_named_places_count_towards_a_dense_cluster(
        conn: Conn, run: Callable[..., RunRecord], named: bool) -> None:
    # 180 stops of a metro area whose city column names 30 suburbs of 6 stops each: no
    # suburb reached city_min_stops, and named stops never joined a density cluster, so the
    # area got no CITY_GRID, while the same stops without a city got one.
    rng = np.random.default_rng(2)
    stops: list[Stop] = [(f"m{m:02d}-{i}", 60.2 + rng.normal(0, 0.04),
                          24.9 + rng.normal(0, 0.08), False, f"Suburb {m}" if named else None)
                         for m in range(30) for i in range(6)]
    add_dataset(conn, stops)
    rec = run(VirtualSettings(city_min_stops=10))
    assert rec.status == "success", rec.error
    assert rec.extra["anchors"] == {"cities": 0, "clusters": 1, "airports": 0}
    assert rec.counts["by_kind"]["CITY_GRID"] > 0


def _run_in_little_memory(code: str) -> str:
    """Run ``code`` in a child under a 1.2 GB address-space limit and return its output: a
    regression that asks for gigabytes fails the test instead of taking the machine down."""
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1_200_000_000, resource.RLIM_INFINITY))

    done = subprocess.run([sys.executable, "-c", code], preexec_fn=limit, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-500:]
    return done.stdout


def test_a_city_column_holding_each_stops_own_name_stays_linear() -> None:
    # `city` may read the stop's name (docs/sync-odata.md): 20,000 stops of a metro, each its
    # own "city", were paired every one with every other within 60 km before the pairs of
    # other names were thrown away: 200 M pairs, a MemoryError or the OOM killer.
    out = _run_in_little_memory("""
import numpy as np
from pipeline_cli.settings import VirtualSettings
from pipeline_cli.stages.gen_virtual import RealStops, major_cities
rng = np.random.default_rng(0)
n = 20_000
lat, lon = 52.5 + rng.normal(0, 0.1, n), 13.4 + rng.normal(0, 0.15, n)
real = RealStops.from_rows([(f"s{i:05d}", float(lat[i]), float(lon[i]), False, f"Stop {i}")
                            for i in range(n)])
print(major_cities(real, VirtualSettings()).size)
""")
    assert int(out) > 0  # the metro is a dense cluster all the same


def test_one_long_stop_id_costs_its_own_length() -> None:
    # Stop ids of up to 2,000 bytes are accepted. Sorting the route ids in a numpy string
    # array gave each of the 48,613 stops the width of that one id: 371 MiB per array, and
    # the run died with a MemoryError (or the OOM killer, on a larger network).
    out = _run_in_little_memory("""
from pipeline_cli.settings import VirtualSettings
from pipeline_cli.stages.gen_virtual import RealStops, plan_virtual
long_id = "S" + "x" * 1999
real = RealStops.from_rows([(long_id, 50.0, 10.0, False, ""), ("T1", 50.1, 10.1, False, "")])
plan = plan_virtual(real, VirtualSettings(main_spacing_km=20.0, grid_reach_km=2500.0,
                                          max_route_km=30.0))
ids = plan.real.ids + plan.ids
route_ids = [f"VR:{ids[f]}>{ids[t]}" for f, t in zip(plan.route_from.tolist(),
                                                      plan.route_to.tolist(), strict=True)]
assert route_ids == sorted(route_ids) and len(set(route_ids)) == len(route_ids)
assert sum(long_id in (ids[f], ids[t]) for f, t in zip(plan.route_from.tolist(),
                                                      plan.route_to.tolist(), strict=True)) > 0
print(len(plan.ids))
""")
    assert int(out) > 40_000


@pytest.mark.parametrize("offset_km", [0.0, 5.0])
@pytest.mark.parametrize("lon", [10.0, 179.999])
def test_a_dense_place_on_a_cluster_cell_boundary_is_a_cluster(
        conn: Conn, run: Callable[..., RunRecord], offset_km: float, lon: float) -> None:
    # 12 stops without a city within 120 m of each other, on the line between two cells of
    # the 30 km cluster grid: 6 fell in each cell, neither reached city_min_stops, and the
    # place got no CITY_GRID, while the same stops 5 km north got one. At 180 degrees too.
    edge = geo.Grid(30.0).dlat_deg / 2 + offset_km / 111.2
    stops: list[Stop] = [(f"s{i:02d}", edge + (0.0005 if i % 2 else -0.0005),
                          lon + 0.00001 * i, False, None) for i in range(12)]
    add_dataset(conn, stops)
    rec = run(VirtualSettings(city_min_stops=10))
    assert rec.status == "success", rec.error
    assert rec.extra["anchors"]["clusters"] >= 1
    city = conn.execute("SELECT latitude, longitude FROM virtual_stops "
                        "WHERE kind = 'CITY_GRID'").fetchall()
    assert city
    # The grid surrounds the place: within city_radius_km (30) of it, on all sides.
    km = [float(geo.haversine_km(c["latitude"], c["longitude"], edge, lon)) for c in city]
    assert max(km) <= 30.0 + 1e-6 and len(city) > 20
    assert min(c["latitude"] for c in city) < edge - 0.15 < edge + 0.15 < max(
        c["latitude"] for c in city)


@pytest.mark.parametrize("spread", [0.0, 0.03])
def test_every_real_stop_gets_a_virtual_route(
        conn: Conn, run: Callable[..., RunRecord], spread: float) -> None:
    # 12 platforms of one station at one point, or a city of 40 stops: each virtual stop
    # linked its k nearest, the same few, and the other stops stayed islands in the graph.
    rng = np.random.default_rng(3)
    stops: list[Stop] = [(f"st-{i:02d}", 60.17 + rng.normal(0, spread),
                          24.94 + rng.normal(0, 2 * spread), False, "Helsinki")
                         for i in range(12 if spread == 0 else 40)]
    add_dataset(conn, stops)
    rec = run(VirtualSettings(city_min_stops=10))
    assert rec.status == "success", rec.error
    assert rec.counts["unreached_real_stops"] == 0 and rec.extra["unreached_sample"] == []
    linked = {(r["from_stop_id"], r["to_stop_id"]) for r in conn.execute(
        "SELECT from_stop_id, to_stop_id FROM virtual_routes")}
    for sid, *_ in stops:
        assert any(a == sid for a, _ in linked) and any(b == sid for _, b in linked), sid
    assert all((b, a) in linked for a, b in linked)


def test_a_dense_network_gets_one_connected_virtual_network(
        conn: Conn, run: Callable[..., RunRecord]) -> None:
    # 2,000 stops over 330 x 330 km, a stop every 7 km: a city grid stop's k nearest were all
    # real stops, and that star, joined to no other virtual stop, was an island of the graph
    # (8 components; build-graph: 48 real stops unreachable).
    rng = np.random.default_rng(9)
    stops: list[Stop] = [(f"d{i:04d}", float(rng.uniform(61, 64)), float(rng.uniform(23, 29)),
                          False, None) for i in range(2000)]
    add_dataset(conn, stops)
    rec = run(VirtualSettings(city_min_stops=10))
    assert rec.status == "success", rec.error
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ids = [st[0] for st in stops] + [r["id"] for r in conn.execute("SELECT id FROM virtual_stops")]
    index = {sid: i for i, sid in enumerate(ids)}
    pairs = np.array([(index[r["from_stop_id"]], index[r["to_stop_id"]]) for r in conn.execute(
        "SELECT from_stop_id, to_stop_id FROM virtual_routes")])
    links = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                       shape=(len(ids), len(ids)))
    n, label = connected_components(links, directed=False)
    assert n == 1, np.bincount(label)


def test_backup_failure_rolls_back_and_keeps_the_previous_generation(
        conn: Conn, run: Callable[..., RunRecord]) -> None:
    add_dataset(conn, helsinki_stops())
    assert run().status == "success"
    before = table_rows(conn)
    dead = BackupStore.connect("127.0.0.1:9", "k", "s", "nowhere", timeout=2.0)
    rec = run(force=True, store=dead)
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.error is not None and "rolled back" in rec.error
    assert table_rows(conn) == before
    assert count(conn, "SELECT count(*) FROM virtual_generations") == 1


def test_a_slow_s3_outlasts_an_idle_in_transaction_timeout(
        database_url: str, conn: Conn, s3: S3Endpoint, s3_bucket: str) -> None:
    """The generation's transaction waits for the S3 uploads before its COMMIT; a server's or
    role's idle_in_transaction_session_timeout must not end it and fail the run."""
    add_dataset(conn, helsinki_stops())
    url = psycopg.conninfo.make_conninfo(
        database_url, options="-c idle_in_transaction_session_timeout=100")
    host, port = s3.endpoint.rsplit(":", 1)
    with TcpProxy(host, int(port), delay=0.3) as slow:
        store = BackupStore.connect(f"{slow.address[0]}:{slow.port}", s3.access_key,
                                    s3.secret_key, s3_bucket, secure=s3.secure,
                                    region=s3.region)
        rec = StageRunner(Database(url)).run("gen-virtual", lambda ctx: generate(
            Database(url), store, VirtualSettings(city_min_stops=10), ctx))
    assert rec.status == "success", rec.error
    assert count(conn, "SELECT count(*) FROM virtual_generations") == 1


def test_status_section(conn: Conn, run: Callable[..., RunRecord]) -> None:
    assert status_section(conn) == {"active_dataset": None, "current": False,
                                    "newest_generation_id": None, "generation": None}
    add_dataset(conn, helsinki_stops())
    rec = run()
    section = status_section(conn)
    assert section["current"] is True and section["active_dataset"] == "ds-v1"
    gen = section["generation"]
    assert gen["id"] == rec.extra["generation_id"] == section["newest_generation_id"]
    assert gen["counts"]["by_kind"] == rec.counts["by_kind"]
    assert gen["settings"]["k"] == 4 and gen["age_s"] >= 0
    add_dataset(conn, helsinki_stops()[:5], version="ds-v2")
    assert status_section(conn)["current"] is False


# ---------------------------------------------------------------- regenerating in place


def index_defs(conn: Conn) -> set[tuple[str, str, str]]:
    return {(r["tablename"], r["indexname"], r["indexdef"]) for r in conn.execute(
        "SELECT tablename, indexname, indexdef FROM pg_indexes "
        "WHERE tablename LIKE 'virtual%%'")}


def test_regeneration_keeps_views_indexes_and_grants(
        conn: Conn, run: Callable[..., RunRecord]) -> None:
    add_dataset(conn, helsinki_stops())
    assert run().status == "success"
    # What an operator may have added: an index, views on a table and on the flights view,
    # and a read-only role for the routing backend.
    conn.execute("CREATE INDEX virtual_stops_kind_idx ON virtual_stops (kind) "
                 "WHERE kind <> 'MAIN_GRID'")
    conn.execute("CREATE VIEW city_grid AS SELECT id FROM virtual_stops "
                 "WHERE kind = 'CITY_GRID'")
    conn.execute("CREATE VIEW long_flights AS SELECT f.id FROM virtual_flights f "
                 "JOIN virtual_routes r ON r.id = f.route_id WHERE r.distance_km > 20")
    conn.execute("COMMENT ON INDEX virtual_stops_kind_idx IS 'dense grids, for the map'")
    # This view relies on the primary key (s.kind is not grouped by): that key cannot be
    # dropped for the load, so it stays and is kept up row by row; the others are rebuilt.
    conn.execute("CREATE VIEW stop_degrees AS SELECT s.id, s.kind, count(r.id) AS routes "
                 "FROM virtual_stops s LEFT JOIN virtual_routes r ON r.from_stop_id = s.id "
                 "GROUP BY s.id")
    oids = {r["name"]: r["oid"] for r in conn.execute(
        "SELECT indexrelid::regclass::text AS name, indexrelid::int AS oid FROM pg_index "
        "WHERE indrelid IN ('virtual_stops'::regclass, 'virtual_routes'::regclass)")}
    role = f"gv_reader_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE ROLE "{role}" NOLOGIN')
    try:
        conn.execute(f'GRANT SELECT ON virtual_stops, virtual_routes, virtual_flights, '
                     f'city_grid TO "{role}"')
        conn.execute(f'GRANT SELECT, UPDATE ON virtual_frequencies TO "{role}" '
                     'WITH GRANT OPTION')
        indexes, before = index_defs(conn), table_rows(conn)
        n_long = count(conn, "SELECT count(*) FROM long_flights")
        rec = run(force=True)
        assert rec.status == "success", rec.error
        assert table_rows(conn) == before and index_defs(conn) == indexes
        rebuilt = {r["name"] for r in conn.execute(
            "SELECT indexrelid::regclass::text AS name FROM pg_index WHERE indrelid IN "
            "('virtual_stops'::regclass, 'virtual_routes'::regclass) "
            "AND NOT indexrelid::int = ANY(%s)", (list(oids.values()),))}
        assert rebuilt == set(oids) - {"virtual_stops_pkey"}, rebuilt
        assert count(conn, "SELECT obj_description('virtual_stops_kind_idx'::regclass, "
                     "'pg_class') = 'dense grids, for the map'") == 1
        assert count(conn, "SELECT sum(routes) FROM stop_degrees") > 0
        assert count(conn, "SELECT count(*) FROM city_grid") == rec.counts["by_kind"][
            "CITY_GRID"]
        assert count(conn, "SELECT count(*) FROM long_flights") == n_long > 0
        privileges = {(r["table_name"], r["privilege_type"], r["is_grantable"])
                      for r in conn.execute(
                          "SELECT table_name, privilege_type, is_grantable "
                          "FROM information_schema.role_table_grants WHERE grantee = %s",
                          (role,))}
        assert privileges == {("virtual_stops", "SELECT", "NO"),
                              ("virtual_routes", "SELECT", "NO"),
                              ("virtual_flights", "SELECT", "NO"),
                              ("city_grid", "SELECT", "NO"),
                              ("virtual_frequencies", "SELECT", "YES"),
                              ("virtual_frequencies", "UPDATE", "YES")}
        assert count(conn, "SELECT generation_id FROM virtual_frequencies") == rec.extra[
            "generation_id"]
    finally:
        conn.execute(f'DROP OWNED BY "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


def test_a_role_that_does_not_own_the_tables_keeps_their_indexes(
        conn: Conn, database_url: str, backups: BackupStore) -> None:
    """Dropping an index needs the table's owner; a role with only the privileges (migrations
    run by an administrator) still generates, keeping the indexes up row by row."""
    add_dataset(conn, helsinki_stops())
    role, password = f"gv_writer_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")
    try:
        conn.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"')
        conn.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        oids = {r["oid"] for r in conn.execute(
            "SELECT indexrelid::int AS oid FROM pg_index WHERE indrelid IN "
            "('virtual_stops'::regclass, 'virtual_routes'::regclass)")}
        url = psycopg.conninfo.make_conninfo(database_url, user=role, password=password)
        rec = StageRunner(Database(url)).run("gen-virtual", lambda ctx: generate(
            Database(url), backups, VirtualSettings(city_min_stops=10), ctx))
        assert rec.status == "success", rec.error
        assert count(conn, "SELECT count(*) FROM virtual_routes") == rec.counts[
            "virtual_routes"] > 0
        assert {r["oid"] for r in conn.execute(
            "SELECT indexrelid::int AS oid FROM pg_index WHERE indrelid IN "
            "('virtual_stops'::regclass, 'virtual_routes'::regclass)")} == oids
    finally:
        conn.execute(f'DROP OWNED BY "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


def test_a_reader_holding_the_tables_past_the_attempts_fails_the_run_cleanly(
        conn: Conn, run: Callable[..., RunRecord], database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    add_dataset(conn, helsinki_stops())
    assert run().status == "success"
    before = table_rows(conn)
    monkeypatch.setattr(gen_virtual, "LOCK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(gen_virtual, "LOCK_ATTEMPTS", 2)
    with psycopg.connect(database_url, application_name="nightly-report") as reader:
        # What build-graph does first in its read snapshot.
        reader.execute("LOCK TABLE virtual_stops, virtual_routes, virtual_flights "
                       "IN ACCESS SHARE MODE")
        pid = reader.info.backend_pid
        rec = run(force=True)
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.error is not None and "could not lock the virtual tables" in rec.error
    # Who holds them is in the error itself (it was in info lines only, which -q hides).
    assert f"last held by nightly-report (pid {pid})" in rec.error, rec.error
    assert "\n" not in rec.error
    assert table_rows(conn) == before
    assert count(conn, "SELECT count(*) FROM virtual_generations") == 1
    assert run(force=True).status == "success"  # and once the reader is gone, it goes through


# ---------------------------------------------------------------- 012: flights become a view

FLIGHT_COLUMNS = """SELECT column_name, data_type FROM information_schema.columns
                    WHERE table_name = 'virtual_flights' ORDER BY ordinal_position"""


def _old_generation(conn: Conn) -> None:
    """A generation as gen-virtual wrote it before 012: one flight row per virtual route."""
    add_dataset(conn, [("s1", 60.0, 24.0, False, None), ("s2", 60.5, 24.5, False, None)])
    conn.execute("INSERT INTO virtual_generations (id, dataset_version, settings) "
                 "VALUES (7, 'ds-v1', '{}')")
    for frm, to, mode in (("V:MAIN:1:2", "s1", "virtual"), ("s1", "V:MAIN:1:2", "virtual"),
                          ("V:MAIN:1:2", "s2", "walk")):
        conn.execute("INSERT INTO virtual_routes (id, from_stop_id, to_stop_id, mode, "
                     "distance_km, travel_time_s, dataset_version) "
                     "VALUES (%s, %s, %s, %s, 10, 720, 'ds-v1')", (f"VR:{frm}>{to}", frm, to,
                                                                   mode))
        if mode == "virtual":
            conn.execute("INSERT INTO virtual_flights (id, route_id, start_time, end_time, "
                         "headway_s, dataset_version) VALUES (%s, %s, '05:00', '23:00', 1800, "
                         "'ds-v1')", (f"VF:{frm}>{to}", f"VR:{frm}>{to}"))


def test_upgrade_keeps_the_flights_their_columns_and_grants(empty_database_url: str) -> None:
    from pipeline_cli import db

    role = f"gv_reader_{uuid.uuid4().hex[:8]}"
    with db.connect(empty_database_url, autocommit=True) as conn:
        db.migrate(conn, target=11)
        _old_generation(conn)
        conn.execute(f'CREATE ROLE "{role}" NOLOGIN')
        try:
            conn.execute(f'GRANT SELECT ON virtual_flights TO "{role}"')
            columns = conn.execute(FLIGHT_COLUMNS).fetchall()
            flights = conn.execute("SELECT * FROM virtual_flights ORDER BY id").fetchall()
            assert len(flights) == 2
            assert db.migrate(conn).applied[0] == "012_virtual_frequency"  # (and later ones)
            assert conn.execute(FLIGHT_COLUMNS).fetchall() == columns
            assert conn.execute("SELECT * FROM virtual_flights ORDER BY id").fetchall() == flights
            assert conn.execute("SELECT generation_id, mode, headway_s "
                                "FROM virtual_frequencies").fetchall() == [
                {"generation_id": 7, "mode": "virtual", "headway_s": 1800}]
            assert conn.execute("SELECT has_table_privilege(%s, 'virtual_flights', 'SELECT') "
                                "AS ok", (role,)).fetchone() == {"ok": True}
        finally:
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')


def test_upgrade_stops_at_an_operators_view_on_the_old_table(empty_database_url: str) -> None:
    from pipeline_cli import db
    from pipeline_cli.errors import DatabaseError

    with db.connect(empty_database_url, autocommit=True) as conn:
        db.migrate(conn, target=11)
        _old_generation(conn)
        conn.execute("CREATE VIEW my_flights AS SELECT id FROM virtual_flights")
        with pytest.raises(DatabaseError, match="views read it: my_flights; drop them"):
            db.migrate(conn)
        assert 12 not in db.applied_versions(conn)  # nothing of 012 was applied
        assert count(conn, "SELECT count(*) FROM my_flights") == 2
