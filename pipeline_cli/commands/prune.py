"""``pipeline prune``: retention housekeeping, once a day from cron."""

from __future__ import annotations

import click

from ..app import App
from ..stages.prune import prune
from . import json_option, pass_app, run_stage, wait_option


@click.command("prune")
@click.option("--dry-run", is_flag=True,
              help="Count what would be deleted; delete nothing, record no run.")
@wait_option
@json_option
@pass_app
def prune_cmd(app: App, dry_run: bool, wait: float | None) -> None:
    """Delete what [retention] says is due: processed GPS points and their batches, stale
    polylines, old run history, old dataset versions with their S3 objects (noop if none)."""
    settings = app.settings.retention
    backups = app.backups() if settings.datasets else None  # only datasets have S3 objects
    run_stage(app, "prune",
              lambda ctx: prune(app.database, backups, settings, ctx, dry_run=dry_run),
              wait=wait, dry_run=dry_run, options={"dry_run": dry_run})


def register(group: click.Group) -> None:
    group.add_command(prune_cmd)
