"""`pipeline doctor`: every check against the real servers, a failing system for each check,
exit codes, the JSON shape, and that it leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from devtools.odata_server import ODataServer, sample_network, trippin_airports
from devtools.procs import free_port
from devtools.services import LocalServices, S3Endpoint
from pipeline_cli import db
from pipeline_cli.errors import endpoint
from tests.support.clirunner import Cli
from tests.support.proxy import ForwardHttpProxy

pytestmark = [pytest.mark.s3, pytest.mark.osrm]

SECRET = "doctor-Secret-42"
NAMES = ["settings", "database", "redis", "s3", "osrm", "odata"]


@pytest.fixture
def odata() -> Iterator[ODataServer]:
    with ODataServer(sample_network(10), username="etl", password=SECRET) as srv:
        yield srv


@pytest.fixture
def cli(run_cli: Cli, full_env: dict[str, str], osrm_url: str, odata: ODataServer) -> Cli:
    run_cli.env.update(full_env)
    run_cli.env.update({"PIPELINE_OSRM_URL": osrm_url, "PIPELINE_ODATA_URL": odata.url,
                        "PIPELINE_ODATA_USERNAME": "etl", "PIPELINE_ODATA_PASSWORD": SECRET})
    return run_cli


def doctor(cli: Cli, *args: str) -> tuple[int, dict[str, Any]]:
    result = cli("doctor", "--json", *args)
    obj = json.loads(result.stdout)
    assert SECRET not in result.output
    return result.exit_code, obj


def by_name(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    assert [c["name"] for c in obj["checks"]] == NAMES[:len(obj["checks"])]
    return {c["name"]: c for c in obj["checks"]}


def failed(obj: dict[str, Any]) -> list[str]:
    return [c["name"] for c in obj["checks"] if not c["ok"]]


def bucket_names(s3: S3Endpoint) -> set[str]:
    return {b.name for b in s3.client().list_buckets()}


def table_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    tables = [r["relname"] for r in conn.execute(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = "
        "'public'::regnamespace ORDER BY 1")]
    counts = {}
    for t in tables:
        row = conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(sql.Identifier(t)))
        counts[t] = row.fetchone()["n"]  # type: ignore[index]
    return counts


def test_all_pass_and_nothing_is_left_behind(cli: Cli, conn: psycopg.Connection[Any],
                                             s3: S3Endpoint, s3_bucket: str) -> None:
    s3.client().make_bucket(s3_bucket)
    before, buckets = table_counts(conn), bucket_names(s3)
    code, obj = doctor(cli)
    assert code == 0 and obj["ok"] is True, obj
    checks = by_name(obj)
    assert set(checks) == set(NAMES)
    assert all(isinstance(c["ms"], int) and c["detail"] for c in checks.values())
    assert "PostgreSQL" in checks["database"]["detail"]
    assert "cluster: no" in checks["redis"]["detail"]
    assert "written, read and deleted" in checks["s3"]["detail"]
    assert "Stops" in checks["odata"]["detail"]
    # no run record, no row, no new table, no probe object, no probe bucket
    assert table_counts(conn) == before
    assert conn.execute("SELECT count(*) AS n FROM stage_runs").fetchone() == {"n": 0}
    assert list(s3.client().list_objects(s3_bucket, recursive=True)) == []
    assert bucket_names(s3) == buckets


def test_table_names_the_failing_system_without_secrets(cli: Cli) -> None:
    cli.env["PIPELINE_ODATA_PASSWORD"] = "wrong-" + SECRET
    result = cli("doctor")
    assert result.exit_code == 1
    assert "odata" in result.output and "FAIL" in result.output and "401" in result.output
    assert "[odata] username" in " ".join(result.output.split())  # not eaten as rich markup
    assert SECRET not in result.output and "doctor: FAILED: odata" in result.output
    assert "http://127.0.0.1" in result.output  # the endpoint
    assert "postgresql://127.0.0.1" in result.output  # the database's, without user/password
    # A Redis URL without a password is no secret to mask (it was shown as "***").
    redis_line = next(line for line in result.output.splitlines() if "redis" in line)
    assert "redis://127.0.0.1" in redis_line and "***" not in redis_line, redis_line


@pytest.mark.parametrize("url", ["postgresql://{u}:Pa#ssSecret@{h}/{d}",
                                 "postgresql://{u}:Pa?ssSecret@{h}/{d}",
                                 "host={h} user={u} dbname={d} password=Sec,retSecret"])
def test_the_endpoint_never_shows_a_password(cli: Cli, database_url: str, url: str) -> None:
    from psycopg.conninfo import conninfo_to_dict
    info = conninfo_to_dict(database_url)
    cli.env["PIPELINE_DATABASE_URL"] = url.format(u=info.get("user", "postgres"),
                                                  h=info.get("host"), d=info.get("dbname"))
    result = cli("doctor")
    assert "ssSecret" not in result.output and "retSecret" not in result.output, result.output
    assert f"postgresql://{info.get('host')}" in result.output


@pytest.mark.parametrize(("toml", "needle"), [
    ('[schedule]\nentries = {"sync-odata" = "every day"}\n', "[schedule] entries"),
    ('[schedule]\nentries = {"sync-data" = "0 3 * * *"}\n', "unknown stage 'sync-data'"),
    ('[schedule]\ncrontab = "/nonexistent/crontab"\n', "cannot read [schedule] crontab"),
])
def test_a_schedule_status_cannot_read_fails_settings(cli: Cli, tmp_path: Any, toml: str,
                                                      needle: str) -> None:
    (tmp_path / "p.toml").write_text(toml)
    cli.env["PIPELINE_CONFIG"] = str(tmp_path / "p.toml")
    code, obj = doctor(cli)
    assert code == 78 and "settings" in failed(obj), obj
    assert needle in by_name(obj)["settings"]["detail"]


def test_missing_bucket_that_may_be_created_passes(cli: Cli, s3: S3Endpoint,
                                                   s3_bucket: str) -> None:
    buckets = bucket_names(s3)
    code, obj = doctor(cli)
    assert code == 0, obj
    assert "first run will create it" in by_name(obj)["s3"]["detail"]
    assert bucket_names(s3) == buckets and s3_bucket not in buckets


def test_invalid_settings_exit_78(cli: Cli) -> None:
    cli.env["PIPELINE_DATABASE_URL"] = "mysql://nope"
    code, obj = doctor(cli)
    assert code == 78 and obj["ok"] is False and failed(obj) == ["settings"]
    assert "[database] url" in obj["checks"][0]["detail"]


def test_missing_setting_fails_settings_and_its_system_but_runs_the_rest(cli: Cli) -> None:
    del cli.env["PIPELINE_OSRM_URL"]
    code, obj = doctor(cli)
    assert code == 78 and failed(obj) == ["settings", "osrm"]
    assert "[osrm] url" in by_name(obj)["settings"]["detail"]


def test_pending_migration_fails_database(cli: Cli, empty_database_url: str) -> None:
    with db.connect(empty_database_url, autocommit=True) as conn:  # all but the last migration
        conn.execute(db.query("runner", "create_schema_migrations"))
        for m in db.migrations()[:-1]:
            conn.execute(m.path.read_text(encoding="utf-8").encode())
            conn.execute(db.query("runner", "record_migration"),
                         {"version": m.version, "name": m.name, "checksum": m.checksum})
    cli.env["PIPELINE_DATABASE_URL"] = empty_database_url
    code, obj = doctor(cli)
    assert code == 1 and failed(obj) == ["database"]
    assert "pending migrations" in by_name(obj)["database"]["detail"]


def test_role_that_cannot_write_fails_database(cli: Cli, database_url: str,
                                               pg_admin_url: str) -> None:
    role = f"doctor_ro_{free_port()}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{SECRET}'")
    try:
        with psycopg.connect(database_url, autocommit=True) as owner:
            owner.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
            owner.execute(f"GRANT INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA "
                          f"public TO {role}")
            owner.execute(f"REVOKE DELETE ON stage_runs FROM {role}")
            # gen-virtual replaces the virtual tables' rows with TRUNCATE
            owner.execute(f"REVOKE TRUNCATE ON virtual_routes FROM {role}")
        info = psycopg.conninfo.conninfo_to_dict(database_url)
        cli.env["PIPELINE_DATABASE_URL"] = psycopg.conninfo.make_conninfo(
            "", **{**info, "user": role, "password": SECRET})
        code, obj = doctor(cli)
        assert code == 1 and failed(obj) == ["database"]
        assert by_name(obj)["database"]["detail"].endswith(
            "truncate) stage_runs, virtual_routes"), obj
    finally:
        with psycopg.connect(database_url, autocommit=True) as owner:
            owner.execute(f"DROP OWNED BY {role}")
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("system", ["database", "redis", "s3", "osrm", "odata"])
def test_closed_port_fails_only_its_check(cli: Cli, system: str) -> None:
    """A stopped server (nothing listens on the port): its check fails, the others run."""
    port = free_port()
    cli.env.update({
        "database": {"PIPELINE_DATABASE_URL": f"postgresql://u:{SECRET}@127.0.0.1:{port}/x"},
        "redis": {"PIPELINE_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:{port}/0"},
        "s3": {"PIPELINE_S3_ENDPOINT": f"127.0.0.1:{port}"},
        "osrm": {"PIPELINE_OSRM_URL": f"http://127.0.0.1:{port}"},
        "odata": {"PIPELINE_ODATA_URL": f"http://127.0.0.1:{port}/odata/"},
    }[system])
    code, obj = doctor(cli)
    assert code == 1 and failed(obj) == [system], obj
    assert by_name(obj)[system]["detail"]


def test_a_wrong_osrm_url_path_names_the_url_and_the_setting(cli: Cli, osrm_url: str) -> None:
    """osrm-routed answers InvalidUrl under a wrong path: the detail names the URL with that
    path (never its password) and [osrm] url, as match-gps does."""
    scheme, rest = osrm_url.split("://", 1)
    cli.env["PIPELINE_OSRM_URL"] = f"{scheme}://etl:{SECRET}@{rest}/wrong/path"
    code, obj = doctor(cli)
    assert code == 1 and failed(obj) == ["osrm"], obj
    detail = by_name(obj)["osrm"]["detail"]
    assert detail.startswith(f"OSRM {osrm_url}/wrong/path answered InvalidUrl ("), detail
    assert "check the path in [osrm] url" in detail, detail


def test_a_hung_s3_is_asked_once(cli: Cli) -> None:
    # The S3 check retried a server that accepts and never answers three times (21 s).
    seen: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as hung:
        def accept() -> None:
            with contextlib.suppress(OSError):
                while True:
                    seen.append(hung.accept()[0])
        threading.Thread(target=accept, daemon=True).start()
        cli.env["PIPELINE_S3_ENDPOINT"] = f"127.0.0.1:{hung.getsockname()[1]}"
        code, obj = doctor(cli)
    assert code == 1 and failed(obj) == ["s3"], obj
    assert len(seen) == 1
    for conn in seen:
        conn.close()


@pytest.mark.parametrize(("name", "value", "setting"), [
    ("PIPELINE_OSRM_URL", "http://127.0.0.1:notaport", "[osrm] url"),
    # The drivers refused these only when connecting, with a traceback from status --check.
    ("PIPELINE_REDIS_URL", "redis://127.0.0.1:notaport/0", "[redis] url"),
    ("PIPELINE_S3_ENDPOINT", "127.0.0.1:notaport", "[s3] endpoint"),
])
def test_an_endpoint_with_a_bad_port_is_a_settings_error(cli: Cli, name: str, value: str,
                                                         setting: str) -> None:
    cli.env[name] = value
    code, obj = doctor(cli)
    assert code == 78 and failed(obj) == ["settings"], obj
    assert f"malformed setting {setting}: port could not be cast" in by_name(obj)["settings"][
        "detail"]


def test_wrong_s3_secret_fails_s3(cli: Cli) -> None:
    cli.env["PIPELINE_S3_SECRET_KEY"] = "wrong-" + SECRET
    code, obj = doctor(cli)
    assert code == 1 and failed(obj) == ["s3"], obj


def test_missing_entity_set_fails_odata(cli: Cli, tmp_path: Any) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text('[odata.mapping.routes]\nset = "Marshruty"\n')
    result = cli("--config", str(config), "doctor", "--json")
    obj = json.loads(result.stdout)
    assert result.exit_code == 1 and failed(obj) == ["odata"], obj
    assert "Marshruty" in by_name(obj)["odata"]["detail"]


def test_a_mapped_field_the_service_lacks_fails_odata(cli: Cli, odata: ODataServer,
                                                      tmp_path: Any) -> None:
    # doctor asked for $top=1 without the sync's $select: "ok" for a field spelt as another
    # service spells it, and the sync then failed on it.
    config = tmp_path / "pipeline.toml"
    config.write_text('[odata.mapping.stops]\nfields = { is_airport = "IsAirport" }\n')
    result = cli("--config", str(config), "doctor", "--json")
    obj = json.loads(result.stdout)
    assert result.exit_code == 1 and failed(obj) == ["odata"], obj
    assert "'IsAirport'" in by_name(obj)["odata"]["detail"]
    assert "[odata.mapping]" in by_name(obj)["odata"]["detail"]
    odata.ignore_select = True  # as some services do: the entity is looked at instead
    result = cli("--config", str(config), "doctor", "--json")
    obj = json.loads(result.stdout)
    assert result.exit_code == 1 and by_name(obj)["odata"]["detail"] == (
        "OData Stops $top=1: the entity has no field 'IsAirport' (did you mean 'isAirport'? "
        "check the names in [odata.mapping])"), obj


def test_odata_follows_the_mapped_paths_into_the_probed_entity(
        cli: Cli, odata: ODataServer, tmp_path: Any) -> None:
    odata.set_rows("Airports", trippin_airports(sample_network(10)["Stops"]))
    config = tmp_path / "pipeline.toml"
    cli.env["PIPELINE_CONFIG"] = str(config)
    for city, code, detail in (
            ("Location/City/Name", 0, "$top=1 ok for Airports, Routes, Flights"),
            ("Location/Cty/Name", 1, "OData Airports $top=1: the entity has no field "
                                     "'Location/Cty/Name' (check the names in [odata.mapping])"),
            ("Location//Name", 78, "malformed setting [odata.mapping.stops.fields]: city must "
                                   "be a field name or a path")):
        config.write_text('[odata.mapping.stops]\nset = "Airports"\n'
                          '[odata.mapping.stops.fields]\nid = "IcaoCode"\nname = "Name"\n'
                          'latitude = "Location/Loc/coordinates/1"\n'
                          f'longitude = "Location/Loc/coordinates/0"\ncity = "{city}"\n'
                          'is_airport = ""\n')
        result, obj = doctor(cli)
        check = "settings" if code == 78 else "odata"
        assert result == code and detail in by_name(obj)[check]["detail"], obj


def test_odata_names_the_proxy_it_went_through_without_its_password(
        cli: Cli, odata: ODataServer) -> None:
    with ForwardHttpProxy(username="etl", password=SECRET) as proxy:
        cli.env["HTTP_PROXY"] = f"http://etl:{SECRET}@127.0.0.1:{proxy.port}"
        code, obj = doctor(cli)
        assert code == 0, obj
        assert by_name(obj)["odata"]["detail"].startswith(
            f"OData v4 service answers (via proxy {proxy.url} (from the environment; [odata] "
            "proxy overrides)); $top=1 ok for ")
        # the service root and each set (OSRM's requests take HTTP_PROXY as well)
        assert len([t for t in proxy.forwarded if t.startswith(odata.url)]) == 4
        cli.env["PIPELINE_ODATA_PASSWORD"] = "wrong"  # a failure of the server's own
        code, obj = doctor(cli)
        assert code == 1 and by_name(obj)["odata"]["detail"].endswith(
            f"Invalid credentials (via proxy {proxy.url} (from the environment; [odata] proxy "
            "overrides))"
        ), obj
        cli.env["PIPELINE_ODATA_PASSWORD"] = SECRET
        cli.env["PIPELINE_ODATA_PROXY"] = proxy.url  # without the password: 407
        code, obj = doctor(cli)
        assert code == 1 and by_name(obj)["odata"]["detail"].startswith(
            f"OData {endpoint(odata.url)} the service document: proxy {proxy.url} "
            "([odata] proxy): HTTP 407 Proxy Authentication Required"), obj
        cli.env["PIPELINE_ODATA_PROXY"] = ""
        code, obj = doctor(cli)
        assert code == 0 and "(no proxy)" in by_name(obj)["odata"]["detail"], obj


def test_odata_probes_with_the_syncs_orderby(cli: Cli, odata: ODataServer) -> None:
    # doctor asked for $top=1 without $orderby: "ok" for a service that refuses it, and the
    # sync then failed.
    odata.refuse_orderby = 501
    code, obj = doctor(cli)
    assert code == 1 and failed(obj) == ["odata"], obj
    assert "Stops $top=1 ([odata] orderby = false leaves $orderby out): HTTP 501" in by_name(
        obj)["odata"]["detail"]
    cli.env["PIPELINE_ODATA_ORDERBY"] = "false"
    code, obj = doctor(cli)
    assert code == 0, obj


def test_odata_probes_the_first_page_of_client_paging_with_top_1(
        cli: Cli, odata: ODataServer) -> None:
    cli.env.update({"PIPELINE_ODATA_PAGING": "client", "PIPELINE_ODATA_PAGE_SIZE": "50"})
    odata.reset_requests()
    code, obj = doctor(cli)
    assert code == 0, obj
    probes = [r.query for r in odata.requests if r.entity_set]
    assert len(probes) == 3 and all(q["$top"] == "1" and "$skip" not in q for q in probes)


def test_point_option_and_malformed_point(cli: Cli) -> None:
    code, obj = doctor(cli, "--point", "24.94,60.17")
    assert code == 0 and "24.94000,60.17000 (--point)" in by_name(obj)["osrm"]["detail"]
    bad = cli("doctor", "--point", "north")
    assert bad.exit_code == 2 and "malformed --point" in bad.stderr


def test_installed_script(cli: Cli) -> None:
    proc = cli.subprocess("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True


def test_cluster_mode_and_pooler_must_match_the_settings(
        cli: Cli, redis_cluster_url: str, redis_url: str, pooled_database_url: str) -> None:
    cli.env.update({"PIPELINE_REDIS_URL": redis_cluster_url, "PIPELINE_REDIS_CLUSTER": "false",
                    "PIPELINE_DATABASE_URL": pooled_database_url})
    code, obj = doctor(cli)
    checks = by_name(obj)
    assert code == 1 and failed(obj) == ["database", "redis"], obj
    assert "set [redis] cluster = true" in checks["redis"]["detail"]
    assert "transaction pooler" in checks["database"]["detail"]
    assert "[database] pooler" in checks["database"]["detail"]
    cli.env.update({"PIPELINE_REDIS_CLUSTER": "true", "PIPELINE_DATABASE_POOLER": "transaction"})
    code, obj = doctor(cli)
    checks = by_name(obj)
    assert failed(obj) == [], obj
    assert "cluster: yes, state ok" in checks["redis"]["detail"]
    assert "through a transaction pooler" in checks["database"]["detail"]
    cli.env["PIPELINE_REDIS_URL"] = redis_url  # a single server with the cluster setting
    code, obj = doctor(cli)
    assert failed(obj) == ["redis"] and "not a cluster node" in by_name(obj)["redis"]["detail"]


def test_a_redis_that_evicts_any_key_fails_redis_with_the_fix(
        cli: Cli, services: LocalServices, redis_prefix: str) -> None:
    """An allkeys-* eviction policy under a memory limit (a Redis set up as a cache) deletes
    graph keys when it fills up, and the routing API then misses stops in silence. Without a
    limit, or with noeviction, the check passes."""
    import redis

    url = services.start_redis_server()
    client = redis.Redis.from_url(url)
    try:
        client.config_set("maxmemory", str(100 * 2**20))
        client.config_set("maxmemory-policy", "allkeys-lru")
        cli.env.update({"PIPELINE_REDIS_URL": url, "PIPELINE_REDIS_CLUSTER": "false",
                        "PIPELINE_REDIS_PREFIX": redis_prefix})
        code, obj = doctor(cli)
        assert code == 1 and failed(obj) == ["redis"], obj
        detail = by_name(obj)["redis"]["detail"]
        assert "maxmemory-policy allkeys-lru with maxmemory 100 MiB" in detail, detail
        assert "set maxmemory-policy noeviction" in detail
        client.config_set("maxmemory-policy", "noeviction")
        assert doctor(cli)[0] == 0
        client.config_set("maxmemory-policy", "allkeys-lru")
        client.config_set("maxmemory", "0")  # no limit: nothing is ever evicted
        assert doctor(cli)[0] == 0
    finally:
        client.close()


def test_a_prefix_another_database_owns_fails_redis_with_the_fix(
        cli: Cli, conn: psycopg.Connection[Any], redis_env: dict[str, str]) -> None:
    """The Redis prefix claimed by another database (two installations on one Redis with the
    same prefix): build-graph would exit 78, so doctor fails the redis check and says what to
    set. Doctor claims nothing itself."""
    from pipeline_cli.adapters.graph_store import GraphStore, connect

    cli.env.update(redis_env)
    code, obj = doctor(cli)
    assert code == 0, obj
    prefix = cli.env["PIPELINE_REDIS_PREFIX"]
    assert by_name(obj)["redis"]["detail"].endswith(
        f"prefix '{prefix}' is unclaimed: the first build-graph that writes a graph claims it "
        "for this database")
    client = connect(redis_env["PIPELINE_REDIS_URL"],
                     cluster=redis_env["PIPELINE_REDIS_CLUSTER"] == "true")
    try:
        store = GraphStore(client, prefix)
        assert store.owner() is None
        ours = db.require_deployment_id(conn)
        store.claim(ours)
        code, obj = doctor(cli)
        assert code == 0 and by_name(obj)["redis"]["detail"].endswith(
            f"prefix '{prefix}' belongs to this database"), obj
        client.set(store.owner_key, "7d3c9e52-0000-4000-8000-000000000001")
        code, obj = doctor(cli)
        assert code == 1 and failed(obj) == ["redis"], obj
        assert by_name(obj)["redis"]["detail"] == (
            f"Redis prefix '{prefix}' holds the graphs of another database (deployment "
            f"7d3c9e52-0000-4000-8000-000000000001; this database is {ours}): give each "
            "database a prefix of its own, [redis] prefix (PIPELINE_REDIS_PREFIX)")
    finally:
        client.close()


def test_another_databases_export_at_the_next_graph_version_fails_s3_with_the_fix(
        cli: Cli, conn: psycopg.Connection[Any], s3: S3Endpoint, s3_bucket: str) -> None:
    """Two installations backing up into one bucket: build-graph would stop (exit 78) at the
    version whose export the other database wrote, so doctor fails the s3 check and says what
    to set; with a key prefix of its own the check passes."""
    from pipeline_cli.adapters.backups import BackupStore

    store = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region)
    ours = db.require_deployment_id(conn)
    theirs = "7d3c9e52-0000-4000-8000-000000000001"
    store.put_json("graphs/graph-v1/manifest.json", {"deployment": theirs})
    code, obj = doctor(cli)
    assert code == 1 and failed(obj) == ["s3"], obj
    assert by_name(obj)["s3"]["detail"] == (
        f"S3 bucket '{s3_bucket}' holds the graph export graphs/graph-v1/ of another database "
        f"(deployment {theirs}; this database is {ours}): give each database a bucket or a "
        "key prefix of its own, [s3] bucket or [s3] prefix (PIPELINE_S3_PREFIX)")
    store.put_json("graphs/graph-v1/manifest.json", {"deployment": ours})  # its own: fine
    code, obj = doctor(cli)
    assert code == 0 and by_name(obj)["s3"]["detail"].endswith(
        "the next graph export, graphs/graph-v1/, is free"), obj
    store.put_json("graphs/graph-v1/manifest.json", {"deployment": theirs})
    cli.env["PIPELINE_S3_PREFIX"] = "city-b/"
    code, obj = doctor(cli)
    assert code == 0, obj
    assert by_name(obj)["s3"]["detail"] == (
        f"bucket {s3_bucket}, prefix 'city-b/': probe object written, read and deleted; the "
        "next graph export, graphs/graph-v1/, is free")
    assert sorted(store.list("")) == ["graphs/graph-v1/manifest.json"]  # no probe left


def endpoint_of(cli: Cli, name: str) -> str:
    """The endpoint column of check ``name`` in doctor's table."""
    result = cli("doctor")
    line = next(line for line in result.output.splitlines() if line.startswith(f"{name} "))
    return line.split()[2]


def test_the_endpoint_is_the_server_libpq_and_redis_take(
        cli: Cli, database_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket URL was shown as postgresql:/var/run/... or unix:/tmp/..., a URL that leaves
    the server to PGSERVICE or PGHOST as postgresql:/ (libpq's environment decides)."""
    from urllib.parse import quote

    info = psycopg.conninfo.conninfo_to_dict(database_url)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SHOW unix_socket_directories").fetchone()
    socket = str(row[0] if row else "").split(",")[0].strip()
    port, name = info.get("port") or 5432, info["dbname"]
    if socket and not socket.startswith("@"):
        cli.env["PIPELINE_DATABASE_URL"] = f"postgresql:///{name}?host={socket}&port={port}"
        assert endpoint_of(cli, "database") == (
            f"postgresql://{quote(socket, safe='')}:{port}/{name}")
    (tmp_path / "pg_service.conf").write_text(
        f"[pipeline]\nhost={info.get('host')}\nport={port}\ndbname={name}\n")
    monkeypatch.setenv("PGSERVICEFILE", str(tmp_path / "pg_service.conf"))
    cli.env.update({"PIPELINE_DATABASE_URL": "postgresql://", "PGSERVICE": "pipeline"})
    assert endpoint_of(cli, "database") == f"postgresql://{info.get('host')}:{port}/{name}"
    cli.env.update({"PIPELINE_REDIS_URL": "unix:///run/nowhere/redis.sock?db=2"})
    assert endpoint_of(cli, "redis") == "unix:///run/nowhere/redis.sock"


def test_a_read_only_replica_fails_redis_naming_its_primary(
        cli: Cli, services: LocalServices, redis_prefix: str) -> None:
    """[redis] url naming a replica: PING and reads pass, every build-graph then fails; the
    check fails and names the primary to point at."""
    import redis

    primary = services.start_redis_server()
    replica = services.start_redis_server(args=["--repl-diskless-load", "swapdb"])
    port = primary.rsplit(":", 1)[1].split("/")[0]
    with redis.Redis.from_url(replica) as client:
        client.replicaof("127.0.0.1", port)
    cli.env.update({"PIPELINE_REDIS_URL": replica, "PIPELINE_REDIS_PREFIX": redis_prefix})
    code, obj = doctor(cli)
    assert code == 1 and failed(obj) == ["redis"], obj
    detail = by_name(obj)["redis"]["detail"]
    assert f"is a replica of 127.0.0.1:{port}" in detail, detail
    assert "point [redis] url at the primary" in detail


def test_acl_users_without_info_or_ping_pass_redis(
        cli: Cli, services: LocalServices, redis_prefix: str) -> None:
    """A managed Redis's user without @dangerous (no INFO), and the smallest user
    docs/build-graph.md gives (no PING either): build-graph works with both, so the check
    passes and says what it could not read."""
    import redis

    url = services.start_redis_server()
    with redis.Redis.from_url(url) as admin:
        admin.acl_setuser("managed", enabled=True, passwords=[f"+{SECRET}"], keys=["*"],
                          channels=["*"], commands=["+@all", "-@dangerous"])
        admin.acl_setuser("pipe", enabled=True, passwords=[f"+{SECRET}"],
                          keys=[f"{redis_prefix}:*"],
                          commands=["+@read", "+@write", "+@scripting", "+select"])
    cli.env["PIPELINE_REDIS_PREFIX"] = redis_prefix
    for user in ("managed", "pipe"):
        cli.env["PIPELINE_REDIS_URL"] = url.replace("redis://", f"redis://{user}:{SECRET}@")
        code, obj = doctor(cli)
        assert failed(obj) == [], (user, obj)
        detail = by_name(obj)["redis"]["detail"]
        assert "INFO refused to this user" in detail and "is unclaimed" in detail, detail


def test_a_multi_host_database_url_pairs_each_host_with_its_port(cli: Cli,
                                                                  database_url: str) -> None:
    """libpq tries the hosts of 'h1:5432,h2:5433' in turn: the endpoint was shown as
    postgresql://h1,h2:5432,5433/db, a URL that means something else."""
    from devtools.procs import free_port

    info = psycopg.conninfo.conninfo_to_dict(database_url)
    port, name, closed = info.get("port") or 5432, info["dbname"], free_port()
    user = info.get("user") or "postgres"
    shown = f"postgresql://{info.get('host')}:{port},127.0.0.1:{closed}/{name}"
    for url in (f"postgresql://{user}@{info.get('host')}:{port},127.0.0.1:{closed}/{name}",
                f"host={info.get('host')},127.0.0.1 port={port},{closed} dbname={name} "
                f"user={user}"):
        cli.env["PIPELINE_DATABASE_URL"] = url
        assert endpoint_of(cli, "database") == shown, url
    cli.env["PIPELINE_DATABASE_URL"] = f"host=127.0.0.1,127.0.0.2 port={closed} dbname={name}"
    assert endpoint_of(cli, "database") == (
        f"postgresql://127.0.0.1:{closed},127.0.0.2:{closed}/{name}")
