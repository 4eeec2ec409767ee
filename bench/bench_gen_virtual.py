"""gen-virtual at 1 M virtual stops plus their kNN routes (goal: < 20 s on 2 cores).

A synthetic world of 30 k cities' stops, 3 k airports and 20 k loose stops with a 22.5 km main
grid gives about 1 M virtual stops and 4-5 M directed routes. Figures, measured in one run:

- ``plan``: grids, threshold filtering, kNN routes and flights in memory (the spatial work);
  also as a ratio to a bare cKDTree build + query over the same points (the irreducible kNN).
- full mode only: ``plan + COPY text`` (the CPU side of writing) and the whole stage against
  local PostgreSQL and S3 (lock, TRUNCATE, COPY into the indexed tables, ANALYZE, generation
  row, S3 backup, commit): a first generation and a ``--force`` regeneration, side by side;
- full mode only: the PostgreSQL floor of that write, on the same scratch database: the same
  rows (stops, routes and the frequency row; ``virtual_flights`` is a view) COPYed from plain
  files into bare tables in one transaction, then the same four indexes built; no text
  formatting, no backup. The whole stage can only be as fast as this.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from psycopg import sql
from scipy.spatial import cKDTree

from bench import scratch_database
from pipeline_cli import db, geo
from pipeline_cli.db import Database
from pipeline_cli.settings import VirtualSettings
from pipeline_cli.stages import gen_virtual as gv

GOAL_S = 20.0


def synthetic_world(scale: float = 1.0, seed: int = 3) -> gv.RealStops:
    rng = np.random.default_rng(seed)

    def lats(n: int) -> geo.FloatArray:
        lo, hi = np.sin(np.radians(-55)), np.sin(np.radians(70))
        return np.degrees(np.arcsin(rng.uniform(lo, hi, n)))

    n_city, per_city = int(3000 * scale), 10
    n_air, n_loose = int(3000 * scale), int(20000 * scale)
    clat, clon = lats(n_city), rng.uniform(-180, 180, n_city)
    lat = np.concatenate((np.repeat(clat, per_city) + rng.normal(0, 0.05, n_city * per_city),
                          lats(n_air), lats(n_loose)))
    lon = np.concatenate((np.repeat(clon, per_city) + rng.normal(0, 0.08, n_city * per_city),
                          rng.uniform(-180, 180, n_air + n_loose)))
    lon = np.mod(lon + 180, 360) - 180
    city = [f"city-{i}" for i in np.repeat(np.arange(n_city), per_city).tolist()]
    city += [""] * (n_air + n_loose)
    airport = np.zeros(lat.size, dtype=bool)
    airport[n_city * per_city:n_city * per_city + n_air] = True
    return gv.RealStops([f"S{i:07d}" for i in range(lat.size)], lat, lon, airport, city)


def _bare_knn(plan: gv.VirtualPlan, k: int) -> float:
    """cKDTree build + (k+1)-query over the same real + virtual unit vectors, nothing else."""
    xyz = np.vstack((geo.unit_vectors(plan.real.lat, plan.real.lon),
                     geo.unit_vectors(plan.lat, plan.lon)))
    t = time.perf_counter()
    tree = cKDTree(xyz, balanced_tree=False, compact_nodes=False)
    tree.query(xyz[plan.real.size:], k=k + 1, workers=-1)
    return time.perf_counter() - t


# The indexes of sql/003_virtual.sql and sql/012_virtual_frequency.sql, on the floor's tables.
_FLOOR_INDEXES = (
    "ALTER TABLE floor_virtual_stops ADD PRIMARY KEY (id)",
    "ALTER TABLE floor_virtual_routes ADD PRIMARY KEY (id)",
    "CREATE INDEX ON floor_virtual_routes (from_stop_id)",
    "ALTER TABLE floor_virtual_frequencies ADD PRIMARY KEY (generation_id, mode)",
)


def _write_text(plan: gv.VirtualPlan, settings: VirtualSettings, folder: Path
                ) -> list[tuple[str, Path]]:
    """The stage's own COPY text of every table, in plain files."""
    out = []
    for table, lines in gv.copy_text(plan, "ds-v1", settings, 1):
        path = folder / f"{table}.tsv"
        with path.open("wb") as fh:
            for chunk in lines:
                fh.write(chunk.encode())
        out.append((table, path))
    return out


def _postgres_floor(url: str, files: list[tuple[str, Path]]) -> tuple[float, float]:
    """Seconds of COPYing the files into bare tables (made LIKE the live ones: defaults and
    CHECKs, no indexes) with FREEZE, and of building the indexes, in one transaction."""
    with db.connect(url) as conn:
        t = time.perf_counter()
        for table, path in files:
            floor = sql.Identifier(f"floor_{table}")
            conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING "
                                 "CONSTRAINTS)").format(floor, sql.Identifier(table)))
            cols = sql.SQL(", ").join(map(sql.Identifier, dict(gv.TABLES)[table]))
            with conn.cursor() as cur, cur.copy(sql.SQL(
                    "COPY {} ({}) FROM STDIN WITH (FREEZE)").format(floor, cols)) as copy, \
                    path.open("rb") as fh:
                while block := fh.read(1 << 20):
                    copy.write(block)
        copy_s = time.perf_counter() - t
        t = time.perf_counter()
        for statement in _FLOOR_INDEXES:
            conn.execute(statement)
        index_s = time.perf_counter() - t
        conn.commit()
        for table, _path in files:
            conn.execute(sql.SQL("DROP TABLE {}").format(
                sql.Identifier(f"floor_{table}")))
        conn.commit()
    return copy_s, index_s


def _end_to_end(real: gv.RealStops, settings: VirtualSettings, plan: gv.VirtualPlan
                ) -> tuple[float, float, tuple[float, float], dict[str, Any]]:
    """The whole stage on a scratch database and bucket of the local services: seconds of
    a first generation and of a ``--force`` regeneration; the PostgreSQL floor (COPY and
    index seconds, between the two); and the counts."""
    from devtools.cleanup import drop_bucket
    from devtools.services import LocalServices
    from pipeline_cli.adapters.backups import BackupStore
    from pipeline_cli.runner import StageRunner

    services = LocalServices()
    try:
        admin = services.postgres()
        s3 = services.s3()
        bucket = f"bench-gv-{uuid.uuid4().hex[:8]}"
        store = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, bucket,
                                    secure=s3.secure, region=s3.region, timeout=120)
        try:
            with scratch_database(admin) as url:
                with db.connect(url, autocommit=True) as conn:
                    conn.execute("INSERT INTO datasets (version, seq, hash, backup_prefix, "
                                 "active) VALUES ('ds-v1', 1, 'bench', 'datasets/ds-v1/', true)")
                    with conn.cursor() as cur, cur.copy(
                            "COPY stops (id, latitude, longitude, is_airport, city) FROM STDIN"
                    ) as cp:
                        for row in zip(real.ids, real.lat.tolist(), real.lon.tolist(),
                                       real.is_airport.tolist(), real.city, strict=True):
                            cp.write_row(row)
                walls: list[float] = []
                for force in (False, True):
                    if force:
                        with tempfile.TemporaryDirectory(prefix="bench-gv-") as tmp:
                            floor = _postgres_floor(url, _write_text(plan, settings,
                                                                     Path(tmp)))
                    t = time.perf_counter()
                    rec = StageRunner(Database(url)).run("gen-virtual", lambda ctx: gv.generate(
                        Database(url), store, settings, ctx, force=force))  # noqa: B023
                    walls.append(time.perf_counter() - t)
                    if rec.error:
                        raise RuntimeError(rec.error)
            return walls[0], walls[1], floor, rec.counts
        finally:
            drop_bucket(store.client, bucket)
    finally:
        services.stop_all()


def run(quick: bool = False) -> list[dict[str, Any]]:
    settings = VirtualSettings(main_spacing_km=22.5)
    real = synthetic_world()
    t = time.perf_counter()
    plan = gv.plan_virtual(real, settings, "ds-v1")
    plan_s = time.perf_counter() - t
    knn_s = _bare_knn(plan, settings.k)
    c = plan.counts()
    scale = (f"{c['virtual_stops']:,} virtual stops ({c['by_kind']['MAIN_GRID']:,} main, "
             f"{c['by_kind']['CITY_GRID']:,} city, {c['by_kind']['AIRPORT_GRID']:,} airport), "
             f"{c['virtual_routes']:,} routes, {real.size:,} real stops")
    out = [
        {"name": "gen-virtual plan, 1 M virtual stops + kNN routes", "value": round(plan_s, 2),
         "goal": f"< {GOAL_S:g} s", "unit": "s",
         "detail": f"{plan_s / GOAL_S:.2f} of the goal; {scale}"},
        {"name": "gen-virtual plan / bare cKDTree build+query", "value": round(plan_s / knn_s, 2),
         "goal": "informational (overhead over the irreducible kNN)", "unit": "ratio",
         "detail": f"plan {plan_s:.2f} s vs bare kNN {knn_s:.2f} s on the same points"},
    ]
    if quick:
        return out
    t = time.perf_counter()
    for _table, lines in gv.copy_text(plan, "ds-v1", settings, 1):
        for chunk in lines:
            chunk.encode()
    text_s = time.perf_counter() - t
    out.append({"name": "gen-virtual plan + COPY text, 1 M virtual stops",
                "value": round(plan_s + text_s, 2), "goal": f"< {GOAL_S:g} s", "unit": "s",
                "detail": f"{(plan_s + text_s) / GOAL_S:.2f} of the goal; COPY text of "
                          f"{c['virtual_stops'] + c['virtual_routes'] + len(gv.FLIGHT_MODES):,}"
                          f" rows took {text_s:.2f} s"})
    wall, again, (copy_s, index_s), counts = _end_to_end(real, settings, plan)
    rows = counts["virtual_stops"] + counts["virtual_routes"] + len(gv.FLIGHT_MODES)
    floor_s = copy_s + index_s
    out.append({"name": "gen-virtual whole stage (PostgreSQL COPY + S3), 1 M virtual stops",
                "value": round(wall, 2), "goal": f"< {GOAL_S:g} s", "unit": "s",
                "detail": f"{wall / GOAL_S:.2f} of the goal; {rows:,} rows written "
                          f"({counts['virtual_flights']:,} flights are a view), "
                          f"{rows / wall:,.0f} rows/s; plan alone {plan_s:.2f} s"})
    out.append({"name": "PostgreSQL floor: bare COPY + the same 4 index builds, same rows",
                "value": round(floor_s, 2), "goal": f"(reference; < {GOAL_S:g} s would be "
                "needed for the goal)", "unit": "s",
                "detail": f"{floor_s / GOAL_S:.2f} of the goal; COPY from plain files into "
                          f"bare tables, one transaction: {copy_s:.2f} s; indexes "
                          f"{index_s:.2f} s"})
    out.append({"name": "gen-virtual whole stage ÷ PostgreSQL floor",
                "value": round(wall / floor_s, 2), "goal": "informational (what the stage "
                "adds: planning, formatting, backup, index upkeep)", "unit": "ratio",
                "detail": f"first generation {wall:.2f} s vs floor {floor_s:.2f} s"})
    out.append({"name": "gen-virtual --force regeneration ÷ first generation",
                "value": round(again / wall, 2), "goal": "≈ 1 (replacing costs no more)",
                "unit": "ratio",
                "detail": f"regeneration {again:.2f} s vs first {wall:.2f} s, same rows"})
    return out


if __name__ == "__main__":
    import json
    import sys

    for fig in run(quick="--quick" in sys.argv):
        print(json.dumps(fig))
