"""What the CLI writes where nobody watches a terminal: pipes and cron mail get whole values,
global options work after the subcommand, and shell completion is one command away."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
import pytest

from tests.support.clirunner import Cli
from tests.support.graph_fixtures import add_dataset

LONG_DEVICE = "vehicle-" + "0123456789abcdef" * 5  # far wider than an 80-column table cell


def test_batches_list_into_a_pipe_shows_whole_ids(run_cli: Cli,
                                                  conn: psycopg.Connection[Any]) -> None:
    row = conn.execute(
        "INSERT INTO processing_batches (device_id, start_time, end_time, coordinate_count,"
        " status, error_message) VALUES (%s, now(), now(), 3, 'dead', %s) RETURNING batch_id",
        (LONG_DEVICE, "OSRM unavailable at http://127.0.0.1:9/match/v1/driving (refused)"),
    ).fetchone()
    assert row is not None
    result = run_cli("batches", "list")  # CliRunner's stdout is not a TTY, as in `| cat`
    assert result.exit_code == 0, result.output
    assert str(row["batch_id"]) in result.output
    assert LONG_DEVICE in result.output
    assert "http://127.0.0.1:9/match/v1/driving (refused)" in result.output
    assert "…" not in result.output


def test_config_show_into_a_pipe_shows_whole_values(run_cli: Cli) -> None:
    prefix = "pipeline-" + "x" * 90
    run_cli.env["PIPELINE_REDIS_PREFIX"] = prefix
    result = run_cli("config", "show")
    assert result.exit_code == 0
    line = next(ln for ln in result.output.splitlines() if "redis.prefix" in ln)
    assert prefix in line and "PIPELINE_REDIS_PREFIX" in line and "every Redis key" in line
    # Text in brackets is not rich markup: "[odata] url" was printed as " url" (and so was
    # an error naming a setting in run-all's table).
    assert "on the host of [odata] url" in result.output


def test_emoji_codes_in_values_print_as_written(run_cli: Cli,
                                                conn: psycopg.Connection[Any]) -> None:
    # rich read ":V:" in a virtual route id (VR:V:MAIN:1>...) and ":smile:" in a device name
    # as emoji codes, in every table.
    device = "bus:smile:1:v:2"
    conn.execute("INSERT INTO processing_batches (device_id, start_time, end_time,"
                 " coordinate_count, status) VALUES (%s, now(), now(), 3, 'dead')", (device,))
    result = run_cli("batches", "list")
    assert result.exit_code == 0, result.output
    assert device in result.output


def test_config_show_keeps_a_conninfo_database_visible(run_cli: Cli) -> None:
    run_cli.env["PIPELINE_DATABASE_URL"] = (
        "host=db-primary.internal port=5433 dbname=routing_prod user=etl password=Sekr1t-pw")
    for args in (("config", "show"), ("config", "show", "--json")):
        result = run_cli(*args)
        assert result.exit_code == 0
        assert "Sekr1t" not in result.output
        assert "host=db-primary.internal" in result.output
        assert "dbname=routing_prod" in result.output
        assert "password=***" in result.output


def test_quoted_conninfo_password_and_url_password_are_masked(run_cli: Cli) -> None:
    run_cli.env["PIPELINE_DATABASE_URL"] = "host=db dbname=app password='a b\\'c'"
    out = run_cli("config", "show").output
    assert "dbname=app" in out and "password=***" in out and "b\\'c" not in out
    run_cli.env["PIPELINE_DATABASE_URL"] = "postgresql://etl:Sekr1t@db:5432/app?password=Sekr1t"
    out = run_cli("config", "show").output
    assert "Sekr1t" not in out and "etl:***@db:5432/app" in out


def test_global_options_after_the_subcommand(run_cli: Cli, tmp_path: Path) -> None:
    points = tmp_path / "points.csv"
    points.write_text("device_id,recorded_at,latitude,longitude\n"
                      "dev-1,2024-05-01T08:00:00Z,60.17,24.94\n")
    quiet = run_cli.subprocess("ingest-gps", str(points), "-q")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    # logging is reconfigured from the options after the subcommand: JSON lines on stderr
    logged = run_cli.subprocess("ingest-gps", str(points), "--log-format", "json", "-v")
    assert logged.returncode == 0, logged.stderr
    lines = logged.stderr.splitlines()
    assert lines and all(json.loads(ln)["level"] for ln in lines), logged.stderr
    assert "1 valid" in logged.stderr
    nested = run_cli("config", "show", "-q", "-v")
    assert nested.exit_code == 0 and "database.url" in nested.output


@pytest.mark.parametrize(("args", "says"), [
    (("-q", "-v", "db", "migrate"), True), (("-v", "-q", "db", "migrate"), False),
    (("-vv", "-q", "db", "migrate"), False), (("-q", "-vv", "db", "migrate"), True),
    (("db", "migrate", "-q", "-v"), True), (("db", "migrate", "-v", "-q"), False),
    (("-v", "db", "migrate", "-q"), False), (("-q", "db", "migrate", "-v"), True),
])
def test_the_last_of_quiet_and_verbose_wins(run_cli: Cli, args: tuple[str, ...],
                                            says: bool) -> None:
    # `pipeline -q -v run-all` (a -v added to a cron line to debug it) stayed quiet: before
    # the command -q won whatever the order, after it the last one given did.
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert ("schema version" in result.output) == says, result.output


def test_quiet_ingest_that_skips_rows_is_a_silent_success(run_cli: Cli, tmp_path: Path) -> None:
    points = tmp_path / "points.csv"
    points.write_text("device_id,recorded_at,latitude,longitude\n"
                      "dev-1,2024-05-01T08:00:00Z,60.17,24.94\n"
                      "dev-1,2024-05-01T08:00:02Z,nan,24.94\n")
    for args in (("-q", "ingest-gps", str(points)), ("ingest-gps", str(points), "-q")):
        proc = run_cli.subprocess(*args)
        assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
    loud = run_cli("ingest-gps", str(points))
    assert "skipped" in loud.output and "latitude is 'nan'" in loud.output


def test_quiet_after_the_subcommand_still_reports_a_failure(run_cli: Cli) -> None:
    run_cli.env["PIPELINE_DATABASE_URL"] = "postgresql://u@127.0.0.1:1/x"
    proc = run_cli.subprocess("status", "-q")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("pipeline status: error:")


def test_completion_scripts(run_cli: Cli) -> None:
    for shell in ("bash", "zsh", "fish"):
        result = run_cli("completion", shell)
        assert result.exit_code == 0 and "_PIPELINE_COMPLETE" in result.output
    assert run_cli("completion", "tcsh").exit_code == 2
    # the script's protocol, run against the installed script: subcommands complete lazily
    run_cli.env.update({"_PIPELINE_COMPLETE": "bash_complete", "COMP_WORDS": "pipeline run-",
                        "COMP_CWORD": "1"})
    proc = run_cli.subprocess()
    assert proc.returncode == 0 and proc.stdout.split() == ["plain,run-all"]


def test_completion_is_documented() -> None:
    root = Path(__file__).parents[2]
    for doc in ("README.md", "docs/operations.md"):
        assert "pipeline completion" in (root / doc).read_text(), doc


@pytest.mark.parametrize("term", ["xterm", "dumb"])
def test_a_table_too_wide_for_the_terminal_is_printed_whole(run_cli: Cli, term: str) -> None:
    # COLUMNS=20 (a split tmux pane): rich squeezed every column below its narrowest, and
    # `datasets list` showed a grid of empty cells, every value lost. TERM=dumb (an Emacs
    # shell): rich took every dumb terminal for 80 columns, the whole width too, and folded
    # each value a few letters a line.
    run_cli.env.update({"FORCE_COLOR": "1", "COLUMNS": "20", "TERM": term})  # 20 wide
    result = run_cli.subprocess("config", "show")
    assert result.returncode == 0, result.stderr
    assert "database.connect_timeout" in result.stdout
    assert "seconds to wait for a database connection" in result.stdout


def test_list_tables_show_times_in_utc_whatever_the_database_time_zone(
        run_cli: Cli, full_env: dict[str, str], database_url: str,
        conn: psycopg.Connection[Any]) -> None:
    # `datasets list` and `graph list` showed "2026-01-02 08:34", the database session's
    # local time (a server whose timezone is Asia/Kolkata) without saying so, beside log
    # lines and messages in UTC.
    run_cli.env.update(full_env)
    add_dataset(conn)
    conn.execute("INSERT INTO graph_versions (version, seq, dataset_version, nodes, edges, "
                 "build_ms, checksum, export_key) VALUES ('graph-v1', 1, 'ds-v1', 1, 0, 1, "
                 "'c', 'graphs/graph-v1/graph.jsonl.gz')")
    for table in ("datasets", "graph_versions"):
        conn.execute(psycopg.sql.SQL("UPDATE {} SET created_at = '2026-01-02 03:04:05+00'"
                                     ).format(psycopg.sql.Identifier(table)))
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    conn.execute(psycopg.sql.SQL("ALTER DATABASE {} SET TimeZone = 'Asia/Kolkata'").format(
        psycopg.sql.Identifier(str(name))))
    for args in (("datasets", "list"), ("graph", "list")):
        shown = run_cli.cron(*args, env=run_cli.cron_env(TZ="America/New_York"))
        assert shown.returncode == 0, shown.stderr
        assert "2026-01-02 03:04Z" in shown.stdout and "08:34" not in shown.stdout, shown.stdout
    # `batches list` showed its start times so too, with the session's offset.
    conn.execute("INSERT INTO processing_batches (device_id, start_time, end_time, status, "
                 "coordinate_count) VALUES ('bus-1', '2026-01-02 03:04:05+00', "
                 "'2026-01-02 03:05:05+00', 'pending', 2)")
    shown = run_cli.cron("batches", "list", env=run_cli.cron_env(TZ="America/New_York"))
    assert shown.returncode == 0, shown.stderr
    assert "2026-01-02T03:04:05Z" in shown.stdout and "08:34" not in shown.stdout, shown.stdout
