"""`pipeline status` collection time with 10 M gps_points and a year of run history.

A throwaway database gets 10 M gps_points (1 M in quick mode) of 2 000 devices in daily
partitions, made with generate_series: 99 % processed history in 198 k completed batches, a
half-percent in 2 000 pending batches, a half-percent of new arrivals, every device waiting
with an open run, and 500 k stage_runs (a year of match-gps every minute). Then
``collect_status`` (every section, with Redis for the graph check) is timed, side by side with a
sequential ``count(*)`` over gps_points, the cost a status that scanned the table would pay.
Goal: < 300 ms.
"""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

import psycopg
import redis
from psycopg import sql

from pipeline_cli import db
from pipeline_cli.health import collect_status

FILL = """
INSERT INTO gps_points (device_id, recorded_at, latitude, longitude)
SELECT 'dev-' || (g %% 2000), timestamptz '2025-01-01' + make_interval(secs => g),
       60.1 + (g %% 1000) * 1e-4, 24.9 + (g %% 997) * 1e-4
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g
"""
PARTITIONS = """
SELECT gps_add_partition(d::date)
FROM generate_series(date '2025-01-01', date '2025-01-01' + %(days)s, interval '1 day') d
"""
# Per device, windows of %(window)s s: the first 99 completed (they read every point, their
# snapshot being taken after the fill), the next half window pending.
BATCHES = """
INSERT INTO processing_batches (device_id, start_time, end_time, status, coordinate_count,
                                processing_completed_at, points_snapshot)
SELECT 'dev-' || d, timestamptz '2025-01-01' + make_interval(secs => j * %(window)s),
       timestamptz '2025-01-01' + make_interval(
           secs => CASE WHEN j < 99 THEN (j + 1) * %(window)s - 1 ELSE %(pending_end)s END),
       CASE WHEN j < 99 THEN 'completed' ELSE 'pending' END,
       CASE WHEN j < 99 THEN %(window)s / 2000 ELSE %(window)s / 4000 END,
       CASE WHEN j < 99 THEN now() - make_interval(secs => j) END,
       CASE WHEN j < 99 THEN txid_current_snapshot() END
FROM generate_series(0, 1999) AS d, generate_series(0, 99) AS j
"""
RUNS = """
INSERT INTO stage_runs (run_id, stage, host, pid, backend_pid, backend_start, started_at,
                        finished_at, duration_ms, status, counts)
SELECT gen_random_uuid(),
       CASE WHEN g %% 100 = 0 THEN 'sync-odata' WHEN g %% 100 = 1 THEN 'gen-virtual'
            WHEN g %% 100 = 2 THEN 'build-graph' WHEN g %% 100 = 3 THEN 'run-all'
            ELSE 'match-gps' END,
       'bench', 1, 1, now(), now() - make_interval(secs => g * 60),
       now() - make_interval(secs => g * 60 - 5), 5000,
       CASE WHEN g %% 37 = 0 THEN 'failed' WHEN g %% 2 = 0 THEN 'noop' ELSE 'success' END,
       '{}'::jsonb
FROM generate_series(1, %(runs)s) AS g
"""


def _fill(url: str, points: int, runs: int) -> float:
    """99 % processed history, a half-percent in pending batches, a half-percent of arrivals
    the batcher has not looked at yet (the worst case for the exact count)."""
    window = points // 100
    pending_end = 99 * window + window // 2
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(PARTITIONS, {"days": points // 86400 + 1})
        conn.execute(FILL, {"lo": 1, "hi": pending_end})
        conn.execute(BATCHES, {"window": window, "pending_end": pending_end})
        conn.execute("UPDATE gps_batching_cursor SET seen = txid_current_snapshot()")
        conn.execute(FILL, {"lo": pending_end + 1, "hi": points})
        # Every device waits with an open run, as in a fleet that drives: status probes each
        # for points dated ahead.
        conn.execute("INSERT INTO gps_waiting_devices (device_id) "
                     "SELECT 'dev-' || g FROM generate_series(0, 1999) g")
        conn.execute(RUNS, {"runs": runs})
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def _time(fn: Any, repeat: int) -> float:
    fn()  # warm the caches, as a status every 5 minutes runs warm
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def run(quick: bool = False) -> list[dict[str, Any]]:
    from devtools.services import LocalServices

    points = 1_000_000 if quick else 10_000_000
    runs = 100_000 if quick else 500_000
    services = LocalServices()
    try:
        admin = services.postgres()
        name = f"bench_status_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = psycopg.conninfo.make_conninfo(admin, dbname=name)
        client = redis.Redis.from_url(services.redis())
        try:
            with db.connect(url, autocommit=True) as conn:
                db.migrate(conn)
            fill_s = _fill(url, points, runs)
            with db.connect(url, autocommit=True) as conn:
                report = collect_status(conn, redis=lambda seconds: client,
                                        redis_prefix=f"bench-{name}")
                errors = {k: v["error"] for k, v in report.sections.items() if "error" in v}
                status_s = _time(lambda: collect_status(
                    conn, redis=lambda seconds: client, redis_prefix=f"bench-{name}"),
                    9 if quick else 15)
                scan_s = _time(lambda: conn.execute(
                    "SELECT count(*) FROM gps_points").fetchone(), 3)
            gps = report.sections.get("gps", {})
        finally:
            client.close()
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))
    finally:
        services.stop_all()
    detail = (f"{points:,} gps_points in daily partitions ({gps.get('unprocessed_points')} "
              f"unprocessed counted exactly), 200 k batches, {runs:,} stage_runs; "
              f"median of warm runs; fill took "
              f"{fill_s:.0f} s" + (f"; section errors: {errors}" if errors else ""))
    return [
        {"name": "status: collect_status wall time", "value": round(status_s * 1000, 1),
         "goal": "< 300 ms", "unit": "ms", "detail": detail},
        {"name": "status: collect_status ÷ one sequential count(*) of gps_points",
         "value": round(status_s / scan_s, 4), "goal": "≪ 1 (indexed, no scan)", "unit": "ratio",
         "detail": f"count(*) took {scan_s * 1000:.0f} ms"},
    ]


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
