"""Heartbeat: a real local HTTP server records the pings of stage runs."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import click
import pytest
from click.testing import CliRunner

from pipeline_cli import db
from pipeline_cli.adapters.heartbeat import Heartbeat, ping_url
from pipeline_cli.app import App
from pipeline_cli.commands import pass_app, run_stage
from pipeline_cli.errors import SourceError
from pipeline_cli.runner import RunContext, StageResult
from tests.support.clirunner import Cli


class PingServer:
    """Records (path, body) of every request; answers ``status`` after ``delay`` seconds."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.pings: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(delay)
                outer.pings.append((self.path, body.decode()))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the slow case: the client gave up before the answer (broken pipe)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/ping/s3cretkey"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def pings() -> Iterator[PingServer]:
    server = PingServer()
    yield server
    server.close()


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ping_url_appends_fail_and_fills_the_stage() -> None:
    assert ping_url("https://hc.example/abc", "sync-odata", fail=False) == "https://hc.example/abc"
    assert ping_url("https://hc.example/abc/", "x", fail=True) == "https://hc.example/abc/fail"
    assert ping_url("https://hc.example/k/{stage}?rid=1", "match-gps", fail=True) == (
        "https://hc.example/k/match-gps/fail?rid=1")


def stage_command(fn: Any) -> click.Command:
    @click.command()
    @pass_app
    def cmd(app: App) -> None:
        run_stage(app, "gen-virtual", fn)

    return cmd


def invoke(env: dict[str, str], fn: Any) -> Any:
    app = App()
    with app.resources:
        return CliRunner().invoke(stage_command(fn), [], obj=app, env=env,
                                  catch_exceptions=False)


def test_success_and_failure_ping(pings: PingServer, pipeline_env: dict[str, str]) -> None:
    env = {**pipeline_env, "PIPELINE_NOTIFY_PING_URL": pings.url}
    assert invoke(env, lambda ctx: StageResult(status="noop")).exit_code == 0
    assert pings.pings[-1][0] == "/ping/s3cretkey"
    assert pings.pings[-1][1].startswith("pipeline gen-virtual: noop in ")

    def fail(ctx: RunContext) -> StageResult:
        raise SourceError("the feed is down")

    assert invoke(env, fail).exit_code == 1
    assert pings.pings[-1][0] == "/ping/s3cretkey/fail"
    assert pings.pings[-1][1].endswith(": the feed is down")
    assert len(pings.pings) == 2


def test_refused_run_pings_fail_but_a_busy_lock_does_not(
        pings: PingServer, pipeline_env: dict[str, str], empty_database_url: str) -> None:
    env = {**pipeline_env, "PIPELINE_NOTIFY_PING_URL": pings.url}
    with db.connect(pipeline_env["PIPELINE_DATABASE_URL"], autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("gen-virtual"),))
        app = App()
        with app.resources:
            result = CliRunner().invoke(stage_command(lambda ctx: StageResult()), [], obj=app,
                                        env=env, catch_exceptions=True)
    assert result.exit_code != 0 and pings.pings == []  # LockBusy: the holder will ping
    env["PIPELINE_DATABASE_URL"] = empty_database_url  # unmigrated: refused before the run
    app = App()
    with app.resources:
        CliRunner().invoke(stage_command(lambda ctx: StageResult()), [], obj=app, env=env,
                           catch_exceptions=True)
    assert [p[0] for p in pings.pings] == ["/ping/s3cretkey/fail"]
    assert "db migrate" in pings.pings[0][1]


@pytest.mark.parametrize("kind", ["refused", "http500", "slow"])
def test_a_dead_ping_url_never_fails_the_stage(kind: str, pipeline_env: dict[str, str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    server = None
    if kind == "refused":
        url = f"http://127.0.0.1:{dead_port()}/ping/s3cretkey"
    else:
        server = PingServer(status=500) if kind == "http500" else PingServer(delay=2.0)
        url = server.url
    env = {**pipeline_env, "PIPELINE_NOTIFY_PING_URL": url, "PIPELINE_NOTIFY_TIMEOUT": "0.3"}
    # The CLI's setup_logging stops propagation to the root logger: listen on ours directly.
    heartbeat_log = logging.getLogger("pipeline.heartbeat")
    heartbeat_log.addHandler(caplog.handler)
    try:
        started = time.monotonic()
        result = invoke(env, lambda ctx: StageResult(status="success"))
        elapsed = time.monotonic() - started
    finally:
        heartbeat_log.removeHandler(caplog.handler)
        if server is not None:
            server.close()
    assert result.exit_code == 0, result.output
    assert elapsed < 30  # bounded by the ping timeout, not by the server (no timing goal)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "heartbeat success ping for gen-virtual" in messages
    assert "s3cretkey" not in messages and "127.0.0.1" not in messages


def test_no_url_no_ping() -> None:
    assert Heartbeat(None).success("sync-odata") is False


def test_installed_cli_pings_and_keeps_the_url_out_of_logs(pings: PingServer, run_cli: Cli
                                                          ) -> None:
    # The real `pipeline gen-virtual` on an empty dataset table: skipped, which is not a failure.
    run_cli.env.update({"PIPELINE_NOTIFY_PING_URL": pings.url, "PIPELINE_S3_ENDPOINT": "x:1"})
    result = run_cli.subprocess("--log-format", "json", "-v", "gen-virtual")
    assert result.returncode == 0, result.stderr
    assert [p[0] for p in pings.pings] == ["/ping/s3cretkey"]
    assert "s3cretkey" not in result.stdout + result.stderr
