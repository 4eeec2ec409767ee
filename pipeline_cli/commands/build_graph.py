"""``pipeline build-graph`` and ``pipeline graph list|activate|neighbors|route``."""

from __future__ import annotations

from typing import Any

import click

from .. import render
from ..app import App
from ..errors import UsageError
from ..health import human_duration
from ..settings import quoted
from ..stages.build_graph import (
    activate_version,
    build_graph,
    list_versions,
    plan,
    shortest_path,
    version_exists,
)
from . import (
    LIMIT,
    NonEmpty,
    graph_reader,
    graph_store,
    json_option,
    pass_app,
    run_stage,
    wait_option,
)


@click.command("build-graph")
@wait_option
@click.option("--force", is_flag=True,
              help="Rebuild even if the newest virtual generation already has a graph.")
@click.option("--dry-run", is_flag=True,
              help="Say which version would be built from which inputs, validated; write "
                   "nothing, record no run.")
@json_option
@pass_app
def build_graph_cmd(app: App, wait: float | None, force: bool, dry_run: bool) -> None:
    """Build the stop graph of the active dataset and publish it to Redis atomically."""
    store, settings = graph_store(app), app.settings
    if dry_run:
        run_stage(app, "build-graph",
                  lambda ctx: plan(app.database, store, settings.graph,
                                   settings.virtual.speeds_kmh, force=force),
                  wait=wait, dry_run=True, options={"force": force, "dry_run": True})
        return
    backups = app.backups()
    run_stage(app, "build-graph",
              lambda ctx: build_graph(app.database, store, backups, settings.graph,
                                      settings.virtual.speeds_kmh, ctx, force=force),
              wait=wait, options={"force": force})


@click.group("graph")
def graph_group() -> None:
    """Inspect, roll back and query the published graph versions."""


@graph_group.command("list")
@click.option("--limit", type=LIMIT, default=50, show_default=True,
              help="Show at most this many versions, newest first.")
@json_option
@pass_app
def list_cmd(app: App, limit: int) -> None:
    """List graph versions: counts, source dataset, active flag, whether Redis holds them."""
    conn = app.connect(autocommit=True, name="pipeline graph list", migrated=True)
    rows = list_versions(conn, graph_reader(app, conn), limit=limit)
    if app.json:
        render.print_json({"versions": rows})
        return
    render.table("graph versions",
                 ("version", "active", "redis", "dataset", "gen", "nodes", "edges", "created"),
                 [(r["version"], "yes" if r["active"] else "", "yes" if r["in_redis"] else "no",
                   r["dataset_version"], r["virtual_generation_id"], r["nodes"], r["edges"],
                   render.utc_minute(r["created_at"])) for r in rows])


@graph_group.command("activate")
@click.argument("version")
@wait_option
@json_option
@pass_app
def activate_cmd(app: App, version: str, wait: float | None) -> None:
    """Make VERSION the active graph again (rollback), reloading it from S3 if needed."""
    conn = app.connect(autocommit=True, name="pipeline graph activate", migrated=True)
    if not version_exists(conn, version):  # a typo: no run recorded, no failure streak
        raise UsageError(f"unknown graph version {quoted(version)} (see `pipeline graph list`)")
    store, backups = graph_store(app), app.backups()
    run_stage(app, "build-graph",
              lambda ctx: activate_version(app.database, store, backups,
                                           app.settings.graph, version, ctx),
              wait=wait, options={"activate": version})


@graph_group.command("neighbors")
@click.argument("stop_id")
@click.option("--version", "version", metavar="VERSION", type=NonEmpty(),
              help="Read this graph version "
              "instead of the active one.")
@json_option
@pass_app
def neighbors_cmd(app: App, stop_id: str, version: str | None) -> None:
    """Show the outgoing edges of STOP_ID in the active graph."""
    version, edges = graph_reader(app).neighbors(stop_id, version)
    if app.json:
        render.print_json({"graph_version": version, "stop": stop_id,
                           "neighbors": [e.to_json() for e in edges]})
        return
    render.table(f"{render.escaped(stop_id)} in {version}: {len(edges)} edges",
                 ("to", "weight s", "route", "mode"),
                 [(e.to, e.weight_s, e.route_id, e.mode) for e in edges])


@graph_group.command("route")
@click.argument("source", metavar="FROM")
@click.argument("target", metavar="TO")
@click.option("--version", "version", metavar="VERSION", type=NonEmpty(),
              help="Route over this graph version "
              "instead of the active one.")
@json_option
@pass_app
def route_cmd(app: App, source: str, target: str, version: str | None) -> None:
    """Fastest path from FROM to TO (Dijkstra over the active graph in Redis); exit 1 if none."""
    route = shortest_path(graph_reader(app), source, target, version=version)
    if app.json:
        render.print_json(route.to_json())
        return
    click.echo(f"{render.escaped(route.source)} -> {render.escaped(route.target)}: "
               f"{route.total_s:g} s ({human_duration(route.total_s)}), "
               f"{len(route.stops)} stops, graph {route.version}")
    elapsed = 0.0
    rows: list[tuple[Any, ...]] = [(route.stops[0], "", "", "", 0.0)]
    for stop, leg in zip(route.stops[1:], route.legs, strict=True):
        elapsed += leg.weight_s
        rows.append((stop, leg.route_id, leg.mode, leg.weight_s, round(elapsed, 3)))
    render.table(None, ("stop", "route", "mode", "leg s", "total s"), rows)


def register(group: click.Group) -> None:
    group.add_command(build_graph_cmd)
    group.add_command(graph_group)
