"""Migrations: one transaction under an advisory lock, idempotent, safe to run concurrently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_cli import db
from pipeline_cli.errors import SchemaError
from tests.support.clirunner import Cli


def test_migrate_is_idempotent(empty_database_url: str) -> None:
    with db.connect(empty_database_url, autocommit=True) as conn:
        assert db.schema_version(conn) == 0
        first = db.migrate(conn)
        assert first.applied and first.version == db.latest_version()
        again = db.migrate(conn)
        assert again.applied == [] and again.version == first.version
        rows = conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
        assert [r["version"] for r in rows] == [m.version for m in db.migrations()]


def test_two_concurrent_migrations_both_succeed(empty_database_url: str) -> None:
    exe = str(Path(sys.executable).with_name("pipeline"))
    env = {"PATH": "/usr/bin:/bin", "PIPELINE_DATABASE_URL": empty_database_url}
    procs = [subprocess.Popen([exe, "db", "migrate", "--json"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    applied = sorted(len(__import__("json").loads(o[0])["applied"]) for o in outs)
    assert applied == [0, len(db.migrations())]


def test_check_schema_refuses_unmigrated_and_outdated(empty_database_url: str) -> None:
    with db.connect(empty_database_url, autocommit=True) as conn:
        with pytest.raises(SchemaError, match="pipeline db migrate"):
            db.check_schema(conn)
        db.migrate(conn)
        assert db.check_schema(conn) == db.latest_version()
        conn.execute("DELETE FROM schema_migrations WHERE version = %s", (db.latest_version(),))
        with pytest.raises(SchemaError, match="outdated.*pipeline db migrate"):
            db.check_schema(conn)


def test_named_queries_parse() -> None:
    assert "pg_try_advisory_xact_lock" in db.query("runner", "try_lock").as_string(None)
    with pytest.raises(KeyError):
        db.query("runner", "no_such_query")


def test_advisory_key_is_stable_and_signed_64_bit() -> None:
    key = db.advisory_key("sync-odata")
    assert key == db.advisory_key("sync-odata")
    assert -(2**63) <= key < 2**63
    assert key != db.advisory_key("gen-virtual")


def test_db_status_check_gates_a_deploy_and_status_shows_versions(
        empty_database_url: str, run_cli: Cli) -> None:
    run_cli.env["PIPELINE_DATABASE_URL"] = empty_database_url
    versions = [f"{m.version:03d}" for m in db.migrations()]
    res = run_cli("db", "status", "--check")
    assert res.exit_code == 78
    assert f"schema none, pending {', '.join(versions)}" in res.stderr
    assert run_cli("db", "migrate").exit_code == 0
    res = run_cli("-q", "db", "status", "--check")
    assert (res.exit_code, res.output) == (0, "")
    assert f"schema {versions[-1]} (current)" in run_cli("db", "status").stdout
    status = run_cli("status").stdout
    assert f"schema {versions[-1]} (current)" in status
    assert f"{len(versions)}/" not in status and "/" + str(int(versions[-1])) not in status
    # A database two migrations behind: the deploy gate fails and both views name them.
    with db.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version >= %s", (int(versions[-2]),))
    behind = f"schema {versions[-3]}, pending {versions[-2]}, {versions[-1]}"
    res = run_cli("db", "status", "--check")
    assert res.exit_code == 78 and behind in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    obj = json.loads(run_cli("db", "status", "--check", "--json").stdout)
    assert obj["pending"] == [int(v) for v in versions[-2:]] and obj["summary"] == behind
    assert behind in run_cli("status").stdout
    assert json.loads(run_cli("status", "--json").stdout)["schema"]["summary"] == behind
