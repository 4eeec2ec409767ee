"""``pipeline db``: schema migrations."""

from __future__ import annotations

import click

from .. import db, render
from ..app import App
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
@json_option
@pass_app
def db_status(app: App) -> None:
    """Show the applied and pending migrations."""
    conn = app.connect(autocommit=True, name="pipeline db status")
    applied = db.applied_versions(conn)
    have = max(applied, default=0)
    rows = [(m.version, m.name, "applied" if m.version in applied else "pending")
            for m in db.migrations()]
    if app.json:
        render.print_json({"version": have, "latest": db.latest_version(),
                           "migrations": [dict(zip(("version", "name", "state"), r, strict=True))
                                          for r in rows]})
    else:
        render.table(f"schema version {have}", ("version", "name", "state"), rows)


def register(group: click.Group) -> None:
    group.add_command(db_group)
