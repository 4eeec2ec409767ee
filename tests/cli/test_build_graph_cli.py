"""`pipeline build-graph` and `pipeline graph ...` through the CLI edge: JSON shapes, exit codes,
the lock, and the installed script."""

from __future__ import annotations

import itertools
import json
import unicodedata
from typing import Any

import psycopg
import pytest

from devtools.odata_server import ODataServer, sample_network
from pipeline_cli import db
from pipeline_cli.modes import canonical
from tests.support.clirunner import Cli
from tests.support.graph_fixtures import (
    Network,
    add_dataset,
    add_generation,
    add_virtual_route,
    seed_network,
)

Conn = psycopg.Connection[dict[str, Any]]


@pytest.fixture
def cli(run_cli: Cli, full_env: dict[str, str], redis_env: dict[str, str]) -> Cli:
    """Every test here runs against a single Redis and against a 3-master Redis Cluster."""
    run_cli.env.update(full_env)
    run_cli.env.update(redis_env)
    return run_cli


@pytest.fixture
def net(conn: Conn) -> Network:
    return seed_network(conn, isolated_real=1)


def test_build_graph_json_then_noop(cli: Cli, net: Network) -> None:
    result = cli("build-graph", "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["status"] == "success" and obj["graph_version"] == "graph-v1"
    assert obj["nodes"] == len(net.nodes)
    assert obj["edges"] == len(net.routes) + len(net.virtual_routes)
    assert obj["components"] >= 2 and obj["unreachable_real_stops"] == 1
    again = json.loads(cli("build-graph", "--json").stdout)
    assert again["status"] == "noop" and again["graph_version"] == "graph-v1"


def test_graph_list_neighbors_route(cli: Cli, net: Network) -> None:
    assert cli("build-graph").exit_code == 0
    assert cli("build-graph", "--force").exit_code == 0
    listed = json.loads(cli("graph", "list", "--json").stdout)["versions"]
    assert [(v["version"], v["active"], v["in_redis"]) for v in listed] == [
        ("graph-v2", True, True), ("graph-v1", False, True)]
    table = cli("graph", "list")
    assert "graph-v2" in table.output and table.exit_code == 0

    _, a, b, mode, _, _ = net.routes[0]
    nb = json.loads(cli("graph", "neighbors", a, "--json").stdout)
    assert nb["graph_version"] == "graph-v2" and nb["stop"] == a
    assert any(e["to"] == b and e["mode"] == canonical(mode) for e in nb["neighbors"])
    assert b in cli("graph", "neighbors", a).output

    route = json.loads(cli("graph", "route", a, b, "--json").stdout)
    assert {"from", "to", "total_s", "stops"} <= set(route)
    assert route["from"] == a and route["to"] == b and route["stops"][0] == a
    assert route["stops"][-1] == b and route["total_s"] > 0
    text = cli("graph", "route", a, b)
    assert text.exit_code == 0 and f"{a} -> {b}" in text.output
    graph = json.loads(cli("status", "--json").stdout)["graph"]
    assert graph["version"] == graph["redis_pointer"] == "graph-v2" and graph["consistent"]


def test_no_path_unknown_stop_and_no_graph_exit_1(cli: Cli, net: Network) -> None:
    no_graph = cli("graph", "neighbors", net.real_stops[0])
    assert no_graph.exit_code == 1 and "pipeline build-graph" in no_graph.output
    assert cli("build-graph").exit_code == 0
    iso = net.real_stops[-1]  # the isolated stop
    result = cli("graph", "route", net.real_stops[0], iso)
    assert result.exit_code == 1
    assert f"no path from '{net.real_stops[0]}' to '{iso}'" in result.output
    assert "Traceback" not in result.output
    as_json = cli("graph", "route", net.real_stops[0], iso, "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["status"] == "error"
    unknown = cli("graph", "neighbors", "NO-SUCH-STOP")
    assert unknown.exit_code == 1 and "'NO-SUCH-STOP' is not in graph version" in unknown.output


def test_activate_rollback_via_cli(cli: Cli, net: Network, conn: Conn) -> None:
    for _ in range(2):
        assert cli("build-graph", "--force").exit_code == 0
    obj = json.loads(cli("graph", "activate", "graph-v1", "--json").stdout)
    assert obj["status"] == "success" and obj["previous_version"] == "graph-v2"
    listed = json.loads(cli("graph", "list", "--json").stdout)["versions"]
    assert [v["version"] for v in listed if v["active"] and v["redis_active"]] == ["graph-v1"]
    # A typo is a usage error, not a failed build-graph run (three made status CRITICAL).
    runs = conn.execute("SELECT count(*) AS n FROM stage_runs").fetchone()["n"]
    unknown = cli("graph", "activate", "graph-v42")
    assert unknown.exit_code == 2 and "unknown graph version 'graph-v42'" in unknown.output
    assert conn.execute("SELECT count(*) AS n FROM stage_runs").fetchone()["n"] == runs


def test_skipped_without_virtual_generation(cli: Cli, conn: Conn) -> None:
    add_dataset(conn, "ds-v1")
    result = cli("build-graph", "--json")
    assert result.exit_code == 0
    obj = json.loads(result.stdout)
    assert obj["status"] == "skipped"
    add_generation(conn, "ds-v1")
    assert json.loads(cli("build-graph", "--json").stdout)["status"] == "failed"  # empty graph


def test_lock_busy_exits_75(cli: Cli, net: Network, database_url: str) -> None:
    assert cli("build-graph").exit_code == 0  # graph-v1 exists: activate gets to the lock
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("build-graph"),))
        result = cli("build-graph")
        assert result.exit_code == 75 and "already running" in result.output
        assert cli("graph", "activate", "graph-v1").exit_code == 75


def test_installed_script_builds_and_routes(cli: Cli, net: Network) -> None:
    result = cli.subprocess("build-graph", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["graph_version"] == "graph-v1"
    _, a, b, *_ = net.routes[0]
    routed = cli.subprocess("graph", "route", a, b, "--json")
    assert routed.returncode == 0 and json.loads(routed.stdout)["to"] == b
    invalid = cli.subprocess("graph", "route", a, "NOPE")
    assert invalid.returncode == 1 and "Traceback" not in invalid.stderr
    assert len(invalid.stderr.strip().splitlines()) == 1


def test_route_modes_of_other_vocabularies_and_unknown_ones(cli: Cli, conn: Conn) -> None:
    # Another feed's mode names: rail, air, Tram, Metro (no flights: weighed by speed).
    data = sample_network(30)
    names = ["rail", "air", "Tram", "Metro", "light-rail", "Coach"]
    for i, route in enumerate(r for r in data["Routes"] if r["mode"] != "flight"):
        route["mode"] = names[i % len(names)]
    with ODataServer(data, page_size=50) as srv:
        cli.env["PIPELINE_ODATA_URL"] = srv.url
        synced = json.loads(cli("sync-odata", "--json").stdout)
        assert synced["status"] == "success" and synced["unknown_modes"] == {}
        assert cli("gen-virtual").exit_code == 0
        built = cli("build-graph", "--json")
        assert built.exit_code == 0, built.output
        assert json.loads(built.stdout)["status"] == "success"

        # Modes nobody knows: sync-odata notes them (not under -q), status warns, and
        # build-graph fails with one line naming each with its routes and the setting.
        plain = [r["ID"] for r in data["Routes"] if r["mode"] != "flight"]
        for key in plain[:3]:
            srv.update_row("Routes", key, mode="Hovercraft")
        srv.update_row("Routes", plain[3], mode="zeppelin")
        quiet = cli("-q", "sync-odata")
        assert quiet.exit_code == 0 and quiet.output == ""
        human = cli("sync-odata")
        assert human.exit_code == 0
        assert "note: no speed for route modes 'hovercraft' (3 routes)" in human.stdout
        again = json.loads(cli("sync-odata", "--json").stdout)  # a noop notes them too
        assert again["status"] == "noop"
        assert again["unknown_modes"] == {"hovercraft": 3, "zeppelin": 1}
        status = json.loads(cli("status", "--json").stdout)
        warned = [p["message"] for p in status["problems"] if p["area"] == "sync-odata"]
        assert any("'hovercraft' (3 routes), 'zeppelin' (1 route)" in m for m in warned), status
        assert cli("gen-virtual").exit_code == 0
        failed = cli("build-graph")
        assert failed.exit_code == 1
        errors = [line for line in failed.stderr.splitlines() if line.startswith("pipeline ")]
        assert errors == [
            "pipeline build-graph: error: no speed for route modes 'hovercraft' (3 routes), "
            "'zeppelin' (1 route); add a speed in km/h to [virtual] speeds_kmh, e.g. "
            "speeds_kmh = { hovercraft = 60, zeppelin = 60 } under [virtual] in the config "
            "file, or PIPELINE_VIRTUAL_SPEEDS_KMH='{\"hovercraft\": 60, \"zeppelin\": 60}'"]
        assert conn.execute("SELECT count(*) AS n FROM graph_versions "
                            "WHERE NOT active").fetchone() == {"n": 0}

        # User speeds add the new modes; the defaults stay.
        cli.env["PIPELINE_VIRTUAL_SPEEDS_KMH"] = '{"Hovercraft": 60, "zeppelin": 100}'
        note = cli("sync-odata")
        assert note.exit_code == 0 and "no speed" not in note.output
        assert cli("build-graph").exit_code == 0
        status = json.loads(cli("status", "--json").stdout)
        assert not [p for p in status["problems"] if "no speed" in p["message"]]


def test_dry_run_says_what_it_would_build_and_writes_nothing(cli: Cli, net: Network,
                                                             conn: Conn) -> None:
    dry = cli("build-graph", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    obj = json.loads(dry.stdout)
    assert obj["status"] == "dry-run" and obj["would_run"] is True
    assert obj["graph_version"] == "graph-v1" and obj["dataset_version"] == "ds-v1"
    assert obj["generation_id"] == net.generation_id
    assert obj["counts"]["nodes"] == len(net.nodes)
    for table in ("graph_versions", "stage_runs"):
        assert conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone() == {"n": 0}  # noqa: S608
    assert conn.execute("SELECT last_value, is_called FROM graph_version_seq").fetchone() == {
        "last_value": 1, "is_called": False}
    assert cli("build-graph").exit_code == 0
    noop = cli("build-graph", "--dry-run")
    assert noop.exit_code == 0
    assert "would do nothing: graph-v1 is active, already built" in noop.stdout
    # An unknown mode fails the dry run as it fails the real run: exit 1, no run recorded.
    unscheduled = next(r for r in net.routes if not r[5])  # weighed by its mode's speed
    conn.execute("UPDATE routes SET mode = 'zeppelin' WHERE id = %s", (unscheduled[0],))
    conn.execute("UPDATE stage_runs SET status = 'failed'")  # a streak that must stay visible
    bad = cli("build-graph", "--dry-run", "--force")
    assert bad.exit_code == 1 and "zeppelin" in bad.stderr
    assert conn.execute("SELECT count(*) AS n FROM stage_runs").fetchone() == {"n": 1}


def test_a_second_database_on_the_prefix_exits_78_and_status_says_why(
        cli: Cli, net: Network, database_url: str, other_database_url: str) -> None:
    """Two installations with one Redis and the same prefix: the second one's build-graph is
    a one-line configuration error and writes nothing; its status names the problem; the
    first one's commands keep working."""
    assert cli("build-graph").exit_code == 0
    with db.connect(other_database_url, autocommit=True) as other:
        seed_network(other, seed=3)
    prefix = cli.env["PIPELINE_REDIS_PREFIX"]
    cli.env["PIPELINE_DATABASE_URL"] = other_database_url
    refused = cli.subprocess("build-graph")
    assert refused.returncode == 78 and "Traceback" not in refused.stderr, refused.stderr
    error = refused.stderr.strip().splitlines()[-1]  # after the run's log lines
    assert error.startswith(f"pipeline build-graph: error: Redis prefix '{prefix}' holds the "
                            "graphs of another database (deployment ")
    assert error.endswith("[redis] prefix (PIPELINE_REDIS_PREFIX)")
    graph = json.loads(cli("status", "--json").stdout)["graph"]
    assert graph["consistent"] is False and "another database" in graph["problem"]
    assert graph["redis_pointer"] == "graph-v1" and graph["version"] is None
    text = cli("status")
    assert "Traceback" not in text.output and "holds the graphs of another" in text.output
    assert cli("status", "--check").exit_code == 2  # CRITICAL
    cli.env["PIPELINE_DATABASE_URL"] = database_url
    graph = json.loads(cli("status", "--json").stdout)["graph"]
    assert graph["consistent"] is True and graph["redis_owner"] == graph["deployment_id"]
    assert cli("graph", "neighbors", net.real_stops[0]).exit_code == 0
    assert json.loads(cli("build-graph", "--json").stdout)["status"] == "noop"


def test_graph_queries_on_a_prefix_another_database_owns_answer_with_a_warning(
        cli: Cli, net: Network, conn: Conn, other_database_url: str) -> None:
    """Two installations with one Redis and the same prefix: the graph queries of the one
    that does not own it read the other's graph. They answer, as status and doctor do, with
    one warning line on stderr naming both deployments and [redis] prefix; the owner's own
    queries, -q and an unclaimed prefix (an installation from before owners) stay silent."""
    from pipeline_cli.adapters.graph_store import connect

    assert cli("build-graph").exit_code == 0
    _, a, b, _, _, _ = net.routes[0]
    queries = {"graph list": ("graph", "list"), "graph neighbors": ("graph", "neighbors", a),
               "graph route": ("graph", "route", a, b),
               "export geojson graph": ("export", "geojson", "graph")}
    for args in queries.values():
        mine = cli(*args)
        assert mine.exit_code == 0 and "another database" not in mine.stderr, mine.output
    ours = db.require_deployment_id(conn)
    with db.connect(other_database_url, autocommit=True) as other:
        theirs = db.require_deployment_id(other)
    prefix = cli.env["PIPELINE_REDIS_PREFIX"]
    cli.env["PIPELINE_DATABASE_URL"] = other_database_url
    for command, args in queries.items():
        result = cli(*args)
        assert result.exit_code == 0, result.output
        lines = [line for line in result.stderr.splitlines() if "another database" in line]
        assert len(lines) == 1 and " warning " in lines[0], result.stderr
        assert lines[0].endswith(
            f"Redis prefix '{prefix}' holds the graphs of another database (deployment "
            f"{ours}; this database is {theirs}): give each database a prefix of its own, "
            f"[redis] prefix (PIPELINE_REDIS_PREFIX); `pipeline {command}` reads that "
            "database's graph"), lines[0]
    route = json.loads(cli("graph", "route", a, b, "--json").stdout)  # stdout: the answer
    assert route["stops"][0] == a and route["stops"][-1] == b
    logged = cli("graph", "neighbors", a, "--log-format", "json")
    obj = json.loads(logged.stderr)
    assert obj["level"] == "warning" and obj["fields"] == {"redis_owner": ours,
                                                         "deployment_id": theirs}
    assert cli("graph", "neighbors", a, "-q").stderr == ""
    installed = cli.subprocess("graph", "neighbors", a)
    assert installed.returncode == 0 and installed.stderr.rstrip().endswith(
        "`pipeline graph neighbors` reads that database's graph"), installed.stderr
    client = connect(cli.env["PIPELINE_REDIS_URL"],
                     cluster=cli.env["PIPELINE_REDIS_CLUSTER"] == "true")
    try:
        client.delete(f"{prefix}:graph:owner")
    finally:
        client.close()
    unclaimed = cli("graph", "route", a, b)
    assert unclaimed.exit_code == 0 and unclaimed.stderr == "", unclaimed.stderr


def test_a_second_database_on_the_bucket_exits_78_until_it_has_a_key_prefix(
        cli: Cli, net: Network, database_url: str, other_database_url: str) -> None:
    """Two installations, one bucket, each its own Redis prefix: the second one's build-graph
    would have written over the first one's graph-v1 export; it is a one-line configuration
    error naming the fix, and with [s3] prefix it builds."""
    assert cli("build-graph").exit_code == 0
    with db.connect(other_database_url, autocommit=True) as other:
        seed_network(other, seed=3)
    bucket = cli.env["PIPELINE_S3_BUCKET"]
    cli.env["PIPELINE_DATABASE_URL"] = other_database_url
    cli.env["PIPELINE_REDIS_PREFIX"] += ":other"  # under the test's: cleaned up too
    refused = cli.subprocess("build-graph")
    assert refused.returncode == 78 and "Traceback" not in refused.stderr, refused.stderr
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith(f"pipeline build-graph: error: S3 bucket '{bucket}' holds the "
                            "graph export graphs/graph-v1/ of another database (deployment ")
    assert error.endswith("[s3] bucket or [s3] prefix (PIPELINE_S3_PREFIX)")
    cli.env["PIPELINE_S3_PREFIX"] = "city-b"
    built = json.loads(cli("build-graph", "--json").stdout)
    assert built["status"] == "success" and built["graph_version"] == "graph-v2", built
    assert built["export_key"] == "graphs/graph-v2/graph.jsonl.gz"  # relative to the prefix


def test_stop_ids_as_other_sources_write_them(cli: Cli, conn: Conn) -> None:
    """Ids with spaces, quotes, Cyrillic, emoji, a combining accent, a leading '-', a long one,
    and a virtual stop, as an OData feed may send them and an operator types them."""
    nfc, nfd = unicodedata.normalize("NFC", "Café"), unicodedata.normalize("NFD", "Café")
    ids = ["A B", "it's", 'say "hi"', "Москва", "🚌 1", nfc, "-1", "--x", "L" * 2000, "ISO"]
    version = add_dataset(conn)
    for i, sid in enumerate(ids):
        conn.execute("INSERT INTO stops (id, name, latitude, longitude) VALUES (%s, %s, %s, %s)",
                     (sid, sid, 60 + i / 100, 24 + i / 100))
    for i, (a, b) in enumerate(itertools.pairwise(ids[:-1])):
        conn.execute("INSERT INTO routes (id, from_stop_id, to_stop_id, mode, distance_km) "
                     "VALUES (%s, %s, %s, 'bus', 10)", (f"R{i}", a, b))
    conn.execute("INSERT INTO virtual_stops (id, latitude, longitude, kind, dataset_version) "
                 "VALUES ('V:MAIN:1:1', 60.5, 24.5, 'MAIN_GRID', %s)", (version,))
    add_virtual_route(conn, "VR1", "V:MAIN:1:1", "A B", 5, 360, version)
    add_generation(conn, version)
    assert cli("build-graph").exit_code == 0

    route = json.loads(cli("graph", "route", "V:MAIN:1:1", "L" * 2000, "--json").stdout)
    assert route["stops"] == ["V:MAIN:1:1", *ids[:-1]]
    # 'é' typed as e + combining accent (NFD, as some terminals and files write it) is the
    # stop the feed wrote as one character (NFC): it was "not in graph version graph-v1".
    for typed in (nfd, nfc):
        got = json.loads(cli("graph", "neighbors", typed, "--json").stdout)
        assert [e["to"] for e in got["neighbors"]] == ["-1"], typed.encode()
        assert json.loads(cli("graph", "route", "🚌 1", typed, "--json").stdout)["total_s"] > 0
    # An id that looks like an option goes after `--`; without it, the error says so.
    assert json.loads(cli("graph", "route", "--json", "--", "-1", "--x").stdout)["stops"] == [
        "-1", "--x"]
    bare = cli("graph", "neighbors", "-1")
    assert bare.exit_code == 2
    assert "No such option '-1'; an argument that starts with '-' goes after '--'" in bare.stderr
    # To itself: no leg; no path: one line, exit 1; a long unknown id is shortened.
    itself = json.loads(cli("graph", "route", "Москва", "Москва", "--json").stdout)
    assert (itself["stops"], itself["total_s"], itself["legs"]) == (["Москва"], 0, [])
    none = cli("graph", "route", "A B", "ISO")
    assert (none.exit_code, none.stderr) == (
        1, "pipeline graph route: error: no path from 'A B' to 'ISO' in graph version "
           "graph-v1\n")
    long = cli("graph", "neighbors", "X" * 5000)
    assert long.exit_code == 1 and "…(5000 characters) is not in graph version" in long.stderr
    assert len(long.stderr) < 300


def test_a_version_named_and_an_id_read_as_the_operator_gave_them(cli: Cli, net: Network,
                                                                   conn: Conn) -> None:
    # `--version graph-v99` said "resolve the active version again", the routing API's
    # advice; and an id with a line break or a bidi override broke the title and the header
    # line (the table's cells were escaped already).
    assert cli("build-graph").exit_code == 0
    a, b = net.real_stops[:2]
    for args in (("neighbors", a), ("route", a, b)):
        result = cli("graph", *args, "--version", "graph-v99")
        assert (result.exit_code, result.stderr) == (
            1, f"pipeline graph {args[0]}: error: graph version 'graph-v99' is not in Redis "
               "(never written, or collected by retention: `pipeline graph list` says which "
               "are)\n")
    odd = "bad\nid\u202eX"
    conn.execute("INSERT INTO stops (id, name, latitude, longitude) VALUES (%s, 'x', 1, 1)",
                 (odd,))
    assert cli("build-graph", "--force").exit_code == 0
    shown = "bad\\nid\\u202eX"
    listed = cli("graph", "neighbors", odd).stdout  # rich wraps a title at the table's width
    assert listed.startswith(f"{shown} in graph-v2") and "\u202e" not in listed
    routed = cli("graph", "route", odd, odd).stdout
    assert routed.startswith(f"{shown} -> {shown}: 0 s") and "\u202e" not in routed
