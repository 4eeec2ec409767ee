"""match-gps: raw GPS points -> batches -> OSRM ``/match`` -> ``cached_polylines``.

Points are cut into per-device batches (time gaps, maximum duration). Workers in any number of
processes claim batches with ``FOR UPDATE SKIP LOCKED`` under a lease, match them through OSRM
in overlapping chunks that are stitched back together, and write a batch's polylines, its
points' ``processed`` flag and its completion in one statement. Failures back off
exponentially and become ``dead`` after ``max_attempts``; expired leases are rescued.
"""

from __future__ import annotations

import math
import os
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from .. import db, polyline
from ..adapters.osrm import (
    LatLon,
    MatchResult,
    OsrmClient,
    OsrmNoMatch,
    OsrmTooBig,
    OsrmUnavailable,
)
from ..errors import Interrupted, OsrmError, PipelineError
from ..runner import NOOP, SUCCESS, RunContext, StageResult
from ..settings import MatchSettings

BATCHING_LOCK = "match-gps:batching"
BATCHING_DEVICES = 50  # devices per batch-making transaction
FIRST_SLICE_DEVICES = 8  # the first transaction is small: workers start matching sooner
MIN_CHUNK = 3  # osrm-routed refuses a --max-matching-size below 3
BACKLOG_COUNT_CAP = 1_000_000
WORKERS_PER_REQUEST = 2  # worker threads per OSRM request in flight
_EARTH_M = 6371008.8

# ======================================================================= matching one trace


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
    """Match one time-ordered trace, in chunks. ``NoMatch``/``NoSegment`` on a chunk is
    recorded in ``chunk_errors``; other OSRM failures raise. ``in_flight`` (a semaphore) is
    held around each request to bound the requests in flight across threads."""
    gate = in_flight if in_flight is not None else nullcontext()
    kept, stamps = integer_timestamps(times)
    result = TraceMatch(sent=kept)
    if len(kept) < 2:
        result.chunk_errors["too_few_points"] += 1
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
    pieces = stitch(chunks, geo)
    # Map indices back from sent points to the input points.
    for p in pieces:
        p.first, p.last = kept[p.first], kept[p.last]
    result.pieces = pieces
    return result


# ======================================================================= batches


@dataclass
class BatchingResult:
    created: int = 0
    too_short: int = 0
    points: int = 0
    waiting: int = 0  # open runs and single points that may still grow


def make_batches(conn: psycopg.Connection[Any], settings: MatchSettings, *,
                 devices: int = BATCHING_DEVICES,
                 stop: Callable[[], bool] = lambda: False,
                 made: Callable[[], None] = lambda: None) -> BatchingResult:
    """Cut unbatched points into batches, ``devices`` devices per transaction (fewer in the
    first), so workers can match the first batches while later ones are made; ``made`` is
    called after each transaction that created batches. Idempotent: a point joins at most one
    batch. Concurrent workers serialise each slice on an advisory lock."""
    total = BatchingResult()
    after = ""  # device ids are never empty
    size = min(devices, FIRST_SLICE_DEVICES)
    while not stop():
        part, last = _make_slice(conn, settings, after, size)
        size = devices
        if part.created:
            made()
        total.created += part.created
        total.too_short += part.too_short
        total.points += part.points
        total.waiting += part.waiting
        if last is None:
            break
        after = last
    return total


def _make_slice(conn: psycopg.Connection[Any], settings: MatchSettings, after: str,
                devices: int) -> tuple[BatchingResult, str | None]:
    out = BatchingResult()
    with db.wrap_errors("making GPS batches"), conn.transaction():
        conn.execute(db.query("match_gps", "batching_lock"),
                     {"key": db.advisory_key(BATCHING_LOCK)})
        rows = conn.execute(db.query("match_gps", "plan_batches"), {
            "gap_seconds": settings.gap_seconds,
            "max_batch_seconds": settings.max_batch_seconds,
            "after": after, "devices": devices,
        }).fetchall()
        if not rows:
            return out, None
        plan: dict[str, list[Any]] = {k: [] for k in
                                      ("device_ids", "starts", "ends", "counts", "statuses")}
        for r in rows:
            if not r["closed"]:
                out.waiting += 1
                continue
            if r["n"] >= 2:
                status = "pending"
            elif r["age_s"] >= settings.too_short_after_seconds:
                status = "too_short"
            else:
                out.waiting += 1
                continue
            plan["device_ids"].append(r["device_id"])
            plan["starts"].append(r["start_time"])
            plan["ends"].append(r["end_time"])
            plan["counts"].append(r["n"])
            plan["statuses"].append(status)
            out.created += status == "pending"
            out.too_short += status == "too_short"
        if plan["device_ids"]:
            cur = conn.execute(db.query("match_gps", "insert_batches"), plan)
            out.points = cur.rowcount
            if out.points != sum(plan["counts"]):
                # A point arrived inside a planned range meanwhile: it joined that batch.
                conn.execute(db.query("match_gps", "recount_batches"))
    return out, max(r["device_id"] for r in rows)


def rescue_expired(conn: psycopg.Connection[Any], settings: MatchSettings) -> list[str]:
    with db.wrap_errors("rescuing expired leases"):
        rows = conn.execute(db.query("match_gps", "rescue_expired"),
                            {"max_attempts": settings.max_attempts}).fetchall()
    return [str(r["batch_id"]) for r in rows]


def _work_waiting(conn: psycopg.Connection[Any]) -> bool:
    with db.wrap_errors("looking for GPS work"):
        row = conn.execute(db.query("match_gps", "work_waiting")).fetchone()
    return bool(row and (row["batches"] or row["points"]))


def backoff_seconds(settings: MatchSettings, attempt: int, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: half fixed, half random."""
    delay = min(settings.backoff_max_seconds,
                settings.backoff_base_seconds * 2 ** max(0, attempt - 1))
    return delay / 2 + rng.uniform(0, delay / 2)


# ======================================================================= the worker pool


@dataclass
class _Claimed:
    batch_id: Any
    device_id: str
    coordinate_count: int
    retry_count: int
    token: uuid.UUID
    times: list[float]  # epoch seconds
    coordinates: list[LatLon]


class _Pool:
    """Shared state of one process's workers: limits, stop flags, counters."""

    def __init__(self, ctx: RunContext, max_batches: int | None, deadline: float | None,
                 breaker: int, concurrency: int) -> None:
        self.ctx = ctx
        # More workers than requests in flight: while some talk to PostgreSQL (claim,
        # complete) others' requests keep OSRM busy; the semaphore keeps the bound.
        self.in_flight = threading.BoundedSemaphore(concurrency)
        self.workers = WORKERS_PER_REQUEST * concurrency
        self.lock = threading.Lock()
        self.max_batches = max_batches
        self.deadline = deadline
        self.breaker = breaker
        self.claimed = 0
        self.hard_stop = False
        self.unavailable_streak = 0
        self.tripped: OsrmError | None = None
        self.last_unavailable: BaseException | None = None
        self.fatal: BaseException | None = None
        self.drained = False
        self.batching = False  # batches are still being made: an empty queue is not the end
        self.slice_made = threading.Event()
        self.counts: Counter[str] = Counter()
        self.chunk_errors: Counter[str] = Counter()

    def reserve(self) -> bool:
        """Whether a worker may claim one more batch now (and count it if so)."""
        with self.lock:
            if (self.ctx.stop_requested or self.hard_stop or self.tripped or self.fatal
                    or self.drained):
                return False
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return False
            if self.max_batches is not None and self.claimed >= self.max_batches:
                return False
            self.claimed += 1
            return True

    def unreserve(self) -> None:
        with self.lock:
            self.claimed -= 1

    def add(self, **counts: int) -> None:
        with self.lock:
            self.counts.update(counts)

    def limit_reached(self) -> bool:
        if self.max_batches is not None and self.claimed >= self.max_batches:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline


class MatchWorker:
    """Matches batches until the queue is empty, a limit is hit or a stop is requested."""

    def __init__(self, database_url: str, client: OsrmClient, settings: MatchSettings,
                 pool: _Pool, chunk_size: ChunkSize, worker: str, index: int) -> None:
        self.database_url = database_url
        self.client = client
        self.settings = settings
        self.pool = pool
        self.chunk_size = chunk_size
        self.worker = worker
        self.index = index
        self.rng = random.Random()

    def run(self) -> None:
        try:
            conn = db.connect(self.database_url, autocommit=True,
                              application_name=f"pipeline match-gps {self.worker}/{self.index}")
        except PipelineError as exc:
            with self.pool.lock:
                self.pool.fatal = self.pool.fatal or exc
            return
        try:
            with db.wrap_errors("preparing a match-gps session"):
                # A commit lost in a PostgreSQL crash only means the batch is matched again
                # after its lease expires; every write is one atomic statement either way.
                conn.execute("SET synchronous_commit = off")
            while self.pool.reserve():
                claimed = self._claim(conn)
                if claimed is None:
                    self.pool.unreserve()
                    if self.pool.batching:
                        # Woken as soon as the batch maker commits a slice.
                        self.pool.slice_made.wait(0.05)
                        continue
                    with self.pool.lock:
                        self.pool.drained = True
                    return
                self._process(conn, claimed)
        except BaseException as exc:  # recorded for the main thread, which re-raises it
            with self.pool.lock:
                self.pool.fatal = self.pool.fatal or exc
        finally:
            conn.close()

    def _claim(self, conn: psycopg.Connection[Any]) -> _Claimed | None:
        token = uuid.uuid4()
        # Binary results: psycopg loads a binary float8[] about twice as fast as its text.
        with db.wrap_errors("claiming a GPS batch"), conn.cursor(binary=True) as cur:
            row = cur.execute(db.query("match_gps", "claim_batch"), {
                "worker": self.worker, "token": token,
                "lease_seconds": self.settings.lease_seconds,
            }).fetchone()
        if row is None:
            return None
        coordinates = list(zip(row["lats"] or [], row["lons"] or [], strict=True))
        return _Claimed(row["batch_id"], row["device_id"], row["coordinate_count"],
                        row["retry_count"], token, row["times"] or [], coordinates)

    def _process(self, conn: psycopg.Connection[Any], batch: _Claimed) -> None:
        log = self.pool.ctx.log
        started = time.monotonic()
        if self.pool.hard_stop:
            self._release(conn, batch)
            return
        times = batch.times
        try:
            match = match_trace(self.client, batch.coordinates, times,
                                radius_m=self.settings.radius_m, chunk_size=self.chunk_size,
                                in_flight=self.pool.in_flight)
        except OsrmError as exc:
            self._fail(conn, batch, exc, unavailable=isinstance(exc, OsrmUnavailable))
            return
        except Exception as exc:
            self._fail(conn, batch, exc, unavailable=False)
            raise
        duration_ms = int((time.monotonic() - started) * 1000)
        self._complete(conn, batch, match, duration_ms)
        with self.pool.lock:
            self.pool.unavailable_streak = 0
        log.debug("batch %s: %d points, %d polylines", batch.batch_id, len(times),
                  len(match.pieces))

    def _complete(self, conn: psycopg.Connection[Any], batch: _Claimed, match: TraceMatch,
                  duration_ms: int) -> None:
        pieces = match.pieces
        times = batch.times
        note = None
        if not pieces:
            note = "no matching: " + (", ".join(sorted(match.chunk_errors)) or "empty")
        params = {
            "batch_id": batch.batch_id, "token": batch.token,
            "matched": match.matched_points, "polylines": len(pieces),
            "osrm_calls": match.osrm_calls, "chunk_errors": Jsonb(dict(match.chunk_errors)),
            "note": note, "duration_ms": duration_ms,
            "starts": [times[p.first] for p in pieces],
            "ends": [times[p.last] for p in pieces],
            "encoded": [p.encoded for p in pieces],
            "confidences": [min(1.0, max(0.0, p.confidence)) for p in pieces],
            "point_counts": [p.points for p in pieces],
        }
        with db.wrap_errors("completing a GPS batch"):
            row = conn.execute(db.query("match_gps", "complete_batch"), params).fetchone()
        assert row is not None
        if row["batches"] == 0:
            # Our lease expired and another worker took the batch: nothing was written.
            self.pool.ctx.log.warning("batch %s: lease lost before completion; discarded",
                                      batch.batch_id)
            self.pool.add(batches_lease_lost=1)
            return
        self.pool.add(batches_completed=1, points_processed=row["points"],
                      points_matched=match.matched_points, polylines=row["polylines"])
        with self.pool.lock:
            self.pool.chunk_errors.update(match.chunk_errors)

    def _fail(self, conn: psycopg.Connection[Any], batch: _Claimed, exc: BaseException,
              *, unavailable: bool) -> None:
        attempt = batch.retry_count + 1
        delay = backoff_seconds(self.settings, attempt, self.rng)
        message = str(exc) if isinstance(exc, PipelineError) else \
            f"internal error: {type(exc).__name__}: {exc}"
        with db.wrap_errors("recording a failed GPS batch"):
            row = conn.execute(db.query("match_gps", "fail_batch"), {
                "batch_id": batch.batch_id, "token": batch.token,
                "max_attempts": self.settings.max_attempts, "delay_seconds": delay,
                "error": message[:2000],
                "osrm_calls": exc.osrm_calls if isinstance(exc, OsrmError) else 0,
            }).fetchone()
        status = row["status"] if row else "lease_lost"
        self.pool.ctx.log.warning("batch %s failed (attempt %d, now %s): %s",
                                  batch.batch_id, attempt, status, message)
        key = {"dead": "batches_dead", "lease_lost": "batches_lease_lost"}.get(
            status, "batches_failed")
        self.pool.add(**{key: 1})
        with self.pool.lock:
            if unavailable:
                self.pool.last_unavailable = exc
                self.pool.unavailable_streak += 1
                if self.pool.unavailable_streak >= self.pool.breaker and isinstance(
                        exc, OsrmError):
                    self.pool.tripped = self.pool.tripped or exc
            else:
                self.pool.unavailable_streak = 0

    def _release(self, conn: psycopg.Connection[Any], batch: _Claimed) -> None:
        with db.wrap_errors("releasing a GPS batch"):
            conn.execute(db.query("match_gps", "release_batch"),
                         {"batch_id": batch.batch_id, "token": batch.token})
        self.pool.add(batches_released=1)


# ======================================================================= the stage


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def match_gps(
    database_url: str,
    client: OsrmClient,
    settings: MatchSettings,
    ctx: RunContext,
    *,
    concurrency: int | None = None,
    max_batches: int | None = None,
    max_runtime: float | None = None,
    worker: str | None = None,
) -> StageResult:
    """Make batches from new points, then match batches until none is ready.

    ``concurrency`` workers (default ``[match] concurrency``) each keep one OSRM request in
    flight. Stops claiming at ``max_batches`` claimed, after ``max_runtime`` seconds, or on
    SIGTERM; batches already started are finished first.
    """
    started = time.monotonic()
    concurrency = concurrency or settings.concurrency
    worker = worker or f"{worker_name()}:{ctx.run_id[:8]}"
    deadline = started + max_runtime if max_runtime else None
    pool = _Pool(ctx, max_batches, deadline, breaker=max(2, concurrency),
                 concurrency=concurrency)
    chunk_size = ChunkSize(settings.chunk_size, settings.chunk_overlap)
    requests_before = client.requests
    counts: Counter[str] = Counter()
    conn = db.connect(database_url, autocommit=True,
                      application_name=f"pipeline match-gps {worker}")
    try:
        while True:
            rescued = rescue_expired(conn, settings)
            if rescued:
                ctx.log.warning("rescued %d batch(es) whose lease expired", len(rescued))
            elif pool.claimed and not _work_waiting(conn):
                # After a round that drained the queue: starting the workers and their
                # sessions again only to find nothing costs a sizeable share of a short run.
                break
            claimed_before = pool.claimed
            made = _run_round(conn, database_url, client, settings, pool, chunk_size, worker)
            counts.update(batches_created=made.created, batches_too_short=made.too_short,
                          leases_rescued=len(rescued))
            if pool.fatal is not None:
                raise pool.fatal
            progressed = pool.claimed > claimed_before
            if (ctx.stop_requested or pool.tripped or pool.limit_reached()
                    or not (progressed or made.created)):
                break
    except Interrupted as exc:
        _attach(exc, counts + pool.counts, pool, client.requests - requests_before, started)
        raise
    finally:
        conn.close()
    counts.update(pool.counts)
    osrm_requests = client.requests - requests_before
    result = _result(counts, pool, osrm_requests, started, worker, concurrency,
                     chunk_size.get()[0])
    if ctx.stop_requested:
        stopped = Interrupted(ctx.stop.signum or 15)
        _attach(stopped, counts, pool, osrm_requests, started)
        raise stopped
    # Exit 1 when OSRM was unreachable: enough failures in a row to stop claiming, or no
    # batch completed at all while the last one failed for it.
    cause = pool.tripped or (pool.last_unavailable if pool.unavailable_streak
                             and not counts["batches_completed"] else None)
    if cause is not None:
        failure = OsrmUnavailable(
            f"stopped: {cause}; "
            f"{counts['batches_failed'] + counts['batches_dead']} batch(es) failed and will "
            "be retried")
        failure.counts = result.counts  # type: ignore[attr-defined]
        failure.extra = result.extra  # type: ignore[attr-defined]
        raise failure
    return result


def _run_round(conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
               settings: MatchSettings, pool: _Pool, chunk_size: ChunkSize,
               worker: str) -> BatchingResult:
    """Start the workers, make batches while they already match the first ones, wait."""
    pool.drained = False
    pool.batching = True
    threads = [
        threading.Thread(
            target=MatchWorker(database_url, client, settings, pool, chunk_size, worker,
                               i).run,
            name=f"match-gps-{i}", daemon=True)
        for i in range(pool.workers)
    ]
    for t in threads:
        t.start()
    made = BatchingResult()
    try:
        try:
            made = make_batches(conn, settings, stop=lambda: bool(
                pool.ctx.stop_requested or pool.fatal or pool.tripped), made=_wake(pool))
        finally:
            pool.batching = False
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except BaseException as exc:
        # A second signal, or batching failed: abandon started batches after their current
        # OSRM call, then let the exception end the run.
        with pool.lock:
            pool.hard_stop = True
            if not isinstance(exc, Interrupted):
                pool.fatal = pool.fatal or exc
        for t in threads:
            t.join()
        raise
    return made


def _wake(pool: _Pool) -> Callable[[], None]:
    """Wake the workers waiting for batches; a worker that misses it looks again in 50 ms."""
    def wake() -> None:
        pool.slice_made.set()
        pool.slice_made.clear()
    return wake


def _result(counts: Counter[str], pool: _Pool, osrm_requests: int, started: float,
            worker: str, concurrency: int, chunk_size: int) -> StageResult:
    elapsed = max(time.monotonic() - started, 1e-9)
    full: dict[str, Any] = {k: counts.get(k, 0) for k in (
        "batches_created", "batches_too_short", "leases_rescued", "batches_completed",
        "batches_failed", "batches_dead", "batches_released", "batches_lease_lost",
        "points_matched", "points_processed", "polylines")}
    full["osrm_requests"] = osrm_requests
    if pool.chunk_errors:
        full["chunk_errors"] = dict(pool.chunk_errors)
    pps = round(full["points_processed"] / elapsed, 1)
    extra = {"points_per_second": pps, "worker": worker, "concurrency": concurrency,
             "chunk_size": chunk_size}
    did = sum(full[k] for k in ("batches_created", "batches_too_short", "leases_rescued",
                                "batches_completed", "batches_failed", "batches_dead"))
    message = (f"{full['batches_completed']} batch(es) completed, "
               f"{full['points_matched']} points matched at {pps:g} points/s")
    if full["batches_failed"] or full["batches_dead"]:
        message += f"; {full['batches_failed']} failed, {full['batches_dead']} dead"
    return StageResult(status=SUCCESS if did else NOOP, counts=full, extra=extra,
                       message=message if did else "no GPS batches to match")


def _attach(exc: PipelineError, counts: Counter[str], pool: _Pool, osrm_requests: int,
            started: float) -> None:
    result = _result(counts, pool, osrm_requests, started, "", 0, 0)
    exc.counts = result.counts  # type: ignore[attr-defined]
    exc.extra = {"points_per_second": result.extra["points_per_second"]}  # type: ignore[attr-defined]


# ======================================================================= status


def status_section(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The GPS backlog for ``pipeline status``: cheap, partial-index queries only."""
    with db.wrap_errors("reading the GPS backlog"):
        capped = conn.execute(db.query("match_gps", "backlog_points"),
                              {"cap": BACKLOG_COUNT_CAP + 1}).fetchone()
        oldest = conn.execute(db.query("match_gps", "oldest_unprocessed")).fetchone()
        open_rows = conn.execute(db.query("match_gps", "open_batches")).fetchall()
        recent = conn.execute(db.query("match_gps", "recent_batches")).fetchone()
        expired = conn.execute(db.query("match_gps", "expired_leases")).fetchone()
    assert capped and oldest and recent and expired
    unbatched = int(capped["n"])
    batches = {s: 0 for s in ("pending", "processing", "failed", "dead")}
    waiting_points = {s: 0 for s in batches}
    next_retry = None
    for r in open_rows:
        batches[r["status"]] = int(r["n"])
        waiting_points[r["status"]] = int(r["points"] or 0)
        if r["status"] == "failed":
            next_retry = r["next_attempt_at"]
    oldest_at = oldest["oldest"]
    age = (oldest["now"] - oldest_at).total_seconds() if oldest_at is not None else None
    return {
        "unprocessed_points": min(unbatched, BACKLOG_COUNT_CAP) + sum(waiting_points.values()),
        "unprocessed_points_capped": unbatched > BACKLOG_COUNT_CAP,
        "unbatched_points": min(unbatched, BACKLOG_COUNT_CAP),
        "oldest_unprocessed_at": oldest_at,
        "oldest_unprocessed_age_s": round(age, 1) if age is not None else None,
        "batches": batches,
        "dead_batches": batches["dead"],
        "dead_points": waiting_points["dead"],
        "expired_leases": int(expired["n"]),
        "next_retry_at": next_retry,
        "completed_last_hour": int(recent["completed_last_hour"]),
        "last_completed_at": recent["last_completed_at"],
    }


# ======================================================================= batches commands


def list_batches(conn: psycopg.Connection[Any], *, status: str | None = None,
                 device_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Batches, most recently changed first (``pipeline batches list``)."""
    with db.wrap_errors("listing GPS batches"):
        rows = conn.execute(db.query("match_gps", "list_batches"),
                            {"status": status, "device_id": device_id, "limit": limit}
                            ).fetchall()
    return [{**r, "batch_id": str(r["batch_id"])} for r in rows]


def requeue_batches(conn: psycopg.Connection[Any], *, dead_only: bool = False,
                    device_id: str | None = None) -> dict[str, Any]:
    """Make dead (and, unless ``dead_only``, failed) batches pending with a fresh attempt
    count, ready at once (``pipeline batches requeue``)."""
    statuses = ["dead"] if dead_only else ["dead", "failed"]
    with db.wrap_errors("requeueing GPS batches"):
        rows = conn.execute(db.query("match_gps", "requeue_batches"),
                            {"statuses": statuses, "device_id": device_id}).fetchall()
    return {"requeued": len(rows), "points": sum(r["coordinate_count"] for r in rows),
            "statuses": statuses, "device_id": device_id}
