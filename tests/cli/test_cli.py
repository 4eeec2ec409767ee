"""The CLI edge: help text, exit codes, --json in both positions, no tracebacks."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import click
import psycopg
import psycopg.sql
import pytest

from devtools import docs_gen
from pipeline_cli import db
from pipeline_cli.cli import cli
from pipeline_cli.commands import COMMANDS, LazyGroup
from tests.support.clirunner import Cli


def all_commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    commands = group.load_all() if isinstance(group, LazyGroup) else group.commands
    for name, cmd in commands.items():
        out.append((f"{prefix}{name}", cmd))
        if isinstance(cmd, click.Group):
            out.extend(all_commands(cmd, f"{prefix}{name} "))
    return out


def test_every_command_has_help_text() -> None:
    for name, cmd in all_commands(cli):
        assert cmd.help and cmd.help.strip(), f"{name} has no help text"


def test_every_command_takes_the_global_options_after_its_name() -> None:
    # `pipeline restore dataset ds-v3 -q` was a usage error: that command joined its group
    # after the group had been given the options.
    for name, cmd in all_commands(cli):
        assert {"quiet", "verbose", "log_format"} <= {p.name for p in cmd.params}, name


def test_generated_docs_are_current() -> None:
    # docs/commands.md and the settings table are generated (`make docs`); a stale page fails.
    docs = Path(__file__).parents[2] / "docs"
    assert (docs / "commands.md").read_text() == docs_gen.commands_page(), "run `make docs`"
    config = (docs / "configuration.md").read_text()
    assert config == docs_gen.settings_page(config), "run `make docs`"
    for name, _ in all_commands(cli):
        assert f"## `pipeline {name}`" in docs_gen.commands_page()


def test_root_help_lists_commands(run_cli: Cli) -> None:
    result = run_cli("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_the_lazy_command_table_matches_the_modules() -> None:
    assert set(cli.load_all()) == set(COMMANDS)


def test_a_command_imports_only_its_own_area() -> None:
    # `status` runs every few minutes from cron: it must not pay for scipy or the OData client.
    probe = ("import sys, click\n"
             "from pipeline_cli.cli import cli\n"
             "cli.get_command(click.Context(cli), 'status')\n"
             "print(sorted(m for m in ('scipy', 'requests', 'pipeline_cli.commands.gps')"
             " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_bad_setting_exits_78_naming_the_key(run_cli: Cli) -> None:
    run_cli.env["PIPELINE_MATCH_GAP_SECONDS"] = "soon"
    result = run_cli.subprocess("status")
    assert result.returncode == 78
    assert "PIPELINE_MATCH_GAP_SECONDS" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [("match-gps", "--max-runtime", "60"),
                                  ("run-all", "--gps-max-runtime", "60")])
def test_soft_budget_must_end_before_the_hard_limit(run_cli: Cli, args: tuple[str, ...]) -> None:
    run_cli.env["PIPELINE_RUNNER_TIMEOUT_MATCH_GPS"] = "60"
    result = run_cli(*args)
    assert result.exit_code == 78
    assert f"{args[1]} 60 must be below [runner] timeout_match_gps (60 s)" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_database_url_exits_78(run_cli: Cli) -> None:
    del run_cli.env["PIPELINE_DATABASE_URL"]
    result = run_cli("status")
    assert result.exit_code == 78
    assert "PIPELINE_DATABASE_URL" in result.output


def test_unreachable_database_masks_password(run_cli: Cli) -> None:
    run_cli.env["PIPELINE_DATABASE_URL"] = "postgresql://u:Sekr1t@127.0.0.1:1/x"
    result = run_cli.subprocess("status")
    assert result.returncode == 1
    assert "Sekr1t" not in result.stderr + result.stdout
    assert "PostgreSQL 127.0.0.1:1/x connection failed: connection refused" in result.stderr


@pytest.mark.parametrize(("toml", "hint"), [
    ("[redis]\nprefx = 'p'\n", "unknown setting [redis] prefx in {f} (did you mean "
     "[redis] prefix?)"),
    ("[databse]\nurl = 'postgresql://h/x'\n", "unknown config section [databse] in {f} "
     "(did you mean [database]?)"),
])
def test_a_misspelt_key_in_the_file_names_the_one_meant(run_cli: Cli, tmp_path: Path,
                                                        toml: str, hint: str) -> None:
    # A misspelt variable said "did you mean PIPELINE_REDIS_PREFIX?"; the same typo in the
    # file named only the typo.
    config = tmp_path / "pipeline.toml"
    config.write_text(toml, encoding="utf-8")
    result = run_cli("--config", str(config), "status")
    assert result.exit_code == 78
    assert result.output.strip() == f"pipeline status: error: {hint.format(f=config)}"


@pytest.mark.parametrize(("var", "value", "key"), [
    ("PIPELINE_S3_ENDPOINT", " 127.0.0.1:9000", "[s3] endpoint"),
    ("PIPELINE_S3_ENDPOINT", "127.0.0.1 :9000", "[s3] endpoint"),
    ("PIPELINE_OSRM_URL", "http://127.0.0.1:5000 ", "[osrm] url"),
])
def test_a_space_around_a_host_and_port_is_named(run_cli: Cli, var: str, value: str,
                                                 key: str) -> None:
    # An env file's stray space: before the S3 endpoint it loaded, and every S3 call failed
    # as "S3 unreachable" (exit 1); after a port it said "port could not be cast to integer
    # value (write ... in a password percent-encoded)", of a setting that holds no password.
    run_cli.env[var] = value
    result = run_cli("config", "show")
    assert result.exit_code == 78, result.output
    assert result.output.strip() == (
        f"pipeline config show: error: malformed setting {key}: a space or tab in the host "
        "or port (a stray one in the env file?)")


@pytest.mark.parametrize("value", ["http://127.0.0.1:8080/odata/ ",
                                   "http://127.0.0.1/sap/odata/?sap-client=100 "])
def test_a_space_after_a_url_path_is_named(run_cli: Cli, value: str) -> None:
    # It was sent: every sync failed with an HTTP 404 quoting the space.
    run_cli.env["PIPELINE_ODATA_URL"] = value
    result = run_cli("config", "show")
    assert result.exit_code == 78, result.output
    assert result.output.strip() == (
        "pipeline config show: error: malformed setting [odata] url: a space or tab at its "
        "end (a stray one in the env file?)")


@pytest.mark.parametrize("nologin", [False, True])
def test_a_login_the_database_refuses_exits_78(run_cli: Cli, pg_admin_url: str,
                                              nologin: bool) -> None:
    # A misspelt user, a NOLOGIN role (as a wrong password or no pg_hba.conf entry) exited 1,
    # "the next run retries", where Redis's and S3's refused credentials exit 78: no rerun
    # gets in until [database] url is fixed.
    from psycopg.conninfo import make_conninfo

    role = f"pipeline_nl_{os.getpid()}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        if nologin:
            admin.execute(psycopg.sql.SQL("CREATE ROLE {} NOLOGIN").format(
                psycopg.sql.Identifier(role)))
    try:
        run_cli.env["PIPELINE_DATABASE_URL"] = make_conninfo(
            run_cli.env["PIPELINE_DATABASE_URL"], user=role, password="Sekr1t-pw")
        for args in (("status",), ("db", "migrate"), ("batches", "list")):
            result = run_cli.subprocess(*args)
            assert result.returncode == 78, (args, result.stderr)
            assert f'FATAL: role "{role}"' in result.stderr, result.stderr
            assert "Sekr1t" not in result.stderr + result.stdout
        assert run_cli.subprocess("status", "--check").returncode == 3  # Nagios: UNKNOWN
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(
                psycopg.sql.Identifier(role)))


@pytest.mark.parametrize("args", [("--json", "status"), ("status", "--json")])
def test_json_before_or_after_subcommand(run_cli: Cli, args: tuple[str, ...]) -> None:
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    obj = json.loads(result.output)
    assert obj["schema"]["version"] >= 1 and "stages" in obj and "locks" in obj


def test_db_migrate_json_and_status_table(run_cli: Cli) -> None:
    result = run_cli("db", "migrate", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)["applied"] == []
    assert "sync-odata" in run_cli("status").output


def test_config_show_masks_secrets(run_cli: Cli) -> None:
    run_cli.env["PIPELINE_S3_SECRET_KEY"] = "verysecret"
    result = run_cli("config", "show", "--json")
    assert result.exit_code == 0
    assert "verysecret" not in result.output
    assert json.loads(result.output)["s3.secret_key"]["value"] == "***"


@pytest.mark.parametrize("var", ["PIPELINE_OSRM_URL", "PIPELINE_ODATA_URL",
                                 "PIPELINE_REDIS_URL"])
def test_config_show_masks_a_url_password_with_a_space(run_cli: Cli, var: str) -> None:
    # The HTTP clients send 'Sek ret-pw' as it is, but config show printed the whole URL:
    # the password mask stopped at the space and found no '@'.
    scheme = "redis" if var == "PIPELINE_REDIS_URL" else "http"
    run_cli.env[var] = f"{scheme}://u:Sek ret-pw@127.0.0.1:5000/" + (
        "0" if scheme == "redis" else "")
    for args in (("config", "show"), ("config", "show", "--json")):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
        assert "ret-pw" not in result.output and "127.0.0.1:5000" in result.output


def test_config_show_json_keeps_types(run_cli: Cli) -> None:
    """A monitor reading --json gets numbers, booleans, objects and null, not their text."""
    run_cli.env["PIPELINE_MATCH_GAP_SECONDS"] = "120"
    run_cli.env.pop("PIPELINE_ODATA_TOKEN", None)
    shown = json.loads(run_cli("config", "show", "--json").output)
    assert shown["match.gap_seconds"] == {"value": 120, "source": "env PIPELINE_MATCH_GAP_SECONDS"}
    assert shown["redis.cluster"]["value"] is False
    assert shown["virtual.speeds_kmh"]["value"]["bus"] == 40.0
    assert shown["odata.token"]["value"] is None


def test_python_dash_m_and_installed_script(run_cli: Cli) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipeline_cli", "--version"], text=True,
                          capture_output=True, check=True)
    assert "pipeline" in proc.stdout
    assert run_cli.subprocess("--help").returncode == 0


def test_usage_error_exits_2(run_cli: Cli) -> None:
    assert run_cli.subprocess("no-such-command").returncode == 2


@pytest.mark.parametrize("args", [
    ("sync-odata",),  # refused before the run: no [odata] url
    ("ingest-gps", "--strict", "{bad}"),  # a recorded failed run with its problems
    ("match-gps", "--no-such-option"),  # a usage error after the subcommand
])
def test_json_log_format_makes_every_stderr_line_json(run_cli: Cli, tmp_path: Path,
                                                      args: tuple[str, ...]) -> None:
    bad = tmp_path / "points.csv"
    bad.write_text("device_id,recorded_at,latitude,longitude\n"
                   "car-1,2024-01-01T00:00:00Z,91.0,24.94\n")
    result = run_cli.subprocess("--log-format", "json",
                                *(a.replace("{bad}", str(bad)) for a in args))
    assert result.returncode != 0
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1]["level"] == "error", result.stderr
    assert lines[-1]["msg"].startswith(f"pipeline {args[0]}: error: ")
    assert lines[-1]["fields"]["exit_code"] == result.returncode


@pytest.mark.parametrize("args", [
    ("--log-format", "json", "no-such-command"),
    ("match-gps", "--no-such-option", "--log-format", "json"),
    ("--json", "match-gps", "--no-such-option", "--log-format=json"),
])
def test_usage_errors_follow_log_format_and_json_wherever_given(
        run_cli: Cli, args: tuple[str, ...]) -> None:
    # An unknown command, or an option after the subcommand, was a plain-text usage message
    # under --log-format json; with --json nothing came on stdout.
    result = run_cli.subprocess(*args)
    assert result.returncode == 2
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0]["fields"]["exit_code"] == 2, result.stderr
    if "--json" in args:
        assert json.loads(result.stdout)["exit_code"] == 2


@pytest.mark.parametrize(("args", "line"), [
    (("--bogus",), "pipeline: error: No such option '--bogus'. Did you mean '--verbose'? "
                   "(see 'pipeline --help')"),
    (("nosuchcmd",), "pipeline: error: No such command 'nosuchcmd'. (see 'pipeline --help')"),
    (("sync-odata", "--bogus"), "pipeline sync-odata: error: No such option '--bogus'. Did you "
                                "mean '--verbose'? (see 'pipeline sync-odata --help')"),
    (("graph", "nosuch"), "pipeline graph: error: No such command 'nosuch'. "
                          "(see 'pipeline graph --help')"),
    (("graph", "activate"), "pipeline graph activate: error: Missing argument 'VERSION'. "
                            "(see 'pipeline graph activate --help')"),
    (("graph", "activate", "a", "b"), "pipeline graph activate: error: Got unexpected extra "
                                      "argument (b) (see 'pipeline graph activate --help')"),
    (("match-gps", "--concurrency", "abc"), "pipeline match-gps: error: Invalid value for "
     "'--concurrency': 'abc' is not a valid integer range. (see 'pipeline match-gps --help')"),
    (("db", "migrate", "--bogus"), "pipeline db migrate: error: No such option '--bogus'. Did "
                                   "you mean '--verbose'? (see 'pipeline db migrate --help')"),
])
def test_a_usage_error_is_one_line_naming_the_command(run_cli: Cli, args: tuple[str, ...],
                                                      line: str) -> None:
    # Click printed four lines (usage, "Try ... --help", a blank, "Error: ..."), unlike every
    # other error; in a subgroup the project's own errors named the group, not the command.
    result = run_cli(*args)
    assert result.exit_code == 2
    assert result.stderr == line + "\n" and result.stdout == ""


@pytest.mark.parametrize("args", [(), ("graph",), ("db",)])
def test_a_group_without_a_command_still_prints_its_help(run_cli: Cli,
                                                         args: tuple[str, ...]) -> None:
    # The one-line usage errors made this help one line with its newlines escaped.
    result = run_cli.subprocess(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"Usage: {' '.join(('pipeline', *args))} [OPTIONS] COMMAND")
    assert "\nCommands:\n" in result.stderr


def test_an_error_in_a_subgroup_command_names_the_whole_command(run_cli: Cli) -> None:
    result = run_cli("graph", "activate", "nosuchversion")
    assert result.exit_code == 2
    assert result.stderr.startswith("pipeline graph activate: error: unknown graph version ")


def test_a_usage_error_quotes_a_long_value_shortened(run_cli: Cli) -> None:
    result = run_cli("match-gps", "--concurrency", "x" * 10_000)
    assert result.exit_code == 2
    assert f"'{'x' * 60}'…(10000 characters) is not a valid" in result.stderr
    assert len(result.stderr) < 300


def test_config_show_refuses_a_schedule_entry_in_one_line(run_cli: Cli) -> None:
    run_cli.env["PIPELINE_SCHEDULE_ENTRIES"] = '{"prune": "not cron"}'
    result = run_cli("config", "show")
    assert result.exit_code == 78 and result.stdout == ""
    assert result.stderr == ("pipeline config show: error: [schedule] entries: invalid cron "
                             "expression 'not cron' for prune\n")


def test_a_secret_given_as_another_value_stays_masked_when_cut_short(run_cli: Cli) -> None:
    # An error quotes a long value by its first 60 characters, which the redaction of the
    # whole secret did not find.
    secret = "Zq8vN3" * 20
    run_cli.env.update({"PIPELINE_S3_SECRET_KEY": secret, "PIPELINE_MATCH_CONCURRENCY": secret})
    result = run_cli("config", "show")
    assert result.exit_code == 78 and "[match] concurrency" not in result.stderr
    assert result.stderr.endswith("PIPELINE_MATCH_CONCURRENCY: expected an integer, got '***'\n")
    assert "Zq8vN3" not in result.output
    result = run_cli("match-gps", "--concurrency", secret)  # Click's message, cut short
    assert result.exit_code == 2 and "Zq8vN3" not in result.output, result.output


@pytest.mark.parametrize("args", [
    ("export", "geojson", "graph", "--version", ""),
    ("graph", "neighbors", "S1", "--version", ""),
    ("export", "geojson", "stops", "-o", ""), ("status", "--prometheus", " "),
    ("batches", "list", "--device", ""), ("ingest-gps", "--device", "", "x.csv"),
])
def test_an_empty_option_value_is_refused_not_read_as_absent(run_cli: Cli,
                                                             args: tuple[str, ...]) -> None:
    # `--version "$V"` with V unset exported the active graph; -o "" wrote to stdout.
    result = run_cli(*args)
    assert result.exit_code == 2 and "must not be empty" in result.output, result.output


@pytest.mark.parametrize("args", [
    ("match-gps", "--max-runtime", "nan"), ("run-all", "--gps-max-runtime", "inf"),
    ("prune", "--wait", "nan"), ("batches", "list", "--limit", "99999999999999999999"),
])
def test_options_refuse_nan_and_numbers_the_database_cannot_take(run_cli: Cli,
                                                                 args: tuple[str, ...]) -> None:
    # nan reached the run record as invalid JSON; a huge --limit, PostgreSQL's bigint.
    result = run_cli(*args)
    assert result.exit_code == 2 and "Invalid value for" in result.output, result.output


LATE_SIGNAL = """
import os, signal, sys
import click
import psycopg
import psycopg.sql
from pipeline_cli import render
from pipeline_cli.app import App
from pipeline_cli.commands import run_stage
from pipeline_cli.runner import StageResult

def term() -> None:
    os.kill(os.getpid(), signal.SIGTERM)

def show(app, record):
    if sys.argv[1] == "render":
        term()
    return render.stage_record(app, record)

@click.command()
@click.pass_context
def main(ctx):
    app = App()
    ctx.obj = app
    ctx.call_on_close(app.resources.close)
    if sys.argv[1] == "cleanup":
        app.resources.callback(term)  # as a client that closes slowly
    run_stage(app, "gen-virtual", lambda c: StageResult(status="noop", message="nothing new"),
              show=show)

main([])
"""


@pytest.mark.parametrize("when", ["render", "cleanup"])
def test_a_signal_after_the_result_is_recorded_leaves_its_exit_code(
        run_cli: Cli, when: str) -> None:
    # SIGTERM just after the run recorded success (while the result was rendered and the
    # clients closed, the handlers already restored) gave exit 143 with nothing on stderr.
    env = {**run_cli.env, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", LATE_SIGNAL, when], env=env, text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "gen-virtual: noop" in done.stdout
    with db.connect(run_cli.env["PIPELINE_DATABASE_URL"], autocommit=True) as conn:
        row = conn.execute("SELECT status FROM stage_runs").fetchone()
    assert row == {"status": "noop"}


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize(("args", "line"), [
    (("status",), "pipeline status: stopped by {} before it finished"),
    (("--log-format", "json", "db", "migrate"),
     "pipeline db migrate: stopped by {} before it finished"),
])
def test_sigterm_outside_a_stage_run_says_so(run_cli: Cli, database_url: str,
                                             args: tuple[str, ...], line: str,
                                             name: str) -> None:
    # `timeout 60 pipeline status` or a deploy stopping `db migrate`: the process died with
    # nothing said, and cron mailed nothing. It still dies of the signal (exit 143 to a
    # shell; an open transaction rolls back with the connection), after one line. A Ctrl-C
    # says the same, naming its command (it said "pipeline: interrupted"), and exits 130.
    import signal
    import time

    sig = getattr(signal, name)
    line = line.format(name)

    from tests.support.proxy import TcpProxy

    params = psycopg.conninfo.conninfo_to_dict(database_url)
    with TcpProxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432),
                  delay=0.5) as slow:  # every exchange with PostgreSQL takes half a second
        run_cli.env["PIPELINE_DATABASE_URL"] = psycopg.conninfo.make_conninfo(
            database_url, host=slow.address[0], port=str(slow.address[1]))
        proc = run_cli.popen(*args)
        while slow.connections == 0 and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == (-sig if sig == signal.SIGTERM else 130), (out, err)
    said = err.strip()
    if "--log-format" in args:
        obj = json.loads(said)
        assert obj["level"] == "error"
        said = obj["msg"]
    assert said == line


def test_an_empty_config_option_is_a_usage_error(run_cli: Cli) -> None:
    # `--config "$CFG"` with CFG unset ran on the defaults (a prune with default retention).
    result = run_cli("--config", "", "config", "show")
    assert result.exit_code == 2 and "'--config': must not be empty" in result.output


def test_a_config_path_that_is_a_directory_exits_78_either_way(run_cli: Cli,
                                                              tmp_path: Path) -> None:
    by_option = run_cli("--config", str(tmp_path), "config", "show")
    run_cli.env["PIPELINE_CONFIG"] = str(tmp_path)
    by_env = run_cli("config", "show")
    for result in (by_option, by_env):
        assert result.exit_code == 78, result.output
        assert "not a file to read (a directory)" in result.output, result.output


@pytest.mark.parametrize("args", [
    ("restore", "dataset", "x\udce9"), ("graph", "activate", "x\udce9"),
    ("graph", "route", "S1", "x\udce9"), ("batches", "list", "--device", "x\udce9"),
    ("batches", "requeue", "--device", "x\udce9"),
    ("ingest-gps", "--device", "x\udce9", __file__),
])
def test_an_argument_that_is_not_utf8_is_a_usage_error(run_cli: Cli,
                                                       args: tuple[str, ...]) -> None:
    result = run_cli(*args)
    assert result.exit_code == 2 and "not valid UTF-8" in result.output, result.output


def test_a_full_disk_on_stdout_is_one_line_not_a_traceback(run_cli: Cli) -> None:
    for args in (("config", "show"), ("--json", "config", "show"), ("--version",)):
        with open("/dev/full", "w") as full:
            proc = run_cli.subprocess(*args, stdout=full, stderr=subprocess.PIPE)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == "pipeline: cannot write the output: No space left on device\n"


def test_verbose_help_says_what_one_v_does(run_cli: Cli) -> None:
    assert "-vv" not in run_cli("--help").output and "-vv" not in run_cli("status",
                                                                          "--help").output


def test_a_read_only_database_is_a_configuration_error_that_doctor_finds(
        run_cli: Cli, database_url: str, tmp_path: Path) -> None:
    # A read replica given by mistake: doctor said "the role can write every table", and
    # every stage failed with exit 1 and PostgreSQL's "cannot execute INSERT in a read-only
    # transaction", as if an outage that the next run would retry.
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on"
                                      ).format(psycopg.sql.Identifier(name)))
    points = tmp_path / "points.csv"
    points.write_text("bus-1,2024-05-01T08:00:00Z,60.17,24.94\n")
    for args in (("ingest-gps", str(points)), ("db", "migrate"), ("batches", "requeue")):
        result = run_cli.subprocess(*args)
        assert result.returncode == 78, result.stderr
        line, = result.stderr.strip().splitlines()[-1:]
        assert "the database is read-only" in line and "[database] url" in line
        assert "Traceback" not in result.stderr
    checks = {c["name"]: c for c in json.loads(run_cli("--json", "doctor").stdout)["checks"]}
    assert not checks["database"]["ok"]
    assert "the database is read-only" in checks["database"]["detail"]


@pytest.mark.parametrize(("args", "hint"), [
    (("statsu",), "Did you mean 'status'?"), (("db", "migarte"), "Did you mean 'migrate'?"),
    (("--json", "sync-data"), "Did you mean 'sync-odata'?"), (("frobnicate",), None)])
def test_a_mistyped_command_gets_a_suggestion(run_cli: Cli, args: tuple[str, ...],
                                              hint: str | None) -> None:
    # Click suggests a mistyped option ("Did you mean '--json'?") but not a command.
    result = run_cli(*args)
    assert result.exit_code == 2
    assert f"No such command '{args[-1]}'." in result.output
    assert (hint in result.output) if hint else "Did you mean" not in result.output


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
@pytest.mark.parametrize("args", [("config", "show"), ("--json", "config", "show")])
def test_output_is_utf8_whatever_the_locale_says(run_cli: Cli, encoding: str,
                                                 args: tuple[str, ...]) -> None:
    # An ASCII stdout (PYTHONIOENCODING, an old locale) gave a UnicodeEncodeError traceback
    # for a table holding "Jyväskylä"; a Latin-1 one wrote JSON that jq cannot read.
    run_cli.env.update({"PIPELINE_REDIS_PREFIX": "Jyväskylä→", "PYTHONIOENCODING": encoding})
    result = run_cli.subprocess(*args, encoding="utf-8")  # strict: Latin-1 bytes fail here
    assert result.returncode == 0, result.stderr
    assert "Jyväskylä→" in result.stdout


def test_utf8_arguments_and_variables_are_read_as_utf8_in_an_ascii_locale(run_cli: Cli) -> None:
    # cron with LC_ALL=C and PYTHONUTF8=0: Python read argv and the environment as ASCII, and
    # `--device Москва-1` or a prefix "jyväskylä" was refused as "not valid UTF-8" (exit 2,
    # exit 78) though every byte was UTF-8.
    env = run_cli.cron_env(LC_ALL="C", PYTHONUTF8="0", PIPELINE_REDIS_PREFIX="jyväskylä")
    listed = run_cli.cron("--json", "batches", "list", "--device", "Москва-1", env=env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["batches"] == []
    shown = run_cli.cron("--json", "config", "show", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["redis.prefix"]["value"] == "jyväskylä"
    # bytes that are not UTF-8 are still refused, naming the option
    latin1 = run_cli.cron("batches", "list", "--device", os.fsdecode(b"Jyv\xe4"), env=env)
    assert latin1.returncode == 2 and "'--device': not valid UTF-8" in latin1.stderr


def test_ctrl_c_while_the_modules_load_is_one_line_not_a_traceback(run_cli: Cli) -> None:
    # A Ctrl-C right after Enter landed in the imports (a third of a second): a 20-line
    # KeyboardInterrupt traceback. Sent at steps through start-up, it never gives one.
    import signal
    import time

    for step in range(12):  # from 0.12 s: not Python's own start-up, which no code can guard
        proc = run_cli.popen("config", "show", start_new_session=True)
        time.sleep(0.12 + 0.04 * step)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
        assert "Traceback" not in err, (step, err)
        assert proc.returncode in (0, 130, -signal.SIGINT), (step, proc.returncode, err)


@pytest.mark.parametrize("args", [("status", "--format", "json"), ("--format", "json", "status"),
                                  ("datasets", "list", "--format=json")])
def test_format_json_points_at_json_not_at_log_format(run_cli: Cli,
                                                      args: tuple[str, ...]) -> None:
    # "Did you mean '--log-format'?": that gives JSON log lines on stderr, tables on stdout.
    result = run_cli(*args)
    assert result.exit_code == 2
    assert "No such option '--format'. Did you mean '--json'?" in result.output


CLOSED = ("sh", "-c", 'exec "$@" >&-', "sh")  # cron lines and scripts that close stdout


@pytest.mark.parametrize("kind", ["named pipe", "directory", "terminal"])
@pytest.mark.parametrize("given", ["--config", "PIPELINE_CONFIG"])
def test_a_config_path_that_cannot_give_a_config_is_refused_at_once(
        run_cli: Cli, tmp_path: Path, kind: str, given: str) -> None:
    # A named pipe with nobody writing to it hung at open, under cron until the next run
    # piled up behind it; /dev/stdin on a terminal waited for the operator to type a config.
    primary, secondary = pty.openpty()
    path = {"named pipe": tmp_path / "fifo", "directory": tmp_path,
            "terminal": Path(os.ttyname(secondary))}[kind]
    if kind == "named pipe":
        os.mkfifo(path)
    args = ("--config", str(path), "status") if given == "--config" else ("status",)
    env = run_cli.cron_env(**({"PIPELINE_CONFIG": str(path)} if given != "--config" else {}))
    try:
        proc = run_cli.cron(*args, env=env, timeout=20)
    finally:
        os.close(primary)
        os.close(secondary)
    why = ("a pipe that gave nothing (does anything write to it?)" if kind == "named pipe"
           else f"not a file to read (a {kind})")
    assert (proc.returncode, proc.stdout) == (78, "")
    assert proc.stderr == f"pipeline status: error: cannot read config file {path}: {why}\n"


@pytest.mark.parametrize("source", ["pipe", "/dev/null"])
def test_a_config_from_a_pipe_or_dev_null_is_read(run_cli: Cli, source: str) -> None:
    """``--config <(sops -d pipeline.toml)`` hands over a pipe, and ``--config /dev/null``
    says "no file, the environment only": both are read, not refused as not regular files."""
    config = ("<(printf '[redis]\\nprefix = \"from-a-pipe\"\\n')" if source == "pipe"
              else "/dev/null")
    wrapper = ("bash", "-c", f'exe="$1"; shift; exec "$exe" --config {config} "$@"', "bash")
    proc = run_cli.cron("config", "show", "--json", wrapper=wrapper)
    assert proc.returncode == 0, proc.stderr
    prefix = json.loads(proc.stdout)["redis.prefix"]
    assert prefix["source"] == ("default" if source == "/dev/null" else prefix["source"])
    assert source == "/dev/null" or prefix["value"] == "from-a-pipe", prefix


@pytest.mark.parametrize(("args", "code", "line"), [
    (("-q", "db", "migrate"), 0, ""),  # writes nothing: nothing is lost
    (("db", "migrate"), 1, "pipeline: cannot write the output: Bad file descriptor\n"),
    (("--version",), 1, "pipeline: cannot write the output: Bad file descriptor\n"),
])
def test_a_closed_stdout_is_one_line_not_a_traceback(run_cli: Cli, args: tuple[str, ...],
                                                     code: int, line: str) -> None:
    # `pipeline -q run-all >&-` (stdout closed): an AttributeError traceback and exit 1 after
    # a successful run, for output nobody had asked for.
    proc = run_cli.cron(*args, wrapper=CLOSED)
    assert (proc.returncode, proc.stderr) == (code, line)


def test_closed_stdin_stdout_and_stderr_keep_the_exit_code(run_cli: Cli) -> None:
    run_cli.env["PIPELINE_MATCH_GAP_SECONDS"] = "soon"
    proc = run_cli.cron("status", wrapper=("sh", "-c", 'exec "$@" <&- >&- 2>&-', "sh"))
    assert proc.returncode == 78


@pytest.mark.parametrize(("variable", "value", "args", "code", "says"), [
    ("PIPELINE_CONFIG", "etc/pipeline.toml", ("status",), 78,
     "pipeline status: error: config file not found: etc/pipeline.toml (relative to the "
     "working directory /: give the full path)"),
    ("PIPELINE_SCHEDULE_CRONTAB", "etc/crontab", ("status", "--check"), 3,
     "PIPELINE UNKNOWN - cannot read [schedule] crontab etc/crontab: No such file or directory"
     " (relative to the working directory /: give the full path)"),
    ("PIPELINE_SCHEDULE_CRONTAB", "~/crontab", ("status", "--check"), 3,
     "PIPELINE UNKNOWN - cannot read [schedule] crontab ~/crontab: No such file or directory"
     " (a ~ is expanded by a shell, not by a crontab or a systemd EnvironmentFile: give the "
     "full path)"),
])
def test_a_relative_path_under_cron_names_the_directory_it_was_looked_for_in(
        run_cli: Cli, variable: str, value: str, args: tuple[str, ...], code: int,
        says: str) -> None:
    # The file is there when an operator tries the line from /etc; cron starts the job
    # elsewhere, and "config file not found: etc/pipeline.toml" did not say where it looked.
    proc = run_cli.cron(*args, env=run_cli.cron_env(**{variable: value}))
    assert proc.returncode == code
    assert (proc.stdout + proc.stderr).strip() == says
