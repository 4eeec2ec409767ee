"""``pipeline ingest-gps``, ``pipeline match-gps`` and ``pipeline batches``: the GPS side."""

from __future__ import annotations

import click

from .. import render
from ..app import App
from ..gps import batches as gps_batches
from ..settings import MAX_CONCURRENCY, printable_path
from ..stages import match_gps as stage
from ..stages.ingest_gps import ingest_gps
from . import LIMIT, NonEmpty, Seconds, json_option, pass_app, run_stage

STATES = ("pending", "processing", "completed", "failed", "dead", "too_short")


@click.command("ingest-gps")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, readable=True))
@click.option("--format", "fmt", type=click.Choice(["csv", "gpx", "geojson"]), default=None,
              help="File format; by default from the suffix (.csv/.tsv/.txt, .gpx, "
                   ".geojson/.json/.geojsonl/.geojsons; before a .gz, as gzipped files are read "
                   "too).")
@click.option("--device", "device_id", default=None, metavar="ID", type=NonEmpty(),
              help="Device id of every GPX point (over its track's name, which is often a "
                   "device's generic 'ACTIVE LOG' or an activity's 'Morning Ride'), and of "
                   "GeoJSON features and CSV rows that name none. Without it a GPX or GeoJSON "
                   "file's name up to its first dot names its device; a CSV file without a "
                   "device column needs it.")
@click.option("--strict", is_flag=True,
              help="Reject everything if any row is invalid (default: report and skip).")
@json_option
@pass_app
def ingest(app: App, files: tuple[str, ...], fmt: str | None, device_id: str | None,
           strict: bool) -> None:
    """Load GPS points from CSV, GPX or GeoJSON files into gps_points (one transaction)."""
    record = run_stage(
        app, "ingest-gps",
        lambda ctx: ingest_gps(app.database, files, ctx, fmt=fmt, device_id=device_id,
                               strict=strict),
        options={"files": [printable_path(f) for f in files], "format": fmt, "strict": strict},
        singleton=False)
    if not app.json and app.verbosity >= 0:  # -q: the run record keeps them; cron stays silent
        for problem in [*record.extra.get("problems", []), *record.extra.get("conflicts", [])]:
            if app.log_format == "json":
                render.stderr_error(app, f"skipped {problem}", stage="ingest-gps",
                                    run_id=record.run_id, level="warning")
            else:
                click.echo(f"  skipped {problem}", err=True)


@click.command("match-gps")
@click.option("--concurrency", type=click.IntRange(min=1, max=MAX_CONCURRENCY), default=None,
              metavar="N",
              help="OSRM requests in flight (default [match] concurrency).")
@click.option("--max-batches", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stop claiming after N batches.")
@click.option("--max-runtime", type=Seconds(positive=True), default=None,
              metavar="SECONDS", help="Stop claiming after SECONDS (fits a cron slot).")
@click.option("--dry-run", is_flag=True,
              help="Show the batches and points waiting; claim and write nothing, record no "
                   "run.")
@json_option
@pass_app
def match(app: App, concurrency: int | None, max_batches: int | None,
          max_runtime: float | None, dry_run: bool) -> None:
    """Batch new GPS points and map-match ready batches through OSRM into cached_polylines.

    Safe to run on many hosts at once: batches are claimed row by row under a lease.
    """
    if dry_run:
        run_stage(app, "match-gps",
                  lambda ctx: stage.preview(app.database, app.settings.match),
                  dry_run=True, options={"dry_run": True})
        return
    settings = app.settings
    settings.runner.check_budget("--max-runtime", max_runtime, "match-gps")
    client = app.osrm(pool_size=concurrency or settings.match.concurrency)
    run_stage(
        app, "match-gps",
        lambda ctx: stage.match_gps(app.database, client, settings.match, ctx,
                                    concurrency=concurrency, max_batches=max_batches,
                                    max_runtime=max_runtime),
        options={"concurrency": concurrency, "max_batches": max_batches,
                 "max_runtime": max_runtime})


@click.group("batches")
def batches() -> None:
    """Inspect and requeue GPS matching batches."""


@batches.command("list")
@click.option("--status", type=click.Choice(STATES), default=None, help="Only this state.")
@click.option("--device", "device_id", default=None, metavar="ID", type=NonEmpty(),
              help="Only this device.")
@click.option("--limit", type=LIMIT, default=50, show_default=True,
              help="Most recently changed first.")
@json_option
@pass_app
def list_cmd(app: App, status: str | None, device_id: str | None, limit: int) -> None:
    """List batches with their state, attempts and last error."""
    conn = app.connect(autocommit=True, name="pipeline batches list", migrated=True)
    rows = gps_batches.list_batches(conn, status=status, device_id=device_id, limit=limit)
    if app.json:
        render.print_json({"batches": rows})
        return
    render.table(f"batches ({len(rows)} shown)",
                 ("batch", "device", "start", "status", "points", "matched", "retries",
                  "next attempt", "error"),
                 [(r["batch_id"], r["device_id"], r["start_time"], r["status"],
                   r["coordinate_count"], r["matched_count"], r["retry_count"],
                   r["next_attempt_at"] if r["status"] in ("pending", "failed") else None,
                   r["error_message"]) for r in rows])


@batches.command("requeue")
@click.option("--dead", "dead_only", is_flag=True, help="Only dead batches (default: dead "
              "and failed).")
@click.option("--device", "device_id", default=None, metavar="ID", type=NonEmpty(),
              help="Only this device.")
@json_option
@pass_app
def requeue(app: App, dead_only: bool, device_id: str | None) -> None:
    """Make dead (and failed) batches pending again with a fresh attempt count."""
    conn = app.connect(autocommit=True, name="pipeline batches requeue", migrated=True)
    result = gps_batches.requeue_batches(conn, dead_only=dead_only, device_id=device_id)
    if app.json:
        render.print_json(result)
    elif app.verbosity >= 0:
        click.echo(f"requeued {result['requeued']} batch(es), {result['points']} point(s)")


def register(group: click.Group) -> None:
    group.add_command(ingest)
    group.add_command(match)
    group.add_command(batches)
