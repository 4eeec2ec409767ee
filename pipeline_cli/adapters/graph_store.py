"""The Redis graph store: build-graph writes immutable, version-scoped adjacency keys here and
switches one pointer; the routing API reads them through :class:`GraphReader`.

Layout (every key starts with ``[redis] prefix``; docs/build-graph.md is the reference):

- ``<prefix>:graph:owner``: the identity of the one database that publishes under the prefix
  (``deployment.id``, sql/028); every command that writes or deletes graph keys checks it
  before any work and claims it just before its first write, or stops when another database
  holds it (:meth:`GraphStore.claim_before_writing`).
- ``<prefix>:graph:active``: the active version (a plain string, switched atomically).
- ``<prefix>:graph:versions``: sorted set of the versions present, scored by the time each was
  written or last activated (retention and orphan cleanup read it).
- ``<prefix>:graph:<version>:meta``: hash written *last*, so its presence means "written";
  "complete" also needs one adjacency key per node it records (:meth:`missing_keys`).
- ``<prefix>:graph:<version>:adj:<stop-id>``: JSON ``[[to, weight_s, route_id, mode], ...]``;
  every node has one, ``[]`` when it has no outgoing edge.

Keys of a version are never modified once written; a reader that resolved a version can read
it until retention (which keeps the newest N, so the previous active survives) collects it.

On a Redis Cluster (``[redis] cluster``) the version segment is a hash tag, ``{<version>}``
(``<prefix>:graph:{graph-v3}:adj:S1``): all keys of one version share a slot, so the same
pipelined MSETs, the one-round-trip MGET and UNLINK work unchanged, on the node that serves
that slot; successive versions land on different nodes. The pointer and the registry are
keys of their own (other slots), and so is the owner key: the pointer switch is a Lua CAS
on the pointer key alone, with completeness (meta) checked before it and again after it, and
the owner is claimed by a script on the owner key alone. Measured against spreading a
version over every slot in bench/bench_graph_cluster.py; the limit (a version must fit one
node's memory) is in docs/build-graph.md "Redis Cluster".
"""

from __future__ import annotations

import json
import logging
import math
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from ..errors import EXIT_CONFIG, ConfigError, PipelineError, RedisError, service_error
from ..settings import quoted

FORMAT = "adjacency-json/1"
_UNLINK_BATCH = 1000
_MSET_BATCH = 500  # keys per MSET command inside one pipelined flush
_SCAN_COUNT = 10_000  # buckets per SCAN when counting a version's keys: fewer round trips


class GraphLookupError(PipelineError):
    """A graph query cannot be answered: no active graph, unknown stop, no path (exit 1)."""


class PrefixOwned(ConfigError):
    """The Redis prefix holds another database's graphs (exit 78): nothing is written."""

    def __init__(self, prefix: str, owner: str, identity: str) -> None:
        super().__init__(
            f"Redis prefix {prefix!r} holds the graphs of another database (deployment "
            f"{owner}; this database is {identity}): give each database a prefix of its own, "
            "[redis] prefix (PIPELINE_REDIS_PREFIX)")
        self.owner = owner


class RedisRefused(RedisError):
    """Redis refuses what every run of this configuration asks: a password missing or wrong,
    a read-only replica, a command renamed away or not granted to the ACL user. A setting to
    fix, not an outage the next run outlives (exit 78)."""

    exit_code = EXIT_CONFIG


class GraphVersionGone(RedisError):
    """The version a reader resolved was collected meanwhile; resolve the pointer again."""


@dataclass(frozen=True)
class Edge:
    """One outgoing edge of a node."""

    to: str
    weight_s: float
    route_id: str
    mode: str

    def to_json(self) -> dict[str, Any]:
        return {"to": self.to, "weight_s": self.weight_s, "route_id": self.route_id,
                "mode": self.mode}


def encode_adjacency(edges: list[list[Any]]) -> str:
    """The stored form of one node's edges: ``[[to, weight_s, route_id, mode], ...]``."""
    return json.dumps(edges, separators=(",", ":"), ensure_ascii=False)


def decode_adjacency(raw: bytes | str) -> list[Edge]:
    """ValueError unless ``raw`` is the stored form with finite weights of at least 0: Python's
    json reads NaN and Infinity, which no JSON output (``--json``, the GeoJSON export) may hold
    and which Dijkstra cannot weigh."""
    try:
        edges = [Edge(str(e[0]), float(e[1]), str(e[2]), str(e[3])) for e in json.loads(raw)]
    except (TypeError, IndexError, KeyError) as exc:
        raise ValueError(str(exc)) from None
    if not all(math.isfinite(e.weight_s) and e.weight_s >= 0 for e in edges):
        raise ValueError("a weight that is not a finite number of seconds")
    return edges


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


# redis-py's cluster client raises RedisClusterException, which is no RedisError, for a
# server without cluster support ("Cluster mode is not enabled on this node").
_DRIVER_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)


def connect(url: str, *, cluster: bool = False, socket_timeout: float = 10.0,
            connect_timeout: float = 5.0) -> redis.Redis:
    """A client for ``url``: a ``RedisCluster`` (typed as ``redis.Redis``, whose commands it
    shares) when ``cluster``. A server's client connects lazily; a cluster client reads the
    slot map at once (RedisError if it cannot). Every Redis client of the pipeline is made here."""
    if cluster:
        try:
            client: Any = redis.RedisCluster.from_url(
                url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout)
        except _DRIVER_ERRORS as exc:  # the cluster client asks for slots at once
            raise service_error(RedisError, "Redis Cluster", _url_endpoint(url),
                                "failed while reading the cluster slots", exc) from None
        return client
    return redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                socket_connect_timeout=connect_timeout)


def _url_endpoint(url: str) -> str:
    return url.split("@")[-1].split("://")[-1].split("/")[0] or "?"


def endpoint(client: redis.Redis) -> str:
    """``host:port`` (or socket path) of a client, never its password."""
    if isinstance(client, redis.RedisCluster):
        node = client.get_default_node()
        return f"{node.host}:{node.port}" if node else "?"
    kw = client.connection_pool.connection_kwargs
    return str(kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', 6379)}")


@contextmanager
def wrap_errors(client: redis.Redis, what: str) -> Iterator[None]:
    """Turn redis-py errors raised inside the block into RedisError naming the server."""
    try:
        yield
    except redis.exceptions.TimeoutError as exc:  # a server that accepts and never answers
        seconds = _socket_timeout(client)
        # Connecting (rediss:// to a plain server times out in the TLS handshake, which
        # service_error names from the cause), or no limit: the driver's words.
        if seconds is None or "connecting" in str(exc):
            raise service_error(RedisError, "Redis", endpoint(client), f"failed while {what}",
                                exc) from None
        raise service_error(RedisError, "Redis", endpoint(client),
                            f"did not answer within {seconds:g} s while {what}") from None
    except _DRIVER_ERRORS as exc:
        explained = _explain(client, exc, what)
        if explained is None:
            raise service_error(RedisError, "Redis", endpoint(client), f"failed while {what}",
                                exc) from None
        logging.getLogger("pipeline.services").debug(
            "Redis %s failed while %s: %s: %s", endpoint(client), what, type(exc).__name__, exc)
        raise explained from None


def _explain(client: redis.Redis, exc: Exception, what: str) -> RedisError | None:
    """What a Redis set up by someone else refused while ``what``, and the setting to change,
    in place of the driver's text (which names HELLO, a script's source or the pipeline's
    MSET); None for anything else."""
    text = str(exc).split(" of pipeline caused error: ")[-1]  # redis-py's pipeline preamble
    code = getattr(exc, "status_code", None) or text.split(" ", 1)[0]
    server = f"Redis {endpoint(client)}"
    if isinstance(exc, redis.exceptions.AuthenticationError) and code == "NOAUTH":
        return RedisRefused(f"{server} requires a password and [redis] url gives none (NOAUTH) "
                            f"while {what}: put user:password@ in the URL before the host "
                            "(user 'default' for requirepass)")
    if isinstance(exc, redis.exceptions.AuthenticationError) and code == "WRONGPASS":
        return RedisRefused(f"{server} refused the user name or password of [redis] url "
                            "(WRONGPASS: a wrong password, or the user is unknown or disabled) "
                            f"while {what}")
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        info = _info(client, "replication")
        primary = (f" of {info['master_host']}:{info['master_port']}"
                   if "master_host" in info else "")
        return RedisRefused(f"{server} is a read-only replica{primary} (READONLY) and refused a "
                            f"write while {what}: point [redis] url at the primary")
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return RedisRefused(f"{server} refused the ACL user of [redis] url (NOPERM: "
                            f"{text.rstrip('.')}) while {what}: grant it ~<prefix>:* +@read "
                            "+@write +@scripting, and +select for a database other than 0 "
                            "(docs/build-graph.md)")
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        info = _info(client, "memory")
        limit = (f" (maxmemory {info.get('maxmemory_human', '?')}, policy "
                 f"{info.get('maxmemory_policy', '?')})" if info else "")
        return RedisError(f"{server} is out of memory{limit} while {what}: raise maxmemory, or "
                          "lower [graph] retention (each kept version holds memory)")
    if text.startswith("unknown command"):  # rename-command NAME "" on a managed Redis
        name = text.split(",")[0].removeprefix("unknown command").strip()
        return RedisRefused(f"{server} does not know the command {name} (renamed or disabled "
                            f"on the server) while {what}: the pipeline needs it "
                            "(docs/build-graph.md)")
    return None


def eviction_risk(info: dict[str, Any]) -> str | None:
    """What an ``INFO memory`` answer means for graph keys: a sentence when Redis may evict
    them (a memory limit with an ``allkeys-*`` policy; graph keys have no TTL, so volatile-*
    spares them), else None. Doctor fails on it, status warns."""
    policy, limit = str(info.get("maxmemory_policy", "")), int(info.get("maxmemory", 0) or 0)
    if not (limit and policy.startswith("allkeys-")):
        return None
    return (f"has maxmemory-policy {policy} with maxmemory {limit / 2**20:.0f} MiB: when it "
            "fills up it evicts any key, a graph's included, and the routing API misses stops "
            "in silence; set maxmemory-policy noeviction (build-graph then fails loudly) or "
            "maxmemory 0 (no limit)")


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    """INFO ``section`` for an error message; empty when the server refuses it (an ACL
    without @dangerous) or cannot answer."""
    try:
        info: dict[str, Any] = client.info(section)
    except _DRIVER_ERRORS:
        return {}
    return info


def _socket_timeout(client: redis.Redis) -> float | None:
    """The seconds a call of ``client`` waits for an answer (None: no limit)."""
    if isinstance(client, redis.RedisCluster):
        kw = client.nodes_manager.connection_kwargs
    else:
        kw = client.connection_pool.connection_kwargs
    seconds = kw.get("socket_timeout")
    return round(float(seconds), 1) if seconds else None


class GraphReader:
    """The read side, as the routing API does it: resolve the active version once, then read
    only that version's keys (they never change, so the answer is never a mix of versions)."""

    def __init__(self, client: redis.Redis, prefix: str = "pipeline") -> None:
        self.client = client
        self.prefix = prefix
        self.cluster = isinstance(client, redis.RedisCluster)

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, "graph", *parts))

    def version_segment(self, version: str) -> str:
        """How ``version`` is spelled in its keys: a hash tag on a cluster (one slot)."""
        return f"{{{version}}}" if self.cluster else version

    def version_client(self, version: str) -> redis.Redis:
        """The client to pipeline a version's multi-key commands on: on a cluster, the node
        serving the version's slot (redis-py's cluster pipeline refuses MSET and MGET)."""
        if not self.cluster:
            return self.client
        node = self.client.get_node_from_key(self.meta_key(version))  # type: ignore[attr-defined]
        return node.redis_connection

    @property
    def pointer_key(self) -> str:
        return self.key("active")

    @property
    def owner_key(self) -> str:
        return self.key("owner")

    def owner(self) -> str | None:
        """The identity of the database that claimed the prefix; None while unclaimed."""
        with wrap_errors(self.client, "reading the owner of the graph prefix"):
            raw = self.client.get(self.owner_key)
        return None if raw is None else _text(raw)

    def check_owner(self, identity: str) -> str | None:
        """The prefix's owner (None while unclaimed); PrefixOwned when it is not ``identity``.
        Reads only: a dry run, status and doctor ask, the writing commands :meth:`claim`."""
        owner = self.owner()
        if owner is not None and owner != identity:
            raise PrefixOwned(self.prefix, owner, identity)
        return owner

    def meta_key(self, version: str) -> str:
        return self.key(self.version_segment(version), "meta")

    def adj_key(self, version: str, stop_id: str) -> str:
        return self.key(self.version_segment(version), "adj", stop_id)

    def active_version(self) -> str | None:
        with wrap_errors(self.client, "reading the active graph pointer"):
            raw = self.client.get(self.pointer_key)
        return raw.decode() if isinstance(raw, bytes) else raw

    def require_active(self) -> str:
        version = self.active_version()
        if version is None:
            raise GraphLookupError(
                f"no active graph in Redis ({self.pointer_key} is unset); "
                "run `pipeline build-graph`")
        return version

    def require_version(self, version: str | None) -> str:
        """``version`` if Redis holds it (its meta), else the active one: what an operator's
        query reads. GraphLookupError names a version that is not there."""
        if version is None:
            return self.require_active()
        if not self.has_meta(version):
            raise GraphLookupError(f"graph version {quoted(version)} is not in Redis (never "
                                   "written, or collected by retention: `pipeline graph list` "
                                   "says which are)")
        return version

    def meta(self, version: str) -> dict[str, str] | None:
        with wrap_errors(self.client, f"reading the metadata of graph {version}"):
            raw = self.client.hgetall(self.meta_key(version))
        if not raw:
            return None
        return {_text(k): _text(v) for k, v in raw.items()}

    def has_meta(self, version: str) -> bool:
        """Whether ``version``'s meta exists: written last, removed first, so this tells a
        version being written or collected from one that was written (one EXISTS). Keys lost
        afterwards (eviction, a stray DEL) need :meth:`is_complete`."""
        with wrap_errors(self.client, f"checking graph {version}"):
            return bool(self.client.exists(self.meta_key(version)))

    def eviction_risk(self) -> str | None:
        """:func:`eviction_risk` of this server (on a cluster, the node of the URL); None
        when the ACL user may not read INFO (build-graph needs none: nothing to warn of)."""
        try:
            with wrap_errors(self.client, "reading INFO memory"):
                info = self.client.info("memory")
        except RedisRefused:
            return None
        risk = eviction_risk(info) if isinstance(info, dict) else None
        return None if risk is None else f"Redis {endpoint(self.client)} {risk}"

    def missing_keys(self, version: str) -> int | None:
        """How many adjacency keys ``version`` lacks against the ``nodes`` its meta records
        (evicted, deleted by hand); None when it has no meta (never written, or collected).

        Exact: one SCAN, on the server holding the version, of the version's ``adj`` keys.
        It walks that server's keyspace (about 0.3 s per 100 k nodes); one key per node
        leaves no cheaper exact count, so status and build-graph call it once or twice a run
        and the read path never does.
        """
        meta = self.meta(version)
        if meta is None:
            return None
        try:
            nodes = int(meta.get("nodes", ""))
        except ValueError:  # no count recorded: nothing to compare with
            return 0
        pattern = _glob_escape(self.adj_key(version, "")) + "*"
        with wrap_errors(self.client, f"counting the keys of graph {version}"):
            client = self.version_client(version)
            present = set(client.scan_iter(match=pattern, count=_SCAN_COUNT))
        return max(0, nodes - len(present))

    def is_complete(self, version: str) -> bool:
        """Meta present and every node's adjacency key with it (see :meth:`missing_keys`)."""
        return self.missing_keys(version) == 0

    def neighbors_many(self, version: str, stop_ids: list[str]) -> dict[str, list[Edge] | None]:
        """One round trip for many nodes; ``None`` for a stop that is not in the graph.

        Raises GraphVersionGone when the version itself has been collected meanwhile.
        """
        if not stop_ids:
            return {}
        with wrap_errors(self.client, f"reading neighbours in graph {version}"):
            pipe = self.version_client(version).pipeline(transaction=False)
            pipe.mget([self.adj_key(version, s) for s in stop_ids])
            pipe.exists(self.meta_key(version))
            values, meta_exists = pipe.execute()
        if not meta_exists:
            raise GraphVersionGone(
                f"graph version {version} is not in Redis (never written, or collected by "
                "retention); resolve the active version again")
        found: dict[str, list[Edge] | None] = {}
        for s, v in zip(stop_ids, values, strict=True):
            try:
                found[s] = None if v is None else decode_adjacency(v)
            except ValueError:
                raise RedisError(f"graph version {version} is damaged: the edges of stop "
                                 f"{quoted(s)} are not [[to, weight_s, route_id, mode], ...] "
                                 "with finite weights >= 0; activate or build another "
                                 "version") from None
        return found

    def find_stop(self, version: str, stop_id: str) -> tuple[str, list[Edge]]:
        """(the id as the graph holds it, its edges); GraphLookupError if it is not there.
        An id typed in another Unicode normalization form than the feed wrote ('é' as e and
        a combining accent) finds the stop when only that form is in the graph: they are one
        text, and the exact id, when present, always comes first."""
        forms = list(dict.fromkeys(
            (stop_id, *(unicodedata.normalize(f, stop_id) for f in ("NFC", "NFD")))))
        found = self.neighbors_many(version, forms)
        for form in forms:
            edges = found[form]
            if edges is not None:
                return form, edges
        raise GraphLookupError(f"stop {quoted(stop_id)} is not in graph version {version}")

    def neighbors(self, stop_id: str, version: str | None = None) -> tuple[str, list[Edge]]:
        """(version, edges) of one stop in ``version`` (default: the active one)."""
        version = self.require_version(version)
        return version, self.find_stop(version, stop_id)[1]


class GraphStore(GraphReader):
    """The write side: versions, the atomic pointer switch, retention, cleanup."""

    # Switch only if the pointer still holds what the caller expects ('*' = anything), so a
    # late revert can never clobber someone else's switch. It touches the pointer key alone
    # (a cluster runs a script only on keys of one slot): completeness is checked around it.
    _SWITCH = """
    local cur = redis.call('GET', KEYS[1])
    if ARGV[2] ~= '*' then
      local want = ARGV[2]
      if (cur == false and want ~= '') or (cur ~= false and cur ~= want) then
        return {-1, cur or ''}
      end
    end
    redis.call('SET', KEYS[1], ARGV[1])
    return {1, cur or ''}
    """

    # Set the owner if unset, in one step; the owner it holds afterwards. One key: it runs on
    # a cluster too, on the node of the owner key's slot.
    _CLAIM = """
    local cur = redis.call('GET', KEYS[1])
    if cur then return cur end
    redis.call('SET', KEYS[1], ARGV[1])
    return ARGV[1]
    """

    def __init__(self, client: redis.Redis, prefix: str = "pipeline", *,
                 chunk_size: int = 5000) -> None:
        super().__init__(client, prefix)
        self.chunk_size = max(1, chunk_size)
        self._claim_for: str | None = None  # the identity to claim at the first write
        self._claimed = False

    def claim(self, identity: str) -> None:
        """Make ``identity`` (this database's ``deployment.id``) the prefix's owner if it has
        none, atomically; PrefixOwned (exit 78) if another database owns it. Every command
        that writes or deletes graph keys calls it before its first write: otherwise it would
        take the other database's versions for orphans and delete them, and switch the
        pointer its routing API reads. A prefix with graphs and no owner (written before
        owners existed) goes to the first database that claims it."""
        with wrap_errors(self.client, "claiming the graph prefix"):
            owner = _text(self.client.eval(self._CLAIM, 1, self.owner_key, identity))
        if owner != identity:
            raise PrefixOwned(self.prefix, owner, identity)

    def claim_before_writing(self, identity: str) -> None:
        """Check the owner now (reads only: PrefixOwned, exit 78, before any work) and
        :meth:`claim` the prefix for ``identity`` just before this store's first write or
        delete (:meth:`ensure_claimed`). A run that writes nothing (a noop, a build that
        fails validation) leaves an unclaimed prefix unclaimed: a first failed build on a
        shared Redis must not take the prefix for its database. Each call arms a new claim
        (one per run: the owner key may have been deleted by hand meanwhile)."""
        self.check_owner(identity)
        self._claim_for, self._claimed = identity, False

    def ensure_claimed(self) -> None:
        """Make the claim :meth:`claim_before_writing` armed, once; every method that writes
        or deletes keys calls it first, so another database claiming the prefix after the
        check stops the run before its first write. Nothing to do for a store not armed."""
        if self._claim_for is not None and not self._claimed:
            self.claim(self._claim_for)
            self._claimed = True

    @property
    def registry_key(self) -> str:
        return self.key("versions")

    def registered(self) -> list[str]:
        """Versions present in Redis, newest (written or activated last) first."""
        with wrap_errors(self.client, "reading the graph registry"):
            members = self.client.zrevrange(self.registry_key, 0, -1)
        return [_text(m) for m in members]

    def is_registered(self, version: str) -> bool:
        with wrap_errors(self.client, "reading the graph registry"):
            return self.client.zscore(self.registry_key, version) is not None

    def write_version(
        self,
        version: str,
        adjacency: Iterable[tuple[str, str]],
        meta: dict[str, Any],
        *,
        after_chunk: Callable[[int], None] | None = None,
    ) -> int:
        """Write ``(stop_id, encoded adjacency)`` pairs, then the meta hash; returns the keys.

        The version is registered before its first key, so a crash mid-write leaves a trace
        that :meth:`cleanup_orphans` finds. ``after_chunk(keys_written)`` runs after every
        pipelined flush (progress, and fault injection in tests).
        """
        self.ensure_claimed()
        with wrap_errors(self.client, f"registering graph {version}"):
            self.client.zadd(self.registry_key, {version: time.time()})
        written = 0
        batch: dict[str, str] = {}
        for stop_id, adj in adjacency:
            batch[self.adj_key(version, stop_id)] = adj
            if len(batch) >= self.chunk_size:
                written += self._flush(version, batch)
                batch = {}
                if after_chunk is not None:
                    after_chunk(written)
        if batch:
            written += self._flush(version, batch)
            if after_chunk is not None:
                after_chunk(written)
        fields: dict[Any, Any] = {
            k: "" if v is None else str(v) for k, v in meta.items()}
        fields.setdefault("format", FORMAT)
        fields.setdefault("version", version)
        with wrap_errors(self.client, f"writing the metadata of graph {version}"):
            self.client.hset(self.meta_key(version), mapping=fields)
        return written

    def _flush(self, version: str, batch: dict[str, str]) -> int:
        items = list(batch.items())
        with wrap_errors(self.client, f"writing graph {version}"):
            pipe = self.version_client(version).pipeline(transaction=False)
            for i in range(0, len(items), _MSET_BATCH):
                pipe.mset(dict(items[i:i + _MSET_BATCH]))
            pipe.execute()
        return len(items)

    def switch_active(self, version: str, *, expected: str | None | object = "*") -> str | None:
        """Point ``<prefix>:graph:active`` at ``version`` in one atomic step; returns the
        previous version. ``expected`` (a version, None for "unset", or "*") guards the swap."""
        want = "*" if expected == "*" else ("" if expected is None else str(expected))
        self.ensure_claimed()
        if not self.has_meta(version):  # callers checked its keys; this guards collection
            raise RedisError(f"graph version {version} is incomplete in Redis; not activated")
        with wrap_errors(self.client, f"switching the active graph to {version}"):
            code, previous = self.client.eval(self._SWITCH, 1, self.pointer_key, version, want)
        prev = previous.decode() if isinstance(previous, bytes) else previous
        if code == -1:
            raise RedisError(f"the active graph changed meanwhile (now {prev or 'unset'}); "
                             f"{version} was not activated")
        if not self.has_meta(version):  # collected between the check and the switch
            self._revert(version, prev or None)
            raise RedisError(f"graph version {version} was removed while it was activated; "
                             f"the pointer is back on {prev or 'nothing'}")
        with wrap_errors(self.client, "recording the activation in the graph registry"):
            self.client.zadd(self.registry_key, {version: time.time()})
        return prev or None

    def _revert(self, version: str, previous: str | None) -> None:
        if previous is None:
            self.clear_active(expected=version)
            return
        with wrap_errors(self.client, "reverting the active graph pointer"):
            self.client.eval(self._SWITCH, 1, self.pointer_key, previous, version)

    _CLEAR = """
    if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
    return 0
    """

    def clear_active(self, *, expected: str) -> bool:
        """Unset the pointer if it still holds ``expected`` (undoing a first-ever switch)."""
        self.ensure_claimed()
        with wrap_errors(self.client, "clearing the active graph pointer"):
            return bool(self.client.eval(self._CLEAR, 1, self.pointer_key, expected))

    def delete_version(self, version: str) -> int:
        """Remove every key of ``version`` with UNLINK in batches; returns the keys removed.

        The meta key goes first (the version stops counting as complete), the registry entry
        last (a crash midway leaves it registered, so the next cleanup finishes the job).
        """
        self.ensure_claimed()
        removed = 0
        pattern = _glob_escape(self.key(self.version_segment(version))) + ":*"
        with wrap_errors(self.client, f"removing graph {version}"):
            removed += int(self.client.unlink(self.meta_key(version)))
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=pattern, count=_UNLINK_BATCH):
                batch.append(key)
                if len(batch) >= _UNLINK_BATCH:
                    removed += int(self.client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(self.client.unlink(*batch))
            self.client.zrem(self.registry_key, version)
        return removed

    def retain(self, keep: int, *, protect: Iterable[str] = ()) -> list[str]:
        """Keep the ``keep`` newest versions (and the active one, and ``protect``); UNLINK the
        rest. Returns the versions removed."""
        versions = self.registered()
        kept = set(versions[:max(1, keep)]) | set(protect)
        active = self.active_version()
        if active:
            kept.add(active)
        removed = [v for v in versions if v not in kept]
        for version in removed:
            self.delete_version(version)
        return removed

    def cleanup_orphans(self, known: set[str]) -> list[str]:
        """Remove registered versions that the database does not know (a crashed or failed
        build), except the active one. Returns the versions removed."""
        active = self.active_version()
        orphans = [v for v in self.registered() if v not in known and v != active]
        for version in orphans:
            self.delete_version(version)
        return orphans

    def version_keys(self, version: str) -> int:
        """How many keys ``version`` has (SCAN; for tests and diagnostics, not the hot path)."""
        pattern = _glob_escape(self.key(self.version_segment(version))) + ":*"
        with wrap_errors(self.client, f"counting the keys of graph {version}"):
            return sum(1 for _ in self.client.scan_iter(match=pattern, count=_UNLINK_BATCH))
