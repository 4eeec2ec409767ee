"""run-all against real services: chaining, noop rerun, stop at the first failure."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from devtools import traces
from devtools.cleanup import drop_bucket
from devtools.odata_server import ODataServer, sample_network
from devtools.services import S3Endpoint
from pipeline_cli import db
from pipeline_cli.adapters.osrm import OsrmClient
from pipeline_cli.app import App
from pipeline_cli.commands.build_graph import graph_store
from pipeline_cli.db import Database
from pipeline_cli.errors import EXIT_LOCK_BUSY
from pipeline_cli.gps import batches as gps_batches
from pipeline_cli.runner import RunRecord, StageRunner
from pipeline_cli.settings import load_settings
from pipeline_cli.stages.run_all import CHAIN, Clients, run_all

pytestmark = [pytest.mark.osrm, pytest.mark.s3]


@pytest.fixture(scope="module")
def gps_rows(osrm_url: str) -> list[Any]:
    with OsrmClient(osrm_url) as client:
        made = traces.make_traces(client, 2, seed=5)
    return [row for i, t in enumerate(made) for row in t.rows(f"bus-{i}")]


@pytest.fixture
def server() -> Iterator[ODataServer]:
    with ODataServer(sample_network(60), page_size=50) as srv:
        yield srv


@pytest.fixture
def app(database_url: str, redis_url: str, redis_prefix: str, s3: S3Endpoint, s3_bucket: str,
        osrm_url: str, server: ODataServer) -> Iterator[App]:
    env = {
        "PIPELINE_DATABASE_URL": database_url, "PIPELINE_REDIS_URL": redis_url,
        "PIPELINE_REDIS_PREFIX": redis_prefix, "PIPELINE_S3_ENDPOINT": s3.endpoint,
        "PIPELINE_S3_ACCESS_KEY": s3.access_key, "PIPELINE_S3_SECRET_KEY": s3.secret_key,
        "PIPELINE_S3_BUCKET": s3_bucket, "PIPELINE_OSRM_URL": osrm_url,
        "PIPELINE_ODATA_URL": server.url,
    }
    application = App(_settings=load_settings(environ=env))
    with application.resources:
        yield application


def chain(app: App) -> RunRecord:
    """One run-all run, built the way the CLI builds it."""
    runner = app.runner()
    clients = Clients(odata=app.odata, backups=app.backups,
                      graph_store=lambda: graph_store(app), osrm=app.osrm)
    return runner.run("run-all", lambda ctx: run_all(runner, app.settings, clients, ctx))


def statuses(record: RunRecord) -> dict[str, str]:
    return {s: r["status"] for s, r in record.extra["stages"].items()}


def runs(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return [(r["stage"], r["status"]) for r in conn.execute(
        "SELECT stage, status FROM stage_runs ORDER BY started_at")]


def test_chain_then_noop_then_only_what_changed(app: App, conn: psycopg.Connection[Any],
                                                server: ODataServer, gps_rows: list[Any]
                                                ) -> None:
    traces.insert_points(conn, gps_rows)
    first = chain(app)
    assert first.status == "success", first.error
    assert statuses(first) == dict.fromkeys(CHAIN, "success")
    assert first.extra["stages"]["match-gps"]["counts"]["points_processed"] == len(gps_rows)
    # Every inner stage recorded its own run, nested in the run-all run.
    assert sorted(runs(conn)) == sorted([(s, "success") for s in (*CHAIN, "run-all")])
    inner = conn.execute("SELECT options FROM stage_runs WHERE stage = 'gen-virtual'").fetchone()
    assert inner and inner["options"] == {"run_all": first.run_id}

    second = chain(app)
    assert second.status == "noop" and statuses(second) == dict.fromkeys(CHAIN, "noop")
    # Only sync-odata ran (it is the only way to learn the feed is unchanged).
    assert [r["run_id"] is not None for r in second.extra["stages"].values()] == [
        True, False, False, False]
    assert second.extra["stages"]["match-gps"]["reason"] == "no GPS backlog"

    stop = server.rows("Stops")[0]
    server.update_row("Stops", stop["ID"], name=stop["name"] + " (renamed)")
    third = chain(app)
    assert statuses(third) == {"sync-odata": "success", "gen-virtual": "success",
                               "build-graph": "success", "match-gps": "noop"}


def test_a_downstream_stage_behind_its_upstream_is_caught_up(app: App, database_url: str,
                                                             conn: psycopg.Connection[Any]
                                                             ) -> None:
    # A previous night synced but gen-virtual never ran (it failed, or was killed).
    runner = StageRunner(Database(database_url))
    from pipeline_cli.stages.sync_odata import sync_odata

    runner.run("sync-odata", lambda ctx: sync_odata(runner.database, app.odata(), app.backups(),
                                                    ctx))
    record = chain(app)
    assert statuses(record) == {"sync-odata": "noop", "gen-virtual": "success",
                                "build-graph": "success", "match-gps": "noop"}
    assert "no virtual entities yet" in record.extra["stages"]["gen-virtual"]["reason"]


def test_a_busy_stage_exits_75_and_the_stages_after_it_still_run(
        app: App, database_url: str, conn: psycopg.Connection[Any], gps_rows: list[Any],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline")
    traces.insert_points(conn, gps_rows)
    with db.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("build-graph"),))
        record = chain(app)
    # Busy is not a failure: another run does that work (status counted these as failures).
    assert record.status == "skipped" and record.exit_code == EXIT_LOCK_BUSY
    assert record.error and record.error.startswith("build-graph busy: build-graph is already "
                                                    "running")
    # match-gps needs no graph: it matched the backlog (it was "not reached", points waited).
    assert statuses(record) == {"sync-odata": "success", "gen-virtual": "success",
                                "build-graph": "busy", "match-gps": "success"}
    assert record.extra["stages"]["match-gps"]["counts"]["points_processed"] == len(gps_rows)
    assert record.extra["failed_stage"] == "build-graph"
    assert (record.counts["skipped"], record.counts["failed"]) == (1, 0)  # it said failed 1
    assert "pid None" not in record.error
    # its log line is a warning that says busy: it read 'error [run-all] failed: ... busy'
    ended = [r for r in caplog.records if r.name == "pipeline.run-all"][-1]
    assert (ended.levelname, ended.getMessage()) == ("WARNING", f"skipped: {record.error}")
    row = conn.execute("SELECT status, result FROM stage_runs WHERE stage = 'run-all'").fetchone()
    assert row and row["status"] == "skipped" and "stages" in row["result"]
    # The next run picks up where it stopped.
    again = chain(app)
    assert statuses(again)["build-graph"] == "success"


def test_a_failed_stage_does_not_stop_the_stages_that_do_not_need_it(
        app: App, conn: psycopg.Connection[Any], server: ODataServer, gps_rows: list[Any]
) -> None:
    assert chain(app).status == "success"  # a dataset, its virtual entities and graph
    traces.insert_points(conn, gps_rows)
    server.stop()  # the OData source is down tonight
    record = chain(app)
    assert record.status == "failed" and record.exit_code == 1
    assert record.extra["failed_stage"] == "sync-odata"
    assert record.error and record.error.startswith("sync-odata failed: OData ")
    # The GPS points waited for a source match-gps does not read.
    assert statuses(record) == {"sync-odata": "failed", "gen-virtual": "noop",
                                "build-graph": "noop", "match-gps": "success"}
    assert record.extra["stages"]["match-gps"]["counts"]["points_processed"] == len(gps_rows)
    # The stages left out name the failure, not "nothing new upstream".
    assert [record.extra["stages"][s]["reason"] for s in ("gen-virtual", "build-graph")] == [
        "skipped: sync-odata failed"] * 2
    assert (record.counts["failed"], record.counts["success"]) == (1, 1)


def test_a_real_failure_after_a_busy_stage_gives_the_exit_code(
        app: App, database_url: str, conn: psycopg.Connection[Any], gps_rows: list[Any]) -> None:
    traces.insert_points(conn, gps_rows)
    runner = app.runner()
    down = Clients(odata=app.odata, backups=app.backups, graph_store=lambda: graph_store(app),
                   osrm=lambda: OsrmClient("http://127.0.0.1:9", retries=0))  # nothing listens
    with db.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("sync-odata"),))
        record = runner.run("run-all", lambda ctx: run_all(runner, app.settings, down, ctx))
    # 75 means "harmless, another run has it": it must not hide that match-gps failed.
    assert record.status == "failed" and record.exit_code == 1
    assert record.extra["failed_stage"] == "match-gps"
    assert statuses(record) == {"sync-odata": "busy", "gen-virtual": "noop",
                                "build-graph": "noop", "match-gps": "failed"}
    assert [record.extra["stages"][s]["reason"] for s in ("gen-virtual", "build-graph")] == [
        "skipped: sync-odata busy"] * 2
    assert record.error and record.error.startswith(
        "sync-odata busy: sync-odata is already running: lock held by ")
    assert "; match-gps failed: stopped: OSRM http://127.0.0.1:9 unavailable" in record.error


def test_run_all_holds_its_own_lock(app: App, database_url: str) -> None:
    with db.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("run-all"),))
        from pipeline_cli.errors import LockBusy

        with pytest.raises(LockBusy):
            chain(app)


def snapshot(conn: psycopg.Connection[Any], app: App) -> dict[str, Any]:
    """Row counts of every table, every Redis key of the test's prefix, every S3 object."""
    tables = [r["tablename"] for r in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]
    rows = {t: conn.execute(f'SELECT count(*) AS n FROM "{t}"').fetchone() for t in tables}  # noqa: S608
    prefix = app.settings.redis.prefix
    keys = sorted(k.decode() if isinstance(k, bytes) else k
                  for k in app.redis().scan_iter(match=f"{prefix}:*"))
    return {"rows": rows, "redis": keys, "s3": sorted(app.backups().list(""))}


def dry_chain(app: App) -> RunRecord:
    runner = app.runner()
    clients = Clients(odata=app.odata, backups=app.backups,
                      graph_store=lambda: graph_store(app), osrm=app.osrm)
    return runner.run("run-all", lambda ctx: run_all(runner, app.settings, clients, ctx,
                                                     dry_run=True), dry_run=True)


def test_dry_run_after_a_feed_change_writes_nothing_and_says_what_would_change(
        app: App, conn: psycopg.Connection[Any], server: ODataServer, gps_rows: list[Any]
) -> None:
    assert chain(app).status == "success"
    traces.insert_points(conn, gps_rows[:50])
    stop = server.rows("Stops")[0]
    server.update_row("Stops", stop["ID"], name=stop["name"] + " (renamed)")
    before = snapshot(conn, app)

    dry = dry_chain(app)
    assert dry.status == "dry-run", dry.error
    stages = dry.extra["stages"]
    assert {s: r["would_run"] for s, r in stages.items()} == dict.fromkeys(CHAIN, True)
    assert stages["sync-odata"]["updated"]["stops"] == 1
    assert "would regenerate for the new dataset" in stages["gen-virtual"]["message"]
    assert stages["build-graph"]["message"].startswith("would build graph-v2 from the new")
    assert stages["match-gps"]["counts"]["unbatched_points"] == 50
    assert all(r["run_id"] is None for r in stages.values())
    assert snapshot(conn, app) == before  # stage_runs included: no row at all

    # Unchanged feed, no GPS: every stage says it would do nothing.
    assert chain(app).status == "success"
    quiet = dry_chain(app).extra["stages"]
    assert {s: r["would_run"] for s, r in quiet.items()} == dict.fromkeys(CHAIN, False)
    assert quiet["build-graph"]["message"].startswith("would do nothing: graph-v2")


def test_dry_run_counts_dry_runs_as_such_and_fails_where_build_graph_would(
        app: App, server: ODataServer) -> None:
    # Every stage's dry run passed, yet counts said {"failed": 3}, exit 0.
    fresh = dry_chain(app)
    assert fresh.status == "dry-run", fresh.error
    assert fresh.counts == {"ran": 0, "success": 0, "noop": 0, "skipped": 1, "failed": 0,
                            "dry_run": 3}
    # A route mode with no speed: the real build-graph fails, the dry run said "would build".
    plain = [r["ID"] for r in server.rows("Routes") if r["mode"] != "flight"]
    server.update_row("Routes", plain[0], mode="Hovercraft")
    dry = dry_chain(app)
    assert dry.status == "failed" and dry.exit_code == 1
    assert dry.extra["failed_stage"] == "build-graph"
    assert dry.error and dry.error.startswith(
        "build-graph failed: no speed for route mode 'hovercraft' (1 route)")
    assert dry.extra["stages"]["sync-odata"]["unknown_modes"] == {"hovercraft": 1}
    # match-gps's dry run still says what it would do
    assert (dry.counts["failed"], dry.counts["dry_run"]) == (1, 2)
    assert dry.extra["stages"]["match-gps"]["status"] == "dry-run"


def test_a_stop_signal_between_stages_keeps_what_they_did(app: App,
                                                          conn: psycopg.Connection[Any]) -> None:
    class SignalAfterGenVirtual(StageRunner):
        def run(self, stage: str, fn: Any, **kw: Any) -> RunRecord:
            record = super().run(stage, fn, **kw)
            if stage == "gen-virtual":  # as a SIGTERM that gen-virtual did not see
                os.kill(os.getpid(), signal.SIGTERM)
            return record

    inner = SignalAfterGenVirtual(app.runner().database)
    clients = Clients(odata=app.odata, backups=app.backups,
                      graph_store=lambda: graph_store(app), osrm=app.osrm)
    record = app.runner().run("run-all", lambda ctx: run_all(inner, app.settings, clients, ctx))
    assert record.exit_code == 143 and record.status == "failed"
    # It said {"status": "failed", "counts": {}} with no stages, and the table "not reached".
    assert statuses(record) == {"sync-odata": "success", "gen-virtual": "success"}
    assert (record.counts["ran"], record.counts["success"]) == (2, 2)
    row = conn.execute("SELECT counts, result FROM stage_runs WHERE stage = 'run-all'").fetchone()
    assert row and row["counts"]["success"] == 2
    assert list(row["result"]["stages"]) == ["sync-odata", "gen-virtual"]


class SignalIn(StageRunner):
    """A SIGTERM (cron's timeout, a deploy) as ``stage`` starts its work."""

    def __init__(self, database: Database, stage: str) -> None:
        super().__init__(database)
        self.signalled = stage

    def run(self, stage: str, fn: Any, **kw: Any) -> RunRecord:
        def signalled(ctx: Any) -> Any:
            if stage == self.signalled:
                os.kill(os.getpid(), signal.SIGTERM)
            return fn(ctx)
        return super().run(stage, signalled, **kw)


@pytest.mark.parametrize("stage", ["build-graph", "match-gps"])
def test_a_stop_signal_in_a_stage_ends_the_chain_with_143_after_earlier_failures(
        app: App, conn: psycopg.Connection[Any], server: ODataServer, gps_rows: list[Any],
        stage: str) -> None:
    assert chain(app).status == "success"
    traces.insert_points(conn, gps_rows)
    server.update_row("Stops", 7, latitude=95.0)  # sync-odata fails validation: exit 1
    if stage == "build-graph":  # a graph to repair, so build-graph runs after the failure
        app.redis().delete(*app.redis().keys(f"{app.settings.redis.prefix}:*"))
    inner = SignalIn(app.runner().database, stage)
    clients = Clients(odata=app.odata, backups=app.backups,
                      graph_store=lambda: graph_store(app), osrm=app.osrm)
    record = app.runner().run("run-all", lambda ctx: run_all(inner, app.settings, clients, ctx))
    # The signal's code, not the earlier failure's; no stage starts after the signalled one.
    assert record.exit_code == 143 and record.status == "failed"
    assert record.extra["failed_stage"] == stage
    assert list(record.extra["stages"]) == list(CHAIN[:CHAIN.index(stage) + 1])
    assert record.extra["stages"][stage]["status"] == "failed"
    assert record.error and record.error.startswith("sync-odata failed: validation failed")
    assert f"; {stage} failed: interrupted by signal 15" in record.error
    assert gps_batches.status_section(conn)["unprocessed_points"] == len(gps_rows)
    rows = conn.execute("SELECT stage, status FROM stage_runs WHERE run_id = %(id)s "
                        "OR options ->> 'run_all' = %(id)s::text ORDER BY started_at",
                        {"id": record.run_id}).fetchall()
    assert [(r["stage"], r["status"]) for r in rows] == [
        ("run-all", "failed"), ("sync-odata", "failed"), (stage, "failed")]


def test_a_failed_stage_problems_come_with_the_run_all_error(app: App,
                                                             server: ODataServer) -> None:
    server.update_row("Stops", 7, latitude=95.0)
    record = chain(app)
    assert record.status == "failed" and record.error
    assert record.error.startswith("sync-odata failed: validation failed: 1 problem(s)")
    assert record.extra["problems"] == ["Stops[ID=7] latitude: 95.0 is outside -90..90"]


def test_a_second_database_on_the_same_prefix_stops_at_build_graph(
        app: App, other_database_url: str, server: ODataServer, s3: S3Endpoint) -> None:
    """Two installations with one Redis and prefix: the nightly run-all of the second one
    stops at build-graph with exit 78, its dry run too, and the first one's graph stays."""
    assert chain(app).status == "success"
    ours = graph_store(app).active_version()
    bucket = f"{app.settings.s3.bucket}-b"
    theirs = App(_settings=load_settings(environ={
        "PIPELINE_DATABASE_URL": other_database_url,
        "PIPELINE_REDIS_URL": str(app.settings.redis.url),
        "PIPELINE_REDIS_PREFIX": app.settings.redis.prefix,
        "PIPELINE_S3_ENDPOINT": s3.endpoint, "PIPELINE_S3_ACCESS_KEY": s3.access_key,
        "PIPELINE_S3_SECRET_KEY": s3.secret_key, "PIPELINE_S3_BUCKET": bucket,
        "PIPELINE_OSRM_URL": str(app.settings.osrm.url), "PIPELINE_ODATA_URL": server.url}))
    try:
        with theirs.resources:
            for record in (dry_chain(theirs), chain(theirs)):
                assert record.status == "failed" and record.exit_code == 78, record.error
                assert record.extra["failed_stage"] == "build-graph"
                assert record.error and "[redis] prefix (PIPELINE_REDIS_PREFIX)" in record.error
    finally:
        drop_bucket(s3.client(), bucket)
    assert graph_store(app).active_version() == ours
    assert chain(app).status == "noop"
