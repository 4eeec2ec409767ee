"""Click commands, one module per area; each command is a thin shell around one library call.

Shared options (``--json`` after the subcommand, ``--wait``) are declared once here, and
:func:`run_stage` is the single path from a command to the stage runner and back to an exit code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .. import render
from ..adapters.heartbeat import Heartbeat
from ..app import App
from ..errors import LockBusy, PipelineError
from ..runner import RunContext, RunRecord, StageResult

F = TypeVar("F", bound=Callable[..., Any])

pass_app = click.make_pass_decorator(App)

# Modules that define a `register(group)` function. Add a module here to add commands.
COMMAND_MODULES = ("db", "config", "status", "build_graph", "gen_virtual", "sync_odata", "gps",
                   "run_all")


def register_all(group: click.Group) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(group)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(App).json = True


def json_option(fn: F) -> F:
    """``--json`` accepted after the subcommand too (``pipeline status --json``)."""
    return click.option("--json", "json_", is_flag=True, expose_value=False,
                        callback=_set_json, is_eager=True,
                        help="Print one JSON object on stdout.")(fn)


def wait_option(fn: F) -> F:
    return click.option("--wait", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
                        help="Wait up to SECONDS for a busy stage lock instead of exiting 75.")(fn)


def run_stage(
    app: App,
    stage: str,
    fn: Callable[[RunContext], StageResult],
    *,
    wait: float | None = None,
    options: dict[str, Any] | None = None,
    singleton: bool | None = None,
    show: Callable[[App, RunRecord], int] = render.stage_record,
) -> RunRecord:
    """Run one stage through the runner, render the record (``show``), ping the heartbeat
    ([notify] ping_url, best effort), and exit with the record's code."""
    beat = Heartbeat(app.settings.notify.ping_url, app.settings.notify.timeout)
    try:
        record = app.runner().run(stage, fn, wait=wait, options=options, singleton=singleton)
    except LockBusy:
        raise  # the run holding the lock is doing the work and will ping
    except PipelineError as exc:  # refused before it started: schema, database, settings
        beat.failure(stage, f"pipeline {stage}: {app.redact(str(exc))}")
        raise
    code = show(app, record)
    summary = (f"pipeline {stage}: {record.status} in {record.duration_ms} ms, run "
               f"{record.run_id}" + (f": {record.error}" if record.error else ""))
    if code:
        beat.failure(stage, summary)
        raise click.exceptions.Exit(code)
    beat.success(stage, summary)
    return record
