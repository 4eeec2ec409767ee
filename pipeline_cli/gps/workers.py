"""The worker pool of one match-gps process: threads that claim batches with ``FOR UPDATE
SKIP LOCKED`` under a lease, match them through OSRM and complete or fail them, each in one
statement, while the main thread is still cutting new points into batches.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from .. import db
from ..adapters.osrm import LatLon, OsrmClient, OsrmRefused, OsrmUnavailable
from ..errors import Interrupted, OsrmError, PipelineError
from ..runner import RunContext
from ..settings import MatchSettings
from .batches import BatchingResult, backoff_seconds, make_batches
from .stitching import ChunkSize, TraceMatch, match_trace

WORKERS_PER_REQUEST = 2  # worker threads per OSRM request in flight


@dataclass
class _Claimed:
    batch_id: Any
    device_id: str
    coordinate_count: int
    retry_count: int
    token: uuid.UUID
    times: list[float]  # epoch seconds
    coordinates: list[LatLon]


class Pool:
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
        self.last_error: BaseException | None = None  # of the newest failed batch
        self.failed: dict[str, str] = {}  # batch id -> its state after its last failure here
        self.fatal: BaseException | None = None
        self.drained = False
        self.batching = False  # batches are still being made: an empty queue is not the end
        self.slices = 0  # batch-making transactions committed in this round
        # Idle workers wait here for the next committed slice or the end of batching.
        self.changed = threading.Condition(self.lock)
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

    def slice_made(self) -> None:
        """The batch maker committed new batches: wake the idle workers."""
        with self.changed:
            self.slices += 1
            self.changed.notify_all()

    def batching_done(self) -> None:
        with self.changed:
            self.batching = False
            self.changed.notify_all()

    def wait_for_slice(self, seen: int) -> bool:
        """After an empty claim: wait while batches are being made for a slice newer than
        ``seen``. False when batching is over, so the queue is drained."""
        with self.changed:
            self.changed.wait_for(lambda: self.slices != seen or not self.batching)
            if self.slices != seen:
                return True
            self.drained = True
            return False

    def limit_reached(self) -> bool:
        if self.max_batches is not None and self.claimed >= self.max_batches:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline


class MatchWorker:
    """Matches batches until the queue is empty, a limit is hit or a stop is requested."""

    def __init__(self, database: db.Database, client: OsrmClient, settings: MatchSettings,
                 pool: Pool, chunk_size: ChunkSize, worker: str, index: int) -> None:
        self.database = database
        self.client = client
        self.settings = settings
        self.pool = pool
        self.chunk_size = chunk_size
        self.worker = worker
        self.index = index
        self.rng = random.Random()

    def run(self) -> None:
        try:
            conn = self.database.connect(f"pipeline match-gps {self.worker}/{self.index}",
                                         autocommit=True)
        except PipelineError as exc:
            with self.pool.lock:
                self.pool.fatal = self.pool.fatal or exc
            return
        try:
            # A commit lost in a PostgreSQL crash only means the batch is matched again
            # after its lease expires; every write is one atomic statement either way.
            self.database.set_session(conn, "synchronous_commit", "off")
            while self.pool.reserve():
                seen = self.pool.slices  # read before the claim: a later slice wakes us
                claimed = self._claim(conn)
                if claimed is None:
                    self.pool.unreserve()
                    if self.pool.wait_for_slice(seen):
                        continue
                    return
                self._process(conn, claimed)
        except BaseException as exc:  # recorded for the main thread, which re-raises it
            with self.pool.lock:
                self.pool.fatal = self.pool.fatal or exc
        finally:
            conn.close()

    def _claim(self, conn: psycopg.Connection[Any]) -> _Claimed | None:
        """The next ready batch with its points, or None when none is ready."""
        # Binary results: psycopg loads a binary float8[] about twice as fast as its text.
        with db.wrap_errors("claiming a GPS batch"), conn.cursor(binary=True) as cur:
            while True:
                token = uuid.uuid4()
                row = cur.execute(db.query("match_gps", "claim_batch"), {
                    "worker": self.worker, "token": token,
                    "lease_seconds": self.settings.lease_seconds,
                }).fetchone()
                if row is None:
                    return None
                points = cur.execute(db.query("match_gps", "claim_points"),
                                     {**row, "token": token}, prepare=False).fetchone()
                if points is not None and points["leased"]:
                    break  # else late points sent it back to pending meanwhile: the next one
        coordinates = list(zip(points["lats"] or [], points["lons"] or [], strict=True))
        return _Claimed(row["batch_id"], row["device_id"], row["coordinate_count"],
                        row["retry_count"], token, points["times"] or [], coordinates)

    def _process(self, conn: psycopg.Connection[Any], batch: _Claimed) -> None:
        log = self.pool.ctx.log
        started = time.monotonic()
        if self.pool.hard_stop or isinstance(self.pool.tripped, OsrmRefused):
            self._release(conn, batch)
            return
        times = batch.times
        try:
            match = match_trace(self.client, batch.coordinates, times,
                                radius_m=self.settings.radius_m, chunk_size=self.chunk_size,
                                in_flight=self.pool.in_flight)
        except OsrmRefused as exc:
            # The configuration is at fault, not the batch: every batch would fail alike.
            # Give it back as it was (no attempt counted, no backoff) and stop claiming.
            self._release(conn, batch)
            with self.pool.lock:
                self.pool.tripped = self.pool.tripped or exc
            self.pool.ctx.log.warning("batch %s given back untouched: %s", batch.batch_id, exc)
            return
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
        if match.stationary:
            note = "stationary: " + (match.reason or (
                f"all {len(times)} points within {self.settings.radius_m:g} m; nothing to match"))
        elif not pieces:
            note = "no matching: " + (", ".join(sorted(match.chunk_errors)) or "empty")
            if match.reason:
                note += f"; {match.reason}"
                self.pool.ctx.log.warning("batch %s of device %r matched nothing: %s",
                                          batch.batch_id, batch.device_id, match.reason)
        params = {
            "batch_id": batch.batch_id, "token": batch.token,
            "points": len(times), "matched": match.matched_points,
            "polylines": len(pieces),
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
        self.pool.add(batches_completed=1, batches_stationary=int(match.stationary),
                      points_processed=len(times), points_matched=match.matched_points,
                      polylines=row["polylines"])
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
            self.pool.last_error = exc
            self.pool.failed[str(batch.batch_id)] = status
            if unavailable:
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


def run_round(conn: psycopg.Connection[Any], database: db.Database, client: OsrmClient,
               settings: MatchSettings, pool: Pool, chunk_size: ChunkSize,
               worker: str) -> BatchingResult:
    """Start the workers, make batches while they already match the first ones, wait."""
    pool.drained = False
    pool.batching = True
    pool.slices = 0
    threads = [
        threading.Thread(
            target=MatchWorker(database, client, settings, pool, chunk_size, worker,
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
                pool.ctx.stop_requested or pool.fatal or pool.tripped), made=pool.slice_made)
        finally:
            pool.batching_done()
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


