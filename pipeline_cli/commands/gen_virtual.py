"""``pipeline gen-virtual``: virtual stops, routes and flights for the active dataset."""

from __future__ import annotations

import click

from ..app import App
from ..stages.gen_virtual import generate, preview
from . import json_option, pass_app, run_stage, wait_option


@click.command("gen-virtual")
@click.option("--force", is_flag=True,
              help="Regenerate even if the active dataset already has virtual entities.")
@click.option("--dry-run", is_flag=True,
              help="Compute and print what would be generated; write nothing, record no "
                   "run (takes the lock: 75 while a run holds it).")
@wait_option
@json_option
@pass_app
def gen_virtual(app: App, force: bool, dry_run: bool, wait: float | None) -> None:
    """Generate virtual stops, routes and flights for the active dataset (noop if done)."""
    settings = app.settings.virtual
    if dry_run:
        run_stage(app, "gen-virtual", lambda ctx: preview(app.database, settings),
                  wait=wait, dry_run=True, options={"force": force, "dry_run": True})
        return
    backups = app.backups()
    run_stage(app, "gen-virtual",
              lambda ctx: generate(app.database, backups, settings, ctx, force=force),
              wait=wait, options={"force": force})


def register(group: click.Group) -> None:
    group.add_command(gen_virtual)
