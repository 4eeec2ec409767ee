"""Outages: OData misbehaving, S3/Redis/OSRM stopping mid-run, PostgreSQL restarting
mid-run. Each gives retries per policy, then a clean failure with a non-zero exit; the state
is unchanged and visible in ``pipeline status``; the next run recovers.

Services are cut with a proxy in front of the real server (``TcpProxy.block()`` resets every
connection, as a server going away does); PostgreSQL is restarted for real, on a throwaway
cluster of its own (never the shared one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from devtools.odata_server import Fault
from devtools.services import LocalServices
from pipeline_cli import db
from tests.support.proxy import CountingHttpProxy, TcpProxy
from tests.support.reliability import (
    ForkServer,
    ProcResult,
    Sandbox,
    add_gps_work,
    restart_postgres,
    small_network,
    stop_restarted_postgres,
)

SandboxFactory = Callable[..., Sandbox]
RETRIES = 3

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    with ForkServer(tmp_path_factory.mktemp("forkserver")) as fs:
        yield fs


def one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return next(iter(row.values()))


def last_status(server: ForkServer, sb: Sandbox, stage: str) -> dict[str, Any]:
    res = server.run(["status", "--json"], sb.env)
    info: dict[str, Any] = res.json()["stages"][stage]
    return info


def assert_clean_failure(res: ProcResult, *words: str) -> None:
    assert res.exit_code == 1, res.describe()
    assert "Traceback" not in res.stderr, res.stderr
    for word in words:
        assert word in res.stderr, res.stderr


ODATA_FAULTS = {
    "429": (lambda: Fault.status(429, retry_after=0), RETRIES, "429"),
    "500": (lambda: Fault.status(500), RETRIES, "500"),
    "timeout": (lambda: Fault.delay(2.0), RETRIES, "timed out"),
    "truncated": (lambda: Fault.truncated_json(content_length=False), None, "Stops"),
    "truncated-short-read": (lambda: Fault.truncated_json(), None, "Stops"),
    "never-ending-nextlink": (lambda: Fault.never_ending_next_link(), None, "max_pages"),
}


@pytest.mark.parametrize("fault", list(ODATA_FAULTS))
def test_odata_outage(make_sandbox: SandboxFactory, server: ForkServer, fault: str) -> None:
    sb = make_sandbox(odata_rows=None)
    odata = sb.start_odata(small_network(), page_size=10)
    sb.env.update({"PIPELINE_ODATA_RETRIES": str(RETRIES), "PIPELINE_ODATA_READ_TIMEOUT": "0.5",
                   "PIPELINE_ODATA_MAX_PAGES": "20"})
    assert server.run(["sync-odata"], sb.env).exit_code == 0
    conn = sb.connect()
    before = conn.execute("SELECT * FROM stops ORDER BY id").fetchall()
    odata.update_row("Stops", odata.rows("Stops")[0]["ID"], name="a change that must wait")
    make, expected_requests, word = ODATA_FAULTS[fault]
    odata.add_fault(make(), entity_set="Stops", times=None)
    odata.reset_requests()
    res = server.run(["sync-odata"], sb.env)
    assert_clean_failure(res, word)
    if expected_requests is not None:  # retried per policy, then gave up
        assert odata.request_count("Stops") == expected_requests, odata.requests
    assert one(conn, "SELECT count(*) FROM datasets") == 1  # state unchanged
    assert conn.execute("SELECT * FROM stops ORDER BY id").fetchall() == before
    assert sb.check() == []
    info = last_status(server, sb, "sync-odata")
    assert info["last_status"] == "failed" and info["last_error"]
    odata.clear_faults()
    again = server.run(["sync-odata", "--json"], sb.env)
    assert again.exit_code == 0 and again.json()["dataset_version"] == "ds-v2", again.describe()
    assert sb.check() == []


def test_s3_stops_mid_sync(make_sandbox: SandboxFactory, server: ForkServer) -> None:
    sb = make_sandbox()
    assert sb.s3 is not None
    host, port = sb.s3.endpoint.rsplit(":", 1)
    with TcpProxy(host, int(port)) as proxy:
        sb.env["PIPELINE_S3_ENDPOINT"] = f"127.0.0.1:{proxy.port}"
        res, acted = server.run_triggered(["sync-odata"], sb.env, lambda pid: proxy.block(),
                                          when_line=r"\] started")
        assert acted is not None
        assert_clean_failure(res, "S3")
        conn = sb.connect()
        assert one(conn, "SELECT count(*) FROM datasets") == 0
        assert one(conn, "SELECT count(*) FROM stops") == 0
        assert last_status(server, sb, "sync-odata")["last_status"] == "failed"
        proxy.unblock()
        assert server.run(["sync-odata"], sb.env).exit_code == 0
    sb.env["PIPELINE_S3_ENDPOINT"] = sb.s3.endpoint
    assert sb.check() == []


def test_redis_stops_mid_build(make_sandbox: SandboxFactory, server: ForkServer) -> None:
    sb = make_sandbox()
    for step in ("sync-odata", "gen-virtual", "build-graph"):
        assert server.run([step], sb.env).exit_code == 0
    host, port = sb.redis_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    with TcpProxy(host, int(port)) as proxy:
        sb.env["PIPELINE_REDIS_URL"] = f"redis://127.0.0.1:{proxy.port}/0"
        sb.env["PIPELINE_REDIS_SOCKET_TIMEOUT"] = "1"
        res, acted = server.run_triggered(["build-graph", "--force"], sb.env,
                                          lambda pid: proxy.block(), when_line=r"building")
        assert acted is not None
        assert_clean_failure(res, "Redis")
        proxy.unblock()
        sb.env["PIPELINE_REDIS_URL"] = sb.redis_url
        conn = sb.connect()
        assert one(conn, "SELECT count(*) FROM graph_versions") == 1  # the old one, active
        assert one(conn, "SELECT version FROM graph_versions WHERE active") == "graph-v1"
        assert sb.check() == []  # the pointer still names the complete graph-v1
        assert last_status(server, sb, "build-graph")["last_status"] == "failed"
        again = server.run(["build-graph", "--force", "--json"], sb.env)
        assert again.exit_code == 0, again.describe()
        assert sb.check() == []


@pytest.mark.osrm
def test_osrm_stops_mid_match(make_sandbox: SandboxFactory, server: ForkServer,
                              osrm_url: str) -> None:
    with CountingHttpProxy(osrm_url) as proxy:
        sb = make_sandbox(osrm_url=proxy.url)
        sb.env.update({"PIPELINE_OSRM_RETRIES": "2", "PIPELINE_OSRM_RETRY_WAIT_MAX": "0.05",
                       "PIPELINE_MATCH_BACKOFF_BASE_SECONDS": "0.1",
                       "PIPELINE_MATCH_BACKOFF_MAX_SECONDS": "0.2"})
        conn = sb.connect()
        points = sum(add_gps_work(conn, t, batches=40) for t in range(3))
        res, acted = server.run_triggered(
            ["match-gps", "--concurrency", "2"], sb.env, lambda pid: proxy.block(),
            when_line=r"\] started", after_line=0.1)
        assert acted is not None
        assert_clean_failure(res, "OSRM")
        assert sb.check() == []  # no point lost, none half-done
        failed = one(conn, "SELECT count(*) FROM processing_batches WHERE status = 'failed'")
        assert failed >= 1
        assert one(conn, "SELECT count(*) FROM gps_points") == points
        assert last_status(server, sb, "match-gps")["last_status"] == "failed"
        proxy.unblock()
        import time

        time.sleep(0.5)  # the failed batches' backoff
        again = server.run(["match-gps", "--json"], sb.env)
        assert again.exit_code == 0, again.describe()
        assert one(conn, "SELECT count(*) FROM processing_batches WHERE status <> 'completed'"
                   ) == 0
        assert one(conn, "SELECT count(*) FROM gps_point_status WHERE NOT processed") == 0
        assert sb.check() == []


def test_postgres_restarts_mid_sync(tmp_path_factory: pytest.TempPathFactory,
                                    server: ForkServer, services: LocalServices) -> None:
    """A throwaway cluster of our own, restarted while sync-odata waits for a slow page."""
    own = LocalServices(state_dir=tmp_path_factory.mktemp("pg-restart"))
    url = own.start_postgres_cluster()
    try:
        with Sandbox(services, admin_url=url, odata_rows=small_network()) as sb:
            assert sb.odata is not None
            sb.env["PIPELINE_ODATA_READ_TIMEOUT"] = "10"
            sb.odata.add_fault(Fault.delay(3.0), entity_set="Routes", times=1)
            res, acted = server.run_triggered(
                ["sync-odata"], sb.env, lambda pid: restart_postgres(own, url),
                when_line=r"Stops: \d+ rows")
            assert acted is not None
            assert res.exit_code != 0 and "Traceback" not in res.stderr, res.describe()
            with db.connect(sb.database_url, autocommit=True) as conn:
                assert one(conn, "SELECT count(*) FROM datasets") == 0
                assert one(conn, "SELECT count(*) FROM stops") == 0
            info = last_status(server, sb, "sync-odata")
            assert info["last_status"] in ("failed", "crashed"), info
            again = server.run(["sync-odata"], sb.env)
            assert again.exit_code == 0, again.describe()
            assert sb.check() == []
    finally:
        stop_restarted_postgres(own, url)
        own.stop_all()
