"""The Click edge of the pipeline: global options, the context object, error -> exit code.

Commands live in :mod:`pipeline_cli.commands`; each parses its options, calls one stage through
the runner and renders the result with :mod:`pipeline_cli.render`. This module also turns every
:class:`PipelineError` into a one-line message and its exit code, with no traceback.
"""

from __future__ import annotations

from typing import Any

import click

from . import __version__, render
from .app import App
from .commands import COMMANDS, LazyGroup
from .errors import EXIT_CODES, PipelineError

EPILOG = (
    "Settings come from --config FILE (or PIPELINE_CONFIG) and are overridden by environment "
    "variables PIPELINE_<SECTION>_<KEY>; `pipeline config show` lists them with their source. "
    "Exit codes: " + "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items()) + "."
)


class PipelineGroup(LazyGroup):
    """Turns PipelineError into one line on stderr (or a JSON object) and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            app = ctx.find_object(App) or App()
            render.error(app, exc, command=ctx.invoked_subcommand)
            ctx.exit(exc.exit_code)
        except click.ClickException as exc:  # a usage error after the subcommand's name
            app = ctx.find_object(App) or App()
            if app.log_format != "json":
                raise
            render.stderr_error(app, f"pipeline {ctx.invoked_subcommand}: error: "
                                f"{exc.format_message()}", stage=ctx.invoked_subcommand,
                                exit_code=exc.exit_code)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            render.stderr_error(ctx.find_object(App) or App(), "pipeline: interrupted",
                                exit_code=130)
            ctx.exit(130)


@click.group(cls=PipelineGroup, lazy=COMMANDS, epilog=EPILOG,
             context_settings={"max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML settings file (default: $PIPELINE_CONFIG).")
@click.option("--json", "json_", is_flag=True,
              help="Print one JSON object on stdout instead of tables.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Log lines on stderr as text or one JSON object each.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True,
              help="Only errors: nothing on success (for cron).")
@click.version_option(__version__, prog_name="pipeline")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, json_: bool, log_format: str,
        verbose: int, quiet: bool) -> None:
    """Keep a transport-routing backend's data fresh, one cron-safe stage at a time."""
    app = App(config_path=config_path, json=json_, log_format=log_format,
              verbosity=-1 if quiet else verbose)
    ctx.obj = app
    ctx.call_on_close(app.resources.close)
    app.configure_logging()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="pipeline")


if __name__ == "__main__":  # pragma: no cover
    main()
