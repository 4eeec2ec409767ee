"""run-all: sync-odata -> gen-virtual -> build-graph -> match-gps, as one locked, recorded run.

Each stage function runs through the same :class:`StageRunner` as its own command, so it takes
its own lock and records its own run, nested inside the outer ``run-all`` run (which holds the
``run-all`` lock). A downstream stage runs only when its upstream produced something new in this
run, or left work it has not consumed yet (a cheap probe of the stages' status sections); for
match-gps, only when its backlog has work. A failed or busy stage counts as having produced
nothing new: the stages after it still run on the work they have (match-gps needs none of the
others). run-all then fails with the first failed stage's exit code (75 when stages were only
busy); a stop signal or run-all's own hard limit ends the chain where it stands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from ..errors import LockBusy, PipelineError
from ..gps import batches as gps_batches
from ..runner import (
    DRY_RUN,
    FAILED,
    NOOP,
    SKIPPED,
    SUCCESS,
    RunContext,
    RunRecord,
    StageResult,
    StageRunner,
)
from ..settings import Settings
from . import build_graph as build_graph_stage
from . import gen_virtual as gen_virtual_stage
from . import match_gps as match_gps_stage
from . import sync_odata as sync_odata_stage

CHAIN = ("sync-odata", "gen-virtual", "build-graph", "match-gps")
BUSY = "busy"


@dataclass
class Clients:
    """Client builders, each called at most once and only by the stage that needs it (so a
    rerun with no GPS work never needs OSRM). The CLI passes its App's cached builders."""

    odata: Callable[[], Any]
    backups: Callable[[], Any]
    graph_store: Callable[[], Any]
    osrm: Callable[[], Any]


class StageFailed(PipelineError):
    """Stages of the chain failed or were busy (exit 75: the runner records the run-all as
    skipped, not failed: another run is doing that work). ``lead`` is the stage whose exit
    code run-all exits with; the message names every failed or busy stage, in chain order."""

    def __init__(self, lead: str, stages: dict[str, Any]) -> None:
        failures = {s: r for s, r in stages.items() if r["status"] in (FAILED, BUSY)}
        extra: dict[str, Any] = {"stages": stages, "failed_stage": lead}
        # shown under the error line, as each stage on its own shows them
        problems = [p for r in failures.values() for p in r.get("problems") or []]
        if problems:
            extra["problems"] = problems
        super().__init__("; ".join(
            f"{s} {'busy' if r['status'] == BUSY else 'failed'}: {r.get('error') or 'failed'}"
            for s, r in failures.items()), partial=StageResult(counts=_counts(stages),
                                                               extra=extra))
        self.exit_code = stages[lead]["exit_code"]


def _raise_failures(stages: dict[str, Any]) -> None:
    """StageFailed led by the first failed stage (busy ones give way to a real failure)."""
    for wanted in (FAILED, BUSY):
        lead = next((s for s, r in stages.items() if r["status"] == wanted), None)
        if lead is not None:
            raise StageFailed(lead, stages)


def _stopping(ctx: RunContext) -> bool:
    """A stop signal arrived or run-all's hard limit passed: no later stage may start."""
    return ctx.stop.requested or ctx.limits.expired() is not None


def _busy(exc: LockBusy, **more: Any) -> dict[str, Any]:
    return {"status": BUSY, "run_id": None, "duration_ms": 0, "counts": {}, "error": str(exc),
            "exit_code": exc.exit_code, **more}


def _counts(stages: dict[str, Any]) -> dict[str, int]:
    out = {"ran": 0, "success": 0, "noop": 0, "skipped": 0, "failed": 0}
    for s in stages.values():
        if s.get("run_id"):
            out["ran"] += 1
        status = "skipped" if s["status"] == BUSY else s["status"]  # another run has it
        if status == DRY_RUN:  # a stage's dry run that passed, in run-all --dry-run
            out["dry_run"] = out.get("dry_run", 0) + 1
        else:
            out[status if status in out else "failed"] += 1
    return out


@contextmanager
def _keeping(results: dict[str, dict[str, Any]]) -> Iterator[None]:
    """A stop signal or hard limit between stages keeps what the stages already did in the
    run-all's result and record (a stage's own failure carries them in StageFailed)."""
    try:
        yield
    except StageFailed:
        raise
    except PipelineError as exc:
        if exc.partial is None:
            exc.partial = StageResult(counts=_counts(results), extra={"stages": results})
        raise


def _record_json(record: RunRecord, reason: str) -> dict[str, Any]:
    out = record.to_json()
    out.pop("stage", None)
    out["message"] = record.message
    out["reason"] = reason
    return out


def _not_run(reason: str) -> dict[str, Any]:
    """A stage run-all did not start: nothing new for it, or the stage before failed (or was
    busy) and left nothing over from earlier runs; ``reason`` says which."""
    return {"status": NOOP, "run_id": None, "duration_ms": 0, "counts": {}, "message": "",
            "reason": reason}


# ---------------------------------------------------------------- what is new downstream


def pending_work(conn: psycopg.Connection[Any], stage: str, graph_store: Any = None
                 ) -> str | None:
    """Why ``stage`` has unconsumed upstream output, or None: the stages' own status probes."""
    if stage == "gen-virtual":
        v = gen_virtual_stage.status_section(conn)
        if v["active_dataset"] and not v["current"]:
            return f"dataset {v['active_dataset']} has no virtual entities yet"
        return None
    if stage == "build-graph":
        v = gen_virtual_stage.status_section(conn)
        gen = v.get("generation")
        if not gen:
            return None
        g = build_graph_stage.status_section(conn, graph_store)
        if g["virtual_generation_id"] != gen["id"]:
            return f"virtual generation {gen['id']} has no active graph yet"
        if g["consistent"] is False:
            return f"the active graph needs repair: {g['problem']}"
        return None
    if stage == "match-gps":
        gps = gps_batches.status_section(conn)
        ready = gps["unprocessed_points"] - gps["dead_points"]
        if ready > 0 or gps["expired_leases"]:
            return f"{gps['unprocessed_points']} unprocessed GPS points"
        return None
    return None


# ---------------------------------------------------------------- the chain


def run_all(
    runner: StageRunner,
    settings: Settings,
    clients: Clients,
    ctx: RunContext,
    *,
    wait: float | None = None,
    gps_max_runtime: float | None = None,
    dry_run: bool = False,
) -> StageResult:
    """Run the chain inside the outer ``run-all`` run (``ctx``); see the module docstring."""
    database = runner.database
    if dry_run:
        return _dry_run(runner, settings, clients, ctx, wait=wait)
    stage_fns: dict[str, Callable[[RunContext], StageResult]] = {
        "sync-odata": lambda c: sync_odata_stage.sync_odata(
            database, clients.odata(), clients.backups(), c, mapping=settings.odata.mapping,
            speeds_kmh=settings.virtual.speeds_kmh),
        "gen-virtual": lambda c: gen_virtual_stage.generate(
            database, clients.backups(), settings.virtual, c),
        "build-graph": lambda c: build_graph_stage.build_graph(
            database, clients.graph_store(), clients.backups(), settings.graph,
            settings.virtual.speeds_kmh, c),
        "match-gps": lambda c: match_gps_stage.match_gps(
            database, clients.osrm(), settings.match, c, max_runtime=gps_max_runtime),
    }
    results: dict[str, dict[str, Any]] = {}
    produced = True  # sync-odata always runs: it is the only way to learn the feed changed
    # The failed or busy stage that made nothing new for the next one, so that a stage left
    # out names it: "nothing new upstream" hid that the source was down.
    blocked_by: str | None = None
    with _keeping(results), database.connect("pipeline run-all probe", autocommit=True) as conn:
        for stage in CHAIN:
            ctx.check_stop()
            if stage == "sync-odata":
                reason: str | None = "first stage"
            elif stage == "match-gps":
                reason = _probe(conn, stage, clients)
            elif produced:
                reason = f"{CHAIN[CHAIN.index(stage) - 1]} produced something new"
            else:
                reason = _probe(conn, stage, clients)
            if reason is None:
                if stage == "match-gps":  # it needs nothing from the stages before it
                    why = "no GPS backlog"
                elif blocked_by is not None:
                    why = f"skipped: {blocked_by}"
                else:
                    why = "nothing new upstream"
                results[stage] = _not_run(why)
                produced = False
                ctx.log.info("%s: not run (%s)", stage, why)
                continue
            try:
                record = runner.run(stage, stage_fns[stage], wait=wait,
                                    options={"run_all": ctx.run_id})
            except LockBusy as exc:  # another run does this stage's work: go on without it
                results[stage] = _busy(exc, reason=reason)
                produced, blocked_by = False, f"{stage} busy"
                continue
            results[stage] = _record_json(record, reason)
            if record.status == FAILED and _stopping(ctx):
                raise StageFailed(stage, results)  # its code (143, 130, 124), no later stage
            produced = record.status == SUCCESS  # a failure made nothing new downstream
            blocked_by = f"{stage} failed" if record.status == FAILED else None
    _raise_failures(results)
    did_work = any(r["status"] == SUCCESS for r in results.values())
    summary = ", ".join(f"{s} {r['status']}" for s, r in results.items())
    return StageResult(status=SUCCESS if did_work else NOOP, counts=_counts(results),
                       extra={"stages": results}, message=summary)


def _probe(conn: psycopg.Connection[Any], stage: str, clients: Clients) -> str | None:
    reader = None
    if stage == "build-graph":
        reader = clients.graph_store()
    return pending_work(conn, stage, reader)


# ---------------------------------------------------------------- the chain, dry


def _would_produce(stage: str, record: RunRecord) -> bool:
    """Whether a stage's dry run says the real run would make something new."""
    if stage == "sync-odata":  # its dry run is 'skipped' with a diff when the feed changed
        return record.status == SKIPPED and bool(record.extra.get("dry_run"))
    return bool(record.extra.get("would_run"))


def _dry_run(runner: StageRunner, settings: Settings, clients: Clients, ctx: RunContext, *,
             wait: float | None) -> StageResult:
    """``run-all --dry-run``: every stage's own dry run, each through the runner with
    ``dry_run`` (its lock, no run row). A downstream stage is judged as if its upstream had
    run: after a feed change gen-virtual "would regenerate for the new dataset" and build-graph
    "would build from it", without reading tables the real upstream run would have changed."""
    database = runner.database
    new: str | None = None  # what the upstream stage would make, in words
    unknown: dict[str, int] = {}  # route modes without a speed in the dataset build-graph gets

    def gen_virtual(c: RunContext) -> StageResult:
        if new is not None:
            return StageResult(status=DRY_RUN,
                               extra={"dry_run": True, "would_run": True},
                               message=f"would regenerate for {new}")
        return gen_virtual_stage.preview(database, settings.virtual)

    fns: dict[str, Callable[[RunContext], StageResult]] = {
        "sync-odata": lambda c: sync_odata_stage.sync_odata(
            database, clients.odata(), None, c, mapping=settings.odata.mapping,
            dry_run=True, speeds_kmh=settings.virtual.speeds_kmh),
        "gen-virtual": gen_virtual,
        "build-graph": lambda c: build_graph_stage.plan(
            database, clients.graph_store(), settings.graph, settings.virtual.speeds_kmh,
            upstream=new, upstream_unknown_modes=unknown),
        "match-gps": lambda c: match_gps_stage.preview(database),
    }
    results: dict[str, dict[str, Any]] = {}
    with _keeping(results):
        for stage in CHAIN:
            ctx.check_stop()
            try:
                record = runner.run(stage, fns[stage], wait=wait, dry_run=True,
                                    options={"run_all": ctx.run_id, "dry_run": True})
            except LockBusy as exc:
                results[stage] = _busy(exc)
                would = False
            else:
                results[stage] = _record_json(record, "dry run")
                if record.status == FAILED and _stopping(ctx):
                    raise StageFailed(stage, results)
                would = record.status != FAILED and _would_produce(stage, record)
            results[stage]["would_run"] = would
            if stage == "sync-odata":
                new = "the new dataset sync-odata would make" if would else None
                unknown = (record.extra.get("unknown_modes") or {}) if would else {}
            elif stage == "gen-virtual":
                new = ("the new virtual generation gen-virtual would make"
                       if would else None)
    _raise_failures(results)
    summary = "; ".join(f"{s}: {r.get('message') or r['status']}" for s, r in results.items())
    return StageResult(status=DRY_RUN, counts=_counts(results),
                       extra={"stages": results, "dry_run": True}, message=summary)
