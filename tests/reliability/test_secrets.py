"""Secrets never leak: every command, on its success and failure paths, with text and JSON
logs at -vv, run with a password database role, S3 keys, an OData password and token and a
heartbeat URL carrying a token; none of them may appear in stdout, stderr, ``status --json``,
``config show`` or any column of the run history and the error columns of the stage tables.

Most invocations are real ``pipeline`` processes forked from a pre-imported server (fast);
some run the installed script itself.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from pipeline_cli import db
from tests.support.proxy import TcpProxy
from tests.support.reliability import (
    ForkServer,
    ProcResult,
    Sandbox,
    add_gps_work,
    find_secrets,
    run_pipeline,
    small_network,
    table_text,
)

SandboxFactory = Callable[..., Sandbox]

pytestmark = [pytest.mark.s3, pytest.mark.osrm]


class _Ping(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_POST  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def ping_server() -> Iterator[str]:
    """A healthchecks-like endpoint on 127.0.0.1; yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Ping)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    with ForkServer(tmp_path_factory.mktemp("forkserver")) as fs:
        yield fs


def scan(texts: dict[str, str], values: list[str]) -> list[str]:
    leaks: list[str] = []
    for where, text in texts.items():
        leaks += find_secrets(text, values, where)
    return leaks


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_in_any_output(make_sandbox: SandboxFactory, server: ForkServer,
                                 osrm_url: str, ping_server: str, tmp_path: Path,
                                 no_secret_in_any_output: list[str], log_format: str) -> None:
    odata_password = "odata-pw-" + secrets.token_urlsafe(12)
    odata_token = "odata-tok-" + secrets.token_urlsafe(16)
    ping_token = "ping-" + secrets.token_hex(12)
    wrong_token = "wrong-tok-" + secrets.token_urlsafe(16)
    sb = make_sandbox(osrm_url=osrm_url, odata_rows=None)
    odata = sb.start_odata(small_network(), username="etl", password=odata_password,
                           token=odata_token)
    sb.env.update({
        "PIPELINE_ODATA_USERNAME": "etl", "PIPELINE_ODATA_PASSWORD": odata_password,
        "PIPELINE_ODATA_TOKEN": odata_token, "PIPELINE_ODATA_RETRIES": "2",
        "PIPELINE_NOTIFY_PING_URL": f"{ping_server}/{ping_token}",
        "PIPELINE_NOTIFY_TIMEOUT": "2",
    })
    values = [*sb.secrets, odata_password, odata_token, ping_token, wrong_token]
    assert sb.role_password and sb.role_password in sb.env["PIPELINE_DATABASE_URL"]
    no_secret_in_any_output.extend(values)  # the suite-wide scan covers these too
    glob = ["--log-format", log_format, "-vv"]
    results: list[ProcResult] = []

    def run(*args: str, env: dict[str, str] | None = None, installed: bool = False,
            expect: int | None = 0) -> ProcResult:
        full = [*glob, *args]
        res = run_pipeline(full, env or sb.env) if installed else server.run(full, env or sb.env)
        results.append(res)
        if expect is not None:
            assert res.exit_code == expect, res.describe()
        assert "Traceback" not in res.stderr, res.stderr
        return res

    gps = tmp_path / "points.csv"
    gps.write_text("device_id,recorded_at,latitude,longitude\n"
                   "car-1,2024-01-01T00:00:00Z,60.17,24.94\n"
                   "car-1,2024-01-01T00:00:05Z,60.1702,24.9405\n"
                   "car-1,2024-01-01T00:00:09Z,91.0,24.9405\n")
    # success paths
    run("db", "migrate", installed=True)
    run("sync-odata", "--json", installed=True)
    run("gen-virtual")
    run("build-graph", "--json")
    run("ingest-gps", str(gps))
    add_gps_work(sb.connect(), 1)
    run("match-gps", "--json")
    odata.update_row("Stops", odata.rows("Stops")[0]["ID"], name="changed")
    run("run-all", "--json")
    run("datasets", "list", "--json")
    run("graph", "list")
    run("batches", "list", "--json")
    run("status", expect=None)
    status = run("status", "--json", installed=True, expect=None)
    config = run("config", "show", installed=True)
    run("config", "show", "--json", expect=None)
    # failure paths
    run("ingest-gps", "--strict", str(gps), expect=1)
    run("sync-odata", env={**sb.env, "PIPELINE_ODATA_TOKEN": wrong_token}, expect=1)
    odata.update_row("Stops", odata.rows("Stops")[1]["ID"], latitude=123.0)
    run("sync-odata", expect=1)
    odata.update_row("Stops", odata.rows("Stops")[1]["ID"], latitude=60.2)
    with TcpProxy("127.0.0.1", int(sb.env["PIPELINE_S3_ENDPOINT"].rsplit(":", 1)[1])) as s3p:
        s3p.block()
        s3_down = {**sb.env, "PIPELINE_S3_ENDPOINT": f"127.0.0.1:{s3p.port}"}
        run("sync-odata", env=s3_down, expect=1)
        run("status", "--json", env=s3_down, expect=None)
    pg_port = urlsplit(sb.database_url).port or 5432  # the harness may run its own cluster
    with TcpProxy("127.0.0.1", pg_port) as pgp:
        pgp.block()
        pg_down = {**sb.env, "PIPELINE_DATABASE_URL": sb.database_url.replace(
            f"@127.0.0.1:{pg_port}/", f"@127.0.0.1:{pgp.port}/")}
        assert pg_down["PIPELINE_DATABASE_URL"] != sb.database_url
        run("sync-odata", env=pg_down, expect=None)
        run("status", "--check", env=pg_down, expect=3)
        run("config", "show", env=pg_down)
    with psycopg.connect(sb.database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("build-graph"),))
        run("build-graph", "--force", expect=75)
    run("match-gps", env={**sb.env, "PIPELINE_OSRM_URL": "http://127.0.0.1:9/"}, expect=None)
    run("sync-odata", env={**sb.env, "PIPELINE_NOTIFY_PING_URL": f"http://127.0.0.1:9/"
                           f"{ping_token}"})
    run("sync-odata", env={**sb.env, "PIPELINE_ODATA_URL": "not a url"}, expect=None)

    texts: dict[str, str] = {}
    for i, res in enumerate(results):
        texts[f"stdout of #{i} {' '.join(res.args)}"] = res.stdout
        texts[f"stderr of #{i} {' '.join(res.args)}"] = res.stderr
    conn = sb.connect()
    for table in ("stage_runs", "datasets", "graph_versions", "processing_batches",
                  "virtual_generations"):
        texts[f"table {table}"] = table_text(conn, table)
    assert "etl" in config.stdout and "***" in config.stdout  # secrets shown masked
    assert status.json()["stages"]["sync-odata"]["last_status"] == "success"
    failed = conn.execute("SELECT count(*) AS n FROM stage_runs WHERE status = 'failed'"
                          ).fetchone()
    assert failed is not None and failed["n"] >= 4  # the failure paths were recorded
    assert scan(texts, values) == []
