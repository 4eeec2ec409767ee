"""match-gps against real PostgreSQL and a real osrm-routed on the Helsinki extract.

Traces are synthetic: routed between random points, sampled every 1-3 s, moved 5-8 m, so the
true path is known (devtools.traces).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from devtools import traces
from devtools.services import LocalServices
from pipeline_cli import db, polyline
from pipeline_cli.adapters.osrm import OsrmClient
from pipeline_cli.commands import status as status_command
from pipeline_cli.db import Database
from pipeline_cli.errors import EXIT_CONFIG
from pipeline_cli.gps import batches, partitions, stitching
from pipeline_cli.runner import RunRecord, StageRunner
from pipeline_cli.settings import MatchSettings, RetentionSettings
from pipeline_cli.stages import match_gps as stage
from pipeline_cli.stages.prune import prune as prune_stage
from tests.support import reliability
from tests.support.proxy import CountingHttpProxy, TcpProxy

pytestmark = pytest.mark.osrm

OLD = datetime(2024, 5, 1, 8, tzinfo=UTC)


@pytest.fixture
def proxy(osrm_url: str) -> Iterator[CountingHttpProxy]:
    with CountingHttpProxy(osrm_url) as p:
        yield p


@pytest.fixture
def client(proxy: CountingHttpProxy) -> Iterator[OsrmClient]:
    with OsrmClient(proxy.url, retries=2, retry_wait_max=0.05, pool_size=4) as c:
        yield c


@pytest.fixture(scope="module")
def trace_pool(osrm_url: str) -> list[traces.Trace]:
    with OsrmClient(osrm_url) as c:
        return traces.make_traces(c, 24, seed=11)


def run(database_url: str, client: OsrmClient, settings: MatchSettings | None = None,
        **kw: Any) -> RunRecord:
    settings = settings or MatchSettings()
    database = Database(database_url)
    return StageRunner(database).run(
        "match-gps", lambda ctx: stage.match_gps(database, client, settings, ctx, **kw))


def add_trace(conn: psycopg.Connection[Any], device: str, trace: traces.Trace,
              start: datetime = OLD) -> None:
    trace.start = start
    traces.insert_points(conn, trace.rows(device))


def polylines(conn: psycopg.Connection[Any], device: str) -> list[list[tuple[float, float]]]:
    rows = conn.execute("SELECT encoded_polyline FROM cached_polylines WHERE device_id = %s"
                        " ORDER BY start_time", (device,)).fetchall()
    return [polyline.decode(r["encoded_polyline"]) for r in rows]


def batch_states(conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = conn.execute("SELECT status, count(*) AS n FROM processing_batches GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


# ----------------------------------------------------------------- pure helpers


def test_chunk_plan_overlaps() -> None:
    assert stitching.chunk_plan(50, 100, 10) == [(0, 50)]
    assert stitching.chunk_plan(250, 100, 10) == [(0, 100), (90, 190), (180, 250)]
    plan = stitching.chunk_plan(350, 100, 10)
    assert plan[-1][1] == 350
    assert all(b[0] == a[1] - 10 for a, b in zip(plan, plan[1:], strict=False))


def test_integer_timestamps_drop_repeated_seconds() -> None:
    kept, stamps = stitching.integer_timestamps([10.2, 10.7, 11.0, 11.9, 14.5])
    assert kept == [0, 2, 4] and stamps == [10, 11, 14]


# ----------------------------------------------------------------- batching


def test_batches_split_on_gaps_and_are_made_once(conn: psycopg.Connection[Any]) -> None:
    rows = [("dev", OLD + timedelta(seconds=s), 60.17, 24.94)
            for s in (0, 10, 20, 1000, 1010, 5000)]
    now = datetime.now(UTC)
    rows += [("live", now - timedelta(seconds=s), 60.17, 24.94) for s in (20, 10)]
    traces.insert_points(conn, rows)
    settings = MatchSettings(gap_seconds=300, too_short_after_seconds=3600)
    first = batches.make_batches(conn, settings)
    assert (first.created, first.too_short) == (2, 1)
    assert first.waiting == 1  # the live device may still be driving
    again = batches.make_batches(conn, settings)
    assert (again.created, again.too_short, again.points) == (0, 0, 0)
    got = conn.execute("SELECT coordinate_count, status FROM processing_batches"
                       " ORDER BY start_time").fetchall()
    assert [(r["coordinate_count"], r["status"]) for r in got] == [
        (3, "pending"), (2, "pending"), (1, "too_short")]
    unbatched = conn.execute("SELECT count(*) AS n FROM gps_point_status WHERE batch_id IS NULL")
    assert unbatched.fetchone()["n"] == 2


def test_a_lone_point_before_a_trace_is_closed_not_left_behind(
        conn: psycopg.Connection[Any]) -> None:
    # It waited for company while the trace after it became a batch; no later pass looked
    # before that batch again, status did not count the point and prune deleted it.
    now = datetime.now(UTC)
    traces.insert_points(conn, [("lone", now - timedelta(minutes=30), 60.17, 24.94)] + [
        ("lone", now - timedelta(minutes=20, seconds=-5 * i), 60.17, 24.94) for i in range(20)])
    settings = MatchSettings(gap_seconds=300, too_short_after_seconds=3600)
    made = batches.make_batches(conn, settings)
    assert (made.created, made.too_short) == (1, 1)
    unbatched = conn.execute("SELECT count(*) AS n FROM gps_point_status WHERE batch_id IS NULL")
    assert unbatched.fetchone()["n"] == 0
    section = batches.status_section(conn)
    assert section["unprocessed_points"] == 20  # the trace, pending
    # Closed, and never matched: status counts it, which it did not (a tracker reporting
    # less often than gap_seconds made every point such a batch, in silence).
    assert section["too_short_last_hour"] == 1
    assert "1 of a point alone, not matched ([match] gap_seconds below the trackers' " \
        "interval?)" in status_command._gps(section, datetime.now(UTC))


def test_a_point_dated_ahead_does_not_close_the_live_run(conn: psycopg.Connection[Any]) -> None:
    # One point from a device clock's glitch, a year ahead, was a later segment: the live run
    # was closed at once, and so was every run after it, pass by pass, until that time came.
    now = datetime.now(UTC)
    traces.insert_points(conn, [("dev", now - timedelta(seconds=s), 60.17, 24.94)
                                for s in (40, 30, 20, 10)]
                         + [("dev", now + timedelta(days=365), 60.17, 24.94)])
    settings = MatchSettings(gap_seconds=300, too_short_after_seconds=0)
    made = batches.make_batches(conn, settings)
    assert (made.created, made.too_short, made.waiting) == (0, 0, 1)  # the live run waits
    assert list(made.future) == ["dev"] and made.future["dev"][0] == 1
    assert "'dev' (1 point(s), up to " in batches.future_text(made.future)
    assert batches.plan(conn, settings)["future_points"] == 1
    assert batches.status_section(conn)["unbatched_points"] == 5  # counted, not lost


def test_a_point_dated_ahead_is_batched_once_its_time_has_come(
        conn: psycopg.Connection[Any]) -> None:
    now = datetime.now(UTC)
    traces.insert_points(conn, [("dev", now - timedelta(seconds=60 - i), 60.17, 24.94)
                                for i in range(5)]
                         + [("dev", now + timedelta(seconds=4), 60.17, 24.94)])
    settings = MatchSettings(gap_seconds=1, too_short_after_seconds=0)
    first = batches.make_batches(conn, settings)
    assert (first.created, list(first.future)) == (1, ["dev"])  # the cursor moves on
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the device waits: later passes look again
        time.sleep(0.5)
        if batches.make_batches(conn, settings).too_short:
            break
    statuses = conn.execute("SELECT coordinate_count AS n, status FROM processing_batches"
                            " ORDER BY start_time").fetchall()
    assert [(r["n"], r["status"]) for r in statuses] == [(5, "pending"), (1, "too_short")]


def test_a_claim_locks_only_the_partitions_of_its_batch(conn: psycopg.Connection[Any]) -> None:
    # The claim read the points through a join, so every partition stayed in its plan: eight
    # workers claiming at once over 500 daily partitions ran out of the lock table ("out of
    # shared memory") on every run, and nothing was matched again.
    days = [OLD - timedelta(days=d) for d in range(40)]
    partitions.ensure(conn, [d.date() for d in days])
    traces.insert_points(conn, [("d", day + timedelta(seconds=s), 60.17, 24.94)
                                for day in days for s in (0, 10)])
    batches.make_batches(conn, MatchSettings())
    token = "00000000-0000-0000-0000-000000000001"
    with conn.transaction():
        row = conn.execute(db.query("match_gps", "claim_batch"), {
            "worker": "w:1", "token": token, "lease_seconds": 60}).fetchone()
        assert row is not None
        points = conn.execute(db.query("match_gps", "claim_points"), {**row, "token": token},
                              prepare=False).fetchone()
        assert points["leased"] and len(points["times"]) == 2
        locked = conn.execute(
            "SELECT count(*) AS n FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " WHERE l.pid = pg_backend_pid() AND c.relname LIKE 'gps_points_p%%'").fetchone()
    assert locked["n"] <= 3  # the batch's day: the partition and its indexes


def test_long_runs_are_cut_at_max_batch_seconds(conn: psycopg.Connection[Any]) -> None:
    traces.insert_points(conn, [("d", OLD + timedelta(seconds=s), 60.17, 24.94)
                                for s in range(0, 1000, 20)])
    made = batches.make_batches(conn, MatchSettings(max_batch_seconds=300))
    assert made.created == 4
    spans = conn.execute("SELECT max(end_time - start_time) AS span FROM processing_batches")
    assert spans.fetchone()["span"] < timedelta(seconds=300)


def test_old_points_are_batched_too(conn: psycopg.Connection[Any]) -> None:
    """No 24-hour cut-off."""
    old = datetime(2019, 1, 1, tzinfo=UTC)
    traces.insert_points(conn, [("d", old + timedelta(seconds=s), 60.17, 24.94)
                                for s in (0, 5)])
    assert batches.make_batches(conn, MatchSettings()).created == 1


def test_duplicate_inserts_are_ignored(conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude)"
                 " VALUES ('d', %s, 60.17, 24.94)", (OLD,))
    conn.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude)"
                 " VALUES ('d', %s, 60.18, 24.95)", (OLD,))
    row = conn.execute("SELECT count(*) AS n, min(latitude) AS lat, bool_or(processed) AS p,"
                       " min(source) AS src FROM gps_point_status").fetchone()
    assert (row["n"], row["lat"], row["p"], row["src"]) == (1, 60.17, False, "listener")


# ----------------------------------------------------------------- matching


def test_350_point_trace_is_chunked_and_matches(conn: psycopg.Connection[Any], osrm_url: str,
                                                database_url: str, client: OsrmClient,
                                                proxy: CountingHttpProxy) -> None:
    with OsrmClient(osrm_url) as plain:
        trace = traces.make_trace(plain, random.Random(3), min_points=350,
                                  interval_s=(1.0, 1.0), waypoints=3)
    assert len(trace.points) >= 350
    add_trace(conn, "long", trace)
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    assert record.counts["batches_completed"] == 1
    assert proxy.count("/match/") >= 4  # default server limit: 100 points per request
    assert traces.judge(trace.truth, polylines(conn, "long")).passed
    row = conn.execute("SELECT status, osrm_calls, matched_count, coordinate_count"
                       " FROM processing_batches").fetchone()
    assert row["status"] == "completed" and row["osrm_calls"] >= 4
    assert row["matched_count"] >= 0.7 * row["coordinate_count"]  # OSRM skips some points
    left = conn.execute("SELECT count(*) AS n FROM gps_point_status WHERE NOT processed").fetchone()
    assert left["n"] == 0


def test_quality_matches_whole_trace_answer(conn: psycopg.Connection[Any], database_url: str,
                                            client: OsrmClient, services: LocalServices,
                                            trace_pool: list[traces.Trace]) -> None:
    """The pipeline on a 100-point server passes at least as many traces as OSRM's own answer
    on each whole trace from a server with a large --max-matching-size, and >= 95 %."""
    big_url = services.osrm(max_matching_size=5000)
    for i, trace in enumerate(trace_pool):
        add_trace(conn, f"q{i}", trace)
    record = run(database_url, client)
    assert record.counts["batches_completed"] == len(trace_pool)
    pipeline_pass = whole_pass = 0
    with OsrmClient(big_url) as big:
        for i, trace in enumerate(trace_pool):
            pipeline_pass += traces.judge(trace.truth, polylines(conn, f"q{i}")).passed
            kept, stamps = stitching.integer_timestamps(trace.offsets)
            whole = big.match([trace.points[k] for k in kept],
                              [1714550400 + s for s in stamps], MatchSettings().radius_m)
            whole_pass += traces.judge(trace.truth, [m.geometry for m in whole.matchings]).passed
    assert pipeline_pass >= whole_pass
    assert pipeline_pass >= 0.95 * len(trace_pool)
    assert sum(len(t.points) > 100 for t in trace_pool) >= 3  # chunking was exercised


def test_a_server_capped_at_3_points_per_match_is_adapted_to(
        conn: psycopg.Connection[Any], database_url: str, services: LocalServices,
        trace_pool: list[traces.Trace]) -> None:
    """osrm-routed --max-matching-size 3 (its smallest; public servers cap requests too)
    answers TooBig to the default 100-point chunks: the chunk size shrinks to 3 and every
    trace is still matched, its points processed once."""
    for i, trace in enumerate(trace_pool[:4]):
        add_trace(conn, f"s{i}", trace)
    with OsrmClient(services.osrm(max_matching_size=3), retries=1) as small:
        record = run(database_url, small)
    assert record.exit_code == 0, record.error
    assert record.extra["chunk_size"] == 3 and record.counts["chunk_errors"]["TooBig"] >= 1
    assert batch_states(conn) == {"completed": 4}
    assert all(traces.judge(trace.truth, polylines(conn, f"s{i}")).passed
               for i, trace in enumerate(trace_pool[:4]))
    assert_all_processed(conn)


def test_no_segment_chunk_is_recorded_not_fatal(conn: psycopg.Connection[Any],
                                                database_url: str, client: OsrmClient) -> None:
    far = [("nowhere", OLD + timedelta(seconds=5 * i), 61.5 + i * 1e-4, 26.0)
           for i in range(5)]
    traces.insert_points(conn, far)
    record = run(database_url, client)
    assert record.exit_code == 0
    row = conn.execute("SELECT status, chunk_errors, error_message, matched_count"
                       " FROM processing_batches").fetchone()
    assert row["status"] == "completed" and row["chunk_errors"] == {"NoSegment": 1}
    assert row["matched_count"] == 0 and "NoSegment" in row["error_message"]
    assert "outside the map" in row["error_message"]
    assert "swapped" not in row["error_message"]
    assert record.counts["chunk_errors"] == {"NoSegment": 1}


def test_a_device_with_latitude_and_longitude_swapped_is_named(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        trace_pool: list[traces.Trace]) -> None:
    """A tracker that writes longitude first (every point at lat 24.9, lon 60.1: a valid place
    in the Indian Ocean) matches nothing; the batch's note says the points look swapped, where
    `pipeline batches list` shows it, not only NoSegment."""
    trace = trace_pool[5]
    trace.start = OLD
    traces.insert_points(conn, [(d, t, lon, lat) for d, t, lat, lon in trace.rows("swapped")])
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    row = conn.execute("SELECT status, matched_count, error_message FROM processing_batches"
                       ).fetchone()
    assert row["status"] == "completed" and row["matched_count"] == 0
    assert "NoSegment" in row["error_message"]
    assert "latitude and longitude swapped" in row["error_message"]
    assert conn.execute("SELECT count(*) AS n FROM cached_polylines").fetchone()["n"] == 0
    # `pipeline status` counts it apart from the batches that drew lines.
    section = batches.status_section(conn)
    assert (section["completed_last_hour"], section["unmatched_last_hour"]) == (1, 1)
    assert "1 matched nothing" in status_command._gps(section, datetime.now(UTC))


def test_sql_injection_device_ids_are_literal(conn: psycopg.Connection[Any], database_url: str,
                                              client: OsrmClient,
                                              trace_pool: list[traces.Trace]) -> None:
    evil = ["x'); DROP TABLE gps_points; --", "'; UPDATE processing_batches SET status='dead"]
    for device, trace in zip(evil, trace_pool, strict=False):
        add_trace(conn, device, trace)
    record = run(database_url, client)
    assert record.counts["batches_completed"] == 2
    stored = {r["device_id"] for r in conn.execute("SELECT device_id FROM cached_polylines")}
    assert stored == set(evil)
    assert batch_states(conn) == {"completed": 2}


# ----------------------------------------------------------------- failures and leases


def test_osrm_down_then_back(conn: psycopg.Connection[Any], database_url: str,
                             client: OsrmClient, proxy: CountingHttpProxy,
                             trace_pool: list[traces.Trace]) -> None:
    for i, trace in enumerate(trace_pool[:3]):
        add_trace(conn, f"d{i}", trace)
    points = conn.execute("SELECT count(*) AS n FROM gps_points").fetchone()["n"]
    settings = MatchSettings(backoff_base_seconds=0.5, backoff_max_seconds=1.0)
    proxy.block()
    down = run(database_url, client, settings, concurrency=2)
    assert down.exit_code == 1 and "unavailable" in (down.error or "")
    assert down.counts["batches_failed"] >= 2
    rows = conn.execute("SELECT status, retry_count, next_attempt_at > now() AS later,"
                        " error_message, osrm_calls FROM processing_batches"
                        " WHERE status = 'failed'").fetchall()
    assert rows and all(r["retry_count"] == 1 and r["later"] for r in rows)
    assert all(r["osrm_calls"] == 1 for r in rows)  # the first chunk's request, which failed
    assert all("unavailable" in r["error_message"] for r in rows)
    left = conn.execute("SELECT count(*) AS n FROM gps_point_status WHERE NOT processed").fetchone()
    assert left["n"] == points  # nothing lost
    assert conn.execute("SELECT count(*) AS n FROM cached_polylines").fetchone()["n"] == 0
    proxy.unblock()
    time.sleep(1.1)
    back = run(database_url, client, settings)
    assert back.exit_code == 0, back.error
    assert batch_states(conn) == {"completed": 3}
    left = conn.execute("SELECT count(*) AS n FROM gps_point_status WHERE NOT processed").fetchone()
    assert left["n"] == 0


def test_a_run_whose_every_batch_failed_is_no_success(
        conn: psycopg.Connection[Any], database_url: str, proxy: CountingHttpProxy,
        trace_pool: list[traces.Trace]) -> None:
    """An OSRM error that is the batch's (InvalidValue, here to every request) is no outage,
    and a run that matched nothing is no success: exit 1, every batch failed."""
    for i, trace in enumerate(trace_pool[:2]):
        add_trace(conn, f"d{i}", trace)
    settings = MatchSettings(max_attempts=2, backoff_base_seconds=4.0,
                             backoff_max_seconds=4.0)  # no second attempt within a run
    proxy.answer(400, '{"code": "InvalidValue", "message": "Timestamps are not monotonic"}',
                 "application/json")
    with OsrmClient(proxy.url, retries=1) as wrong:
        first = run(database_url, wrong, settings)
        assert first.exit_code == 1 and first.counts["batches_failed"] == 2, first.error
        assert "answered InvalidValue" in (first.error or ""), first.error
        assert (first.error or "").endswith("; 2 batch(es) failed and will be retried")
        time.sleep(4.1)
        last = run(database_url, wrong, settings)
    assert last.exit_code == 1 and last.counts["batches_dead"] == 2
    assert (last.error or "").endswith("; 2 batch(es) failed for the last time ([match] "
                                       "max_attempts; `pipeline batches requeue` retries them)")
    assert batch_states(conn) == {"dead": 2}


def test_a_server_radius_cap_below_radius_m_stops_the_run_naming_both_settings(
        conn: psycopg.Connection[Any], database_url: str, services: LocalServices,
        trace_pool: list[traces.Trace]) -> None:
    """osrm-routed --max-matching-radius 3 answers TooBig to the 5 m radiuses: not a chunk
    too large (shrinking it would not help), so the run stops at once with exit 78 and a
    line naming the option and [match] radius_m; once radius_m fits, the batches match."""
    capped = services.osrm(max_matching_radius=3)
    for i, trace in enumerate(trace_pool[:6]):
        add_trace(conn, f"r{i}", trace)
    settings = MatchSettings(concurrency=1, backoff_base_seconds=0.0, backoff_max_seconds=0.0)
    with CountingHttpProxy(capped) as proxy, OsrmClient(proxy.url, retries=1) as client:
        first = run(database_url, client, settings)
        error = first.error or ""
        assert first.exit_code == EXIT_CONFIG, error
        assert "--max-matching-radius" in error and "[match] radius_m" in error, error
        assert "\n" not in error
        assert proxy.count("/match/") <= 2  # one per worker: no shrinking, no more batches
        states = batch_states(conn)
        assert states.get("failed", 0) <= 2 and states["pending"] >= 4, states
        assert reliability.check_gps(conn) == []
        last = run(database_url, client, replace(settings, radius_m=3.0))
    assert last.exit_code == 0, last.error
    assert batch_states(conn) == {"completed": 6}
    assert_all_processed(conn)


def claimable_batches(conn: psycopg.Connection[Any], trace_pool: list[traces.Trace],
                      n: int) -> list[tuple[Any, ...]]:
    """``n`` batches ready to be claimed, the first one failed once already; their
    (batch_id, status, retry_count, next_attempt_at) in batch order."""
    for i, trace in enumerate(trace_pool[:n]):
        add_trace(conn, f"c{i}", trace)
    assert batches.make_batches(conn, MatchSettings()).created == n
    conn.execute("UPDATE processing_batches SET status = 'failed', retry_count = 1,"
                 " next_attempt_at = now() - interval '1 minute', error_message = 'earlier'"
                 " WHERE batch_id = (SELECT batch_id FROM processing_batches"
                 " ORDER BY start_time, device_id LIMIT 1)")
    return batch_rows(conn)


def batch_rows(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    rows = conn.execute("SELECT batch_id, status, retry_count, next_attempt_at, error_message"
                        " FROM processing_batches ORDER BY start_time, device_id").fetchall()
    return [tuple(r.values()) for r in rows]


def assert_given_back(conn: psycopg.Connection[Any], before: list[tuple[Any, ...]]) -> None:
    """Every batch as it was before the run: no attempt counted, none left processing, and
    every point still waiting to be matched."""
    assert batch_rows(conn) == before
    assert reliability.check_gps(conn) == []
    assert conn.execute("SELECT count(*) AS n FROM cached_polylines").fetchone()["n"] == 0
    left = conn.execute("SELECT count(*) FILTER (WHERE NOT processed) AS n, count(*) AS total"
                        " FROM gps_point_status").fetchone()
    assert left["n"] == left["total"] > 0


@pytest.mark.parametrize("suffix", ["/wrong/path", "/route", "/osrm/match/v1/driving"])
def test_a_wrong_osrm_url_path_stops_the_run_and_gives_the_batches_back(
        conn: psycopg.Connection[Any], database_url: str, osrm_url: str,
        trace_pool: list[traces.Trace], suffix: str) -> None:
    """osrm-routed answers 400 InvalidUrl/InvalidService/InvalidVersion to every request under
    a wrong [osrm] url path: a setting, not the batches' fault. The run stops with exit 78 and
    one line naming the URL and the setting; no batch counts an attempt."""
    before = claimable_batches(conn, trace_pool, 4)
    with OsrmClient(f"{osrm_url}{suffix}", retries=1) as wrong:
        record = run(database_url, wrong, MatchSettings(concurrency=2))
    error = record.error or ""
    assert record.exit_code == EXIT_CONFIG, error
    assert "\n" not in error
    assert f"OSRM {osrm_url}{suffix} answered Invalid" in error, error
    assert "check the path in [osrm] url" in error, error
    assert "given back untouched (no attempt counted)" in error, error
    assert record.counts["batches_failed"] == record.counts["batches_dead"] == 0
    assert_given_back(conn, before)


@pytest.mark.parametrize(("status", "body", "content_type", "said"), [
    (404, "<html><body><h1>404 Not Found</h1></body></html>", "text/html",
     "answered HTTP 404 with a non-JSON body (text/html)"),
    (401, "", "", "answered HTTP 401 with a non-JSON body (empty)"),
    (403, "<html>Forbidden</html>", "text/html; charset=utf-8",
     "answered HTTP 403 with a non-JSON body (text/html)"),
    (405, '{"error": "method not allowed"}', "application/json",
     "answered HTTP 405 (method not allowed)"),
])
def test_a_proxy_that_does_not_serve_the_url_stops_the_run(
        conn: psycopg.Connection[Any], database_url: str, proxy: CountingHttpProxy,
        trace_pool: list[traces.Trace], status: int, body: str, content_type: str,
        said: str) -> None:
    """A reverse proxy's 404/401/403/405 to every request (an HTML page, an empty body) is
    [osrm] url, not an outage and not the batches' fault."""
    before = claimable_batches(conn, trace_pool, 3)
    proxy.answer(status, body, content_type)
    with OsrmClient(f"{proxy.url}/osrm", retries=2) as wrong:
        record = run(database_url, wrong, MatchSettings(concurrency=1))
    error = record.error or ""
    assert record.exit_code == EXIT_CONFIG, error
    assert "\n" not in error
    assert error.startswith(f"stopped: OSRM {proxy.url}/osrm {said}"), error
    assert "check the path in [osrm] url" in error, error
    assert proxy.count("/") <= 2  # one per worker: not retried, no other batch sent
    assert_given_back(conn, before)


@pytest.mark.parametrize(("status", "body"), [
    (200, "<html><head><title>Welcome to nginx!</title></head><body>It works</body></html>"),
    (400, "<html><head><title>400 Request Header Or Cookie Too Large</title></head></html>"),
])
def test_a_web_page_in_place_of_osrm_stops_the_run(
        conn: psycopg.Connection[Any], database_url: str, proxy: CountingHttpProxy,
        trace_pool: list[traces.Trace], status: int, body: str) -> None:
    """osrm-routed answers JSON to every request: an HTML page, even with 200 (a web server's
    own page at [osrm] url) or 400 (nginx's header limit), comes from something else, for
    every batch alike. It counted an attempt of every batch claimed, run after run."""
    before = claimable_batches(conn, trace_pool, 3)
    proxy.answer(status, body)
    with OsrmClient(proxy.url, retries=2) as wrong:
        record = run(database_url, wrong, MatchSettings(concurrency=1))
    error = record.error or ""
    assert record.exit_code == EXIT_CONFIG, error
    assert "\n" not in error
    title = body.split("<title>")[1].split("</title>")[0]
    assert f"answered HTTP {status} with a non-JSON body (text/html) reading {title!r}" in \
        error, error
    assert "check that [osrm] url reaches osrm-routed" in error, error
    assert_given_back(conn, before)


def test_a_proxy_prefix_missing_from_the_url_stops_the_run(
        conn: psycopg.Connection[Any], database_url: str, osrm_url: str,
        trace_pool: list[traces.Trace]) -> None:
    """osrm-routed behind a reverse proxy under /osrm/, [osrm] url without the prefix."""
    before = claimable_batches(conn, trace_pool, 3)
    with CountingHttpProxy(osrm_url, prefix="/osrm") as prefixed, \
            OsrmClient(prefixed.url, retries=1) as wrong:
        record = run(database_url, wrong, MatchSettings(concurrency=2))
        error = record.error or ""
        assert record.exit_code == EXIT_CONFIG, error
        assert f"OSRM {prefixed.url} answered HTTP 404 with a non-JSON body (text/html)" \
            in error, error
        assert_given_back(conn, before)
        with OsrmClient(f"{prefixed.url}/osrm", retries=1) as right:
            assert run(database_url, right).exit_code == 0
    assert_all_processed(conn)


@pytest.mark.parametrize("status", [413, 414, 431])
def test_a_request_too_large_for_the_server_stops_the_run_naming_chunk_size(
        conn: psycopg.Connection[Any], database_url: str, proxy: CountingHttpProxy,
        trace_pool: list[traces.Trace], status: int) -> None:
    """A server or proxy limit on the request's size (nginx's large_client_header_buffers:
    414; 431 headers; 413 body) is neither an outage nor a batch's fault."""
    before = claimable_batches(conn, trace_pool, 3)
    proxy.answer(status, "<html>too large</html>")
    with OsrmClient(proxy.url, retries=3, retry_wait_max=0.05) as client:
        record = run(database_url, client, MatchSettings(concurrency=1))
    error = record.error or ""
    assert record.exit_code == EXIT_CONFIG, error
    assert "\n" not in error
    assert error.startswith(f"stopped: OSRM {proxy.url} refuses a "), error
    assert f"-byte request: HTTP {status} " in error, error
    assert "--max-header-size" in error and "[match] chunk_size" in error, error
    assert proxy.count("/") <= 2  # one per worker: not retried, no other batch sent
    assert_given_back(conn, before)


def test_a_request_past_osrm_routed_max_header_size_stops_the_run_naming_chunk_size(
        conn: psycopg.Connection[Any], database_url: str, services: LocalServices,
        trace_pool: list[traces.Trace]) -> None:
    """osrm-routed --max-header-size closes the connection without an answer to a longer
    request: that read as an outage (retried, then every batch failed with an attempt
    counted, exit 1). A short request still answered, so it is the request's size: exit 78,
    naming the option and [match] chunk_size; with a chunk size that fits, the batches match."""
    small = services.osrm(max_header_size=900)
    before = claimable_batches(conn, trace_pool, 3)
    with OsrmClient(small, retries=2, retry_wait_max=0.05) as client:
        record = run(database_url, client, MatchSettings(concurrency=1))
        error = record.error or ""
        assert record.exit_code == EXIT_CONFIG, error
        assert "\n" not in error
        assert error.startswith(f"stopped: OSRM {small} closed the connection without "
                                "answering a "), error
        assert "--max-header-size" in error and "[match] chunk_size" in error, error
        assert_given_back(conn, before)
        fits = run(database_url, client, MatchSettings(chunk_size=12, chunk_overlap=3))
    assert fits.exit_code == 0, fits.error
    assert_all_processed(conn)


def test_failures_become_dead_after_max_attempts_and_requeue(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        proxy: CountingHttpProxy, trace_pool: list[traces.Trace]) -> None:
    add_trace(conn, "d", trace_pool[0])
    settings = MatchSettings(max_attempts=2, backoff_base_seconds=0.0,
                             backoff_max_seconds=0.0)
    proxy.block()
    run(database_url, client, settings)
    assert batch_states(conn) == {"dead": 1}
    section = batches.status_section(conn)
    assert section["dead_batches"] == 1 and section["unprocessed_points"] > 0
    assert section["oldest_unprocessed_age_s"] > 0
    proxy.unblock()
    assert run(database_url, client, settings).status == "noop"  # dead stays dead
    assert batches.requeue_batches(conn, dead_only=True)["requeued"] == 1
    row = conn.execute("SELECT status, retry_count FROM processing_batches").fetchone()
    assert (row["status"], row["retry_count"]) == ("pending", 0)
    assert run(database_url, client, settings).counts["batches_completed"] == 1
    section = batches.status_section(conn)
    assert section["unprocessed_points"] == 0 and section["batches"]["dead"] == 0
    assert section["completed_last_hour"] == 1


def test_a_batch_that_dies_fails_the_run_though_others_completed(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        proxy: CountingHttpProxy, trace_pool: list[traces.Trace]) -> None:
    """A batch that will be retried leaves a run's exit 0; one that failed for the last time
    (dead: its points wait for `batches requeue`) exits 1, even beside completed batches."""
    add_trace(conn, "bad", trace_pool[0])
    add_trace(conn, "good", trace_pool[1])
    proxy.refuse("polyline6(" + polyline.encode(trace_pool[0].points[:1], 6))
    settings = MatchSettings(max_attempts=2, backoff_base_seconds=2.0,
                             backoff_max_seconds=2.0)  # no second attempt within a run
    first = run(database_url, client, settings)
    assert first.exit_code == 0, first.error
    assert (first.counts["batches_completed"], first.counts["batches_failed"]) == (1, 1)
    assert (first.message or "").endswith("; 1 failed, 0 dead")
    add_trace(conn, "later", trace_pool[2])
    time.sleep(2.1)
    last = run(database_url, client, settings)
    assert last.exit_code == 1, last.message
    assert (last.counts["batches_completed"], last.counts["batches_dead"]) == (1, 1)
    error = last.error or ""
    assert error.startswith("1 batch(es) completed; last error: OSRM "), error
    assert "unavailable" in error and "\n" not in error
    assert error.endswith("; 1 batch(es) failed for the last time ([match] max_attempts; "
                          "`pipeline batches requeue` retries them)")
    assert batch_states(conn) == {"completed": 2, "dead": 1}


def test_expired_lease_is_rescued_without_duplicates(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        trace_pool: list[traces.Trace]) -> None:
    add_trace(conn, "d", trace_pool[1])
    batches.make_batches(conn, MatchSettings())
    # A worker claims the batch with a 1-second lease and dies.
    dead = conn.execute(db.query("match_gps", "claim_batch"), {
        "worker": "ghost:1", "token": "00000000-0000-0000-0000-000000000001",
        "lease_seconds": 1}).fetchone()
    assert dead is not None
    assert run(database_url, client).status == "noop"  # leased: nobody else touches it
    time.sleep(1.2)
    assert batches.status_section(conn)["expired_leases"] == 1
    record = run(database_url, client)
    assert record.counts["leases_rescued"] == 1 and record.counts["batches_completed"] == 1
    row = conn.execute("SELECT status, retry_count, polyline_count FROM processing_batches"
                       ).fetchone()
    assert (row["status"], row["retry_count"]) == ("completed", 1)
    n = conn.execute("SELECT count(*) AS n FROM cached_polylines").fetchone()["n"]
    assert n == row["polyline_count"] >= 1
    # The ghost wakes up and tries to complete with its stale token: nothing is written.
    late = conn.execute(db.query("match_gps", "fail_batch"), {
        "batch_id": dead["batch_id"], "token": "00000000-0000-0000-0000-000000000001",
        "max_attempts": 5, "delay_seconds": 0, "error": "x", "osrm_calls": 0}).fetchone()
    assert late is None


def test_max_batches_limits_claims(conn: psycopg.Connection[Any], database_url: str,
                                   client: OsrmClient, trace_pool: list[traces.Trace]) -> None:
    for i, trace in enumerate(trace_pool[:4]):
        add_trace(conn, f"m{i}", trace)
    record = run(database_url, client, max_batches=2, concurrency=1)
    assert record.counts["batches_completed"] == 2
    assert batch_states(conn) == {"completed": 2, "pending": 2}
    assert record.extra["points_per_second"] > 0
    assert record.counts["osrm_requests"] >= 2


# ----------------------------------------------------------------- append-only, late points


def point_versions(conn: psycopg.Connection[Any]) -> dict[tuple[str, datetime], str]:
    return {(r["device_id"], r["recorded_at"]): r["v"] for r in conn.execute(
        "SELECT device_id, recorded_at, tableoid::regclass::text || ctid::text"
        " || xmin::text AS v FROM gps_points")}


def point_updates(conn: psycopg.Connection[Any]) -> int:
    """Row updates of gps_points' partitions, once the sessions of finished runs are gone
    (a backend flushes its statistics when it exits)."""
    for _ in range(100):
        busy = conn.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE datname ="
                            " current_database() AND pid <> pg_backend_pid()").fetchone()
        if busy["n"] == 0:
            break
        time.sleep(0.1)
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute("SELECT coalesce(sum(n_tup_upd), 0)::bigint AS n FROM pg_stat_user_tables"
                       " WHERE relname LIKE 'gps_points%'").fetchone()
    return int(row["n"])


def test_matching_writes_no_point_row(conn: psycopg.Connection[Any], database_url: str,
                                      client: OsrmClient,
                                      trace_pool: list[traces.Trace]) -> None:
    for i, trace in enumerate(trace_pool[:4]):
        add_trace(conn, f"d{i}", trace)
    partitions.ensure(conn)  # out of the default partition before the versions are taken
    before, updates = point_versions(conn), point_updates(conn)
    record = run(database_url, client)
    assert record.counts["batches_completed"] == 4
    assert point_versions(conn) == before  # same row versions: nothing updated or moved
    assert point_updates(conn) == updates == 0
    assert conn.execute("SELECT bool_and(processed) AS p FROM gps_point_status"
                        ).fetchone()["p"] is True


def test_late_points_are_matched_and_replace_their_window(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        trace_pool: list[traces.Trace]) -> None:
    """Late points inside a matched batch send it back to be matched again (its polylines
    replaced); late points between two batches get a batch of their own; every point ends
    in exactly one finished batch."""
    first, middle, last = trace_pool[3], trace_pool[4], trace_pool[5]
    first.start, middle.start, last.start = OLD, OLD + timedelta(hours=1), \
        OLD + timedelta(hours=2)
    rows = first.rows("d")
    held = rows[5::7]  # these arrive after their window was matched
    traces.insert_points(conn, [r for r in rows if r not in held] + last.rows("d"))
    assert run(database_url, client).counts["batches_completed"] == 2
    matched_before = conn.execute("SELECT batch_id, processing_completed_at FROM"
                                  " processing_batches ORDER BY start_time").fetchall()
    traces.insert_points(conn, held + middle.rows("d"))
    section = batches.status_section(conn)
    assert section["unprocessed_points"] == len(held) + len(middle.points)
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    assert record.counts["batches_completed"] == 2  # the reopened window and the gap
    assert batch_states(conn) == {"completed": 3}
    again = {r["batch_id"]: r["processing_completed_at"] for r in conn.execute(
        "SELECT batch_id, processing_completed_at FROM processing_batches")}
    assert again[matched_before[0]["batch_id"]] > matched_before[0]["processing_completed_at"]
    assert again[matched_before[1]["batch_id"]] == matched_before[1]["processing_completed_at"]
    assert batches.status_section(conn)["unprocessed_points"] == 0
    per_point = conn.execute("SELECT count(*) FILTER (WHERE NOT processed) AS left,"
                             " count(*) AS n FROM gps_point_status").fetchone()
    assert per_point == {"left": 0, "n": len(rows) + len(middle.points) + len(last.points)}
    assert reliability.check_gps(conn) == []
    window = [polyline.decode(r["encoded_polyline"]) for r in conn.execute(
        "SELECT encoded_polyline FROM cached_polylines WHERE start_time < %s"
        " ORDER BY start_time", (OLD + timedelta(hours=1),))]
    assert traces.judge(first.truth, window).passed


def test_late_point_takes_a_running_batch_back(conn: psycopg.Connection[Any],
                                               database_url: str, client: OsrmClient,
                                               trace_pool: list[traces.Trace]) -> None:
    rows = trace_pool[6].rows("d")
    traces.insert_points(conn, rows[:-3] + rows[-2:])
    batches.make_batches(conn, MatchSettings())
    ghost = conn.execute(db.query("match_gps", "claim_batch"), {
        "worker": "ghost:1", "token": "00000000-0000-0000-0000-000000000001",
        "lease_seconds": 300}).fetchone()
    traces.insert_points(conn, [rows[-3]])  # arrives while the ghost matches without it
    made = batches.make_batches(conn, MatchSettings())
    assert made.reopened == 1 and made.created == 0
    row = conn.execute("SELECT status, coordinate_count, lease_token FROM processing_batches"
                       ).fetchone()
    assert (row["status"], row["coordinate_count"], row["lease_token"]) == (
        "pending", len(rows), None)
    done = conn.execute(db.query("match_gps", "fail_batch"), {
        "batch_id": ghost["batch_id"], "token": "00000000-0000-0000-0000-000000000001",
        "max_attempts": 5, "delay_seconds": 0, "error": "x", "osrm_calls": 0}).fetchone()
    assert done is None  # the ghost's lease is gone
    assert run(database_url, client).counts["points_processed"] == len(rows)
    assert reliability.check_gps(conn) == []


def test_points_without_a_partition_wait_in_the_default_one(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        trace_pool: list[traces.Trace]) -> None:
    add_trace(conn, "d", trace_pool[7], start=datetime(2021, 3, 4, 5, tzinfo=UTC))
    n = len(trace_pool[7].points)
    section = batches.status_section(conn)
    assert section["default_partition_points"] == n
    record = run(database_url, client)  # makes the day's partition and moves them in
    assert record.counts["points_processed"] == n
    assert batches.status_section(conn)["default_partition_points"] == 0
    where = conn.execute("SELECT tableoid::regclass::text AS part, count(*) AS n"
                         " FROM gps_points GROUP BY 1").fetchall()
    assert [(r["part"], r["n"]) for r in where] == [("gps_points_p20210304", n)]
    assert reliability.check_gps(conn) == []


def test_dry_run_reports_and_writes_nothing(conn: psycopg.Connection[Any], database_url: str,
                                            trace_pool: list[traces.Trace]) -> None:
    add_trace(conn, "a", trace_pool[0])
    add_trace(conn, "b", trace_pool[1])
    batches.make_batches(conn, MatchSettings())  # a and b: pending batches
    add_trace(conn, "c", trace_pool[2])  # c: points no batch holds yet
    tables = ("processing_batches", "gps_batching_cursor", "gps_waiting_devices",
              "stage_runs", "cached_polylines")

    def snapshot() -> list[Any]:
        query = sql.SQL("SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), ''))"
                        " AS h FROM {} t")
        return [conn.execute(query.format(sql.Identifier(name))).fetchone()["h"]
                for name in tables]

    before = snapshot()
    result = stage.preview(Database(database_url), MatchSettings())
    assert snapshot() == before
    assert result.counts["batches_to_make"] == 1
    assert result.counts["points_to_batch"] == len(trace_pool[2].points)
    assert result.counts["batches_ready"] == 2
    assert result.counts["points_ready"] == len(trace_pool[0].points) + len(
        trace_pool[1].points)
    assert {r["device_id"] for r in result.extra["ready_batches"]} == {"a", "b"}


# ----------------------------------------------------------------- what a run and a dry run report


def test_points_processed_counts_the_points_of_too_short_batches(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        trace_pool: list[traces.Trace]) -> None:
    """A lone point closed as too_short is processed (gps_point_status says so); the run's
    points_processed left it out."""
    add_trace(conn, "d", trace_pool[8])
    traces.insert_points(conn, [("lone", OLD, 60.17, 24.94)])
    record = run(database_url, client)
    assert record.counts["batches_too_short"] == 1 and record.counts["batches_completed"] == 1
    processed = conn.execute("SELECT count(*) FILTER (WHERE processed) AS n"
                             " FROM gps_point_status").fetchone()["n"]
    assert processed == len(trace_pool[8].points) + 1
    assert record.counts["points_processed"] == processed


@pytest.mark.parametrize("points", [30, 250])  # one OSRM request, and chunks
def test_a_parked_vehicle_completes_as_stationary(conn: psycopg.Connection[Any],
                                                  database_url: str, client: OsrmClient,
                                                  proxy: CountingHttpProxy,
                                                  points: int) -> None:
    """A parked vehicle sends the same place every 5 s (give or take a metre): its batch was
    sent to OSRM and completed with 'no matching: empty' or a polyline of one spot."""
    traces.insert_points(conn, [("parked", OLD + timedelta(seconds=5 * i),
                                 60.16990 + (i % 2) * 1e-5, 24.93840) for i in range(points)])
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    counts = record.counts
    assert (counts["batches_completed"], counts["batches_stationary"]) == (1, 1)
    assert (counts["points_processed"], counts["points_matched"]) == (points, 0)
    assert "chunk_errors" not in counts and proxy.count("/match/") == 0
    row = conn.execute("SELECT status, error_message, polyline_count, chunk_errors,"
                       " coordinate_count FROM processing_batches").fetchone()
    assert row["status"] == "completed" and row["polyline_count"] == 0
    assert row["chunk_errors"] == {} and row["coordinate_count"] == points
    assert row["error_message"] == (f"stationary: all {points} points within 5 m; "
                                    "nothing to match")
    assert conn.execute("SELECT count(*) AS n FROM cached_polylines").fetchone()["n"] == 0
    assert conn.execute("SELECT bool_and(processed) AS p FROM gps_point_status"
                        ).fetchone()["p"] is True
    assert run(database_url, client).status == "noop"  # nothing is retried


def test_dry_run_counts_the_batches_late_points_would_reopen(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        trace_pool: list[traces.Trace]) -> None:
    rows = trace_pool[9].rows("d")
    traces.insert_points(conn, rows[:10] + rows[11:])
    assert run(database_url, client).counts["batches_completed"] == 1
    traces.insert_points(conn, [rows[10]])  # late, inside the completed batch
    preview = stage.preview(Database(database_url), MatchSettings())
    assert preview.extra["would_run"] is True
    assert preview.counts["batches_to_reopen"] == 1
    assert "1 batch(es) to reopen" in preview.message
    assert batches.make_batches(conn, MatchSettings()).reopened == 1  # as the run would


def polyline_rows(conn: psycopg.Connection[Any], device: str) -> list[tuple[Any, ...]]:
    return [(r["start_time"], r["end_time"], r["encoded_polyline"]) for r in conn.execute(
        "SELECT start_time, end_time, encoded_polyline FROM cached_polylines"
        " WHERE device_id = %s ORDER BY start_time", (device,))]


@pytest.mark.parametrize("pruned", [True, False])
def test_late_points_after_prune_keep_the_batch_and_its_polylines(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        trace_pool: list[traces.Trace], pruned: bool) -> None:
    """A late point in a finished batch whose points prune deleted (the cutoff falls inside
    the batch: its older half is gone) must not send it back: a match of what is left would
    replace the polylines of the pruned half. The batch stays completed with its lines and
    reads the late point, which the next prune deletes. Without prune it is matched again."""
    trace = trace_pool[13]
    days = 3
    mid = len(trace.offsets) // 2
    trace.start = (datetime.now(UTC) - timedelta(days=days)
                   - timedelta(seconds=trace.offsets[mid]))
    rows = trace.rows("d")
    held = rows[3:mid - 10:6]  # before the cutoff; they arrive after the prune
    traces.insert_points(conn, [r for r in rows if r not in held])
    assert run(database_url, client).counts["batches_completed"] == 1
    before = polyline_rows(conn, "d")
    assert before
    batch = conn.execute("SELECT batch_id, processing_completed_at FROM processing_batches"
                         ).fetchone()
    database = Database(database_url)
    retention = RetentionSettings(gps_days=days, polyline_days=0, runs_days=0, datasets=0)

    def prune() -> RunRecord:
        return StageRunner(database).run(
            "prune", lambda ctx: prune_stage(database, None, retention, ctx))

    if pruned:
        gone = prune().counts["gps_points"]
        assert 0 < gone < len(rows) - len(held)  # the older half: the batch stays
    traces.insert_points(conn, held)
    preview = stage.preview(database, MatchSettings())
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    row = conn.execute("SELECT batch_id, status, error_message, processing_completed_at"
                       " FROM processing_batches").fetchone()
    assert (row["batch_id"], row["status"]) == (batch["batch_id"], "completed")
    assert batches.status_section(conn)["unprocessed_points"] == 0
    if not pruned:
        assert (preview.counts["batches_to_reopen"],
                preview.counts["batches_kept_after_prune"]) == (1, 0)
        assert record.counts["batches_completed"] == 1  # matched again, with the late points
        assert record.counts["batches_kept_after_prune"] == 0
        assert row["processing_completed_at"] > batch["processing_completed_at"]
        assert reliability.check_gps(conn) == []
        return
    assert polyline_rows(conn, "d") == before
    assert row["processing_completed_at"] == batch["processing_completed_at"]
    assert (preview.counts["batches_to_reopen"],
            preview.counts["batches_kept_after_prune"]) == (0, 1)
    assert record.counts["batches_completed"] == 0
    assert record.counts["batches_kept_after_prune"] == 1
    assert "1 batch(es) kept as matched" in record.message
    assert row["error_message"] == ("late points after prune: not matched again (the batch's"
                                    " other points are pruned)")
    assert run(database_url, client).status == "noop"  # nothing left to match
    # The late points are processed now: the next prune deletes them with their day's rest.
    assert prune().counts["gps_points"] >= len(held)  # (and any point the cutoff passed)
    assert conn.execute("SELECT count(*) AS n FROM gps_points WHERE recorded_at <= %s",
                        (held[-1][1],)).fetchone()["n"] == 0
    assert polyline_rows(conn, "d") == before


def test_late_points_after_their_batch_was_pruned_away_keep_its_polylines(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        trace_pool: list[traces.Trace]) -> None:
    """Once prune deleted all of a batch's points it deletes the batch too, so late points
    there get a batch of their own (as the start of a trip uploaded late). Matching it must
    not delete the polylines of the pruned batch that start inside its time range."""
    trace = trace_pool[14]
    days = 3
    trace.start = datetime.now(UTC) - timedelta(days=days, hours=1)
    rows = trace.rows("d")
    held = [rows[0], *rows[10:40:5]]  # the trip's start arrives after the prune
    traces.insert_points(conn, [r for r in rows if r not in held])
    assert run(database_url, client).counts["batches_completed"] == 1
    before = polyline_rows(conn, "d")
    assert before and before[0][0] < held[-1][1]
    database = Database(database_url)
    retention = RetentionSettings(gps_days=days, polyline_days=0, runs_days=0, datasets=0)
    pruned = StageRunner(database).run(
        "prune", lambda ctx: prune_stage(database, None, retention, ctx))
    assert pruned.counts["gps_batches"] == 1
    traces.insert_points(conn, held)
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    assert record.counts["batches_completed"] == 1  # the late points, on their own
    after = polyline_rows(conn, "d")
    assert set(before) <= set(after)
    assert batches.status_section(conn)["unprocessed_points"] == 0


def test_a_dead_batch_counts_the_points_that_arrive_late(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        proxy: CountingHttpProxy, trace_pool: list[traces.Trace]) -> None:
    rows = trace_pool[10].rows("d")
    traces.insert_points(conn, rows[:10] + rows[11:])
    settings = MatchSettings(max_attempts=1)
    proxy.block()
    assert run(database_url, client, settings).counts["batches_dead"] == 1
    traces.insert_points(conn, [rows[10]])  # late, inside the dead batch
    batches.make_batches(conn, settings)
    listed = batches.list_batches(conn, status="dead")
    assert [r["coordinate_count"] for r in listed] == [len(rows)]
    section = batches.status_section(conn)
    assert section["dead_points"] == section["unprocessed_points"] == len(rows)
    assert reliability.check_gps(conn) == []
    # Only a requeue can help a dead batch: a run would find nothing to do.
    assert stage.preview(Database(database_url), settings).extra["would_run"] is False
    proxy.unblock()
    assert batches.requeue_batches(conn, dead_only=True)["points"] == len(rows)


# ----------------------------------------------------------------- data as fleets send it


def listener_insert(conn: psycopg.Connection[Any],
                    rows: list[tuple[str, datetime, float, float]]) -> None:
    """The listener's plain INSERT, one row a statement (the duplicate rule applies)."""
    for row in rows:
        conn.execute("INSERT INTO gps_points (device_id, recorded_at, latitude, longitude)"
                     " VALUES (%s, %s, %s, %s)", row)


def assert_all_processed(conn: psycopg.Connection[Any], unprocessed: int = 0) -> None:
    """Every point in exactly one finished batch (or ``unprocessed`` waiting), and polylines
    that are lines: not empty, one per (device, start)."""
    assert reliability.check_gps(conn) == []
    left = conn.execute("SELECT count(*) FILTER (WHERE NOT processed) AS n"
                        " FROM gps_point_status").fetchone()["n"]
    assert left == batches.status_section(conn)["unprocessed_points"] == unprocessed
    lines = conn.execute("SELECT device_id, start_time, encoded_polyline FROM cached_polylines"
                         ).fetchall()
    assert len({(r["device_id"], r["start_time"]) for r in lines}) == len(lines)
    assert all(len(set(polyline.decode(r["encoded_polyline"]))) >= 2 for r in lines)


@pytest.mark.parametrize("seed", range(3))
def test_points_arriving_shuffled_across_runs_end_in_one_batch_each(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        trace_pool: list[traces.Trace], seed: int) -> None:
    """A device's drives (gaps of seconds to an hour between them) arrive in random order,
    in six parts with a run after each; one part comes in a listener transaction that stays
    open across all those runs."""
    rng = random.Random(seed)
    rows: list[tuple[str, datetime, float, float]] = []
    at = OLD
    for k in range(4):
        trace = trace_pool[(3 * seed + k) % len(trace_pool)]
        rows += [("d", at + timedelta(seconds=s), lat, lon)
                 for s, (lat, lon) in zip(trace.offsets, trace.points, strict=True)]
        at = rows[-1][1] + timedelta(seconds=rng.choice([2, 100, 400, 4000]))
    rng.shuffle(rows)
    cuts = sorted(rng.sample(range(1, len(rows)), 5))
    parts = [rows[a:b] for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True)]
    partitions.ensure(conn, [OLD.date(), at.date()])
    with psycopg.connect(database_url) as slow:
        listener_insert(slow, parts.pop())
        for part in parts:
            listener_insert(conn, part)
            assert run(database_url, client).exit_code == 0
    assert run(database_url, client).exit_code == 0
    assert_all_processed(conn)


def test_a_trace_across_midnight_is_one_batch_over_two_partitions(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        trace_pool: list[traces.Trace]) -> None:
    trace = trace_pool[5]
    midnight = datetime(2023, 11, 5, tzinfo=UTC)
    add_trace(conn, "night", trace, start=midnight - timedelta(seconds=trace.offsets[-1] / 2))
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    assert record.counts["points_processed"] == len(trace.points)
    assert batch_states(conn) == {"completed": 1}
    days = conn.execute("SELECT count(DISTINCT tableoid) AS n FROM gps_points").fetchone()["n"]
    assert days == 2
    assert traces.judge(trace.truth, polylines(conn, "night")).passed
    assert_all_processed(conn)


def test_a_stretch_outside_the_map_in_a_chunked_trace(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        osrm_url: str) -> None:
    """110 points in the middle of a 350-point trace lie outside the extract (a whole chunk
    answers NoSegment): the rest is still matched, in lines on either side."""
    with OsrmClient(osrm_url) as plain:
        trace = traces.make_trace(plain, random.Random(5), min_points=350,
                                  interval_s=(1.0, 1.0), waypoints=3)
    rows = trace.rows("d")
    rows[120:230] = [(d, t, 60.5 + i * 1e-4, 25.5) for i, (d, t, _, _) in
                     enumerate(rows[120:230])]
    traces.insert_points(conn, rows)
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    assert record.counts["points_processed"] == len(rows)
    row = conn.execute("SELECT matched_count, polyline_count FROM processing_batches"
                       ).fetchone()
    assert row["matched_count"] >= 0.7 * (len(rows) - 110) and row["polyline_count"] >= 2
    assert_all_processed(conn)


def test_20000_points_of_one_device_in_one_run(conn: psycopg.Connection[Any],
                                              database_url: str, client: OsrmClient,
                                              trace_pool: list[traces.Trace]) -> None:
    rows: list[tuple[str, datetime, float, float]] = []
    at, k = OLD, 0
    while len(rows) < 20_000:
        trace = trace_pool[k % len(trace_pool)]
        k += 1
        rows += [("big", at + timedelta(seconds=s), lat, lon)
                 for s, (lat, lon) in zip(trace.offsets, trace.points, strict=True)]
        at = rows[-1][1] + timedelta(seconds=2)
    traces.insert_points(conn, rows)
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    counts = record.counts
    assert counts["points_processed"] == len(rows)
    assert counts["batches_completed"] == counts["batches_created"] >= 5  # max_batch_seconds
    assert counts["polylines"] == conn.execute("SELECT count(*) AS n FROM cached_polylines"
                                               ).fetchone()["n"]
    assert counts["osrm_requests"] >= len(rows) // 100
    assert_all_processed(conn)


def test_osrm_too_slow_fails_batches_for_a_retry(conn: psycopg.Connection[Any],
                                                 database_url: str, osrm_url: str,
                                                 trace_pool: list[traces.Trace]) -> None:
    """OSRM answering after [osrm] timeout: every try times out, the batches fail with their
    points unprocessed, the run exits 1; once OSRM is fast again they complete."""
    for i in range(4):
        add_trace(conn, f"d{i}", trace_pool[i])
    points = sum(len(trace_pool[i].points) for i in range(4))
    host, port = osrm_url.rsplit("/", 1)[-1].rsplit(":", 1)
    settings = MatchSettings(backoff_base_seconds=0.2, backoff_max_seconds=0.4)
    with TcpProxy(host, int(port), delay=1.0) as slow, OsrmClient(
            f"http://127.0.0.1:{slow.port}", timeout=0.3, retries=2,
            retry_wait_max=0.05) as client:
        record = run(database_url, client, settings, concurrency=2)
    assert record.exit_code == 1 and "timed out" in (record.error or "")
    assert record.counts["batches_failed"] >= 2 and record.counts["batches_completed"] == 0
    assert_all_processed(conn, unprocessed=points)
    time.sleep(0.5)  # the backoff
    with OsrmClient(osrm_url) as fast:
        assert run(database_url, fast, settings).counts["batches_completed"] == 4
    assert_all_processed(conn)


def test_an_open_listener_transaction_on_a_day_without_partition_does_not_stop_matching(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        trace_pool: list[traces.Trace]) -> None:
    """A device reset to 1980 sends a point through a listener whose transaction stays open:
    the point waits in the default partition, whose lock making any partition needs. Every
    run waited on that lock, matching nothing, until the hard time limit."""
    # A guard: without the fix the run fails after this instead of hanging the test.
    conn.execute(sql.SQL("ALTER DATABASE {} SET lock_timeout = '10s'").format(
        sql.Identifier(conn.info.dbname)))
    add_trace(conn, "d", trace_pool[0], start=datetime.now(UTC) - timedelta(hours=1))
    partitions.ensure(conn)
    with psycopg.connect(database_url) as listener:
        listener_insert(listener, [("reset", datetime(1980, 1, 6, 0, 0, 5, tzinfo=UTC),
                                    60.17, 24.94)])
        # Committed by another listener: a day the run has to make (as the first run after
        # midnight UTC makes the day a week ahead).
        listener_insert(conn, [("reset2", datetime(1980, 1, 7, 0, 0, 5, tzinfo=UTC),
                                60.17, 24.94)])
        record = run(database_url, client)
        assert record.exit_code == 0, record.error
        assert record.counts["batches_completed"] == 1
    record = run(database_url, client)  # committed: its day is made, the point moved
    assert record.exit_code == 0, record.error
    made = conn.execute("SELECT to_regclass('gps_points_p19800106') IS NOT NULL AS a,"
                        " to_regclass('gps_points_p19800107') IS NOT NULL AS b").fetchone()
    assert made == {"a": True, "b": True}
    assert_all_processed(conn)


@pytest.mark.parametrize("glitch", [0, 20])
def test_a_parked_vehicle_with_no_fix_points_is_still_stationary(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        proxy: CountingHttpProxy, glitch: int) -> None:
    """Trackers send (0, 0) when they have no fix. One such point, first or in between, made
    a parked vehicle's batch go to OSRM, which drew lines of one spot."""
    rows = [("parked", OLD + timedelta(seconds=5 * i), 60.16990 + (i % 2) * 1e-5, 24.93840)
            for i in range(60)]
    rows[glitch] = (*rows[glitch][:2], 0.0, 0.0)
    traces.insert_points(conn, rows)
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    assert (record.counts["batches_stationary"], record.counts["points_processed"]) == (1, 60)
    assert proxy.count("/match/") == 0
    assert conn.execute("SELECT count(*) AS n FROM cached_polylines").fetchone()["n"] == 0
    assert_all_processed(conn)


def test_no_fix_points_are_not_sent_to_osrm(conn: psycopg.Connection[Any], database_url: str,
                                           client: OsrmClient,
                                           trace_pool: list[traces.Trace]) -> None:
    trace = trace_pool[12]
    rows = trace.rows("d")
    for i in (0, len(rows) // 2):
        rows[i] = (*rows[i][:2], 0.0, 0.0)
    traces.insert_points(conn, rows)
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    assert record.counts["points_processed"] == len(rows)
    row = conn.execute("SELECT polyline_count, chunk_errors FROM processing_batches").fetchone()
    assert row["polyline_count"] == 1 and row["chunk_errors"] == {}
    assert traces.judge(trace.truth, polylines(conn, "d")).passed
    assert_all_processed(conn)


def test_a_device_without_a_fix_says_so(conn: psycopg.Connection[Any], database_url: str,
                                        client: OsrmClient, proxy: CountingHttpProxy) -> None:
    """A tracker without a GPS fix sends (0, 0) for a whole trip: the batch said only
    'no matching: too_few_points' of its 20 points, which names no cause."""
    traces.insert_points(conn, [("nofix", OLD + timedelta(seconds=i), 0.0, 0.0)
                                for i in range(20)])
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    row = conn.execute("SELECT status, matched_count, error_message FROM processing_batches"
                       ).fetchone()
    assert row["status"] == "completed" and row["matched_count"] == 0
    assert "no GPS fix: all 20 points at (0, 0)" in row["error_message"]
    assert proxy.count("/match/") == 0
    assert_all_processed(conn)


def test_a_burst_within_one_second_says_so(conn: psycopg.Connection[Any], database_url: str,
                                           client: OsrmClient) -> None:
    """500 points of one device within one second (a tracker flushing its buffer with one
    time): OSRM takes whole seconds, so one point is left to send; the note said only
    'too_few_points'."""
    traces.insert_points(conn, [("burst", OLD + timedelta(milliseconds=i),
                                 60.1700 + (i % 7) * 1e-4, 24.9400) for i in range(500)])
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    row = conn.execute("SELECT matched_count, error_message FROM processing_batches").fetchone()
    assert row["matched_count"] == 0
    assert "all 500 points within one second" in row["error_message"]
    assert_all_processed(conn)


@pytest.mark.parametrize("glitch", [(60.6, 25.5), (60.1760, 24.9500)],
                         ids=["off-the-map", "on-the-map"])
def test_a_parked_vehicle_with_one_gps_glitch_draws_no_line(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        glitch: tuple[float, float]) -> None:
    """One fix 50 km away (or a few streets away) among a parked vehicle's points made the
    batch not stationary: sent to OSRM, which left the glitch out and drew a "line" of one
    spot, what the stationary rule is there to prevent."""
    rows = [("parked", OLD + timedelta(seconds=5 * i), 60.16990 + (i % 2) * 1e-5, 24.93840)
            for i in range(60)]
    rows[30] = (*rows[30][:2], *glitch)
    traces.insert_points(conn, rows)
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    assert (record.counts["batches_stationary"], record.counts["points_processed"]) == (1, 60)
    assert conn.execute("SELECT count(*) AS n FROM cached_polylines").fetchone()["n"] == 0
    row = conn.execute("SELECT polyline_count, error_message FROM processing_batches"
                       ).fetchone()
    assert row["polyline_count"] == 0 and row["error_message"].startswith("stationary: ")
    assert_all_processed(conn)


# ----------------------------------------------------------------- real-world trace pathologies


@pytest.fixture(scope="module")
def one_hz_trace(osrm_url: str) -> traces.Trace:
    """Over 1,000 points a second apart: ten and more chunks of the default 100."""
    with OsrmClient(osrm_url) as plain:
        return traces.make_trace(plain, random.Random(7), min_points=350,
                                 interval_s=(1.0, 1.0), waypoints=3)


def shifted(rows: list[tuple[str, datetime, float, float]], seconds: float
            ) -> list[tuple[str, datetime, float, float]]:
    return [(d, t + timedelta(seconds=seconds), lat, lon) for d, t, lat, lon in rows]


def test_a_vehicle_parked_for_minutes_inside_a_chunked_trace(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        one_hz_trace: traces.Trace) -> None:
    """400 exact repeats of one position at 1 Hz (a parked vehicle) in the middle of a drive:
    whole chunks of one spot, and chunk boundaries inside the stop. One batch, matched as the
    drive; no line of one spot is kept, no point lost or matched twice."""
    rows = one_hz_trace.rows("d")
    k, park = 150, 400
    stop = [("d", rows[k][1] + timedelta(seconds=i + 1), rows[k][2], rows[k][3])
            for i in range(park)]
    rows = rows[:k + 1] + stop + shifted(rows[k + 1:], park)
    traces.insert_points(conn, rows)
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    assert record.counts["batches_completed"] == 1
    assert record.counts["points_processed"] == len(rows)
    assert record.counts["osrm_requests"] >= len(rows) // 100
    assert traces.judge(one_hz_trace.truth, polylines(conn, "d")).passed
    assert_all_processed(conn)


def test_a_gap_inside_a_batch_is_not_drawn_across(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        one_hz_trace: traces.Trace) -> None:
    """A 4-minute silence (below gap_seconds) inside a 1 Hz drive keeps one batch; OSRM is
    sent the real timestamps with gaps=split, so no line is guessed across the silence."""
    rows = one_hz_trace.rows("d")
    k = 150
    rows = rows[:k] + shifted(rows[k:], 240)
    traces.insert_points(conn, rows)
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    assert batch_states(conn) == {"completed": 1}
    across = conn.execute("SELECT count(*) AS n FROM cached_polylines"
                          " WHERE start_time < %s AND end_time > %s",
                          (rows[k - 1][1], rows[k][1])).fetchone()["n"]
    assert across == 0
    assert traces.judge(one_hz_trace.truth, polylines(conn, "d")).passed
    assert_all_processed(conn)


@pytest.mark.parametrize("jump", [-59, -4])
def test_a_device_clock_set_back_mid_drive(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        one_hz_trace: traces.Trace, jump: int) -> None:
    """A tracker sampling every 2 s sets its clock back mid-drive: by 59 s its later points
    fall between the earlier ones (interleaved), by 4 s onto their very seconds (the listener's
    duplicate rule drops them: a (device, time) is stored once). The batch completes from the
    points stored, in time order; nothing fails, is lost or is matched twice."""
    rows = one_hz_trace.rows("d")[::2]
    k = len(rows) // 2
    rows = rows[:k] + shifted(rows[k:], jump)
    partitions.ensure(conn, [OLD.date()])
    listener_insert(conn, rows)
    stored = conn.execute("SELECT count(*) AS n FROM gps_points").fetchone()["n"]
    assert stored == len({r[1] for r in rows})
    record = run(database_url, client)
    assert record.exit_code == 0, record.error
    assert batch_states(conn) == {"completed": 1}
    assert record.counts["points_processed"] == stored
    assert traces.judge(one_hz_trace.truth, polylines(conn, "d")).passed
    assert_all_processed(conn)


def test_a_backlog_arriving_a_point_at_a_time_is_matched(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        trace_pool: list[traces.Trace]) -> None:
    """A tracker uploads a drive's backlog a point per batcher pass, oldest first (before a
    drive already matched) or newest first (after it): each point alone joins the batch next
    to it instead of closing as too_short, never matched."""
    forward, live, backward = trace_pool[9], trace_pool[10], trace_pool[11]
    forward.start, live.start, backward.start = OLD, OLD + timedelta(hours=1), \
        OLD + timedelta(hours=2)
    traces.insert_points(conn, live.rows("d"))
    assert run(database_url, client).counts["batches_completed"] == 1
    settings = MatchSettings()
    for row in forward.rows("d")[:40] + backward.rows("d")[::-1][:40]:
        traces.insert_points(conn, [row])
        made = batches.make_batches(conn, settings)
        assert made.too_short <= 1, row  # the first point of each backlog, alone
    record = run(database_url, client, settings)
    assert record.exit_code == 0, record.error
    assert batch_states(conn) == {"completed": 3}
    assert_all_processed(conn)
    for trace, rows in ((forward, forward.rows("d")[:40]),
                        (backward, backward.rows("d")[-40:])):
        lines = [polyline.decode(r["encoded_polyline"]) for r in conn.execute(
            "SELECT encoded_polyline FROM cached_polylines WHERE start_time BETWEEN %s AND %s"
            " ORDER BY start_time", (rows[0][1], rows[-1][1]))]
        truth = traces.judge(trace.truth, lines, min_coverage=0.0)
        assert lines and truth.passed, truth


def test_two_points_alone_either_side_of_a_batch_grow_it_only_within_max_batch_seconds(
        conn: psycopg.Connection[Any]) -> None:
    """A point alone before a batch and one after it arrive in one pass; each alone keeps
    the batch within max_batch_seconds, both together would not: the first grows it, the
    second closes as too_short (and the dry run says so)."""
    settings = MatchSettings(gap_seconds=300, max_batch_seconds=600)

    def at(*seconds: int) -> list[tuple[str, datetime, float, float]]:
        return [("d", OLD + timedelta(seconds=s), 60.17, 24.94) for s in seconds]

    traces.insert_points(conn, at(0, 100, 200, 300, 400))
    assert batches.make_batches(conn, settings).created == 1
    traces.insert_points(conn, at(-150, 550))
    preview = batches.plan(conn, settings)
    made = batches.make_batches(conn, settings)
    assert (made.reopened, made.too_short, made.created) == (1, 1, 0)
    assert (preview["batches_to_reopen"], preview["too_short_to_close"],
            preview["batches_to_make"]) == (1, 1, 0)
    got = conn.execute("SELECT start_time, end_time, coordinate_count, status"
                       " FROM processing_batches ORDER BY start_time").fetchall()
    assert [tuple(r.values()) for r in got] == [
        (OLD - timedelta(seconds=150), OLD + timedelta(seconds=400), 6, "pending"),
        (OLD + timedelta(seconds=550), OLD + timedelta(seconds=550), 1, "too_short")]
    assert reliability.check_gps(conn) == []


def test_a_point_closed_alone_is_cut_again_with_the_points_that_arrive_next_to_it(
        conn: psycopg.Connection[Any]) -> None:
    """Two points 400 s apart arrive first, each closed as too_short (gap_seconds is 300);
    the point between them, within 300 s of both, arrives next. Growing one of them left the
    other closed alone, never matched, though a point of its trace lies 200 s away."""
    settings = MatchSettings(gap_seconds=300)
    for s in (0, 400, 200):
        traces.insert_points(conn, [("d", OLD + timedelta(seconds=s), 60.17, 24.94)])
        preview = batches.plan(conn, settings)
        made = batches.make_batches(conn, settings)
        assert (preview["batches_to_make"], preview["too_short_to_close"]) == (
            made.created, made.too_short)
    got = conn.execute("SELECT start_time, end_time, coordinate_count, status"
                       " FROM processing_batches").fetchall()
    assert [tuple(r.values()) for r in got] == [
        (OLD, OLD + timedelta(seconds=400), 3, "pending")]
    assert_all_processed(conn, unprocessed=3)


@pytest.mark.parametrize("seed", range(4))
def test_traces_arriving_a_point_or_a_few_at_a_time_in_any_order(
        conn: psycopg.Connection[Any], database_url: str, client: OsrmClient,
        trace_pool: list[traces.Trace], seed: int) -> None:
    """Three drives of a device (gaps of 2 s to an hour between them) arrive shuffled, one to
    three points a batcher pass, with match runs in between. After each pass the dry run
    predicted it and batches do not overlap; after each run every point is counted alike by
    status and gps_point_status; in the end every point is processed, and none with a
    neighbour within gap_seconds is in a batch alone."""
    rng = random.Random(seed)
    settings = MatchSettings()
    rows: list[tuple[str, datetime, float, float]] = []
    at = OLD
    for k in range(3):
        trace = trace_pool[(seed + k) % len(trace_pool)]
        step = rng.choice([1, 5, 15])
        kept = list(zip(trace.offsets, trace.points, strict=True))[::step][:25]
        rows += [("d", at + timedelta(seconds=s - kept[0][0]), lat, lon)
                 for s, (lat, lon) in kept]
        at = rows[-1][1] + timedelta(seconds=rng.choice([2, 100, 250, 400, 4000]))
    rng.shuffle(rows)
    while rows:
        part = rows[:rng.choice([1, 1, 2, 3])]
        rows = rows[len(part):]
        traces.insert_points(conn, part)
        preview = batches.plan(conn, settings)
        made = batches.make_batches(conn, settings)
        assert (preview["batches_to_make"], preview["too_short_to_close"],
                preview["points_to_batch"]) == (made.created, made.too_short, made.points)
        assert not [p for p in reliability.check_gps(conn) if "overlap" in p]
        if rng.random() < 0.25:
            assert run(database_url, client, settings).exit_code == 0
            assert reliability.check_gps(conn) == []
            left = conn.execute("SELECT count(*) FILTER (WHERE NOT processed) AS n"
                                " FROM gps_point_status").fetchone()["n"]
            assert left == batches.status_section(conn)["unprocessed_points"]
    assert run(database_url, client, settings).exit_code == 0
    assert_all_processed(conn)
    alone = conn.execute(
        "SELECT p.recorded_at FROM gps_point_status p JOIN processing_batches b USING (batch_id)"
        " WHERE b.coordinate_count = 1 AND EXISTS (SELECT 1 FROM gps_points q"
        "   WHERE q.device_id = p.device_id AND q.recorded_at <> p.recorded_at"
        "     AND q.recorded_at BETWEEN p.recorded_at - %(gap)s AND p.recorded_at + %(gap)s)",
        {"gap": timedelta(seconds=settings.gap_seconds)}).fetchall()
    assert alone == []
