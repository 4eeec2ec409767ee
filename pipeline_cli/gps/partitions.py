"""The daily partitions of ``gps_points``: created ahead by ``db migrate`` and the GPS stages,
points parked in the default partition moved into their day, and retention that drops a
whole day once all of it is processed and deletes in chunks where it cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from .. import db
from . import batches

DAYS_AHEAD = 7  # partitions exist this many days ahead, so the listener never waits on DDL
PARTITION_LOCK = "gps:partitions"
# How long prune waits for the locks a drop takes (every writer and reader of gps_points
# waits behind it meanwhile); an open transaction still there keeps the day to the chunks.
DROP_LOCK_TIMEOUT_MS = 2000


class PartitionsBusy(Exception):
    """``ensure`` gave up waiting for the locks that making a partition takes."""


def ensure(conn: psycopg.Connection[Any], days: list[date] | None = None,
           today: date | None = None, *, lock_timeout_ms: int | None = None) -> list[str]:
    """Create the daily partitions of yesterday to ``DAYS_AHEAD`` days ahead, of ``days``,
    and of every day the default partition holds points of (moving those points in).
    Returns the partitions created. Runs in its own transaction. Making a partition locks
    the default partition, so it waits for every open transaction that wrote or read there;
    with ``lock_timeout_ms`` it gives up after that long, creates nothing and raises
    :class:`PartitionsBusy`."""
    today = today or datetime.now(UTC).date()
    wanted = {today + timedelta(days=i) for i in range(-1, DAYS_AHEAD + 1)} | set(days or ())
    created: list[str] = []
    with db.wrap_errors("creating GPS partitions"):
        try:
            with conn.transaction():
                if lock_timeout_ms is not None:  # for this transaction only
                    db.set_local(conn, "lock_timeout", f"{lock_timeout_ms}ms")
                conn.execute(db.query("match_gps", "batching_lock"),
                             {"key": db.advisory_key(PARTITION_LOCK)})
                parked = conn.execute(db.query("match_gps", "default_partition_days")
                                      ).fetchall()
                wanted |= {r["day"] for r in parked}
                existing = {r["day"] for r in conn.execute(db.query("match_gps",
                                                                    "partition_days"))}
                for day in sorted(wanted - existing):
                    conn.execute(db.query("match_gps", "add_partition"), {"day": day})
                    created.append(f"gps_points_p{day:%Y%m%d}")
        except psycopg.errors.LockNotAvailable:
            if lock_timeout_ms is None:
                raise
            raise PartitionsBusy(
                f"GPS partitions not made this run: after {lock_timeout_ms / 1000:g} s an "
                "open transaction (a listener's, holding points of a day without a "
                "partition, or a long read of gps_points) still holds the default partition; "
                "its points are matched where they are, and the next run tries again"
            ) from None
    return created


@dataclass
class PruneResult:
    partitions_dropped: list[str] = field(default_factory=list)
    points_dropped: int = 0  # in dropped partitions
    points_deleted: int = 0  # row by row, in chunks
    # Days listed as droppable that were not dropped: a point came in, or an open transaction
    # still held gps_points after DROP_LOCK_TIMEOUT_MS. Pruned in chunks instead.
    partitions_kept: list[str] = field(default_factory=list)


def prune(conn: psycopg.Connection[Any], cutoff: datetime, *, chunk_rows: int = 10_000,
          dry_run: bool = False, check_stop: Callable[[], None] = lambda: None
          ) -> PruneResult:
    """Remove processed points recorded before ``cutoff``: a daily partition that lies wholly
    before it and holds no unprocessed point is detached and dropped (no dead tuples, no
    vacuum); elsewhere (a day partly before the cutoff, a day with unprocessed points, the
    default partition) processed points are deleted ``chunk_rows`` at a time, one
    transaction per chunk, so locks stay short. ``check_stop`` runs before each of those
    transactions (a stop request ends the pass between them)."""
    out = PruneResult()
    with db.wrap_errors("listing GPS partitions"):
        seen = batches.cursor(conn)  # read once: a cursor moved since only says less is new
        parts = conn.execute(db.query("match_gps", "prunable_partitions"),
                             {"cutoff": cutoff, "only": None, **seen}).fetchall()
    if not conn.autocommit:
        conn.commit()
    for p in parts:
        ident = sql.Identifier(p["name"])
        if p["whole"] and p["done"]:
            check_stop()
            dropped = _drop(conn, p["name"], cutoff, dry_run=dry_run)
            if dropped is not None:
                out.partitions_dropped.append(p["name"])
                out.points_dropped += dropped
                continue
            out.partitions_kept.append(p["name"])
        doomed = db.query("match_gps", "prune_doomed").format(part=ident)
        if dry_run:  # a count that only reads: a dry run works on a standby
            check_stop()
            with db.wrap_errors(f"counting what prune would delete in {p['name']}"), \
                    conn.transaction():
                row = conn.execute(db.query("match_gps", "prune_due").format(doomed=doomed),
                                   {"cutoff": cutoff, "limit": None, **seen}).fetchone()
            out.points_deleted += int(row["n"]) if row else 0
            continue
        while chunk_rows > 0:
            check_stop()
            with db.wrap_errors(f"pruning {p['name']}"), conn.transaction():
                row = conn.execute(db.query("match_gps", "prune_chunk").format(
                    part=ident, doomed=doomed), {"cutoff": cutoff, "limit": chunk_rows, **seen}
                ).fetchone()
            n = int(row["n"]) if row else 0
            out.points_deleted += n
            if n < chunk_rows:
                break
    return out


def _drop(conn: psycopg.Connection[Any], name: str, cutoff: datetime, *, dry_run: bool
          ) -> int | None:
    """Drop the day ``name`` (a dry run: count it) and return its points, or None if it cannot
    go now. The listing saw only committed points: a listener's open transaction may hold one
    more, committed while prune waits for its locks. So the day is checked again once prune
    holds them and no point can enter."""
    ident = sql.Identifier(name)
    with db.wrap_errors(f"dropping {name}"):
        try:
            with conn.transaction():
                row = conn.execute(db.query("match_gps", "partition_points").format(
                    part=ident)).fetchone()
                if dry_run:
                    return int(row["n"]) if row else 0
                db.set_local(conn, "lock_timeout", f"{DROP_LOCK_TIMEOUT_MS}ms")
                conn.execute(db.query("match_gps", "lock_partition").format(part=ident))
                again = conn.execute(db.query("match_gps", "prunable_partitions"),
                                     {"cutoff": cutoff, "only": name, **batches.cursor(conn)}
                                     ).fetchone()
                if again is None or not (again["whole"] and again["done"]):
                    return None
                # Counted before the locks, so readers wait only for the drop: a point that
                # came in between would have failed the check (new to the batcher).
                conn.execute(db.query("match_gps", "drop_partition").format(part=ident))
                return int(row["n"]) if row else 0
        except psycopg.errors.LockNotAvailable:
            return None
