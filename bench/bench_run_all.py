"""`pipeline run-all` on the demo data: the first run, then a rerun with nothing new.

The demo setup (sample OData network of 400 stops served over HTTP, S3, Redis, osrm-routed on
the Helsinki extract, 4 GPS traces) in a throwaway database, Redis prefix and bucket. Each figure
is the wall time of the installed ``pipeline`` as cron runs it (interpreter start included),
median of 3. Side by side: ``pipeline sync-odata`` alone on the unchanged feed, the floor a
chained rerun cannot beat (run-all always asks the feed whether it changed).
Goal: the noop rerun < 2 s.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from devtools.cleanup import drop_prefix
from pipeline_cli import db

EXE = str(Path(sys.executable).with_name("pipeline"))


def _pipeline(env: dict[str, str], *args: str) -> tuple[float, dict[str, Any]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    t = time.perf_counter()
    proc = subprocess.run([EXE, *args], env={**clean, **env}, capture_output=True, text=True,
                          timeout=600)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"pipeline {' '.join(args)} exited {proc.returncode}: "
                           f"{proc.stderr.strip().splitlines()[-1:]}")
    return wall, json.loads(proc.stdout) if "--json" in args else {}


def run(quick: bool = False) -> list[dict[str, Any]]:
    from devtools import traces
    from devtools.odata_server import ODataServer, sample_network
    from devtools.services import LocalServices
    from pipeline_cli.adapters.osrm import OsrmClient

    repeat = 3
    services = LocalServices()
    name = f"bench_runall_{uuid.uuid4().hex[:8]}"
    admin = services.postgres()
    try:
        s3, osrm = services.s3(), services.osrm()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = psycopg.conninfo.make_conninfo(admin, dbname=name)
        with db.connect(url, autocommit=True) as conn:
            db.migrate(conn)
            with OsrmClient(osrm) as client:
                made = traces.make_traces(client, 4, seed=7, min_points=60)
            traces.insert_points(conn, [r for i, t in enumerate(made)
                                        for r in t.rows(f"bus-{i}")])
        with ODataServer(sample_network(400), page_size=500) as feed:
            env = {
                "PIPELINE_DATABASE_URL": url, "PIPELINE_REDIS_URL": services.redis(),
                "PIPELINE_REDIS_PREFIX": name, "PIPELINE_S3_ENDPOINT": s3.endpoint,
                "PIPELINE_S3_ACCESS_KEY": s3.access_key, "PIPELINE_S3_SECRET_KEY": s3.secret_key,
                "PIPELINE_S3_SECURE": "true" if s3.secure else "false",
                "PIPELINE_S3_BUCKET": name.replace("_", "-"), "PIPELINE_OSRM_URL": osrm,
                "PIPELINE_ODATA_URL": feed.url,
            }
            first, first_obj = _pipeline(env, "-q", "run-all", "--json")
            reruns, sync_alone, inner = [], [], []
            for _ in range(repeat):
                wall, obj = _pipeline(env, "-q", "run-all", "--json")
                assert obj["status"] == "noop", obj
                reruns.append(wall)
                inner.append(obj["duration_ms"])
                sync_alone.append(_pipeline(env, "-q", "sync-odata")[0])
            startup = statistics.median(_pipeline(env, "--version")[0] for _ in range(repeat))
        rerun, floor = statistics.median(reruns), statistics.median(sync_alone)
        _cleanup_redis(services.redis(), name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
        services.stop_all()
    statuses = {s: r["status"] for s, r in first_obj["stages"].items()}
    return [
        {"name": "run-all: rerun with nothing new, run duration",
         "value": round(statistics.median(inner) / 1000, 3), "goal": "< 2 s", "unit": "s",
         "detail": "all noop; duration_ms of the run-all run (sync-odata asks the 400-stop "
                   "demo feed, then 3 indexed probes); 4 GPS traces already matched"},
        {"name": "run-all: rerun with nothing new, CLI wall", "value": round(rerun, 3),
         "goal": "< 2 s", "unit": "s",
         "detail": f"the installed script as cron runs it; of which {startup:.2f} s is "
                   "interpreter start and imports (`pipeline --version`)"},
        {"name": "run-all noop rerun ÷ sync-odata alone on the same unchanged feed (CLI wall)",
         "value": round(rerun / floor, 3), "goal": "≈ 1 (chaining adds only probes)",
         "unit": "ratio", "detail": f"sync-odata alone {floor:.3f} s"},
        {"name": "run-all: first run on the demo data (CLI wall)", "value": round(first, 3),
         "goal": "(reference)", "unit": "s", "detail": f"stages: {statuses}"},
    ]


def _cleanup_redis(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        drop_prefix(client, prefix)
    finally:
        client.close()


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
