"""GPS batches in PostgreSQL: cutting new points into per-device batches, rescuing expired
leases, backoff, the backlog for ``status``, and ``pipeline batches list|requeue``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from .. import db
from ..settings import MatchSettings

BATCHING_LOCK = "match-gps:batching"
BATCHING_DEVICES = 50  # devices per batch-making transaction
FIRST_SLICE_DEVICES = 8  # the first transaction is small: workers start matching sooner
DEFAULT_PARTITION_CAP = 1_000_000  # status counts at most this many, as information


def unseen(snapshot: str) -> dict[str, Any]:
    """The arrivals a snapshot (``xmin:xmax:xip,...``) does not see, as query parameters:
    from its xmax on, and the transactions it lists as running."""
    _, xmax, xip = snapshot.split(":")
    return {"seen_xmax": int(xmax), "seen_xip": [int(x) for x in xip.split(",") if x]}


def cursor(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """``unseen`` of the batching cursor: the arrivals no batcher pass has looked at yet."""
    row = conn.execute(db.query("match_gps", "batching_cursor")).fetchone()
    assert row is not None
    return unseen(row["seen"])


@dataclass
class BatchingResult:
    created: int = 0
    too_short: int = 0
    points: int = 0
    waiting: int = 0  # open runs and single points that may still grow
    reopened: int = 0  # batches that late points sent back to pending or recounted
    # Finished batches whose points prune had deleted: late points there are counted
    # processed, not matched (a match of what is left would replace the pruned lines).
    kept_after_prune: int = 0
    # Devices with points dated more than gap_seconds ahead: (how many, the latest time).
    # They wait unbatched (a clock glitch must not close the live run) until that time.
    future: dict[str, tuple[int, datetime]] = field(default_factory=dict)


def make_batches(conn: psycopg.Connection[Any], settings: MatchSettings, *,
                 devices: int = BATCHING_DEVICES,
                 stop: Callable[[], bool] = lambda: False,
                 made: Callable[[], None] = lambda: None) -> BatchingResult:
    """One batcher pass: cut the points no batch holds into batches, and send back to pending
    the batches that late points fall into, ``devices`` devices per transaction (fewer in
    the first), so workers can match the first batches while later ones are made; ``made``
    is called after each transaction that created or reopened batches. No point row is
    written. The pass looks at every arrival its starting snapshot sees; only a pass that
    went through all its devices advances the cursor, so an interrupted one is redone (every
    step is idempotent). Concurrent workers serialise each slice on an advisory lock."""
    total = BatchingResult()
    with db.wrap_errors("making GPS batches"):
        start = conn.execute(db.query("match_gps", "batching_pass")).fetchone()
        assert start is not None
        seen = start["seen"]
        earliest = _fresh_devices(conn, seen)
    order = sorted(earliest)
    size = min(devices, FIRST_SLICE_DEVICES)
    at = 0
    while at < len(order):
        if stop():
            return total
        chosen = order[at:at + size]
        at += size
        size = devices
        part = _make_slice(conn, settings, seen, chosen, [earliest[d] for d in chosen])
        if part.created or part.reopened:
            made()
        total.created += part.created
        total.too_short += part.too_short
        total.points += part.points
        total.waiting += part.waiting
        total.reopened += part.reopened
        total.kept_after_prune += part.kept_after_prune
        total.future |= part.future
    with db.wrap_errors("advancing the GPS batching cursor"):
        conn.execute(db.query("match_gps", "advance_cursor"), {"upto": start["upto"]})
    return total


def _fresh_devices(conn: psycopg.Connection[Any], seen: str) -> dict[str, Any]:
    """The devices with arrivals the snapshot ``seen`` does not see, each with the earliest of
    those arrivals, and the devices waiting on an open run (None when that is all)."""
    earliest: dict[str, Any] = {}
    for r in conn.execute(db.query("match_gps", "fresh_devices"), unseen(seen)):
        old, new = earliest.get(r["device_id"]), r["earliest"]
        earliest[r["device_id"]] = new if old is None else (
            old if new is None else min(old, new))
    return earliest


def _late(name: str) -> sql.Composed:
    """A query over ``late_arrivals``: the run's reopen_batches and the dry run's preview of
    it read the same batches."""
    return db.query("match_gps", name).format(
        late_arrivals=db.query("match_gps", "late_arrivals"))


def _run_status(r: dict[str, Any], settings: MatchSettings, *, last: bool) -> str | None:
    """What a planned run of points becomes: a ``pending`` batch, ``grows`` the batch next to
    its one point (``r["grows"]``), a ``too_short`` one closed at once, or None while it may
    still grow. Only the device's last run may wait: a single point with a later run (or
    between two batches) cannot grow, and once a batch is made after it, no later pass would
    look at it again."""
    if not r["closed"]:
        return None
    if r["n"] >= 2:
        return "pending"
    if r["grows"] is not None:
        return "grows"
    if r["between_batches"] or not last or r["age_s"] >= settings.too_short_after_seconds:
        return "too_short"
    return None


def _run_statuses(rows: list[dict[str, Any]], settings: MatchSettings
                  ) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Each planned run (ordered by device, then time) with what it becomes. A batch that
    two points alone grow (one before it, one after) must stay within max_batch_seconds with
    both: the later point alone is then treated as if no batch were next to it."""
    grown: dict[Any, tuple[datetime, datetime]] = {}
    for i, r in enumerate(rows):
        last = i + 1 == len(rows) or rows[i + 1]["device_id"] != r["device_id"]
        if r["grows"] is not None:
            lo, hi = grown.get(r["grows"], (r["grows_start"], r["grows_end"]))
            lo, hi = min(lo, r["start_time"]), max(hi, r["end_time"])
            if (hi - lo).total_seconds() < settings.max_batch_seconds:
                grown[r["grows"]] = (lo, hi)
            else:
                r = {**r, "grows": None}
        yield r, _run_status(r, settings, last=last)


def _make_slice(conn: psycopg.Connection[Any], settings: MatchSettings, seen: str,
                devices: list[str], earliest: list[Any]) -> BatchingResult:
    out = BatchingResult()
    with db.wrap_errors("making GPS batches"), conn.transaction():
        conn.execute(db.query("match_gps", "batching_lock"),
                     {"key": db.advisory_key(BATCHING_LOCK)})
        params = {"devices": devices, "earliest": earliest, **unseen(seen)}
        freed, rows = _plan_rows(conn, settings, params)
        if freed:
            conn.execute(db.query("match_gps", "drop_batches"), {"freed": freed})
        out.future = _future(conn, settings, devices)
        late = conn.execute(_late("reopen_batches"), params).fetchall()
        out.kept_after_prune = sum(1 for r in late if r["pruned"])
        out.reopened = len(late) - out.kept_after_prune
        plan: dict[str, list[Any]] = {k: [] for k in
                                      ("device_ids", "starts", "ends", "counts", "statuses")}
        waiting = set(out.future)
        runs = list(_run_statuses(rows, settings))
        alone = [r for r, status in runs if status == "grows"]
        if alone:
            conn.execute(db.query("match_gps", "grow_batches"), {
                "batch_ids": [r["grows"] for r in alone],
                "times": [r["start_time"] for r in alone]})
            out.reopened += len({r["grows"] for r in alone})
        for r, status in runs:
            if status is None:
                out.waiting += 1
                waiting.add(r["device_id"])
                continue
            if status == "grows":
                continue
            plan["device_ids"].append(r["device_id"])
            plan["starts"].append(r["start_time"])
            plan["ends"].append(r["end_time"])
            plan["counts"].append(r["n"])
            plan["statuses"].append(status)
            out.created += status == "pending"
            out.too_short += status == "too_short"
            out.points += r["n"]
        if plan["device_ids"]:
            conn.execute(db.query("match_gps", "insert_batches"), plan)
        conn.execute(db.query("match_gps", "set_waiting"),
                     {"slice": devices, "waiting": sorted(waiting)})
    return out


def future_text(future: dict[str, tuple[int, datetime]]) -> str:
    """A warning naming the devices whose points are dated ahead (the first five)."""
    named = ", ".join(f"{d!r} ({n} point(s), up to {t.isoformat()})"
                      for d, (n, t) in sorted(future.items())[:5])
    more = f" and {len(future) - 5} more device(s)" if len(future) > 5 else ""
    return (f"GPS points dated more than [match] gap_seconds ahead wait until their time "
            f"comes (is a device clock wrong?): {named}{more}")


def _plan_rows(conn: psycopg.Connection[Any], settings: MatchSettings, params: dict[str, Any]
               ) -> tuple[list[Any], list[dict[str, Any]]]:
    """The too_short batches whose point now has company (freed: cut again with it), and the
    runs plan_batches cuts."""
    gaps = {"gap_seconds": settings.gap_seconds, "max_batch_seconds": settings.max_batch_seconds}
    freed = [r["batch_id"] for r in conn.execute(
        db.query("match_gps", "freed_batches"), {**params, **gaps})]
    rows = conn.execute(db.query("match_gps", "plan_batches"),
                        {**params, **gaps, "freed": freed}).fetchall()
    return freed, rows


def _future(conn: psycopg.Connection[Any], settings: MatchSettings, devices: list[str]
            ) -> dict[str, tuple[int, datetime]]:
    rows = conn.execute(db.query("match_gps", "future_points"),
                        {"devices": devices, "gap_seconds": settings.gap_seconds})
    return {r["device_id"]: (r["n"], r["latest"]) for r in rows}


def plan(conn: psycopg.Connection[Any], settings: MatchSettings) -> dict[str, Any]:
    """What a batcher pass would do now, in a read-only transaction that writes nothing: the
    batches it would make (and the points in them), the runs still open, the batches late
    points would send back to pending (or keep finished: their points pruned), and the
    batches ready to be claimed (``match-gps --dry-run``)."""
    out: dict[str, Any] = {"batches_to_make": 0, "too_short_to_close": 0, "points_to_batch": 0,
                           "open_runs": 0, "future_points": 0}
    with db.wrap_errors("planning GPS batches"), conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        start = conn.execute(db.query("match_gps", "batching_pass")).fetchone()
        assert start is not None
        earliest = _fresh_devices(conn, start["seen"])
        devices = sorted(earliest)
        params = {"devices": devices, "earliest": [earliest[d] for d in devices],
                  **unseen(start["seen"])}
        rows = _plan_rows(conn, settings, params)[1] if devices else []
        reopen = conn.execute(_late("reopen_preview"), params).fetchone()
        assert reopen is not None
        out["batches_to_reopen"] = reopen["batches"]
        out["batches_kept_after_prune"] = reopen["kept"]
        runs = list(_run_statuses(rows, settings))
        out["batches_to_reopen"] += len({r["grows"] for r, status in runs if status == "grows"})
        for r, status in runs:
            if status is None:
                out["open_runs"] += 1
                continue
            if status == "grows":
                continue
            out["batches_to_make" if status == "pending" else "too_short_to_close"] += 1
            out["points_to_batch"] += r["n"]
        out["future_points"] = sum(n for n, _ in _future(conn, settings, devices).values())
        ready = conn.execute(db.query("match_gps", "ready_batches"), {"limit": 50}).fetchall()
        out["ready_batches"] = [{**r, "batch_id": str(r["batch_id"])} for r in ready]
        out["backlog"] = status_section(conn, settings)
    return out


def rescue_expired(conn: psycopg.Connection[Any], settings: MatchSettings) -> list[str]:
    with db.wrap_errors("rescuing expired leases"):
        rows = conn.execute(db.query("match_gps", "rescue_expired"),
                            {"max_attempts": settings.max_attempts}).fetchall()
    return [str(r["batch_id"]) for r in rows]


def work_waiting(conn: psycopg.Connection[Any]) -> bool:
    with db.wrap_errors("looking for GPS work"):
        row = conn.execute(db.query("match_gps", "work_waiting"), cursor(conn)).fetchone()
    return bool(row and (row["batches"] or row["points"]))


def backoff_seconds(settings: MatchSettings, attempt: int, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: half fixed, half random."""
    delay = min(settings.backoff_max_seconds,
                settings.backoff_base_seconds * 2 ** max(0, attempt - 1))
    return delay / 2 + rng.uniform(0, delay / 2)


def status_section(conn: psycopg.Connection[Any], settings: MatchSettings | None = None
                   ) -> dict[str, Any]:
    """The GPS backlog for ``pipeline status``: an exact count that reads only the backlog
    (open batches, new arrivals, open runs), never the processed history. ``future_points``
    (of them, the points dated more than ``gap_seconds`` ahead) probes only the devices the
    last batcher pass set aside (``gps_waiting_devices``), not the new arrivals: listing
    those (fresh_devices) took 230-280 ms with 50 k new among 2 M points, the future probe
    of 2,000 devices 15-20 ms."""
    settings = settings or MatchSettings()
    with db.wrap_errors("reading the GPS backlog"), conn.transaction():
        conn.execute(db.query("match_gps", "no_jit"))
        backlog = conn.execute(db.query("match_gps", "backlog_points"), cursor(conn)).fetchone()
        waiting = [r["device_id"] for r in conn.execute(db.query("match_gps", "waiting_devices"))]
        future = _future(conn, settings, waiting)
        open_rows = conn.execute(db.query("match_gps", "open_batches")).fetchall()
        recent = conn.execute(db.query("match_gps", "recent_batches")).fetchone()
        expired = conn.execute(db.query("match_gps", "expired_leases")).fetchone()
        default = conn.execute(db.query("match_gps", "default_partition_points"),
                               {"cap": DEFAULT_PARTITION_CAP + 1}).fetchone()
        locks = conn.execute(db.query("match_gps", "partition_locks")).fetchone()
    assert backlog and recent and expired and default and locks
    batches = {s: 0 for s in ("pending", "processing", "failed", "dead")}
    waiting_points = {s: 0 for s in batches}
    next_retry = None
    for r in open_rows:
        batches[r["status"]] = int(r["n"])
        waiting_points[r["status"]] = int(r["points"] or 0)
        if r["status"] == "failed":
            next_retry = r["next_attempt_at"]
    oldest_at = backlog["oldest"]
    age = (backlog["now"] - oldest_at).total_seconds() if oldest_at is not None else None
    return {
        "unprocessed_points": int(backlog["in_batches"]) + int(backlog["unbatched"]),
        "unbatched_points": int(backlog["unbatched"]),
        # Information: they wait for their time (a device clock ahead), as match-gps warns.
        "future_points": sum(n for n, _ in future.values()),
        "oldest_unprocessed_at": oldest_at,
        "oldest_unprocessed_age_s": round(max(age, 0.0), 1) if age is not None else None,
        "batches": batches,
        "dead_batches": batches["dead"],
        "dead_points": waiting_points["dead"],
        "expired_leases": int(expired["n"]),
        "next_retry_at": next_retry,
        "completed_last_hour": int(recent["completed_last_hour"]),
        # Of them, those that matched nothing: off the map, swapped coordinates, no fix.
        "unmatched_last_hour": int(recent["unmatched_last_hour"]),
        # A point alone, more than gap_seconds from its device's others: never matched.
        "too_short_last_hour": int(recent["too_short_last_hour"]),
        "last_completed_at": recent["last_completed_at"],
        # Information, not a warning: the next match-gps run gives them a partition.
        "default_partition_points": min(int(default["n"]), DEFAULT_PARTITION_CAP),
        "partitions": int(locks["partitions"]),
        "lock_slots": int(locks["lock_slots"]),
    }


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
