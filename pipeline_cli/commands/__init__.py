"""Click commands, one module per area; each command is a thin shell around one library call.

Shared options (``--json``, ``-q``, ``-v`` and ``--log-format`` after the subcommand, ``--wait``)
are declared once here, :func:`run_stage` is the single path from a command to the stage
runner and back to an exit code, and :func:`graph_store` / :func:`graph_reader` the way to the
graph in Redis.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import sys
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar

import click
import psycopg

from .. import render
from ..adapters.heartbeat import Heartbeat
from ..app import App
from ..db import deployment_id  # not `db.`: this package's `db` commands shadow that name
from ..errors import LockBusy, PipelineError
from ..runner import RunContext, RunRecord, StageResult, ignore_late_signals
from ..settings import is_utf8, os_text, quoted

if TYPE_CHECKING:  # imported where it is built: `pipeline status` does not pay for it
    from ..adapters.graph_store import GraphStore

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=click.Command)

pass_app = click.make_pass_decorator(App)
log = logging.getLogger("pipeline.cli")

# Top-level command name -> the module whose `register(group)` adds it. A module is imported
# only when one of its commands runs (or for --help), so `pipeline status` does not pay for
# scipy or the OData client. Add a command here and in its module's `register`.
COMMANDS = {
    "db": "db", "config": "config", "status": "status",
    "build-graph": "build_graph", "graph": "build_graph",
    "gen-virtual": "gen_virtual",
    "sync-odata": "sync_odata", "datasets": "sync_odata", "restore": "sync_odata",
    "ingest-gps": "gps", "match-gps": "gps", "batches": "gps",
    "run-all": "run_all",
    "completion": "completion",
    "doctor": "doctor", "export": "export",
    "prune": "prune",
}


class LazyGroup(click.Group):
    """A group that imports a command's module when the command is first looked up."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lazy = dict(lazy or {})
        self._loaded: set[str] = set()

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.lazy) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = self.lazy.get(cmd_name)
        if module is not None and module not in self._loaded:
            self._loaded.add(module)
            importlib.import_module(f"{__name__}.{module}").register(self)
        return super().get_command(ctx, cmd_name)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.lazy and args[0] not in self.commands:
            self.load_all()  # Click's "Did you mean" looks only at the commands loaded so far
        return super().resolve_command(ctx, args)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        super().add_command(global_options(cmd), name)

    def load_all(self) -> MutableMapping[str, click.Command]:
        """Import every command module (docs and tests walk the whole tree)."""
        for name in self.lazy:
            self.get_command(click.Context(self), name)
        return self.commands


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(App).json = True


def json_option(fn: F) -> F:
    """``--json`` accepted after the subcommand too (``pipeline status --json``)."""
    return click.option("--json", "json_", is_flag=True, expose_value=False,
                        callback=_set_json, is_eager=True,
                        help="Print one JSON object on stdout.")(fn)


def _set_app(ctx: click.Context, **changes: Any) -> None:
    app = ctx.ensure_object(App)
    for key, value in changes.items():
        setattr(app, key, value)
    app.configure_logging()  # the group configured it before this command's options were read


def set_quiet(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        _set_app(ctx, verbosity=-1)


def set_verbose(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    if value:
        _set_app(ctx, verbosity=max(ctx.ensure_object(App).verbosity, 0) + value)


def _set_log_format(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        _set_app(ctx, log_format=value)


def global_options(cmd: C) -> C:
    """``-q``, ``-v`` and ``--log-format`` accepted after the subcommand too
    (``pipeline run-all -q``). The group adds them to every command it registers, and to the
    commands of a registered subgroup, so no command declares them itself."""
    have = {p.name for p in cmd.params}
    for option in (
        click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=set_quiet,
                     help="Only errors; nothing on success (as before the command)."),
        click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=set_verbose,
                     help="Debug logging (as before the command)."),
        click.Option(["--log-format"], type=click.Choice(["text", "json"]), default=None,
                     expose_value=False, callback=_set_log_format,
                     help="Log lines as text or JSON (as before the command)."),
    ):
        if option.name not in have:
            cmd.params.append(option)
    _check_utf8(cmd)
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            global_options(sub)
    return cmd


COMMAND_PATH = "pipeline.command_path"  # ctx.meta key: the command running (shared meta)


def command_path(ctx: click.Context | None) -> str:
    """``pipeline graph activate`` for the context of that command, whatever name the root
    was invoked by (CliRunner calls it "cli")."""
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["pipeline", *names])


def _check_utf8(cmd: click.Command) -> None:
    """A usage error (exit 2) naming the option whose value holds bytes that are not UTF-8:
    `restore dataset $'x\\xe9'` or `--device` ended in a traceback when the value reached
    the database. File names are exempt: a Latin-1 file name is legitimate. A value is read
    as UTF-8 first, whatever the locale (:func:`settings.os_text`)."""
    callback = cmd.callback
    if callback is None or getattr(callback, "utf8_checked", False):
        return

    @functools.wraps(callback)
    def checked(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        ctx.meta[COMMAND_PATH] = command_path(ctx)  # for an error's line, once out of here
        for param in ctx.command.params:
            kind = param.type.inner if isinstance(param.type, NonEmpty) else param.type
            if isinstance(kind, (click.Path, click.File)) or param.name is None:
                continue
            value = ctx.params.get(param.name)
            if isinstance(value, str):
                value = os_text(value)
            elif isinstance(value, (tuple, list)):
                value = type(value)(os_text(v) if isinstance(v, str) else v for v in value)
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, str) and not is_utf8(item):
                    raise click.BadParameter("not valid UTF-8 (only a file name may hold "
                                             "other bytes)", ctx=ctx, param=param)
            if param.name in ctx.params:
                ctx.params[param.name] = value
            if param.name in kwargs:
                kwargs[param.name] = value
        return callback(*args, **kwargs)

    checked.utf8_checked = True  # type: ignore[attr-defined]
    cmd.callback = checked


class Seconds(click.FloatRange):
    """A finite number of seconds, at least 0 (``positive``: more than 0). FloatRange lets
    nan through, which reached the run record as invalid JSON."""

    name = "seconds"

    def __init__(self, *, positive: bool = False) -> None:
        super().__init__(min=0, min_open=positive)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{quoted(value)} is not a finite number of seconds", param, ctx)
        return seconds


class NonEmpty(click.ParamType):
    """``inner`` (text by default), refusing "": ``--version "$V"`` with V unset read the
    active graph, ``-o ""`` wrote to stdout and ``--prometheus ""`` nothing, in silence."""

    def __init__(self, inner: click.ParamType = click.STRING) -> None:
        self.inner = inner
        self.name = inner.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("must not be empty (an unset shell variable?)", param, ctx)
        return self.inner.convert(value, param, ctx)


# Rows a list command shows: a larger --limit reached PostgreSQL as "bigint out of range".
LIMIT = click.IntRange(min=1, max=1_000_000)


def wait_option(fn: F) -> F:
    return click.option("--wait", type=Seconds(), default=None, metavar="SECONDS",
                        help="Wait up to SECONDS for a busy stage lock instead of exiting 75.")(fn)


def _keep_the_result(app: App) -> None:
    """The result is recorded: a stop signal from now until the process exits (rendering,
    closing the clients) leaves its exit code. The handlers come back after the clients are
    closed: the restore goes under everything ``app.resources`` already holds."""
    restore = ignore_late_signals()
    clients = app.resources.pop_all()
    app.resources.callback(restore)
    app.resources.enter_context(clients)


def reader_left() -> None:
    """stdout's reader closed the pipe (`| head`): what is still to be written goes nowhere,
    so that nothing fails again at exit, and the caller keeps the exit code its work earned
    (a stage's run, `status --check`'s verdict) instead of Click's exit 1."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


def run_stage(
    app: App,
    stage: str,
    fn: Callable[[RunContext], StageResult],
    *,
    wait: float | None = None,
    options: dict[str, Any] | None = None,
    singleton: bool | None = None,
    show: Callable[[App, RunRecord], int] | None = None,
    dry_run: bool = False,
) -> RunRecord:
    """Run one stage through the runner, render the record (``show``), ping the heartbeat
    ([notify] ping_url, best effort), and exit with the record's code.

    A ``dry_run`` is not a run of the stage: the runner records nothing and the heartbeat is
    not pinged, so neither status nor the monitor takes it for a success or a failure."""
    beat = Heartbeat(None if dry_run else app.settings.notify.ping_url,
                     app.settings.notify.timeout)
    try:
        record = app.runner().run(stage, fn, wait=wait, options=options, singleton=singleton,
                                  dry_run=dry_run)
        _keep_the_result(app)
    except LockBusy:
        raise  # the run holding the lock is doing the work and will ping
    except PipelineError as exc:  # refused before it started: schema, database, settings
        beat.failure(stage, f"pipeline {stage}: {app.redact(str(exc))}")
        raise
    try:
        # an error line names the command run (`pipeline restore dataset`), as every error
        # does, not only the stage it runs as (docs/operations.md, exit codes)
        code = show(app, record) if show else render.stage_record(
            app, record, where=command_path(click.get_current_context(silent=True)))
    except BrokenPipeError:  # `| head`: the reader left; the run's own exit code stands
        reader_left()
        code = record.exit_code
    summary = (f"pipeline {stage}: {record.status} in {record.duration_ms} ms, run "
               f"{record.run_id}" + (f": {record.error}" if record.error else ""))
    if code:
        beat.failure(stage, summary)
        raise click.exceptions.Exit(code)
    beat.success(stage, summary)
    return record


def graph_store(app: App) -> GraphStore:
    """The Redis graph store under ``[redis] prefix``, built once per invocation."""
    from ..adapters.graph_store import GraphStore

    return app.cached("graph_store", lambda: GraphStore(
        app.redis(), app.settings.redis.prefix, chunk_size=app.settings.graph.chunk_size))


def graph_reader(app: App, conn: psycopg.Connection[Any] | None = None) -> GraphStore:
    """:func:`graph_store` for a command that only reads graph keys (``graph list``,
    ``neighbors``, ``route``, ``export geojson graph``). When another database owns the prefix,
    what it reads is that database's graph: one warning line on stderr says so, naming both
    deployments and ``[redis] prefix`` as status and doctor do, and the command still answers
    (the commands that write stop there, exit 78). An unclaimed prefix (written before owners
    existed) is silent, and so is ``-q``. ``conn``: the command's own connection, to read this
    database's identity from; else one is opened, only when the prefix has an owner."""
    from ..adapters.graph_store import PrefixOwned

    store = graph_store(app)
    if app.verbosity < 0:
        return store
    owner = store.owner()
    if owner is None:
        return store
    try:
        if conn is None:
            conn = app.connect(autocommit=True, name="pipeline graph", connect_timeout=5)
        identity = deployment_id(conn)
    except PipelineError as exc:  # no identity to compare with (doctor says so): the read goes on
        log.debug("the owner of the Redis prefix is not compared: %s", exc)
        return store
    if identity is not None and owner != identity:
        log.warning("%s; `%s` reads that database's graph",
                    PrefixOwned(store.prefix, owner, identity), _command_path(),
                    extra={"redis_owner": owner, "deployment_id": identity})
    return store


def _command_path() -> str:
    """``pipeline graph route``, whatever name the script was invoked by."""
    ctx: click.Context | None = click.get_current_context()
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["pipeline", *reversed(names)])
