"""`pipeline run-all` through the CLI: --json stages, summary table, -q, exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import traces
from devtools.odata_server import ODataServer, delay, sample_network
from pipeline_cli import db
from pipeline_cli.adapters.osrm import OsrmClient
from tests.support.clirunner import Cli

pytestmark = [pytest.mark.osrm, pytest.mark.s3]


@pytest.fixture
def cli(run_cli: Cli, full_env: dict[str, str], osrm_url: str) -> Iterator[Cli]:
    with ODataServer(sample_network(40), page_size=50) as server:
        run_cli.env.update(full_env)
        run_cli.env.update({"PIPELINE_OSRM_URL": osrm_url, "PIPELINE_ODATA_URL": server.url})
        yield run_cli


def test_json_then_quiet_noop_rerun(cli: Cli) -> None:
    result = cli.subprocess("run-all", "--json")
    assert result.returncode == 0, result.stderr
    obj = json.loads(result.stdout)
    assert obj["stage"] == "run-all" and obj["status"] == "success"
    assert list(obj["stages"]) == ["sync-odata", "gen-virtual", "build-graph", "match-gps"]
    assert obj["stages"]["build-graph"]["status"] == "success"
    assert obj["stages"]["match-gps"] == {**obj["stages"]["match-gps"], "status": "noop",
                                          "run_id": None, "reason": "no GPS backlog"}
    quiet = cli.subprocess("-q", "run-all")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    table = cli("run-all")
    assert table.exit_code == 0
    assert "run-all: noop" in table.output and "nothing new upstream" in table.output


@pytest.mark.parametrize("args", [("-q", "run-all"), ("run-all", "-q")])
def test_quiet_success_writes_nothing_for_cron_to_mail(cli: Cli, args: tuple[str, ...]) -> None:
    # a first run does real work in every stage (-q with unreached real stops:
    # tests/cli/test_gen_virtual_cli.py)
    result = cli.subprocess(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    with db.connect(cli.env["PIPELINE_DATABASE_URL"], autocommit=True) as conn:
        row = conn.execute("SELECT status, counts FROM stage_runs "
                           "WHERE stage = 'gen-virtual'").fetchone()
    assert row is not None and row["status"] == "success" and row["counts"]["virtual_stops"] > 0


def test_failure_exits_with_the_stage_code_and_mails_the_table(cli: Cli) -> None:
    cli.env["PIPELINE_ODATA_URL"] = "http://127.0.0.1:9/odata/"
    cli.env["PIPELINE_ODATA_RETRIES"] = "1"
    result = cli.subprocess("-q", "run-all")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "\npipeline run-all: error: sync-odata failed:" in result.stderr
    # every stage has its row: the ones after the failure ran on what they had (nothing), and
    # say which stage left them out
    assert "skipped: sync-odata failed" in result.stderr and "no GPS backlog" in result.stderr
    assert "nothing new upstream" not in result.stderr
    assert "Traceback" not in result.stderr
    with db.connect(cli.env["PIPELINE_DATABASE_URL"], autocommit=True) as conn:
        rows = conn.execute("SELECT stage, status FROM stage_runs ORDER BY stage").fetchall()
    assert [(r["stage"], r["status"]) for r in rows] == [("run-all", "failed"),
                                                         ("sync-odata", "failed")]


def test_json_with_the_source_down_has_every_stage_and_no_secret(
        cli: Cli, osrm_url: str) -> None:
    with OsrmClient(osrm_url) as client:
        rows = [row for t in traces.make_traces(client, 1, seed=3) for row in t.rows("bus-1")]
    with db.connect(cli.env["PIPELINE_DATABASE_URL"], autocommit=True) as conn:
        traces.insert_points(conn, rows)
    with ODataServer(sample_network(5)) as stopped:
        url = stopped.url
    cli.env["PIPELINE_ODATA_URL"] = url + "?api_key=Ap1KeyN0tForLogs"
    cli.env["PIPELINE_ODATA_RETRIES"] = "1"
    cli.env["PIPELINE_DATABASE_URL"] += " password=Pg1PassN0tForLogs"  # trust auth ignores it
    result = cli.subprocess("run-all", "--json")
    assert result.returncode == 1, result.stderr
    obj = json.loads(result.stdout)
    assert obj["failed_stage"] == "sync-odata" and obj["exit_code"] == 1
    assert obj["error"].startswith("sync-odata failed: OData ")
    stages = obj["stages"]
    assert {s: r["status"] for s, r in stages.items()} == {
        "sync-odata": "failed", "gen-virtual": "noop", "build-graph": "noop",
        "match-gps": "success"}  # the GPS points did not wait for the source
    assert stages["sync-odata"]["exit_code"] == 1 and stages["sync-odata"]["error"]
    assert stages["gen-virtual"]["reason"] == stages["build-graph"]["reason"] == (
        "skipped: sync-odata failed")
    assert stages["match-gps"]["counts"]["points_processed"] == len(rows)
    with db.connect(cli.env["PIPELINE_DATABASE_URL"], autocommit=True) as conn:
        history = conn.execute("SELECT stage, status, error, result::text AS result "
                               "FROM stage_runs ORDER BY started_at").fetchall()
    assert [(r["stage"], r["status"]) for r in history] == [
        ("run-all", "failed"), ("sync-odata", "failed"), ("match-gps", "success")]
    for text in (result.stdout, result.stderr, json.dumps(history)):
        assert "Ap1KeyN0tForLogs" not in text and "Pg1PassN0tForLogs" not in text


def test_busy_run_all_lock_exits_75(cli: Cli) -> None:
    with db.connect(cli.env["PIPELINE_DATABASE_URL"], autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("run-all"),))
        result = cli("run-all", "--json")
    assert result.exit_code == 75
    assert json.loads(result.output)["status"] == "busy"


def test_dry_run_on_a_fresh_database_says_what_would_happen_and_records_nothing(cli: Cli
                                                                               ) -> None:
    table = cli("run-all", "--dry-run")
    assert table.exit_code == 0, table.output
    assert "run-all: dry-run" in table.output
    assert "would regenerate for the new dataset" in table.output
    assert "would build graph-v1 from the new virtual generation" in table.output
    obj = json.loads(cli("run-all", "--dry-run", "--json").stdout)
    assert obj["status"] == "dry-run" and obj["dry_run"] is True
    assert obj["stages"]["sync-odata"]["inserted"]["stops"] == 40
    # A failing upstream fails the dry run with its exit code, and records nothing either.
    cli.env["PIPELINE_ODATA_URL"] = "http://127.0.0.1:9/odata/"
    cli.env["PIPELINE_ODATA_RETRIES"] = "1"
    failed = cli("run-all", "--dry-run")
    assert failed.exit_code == 1 and "sync-odata failed" in failed.stderr
    with db.connect(cli.env["PIPELINE_DATABASE_URL"], autocommit=True) as conn:
        for table_name in ("stage_runs", "datasets", "virtual_generations", "graph_versions"):
            row = conn.execute(f"SELECT count(*) AS n FROM {table_name}").fetchone()  # noqa: S608
            assert row == {"n": 0}, table_name


def test_a_failed_stage_problems_are_mailed_with_the_error(run_cli: Cli,
                                                          full_env: dict[str, str]) -> None:
    # The mail said "validation failed: 1 problem(s) (Stops: 1 out of range)" and no more.
    with ODataServer(sample_network(40), page_size=50) as server:
        server.update_row("Stops", 7, latitude=95.0)
        run_cli.env.update(full_env)
        run_cli.env["PIPELINE_ODATA_URL"] = server.url
        result = run_cli.subprocess("-q", "run-all")
    assert result.returncode == 1
    assert ("pipeline run-all: error: sync-odata failed: validation failed: 1 problem(s)"
            in result.stderr)
    assert "\n  - Stops[ID=7] latitude: 95.0 is outside -90..90\n" in result.stderr


@pytest.mark.parametrize(("how", "code"), [("SIGTERM", 143), ("SIGINT", 130), ("SIGHUP", 129),
                                           ("timeout", 124)])
def test_a_stop_signal_from_cron_or_a_hung_up_session_is_one_line_and_releases_the_lock(
        run_cli: Cli, full_env: dict[str, str], osrm_url: str, how: str, code: int) -> None:
    # SIGHUP (an SSH session hung up) killed run-all with no line and exit 129 from the
    # shell: the runs stayed `running` until a later run reaped them as `crashed`.
    # `timeout 5` sends SIGTERM and exits 124 itself (its own code, not the pipeline's 143).
    with ODataServer(sample_network(40), page_size=10) as server:
        server.add_fault(delay(60), entity_set="Routes", times=None)  # a source that hangs
        run_cli.env.update({**full_env, "PIPELINE_OSRM_URL": osrm_url,
                            "PIPELINE_ODATA_URL": server.url})
        proc = run_cli.cron_popen("run-all", wrapper=("timeout", "5") if how == "timeout"
                                  else ())
        try:
            deadline = time.monotonic() + 30
            while server.request_count("Routes") == 0:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
                time.sleep(0.05)
            second = run_cli.cron("run-all")  # while the first holds the lock
            if how != "timeout":
                proc.send_signal(getattr(signal, how))
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert second.returncode == 75 and second.stdout == ""
    assert re.fullmatch(r"pipeline run-all: error: run-all is already running: lock held by "
                        rf"host {re.escape(socket.gethostname())} pid \d+ since \S+:\d\dZ\n",
                        second.stderr), second.stderr
    signum = signal.SIGTERM if how == "timeout" else getattr(signal, how)
    assert proc.returncode == code, err
    errors = [line for line in err.splitlines() if line.startswith("pipeline")]
    assert errors == [f"pipeline run-all: error: sync-odata failed: interrupted by signal "
                      f"{int(signum)}"] and "Traceback" not in err
    with db.connect(run_cli.env["PIPELINE_DATABASE_URL"], autocommit=True) as conn:
        rows = conn.execute("SELECT stage, status FROM stage_runs ORDER BY stage").fetchall()
        held = conn.execute("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' "
                            "AND database = (SELECT oid FROM pg_database "
                            "WHERE datname = current_database())").fetchone()
        datasets = conn.execute("SELECT count(*) AS n FROM datasets").fetchone()
    assert [(r["stage"], r["status"]) for r in rows] == [("run-all", "failed"),
                                                         ("sync-odata", "failed")]
    assert held == {"n": 0} and datasets == {"n": 0}


def test_a_hung_up_terminal_ends_the_run_with_129(run_cli: Cli, full_env: dict[str, str],
                                                  osrm_url: str) -> None:
    # An operator's SSH session drops mid run-all: the run was recorded failed, but every
    # later write to the gone terminal failed (EIO), and Python exited 120.
    with ODataServer(sample_network(40), page_size=10) as server:
        server.add_fault(delay(60), entity_set="Routes", times=None)
        run_cli.env.update({**full_env, "PIPELINE_OSRM_URL": osrm_url,
                            "PIPELINE_ODATA_URL": server.url})
        terminal, tty = pty.openpty()
        exe = str(Path(sys.executable).with_name("pipeline"))
        # setsid --ctty: the run leads a session whose controlling terminal is the pty
        proc = subprocess.Popen(["setsid", "--ctty", exe, "run-all"], stdin=tty, stdout=tty,
                                stderr=tty, env=run_cli.cron_env(TERM="xterm"), cwd="/")
        os.close(tty)
        try:
            deadline = time.monotonic() + 30
            while server.request_count("Routes") == 0:
                assert time.monotonic() < deadline and proc.poll() is None
                with contextlib.suppress(OSError):
                    os.read(terminal, 4096)  # as a terminal shows the log lines
                time.sleep(0.05)
        finally:
            os.close(terminal)  # the hangup: the kernel sends SIGHUP to the session
            code = proc.wait(timeout=30)
    assert code == 129
    with db.connect(run_cli.env["PIPELINE_DATABASE_URL"], autocommit=True) as conn:
        rows = conn.execute("SELECT stage, status FROM stage_runs ORDER BY stage").fetchall()
    assert [(r["stage"], r["status"]) for r in rows] == [("run-all", "failed"),
                                                         ("sync-odata", "failed")]
