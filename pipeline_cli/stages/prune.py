"""prune: the daily housekeeping that keeps tables and the bucket from growing without bound.

Under ``[retention]`` (0 keeps forever) it deletes processed GPS points with their finished
batches, stale cached polylines, old run history, and dataset versions beyond the newest N
(with their virtual generations, graph versions and S3 objects; never another deployment's
objects on a shared bucket). Every delete takes at most
``chunk_size`` rows in its own short transaction, so ingest and readers never wait long; a
dry run counts the same predicates and deletes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from .. import db
from ..adapters.backups import BackupStore
from ..errors import PipelineError
from ..gps import batches, partitions
from ..runner import DRY_RUN, FAILED, NOOP, SUCCESS, RunContext, StageResult, lock_holders
from ..settings import RetentionSettings
from .build_graph import delete_export

KINDS = ("gps_points", "gps_batches", "polylines", "stage_runs", "datasets",
         "virtual_generations", "virtual_stops", "virtual_routes", "graph_versions",
         "s3_objects")
# The stages that read a dataset version through their run: a restore replays an old one's raw
# pages (the new version reads them from there on), gen-virtual and build-graph record their
# generation or graph against the dataset they started on. prune deletes no dataset version
# while one runs, and holds their locks while it deletes.
DATASET_READERS = ("sync-odata", "gen-virtual", "build-graph")


@dataclass
class _Pass:
    """One prune pass: its connection, clock, chunk size and whether it only counts."""

    conn: psycopg.Connection[Any]
    now: datetime
    chunk: int
    dry_run: bool
    ctx: RunContext
    counts: dict[str, int]

    def cutoff(self, days: int) -> datetime:
        # In UTC: ``now`` carries the session's TimeZone, and days subtracted from it were
        # counted on that zone's wall clock, an hour off across a daylight-saving change.
        return self.now.astimezone(UTC) - timedelta(days=days)

    def count(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        with db.wrap_errors(f"counting what prune would delete ({name})"):
            row = self.conn.execute(db.query("prune", name), params).fetchone()
        assert row is not None
        return dict(row)

    def delete_chunks(self, kind: str, name: str, params: dict[str, Any],
                      lock: str | None = None) -> None:
        """Run a chunked delete until it deletes nothing, adding each committed chunk to
        ``counts[kind]`` at once (a later failure still reports it). ``lock``: an advisory
        lock each chunk's transaction takes first, so the delete's snapshot comes after it."""
        while True:
            self.ctx.check_stop()  # between chunks: each one is committed on its own
            with db.wrap_errors(f"pruning ({name})"), self.conn.transaction():
                if lock is not None:
                    self.conn.execute(db.query("match_gps", "batching_lock"),
                                      {"key": db.advisory_key(lock)})
                n = self.conn.execute(db.query("prune", name),
                                      params | {"chunk": self.chunk}).rowcount
            self.counts[kind] += n
            if n == 0:
                return


def prune(database: db.Database, backups: BackupStore | None, settings: RetentionSettings,
          ctx: RunContext, *, dry_run: bool = False) -> StageResult:
    """Delete what ``settings`` says is due (``dry_run``: count it). ``backups`` may be None
    only for a dry run, or when no dataset is due."""
    counts = dict.fromkeys(KINDS, 0)
    datasets: list[str] = []
    try:
        with database.connect(name="pipeline prune", autocommit=True) as conn:
            with db.wrap_errors("reading the clock"):
                clock = conn.execute("SELECT now() AS now").fetchone()
            assert clock is not None
            p = _Pass(conn, clock["now"], settings.chunk_size, dry_run, ctx, counts)
            if settings.gps_days:
                _prune_gps(p, settings.gps_days)
            if settings.polyline_days:
                _prune_polylines(p, settings.polyline_days)
            if settings.runs_days:
                _prune_runs(p, settings.runs_days)
            if settings.datasets:
                _prune_datasets(p, database, backups, settings.datasets, datasets)
    except PipelineError as exc:
        # What was deleted before the failure stays deleted: the failed run reports it.
        if exc.partial is None:
            exc.partial = StageResult(status=FAILED, counts=counts,
                                      extra={"datasets_deleted": datasets})
        raise
    summary = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items() if n)
    extra: dict[str, Any] = {"datasets_deleted": datasets}
    if dry_run:
        return StageResult(status=DRY_RUN, counts=counts, extra=extra | {"dry_run": True},
                           message=f"would delete {summary}" if summary
                           else "nothing is due")
    return StageResult(status=SUCCESS if summary else NOOP, counts=counts, extra=extra,
                       message=f"deleted {summary}" if summary else "nothing is due")


def _prune_gps(p: _Pass, days: int) -> None:
    """GPS points processed more than ``days`` ago, then the finished batches before the cutoff
    that no longer hold a point; points no finished batch has read stay whatever their age,
    and dead batches stay (the evidence). A daily partition wholly due and wholly processed is
    dropped in one step; elsewhere points go in chunks (``gps.partitions.prune``)."""
    cutoff = p.cutoff(days)
    pruned = partitions.prune(p.conn, cutoff, chunk_rows=p.chunk, dry_run=p.dry_run,
                              check_stop=p.ctx.check_stop)
    p.counts["gps_points"] = pruned.points_dropped + pruned.points_deleted
    for name in pruned.partitions_kept:
        p.ctx.log.info("%s not dropped (a point came in, or an open transaction held "
                       "gps_points): its processed points were deleted in chunks", name)
    params = {"cutoff": cutoff}
    if p.dry_run:
        p.counts["gps_batches"] = int(p.count("gps_batches_due", params)["n"])
    else:
        # Under the batcher's lock: a pass that read a late point in a batch's range (to
        # reopen it) commits first, or reads the point after the batch is gone and gives it a
        # batch of its own. Without it a batch could go under a pass that planned the point
        # into it, leaving the point in no batch, its day then dropped as done.
        p.delete_chunks("gps_batches", "gps_batches_delete_chunk", params,
                        lock=batches.BATCHING_LOCK)


def _prune_polylines(p: _Pass, days: int) -> None:
    params = {"cutoff": p.cutoff(days)}
    if p.dry_run:
        p.counts["polylines"] = int(p.count("polylines_due", params)["n"])
    else:
        p.delete_chunks("polylines", "polylines_delete_chunk", params)


def _prune_runs(p: _Pass, days: int) -> None:
    with db.wrap_errors("reading the runs status needs"):
        keep = [r["run_id"] for r in p.conn.execute(db.query("prune", "runs_keep"))]
    params = {"cutoff": p.cutoff(days), "keep": keep}
    if p.dry_run:
        p.counts["stage_runs"] = int(p.count("runs_due", params)["n"])
    else:
        p.delete_chunks("stage_runs", "runs_delete_chunk", params)


def _lock_readers(locks: psycopg.Connection[Any]) -> str:
    """Take the locks of DATASET_READERS in ``locks``' transaction (held until it ends), or
    say who holds one (then none is held)."""
    with db.wrap_errors("taking the locks of the stages that read datasets"):
        for stage in DATASET_READERS:
            row = locks.execute(db.query("runner", "try_lock"),
                                {"key": db.advisory_key(stage)}).fetchone()
            if not (row and row["locked"]):
                locks.rollback()
                holder = lock_holders(locks, (stage,)).get(stage)
                locks.rollback()
                return f"{stage} is running" + (f" ({holder.describe()})" if holder else "")
    return ""


def _prune_datasets(p: _Pass, database: db.Database, backups: BackupStore | None, keep: int,
                    done: list[str]) -> None:
    """Dataset versions beyond the ``keep`` newest, with their generations, graph versions,
    the S3 objects of all three and, in the same transaction as the rows, their virtual
    entities if the virtual tables still hold them; never the active dataset or the active
    graph's. Each
    version deleted (or, in a dry run, due) is appended to ``done``.

    S3 goes first, then the rows in one transaction: a failure in between leaves the rows,
    and the next run deletes what is left of the objects, so no object is ever orphaned.
    Only while no stage of DATASET_READERS runs, and holding their locks (taken only when a
    version is due: most runs have none)."""
    with db.wrap_errors("reading the dataset versions"):
        due = p.conn.execute(db.query("prune", "datasets_due"), {"keep": keep}).fetchall()
    if not due:
        return
    with database.connect(name="pipeline prune (dataset locks)") as locks:
        busy = _lock_readers(locks)
        if busy:
            p.ctx.log.warning("no dataset version pruned this run: %s; the next run prunes "
                              "them", busy)
            return
        # Again under the locks: a restore that ended meanwhile keeps its source version.
        with db.wrap_errors("reading the dataset versions"):
            due = p.conn.execute(db.query("prune", "datasets_due"), {"keep": keep}).fetchall()
        _delete_datasets(p, backups, due, done)


def _delete_datasets(p: _Pass, backups: BackupStore | None, due: list[dict[str, Any]],
                     done: list[str]) -> None:
    identity = db.require_deployment_id(p.conn) if due else ""
    for d in due:
        p.ctx.check_stop()
        if p.dry_run:
            p.counts["datasets"] += 1
            p.counts["virtual_generations"] += len(d["generations"])
            p.counts["graph_versions"] += len(d["graphs"])
            virtual = p.count("virtual_due", {"version": d["version"]})
            p.counts["virtual_stops"] += int(virtual["virtual_stops"])
            p.counts["virtual_routes"] += int(virtual["virtual_routes"])
            if backups is not None:
                p.counts["s3_objects"] += _delete_objects(p, backups, d, identity)
            done.append(d["version"])
            continue
        if backups is None:
            raise ValueError("a backup store is needed to delete dataset versions")
        p.counts["s3_objects"] += _delete_objects(p, backups, d, identity)
        with db.wrap_errors(f"deleting dataset {d['version']}"), p.conn.transaction():
            row = p.conn.execute(db.query("prune", "dataset_delete"),
                                 {"version": d["version"]}).fetchone()
            assert row is not None
            if not row["datasets"]:  # it became active (a restore) since it was listed
                continue
            p.conn.execute(db.query("prune", "dataset_delete_row"), {"version": d["version"]})
        p.counts["datasets"] += 1
        p.counts["virtual_generations"] += int(row["generations"])
        p.counts["graph_versions"] += int(row["graph_versions"])
        p.counts["virtual_stops"] += int(row["virtual_stops"])
        p.counts["virtual_routes"] += int(row["virtual_routes"])
        p.ctx.log.info("deleted dataset %s (%d generations, graph versions %s)",
                       d["version"], row["generations"], ", ".join(d["graphs"]) or "none")
        done.append(d["version"])


def _delete_objects(p: _Pass, backups: BackupStore, d: dict[str, Any], identity: str) -> int:
    """Delete (in a dry run: count) the S3 objects of dataset ``d`` and its graph versions
    that are this database's. Another installation backing up into the same bucket and key
    prefix may have written at the same keys (versions are numbered per database): a graph
    export whose manifest names another deployment (or, written before manifests named one,
    another checksum than recorded), or a dataset backup whose manifest names a run other
    than the one that recorded the version, is left alone. One GET per manifest."""
    n = 0
    prefix = d["backup_prefix"]
    manifest = backups.get_json_if_any(prefix + "manifest.json")
    theirs = manifest.get("run_id") if isinstance(manifest, dict) else None
    if theirs is not None and d["run_id"] is not None and str(theirs) != d["run_id"]:
        p.ctx.log.warning("the S3 backup %s of %s was written by run %s, which did not record "
                          "it (another database on this bucket and key prefix?); left alone",
                          prefix, d["version"], str(theirs)[:8])
    else:
        n += (len(list(backups.list(prefix))) if p.dry_run else backups.delete_prefix(prefix))
    for version, checksum in zip(d["graphs"], d["checksums"], strict=True):
        deleted, kept = delete_export(backups, version, identity, ours=True, checksum=checksum,
                                      dry_run=p.dry_run)
        n += deleted
        if kept:
            p.ctx.log.warning("%s", kept)
    return n


def status_section(conn: psycopg.Connection[Any], now: datetime | None = None
                   ) -> dict[str, Any]:
    """When prune last ran well and what it removed, for `pipeline status` (one indexed read)."""
    with db.wrap_errors("reading the last prune run"):
        row = conn.execute(db.query("prune", "last_run")).fetchone()
    if row is None:
        return {"last_run_at": None, "last_status": None, "removed": {}}
    return {"last_run_at": row["finished_at"], "last_status": row["status"],
            "removed": {k: n for k, n in (row["counts"] or {}).items() if n}}
