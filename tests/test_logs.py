"""Logs: one JSON object per line with the run's stage and id; secrets never reach stderr."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from pipeline_cli.logs import TextFormatter
from tests.support.clirunner import Cli


def test_json_log_lines_carry_stage_and_run_id(run_cli: Cli) -> None:
    code = (
        "import logging, sys\n"
        "from pipeline_cli.logs import setup_logging\n"
        "from pipeline_cli.db import Database\n"
        "from pipeline_cli.runner import StageRunner, StageResult\n"
        "setup_logging('json', 0, lambda s: s.replace('hunter2', '***'))\n"
        "def fn(ctx):\n"
        "    ctx.log.info('token hunter2 used', extra={'rows': 3})\n"
        "    return StageResult(status='noop')\n"
        "StageRunner(Database(sys.argv[1])).run('gen-virtual', fn)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, run_cli.env["PIPELINE_DATABASE_URL"]],
                          capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert lines, proc.stderr
    for obj in lines:
        assert {"ts", "level", "stage", "run_id", "msg", "fields"} <= obj.keys()
    used = [o for o in lines if "used" in o["msg"]]
    assert used[0]["stage"] == "gen-virtual" and used[0]["fields"] == {"rows": 3}
    assert "hunter2" not in proc.stderr
    assert len({o["run_id"] for o in lines}) == 1


def test_log_format_json_flag(run_cli: Cli) -> None:
    result = run_cli.subprocess("--log-format", "json", "-v", "db", "migrate")
    assert result.returncode == 0
    for line in result.stderr.splitlines():
        json.loads(line)


def test_psycopg_warnings_do_not_reach_stderr_raw(run_cli: Cli) -> None:
    # Leaving a pipeline block on an error made psycopg warn "error ignored terminating
    # <psycopg.Pipeline [INERROR] (host=... user=... database=...)>": raw text on stderr,
    # under -q and amid JSON log lines alike.
    code = (
        "import sys, psycopg\n"
        "from pipeline_cli.logs import setup_logging\n"
        "setup_logging('json', 0, lambda s: s)\n"
        "with psycopg.connect(sys.argv[1]) as conn:\n"
        "    try:\n"
        "        with conn.pipeline():\n"
        "            conn.execute(\"SELECT 'NaN'::json\")\n"
        "            raise RuntimeError('the stage failed')\n"
        "    except (RuntimeError, psycopg.Error):\n"
        "        pass\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, run_cli.env["PIPELINE_DATABASE_URL"]],
                          capture_output=True, text=True, check=True)
    assert proc.stderr == ""


def test_text_logs_show_control_characters_escaped() -> None:
    record = logging.makeLogRecord({"msg": "stop %s", "args": ("S2\nFAKE\x1b[2J",),
                                    "levelname": "WARNING"})
    assert TextFormatter().format(record).endswith(" stop S2\\nFAKE\\x1b[2J")


def test_json_log_lines_parse_on_an_ascii_stderr(run_cli: Cli, tmp_path: Path) -> None:
    # cron with LC_ALL=C and PYTHONUTF8=0: stderr is ASCII and escapes what it cannot show,
    # and "ä" became \xe4 inside a JSON string, which no JSON parser reads.
    points = tmp_path / "Jyväskylä-Москва.csv"
    points.write_text("device_id,recorded_at,latitude,longitude\n"
                      "dev-1,2024-05-01T08:00:00Z,60.17,24.94\n"
                      "dev-1,2024-05-01T08:00:02Z,999,24.94\n")
    proc = run_cli.cron("--log-format", "json", "ingest-gps", "--strict", str(points),
                        env=run_cli.cron_env(LC_ALL="C", PYTHONUTF8="0"))
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert any("Jyväskylä-Москва.csv" in obj["msg"] for obj in lines), proc.stderr
