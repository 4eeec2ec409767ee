"""prune against real PostgreSQL and S3: what is due goes in chunks, what must stay stays, a
rerun is a noop, and a dry run deletes nothing and records no run."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg import sql

from devtools.services import S3Endpoint
from pipeline_cli import db
from pipeline_cli.adapters.backups import BackupStore
from pipeline_cli.db import Database
from pipeline_cli.gps import batches, partitions
from pipeline_cli.health import collect_status
from pipeline_cli.runner import RunRecord, StageRunner
from pipeline_cli.settings import MatchSettings, RetentionSettings
from pipeline_cli.stages.build_graph import export_prefix
from pipeline_cli.stages.prune import prune
from pipeline_cli.stages.sync_odata import backup_prefix

pytestmark = pytest.mark.s3

Conn = psycopg.Connection[Any]
NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=40)
RECENT = NOW - timedelta(days=1)


@pytest.fixture
def backups(s3: S3Endpoint, s3_bucket: str) -> BackupStore:
    return BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                               secure=s3.secure, region=s3.region)


def run(database_url: str, backups: BackupStore | None, settings: RetentionSettings,
        *, dry_run: bool = False) -> RunRecord:
    database = Database(database_url)
    return StageRunner(database).run(
        "prune", lambda ctx: prune(database, backups, settings, ctx, dry_run=dry_run),
        dry_run=dry_run)


def add_batch(conn: Conn, device: str, start: datetime, points: int, status: str) -> None:
    """A batch of ``points`` points one second apart, in the state match-gps leaves it: a
    finished batch read its points (its snapshot is taken after they were inserted)."""
    add_unbatched(conn, device, start, points)
    conn.execute(
        "INSERT INTO processing_batches (device_id, start_time, end_time, status, "
        "coordinate_count, points_snapshot) VALUES (%s, %s, %s, %s, %s,"
        " CASE WHEN %s THEN txid_current_snapshot() END)",
        (device, start, start + timedelta(seconds=points - 1), status, points,
         status in ("completed", "too_short")))


def add_unbatched(conn: Conn, device: str, start: datetime, points: int) -> None:
    for i in range(points):
        conn.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude) "
                     "VALUES (%s, %s, 60.17, 24.94)", (device, start + timedelta(seconds=i)))


def gps_state(conn: Conn) -> tuple[list[tuple[str, str | None, bool]], list[str]]:
    points = [(r["device_id"], r["batch_status"], r["processed"]) for r in conn.execute(
        "SELECT device_id, batch_status, processed FROM gps_point_status"
        " ORDER BY device_id, recorded_at")]
    batches = [r["status"] for r in conn.execute(
        "SELECT status FROM processing_batches ORDER BY device_id, start_time")]
    return points, batches


def test_old_processed_points_go_recent_and_unprocessed_stay(
        database_url: str, conn: Conn) -> None:
    add_batch(conn, "a-old", OLD, 5, "completed")        # due: 5 points, 1 batch
    add_batch(conn, "b-old-short", OLD, 1, "too_short")  # due: 1 point, 1 batch
    add_batch(conn, "c-recent", RECENT, 4, "completed")  # too young
    add_batch(conn, "d-dead", OLD, 3, "dead")            # evidence: kept
    add_batch(conn, "e-failed", OLD, 2, "failed")        # waiting for a retry: kept
    add_unbatched(conn, "f-unbatched", OLD, 3)           # never processed: kept
    settings = RetentionSettings(chunk_size=2, runs_days=0, datasets=0)

    first = run(database_url, None, settings)
    assert first.status == "success", first.error
    assert first.counts["gps_points"] == 6 and first.counts["gps_batches"] == 2
    points, batches = gps_state(conn)
    assert points == ([("c-recent", "completed", True)] * 4 + [("d-dead", "dead", False)] * 3
                      + [("e-failed", "failed", False)] * 2 + [("f-unbatched", None, False)] * 3)
    assert batches == ["completed", "dead", "failed"]

    again = run(database_url, None, settings)
    assert again.status == "noop" and not any(again.counts.values())
    assert gps_state(conn) == (points, batches)


def test_polylines_and_run_history(database_url: str, conn: Conn) -> None:
    for device, created, accessed in (("old", OLD, None), ("read", OLD, RECENT),
                                      ("new", RECENT, None)):
        conn.execute(
            "INSERT INTO cached_polylines (device_id, start_time, end_time, encoded_polyline, "
            "point_count, source_coordinates_count, created_at, last_accessed) "
            "VALUES (%s, %s, %s, '_p~iF~ps|U', 2, 2, %s, %s)",
            (device, created, created, created, accessed))
    old_run = NOW - timedelta(days=100)
    for i, (stage, status) in enumerate((("sync-odata", "success"), ("sync-odata", "failed"),
                                         ("sync-odata", "success"), ("build-graph", "noop"))):
        conn.execute(
            "INSERT INTO stage_runs (run_id, stage, host, pid, backend_pid, backend_start, "
            "started_at, finished_at, status) VALUES (gen_random_uuid(), %s, 'h', 1, 1, now(), "
            "%s, %s, %s)", (stage, old_run + timedelta(minutes=i), old_run, status))
    settings = RetentionSettings(gps_days=0, polyline_days=7, runs_days=90, datasets=0)
    record = run(database_url, None, settings)
    assert record.counts["polylines"] == 1 and record.counts["stage_runs"] == 2
    assert [r["device_id"] for r in conn.execute(
        "SELECT device_id FROM cached_polylines ORDER BY device_id")] == ["new", "read"]
    # Status still sees each stage's newest run (here also its newest good run), and the
    # prune run itself.
    assert sorted((r["stage"], r["status"]) for r in conn.execute(
        "SELECT stage, status FROM stage_runs")) == [
        ("build-graph", "noop"), ("prune", "success"), ("sync-odata", "success")]


def test_days_are_counted_in_hours_whatever_the_database_time_zone(
        database_url: str, conn: Conn) -> None:
    """A database whose TimeZone changes its offset inside the retention window: 'N days ago'
    was counted on that zone's wall clock, an hour off, and prune deleted an hour early (or
    kept an hour too long)."""
    zone = ZoneInfo("America/New_York")
    days = next(n for n in range(1, 367)
                if NOW.astimezone(zone).utcoffset() != (NOW - timedelta(days=n)).astimezone(
                    zone).utcoffset())
    conn.execute(sql.SQL("ALTER DATABASE {} SET TimeZone = 'America/New_York'").format(
        sql.Identifier(conn.info.dbname)))
    edge = NOW - timedelta(days=days)
    for device, created in (("younger", edge + timedelta(minutes=30)),
                            ("older", edge - timedelta(minutes=30))):
        conn.execute(
            "INSERT INTO cached_polylines (device_id, start_time, end_time, encoded_polyline, "
            "point_count, source_coordinates_count, created_at) "
            "VALUES (%s, %s, %s, '_p~iF~ps|U', 2, 2, %s)", (device, created, created, created))
    settings = RetentionSettings(gps_days=0, polyline_days=days, runs_days=0, datasets=0)
    record = run(database_url, None, settings)
    assert record.counts["polylines"] == 1
    assert [r["device_id"] for r in conn.execute(
        "SELECT device_id FROM cached_polylines")] == ["younger"]


def add_run(conn: Conn, stage: str, status: str, started: datetime) -> None:
    conn.execute(
        "INSERT INTO stage_runs (run_id, stage, host, pid, backend_pid, backend_start, "
        "started_at, finished_at, status, error) VALUES (gen_random_uuid(), %s, 'h', 1, 1, "
        "now(), %s, %s, %s, CASE WHEN %s = 'failed' THEN 'OData answered 503' END)",
        (stage, started, started, status, status))


def test_run_history_keeps_what_status_reads(database_url: str, conn: Conn) -> None:
    # Five failures in a row, the four oldest past runs_days: prune deleted them and status
    # said "failed 1 time" (a warning) instead of "5 times in a row" (critical); and an old
    # success before a newer noop went, so build-graph's last_work_at became null.
    good = NOW - timedelta(days=200)
    add_run(conn, "sync-odata", "success", good)
    for i in range(5):
        add_run(conn, "sync-odata", "failed", good + timedelta(days=10 * (i + 1)))
    add_run(conn, "build-graph", "success", good)
    add_run(conn, "build-graph", "failed", good + timedelta(days=1))
    add_run(conn, "build-graph", "noop", good + timedelta(days=2))
    add_run(conn, "build-graph", "noop", good + timedelta(days=3))
    before = collect_status(conn).stages
    assert before["sync-odata"]["consecutive_failures"] == 5

    record = run(database_url, None, RetentionSettings(gps_days=0, runs_days=90, datasets=0))
    assert record.counts["stage_runs"] == 2, record.error  # build-graph's failure, older noop
    after = collect_status(conn).stages
    for stage in ("sync-odata", "build-graph"):
        for key in ("consecutive_failures", "last_success_at", "last_work_at",
                    "last_started_at"):
            assert after[stage][key] == before[stage][key], (stage, key)


def test_a_failure_midway_reports_what_was_already_deleted(database_url: str, conn: Conn,
                                                           backups: BackupStore) -> None:
    # S3 unreachable at the dataset step: the run said "failed {}" though it had deleted run
    # history.
    for i in range(3):
        add_run(conn, "sync-odata", "noop", NOW - timedelta(days=200 + i))
    for seq in range(1, 4):
        add_dataset(conn, backups, seq, active=seq == 3)
    down = BackupStore.connect("127.0.0.1:9", "k", "s", backups.bucket, timeout=1, retries=0)
    record = run(database_url, down, RetentionSettings(gps_days=0, runs_days=90, datasets=1))
    assert record.status == "failed" and record.error and "S3" in record.error
    assert record.counts["stage_runs"] == 2 and record.counts["datasets"] == 0
    row = conn.execute("SELECT counts, result FROM stage_runs WHERE stage = 'prune'").fetchone()
    assert row and row["counts"]["stage_runs"] == 2 and row["result"]["datasets_deleted"] == []


def add_dataset(conn: Conn, backups: BackupStore, seq: int, *, active: bool = False) -> str:
    version = f"ds-v{seq}"
    conn.execute("INSERT INTO datasets (version, seq, hash, backup_prefix, active) "
                 "VALUES (%s, %s, 'h', %s, %s)", (version, seq, backup_prefix(version), active))
    gen = conn.execute(
        "INSERT INTO virtual_generations (dataset_version, settings, backup_prefix) "
        "VALUES (%s, '{}', %s) RETURNING id",
        (version, f"datasets/{version}/virtual/gen-0/")).fetchone()
    assert gen is not None
    conn.execute("UPDATE virtual_generations SET backup_prefix = %s WHERE id = %s",
                 (f"{backup_prefix(version)}virtual/gen-{gen['id']}/", gen["id"]))
    backups.put_json(f"{backup_prefix(version)}manifest.json", {"version": version})
    backups.put_json(f"{backup_prefix(version)}virtual/gen-{gen['id']}/stops.json.gz", [],
                     gzipped=True)
    return version


def add_graph(conn: Conn, backups: BackupStore, seq: int, dataset: str, *, active: bool
              ) -> str:
    version = f"graph-v{seq}"
    conn.execute(
        "INSERT INTO graph_versions (version, seq, dataset_version, nodes, edges, build_ms, "
        "checksum, export_key, active) VALUES (%s, %s, %s, 1, 0, 1, 'c', %s, %s)",
        (version, seq, dataset, f"{export_prefix(version)}graph.jsonl.gz", active))
    backups.put_bytes(f"{export_prefix(version)}graph.jsonl.gz", b"x")
    backups.put_json(f"{export_prefix(version)}manifest.json", {})
    return version


def test_datasets_keep_the_newest_the_active_and_the_graphs(
        database_url: str, conn: Conn, backups: BackupStore) -> None:
    v1, v2, v3, v4, v5 = (add_dataset(conn, backups, i, active=i == 5) for i in range(1, 6))
    add_graph(conn, backups, 1, v1, active=True)  # the active graph was built from v1
    g2 = add_graph(conn, backups, 2, v2, active=False)
    add_graph(conn, backups, 4, v4, active=False)
    settings = RetentionSettings(gps_days=0, runs_days=0, datasets=2)
    before = sorted(backups.list(""))

    dry = run(database_url, backups, settings, dry_run=True)
    assert dry.status == "dry-run" and dry.extra["datasets_deleted"] == [v2, v3]
    assert dry.counts["datasets"] == 2 and dry.counts["graph_versions"] == 1
    assert dry.counts["s3_objects"] == 6  # 2 per dataset, 2 of graph-v2
    assert sorted(backups.list("")) == before
    assert conn.execute("SELECT count(*) AS n FROM datasets").fetchone() == {"n": 5}
    assert conn.execute("SELECT count(*) AS n FROM stage_runs").fetchone() == {"n": 0}

    record = run(database_url, backups, settings)
    assert record.status == "success", record.error
    assert record.counts == dry.counts
    assert [r["version"] for r in conn.execute(
        "SELECT version FROM datasets ORDER BY seq")] == [v1, v4, v5]
    assert [r["version"] for r in conn.execute(
        "SELECT version FROM graph_versions ORDER BY seq")] == ["graph-v1", "graph-v4"]
    assert [r["dataset_version"] for r in conn.execute(
        "SELECT dataset_version FROM virtual_generations ORDER BY id")] == [v1, v4, v5]
    left = sorted(backups.list(""))
    assert left == sorted(k for k in before if not k.startswith(
        (backup_prefix(v2), backup_prefix(v3), export_prefix(g2))))
    assert len(left) == len(before) - 6

    assert run(database_url, backups, settings).status == "noop"


def add_virtual_entities(conn: Conn, version: str) -> None:
    """A generation's entities in the virtual tables, as gen-virtual leaves them."""
    gen = conn.execute("SELECT max(id) AS id FROM virtual_generations WHERE dataset_version = %s",
                       (version,)).fetchone()
    assert gen is not None
    conn.execute("INSERT INTO virtual_stops (id, latitude, longitude, kind, dataset_version) "
                 "VALUES ('V:MAIN:1:1', 60, 24, 'MAIN_GRID', %s), "
                 "('V:MAIN:1:2', 60, 25, 'MAIN_GRID', %s)", (version, version))
    conn.execute("INSERT INTO virtual_routes (id, from_stop_id, to_stop_id, mode, distance_km, "
                 "travel_time_s, dataset_version) VALUES ('VR:V:MAIN:1:1>V:MAIN:1:2', "
                 "'V:MAIN:1:1', 'V:MAIN:1:2', 'virtual', 55, 3960, %s)",
                 (version,))
    conn.execute("INSERT INTO virtual_frequencies (generation_id, mode, start_time, end_time, "
                 "headway_s, dataset_version) VALUES (%s, 'virtual', '05:00', '23:00', 1800, %s)",
                 (gen["id"], version))


def virtual_rows(conn: Conn) -> dict[str, int]:
    return {t: conn.execute(f"SELECT count(*) AS n FROM {t}").fetchone()["n"]  # noqa: S608
            for t in ("virtual_stops", "virtual_routes", "virtual_frequencies")}


def test_a_deleted_dataset_takes_its_virtual_entities_along(
        database_url: str, conn: Conn, backups: BackupStore) -> None:
    # gen-virtual ran for v2 and failed for v3 and v4: the virtual tables still held v2's
    # entities after prune had deleted v2 and its generation row, for no reader to use.
    v1, v2, v3, v4 = (add_dataset(conn, backups, i, active=i == 4) for i in range(1, 5))
    add_virtual_entities(conn, v2)
    settings = RetentionSettings(gps_days=0, runs_days=0, datasets=1)
    dry = run(database_url, backups, settings, dry_run=True)
    assert (dry.counts["virtual_stops"], dry.counts["virtual_routes"]) == (2, 1)
    assert virtual_rows(conn) == {"virtual_stops": 2, "virtual_routes": 1,
                                  "virtual_frequencies": 1}
    record = run(database_url, backups, settings)
    assert record.status == "success", record.error
    assert record.extra["datasets_deleted"] == [v1, v2, v3]
    assert record.counts == dry.counts
    assert virtual_rows(conn) == {"virtual_stops": 0, "virtual_routes": 0,
                                  "virtual_frequencies": 0}


def test_virtual_entities_of_a_kept_dataset_stay(
        database_url: str, conn: Conn, backups: BackupStore) -> None:
    # The active graph was built from v1's generation: v1 stays, and so do its entities.
    v1, _v2, _v3 = (add_dataset(conn, backups, i, active=i == 3) for i in range(1, 4))
    add_graph(conn, backups, 1, v1, active=True)
    add_virtual_entities(conn, v1)
    record = run(database_url, backups, RetentionSettings(gps_days=0, runs_days=0, datasets=1))
    assert record.extra["datasets_deleted"] == ["ds-v2"]
    assert record.counts["virtual_stops"] == 0
    assert virtual_rows(conn) == {"virtual_stops": 2, "virtual_routes": 1,
                                  "virtual_frequencies": 1}


def test_a_restored_version_keeps_the_version_whose_raw_pages_it_reads(
        database_url: str, conn: Conn, backups: BackupStore) -> None:
    # A restore's backup names its source's raw/ files: pruning the source (the runbook's
    # "restore an older dataset", then the next prune) left the active version unrestorable.
    v1, v2, v3, v4 = (add_dataset(conn, backups, i, active=i == 4) for i in range(1, 5))
    conn.execute("UPDATE datasets SET restored_from = %s WHERE version = %s", (v1, v3))
    conn.execute("UPDATE datasets SET restored_from = %s WHERE version = %s", (v3, v4))
    record = run(database_url, backups, RetentionSettings(gps_days=0, runs_days=0, datasets=1))
    assert record.extra["datasets_deleted"] == [v2]
    assert [r["version"] for r in conn.execute(
        "SELECT version FROM datasets ORDER BY seq")] == [v1, v3, v4]
    assert list(backups.list(backup_prefix(v1)))


def test_zero_keeps_everything(database_url: str, conn: Conn) -> None:
    add_batch(conn, "a", OLD - timedelta(days=3650), 2, "completed")
    record = run(database_url, None, RetentionSettings(gps_days=0, polyline_days=0, runs_days=0,
                                                       datasets=0))
    assert record.status == "noop" and record.message == "nothing is due"
    assert len(gps_state(conn)[0]) == 2


def test_a_processed_day_goes_as_a_whole_partition(database_url: str, conn: Conn) -> None:
    day = (OLD - timedelta(days=1)).date()
    partitions.ensure(conn, [day])
    start = datetime(day.year, day.month, day.day, 6, tzinfo=UTC)
    add_batch(conn, "a", start, 5, "completed")
    add_batch(conn, "b", start + timedelta(hours=1), 3, "pending")  # unprocessed: stays
    add_batch(conn, "c", OLD, 2, "completed")  # in the default partition: deleted by chunks
    batches.make_batches(conn, MatchSettings())  # a pass: every arrival has been looked at
    name = f"gps_points_p{day:%Y%m%d}"
    conn.execute("UPDATE processing_batches SET status = 'completed',"
                 " points_snapshot = txid_current_snapshot() WHERE device_id = 'b'")
    record = run(database_url, None, RetentionSettings(runs_days=0, datasets=0))
    assert record.counts["gps_points"] == 10 and record.counts["gps_batches"] == 3
    left = conn.execute("SELECT to_regclass(%s) AS t", (name,)).fetchone()
    assert left["t"] is None  # dropped, not emptied row by row
    assert conn.execute("SELECT count(*) AS n FROM gps_points").fetchone()["n"] == 0


def test_objects_another_database_wrote_at_the_same_keys_stay(
        database_url: str, conn: Conn, backups: BackupStore) -> None:
    """Two installations backing up into one bucket number their versions alike: prune
    deleted graphs/<version>/ and datasets/<version>/ by name, whoever had written them last,
    and the other installation lost its backups (its `graph activate` found nothing)."""
    ours = str(conn.execute("SELECT id FROM deployment").fetchone()["id"])  # type: ignore[index]
    theirs = "7d3c9e52-0000-4000-8000-000000000001"
    v1, v2, v3, v4, _v5 = (add_dataset(conn, backups, i, active=i == 5) for i in range(1, 6))
    run_ids = {v: str(uuid.uuid4()) for v in (v1, v2)}
    for v, run_id in run_ids.items():
        conn.execute("UPDATE datasets SET run_id = %s WHERE version = %s", (run_id, v))
    # v1's backup is another run's now (a manifest naming a run that did not record v1)
    backups.put_json(f"{backup_prefix(v1)}manifest.json", {"run_id": str(uuid.uuid4())})
    backups.put_json(f"{backup_prefix(v2)}manifest.json", {"run_id": run_ids[v2]})
    g1, g2, g3, g4 = (add_graph(conn, backups, i, v, active=False)
                      for i, v in enumerate((v1, v2, v3, v4), 1))
    manifests = {g1: {"deployment": theirs, "sha256": "c"},  # another deployment's
                 g2: {"deployment": ours, "sha256": "c"},  # ours
                 g3: {"sha256": "other"},  # written before manifests named one: another's
                 g4: {"sha256": "c"}}  # written before: the one recorded, ours
    for g, manifest in manifests.items():
        backups.put_json(f"{export_prefix(g)}manifest.json", manifest)
    settings = RetentionSettings(gps_days=0, runs_days=0, datasets=1)
    before = sorted(backups.list(""))
    stay = [k for k in before if k.startswith(
        (f"{backup_prefix(v1)}", export_prefix(g1), export_prefix(g3), backup_prefix("ds-v5")))]

    dry = run(database_url, backups, settings, dry_run=True)
    assert dry.extra["datasets_deleted"] == [v1, v2, v3, v4]
    assert dry.counts["s3_objects"] == len(before) - len(stay) == 10
    assert sorted(backups.list("")) == before
    record = run(database_url, backups, settings)
    assert record.status == "success", record.error
    assert record.counts == dry.counts
    assert sorted(backups.list("")) == sorted(stay)
    assert conn.execute("SELECT count(*) AS n FROM graph_versions").fetchone() == {"n": 0}


def old_day() -> tuple[str, datetime]:
    """An old day's partition name and its 06:00 UTC."""
    day = (OLD - timedelta(days=1)).date()
    return f"gps_points_p{day:%Y%m%d}", datetime(day.year, day.month, day.day, 6, tzinfo=UTC)


def exists(conn: Conn, table: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) AS t", (table,)).fetchone()["t"] is not None


def points_of(conn: Conn, device: str) -> int:
    return int(conn.execute("SELECT count(*) AS n FROM gps_points WHERE device_id = %s",
                            (device,)).fetchone()["n"])


def wait_for_lock_wait(conn: Conn, app: str = "pipeline prune") -> None:
    """Until a session named ``app`` waits for a lock (at most 10 s)."""
    for _ in range(200):
        if conn.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = %s"
                        " AND wait_event_type = 'Lock'", (app,)).fetchone()["n"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"{app} never waited for a lock")


@pytest.mark.parametrize("commit_while_waiting", [True, False])
def test_a_listener_writing_into_a_day_prune_drops_loses_nothing(
        database_url: str, conn: Conn, commit_while_waiting: bool) -> None:
    # A listener's open transaction holds an old-dated point in a day that is done by every
    # committed row: prune listed the day as droppable, waited for the listener's locks,
    # then dropped the partition with the point committed meanwhile. Now it re-checks the day
    # once it holds the locks (the point is new to the batcher: the day stays), or gives up
    # the drop after its lock timeout and deletes the processed points in chunks.
    name, start = old_day()
    partitions.ensure(conn, [start.date()])
    add_batch(conn, "a", start, 5, "completed")
    batches.make_batches(conn, MatchSettings())
    with psycopg.connect(database_url) as listener:  # a transaction of its own, left open
        listener.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude)"
                         " VALUES ('late', %s, 60.17, 24.94)", (start + timedelta(hours=1),))
        done: list[RunRecord] = []
        pruning = threading.Thread(target=lambda: done.append(
            run(database_url, None, RetentionSettings(runs_days=0, datasets=0))))
        pruning.start()
        if commit_while_waiting:
            wait_for_lock_wait(conn)
            listener.commit()
        pruning.join(timeout=30)
        assert not pruning.is_alive(), "prune waited for the listener without end"
        listener.commit()
    assert done[0].status == "success", done[0].error
    assert points_of(conn, "late") == 1 and points_of(conn, "a") == 0
    assert done[0].counts["gps_points"] == 5
    assert exists(conn, name)  # the late point is in its day, for match-gps


def test_a_batch_goes_only_under_the_batchers_lock(database_url: str, conn: Conn) -> None:
    # A finished old batch whose points are pruned is deleted. Were it deleted while a batcher
    # pass had planned a late point into its range (to reopen it), the point would be left in
    # no batch and its day dropped as done. prune deletes batches under the batcher's lock:
    # here a late point committed while prune waits keeps the batch, for the pass to reopen.
    conn.execute("INSERT INTO processing_batches (device_id, start_time, end_time, status, "
                 "coordinate_count, points_snapshot) VALUES ('a', %s, %s, 'completed', 0, "
                 "txid_current_snapshot())", (OLD, OLD + timedelta(minutes=5)))
    with psycopg.connect(database_url) as batcher:  # a pass, mid-slice
        batcher.execute(db.query("match_gps", "batching_lock"),
                        {"key": db.advisory_key(batches.BATCHING_LOCK)})
        done: list[RunRecord] = []
        pruning = threading.Thread(target=lambda: done.append(
            run(database_url, None, RetentionSettings(runs_days=0, datasets=0))))
        pruning.start()
        wait_for_lock_wait(conn)
        late_point(conn, "a", OLD + timedelta(minutes=1))
        batcher.commit()
        pruning.join(timeout=30)
    assert done[0].status in ("success", "noop"), done[0].error
    assert gps_state(conn) == ([("a", "completed", False)], ["completed"])


def late_point(conn: Conn, device: str, at: datetime) -> None:
    """A point inserted after its device's batch covering ``at`` finished (no pass since)."""
    add_unbatched(conn, device, at, 1)


@pytest.mark.parametrize("case", ["unbatched", "pending", "failed", "dead", "processing",
                                  "late", "late-reopened"])
def test_an_old_day_with_one_unprocessed_point_stays(
        database_url: str, conn: Conn, case: str) -> None:
    name, start = old_day()
    partitions.ensure(conn, [start.date()])
    add_batch(conn, "a", start, 5, "completed")  # processed: goes, in chunks
    if case == "unbatched":
        add_unbatched(conn, "u", start + timedelta(hours=2), 1)
    elif case.startswith("late"):
        add_batch(conn, "u", start + timedelta(hours=2), 3, "completed")
        late_point(conn, "u", start + timedelta(hours=2, seconds=1, milliseconds=500))
        if case == "late-reopened":
            batches.make_batches(conn, MatchSettings())
            assert gps_state(conn)[1] == ["completed", "pending"]
    else:
        add_batch(conn, "u", start + timedelta(hours=2), 1, case)
    unprocessed = points_of(conn, "u")
    settings = RetentionSettings(chunk_size=2, runs_days=0, datasets=0)

    dry = run(database_url, None, settings, dry_run=True)
    record = run(database_url, None, settings)
    assert record.status == "success", record.error
    assert exists(conn, name)
    # A late point the batcher has not seen yet keeps the points its batch read too: the batch
    # goes back to pending at the next pass and is matched again, which replaces its
    # polylines; had they gone, a match of the late point alone would have replaced them.
    assert points_of(conn, "u") == unprocessed and points_of(conn, "a") == 0
    assert dry.counts == record.counts
    assert record.counts["gps_points"] == 5
    assert run(database_url, None, settings).status == "noop"


@pytest.mark.parametrize("zone", ["America/Los_Angeles", "Pacific/Kiritimati"])
def test_a_day_is_a_utc_day_and_a_point_at_the_cutoff_stays(
        database_url: str, conn: Conn, zone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The session's TimeZone (PGTZ here; a host's or the database's default alike) must not
    # move a day's bounds or the cutoff: a daily partition is a UTC day.
    day = (OLD - timedelta(days=2)).date()
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
    partitions.ensure(conn, [day, midnight.date()])
    add_batch(conn, "a", midnight - timedelta(seconds=2), 2, "completed")  # 23:59:58, :59
    add_batch(conn, "b", midnight, 2, "completed")  # 00:00:00 (at the cutoff) and 00:00:01
    add_batch(conn, "c", midnight + timedelta(hours=12), 1, "pending")  # keeps the day
    batches.make_batches(conn, MatchSettings())
    monkeypatch.setenv("PGTZ", zone)
    with Database(database_url).connect(autocommit=True) as local:
        assert local.execute("SHOW TimeZone").fetchone()["TimeZone"] == zone
        pruned = partitions.prune(local, midnight, chunk_rows=10)
    assert pruned.partitions_dropped == [f"gps_points_p{day:%Y%m%d}"]
    assert pruned.points_dropped == 2 and pruned.points_deleted == 0
    assert [r["recorded_at"] for r in conn.execute(
        "SELECT recorded_at FROM gps_points ORDER BY recorded_at")] == [
        midnight, midnight + timedelta(seconds=1), midnight + timedelta(hours=12)]
    with Database(database_url).connect(autocommit=True) as local:  # one second later
        pruned = partitions.prune(local, midnight + timedelta(seconds=1), chunk_rows=10)
    assert pruned.points_deleted == 1 and points_of(conn, "b") == 1


@pytest.mark.parametrize("stage", ["sync-odata", "gen-virtual", "build-graph"])
def test_no_dataset_goes_while_a_stage_reading_datasets_runs(
        database_url: str, conn: Conn, backups: BackupStore, stage: str) -> None:
    # A restore (under sync-odata's lock) of a version past retention replays its raw pages
    # and records a new active version that reads them from its source's prefix from then on;
    # a build-graph started on the dataset a sync has since replaced records (and activates)
    # its graph against it. prune deleted such a version, and its objects, under them.
    old, _ = (add_dataset(conn, backups, i, active=i == 2) for i in (1, 2))
    settings = RetentionSettings(gps_days=0, runs_days=0, datasets=1)
    with db.connect(database_url) as running:  # holds the stage lock, as its runner does
        running.execute(db.query("runner", "try_lock"), {"key": db.advisory_key(stage)})
        record = run(database_url, backups, settings)
        assert record.status == "noop", record.error
        assert list(backups.list(backup_prefix(old)))
        assert conn.execute("SELECT count(*) AS n FROM datasets").fetchone() == {"n": 2}
    record = run(database_url, backups, settings)  # the stage is done: the next run prunes
    assert record.extra["datasets_deleted"] == [old]
    assert not list(backups.list(backup_prefix(old)))
