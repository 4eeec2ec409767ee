"""crontab.example holds the schedule the issue asks for, and the schedule parser reads it."""

from __future__ import annotations

import shlex
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline_cli.errors import ConfigError
from pipeline_cli.schedule import COMMANDS, build_schedule, find_invocation, parse_crontab
from pipeline_cli.settings import RunnerSettings, load_settings

EXAMPLE = Path(__file__).resolve().parents[1] / "crontab.example"


def entries() -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    out: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for e in parse_crontab(EXAMPLE.read_text(), str(EXAMPLE)):
        out.setdefault(e.command, []).append((e.expr, e.args))
    return out


def test_example_schedule() -> None:
    found = entries()
    assert found["sync-odata"] == [("5 */6 * * *", ())]
    assert found["match-gps"] == [("* * * * *", ("--max-runtime", "55"))]
    assert found["run-all"][0][0] == "30 2 * * *"
    assert found["prune"] == [("45 3 * * *", ())]
    (expr, args), = found["status"]
    assert expr == "*/5 * * * *" and "--check" in args and "--prometheus" in args


def test_example_lines_are_cron_safe() -> None:
    text = EXAMPLE.read_text()
    assert "MAILTO=" in text and "logrotate" in text and "copytruncate" in text
    jobs = [line for line in text.splitlines() if line and line[0] in "*0123456789@"]
    assert len(jobs) == 5
    for line in jobs:
        command = line.split(None, 5)[5]
        words = shlex.split(command.replace("&&", " "))
        assert ". /etc/pipeline/pipeline.env" in command  # secrets from an env file
        exe = next(w for w in words if w.endswith("/pipeline"))
        assert exe.startswith("/")  # absolute paths
        assert words[words.index(exe) + 1] == "-q"  # silent on success


def test_every_job_has_an_outer_timeout_above_its_hard_limit() -> None:
    jobs = [line for line in EXAMPLE.read_text().splitlines() if line and line[0] in "*0123456789"]
    assert len(jobs) == 5
    for line in jobs:
        command = line.split(None, 5)[5]
        words = shlex.split(command.replace("&&", " "))
        env = dict(w.split("=", 1) for w in words if w.startswith("PIPELINE_"))
        stage, args = find_invocation(command) or ("", ())
        at = words.index("timeout")
        assert words[at + 1] == "-k" and int(words[at + 2]) > 0  # then SIGKILL
        outer = float(words[at + 3])
        assert words[at + 4].endswith("/pipeline")
        limits = load_settings(None, env).runner.limits()
        if stage in limits:
            assert limits[stage] + 60 <= outer, line  # the run records its failure first
        if "--max-runtime" in args:
            assert float(args[args.index("--max-runtime") + 1]) < limits[stage]
    assert RunnerSettings().limits()["match-gps"] > 55


def test_status_reads_the_example(tmp_path: Path) -> None:
    schedule = build_schedule(EXAMPLE)
    assert set(schedule.entries) == {"sync-odata", "match-gps", "run-all", "prune"}
    now = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
    assert schedule.next_run("sync-odata", now) == datetime(2026, 1, 1, 12, 5, tzinfo=UTC)
    assert schedule.next_run("match-gps", now) == datetime(2026, 1, 1, 12, 1, tzinfo=UTC)
    # A good sync at 06:05 covers the 06:05 slot; the 12:05 slot is not due yet.
    assert schedule.expected_since("sync-odata", now.replace(hour=6, minute=5, second=2),
                                   now, now) is None
    later = now + timedelta(hours=1)
    assert schedule.expected_since("sync-odata", now.replace(hour=6, minute=5, second=2),
                                   now, later) == datetime(2026, 1, 1, 12, 5, tzinfo=UTC)
    # [schedule] entries override the file per stage.
    override = build_schedule(EXAMPLE, {"run-all": "0 4 * * *"})
    assert [e.expr for e in override.for_stage("run-all")] == ["0 4 * * *"]


@pytest.mark.parametrize(("command", "expected"), [
    ("/opt/p/bin/pipeline -q sync-odata", ("sync-odata", ())),
    ("$PIPELINE --log-format json --config /etc/p.toml run-all --wait 5",
     ("run-all", ("--wait", "5"))),
    ("cd /srv && python3 -m pipeline_cli -v match-gps>/dev/null", ("match-gps", ())),
    ("pipeline db migrate", ("db migrate", ())),
    ("/usr/bin/backup.sh", None),
])
def test_find_invocation(command: str, expected: tuple[str, tuple[str, ...]] | None) -> None:
    assert find_invocation(command.replace("$PIPELINE", "/x/pipeline")) == expected


def test_parse_variables_nicknames_percent_and_cron_d() -> None:
    text = (
        "PIPELINE=/opt/pipeline/bin/pipeline\n"
        "CRON_TZ=Europe/Helsinki\n"
        "@daily $PIPELINE -q run-all\n"
        "@reboot $PIPELINE db migrate\n"
        "*/10 * * * * pipeline ${PIPELINE} -q build-graph % stdin\n"  # cron.d user field
        "# 0 0 * * * pipeline -q sync-odata\n"
    )
    found = parse_crontab(text, "cron.d/pipeline")
    assert [(e.expr, e.command, e.tz, e.line) for e in found] == [
        ("@daily", "run-all", "Europe/Helsinki", 3),
        ("*/10 * * * *", "build-graph", "Europe/Helsinki", 5),
    ]
    at = datetime(2026, 6, 1, 20, 0, tzinfo=UTC)  # 23:00 in Helsinki
    assert found[0].next(at) == datetime(2026, 6, 2, 0, 0, tzinfo=found[0].next(at).tzinfo)
    assert found[0].next(at).astimezone(UTC) == datetime(2026, 6, 1, 21, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "message"), [
    ("61 * * * * pipeline sync-odata\n", "crontab:1: invalid cron expression"),
    ("* * * pipeline sync-odata\n", "crontab:1: expected 5 time fields"),
    ("@sometimes pipeline sync-odata\n", "crontab:1: unknown cron schedule"),
    # It passed, then status crashed on it (CroniterBadDateError).
    ("0 0 31 2 * pipeline sync-odata\n", "crontab:1: a cron expression that never fires"),
    ("\n* * * * * pipeline 'sync-odata\n", "crontab:2: cannot parse the command"),
])
def test_bad_lines_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_crontab(text, "crontab")


def test_bad_schedule_settings() -> None:
    with pytest.raises(ConfigError, match="unknown stage 'sync'"):
        build_schedule(None, {"sync": "* * * * *"})
    with pytest.raises(ConfigError, match="invalid cron expression"):
        build_schedule(None, {"sync-odata": "every day"})
    with pytest.raises(ConfigError, match="never fires '0 0 30 2 \\*' for sync-odata"):
        build_schedule(None, {"sync-odata": "0 0 30 2 *"})
    with pytest.raises(ConfigError, match="cannot read"):
        build_schedule("/nonexistent/crontab")


def test_a_crontab_not_in_utf8_is_read(tmp_path: Path) -> None:
    # A Latin-1 comment was a UnicodeDecodeError traceback from status.
    path = tmp_path / "crontab"
    path.write_bytes("# Päivitys\n*/5 * * * * pipeline sync-odata\n".encode("latin-1"))
    assert list(build_schedule(path).entries) == ["sync-odata"]


def test_cron_d_copy_of_the_example(tmp_path: Path) -> None:
    # Copied to /etc/cron.d with the user field "pipeline": status found no stage at all, as the
    # user field was read as the call and `set` as its command.
    lines = [" ".join([*line.split(None, 5)[:5], "pipeline", line.split(None, 5)[5]])
             if line[0] in "*0123456789" else line
             for line in EXAMPLE.read_text().splitlines() if line]
    path = tmp_path / "pipeline"
    path.write_text("\n".join(lines) + "\n")
    schedule = build_schedule(path)
    assert set(schedule.entries) == {"sync-odata", "match-gps", "run-all", "prune"}
    assert schedule.warnings == []


def test_a_line_calling_pipeline_without_a_command_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "crontab"
    path.write_text("*/5 * * * * /opt/p/bin/pipeline -q sync_odata\n"
                    "0 1 * * * pipeline /usr/local/bin/backup.sh\n"  # cron.d: another job
                    "0 2 * * * /opt/p/bin/pipeline -q status --check\n")
    schedule = build_schedule(path)
    assert schedule.entries == {}
    assert schedule.warnings == [f"{path}:1 calls pipeline but names no pipeline command: "
                                 "status cannot tell when it is overdue"]


def test_times_are_the_hosts_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Read in PostgreSQL's zone (that of `now`), a Helsinki host's on-time 02:30 prune was
    # "expected at 02:30+00:00".
    monkeypatch.setenv("TZ", "Europe/Helsinki")
    time.tzset()
    try:
        schedule = build_schedule(None, {"prune": "30 2 * * *"})
        now = datetime(2026, 12, 6, 14, 0, tzinfo=UTC)
        assert schedule.next_run("prune", now) == datetime(2026, 12, 7, 0, 30, tzinfo=UTC)
        ran = datetime(2026, 12, 6, 0, 30, 5, tzinfo=UTC)  # 02:30:05 in Helsinki
        assert schedule.expected_since("prune", ran, ran, now) is None
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.parametrize("tz", ["Europe/Helsinki", ":Europe/Helsinki", None])
def test_slots_past_a_daylight_saving_change_keep_the_local_hour(
        monkeypatch: pytest.MonkeyPatch, tz: str | None, tmp_path: Path) -> None:
    # The host's zone was taken as today's UTC offset: every slot on the other side of a
    # daylight-saving change was an hour off, and status called an on-time run overdue.
    if tz is None:  # no TZ: /etc/localtime's zone, here a copy of Helsinki's
        source = Path("/usr/share/zoneinfo/Europe/Helsinki")
        if not source.is_file():
            pytest.skip("no system zone files")
        monkeypatch.setenv("TZ", str(tmp_path / "localtime"))
        (tmp_path / "localtime").write_bytes(source.read_bytes())
    else:
        monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        schedule = build_schedule(None, {"prune": "30 2 * * *"})
        winter, summer = datetime(2027, 1, 10, 12, tzinfo=UTC), datetime(2027, 7, 10, 12,
                                                                          tzinfo=UTC)
        assert schedule.next_run("prune", winter) == datetime(2027, 1, 11, 0, 30, tzinfo=UTC)
        assert schedule.next_run("prune", summer) == datetime(2027, 7, 10, 23, 30, tzinfo=UTC)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_every_command_is_known_to_the_schedule() -> None:
    from pipeline_cli.commands import COMMANDS as CLI_COMMANDS

    assert set(CLI_COMMANDS) <= COMMANDS
