"""``pipeline status``: the health of every stage and area, for people, Nagios and Prometheus."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click
from rich.table import Table

from .. import render
from ..app import App
from ..errors import PipelineError
from ..health import (
    LEVELS,
    SECTIONS,
    UNKNOWN,
    Budget,
    StatusReport,
    collect_status,
    human_duration,
)
from ..logs import one_line
from ..render import prometheus_text, write_prometheus
from ..schedule import build_schedule
from . import NonEmpty, json_option, pass_app, reader_left

# Status must answer fast even when a service hangs: monitors time out after ~10 s (NRPE).
S3_TIMEOUT = 3.0  # per request, without retries
CONNECT_TIMEOUT = 3  # PostgreSQL ([database] connect_timeout when shorter)
REDIS_TIMEOUT = 3.0
STATEMENT_TIMEOUT_S = 5.0  # the most one statement may take
BUDGET_S = 8.0  # the whole collection, connecting included: later steps get what is left


def _clients(app: App) -> dict[str, Any]:
    """What makes the Redis and S3 clients for the sections that need them (None when not
    configured): a call gets the time status has left, at most its own timeout."""
    s = app.settings

    def redis(seconds: float) -> Any:
        return app.redis(timeout=min(seconds, REDIS_TIMEOUT))

    def backups(seconds: float) -> Any:
        return app.backups(timeout=min(seconds, S3_TIMEOUT))

    return {"redis": redis if s.redis.url else None,
            "backups": backups if s.s3.endpoint else None, "redis_prefix": s.redis.prefix}


def gather(app: App) -> StatusReport:
    """Collect the report with the settings and clients of this invocation."""
    settings = app.settings
    schedule = build_schedule(settings.schedule.crontab, settings.schedule.entries)
    # Through a transaction pooler the timeout is not set (it would stick to a shared server
    # session): the pooler's own query_timeout bounds status there (docs/operations.md).
    budget = Budget(seconds=BUDGET_S, statement_s=STATEMENT_TIMEOUT_S,
                    set_timeout=app.database.set_session)
    conn = app.connect(autocommit=True, name="pipeline status", connect_timeout=CONNECT_TIMEOUT)
    return collect_status(conn, health=settings.health, schedule=schedule, settings=settings,
                          budget=budget, **_clients(app))


# NRPE 2 passes on 1,023 bytes of a plugin's output and cuts the rest, perfdata first (NRPE 3
# and Nagios more): a failed run's error (an OData error body) is cut instead.
CHECK_LINE_BYTES = 1000
CHECK_PROBLEM_BYTES = 200


def _nagios_text(text: str, limit: int = CHECK_LINE_BYTES) -> str:
    """One printable line of at most ``limit`` UTF-8 bytes, whatever the messages held: a "|"
    (a file name's) would start perfdata, a control character reach the monitor as it was."""
    text = one_line(" ".join(text.replace("|", "/").split()))
    data = text.encode()
    return text if len(data) <= limit else data[:limit - 3].decode(errors="ignore") + "..."


def check_line(report: StatusReport | None, error: str | None = None) -> tuple[str, int]:
    """One Nagios line and its exit code: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."""
    if report is None:
        return f"PIPELINE UNKNOWN - {_nagios_text(str(error))}", LEVELS[UNKNOWN]
    level = report.health
    if report.problems:
        text = "; ".join(_nagios_text(p.message, CHECK_PROBLEM_BYTES)
                         for p in report.problems[:5])
        if len(report.problems) > 5:
            text += f"; and {len(report.problems) - 5} more"
    else:
        text = f"{sum(1 for s in report.stages.values() if s['last_status'])} stages healthy"
    gps = report.sections.get("gps", {})
    perf = [f"collect_ms={report.collect_ms}"]
    for key in ("unprocessed_points", "oldest_unprocessed_age_s"):
        if isinstance(gps.get(key), (int, float)):
            perf.append(f"{key}={gps[key]}")
    head = f"PIPELINE {level.upper()} - "
    perfdata = " | " + " ".join(perf)
    text = _nagios_text(text, CHECK_LINE_BYTES - len(head) - len(perfdata))
    return head + text + perfdata, LEVELS[level]


@click.command("status")
@click.option("--check", is_flag=True,
              help="Print one line and exit with a Nagios code: 0 OK, 1 WARNING, 2 CRITICAL, "
                   "3 UNKNOWN (e.g. the database is unreachable). Silent on OK under -q.")
@click.option("--prometheus", "prometheus", metavar="FILE",
              type=NonEmpty(click.Path(dir_okay=False)),
              help="Also write node_exporter textfile metrics to FILE, atomically; '-' "
                   "prints them alone on stdout, instead of the report.")
@json_option
@pass_app
def status(app: App, check: bool, prometheus: str | None) -> None:
    """Show the health of every stage and area: last runs, overdue stages, dataset, virtual
    entities, graph, GPS backlog, locks and S3, with a verdict (ok, warning, critical)."""
    to_stdout = prometheus == "-"  # as `export -o -`: it wrote a file named "-"
    if to_stdout and (check or app.json):
        raise click.UsageError("--prometheus - prints the metrics alone on stdout: it does not "
                               f"combine with {'--check' if check else '--json'}",
                               ctx=click.get_current_context())
    try:
        report: StatusReport | None = gather(app)
        error = None
    except PipelineError as exc:
        if not (check or prometheus):
            raise
        report, error = None, app.redact(str(exc))
    if to_stdout:
        click.echo(prometheus_text(report), nl=False)
    elif prometheus:
        try:
            write_prometheus(prometheus, prometheus_text(report))
        except PipelineError as exc:
            if not check:
                raise
            report, error = None, str(exc)  # the monitor still gets its line: UNKNOWN, why
    if check:
        line, code = check_line(report, error)
        if code or app.verbosity >= 0:
            try:
                click.echo(app.redact(line))
            except BrokenPipeError:  # the monitor reads the exit code: the verdict stands
                reader_left()
        raise click.exceptions.Exit(code)
    if report is None:  # only --prometheus: the metrics say "down"; the exit code says why
        if app.json:  # stdout stays one JSON object, as without --prometheus
            render.print_json({"stage": "status", "status": "error", "error": error,
                               "exit_code": LEVELS[UNKNOWN]})
        else:
            render.stderr_error(app, f"pipeline status: error: {error}", stage="status",
                                exit_code=LEVELS[UNKNOWN])
        raise click.exceptions.Exit(LEVELS[UNKNOWN])
    if app.json:
        render.print_json(report.to_json())
    elif app.verbosity >= 0 and not to_stdout:
        show(report)


def show(report: StatusReport) -> None:
    """The human view: verdict and problems, the stages, one line per area, locks."""
    now = report.generated_at
    click.echo(f"health: {report.health.upper()}   ({report.schema_summary}, "
               f"collected in {report.collect_ms} ms)")
    for p in report.problems:  # a failed run's error may hold newlines (an OData body)
        click.echo(f"  {p.level:8s} {one_line(p.message)}")
    table = Table(box=None, pad_edge=False, title_justify="left")
    for col in ("stage", "last", "started", "took", "last ok", "fails", "next run", "overdue"):
        table.add_column(col, no_wrap=True, overflow="fold")
    for name, s in report.stages.items():
        table.add_row(name, _last(s), _ago(now, s["last_started_at"]),
                      _took(s["last_duration_ms"]), _ago(now, s["last_success_at"]),
                      str(s["consecutive_failures"] or "-"), _ago(now, s.get("next_run_at")),
                      _overdue(s))
    click.echo()
    render.show(table)
    for name in (*SECTIONS, "s3"):
        section = report.s3 if name == "s3" else report.sections.get(name, {})
        text = section.get("error")
        if text is None:
            try:
                text = SUMMARIES[name](section, now)
            except (KeyError, TypeError, AttributeError, ValueError):  # a new section shape
                text = " ".join(f"{k}={_short(v)}" for k, v in _flatten(section, depth=1).items()
                                if v not in (None, {}, []))
        click.echo(textwrap.fill(text or "-", width=100, initial_indent=f"{name:8s} ",
                                 subsequent_indent=" " * 9, break_on_hyphens=False,
                                 break_long_words=False))  # never cut an id
    if report.locks_error:
        click.echo(f"locks    {report.locks_error}")
    elif report.locks:
        for lock, h in report.locks.items():
            click.echo(f"lock     {lock} held by {_holder(h, now)}")
    else:
        click.echo("locks    none held")


def _holder(h: dict[str, Any], now: datetime) -> str:
    """Who holds a lock, worded as the lock-busy error words it (runner.LockHolder)."""
    if h["host"] is None:  # a session that is not a pipeline run (psql, another tool)
        return f"session {h['backend_pid']} ({h['application'] or 'unknown'})"
    pid = f" pid {h['pid']}" if h["pid"] is not None else ""
    return f"host {h['host']}{pid} since {_ago(now, h['since'])}"


def _short(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    text = render.dump_json(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _ago(now: datetime, when: datetime | None) -> str:
    if when is None:
        return "-"
    delta = (when - now).total_seconds()
    text = human_duration(abs(delta))
    return f"in {text}" if delta > 0 else f"{text} ago"


def _took(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{ms} ms" if ms < 10_000 else human_duration(ms / 1000)


def _flatten(d: dict[str, Any], prefix: str = "", depth: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and depth > 0:
            out.update(_flatten(v, f"{prefix}{k}.", depth - 1))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _when(value: Any, now: datetime) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return _ago(now, value)


def _dataset(d: dict[str, Any], now: datetime) -> str:
    a = d["active"]
    if not a:
        return f"no active dataset ({d['versions']} versions)"
    counts = ", ".join(f"{v} {k}" for k, v in a["counts"].items() if v)
    return (f"{a['version']} active since {_when(a['created_at'], now)} ({a['source']}): "
            f"{counts}; {d['versions']} versions")


def _virtual(v: dict[str, Any], now: datetime) -> str:
    g = v["generation"]
    if not g:
        return f"no virtual entities for {v['active_dataset'] or 'any dataset'}"
    c = g["counts"]
    kinds = ", ".join(f"{k.split('_')[0]} {n}" for k, n in c.get("by_kind", {}).items())
    s = g["settings"]
    return (f"generation {g['id']} for {g['dataset_version']}, {_when(g['created_at'], now)}: "
            f"{c['virtual_stops']} stops ({kinds}), {c['virtual_routes']} routes, "
            f"{c['virtual_flights']} flights; {c.get('unreached_real_stops', 0)} real stops "
            f"unreached; spacing {s['main_spacing_km']:g}/{s['city_spacing_km']:g}/"
            f"{s['airport_spacing_km']:g} km, k={s['k']}")


def _graph(g: dict[str, Any], now: datetime) -> str:
    # consistent null with a problem: Redis could not be asked (unreachable, refused).
    unchecked = f"not checked: {g['problem']}" if g.get("problem") else "not checked (no Redis)"
    if not g["version"]:
        return "no active graph" + (f"; Redis points at {g['redis_pointer']}"
                                    if g.get("redis_pointer") else "") + (
            f": BROKEN: {g['problem']}" if g.get("consistent") is False else
            f": {unchecked}" if g.get("problem") else "")
    state = "consistent" if g["consistent"] else (
        unchecked if g["consistent"] is None else f"BROKEN: {g['problem']}")
    # the pointer Redis holds, none, or (Redis not asked) no word on it
    pointer = (f"Redis pointer {g['redis_pointer']}" if g.get("redis_pointer") else
               "Redis pointer" if g["consistent"] is None else "no Redis pointer")
    # a version recorded without its generation: "unknown", as a lock's unnamed application
    generation = g["virtual_generation_id"]
    return (f"{g['version']} for {g['dataset_version']} (generation "
            f"{'unknown' if generation is None else generation}): {g['nodes']} nodes, "
            f"{g['edges']} edges; "
            f"{pointer}: {state}")


def _gps(g: dict[str, Any], now: datetime) -> str:
    b = g["batches"]
    oldest = (f", oldest {human_duration(g['oldest_unprocessed_age_s'])} old"
              if g.get("oldest_unprocessed_age_s") is not None else "")
    # Information, not a warning: the next match-gps run gives those days a partition.
    parked = (f"; {g['default_partition_points']} point(s) in the default partition"
              if g.get("default_partition_points") else "")
    future = (f"; {g['future_points']} point(s) dated ahead wait until their time comes "
              "(a device clock ahead?)" if g.get("future_points") else "")
    unmatched = (f" ({g['unmatched_last_hour']} matched nothing: `pipeline batches list "
                 "--status completed` says why)" if g.get("unmatched_last_hour") else "")
    alone = (f", {g['too_short_last_hour']} of a point alone, not matched ([match] "
             "gap_seconds below the trackers' interval?)" if g.get("too_short_last_hour") else "")
    return (f"{g['unprocessed_points']} "
            f"unprocessed points{oldest}; batches: {b['pending']} pending, "
            f"{b['processing']} processing, {b['failed']} failed, {b['dead']} dead; "
            f"{g['completed_last_hour']} completed in the last hour{unmatched}{alone}{parked}"
            f"{future}")


def _s3(s: dict[str, Any], now: datetime) -> str:
    if not s["configured"]:
        return "not configured"
    if not s["reachable"]:
        return f"bucket {s['bucket']} UNREACHABLE"
    backup = s.get("last_backup")
    if not backup:
        return (f"bucket {s['bucket']} reachable; no dataset backup yet" if s.get("bucket_exists")
                else f"bucket {s['bucket']} does not exist yet; the first backup creates it")
    return (f"bucket {s['bucket']} reachable; newest backup {backup['key']}, "
            f"{_when(backup['at'], now)}")


def _prune(p: dict[str, Any], now: datetime) -> str:
    if p["last_run_at"] is None:
        return "never ran"
    removed = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in p["removed"].items())
    return f"last ran {_ago(now, p['last_run_at'])}: removed {removed or 'nothing'}"


SUMMARIES: dict[str, Callable[[dict[str, Any], datetime], str]] = {
    "dataset": _dataset, "virtual": _virtual, "graph": _graph, "gps": _gps, "prune": _prune,
    "s3": _s3}


def _last(s: dict[str, Any]) -> str:
    if s["running"]:
        return f"running ({s['running']})" if s["running"] > 1 else "running"
    return str(s["last_status"] or "never")


def _overdue(s: dict[str, Any]) -> str:
    if s.get("overdue") is None:
        return "-"
    return f"{human_duration(s['overdue_s'])}" if s["overdue"] else "no"


def register(group: click.Group) -> None:
    group.add_command(status)
