"""match-gps: raw GPS points -> batches -> OSRM ``/match`` -> ``cached_polylines``.

Points are cut into per-device batches (``gps.batches``). A pool of workers (``gps.workers``)
claims batches with ``FOR UPDATE SKIP LOCKED`` under a lease, matches them through OSRM in
overlapping chunks that are stitched back together (``gps.stitching``), and writes a batch's
polylines and its completion in one statement; no point row is ever written. Failures back
off exponentially and become ``dead`` after ``max_attempts``; expired leases are rescued.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from typing import Any

from .. import db
from ..adapters.osrm import OsrmClient, OsrmRefused, OsrmUnavailable
from ..errors import Interrupted, OsrmError, PipelineError
from ..gps import batches, partitions
from ..gps.batches import future_text, rescue_expired, work_waiting
from ..gps.stitching import ChunkSize
from ..gps.workers import Pool, run_round
from ..runner import DRY_RUN, NOOP, SUCCESS, RunContext, StageResult
from ..settings import MatchSettings

# Making a partition waits for the default partition's lock; partitions are housekeeping
# (points are matched from the default partition too), so a run waits this long, then matches.
PARTITION_LOCK_TIMEOUT_MS = 2000


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def match_gps(
    database: db.Database,
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
    pool = Pool(ctx, max_batches, deadline, breaker=max(2, concurrency),
                 concurrency=concurrency)
    chunk_size = ChunkSize(settings.chunk_size, settings.chunk_overlap)
    requests_before = client.requests
    counts: Counter[str] = Counter()
    warned_future = False
    conn = database.connect(autocommit=True, name=f"pipeline match-gps {worker}")
    try:
        try:
            created = partitions.ensure(conn, lock_timeout_ms=PARTITION_LOCK_TIMEOUT_MS)
        except partitions.PartitionsBusy as exc:
            created = []
            ctx.log.warning("%s", exc)
        if created:
            ctx.log.info("created GPS partition(s) %s", ", ".join(created))
        while True:
            rescued = rescue_expired(conn, settings)
            if rescued:
                ctx.log.warning("rescued %d batch(es) whose lease expired", len(rescued))
            elif pool.claimed and not work_waiting(conn):
                # After a round that drained the queue: starting the workers and their
                # sessions again only to find nothing costs a sizeable share of a short run.
                break
            claimed_before = pool.claimed
            made = run_round(conn, database, client, settings, pool, chunk_size, worker)
            # A too_short batch (one point) is finished when made: its point is processed.
            counts.update(batches_created=made.created, batches_too_short=made.too_short,
                          points_processed=made.too_short, leases_rescued=len(rescued),
                          batches_kept_after_prune=made.kept_after_prune)
            if made.kept_after_prune:
                ctx.log.warning(
                    "%d finished GPS batch(es) got late points after prune had deleted some "
                    "of their points: kept as matched, the late points counted processed but "
                    "not matched (a match of what is left would replace the pruned lines; "
                    "`pipeline batches list` shows them)", made.kept_after_prune)
            if made.future and not warned_future:  # once a run
                warned_future = True
                ctx.log.warning(future_text(made.future))
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
    # Exit 1 when OSRM was unreachable (enough failures in a row to stop claiming), when
    # batches failed and none completed, whatever the cause (a proxy's HTML page, a wrong
    # [osrm] url path): a run that matched nothing is no success; or when a batch became dead
    # even beside completed ones: its points wait for an operator. A batch that will be
    # retried beside completed ones is transient: the next run takes it, exit 0. A server that
    # refuses this configuration (OsrmRefused: a radius cap, a wrong [osrm] url path, a size
    # limit) stopped the run at once: exit 78, as settings; its batches were given back.
    fate = Counter(pool.failed.values())  # a batch may fail twice in one run
    done = counts["batches_completed"]
    halted = pool.tripped or (pool.last_error if pool.failed and not done else None)
    cause = halted or (pool.last_error if fate["dead"] else None)
    if cause is not None:
        fates = ([f"{fate['failed']} batch(es) failed and will be retried"] if fate["failed"]
                 else []) + ([f"{fate['dead']} batch(es) failed for the last time ([match] "
                              "max_attempts; `pipeline batches requeue` retries them)"]
                             if fate["dead"] else [])
        if isinstance(cause, OsrmRefused) and counts["batches_released"]:
            fates.append(f"{counts['batches_released']} batch(es) given back untouched "
                         "(no attempt counted)")
        head = f"stopped: {cause}" if halted else \
            f"{done} batch(es) completed; last error: {cause}"
        kind = type(cause) if isinstance(cause, (OsrmUnavailable, OsrmRefused)) else OsrmError
        raise kind("; ".join([head, *fates]), partial=result)
    return result


def _result(counts: Counter[str], pool: Pool, osrm_requests: int, started: float,
            worker: str, concurrency: int, chunk_size: int) -> StageResult:
    elapsed = max(time.monotonic() - started, 1e-9)
    full: dict[str, Any] = {k: counts.get(k, 0) for k in (
        "batches_created", "batches_too_short", "leases_rescued", "batches_completed",
        "batches_stationary", "batches_failed", "batches_dead", "batches_released",
        "batches_lease_lost", "batches_kept_after_prune", "points_matched",
        "points_processed", "polylines")}
    full["osrm_requests"] = osrm_requests
    if pool.chunk_errors:
        full["chunk_errors"] = dict(pool.chunk_errors)
    pps = round(full["points_processed"] / elapsed, 1)
    extra = {"points_per_second": pps, "worker": worker, "concurrency": concurrency,
             "chunk_size": chunk_size}
    did = sum(full[k] for k in ("batches_created", "batches_too_short", "leases_rescued",
                                "batches_completed", "batches_failed", "batches_dead",
                                "batches_kept_after_prune"))
    message = (f"{full['batches_completed']} batch(es) completed, "
               f"{full['points_matched']} points matched at {pps:g} points/s")
    if full["batches_stationary"]:
        message += f" ({full['batches_stationary']} stationary: did not move)"
    if full["batches_failed"] or full["batches_dead"]:
        message += f"; {full['batches_failed']} failed, {full['batches_dead']} dead"
    if full["batches_kept_after_prune"]:
        message += (f"; {full['batches_kept_after_prune']} batch(es) kept as matched: "
                    "late points after prune")
    return StageResult(status=SUCCESS if did else NOOP, counts=full, extra=extra,
                       message=message if did else "no GPS batches to match")


def _attach(exc: PipelineError, counts: Counter[str], pool: Pool, osrm_requests: int,
            started: float) -> None:
    result = _result(counts, pool, osrm_requests, started, "", 0, 0)
    exc.partial = StageResult(counts=result.counts,
                              extra={"points_per_second": result.extra["points_per_second"]})


def preview(database: db.Database, settings: MatchSettings | None = None) -> StageResult:
    """What a match-gps run would do now (``--dry-run``), in a read-only transaction that
    writes nothing (no batch, lease, partition or cursor move): the batches a pass would make
    from waiting points, the batches ready to be claimed with their points (the first 50
    listed), and the backlog as ``status`` reads it."""
    with database.connect(name="pipeline match-gps dry-run", autocommit=True) as conn:
        planned = batches.plan(conn, settings or MatchSettings())
    gps = planned["backlog"]
    ready = planned["ready_batches"]
    b = gps["batches"]
    would = (gps["unprocessed_points"] - gps["dead_points"] > 0) or gps["expired_leases"] > 0
    counts = {"unbatched_points": gps["unbatched_points"],
              "unprocessed_points": gps["unprocessed_points"],
              "pending_batches": b["pending"], "failed_batches": b["failed"],
              "processing_batches": b["processing"], "expired_leases": gps["expired_leases"],
              "dead_batches": b["dead"],
              "batches_to_make": planned["batches_to_make"],
              "batches_to_reopen": planned["batches_to_reopen"],
              "batches_kept_after_prune": planned["batches_kept_after_prune"],
              "too_short_to_close": planned["too_short_to_close"],
              "points_to_batch": planned["points_to_batch"], "open_runs": planned["open_runs"],
              "future_points": planned["future_points"],
              "batches_ready": len(ready),
              "points_ready": sum(r["coordinate_count"] for r in ready)}
    kept = (f"{planned['batches_kept_after_prune']} to keep as matched (late points after "
            "prune), " if planned["batches_kept_after_prune"] else "")
    message = (f"would match: {gps['unbatched_points']} points to batch "
               f"({planned['batches_to_make']} new batches), "
               f"{planned['batches_to_reopen']} batch(es) to reopen for late points, {kept}"
               f"{b['pending']} pending and "
               f"{b['failed']} failed batches ({gps['unprocessed_points']} points waiting), "
               f"{gps['expired_leases']} expired leases"
               if would else "would do nothing: no GPS backlog")
    return StageResult(status=DRY_RUN, counts=counts,
                       extra={"dry_run": True, "would_run": would, "ready_batches": ready,
                              "next_retry_at": gps["next_retry_at"]}, message=message)
