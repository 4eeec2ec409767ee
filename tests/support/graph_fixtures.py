"""Seed data for build-graph tests and benchmarks: an active dataset with real stops, routes and
flights plus one virtual generation, written straight into PostgreSQL (the contract of
sql/002_datasets.sql and sql/003_virtual.sql), and an independent networkx model of it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

SPEEDS_KMH = {"walk": 5.0, "bus": 40.0, "train": 90.0, "ferry": 30.0, "flight": 700.0,
              "virtual": 50.0}


@dataclass
class Network:
    dataset_version: str
    generation_id: int
    real_stops: list[str]
    virtual_stops: list[str]
    # (route id, from, to, mode, distance_km or None, [(departure, arrival), ...])
    routes: list[tuple[str, str, str, str, float | None, list[tuple[time, time]]]] = field(
        default_factory=list)
    # (route id, from, to, mode, distance_km, travel_time_s)
    virtual_routes: list[tuple[str, str, str, str, float, float]] = field(default_factory=list)

    @property
    def nodes(self) -> list[str]:
        return self.real_stops + self.virtual_stops


def add_dataset(conn: psycopg.Connection[Any], version: str = "ds-v1", *, seq: int = 1,
                active: bool = True) -> str:
    if active:
        conn.execute("UPDATE datasets SET active = false WHERE active")
    conn.execute(
        "INSERT INTO datasets (version, seq, hash, backup_prefix, active) "
        "VALUES (%s, %s, %s, %s, %s)",
        (version, seq, f"hash-{version}", f"datasets/{version}/", active))
    return version


def add_generation(conn: psycopg.Connection[Any], dataset_version: str) -> int:
    row = conn.execute(
        "INSERT INTO virtual_generations (dataset_version, settings) VALUES (%s, %s) "
        "RETURNING id", (dataset_version, Jsonb({"k": 4}))).fetchone()
    assert row is not None
    return int(row["id"] if isinstance(row, dict) else row[0])


def seed_network(conn: psycopg.Connection[Any], *, n_real: int = 30, n_virtual: int = 20,
                 n_routes: int = 60, seed: int = 7, dataset_version: str = "ds-v1",
                 isolated_real: int = 0) -> Network:
    """A random but deterministic network. ``isolated_real`` extra real stops get no route."""
    rng = random.Random(seed)
    add_dataset(conn, dataset_version)
    real = [f"S{i:03d}" for i in range(n_real)]
    virt = [f"V:MAIN:{i}:{i * 3}" for i in range(n_virtual)]
    isolated = [f"ISO{i}" for i in range(isolated_real)]
    for sid in real + isolated:
        conn.execute("INSERT INTO stops (id, name, latitude, longitude) VALUES (%s, %s, %s, %s)",
                     (sid, f"stop {sid}", 60 + rng.random(), 24 + rng.random()))
    for vid in virt:
        conn.execute("INSERT INTO virtual_stops (id, latitude, longitude, kind, dataset_version) "
                     "VALUES (%s, %s, %s, 'MAIN_GRID', %s)",
                     (vid, 60 + rng.random(), 24 + rng.random(), dataset_version))
    net = Network(dataset_version, 0, real + isolated, virt)
    modes = ["bus", "train", "flight", "ferry"]
    for i in range(n_routes):
        a, b = rng.sample(real, 2)
        mode = rng.choice(modes)
        dist = round(rng.uniform(1, 300), 2)
        flights: list[tuple[time, time]] = []
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):
                dep = rng.randint(0, 86399)
                dur = rng.randint(600, 6 * 3600)
                arr = (dep + dur) % 86400
                flights.append((_t(dep), _t(arr)))
        distance: float | None = dist if (flights == [] or rng.random() < 0.7) else None
        rid = f"R{i:03d}"
        net.routes.append((rid, a, b, mode, distance, flights))
        conn.execute("INSERT INTO routes (id, from_stop_id, to_stop_id, mode, distance_km) "
                     "VALUES (%s, %s, %s, %s, %s)", (rid, a, b, mode, distance))
        for j, (dep_t, arr_t) in enumerate(flights):
            conn.execute("INSERT INTO flights (id, route_id, departure, arrival, days_of_week) "
                         "VALUES (%s, %s, %s, %s, '1234567')", (f"F{i:03d}-{j}", rid, dep_t,
                                                                 arr_t))
    k = 0
    for vid in virt:
        for other in rng.sample(real + virt[:5], 2):
            if other == vid:
                continue
            dist = round(rng.uniform(1, 60), 3)
            tt = round(dist / SPEEDS_KMH["virtual"] * 3600, 1)
            for a, b in ((vid, other), (other, vid)):
                rid = f"VR{k:04d}"
                k += 1
                net.virtual_routes.append((rid, a, b, "virtual", dist, tt))
                add_virtual_route(conn, rid, a, b, dist, tt, dataset_version)
    net.generation_id = add_generation(conn, dataset_version)
    return net


def add_virtual_route(conn: psycopg.Connection[Any], rid: str, a: str, b: str, dist: float,
                      travel_time_s: float, dataset_version: str, mode: str = "virtual") -> None:
    conn.execute("INSERT INTO virtual_routes (id, from_stop_id, to_stop_id, mode, distance_km, "
                 "travel_time_s, dataset_version) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                 (rid, a, b, mode, dist, travel_time_s, dataset_version))


def _t(seconds: int) -> time:
    return time(seconds // 3600, seconds % 3600 // 60, seconds % 60)


def _secs(t: time) -> int:
    return t.hour * 3600 + t.minute * 60 + t.second


def expected_weight(distance_km: float | None, mode: str,
                    flights: list[tuple[time, time]]) -> float:
    """The weight rule, computed independently of the stage's SQL and numpy."""
    if flights:
        durations = []
        for dep, arr in flights:
            d = datetime.combine(datetime.min, arr) - datetime.combine(datetime.min, dep)
            durations.append(d.total_seconds() % 86400 or 86400)  # equal times: a day
        return min(durations)
    assert distance_km is not None
    return distance_km / SPEEDS_KMH[mode] * 3600


def to_networkx(net: Network) -> Any:
    """The network as a networkx.DiGraph with ``weight`` in seconds (parallel edges: minimum)."""
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(net.nodes)
    edges = [(a, b, round(expected_weight(d, m, f), 3)) for _, a, b, m, d, f in net.routes]
    edges += [(a, b, tt) for _, a, b, _, _, tt in net.virtual_routes]
    for a, b, w in edges:
        if not g.has_edge(a, b) or g[a][b]["weight"] > w:
            g.add_edge(a, b, weight=w)
    return g
