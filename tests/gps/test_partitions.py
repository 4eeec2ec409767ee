"""Daily partitions of gps_points: made ahead, parked points moved in, retention that drops
whole days and deletes in chunks elsewhere (against a real PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest

from devtools import traces
from pipeline_cli.gps import batches, partitions
from pipeline_cli.settings import MatchSettings


def where(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return {r["part"]: r["n"] for r in conn.execute(
        "SELECT tableoid::regclass::text AS part, count(*) AS n FROM gps_points GROUP BY 1")}


def day_points(device: str, day: date, seconds: range) -> list[tuple[str, datetime, float,
                                                                     float]]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return [(device, start + timedelta(seconds=s), 60.17, 24.94) for s in seconds]


def test_partitions_ahead_and_parked_points_moved(conn: psycopg.Connection[Any]) -> None:
    today = date(2030, 6, 1)
    traces.insert_points(conn, day_points("d", date(2019, 2, 3), range(0, 30, 10)))
    assert where(conn) == {"gps_points_default": 3}
    assert batches.status_section(conn)["default_partition_points"] == 3
    created = partitions.ensure(conn, today=today)
    assert "gps_points_p20190203" in created and "gps_points_p20300608" in created
    assert "gps_points_p20300531" in created and "gps_points_p20300609" not in created
    assert where(conn) == {"gps_points_p20190203": 3}
    assert partitions.ensure(conn, today=today) == []
    assert batches.status_section(conn)["default_partition_points"] == 0


def test_prune_drops_done_days_and_deletes_in_chunks(conn: psycopg.Connection[Any]) -> None:
    days = [date(2021, 1, d) for d in (1, 2, 3)]
    partitions.ensure(conn, days[:2])
    old = day_points("a", date(2020, 12, 31), range(0, 5))  # parked in the default partition
    rows = old + day_points("a", days[0], range(0, 50, 5)) + day_points(
        "a", days[1], range(0, 86400, 8640)) + day_points("a", days[2], range(0, 20, 5))
    traces.insert_points(conn, rows)
    batches.make_batches(conn, MatchSettings(max_batch_seconds=3600, gap_seconds=60))
    # Matching without OSRM: every batch before 2021-01-03 completes, the last one waits.
    conn.execute("UPDATE processing_batches SET status = 'completed',"
                 " points_snapshot = txid_current_snapshot()"
                 " WHERE start_time < '2021-01-03Z'")
    cutoff = datetime(2021, 1, 2, 12, tzinfo=UTC)
    dry = partitions.prune(conn, cutoff, chunk_rows=2, dry_run=True)
    assert dry.partitions_dropped == ["gps_points_p20210101"]
    assert where(conn)["gps_points_p20210101"] == 10
    done = partitions.prune(conn, cutoff, chunk_rows=2)
    assert done.partitions_dropped == ["gps_points_p20210101"]
    assert done.points_deleted == 5 + 5  # the default partition's and the first half-day's
    left = where(conn)
    assert "gps_points_p20210101" not in left
    assert left == {"gps_points_p20210102": 5, "gps_points_default": 4}
    assert conn.execute("SELECT min(recorded_at) AS t FROM gps_points_p20210102"
                        ).fetchone()["t"] >= cutoff
    # Unprocessed points are never pruned, whatever their age. (The cutoff stays before the
    # days the migration made around the date the test template was built: a run that
    # crosses midnight would otherwise find one of them whole and drop it too.)
    again = partitions.prune(conn, datetime(2021, 2, 1, tzinfo=UTC), chunk_rows=2)
    assert again.partitions_dropped == ["gps_points_p20210102"]
    assert where(conn) == {"gps_points_default": 4}


def test_prune_asks_to_stop_before_each_transaction(conn: psycopg.Connection[Any]) -> None:
    day = date(2021, 1, 1)
    partitions.ensure(conn, [day])
    traces.insert_points(conn, day_points("a", day, range(0, 50, 5))
                         + day_points("a", date(2020, 12, 31), range(0, 5)))
    batches.make_batches(conn, MatchSettings(max_batch_seconds=3600, gap_seconds=60))
    conn.execute("UPDATE processing_batches SET status = 'completed',"
                 " points_snapshot = txid_current_snapshot()")
    cutoff = datetime(2021, 1, 2, tzinfo=UTC)

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        partitions.prune(conn, cutoff, chunk_rows=2, check_stop=stop)
    assert where(conn) == {"gps_points_p20210101": 10, "gps_points_default": 5}
    asked: list[int] = []
    done = partitions.prune(conn, cutoff, chunk_rows=2, check_stop=lambda: asked.append(1))
    assert done.partitions_dropped == ["gps_points_p20210101"] and done.points_deleted == 5
    assert len(asked) == 1 + 3  # the drop, then three chunks of the default partition


@pytest.mark.parametrize("lat, lon", [(90.5, 24.9), (-90.5, 24.9), (60.1, 180.5),
                                      (float("nan"), 24.9), (60.1, float("nan"))])
def test_a_point_out_of_range_is_refused_in_every_partition(
        conn: psycopg.Connection[Any], lat: float, lon: float) -> None:
    """The point checks (written with double precision bounds by migration 017) hold in the
    default partition and in a partition made after the migration."""
    partitions.ensure(conn, [date(2031, 3, 4)])
    for day in (date(2031, 3, 4), date(2001, 1, 1)):  # a new partition; the default one
        with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
            traces.insert_points(conn, [("d", datetime(day.year, day.month, day.day,
                                                       tzinfo=UTC), lat, lon)])
    traces.insert_points(conn, [("d", datetime(2031, 3, 4, tzinfo=UTC), 90.0, -180.0)])
    assert where(conn) == {"gps_points_p20310304": 1}


def test_prune_checks_the_whole_utc_day_in_a_zone_with_daylight_saving(
        conn: psycopg.Connection[Any]) -> None:
    """A database whose TimeZone springs forward on the day (America/New_York, 2021-03-14):
    the day's end was taken as its start plus a day of that zone, 23 hours, and a point
    not yet matched in the last hour went with the dropped partition."""
    conn.execute("SET TimeZone = 'America/New_York'")
    day = date(2021, 3, 14)
    partitions.ensure(conn, [day])
    traces.insert_points(conn, day_points("a", day, range(0, 3600, 60)))
    batches.make_batches(conn, MatchSettings(max_batch_seconds=3600, gap_seconds=60))
    conn.execute("UPDATE processing_batches SET status = 'completed',"
                 " points_snapshot = txid_current_snapshot()")
    late = day_points("b", day, range(23 * 3600 + 1800, 23 * 3600 + 1860, 30))
    traces.insert_points(conn, late)  # new to the batcher: the day is not done
    done = partitions.prune(conn, datetime(2021, 4, 1, tzinfo=UTC), chunk_rows=100)
    assert "gps_points_p20210314" not in done.partitions_dropped
    assert where(conn)["gps_points_p20210314"] == len(late)
