"""gen-virtual (Worker 2): fill the map around the active dataset with virtual entities.

Virtual stops lie on three global grids (MAIN, CITY around major cities, AIRPORT around
airports), so their ids derive from kind and grid cell and every rerun gives the same rows.
Each virtual stop is linked to its k nearest stops (and each real stop none of them picks to
its nearest virtual stop) by virtual routes in both directions, and each non-walking route
gets one frequency-based virtual flight, whose service is stored once per mode
(``virtual_flights`` is a view). One transaction replaces the previous generation in place;
the S3 backup is uploaded inside it, before the commit.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql
from psycopg.copy import QueuedLibpqWriter
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_incrementing,
)

from .. import db, geo
from ..adapters.backups import BackupStore
from ..errors import BackupError, DatabaseError, ValidationError
from ..modes import speed_table
from ..readahead import ReadAhead
from ..runner import DRY_RUN, NOOP, SKIPPED, SUCCESS, RunContext, StageResult
from ..settings import VirtualSettings

KINDS = ("MAIN_GRID", "CITY_GRID", "AIRPORT_GRID")
ID_PREFIX = {"MAIN_GRID": "V:MAIN", "CITY_GRID": "V:CITY", "AIRPORT_GRID": "V:AIRPORT"}
MODES = ("virtual", "walk")
FLIGHT_MODES = ("virtual",)  # the route modes whose routes have flights
DAYS = "1234567"
CHUNK_ROWS = 200_000
UNREACHED_SAMPLE = 20
NULL = "\\N"



# ---------------------------------------------------------------- inputs and the plan


@dataclass
class RealStops:
    """The active dataset's stops as arrays, ordered by id."""

    ids: list[str]
    lat: geo.FloatArray
    lon: geo.FloatArray
    is_airport: npt.NDArray[np.bool_]
    city: list[str]

    @property
    def size(self) -> int:
        return len(self.ids)

    @classmethod
    def from_rows(cls, rows: list[tuple[Any, ...]]) -> RealStops:
        if not rows:
            return cls([], np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool), [])
        ids, lat, lon, airport, city = zip(*rows, strict=True)
        return cls(list(ids), np.asarray(lat, dtype=np.float64),
                   np.asarray(lon, dtype=np.float64), np.asarray(airport, dtype=bool),
                   [c.strip() for c in city])


@dataclass
class Anchors:
    """Centres of dense grids: major cities or airports."""

    names: list[str]
    lat: geo.FloatArray
    lon: geo.FloatArray

    @property
    def size(self) -> int:
        return len(self.names)


@dataclass
class VirtualPlan:
    """Everything one generation writes, computed in memory from the real stops.

    Routes index the combined array ``real stops + virtual stops``.
    """

    real: RealStops
    ids: list[str]
    lat: geo.FloatArray
    lon: geo.FloatArray
    kind: list[str]
    anchor: list[str | None]
    route_from: geo.IntArray
    route_to: geo.IntArray
    distance_km: geo.FloatArray
    travel_time_s: geo.FloatArray
    walk: npt.NDArray[np.bool_]
    unreached: list[str]
    anchors: dict[str, int]
    thresholds_km: dict[str, float]
    by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def n_routes(self) -> int:
        return len(self.route_from)

    @property
    def n_flights(self) -> int:
        return int((~self.walk).sum())

    def counts(self) -> dict[str, Any]:
        walk = int(self.walk.sum())
        return {
            "virtual_stops": len(self.ids),
            "virtual_routes": self.n_routes,
            "virtual_flights": self.n_flights,
            "unreached_real_stops": len(self.unreached),
            "by_kind": {k: self.by_kind.get(k, 0) for k in KINDS},
            "routes_by_mode": {"virtual": self.n_routes - walk, "walk": walk},
        }


def major_cities(real: RealStops, s: VirtualSettings) -> Anchors:
    """Named cities with at least ``city_min_stops`` stops and one within ``city_radius_km``
    of their centre, then dense clusters of city-less stops (grid cells ``city_radius_km``
    wide holding that many stops, or stops of sparser cells with that many such stops within
    half a cell), both at their spherical centroid. A cluster is named
    ``cluster:<row>:<col>`` after its cell. Names are compared ignoring case, spacing and
    Unicode form; a
    city is named as its first stop spells it. A name is a city per place it is used in: its
    stops chained by steps of ``2 × city_radius_km`` at most (Springfield in two states is two
    cities; their centroid lies in no city). The stops of a place that is no city join the
    clusters like stops without a city."""
    city = np.asarray(real.city, dtype=object)
    named = city != ""
    names: list[str] = []
    lats: list[geo.FloatArray] = []
    lons: list[geo.FloatArray] = []
    loose = ~named
    if named.any() and s.city_radius_km > 0:
        lat, lon = real.lat[named], real.lon[named]
        # One city per name whatever its case, spacing and Unicode form: a feed that spells
        # it 'Helsinki' and 'HELSINKI', or 'Zürich' with a precomposed ü and with u and a
        # combining diaeresis, would otherwise split it below city_min_stops. (Unicode's
        # canonical caseless match: NFD, casefold, NFD.)
        key = np.asarray([unicodedata.normalize("NFD", unicodedata.normalize(
            "NFD", " ".join(c.split())).casefold()) for c in city[named]], dtype=object)
        inverse = np.unique(key, return_inverse=True)[1].ravel()
        place = geo.chained(inverse, lat, lon, 2 * s.city_radius_km)
        _, first, group, counts = np.unique(place, return_index=True, return_inverse=True,
                                            return_counts=True)
        group = group.ravel()
        clat, clon = geo.group_centroids(group, lat, lon, len(counts))
        # A region's name on stops strung along 1,000 km of coast chains into one place whose
        # centre lies far from all of them: a place with no stop within city_radius_km of its
        # centre is no city.
        km = geo.haversine_km(lat, lon, clat[group], clon[group])
        nearest = np.full(len(counts), np.inf)
        np.minimum.at(nearest, group, km)
        big = (counts >= s.city_min_stops) & (nearest <= s.city_radius_km)
        names += [str(n) for n in city[named][first[big]]]
        lats.append(clat[big])
        lons.append(clon[big])
        # The stops of a place too small to be a city count towards a dense cluster, as if
        # they had no city: a metro area whose city column names 30 suburbs of 6 stops each
        # is as dense as the same stops without one.
        loose[np.flatnonzero(named)[~big[group]]] = True
    if loose.any():
        grid = geo.Grid(max(s.city_radius_km, s.city_spacing_km))
        llat, llon = real.lat[loose], real.lon[loose]
        rows, cols = grid.nearest_cells(llat, llon)
        keys = geo.cell_keys(rows, cols)
        _keys, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        member = counts[inverse.ravel()] >= s.city_min_stops
        # A cell boundary can cut a dense place in parts, none of them dense (12 stops within
        # 100 m, 6 in each cell): a stop of a sparse cell with city_min_stops stops of sparse
        # cells within half a cell joins the cluster of its cell. Dense cells stay as they are.
        sparse = np.flatnonzero(~member)
        if sparse.size >= s.city_min_stops:
            from scipy.spatial import cKDTree

            xyz = geo.unit_vectors(llat[sparse], llon[sparse]).reshape(-1, 3)
            near = cKDTree(xyz).query_ball_point(
                xyz, float(geo.km_to_chord(grid.spacing_km / 2)), return_length=True)
            member[sparse[np.asarray(near) >= s.city_min_stops]] = True
        _keys, first, inverse = np.unique(keys[member], return_index=True,
                                          return_inverse=True)
        rows, cols = rows[member], cols[member]
        clat, clon = geo.group_centroids(inverse.ravel(), llat[member], llon[member],
                                         len(first))
        names += [f"cluster:{r}:{c}" for r, c in zip(rows[first].tolist(),
                                                      cols[first].tolist(), strict=True)]
        lats.append(clat)
        lons.append(clon)
    if not names:
        return Anchors([], np.zeros(0), np.zeros(0))
    return Anchors(names, np.concatenate(lats), np.concatenate(lons))


def airports(real: RealStops) -> Anchors:
    idx = np.flatnonzero(real.is_airport)
    return Anchors([real.ids[i] for i in idx.tolist()], real.lat[idx], real.lon[idx])


def dense_grid(grid: geo.Grid, anchors: Anchors, radius_km: float
               ) -> tuple[geo.IntArray, geo.IntArray, geo.IntArray]:
    """Cells within ``radius_km`` of any anchor, each once, owned by its nearest anchor."""
    if anchors.size == 0 or radius_km <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    owner, rows, cols, dist = grid.cells_near(anchors.lat, anchors.lon, radius_km)
    keys = geo.cell_keys(rows, cols)
    order = np.lexsort((owner, dist, keys))  # by cell, then nearest anchor, then anchor order
    first = np.ones(order.size, dtype=bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    sel = order[first]
    return rows[sel], cols[sel], owner[sel]


def _estimate(real: RealStops, cities: Anchors, ports: Anchors, s: VirtualSettings) -> int:
    """An upper bound on the grid points before filtering (cheap: no points are built)."""
    main = geo.Grid(s.main_spacing_km).count_near(real.lat, real.lon, s.grid_reach_km)

    def per_anchor(radius: float, spacing: float) -> int:
        return int((2 * radius / spacing + 3) ** 2) if radius > 0 else 0

    return (main + cities.size * per_anchor(s.city_radius_km, s.city_spacing_km)
            + ports.size * per_anchor(s.airport_radius_km, s.airport_spacing_km))


def check_input(real: RealStops, version: str) -> None:
    # One stop is a network too: the grids lie within reach of the stops, not in a box
    # spanned by them.
    if real.size == 0:
        raise ValidationError(
            f"active dataset {version} has 0 stops; gen-virtual has nothing to place virtual "
            "stops around; nothing was written")


def plan_virtual(real: RealStops, s: VirtualSettings, version: str = "",
                 check_stop: Callable[[], None] = lambda: None) -> VirtualPlan:
    """Compute the virtual stops, routes and flights for ``real`` (pure, deterministic)."""
    check_input(real, version)
    cities, ports = major_cities(real, s), airports(real)
    estimate = _estimate(real, cities, ports, s)
    if estimate > s.max_virtual_stops:
        raise ValidationError(
            f"the grids would hold about {estimate:,} points, more than [virtual] "
            f"max_virtual_stops = {s.max_virtual_stops:,}; raise it or widen the spacings; "
            "nothing was written")
    frac = s.threshold_fraction
    block_lat, block_lon = [real.lat], [real.lon]
    ids: list[str] = []
    kinds: list[str] = []
    anchor: list[str | None] = []
    lat_parts: list[geo.FloatArray] = []
    lon_parts: list[geo.FloatArray] = []
    by_kind: dict[str, int] = {}
    thresholds: dict[str, float] = {}
    main = geo.Grid(s.main_spacing_km)
    levels: list[tuple[str, geo.Grid, Anchors | None, float]] = [
        ("AIRPORT_GRID", geo.Grid(s.airport_spacing_km), ports, s.airport_radius_km),
        ("CITY_GRID", geo.Grid(s.city_spacing_km), cities, s.city_radius_km),
        ("MAIN_GRID", main, None, 0.0),
    ]
    # Densest grid first: each grid drops points close to real stops or to a denser grid.
    for kind, grid, owners, radius in levels:
        if owners is None:
            # Only around the real stops: the box around two continents is mostly ocean.
            rows, cols = grid.cells_within(real.lat, real.lon, s.grid_reach_km)
            owner_idx = None
        else:
            rows, cols, owner_idx = dense_grid(grid, owners, radius)
        lat, lon = grid.points(rows, cols)
        threshold = frac * grid.spacing_km
        thresholds[kind] = threshold
        blockers = geo.PointIndex(np.concatenate(block_lat), np.concatenate(block_lon))
        keep = ~blockers.within(lat, lon, threshold)
        rows, cols, lat, lon = rows[keep], cols[keep], lat[keep], lon[keep]
        prefix = ID_PREFIX[kind]
        ids += [f"{prefix}:{r}:{c}" for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]
        kinds += [kind] * len(rows)
        if owners is None or owner_idx is None:
            anchor += [None] * len(rows)
        else:
            anchor += [owners.names[i] for i in owner_idx[keep].tolist()]
        lat_parts.append(lat)
        lon_parts.append(lon)
        block_lat.append(lat)
        block_lon.append(lon)
        by_kind[kind] = len(rows)
        check_stop()
    vlat, vlon = np.concatenate(lat_parts), np.concatenate(lon_parts)
    # Rows go out in id order (the tables' primary-key order): the index builds after the
    # load find them sorted, and the backups list them in a stable order.
    order = _id_order(ids)
    ids = [ids[i] for i in order.tolist()]
    kinds = [kinds[i] for i in order.tolist()]
    anchor = [anchor[i] for i in order.tolist()]
    vlat, vlon = vlat[order], vlon[order]
    frm, to, km = _routes(real, ids, vlat, vlon, s)
    check_stop()
    walk = km <= s.walk_max_km
    speeds = speed_table(s.speeds_kmh)
    speed = np.where(walk, speeds["walk"], speeds["virtual"])
    reached = np.zeros(real.size, dtype=bool)
    reached[frm[frm < real.size]] = True
    unreached = [real.ids[i] for i in np.flatnonzero(~reached).tolist()]
    return VirtualPlan(
        real=real, ids=ids, lat=vlat, lon=vlon, kind=kinds, anchor=anchor,
        route_from=frm, route_to=to, distance_km=km,
        travel_time_s=np.round(km / speed * 3600.0, 1), walk=walk, unreached=unreached,
        anchors={"cities": sum(not n.startswith("cluster:") for n in cities.names),
                 "clusters": sum(n.startswith("cluster:") for n in cities.names),
                 "airports": ports.size},
        thresholds_km=thresholds, by_kind=by_kind,
    )


def _id_order(ids: list[str], suffix: str = "") -> geo.IntArray:
    """The permutation that sorts ``ids`` (each followed by ``suffix``) by code point, which
    is byte order in UTF-8 and the order of PostgreSQL's C and C.UTF-8 collations."""
    # Python's sort, not numpy's: a numpy string array gives every id the width of the
    # longest, and one stop id of 2,000 characters (sync-odata accepts them) made the arrays
    # of 50,000 ids 400 MB each. Sorted Python strings cost their own length, as fast.
    keys = [i + suffix for i in ids] if suffix else ids
    return np.fromiter(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64,
                       count=len(keys))


def _ranks(order: geo.IntArray) -> geo.IntArray:
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size, dtype=np.int64)
    return rank


def _routes(real: RealStops, vids: list[str], vlat: geo.FloatArray, vlon: geo.FloatArray,
            s: VirtualSettings) -> tuple[geo.IntArray, geo.IntArray, geo.FloatArray]:
    """Directed routes (both directions) from kNN pairs (and, for a virtual stop next to a
    real stop, its k nearest virtual stops), and from each real stop that none of them reaches
    to its nearest virtual stop, in route-id order.

    A route id is ``VR:<from>><to>``, so sorting by (rank of ``from + '>'``, rank of ``to``)
    is sorting by id (exactly so while no stop id contains '>'), without building the ids.
    """
    n_real, n_virtual = real.size, len(vlat)
    if n_virtual == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    xyz = np.vstack((geo.unit_vectors(real.lat, real.lon), geo.unit_vectors(vlat, vlon)))
    sources = np.arange(n_real, n_real + n_virtual, dtype=np.int64)
    a, b, km = geo.knn_pairs(xyz, sources, s.k, s.max_route_km)
    # Pairs hold a < b, so a real stop (index below n_real) is always `a`.
    with_real = a < n_real
    reached = np.zeros(n_real, dtype=bool)
    reached[a[with_real]] = True
    lone = np.flatnonzero(~reached)
    star = np.unique(b[with_real]) - n_real
    if lone.size or star.size:
        virtual = geo.PointIndex(vlat, vlon, xyz[n_real:])
    if star.size:
        # Where real stops are dense, a virtual stop's k nearest can all be real: that star,
        # joined to no other virtual stop, is an island of the graph. A virtual stop next to a
        # real stop also links its k nearest virtual stops.
        va, vb, vkm = geo.knn_pairs(virtual.xyz, star, s.k, s.max_route_km, tree=virtual.tree)
        a, b = np.concatenate((a, va + n_real)), np.concatenate((b, vb + n_real))
        km = np.concatenate((km, vkm))
        _, first = np.unique(a * np.int64(n_real + n_virtual) + b, return_index=True)
        a, b, km = a[first], b[first], km[first]
    if lone.size:
        # A real stop that no virtual stop counts among its k nearest (in a dense city, or one
        # of several stops at one place) would be an island unless a real route leaves it:
        # link it to its nearest virtual stop.
        near, idx = virtual.nearest_xyz(xyz[lone], 1, s.max_route_km)
        hit = idx[:, 0] < n_virtual
        a = np.concatenate((a, lone[hit]))
        b = np.concatenate((b, idx[hit, 0] + n_real))
        km = np.concatenate((km, near[hit, 0]))
    frm = np.concatenate((a, b))
    to = np.concatenate((b, a))
    both = np.round(np.concatenate((km, km)), 3).astype(np.float64)
    all_ids = real.ids + vids
    n = len(all_ids)
    key = _ranks(_id_order(all_ids, ">"))[frm] * n + _ranks(_id_order(all_ids))[to]
    order = np.argsort(key, kind="stable")
    return frm[order], to[order], both[order]


# ---------------------------------------------------------------- reading


@dataclass
class Snapshot:
    version: str | None
    generation: dict[str, Any] | None
    real: RealStops | None


def read_snapshot(conn: psycopg.Connection[Any], *, force: bool) -> Snapshot:
    """The active dataset, its newest generation and (when needed) its stops, read in one
    REPEATABLE READ snapshot so the stops belong to the version read."""
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # the caller discards conn
    conn.read_only = True
    with db.wrap_errors("reading the active dataset"), conn.transaction():
        ds = conn.execute(db.query("gen_virtual", "active_dataset")).fetchone()
        if ds is None:
            return Snapshot(None, None, None)
        version = str(ds["version"])
        gen = conn.execute(db.query("gen_virtual", "latest_generation"),
                           {"version": version}).fetchone()
        if gen is not None and not force:
            return Snapshot(version, dict(gen), None)
        with conn.cursor(row_factory=tuple_row) as cur:
            rows = cur.execute(db.query("gen_virtual", "read_stops")).fetchall()
        return Snapshot(version, dict(gen) if gen else None, RealStops.from_rows(rows))


def recorded_settings(s: VirtualSettings, plan: VirtualPlan | None = None) -> dict[str, Any]:
    out = dataclasses.asdict(s)
    if plan is not None:
        out["thresholds_km"] = plan.thresholds_km
    return out


def _settings_changed(gen: dict[str, Any], s: VirtualSettings) -> bool:
    recorded = {k: v for k, v in (gen.get("settings") or {}).items() if k != "thresholds_km"}
    return recorded != json.loads(json.dumps(dataclasses.asdict(s)))


# ---------------------------------------------------------------- COPY text


def stop_lines(plan: VirtualPlan, version: str) -> Iterator[str]:
    """COPY text of ``virtual_stops`` in chunks."""
    v = db.copy_escape(version)
    for lo in range(0, len(plan.ids), CHUNK_ROWS):
        hi = lo + CHUNK_ROWS
        rows = zip(plan.ids[lo:hi], plan.lat[lo:hi].tolist(), plan.lon[lo:hi].tolist(),
                   plan.kind[lo:hi], plan.anchor[lo:hi], strict=True)
        yield "".join(
            f"{i}\t{la!r}\t{lo_!r}\t{k}\t{NULL if a is None else db.copy_escape(a)}\t{v}\n"
            for i, la, lo_, k, a in rows)


def _escaped_ids(plan: VirtualPlan) -> list[str]:
    return [db.copy_escape(i) for i in plan.real.ids] + plan.ids


def route_lines(plan: VirtualPlan, version: str, s: VirtualSettings) -> Iterator[str]:
    """COPY text of ``virtual_routes``: id ``VR:<from>><to>``, mode, km, seconds."""
    ids = _escaped_ids(plan)
    v = db.copy_escape(version)
    for lo in range(0, plan.n_routes, CHUNK_ROWS):
        hi = lo + CHUNK_ROWS
        rows = zip(plan.route_from[lo:hi].tolist(), plan.route_to[lo:hi].tolist(),
                   plan.walk[lo:hi].tolist(), plan.distance_km[lo:hi].tolist(),
                   plan.travel_time_s[lo:hi].tolist(), strict=True)
        yield "".join(
            f"VR:{ids[f]}>{ids[t]}\t{ids[f]}\t{ids[t]}\t{'walk' if w else 'virtual'}"
            f"\t{km!r}\t{sec!r}\t{v}\n"
            for f, t, w, km, sec in rows)


def frequency_lines(generation_id: int, version: str, s: VirtualSettings) -> Iterator[str]:
    """COPY text of ``virtual_frequencies``: the service of each flight mode, once."""
    v = db.copy_escape(version)
    yield "".join(f"{generation_id}\t{mode}\t{s.service_start}:00\t{s.service_end}:00"
                  f"\t{s.headway_s}\t{DAYS}\t{v}\n" for mode in FLIGHT_MODES)


def copy_text(plan: VirtualPlan, version: str, s: VirtualSettings, generation_id: int
              ) -> list[tuple[str, Iterator[str]]]:
    """Each virtual table with the generator of its COPY text, in writing order."""
    return [("virtual_stops", stop_lines(plan, version)),
            ("virtual_routes", route_lines(plan, version, s)),
            ("virtual_frequencies", frequency_lines(generation_id, version, s))]


# ---------------------------------------------------------------- writing


TABLES = (
    ("virtual_stops", ("id", "latitude", "longitude", "kind", "anchor_id", "dataset_version")),
    ("virtual_routes", ("id", "from_stop_id", "to_stop_id", "mode", "distance_km",
                        "travel_time_s", "dataset_version")),
    ("virtual_frequencies", ("generation_id", "mode", "start_time", "end_time", "headway_s",
                             "days_of_week", "dataset_version")),
)
LOCK_TIMEOUT_S: float = 2  # seconds per attempt to lock the virtual tables
LOCK_ATTEMPTS = 30  # then give up (nothing is written)


@dataclass
class _Written:
    path: str
    rows: int = 0
    sha256: str = ""
    size: int = 0


AHEAD_CHUNKS = 3


class _TextAhead:
    """Formats the COPY text of every table, in order, in a thread up to ``AHEAD_CHUNKS``
    chunks ahead: the text of the next chunk (and of the next table) is being built while
    PostgreSQL works through this one, instead of after it."""

    def __init__(self, tables: list[tuple[str, Iterator[str]]]) -> None:
        self._items = ReadAhead(self._encode(tables), AHEAD_CHUNKS, "gen-virtual-text")

    @staticmethod
    def _encode(tables: list[tuple[str, Iterator[str]]]
                ) -> Iterator[tuple[str, bytes | None, int]]:
        for table, chunks in tables:
            for chunk in chunks:
                data = chunk.encode()
                yield table, data, data.count(b"\n")
            yield table, None, 0  # the end of this table

    def chunks(self, table: str) -> Iterator[tuple[bytes, int]]:
        """The encoded chunks of ``table`` (which must be the next one) and their rows."""
        for name, data, rows in self._items:
            assert name == table, (name, table)
            if data is None:
                return
            yield data, rows

    def close(self) -> None:
        self._items.close()


def _backup_write(gz: gzip.GzipFile, digest: Any, data: bytes) -> None:
    gz.write(data)  # zlib and hashlib release the GIL on buffers this size
    digest.update(data)


def _copy_table(conn: psycopg.Connection[Any], statement: sql.SQL | sql.Composed,
                chunks: Iterator[tuple[bytes, int]], path: str, ctx: RunContext,
                expected: int, table: str) -> _Written:
    """Stream chunks into COPY and, byte for byte, into a gzip file for the backup.

    Three things overlap: psycopg's queued writer sends to the server from its own thread,
    the backup is compressed and hashed in another, and the text is formatted in a third
    (``_TextAhead``); this thread only hands chunks on and polls the stop flag.
    """
    out = _Written(path=path)
    digest = hashlib.sha256()
    with ExitStack() as stack:
        raw: IO[bytes] = stack.enter_context(open(path, "wb"))
        gz = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1,
                                               mtime=0))
        bar = stack.enter_context(ctx.progress(f"writing {table}", expected))
        cur = stack.enter_context(conn.cursor())
        copy = stack.enter_context(cur.copy(statement, writer=QueuedLibpqWriter(cur)))
        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="gen-virtual-gz"))
        pending: Future[None] | None = None
        for data, n in chunks:
            copy.write(data)
            if pending is not None:
                pending.result()
            pending = pool.submit(_backup_write, gz, digest, data)
            out.rows += n
            bar.advance(n)
            ctx.check_stop()
        if pending is not None:
            pending.result()
    out.sha256 = digest.hexdigest()
    out.size = os.path.getsize(path)
    return out


def _upload_failed(exc: BackupError) -> BackupError:
    return BackupError(f"{exc}; nothing was written (the database transaction was rolled "
                       "back)")


def _raise_failed_upload(uploads: list[Future[None]]) -> None:
    """Fail fast when an upload already failed, instead of after the last COPY."""
    for upload in uploads:
        if upload.done():
            try:
                upload.result()
            except BackupError as exc:
                raise _upload_failed(exc) from None


def _q(name: str, /, **parts: sql.Composable) -> sql.SQL | sql.Composed:
    query = db.query("gen_virtual", name)
    return query.format(**parts) if parts else query


def _lock_tables(conn: psycopg.Connection[Any], ctx: RunContext) -> None:
    """Take the virtual tables for the write, waiting LOCK_TIMEOUT_S at a time (a waiting
    ACCESS EXCLUSIVE request queues every new reader behind it, so it must not wait long)."""

    held_by = ["nobody now"]

    def busy(state: RetryCallState) -> None:
        held_by[0] = ", ".join(f"{r['who']} (pid {r['pid']})" for r in conn.execute(
            _q("lock_holders")).fetchall()) or "nobody now"
        ctx.log.info("virtual tables busy (attempt %d of %d; held by %s)",
                     state.attempt_number, LOCK_ATTEMPTS, held_by[0])
        ctx.check_stop()

    try:
        for attempt in Retrying(retry=retry_if_exception_type(psycopg.errors.LockNotAvailable),
                                stop=stop_after_attempt(LOCK_ATTEMPTS),
                                wait=wait_incrementing(0.1, 0.1, max=1.0), before_sleep=busy):
            with attempt, conn.transaction():  # a savepoint: a timeout undoes only this attempt
                db.set_local(conn, "lock_timeout", f"{LOCK_TIMEOUT_S}s")
                conn.execute(_q("lock_tables"))
    except RetryError:
        raise DatabaseError(
            f"could not lock the virtual tables in {LOCK_ATTEMPTS} attempts of "
            f"{LOCK_TIMEOUT_S} s (long-running readers; last held by {held_by[0]}); nothing "
            "was written") from None
    db.set_local(conn, "lock_timeout", "0")


def write_generation(database: db.Database, backups: BackupStore, s: VirtualSettings,
                     ctx: RunContext, version: str, plan: VirtualPlan, started: float
                     ) -> tuple[int, str]:
    """Replace the virtual tables' rows with ``plan`` and back it up, in one transaction.

    The tables are locked, emptied with TRUNCATE and loaded with COPY FREEZE in place, so
    everything attached to them (views, the ``virtual_flights`` view among them, grants,
    triggers) stays as it is; their indexes are dropped for the load and built again from
    their catalog definitions after it. Then the generation row and the dataset stats, the S3
    upload (manifest last) and COMMIT. A failed upload rolls the transaction back, so no
    generation ever points at a missing backup; a failed commit leaves only an unreferenced
    ``gen-<id>/`` folder in S3 (sequence ids are never reused).
    """
    counts = plan.counts()
    with ExitStack() as stack:
        conn = stack.enter_context(database.connect(name=(
            f"pipeline gen-virtual {ctx.run_id[:8]}")))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="gen-virtual-"))
        with db.wrap_errors("writing the virtual generation"), conn.transaction():
            db.long_transaction(conn)  # it waits for the S3 uploads before COMMIT
            row = conn.execute(db.query("gen_virtual", "lock_dataset"),
                               {"version": version}).fetchone()
            if row is None or not row["active"]:
                raise DatabaseError(
                    f"dataset {version} stopped being active during generation; nothing was "
                    "written; run gen-virtual again for the new active dataset")
            # ACCESS EXCLUSIVE from here to the commit: readers wait for the new rows
            # rather than see the tables empty (TRUNCATE is not MVCC-safe).
            _lock_tables(conn, ctx)
            conn.execute(_q("truncate"))
            conn.execute(_q("set_aside_indexes"))
            ctx.check_stop()
            # The id is taken before the COPY so that each table's backup file can be uploaded
            # while the next table is copied; a rollback only leaves a gap in the sequence and
            # a gen-<id>/ folder without a manifest (an incomplete upload, never referenced).
            gen_id = int(conn.execute(db.query("gen_virtual", "next_generation_id"))
                         .fetchone()["id"])  # type: ignore[index]
            prefix = f"datasets/{version}/virtual/gen-{gen_id}/"
            uploader = ThreadPoolExecutor(1, thread_name_prefix="gen-virtual-upload")
            stack.callback(uploader.shutdown, wait=True, cancel_futures=True)
            uploads: list[Future[None]] = []
            written: dict[str, _Written] = {}
            expected = {"virtual_stops": len(plan.ids), "virtual_routes": plan.n_routes,
                        "virtual_frequencies": len(FLIGHT_MODES)}
            text = _TextAhead(copy_text(plan, version, s, gen_id))
            try:
                for table, cols in TABLES:
                    t = time.monotonic()
                    # FREEZE: a table truncated in this transaction is loaded as frozen rows,
                    # so nothing has to revisit its pages to set hint bits later.
                    statement = _q("copy_into", table=sql.Identifier(table),
                                   columns=sql.SQL(", ").join(map(sql.Identifier, cols)))
                    written[table] = _copy_table(conn, statement, text.chunks(table),
                                                 os.path.join(tmp, f"{table}.tsv.gz"), ctx,
                                                 expected[table], table)
                    ctx.log.info("copied %d rows into %s in %.2f s", written[table].rows,
                                 table, time.monotonic() - t)
                    _raise_failed_upload(uploads)
                    uploads.append(uploader.submit(
                        backups.put_file, f"{prefix}{table}.tsv.gz", written[table].path,
                        "application/gzip"))
            finally:
                text.close()
            t = time.monotonic()
            conn.execute(_q("rebuild_indexes"))  # while the backups upload
            ctx.log.info("built the indexes in %.2f s", time.monotonic() - t)
            ctx.check_stop()
            for table, _cols in TABLES:
                conn.execute(_q("analyze", table=sql.Identifier(table)))
            settings = recorded_settings(s, plan)
            created = conn.execute(db.query("gen_virtual", "insert_generation"), {
                "id": gen_id, "version": version, "settings": Jsonb(settings),
                "counts": Jsonb(counts), "unreached": Jsonb(plan.unreached),
                "backup_prefix": prefix,
                "duration_ms": int((time.monotonic() - started) * 1000),
                "run_id": ctx.run_id,
            }).fetchone()["created_at"]  # type: ignore[index]
            conn.execute(db.query("gen_virtual", "update_dataset_stats"), {
                "version": version,
                "stats": Jsonb({"generation_id": gen_id, "created_at": created.isoformat(),
                                **counts}),
            })
            ctx.check_stop()
            manifest = {
                "generation_id": gen_id, "dataset_version": version,
                "created_at": created.isoformat(), "run_id": ctx.run_id,
                "format": "PostgreSQL COPY text (tab-separated, \\N = NULL), gzip",
                "settings": settings, "counts": counts, "unreached_stops": plan.unreached,
                "files": {f"{t}.tsv.gz": {"table": t, "columns": list(cols),
                                          "rows": written[t].rows, "bytes": written[t].size,
                                          "sha256_uncompressed": written[t].sha256}
                          for t, cols in TABLES},
            }
            t = time.monotonic()
            try:
                for upload in uploads:
                    upload.result()
                # The manifest goes last: a folder without one is an incomplete (never
                # committed) upload.
                backups.put_json(f"{prefix}manifest.json", manifest)
            except BackupError as exc:
                raise _upload_failed(exc) from None
            ctx.log.info("finished the backup to %s in %.2f s", prefix, time.monotonic() - t)
    return gen_id, prefix


# ---------------------------------------------------------------- the stage


def _summary(plan: VirtualPlan) -> str:
    c = plan.counts()
    kinds = ", ".join(f"{c['by_kind'][k]} {k}" for k in KINDS)
    return (f"{c['virtual_stops']} virtual stops ({kinds}), {c['virtual_routes']} routes, "
            f"{c['virtual_flights']} flights; {c['unreached_real_stops']} real stops unreached")


def _extra(version: str, plan: VirtualPlan) -> dict[str, Any]:
    return {"dataset_version": version, "anchors": plan.anchors,
            "real_stops": plan.real.size,
            "unreached_sample": plan.unreached[:UNREACHED_SAMPLE]}


def generate(database: db.Database, backups: BackupStore, settings: VirtualSettings,
             ctx: RunContext, *, force: bool = False) -> StageResult:
    """Generate the active dataset's virtual entities unless it already has them.

    Returns ``skipped`` without an active dataset, ``noop`` when the dataset already has a
    generation (``force`` regenerates), else ``success``. Raises ValidationError for a dataset
    without stops, BackupError/DatabaseError when writing fails (nothing is kept).
    """
    started = time.monotonic()
    with database.connect(name="pipeline gen-virtual read") as conn:
        snap = read_snapshot(conn, force=force)
    if snap.version is None:
        return StageResult(status=SKIPPED, message="no active dataset; run `pipeline "
                           "sync-odata` first (nothing to generate)")
    version = snap.version
    if snap.real is None:
        gen = snap.generation or {}
        changed = _settings_changed(gen, settings)
        note = "; the settings have changed since, use --force to regenerate" if changed else ""
        return StageResult(
            status=NOOP, counts=dict(gen.get("counts") or {}),
            extra={"dataset_version": version, "generation_id": gen.get("id"),
                   "settings_changed": changed},
            message=f"{version} already has virtual generation {gen.get('id')}{note}")
    ctx.check_stop()
    plan = plan_virtual(snap.real, settings, version, ctx.check_stop)
    ctx.log.info("planned %s", _summary(plan))
    if plan.unreached:
        # Expected (a stop in a dense cluster that no virtual stop counts among its k
        # nearest, say): info, not a warning that makes cron mail a success; the counts and
        # `status` show it.
        ctx.log.info("%d real stops are reached by no virtual route (e.g. %s)",
                     len(plan.unreached), ", ".join(plan.unreached[:5]))
    gen_id, prefix = write_generation(database, backups, settings, ctx, version, plan,
                                      started)
    return StageResult(
        status=SUCCESS, counts=plan.counts(),
        extra={**_extra(version, plan), "generation_id": gen_id, "backup_prefix": prefix},
        message=f"{version} generation {gen_id}: {_summary(plan)}")


def preview(database: db.Database, settings: VirtualSettings) -> StageResult:
    """What ``generate(force=True)`` would write, computed without writing anything.

    Status ``dry-run`` (or ``skipped`` without an active dataset). Raises like ``generate``
    for a dataset without stops.
    """
    with database.connect(name="pipeline gen-virtual dry-run") as conn:
        db.check_schema(conn)
        snap = read_snapshot(conn, force=True)
    if snap.version is None or snap.real is None:
        return StageResult(status=SKIPPED, message="no active dataset; nothing to generate")
    plan = plan_virtual(snap.real, settings, snap.version)
    gen = snap.generation
    return StageResult(
        status=DRY_RUN, counts=plan.counts(),
        extra={**_extra(snap.version, plan), "dry_run": True,
               "current_generation_id": gen["id"] if gen else None,
               "would_run": gen is None},
        message=f"would write for {snap.version}: {_summary(plan)}" if gen is None else
        f"would do nothing: {snap.version} already has virtual generation {gen['id']} "
        f"(--force would write: {_summary(plan)})")


# ---------------------------------------------------------------- status


def status_section(conn: psycopg.Connection[Any], now: datetime | None = None
                   ) -> dict[str, Any]:
    """Virtual entities for `pipeline status`: the active dataset's newest generation, its
    counts and the settings that produced it. Two indexed lookups; JSON-serialisable."""
    now = now or datetime.now(UTC)
    with db.wrap_errors("reading the virtual generations"):
        ds = conn.execute(db.query("gen_virtual", "active_dataset")).fetchone()
        version = ds["version"] if ds else None
        gen = conn.execute(db.query("gen_virtual", "latest_generation"),
                           {"version": version}).fetchone() if version else None
        newest = conn.execute(db.query("gen_virtual", "newest_generation")).fetchone()
    out: dict[str, Any] = {
        "active_dataset": version,
        "current": gen is not None,
        "newest_generation_id": newest["id"] if newest else None,
        "generation": None,
    }
    if gen is not None:
        out["generation"] = {
            "id": gen["id"], "dataset_version": gen["dataset_version"],
            "created_at": gen["created_at"].isoformat(),
            "age_s": round((now - gen["created_at"]).total_seconds(), 1),
            "counts": gen["counts"], "settings": gen["settings"],
            "backup_prefix": gen["backup_prefix"], "duration_ms": gen["duration_ms"],
            "run_id": str(gen["run_id"]) if gen["run_id"] else None,
        }
    return out
