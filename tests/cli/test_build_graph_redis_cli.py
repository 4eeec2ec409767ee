"""build-graph, the graph readers and status against Redis servers set up by someone else: an
ACL user in the URL, another database number and an unusual prefix, a memory limit. Each test
starts a redis-server of its own."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
import redis

from devtools.services import LocalServices
from tests.support.clirunner import Cli
from tests.support.graph_fixtures import seed_network

Conn = psycopg.Connection[dict[str, Any]]
PASSWORD = "Pipe-secret-7"


@pytest.fixture
def cli(run_cli: Cli, full_env: dict[str, str]) -> Cli:
    run_cli.env.update(full_env)
    return run_cli


def test_an_acl_user_limited_to_the_prefix_on_database_5(
        cli: Cli, conn: Conn, services: LocalServices) -> None:
    """The documented grant (``~<prefix>:* +@read +@write +@scripting +select``, no
    @dangerous, no @admin) is enough for build-graph, the readers and status, in database 5,
    under a prefix with the characters validation lets through; the password is in no output,
    log line or stage_runs row."""
    net = seed_network(conn, n_real=8, n_virtual=4, n_routes=12)
    url = services.start_redis_server()
    prefix = "t\\e{n}a:n/t-é%\"'^$!@#(x"
    with redis.Redis.from_url(url) as admin:
        admin.acl_setuser("pipe", enabled=True, passwords=[f"+{PASSWORD}"],
                          keys=[prefix.replace("\\", "\\\\") + ":*"],  # a glob: \\ escaped
                          commands=["+@read", "+@write", "+@scripting", "+select"])
    cli.env.update({"PIPELINE_REDIS_URL": url.replace("redis://", f"redis://pipe:{PASSWORD}@")
                    .removesuffix("/0") + "/5", "PIPELINE_REDIS_PREFIX": prefix})
    a, b = net.routes[0][1], net.routes[0][2]
    outputs = []
    for args in (("build-graph", "-v"), ("build-graph", "--force"), ("graph", "list"),
                 ("graph", "neighbors", a), ("graph", "route", a, b),
                 ("export", "geojson", "graph")):
        result = cli(*args)
        assert result.exit_code == 0, (args, result.output)
        outputs.append(result.output)
    graph = json.loads(cli("status", "--json").stdout)["graph"]
    assert graph["redis_pointer"] == "graph-v2" and graph["consistent"], graph
    with redis.Redis.from_url(url.removesuffix("/0") + "/5") as db5:
        assert db5.get(f"{prefix}:graph:active") == b"graph-v2"
    with redis.Redis.from_url(url) as db0:
        assert db0.dbsize() == 0, sorted(db0.scan_iter())[:8]
    cli.env["PIPELINE_REDIS_URL"] = cli.env["PIPELINE_REDIS_URL"].replace(PASSWORD, "Wrong-8")
    refused = cli("build-graph", "--force", "-v")
    assert refused.exit_code == 78 and "WRONGPASS" in refused.output, refused.output
    runs = conn.execute("SELECT error, result::text AS result FROM stage_runs").fetchall()
    assert len(runs) == 3
    for text in [*outputs, refused.output, json.dumps(runs)]:
        assert PASSWORD not in text and "Wrong-8" not in text


def test_out_of_memory_midway_keeps_the_active_graph(
        cli: Cli, conn: Conn, services: LocalServices) -> None:
    """maxmemory with noeviction, full halfway through a publish: exit 1 with one line naming
    Redis, the limit and what to change; the previous version stays active and readable, and
    the half-written one is removed."""
    net = seed_network(conn, n_real=300, n_virtual=300, n_routes=1500)
    url = services.start_redis_server()
    cli.env["PIPELINE_REDIS_URL"] = url
    assert cli("build-graph").exit_code == 0
    admin = redis.Redis.from_url(url)
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", str(used + 200_000))  # about a third of a version
    admin.config_set("maxmemory-policy", "noeviction")
    result = cli("build-graph", "--force")
    assert result.exit_code == 1, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("pipeline build-graph: error: Redis 127.0.0.1:"), line
    assert "out of memory (maxmemory " in line and "raise maxmemory" in line, line
    prefix = cli.env["PIPELINE_REDIS_PREFIX"]
    assert not list(admin.scan_iter(match=f"{prefix}:graph:graph-v2:*"))
    assert admin.get(f"{prefix}:graph:active") == b"graph-v1"
    assert cli("graph", "neighbors", net.routes[0][1]).exit_code == 0
    graph = json.loads(cli("status", "--json").stdout)["graph"]
    assert graph["redis_pointer"] == "graph-v1" and graph["consistent"], graph
    admin.close()


def test_status_warns_of_a_policy_that_evicts_graph_keys(
        cli: Cli, conn: Conn, services: LocalServices) -> None:
    """maxmemory with an allkeys-* policy evicts graph keys (the pointer included) in silence
    when Redis fills up: status warns before any is lost, not only after; volatile-* spares
    them (graph keys have no TTL), and no limit evicts nothing."""
    seed_network(conn, n_real=8, n_virtual=4, n_routes=12)
    url = services.start_redis_server()
    cli.env["PIPELINE_REDIS_URL"] = url
    assert cli("build-graph").exit_code == 0
    admin = redis.Redis.from_url(url)
    admin.config_set("maxmemory", str(64 * 2**20))
    admin.config_set("maxmemory-policy", "allkeys-lru")
    obj = json.loads(cli("status", "--json").stdout)
    assert obj["graph"]["consistent"], obj["graph"]  # nothing lost yet
    warning = next(p for p in obj["problems"] if p["area"] == "graph")
    assert warning["level"] == "warning", warning
    assert "maxmemory-policy allkeys-lru" in warning["message"], warning
    assert "noeviction" in warning["message"]
    for policy, limit in (("volatile-lru", 64 * 2**20), ("allkeys-lru", 0)):
        admin.config_set("maxmemory-policy", policy)
        admin.config_set("maxmemory", str(limit))
        obj = json.loads(cli("status", "--json").stdout)
        assert not [p for p in obj["problems"] if p["area"] == "graph"], obj["problems"]
    admin.close()
