"""build-graph (Worker 3): the adjacency graph of every real and virtual stop, published to
Redis as an immutable version behind one atomically switched pointer, recorded in
``graph_versions`` and exported to S3; plus the operator queries (list, activate, neighbours,
route) and the ``status`` section.

A run stops (exit 78) before any work if another database owns the ``[redis] prefix``, and
claims the prefix for its database just before it first writes or deletes a key there: one
prefix, one database; a run that writes nothing (noop, failed validation) claims nothing. In S3 an
export's manifest names its deployment: a run never writes over, nor deletes, another
database's export (two installations on one bucket number their versions alike).

Publish order: Redis keys -> S3 export -> graph_versions row (committed, not yet active) ->
pointer switch -> active flag (committed). Any failure keeps the previous version active and
removes what this run wrote.

The Redis pointer switch is the commit point of a publish or an activation. A run killed
between two of these steps leaves a state that :func:`reconcile` repairs at the start of the
next build-graph or ``graph activate`` (both hold the build-graph lock): PostgreSQL follows a
pointer that names a complete version it knows; a recorded version the pointer never reached
is removed. Readers only ever see a complete version that ``graph_versions`` records.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import heapq
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from .. import db, geo
from ..adapters.backups import BackupStore
from ..adapters.graph_store import (
    Edge,
    GraphLookupError,
    GraphReader,
    GraphStore,
    PrefixOwned,
    RedisRefused,
    encode_adjacency,
)
from ..errors import BackupError, ConfigError, PipelineError, RedisError, ValidationError
from ..modes import canonical, describe_unknown, speed_table, unknown_modes
from ..runner import DRY_RUN, NOOP, SKIPPED, SUCCESS, RunContext, StageResult
from ..settings import GraphSettings, quoted

EXPORT_FORMAT = "pipeline-graph-jsonl/1"
_SAMPLES = 5  # ids named in a validation message


def export_prefix(version: str) -> str:
    return f"graphs/{version}/"


def export_key(version: str) -> str:
    return f"{export_prefix(version)}graph.jsonl.gz"


def manifest_key(version: str) -> str:
    return f"{export_prefix(version)}manifest.json"


class ExportOwned(ConfigError):
    """The bucket holds another database's export at the version this one would write
    (exit 78): two installations back up into one bucket and key prefix. Nothing is written."""

    def __init__(self, location: str, version: str, owner: str | None, identity: str) -> None:
        whose = f"deployment {owner}" if owner else "its manifest names no deployment"
        super().__init__(
            f"S3 {location} holds the graph export {export_prefix(version)} of another "
            f"database ({whose}; this database is {identity}): give each database a bucket or "
            "a key prefix of its own, [s3] bucket or [s3] prefix (PIPELINE_S3_PREFIX)")
        self.owner = owner


def export_owner(backups: BackupStore, version: str) -> tuple[dict[str, Any] | None, str | None]:
    """``version``'s export manifest (None without one) and the deployment it names (None for
    an export written before manifests named one). One GET."""
    manifest = backups.get_json_if_any(manifest_key(version))
    if not isinstance(manifest, dict):
        return (None if manifest is None else {}), None
    owner = manifest.get("deployment")
    return manifest, str(owner) if owner else None


def check_export_free(backups: BackupStore, version: str, identity: str) -> None:
    """ExportOwned unless ``graphs/<version>/`` is empty or holds this database's own export
    (a run killed after its upload): a version number this database never recorded, so
    anything else there is another database's. One LIST, and one GET if a manifest is there."""
    keys = list(backups.list(export_prefix(version)))
    if not keys:
        return
    owner = export_owner(backups, version)[1] if manifest_key(version) in keys else None
    if owner != identity:
        raise ExportOwned(backups.location, version, owner, identity)


def delete_export(backups: BackupStore, version: str, identity: str, *, ours: bool,
                  checksum: str | None = None, dry_run: bool = False
                  ) -> tuple[int, str | None]:
    """Delete ``version``'s export if it is this database's: its manifest names this
    deployment; or it names none (an export without a manifest, or written before manifests
    named their deployment), ``ours`` (this database recorded the version, or this run wrote
    it) and its sha256 is not another than ``checksum`` (the one this database recorded).
    Returns the objects deleted (``dry_run``: that would be) and, when it is left alone, why.
    One GET of the manifest, then the LIST and DELETEs."""
    manifest, owner = export_owner(backups, version)
    theirs = (manifest or {}).get("sha256")
    if owner is not None and owner != identity:
        why = f"deployment {owner}'s"
    elif owner is None and not ours:
        why = "not written by this database"
    elif owner is None and checksum and theirs and theirs != checksum:
        why = f"not the {version} this database recorded (another checksum)"
    else:
        if dry_run:
            return len(list(backups.list(export_prefix(version)))), None
        return backups.delete_prefix(export_prefix(version)), None
    return 0, (f"the S3 export {export_prefix(version)} is {why}: another database backs up "
               f"into {backups.location}? Left alone")


# ---------------------------------------------------------------- reading and building


@dataclass
class GraphData:
    """Nodes (real first, then virtual) and directed edges as parallel arrays."""

    node_ids: list[str]
    n_real: int
    src: np.ndarray  # int64 node index, -1 = unknown stop
    dst: np.ndarray
    weight: np.ndarray  # float64 seconds
    route_ids: list[str]
    modes: list[str]
    from_ids: list[str]  # the raw endpoint ids, to name unknown stops
    to_ids: list[str]
    speeds_kmh: dict[str, float]  # the speed of each mode a route without flights used
    # (route id, stop) of the routes left out because they lead from a stop to itself
    self_loops: list[tuple[str, str]] = field(default_factory=list)
    # Real routes whose weight the straight line between their stops belies (_odd_routes):
    # (route id, from, to, distance km or flight minutes, straight-line km) per kind
    odd_routes: dict[str, list[tuple[str, str, str, float, float]]] = field(
        default_factory=dict)

    @property
    def nodes(self) -> int:
        return len(self.node_ids)

    @property
    def edges(self) -> int:
        return int(self.src.shape[0])


@dataclass
class Inputs:
    dataset_version: str | None
    generation_id: int | None
    built: dict[str, Any] | None  # newest graph already built from this generation


def _read_decision(conn: psycopg.Connection[Any]) -> Inputs:
    ds = conn.execute(db.query("build_graph", "active_dataset")).fetchone()
    if ds is None:
        return Inputs(None, None, None)
    version = ds["version"]
    gen = conn.execute(db.query("build_graph", "newest_generation"),
                       {"dataset_version": version}).fetchone()
    gen_id = gen["id"] if gen else None
    built = conn.execute(db.query("build_graph", "graph_for_generation"),
                         {"dataset_version": version, "generation_id": gen_id}).fetchone()
    return Inputs(version, gen_id, built)


def _speed_lookup(modes: list[str], speeds_kmh: dict[str, float]) -> np.ndarray:
    """km/h per edge from its mode (see :mod:`pipeline_cli.modes`); NaN where it has none."""
    table = speed_table(speeds_kmh)
    uniq, inverse = np.unique(np.array(modes, dtype=object), return_inverse=True)
    per_mode = np.array([table.get(canonical(m), math.nan) for m in uniq], dtype=np.float64)
    return per_mode[inverse] if len(modes) else np.zeros(0)


def read_graph(conn: psycopg.Connection[Any], dataset_version: str,
               speeds_kmh: dict[str, float]) -> GraphData:
    """Nodes and weighted edges of the active dataset (call inside the snapshot transaction).

    A real route weighs its fastest scheduled flight (arrival - departure, wrapping past
    midnight), else distance ÷ the mode's speed; a virtual route weighs its travel_time_s.
    """
    params = {"dataset_version": dataset_version}
    cur = conn.cursor(row_factory=tuple_row)
    stops = cur.execute(db.query("build_graph", "real_stops")).fetchall()
    real = [r[0] for r in stops]
    virtual = [r[0] for r in cur.execute(db.query("build_graph", "virtual_stops"), params)]
    routes = cur.execute(db.query("build_graph", "real_routes")).fetchall()
    vroutes = cur.execute(db.query("build_graph", "virtual_routes"), params).fetchall()

    node_ids = real + virtual
    index = {sid: i for i, sid in enumerate(node_ids)}
    if len(index) != len(node_ids):
        seen: set[str] = set()
        dupes = [s for s in node_ids if s in seen or seen.add(s)]  # type: ignore[func-returns-value]
        raise ValidationError(
            f"{len(dupes)} stop ids are both real and virtual (e.g. {', '.join(dupes[:3])})",
            problems=[f"stop {s}: id used by a real and a virtual stop" for s in dupes[:_SAMPLES]])

    # Real routes: flight minimum where scheduled, else distance / speed. Edges carry the
    # canonical mode, so the API sees one name per mode however a feed spells it.
    names = {m: canonical(m) for m in {r[3] for r in routes}}
    modes = [names[r[3]] for r in routes]
    flight_s = np.array([np.nan if r[5] is None else r[5] for r in routes], dtype=np.float64)
    dist_km = np.array([np.nan if r[4] is None else r[4] for r in routes], dtype=np.float64)
    speed = _speed_lookup(modes, speeds_kmh)
    table = speed_table(speeds_kmh)
    needs_speed = np.isnan(flight_s) & np.isnan(speed)
    if needs_speed.any():  # one error naming every mode, before any edge is judged
        counts: Counter[str | None] = Counter(
            modes[i] for i in np.flatnonzero(needs_speed).tolist())
        unknown = unknown_modes(counts, table)
        raise ValidationError(describe_unknown(unknown),
                              partial=StageResult(extra={"unknown_modes": unknown}))
    with np.errstate(divide="ignore", invalid="ignore"):
        by_speed = dist_km / speed * 3600.0
    used = {modes[i] for i in np.flatnonzero(np.isnan(flight_s)).tolist()}  # canonical
    real_w = np.where(np.isnan(flight_s), by_speed, flight_s)
    virtual_w = np.array([r[4] for r in vroutes], dtype=np.float64)

    from_ids = [r[1] for r in routes] + [r[1] for r in vroutes]
    to_ids = [r[2] for r in routes] + [r[2] for r in vroutes]
    src = np.fromiter((index.get(s, -1) for s in from_ids), dtype=np.int64, count=len(from_ids))
    dst = np.fromiter((index.get(s, -1) for s in to_ids), dtype=np.int64, count=len(to_ids))
    weight = np.round(np.concatenate([real_w, virtual_w]), 3)
    route_ids = [r[0] for r in routes] + [r[0] for r in vroutes]
    modes += [r[3] for r in vroutes]
    odd_routes = _odd_routes(stops, routes, src[:len(routes)], dst[:len(routes)], dist_km,
                             flight_s)
    # A route from a stop to itself leads nowhere: the routing API never gets it.
    loops = np.flatnonzero((src == dst) & (src >= 0)).tolist()
    self_loops = [(route_ids[i], from_ids[i]) for i in loops]
    if loops:
        keep = np.ones(len(src), dtype=bool)
        keep[loops] = False
        kept = np.flatnonzero(keep).tolist()
        src, dst, weight = src[keep], dst[keep], weight[keep]
        route_ids, modes, from_ids, to_ids = ([x[i] for i in kept] for x in (
            route_ids, modes, from_ids, to_ids))
    return GraphData(
        node_ids=node_ids, n_real=len(real), src=src, dst=dst, weight=weight,
        route_ids=route_ids, modes=modes, from_ids=from_ids, to_ids=to_ids,
        speeds_kmh={m: table[m] for m in sorted(used)},
        self_loops=self_loops, odd_routes=odd_routes,
    )


def _odd_routes(stops: list[tuple[Any, ...]], routes: list[tuple[Any, ...]], src: np.ndarray,
                dst: np.ndarray, dist_km: np.ndarray, flight_s: np.ndarray
                ) -> dict[str, list[tuple[str, str, str, float, float]]]:
    """The real routes whose weight the great circle between their stops belies (measured the
    short way round, across the antimeridian too):
    - ``short_routes``: weighed by a distance shorter than it by more than 10 % and 1 km (a
      feed's 0 for "unknown", or miles for kilometres; 0 km between stops 60 km apart is an
      edge of 0 s that every shortest path takes);
    - ``long_routes``: by a distance more than 5 times it and 100 km longer (metres for
      kilometres: an edge 1,000 times too slow, which every shortest path avoids); roads wind,
      and a ring line's last stop may be next to its first, so the bounds are wide;
    - ``fast_routes``: by a fastest flight faster than 1,200 km/h over it (times in each end's
      own time zone, or a wrong stop), which every shortest path takes."""
    lat = np.array([r[1] for r in stops], dtype=np.float64)
    lon = np.array([r[2] for r in stops], dtype=np.float64)
    known = (src >= 0) & (src < lat.size) & (dst >= 0) & (dst < lat.size)  # real stops
    found: dict[str, list[tuple[str, str, str, float, float]]] = {}
    for kind, weighed in (("distance", ~np.isnan(dist_km) & np.isnan(flight_s)),
                          ("flight", ~np.isnan(flight_s))):
        at = np.flatnonzero(weighed & known)
        a, b = src[at], dst[at]
        straight = geo.haversine_km(lat[a], lon[a], lat[b], lon[b])
        if kind == "flight":
            tests = {"fast_routes": (flight_s[at] / 60.0, straight > flight_s[at] / 3.0)}
        else:
            km = dist_km[at]
            tests = {"short_routes": (km, straight - km > np.maximum(1.0, 0.1 * straight)),
                     "long_routes": (km, km - straight > np.maximum(100.0, 4.0 * straight))}
        for name, (value, odd) in tests.items():
            found[name] = [(routes[i][0], routes[i][1], routes[i][2], float(v), float(d))
                           for i, v, d in zip(at[odd].tolist(), value[odd].tolist(),
                                              straight[odd].tolist(), strict=True)]
    return found


# ---------------------------------------------------------------- validation


# The notes of _odd_routes: what the routes are, the unit of the feed's value, what is wrong.
_ODD_ROUTES = {
    "short_routes": ("shorter than the straight line between their stops", "km",
                     "their distance_km is wrong, or in another unit"),
    "long_routes": ("more than 5 times longer than the straight line between their stops",
                    "km", "their distance_km is wrong, or in metres"),
    "fast_routes": ("faster than 1,200 km/h by their fastest flight over the straight line",
                    "min", "their flight times are wrong (each end's own time zone?)"),
}


@dataclass
class Checks:
    components: int
    unreachable_real_stops: int
    self_loops: int
    zero_weight_edges: int
    warnings: list[str]
    odd_routes: dict[str, int] = field(default_factory=dict)  # see _odd_routes

    def counts(self) -> dict[str, int]:
        return {"components": self.components,
                "unreachable_real_stops": self.unreachable_real_stops,
                "self_loops": self.self_loops, "zero_weight_edges": self.zero_weight_edges,
                **{kind: self.odd_routes.get(kind, 0) for kind in _ODD_ROUTES}}


def validate(graph: GraphData, *, fatal_warnings: bool) -> Checks:
    """Raise ValidationError for what would corrupt routing; count what merely looks wrong."""
    if graph.nodes == 0 or graph.edges == 0:
        raise ValidationError(
            f"empty graph ({graph.nodes} nodes, {graph.edges} edges): nothing to publish")
    summary: list[str] = []
    problems: list[str] = []
    unknown = np.flatnonzero((graph.src < 0) | (graph.dst < 0))
    if unknown.size:
        summary.append(f"{unknown.size} edge(s) reference unknown stops")
        for i in unknown[:_SAMPLES]:
            missing = graph.from_ids[i] if graph.src[i] < 0 else graph.to_ids[i]
            problems.append(f"route {graph.route_ids[i]}: edge to unknown stop {missing!r}")
    bad = np.flatnonzero(~np.isfinite(graph.weight) | (graph.weight < 0))
    if bad.size:
        summary.append(f"{bad.size} edge(s) with a negative or NaN weight")
        for i in bad[:_SAMPLES]:
            w = graph.weight[i]
            why = "negative weight" if w < 0 else "no flight and no distance"
            problems.append(f"route {graph.route_ids[i]}: {why} ({w})")
    if problems:
        raise ValidationError(f"the graph is invalid ({'; '.join(summary)}): {problems[0]}",
                              problems=problems,
                              partial=StageResult(extra={"problems": problems}))

    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = graph.nodes
    matrix = coo_matrix((np.ones(graph.edges, dtype=np.int8), (graph.src, graph.dst)),
                        shape=(n, n)).tocsr()
    count, labels = connected_components(matrix, directed=True, connection="weak")
    largest = int(np.bincount(labels).argmax())
    outside = np.flatnonzero(labels[:graph.n_real] != largest)
    warnings: list[str] = []
    if count > 1:
        size = int((labels == largest).sum())
        warnings.append(f"{count} connected components (the largest has {size} of {n} nodes)")
    if outside.size:
        sample = ", ".join(graph.node_ids[i] for i in outside[:_SAMPLES])
        warnings.append(f"{outside.size} real stops are unreachable from the main network "
                        f"(e.g. {sample})")
    if warnings and fatal_warnings:
        raise ValidationError(
            f"the graph is not connected ([graph] fatal_warnings): {warnings[0]}",
            problems=warnings, partial=StageResult(extra={
                "problems": warnings, "components": int(count),
                "unreachable_real_stops": int(outside.size)}))
    # Notes, never fatal: the data says so, and the graph routes correctly either way.
    if graph.self_loops:
        route, stop = graph.self_loops[0]
        warnings.append(f"{len(graph.self_loops)} self-loop(s) left out (a route from a stop "
                        f"to itself, e.g. {route} at {stop})")
    # One component counts weakly: a stop that a one-way route alone joins to the main
    # network can be reached and not left, or left and not reached (HEL -> NRT, no flight back).
    strong = connected_components(matrix, directed=True, connection="strong")[1]
    main = labels == largest
    core = int(np.bincount(strong[main]).argmax())
    one_way = np.flatnonzero(main[:graph.n_real] & (strong[:graph.n_real] != core))
    if one_way.size:
        sample = ", ".join(graph.node_ids[i] for i in one_way[:_SAMPLES])
        warnings.append(f"{one_way.size} real stop(s) joined to the main network one way only "
                        f"(e.g. {sample}): a route back or there is missing")
    for kind, (says, unit, what) in _ODD_ROUTES.items():  # published as the feed says:
        if graph.odd_routes.get(kind):                     # a guess would be no better
            route, a, b, value, straight = graph.odd_routes[kind][0]
            warnings.append(f"{len(graph.odd_routes[kind])} route(s) {says} (e.g. {route}: "
                            f"{a} -> {b}, {value:g} {unit} for {straight:.1f} km): {what}; "
                            "published")
    free = np.flatnonzero(graph.weight == 0)
    if free.size:  # two stops at one place (platforms of a station): legitimate, but worth a look
        i = int(free[0])
        warnings.append(f"{free.size} edge(s) of 0 s between two stops (e.g. "
                        f"{graph.route_ids[i]}: {graph.from_ids[i]} -> {graph.to_ids[i]}); "
                        "published")
    return Checks(components=int(count), unreachable_real_stops=int(outside.size),
                  self_loops=len(graph.self_loops), zero_weight_edges=int(free.size),
                  warnings=warnings,
                  odd_routes={k: len(v) for k, v in graph.odd_routes.items()})


# ---------------------------------------------------------------- encoding and export


def adjacency(graph: GraphData) -> list[str]:
    """The encoded adjacency of every node, in node order (``[]`` for no outgoing edge)."""
    order = np.argsort(graph.src, kind="stable")
    bounds = np.searchsorted(graph.src[order], np.arange(graph.nodes + 1))
    ids, routes, modes = graph.node_ids, graph.route_ids, graph.modes
    dst, weight = graph.dst.tolist(), graph.weight.tolist()
    ordered = order.tolist()
    out = []
    for n in range(graph.nodes):
        out.append(encode_adjacency([[ids[dst[e]], weight[e], routes[e], modes[e]]
                                     for e in ordered[bounds[n]:bounds[n + 1]]]))
    return out


def export_lines(node_ids: list[str], n_real: int, adj: list[str]) -> Iterator[str]:
    """One JSON object per node: ``{"id": ..., "kind": "real"|"virtual", "adj": [...]}``."""
    for i, (sid, a) in enumerate(zip(node_ids, adj, strict=True)):
        kind = "real" if i < n_real else "virtual"
        yield f'{{"id":{json.dumps(sid, ensure_ascii=False)},"kind":"{kind}","adj":{a}}}\n'


def parse_export(data: bytes) -> Iterator[tuple[str, str]]:
    """(stop id, encoded adjacency) for every line of an uncompressed export."""
    for line in data.splitlines():
        if line.strip():
            obj = json.loads(line)
            yield str(obj["id"]), encode_adjacency(obj["adj"])


# ---------------------------------------------------------------- the stage


def build_graph(
    database: db.Database,
    store: GraphStore,
    backups: BackupStore,
    settings: GraphSettings,
    speeds_kmh: dict[str, float],
    ctx: RunContext,
    *,
    force: bool = False,
    after_chunk: Callable[[int], None] | None = None,
) -> StageResult:
    """Build and publish a graph version when the active dataset's newest virtual generation
    has none yet (or when the active graph is missing from Redis); ``force`` rebuilds."""
    started = time.monotonic()
    with database.connect(name="pipeline build-graph") as conn:
        identity = claim_prefix(conn, store)
        repaired, counted = reconcile(conn, store, backups, ctx, identity)
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with db.wrap_errors("reading the graph inputs"), conn.transaction():
            conn.execute(db.query("build_graph", "lock_virtual"))
            inputs = _read_decision(conn)
            if inputs.dataset_version is None:
                return _unless_repaired(repaired, StageResult(
                    status=SKIPPED, message="no active dataset; run `pipeline sync-odata` "
                                            "first"))
            if inputs.generation_id is None:
                return _unless_repaired(repaired, StageResult(
                    status=SKIPPED,
                    extra={"dataset_version": inputs.dataset_version},
                    message=f"dataset {inputs.dataset_version} has no virtual entities yet; "
                            "run `pipeline gen-virtual` first"))
            reason = _reason_to_build(inputs, store, force, speeds_kmh, complete=counted)
            if reason is None:
                extra, message = _nothing_to_build(inputs, store.active_version())
                return _unless_repaired(repaired, StageResult(
                    status=NOOP, extra=extra, message=message))
            ctx.log.info("building: %s", reason)
            graph = read_graph(conn, inputs.dataset_version, speeds_kmh)
        ctx.check_stop()
        checks = validate(graph, fatal_warnings=settings.fatal_warnings)
        for warning in checks.warnings:
            ctx.log.warning("%s", warning)
        conn.read_only = False
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        result = _publish(conn, store, backups, settings, ctx, inputs, graph, checks,
                          started, after_chunk, identity)
    if repaired:
        result.extra["repaired"] = repaired
    return result


def _unless_repaired(repaired: list[str], result: StageResult) -> StageResult:
    """A run that built nothing but repaired the active graph did work: a repair is no noop
    or skip, and its message starts ``repaired:`` (docs/operations.md, the runbook)."""
    if not repaired:
        return result
    return StageResult(status=SUCCESS, extra=result.extra | {"repaired": repaired},
                       message=f"repaired: {'; '.join(repaired)}; {result.message}")


def plan(
    database: db.Database,
    store: GraphStore,
    settings: GraphSettings,
    speeds_kmh: dict[str, float],
    *,
    force: bool = False,
    upstream: str | None = None,
    upstream_unknown_modes: Mapping[str, int] | None = None,
) -> StageResult:
    """What :func:`build_graph` would do, decided and validated the same way; writes nothing
    (no reconcile, no sequence number, no key). ``upstream`` names new input an upstream dry
    run would make (run-all --dry-run): the build is then judged from it, not from the tables,
    and fails as the real build would on the route modes without a speed of the dataset it
    would get (``upstream_unknown_modes``, from sync-odata's dry run).

    Status ``dry-run`` (``skipped`` as the real run without an active dataset or generation);
    raises ValidationError where the real run would."""
    with database.connect(name="pipeline build-graph dry-run") as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with db.wrap_errors("reading the graph inputs"), conn.transaction():
            store.check_owner(db.require_deployment_id(conn))  # the real run would stop here
            conn.execute(db.query("build_graph", "lock_virtual"))
            inputs = _read_decision(conn)
            row = conn.execute(db.query("build_graph", "peek_seq")).fetchone()
            version = f"graph-v{row['seq']}" if row else None
            extra: dict[str, Any] = {"dry_run": True, "dataset_version": inputs.dataset_version,
                                     "generation_id": inputs.generation_id}
            if upstream is not None:
                if upstream_unknown_modes:
                    unknown = dict(upstream_unknown_modes)
                    raise ValidationError(describe_unknown(unknown),
                                          partial=StageResult(extra={"unknown_modes": unknown}))
                return StageResult(status=DRY_RUN, extra=extra | {
                    "would_run": True, "graph_version": version},
                    message=f"would build {version} from {upstream}")
            if inputs.dataset_version is None or inputs.generation_id is None:
                what = ("no active dataset" if inputs.dataset_version is None else
                        f"dataset {inputs.dataset_version} has no virtual entities yet")
                return StageResult(status=SKIPPED, extra=extra,
                                   message=f"{what}; nothing to build")
            reason = _reason_to_build(inputs, store, force, speeds_kmh)
            if reason is None:
                same, message = _nothing_to_build(inputs, store.active_version())
                return StageResult(status=DRY_RUN, extra=extra | same | {"would_run": False},
                                   message=f"would do nothing: {message}")
            graph = read_graph(conn, inputs.dataset_version, speeds_kmh)
    checks = validate(graph, fatal_warnings=settings.fatal_warnings)
    return StageResult(
        status=DRY_RUN, counts={"nodes": graph.nodes, "edges": graph.edges},
        extra=extra | {"would_run": True, "graph_version": version, "reason": reason,
                       **checks.counts(), "warnings": checks.warnings},
        message=f"would build {version} from dataset {inputs.dataset_version}, virtual "
                f"generation {inputs.generation_id} ({reason}): {graph.nodes} nodes, "
                f"{graph.edges} edges")


def _nothing_to_build(inputs: Inputs, active: str | None) -> tuple[dict[str, Any], str]:
    """The result of a run with nothing to build: ``graph_version`` is the version the
    routing API serves (after a rollback, not the newest build, which is ``built_version``)."""
    built = (inputs.built or {}).get("version")
    extra = {"graph_version": active, "built_version": built}
    if active == built:
        return extra, (f"{active} is active, already built from virtual generation "
                       f"{inputs.generation_id}")
    return extra, (f"{active} is active (rolled back from {built}, the newest build of "
                   f"virtual generation {inputs.generation_id}; --force rebuilds)")


def _reason_to_build(inputs: Inputs, store: GraphStore, force: bool,
                     speeds_kmh: dict[str, float], *, complete: str | None = None
                     ) -> str | None:
    """Why to build, or None. ``complete``: a version whose keys reconcile() has just
    counted, or written back, whole (under the lock): not counted again."""
    if force:
        return "--force"
    if inputs.built is None:
        return f"virtual generation {inputs.generation_id} has no graph yet"
    used = inputs.built["speeds_kmh"]  # the speeds its routes were weighed by (or NULL)
    table = speed_table(speeds_kmh)
    changed = sorted(m for m, v in (used or {}).items() if table.get(m) != v)
    if changed:  # a speed no route is weighed by would build the same graph again
        return (f"the speeds of route modes {', '.join(map(repr, changed))} ([virtual] "
                f"speeds_kmh) differ from {inputs.built['version']}'s")
    pointer = store.active_version()
    if inputs.built["active"] and pointer != inputs.built["version"]:
        return f"the active graph {inputs.built['version']} is missing from Redis"
    if pointer is None:  # not even a rolled-back version could be reloaded
        return "Redis serves no graph"
    if pointer != complete and not store.is_complete(pointer):  # reconcile could not reload
        return f"the active graph {pointer} is incomplete in Redis"
    return None


def _new_version(conn: psycopg.Connection[Any], store: GraphStore) -> tuple[str, int]:
    # The sequence is the source of truth; skip any number Redis already holds (a database
    # restored from an older backup must never write into a version readers already use).
    active = store.active_version()
    while True:
        with db.wrap_errors("allocating a graph version"):
            row = conn.execute(db.query("build_graph", "next_seq")).fetchone()
            conn.commit()
        assert row is not None
        seq = int(row["seq"])
        version = f"graph-v{seq}"
        if version != active and not store.is_registered(version):
            return version, seq


def _known(conn: psycopg.Connection[Any], versions: list[str]) -> set[str]:
    with db.wrap_errors("reading graph versions"):
        rows = conn.execute(db.query("build_graph", "known_versions"),
                            {"versions": versions}).fetchall()
        conn.commit()
    return {r["version"] for r in rows}


def _publish(
    conn: psycopg.Connection[Any],
    store: GraphStore,
    backups: BackupStore,
    settings: GraphSettings,
    ctx: RunContext,
    inputs: Inputs,
    graph: GraphData,
    checks: Checks,
    started: float,
    after_chunk: Callable[[int], None] | None,
    identity: str,
) -> StageResult:
    assert inputs.dataset_version is not None
    version, seq = _new_version(conn, store)
    check_export_free(backups, version, identity)  # before anything of it is written
    previous = store.active_version()
    adj = adjacency(graph)
    raw = "".join(export_lines(graph.node_ids, graph.n_real, adj)).encode()
    checksum = hashlib.sha256(raw).hexdigest()
    created = datetime.now().astimezone().isoformat(timespec="seconds")
    meta = {"dataset_version": inputs.dataset_version,
            "virtual_generation_id": inputs.generation_id, "nodes": graph.nodes,
            "edges": graph.edges, "checksum": checksum, "created_at": created}
    warnings = checks.counts()
    recorded = uploading = False
    store.ensure_claimed()  # outside the try: a refused claim wrote nothing to discard
    try:
        with ctx.progress(f"writing {version} to Redis", graph.nodes) as bar:
            done = 0

            def on_chunk(written: int) -> None:
                nonlocal done
                bar.advance(written - done)
                done = written
                if after_chunk is not None:
                    after_chunk(written)
                ctx.check_stop()

            store.write_version(version, zip(graph.node_ids, adj, strict=True), meta,
                                after_chunk=on_chunk)
        ctx.check_stop()
        uploading = True
        backups.put_bytes(export_key(version), gzip.compress(raw, 6, mtime=0),
                          "application/gzip")
        backups.put_json(manifest_key(version), {
            "format": EXPORT_FORMAT, "version": version, **meta, "deployment": identity,
            "export_key": export_key(version), "sha256": checksum, **warnings})
        ctx.check_stop()
        build_ms = int((time.monotonic() - started) * 1000)
        with db.wrap_errors(f"recording graph {version}"):
            # Committed on its own: from here the version is complete in Redis, S3 and
            # PostgreSQL, so the pointer switch below never names a version the database
            # does not know, even if this process dies right after it.
            conn.execute(db.query("build_graph", "insert_version"), {
                "version": version, "seq": seq, "dataset_version": inputs.dataset_version,
                "generation_id": inputs.generation_id, "nodes": graph.nodes,
                "edges": graph.edges, "build_ms": build_ms, "checksum": checksum,
                "export_key": export_key(version), "warnings": Jsonb(warnings),
                "run_id": ctx.run_id, "speeds_kmh": Jsonb(graph.speeds_kmh)})
            conn.commit()
        recorded = True
        ctx.check_stop()
        _activate_and_commit(conn, store, version, previous, ctx)
    except BaseException:
        _rollback(conn)
        _discard(conn, store, backups, version, ctx, identity, recorded=recorded,
                 uploaded=uploading)
        raise
    removed = _retain(store, settings, ctx)
    return StageResult(
        status=SUCCESS,
        counts={"nodes": graph.nodes, "edges": graph.edges, **warnings},
        extra={"graph_version": version, "previous_version": previous,
               "dataset_version": inputs.dataset_version,
               "virtual_generation_id": inputs.generation_id, "nodes": graph.nodes,
               "edges": graph.edges, **warnings, "warnings": checks.warnings,
               "checksum": checksum, "export_key": export_key(version),
               "removed_versions": removed},
        message=f"published {version}: {graph.nodes} nodes, {graph.edges} edges"
                + (f" ({'; '.join(checks.warnings)})" if checks.warnings else ""),
    )


def _activate_and_commit(conn: psycopg.Connection[Any], store: GraphStore, version: str,
                         previous: str | None, ctx: RunContext) -> None:
    """Mark ``version`` active in the open transaction, switch the Redis pointer, COMMIT.

    The pointer switch is the last step before COMMIT; if COMMIT fails the pointer is switched
    back (only if it still points at ``version``), so both sides keep the previous version.
    """
    with db.wrap_errors(f"activating graph {version}"):
        conn.execute(db.query("build_graph", "deactivate_all"), {"version": version})
        found = conn.execute(db.query("build_graph", "activate"), {"version": version})
        if found.fetchone() is None:
            raise GraphLookupError(f"graph version {version} is not recorded in graph_versions")
    store.switch_active(version, expected=previous)
    try:
        with db.wrap_errors(f"activating graph {version}"):
            conn.commit()
    except BaseException:
        _revert_pointer(store, version, previous, ctx)
        raise


def _rollback(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.Error):  # a dead connection rolled back already
        conn.rollback()


def _revert_pointer(store: GraphStore, version: str, previous: str | None,
                    ctx: RunContext) -> None:
    try:
        if previous is not None:
            store.switch_active(previous, expected=version)
        else:
            store.clear_active(expected=version)
        ctx.log.warning("the active graph pointer was switched back to %s",
                        previous or "unset")
    except RedisError as exc:
        ctx.log.error("could not switch the graph pointer back to %s (%s); `pipeline status` "
                      "shows the mismatch, `pipeline graph activate` repairs it",
                      previous or "unset", exc)


def _discard(conn: psycopg.Connection[Any], store: GraphStore, backups: BackupStore,
             version: str, ctx: RunContext, identity: str, *, recorded: bool,
             uploaded: bool) -> None:
    """Remove what a failed publish wrote: its never-activated row first (if ``recorded``),
    then its keys and (if it began to ``upload`` it) its export. A failure here is logged; the
    next run's :func:`reconcile` and orphan cleanup finish the job (a row stays until its keys
    and export are gone)."""
    try:
        if store.active_version() == version:
            return  # the switch happened and could not be reverted: never pull a live graph
    except RedisError as exc:
        ctx.log.error("could not read the graph pointer (%s); %s is left for the next "
                      "build-graph run to clean up", exc, version)
        return
    if not recorded:
        _remove_version(store, backups if uploaded else None, version, ctx, identity)
        return
    try:
        with db.wrap_errors(f"forgetting the unpublished graph {version}"):
            conn.execute(db.query("build_graph", "delete_unactivated"), {"version": version})
            kept = conn.execute(db.query("build_graph", "get_version"),
                                {"version": version}).fetchone()
            conn.commit()
    except PipelineError as exc:
        ctx.log.error("%s; the next build-graph run removes it", exc)
        return
    if kept is None:  # an activation whose COMMIT answer was lost stays for reconcile()
        _remove_version(store, backups, version, ctx, identity)


def _remove_version(store: GraphStore, backups: BackupStore | None, version: str,
                    ctx: RunContext, identity: str) -> None:
    """Remove an unpublished version's keys and (``backups``) its export, which this database
    recorded or this run wrote: never another deployment's export at the same key."""
    try:
        removed = store.delete_version(version)
        ctx.log.info("removed %d keys of the unpublished graph %s", removed, version)
    except RedisError as exc:
        ctx.log.error("could not remove the partial graph %s from Redis (%s); the next "
                      "build-graph run removes it", version, exc)
    if backups is None:
        return
    try:
        _, kept = delete_export(backups, version, identity, ours=True)
    except BackupError as exc:
        ctx.log.error("could not remove the partial export of %s from S3: %s", version, exc)
        return
    if kept:
        ctx.log.warning("%s", kept)


def claim_prefix(conn: psycopg.Connection[Any], store: GraphStore) -> str:
    """PrefixOwned (exit 78) at once when another database owns the Redis prefix; else the
    prefix is claimed for this database just before ``store``'s first write or delete (see
    :meth:`GraphStore.claim_before_writing`). Returns this database's deployment id."""
    identity = db.require_deployment_id(conn)
    with db.wrap_errors("reading the deployment identity"):
        conn.commit()
    store.claim_before_writing(identity)
    return identity


def reconcile(conn: psycopg.Connection[Any], store: GraphStore, backups: BackupStore,
              ctx: RunContext, identity: str) -> tuple[list[str], str | None]:
    """Repair what a build-graph or ``graph activate`` killed between its stores left behind;
    call under the build-graph lock. Returns one note per repair (also logged), and the
    active version if this pass found it whole in Redis or wrote it back whole (its keys are
    counted by a SCAN: the build decision need not count them again).

    - The pointer names a complete version that PostgreSQL records but does not mark active
      (killed after the switch, before COMMIT): PostgreSQL follows the pointer.
    - The pointer names a version PostgreSQL does not record, or one incomplete in Redis:
      it is switched back to PostgreSQL's active version when Redis holds that complete.
    - Redis lost the pointer to PostgreSQL's active version, or keys of it (flushed, evicted,
      deleted by hand): the lost keys are reloaded from its S3 export and the pointer set.
    - A recorded version that was never activated and that the pointer does not name (killed
      after recording it, before the switch): it is removed from PostgreSQL, Redis and S3.
    - A version registered in Redis that PostgreSQL does not record (killed while writing its
      keys): its keys are removed.
    """
    notes: list[str] = []
    counted: str | None = None
    pointer = store.active_version()
    with db.wrap_errors("reconciling the graph pointer"):
        active = conn.execute(db.query("build_graph", "active_graph")).fetchone()
        known = conn.execute(db.query("build_graph", "get_version"),
                             {"version": pointer}).fetchone() if pointer else None
        conn.commit()
    active_version = active["version"] if active else None
    if pointer is not None and pointer != active_version:
        if known is not None and store.is_complete(pointer):
            store.ensure_claimed()  # PostgreSQL follows the pointer as this database's own
            with db.wrap_errors(f"activating graph {pointer}"), conn.transaction():
                conn.execute(db.query("build_graph", "deactivate_all"), {"version": pointer})
                conn.execute(db.query("build_graph", "activate"), {"version": pointer})
            notes.append(f"PostgreSQL now marks {pointer} active, as Redis serves it (the run "
                         "that switched to it was interrupted before its COMMIT)")
        elif active_version is not None and store.is_complete(active_version):
            store.switch_active(active_version, expected=pointer)
            notes.append(f"the Redis pointer named {pointer}, which PostgreSQL does not record "
                         f"as complete; switched back to {active_version}")
    pointer = store.active_version()
    missing = store.missing_keys(str(active["version"])) if (
        active is not None and pointer in (None, active["version"])) else 0
    if active is not None and pointer == active["version"] and missing == 0:
        counted = pointer  # counted whole just now
    elif active is not None and (pointer is None or missing != 0):
        # Redis lost the active graph (flushed, restarted empty) or some of its keys (evicted,
        # deleted by hand). After a rollback the build decision would not rebuild it (the
        # newest build is another version), so nothing would bring it back: point at it
        # again, reloaded from its S3 export if need be, as `graph activate` does. Lost keys
        # are written back in place (same content, checksum verified): readers keep the rest.
        version = str(active["version"])
        lost = ("the pointer to" if missing == 0 else "the keys of" if missing is None else
                f"{missing} of the {active['nodes']} adjacency keys of")
        try:
            if missing != 0:
                _reload(store, backups, dict(active), ctx, in_place=missing is not None)
            store.switch_active(version, expected=pointer)
            counted = version
            notes.append(f"Redis had lost {lost} the active graph {version}; "
                         + ("it points at it again" if missing == 0 else
                            f"reloaded from s3 {active['export_key']}"))
        except (BackupError, RedisError) as exc:
            ctx.log.warning("the active graph %s is not in Redis and could not be reloaded: %s",
                            version, exc)
    with db.wrap_errors("reading abandoned graph versions"):
        abandoned = [r["version"] for r in conn.execute(
            db.query("build_graph", "never_activated"), {"pointer": store.active_version()})]
        conn.commit()
    for version in abandoned:
        with db.wrap_errors(f"forgetting the abandoned graph {version}"):
            conn.execute(db.query("build_graph", "delete_unactivated"), {"version": version})
            conn.commit()
        _remove_version(store, backups, version, ctx, identity)
        notes.append(f"removed {version}, recorded by a run interrupted before it was "
                     "activated")
    orphans = store.cleanup_orphans(_known(conn, store.registered()))
    if orphans:  # a run killed while writing keys (a build with nothing new left them)
        notes.append(f"removed {len(orphans)} incomplete graph versions left in Redis: "
                     f"{', '.join(orphans)}")
    for note in notes:
        ctx.log.warning("%s", note)
    return notes, counted


def _retain(store: GraphStore, settings: GraphSettings, ctx: RunContext) -> list[str]:
    try:
        removed = store.retain(settings.retention)
    except RedisError as exc:  # the publish stands; the next run retries retention
        ctx.log.warning("graph retention failed: %s", exc)
        return []
    if removed:
        ctx.log.info("retention removed graph versions %s", ", ".join(removed))
    return removed


# ---------------------------------------------------------------- operator commands


def version_exists(conn: psycopg.Connection[Any], version: str) -> bool:
    """Whether graph_versions has ``version`` (any state)."""
    with db.wrap_errors(f"reading graph {version}"):
        return conn.execute(db.query("build_graph", "get_version"),
                            {"version": version}).fetchone() is not None


def list_versions(conn: psycopg.Connection[Any], store: GraphStore, *, limit: int = 50
                  ) -> list[dict[str, Any]]:
    """graph_versions rows, newest first, with whether each is complete in Redis."""
    with db.wrap_errors("listing graph versions"):
        rows = conn.execute(db.query("build_graph", "list_versions"),
                            {"limit": limit}).fetchall()
    pointer = store.active_version()
    registered = set(store.registered())
    out = []
    for r in rows:
        version = r["version"]
        out.append({
            "version": version, "dataset_version": r["dataset_version"],
            "virtual_generation_id": r["virtual_generation_id"], "nodes": r["nodes"],
            "edges": r["edges"], "build_ms": r["build_ms"], "checksum": r["checksum"],
            "export_key": r["export_key"], "warnings": r["warnings"],
            "created_at": r["created_at"], "activated_at": r["activated_at"],
            "active": r["active"], "redis_active": version == pointer,
            "in_redis": version in registered and store.is_complete(version),
        })
    return out


def activate_version(
    database: db.Database,
    store: GraphStore,
    backups: BackupStore,
    settings: GraphSettings,
    version: str,
    ctx: RunContext,
) -> StageResult:
    """Make ``version`` the active graph again (rollback). If retention collected its keys,
    reload them from the S3 export first, verifying the checksum."""
    with database.connect(name="pipeline graph activate") as conn:
        identity = claim_prefix(conn, store)
        reconcile(conn, store, backups, ctx, identity)
        with db.wrap_errors(f"reading graph {version}"):
            row = conn.execute(db.query("build_graph", "get_version"),
                               {"version": version}).fetchone()
            conn.commit()
        if row is None:
            raise GraphLookupError(f"unknown graph version {version!r} "
                                   "(see `pipeline graph list`)")
        previous = store.active_version()
        complete = store.is_complete(version)
        if row["active"] and previous == version and complete:
            return StageResult(status=NOOP, extra={"graph_version": version},
                               message=f"{version} is already active")
        reloaded = 0
        if not complete:
            reloaded = _reload(store, backups, row, ctx)
        try:
            _activate_and_commit(conn, store, version, previous, ctx)
        except BaseException:
            _rollback(conn)
            if reloaded and store.active_version() != version:
                _discard_keys(store, version, ctx)
            raise
    removed = _retain(store, settings, ctx)
    return StageResult(
        status=SUCCESS, counts={"reloaded_keys": reloaded},
        extra={"graph_version": version, "previous_version": previous,
               "reloaded_from_s3": bool(reloaded), "nodes": row["nodes"], "edges": row["edges"],
               "removed_versions": removed},
        message=f"activated {version} (was {previous or 'unset'})"
                + (f"; reloaded {reloaded} keys from S3" if reloaded else ""))


def _discard_keys(store: GraphStore, version: str, ctx: RunContext) -> None:
    try:
        store.delete_version(version)
    except RedisError as exc:
        ctx.log.error("could not remove the reloaded graph %s: %s", version, exc)


def _reload(store: GraphStore, backups: BackupStore, row: dict[str, Any],
            ctx: RunContext, *, in_place: bool = False) -> int:
    """Write ``row``'s version back to Redis from its S3 export; returns the keys written.

    ``in_place`` (the active version lost some keys): every key is written over what is left,
    with the same content, and nothing is removed first or on failure: readers keep the keys
    that survived. Otherwise the version is removed first (a half-collected version) and again
    if the reload fails."""
    version = row["version"]
    ctx.log.info("graph %s is not (wholly) in Redis; reloading it from s3 %s", version,
                 row["export_key"])
    if not in_place:
        store.delete_version(version)  # a half-collected version: start from nothing
    try:
        raw = gzip.decompress(backups.get_bytes(row["export_key"]))
    except (OSError, EOFError) as exc:
        raise BackupError(f"S3 export {row['export_key']} is not valid gzip: {exc}") from None
    if hashlib.sha256(raw).hexdigest() != row["checksum"]:
        raise BackupError(f"S3 export {row['export_key']} does not match the checksum recorded "
                          f"for {version}; not activated")
    meta = {"dataset_version": row["dataset_version"],
            "virtual_generation_id": row["virtual_generation_id"], "nodes": row["nodes"],
            "edges": row["edges"], "checksum": row["checksum"],
            "created_at": row["created_at"].isoformat(timespec="seconds"),
            "reloaded_from": row["export_key"]}
    try:
        written = store.write_version(version, parse_export(raw), meta,
                                      after_chunk=lambda _n: ctx.check_stop())
    except BaseException:
        if not in_place:
            _discard_keys(store, version, ctx)
        raise
    if written != row["nodes"]:
        if not in_place:
            _discard_keys(store, version, ctx)
        raise BackupError(f"S3 export {row['export_key']} holds {written} nodes, "
                          f"expected {row['nodes']}")
    return written


# ---------------------------------------------------------------- route query


@dataclass
class Route:
    version: str
    source: str
    target: str
    total_s: float
    stops: list[str]
    legs: list[Edge]

    def to_json(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "total_s": self.total_s,
                "stops": self.stops, "graph_version": self.version,
                "legs": [{"from": a, **e.to_json()}
                         for a, e in zip(self.stops, self.legs, strict=False)]}


def shortest_path(reader: GraphReader, source: str, target: str, *,
                  version: str | None = None, batch: int = 64) -> Route:
    """Dijkstra over one graph version in Redis, reading adjacency lazily: each round trip
    fetches the popped node plus up to ``batch - 1`` frontier nodes likely to be popped next."""
    version = reader.require_version(version)
    # the ids as the graph spells them (another Unicode form: find_stop)
    (source, from_edges), (target, to_edges) = (reader.find_stop(version, s)
                                                for s in (source, target))
    cache: dict[str, list[Edge] | None] = {source: from_edges, target: to_edges}
    dist: dict[str, float] = {source: 0.0}
    prev: dict[str, tuple[str, Edge]] = {}
    heap: list[tuple[float, str]] = [(0.0, source)]
    done: set[str] = set()
    while heap:
        d, u = heapq.heappop(heap)
        if u in done:
            continue
        if u == target:
            break
        done.add(u)
        if u not in cache:
            want = [u] + list(dict.fromkeys(
                n for _, n in heap[:batch * 2] if n not in cache and n not in done and n != u
            ))[:batch - 1]
            cache.update(reader.neighbors_many(version, want))
        edges = cache.pop(u)
        if edges is None:
            raise RedisError(f"graph version {version} has an edge to {u!r}, which has no "
                             "adjacency key (the version is damaged)")
        for e in edges:
            nd = d + e.weight_s
            if nd < dist.get(e.to, math.inf):
                dist[e.to] = nd
                prev[e.to] = (u, e)
                heapq.heappush(heap, (nd, e.to))
    if target not in dist:
        raise GraphLookupError(f"no path from {quoted(source)} to {quoted(target)} in graph "
                               f"version {version}")
    stops, legs = [target], []
    while stops[-1] != source:
        u, e = prev[stops[-1]]
        legs.append(e)
        stops.append(u)
    stops.reverse()
    legs.reverse()
    return Route(version, source, target, round(dist[target], 3), stops, legs)


# ---------------------------------------------------------------- status


def status_section(conn: psycopg.Connection[Any], reader: GraphReader | None = None
                   ) -> dict[str, Any]:
    """The active graph for ``pipeline status``: its PostgreSQL record, the Redis pointer and
    whether they agree, whether the prefix belongs to this database, and whether Redis may
    evict graph keys. Three indexed lookups and four Redis calls. Redis unreachable, not
    answering or refusing leaves ``consistent`` null (not checked) with the ``problem``:
    status saw nothing broken, it could not look."""
    with db.wrap_errors("reading the active graph"):
        row = conn.execute(db.query("build_graph", "active_graph")).fetchone()
        identity = db.deployment_id(conn)
        if not conn.autocommit:
            conn.rollback()
    out: dict[str, Any] = {
        "version": row["version"] if row else None,
        "dataset_version": row["dataset_version"] if row else None,
        "virtual_generation_id": row["virtual_generation_id"] if row else None,
        "nodes": row["nodes"] if row else None,
        "edges": row["edges"] if row else None,
        "warnings": row["warnings"] if row else {},
        "created_at": row["created_at"] if row else None,
        "activated_at": row["activated_at"] if row else None,
        "deployment_id": identity, "redis_owner": None,
        "redis_pointer": None, "redis_complete": None, "consistent": None, "problem": None,
        "redis_eviction": None, "redis_reachable": None, "redis_refused": None,
    }
    if reader is None:
        return out
    try:
        out["redis_owner"] = owner = reader.owner()
        out["redis_reachable"], out["redis_refused"] = True, False
        pointer = reader.active_version()
        if owner is not None and identity is not None and owner != identity:
            # The pointer and versions are another database's: comparing them with this
            # database's graphs would name a repair that build-graph refuses to make.
            out["redis_pointer"], out["consistent"] = pointer, False
            out["problem"] = str(PrefixOwned(reader.prefix, owner, identity))
            return out
        missing = reader.missing_keys(pointer) if pointer else None
        out["redis_eviction"] = reader.eviction_risk()
    except RedisError as exc:
        # A refusal (a password, an ACL, a renamed command) is an answer: Redis is up and a
        # setting is wrong. Either way the graph was not checked, so consistent stays null.
        refused = isinstance(exc, RedisRefused)
        out["redis_reachable"] = out["redis_refused"] = refused
        out["problem"] = f"Redis {'refused' if refused else 'unreachable'}: {exc}"
        return out
    complete = missing == 0
    out["redis_pointer"], out["redis_complete"] = pointer, complete
    if row is None and pointer is None:
        out["consistent"], out["problem"] = True, None
    elif row is None:
        out["consistent"], out["problem"] = False, (
            f"Redis points at {pointer} but PostgreSQL has no active graph")
    elif pointer != row["version"]:
        out["consistent"], out["problem"] = False, (
            f"PostgreSQL's active graph is {row['version']} but Redis points at "
            f"{pointer or 'nothing'}; the next `pipeline build-graph` reconciles them")
    elif missing is None:
        out["consistent"], out["problem"] = False, (
            f"the active graph {pointer} is missing in Redis (no meta key)")
    elif missing:
        out["consistent"], out["problem"] = False, (
            f"the active graph {pointer} lacks {missing} of its {row['nodes']} adjacency keys "
            "in Redis (evicted or deleted); the next `pipeline build-graph` reloads them from "
            "S3")
    else:
        out["consistent"] = True
    return out

