"""`pipeline status`: --json keys, --check Nagios codes, --prometheus file, human output."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from devtools import traces
from devtools.services import LocalServices
from pipeline_cli import db, render
from pipeline_cli.commands.status import check_line
from pipeline_cli.db import Database
from pipeline_cli.gps import batches
from pipeline_cli.runner import StageResult, StageRunner
from pipeline_cli.settings import MatchSettings
from tests.support.clirunner import Cli
from tests.support.standby import as_a_standby


def good_runs(url: str, *stages: str) -> None:
    for stage in stages or ("sync-odata",):
        StageRunner(Database(url)).run(stage, lambda ctx: StageResult(status="noop"))


def test_json_has_every_section(run_cli: Cli) -> None:
    result = run_cli("status", "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.output)
    assert {"health", "stages", "dataset", "virtual", "graph", "gps", "locks", "s3",
            "problems"} <= obj.keys()
    assert obj["health"] in ("ok", "warning", "critical")
    assert obj["stages"]["match-gps"]["last_status"] is None


def test_check_ok_is_one_line_and_silent_under_q(run_cli: Cli) -> None:
    good_runs(run_cli.env["PIPELINE_DATABASE_URL"])
    result = run_cli("status", "--check")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("PIPELINE OK - ") and result.output.count("\n") == 1
    quiet = run_cli("-q", "status", "--check")
    assert quiet.exit_code == 0 and quiet.output == ""


def test_check_warning_and_critical(run_cli: Cli, tmp_path: Path) -> None:
    result = run_cli("status", "--check")  # nothing ever ran
    assert result.exit_code == 1 and result.output.startswith("PIPELINE WARNING - sync-odata")
    good_runs(run_cli.env["PIPELINE_DATABASE_URL"])
    run_cli.env["PIPELINE_SCHEDULE_CRONTAB"] = str(tmp_path / "crontab")
    (tmp_path / "crontab").write_text(
        "PIPELINE=/opt/pipeline/bin/pipeline\n"
        "* * * * * . /etc/pipeline.env && $PIPELINE -q run-all\n")
    with db.connect(run_cli.env["PIPELINE_DATABASE_URL"], autocommit=True) as c:
        c.execute("UPDATE schema_migrations SET applied_at = now() - interval '1 day'")
    result = run_cli("-q", "status", "--check")
    assert result.exit_code == 2, result.output  # overdue for a day: past overdue_critical_s
    assert result.output.startswith("PIPELINE CRITICAL - run-all is overdue")
    run_cli.env["PIPELINE_HEALTH_OVERDUE_CRITICAL_S"] = str(7 * 86400)
    assert run_cli("status", "--check").exit_code == 1


def test_check_unknown_when_the_database_is_unreachable(run_cli: Cli) -> None:
    run_cli.env["PIPELINE_DATABASE_URL"] = "postgresql://pipeline:s3cret@127.0.0.1:9/nope"
    result = run_cli.subprocess("status", "--check")
    assert result.returncode == 3, result
    assert result.stdout.startswith("PIPELINE UNKNOWN - PostgreSQL 127.0.0.1:")
    assert result.stdout.count("\n") == 1 and "Traceback" not in result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    # Without --check the normal CLI edge applies: one error line, exit 1.
    plain = run_cli("status")
    assert plain.exit_code == 1 and "connection failed" in plain.output


@pytest.mark.parametrize(("health", "code"), [("ok", 0), ("warning", 1), ("unknown", 3)])
def test_check_into_a_closed_pipe_keeps_its_nagios_code(run_cli: Cli, health: str,
                                                        code: int) -> None:
    # `pipeline status --check | head -c0`, a monitor that reads the exit code and closes
    # the pipe: the closed pipe made every verdict exit 1, WARNING, whatever the health.
    if health == "ok":
        good_runs(run_cli.env["PIPELINE_DATABASE_URL"])
    elif health == "unknown":
        run_cli.env["PIPELINE_DATABASE_URL"] = "postgresql://pipeline@127.0.0.1:9/nope"
    proc = run_cli.popen("status", "--check")
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the line is written
    _out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (code, "")


def test_status_reads_a_read_only_database(run_cli: Cli, conn: psycopg.Connection[Any],
                                           database_url: str) -> None:
    """On a standby, or with default_transaction_read_only = on, status failed as soon as a
    run was in progress: it marked the run crashed (no lock of it is seen there), an UPDATE
    that is refused, and wrong, as the run lives on the primary. It now shows it running."""
    good_runs(database_url)
    as_a_standby(conn, database_url)
    result = run_cli.subprocess("status", "--json")
    assert result.returncode in (0, 1, 2), result.stderr
    assert json.loads(result.stdout)["stages"]["match-gps"]["last_status"] == "running"
    assert conn.execute("SELECT status FROM stage_runs WHERE stage = 'match-gps'"
                        ).fetchone() == {"status": "running"}


def test_check_unknown_when_unconfigured(run_cli: Cli) -> None:
    del run_cli.env["PIPELINE_DATABASE_URL"]
    result = run_cli("status", "--check")
    assert result.exit_code == 3 and "PIPELINE UNKNOWN - missing setting" in result.output


def test_prometheus_file_is_written_atomically(run_cli: Cli, tmp_path: Path) -> None:
    good_runs(run_cli.env["PIPELINE_DATABASE_URL"])
    target = tmp_path / "pipeline.prom"
    target.write_text("old\n")
    inode = target.stat().st_ino
    result = run_cli("-q", "status", "--prometheus", str(target))
    assert result.exit_code == 0 and result.output == ""
    text = target.read_text()
    assert target.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert os.listdir(tmp_path) == ["pipeline.prom"]  # no temp file left behind
    assert "pipeline_status_up 1" in text and "pipeline_health 0" in text
    assert 'pipeline_stage_last_success_timestamp_seconds{stage="sync-odata"}' in text
    assert (target.stat().st_mode & 0o777) == 0o644
    # Each family's samples together under one HELP and TYPE (they were interleaved stage by
    # stage, which the exposition format forbids), and names in ASCII only.
    families = [line.split("{")[0].split()[0] for line in text.splitlines()
                if not line.startswith("#")]
    runs = [name for i, name in enumerate(families) if i == 0 or families[i - 1] != name]
    assert len(runs) == len(set(runs)), runs
    assert text.count("# TYPE ") == len(set(families)) and text.isascii()


def test_prometheus_dash_prints_the_metrics_alone_on_stdout(
        run_cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `--prometheus -` wrote a file named "-" in the working directory, as `export -o -` did.
    good_runs(run_cli.env["PIPELINE_DATABASE_URL"])
    monkeypatch.chdir(tmp_path)
    for args in (("status", "--prometheus", "-"), ("-q", "status", "--prometheus", "-")):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("# HELP pipeline_status_up ")  # no report before it
        assert "pipeline_status_up 1\n" in result.stdout and "health:" not in result.stdout
        assert result.stderr == "" and os.listdir(tmp_path) == []
    for other in ("--check", "--json"):  # each has its own stdout
        result = run_cli("status", other, "--prometheus", "-")
        assert result.exit_code == 2
        assert (json.loads(result.stdout)["exit_code"] == 2) if other == "--json" \
            else result.stdout == ""
        assert f"does not combine with {other}" in result.stderr
    run_cli.env["PIPELINE_DATABASE_URL"] = "postgresql://postgres@127.0.0.1:9/nope"
    result = run_cli("status", "--prometheus", "-")
    assert result.exit_code == 3 and "pipeline_status_up 0\n" in result.stdout
    assert result.stderr.startswith("pipeline status: error: ")
    assert os.listdir(tmp_path) == []


def test_metric_names_and_nagios_lines_stay_in_their_syntax() -> None:
    # A mode named "métro" made node_exporter refuse the whole file; a "|" in a message (a
    # file name's) started the perfdata early.
    assert render._metric_name("pipeline_virtual", "speeds_kmh", "métro") == \
        "pipeline_virtual_speeds_kmh_m_tro"
    line, code = check_line(None, "cannot read bad|name.csv\nat all")
    assert line == "PIPELINE UNKNOWN - cannot read bad/name.csv at all" and code == 3


def test_prometheus_when_the_database_is_down(run_cli: Cli, tmp_path: Path) -> None:
    run_cli.env["PIPELINE_DATABASE_URL"] = "postgresql://postgres@127.0.0.1:9/nope"
    target = tmp_path / "pipeline.prom"
    result = run_cli("status", "--check", "--prometheus", str(target))
    assert result.exit_code == 3
    assert "pipeline_status_up 0" in target.read_text()
    assert "pipeline_health 3" in target.read_text()


def test_prometheus_into_a_missing_directory_is_one_line(run_cli: Cli, tmp_path: Path) -> None:
    result = run_cli("status", "--prometheus", str(tmp_path / "nope" / "x.prom"))
    assert result.exit_code == 1
    assert result.output.startswith("pipeline status: error: cannot write the metrics file")
    # A monitor still gets its one line (it printed nothing, and exit 1 read as WARNING).
    result = run_cli("status", "--check", "--prometheus", str(tmp_path / "nope" / "x.prom"))
    assert result.exit_code == 3
    assert result.stdout.startswith("PIPELINE UNKNOWN - cannot write the metrics file")


def test_json_and_prometheus_when_the_database_is_down_is_one_json_object(
        run_cli: Cli, tmp_path: Path) -> None:
    run_cli.env["PIPELINE_DATABASE_URL"] = "postgresql://postgres@127.0.0.1:9/nope"
    result = run_cli("status", "--json", "--prometheus", str(tmp_path / "pipeline.prom"))
    assert result.exit_code == 3
    obj = json.loads(result.stdout)  # it printed nothing
    assert obj["status"] == "error" and obj["exit_code"] == 3 and "127.0.0.1" in obj["error"]


def test_human_output_names_the_verdict_and_areas(run_cli: Cli) -> None:
    good_runs(run_cli.env["PIPELINE_DATABASE_URL"], "sync-odata", "gen-virtual")
    result = run_cli("status")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("health: OK")
    for word in ("sync-odata", "gen-virtual", "noop", "dataset", "virtual", "graph", "gps",
                 "locks"):
        assert word in result.output
    assert "\x1b[" not in result.output  # no colour when not on a terminal


def test_short_secrets_do_not_change_the_output(run_cli: Cli) -> None:
    plain = run_cli("status", "--check").output.split(" | ")[0]
    assert "sync-odata has never succeeded: no dataset yet" in plain
    run_cli.env.update({"PIPELINE_ODATA_PASSWORD": "o", "PIPELINE_S3_SECRET_KEY": "in"})
    assert run_cli("status", "--check").output.split(" | ")[0] == plain


def test_a_hung_s3_is_asked_once(run_cli: Cli) -> None:
    """A server that accepts and never answers: status gives it one 3 s try, not four (13 s
    with the stages' retries, longer than a monitor waits)."""
    import socket

    server, accepted = socket.socket(), []
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        run_cli.env["PIPELINE_S3_ENDPOINT"] = f"127.0.0.1:{server.getsockname()[1]}"
        result = run_cli("status", "--check")
        assert "S3 unreachable" in result.stdout and "did not answer" in result.stdout
        server.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                accepted.append(server.accept()[0])
        assert len(accepted) == 1
    finally:
        for conn in accepted:
            conn.close()
        server.close()


@pytest.mark.s3
def test_refused_credentials_are_named_refused_in_every_output(
        full_env: dict[str, str], services: LocalServices, tmp_path: Path) -> None:
    """A wrong S3 secret key or Redis password: the text view, --json, --check and the
    metrics say the server refused, never that it is unreachable, and show no secret."""
    url = services.start_redis_server()
    admin = redis.Redis.from_url(url)
    admin.config_set("requirepass", "Secret-pw-1")
    admin.close()
    good_runs(full_env["PIPELINE_DATABASE_URL"])
    cli = Cli({**full_env, "PIPELINE_S3_SECRET_KEY": "wrongwrong",
               "PIPELINE_REDIS_URL": url.replace("redis://", "redis://:Wrong-pw-2@")})
    prom = tmp_path / "pipeline.prom"
    obj = json.loads(cli("status", "--json", "--prometheus", str(prom)).output)
    assert obj["s3"]["reachable"] is True and obj["s3"]["refused"] is True, obj["s3"]
    assert obj["graph"]["redis_refused"] is True and obj["graph"]["consistent"] is None
    problems = {p["area"]: p for p in obj["problems"]}
    assert problems["s3"]["message"].startswith("S3 refused: ") and \
        "SignatureDoesNotMatch" in problems["s3"]["message"], problems
    assert problems["graph"]["message"].startswith("graph: Redis refused: "), problems
    assert (problems["s3"]["level"], problems["graph"]["level"]) == ("warning", "critical")
    assert "pipeline_s3_refused 1" in prom.read_text()
    text = cli("status").output + cli("status", "--check").output
    assert "S3 refused: " in text and "Redis refused: " in text, text
    assert "unreachable" not in text.lower() and "BROKEN" not in text, text
    assert "wrongwrong" not in text and "Wrong-pw-2" not in text


def test_a_database_that_does_not_exist_is_named_whole(run_cli: Cli) -> None:
    # It read 'connection failed: connection failed: connection to server at ... FATAL:
    # database "..." does not exi…': the cause cut off before its point.
    from psycopg.conninfo import make_conninfo

    run_cli.env["PIPELINE_DATABASE_URL"] = make_conninfo(run_cli.env["PIPELINE_DATABASE_URL"],
                                                         dbname="no_such_database_here")
    result = run_cli("status")
    assert result.exit_code == 1
    assert ('connection failed: FATAL: database "no_such_database_here" does not exist'
            in result.stderr), result.stderr


def test_a_lock_held_by_another_session_is_worded_as_the_busy_error(run_cli: Cli) -> None:
    # The locks line said "held by session 16311 pid None".
    url = run_cli.env["PIPELINE_DATABASE_URL"]
    with db.connect(url, autocommit=True) as holder:
        holder.execute("SET application_name = 'nightly-report'")
        holder.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("build-graph"),))
        backend = holder.execute("SELECT pg_backend_pid() AS pid").fetchone()
        assert backend is not None
        result = run_cli("status")
    assert result.exit_code in (0, 1, 2), result.output
    assert (f"lock     build-graph held by session {backend['pid']} (nightly-report)\n"
            in result.output)
    assert "pid None" not in result.output


def test_an_unmigrated_database_reads_no_section_and_no_lock(run_cli: Cli, tmp_path: Path,
                                                             empty_database_url: str) -> None:
    # The metrics said pipeline_section_ok 1 for every section and the text "locks none held",
    # though nothing was read.
    run_cli.env["PIPELINE_DATABASE_URL"] = empty_database_url
    prom = tmp_path / "pipeline.prom"
    result = run_cli("status", "--prometheus", str(prom))
    assert result.exit_code == 0, result.output
    assert "locks    not collected: the database is not migrated" in result.output
    assert "none held" not in result.output
    text = prom.read_text()
    assert 'pipeline_section_ok{section="dataset"} 0' in text
    assert "pipeline_section_ok{" in text and 'section_ok{section="gps"} 1' not in text
    assert "pipeline_locks_held" not in text
    obj = json.loads(run_cli("status", "--json").output)
    assert obj["gps"] == {"error": "not collected: the database is not migrated"}
    assert obj["locks"] == {} and obj["locks_error"].startswith("not collected")


def test_check_line_stays_short_and_on_its_syntax_whatever_the_error(run_cli: Cli) -> None:
    # A failed run's error is text nobody here wrote (an OData error body): 3 such failures
    # gave a 15 kB line, which NRPE 2 cuts at 1 kB, perfdata first; and a control character
    # reached the monitor as it was.
    from pipeline_cli.errors import SourceError

    body = ('OData 500: "bad" \\ C:\\x | a=1;2 \r\n second line \x07\x1b]0;title\x07 '
            + "é中" * 3000)

    def fail(ctx: object) -> StageResult:
        raise SourceError(body)

    good_runs(run_cli.env["PIPELINE_DATABASE_URL"])
    for _ in range(3):
        StageRunner(Database(run_cli.env["PIPELINE_DATABASE_URL"])).run("build-graph", fail)
    result = run_cli.subprocess("status", "--check")
    assert result.returncode == 2, result
    line = result.stdout
    assert len(line.encode()) <= 1024 and line.endswith("\n") and line.count("\n") == 1, line
    assert line.startswith('PIPELINE CRITICAL - build-graph failed 3 times in a row: OData 500: '
                           '"bad" \\ C:\\x / a=1;2 second line \\x07\\x1b]0;title\\x07 é中é中')
    text, perf = line[:-1].split(" | ")
    assert text.endswith("...") and all(c.isprintable() for c in text), text
    assert re.fullmatch(r"collect_ms=\d+ unprocessed_points=\d+", perf), perf
    # The human view keeps the whole error, on its problem's line as the error lines show it.
    human = run_cli("status").output.splitlines()
    assert human[1].startswith('  critical build-graph failed 3 times in a row: OData 500: '
                               '"bad" \\ C:\\x | a=1;2 \\r\\n second line \\x07\\x1b]0;')
    assert human[1].endswith("é中" * 3000) and human[2] == "", human[:3]


# The tables the sections read (dataset, virtual, graph, gps, prune, s3), not stage_runs:
# the run history is status itself, and without it status is UNKNOWN.
SECTION_TABLES = "datasets, virtual_generations, graph_versions, gps_points, processing_batches"


def test_tables_held_locked_cannot_hold_status_past_its_budget(run_cli: Cli) -> None:
    # A `db migrate` (or a long transaction) held them in ACCESS EXCLUSIVE mode: each section
    # waited out its own 5 s statement timeout and status took 25 s, past NRPE's 10 s, so the
    # monitor said "socket timeout" instead of status's own line.
    url = run_cli.env["PIPELINE_DATABASE_URL"]
    good_runs(url)
    with db.connect(url) as holder:  # a transaction: the locks stay until it ends
        holder.execute(f"LOCK TABLE {SECTION_TABLES} IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        result = run_cli.subprocess("status", "--check")
        took = time.monotonic() - started
    assert took < 12, f"{took:.1f} s: {result}"  # the budget (8 s) and a generous margin
    assert result.returncode == 1, result
    assert result.stdout.startswith("PIPELINE WARNING - "), result.stdout
    assert "section unavailable" in result.stdout, result.stdout


def test_points_dated_ahead_are_named_in_the_gps_line(run_cli: Cli) -> None:
    url = run_cli.env["PIPELINE_DATABASE_URL"]
    good_runs(url)
    now = datetime.now(UTC)
    with db.connect(url, autocommit=True) as conn:
        traces.insert_points(conn, [("dev", now - timedelta(seconds=10), 60.17, 24.94),
                                    ("dev", now + timedelta(days=365), 60.17, 24.94)])
        assert "dated ahead" not in run_cli("status").output
        batches.make_batches(conn, MatchSettings())
    assert json.loads(run_cli("status", "--json").output)["gps"]["future_points"] == 1
    result = run_cli("status")
    assert result.exit_code == 0, result.output
    gps = result.output.split("\ngps ", 1)[1].split("\nprune ", 1)[0]
    assert " 1 point(s) dated ahead wait until their time comes" in " ".join(gps.split()), gps


def test_the_graph_line_says_in_words_when_redis_has_no_pointer_or_was_not_asked(
        run_cli: Cli, full_env: dict[str, str], conn: psycopg.Connection[Any]) -> None:
    """It read 'Redis pointer -: not checked: ...', a dash for a pointer nobody read."""
    from devtools.procs import free_port
    from tests.support.graph_fixtures import add_dataset, add_generation

    run_cli.env.update(full_env)
    generation = add_generation(conn, add_dataset(conn))
    conn.execute("INSERT INTO graph_versions (version, seq, dataset_version, "
                 "virtual_generation_id, nodes, edges, build_ms, checksum, export_key, active) "
                 "VALUES ('graph-v1', 1, 'ds-v1', %s, 1, 0, 1, 'c', "
                 "'graphs/graph-v1/graph.jsonl.gz', true)", (generation,))
    shown = " ".join(run_cli("status").output.split())  # the table wraps the line
    assert "1 nodes, 0 edges; no Redis pointer: BROKEN: PostgreSQL's active graph is graph-v1 " \
        "but Redis points at nothing" in shown, shown
    run_cli.env["PIPELINE_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    shown = " ".join(run_cli("status").output.split())
    assert "1 nodes, 0 edges; Redis pointer: not checked: Redis unreachable: " in shown, shown
    assert "Redis pointer -" not in shown


def test_a_graph_of_an_unknown_generation_says_unknown_not_none(
        run_cli: Cli, conn: psycopg.Connection[Any]) -> None:
    # A graph version recorded without its virtual generation read "(generation None)":
    # Python's word for it, where the rest of the status text says "unknown".
    conn.execute("INSERT INTO graph_versions (version, seq, dataset_version, "
                 "virtual_generation_id, nodes, edges, build_ms, checksum, export_key, active) "
                 "VALUES ('graph-v1', 1, 'ds-v1', NULL, 1, 0, 1, 'c', "
                 "'graphs/graph-v1/graph.jsonl.gz', true)")
    result = run_cli("status")
    shown = " ".join(result.output.split())  # the table wraps the line
    assert "graph graph-v1 for ds-v1 (generation unknown): 1 nodes, 0 edges;" in shown, shown
    assert "None" not in result.output
    assert json.loads(run_cli("status", "--json").output)["graph"]["virtual_generation_id"] \
        is None
