"""``pipeline sync-odata``, ``pipeline datasets list`` and ``pipeline restore dataset``."""

from __future__ import annotations

import click

from .. import render
from ..app import App
from ..errors import UsageError
from ..settings import quoted
from ..stages.sync_odata import dataset_exists, list_datasets, restore_dataset, sync_odata
from . import LIMIT, json_option, pass_app, run_stage, wait_option


@click.command("sync-odata")
@click.option("--skip-invalid", is_flag=True,
              help="Load the valid rows and record the rejects (in S3) instead of aborting.")
@click.option("--dry-run", is_flag=True,
              help="Fetch, validate and diff; write nothing, record no run (takes the lock).")
@click.option("--force", is_flag=True, help="Make a new dataset version even if unchanged.")
@wait_option
@json_option
@pass_app
def sync_odata_cmd(app: App, skip_invalid: bool, dry_run: bool, force: bool,
                   wait: float | None) -> None:
    """Pull stops, routes and flights from the OData service into a new dataset version."""
    settings = app.settings.odata
    client = app.odata()
    backups = None if dry_run else app.backups()
    run_stage(app, "sync-odata",
              lambda ctx: sync_odata(app.database, client, backups, ctx,
                                     mapping=settings.mapping, skip_invalid=skip_invalid,
                                     dry_run=dry_run, force=force,
                                     speeds_kmh=app.settings.virtual.speeds_kmh),
              wait=wait, dry_run=dry_run,
              options={"skip_invalid": skip_invalid, "dry_run": dry_run, "force": force})


@click.group("datasets")
def datasets_group() -> None:
    """Dataset versions made by sync-odata."""


@datasets_group.command("list")
@click.option("--limit", type=LIMIT, default=50, show_default=True,
              help="Show at most this many versions, newest first.")
@json_option
@pass_app
def datasets_list(app: App, limit: int) -> None:
    """List dataset versions: hash, row counts, diff, origin, and which one is active."""
    conn = app.connect(autocommit=True, name="pipeline datasets list", migrated=True)
    rows = list_datasets(conn, limit)
    if app.json:
        render.print_json({"datasets": rows})
        return
    render.table("datasets (rows: stops/routes/flights)",
                 ("version", "active", "created", "rows", "changes", "source", "hash"),
                 [(r["version"], "*" if r["active"] else "",
                   render.utc_minute(r["created_at"]),
                   "/".join(str(r["counts"].get(e, 0)) for e in ("stops", "routes", "flights")),
                   "+{} ~{} -{}".format(*(sum(d.get(k, 0) for d in r["diff"].values())
                                          for k in ("inserted", "updated", "deleted"))),
                   r["source"] + (f" {r['restored_from']}" if r["restored_from"] else ""),
                   r["hash"][:10]) for r in rows])

@click.group("restore")
def restore_group() -> None:
    """Restore a backed-up version from S3."""


@restore_group.command("dataset")
@click.argument("version")
@wait_option
@json_option
@pass_app
def restore_dataset_cmd(app: App, version: str, wait: float | None) -> None:
    """Make VERSION's S3 backup the active dataset again, as a new version with its hash.

    Runs under the sync-odata lock (it rewrites the same tables) and is recorded as a
    sync-odata run with the option restore=VERSION.
    """
    conn = app.connect(autocommit=True, name="pipeline restore dataset", migrated=True)
    if not dataset_exists(conn, version):  # a typo: no run recorded, no failure streak
        raise UsageError(f"unknown dataset version {quoted(version)} "
                         "(see `pipeline datasets list`)")
    backups = app.backups()
    run_stage(app, "sync-odata",
              lambda ctx: restore_dataset(app.database, backups, ctx, version),
              wait=wait, options={"restore": version})


def register(group: click.Group) -> None:
    for command in (sync_odata_cmd, datasets_group, restore_group):
        group.add_command(command)
