"""The Click edge of the pipeline: global options, the context object, error -> exit code.

Commands live in :mod:`pipeline_cli.commands`; each parses its options, calls one stage through
the runner and renders the result with :mod:`pipeline_cli.render`. This module also turns every
:class:`PipelineError` into a one-line message and its exit code, with no traceback.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import sys
import traceback
from typing import Any, NoReturn

import click

from . import __version__, render
from .app import App
from .commands import (
    COMMAND_PATH,
    COMMANDS,
    LazyGroup,
    NonEmpty,
    command_path,
    set_quiet,
    set_verbose,
)
from .errors import EXIT_CODES, PipelineError
from .logs import json_line
from .settings import shorten_values

EPILOG = (
    "Settings come from --config FILE (or PIPELINE_CONFIG) and are overridden by environment "
    "variables PIPELINE_<SECTION>_<KEY>; `pipeline config show` lists them with their source. "
    "Exit codes: " + "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items()) + "."
)


class PipelineGroup(LazyGroup):
    """Turns PipelineError into one line on stderr (or a JSON object) and its exit code."""

    raw_args: list[str] = []  # as given: a usage error comes before --log-format is read

    def main(self, args: Any = None, *a: Any, **kw: Any) -> Any:
        self.raw_args = list(sys.argv[1:] if args is None else args)
        try:
            return super().main(args, *a, **kw)
        except OSError as exc:  # Click pacifies EPIPE (`| head`); a full disk was a traceback
            if exc.errno == errno.EPIPE or not _writing_stdout(exc):
                raise
            self._output_failed(exc)
        finally:
            try:
                sys.stdout.flush()
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    self._output_failed(exc)

    def _output_failed(self, exc: OSError) -> None:
        """stdout could not be written (a full disk, a quota): one line on stderr, exit 1. A
        stage's run stays as recorded: its work is done, only its report was lost."""
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (the rest would fail again at exit)
        render.stderr_error(App(log_format="json" if self._json_logs() else "text"),
                            f"pipeline: cannot write the output: {exc.strerror}", exit_code=1)
        sys.exit(1)

    def _json_logs(self) -> bool:
        """Whether --log-format json was given, read from the raw arguments (for an error
        that comes before, or without, the parsed options)."""
        raw = self.raw_args
        return "--log-format=json" in raw or any(
            a == "--log-format" and b == "json" for a, b in zip(raw, raw[1:], strict=False))

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:  # Click said "Aborted!" and exit 1 for a Ctrl-C here
            render.stderr_error(App(log_format="json" if self._json_logs() else "text"),
                                stopped_line("pipeline", "SIGINT"), exit_code=130)
            sys.exit(130)
        except click.ClickException as exc:  # a usage error in the options before a command
            self._usage_error(exc, None)

    def _usage_error(self, exc: click.ClickException, outer: click.Context | None) -> NoReturn:
        """Click's usage error as one line, ``pipeline graph activate: error: Missing argument
        'VERSION'. (see 'pipeline graph activate --help')``, on stderr (a JSON log object
        under --log-format json; and one JSON object on stdout with --json), exit 2: Click
        printed its usage, a "Try" line, a blank and "Error: ...", four lines for one fault."""
        _json_hint(exc)
        ctx = getattr(exc, "ctx", None) or outer
        app = (ctx.find_object(App) if ctx else None) or App()
        where = command_path(ctx)
        help_text = isinstance(exc, _NO_ARGS_IS_HELP)  # a bare `pipeline graph`: its help
        message = app.redact(exc.format_message())
        message = message if help_text else shorten_values(message)
        if isinstance(exc, click.NoSuchOption) and not exc.possibilities and ctx and any(
                isinstance(p, click.Argument) for p in ctx.command.params):
            # a stop id or version "-1" is a value, not a misspelt option
            message = message.rstrip(".") + "; an argument that starts with '-' goes after '--'"
        if app.json or "--json" in self.raw_args:  # one JSON object on stdout, as for others
            render.print_json({"status": "error", "error": message, "exit_code": exc.exit_code})
        json_logs = app.log_format == "json" or self._json_logs()
        if help_text and not json_logs:
            raise exc  # Click prints the help, as it did
        line = f"{where}: error: {message}"
        if isinstance(exc, click.UsageError):
            line += f" (see '{where} --help')"
        render.stderr_error(App(log_format="json" if json_logs else "text"), line,
                            stage=where.split(" ")[1] if " " in where else None,
                            exit_code=exc.exit_code)
        sys.exit(exc.exit_code)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            app = ctx.find_object(App) or App()
            render.error(app, exc, command=ctx.invoked_subcommand,
                         where=ctx.meta.get(COMMAND_PATH))
            ctx.exit(exc.exit_code)
        except click.ClickException as exc:  # a usage error, before the options were read
            self._usage_error(exc, ctx)
        except KeyboardInterrupt:  # outside a stage's run (the runner handles it there)
            where = ctx.meta.get(COMMAND_PATH) or command_path(ctx)
            render.stderr_error(ctx.find_object(App) or App(), stopped_line(where, "SIGINT"),
                                exit_code=130)
            ctx.exit(130)


@click.group(cls=PipelineGroup, lazy=COMMANDS, epilog=EPILOG,
             context_settings={"max_content_width": 100})
@click.option("--config", "config_path", type=NonEmpty(click.Path()), metavar="FILE",
              help="TOML settings file (default: $PIPELINE_CONFIG).")
@click.option("--json", "json_", is_flag=True,
              help="Print one JSON object on stdout instead of tables.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Log lines on stderr as text or one JSON object each.")
@click.option("-v", "--verbose", count=True, expose_value=False, callback=set_verbose,
              help="Debug logging.")
@click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=set_quiet,
              help="Only errors: nothing on success (for cron).")
@click.version_option(__version__, prog_name="pipeline")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, json_: bool, log_format: str) -> None:
    """Keep a transport-routing backend's data fresh, one cron-safe stage at a time."""
    # -q and -v set the verbosity as they come, as after the command: the last one wins
    # (`pipeline -q -v run-all`, a -v added to a cron line, stayed quiet)
    app = ctx.ensure_object(App)
    app.config_path, app.json, app.log_format = config_path, json_, log_format
    ctx.call_on_close(app.resources.close)
    app.configure_logging()


# Click 8.2+ raises this for a group given no command (8.1 printed the help and exit 0).
_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _json_hint(exc: click.ClickException) -> None:
    """``--format json`` got "Did you mean '--log-format'?", which gives JSON log lines on
    stderr and tables still on stdout: it means ``--json``."""
    if isinstance(exc, click.NoSuchOption) and exc.option_name == "--format":
        exc.possibilities = ["--json"]  # type: ignore[misc]


def _writing_stdout(exc: OSError) -> bool:
    """True when ``exc`` came from writing stdout: a stream in the failing frames' locals
    whatever its name (click.echo's and rich's ``file``, the GeoJSON export's ``out``:
    looking for ``file`` only, `export geojson stops > /dev/full` was a traceback)."""
    for frame, _line in traceback.walk_tb(exc.__traceback__):
        for stream in (*frame.f_locals.values(),
                       getattr(frame.f_locals.get("self"), "file", None)):
            try:
                if stream is sys.stdout or (isinstance(stream, io.IOBase)
                                            and stream.fileno() == 1):
                    return True
            except (OSError, ValueError):
                continue
    return False


def main() -> None:
    """Console-script entry point."""
    _closed_streams()
    _utf8_streams()
    _say_when_terminated()
    cli(prog_name="pipeline")


def stopped_line(where: str, signal_name: str) -> str:
    """The one line a command that is not in a stage's run says when a signal stops it,
    naming the command (``pipeline`` alone when none is known yet): a Ctrl-C said only
    "pipeline: interrupted" where SIGTERM named the command."""
    return f"{where}: stopped by {signal_name} before it finished"


def _say_when_terminated() -> None:
    """SIGTERM outside a stage's run (``timeout 60 pipeline status``, a deploy stopping
    ``db migrate``) killed the process with nothing said, and cron mailed nothing: one line
    on stderr now, then the signal's own action, so the process still dies of it (143 to a
    shell) with nothing unwound (an open transaction rolls back as its connection drops). A
    stage's run has its own handlers (``runner.StopFlag``), and puts this one back after."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # ignored or handled by whoever started us

    def terminated(signum: int, _frame: Any) -> None:
        ctx = click.get_current_context(silent=True)
        line = stopped_line(command_path(ctx), "SIGTERM")
        app = ctx.find_object(App) if ctx else None
        if app is not None and app.log_format == "json":
            line = json_line("error", line, logger="pipeline.cli")
        with contextlib.suppress(OSError):
            os.write(2, (line + "\n").encode("ascii", "backslashreplace"))
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, terminated)


def _closed_streams() -> None:
    """stdin, stdout or stderr closed by the caller (``>&-`` in a cron line): Python made
    it None, and exit 1 with an AttributeError traceback followed even a silent success.
    Each gets its descriptor back, so a socket opened later cannot take it: stdin and stderr
    on /dev/null (nothing to read; nowhere to tell), stdout on a descriptor that refuses
    writes, so that output fails as a full disk does: one line on stderr, exit 1."""
    for fd, name, flags in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_RDONLY),
                            (2, "stderr", os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, flags)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            mode = "r" if name == "stdin" else "w"
            setattr(sys, name, open(fd, mode, encoding="utf-8", closefd=False,  # noqa: SIM115
                                    errors="backslashreplace" if fd == 2 else None))


def _utf8_streams() -> None:
    """stdout is UTF-8 whatever the locale or PYTHONIOENCODING says: JSON and GeoJSON must be
    (RFC 8259, 7946), and an ASCII or Latin-1 stdout failed with a UnicodeEncodeError
    traceback on a stop named "Jyväskylä" or "Москва". stderr keeps its encoding, with
    escapes for what it cannot show, so a log line never fails."""
    for stream, change in ((sys.stdout, {"encoding": "utf-8"}),
                           (sys.stderr, {"errors": "backslashreplace"})):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(**change)


if __name__ == "__main__":  # pragma: no cover
    main()
