"""Rendering results for people (rich tables) and machines (one JSON object on stdout).

Stage commands call :func:`stage_record`; errors raised before a run starts go through
:func:`error`. Under ``-q`` a success prints nothing, so cron stays silent.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .app import App
from .errors import LockBusy, PipelineError, ValidationError
from .logs import json_line
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


def console(*, stderr: bool = False) -> Console:
    """Tables at the terminal's width on a TTY; full values, unwrapped, anywhere else."""
    c = Console(stderr=stderr, soft_wrap=False, highlight=False)
    if not c.is_terminal:
        c = Console(stderr=stderr, soft_wrap=False, highlight=False, width=PIPE_WIDTH)
    return c


def print_json(obj: Any) -> None:
    click.echo(dump_json(obj))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold")  # a narrow terminal folds an id, never cuts it
    for row in rows:
        t.add_row(*("" if v is None else _fmt(v) for v in row))
    console().print(t)


def _fmt(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, (dict, list)):
        return dump_json(value)
    return str(value)


def key_values(title: str, items: Mapping[str, Any]) -> None:
    table(title, ("key", "value"), items.items())


def stage_record(app: App, record: RunRecord) -> int:
    """Print a finished run; return its exit code for the command to exit with."""
    if app.json:
        print_json(record.to_json())
    elif record.error:
        problems = record.extra.get("problems")
        stderr_error(app, f"pipeline {record.stage}: error: {record.error}",
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


def error(app: App, exc: PipelineError, *, command: str | None = None) -> None:
    """One line on stderr, or one JSON object on stdout with --json."""
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
    where = f"pipeline {command}" if command else "pipeline"
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
        click.echo(line, err=True)
        for problem in problems:
            click.echo(f"  - {problem}", err=True)
    sys.stderr.flush()
