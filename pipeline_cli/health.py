"""Status: what an operator or a monitor needs to know about the whole pipeline, in one read.

:func:`collect_status` gathers the run history of every stage (with overdue detection from the
schedule), the locks held now, one section per area filled by that stage's own
``status_section`` (dataset, virtual, graph, gps), S3 reachability and backup age, and turns it
all into a health verdict (ok / warning / critical) against the ``[health]`` thresholds. It only
reads, except that it records runs whose process died as ``crashed``. Every query is indexed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from . import db
from .errors import PipelineError, SchemaError
from .modes import describe_unknown
from .runner import ALL_STAGES, LockHolder, lock_holders, reap_crashed
from .schedule import SCHEDULED_STAGES, SLOT_TOLERANCE, Schedule
from .settings import HealthSettings

OK, WARNING, CRITICAL, UNKNOWN = "ok", "warning", "critical", "unknown"
LEVELS = {OK: 0, WARNING: 1, CRITICAL: 2, UNKNOWN: 3}
# Every stage status shows, in pipeline order (ingest-gps runs through the runner too).
STAGES = ("sync-odata", "gen-virtual", "build-graph", "ingest-gps", "match-gps", "run-all",
          "prune")
SECTIONS = ("dataset", "virtual", "graph", "gps", "prune")
# Runs are stamped with the database's clock, cron starts them by the host's: further apart
# than a slot's tolerance, runs count for the wrong slots (and ages are off as much).
CLOCK_SKEW_WARNING_S = SLOT_TOLERANCE.total_seconds()
MIN_STEP_S = 0.1  # less time left than this: a step is not started


@dataclass
class Problem:
    level: str
    area: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"level": self.level, "area": self.area, "message": self.message}


@dataclass
class Budget:
    """The time status may take in all, and at most per statement. Before each step the
    statement timeout is cut to the time left, so tables held locked (a ``db migrate``) cost
    that time once, not one statement timeout per section; a step with no time left is not
    started (``{"error": ...}``). ``set_timeout`` sets a session parameter
    (``Database.set_session``, which skips it through a transaction pooler); without it the
    budget only skips the steps it has no time for."""

    seconds: float = math.inf
    statement_s: float = 5.0
    set_timeout: Callable[[psycopg.Connection[Any], str, str], bool] | None = None
    started: float = field(default_factory=time.monotonic)  # before connecting, if the caller
    _timeout_ms: int | None = field(default=None, init=False, repr=False)

    def left(self) -> float:
        """The seconds the next step may take (inf without a budget); PipelineError when none
        is left. The one place time left becomes a timeout: of a statement, and of the Redis
        and S3 clients the sections make (capped by their own per-call limit)."""
        left = self.seconds - (time.monotonic() - self.started)
        if left < MIN_STEP_S:
            raise PipelineError(f"not collected: status's time budget of {self.seconds:g} s "
                                "ran out")
        return left

    def arm(self, conn: psycopg.Connection[Any]) -> None:
        """Cut the statement timeout to the time left; PipelineError when none is left."""
        left = min(self.statement_s, self.left())
        ms = int(left * 1000) if math.isfinite(left) else 0  # 0: no timeout
        if self.set_timeout is not None and ms != self._timeout_ms:
            self.set_timeout(conn, "statement_timeout", str(ms))
            self._timeout_ms = ms


# Makes a client whose calls give up after at most the seconds given (a Redis or S3 client:
# a hung server must not outlast status's budget, and redis-py and minio take a timeout only
# when the client is made).
Connector = Callable[[float], Any]


@dataclass
class SectionEnv:
    """What a section may need: the status connection and the clients that are configured."""

    conn: psycopg.Connection[Any]
    now: datetime
    redis: Connector | None = None  # a redis.Redis, None when [redis] url is unset
    redis_prefix: str = "pipeline"
    backups: Connector | None = None  # a BackupStore, None when [s3] endpoint is unset
    settings: Any = None  # Settings, when the caller has them
    budget: Budget = field(default_factory=Budget)


@dataclass
class StatusReport:
    schema_version: int
    schema_latest: int
    generated_at: datetime
    schema_applied: set[int] = field(default_factory=set)
    health: str = OK
    problems: list[Problem] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    locks: dict[str, dict[str, Any]] = field(default_factory=dict)
    locks_error: str | None = None  # why the locks were not read (an unmigrated database)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    s3: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    collect_ms: int = 0
    clock_skew_s: float = 0.0  # the database's clock minus this host's

    @property
    def schema_pending(self) -> list[int]:
        return sorted({m.version for m in db.migrations()} - self.schema_applied)

    @property
    def schema_unknown(self) -> list[int]:
        """Applied migrations this code does not know: a newer release migrated the database."""
        return sorted(self.schema_applied - {m.version for m in db.migrations()})

    @property
    def schema_summary(self) -> str:
        """``schema 009 (current)`` or ``schema 007, pending 008, 009``: versions, not counts."""
        return db.describe_schema(self.schema_applied)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "health": self.health,
            "problems": [p.to_json() for p in self.problems],
            "generated_at": self.generated_at,
            "clock_skew_s": self.clock_skew_s,
            "schema": {"version": self.schema_version, "latest": self.schema_latest,
                       "pending": self.schema_pending, "summary": self.schema_summary},
            "stages": self.stages,
        }
        for name in SECTIONS:
            out[name] = self.sections.get(name, {})
        out["locks"] = self.locks
        if self.locks_error is not None:
            out["locks_error"] = self.locks_error
        out["s3"] = self.s3
        out["schedule"] = self.schedule
        out["collect_ms"] = self.collect_ms
        return out


def _holder_json(h: LockHolder) -> dict[str, Any]:
    return {"host": h.host, "pid": h.pid, "since": h.since, "backend_pid": h.backend_pid,
            "application": h.application_name}


# ---------------------------------------------------------------- sections of the stages


def _dataset_section(env: SectionEnv) -> dict[str, Any]:
    from .stages.sync_odata import status_section  # imported per section: status stays light

    return status_section(env.conn, env.now)


def _virtual_section(env: SectionEnv) -> dict[str, Any]:
    from .stages.gen_virtual import status_section

    return status_section(env.conn, env.now)


def _graph_section(env: SectionEnv) -> dict[str, Any]:
    from .adapters.graph_store import GraphReader
    from .stages import build_graph

    # A cluster client reads the slots as it is made: that error is the section's.
    reader = (GraphReader(env.redis(env.budget.left()), env.redis_prefix)
              if env.redis is not None else None)
    return build_graph.status_section(env.conn, reader)


def _gps_section(env: SectionEnv) -> dict[str, Any]:
    from .gps.batches import status_section

    return status_section(env.conn, env.settings.match if env.settings is not None else None)


def _prune_section(env: SectionEnv) -> dict[str, Any]:
    from .stages.prune import status_section

    return status_section(env.conn, env.now)


SECTION_BUILDERS: dict[str, Callable[[SectionEnv], dict[str, Any]]] = {
    "dataset": _dataset_section,
    "virtual": _virtual_section,
    "graph": _graph_section,
    "gps": _gps_section,
    "prune": _prune_section,
}


def _run_section(name: str, build: Callable[[SectionEnv], dict[str, Any]], env: SectionEnv,
                 budget: Budget) -> dict[str, Any]:
    """A section's dict, or ``{"error": ...}``: one broken area never hides the others."""
    try:
        budget.arm(env.conn)
        return build(env)
    except ImportError as exc:
        return {"error": f"not available in this version ({exc.name or exc})"}
    except PipelineError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # a bug in a section must not take the whole status down
        return {"error": f"internal error: {type(exc).__name__}: {exc}"}
    finally:
        if not env.conn.autocommit and not env.conn.closed:
            env.conn.rollback()


# ---------------------------------------------------------------- run history and schedule


def _stage_rows(conn: psycopg.Connection[Any], stages: list[str]) -> dict[str, dict[str, Any]]:
    with db.wrap_errors("reading the run history"):
        rows = conn.execute(db.query("status", "stage_summary"),
                            {"stages": stages}).fetchall()
    return {r["stage"]: r for r in rows}


def _stage_json(r: dict[str, Any] | None) -> dict[str, Any]:
    r = r or {}
    return {
        "last_status": r.get("status"),
        "last_run_id": str(r["run_id"]) if r.get("run_id") else None,
        "last_started_at": r.get("started_at"),
        "last_finished_at": r.get("finished_at"),
        "last_duration_ms": r.get("duration_ms"),
        "last_counts": r.get("counts") or {},
        "last_error": r.get("error"),
        "last_host": r.get("host"),
        "last_success_at": r.get("ok_finished_at"),
        "last_success_started_at": r.get("ok_started_at"),
        "last_success_duration_ms": r.get("ok_duration_ms"),
        "last_success_counts": r.get("ok_counts") or {},
        "last_success_unknown_modes": r.get("ok_unknown_modes") or {},
        "last_work_at": r.get("work_finished_at"),
        "last_failure_at": r.get("bad_finished_at"),
        "last_failure_error": r.get("bad_error"),
        "consecutive_failures": r.get("consecutive_failures") or 0,
        "running": r.get("running") or 0,
        "running_since": r.get("running_since"),
    }


def _apply_schedule(info: dict[str, Any], stage: str, schedule: Schedule, now: datetime,
                    installed: datetime, grace: timedelta) -> None:
    entries = schedule.for_stage(stage)
    info["schedule"] = [e.expr for e in entries] or None
    info["next_run_at"] = schedule.next_run(stage, now) if entries else None
    info["overdue"] = False if entries else None
    info["overdue_since"] = None
    info["overdue_s"] = None
    if not entries:
        return
    missed = schedule.expected_since(stage, info["last_success_started_at"], installed, now)
    if missed is not None and now - missed > grace:
        info["overdue"] = True
        info["overdue_since"] = missed
        info["overdue_s"] = int((now - missed).total_seconds())


# ---------------------------------------------------------------- S3


def _s3_section(conn: psycopg.Connection[Any], connect: Connector | None, now: datetime,
                budget: Budget) -> dict[str, Any]:
    """Reachability of the bucket and the age of the newest dataset backup: the same keys in
    every state (null when unknown), and ``error`` when there is one. Each S3 call gets at
    most the time left. ``reachable`` is whether the server answered, ``refused`` whether it
    refused a call (the keys, this host's clock, a policy): reachable, yet unusable."""
    out: dict[str, Any] = {"configured": connect is not None, "bucket": None, "reachable": None,
                           "refused": None, "bucket_exists": None, "last_backup": None,
                           "last_backup_age_s": None}
    if connect is None:
        return out
    from .adapters.backups import BackupRefused  # minio: only when S3 is configured

    try:
        budget.arm(conn)
        backups = connect(budget.left())
    except PipelineError as exc:
        out["error"] = str(exc)
        return out
    out["bucket"] = backups.bucket
    out["reachable"] = False
    try:
        out["bucket_exists"] = backups.bucket_exists()
        out["reachable"], out["refused"] = True, False
    except PipelineError as exc:
        if isinstance(exc, BackupRefused):  # an answer: S3 is up, a setting or policy is not
            out["reachable"], out["refused"] = True, True
        out["error"] = str(exc)
        return out
    try:
        with db.wrap_errors("reading the newest dataset backup"):
            row = conn.execute(db.query("status", "newest_backup")).fetchone()
    except PipelineError as exc:
        out["error"] = str(exc)
        return out
    if row is None:  # nothing backed up yet: the first backup creates the bucket
        return out
    if not out["bucket_exists"]:
        out["error"] = (f"bucket {backups.bucket} does not exist: the backups of "
                        f"{row['version']} and every version before it are not there")
        return out
    key = f"{row['backup_prefix'].rstrip('/')}/manifest.json"
    try:
        backups = connect(budget.left())  # the bucket check may have used most of it
    except PipelineError as exc:
        out["error"] = str(exc)
        return out
    try:
        at = backups.last_modified(key)
        out["last_backup"] = {"key": backups.prefix + key, "dataset": row["version"], "at": at}
        out["last_backup_age_s"] = int((now - at).total_seconds()) if at else None
    except PipelineError as exc:
        out["refused"] = isinstance(exc, BackupRefused)  # may list the bucket, not read
        out["last_backup"] = {"key": backups.prefix + key, "dataset": row["version"],
                              "at": None}
        out["error"] = f"the newest dataset backup is missing or unreadable: {exc}"
    return out


# ---------------------------------------------------------------- health


def _num(section: dict[str, Any], *path: str) -> float | None:
    value: Any = section
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def assess(report: StatusReport, h: HealthSettings) -> list[Problem]:
    """Every threshold crossed, worst first (seed 002: waiting work, failures, age)."""
    problems: list[Problem] = []

    def add(level: str, area: str, message: str) -> None:
        problems.append(Problem(level, area, message))

    now = report.generated_at
    skew = report.clock_skew_s
    if abs(skew) > CLOCK_SKEW_WARNING_S:
        add(WARNING, "clock", f"the database's clock is {human_duration(abs(skew))} "
            f"{'ahead of' if skew > 0 else 'behind'} this host's: status judges ages and overdue "
            "stages by the database's clock, cron starts runs by the host's (synchronise both "
            "with NTP)")
    if report.schema_version and report.schema_pending:
        add(CRITICAL, "schema", f"{report.schema_summary}: stages refuse to run; "
            "run `pipeline db migrate`")
    elif report.schema_unknown:  # a rolled-back deploy
        add(CRITICAL, "schema", f"{report.schema_summary}: stages refuse to run; "
            "upgrade pipeline")
    for stage, s in report.stages.items():
        # The failure's own error: the newest run may be a retry still running, or skipped.
        fails, error, last = s["consecutive_failures"], s["last_failure_error"], s["last_status"]
        if fails >= h.failures_critical:
            add(CRITICAL, stage, f"{stage} failed {fails} times in a row: {error}")
        elif fails >= h.failures_warning:
            add(WARNING, stage, f"{stage} last run {last}: {error}" if last in (
                "failed", "crashed") else f"{stage} failed {fails} time(s) since its last good "
                f"run (now {last}): {error}")
        if s.get("overdue"):
            late = s["overdue_s"] or 0
            level = CRITICAL if late >= h.overdue_critical_s else WARNING
            add(level, stage, f"{stage} is overdue: expected at "
                f"{s['overdue_since'].isoformat(timespec='minutes')}, "
                f"{human_duration(late)} ago, no good run since")
        since = s.get("running_since")
        if since is not None and (now - since).total_seconds() > h.running_warning_s:
            add(WARNING, stage, f"{stage} has been running for "
                f"{human_duration((now - since).total_seconds())} (stuck?)")
    for text in report.schedule.get("warnings", []):
        add(WARNING, "schedule", text)
    sync = report.stages.get("sync-odata", {})
    last_sync = sync.get("last_success_at")
    if report.schema_version:
        if last_sync is None:
            add(WARNING, "sync-odata", "sync-odata has never succeeded: no dataset yet")
        else:
            age_h = (now - last_sync).total_seconds() / 3600
            if age_h >= h.sync_age_critical_h:
                add(CRITICAL, "sync-odata", f"last good sync-odata was {age_h:.0f} h ago")
            elif age_h >= h.sync_age_warning_h:
                add(WARNING, "sync-odata", f"last good sync-odata was {age_h:.0f} h ago")
    unknown = sync.get("last_success_unknown_modes")
    if unknown:
        add(WARNING, "sync-odata", f"the last good sync-odata found {describe_unknown(unknown)}"
            "; build-graph fails until then")
    for name in SECTIONS:
        section = report.sections.get(name, {})
        if "error" in section and not str(section["error"]).startswith("not available"):
            add(WARNING, name, f"{name} section unavailable: {section['error']}")
    graph = report.sections.get("graph", {})
    if graph.get("consistent") is False:
        add(CRITICAL, "graph", f"graph: {graph.get('problem') or 'PostgreSQL and Redis disagree'}")
    elif graph.get("problem"):  # Redis unreachable, hung or refusing: the graph not checked,
        # and the routing API reads it there: as critical as a graph seen broken
        add(CRITICAL, "graph", f"graph: {graph['problem']}")
    if graph.get("redis_eviction"):  # before any key is lost: consistent tells after
        add(WARNING, "graph", f"graph: {graph['redis_eviction']}")
    gps = report.sections.get("gps", {})
    _thresholds(add, "gps", _num(gps, "unprocessed_points"), h.backlog_warning,
                h.backlog_critical, "{:.0f} unprocessed GPS points")
    _thresholds(add, "gps", _num(gps, "oldest_unprocessed_age_s"), h.backlog_age_warning_s,
                h.backlog_age_critical_s, "oldest unprocessed GPS point is {:.0f} s old")
    _thresholds(add, "gps", _num(gps, "batches", "failed"), h.failed_batches_warning,
                h.failed_batches_critical, "{:.0f} GPS batches failed and waiting for a retry")
    _thresholds(add, "gps", _num(gps, "batches", "dead"), h.dead_batches_warning,
                h.dead_batches_critical,
                "{:.0f} dead GPS batches (`pipeline batches list --status dead`)")
    partitions, slots = _num(gps, "partitions"), _num(gps, "lock_slots")
    if partitions and slots and 4 * partitions > slots:
        # A batching pass takes two locks a partition: over half the table is a warning,
        # over all of it (the pass fails) critical.
        add(CRITICAL if 4 * partitions > 2 * slots else WARNING, "gps",
            f"gps_points has {partitions:.0f} partitions: a match-gps batching pass locks two "
            f"per partition and the server's lock table holds {slots:.0f} for all sessions "
            "(\"out of shared memory\" when it runs out); raise max_locks_per_transaction "
            "or drop old days with `pipeline prune`")
    # S3 status could not ask (unreachable, no answer, refused) is a warning: it holds the
    # backups, and no reader waits on it.
    if report.s3.get("configured") and report.s3.get("reachable") is False:
        add(WARNING, "s3", f"S3 unreachable: {report.s3.get('error', '')}".rstrip(": "))
    elif report.s3.get("refused") and report.s3.get("bucket_exists") is None:  # the check
        add(WARNING, "s3", f"S3 refused: {report.s3.get('error', '')}".rstrip(": "))
    elif report.s3.get("error"):
        add(WARNING, "s3", report.s3["error"])
    problems.sort(key=lambda p: -LEVELS[p.level])
    return problems


def _thresholds(add: Callable[[str, str, str], None], area: str, value: float | None,
                warning: float, critical: float, text: str) -> None:
    if value is None:
        return
    if value >= critical:
        add(CRITICAL, area, text.format(value))
    elif value >= warning:
        add(WARNING, area, text.format(value))


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def verdict(problems: list[Problem]) -> str:
    worst = max((LEVELS[p.level] for p in problems), default=0)
    return {0: OK, 1: WARNING, 2: CRITICAL, 3: UNKNOWN}[worst]


# ---------------------------------------------------------------- the report


def collect_status(
    conn: psycopg.Connection[Any],
    *,
    health: HealthSettings | None = None,
    schedule: Schedule | None = None,
    redis: Connector | None = None,
    redis_prefix: str = "pipeline",
    backups: Connector | None = None,
    settings: Any = None,
    sections: dict[str, Callable[[SectionEnv], dict[str, Any]]] | None = None,
    host_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    budget: Budget | None = None,
) -> StatusReport:
    """Build the report. ``conn`` should be autocommit; the schema may be unmigrated.

    ``redis`` and ``backups`` make the optional clients (None when not configured; their
    sections then say so instead of failing), given the seconds their calls may take.
    ``budget`` bounds the whole collection (none by default), Redis and S3 calls included.
    Raises PipelineError only if PostgreSQL itself fails, or the budget runs out before the
    run history is read.
    """
    started = time.monotonic()
    health = health or HealthSettings()
    schedule = schedule or Schedule()
    budget = budget or Budget()
    budget.arm(conn)
    applied = db.applied_versions(conn)
    version = max(applied, default=0)
    before = host_clock()
    with db.wrap_errors("reading the clock"):
        clock = conn.execute("SELECT now() AS now").fetchone()
    after = host_clock()
    now: datetime = clock["now"] if clock else after
    report = StatusReport(schema_version=version, schema_latest=db.latest_version(),
                          generated_at=now, schema_applied=applied,
                          schedule={"sources": schedule.sources,
                                    "entries": schedule.to_json(),
                                    "warnings": schedule.warnings},
                          clock_skew_s=round((now - (before + (after - before) / 2))
                                             .total_seconds(), 1))
    if version == 0:
        try:  # the same line as every other command (tables the search_path misses)
            db.check_schema(conn)
        except SchemaError as exc:
            report.problems = [Problem(CRITICAL, "schema", str(exc))]
        # Nothing was read: no section may look healthy, nor the locks free.
        skipped = "not collected: the database is not migrated"
        report.sections = {name: {"error": skipped} for name in SECTIONS}
        report.locks_error = skipped
        report.health = CRITICAL
        report.collect_ms = int((time.monotonic() - started) * 1000)
        return report
    budget.arm(conn)
    read_only = conn.execute(db.query("status", "read_only")).fetchone()
    if not (read_only and read_only["read_only"]):  # on a standby, runs show as recorded:
        reap_crashed(conn)                           # their locks are the primary's
    names = list(dict.fromkeys([*STAGES, *ALL_STAGES, *schedule.entries]))
    budget.arm(conn)
    rows = _stage_rows(conn, names)
    budget.arm(conn)
    with db.wrap_errors("reading the schema history"):
        first = conn.execute(db.query("status", "installed_at")).fetchone()
    installed: datetime = (first or {}).get("installed_at") or now
    grace = timedelta(seconds=health.overdue_grace_s)
    for stage in names:
        info = _stage_json(rows.get(stage))
        if stage in SCHEDULED_STAGES:
            _apply_schedule(info, stage, schedule, now, installed, grace)
        report.stages[stage] = info
    singletons = tuple(s for s in names if s != "match-gps")
    try:
        budget.arm(conn)
    except PipelineError as exc:
        report.locks_error = str(exc)
    else:
        report.locks = {n: _holder_json(h) for n, h in lock_holders(conn, singletons).items()}
    env = SectionEnv(conn=conn, now=now, redis=redis, redis_prefix=redis_prefix, backups=backups,
                     settings=settings, budget=budget)
    for name, build in (sections or SECTION_BUILDERS).items():
        report.sections[name] = _run_section(name, build, env, budget)
    report.s3 = _s3_section(conn, backups, now, budget)
    report.problems = assess(report, health)
    report.health = verdict(report.problems)
    report.collect_ms = int((time.monotonic() - started) * 1000)
    return report


# ---------------------------------------------------------------- Prometheus textfile
