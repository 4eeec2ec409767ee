"""``pipeline db``: schema migrations."""

from __future__ import annotations

import click

from .. import db, render
from ..app import App
from ..errors import EXIT_CONFIG
from ..gps import partitions
from . import json_option, pass_app


@click.group("db")
def db_group() -> None:
    """Database schema: apply and inspect migrations."""


@db_group.command("migrate")
@json_option
@pass_app
def migrate(app: App) -> None:
    """Apply pending migrations in one transaction (safe to run concurrently), then create
    the GPS partitions of the days ahead."""
    conn = app.connect(autocommit=True, name="pipeline db migrate")
    result = db.migrate(conn)
    partitions.ensure(conn)
    if app.json:
        render.print_json({"applied": result.applied, "version": result.version})
    elif app.verbosity >= 0:
        done = ", ".join(result.applied) if result.applied else "nothing to do"
        click.echo(f"schema version {result.version}: {done}")


@db_group.command("status")
@click.option("--check", is_flag=True,
              help="Exit 78 when a migration is pending, or one this pipeline does not know is "
                   "applied (gates a deploy); with -q, print only then.")
@json_option
@pass_app
def db_status(app: App, check: bool) -> None:
    """Show the applied and pending migrations, by version."""
    conn = app.connect(autocommit=True, name="pipeline db status")
    applied = db.applied_versions(conn)
    known = {m.version for m in db.migrations()}
    rows = [(f"{m.version:03d}", m.name, "applied" if m.version in applied else "pending")
            for m in db.migrations()] + [(f"{v:03d}", "?", "unknown to this pipeline")
                                         for v in sorted(applied - known)]
    pending = [int(v) for v, _, state in rows if state == "pending"]
    code = EXIT_CONFIG if check and (pending or applied - known) else 0
    if app.json:
        render.print_json({"version": max(applied, default=0), "latest": db.latest_version(),
                           "pending": pending, "summary": db.describe_schema(applied),
                           "migrations": [{"version": int(v), "name": n, "state": s}
                                          for v, n, s in rows]})
    elif code:
        click.echo(f"pipeline db status: {db.describe_schema(applied)}: " + (
            "run `pipeline db migrate`" if pending else "upgrade pipeline"), err=True)
    elif not check or app.verbosity >= 0:
        render.table(db.describe_schema(applied), ("version", "name", "state"), rows)
    if code:
        raise click.exceptions.Exit(code)


def register(group: click.Group) -> None:
    group.add_command(db_group)
