"""Synthetic GPS traces with a known truth, and the quality rule they are judged by.

A trace is made by routing between random points on a real osrm-routed (``/route``), driving
along the route geometry at the route's average speed, sampling every 1-3 s and moving each
sample 5-8 m in a random direction. The truth is the route geometry. Tests and the benchmark
share this module.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from pipeline_cli.adapters.osrm import LatLon, OsrmClient
from pipeline_cli.errors import OsrmError

# The bundled central-Helsinki extract: (south, west, north, east). Outside it: NoSegment.
HELSINKI_BBOX = (60.1645, 24.9355, 60.1785, 24.9535)
EARTH_RADIUS_M = 6371008.8


@dataclass
class Trace:
    truth: list[LatLon]
    points: list[LatLon]
    offsets: list[float]  # seconds since the first sample
    start: datetime = field(default_factory=lambda: datetime(2024, 5, 1, 8, tzinfo=UTC))

    @property
    def times(self) -> list[datetime]:
        return [self.start + timedelta(seconds=s) for s in self.offsets]

    def rows(self, device_id: str) -> list[tuple[str, datetime, float, float]]:
        """(device_id, recorded_at, latitude, longitude) rows for gps_points."""
        return [(device_id, t, lat, lon)
                for t, (lat, lon) in zip(self.times, self.points, strict=True)]


def _random_point(rng: random.Random, bbox: tuple[float, float, float, float]) -> LatLon:
    south, west, north, east = bbox
    return rng.uniform(south, north), rng.uniform(west, east)


def _offset(point: LatLon, east_m: float, north_m: float) -> LatLon:
    lat, lon = point
    dlat = math.degrees(north_m / EARTH_RADIUS_M)
    dlon = math.degrees(east_m / (EARTH_RADIUS_M * math.cos(math.radians(lat))))
    return lat + dlat, lon + dlon


def haversine_m(a: LatLon, b: LatLon) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = (math.sin((lat2 - lat1) / 2) ** 2
         + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2)
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def sample_route(
    geometry: list[LatLon],
    speed_mps: float,
    rng: random.Random,
    *,
    interval_s: tuple[float, float] = (1.0, 3.0),
    noise_m: tuple[float, float] = (5.0, 8.0),
) -> tuple[list[LatLon], list[float]]:
    """Drive along ``geometry`` at ``speed_mps``; noisy samples and their time offsets."""
    cumulative = [0.0]
    for a, b in zip(geometry, geometry[1:], strict=False):
        cumulative.append(cumulative[-1] + haversine_m(a, b))
    total = cumulative[-1]
    points: list[LatLon] = []
    offsets: list[float] = []
    t, travelled, seg = 0.0, 0.0, 0
    while travelled <= total:
        while seg < len(geometry) - 2 and cumulative[seg + 1] < travelled:
            seg += 1
        length = cumulative[seg + 1] - cumulative[seg] if len(geometry) > 1 else 0.0
        frac = 0.0 if length == 0 else (travelled - cumulative[seg]) / length
        a, b = geometry[seg], geometry[min(seg + 1, len(geometry) - 1)]
        exact = (a[0] + (b[0] - a[0]) * frac, a[1] + (b[1] - a[1]) * frac)
        magnitude = rng.uniform(*noise_m)
        angle = rng.uniform(0, 2 * math.pi)
        points.append(_offset(exact, magnitude * math.cos(angle), magnitude * math.sin(angle)))
        offsets.append(round(t, 3))
        dt = rng.uniform(*interval_s)
        t += dt
        travelled += speed_mps * dt
    return points, offsets


def make_trace(
    client: OsrmClient,
    rng: random.Random,
    *,
    waypoints: int = 2,
    min_length_m: float = 400.0,
    min_points: int = 0,
    interval_s: tuple[float, float] = (1.0, 3.0),
    noise_m: tuple[float, float] = (5.0, 8.0),
    bbox: tuple[float, float, float, float] = HELSINKI_BBOX,
    start: datetime | None = None,
    attempts: int = 200,
) -> Trace:
    """A trace along a route between ``waypoints`` random points (more are added until it has
    ``min_points`` samples)."""
    for _ in range(attempts):
        stops = [_random_point(rng, bbox) for _ in range(waypoints)]
        try:
            route = client.route(stops)
        except OsrmError:
            continue
        geometry: list[LatLon] = route["coordinates"]
        distance, duration = float(route["distance"]), float(route["duration"])
        if distance < min_length_m or duration <= 0 or len(geometry) < 2:
            continue
        speed = min(max(distance / duration, 4.0), 14.0)
        points, offsets = sample_route(geometry, speed, rng, interval_s=interval_s,
                                       noise_m=noise_m)
        if len(points) < max(2, min_points):
            waypoints += 1
            continue
        trace = Trace(truth=geometry, points=points, offsets=offsets)
        if start is not None:
            trace.start = start
        return trace
    raise OsrmError(f"could not make a trace after {attempts} routes")


def make_traces(client: OsrmClient, count: int, seed: int = 1, **kwargs: object) -> list[Trace]:
    rng = random.Random(seed)
    return [make_trace(client, rng, **kwargs) for _ in range(count)]  # type: ignore[arg-type]


# ---------------------------------------------------------------- the quality rule


def _project(points: list[LatLon], lat0: float) -> np.ndarray:
    arr = np.radians(np.asarray(points, dtype=float).reshape(-1, 2))
    return np.column_stack((arr[:, 1] * math.cos(math.radians(lat0)), arr[:, 0])) \
        * EARTH_RADIUS_M


def _densify(xy: np.ndarray, step: float) -> np.ndarray:
    if len(xy) < 2:
        return xy
    out = [xy[:1]]
    for a, b in zip(xy[:-1], xy[1:], strict=False):
        n = max(1, int(math.ceil(float(np.hypot(*(b - a))) / step)))
        t = np.arange(1, n + 1)[:, None] / n
        out.append(a + (b - a) * t)
    return np.vstack(out)


def _distances(points: np.ndarray, lines: list[np.ndarray]) -> np.ndarray:
    """Distance from each point to the nearest segment of any line."""
    best = np.full(len(points), np.inf)
    for line in lines:
        if len(line) == 1:
            best = np.minimum(best, np.hypot(*(points - line[0]).T))
            continue
        a, b = line[:-1], line[1:]
        ab = b - a
        denom = np.maximum((ab ** 2).sum(axis=1), 1e-12)
        ap = points[:, None, :] - a[None, :, :]
        t = np.clip((ap * ab[None]).sum(axis=2) / denom[None], 0.0, 1.0)
        closest = a[None] + t[..., None] * ab[None]
        d = np.hypot(*(points[:, None, :] - closest).transpose(2, 0, 1)).min(axis=1)
        best = np.minimum(best, d)
    return best


@dataclass
class Quality:
    passed: bool
    max_off_truth_m: float  # the farthest any matched geometry strays from the true path
    coverage: float  # share of the true path within tolerance of the matched geometry


def judge(truth: list[LatLon], matched: list[list[LatLon]], *, tolerance_m: float = 25.0,
          min_coverage: float = 0.9, step_m: float = 5.0) -> Quality:
    """The issue's rule: all matched geometry within ``tolerance_m`` of the true path, and at
    least ``min_coverage`` of the true path within ``tolerance_m`` of the matched geometry."""
    lines = [m for m in matched if m]
    if not lines or len(truth) < 2:
        return Quality(False, math.inf, 0.0)
    lat0 = truth[0][0]
    truth_xy = _project(truth, lat0)
    matched_xy = [_project(m, lat0) for m in lines]
    off = max(float(_distances(_densify(m, step_m), [truth_xy]).max()) for m in matched_xy)
    covered = _distances(_densify(truth_xy, step_m), matched_xy) <= tolerance_m
    coverage = float(covered.mean())
    return Quality(off <= tolerance_m and coverage >= min_coverage, off, coverage)


def insert_points(conn: object, rows: list[tuple[str, datetime, float, float]]) -> None:
    """COPY (device_id, recorded_at, latitude, longitude) rows into gps_points, the columns
    the external TCP listener writes."""
    import psycopg

    assert isinstance(conn, psycopg.Connection)
    with conn.cursor() as cur, cur.copy(
        "COPY gps_points (device_id, recorded_at, latitude, longitude) FROM STDIN"
    ) as copy:
        for row in rows:
            copy.write_row(row)
    if not conn.autocommit:
        conn.commit()
