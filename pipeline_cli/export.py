"""``pipeline export geojson``: what the pipeline made, as RFC 7946 GeoJSON for a map.

Each ``*_features`` function is a generator reading PostgreSQL through a server-side cursor
(and Redis in chunks for the graph), so an export of millions of features never sits in memory;
:func:`write_collection` writes them one by one. Coordinates are [longitude, latitude].
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import psycopg
from psycopg.rows import dict_row

from . import db, polyline
from .adapters.graph_store import GraphReader
from .errors import PipelineError, UsageError
from .settings import quoted, shorten

log = logging.getLogger("pipeline.export")

CHUNK = 2000  # rows per server-side cursor fetch, and source nodes per Redis MGET
# Decimals of a coordinate written (RFC 7946 11.2): 6 are about 10 cm, finer than a stop's
# position or a GPS fix needs, and polylines hold 5; 15 to 17 digits made documents larger.
DECIMALS = 6
Feature = dict[str, Any]


@dataclass(frozen=True)
class BBox:
    """W,S,E,N in degrees; W > E is a box across the antimeridian."""

    west: float
    south: float
    east: float
    north: float

    @classmethod
    def parse(cls, text: str) -> BBox:
        parts = text.split(",")
        try:
            if len(parts) != 4:
                raise ValueError
            west, south, east, north = (float(p) for p in parts)
        except ValueError:
            raise UsageError(f"malformed --bbox {quoted(text)}: expected W,S,E,N in "
                             "degrees") from None
        if not all(-180 <= v <= 180 for v in (west, east)) or not all(
                -90 <= v <= 90 for v in (south, north)):
            raise UsageError(f"malformed --bbox {quoted(text)}: longitudes must be in [-180, 180] "
                             "and latitudes in [-90, 90]")
        if south > north:
            raise UsageError(f"malformed --bbox {quoted(text)}: south is above north")
        return cls(west, south, east, north)

    def contains(self, lon: float, lat: float) -> bool:
        if not self.south <= lat <= self.north:
            return False
        if self.west <= self.east:
            # 180 and -180 are one meridian: a box that ends at 180 holds a point at -180.
            return self.west <= lon <= self.east or abs(lon) == 180 and (
                self.west <= -lon <= self.east)
        return lon >= self.west or lon <= self.east  # across the antimeridian


def parse_time(text: str | None, option: str) -> datetime | None:
    """An ISO 8601 time for --since/--until; a time without zone is UTC."""
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"malformed {option} {quoted(text)}: expected an ISO 8601 time, "
                         "e.g. 2026-12-01T08:00:00Z") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def parse_range(since: str | None, until: str | None
                ) -> tuple[datetime | None, datetime | None]:
    """--since and --until; swapped (since after until) is a usage error, not an export
    that is empty by definition."""
    start, end = parse_time(since, "--since"), parse_time(until, "--until")
    if start is not None and end is not None and start > end:
        raise UsageError(f"--since {quoted(since)} is after --until {quoted(until)}")
    return start, end


@contextmanager
def _rows(conn: psycopg.Connection[Any], name: str, params: dict[str, Any]
          ) -> Iterator[Iterable[dict[str, Any]]]:
    """A server-side cursor over the named query: rows arrive CHUNK at a time."""
    with db.wrap_errors(f"exporting ({name})"), conn.transaction(), conn.cursor(
            name=f"export_{name}", row_factory=dict_row) as cur:
        cur.itersize = CHUNK
        cur.execute(db.query("export", name), params)
        yield cur


def _position(lon: float, lat: float) -> list[float]:
    return [round(lon, DECIMALS), round(lat, DECIMALS)]


def _point_feature(lon: float, lat: float, properties: dict[str, Any]) -> Feature:
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": _position(lon, lat)},
            "properties": properties}


def _line_feature(coordinates: list[list[float]], properties: dict[str, Any]) -> Feature:
    """A LineString, or a MultiLineString cut at the antimeridian where a segment crosses it
    (RFC 7946 3.1.9: drawn as written, [179.9, -17] to [-179.9, -17] spans the whole map).
    A point on it (longitude 180 or -180, one meridian) is written on the side of the segment
    that reaches it, so no part of zero length is drawn along the map's edge. Positions are
    rounded to DECIMALS first, so one that rounds to 180 is on the antimeridian. A line has two
    positions or more (3.1.4): one point is a line of length 0, and none no geometry (3.2)."""
    coordinates = [_position(lon, lat) for lon, lat in coordinates]
    if len(coordinates) < 2:
        return {"type": "Feature", "geometry": {
            "type": "LineString", "coordinates": coordinates * 2} if coordinates else None,
            "properties": properties}
    parts = [[coordinates[0]]]
    for lon1, lat1 in coordinates[1:]:
        lon0, lat0 = parts[-1][-1]
        if abs(lon1) == 180 and abs(lon1 - lon0) > 180:
            lon1 = -lon1  # reached from this side
        if abs(lon1 - lon0) > 180:  # the short way round crosses it
            if abs(lon0) == 180:  # it starts on the antimeridian: go on from its other side
                if len(parts[-1]) == 1:
                    parts[-1][0] = [-lon0, lat0]
                else:
                    parts.append([[-lon0, lat0]])
            else:
                edge = 180.0 if lon0 > 0 else -180.0
                span = lon1 - lon0 + (360 if lon0 > 0 else -360)
                lat = round(lat0 + (lat1 - lat0) * (edge - lon0) / span, DECIMALS)
                parts[-1].append([edge, lat])
                parts.append([[-edge, lat]])
        parts[-1].append([lon1, lat1])
    geometry = {"type": "LineString", "coordinates": parts[0]} if len(parts) == 1 else \
        {"type": "MultiLineString", "coordinates": parts}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def polyline_features(conn: psycopg.Connection[Any], *, device: str | None = None,
                      since: datetime | None = None, until: datetime | None = None
                      ) -> Iterator[Feature]:
    """One LineString per cached polyline (overlapping [since, until]), oldest first."""
    params = {"device": device, "since": since, "until": until}
    with _rows(conn, "polylines", params) as rows:
        for r in rows:
            try:
                points = polyline.decode(r["encoded_polyline"])
                # any characters decode to numbers: ones off the globe were drawn as they were
                bad = next((i for i, (lat, lon) in enumerate(points, 1)
                            if not (-90 <= lat <= 90 and -180 <= lon <= 180)), None)
                if bad is not None:
                    raise ValueError(f"point {bad} {points[bad - 1]} is not a latitude and "
                                     "longitude")
            except ValueError as exc:
                raise PipelineError(f"cached polyline {r['id']} is malformed: {exc}") from None
            yield _line_feature([[lon, lat] for lat, lon in points], {
                "id": r["id"], "device": r["device_id"],
                "start_time": r["start_time"].isoformat(), "end_time": r["end_time"].isoformat(),
                "point_count": r["point_count"], "confidence": r["osrm_confidence"],
                "batch_id": None if r["batch_id"] is None else str(r["batch_id"])})


def stop_features(conn: psycopg.Connection[Any], *, virtual: bool = False,
                  bbox: BBox | None = None) -> Iterator[Feature]:
    """Real stops (or virtual stops with their kind) as Points, inside ``bbox`` if given."""
    params: dict[str, Any] = {"bbox": bbox is not None, "west": None, "south": None,
                              "east": None, "north": None}
    if bbox is not None:
        params.update(west=bbox.west, south=bbox.south, east=bbox.east, north=bbox.north)
    with _rows(conn, "virtual_stops" if virtual else "stops", params) as rows:
        for r in rows:
            props = {k: v for k, v in r.items() if k not in ("latitude", "longitude")}
            yield _point_feature(r["longitude"], r["latitude"], props)


def graph_features(conn: psycopg.Connection[Any], reader: GraphReader, *,
                   version: str | None = None, bbox: BBox | None = None) -> Iterator[Feature]:
    """The edges of graph ``version`` (default: the active one) as LineStrings from stop to
    stop, with weight (seconds), mode and route; with ``bbox``, edges with an endpoint in it."""
    version = reader.require_version(version)
    _say_whose_stops(conn, reader, version)
    left_out = [0]  # edges to a stop the active dataset lacks (a graph of an older one)
    with _rows(conn, "graph_nodes", {}) as rows:
        chunk: list[dict[str, Any]] = []
        for r in rows:
            chunk.append(r)
            if len(chunk) >= CHUNK:
                yield from _edges(conn, reader, version, chunk, bbox, left_out)
                chunk = []
        yield from _edges(conn, reader, version, chunk, bbox, left_out)
    if left_out[0]:
        log.warning("%s: %d edge(s) to stops not in the active dataset left out, and any "
                    "from them (the graph was built from %s; edges are drawn at the active "
                    "dataset's stops)", version, left_out[0],
                    (reader.meta(version) or {}).get("dataset_version") or "another dataset")


def _say_whose_stops(conn: psycopg.Connection[Any], reader: GraphReader, version: str
                     ) -> None:
    """Warn when ``version`` was built from other stops than the tables hold (a rollback to a
    graph of an older dataset or generation): their positions are only in that dataset's raw
    backup, so the edges are drawn at today's, and the map should not pass for the graph's."""
    meta = reader.meta(version) or {}
    with db.wrap_errors("reading the active dataset"), conn.transaction():
        here = conn.execute(db.query("export", "drawn_at")).fetchone()
    assert here is not None
    built = (meta.get("dataset_version"), meta.get("virtual_generation_id"))
    drawn = (here["dataset_version"], str(here["virtual_generation_id"]))
    if built[0] is not None and built != drawn:
        log.warning("%s was built from dataset %s, virtual generation %s; it is drawn at the "
                    "stops of dataset %s, virtual generation %s (stops that moved since are "
                    "drawn where they are now)", version, *built, *drawn)


def _edges(conn: psycopg.Connection[Any], reader: GraphReader, version: str,
           nodes: list[dict[str, Any]], bbox: BBox | None, left_out: list[int]
           ) -> Iterator[Feature]:
    if not nodes:
        return
    where = {n["id"]: (n["longitude"], n["latitude"]) for n in nodes}
    adjacency = reader.neighbors_many(version, list(where))
    targets = {e.to for edges in adjacency.values() for e in edges or () if e.to not in where}
    if targets:  # the far ends of this chunk's edges; the cursor's transaction is still open
        with db.wrap_errors("reading edge ends"):
            for t in conn.execute(db.query("export", "node_coordinates"),
                                  {"ids": sorted(targets)}):
                where[t["id"]] = (t["longitude"], t["latitude"])
    for node in nodes:
        a = where[node["id"]]
        for e in adjacency.get(node["id"]) or ():
            b = where.get(e.to)
            if b is None:  # a stop the current dataset no longer has: no place to draw it
                left_out[0] += 1
                continue
            if bbox is not None and not (bbox.contains(*a) or bbox.contains(*b)):
                continue
            yield _line_feature([list(a), list(b)], {
                "from": node["id"], "to": e.to, "weight": e.weight_s, "mode": e.mode,
                "route_id": e.route_id, "version": version})


def write_collection(features: Iterable[Feature], out: IO[str]) -> int:
    """Write a FeatureCollection feature by feature; the number of features written. The
    first feature is read before anything is written, so a failure known at the start (no
    active graph, Redis down) leaves the output empty rather than a collection cut short."""
    items = iter(features)
    first = next(items, None)
    out.write('{"type":"FeatureCollection","features":[\n')
    n = 0
    for feature in itertools.chain([] if first is None else [first], items):
        try:
            text = json.dumps(feature, ensure_ascii=False, separators=(",", ":"),
                              allow_nan=False)
        except ValueError:  # NaN or Infinity: the document would be no JSON any more
            raise PipelineError(f"feature {n + 1} (properties "
                                f"{shorten(str(feature.get('properties')), 200)}) "
                                "holds a number JSON cannot hold (NaN or Infinity); "
                                "nothing more was written") from None
        if n:
            out.write(",\n")
        out.write(text)
        n += 1
    out.write("\n]}\n")
    return n


def write_file(features: Iterable[Feature], path: str) -> int:
    """Write to a temporary file beside ``path`` (a symlink's target) and rename it at the
    end, so a failed export leaves no half-written file (and an earlier export stays whole).
    The file keeps the mode of the one it replaces, else gets the umask's. A FIFO or a device
    (``/dev/stdout``) is written to directly. OSError becomes a one-line error."""
    target = os.path.realpath(path)
    try:
        if os.path.exists(target) and not os.path.isfile(target):
            with open(target, "w", encoding="utf-8") as out:
                return write_collection(features, out)
        umask = os.umask(0)
        os.umask(umask)
        mode = stat.S_IMODE(os.stat(target).st_mode) if os.path.exists(target) else \
            0o666 & ~umask
        fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".geojson.tmp",
                                   dir=os.path.dirname(target))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                n = write_collection(features, out)
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
        return n
    except OSError as exc:
        raise PipelineError(f"cannot write {path}: {exc.strerror or exc}") from None
