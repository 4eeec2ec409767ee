"""collect_status: run history, overdue detection, crashed runs, sections and the verdict."""

from __future__ import annotations

import dataclasses
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis as redis_lib

from devtools import traces
from devtools.services import LocalServices, S3Endpoint
from pipeline_cli import db
from pipeline_cli.adapters import graph_store
from pipeline_cli.adapters.backups import BackupStore
from pipeline_cli.db import Database
from pipeline_cli.errors import SourceError
from pipeline_cli.gps import batches
from pipeline_cli.health import (
    CRITICAL,
    OK,
    WARNING,
    Budget,
    SectionEnv,
    collect_status,
)
from pipeline_cli.render import prometheus_text
from pipeline_cli.runner import RunContext, StageResult, StageRunner
from pipeline_cli.schedule import build_schedule
from pipeline_cli.settings import HealthSettings, MatchSettings

Conn = psycopg.Connection[dict[str, Any]]


def run(url: str, stage: str, status: str = "success", *, hours_ago: float = 0.0,
        conn: Conn | None = None) -> str:
    """Record one real run of ``stage`` through the runner, optionally moved into the past."""
    def fn(ctx: RunContext) -> StageResult:
        if status == "failed":
            raise SourceError("OData answered 503")
        return StageResult(status=status, counts={"rows": 1})

    record = StageRunner(Database(url)).run(stage, fn)
    if hours_ago and conn is not None:
        conn.execute("UPDATE stage_runs SET started_at = started_at - make_interval(secs => %s),"
                     " finished_at = finished_at - make_interval(secs => %s) WHERE run_id = %s",
                     (hours_ago * 3600, hours_ago * 3600, record.run_id))
    return record.run_id


def quiet_sections(**over: Any) -> dict[str, Any]:
    """Section builders that report a healthy, empty area (the stages are tested elsewhere)."""
    base: dict[str, Any] = {name: (lambda env: {}) for name in ("dataset", "virtual", "graph",
                                                               "gps")}
    base.update(over)
    return base


def test_fresh_database_warns_that_nothing_ran(conn: Conn) -> None:
    report = collect_status(conn, sections=quiet_sections())
    assert report.health == WARNING
    assert [p.area for p in report.problems] == ["sync-odata"]
    assert set(report.stages) >= {"sync-odata", "gen-virtual", "build-graph", "match-gps",
                                  "run-all"}
    assert report.stages["sync-odata"]["last_status"] is None


def test_good_runs_are_ok_and_counted(conn: Conn, database_url: str) -> None:
    run(database_url, "sync-odata", "noop")
    run(database_url, "gen-virtual", "success")
    report = collect_status(conn, sections=quiet_sections())
    assert report.health == OK, report.problems
    s = report.stages["gen-virtual"]
    assert s["last_status"] == "success" and s["last_success_counts"] == {"rows": 1}
    assert s["last_work_at"] is not None and s["consecutive_failures"] == 0


def test_failures_warn_then_turn_critical(conn: Conn, database_url: str) -> None:
    run(database_url, "sync-odata", "success")
    run(database_url, "build-graph", "success")
    run(database_url, "build-graph", "failed")
    report = collect_status(conn, sections=quiet_sections())
    assert report.health == WARNING
    assert "OData answered 503" in report.problems[0].message
    run(database_url, "build-graph", "failed")
    run(database_url, "build-graph", "failed")
    report = collect_status(conn, sections=quiet_sections())
    assert report.health == CRITICAL
    assert report.stages["build-graph"]["consecutive_failures"] == 3
    assert report.stages["build-graph"]["last_failure_error"] == "OData answered 503"
    run(database_url, "build-graph", "noop")
    assert collect_status(conn, sections=quiet_sections()).health == OK


def test_a_failure_keeps_its_message_while_a_retry_runs(conn: Conn, database_url: str) -> None:
    # It read "sync-odata last run running: None" (and "skipped: None" after a busy lock).
    run(database_url, "sync-odata", "success")
    run(database_url, "sync-odata", "failed")
    started, done = threading.Event(), threading.Event()

    def retry(ctx: RunContext) -> StageResult:
        started.set()
        done.wait(30)
        return StageResult(status="noop")

    runner = threading.Thread(target=StageRunner(Database(database_url)).run,
                              args=("sync-odata", retry))
    runner.start()
    try:
        assert started.wait(30)
        report = collect_status(conn, sections=quiet_sections())
    finally:
        done.set()
        runner.join()
    assert report.problems[0].message == ("sync-odata failed 1 time(s) since its last good run"
                                          " (now running): OData answered 503")


def test_overdue_from_the_schedule(conn: Conn, database_url: str) -> None:
    schedule = build_schedule(None, {"sync-odata": "0 */6 * * *", "match-gps": "* * * * *"})
    run(database_url, "sync-odata", "success", hours_ago=8, conn=conn)
    run(database_url, "match-gps", "noop")
    # The first slot after the last good run (plus the slot tolerance) lies 2 to 8 h back
    # depending on the time of day (with 7 h it could be under 1 h just before a slot), so the
    # critical threshold is set out of reach here and tested on its own below.
    lenient = HealthSettings(overdue_critical_s=86400)
    report = collect_status(conn, schedule=schedule, health=lenient, sections=quiet_sections())
    sync = report.stages["sync-odata"]
    assert sync["overdue"] is True and sync["overdue_s"] >= 3600
    assert sync["schedule"] == ["0 */6 * * *"] and sync["next_run_at"] > report.generated_at
    assert report.stages["match-gps"]["overdue"] is False
    assert report.stages["build-graph"]["overdue"] is None  # not scheduled: never overdue
    assert report.health == WARNING
    assert any("sync-odata is overdue" in p.message for p in report.problems)
    # Overdue for longer than overdue_critical_s is critical.
    strict = HealthSettings(overdue_critical_s=1800)
    assert collect_status(conn, schedule=schedule, health=strict,
                          sections=quiet_sections()).health == CRITICAL
    # A good run fills the slot.
    run(database_url, "sync-odata", "noop")
    report = collect_status(conn, schedule=schedule, sections=quiet_sections())
    assert report.stages["sync-odata"]["overdue"] is False and report.health == OK


def test_a_crontab_line_naming_no_command_is_a_warning(conn: Conn, database_url: str,
                                                       tmp_path: Any) -> None:
    run(database_url, "sync-odata", "success")
    path = tmp_path / "crontab"
    path.write_text("* * * * * /opt/p/bin/pipeline -q sync_odata\n")
    report = collect_status(conn, schedule=build_schedule(path), sections=quiet_sections())
    assert report.health == WARNING
    assert [(p.area, p.message) for p in report.problems] == [
        ("schedule", f"{path}:1 calls pipeline but names no pipeline command: "
                     "status cannot tell when it is overdue")]
    assert report.to_json()["schedule"]["warnings"] == [report.problems[0].message]


def test_never_ran_is_overdue_only_after_install_plus_grace(conn: Conn, database_url: str
                                                            ) -> None:
    run(database_url, "sync-odata", "success")
    schedule = build_schedule(None, {"run-all": "* * * * *"})
    # The test database is a clone of the session's template, migrated when the session began
    # (maybe more than the grace period ago): make the install "moments ago" explicitly.
    conn.execute("UPDATE schema_migrations SET applied_at = now()")
    report = collect_status(conn, schedule=schedule, sections=quiet_sections())
    assert report.stages["run-all"]["overdue"] is False  # installed moments ago
    conn.execute("UPDATE schema_migrations SET applied_at = now() - interval '1 day'")
    report = collect_status(conn, schedule=schedule, sections=quiet_sections())
    assert report.stages["run-all"]["overdue"] is True


def test_a_killed_run_shows_as_crashed(conn: Conn, database_url: str) -> None:
    code = (
        "import sys, time\n"
        "from pipeline_cli.db import Database\n"
        "from pipeline_cli.runner import StageRunner, StageResult\n"
        "def fn(ctx):\n"
        "    print('started', flush=True)\n"
        "    time.sleep(60)\n"
        "    return StageResult()\n"
        "StageRunner(Database(sys.argv[1])).run('gen-virtual', fn)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, database_url], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
        running = collect_status(conn, sections=quiet_sections())
        assert running.stages["gen-virtual"]["running"] == 1
        assert running.locks["gen-virtual"]["pid"] == proc.pid
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    deadline = time.monotonic() + 10
    while True:  # PostgreSQL notices the dead client's session within moments
        report = collect_status(conn, sections=quiet_sections())
        if report.stages["gen-virtual"]["last_status"] == "crashed" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    s = report.stages["gen-virtual"]
    assert s["last_status"] == "crashed" and s["running"] == 0
    assert s["consecutive_failures"] == 1 and "died" in s["last_error"]
    assert "gen-virtual" not in report.locks
    assert any(p.area == "gen-virtual" for p in report.problems)


def test_gps_thresholds_follow_the_health_settings(conn: Conn, database_url: str) -> None:
    run(database_url, "sync-odata", "success")

    def gps(points: int, age: int = 0, dead: int = 0, failed: int = 0) -> dict[str, Any]:
        return quiet_sections(gps=lambda env: {
            "unprocessed_points": points, "oldest_unprocessed_age_s": age,
            "batches": {"pending": 1, "failed": failed, "dead": dead}})

    assert collect_status(conn, sections=gps(999)).health == OK
    assert collect_status(conn, sections=gps(1000)).health == WARNING
    assert collect_status(conn, sections=gps(5000)).health == CRITICAL
    assert collect_status(conn, sections=gps(5, age=3600)).health == WARNING
    assert collect_status(conn, sections=gps(5, age=6 * 3600)).health == CRITICAL
    assert collect_status(conn, sections=gps(5, dead=1)).health == WARNING
    assert collect_status(conn, sections=gps(5, failed=200)).health == CRITICAL
    lenient = HealthSettings(backlog_warning=10_000, backlog_critical=20_000)
    assert collect_status(conn, sections=gps(5000), health=lenient).health == OK


def test_partitions_near_the_servers_lock_table_warn_then_turn_critical(
        conn: Conn, database_url: str) -> None:
    # 3,659 daily partitions (a ten-year import) made match-gps fail "out of shared memory"
    # with PostgreSQL's default lock table (6,400 slots), and status said nothing.
    run(database_url, "sync-odata", "success")

    def gps(partitions: int) -> dict[str, Any]:
        return quiet_sections(gps=lambda env: {"partitions": partitions, "lock_slots": 6400})

    assert collect_status(conn, sections=gps(1600)).health == OK
    report = collect_status(conn, sections=gps(1601))
    assert report.health == WARNING
    assert "max_locks_per_transaction" in report.problems[0].message
    assert collect_status(conn, sections=gps(3201)).health == CRITICAL


def test_a_failing_section_reports_itself_and_warns(conn: Conn, database_url: str) -> None:
    run(database_url, "sync-odata", "success")

    def broken(env: SectionEnv) -> dict[str, Any]:
        raise RuntimeError("boom")

    report = collect_status(conn, sections=quiet_sections(virtual=broken))
    assert report.sections["virtual"] == {"error": "internal error: RuntimeError: boom"}
    assert report.sections["graph"] == {}
    assert report.health == WARNING


def test_real_sections_fill_the_report(conn: Conn, database_url: str, redis_url: str,
                                       redis_prefix: str) -> None:
    run(database_url, "sync-odata", "success")
    client = redis_lib.Redis.from_url(redis_url)
    try:
        report = collect_status(conn, redis=lambda seconds: client, redis_prefix=redis_prefix)
        for name in ("dataset", "virtual", "graph", "gps"):
            assert "error" not in report.sections[name], report.sections[name]
        gps = report.sections["gps"]
        assert gps["partitions"] >= 9 and gps["lock_slots"] >= 64  # the days made ahead
        assert report.sections["graph"]["consistent"] is True
        # A Redis pointer that PostgreSQL does not know is critical: the API reads it.
        client.set(f"{redis_prefix}:graph:active", "graph-v99")
        report = collect_status(conn, redis=lambda seconds: client, redis_prefix=redis_prefix)
        assert report.sections["graph"]["consistent"] is False
        assert report.health == CRITICAL
    finally:
        client.close()


def test_unmigrated_database_is_critical(empty_database_url: str) -> None:
    with db.connect(empty_database_url, autocommit=True) as c:
        report = collect_status(c)
    assert report.health == CRITICAL and "db migrate" in report.problems[0].message


@pytest.mark.s3
def test_s3_reachable_and_backup_age(conn: Conn, database_url: str, s3: S3Endpoint,
                                     s3_bucket: str) -> None:
    run(database_url, "sync-odata", "success")
    store = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region, timeout=3)
    store.ensure_bucket()
    report = collect_status(conn, backups=lambda seconds: store, sections=quiet_sections())
    assert report.s3["reachable"] is True and report.s3["last_backup"] is None
    conn.execute("INSERT INTO datasets (version, seq, hash, backup_prefix, active) "
                 "VALUES ('ds-v1', 1, 'h', 'datasets/ds-v1/', true)")
    store.put_json("datasets/ds-v1/manifest.json", {"format": "test"})
    report = collect_status(conn, backups=lambda seconds: store, sections=quiet_sections())
    assert report.s3["last_backup"]["dataset"] == "ds-v1"
    assert 0 <= report.s3["last_backup_age_s"] < 120
    assert report.health == OK
    keys = {"configured", "bucket", "reachable", "refused", "bucket_exists", "last_backup",
            "last_backup_age_s"}
    assert report.s3.keys() == keys
    down = BackupStore.connect("127.0.0.1:9", "k", "s", s3_bucket, timeout=1)
    report = collect_status(conn, backups=lambda seconds: down, sections=quiet_sections())
    assert report.s3["reachable"] is False and report.health == WARNING
    # The same keys in every state (bucket_exists was missing when unreachable), an error too.
    assert report.s3.keys() == keys | {"error"} and report.s3["bucket_exists"] is None
    assert collect_status(conn, sections=quiet_sections()).s3 == {
        "configured": False, **dict.fromkeys(keys - {"configured"})}
    # A bucket that is gone (deleted, or a typo in [s3] bucket) said "reachable", and only
    # that the newest manifest was missing ("NoSuchKey").
    gone = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket + "-gone",
                               secure=s3.secure, region=s3.region, timeout=3)
    report = collect_status(conn, backups=lambda seconds: gone, sections=quiet_sections())
    assert report.s3["bucket_exists"] is False and report.health == WARNING
    assert report.s3["error"] == (f"bucket {s3_bucket}-gone does not exist: the backups of "
                                  "ds-v1 and every version before it are not there")


@pytest.mark.s3
def test_the_newest_backup_is_found_under_the_key_prefix(conn: Conn, s3: S3Endpoint,
                                                         s3_bucket: str) -> None:
    # With [s3] prefix set, status looked for datasets/ds-v1/manifest.json at the bucket's
    # root and warned that the newest backup was missing (NoSuchKey).
    store = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region, timeout=3,
                                prefix="city-a/x.y_(1)")
    conn.execute("INSERT INTO datasets (version, seq, hash, backup_prefix, active) "
                 "VALUES ('ds-v1', 1, 'h', 'datasets/ds-v1/', true)")
    store.put_json("datasets/ds-v1/manifest.json", {"format": "test"})
    report = collect_status(conn, backups=lambda seconds: store, sections=quiet_sections())
    assert "error" not in report.s3, report.s3
    assert report.s3["last_backup"]["key"] == "city-a/x.y_(1)/datasets/ds-v1/manifest.json"
    assert 0 <= report.s3["last_backup_age_s"] < 120


def test_prometheus_text_is_well_formed(conn: Conn, database_url: str) -> None:
    run(database_url, "sync-odata", "success")
    report = collect_status(conn, sections=quiet_sections(gps=lambda env: {
        "unprocessed_points": 7, "batches": {"dead": 2}, "device": "x"}))
    text = prometheus_text(report)
    line_re = re.compile(r'^[a-z_][a-z0-9_]*(\{([a-z_]+="[^"]*",?)*\})? -?[0-9.e+-]+$')
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ ", line), line
            continue
        assert line_re.match(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples["pipeline_status_up"] == 1
    assert samples["pipeline_health"] == 1  # 2 dead batches: warning
    assert samples["pipeline_gps_unprocessed_points"] == 7
    assert samples["pipeline_gps_batches_dead"] == 2
    assert samples['pipeline_stage_consecutive_failures{stage="sync-odata"}'] == 0
    assert prometheus_text(None).startswith("# HELP pipeline_status_up")
    # Prometheus's own parser reads every sample back, each family under its one TYPE.
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(text))
    assert sum(len(f.samples) for f in families) == len(samples)
    assert len({f.name for f in families}) == len(families) == text.count("# TYPE ")


def test_prometheus_values_have_no_float_noise(conn: Conn) -> None:
    report = dataclasses.replace(collect_status(conn, sections=quiet_sections(gps=lambda env: {
        "unprocessed_points": 7, "lag_s": 0.1 + 0.2, "rate": 1e-7, "big": 2.5e20})),
        collect_ms=486)
    text = prometheus_text(report)
    assert "\npipeline_status_collect_seconds 0.486\n" in text
    assert "\npipeline_gps_unprocessed_points 7\n" in text
    assert "\npipeline_gps_lag_s 0.30000000000000004\n" in text  # exact, just not padded
    assert "\npipeline_gps_rate 1e-07\n" in text and "\npipeline_gps_big 2.5e+20\n" in text
    for line in text.splitlines():
        if not line.startswith("#"):
            value = line.rsplit(" ", 1)[1]
            assert len(value) <= 24 and float(value) == float(value), line


def test_a_database_clock_off_the_hosts_is_named(conn: Conn, database_url: str) -> None:
    # Runs are stamped with the database's clock, cron starts them by the host's: a database
    # 5 min behind made every 6-hourly run count for the slot before its own, and the stage
    # "overdue" for hours with nothing said about why.
    from datetime import UTC, datetime, timedelta

    run(database_url, "sync-odata", "success")
    report = collect_status(conn, sections=quiet_sections())
    assert abs(report.clock_skew_s) < 5 and report.health == OK, report.problems
    ahead = collect_status(conn, sections=quiet_sections(),
                           host_clock=lambda: datetime.now(UTC) + timedelta(minutes=5))
    assert -305 < ahead.clock_skew_s < -295 and ahead.health == WARNING
    assert [(p.area, p.message) for p in ahead.problems] == [
        ("clock", "the database's clock is 5 min behind this host's: status judges ages and "
                  "overdue stages by the database's clock, cron starts runs by the host's "
                  "(synchronise both with NTP)")]
    assert ahead.to_json()["clock_skew_s"] == ahead.clock_skew_s
    assert f"\npipeline_database_clock_skew_seconds {ahead.clock_skew_s:g}\n" in \
        prometheus_text(ahead)


def test_tables_held_locked_cost_the_budget_once(conn: Conn, database_url: str) -> None:
    # Each section waited out its own 5 s statement timeout: 21 s with the tables of a
    # `db migrate` held locked, past a monitor's 10 s. Now later sections get what is left.
    run(database_url, "sync-odata", "success")
    budget = Budget(seconds=3, statement_s=2, set_timeout=Database(database_url).set_session)
    with db.connect(database_url) as holder:  # a transaction: the locks stay until it ends
        holder.execute("LOCK TABLE datasets, virtual_generations, graph_versions, gps_points,"
                       " processing_batches IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        report = collect_status(conn, sections=None, budget=budget)
        took = time.monotonic() - started
    assert took < 6, took  # 3 s and a generous margin, not 5 sections x 2 s
    errors = {name: section.get("error") for name, section in report.sections.items()}
    assert "statement timeout" in errors["dataset"], errors
    for name in ("dataset", "virtual", "graph", "gps"):  # the locked ones
        assert errors[name], errors
    assert errors["prune"] == "not collected: status's time budget of 3 s ran out", errors
    assert report.health == WARNING
    assert "prune section unavailable: not collected: status's time budget" in " ".join(
        p.message for p in report.problems)
    assert "locks_error" not in report.to_json() and report.stages["sync-odata"]["last_status"]


def test_a_hung_redis_or_s3_costs_the_budget_not_its_own_timeout(conn: Conn,
                                                                  database_url: str) -> None:
    # A server that accepts and never answers (stopped, hung, a firewall dropping packets)
    # held status for the client's own timeout, 10 s a call, past its budget of 2 s.
    run(database_url, "sync-odata", "success")
    clients: list[redis_lib.Redis] = []

    def redis(seconds: float) -> redis_lib.Redis:
        clients.append(graph_store.connect(f"redis://{where}", socket_timeout=min(seconds, 10)))
        return clients[-1]

    def backups(seconds: float) -> BackupStore:
        return BackupStore.connect(where, "key", "secret", "status-bucket",
                                   timeout=min(seconds, 10), retries=0)

    with socket.create_server(("127.0.0.1", 0), backlog=16) as hung:
        where = f"127.0.0.1:{hung.getsockname()[1]}"
        try:
            took, reports = [], []
            for connector in ({"redis": redis}, {"backups": backups}):
                budget = Budget(seconds=2, set_timeout=Database(database_url).set_session)
                started = time.monotonic()
                reports.append(collect_status(conn, budget=budget, **connector))
                took.append(time.monotonic() - started)
        finally:
            for client in clients:
                client.close()
    assert max(took) < 6, took  # 2 s and a generous margin, not 10 s
    graph, s3 = reports[0].sections["graph"], reports[1].s3
    assert re.fullmatch(rf"Redis unreachable: Redis {where} did not answer within [\d.]+ s "
                        "while reading the owner of the graph prefix", graph["problem"]), graph
    assert re.fullmatch(rf"S3 {where} did not answer the bucket check of status-bucket within "
                        r"[\d.]+ s", s3["error"]), s3
    assert s3["reachable"] is False and reports[1].health == WARNING
    # Redis that does not answer stays critical (the routing API reads the graph there), but
    # the graph is not checked, not "BROKEN"; S3 that does not answer is a warning.
    assert graph["consistent"] is None and graph["redis_reachable"] is False, graph
    assert reports[0].health == CRITICAL, reports[0].problems
    assert "\npipeline_redis_up 0\n" in prometheus_text(reports[0])


@pytest.mark.s3
def test_a_refusing_redis_or_s3_is_named_refused_not_unreachable(
        conn: Conn, database_url: str, services: LocalServices, s3: S3Endpoint,
        s3_bucket: str) -> None:
    # A wrong password or secret key was "Redis unreachable" (critical) and "S3 unreachable":
    # the server answered; it refused the credentials.
    run(database_url, "sync-odata", "success")
    url = services.start_redis_server()
    admin = redis_lib.Redis.from_url(url)
    admin.config_set("requirepass", "Secret-pw-1")
    client = graph_store.connect(url.replace("redis://", "redis://:Wrong-pw-2@"))
    store = BackupStore.connect(s3.endpoint, s3.access_key, "wrongwrong", s3_bucket,
                                secure=s3.secure, region=s3.region, timeout=3, retries=0)
    try:
        report = collect_status(conn, redis=lambda seconds: client, backups=lambda seconds: store,
                                redis_prefix="status-refused")
    finally:
        client.close()
        admin.close()
    graph, s3_section = report.sections["graph"], report.s3
    assert graph["consistent"] is None and graph["redis_reachable"] is True, graph
    assert graph["redis_refused"] is True
    assert s3_section["reachable"] is True and s3_section["refused"] is True, s3_section
    messages = [p.message for p in report.problems]
    where = url.split("//")[1].split("/")[0]
    assert f"graph: Redis refused: Redis {where} refused the user name or password" in \
        " ".join(messages), messages
    assert any(m.startswith(f"S3 refused: S3 {s3.endpoint} bucket check of {s3_bucket} failed: "
                            "SignatureDoesNotMatch") for m in messages), messages
    assert "unreachable" not in " ".join(messages) and report.health == CRITICAL, messages
    assert [p.level for p in report.problems if p.message.startswith("S3")] == [WARNING]
    metrics = prometheus_text(report)
    for line in ("pipeline_redis_up 0", "pipeline_redis_refused 1", "pipeline_s3_up 0",
                 "pipeline_s3_refused 1"):
        assert f"\n{line}\n" in metrics, line


def test_through_a_transaction_pooler_the_budget_sets_no_timeout(conn: Conn,
                                                                 database_url: str) -> None:
    # A session setting would stick to a server session that other clients then use.
    pooled = Database(database_url, pooler=db.POOLER_TRANSACTION)
    collect_status(conn, sections=quiet_sections(), budget=Budget(
        seconds=8, set_timeout=pooled.set_session))
    assert conn.execute("SHOW statement_timeout").fetchone() == {"statement_timeout": "0"}
    collect_status(conn, sections=quiet_sections(), budget=Budget(
        seconds=8, set_timeout=Database(database_url).set_session))
    assert conn.execute("SHOW statement_timeout").fetchone() == {"statement_timeout": "5s"}


def test_points_dated_ahead_are_counted_apart(conn: Conn, database_url: str) -> None:
    # A device clock a year ahead: its point waited unbatched, counted only within
    # unbatched_points, and nothing in status said why it waited.
    run(database_url, "sync-odata", "success")
    now = datetime.now(UTC)
    traces.insert_points(conn, [("dev", now - timedelta(seconds=s), 60.17, 24.94)
                                for s in (40, 30, 20, 10)]
                         + [("dev", now + timedelta(days=365), 60.17, 24.94)])
    batches.make_batches(conn, MatchSettings())  # the pass sets the device aside
    report = collect_status(conn)
    gps = report.sections["gps"]
    assert (gps["future_points"], gps["unbatched_points"]) == (1, 5), gps
    assert report.health == OK, report.problems  # information, not a problem
    assert "\npipeline_gps_future_points 1\n" in prometheus_text(report)
