"""The graph in Redis: one server vs a 3-master Redis Cluster, and how a version's keys map to
slots, measured side by side in one run (docs/build-graph.md "Redis Cluster" reads these).

The same synthetic graph (1 M edges on 250 k nodes, as bench_build_graph) is written:

- server, build-graph's path: ``GraphStore.write_version`` (pipelined MSETs of 500 keys);
- cluster, build-graph's path: one hash tag per version (``<prefix>:graph:{<version>}:...``),
  the same MSETs, pipelined to the node serving the version's slot;
- cluster, the alternative: the keys spread over every slot (no hash tag), where MSET is not
  allowed: one pipelined SET per key through redis-py's cluster pipeline (per-node batches).

Memory is the growth of ``used_memory`` summed over the primaries, per million edges, and the
largest share one node took (what bounds the graph size a cluster can hold).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from bench.bench_build_graph import synthetic_graph
from devtools.cleanup import drop_prefix
from pipeline_cli.adapters.graph_store import GraphStore, connect
from pipeline_cli.stages.build_graph import adjacency

FLUSH = 5000


def _nodes(client: redis.Redis) -> list[redis.Redis]:
    if isinstance(client, redis.RedisCluster):
        return [n.redis_connection for n in client.get_primaries()]
    return [client]


def _used(client: redis.Redis) -> list[int]:
    return [int(n.info("memory")["used_memory"]) for n in _nodes(client)]


def _measure(client: redis.Redis, prefix: str, write: Callable[[], None]
             ) -> tuple[float, list[int]]:
    """Seconds of ``write`` and the memory each node gained."""
    before = _used(client)
    t = time.perf_counter()
    write()
    seconds = time.perf_counter() - t
    after = _used(client)
    drop_prefix(client, prefix)
    return seconds, [a - b for a, b in zip(after, before, strict=True)]


def _store_writer(store: GraphStore, version: str, pairs: list[tuple[str, str]]
                  ) -> Callable[[], None]:
    def write() -> None:
        store.write_version(version, pairs, {"edges": len(pairs)})
    return write


def _spread_writer(client: redis.Redis, keys: list[str], values: list[str]
                   ) -> Callable[[], None]:
    """One pipelined SET per key, flushed every FLUSH keys (the cluster pipeline sorts them
    into per-node batches)."""
    def write() -> None:
        for start in range(0, len(keys), FLUSH):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(start + FLUSH, len(keys))):
                pipe.set(keys[i], values[i])
            pipe.execute()
    return write


def run(quick: bool = False) -> list[dict[str, Any]]:
    from devtools.services import LocalServices

    edges = 100_000 if quick else 1_000_000
    graph = synthetic_graph(edges)
    values = adjacency(graph)
    per_m = 1_000_000 / edges
    services = LocalServices()
    results: dict[str, tuple[float, list[int]]] = {}
    try:
        single = connect(services.redis(), socket_timeout=60)
        cluster = connect(services.redis_cluster(), cluster=True, socket_timeout=60)
        try:
            for rnd in range(1 if quick else 2):  # interleaved, best time of each
                pairs = list(zip(graph.node_ids, values, strict=True))
                for name, client in (("server", single), ("cluster", cluster)):
                    prefix = f"bench-gc-{uuid.uuid4().hex[:8]}"
                    store = GraphStore(client, prefix, chunk_size=FLUSH)
                    got = _measure(client, prefix, _store_writer(store, f"graph-v{rnd}", pairs))
                    _best(results, name, got)
                prefix = f"bench-gc-{uuid.uuid4().hex[:8]}"
                keys = [f"{prefix}:graph:graph-v{rnd}:adj:{n}" for n in graph.node_ids]
                _best(results, "spread", _measure(cluster, prefix,
                                                  _spread_writer(cluster, keys, values)))
        finally:
            single.close()
            cluster.close()
    finally:
        services.stop_all()

    def rate(name: str) -> float:
        return edges / results[name][0]

    def mib(name: str) -> float:
        return sum(results[name][1]) * per_m / 2**20

    def share(name: str) -> float:
        grown = results[name][1]
        return max(grown) / max(1, sum(grown))

    size = f"{edges:,} edges on {graph.nodes:,} nodes"
    return [
        {"name": "graph publish, 3-master cluster ÷ one server, edges/s",
         "value": rate("cluster") / rate("server"), "unit": "ratio", "goal": "(info)",
         "detail": f"{size}: cluster {rate('cluster'):,.0f} edges/s (one hash tag per version) "
                   f"vs server {rate('server'):,.0f} edges/s; build-graph's path, best of runs"},
        {"name": "graph publish on the cluster: keys spread over all slots ÷ one hash tag",
         "value": rate("spread") / rate("cluster"), "unit": "ratio",
         "goal": "(info: why one hash tag per version)",
         "detail": f"spread (pipelined SET per key) {rate('spread'):,.0f} edges/s, fullest "
                   f"node {share('spread'):.0%} of the memory; hash tag (MSET) "
                   f"{rate('cluster'):,.0f} edges/s, {share('cluster'):.0%} on one node"},
        {"name": "Redis memory per million edges, one server", "value": mib("server"),
         "unit": "MiB", "goal": "(info)",
         "detail": f"used_memory growth, {size}; {sum(len(v) for v in values) / len(values):.0f}"
                   " bytes per node value"},
        {"name": "Redis memory per million edges on the cluster node holding the version",
         "value": mib("cluster") * share("cluster"), "unit": "MiB", "goal": "(info)",
         "detail": f"spread over 3 nodes it would be {mib('spread'):.0f} MiB in all, the "
                   f"fullest node {mib('spread') * share('spread'):.0f} MiB"},
    ]


def _best(results: dict[str, tuple[float, list[int]]], name: str,
          got: tuple[float, list[int]]) -> None:
    if name not in results or got[0] < results[name][0]:
        results[name] = got
