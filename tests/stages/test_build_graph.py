"""build-graph against real PostgreSQL, Redis (one server and a 3-master cluster) and S3:
publish order, noop, validation, failure cleanup, concurrent readers, retention, rollback with
reload from S3, routing."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devtools.services import S3Endpoint
from pipeline_cli import db
from pipeline_cli.adapters import graph_store
from pipeline_cli.adapters.backups import BackupStore
from pipeline_cli.adapters.graph_store import GraphLookupError, GraphStore, PrefixOwned
from pipeline_cli.db import Database
from pipeline_cli.errors import DatabaseError, Interrupted, RedisError
from pipeline_cli.modes import canonical
from pipeline_cli.runner import RunContext, RunRecord, StageRunner, StopFlag
from pipeline_cli.settings import GraphSettings
from pipeline_cli.stages.build_graph import (
    activate_version,
    build_graph,
    export_key,
    list_versions,
    manifest_key,
    plan,
    shortest_path,
    status_section,
)
from tests.support.graph_fixtures import (
    SPEEDS_KMH,
    Network,
    add_dataset,
    add_generation,
    add_virtual_route,
    expected_weight,
    seed_network,
    to_networkx,
)
from tests.support.proxy import TcpProxy

Conn = psycopg.Connection[dict[str, Any]]


@pytest.fixture
def client(redis_env: dict[str, str]) -> Iterator[redis.Redis]:
    """A single Redis, then a 3-master Redis Cluster: every test here runs on both."""
    c = graph_store.connect(redis_env["PIPELINE_REDIS_URL"],
                            cluster=redis_env["PIPELINE_REDIS_CLUSTER"] == "true")
    yield c
    c.close()


@pytest.fixture
def store(client: redis.Redis, redis_prefix: str) -> GraphStore:
    return GraphStore(client, redis_prefix, chunk_size=16)


@pytest.fixture
def backups(s3: S3Endpoint, s3_bucket: str) -> BackupStore:
    return BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                               secure=s3.secure, region=s3.region)


class Builder:
    """Runs build-graph / graph activate through the real stage runner."""

    def __init__(self, database_url: str, store: GraphStore, backups: BackupStore) -> None:
        self.database_url = database_url
        self.store = store
        self.backups = backups
        self.settings = GraphSettings()

    def build(self, *, force: bool = False, store: GraphStore | None = None,
              backups: BackupStore | None = None,
              after_chunk: Callable[[int], None] | None = None, **settings: Any) -> RunRecord:
        cfg = replace(self.settings, **settings)
        database = Database(self.database_url)
        return StageRunner(database).run("build-graph", lambda ctx: build_graph(
            database, store or self.store, backups or self.backups, cfg, SPEEDS_KMH, ctx,
            force=force, after_chunk=after_chunk))

    def activate(self, version: str) -> RunRecord:
        database = Database(self.database_url)
        return StageRunner(database).run("build-graph", lambda ctx: activate_version(
            database, self.store, self.backups, self.settings, version, ctx))

    def with_speeds(self, speeds_kmh: dict[str, float]) -> RunRecord:
        database = Database(self.database_url)
        return StageRunner(database).run("build-graph", lambda ctx: build_graph(
            database, self.store, self.backups, self.settings, speeds_kmh, ctx))

    def ok(self, **kw: Any) -> str:
        record = self.build(**kw)
        assert record.status == "success", record.error
        return str(record.extra["graph_version"])


@pytest.fixture
def builder(database_url: str, store: GraphStore, backups: BackupStore) -> Builder:
    return Builder(database_url, store, backups)


@pytest.fixture
def net(conn: Conn) -> Network:
    return seed_network(conn)


def graph_rows(conn: Conn) -> list[dict[str, Any]]:
    return conn.execute("SELECT * FROM graph_versions ORDER BY seq").fetchall()


def all_keys(client: redis.Redis, prefix: str) -> set[str]:
    return {k.decode() for k in client.scan_iter(match=f"{prefix}:*", count=1000)}


# ---------------------------------------------------------------- publish


def test_build_publishes_redis_postgres_and_s3(builder: Builder, net: Network, conn: Conn,
                                               store: GraphStore, backups: BackupStore) -> None:
    record = builder.build()
    assert record.status == "success", record.error
    version = record.extra["graph_version"]
    edges = len(net.routes) + len(net.virtual_routes)
    assert record.extra["nodes"] == len(net.nodes) and record.extra["edges"] == edges
    assert store.active_version() == version
    [row] = graph_rows(conn)
    assert row["version"] == version and row["active"]
    assert row["dataset_version"] == "ds-v1"
    assert row["virtual_generation_id"] == net.generation_id
    assert (row["nodes"], row["edges"]) == (len(net.nodes), edges)
    # every node has a key, even without outgoing edges, so readers can tell "unknown" apart
    assert store.version_keys(version) == len(net.nodes) + 1  # + meta
    meta = store.meta(version)
    assert meta is not None and meta["checksum"] == row["checksum"]
    raw = gzip.decompress(backups.get_bytes(export_key(version)))
    assert hashlib.sha256(raw).hexdigest() == row["checksum"]
    lines = [json.loads(line) for line in raw.splitlines()]
    n_real = len(net.real_stops)
    assert {obj["id"] for obj in lines[:n_real]} == set(net.real_stops)
    assert {obj["id"] for obj in lines[n_real:]} == set(net.virtual_stops)
    assert [obj["kind"] for obj in lines] == ["real"] * n_real + ["virtual"] * len(
        net.virtual_stops)
    manifest = backups.get_json(manifest_key(version))
    assert manifest["sha256"] == row["checksum"] and manifest["edges"] == edges
    assert manifest["format"] == "pipeline-graph-jsonl/1"


def test_edge_weights_follow_flights_distance_and_travel_time(
        builder: Builder, net: Network, store: GraphStore) -> None:
    builder.ok()
    for rid, a, _b, mode, dist, flights in net.routes:
        _, edges = store.neighbors(a)
        [edge] = [e for e in edges if e.route_id == rid]
        assert edge.mode == canonical(mode)
        assert edge.weight_s == pytest.approx(expected_weight(dist, mode, flights), abs=1e-3)
    for rid, a, b, _mode, _dist, tt in net.virtual_routes[:10]:
        _, edges = store.neighbors(a)
        [edge] = [e for e in edges if e.route_id == rid]
        assert (edge.to, edge.weight_s) == (b, tt)


def test_edges_carry_the_canonical_mode(builder: Builder, conn: Conn,
                                        store: GraphStore) -> None:
    # The edge carried the feed's spelling: a routing API saw 'BUS', 'bus' and 'Ferry '
    # (and 'Light Rail' for a tram) as modes of their own.
    net = seed_network(conn, n_routes=0, n_virtual=2)
    a, b = net.real_stops[:2]
    for rid, mode in (("UP", "BUS"), ("SP", "Ferry "), ("LR", "Light Rail"), ("NO", None)):
        conn.execute("INSERT INTO routes VALUES (%s, %s, %s, %s, 10)", (rid, a, b, mode))
    conn.execute("INSERT INTO flights VALUES ('F1', 'NO', '08:00', '08:30', '1')")
    add_generation(conn, "ds-v1")
    builder.ok()
    modes = {e.route_id: e.mode for e in store.neighbors(a)[1]}
    assert {r: modes[r] for r in ("UP", "SP", "LR", "NO")} == {
        "UP": "bus", "SP": "ferry", "LR": "tram", "NO": ""}


def test_flight_past_midnight_wraps(builder: Builder, conn: Conn, store: GraphStore) -> None:
    net = seed_network(conn, n_routes=0, n_virtual=2)
    a, b = net.real_stops[:2]
    conn.execute("INSERT INTO routes VALUES ('NIGHT', %s, %s, 'flight', 900)", (a, b))
    conn.execute("INSERT INTO flights VALUES ('N1', 'NIGHT', '23:30', '01:10', '1'), "
                 "('N2', 'NIGHT', '08:00', '10:00', '2')")
    add_generation(conn, "ds-v1")
    builder.ok()
    [edge] = [e for e in store.neighbors(a)[1] if e.route_id == "NIGHT"]
    assert edge.weight_s == 100 * 60


def test_a_flight_arriving_at_its_departure_time_takes_a_day(
        builder: Builder, conn: Conn, store: GraphStore) -> None:
    # It weighed 0 s, and the fastest flight decides: one such row made its route free.
    net = seed_network(conn, n_routes=0, n_virtual=2)
    a, b = net.real_stops[:2]
    conn.execute("INSERT INTO routes VALUES ('SAME', %s, %s, 'bus', 10)", (a, b))
    conn.execute("INSERT INTO flights VALUES ('S1', 'SAME', '08:00', '08:00', '1')")
    add_generation(conn, "ds-v1")
    builder.ok()
    [edge] = [e for e in store.neighbors(a)[1] if e.route_id == "SAME"]
    assert edge.weight_s == 86400


def test_rerun_is_noop_new_generation_builds_force_rebuilds(
        builder: Builder, net: Network, conn: Conn, store: GraphStore) -> None:
    first = builder.ok()
    again = builder.build()
    assert again.status == "noop" and first in again.message
    add_generation(conn, "ds-v1")
    second = builder.ok()
    assert second != first and store.active_version() == second
    assert builder.build().status == "noop"
    third = builder.ok(force=True)
    assert store.active_version() == third
    assert [r["active"] for r in graph_rows(conn)] == [False, False, True]


def test_active_graph_missing_from_redis_is_served_again(
        builder: Builder, net: Network, store: GraphStore, client: redis.Redis,
        conn: Conn) -> None:
    first = builder.ok()
    client.delete(store.pointer_key)  # the pointer lost, the version's keys still there
    record = builder.build()
    # A repair is work done: it was reported and recorded as noop, shown only in the log.
    assert record.status == "success" and store.active_version() == first
    assert record.message.startswith(f"repaired: Redis had lost the pointer to the active "
                                     f"graph {first}")
    assert record.extra["repaired"] and builder.build().status == "noop"
    # Redis restarted empty after a rollback: the newest build is not the active version, so
    # the build decision saw nothing to do, run after run, while no graph was served.
    second = builder.ok(force=True)
    assert builder.activate(first).status == "success"
    for key in client.scan_iter(f"{store.prefix}:*"):
        client.delete(key)
    record = builder.build()
    assert record.status == "success" and store.active_version() == first != second
    assert "reloaded from s3" in record.message
    assert store.is_complete(first)  # reloaded from its S3 export
    assert graph_rows(conn)[0]["version"] == first and graph_rows(conn)[0]["active"]


def test_a_repair_is_reported_when_the_new_dataset_has_no_virtual_entities_yet(
        builder: Builder, net: Network, store: GraphStore, client: redis.Redis,
        conn: Conn) -> None:
    """The runbook's "run build-graph: it repairs first and reports `repaired:`" held only
    when there was nothing to build: with a new dataset still waiting for gen-virtual it
    repaired, said "skipped: ... run gen-virtual first" and named the repair only in the log."""
    first = builder.ok()
    client.delete(store.pointer_key)
    add_dataset(conn, "ds-v2", seq=2)  # synced; gen-virtual has not run for it yet
    record = builder.build()
    assert store.active_version() == first
    assert record.status == "success" and record.exit_code == 0
    assert record.message.startswith(f"repaired: Redis had lost the pointer to the active "
                                     f"graph {first}")
    assert "ds-v2 has no virtual entities yet" in record.message and record.extra["repaired"]
    assert builder.build().status == "skipped"

def test_lost_adjacency_keys_of_the_active_graph_are_reported_and_reloaded(
        builder: Builder, net: Network, store: GraphStore, client: redis.Redis,
        conn: Conn) -> None:
    """Keys evicted or deleted while `meta` stayed: status said consistent, build-graph said
    noop, and routing missed stops until someone ran --force."""
    first = builder.ok()
    lost = net.nodes[::3]
    for stop in lost:
        client.delete(store.adj_key(first, stop))
    section = status_section(conn, store)
    assert section["consistent"] is False and section["redis_complete"] is False
    assert f"lacks {len(lost)} of its {len(net.nodes)} adjacency keys" in section["problem"]
    record = builder.build()
    assert record.status == "success", record.error
    assert f"Redis had lost {len(lost)} of the {len(net.nodes)} adjacency keys" in record.message
    assert store.active_version() == first and store.is_complete(first)  # in place, same version
    assert store.neighbors(lost[0])[0] == first
    assert status_section(conn, store)["consistent"] is True
    assert len(graph_rows(conn)) == 1 and builder.build().status == "noop"


def test_lost_keys_of_a_rolled_back_graph_without_its_export_build_a_new_version(
        builder: Builder, net: Network, store: GraphStore, client: redis.Redis,
        backups: BackupStore, conn: Conn) -> None:
    """After a rollback, keys lost and the export gone: build-graph said noop, run after run,
    while status said the graph was incomplete."""
    first = builder.ok()
    builder.ok(force=True)
    assert builder.activate(first).status == "success"
    client.delete(store.adj_key(first, net.nodes[0]))
    backups.delete_prefix(export_key(first).rsplit("/", 1)[0] + "/")
    record = builder.build()
    assert record.status == "success", record.error
    third = record.extra["graph_version"]
    assert third != first and store.active_version() == third
    assert status_section(conn, store)["consistent"] is True


def test_changed_route_speeds_build_again(builder: Builder, net: Network, conn: Conn) -> None:
    """A graph weighed with the old [virtual] speeds_kmh stayed active in silence (noop)."""
    first = builder.ok()
    assert builder.build().status == "noop"
    slower = builder.with_speeds({**SPEEDS_KMH, "Bus": 10.0})  # another spelling of bus
    assert slower.status == "success", slower.error
    assert slower.extra["graph_version"] != first
    assert graph_rows(conn)[-1]["speeds_kmh"]["bus"] == 10.0
    assert builder.with_speeds({**SPEEDS_KMH, "bus": 10.0}).status == "noop"
    # A graph built before its speeds were recorded is not rebuilt for that alone.
    conn.execute("UPDATE graph_versions SET speeds_kmh = NULL")
    assert builder.build().status == "noop"


def test_names_an_alias_now_gives_a_mode_weigh_and_rebuild(
        builder: Builder, conn: Conn, store: GraphStore,
        caplog: pytest.LogCaptureFixture) -> None:
    """Feeds name modes in GTFS's, NeTEx's or OpenStreetMap's words: 'S-Bahn' and 'Railway
    Service' are rail, weighed by rail's speed; 'High Speed Rail Service' is still unknown.
    A graph an older release weighed by a speed configured for 's_bahn' (a name of its own
    then) builds again, as that speed now is rail's."""
    caplog.set_level(logging.INFO, logger="pipeline")
    net = seed_network(conn, n_routes=0, n_virtual=2)
    a, b = net.real_stops[:2]
    for rid, mode in (("SB", "S-Bahn"), ("RS", "Railway Service"), ("HS", "High Speed Rail")):
        conn.execute("INSERT INTO routes VALUES (%s, %s, %s, %s, 90)", (rid, a, b, mode))
    record = builder.build()
    assert record.status == "failed" and record.extra["unknown_modes"] == {"high_speed_rail": 1}
    conn.execute("INSERT INTO flights VALUES ('H1', 'HS', '08:00', '08:30', '1')")
    first = builder.ok()
    edges = {e.route_id: (e.mode, e.weight_s) for e in store.neighbors(a)[1]}
    assert {r: edges[r] for r in ("SB", "RS", "HS")} == {
        "SB": ("rail", 3600.0), "RS": ("rail", 3600.0), "HS": ("high_speed_rail", 1800.0)}
    # as an older release recorded it: 's_bahn' a mode of its own, at the configured speed
    conn.execute("""UPDATE graph_versions SET speeds_kmh = '{"s_bahn": 60.0}'""")
    record = builder.with_speeds({**SPEEDS_KMH, "s_bahn": 60.0})
    assert record.status == "success", record.error
    assert record.extra["graph_version"] != first
    assert "building: the speeds of route modes 's_bahn' ([virtual] speeds_kmh) differ from " \
        f"{first}'s" in caplog.messages
    edges = {e.route_id: (e.mode, e.weight_s) for e in store.neighbors(a)[1]}
    assert edges["SB"] == edges["RS"] == ("rail", 5400.0)
    assert graph_rows(conn)[-1]["speeds_kmh"] == {"rail": 60.0}


def test_a_speed_no_route_is_weighed_by_changes_nothing(
        builder: Builder, net: Network, conn: Conn) -> None:
    """A new speed for a mode no route uses (or for `virtual`, whose routes weigh their
    travel_time_s) said "the route speeds differ" and published an identical graph."""
    first = builder.ok()
    for change in ({"funicular": 3.0}, {"hovercraft": 60.0}, {"virtual": 80.0}):
        record = builder.with_speeds({**SPEEDS_KMH, **change})
        assert record.status == "noop", (change, record.message)
    assert [r["version"] for r in graph_rows(conn)] == [first]
    # only the speeds the graph was weighed by are recorded with it
    flightless = {canonical(m) for _, _, _, m, _, flights in net.routes if not flights}
    assert set(graph_rows(conn)[0]["speeds_kmh"]) == flightless and "ferry" in flightless
    record = builder.with_speeds({**SPEEDS_KMH, "ferry": 15.0})
    assert record.status == "success", record.error


def test_no_active_dataset_or_no_virtual_generation_is_skipped(
        builder: Builder, conn: Conn, store: GraphStore) -> None:
    record = builder.build()
    assert record.status == "skipped" and "sync-odata" in record.message
    conn.execute("INSERT INTO datasets (version, seq, hash, backup_prefix, active) "
                 "VALUES ('ds-v9', 9, 'h', 'datasets/ds-v9/', true)")
    record = builder.build()
    assert record.status == "skipped" and record.exit_code == 0
    assert "ds-v9 has no virtual entities" in record.message and "gen-virtual" in record.message
    assert store.active_version() is None and graph_rows(conn) == []


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("case", ["unknown_stop", "nan_weight", "unknown_mode", "negative"])
def test_fatal_validation_writes_nothing(builder: Builder, net: Network, conn: Conn,
                                         client: redis.Redis, redis_prefix: str,
                                         case: str) -> None:
    if case == "unknown_stop":
        add_virtual_route(conn, "BAD", net.virtual_stops[0], "NOWHERE", 1, 10, "ds-v1")
    elif case == "nan_weight":
        a, b = net.real_stops[:2]
        conn.execute("INSERT INTO routes VALUES ('BAD', %s, %s, 'bus', NULL)", (a, b))
    elif case == "unknown_mode":
        a, b = net.real_stops[:2]
        conn.execute("INSERT INTO routes VALUES ('BAD', %s, %s, 'zeppelin', 10)", (a, b))
    else:
        a, b = net.real_stops[:2]
        conn.execute("INSERT INTO routes VALUES ('BAD', %s, %s, 'bus', -5)", (a, b))
    record = builder.build()
    assert record.status == "failed" and record.exit_code == 1
    if case == "unknown_mode":  # named by mode and route count, not by route
        assert record.extra["unknown_modes"] == {"zeppelin": 1}
    else:
        assert "BAD" in " ".join(record.extra.get("problems", []))
    # nothing at all: not even the claim of the prefix, made only before a first write
    assert graph_rows(conn) == [] and all_keys(client, redis_prefix) == set()


def test_empty_graph_is_fatal(builder: Builder, conn: Conn) -> None:
    conn.execute("INSERT INTO datasets (version, seq, hash, backup_prefix, active) "
                 "VALUES ('ds-v1', 1, 'h', 'datasets/ds-v1/', true)")
    add_generation(conn, "ds-v1")
    record = builder.build()
    assert record.status == "failed" and "empty graph" in (record.error or "")


def test_disconnected_graph_warns_with_counts_or_fails_when_fatal(
        builder: Builder, conn: Conn, client: redis.Redis, redis_prefix: str) -> None:
    seed_network(conn, isolated_real=3)
    record = builder.build(fatal_warnings=True)
    assert record.status == "failed" and "fatal_warnings" in (record.error or "")
    assert all_keys(client, redis_prefix) == set()
    record = builder.build()
    assert record.status == "success"
    assert record.extra["components"] >= 4 and record.extra["unreachable_real_stops"] >= 3
    assert any("unreachable" in w for w in record.extra["warnings"])
    assert record.counts["unreachable_real_stops"] == record.extra["unreachable_real_stops"]


def test_a_stop_joined_one_way_only_is_named(builder: Builder, conn: Conn) -> None:
    # HEL -> NRT had no flight back: the graph counted one component, no warning, and every
    # route from Tokyo to Helsinki had no path.
    net = seed_network(conn, n_real=3, n_routes=0, n_virtual=0)
    a, b, c = net.real_stops
    for rid, x, y in (("AB", a, b), ("BA", b, a), ("BC", b, c)):
        conn.execute("INSERT INTO routes VALUES (%s, %s, %s, 'air', 500)", (rid, x, y))
    add_generation(conn, "ds-v1")
    record = builder.build()
    assert record.status == "success", record.error
    assert record.extra["components"] == 1 and record.extra["unreachable_real_stops"] == 0
    assert f"1 real stop(s) joined to the main network one way only (e.g. {c}): a route " \
        "back or there is missing" in record.extra["warnings"]
    assert builder.build(force=True, fatal_warnings=True).status == "success"  # a note


def test_self_loops_are_left_out_and_zero_weight_edges_counted(
        builder: Builder, net: Network, conn: Conn, store: GraphStore) -> None:
    """A route from a stop to itself reached Redis, and an edge of 0 s between two stops at
    one place passed in silence."""
    a, b = net.real_stops[:2]
    conn.execute("INSERT INTO routes VALUES ('LOOP', %s, %s, 'bus', 12)", (a, a))
    conn.execute("INSERT INTO routes VALUES ('SAME', %s, %s, 'bus', 0)", (a, b))
    add_virtual_route(conn, "VLOOP", net.virtual_stops[0], net.virtual_stops[0], 0, 0, "ds-v1")
    add_generation(conn, "ds-v1")
    record = builder.build(fatal_warnings=True)  # notes, not a disconnected network
    assert record.status == "success", record.error
    edges = len(net.routes) + len(net.virtual_routes) + 1  # SAME, not the two loops
    assert record.extra["edges"] == record.counts["edges"] == edges
    assert (record.extra["self_loops"], record.extra["zero_weight_edges"]) == (2, 1)
    assert record.counts["self_loops"] == 2 and record.counts["zero_weight_edges"] == 1
    notes = record.extra["warnings"]
    assert "2 self-loop(s) left out (a route from a stop to itself, e.g. LOOP at " \
        f"{a})" in notes
    assert f"1 edge(s) of 0 s between two stops (e.g. SAME: {a} -> {b})" in notes[-1]
    version = record.extra["graph_version"]
    _, out = store.neighbors(a)
    assert [e.route_id for e in out if e.to == a] == []
    assert [e.weight_s for e in out if e.route_id == "SAME"] == [0.0]
    row = graph_rows(conn)[-1]
    assert row["edges"] == edges and row["warnings"]["self_loops"] == 2
    assert store.meta(version)["edges"] == str(edges)


def _haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle km on the sphere of the pipeline, written apart from pipeline_cli.geo."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (math.sin((p2 - p1) / 2) ** 2
         + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2)
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(a)))


def test_routes_shorter_than_the_straight_line_between_their_stops_are_named(
        builder: Builder, conn: Conn, store: GraphStore) -> None:
    """A route of 0 km (a feed's "unknown") between stops 60 km apart became an edge of 0 s,
    a teleport every shortest path took, noted as "two stops at one place". Routes across the
    antimeridian are measured the short way round; longer routes than the straight line are
    normal (roads wind), and so are 0 km between the platforms of one station."""
    add_dataset(conn, "ds-v1")
    stops = {"HEL": (60.17, 24.94), "TKU": (60.45, 22.27), "P1": (60.1710, 24.9410),
             "P2": (60.1711, 24.9411), "FJW": (-16.8, 179.9), "FJE": (-16.8, -179.9),
             "NP": (90.0, 0.0), "SP": (-90.0, 0.0), "Z": (0.0, 0.0), "ZM": (-0.0, -0.0)}
    for sid, (lat, lon) in stops.items():
        conn.execute("INSERT INTO stops (id, latitude, longitude) VALUES (%s, %s, %s)",
                     (sid, lat, lon))
    across = _haversine_km(*stops["FJW"], *stops["FJE"])
    assert 20 < across < 22  # the short way round, not 40,000 km
    poles = _haversine_km(*stops["NP"], *stops["SP"])
    routes = [("TELEPORT", "HEL", "TKU", 0.0), ("MILES", "TKU", "HEL", 99.0),
              ("ROAD", "HEL", "TKU", 170.0), ("PLATFORMS", "P1", "P2", 0.0),
              ("DATELINE", "FJW", "FJE", round(across, 1)), ("DATELINE-0", "FJE", "FJW", 0.0),
              ("POLES", "NP", "SP", round(poles)), ("NULL", "Z", "ZM", 0.0)]
    for rid, a, b, km in routes:
        conn.execute("INSERT INTO routes VALUES (%s, %s, %s, 'bus', %s)", (rid, a, b, km))
    add_generation(conn, "ds-v1")
    record = builder.build()
    assert record.status == "success", record.error
    assert _haversine_km(*stops["HEL"], *stops["TKU"]) > 150
    assert record.extra["short_routes"] == record.counts["short_routes"] == 3
    assert "3 route(s) shorter than the straight line between their stops (e.g. DATELINE-0: " \
        f"FJE -> FJW, 0 km for {across:.1f} km)" in " ".join(record.extra["warnings"])
    assert graph_rows(conn)[-1]["warnings"]["short_routes"] == 3
    # Published as the feed says: a note, not a guess at the distance.
    _, out = store.neighbors("HEL")
    assert [e.weight_s for e in out if e.route_id == "TELEPORT"] == [0.0]


def test_routes_far_longer_or_faster_than_the_straight_line_are_named(
        builder: Builder, conn: Conn, store: GraphStore) -> None:
    """A feed in metres (11,000 "km" for HEL -> TKU) made every such route 1,000 times too
    slow, and a flight timed in each end's own zone (NRT -> HEL in 4 h) too fast; both were
    published in silence. Winding roads, a ring line's neighbouring ends and real flights are
    not named."""
    add_dataset(conn, "ds-v1")
    stops = {"HEL": (60.17, 24.94), "TKU": (60.45, 22.27), "NRT": (35.77, 140.39),
             "R1": (60.170, 24.940), "R2": (60.171, 24.945)}
    for sid, (lat, lon) in stops.items():
        conn.execute("INSERT INTO stops (id, latitude, longitude) VALUES (%s, %s, %s)",
                     (sid, lat, lon))
    straight = _haversine_km(*stops["HEL"], *stops["TKU"])
    routes = [("METRES", "HEL", "TKU", round(straight * 1000)), ("ROAD", "TKU", "HEL", 400.0),
              ("RING", "R1", "R2", 60.0), ("LOCAL", "NRT", "HEL", None),
              ("AY74", "HEL", "NRT", None)]
    for rid, a, b, km in routes:
        conn.execute("INSERT INTO routes VALUES (%s, %s, %s, 'air', %s)", (rid, a, b, km))
    conn.execute("INSERT INTO flights VALUES ('L1', 'LOCAL', '11:00', '15:00', '1'), "
                 "('A1', 'AY74', '17:00', '02:30', '1')")
    add_generation(conn, "ds-v1")
    record = builder.build()
    assert record.status == "success", record.error
    counts = {k: record.counts[k] for k in ("short_routes", "long_routes", "fast_routes")}
    assert counts == {"short_routes": 0, "long_routes": 1, "fast_routes": 1}
    warnings = " ".join(record.extra["warnings"])
    assert ("1 route(s) more than 5 times longer than the straight line between their stops "
            f"(e.g. METRES: HEL -> TKU, {round(straight * 1000)} km for {straight:.1f} km): "
            "their distance_km is wrong, or in metres; published") in warnings
    far = _haversine_km(*stops["NRT"], *stops["HEL"])
    assert ("1 route(s) faster than 1,200 km/h by their fastest flight over the straight line "
            f"(e.g. LOCAL: NRT -> HEL, 240 min for {far:.1f} km)") in warnings
    assert {k: graph_rows(conn)[-1]["warnings"][k] for k in counts} == counts


# ---------------------------------------------------------------- failures


class Boom(RuntimeError):
    pass


def test_failure_after_half_the_keys_keeps_old_version_and_leaves_no_orphans(
        builder: Builder, net: Network, conn: Conn, store: GraphStore, client: redis.Redis,
        redis_prefix: str, backups: BackupStore) -> None:
    old = builder.ok()
    keys_before = all_keys(client, redis_prefix)
    half = len(net.nodes) // 2
    seen: list[int] = []

    def fail_at_half(written: int) -> None:
        seen.append(written)
        if written >= half:
            raise Boom("injected")

    record = builder.build(force=True, after_chunk=fail_at_half)
    assert record.status == "failed" and "injected" in (record.error or "")
    assert 0 < seen[-1] < len(net.nodes)  # it really stopped midway
    assert store.active_version() == old
    assert all_keys(client, redis_prefix) == keys_before
    assert [r["version"] for r in graph_rows(conn)] == [old]
    assert [r["version"] for r in graph_rows(conn) if r["active"]] == [old]
    assert list(backups.list("graphs/")) == [export_key(old), manifest_key(old)]


def test_a_build_with_nothing_new_removes_keys_a_killed_build_left(
        builder: Builder, net: Network, store: GraphStore, client: redis.Redis,
        redis_prefix: str) -> None:
    # Only a build that published cleaned them: after kill -9 mid-write the half version
    # stayed in Redis through every build-graph that had nothing new to build.
    builder.ok()
    keys_before = all_keys(client, redis_prefix)
    store.write_version("graph-v99", [("S1", "half")], {})  # as a killed run leaves it
    record = builder.build()
    assert record.status == "success", record.error  # a repair is no noop
    assert "removed 1 incomplete graph versions left in Redis: graph-v99" in record.message
    assert not store.is_registered("graph-v99")
    assert all_keys(client, redis_prefix) == keys_before


def test_s3_failure_after_the_metadata_row_rolls_back(
        builder: Builder, net: Network, conn: Conn, store: GraphStore, client: redis.Redis,
        redis_prefix: str, s3: S3Endpoint, s3_bucket: str) -> None:
    old = builder.ok()
    keys_before = all_keys(client, redis_prefix)
    host, port = s3.endpoint.rsplit(":", 1)
    with TcpProxy(host, int(port)) as proxy:
        broken = BackupStore.connect(f"{proxy.address[0]}:{proxy.address[1]}", s3.access_key,
                                     s3.secret_key, s3_bucket, secure=s3.secure, region=s3.region,
                                     timeout=3)
        proxy.block()
        record = broken_build = builder.build(force=True, backups=broken)
        broken.client._http.clear()  # type: ignore[attr-defined]
    assert broken_build.status == "failed" and "S3" in (record.error or "")
    assert store.active_version() == old
    assert all_keys(client, redis_prefix) == keys_before
    assert [r["version"] for r in graph_rows(conn)] == [old]


@pytest.mark.parametrize("redis_env", ["single"], indirect=True)  # the proxy fronts one server
def test_redis_cut_mid_write_keeps_old_version_and_next_run_cleans_up(
        builder: Builder, net: Network, conn: Conn, store: GraphStore, client: redis.Redis,
        redis_prefix: str, redis_url: str) -> None:
    old = builder.ok()
    keys_before = all_keys(client, redis_prefix)
    url = redis.connection.parse_url(redis_url)
    with TcpProxy(url.get("host", "127.0.0.1"), int(url.get("port", 6379))) as proxy:
        proxied = redis.Redis(host=proxy.address[0], port=proxy.address[1],
                              db=url.get("db", 0), socket_timeout=3,
                              retry=Retry(NoBackoff(), 0))
        cut = GraphStore(proxied, redis_prefix, chunk_size=8)

        def block_at_half(written: int) -> None:
            if written >= len(net.nodes) // 2:
                proxy.block()

        record = builder.build(force=True, store=cut, after_chunk=block_at_half)
        proxied.close()
    assert record.status == "failed" and "Redis" in (record.error or "")
    # Readers (through the direct connection) still see the old version, complete.
    assert store.active_version() == old and store.is_complete(old)
    assert [r["version"] for r in graph_rows(conn)] == [old]
    leftovers = all_keys(client, redis_prefix) - keys_before
    assert leftovers  # Redis was unreachable, so the partial keys could not be removed yet
    builder.ok(force=True)
    registered = set(store.registered())
    assert not any(k.split(":")[2] not in registered | {"active", "versions", "owner"}
                   for k in all_keys(client, redis_prefix))


@pytest.mark.parametrize("fault", ["postgres_cut", "sigterm"])
def test_postgres_cut_or_stop_signal_mid_publish_cleans_up(
        builder: Builder, net: Network, conn: Conn, store: GraphStore, client: redis.Redis,
        redis_prefix: str, database_url: str, backups: BackupStore, fault: str) -> None:
    old = builder.ok()
    keys_before = all_keys(client, redis_prefix)
    params = psycopg.conninfo.conninfo_to_dict(database_url)
    ctx = RunContext(stage="build-graph", run_id=str(uuid.uuid4()),
                     log=logging.LoggerAdapter(logging.getLogger("test"), {}), stop=StopFlag())
    with TcpProxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)) as px:
        url = psycopg.conninfo.make_conninfo(database_url, host=px.address[0],
                                             port=str(px.address[1]))

        def fail_at_half(written: int) -> None:
            if written >= len(net.nodes) // 2:
                if fault == "postgres_cut":
                    px.block()
                else:
                    ctx.stop.signum = 15

        with pytest.raises((DatabaseError, Interrupted)):
            build_graph(Database(url), store, backups, builder.settings, SPEEDS_KMH, ctx,
                        force=True, after_chunk=fail_at_half)
    assert store.active_version() == old
    assert all_keys(client, redis_prefix) == keys_before
    assert [(r["version"], r["active"]) for r in graph_rows(conn)] == [(old, True)]


# ---------------------------------------------------------------- readers


def test_concurrent_reader_never_sees_a_missing_node_or_mixed_version(
        builder: Builder, conn: Conn, redis_env: dict[str, str], redis_prefix: str,
        store: GraphStore) -> None:
    net = seed_network(conn, n_real=400, n_virtual=400, n_routes=1200)
    old = builder.ok()
    started, stop = threading.Event(), threading.Event()
    seen: list[str] = []
    errors: list[str] = []
    reads = [0]

    def reader() -> None:
        c = graph_store.connect(redis_env["PIPELINE_REDIS_URL"],
                                cluster=redis_env["PIPELINE_REDIS_CLUSTER"] == "true")
        r = GraphStore(c, redis_prefix)
        rng = random.Random(1)
        try:
            while not stop.is_set():
                version = r.require_active()  # resolve once, then read only that version
                got = r.neighbors_many(version, rng.sample(net.nodes, 5))
                errors.extend(f"{n} missing in {version}" for n, e in got.items() if e is None)
                if not seen or seen[-1] != version:
                    seen.append(version)
                reads[0] += 1
                started.set()
        except Exception as exc:  # recorded, asserted below
            errors.append(repr(exc))
        finally:
            started.set()
            c.close()

    during: list[int] = []

    def slow_chunks(_written: int) -> None:
        during.append(reads[0])
        time.sleep(0.005)  # give the reader turns while the new version is half written

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert started.wait(10)
        new = builder.ok(force=True, after_chunk=slow_chunks)
        after = reads[0]
        while reads[0] < after + 20 and thread.is_alive():
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors[:5]
    assert seen == [old, new]  # never back, never a third version
    assert during[-1] > during[0]  # reads really happened while the new version was written


# ---------------------------------------------------------------- retention and rollback


def test_retention_keeps_the_newest_versions_and_the_previous_active(
        builder: Builder, net: Network, conn: Conn, store: GraphStore,
        client: redis.Redis, redis_prefix: str) -> None:
    versions = [builder.ok(force=True) for _ in range(5)]
    assert store.registered() == versions[::-1][:3]
    for v in versions[:2]:
        assert store.version_keys(v) == 0
    for v in versions[2:]:
        assert store.is_complete(v)
    listed = {r["version"]: r for r in list_versions(conn, store)}
    assert [v for v in versions if listed[v]["in_redis"]] == versions[2:]
    assert listed[versions[-1]]["active"] and listed[versions[-1]]["redis_active"]


def test_rollback_and_reload_from_s3_after_retention(
        builder: Builder, net: Network, conn: Conn, store: GraphStore,
        client: redis.Redis) -> None:
    versions = [builder.ok(force=True) for _ in range(4)]
    # plain rollback to the previous version: keys still in Redis
    record = builder.activate(versions[2])
    assert record.status == "success" and not record.extra["reloaded_from_s3"]
    assert store.active_version() == versions[2]
    assert [r["version"] for r in graph_rows(conn) if r["active"]] == [versions[2]]
    assert builder.build().status == "noop"  # a rollback sticks until something new arrives
    # the first version was collected by retention: reload it from the export
    assert store.version_keys(versions[0]) == 0
    record = builder.activate(versions[0])
    assert record.status == "success", record.error
    assert record.extra["reloaded_from_s3"] and record.counts["reloaded_keys"] == len(net.nodes)
    assert store.active_version() == versions[0]
    _, edges = store.neighbors(net.real_stops[0])
    _, same = store.neighbors(net.real_stops[0], versions[3])
    assert edges == same
    # the version we rolled back from survives for readers that just resolved it
    assert store.is_complete(versions[2])
    assert builder.activate(versions[0]).status == "noop"
    assert status_section(conn, store)["consistent"] is True


def test_a_noop_after_a_rollback_names_the_active_version(
        builder: Builder, net: Network, database_url: str, store: GraphStore) -> None:
    """After `graph activate` of an older version, a build with nothing new reported the
    newest build as its graph_version, not the version the routing API serves."""
    first = builder.ok()
    second = builder.ok(force=True)
    assert builder.activate(first).status == "success"
    record = builder.build()
    assert record.status == "noop", record.error
    assert record.extra["graph_version"] == first == store.active_version()
    assert record.extra["built_version"] == second
    assert record.message.startswith(f"{first} is active (rolled back from {second}")
    dry = plan(Database(database_url), store, builder.settings, SPEEDS_KMH)
    assert dry.extra["would_run"] is False and dry.extra["graph_version"] == first
    assert dry.extra["built_version"] == second and f"{first} is active" in dry.message
    # without a rollback the two are one version
    third = builder.ok(force=True)
    record = builder.build()
    assert record.extra["graph_version"] == record.extra["built_version"] == third


def test_activate_unknown_version_and_corrupt_export(
        builder: Builder, net: Network, conn: Conn, store: GraphStore,
        backups: BackupStore) -> None:
    versions = [builder.ok(force=True) for _ in range(4)]
    record = builder.activate("graph-v999")
    assert record.status == "failed" and "unknown graph version" in (record.error or "")
    backups.put_bytes(export_key(versions[0]), gzip.compress(b'{"id":"X","adj":[]}\n'))
    record = builder.activate(versions[0])
    assert record.status == "failed" and "checksum" in (record.error or "")
    assert store.active_version() == versions[3] and store.version_keys(versions[0]) == 0


# ---------------------------------------------------------------- routing and status


def test_routes_equal_networkx_shortest_paths(builder: Builder, net: Network,
                                              store: GraphStore) -> None:
    import networkx as nx

    builder.ok()
    g = to_networkx(net)
    rng = random.Random(3)
    checked = 0
    for _ in range(40):
        a, b = rng.sample(net.nodes, 2)
        try:
            want = nx.shortest_path_length(g, a, b, weight="weight")
        except nx.NetworkXNoPath:
            with pytest.raises(GraphLookupError, match="no path"):
                shortest_path(store, a, b, batch=4)
            continue
        route = shortest_path(store, a, b, batch=4)
        assert route.total_s == pytest.approx(want, abs=1e-2)
        assert route.stops[0] == a and route.stops[-1] == b
        assert sum(leg.weight_s for leg in route.legs) == pytest.approx(route.total_s, abs=1e-2)
        checked += 1
    assert checked >= 20
    same = shortest_path(store, net.nodes[0], net.nodes[0])
    assert same.total_s == 0 and same.stops == [net.nodes[0]]
    with pytest.raises(GraphLookupError, match="not in graph"):
        shortest_path(store, "NOPE", net.nodes[0])


def test_reader_sees_a_collected_version_as_gone(builder: Builder, net: Network,
                                                 store: GraphStore) -> None:
    first = builder.ok()
    store.delete_version(first)
    with pytest.raises(RedisError, match="is not in Redis"):
        store.neighbors_many(first, net.nodes[:2])


def test_status_section_reports_consistency(builder: Builder, net: Network, conn: Conn,
                                            store: GraphStore, client: redis.Redis) -> None:
    empty = status_section(conn, store)
    assert empty["version"] is None and empty["consistent"] is True
    version = builder.ok()
    section = status_section(conn, store)
    assert section["version"] == version and section["redis_pointer"] == version
    assert section["consistent"] and section["nodes"] == len(net.nodes)
    json.dumps(section, default=str)
    client.set(store.pointer_key, "graph-v77")
    section = status_section(conn, store)
    assert section["consistent"] is False and "graph-v77" in section["problem"]
    assert status_section(conn)["redis_pointer"] is None


# ---------------------------------------------------------------- one prefix, one database


@pytest.fixture
def other(other_database_url: str) -> Iterator[Conn]:
    """Another installation's database (its own deployment identity) with a network."""
    with db.connect(other_database_url, autocommit=True) as c:
        seed_network(c, seed=11)
        yield c


def identity(conn: Conn) -> str:
    row = conn.execute("SELECT id::text AS id FROM deployment").fetchone()
    assert row is not None
    return str(row["id"])


def test_a_second_database_on_the_same_prefix_is_refused(
        builder: Builder, net: Network, conn: Conn, store: GraphStore, client: redis.Redis,
        other: Conn, other_database_url: str, backups: BackupStore) -> None:
    """Two installations (staging and production, two cities) left at the default prefix:
    each build-graph took the other's versions for orphans, deleted them and switched the
    pointer to its own graph, so the other's routing API served the wrong network."""
    ours = builder.ok()
    assert store.owner() == identity(conn) != identity(other)
    keys = all_keys(client, store.prefix)
    theirs = Builder(other_database_url, store, backups)
    record = theirs.build()
    assert record.status == "failed" and record.exit_code == 78, record.error
    assert record.error == (
        f"Redis prefix '{store.prefix}' holds the graphs of another database (deployment "
        f"{identity(conn)}; this database is {identity(other)}): give each database a prefix "
        "of its own, [redis] prefix (PIPELINE_REDIS_PREFIX)")
    with pytest.raises(PrefixOwned):  # the dry run says so too, and claims nothing
        plan(Database(other_database_url), store, builder.settings, SPEEDS_KMH)
    # graph activate: the version does not matter, the prefix is refused first
    other.execute("INSERT INTO graph_versions (version, seq, dataset_version, "
                  "virtual_generation_id, nodes, edges, build_ms, checksum, export_key, "
                  "warnings) SELECT %s, 1, version, 1, 1, 1, 1, 'x', 'graphs/x', '{}' "
                  "FROM datasets", (ours,))
    assert theirs.activate(ours).exit_code == 78
    assert store.active_version() == ours and all_keys(client, store.prefix) == keys
    assert [r["version"] for r in graph_rows(other)] == [ours]  # only the row made above
    # their status names the problem; ours stays consistent
    section = status_section(other, store)
    assert section["consistent"] is False and section["problem"] == record.error
    assert section["redis_owner"] == identity(conn) != section["deployment_id"]
    assert status_section(conn, store)["consistent"] is True
    assert builder.build().status == "noop"


def test_a_prefix_with_graphs_and_no_owner_is_claimed_by_its_first_build_that_writes(
        builder: Builder, net: Network, conn: Conn, store: GraphStore, client: redis.Redis,
        other_database_url: str, other: Conn, backups: BackupStore) -> None:
    """An installation upgraded from before owner keys: its graphs are there, the owner key
    is not. A noop build writes nothing and claims nothing; its first build that writes
    claims the prefix and keeps its graph."""
    first = builder.ok()
    client.delete(store.owner_key)  # as every prefix was before the upgrade
    keys = all_keys(client, store.prefix)
    assert status_section(conn, store)["consistent"] is True  # status claims nothing
    assert store.owner() is None
    record = builder.build()
    assert record.status == "noop" and store.active_version() == first, record.error
    assert store.owner() is None and all_keys(client, store.prefix) == keys
    second = builder.ok(force=True)
    assert store.owner() == identity(conn) and store.active_version() == second
    assert Builder(other_database_url, store, backups).build().exit_code == 78
    assert store.active_version() == second


def test_read_only_work_claims_nothing(builder: Builder, net: Network, conn: Conn,
                                       database_url: str, store: GraphStore) -> None:
    """A dry run, status and graph list read the prefix and leave it unclaimed."""
    dry = plan(Database(database_url), store, builder.settings, SPEEDS_KMH)
    assert dry.extra["would_run"] is True
    status_section(conn, store)
    list_versions(conn, store)
    assert store.owner() is None
    builder.ok()
    assert store.owner() == identity(conn)


def test_a_first_build_that_fails_validation_leaves_a_shared_prefix_free(
        builder: Builder, net: Network, conn: Conn, store: GraphStore, client: redis.Redis,
        other: Conn, other_database_url: str, backups: BackupStore) -> None:
    """Two installations on one Redis and prefix: the first build of one fails validation.
    It wrote nothing, so it must not take the prefix either: the other installation, whose
    graph is valid, builds and owns it; the first one is then refused (exit 78) as before."""
    a, b = net.real_stops[:2]
    conn.execute("INSERT INTO routes VALUES ('BAD', %s, %s, 'bus', -5)", (a, b))
    failed = builder.build()
    assert failed.status == "failed" and failed.exit_code == 1, failed.error
    assert all_keys(client, store.prefix) == set()
    theirs = Builder(other_database_url, store, backups).build()
    assert theirs.status == "success", theirs.error
    assert store.owner() == identity(other)
    conn.execute("DELETE FROM routes WHERE id = 'BAD'")
    refused = builder.build()
    assert refused.exit_code == 78 and "holds the graphs of another database" in (
        refused.error or "")
    assert store.active_version() == theirs.extra["graph_version"]


# ---------------------------------------------------------------- one bucket, two databases


@pytest.fixture
def other_store(client: redis.Redis, redis_prefix: str) -> GraphStore:
    """The other installation's Redis prefix (under the test's, so it is cleaned up too)."""
    return GraphStore(client, f"{redis_prefix}:other", chunk_size=16)


def export_state(backups: BackupStore, version: str) -> tuple[bytes, dict[str, Any]]:
    return backups.get_bytes(export_key(version)), backups.get_json(manifest_key(version))


def test_a_second_database_on_the_bucket_never_overwrites_an_export(
        builder: Builder, net: Network, conn: Conn, store: GraphStore, other: Conn,
        other_database_url: str, other_store: GraphStore, backups: BackupStore,
        s3: S3Endpoint, s3_bucket: str) -> None:
    """Two installations backing up into one bucket (their own Redis prefixes): graph versions
    are numbered by each database's sequence, so the second one's graph-v1 export replaced
    the first one's, and the first one's rollback to graph-v1 failed its checksum."""
    ours = builder.ok()
    before = export_state(backups, ours)
    assert before[1]["deployment"] == identity(conn)
    theirs = Builder(other_database_url, other_store, backups)
    record = theirs.build()
    assert record.status == "failed" and record.exit_code == 78, record.error
    assert record.error == (
        f"S3 bucket '{s3_bucket}' holds the graph export graphs/{ours}/ of another database "
        f"(deployment {identity(conn)}; this database is {identity(other)}): give each "
        "database a bucket or a key prefix of its own, [s3] bucket or [s3] prefix "
        "(PIPELINE_S3_PREFIX)")
    assert export_state(backups, ours) == before
    assert other_store.registered() == [] and graph_rows(other) == []  # nothing written
    # with a key prefix of its own it builds, and leaves our exports alone
    prefixed = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                   secure=s3.secure, region=s3.region, prefix="other")
    theirs = Builder(other_database_url, other_store, prefixed)
    first_of_theirs = theirs.ok()
    assert export_state(backups, ours) == before
    assert prefixed.get_json(manifest_key(first_of_theirs))["deployment"] == identity(other)
    assert sorted(backups.list("other/")) == [
        f"other/{export_key(first_of_theirs)}", f"other/{manifest_key(first_of_theirs)}"]
    # ours rolls back to its first graph, reloaded from its own export, after retention
    for _ in range(3):
        builder.ok(force=True)
    assert store.version_keys(ours) == 0
    record = builder.activate(ours)
    assert record.status == "success" and record.extra["reloaded_from_s3"], record.error


def test_a_failed_publish_never_deletes_another_databases_export(
        builder: Builder, net: Network, conn: Conn, other: Conn, other_database_url: str,
        other_store: GraphStore, backups: BackupStore) -> None:
    """The other database publishes the same version number while this one writes its Redis
    keys, then this one fails: its cleanup deleted the prefix graphs/<version>/, which held
    the other database's export by then."""
    theirs = Builder(other_database_url, other_store, backups)
    published: list[str] = []

    def meanwhile(written: int) -> None:
        if not published:
            published.append(builder.ok())
            raise Boom("injected")

    record = theirs.build(after_chunk=meanwhile)
    assert record.status == "failed" and "injected" in (record.error or ""), record.error
    [version] = published
    assert backups.get_json(manifest_key(version))["deployment"] == identity(conn)
    raw = gzip.decompress(backups.get_bytes(export_key(version)))
    [row] = graph_rows(conn)
    assert hashlib.sha256(raw).hexdigest() == row["checksum"]
    assert other_store.registered() == []  # its own Redis keys are gone all the same
