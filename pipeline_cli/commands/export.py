"""``pipeline export geojson``: polylines, stops and graph edges as GeoJSON for a map."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

from .. import export
from ..app import App
from . import NonEmpty, graph_reader, pass_app

F = TypeVar("F", bound=Callable[..., Any])


def output_option(fn: F) -> F:
    return click.option("--output", "-o", metavar="FILE",
                        type=NonEmpty(click.Path(dir_okay=False, allow_dash=True)),
                        help="Write to FILE (atomically: a failed export leaves no file) "
                             "instead of stdout ('-': stdout).")(fn)


def bbox_option(fn: F) -> F:
    return click.option("--bbox", metavar="W,S,E,N",
                        help="Only features inside this box (degrees; W > E crosses the "
                             "antimeridian).")(fn)


def _write(features: Iterable[export.Feature], output: str | None) -> None:
    if output and output != "-":  # `-o -` wrote a file named "-", and nothing to the pipe
        export.write_file(features, output)
    else:
        export.write_collection(features, sys.stdout)


@click.group("export")
def export_group() -> None:
    """Export what the pipeline made, for a GIS tool or geojson.io."""


@export_group.group("geojson")
def geojson() -> None:
    """RFC 7946 GeoJSON (longitude, latitude), streamed; --json does not apply."""


@geojson.command("polylines")
@click.option("--device", metavar="ID", type=NonEmpty(), help="Only this device's polylines.")
@click.option("--since", metavar="TIME", help="Only polylines ending at or after TIME (ISO 8601).")
@click.option("--until", metavar="TIME", help="Only polylines starting at or before TIME.")
@output_option
@pass_app
def polylines(app: App, device: str | None, since: str | None, until: str | None,
              output: str | None) -> None:
    """One LineString per cached polyline: device, start and end time, point count, OSRM
    confidence, batch id."""
    start, end = export.parse_range(since, until)
    conn = app.connect(name="pipeline export", migrated=True)
    _write(export.polyline_features(conn, device=device, since=start, until=end), output)


@geojson.command("stops")
@click.option("--virtual", is_flag=True, help="Virtual stops (with their kind) instead of real.")
@bbox_option
@output_option
@pass_app
def stops(app: App, virtual: bool, bbox: str | None, output: str | None) -> None:
    """Real stops, or virtual stops with their kind, as Points."""
    box = export.BBox.parse(bbox) if bbox else None
    conn = app.connect(name="pipeline export", migrated=True)
    _write(export.stop_features(conn, virtual=virtual, bbox=box), output)


@geojson.command("graph")
@click.option("--version", metavar="V", type=NonEmpty(),
              help="This graph version instead of the active one.")
@bbox_option
@output_option
@pass_app
def graph(app: App, version: str | None, bbox: str | None, output: str | None) -> None:
    """The edges of the active (or --version) graph as LineStrings with weight (s) and mode;
    with --bbox, the edges with an endpoint inside."""
    box = export.BBox.parse(bbox) if bbox else None
    conn = app.connect(name="pipeline export", migrated=True)
    _write(export.graph_features(conn, graph_reader(app, conn), version=version, bbox=box),
           output)


def register(group: click.Group) -> None:
    group.add_command(export_group)
