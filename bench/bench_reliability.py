"""The larger reliability runs, reported as pass counts next to their goals:

- kill -9 at random moments, 50 trials per stage (sync-odata, gen-virtual, build-graph,
  match-gps, run-all), each checking every invariant, ``crashed`` in status, and recovery;
- 10 000 GPS batches over 4 concurrent ``pipeline match-gps`` processes: each batch completed
  exactly once, no point lost, OSRM requests (counted by a proxy) equal to the chunks sent;
- 8 racing ``pipeline build-graph`` processes: the losers' lock path, from their own start.

The same harness as tests/reliability (tests.support.reliability), real servers only.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

from devtools.services import LocalServices
from tests.support.proxy import CountingHttpProxy
from tests.support.reliability import (
    ForkServer,
    Sandbox,
    add_gps_work,
    check_gps,
    kill_trials,
    password_role,
    run_concurrently,
    run_released,
    small_network,
)

STAGES = ("sync-odata", "gen-virtual", "build-graph", "match-gps", "run-all")


def _figure(name: str, value: float, goal: str, unit: str, detail: str) -> dict[str, Any]:
    return {"name": name, "value": value, "goal": goal, "unit": unit, "detail": detail}


def run(quick: bool = False) -> list[dict[str, Any]]:
    trials = 5 if quick else 50
    batches = 400 if quick else 10_000
    figures: list[dict[str, Any]] = []
    services = LocalServices()
    try:
        admin = services.postgres()
        osrm = services.osrm()
        with password_role(admin) as (role, password, template), \
                tempfile.TemporaryDirectory(prefix="bench-rel-") as tmp, ForkServer(tmp) as fs:

            def sandbox(**kw: Any) -> Sandbox:
                return Sandbox(services, template=template, admin_url=admin, role=role,
                               role_password=password, **kw)

            for i, stage in enumerate(STAGES):
                with sandbox(odata_rows=small_network(), osrm_url=osrm) as sb:
                    sb.env["PIPELINE_MATCH_LEASE_SECONDS"] = "1"
                    started = time.monotonic()
                    rep = kill_trials(sb, fs, stage, trials, seed=1000 + i)
                    figures.append(_figure(
                        f"kill -9 {stage}: trials with every invariant held", rep.passed,
                        f"{trials} of {trials}", "trials",
                        f"{rep.killed} killed mid-run (status crashed), {rep.finished_first} "
                        f"finished first, {rep.recovered} next runs ok, "
                        f"{len(rep.problems)} problems"
                        + (f" (first: {rep.problems[0][:120]})" if rep.problems else "")
                        + f"; {time.monotonic() - started:.0f} s"))

            with CountingHttpProxy(osrm) as proxy, sandbox(osrm_url=proxy.url) as sb:
                conn = sb.connect()
                points = add_gps_work(conn, 0, batches=batches, points=8, prefix="bench")
                started = time.monotonic()
                results = run_concurrently([["match-gps", "--json", "--concurrency", "2"]] * 4,
                                           sb.env, timeout=3600)
                wall = time.monotonic() - started
                outs = [r.json() for r in results if r.exit_code == 0]
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'completed') AS done, "
                    "coalesce(sum(osrm_calls), 0) AS calls FROM processing_batches").fetchone()
                assert row is not None
                processed = conn.execute(
                    "SELECT count(*) FILTER (WHERE processed) AS n FROM gps_point_status"
                ).fetchone()
                assert processed is not None
                by_workers = sum(o["counts"]["batches_completed"] for o in outs)
                problems = check_gps(conn)
                exact = row["done"] if (by_workers == row["done"] == batches and not problems
                                        and processed["n"] == points) else 0
                figures.append(_figure(
                    f"{batches} batches over 4 match-gps processes: completed exactly once",
                    exact, f"{batches}", "batches",
                    f"exits {[r.exit_code for r in results]}; workers report {by_workers} "
                    f"completions; {processed['n']}/{points} points processed; OSRM saw "
                    f"{proxy.count('/match')} /match requests for {row['calls']} chunks; "
                    f"{points / wall:,.0f} points/s in {wall:.0f} s; "
                    f"{len(problems)} invariant problems"))

            with sandbox(odata_rows=small_network()) as sb:
                for step in ("sync-odata", "gen-virtual"):
                    fs.run([step], sb.env)
                released = run_released([["build-graph", "--json"]] * 8, sb.env)
                losers = [r.elapsed for r in released if r.exit_code == 75]
                sb.start_odata(small_network(seed=1))
                fs.run(["sync-odata"], sb.env)
                fs.run(["gen-virtual"], sb.env)
                spawned = run_concurrently([["build-graph", "--json"]] * 8, sb.env)
                from_spawn = [r.elapsed for r in spawned if r.exit_code == 75]
                figures.append(_figure(
                    "8 racing build-graph: slowest loser's exit 75, from its command's start",
                    max(losers) if losers else float("nan"), "< 1 s", "s",
                    f"{len(losers)} losers, median {statistics.median(losers):.3f} s; as "
                    f"installed scripts from spawn (Python start-up and exit included): "
                    f"slowest {max(from_spawn):.2f} s, {len(from_spawn)} losers"
                    if losers and from_spawn else "no losers"))
    finally:
        services.stop_all()
    return figures
