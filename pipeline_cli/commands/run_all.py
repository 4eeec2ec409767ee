"""``pipeline run-all``: the whole chain as one locked run, for the nightly cron entry."""

from __future__ import annotations

import click
from rich.table import Table

from .. import render
from ..app import App
from ..runner import RunRecord
from ..stages.run_all import CHAIN, Clients, run_all
from . import Seconds, graph_store, json_option, pass_app, run_stage, wait_option


def show(app: App, record: RunRecord) -> int:
    """One JSON object (``stages`` holds each stage's result) or a summary table."""
    if app.json:
        render.print_json(record.to_json())
        return record.exit_code
    stages = record.extra.get("stages", {})
    problems = record.extra.get("problems") or []  # the failed stage's, as it shows them alone
    if record.error and app.log_format == "json":  # the whole story in one log object
        render.stderr_error(app, f"pipeline run-all: error: {record.error}", problems,
                            stage="run-all", run_id=record.run_id, exit_code=record.exit_code,
                            stages=stages)
        return record.exit_code
    if record.error:
        render.stderr_error(app, f"pipeline run-all: error: {record.error}", problems)
    elif app.verbosity < 0:
        return record.exit_code
    run = f"run {record.run_id}" if record.recorded else "dry run, not recorded"
    click.echo(f"run-all: {record.status} in {record.duration_ms} ms ({run})",
               err=bool(record.error))
    table = Table()
    for col in ("stage", "status", "ms", "result"):
        table.add_column(col, overflow="fold")
    for stage in CHAIN:
        r = stages.get(stage)
        if r is None:
            table.add_row(stage, "-", "", "not reached")
            continue
        text = r.get("error") or r.get("message") or r.get("reason") or ""
        table.add_row(stage, r["status"], str(r.get("duration_ms") or ""), text)
    # On failure the table goes to stderr with the error, so cron mails the whole story.
    render.show(table, stderr=bool(record.error))
    return record.exit_code


@click.command("run-all")
@wait_option
@click.option("--gps-max-runtime", type=Seconds(positive=True), default=None,
              metavar="SECONDS", help="Stop claiming GPS batches after SECONDS (default: "
                                      "drain the backlog).")
@click.option("--dry-run", is_flag=True,
              help="Each stage's dry run, judged as if its upstream had run: say what would "
                   "change; write nothing, record no run.")
@json_option
@pass_app
def run_all_cmd(app: App, wait: float | None, gps_max_runtime: float | None,
                dry_run: bool) -> None:
    """Run sync-odata, gen-virtual, build-graph and match-gps in order, each under its own
    lock; a stage runs only when its upstream produced something new or it has work left
    (match-gps: when its backlog has work). A failed or busy stage does not stop the stages
    after it; the run exits with the first failed stage's code (75 if stages were only busy)."""
    app.settings.runner.check_budget("--gps-max-runtime", gps_max_runtime, "match-gps",
                                     "run-all")
    runner = app.runner()
    clients = Clients(odata=app.odata, backups=app.backups,
                      graph_store=lambda: graph_store(app), osrm=app.osrm)
    run_stage(app, "run-all",
              lambda ctx: run_all(runner, app.settings, clients, ctx, wait=wait,
                                  gps_max_runtime=gps_max_runtime, dry_run=dry_run),
              wait=wait, options={"gps_max_runtime": gps_max_runtime, "dry_run": dry_run},
              show=show, dry_run=dry_run)


def register(group: click.Group) -> None:
    group.add_command(run_all_cmd)
