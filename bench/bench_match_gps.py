"""match-gps throughput as a share of raw OSRM throughput (goal: >= 0.85 on real roads).

Both sides use the same osrm-routed, the same synthetic traces (routed, sampled every 1-3 s,
5-8 m noise) and the same number of requests in flight, measured one after the other in one
run:

- raw: the traces' ``/match`` requests (the same <= 100-point chunks the pipeline sends) from
  N threads sharing one HTTP session, nothing else;
- pipeline: the match-gps stage on a scratch database holding those traces as GPS points in
  their daily partition: batching, claiming, matching, stitching and the completing
  transaction.

The goal is on the Helsinki extract (real roads); full mode also publishes the figure on a
synthetic grid city fed to osrm-extract, with no goal of its own.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import scratch_database
from devtools import traces
from devtools.services import LocalServices
from pipeline_cli import db
from pipeline_cli.adapters.osrm import OsrmClient, OsrmNoMatch
from pipeline_cli.db import Database
from pipeline_cli.gps import partitions, stitching
from pipeline_cli.runner import StageRunner
from pipeline_cli.settings import MatchSettings
from pipeline_cli.stages import match_gps as stage

GOAL = 0.85
CONCURRENCY = 4


def grid_city_osm(path: Path, size: int, spacing_m: float = 120.0,
                  origin: tuple[float, float] = (60.10, 24.80)
                  ) -> tuple[float, float, float, float]:
    """Write an OSM XML grid city of ``size`` x ``size`` junctions; returns its bbox."""
    lat0, lon0 = origin
    dlat = spacing_m / 111_320.0
    dlon = spacing_m / (111_320.0 * 0.4985)  # cos(60.1 deg)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', '<osm version="0.6" generator="bench">']
    for r in range(size):
        for c in range(size):
            lines.append(f'<node id="{r * size + c + 1}" version="1" lat="{lat0 + r * dlat:.7f}"'
                         f' lon="{lon0 + c * dlon:.7f}"/>')
    way = 1
    for r in range(size):  # east-west streets, every 4th a primary road
        refs = "".join(f'<nd ref="{r * size + c + 1}"/>' for c in range(size))
        kind = "primary" if r % 4 == 0 else "residential"
        lines.append(f'<way id="{way}" version="1">{refs}<tag k="highway" v="{kind}"/></way>')
        way += 1
    for c in range(size):
        refs = "".join(f'<nd ref="{r * size + c + 1}"/>' for r in range(size))
        kind = "primary" if c % 4 == 0 else "residential"
        lines.append(f'<way id="{way}" version="1">{refs}<tag k="highway" v="{kind}"/></way>')
        way += 1
    lines.append("</osm>")
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    margin = 0.1 * (size - 1)
    return (lat0 + margin * dlat, lon0 + margin * dlon,
            lat0 + (size - 1 - margin) * dlat, lon0 + (size - 1 - margin) * dlon)


def _raw(url: str, trace_list: list[traces.Trace], settings: MatchSettings) -> tuple[float, int]:
    """Seconds and points for the traces' chunked /match requests from CONCURRENCY threads."""
    requests = []
    for trace in trace_list:
        kept, stamps = stitching.integer_timestamps(trace.offsets)
        points = [trace.points[k] for k in kept]
        absolute = [1714550400 + s for s in stamps]
        for a, b in stitching.chunk_plan(len(points), settings.chunk_size, settings.chunk_overlap):
            requests.append((points[a:b], absolute[a:b]))
    with OsrmClient(url, pool_size=CONCURRENCY) as client:
        def one(req: tuple[list[tuple[float, float]], list[int]]) -> None:
            with contextlib.suppress(OsrmNoMatch):  # answered: it counts like any other
                client.match(req[0], req[1], settings.radius_m)

        t = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(one, requests))
        elapsed = time.perf_counter() - t
    return elapsed, sum(len(tr.points) for tr in trace_list)


def _pipeline(admin: str, url: str, trace_list: list[traces.Trace],
              settings: MatchSettings) -> tuple[float, dict[str, Any]]:
    with scratch_database(admin) as dsn:
        with db.connect(dsn, autocommit=True) as conn:
            rows = []
            for i, trace in enumerate(trace_list):
                rows += trace.rows(f"bench-{i}")
            traces.insert_points(conn, rows)
            # The traces are dated 2024, so they land in the default partition. Live points
            # find their day's partition made ahead; the one-time move is not matching.
            partitions.ensure(conn)
        with OsrmClient(url, pool_size=CONCURRENCY) as client:
            t = time.perf_counter()
            record = StageRunner(Database(dsn)).run("match-gps", lambda ctx: stage.match_gps(
                Database(dsn), client, settings, ctx, concurrency=CONCURRENCY))
            elapsed = time.perf_counter() - t
    if record.error:
        raise RuntimeError(record.error)
    return elapsed, record.counts


def _measure(url: str, admin: str, network: str, trace_list: list[traces.Trace],
             settings: MatchSettings, goal: str) -> dict[str, Any]:
    # Alternate the two sides and keep each one's best run: the machine is shared, and the
    # best run is the one least disturbed by others.
    raw_runs, pipe_runs = [], []
    for _ in range(2):
        raw_s, points = _raw(url, trace_list, settings)
        raw_runs.append(raw_s)
        pipe_s, counts = _pipeline(admin, url, trace_list, settings)
        pipe_runs.append(pipe_s)
    raw_pps = points / min(raw_runs)
    pipe_pps = counts["points_processed"] / min(pipe_runs)
    detail = (f"{len(trace_list)} traces, {points:,} points on the {network}; concurrency "
              f"{CONCURRENCY}; pipeline {pipe_pps:,.0f} points/s ({counts['batches_completed']} "
              f"batches, {counts['osrm_requests']} requests, {min(pipe_runs):.2f} s incl. "
              f"batching) vs raw /match {raw_pps:,.0f} points/s (best of 2 alternating runs "
              "each)")
    return {"name": f"match-gps points/s ÷ raw OSRM /match points/s, {network}",
            "value": round(pipe_pps / raw_pps, 3), "goal": goal, "unit": "ratio",
            "detail": detail}


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Real roads (the Helsinki extract) against the goal; in full mode also a synthetic grid
    city, published without a goal of its own."""
    settings = MatchSettings()
    services = LocalServices()
    figures = []
    try:
        admin = services.postgres()
        url = services.osrm()
        with OsrmClient(url) as client:
            trace_list = traces.make_traces(client, 300, seed=5, bbox=traces.HELSINKI_BBOX,
                                            min_length_m=600.0)
        figures.append(_measure(url, admin, "Helsinki extract", trace_list, settings,
                                f">= {GOAL:.2f}"))
        if not quick:
            size = 60
            osm = services.state_dir / "bench" / f"grid-city-{size}.osm"
            bbox = grid_city_osm(osm, size)
            url = services.start_osrm_routed(services.osrm_dataset(osm, f"grid{size}"))
            with OsrmClient(url) as client:
                trace_list = traces.make_traces(client, 600, seed=5, bbox=bbox,
                                                min_length_m=600.0)
            figures.append(_measure(url, admin, f"synthetic {size}x{size} grid city",
                                    trace_list, settings, "(info)"))
    finally:
        services.stop_all()
    return figures


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
