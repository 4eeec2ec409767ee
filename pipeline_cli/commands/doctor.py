"""``pipeline doctor``: the pre-deploy and CI smoke check of settings and outside systems."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from .. import render
from ..app import App
from ..doctor import DoctorReport, run_doctor, settings_failure
from ..errors import EXIT_CONFIG, EXIT_FAILED, ConfigError, UsageError
from ..settings import quoted
from . import json_option, pass_app


def _point(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lon, lat = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"malformed --point {quoted(text)}: expected LON,LAT") from None
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise UsageError(f"malformed --point {quoted(text)}: LON in [-180, 180], LAT in [-90, 90]")
    return lon, lat


@click.command("doctor")
@click.option("--point", metavar="LON,LAT",
              help="Where OSRM is asked /nearest (default: the centroid of the stops, else 0,0).")
@json_option
@pass_app
def doctor(app: App, point: str | None) -> None:
    """Check the settings, PostgreSQL, Redis, S3, OSRM and OData, writing nothing: exit 0 when
    every check passes, 1 when one fails, 78 when the settings are invalid."""
    where = _point(point)
    try:
        report = run_doctor(app.settings, point=where)
    except ConfigError as exc:  # the settings do not load: nothing else can be checked
        report = settings_failure(ConfigError(app.redact(str(exc))))
    show(app, report)
    if not report.settings_ok:
        raise click.exceptions.Exit(EXIT_CONFIG)
    if not report.ok:
        raise click.exceptions.Exit(EXIT_FAILED)


def show(app: App, report: DoctorReport) -> None:
    if app.json:
        render.print_json(report.to_json())
        return
    if app.verbosity < 0 and report.ok:
        return
    table = Table(box=None, pad_edge=False)
    for col in ("check", "", "endpoint", "detail", "ms"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        # Text, not markup: a detail such as "[odata] password" must print as it is
        table.add_row(c.name, "ok" if c.ok else "FAIL", Text(c.endpoint), Text(c.detail),
                      str(c.ms))
    render.show(table)
    failed = [c.name for c in report.checks if not c.ok]
    click.echo(f"doctor: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")


def register(group: click.Group) -> None:
    group.add_command(doctor)
