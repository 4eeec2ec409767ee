"""Matching one trace: integer timestamps, overlapping chunks of at most the OSRM request size,
and stitching the chunks' sub-matchings back into continuous polylines.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from .. import polyline
from ..adapters.osrm import LatLon, MatchResult, OsrmClient, OsrmNoMatch, OsrmTooBig
from ..errors import OsrmError

MIN_CHUNK = 3  # osrm-routed refuses a --max-matching-size below 3
NO_FIX = (0.0, 0.0)  # what many trackers send without a GPS fix
_EARTH_M = 6371008.8
# A trace whose points, read as (lon, lat), lie this close to a road of the map while read as
# (lat, lon) they are far from every road was written longitude first.
SWAPPED_NEAR_M = 1000.0


@dataclass
class Piece:
    """One stitched sub-matching: indices into the trace's points, inclusive. A piece that is
    one whole OSRM matching keeps OSRM's encoded polyline and is never decoded."""

    first: int
    last: int
    confidence: float
    points: int
    _geometry: list[LatLon] | None = None
    _encoded: str | None = None

    @property
    def geometry(self) -> list[LatLon]:
        if self._geometry is None:
            self._geometry = polyline.decode(self._encoded or "")
        return self._geometry

    @property
    def encoded(self) -> str:
        if self._encoded is None:
            self._encoded = polyline.encode(self.geometry)
        return self._encoded


@dataclass
class TraceMatch:
    pieces: list[Piece] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # indices of the input points sent to OSRM
    osrm_calls: int = 0
    chunk_errors: Counter[str] = field(default_factory=Counter)
    chunk_size: int = 0  # after any TooBig shrinking
    stationary: bool = False  # every point within radius_m of the first: not sent to OSRM
    reason: str = ""  # why nothing could match, beyond chunk_errors: no fix, off the map

    @property
    def matched_points(self) -> int:
        return sum(p.points for p in self.pieces)


def integer_timestamps(times: Sequence[float]) -> tuple[list[int], list[int]]:
    """OSRM wants integer seconds, strictly increasing: floor each time and drop a point whose
    second is not after the previous kept one. Returns (kept indices, timestamps)."""
    kept: list[int] = []
    stamps: list[int] = []
    for i, t in enumerate(times):
        second = int(math.floor(t))
        if stamps and second <= stamps[-1]:
            continue
        kept.append(i)
        stamps.append(second)
    return kept, stamps


def stationary(coordinates: Sequence[LatLon], radius_m: float) -> bool:
    """Whether every point lies within ``radius_m`` (the GPS accuracy) of the first: a
    parked vehicle. OSRM made a line of one spot of such a trace, or in chunks nothing."""
    if not coordinates:
        return False
    geo = _Geo(coordinates[0][0])
    return all(geo.distance(coordinates[0], p) <= radius_m for p in coordinates)


def chunk_plan(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) windows of at most ``size`` points, consecutive ones sharing ``overlap``."""
    if n <= size:
        return [(0, n)]
    step = max(1, size - overlap)
    chunks = []
    start = 0
    while True:
        end = min(n, start + size)
        chunks.append((start, end))
        if end >= n:
            return chunks
        start += step


class _Geo:
    """Local equirectangular metres around one latitude: plenty for a few kilometres."""

    def __init__(self, lat0: float) -> None:
        self.kx = math.radians(1) * _EARTH_M * math.cos(math.radians(lat0))
        self.ky = math.radians(1) * _EARTH_M

    def project(self, p: LatLon, a: LatLon, b: LatLon) -> tuple[float, float]:
        """(t in [0, 1] along a->b, distance in metres) of p's projection."""
        ax, ay = a[1] * self.kx, a[0] * self.ky
        dx, dy = b[1] * self.kx - ax, b[0] * self.ky - ay
        px, py = p[1] * self.kx - ax, p[0] * self.ky - ay
        denom = dx * dx + dy * dy
        t = 0.0 if denom == 0 else min(1.0, max(0.0, (px * dx + py * dy) / denom))
        return t, math.hypot(px - t * dx, py - t * dy)

    def distance(self, a: LatLon, b: LatLon) -> float:
        return math.hypot((a[1] - b[1]) * self.kx, (a[0] - b[0]) * self.ky)


def _locate(geo: _Geo, geometry: list[LatLon], p: LatLon, start: float,
            tolerance_m: float = 3.0) -> float:
    """Position (segment index + fraction) of p on the geometry at or after ``start``: the
    first place within tolerance, else the nearest (a geometry may pass a spot twice)."""
    if len(geometry) < 2:
        return 0.0
    first = min(int(start), len(geometry) - 2)
    best, best_d = start, math.inf
    for i in range(first, len(geometry) - 1):
        t, d = geo.project(p, geometry[i], geometry[i + 1])
        if i + t < start:  # behind the previous tracepoint on the first segment
            t, d = start - i, geo.distance(p, _at(geometry, start))
        if d <= tolerance_m:
            return i + t
        if d < best_d:
            best, best_d = i + t, d
    return best


def _at(geometry: list[LatLon], s: float) -> LatLon:
    i = min(int(s), len(geometry) - 1)
    if i >= len(geometry) - 1:
        return geometry[-1]
    t = s - i
    a, b = geometry[i], geometry[i + 1]
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


def _clip(geometry: list[LatLon], s_from: float, s_to: float) -> list[LatLon]:
    out = [_at(geometry, s_from)]
    out.extend(geometry[int(math.floor(s_from)) + 1: int(math.ceil(s_to))])
    out.append(_at(geometry, s_to))
    return _dedupe(out)


def _dedupe(points: list[LatLon]) -> list[LatLon]:
    out: list[LatLon] = []
    for p in points:
        if not out or abs(p[0] - out[-1][0]) > 1e-7 or abs(p[1] - out[-1][1]) > 1e-7:
            out.append(p)
    return out


@dataclass
class _Chunk:
    start: int
    end: int
    result: MatchResult | None

    def tracepoint(self, i: int) -> Any:
        if self.result is None or not self.start <= i < self.end:
            return None
        tps = self.result.tracepoints
        j = i - self.start
        return tps[j] if j < len(tps) else None


def _chunk_pieces(chunk: _Chunk, lo: int, hi: int, geo: _Geo) -> list[Piece]:
    """The sub-matchings of one chunk, restricted to the points [lo, hi] it is responsible for."""
    if chunk.result is None:
        return []
    by_matching: dict[int, list[int]] = {}
    for i in range(chunk.start, chunk.end):
        tp = chunk.tracepoint(i)
        if tp is not None:
            by_matching.setdefault(tp.matchings_index, []).append(i)
    pieces = []
    for m_index, indices in by_matching.items():
        if m_index >= len(chunk.result.matchings):
            continue
        inside = [i for i in indices if lo <= i <= hi]
        if len(inside) < 2:
            continue
        matching = chunk.result.matchings[m_index]
        if inside[0] == indices[0] and inside[-1] == indices[-1]:
            pieces.append(Piece(inside[0], inside[-1], matching.confidence, len(inside),
                                _encoded=matching.encoded))
            continue
        # Walk the tracepoints in order so each is found after the previous one.
        geometry = matching.geometry
        position, at_first, at_last = 0.0, 0.0, 0.0
        for i in indices:
            if i > inside[-1]:
                break
            position = _locate(geo, geometry, chunk.tracepoint(i).location, position)
            if i == inside[0]:
                at_first = position
            if i == inside[-1]:
                at_last = position
        geometry = _clip(geometry, at_first, at_last)
        if len(geometry) < 2:
            continue
        pieces.append(Piece(inside[0], inside[-1], matching.confidence, len(inside),
                            _geometry=geometry))
    return sorted(pieces, key=lambda p: p.first)


def _merge(a: Piece, b: Piece) -> Piece:
    tail = b.geometry[1:] if _dedupe([a.geometry[-1], b.geometry[0]]) == [a.geometry[-1]] \
        else b.geometry
    points = a.points + b.points - 1
    confidence = (a.confidence * a.points + b.confidence * b.points) / (a.points + b.points)
    return Piece(a.first, b.last, confidence, points, _geometry=a.geometry + tail)


def stitch(chunks: list[_Chunk], geo: _Geo) -> list[Piece]:
    """Cut overlapping chunk results at a shared, matched point and join the sub-matchings
    that meet there, so a trace longer than one request comes back as continuous lines."""
    # Boundary k sits between chunk k-1 and chunk k: (last index of k-1, first of k, joinable).
    bounds: list[tuple[int, int, bool]] = []
    for prev, nxt in zip(chunks, chunks[1:], strict=False):
        shared = range(nxt.start, prev.end)
        if not shared:
            bounds.append((prev.end - 1, nxt.start, False))
            continue
        middle = (nxt.start + prev.end - 1) / 2
        both = [i for i in shared
                if prev.tracepoint(i) is not None and nxt.tracepoint(i) is not None]
        if both:
            cut = min(both, key=lambda i: (abs(i - middle), i))
            bounds.append((cut, cut, True))
        else:
            cut = int(middle)
            bounds.append((cut, cut + 1, False))
    out: list[Piece] = []
    carry: Piece | None = None
    for k, chunk in enumerate(chunks):
        lo = bounds[k - 1][1] if k > 0 else chunk.start
        hi = bounds[k][0] if k < len(bounds) else chunk.end - 1
        joins_prev = k > 0 and bounds[k - 1][2]
        joins_next = k < len(bounds) and bounds[k][2]
        next_carry: Piece | None = None
        for piece in _chunk_pieces(chunk, lo, hi, geo):
            if carry is not None and joins_prev and piece.first == lo == carry.last:
                piece, carry = _merge(carry, piece), None
            if joins_next and piece.last == hi:
                next_carry = piece
            else:
                out.append(piece)
        if carry is not None:
            out.append(carry)
        carry = next_carry
    if carry is not None:
        out.append(carry)
    return sorted(out, key=lambda p: p.first)


class ChunkSize:
    """The chunk size shared by a process's workers; TooBig shrinks it for everyone."""

    def __init__(self, size: int, overlap: int) -> None:
        self._lock = threading.Lock()
        self.size = max(MIN_CHUNK, size)
        self.overlap = overlap

    def get(self) -> tuple[int, int]:
        with self._lock:
            return self.size, self.overlap

    def shrink(self, tried: int) -> tuple[int, int]:
        with self._lock:
            if self.size >= tried:
                if tried <= MIN_CHUNK:
                    raise OsrmError(f"OSRM answered TooBig even for {tried} points")
                self.size = max(MIN_CHUNK, tried // 2)
                self.overlap = min(self.overlap, max(0, (self.size - 1) // 2))
            return self.size, self.overlap


def match_trace(
    client: OsrmClient,
    coordinates: Sequence[LatLon],
    times: Sequence[float],
    *,
    radius_m: float,
    chunk_size: ChunkSize,
    in_flight: AbstractContextManager[Any] | None = None,
) -> TraceMatch:
    """Match one time-ordered trace, in chunks; points at exactly (0, 0) (no fix) are
    ignored, and a trace whose other points stay within ``radius_m`` of the first is
    ``stationary`` and not sent. ``NoMatch``/``NoSegment`` on a chunk is recorded in
    ``chunk_errors``; other OSRM failures raise. ``in_flight`` (a semaphore) is held around
    each request to bound the requests in flight across threads."""
    gate = in_flight if in_flight is not None else nullcontext()
    # Trackers report exactly (0, 0) when they have no fix: such a point is no place, so it
    # is neither sent nor allowed to make a parked vehicle look as if it moved.
    fixed = [i for i, p in enumerate(coordinates) if p != NO_FIX]
    kept_fixed, stamps = integer_timestamps([times[i] for i in fixed])
    kept = [fixed[i] for i in kept_fixed]
    result = TraceMatch(sent=kept)
    if stationary([coordinates[i] for i in fixed], radius_m):
        result.stationary = True
        return result
    if len(kept) < 2:
        result.chunk_errors["too_few_points"] += 1
        no_fix = len(coordinates) - len(fixed)
        if no_fix:
            many = "all" if not fixed else f"{no_fix} of"
            result.reason = f"no GPS fix: {many} {len(coordinates)} points at (0, 0)"
        elif len(fixed) > 1:  # OSRM takes whole seconds, strictly increasing
            result.reason = f"all {len(fixed)} points within one second"
        return result
    coords = [coordinates[i] for i in kept]
    geo = _Geo(coords[0][0])
    while True:
        size, overlap = chunk_size.get()
        result.chunk_size = size
        chunks: list[_Chunk] = []
        try:
            for start, end in chunk_plan(len(coords), size, overlap):
                result.osrm_calls += 1
                try:
                    with gate:
                        answer: MatchResult | None = client.match(
                            coords[start:end], stamps[start:end], radius_m)
                except OsrmNoMatch as exc:
                    result.chunk_errors[exc.code] += 1
                    answer = None
                chunks.append(_Chunk(start, end, answer))
        except OsrmTooBig:
            result.chunk_errors["TooBig"] += 1
            chunk_size.shrink(size)
            continue
        except OsrmError as exc:
            exc.osrm_calls = result.osrm_calls
            raise
        break
    # A parked vehicle whose trace one glitch (a fix far away) kept from being stationary:
    # OSRM leaves the glitch out and matches the rest to one spot. Such a "line" draws
    # nothing; a trace that is nothing else did not move.
    matched = stitch(chunks, geo)
    pieces = [p for p in matched if not _one_spot(p, chunks, radius_m, geo)]
    if matched and not pieces:
        result.stationary = True
        result.reason = (f"OSRM matched its {sum(p.points for p in matched)} matched points "
                         f"to one spot (within {radius_m:g} m); nothing to draw")
        return result
    if not pieces and set(result.chunk_errors) == {"NoSegment"}:
        result.reason = _off_map(client, coords[0], radius_m, result, gate)
    # Map indices back from sent points to the input points.
    for p in pieces:
        p.first, p.last = kept[p.first], kept[p.last]
    result.pieces = pieces
    return result


def _one_spot(piece: Piece, chunks: list[_Chunk], radius_m: float, geo: _Geo) -> bool:
    """Whether every point of a piece was snapped within ``radius_m`` of its first: a line of
    one spot (its geometry, back and forth along the road, may add up to tens of metres).
    Reads the tracepoints, not the geometry: a moving piece is told at its second or third
    point, without decoding anything."""
    first: LatLon | None = None
    for i in range(piece.first, piece.last + 1):
        snapped = next((tp.location for c in chunks if (tp := c.tracepoint(i)) is not None),
                       None)
        if snapped is None:
            continue
        if first is None:
            first = snapped
        elif geo.distance(first, snapped) > radius_m:
            return False
    return True


def _distance_text(metres: float) -> str:
    return f"{metres / 1000:.0f} km" if metres >= 10_000 else f"{metres:.0f} m"


def _off_map(client: OsrmClient, point: LatLon, radius_m: float, result: TraceMatch,
             gate: AbstractContextManager[Any]) -> str:
    """Why no point of a trace was near a road (every chunk answered NoSegment), from two
    ``/nearest`` probes of its first point: far outside the map, off the road, or written
    longitude first (lat 24.9, lon 60.1 for Helsinki: a valid place, in the sea). Only a
    trace that matched nothing pays for them; "" when the probes fail."""
    lat, lon = point
    try:
        with gate:
            result.osrm_calls += 1
            here = float(client.nearest(point)["distance"])
            swapped = math.inf
            if abs(lon) <= 90:
                result.osrm_calls += 1
                swapped = float(client.nearest((lon, lat))["distance"])
    except (OsrmError, KeyError, TypeError, ValueError):
        return ""
    where = f"({lat:.5f}, {lon:.5f})"
    if swapped <= SWAPPED_NEAR_M and swapped * 10 < here:
        return (f"latitude and longitude swapped? {where} is {_distance_text(here)} from the "
                f"map's nearest road, ({lon:.5f}, {lat:.5f}) {_distance_text(swapped)}")
    hint = " (outside the map)" if here > SWAPPED_NEAR_M else ""
    return (f"no road within {radius_m:g} m: {where} is {_distance_text(here)} from the map's "
            f"nearest road{hint}")
