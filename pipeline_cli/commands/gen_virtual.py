"""``pipeline gen-virtual``: virtual stops, routes and flights for the active dataset."""

from __future__ import annotations

import time

import click

from .. import render
from ..app import App
from ..stages.gen_virtual import generate, preview
from . import json_option, pass_app, run_stage, wait_option


@click.command("gen-virtual")
@click.option("--force", is_flag=True,
              help="Regenerate even if the active dataset already has virtual entities.")
@click.option("--dry-run", is_flag=True,
              help="Compute and print what would be generated; write nothing, take no lock.")
@wait_option
@json_option
@pass_app
def gen_virtual(app: App, force: bool, dry_run: bool, wait: float | None) -> None:
    """Generate virtual stops, routes and flights for the active dataset (noop if done)."""
    settings = app.settings.virtual
    if dry_run:
        started = time.monotonic()
        result = preview(app.database, settings)
        obj = {"stage": "gen-virtual", "status": result.status,
               "duration_ms": int((time.monotonic() - started) * 1000),
               "counts": result.counts, **result.extra, "message": result.message}
        if app.json:
            render.print_json(obj)
        elif app.verbosity >= 0:
            click.echo(f"gen-virtual: {result.status}: {result.message}")
            if result.counts:
                render.key_values("counts", result.counts)
        return
    backups = app.backups()
    run_stage(app, "gen-virtual",
              lambda ctx: generate(app.database, backups, settings, ctx, force=force),
              wait=wait, options={"force": force})


def register(group: click.Group) -> None:
    group.add_command(gen_virtual)
