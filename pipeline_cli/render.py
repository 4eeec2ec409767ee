"""Rendering results for people (rich tables) and machines (one JSON object on stdout).

Stage commands call :func:`stage_record`; errors raised before a run starts go through
:func:`error`. Under ``-q`` a success prints nothing, so cron stays silent.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from datetime import UTC, date, datetime
from typing import Any

import click
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from .app import App
from .errors import LockBusy, PipelineError, ValidationError
from .health import CRITICAL, LEVELS, SECTIONS, UNKNOWN, WARNING, StatusReport
from .logs import ESCAPES, json_line, one_line, utc_seconds
from .runner import RunRecord


def _default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value)


def dump_json(obj: Any) -> str:
    return json.dumps(obj, default=_default, ensure_ascii=False, sort_keys=False)


# Width of tables written to a pipe, a file or a cron mail: wide enough that no value (an id,
# an error) is ever cut or wrapped; a table is only as wide as its content needs.
PIPE_WIDTH = 100_000


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """A closed pipe (`| head`) is the caller's to judge, as for click.echo: rich exited 1
        on its own, so a stage that had succeeded reported 'the stage failed' to cron."""
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def console(*, stderr: bool = False, whole: bool = False) -> Console:
    """Tables at the terminal's width on a TTY; full values, unwrapped, anywhere else (and
    with ``whole``). No markup and no emoji codes: "missing setting [odata] url", a stop
    named "Kamppi [M]" or a route VR:V:MAIN:1>... (":v:" would become an emoji) print as
    written."""
    make = functools.partial(_Console, stderr=stderr, soft_wrap=False, highlight=False,
                             markup=False, emoji=False)
    c = make()
    # Both width and height: given a width alone, rich takes a dumb terminal (TERM=dumb, as
    # in an Emacs shell, which sets COLUMNS) for 80x25 and folded every value at 80 columns.
    if whole or not c.is_terminal:
        return make(width=PIPE_WIDTH, height=c.height)
    if c.is_dumb_terminal:
        size = shutil.get_terminal_size()  # COLUMNS, else the terminal's own size
        return make(width=size.columns, height=size.lines)
    return c


def show(t: Table, *, stderr: bool = False) -> None:
    """Print a table at the terminal's width, folding long values, or whole (the terminal
    wraps its lines) when not even its headers fit: squeezed that far, rich left the cells
    empty (COLUMNS=20: every value of `datasets list` lost) or folded them a letter or two
    a line."""
    c = console(stderr=stderr)
    headers = sum(cell_len(str(col.header)) + 3 for col in t.columns) + 1  # with borders
    if c.is_terminal and max(headers, Measurement.get(c, c.options, t).minimum) > c.width:
        c = console(stderr=stderr, whole=True)
    c.print(t)


def print_json(obj: Any) -> None:
    click.echo(dump_json(obj))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold")  # a narrow terminal folds an id, never cuts it
    for row in rows:
        t.add_row(*("" if v is None else _fmt(v) for v in row))
    show(t)


def utc_minute(value: datetime) -> str:
    """A time for a table cell, in UTC as the log lines give it (``2026-12-07 02:21Z``): the
    database session's time zone (the server's, or PGTZ) is not the reader's."""
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M}Z"


# Control characters and bidirectional overrides in a cell: text from outside (a fleet's
# device id "bus\n12", "\u202e...") broke a table row over two lines or turned the rest of
# the operator's line around. Escaped as in a log line (logs.ESCAPES), the overrides too;
# --json keeps the text as it is.
_CELL_ESCAPES = ESCAPES | {c: f"\\u{c:04x}" for c in (*range(0x202a, 0x202f),
                                                       *range(0x2066, 0x206a))}


def escaped(text: str) -> str:
    """Text from outside (a stop id) in a title or a line, escaped as in a table cell."""
    return text.translate(_CELL_ESCAPES)


def _fmt(value: Any) -> str:
    if isinstance(value, datetime):
        return utc_seconds(value)  # a timestamptz comes in the session's time zone
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, (dict, list)):
        return dump_json(value)
    return str(value).translate(_CELL_ESCAPES)


def key_values(title: str, items: Mapping[str, Any]) -> None:
    table(title, ("key", "value"), items.items())


def stage_record(app: App, record: RunRecord, where: str | None = None) -> int:
    """Print a finished run; return its exit code for the command to exit with. ``where``:
    the command run (``pipeline restore dataset``) when it is not the stage's own."""
    if app.json:
        print_json(record.to_json())
    elif record.error:
        problems = record.extra.get("problems")
        stderr_error(app, f"{where or 'pipeline ' + record.stage}: error: {record.error}",
                     problems if isinstance(problems, list) else [], stage=record.stage,
                     run_id=record.run_id if record.recorded else None,
                     exit_code=record.exit_code)
    elif app.verbosity >= 0:
        run = f"run {record.run_id}" if record.recorded else "dry run, not recorded"
        head = f"{record.stage}: {record.status} in {record.duration_ms} ms ({run})"
        click.echo(head + (f": {record.message}" if record.message else ""))
        if record.counts:
            key_values("counts", _flatten(record.counts))
    return record.exit_code


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def error(app: App, exc: PipelineError, *, command: str | None = None,
          where: str | None = None) -> None:
    """One line on stderr, or one JSON object on stdout with --json; ``command``: the stage
    (top-level command), ``where``: the full command (``pipeline graph activate``)."""
    message = app.redact(str(exc))
    if app.json:
        status = "busy" if isinstance(exc, LockBusy) else "error"
        obj: dict[str, Any] = {"status": status, "error": message, "exit_code": exc.exit_code}
        if command:
            obj = {"stage": command, **obj}
        if isinstance(exc, ValidationError) and exc.problems:
            obj["problems"] = [app.redact(p) for p in exc.problems]
        print_json(obj)
        return
    where = where or (f"pipeline {command}" if command else "pipeline")
    problems = [app.redact(p) for p in exc.problems] if isinstance(exc, ValidationError) else []
    stderr_error(app, f"{where}: error: {message}", problems, stage=command,
                 exit_code=exc.exit_code)


def stderr_error(app: App, line: str, problems: Sequence[str] = (), *, stage: str | None = None,
                 run_id: str | None = None, level: str = "error", **fields: Any) -> None:
    """An error line (and its problems, indented) on stderr; under ``--log-format json`` one
    log object instead, so every stderr line parses as JSON."""
    if app.log_format == "json":
        if problems:
            fields["problems"] = list(problems)
        click.echo(json_line(level, line, logger="pipeline.cli", stage=stage, run_id=run_id,
                             fields=fields), err=True)
    else:
        click.echo(one_line(line), err=True)
        for problem in problems:
            click.echo(f"  - {one_line(problem)}", err=True)
    sys.stderr.flush()


# ---------------------------------------------------------------- Prometheus textfile


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _metric_name(*parts: str) -> str:
    """ASCII letters, digits and "_" only: the exposition format allows no others, and one
    "métro" mode made node_exporter refuse the whole file."""
    name = "_".join(p for p in parts if p)
    return "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_"
                   for c in name).lower()


def _ts(value: Any) -> float | None:
    return value.timestamp() if isinstance(value, datetime) else None


class _Metrics:
    """Gauges by family: each family's samples together under its HELP and TYPE, as the
    exposition format requires, in whatever order they are added; the first sample of a name
    and labels wins (two keys may map to one name)."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, dict[str, str]]] = {}

    def add(self, name: str, value: float | bool | None, help_: str,
            labels: dict[str, str] | None = None) -> None:
        if value is None:
            return
        lab = ",".join(f'{k}="{_label(v)}"' for k, v in (labels or {}).items())
        self.families.setdefault(name, (help_, {}))[1].setdefault(
            lab, f"{name}{{{lab}}} {_sample(value)}" if lab else f"{name} {_sample(value)}")

    def text(self) -> str:
        return "".join(f"# HELP {name} {help_}\n# TYPE {name} gauge\n"
                       + "".join(f"{s}\n" for s in samples.values())
                       for name, (help_, samples) in self.families.items())


def _sample(value: float | bool) -> str:
    """A sample value in the exposition format: the shortest text that reads back as the same
    float (0.486, not 0.48599999999999999), integers without ".0", and +Inf/-Inf/NaN."""
    x = float(value)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if x.is_integer() and abs(x) < 2**53:
        return str(int(x))
    return repr(x)


def prometheus_text(report: StatusReport | None) -> str:
    """node_exporter textfile metrics; ``report`` None means status could not be collected."""
    m = _Metrics()
    m.add("pipeline_status_up", report is not None,
          "1 if pipeline status could read the database")
    if report is None:
        m.add("pipeline_health", LEVELS[UNKNOWN],
              "health verdict: 0 ok, 1 warning, 2 critical, 3 unknown")
        return m.text()
    m.add("pipeline_health", LEVELS[report.health],
          "health verdict: 0 ok, 1 warning, 2 critical, 3 unknown")
    for level in (WARNING, CRITICAL):
        m.add("pipeline_problems", sum(p.level == level for p in report.problems),
              "health problems by level", {"level": level})
    m.add("pipeline_status_collect_seconds", report.collect_ms / 1000,
          "time taken to collect the status")
    m.add("pipeline_schema_version", report.schema_version, "applied schema version")
    m.add("pipeline_database_clock_skew_seconds", report.clock_skew_s,
          "the database's clock minus this host's")
    for stage, s in report.stages.items():
        lab = {"stage": stage}
        m.add("pipeline_stage_last_success_timestamp_seconds", _ts(s["last_success_at"]),
              "end of the last success or noop run", lab)
        m.add("pipeline_stage_last_failure_timestamp_seconds", _ts(s["last_failure_at"]),
              "end of the last failed or crashed run", lab)
        m.add("pipeline_stage_last_run_timestamp_seconds", _ts(s["last_started_at"]),
              "start of the last run", lab)
        if s["last_duration_ms"] is not None:
            m.add("pipeline_stage_last_duration_seconds", s["last_duration_ms"] / 1000,
                  "duration of the last run", lab)
        m.add("pipeline_stage_last_run_ok",
              None if s["last_status"] is None else s["last_status"] in ("success", "noop"),
              "1 if the last run succeeded (success or noop)", lab)
        m.add("pipeline_stage_consecutive_failures", s["consecutive_failures"],
              "failed or crashed runs since the last good run", lab)
        m.add("pipeline_stage_running", s["running"], "runs in progress", lab)
        m.add("pipeline_stage_overdue", s.get("overdue"),
              "1 if a scheduled run is missing past the grace period", lab)
        m.add("pipeline_stage_next_run_timestamp_seconds", _ts(s.get("next_run_at")),
              "next scheduled run", lab)
    for name in SECTIONS:
        section = report.sections.get(name, {})
        m.add("pipeline_section_ok", "error" not in section,
              "1 if the status section could be read", {"section": name})
        _numeric_leaves(m, f"pipeline_{name}", section, f"pipeline status {name} section")
    m.add("pipeline_locks_held", None if report.locks_error else len(report.locks),
          "stage locks held now")
    for lock in report.locks:
        m.add("pipeline_lock_held", 1, "1 while the stage lock is held", {"stage": lock})
    # up: the service answered and let status's calls through; a refusal is 0, and _refused 1.
    graph = report.sections.get("graph", {})
    if graph.get("redis_reachable") is not None:  # Redis configured and asked
        m.add("pipeline_redis_up", bool(graph["redis_reachable"])
              and not graph.get("redis_refused"), "1 if Redis answers the graph reads")
        m.add("pipeline_redis_refused", bool(graph.get("redis_refused")),
              "1 if Redis refused the password, user or commands of [redis] url")
    if report.s3.get("configured"):
        m.add("pipeline_s3_up", bool(report.s3.get("reachable"))
              and not report.s3.get("refused"), "1 if the S3 bucket answers")
        m.add("pipeline_s3_refused", bool(report.s3.get("refused")),
              "1 if S3 refused the credentials of [s3] (keys, clock, policy)")
        m.add("pipeline_s3_last_backup_age_seconds", report.s3.get("last_backup_age_s"),
              "age of the newest dataset backup")
    return m.text()


def _numeric_leaves(m: _Metrics, prefix: str, obj: Any, help_: str, depth: int = 0) -> None:
    """Every number or boolean in a section becomes a gauge: gps.batches.dead ->
    pipeline_gps_batches_dead. Strings and lists are left to `status --json`."""
    if not isinstance(obj, dict) or depth > 3:
        return
    for key, value in obj.items():
        name = _metric_name(prefix, str(key))
        if isinstance(value, (bool, int, float)):
            m.add(name, value, help_)
        elif isinstance(value, datetime):
            m.add(f"{name}_timestamp_seconds", value.timestamp(), help_)
        elif isinstance(value, dict):
            _numeric_leaves(m, name, value, help_, depth + 1)


def write_prometheus(path: str, text: str) -> None:
    """Write atomically: a temp file in the same directory, then rename over ``path``, so
    node_exporter never reads half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".pipeline-status.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise PipelineError(f"cannot write the metrics file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        with suppress(OSError):
            os.unlink(tmp)
        raise PipelineError(f"cannot write the metrics file {path}: {exc.strerror}") from None
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
