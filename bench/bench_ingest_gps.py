"""GPS writes as a multiple of PostgreSQL's own floor, measured side by side in one run.

- ingest-gps: the whole ``pipeline ingest-gps`` command on a 1 M-point CSV (100 k in quick
  mode) ÷ a bare ``\\copy`` of the same file by psql into a table with the same primary key
  (goal <= 2.5).
- listener: the listener's plain ``INSERT (device_id, recorded_at, latitude, longitude)`` of
  300 k new points (30 k quick), one statement per point, pipelined by one psycopg session,
  into gps_points ÷ the same INSERTs into a bare table with the same primary key
  (goal <= 1.75).

Runs alternate (bare, pipeline, bare, pipeline, ...) and the best of each side is kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench import scratch_database
from devtools.services import LocalServices

BARE = """
CREATE TABLE bare_points (
    device_id   text             NOT NULL,
    recorded_at timestamptz      NOT NULL,
    latitude    double precision NOT NULL,
    longitude   double precision NOT NULL,
    PRIMARY KEY (device_id, recorded_at)
)
"""
LISTENER = "INSERT INTO {} (device_id, recorded_at, latitude, longitude) VALUES (%s, %s, %s, %s)"
ROUNDS = 2


def _csv(path: Path, points: int) -> None:
    """``points`` rows over 1 000 devices, one per second each, ISO times, as a file."""
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) \
        - timedelta(days=1)
    with path.open("w") as out:
        out.write("device_id,recorded_at,latitude,longitude\n")
        for i in range(points):
            t = start + timedelta(seconds=i // 1000)
            out.write(f"car-{i % 1000},{t:%Y-%m-%dT%H:%M:%SZ},{60.1 + (i % 997) * 1e-4:.6f},"
                      f"{24.9 + (i % 991) * 1e-4:.6f}\n")


def _timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _listener(url: str, table: str, rows: list[tuple[Any, ...]]) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        with conn.cursor() as cur:
            cur.executemany(LISTENER.format(table), rows)
        return time.perf_counter() - started


def run(quick: bool = False) -> list[dict[str, Any]]:
    points = 100_000 if quick else 1_000_000
    inserts = 30_000 if quick else 300_000
    services = LocalServices()
    try:
        admin = services.postgres()
        with scratch_database(admin) as url, tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "points.csv"
            _csv(path, points)
            env = {**os.environ, "PIPELINE_DATABASE_URL": url}
            pipeline = str(Path(sys.executable).with_name("pipeline"))
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(BARE)
            bare_s, ingest_s = [], []
            for _ in range(ROUNDS):
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("TRUNCATE bare_points, gps_points")
                bare_s.append(_timed(["psql", url, "-q", "-c",
                                      f"\\copy bare_points FROM '{path}' WITH (FORMAT csv, "
                                      "HEADER)"], env))
                ingest_s.append(_timed([pipeline, "-q", "ingest-gps", str(path)], env))
            with psycopg.connect(url, autocommit=True) as conn:
                loaded = conn.execute("SELECT count(*) FROM gps_points").fetchone()
                assert loaded is not None and loaded[0] == points, loaded
            now = datetime.now(UTC)
            rows = [(f"bus-{i % 500}", now - timedelta(seconds=i // 500 + 1),
                     60.1 + (i % 97) * 1e-4, 24.9 + (i % 89) * 1e-4) for i in range(inserts)]
            bare_ins, listener_ins = [], []
            for _ in range(ROUNDS):
                with psycopg.connect(url, autocommit=True) as conn:
                    # No ANALYZE of the empty tables: with statistics saying "empty", the
                    # duplicate check of each INSERT would plan a sequential scan.
                    conn.execute("TRUNCATE bare_points, gps_points")
                bare_ins.append(_listener(url, "bare_points", rows))
                listener_ins.append(_listener(url, "gps_points", rows))
            # The contract: a repeated point is stored once, without an error.
            _listener(url, "gps_points", rows[:10])
            with psycopg.connect(url, autocommit=True) as conn:
                stored = conn.execute("SELECT count(*) FROM gps_points").fetchone()
                assert stored is not None and stored[0] == inserts, stored
    finally:
        services.stop_all()
    b, i = min(bare_s), min(ingest_s)
    bl, li = min(bare_ins), min(listener_ins)
    runs = ", ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(bare_s, ingest_s, strict=True))
    lruns = ", ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(bare_ins, listener_ins, strict=True))
    return [
        {"name": "ingest-gps of a CSV ÷ bare \\copy into a table with the same key",
         "value": round(i / b, 2), "goal": "<= 2.5", "unit": "ratio",
         "detail": f"{points:,} points, 1 000 devices; whole command {i:.2f} s vs psql \\copy "
                   f"{b:.2f} s (best of {ROUNDS}; bare/ingest s per round: {runs})"},
        {"name": "listener INSERT into gps_points ÷ the same INSERT into a bare table",
         "value": round(li / bl, 2), "goal": "<= 1.75", "unit": "ratio",
         "detail": f"{inserts:,} single-row INSERTs pipelined by one session; {li:.2f} s vs "
                   f"{bl:.2f} s (best of {ROUNDS}; bare/gps_points s per round: {lruns})"},
    ]


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
