"""The Redis graph store on a real Redis, a single server and a 3-master cluster: version
layout, the guarded pointer switch, deletion in batches, retention, orphan cleanup and error
wrapping."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devtools.cleanup import drop_prefix
from devtools.services import LocalServices
from pipeline_cli.adapters import graph_store
from pipeline_cli.adapters.graph_store import (
    Edge,
    GraphLookupError,
    GraphStore,
    GraphVersionGone,
    PrefixOwned,
    decode_adjacency,
    encode_adjacency,
)
from pipeline_cli.errors import RedisError
from pipeline_cli.settings import mask_passwords


@pytest.fixture
def client(redis_env: dict[str, str]) -> Iterator[redis.Redis]:
    c = graph_store.connect(redis_env["PIPELINE_REDIS_URL"],
                            cluster=redis_env["PIPELINE_REDIS_CLUSTER"] == "true")
    yield c
    c.close()


@pytest.fixture
def store(client: redis.Redis, redis_prefix: str) -> GraphStore:
    return GraphStore(client, redis_prefix, chunk_size=3)


def adjacency(n: int, tag: str = "") -> list[tuple[str, str]]:
    return [(f"N{i}", encode_adjacency([[f"N{(i + 1) % n}", float(i), f"R{i}{tag}", "bus"]]
                                      if i % 4 else []))
            for i in range(n)]


def write(store: GraphStore, version: str, n: int = 10) -> None:
    store.write_version(version, adjacency(n), {"nodes": n})


def test_encoding_round_trips() -> None:
    raw = encode_adjacency([["B", 12.5, "R1", "bus"], ["Ä:1", 0.0, "R2", "walk"]])
    assert raw == '[["B",12.5,"R1","bus"],["Ä:1",0.0,"R2","walk"]]'
    assert decode_adjacency(raw.encode()) == [Edge("B", 12.5, "R1", "bus"),
                                              Edge("Ä:1", 0.0, "R2", "walk")]


def test_write_in_chunks_then_read(store: GraphStore, client: redis.Redis,
                                   redis_prefix: str) -> None:
    flushed: list[int] = []
    written = store.write_version("graph-v1", adjacency(10), {"nodes": 10},
                                  after_chunk=flushed.append)
    assert written == 10 and flushed == [3, 6, 9, 10]
    assert store.meta("graph-v1") == {"nodes": "10", "format": "adjacency-json/1",
                                      "version": "graph-v1"}
    assert store.registered() == ["graph-v1"]
    segment = "{graph-v1}" if isinstance(client, redis.RedisCluster) else "graph-v1"
    assert client.get(f"{redis_prefix}:graph:{segment}:adj:N0") == b"[]"
    got = store.neighbors_many("graph-v1", ["N1", "N4", "missing"])
    assert got == {"N1": [Edge("N2", 1.0, "R1", "bus")], "N4": [], "missing": None}
    with pytest.raises(GraphLookupError, match="no active graph"):
        store.neighbors("N1")
    store.switch_active("graph-v1")
    assert store.neighbors("N1") == ("graph-v1", [Edge("N2", 1.0, "R1", "bus")])
    with pytest.raises(GraphLookupError, match="'zz' is not in graph version graph-v1"):
        store.neighbors("zz")


def test_switch_refuses_incomplete_versions_and_checks_expected(
        store: GraphStore, client: redis.Redis) -> None:
    store.client.set(store.adj_key("graph-v1", "N0"), "[]")  # keys but no meta: incomplete
    with pytest.raises(RedisError, match="incomplete"):
        store.switch_active("graph-v1")
    assert store.active_version() is None
    write(store, "graph-v1")
    write(store, "graph-v2")
    assert store.switch_active("graph-v1", expected=None) is None
    with pytest.raises(RedisError, match="changed meanwhile"):
        store.switch_active("graph-v2", expected=None)
    assert store.switch_active("graph-v2", expected="graph-v1") == "graph-v1"
    assert store.active_version() == "graph-v2"
    assert not store.clear_active(expected="graph-v1")
    assert store.clear_active(expected="graph-v2") and store.active_version() is None


def test_delete_version_unlinks_every_key_in_batches(store: GraphStore, client: redis.Redis,
                                                     redis_prefix: str) -> None:
    write(store, "graph-v1", 2500)  # more than one UNLINK batch
    write(store, "graph-v10", 5)  # a version whose name extends the other's must survive
    assert store.version_keys("graph-v1") == 2501
    assert store.delete_version("graph-v1") == 2501
    assert store.version_keys("graph-v1") == 0
    assert store.registered() == ["graph-v10"] and store.is_complete("graph-v10")
    with pytest.raises(GraphVersionGone):
        store.neighbors_many("graph-v1", ["N1"])


def test_lost_adjacency_keys_make_a_version_incomplete(store: GraphStore,
                                                       client: redis.Redis) -> None:
    """Keys evicted or deleted while the meta stayed counted as complete: status said ok."""
    write(store, "graph-v1", 40)
    write(store, "graph-v10", 5)  # a version whose name extends the other's is not counted
    assert store.missing_keys("graph-v1") == 0 and store.is_complete("graph-v1")
    for i in range(0, 40, 3):
        client.delete(store.adj_key("graph-v1", f"N{i}"))
    assert store.missing_keys("graph-v1") == 14 and not store.is_complete("graph-v1")
    assert store.has_meta("graph-v1") and store.is_complete("graph-v10")
    assert store.missing_keys("graph-v9") is None and not store.is_complete("graph-v9")


def test_retention_keeps_newest_and_active(store: GraphStore) -> None:
    for v in ("graph-v1", "graph-v2", "graph-v3", "graph-v4"):
        write(store, v)
    store.switch_active("graph-v1")  # re-scores v1 as the newest (a rollback)
    assert store.retain(2) == ["graph-v3", "graph-v2"]
    assert store.registered() == ["graph-v1", "graph-v4"]
    write(store, "graph-v5")
    assert store.retain(2, protect=["graph-v4"]) == []
    assert store.retain(1) == ["graph-v4"]
    assert set(store.registered()) == {"graph-v5", "graph-v1"}  # v1 is active


def test_cleanup_orphans_spares_known_and_active(store: GraphStore) -> None:
    for v in ("graph-v1", "graph-v2", "graph-v3"):
        write(store, v)
    store.switch_active("graph-v2")
    assert store.cleanup_orphans({"graph-v1"}) == ["graph-v3"]
    assert set(store.registered()) == {"graph-v1", "graph-v2"}


def test_the_first_claim_owns_the_prefix(store: GraphStore, client: redis.Redis) -> None:
    """One prefix, one database: a claim sets the owner only where none is, atomically (one
    script on the owner key alone, which a cluster runs on that key's node)."""
    assert store.owner() is None and store.check_owner("db-a") is None
    store.claim("db-a")
    store.claim("db-a")  # again: still ours
    assert store.owner() == "db-a" == client.get(store.owner_key).decode()
    with pytest.raises(PrefixOwned, match=(
            f"^Redis prefix '{store.prefix}' holds the graphs of another database "
            r"\(deployment db-a; this database is db-b\): give each database a prefix of its "
            r"own, \[redis\] prefix \(PIPELINE_REDIS_PREFIX\)$")) as caught:
        store.claim("db-b")
    assert caught.value.exit_code == 78 and caught.value.owner == "db-a"
    with pytest.raises(PrefixOwned):
        store.check_owner("db-b")
    assert store.owner() == "db-a" and store.check_owner("db-a") == "db-a"
    assert store.owner_key == f"{store.prefix}:graph:owner"


def test_an_armed_claim_waits_for_the_first_write(store: GraphStore,
                                                  client: redis.Redis) -> None:
    """build-graph checks the owner before any work and claims the prefix only at its first
    write: a run that writes nothing (a noop, a failed validation) leaves the prefix free.
    Another database claiming it between the check and the write stops that write."""
    store.claim_before_writing("db-a")
    store.registered(), store.active_version(), store.missing_keys("graph-v1")  # reads only
    assert store.owner() is None
    write(store, "graph-v1")
    assert store.owner() == "db-a"
    with pytest.raises(PrefixOwned):  # another database's run stops at its check
        GraphStore(client, store.prefix).claim_before_writing("db-b")
    client.delete(store.owner_key)  # handed over by hand: each run arms a claim of its own
    store.claim_before_writing("db-b")
    client.set(store.owner_key, "db-c")  # db-c claims between db-b's check and first write
    for attempt in (lambda: write(store, "graph-v2"), lambda: store.switch_active("graph-v1"),
                    lambda: store.delete_version("graph-v1"),
                    lambda: store.clear_active(expected="graph-v1")):
        with pytest.raises(PrefixOwned, match="deployment db-c; this database is db-b"):
            attempt()
    assert store.registered() == ["graph-v1"] and store.active_version() is None
    assert store.is_complete("graph-v1") and not store.is_registered("graph-v2")
    assert store.owner() == "db-c"


def test_glob_characters_in_versions_are_escaped(store: GraphStore) -> None:
    write(store, "v[1]")
    write(store, "v1")
    assert store.delete_version("v[1]") == 11
    assert store.version_keys("v1") == 11


def test_unreachable_redis_raises_redis_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5,
                         retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(RedisError, match="Redis .* failed while reading the active graph"):
            GraphStore(client, "x").active_version()
        with pytest.raises(RedisError, match="writing graph v1|registering graph v1"):
            GraphStore(client, "x").write_version("v1", adjacency(2), {})
    finally:
        client.close()


def test_on_a_cluster_a_version_is_one_slot_and_gc_finds_it(redis_cluster_url: str,
                                                             redis_prefix: str) -> None:
    client = graph_store.connect(redis_cluster_url, cluster=True)
    try:
        assert isinstance(client, redis.RedisCluster)
        store = GraphStore(client, redis_prefix, chunk_size=50)
        for v in ("graph-v1", "graph-v2", "graph-v3"):
            write(store, v, 120)
        for v in ("graph-v1", "graph-v2", "graph-v3"):  # every key of a version on one node
            per_node = [sum(1 for _ in node.redis_connection.scan_iter(
                match=f"{redis_prefix}:graph:{{{v}}}:*", count=1000))
                for node in client.get_primaries()]
            assert sorted(per_node) == [0, 0, 121], (v, per_node)
        store.switch_active("graph-v3")
        assert store.neighbors("N1")[1] == [Edge("N2", 1.0, "R1", "bus")]
        assert store.retain(1) == ["graph-v2", "graph-v1"]  # SCAN reaches every node
        assert store.version_keys("graph-v1") == store.version_keys("graph-v2") == 0
        assert store.version_keys("graph-v3") == 121
    finally:
        drop_prefix(client, redis_prefix)
        client.close()


def test_cluster_mode_against_a_single_server_is_a_redis_error(redis_url: str) -> None:
    # redis-py's RedisClusterException is no RedisError: status --check printed a traceback.
    with pytest.raises(RedisError, match="Cluster mode is not enabled"):
        graph_store.connect(redis_url, cluster=True)


# ------------------------------------------------- Redis URLs as operators write them


def test_an_acl_user_and_a_database_number_in_the_url(redis_url: str,
                                                      redis_prefix: str) -> None:
    """redis://user:password@host:port/3: the graph goes to database 3 as that ACL user (a
    password with '@', ':', '/' and '%' percent-encoded); a wrong password is one line
    without it."""
    from urllib.parse import quote, urlsplit

    admin = redis.Redis.from_url(redis_url)
    user, password = f"{redis_prefix}-user", "Us@r:p/w%Secret1"
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=[f"{redis_prefix}*"],
                      commands=["+@all"])
    where = urlsplit(redis_url).netloc.rsplit("@", 1)[-1]
    good = f"redis://{user}:{quote(password, safe='')}@{where}/3"
    client = graph_store.connect(good, socket_timeout=5.0)
    try:
        GraphStore(client, redis_prefix).claim("deployment-a")
        for number, owner in ((3, b"deployment-a"), (0, None)):
            with redis.Redis.from_url(f"redis://{where}/{number}") as plain:
                assert plain.get(f"{redis_prefix}:graph:owner") == owner
        wrong = graph_store.connect(f"redis://{user}:wrongSecret2@{where}/3", socket_timeout=5.0)
        with pytest.raises(RedisError) as err:
            GraphStore(wrong, redis_prefix).owner()
        wrong.close()
        assert "WRONGPASS" in str(err.value) and err.value.exit_code == 78
        assert "Secret" not in str(err.value) and "\n" not in str(err.value)
    finally:
        client.close()
        with redis.Redis.from_url(f"redis://{where}/3") as plain:
            drop_prefix(plain, redis_prefix)
        admin.acl_deluser(user)
        admin.close()


def test_rediss_against_a_server_without_tls_says_so(redis_url: str) -> None:
    """rediss:// to a plain Redis: the TLS handshake gets no answer; the error said only 'timed
    out', as for a server that is down."""
    from urllib.parse import urlsplit

    where = urlsplit(redis_url).netloc.rsplit("@", 1)[-1]
    client = graph_store.connect(f"rediss://{where}/0", socket_timeout=1.0, connect_timeout=1.0)
    try:
        with pytest.raises(RedisError) as err:
            GraphStore(client, "x").active_version()
    finally:
        client.close()
    assert "TLS" in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_unix_socket_url(tmp_path: Path) -> None:
    """unix:///path/redis.sock (the test Redis has no socket: a server of its own here)."""
    import shutil
    import subprocess
    import time

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("no redis-server")
    path = f"{tmp_path}/redis.sock"
    server = subprocess.Popen([exe, "--port", "0", "--unixsocket", path, "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with socket.socket(socket.AF_UNIX) as probe:
                if probe.connect_ex(path) == 0:
                    break
            time.sleep(0.05)
        client = graph_store.connect(f"unix://{path}?db=2")
        GraphStore(client, "p").claim("deployment-a")
        assert GraphStore(client, "p").owner() == "deployment-a"
        assert graph_store.endpoint(client) == path
        client.close()
    finally:
        server.terminate()
        server.wait(10)


# --------------------------------------- Redis set up by someone else (managed, ACL, replica)
# Each test starts a redis-server of its own with the option under test.


def _own_redis(services: LocalServices, *args: str) -> tuple[str, redis.Redis]:
    url = services.start_redis_server(args=args)
    return url, redis.Redis.from_url(url)


def test_a_managed_redis_without_config_keys_flushdb_script_debug(
        services: LocalServices) -> None:
    """A managed Redis renames CONFIG, KEYS, FLUSHDB, SCRIPT and DEBUG away: publishing,
    switching, reading, retention and deletion use none of them."""
    args = [a for c in ("CONFIG", "KEYS", "FLUSHDB", "SCRIPT", "DEBUG")
            for a in ("--rename-command", c, "")]
    url, admin = _own_redis(services, *args)
    store = GraphStore(graph_store.connect(url), "p", chunk_size=3)
    store.claim_before_writing("deployment-a")
    for version in ("graph-v1", "graph-v2", "graph-v3"):
        write(store, version)
        store.switch_active(version)
    assert store.retain(2) == ["graph-v1"]
    assert store.is_complete("graph-v3") and store.neighbors("N1")[0] == "graph-v3"
    assert store.delete_version("graph-v2") == 11
    admin.close()


def test_a_password_missing_or_wrong_is_one_line_naming_the_url(
        services: LocalServices) -> None:
    """requirepass: a URL without the password (NOAUTH) and one with a wrong password
    (WRONGPASS) fail with one line that says which, never the password, exit 78: a setting
    to fix, not an outage (the driver's text was about HELLO)."""
    url, admin = _own_redis(services)
    admin.config_set("requirepass", "Secret-pw-1")
    for given, expect in ((url, "requires a password and [redis] url gives none"),
                          (url.replace("redis://", "redis://:Wrong-pw-2@"), "WRONGPASS")):
        with pytest.raises(RedisError) as err:
            GraphStore(graph_store.connect(given), "p").owner()
        text = str(err.value)
        assert expect in text and "HELLO" not in text, text
        assert "Secret-pw-1" not in text and "Wrong-pw-2" not in text and "\n" not in text
        assert mask_passwords(text) == text, text  # no hint the log masks into ***
        assert err.value.exit_code == 78
    admin.close()


def test_a_read_only_replica_is_named_with_its_primary(services: LocalServices) -> None:
    """[redis] url naming a replica (replica-read-only yes, the default): the first write
    fails with one line that says the server is a replica and names its primary, exit 78."""
    primary, _ = _own_redis(services)
    replica_url, replica = _own_redis(services, "--repl-diskless-load", "swapdb")  # no file
    port = int(primary.rsplit(":", 1)[1].split("/")[0])
    replica.replicaof("127.0.0.1", port)
    with pytest.raises(RedisError) as err:
        GraphStore(graph_store.connect(replica_url), "p").claim("deployment-a")
    text = str(err.value)
    assert "is a read-only replica of 127.0.0.1:" + str(port) in text, text
    assert "[redis] url" in text and "script" not in text and "\n" not in text
    assert err.value.exit_code == 78
    replica.close()


def test_eval_renamed_or_not_granted_names_the_command(services: LocalServices) -> None:
    """The owner claim and the pointer switch are Lua scripts: a Redis with EVAL renamed
    away, or an ACL user without it, fails with one line naming EVAL (not the script's
    text), exit 78."""
    url, admin = _own_redis(services, "--rename-command", "EVAL", "")
    with pytest.raises(RedisError) as err:
        GraphStore(graph_store.connect(url), "p").claim("deployment-a")
    text = str(err.value)
    assert "does not know the command 'EVAL'" in text and "redis.call" not in text, text
    assert err.value.exit_code == 78
    admin.close()

    url, admin = _own_redis(services)
    admin.acl_setuser("pipe", enabled=True, passwords=["+Secret-pw-3"], keys=["p:*"],
                      commands=["+@read", "+@write"])
    limited = graph_store.connect(url.replace("redis://", "redis://pipe:Secret-pw-3@"))
    with pytest.raises(RedisError) as err:
        GraphStore(limited, "p").claim("deployment-a")
    text = str(err.value)
    assert "NOPERM" in text and "'eval'" in text and "+@scripting" in text, text
    assert "Secret-pw-3" not in text and err.value.exit_code == 78
    admin.acl_setuser("pipe", commands=["+@scripting"])  # the documented grant: it works
    GraphStore(limited, "p").claim("deployment-a")
    admin.close()


def test_out_of_memory_names_the_limit_and_what_to_do(services: LocalServices) -> None:
    """maxmemory with noeviction: a write past the limit is one line naming Redis, the
    limit and the settings to change (not the pipeline's MSET), exit 1."""
    url, admin = _own_redis(services)
    store = GraphStore(graph_store.connect(url), "p", chunk_size=500)
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", str(used + 100_000))
    with pytest.raises(RedisError) as err:
        store.write_version("graph-v1", [(f"N{i}", "x" * 200) for i in range(5000)], {})
    text = str(err.value)
    assert "out of memory (maxmemory " in text and "policy noeviction" in text, text
    assert "raise maxmemory" in text and "MSET" not in text and "\n" not in text
    assert err.value.exit_code == 1
    admin.close()
