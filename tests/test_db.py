"""Migrations: one transaction under an advisory lock, idempotent, safe to run concurrently."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pipeline_cli import db
from pipeline_cli.errors import DatabaseError, Interrupted, MissingPrivilege, SchemaError
from pipeline_cli.gps import batches, partitions
from pipeline_cli.health import collect_status
from pipeline_cli.settings import MatchSettings
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


def test_a_database_error_carries_the_servers_hint(empty_database_url: str) -> None:
    # "out of shared memory" alone does not say which setting to raise; its hint does.
    expected = r"while probing: function no_such_fn\(integer\) does not exist \(hint: No func"
    with db.connect(empty_database_url, autocommit=True) as conn, \
            pytest.raises(DatabaseError, match=expected), db.wrap_errors("probing"):
        conn.execute("SELECT no_such_fn(1)")


def test_a_libpq_connection_error_says_connection_failed_once(database_url: str) -> None:
    """libpq's own text starts with psycopg's 'connection failed:' and the server it tried,
    which the line already names: 'connection failed: connection failed: connection to server
    at ... failed: ...'. Only the reason follows the endpoint."""
    with tempfile.TemporaryDirectory(prefix="pg") as folder:
        with pytest.raises(DatabaseError) as failed:
            db.connect(f"host={folder} port=5432 dbname=x", connect_timeout=2)
        assert str(failed.value) == (
            f"PostgreSQL {folder}:5432/x connection failed: No such file or directory")
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SHOW ssl").fetchone()
    if row and row[0] == "off":  # a server without TLS refuses sslmode=require
        info = _parts(database_url)
        with pytest.raises(DatabaseError) as failed:
            db.connect(f"{database_url} sslmode=require" if "://" not in database_url
                       else f"{database_url}{'&' if '?' in database_url else '?'}"
                            "sslmode=require", connect_timeout=2)
        assert str(failed.value) == (
            f"PostgreSQL {info.get('host')}:{info.get('port') or 5432}/{info['dbname']} "
            "connection failed: server does not support SSL, but SSL was required")


def test_a_multi_host_url_names_each_server_with_its_port() -> None:
    """'h1:5432, h2:5433' for the hosts libpq tries in turn; it read 'h1,h2:5432,5433/db',
    or only the last host tried after the first one's failure."""
    from devtools.procs import free_port

    one, two = free_port(), free_port()
    where = f"127.0.0.1:{one}, 127.0.0.2:{two}/x"
    for url in (f"postgresql://127.0.0.1:{one},127.0.0.2:{two}/x",
                f"host=127.0.0.1,127.0.0.2 port={one},{two} dbname=x"):
        with pytest.raises(DatabaseError) as failed:
            db.connect(url, connect_timeout=2)
        assert str(failed.value) == f"PostgreSQL {where} connection failed: connection refused"
        assert repr(db.Database(url)) == f"Database({where!r})"
    with pytest.raises(DatabaseError) as failed:  # one port for every host
        db.connect(f"host=127.0.0.1,127.0.0.2 port={one} dbname=x", connect_timeout=2)
    assert str(failed.value).startswith(f"PostgreSQL 127.0.0.1:{one}, 127.0.0.2:{one}/x ")


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
    # A database migrated by a newer release (a rolled-back deploy): stages refuse to run, so
    # the deploy gate and the monitor must not say all is well.
    with db.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name, checksum) "
                     "VALUES (999, 'future', 'x')")
    res = run_cli("db", "status", "--check")
    assert res.exit_code == 78 and "newer than this pipeline" in res.stderr
    assert "upgrade pipeline" in res.stderr
    check = run_cli("status", "--check")
    assert check.exit_code == 2 and "PIPELINE CRITICAL - schema 999" in check.stdout
    # The older release's `db migrate` (the rollback runbook's first step) refuses too, and
    # leaves the schema alone: "nothing to do" with exit 0 read as a healthy rollback.
    res = run_cli("db", "migrate")
    assert res.exit_code == 78 and res.stdout == ""
    assert "newer than this pipeline knows" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    with db.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version = 999")
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


def _old_points(conn: psycopg.Connection[Any], batch_id: Any, start: str, step: str, n: int,
                *, processed: bool = False) -> None:
    """``n`` points of device 'a' in ``batch_id``, ``step`` apart, as a schema before 013
    stored them (each marked processed, or not)."""
    conn.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude,"
                 " processed, batch_id) SELECT 'a', %s::timestamptz + s * %s::interval, 60.17,"
                 " 24.94, %s, %s FROM generate_series(0, %s - 1) s",
                 (start, step, processed, batch_id, n))


def test_upgrade_to_partitioned_gps_points_keeps_points_batches_and_polylines(
        empty_database_url: str) -> None:
    """Migration 013 converts an installation with data in place: processed points stay
    processed, points of a pending batch and points in no batch stay to be matched."""
    before = max(m.version for m in db.migrations() if m.version < 13)
    with db.connect(empty_database_url, autocommit=True) as conn:
        db.migrate(conn, target=before)
        assert db.schema_version(conn) == before
        done, waiting = conn.execute(
            "INSERT INTO processing_batches (device_id, start_time, end_time, status,"
            " coordinate_count, polyline_count) VALUES"
            " ('a', '2024-05-01 08:00Z', '2024-05-01 08:00:02Z', 'completed', 3, 1),"
            " ('a', '2024-05-01 09:00Z', '2024-05-01 09:00:01Z', 'pending', 2, NULL)"
            " RETURNING batch_id").fetchall()
        _old_points(conn, done["batch_id"], "2024-05-01 08:00Z", "1 s", 3, processed=True)
        _old_points(conn, waiting["batch_id"], "2024-05-01 09:00Z", "1 s", 2)
        conn.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude)"
                     " VALUES ('b', '2026-01-01 10:00Z', 1, 2),"
                     " ('b', '2026-01-01 10:00:05Z', 1, 2)")
        conn.execute("INSERT INTO cached_polylines (device_id, start_time, end_time,"
                     " encoded_polyline, point_count, source_coordinates_count, batch_id)"
                     " VALUES ('a', '2024-05-01 08:00Z', '2024-05-01 08:00:02Z', '_p~iF~ps|U',"
                     " 3, 3, %s)", (done["batch_id"],))

        assert "013_gps_partitions" in db.migrate(conn).applied

        state = {(r["device_id"], r["processed"], r["batch_id"]): r["n"] for r in conn.execute(
            "SELECT device_id, processed, batch_id, count(*) AS n FROM gps_point_status"
            " GROUP BY 1, 2, 3")}
        assert state == {("a", True, done["batch_id"]): 3, ("a", False, waiting["batch_id"]): 2,
                         ("b", False, None): 2}
        kind = conn.execute("SELECT relkind FROM pg_class WHERE relname = 'gps_points'")
        assert kind.fetchone()["relkind"] == "p"
        parts = {r["relname"] for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'gps_points'::regclass")}
        assert {"gps_points_p20240501", "gps_points_p20260101", "gps_points_default"} <= parts
        assert conn.execute("SELECT count(*) AS n FROM gps_points_default").fetchone()["n"] == 0
        assert conn.execute("SELECT count(*) AS n FROM cached_polylines").fetchone()["n"] == 1
        section = batches.status_section(conn)
        assert section["unprocessed_points"] == 4 and section["unbatched_points"] == 2
        # The batcher makes a batch of the two new points only; the old ones are left alone.
        made = batches.make_batches(conn, MatchSettings(gap_seconds=60))
        assert (made.created, made.points, made.reopened) == (1, 2, 0)
        # A repeated plain INSERT is still stored once, without an error.
        conn.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude)"
                     " VALUES ('b', '2026-01-01 10:00Z', 3, 4)")
        assert conn.execute("SELECT count(*) AS n FROM gps_points").fetchone()["n"] == 7


def test_upgrade_cuts_the_overlapping_batches_of_old_late_points(
        empty_database_url: str) -> None:
    """Before 013 late points inside a finished batch got a batch of their own. Read by 013's
    rule (the latest batch starting at or before a point), the older batch's points after the
    late one lost their batch: unprocessed, never batched again, pruned with their day."""
    before = max(m.version for m in db.migrations() if m.version < 13)
    with db.connect(empty_database_url, autocommit=True) as conn:
        db.migrate(conn, target=before)
        done, late = conn.execute(
            "INSERT INTO processing_batches (device_id, start_time, end_time, status,"
            " coordinate_count) VALUES"
            " ('a', '2024-05-01 08:00Z', '2024-05-01 08:10Z', 'completed', 61),"
            " ('a', '2024-05-01 08:02:00.5Z', '2024-05-01 08:02:03.5Z', 'pending', 3)"
            " RETURNING batch_id").fetchall()
        _old_points(conn, done["batch_id"], "2024-05-01 08:00Z", "10 s", 61, processed=True)
        _old_points(conn, late["batch_id"], "2024-05-01 08:02:00.5Z", "1 s", 4)

        assert "024_gps_overlapping_batches" in db.migrate(conn).applied

        state = {(r["processed"], r["batch_status"]): r["n"] for r in conn.execute(
            "SELECT processed, batch_status, count(*) AS n FROM gps_point_status GROUP BY 1, 2")}
        # All 61 old points stay processed (none lies in the late batch's 3 s), in the pieces
        # before and after the late batch, which holds its 4 late points (to be matched).
        assert state == {(True, "completed"): 61, (False, "pending"): 4}, state
        ranges = conn.execute("SELECT start_time, end_time, status, coordinate_count AS n"
                              " FROM processing_batches ORDER BY start_time").fetchall()
        assert [(r["status"], r["n"]) for r in ranges] == [
            ("completed", 13), ("pending", 4), ("completed", 48)]
        assert all(a["end_time"] < b["start_time"]
                   for a, b in zip(ranges, ranges[1:], strict=False))
        assert batches.status_section(conn)["unprocessed_points"] == 4
        assert db.migrate(conn).applied == []


def test_a_stop_is_not_hidden_by_the_database_error_it_caused() -> None:
    # A Ctrl-C while sync-odata staged pages: psycopg, leaving pipeline mode half-way, raised
    # "cannot exit pipeline mode while busy" over it, and the run failed with exit 1 as a
    # database error instead of exit 130.
    with pytest.raises(Interrupted), db.wrap_errors("staging the feed"):
        try:
            raise Interrupted(2)
        finally:
            raise psycopg.OperationalError("cannot exit pipeline mode while busy")  # noqa: B012


def test_upgrade_moves_points_no_partition_can_name_and_refuses_new_ones(
        empty_database_url: str) -> None:
    """A listener's point of the year 55984 (milliseconds written as seconds) failed every
    later ingest-gps and match-gps run while creating its partition. Migration 025 moves such
    points aside, keeps them, and refuses new ones."""
    with db.connect(empty_database_url, autocommit=True) as conn:
        db.migrate(conn, target=24)
        conn.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude)"
                     " VALUES ('a', to_timestamp(1704535200000), 60.1, 24.9),"
                     " ('a', 'infinity', 60.1, 24.9), ('a', '0100-01-01 BC', 60.1, 24.9),"
                     " ('a', '2024-01-06 10:00Z', 60.1, 24.9)")
        with pytest.raises(DatabaseError, match="date too large"):
            partitions.ensure(conn)
        assert db.migrate(conn, target=25).applied == ["025_gps_time_range"]
        assert "gps_points_p20240106" in partitions.ensure(conn)
        assert conn.execute("SELECT count(*) AS n FROM gps_points").fetchone() == {"n": 1}
        assert conn.execute("SELECT count(*) AS n FROM gps_points_out_of_range"
                            " WHERE device_id = 'a'").fetchone() == {"n": 3}
        for when in ("infinity", "55984-07-27", "1969-12-31 23:59:59Z", "2100-01-01Z"):
            with pytest.raises(psycopg.errors.CheckViolation,
                               match="gps_points_recorded_at_check"):
                conn.execute("INSERT INTO gps_points (device_id, recorded_at, latitude,"
                             " longitude) VALUES ('b', %s, 60.1, 24.9)", (when,))


def test_upgrade_to_point_domains_rewrites_nothing(empty_database_url: str) -> None:
    """Migration 026 moves the latitude and longitude checks into domains: a catalog change
    that keeps every stored point, partition and index file, the status view and its grants,
    and still refuses a point out of range in every partition."""
    with db.connect(empty_database_url, autocommit=True) as conn:
        db.migrate(conn, target=25)
        partitions.ensure(conn, [date(2024, 1, 6)])
        conn.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude)"
                     " VALUES ('a', '2024-01-06 10:00Z', 60.1, 24.9),"
                     " ('a', '2024-01-06 10:00:01Z', -90, 180), ('b', '1999-01-01Z', 0, 0)")
        conn.execute("DROP ROLE IF EXISTS pipeline_test_map_reader")
        conn.execute("CREATE ROLE pipeline_test_map_reader")
        try:
            conn.execute("GRANT SELECT ON gps_point_status TO pipeline_test_map_reader")
            files = "SELECT relname, relfilenode FROM pg_class WHERE relname LIKE 'gps_points%'"
            before = {r["relname"]: r["relfilenode"] for r in conn.execute(files)}

            assert db.migrate(conn, target=26).applied == ["026_gps_point_domains"]

            assert {r["relname"]: r["relfilenode"] for r in conn.execute(files)} == before
            assert conn.execute("SELECT count(*) AS n FROM gps_point_status").fetchone() == {
                "n": 3}
            readers = conn.execute("SELECT has_table_privilege('pipeline_test_map_reader',"
                                   " 'gps_point_status', 'SELECT') AS ok").fetchone()
            assert readers == {"ok": True}
            checks = conn.execute("SELECT count(*) AS n FROM pg_constraint WHERE contype = 'c'"
                                  " AND conrelid::regclass::text LIKE 'gps_points%'"
                                  " AND pg_get_constraintdef(oid) ~ 'latitude|longitude'")
            assert checks.fetchone() == {"n": 0}
            for day in ("2024-01-06 11:00Z", "2001-01-01Z"):  # a partition; the default one
                for lat, lon in ((90.5, 0.0), (float("nan"), 0.0), (0.0, -180.5)):
                    with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
                        conn.execute("INSERT INTO gps_points (device_id, recorded_at,"
                                     " latitude, longitude) VALUES ('c', %s, %s, %s)",
                                     (day, lat, lon))
        finally:
            conn.execute("DROP OWNED BY pipeline_test_map_reader")
            conn.execute("DROP ROLE pipeline_test_map_reader")


def test_upgrade_to_the_time_vocabulary_reads_what_was_refused(empty_database_url: str
                                                               ) -> None:
    """Migration 030 reads HHMM and 12-hour times; the times read before read the same."""
    def time_of(conn: psycopg.Connection[Any], value: str) -> Any:
        row = conn.execute("SELECT sync_time(%s)::text AS t", (value,)).fetchone()
        return row and row["t"]

    with db.connect(empty_database_url, autocommit=True) as conn:
        db.migrate(conn, target=29)
        assert [time_of(conn, v) for v in ("08:30", "PT8H30M", "0830", "8:30 PM")] == [
            "08:30:00", "08:30:00", None, None]
        assert db.migrate(conn, target=30).applied == ["030_sync_time_vocabulary"]
        assert [time_of(conn, v) for v in ("08:30", "PT8H30M", "0830", "8:30 PM", "830")] == [
            "08:30:00", "08:30:00", "08:30:00", "20:30:00", None]


def test_upgrade_to_the_days_and_time_messages_name_the_forms_read(empty_database_url: str
                                                                  ) -> None:
    """Migration 031 replaces sync_problem for its days and time messages: they named one form
    each, which 029 and 030 no longer read alone; the other messages stay as they were."""
    def problem(conn: psycopg.Connection[Any], kind: str, value: str) -> Any:
        row = conn.execute("SELECT sync_problem(%s, %s, true, NULL, NULL) AS p",
                           (kind, value)).fetchone()
        return row and row["p"]

    with db.connect(empty_database_url, autocommit=True) as conn:
        db.migrate(conn, target=30)
        before = {k: problem(conn, k, v) for k, v in (
            ("bool", "maybe"), ("number", "INF"), ("key", "V:1"))}
        assert problem(conn, "time", "noon") == ["invalid", "expected a time HH:MM, got 'noon'"]
        assert problem(conn, "days", "lundi") == [
            "invalid", 'expected distinct day digits 1-7 like "12345", got \'lundi\'']
        assert db.migrate(conn, target=31).applied == ["031_sync_problem_messages"]
        assert problem(conn, "time", "25:30") == [
            "invalid", 'expected a time of day (HH:MM, HH:MM:SS, HHMM "0830", "8.30", "8h30", '
            '"8:30 PM"; hours 0-23), got \'25:30\'']
        assert problem(conn, "days", "lundi") == [
            "invalid", 'expected days of operation (digits 1-7 "135", seven places "1010100" '
            'or "1 3 5 7", days and ranges "Mon, Wed" or "Mo-Fr", a JSON array, daily, '
            "weekdays, weekends), got 'lundi'"]
        assert problem(conn, "days", "Mo-Fr") is None and problem(conn, "days", None) == [
            "missing", "missing required value"]
        assert {k: problem(conn, k, v) for k, v in (
            ("bool", "maybe"), ("number", "INF"), ("key", "V:1"))} == before


def test_upgrade_to_the_days_vocabulary_reads_what_was_refused(empty_database_url: str
                                                               ) -> None:
    """Migration 029 reads days of operation in other spellings; the digits read the same."""
    def days(conn: psycopg.Connection[Any], value: str) -> Any:
        row = conn.execute("SELECT sync_days(%s) AS d", (value,)).fetchone()
        return row and row["d"]

    with db.connect(empty_database_url, autocommit=True) as conn:
        db.migrate(conn, target=28)
        assert [days(conn, v) for v in ("531", "12345", "Mo-Fr", "1 3 5 7")] == [
            "135", "12345", None, None]
        assert db.migrate(conn, target=29).applied == ["029_sync_days_vocabulary"]
        assert [days(conn, v) for v in ("531", "12345", "Mo-Fr", "1 3 5 7", "11")] == [
            "135", "12345", "12345", "1357", None]


def test_upgrade_to_the_boolean_vocabulary_keeps_sync_bool_inlined(
        empty_database_url: str) -> None:
    """Migration 027 widens sync_bool to PostgreSQL's boolean spellings and SAP's flag. It
    stays an immutable, parallel-safe SQL function that the planner inlines into the page
    query (it runs once per value of a feed), and the message names the spellings."""
    def problem(conn: psycopg.Connection[Any], value: str) -> Any:
        row = conn.execute("SELECT sync_problem('bool', %s, false, NULL, NULL) AS p",
                           (value,)).fetchone()
        return row and row["p"]

    with db.connect(empty_database_url, autocommit=True) as conn:
        db.migrate(conn, target=26)
        assert conn.execute("SELECT sync_bool('X') AS v").fetchone() == {"v": None}
        assert problem(conn, "X") == ["invalid", "expected true or false, got 'X'"]

        assert db.migrate(conn, target=27).applied == ["027_sync_boolean_vocabulary"]

        assert conn.execute("SELECT sync_bool('X') AS x, sync_bool(' ') AS blank,"
                            " sync_bool('tr') AS prefix").fetchone() == {
            "x": True, "blank": False, "prefix": None}
        assert problem(conn, "X") is None and problem(conn, "maybe") == [
            "invalid", "expected true or false (or t/f, yes/no, y/n, on/off, 1/0, X/blank), "
            "got 'maybe'"]
        fn = conn.execute("SELECT provolatile, proparallel, proisstrict, l.lanname"
                          " FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang"
                          " WHERE proname = 'sync_bool'").fetchall()
        assert fn == [{"provolatile": "i", "proparallel": "s", "proisstrict": False,
                       "lanname": "sql"}]
        plan = "\n".join(r["QUERY PLAN"] for r in conn.execute(
            "EXPLAIN VERBOSE SELECT sync_bool(f) FROM (VALUES ('true'), ('X')) v(f)"))
        assert "sync_bool" not in plan and "CASE" in plan, plan


def test_upgrade_gives_the_database_one_identity_and_the_roles_of_its_tables(
        empty_database_url: str, other_database_url: str) -> None:
    """Migration 028 on an existing installation: one deployment row with a random id (the
    owner of its Redis prefix), readable and writable by a role that could write
    graph_versions (the pipeline's role, when another role owns the tables), so neither
    build-graph nor doctor's privilege check fails after the upgrade."""
    with db.connect(empty_database_url, autocommit=True) as conn:
        db.migrate(conn, target=27)
        conn.execute("DROP ROLE IF EXISTS pipeline_test_writer")
        conn.execute("CREATE ROLE pipeline_test_writer")
        try:
            conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON graph_versions "
                         "TO pipeline_test_writer")
            assert db.deployment_id(conn) is None  # status of the older schema reads on

            assert db.migrate(conn, target=28).applied == ["028_deployment_identity"]

            identity = db.require_deployment_id(conn)
            assert str(uuid.UUID(identity)) == identity
            privileges = conn.execute(
                "SELECT p, has_table_privilege('pipeline_test_writer', 'deployment', p) AS ok"
                " FROM unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE']) p").fetchall()
            assert all(r["ok"] for r in privileges), privileges
            with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
                conn.execute("INSERT INTO deployment DEFAULT VALUES")
            assert db.migrate(conn, target=28).applied == []
            assert db.deployment_id(conn) == identity
            conn.execute("DELETE FROM deployment")
            with pytest.raises(SchemaError, match="INSERT INTO deployment DEFAULT VALUES"):
                db.require_deployment_id(conn)
        finally:
            conn.execute("DROP OWNED BY pipeline_test_writer")
            conn.execute("DROP ROLE pipeline_test_writer")
    with db.connect(other_database_url, autocommit=True) as other:  # another installation
        assert db.require_deployment_id(other) not in (identity, None)


def test_a_database_in_another_datestyle(empty_database_url: str) -> None:
    """'SQL, DMY' with a zone abbreviation that reads back as another zone gave a traceback
    on every command, and partitions bounded at the wrong hour."""
    with db.connect(empty_database_url, autocommit=True) as conn:
        name = conn.info.dbname
        conn.execute(sql.SQL("ALTER DATABASE {} SET DateStyle = 'SQL, DMY'").format(
            sql.Identifier(name)))
        conn.execute(sql.SQL("ALTER DATABASE {} SET TimeZone = 'Asia/Kolkata'").format(
            sql.Identifier(name)))
    with db.connect(empty_database_url, autocommit=True) as conn:
        db.migrate(conn)
        partitions.ensure(conn, [date(2024, 1, 6)])
        bound = conn.execute("SELECT pg_get_expr(relpartbound, oid) AS b FROM pg_class"
                             " WHERE relname = 'gps_points_p20240106'").fetchone()
        assert bound is not None and "2024-01-06 05:30:00+05:30" in bound["b"], bound
        assert conn.execute("SELECT now() AS t").fetchone()["t"].tzinfo is not None


@pytest.mark.parametrize("pooler", [db.POOLER_NONE, db.POOLER_TRANSACTION])
def test_a_database_that_sends_floats_with_fewer_digits(empty_database_url: str,
                                                        pooler: str) -> None:
    """ALTER DATABASE ... SET extra_float_digits = -15 (below 1, floats go out rounded):
    coordinates read as 6e+01, so gen-virtual planned 295 virtual stops instead of 899 and
    the graph lost half its nodes, in silence."""
    with db.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET extra_float_digits = -15").format(
            sql.Identifier(conn.info.dbname)))
    database = db.Database(empty_database_url, pooler=pooler)
    with database.connect(autocommit=True) as conn:
        row = conn.execute("SELECT 60.1768663::float8 AS lat, 24.9507565::real AS lon"
                           ).fetchone()
    assert row == {"lat": 60.1768663, "lon": pytest.approx(24.9507565, abs=1e-6)}


def test_a_database_without_standard_conforming_strings(empty_database_url: str) -> None:
    """ALTER DATABASE ... SET standard_conforming_strings = off (a pre-9.1 application's
    default): db migrate failed with 'unsafe use of string constant with Unicode escapes'."""
    with db.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET standard_conforming_strings = off").format(
            sql.Identifier(conn.info.dbname)))
    with db.connect(empty_database_url, autocommit=True) as conn:
        db.migrate(conn)
        assert conn.execute(r"SELECT '\t' AS t").fetchone() == {"t": "\\t"}


@pytest.mark.parametrize("autocommit", [True, False])
def test_a_database_whose_default_isolation_is_serializable(empty_database_url: str,
                                                            autocommit: bool) -> None:
    """ALTER DATABASE ... SET default_transaction_isolation = serializable: match-gps
    completed its batches, then a worker's claim (FOR UPDATE SKIP LOCKED, written for READ
    COMMITTED) failed with 'could not serialize access': exit 1 on every run, counts lost."""
    with db.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = "
                             "'serializable'").format(sql.Identifier(conn.info.dbname)))
    with db.connect(empty_database_url, autocommit=autocommit) as conn:
        row = conn.execute("SELECT current_setting('transaction_isolation') AS i").fetchone()
        assert row == {"i": "read committed"}
        with conn.transaction():
            row = conn.execute("SELECT current_setting('transaction_isolation') AS i"
                               ).fetchone()
        assert row == {"i": "read committed"}


def test_a_statement_timeout_of_the_database_is_named_with_the_remedy(
        empty_database_url: str) -> None:
    """ALTER DATABASE ... SET statement_timeout = '1s' (a guard for an application's
    queries): a large ingest failed with 'canceling statement due to statement timeout', and
    the operator had to find out whose timeout it was."""
    with db.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET statement_timeout = '100ms'").format(
            sql.Identifier(conn.info.dbname)))
    with db.connect(empty_database_url, autocommit=True) as conn, \
            pytest.raises(DatabaseError) as raised, db.wrap_errors("loading GPS files"):
        conn.execute("SELECT pg_sleep(1)")
    assert str(raised.value) == (
        "database error while loading GPS files: canceling statement due to statement timeout"
        " (if the database or role sets statement_timeout, raise it or set it to 0 for the"
        " pipeline's role: each run is bounded by [runner] timeout_<stage>)")


def test_a_lock_timeout_of_the_database_is_named_with_the_remedy(
        empty_database_url: str) -> None:
    """ALTER DATABASE ... SET lock_timeout = '1s': a sync waiting on a lock another session
    held failed with 'canceling statement due to lock timeout', whose timeout unsaid."""
    with db.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE held (id integer)")
        conn.execute(sql.SQL("ALTER DATABASE {} SET lock_timeout = '100ms'").format(
            sql.Identifier(conn.info.dbname)))
    with db.connect(empty_database_url) as holder, \
            db.connect(empty_database_url, autocommit=True) as conn:
        holder.execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(DatabaseError) as raised, db.wrap_errors("staging the feed"):
            conn.execute("SELECT count(*) FROM held")
        holder.rollback()
    assert str(raised.value) == (
        "database error while staging the feed: canceling statement due to lock timeout"
        " (another session held a lock this run needed; if the database or role sets"
        " lock_timeout, raise it or set it to 0 for the pipeline's role: each run is bounded"
        " by [runner] timeout_<stage>)")


def test_a_search_path_that_misses_the_tables_is_named_not_migrated_again(
        database_url: str) -> None:
    """ALTER DATABASE ... SET search_path = other, after the tables were made in public: every
    command said 'the database is not migrated; run pipeline db migrate', and that migrate
    made a second, empty schema in 'other' where the stages then started from nothing."""
    with db.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA other")
        conn.execute(sql.SQL("ALTER DATABASE {} SET search_path = other").format(
            sql.Identifier(conn.info.dbname)))
    expected = "the pipeline's tables are in schema public, which the search_path"
    with db.connect(database_url, autocommit=True) as conn:
        with pytest.raises(SchemaError, match=expected):
            db.check_schema(conn)
        with pytest.raises(SchemaError, match=expected):
            db.migrate(conn)
        tables = conn.execute("SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'other'")
        assert tables.fetchone() == {"n": 0}
        assert [p.message for p in collect_status(conn).problems][0].startswith(expected)


# ------------------------------------------------- connection settings as operators write them


def _parts(url: str) -> dict[str, Any]:
    return psycopg.conninfo.conninfo_to_dict(url)


def _socket_dir(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW unix_socket_directories").fetchone()
    folders = [d.strip() for d in str(row[0] if row else "").split(",") if d.strip()]
    if not folders or folders[0].startswith("@"):
        pytest.skip("the test server listens on no socket directory")
    return folders[0]


@pytest.mark.parametrize("form", [
    "postgres://{user}@{host}:{port}/{db}",
    "postgresql://{user}@{host}:{port}/{db}?sslmode=disable",
    "postgresql://{user}@{host}:{port}/{db}?sslmode=prefer",
    # a password with '@', ':', '/' and '%', percent-encoded (trust auth ignores it; libpq must
    # still split the URL where the password ends)
    "postgresql://{user}:p%40ss%3Aw%2Fo%25rdSecret1@{host}:{port}/{db}",
    "postgresql:///{db}?host={socket}&port={port}&user={user}",
    "postgresql://{socket_encoded}:{port}/{db}?user={user}",
    "host={socket} port={port} dbname={db} user={user}",
])
def test_url_forms_operators_write_reach_the_database(database_url: str, run_cli: Cli,
                                                      form: str) -> None:
    from urllib.parse import quote

    info = _parts(database_url)
    socket = _socket_dir(database_url) if "socket" in form else ""
    url = form.format(user=info.get("user") or "postgres", host=info.get("host"),
                      port=info.get("port") or 5432, db=info["dbname"], socket=socket,
                      socket_encoded=quote(socket, safe=""))
    run_cli.env["PIPELINE_DATABASE_URL"] = url
    result = run_cli("--json", "db", "status", "--check")
    assert result.exit_code == 0, result.output
    assert "Secret1" not in result.output
    with db.connect(url) as conn:
        row = conn.execute("SELECT current_database() AS name").fetchone()
    assert row == {"name": info["dbname"]}


def test_parts_left_to_the_libpq_environment_and_service_file(
        database_url: str, run_cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting that leaves the host, port or database to PGHOST, PGSERVICE and the like:
    it reaches that server, and an error names the server libpq tried (it named
    localhost:5432 whatever PGHOST said)."""
    from devtools.procs import free_port

    info, closed = _parts(database_url), free_port()
    (tmp_path / "pg_service.conf").write_text(
        f"[pipeline]\nhost={info.get('host')}\nport={info.get('port') or 5432}\n"
        f"dbname={info['dbname']}\nuser={info.get('user') or 'postgres'}\n"
        f"[closed]\nhost=127.0.0.1\nport={closed}\ndbname=nowhere\n")
    monkeypatch.setenv("PGSERVICEFILE", str(tmp_path / "pg_service.conf"))
    for env in ({"PIPELINE_DATABASE_URL": "service=pipeline"},
                {"PIPELINE_DATABASE_URL": "postgresql://?service=pipeline"},
                {"PIPELINE_DATABASE_URL": "postgresql://", "PGSERVICE": "pipeline"},
                {"PIPELINE_DATABASE_URL": f"dbname={info['dbname']}",
                 "PGHOST": str(info.get("host")), "PGPORT": str(info.get("port") or 5432),
                 "PGUSER": str(info.get("user") or "postgres"), "PGPASSWORD": "pgpassSecret1"}):
        run_cli.env = {**run_cli.env, **env}
        result = run_cli("db", "status", "--check")
        assert result.exit_code == 0, (env, result.output)
        for name in ("PGSERVICE", "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD"):
            run_cli.env.pop(name, None)
    for env in ({"PIPELINE_DATABASE_URL": "service=closed"},
                {"PIPELINE_DATABASE_URL": "postgresql://", "PGSERVICE": "closed"},
                {"PIPELINE_DATABASE_URL": "dbname=nowhere", "PGHOST": "127.0.0.1",
                 "PGPORT": str(closed), "PGPASSWORD": "pgpassSecret1"}):
        run_cli.env = {**run_cli.env, **env}
        result = run_cli("db", "status")
        assert result.exit_code == 1, result.output
        assert f"PostgreSQL 127.0.0.1:{closed}/nowhere connection failed: connection refused" \
            in result.output, (env, result.output)
        assert "Secret1" not in result.output
        for name in ("PGSERVICE", "PGHOST", "PGPORT", "PGPASSWORD"):
            run_cli.env.pop(name, None)


def test_a_database_owner_that_is_no_superuser_migrates_it(pg_admin_url: str,
                                                           run_cli: Cli) -> None:
    """The usual managed-PostgreSQL setup: the pipeline's role owns its database, nothing more
    (PostgreSQL 15 no longer lets every role create in schema public)."""
    suffix = uuid.uuid4().hex[:8]
    role, name = f"pipeline_owner_{suffix}", f"pipeline_owned_{suffix}"
    password = "Ow@n:er/%Secret1"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                              "PASSWORD {}").format(sql.Identifier(role), password))
        admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(name), sql.Identifier(role)))
    try:
        from urllib.parse import quote

        info = _parts(pg_admin_url)
        run_cli.env["PIPELINE_DATABASE_URL"] = (
            f"postgresql://{role}:{quote(password, safe='')}@{info.get('host')}:"
            f"{info.get('port') or 5432}/{name}")
        result = run_cli("db", "migrate")
        assert result.exit_code == 0, result.output
        assert run_cli("db", "status", "--check").exit_code == 0
        assert "Secret1" not in result.output
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_a_role_that_may_not_create_in_the_schema_is_told_what_migrate_needs(
        pg_admin_url: str, empty_database_url: str, database_url: str, run_cli: Cli) -> None:
    """A role that neither owns the database nor may create in schema public (PostgreSQL 15
    no longer grants that to every role): db migrate said 'database error while migrating:
    permission denied for schema public', exit 1. A reader for status alone, without SELECT
    on the tables, got the same shape of line. Both are settings to fix (exit 78)."""
    role = f"pipeline_app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(role)))
    try:
        info = _parts(pg_admin_url)
        host, port = info.get("host"), info.get("port") or 5432
        run_cli.env["PIPELINE_DATABASE_URL"] = (
            f"host={host} port={port} user={role} dbname={_parts(empty_database_url)['dbname']}")
        result = run_cli("db", "migrate")
        assert result.exit_code == 78, result.output
        assert result.output.strip().splitlines() == [
            f"pipeline db migrate: error: role {role} may not create tables in schema public "
            "(PostgreSQL 15 no longer lets every role create there): make it the database's "
            f"owner (ALTER DATABASE ... OWNER TO {role}), or GRANT CREATE ON SCHEMA public TO "
            f"{role}"]
        with db.connect(empty_database_url, autocommit=True) as conn:
            assert db.applied_versions(conn) == set()

        reader = f"host={host} port={port} user={role} dbname={_parts(database_url)['dbname']}"
        with psycopg.connect(database_url, autocommit=True) as owner:
            owner.execute(sql.SQL("GRANT SELECT ON schema_migrations TO {}").format(
                sql.Identifier(role)))
        with db.connect(reader, autocommit=True) as conn:  # nothing to do needs no CREATE
            assert db.migrate(conn).applied == []
        with psycopg.connect(database_url, autocommit=True) as owner:
            owner.execute(sql.SQL("REVOKE SELECT ON schema_migrations FROM {}").format(
                sql.Identifier(role)))
        run_cli.env["PIPELINE_DATABASE_URL"] = reader
        result = run_cli("status")
        assert result.exit_code == 78, result.output
        assert result.output.strip().splitlines() == [
            "pipeline status: error: PostgreSQL refused a privilege while reading the schema "
            "version: permission denied for table schema_migrations (grant it to the role of "
            "[database] url)"]
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_a_migration_another_role_must_apply_names_it(pg_admin_url: str,
                                                      empty_database_url: str) -> None:
    """A role that may create in the schema but does not own the tables an earlier release's
    migrate made: the migration that alters them is named, with whose role it needs."""
    role = f"pipeline_app_{uuid.uuid4().hex[:8]}"
    with db.connect(empty_database_url, autocommit=True) as admin:
        db.migrate(admin, target=30)
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(role)))
        admin.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {0}; "
                              "GRANT SELECT ON schema_migrations TO {0}").format(
            sql.Identifier(role)))
    try:
        url = psycopg.conninfo.make_conninfo(empty_database_url, user=role)
        with db.connect(url, autocommit=True) as conn, pytest.raises(MissingPrivilege) as raised:
            db.migrate(conn)
        assert str(raised.value) == (
            f"role {role} may not apply migration 031_sync_problem_messages: must be owner of "
            "function sync_problem (run pipeline db migrate as the role that owns the "
            "pipeline's tables)")
        assert raised.value.exit_code == 78
        with db.connect(empty_database_url, autocommit=True) as admin:
            assert db.schema_version(admin) == 30
    finally:
        with db.connect(empty_database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(
                sql.Identifier(role)))


@pytest.mark.parametrize("encoding", ["LATIN1", "SQL_ASCII"])
def test_a_database_not_in_utf8_is_refused_by_name(pg_admin_url: str, run_cli: Cli,
                                                   encoding: str) -> None:
    """A database created in LATIN1 or SQL_ASCII (an old server's default) holds no stop or
    device named in Cyrillic: db migrate failed half-way into its SQL with 'character with byte
    sequence 0xef 0xbf 0xbf in encoding "UTF8" has no equivalent in encoding "LATIN1"' (or
    'conversion between UTF8 and SQL_ASCII is not supported'), exit 1."""
    name = f"pipeline_enc_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C' "
                              "TEMPLATE template0").format(sql.Identifier(name),
                                                           sql.Literal(encoding)))
    try:
        run_cli.env["PIPELINE_DATABASE_URL"] = psycopg.conninfo.make_conninfo(
            pg_admin_url, dbname=name)
        result = run_cli("db", "migrate")
        assert result.exit_code == 78, result.output
        assert result.output.strip().splitlines() == [
            f"pipeline db migrate: error: database {name} is in encoding {encoding}, which "
            "cannot hold every stop and device name (Cyrillic, emoji): the pipeline needs a "
            "UTF8 database (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"]
        with psycopg.connect(run_cli.env["PIPELINE_DATABASE_URL"]) as conn:
            assert conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,)
        checks = {c["name"]: c for c in json.loads(run_cli("--json", "doctor").stdout)["checks"]}
        assert not checks["database"]["ok"]
        assert f"is in encoding {encoding}" in checks["database"]["detail"]
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def test_the_listener_forms_of_insert(conn: psycopg.Connection[Any]) -> None:
    """docs/match-gps.md, "Duplicates": a repeated plain INSERT is stored once; a batched
    INSERT that repeats a point within itself needs ON CONFLICT DO NOTHING, which the rule
    allows; RETURNING is refused by PostgreSQL on a table with a conditional rule."""
    insert = ("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude) VALUES "
              "('l', '2026-01-01 10:00Z', 60.1, 24.9)")
    repeated = ", ('l', '2026-01-01 10:00:01Z', 60.1, 24.9)" * 2
    conn.execute(insert)
    conn.execute(insert)
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(insert + repeated)
    conn.execute(insert + repeated + " ON CONFLICT DO NOTHING")
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="INSERT RETURNING"):
        conn.execute(insert + " RETURNING device_id")
    n = conn.execute("SELECT count(*) AS n FROM gps_points WHERE device_id = 'l'").fetchone()
    assert n == {"n": 2}


@contextmanager
def _hung(family: int, address: str | tuple[str, int]) -> Iterator[socket.socket]:
    """A PostgreSQL that accepts connections and never answers (hung, or behind a firewall
    that drops the replies): libpq's connect_timeout ends the attempt."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind(address)
        sock.listen(16)
        try:
            yield sock
        finally:
            if family == socket.AF_UNIX:
                os.unlink(str(address))


def test_a_connect_timeout_names_the_server_the_url_asked_for() -> None:
    """psycopg's timeout carries no connection to read the host from: a URL without a host
    part (a socket directory, host= as a parameter, libpq's default socket) was named
    localhost:5432. Never the password."""
    from devtools.procs import free_port

    with contextlib.ExitStack() as stack:
        tcp = stack.enter_context(_hung(socket.AF_INET, ("127.0.0.1", 0)))
        port = tcp.getsockname()[1]
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="pg"))
        stack.enter_context(_hung(socket.AF_UNIX, f"{folder}/.s.PGSQL.{port}"))
        cases = {
            f"postgresql:///x?host=127.0.0.1&port={port}": f"127.0.0.1:{port}/x",
            f"postgresql://u:pwSecret1@/x?host=127.0.0.1&port={port}": f"127.0.0.1:{port}/x",
            f"dbname=x host=127.0.0.1 port={port} password=pwSecret1": f"127.0.0.1:{port}/x",
            f"postgresql:///x?host={folder}&port={port}": f"{folder}:{port}/x",
        }
        # libpq's default: its socket directory (a refused attempt names it), not localhost
        closed = free_port()
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(f"dbname=x port={closed}", connect_timeout=2)
        default = (refused.value.pgconn.host or b"").decode() if refused.value.pgconn else ""
        if default.startswith("/") and os.access(default, os.W_OK):
            stack.enter_context(_hung(socket.AF_UNIX, f"{default}/.s.PGSQL.{closed}"))
            cases[f"postgresql:///x?port={closed}"] = f"(default socket directory):{closed}/x"
        for url, where in cases.items():
            with pytest.raises(DatabaseError) as failed:
                db.connect(url, connect_timeout=2)
            assert str(failed.value) == (
                f"PostgreSQL {where} connection failed: connection timeout expired"), url
