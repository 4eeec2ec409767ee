"""``pipeline config``: show the effective settings, where each comes from, secrets masked."""

from __future__ import annotations

import click

from .. import render
from ..app import App
from . import json_option, pass_app


@click.group("config")
def config_group() -> None:
    """Inspect the effective settings."""


@config_group.command("show")
@json_option
@pass_app
def show(app: App) -> None:
    """List every setting with its value (secrets masked), source and meaning."""
    rows = app.settings.describe(typed=app.json)
    if app.json:
        render.print_json({k: {"value": v, "source": s} for k, v, s, _ in rows})
    else:
        render.table("settings", ("key", "value", "source", "meaning"), rows)


def register(group: click.Group) -> None:
    group.add_command(config_group)
