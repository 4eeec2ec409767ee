"""Concurrency: 8 racing invocations of each singleton stage, and match-gps workers sharing
one queue; real processes, real PostgreSQL locks.

The 8 processes of a race import the CLI first and are then released at one instant
(:func:`run_released`), so they really race for the lock. How fast a loser exits is a speed
goal, measured by bench/bench_reliability.py, not asserted here: these machines are shared.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from devtools import traces
from devtools.odata_server import Fault
from pipeline_cli.adapters.osrm import OsrmClient
from tests.support.clirunner import Cli
from tests.support.proxy import CountingHttpProxy
from tests.support.reliability import (
    ProcResult,
    Sandbox,
    check_gps,
    run_concurrently,
    run_released,
)

SandboxFactory = Callable[..., Sandbox]
RACERS = 8

pytestmark = pytest.mark.s3


def prepare(sb: Sandbox, stage: str) -> None:
    """Bring the sandbox to the point where ``stage`` has work to do (in-process, fast)."""
    cli = Cli(sb.env)
    order = ["sync-odata", "gen-virtual", "build-graph"]
    if stage in order:
        for step in order[:order.index(stage)]:
            res = cli(step, "--json")
            assert res.exit_code == 0, res.output
    # The winner must hold the lock well past the moment the losers try it; an OData page
    # answering late does that for the stages that read OData.
    if stage in ("sync-odata", "run-all"):
        assert sb.odata is not None
        sb.odata.add_fault(Fault.delay(1.5), times=1)


def count(sb: Sandbox, table: str) -> int:
    row = sb.connect().execute(f"SELECT count(*) AS n FROM {table}").fetchone()  # noqa: S608
    assert row is not None
    return int(row["n"])


def summary(results: list[ProcResult]) -> str:
    return "\n".join(r.describe() for r in results)


@pytest.mark.parametrize("stage", ["sync-odata", "gen-virtual", "build-graph", "run-all"])
def test_eight_racers_one_winner(make_sandbox: SandboxFactory, stage: str) -> None:
    sb = make_sandbox()
    prepare(sb, stage)
    results = run_released([[stage, "--json"]] * RACERS, sb.env)
    winners = [r for r in results if r.exit_code == 0]
    losers = [r for r in results if r.exit_code == 75]
    assert len(winners) == 1 and len(losers) == RACERS - 1, summary(results)
    assert winners[0].json()["status"] == "success", winners[0].stdout
    for loser in losers:
        out = loser.json()
        assert out["status"] == "busy" and "already running" in out["error"], loser.stdout
        assert "Traceback" not in loser.stderr
    # Exactly one version of everything the stage makes.
    if stage in ("sync-odata", "run-all"):
        assert count(sb, "datasets") == 1
    if stage in ("gen-virtual", "run-all"):
        assert count(sb, "virtual_generations") == 1
    if stage in ("build-graph", "run-all"):
        assert count(sb, "graph_versions") == 1
    assert sb.check() == []
    runs = sb.connect().execute(
        "SELECT status, count(*) AS n FROM stage_runs WHERE stage = %s GROUP BY 1",
        (stage,)).fetchall()
    assert {r["status"]: r["n"] for r in runs} == {"success": 1}  # losers record nothing


# ------------------------------------------------------------------ match-gps, many workers

OLD = datetime(2024, 5, 1, 8, tzinfo=UTC)


def gps_rows(pool: list[traces.Trace], devices: int, per_device: int, seed: int = 3
             ) -> list[tuple[str, datetime, float, float]]:
    """``devices * per_device`` batches of 4-12 points each (one OSRM chunk per batch),
    one hour apart so each run of points is its own batch."""
    rng = random.Random(seed)
    rows: list[tuple[str, datetime, float, float]] = []
    for d in range(devices):
        for b in range(per_device):
            trace = pool[rng.randrange(len(pool))]
            n = rng.randint(4, 12)
            start = OLD + timedelta(hours=b)
            first = rng.randrange(max(1, len(trace.points) - n))
            base = trace.offsets[first]
            for p, off in zip(trace.points[first:first + n], trace.offsets[first:first + n],
                              strict=True):
                rows.append((f"veh-{d:04d}", start + timedelta(seconds=off - base), p[0], p[1]))
    return rows


@pytest.mark.osrm
def test_match_gps_workers_complete_every_batch_exactly_once(
        make_sandbox: SandboxFactory, osrm_url: str) -> None:
    with OsrmClient(osrm_url) as client:
        pool = traces.make_traces(client, 12, seed=5, min_points=30)
    with CountingHttpProxy(osrm_url) as proxy:
        sb = make_sandbox(osrm_url=proxy.url)
        conn = sb.connect()
        rows = gps_rows(pool, devices=200, per_device=10)
        traces.insert_points(conn, rows)
        results = run_concurrently([["match-gps", "--json", "--concurrency", "2"]] * 4, sb.env,
                                   timeout=600)
        assert all(r.exit_code == 0 for r in results), summary(results)
        outs: list[dict[str, Any]] = [r.json() for r in results]
        states = {r["status"]: r["n"] for r in conn.execute(
            "SELECT status, count(*) AS n FROM processing_batches GROUP BY 1").fetchall()}
        assert states == {"completed": 2000}, states
        done = sum(o["counts"]["batches_completed"] for o in outs)
        assert done == 2000, [o["counts"] for o in outs]  # each batch completed by one worker
        assert sum(o["counts"]["batches_created"] for o in outs) == 2000
        assert all(o["counts"]["batches_lease_lost"] == 0 for o in outs)
        points = conn.execute("SELECT count(*) AS n, count(*) FILTER (WHERE processed) AS p, "
                              "count(DISTINCT batch_id) AS b FROM gps_point_status").fetchone()
        assert points == {"n": len(rows), "p": len(rows), "b": 2000}
        assert sum(o["counts"]["points_processed"] for o in outs) == len(rows)
        calls = conn.execute("SELECT sum(osrm_calls) AS n FROM processing_batches").fetchone()
        assert calls is not None
        # One /match request per batch (each fits one chunk), as OSRM itself saw them.
        assert proxy.count("/match") == calls["n"] == 2000
        assert sum(o["counts"]["osrm_requests"] for o in outs) == 2000
        assert check_gps(conn) == []
