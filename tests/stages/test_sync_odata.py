"""sync-odata against the real OData fixture server, PostgreSQL and S3."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from devtools.odata_server import (
    ODataServer,
    delay,
    sample_network,
    sample_network_lazy,
    status,
    trippin_airports,
    wrong_shape,
)
from devtools.services import S3Endpoint
from pipeline_cli import db
from pipeline_cli.adapters.backups import BackupStore
from pipeline_cli.adapters.odata import ODataClient
from pipeline_cli.adapters.odata_format import resolve_mapping
from pipeline_cli.db import Database
from pipeline_cli.errors import endpoint
from pipeline_cli.read_model import COLUMNS, ENTITIES
from pipeline_cli.runner import RunRecord, StageResult, StageRunner
from pipeline_cli.settings import ODataSettings
from pipeline_cli.stages.sync_odata import (
    _Set,
    feed_key,
    list_datasets,
    restore_dataset,
    status_section,
    sync_odata,
)
from tests.support.proxy import ForwardHttpProxy, TcpProxy

pytestmark = pytest.mark.s3


def network() -> dict[str, list[dict[str, Any]]]:
    data = sample_network(40)
    data["Stops"][20]["name"] = "Hämeenlinna \U0001F689 asema\tB"  # unicode and a tab
    data["Stops"][21]["city"] = None
    data["Stops"][22]["name"] = None
    data["Routes"][0]["distanceKm"] = None  # route 1 has flights: it needs no distance
    return data


@pytest.fixture
def server() -> Iterator[ODataServer]:
    with ODataServer(network(), page_size=15) as srv:
        yield srv


@pytest.fixture
def backups(s3: S3Endpoint, s3_bucket: str) -> BackupStore:
    return BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                               secure=s3.secure, region=s3.region)


def client_for(server: ODataServer, **kw: Any) -> ODataClient:
    return ODataClient(ODataSettings(url=server.url, connect_timeout=2, read_timeout=5,
                                     backoff_base=0.01, backoff_max=1.0, **kw))


def restore(database_url: str, backups: BackupStore, version: str) -> RunRecord:
    return run(database_url, lambda ctx: restore_dataset(Database(database_url), backups, ctx,
                                                         version))


def run(database_url: str, fn: Callable[[Any], StageResult]) -> RunRecord:
    return StageRunner(Database(database_url)).run("sync-odata", fn)


@pytest.fixture
def sync(database_url: str, server: ODataServer, backups: BackupStore
         ) -> Callable[..., RunRecord]:
    def do(srv: ODataServer | None = None, store: BackupStore | None = None,
           odata: dict[str, Any] | None = None, **opts: Any) -> RunRecord:
        with client_for(srv or server, **(odata or {})) as client:
            return run(database_url, lambda ctx: sync_odata(
                Database(database_url), client, store or backups, ctx, **opts))
    return do


def table(conn: psycopg.Connection[Any], name: str) -> list[dict[str, Any]]:
    order = "seq" if name == "datasets" else "id"
    return conn.execute(f"SELECT * FROM {name} ORDER BY {order}").fetchall()  # noqa: S608


def snapshot(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    return {t: table(conn, t) for t in ("stops", "routes", "flights", "datasets")}


def test_first_sync_loads_the_read_model_and_backs_it_up(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any],
        backups: BackupStore) -> None:
    rec = sync()
    assert rec.status == "success", rec.error
    assert rec.extra["dataset_version"] == "ds-v1"
    assert rec.counts == {"stops": 40, "routes": 80, "flights": 12, "rejected": 0}
    assert rec.extra["inserted"] == {"stops": 40, "routes": 80, "flights": 12}
    stops = {r["id"]: r for r in table(conn, "stops")}
    assert stops["21"]["name"] == "Hämeenlinna \U0001F689 asema\tB"
    assert stops["22"]["city"] is None and stops["23"]["name"] is None
    assert stops["1"]["is_airport"] is True
    ds = list_datasets(conn)
    assert [(d["version"], d["active"]) for d in ds] == [("ds-v1", True)]
    keys = set(backups.list("datasets/ds-v1/"))
    assert keys == {"datasets/ds-v1/manifest.json", "datasets/ds-v1/raw/stops.json-seq.gz",
                    "datasets/ds-v1/raw/routes.json-seq.gz",
                    "datasets/ds-v1/raw/flights.json-seq.gz"}
    manifest = backups.get_json("datasets/ds-v1/manifest.json")
    assert manifest["hash"] == ds[0]["hash"] == rec.extra["hash"]


def test_reordered_feed_is_a_noop_that_writes_nothing(
        sync: Callable[..., RunRecord], server: ODataServer, conn: psycopg.Connection[Any],
        backups: BackupStore) -> None:
    assert sync().status == "success"
    before = snapshot(conn)
    objects = set(backups.list("datasets/"))
    for name in ("Stops", "Routes", "Flights"):
        server.shuffle(name, seed=7)
    rec = sync()
    assert rec.status == "noop"
    assert rec.extra["dataset_version"] == "ds-v1"
    assert rec.extra["updated"] == {"stops": 0, "routes": 0, "flights": 0}
    assert snapshot(conn) == before
    assert set(backups.list("datasets/")) == objects


def test_same_data_over_v2_with_string_numbers_hashes_the_same(
        sync: Callable[..., RunRecord]) -> None:
    first = sync()
    with ODataServer(network(), version="v2", page_size=9, next_link="relative",
                     v2_numbers_as_strings=True) as v2:
        rec = sync(v2)
    assert rec.status == "noop", rec.error
    assert rec.extra["hash"] == first.extra["hash"]


def test_an_odata_401_service_without_the_odata_prefix_gives_the_same_dataset(
        sync: Callable[..., RunRecord]) -> None:
    """@nextLink and @count without odata. (OData 4.01): every page is read, not just the
    first, after which the rest of the read model would have been deleted."""
    first = sync()
    with ODataServer(network(), page_size=15, unprefixed_annotations=True) as v401:
        rec = sync(v401)
    assert rec.status == "noop", rec.error
    assert rec.extra["hash"] == first.extra["hash"]


def test_an_odata_v3_service_gives_the_same_dataset(sync: Callable[..., RunRecord]) -> None:
    first = sync()
    with ODataServer(network(), version="v3", page_size=15) as v3:
        rec = sync(v3)
    assert rec.status == "noop", rec.error
    assert rec.extra["hash"] == first.extra["hash"]


def test_fewer_rows_than_the_server_counted_fail_the_sync(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    """Rows the server counts (@odata.count) but its pages never hold (a row deleted while an
    offset-paging server was read shifts the rest past a page) would be deleted from the read
    model: the sync fails instead, and says how to skip the check."""
    sync()
    before = snapshot(conn)
    stops = network()["Stops"]
    server.add_fault(wrong_shape({"@odata.count": len(stops) + 1, "value": stops[:20],
                                  "@odata.nextLink": "Stops?$skiptoken=20"}),
                     entity_set="Stops", match="orderby")
    server.add_fault(wrong_shape({"value": stops[21:]}), entity_set="Stops", match="skiptoken")
    rec = sync()
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.error == (f"OData Stops: the server counted {len(stops) + 1} entities but its "
                         f"pages held {len(stops) - 1} (the set changed while it was read, or "
                         "its paging skipped rows); nothing was written ([odata] count = false "
                         "skips this check)")
    assert snapshot(conn) == before
    # One page, no nextLink, fewer rows than counted: a server capping its answer in silence
    # (SAP Gateway's); count = false would load the capped set, client paging reads it whole.
    server.add_fault(wrong_shape({"@odata.count": len(stops), "value": stops[:25]}),
                     entity_set="Stops", match="orderby")
    rec = sync()
    assert rec.error == (f"OData Stops: the server counted {len(stops)} entities but its pages "
                         "held 25 (one page without a nextLink: a server that caps its answers "
                         "in silence is read whole with [odata] paging = \"client\"); nothing "
                         "was written ([odata] count = false skips this check)")
    assert snapshot(conn) == before


def test_one_changed_row_is_exactly_one_update(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    sync()
    server.update_row("Stops", 30, name="Renamed stop")
    rec = sync()
    assert rec.status == "success"
    assert rec.extra["dataset_version"] == "ds-v2"
    assert rec.extra["updated"] == {"stops": 1, "routes": 0, "flights": 0}
    assert rec.extra["inserted"] == {"stops": 0, "routes": 0, "flights": 0}
    assert rec.extra["deleted"] == {"stops": 0, "routes": 0, "flights": 0}
    assert conn.execute("SELECT name FROM stops WHERE id = '30'").fetchone() == {
        "name": "Renamed stop"}
    active = [d["version"] for d in list_datasets(conn) if d["active"]]
    assert active == ["ds-v2"]


def test_byte_identical_pages_are_a_noop_and_a_late_change_still_counts_every_row(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    first = sync()
    digests = conn.execute("SELECT feed_digests FROM datasets").fetchone()
    assert digests is not None and set(digests["feed_digests"]["pages"]) == {
        "stops", "routes", "flights"}
    rec = sync()  # the same pages: a noop without parsing a row, same counts and hash
    assert rec.status == "noop" and rec.counts == first.counts
    assert rec.extra["hash"] == first.extra["hash"]
    # only the very last page differs: every page held back is normalised after all
    server.update_row("Flights", 12, daysOfWeek="67")
    rec = sync()
    assert rec.status == "success", rec.error
    assert rec.counts == first.counts
    assert rec.extra["updated"] == {"stops": 0, "routes": 0, "flights": 1}
    assert rec.extra["deleted"] == {"stops": 0, "routes": 0, "flights": 0}


def test_strict_run_after_a_version_with_rejects_still_checks_every_row(
        sync: Callable[..., RunRecord], server: ODataServer) -> None:
    server.update_row("Stops", 7, latitude=95.0)
    assert sync(skip_invalid=True).status == "success"
    rec = sync()  # the same bytes, but strict: the bad row is found again
    assert rec.status == "failed"
    assert "Stops[ID=7] latitude" in (rec.error or "") or any(
        "Stops[ID=7] latitude" in p for p in rec.extra.get("problems", []))


def test_a_deleted_row_is_one_delete(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    sync()
    server.delete_row("Flights", 5)
    rec = sync()
    assert rec.extra["deleted"] == {"stops": 0, "routes": 0, "flights": 1}
    assert rec.counts["flights"] == 11
    assert conn.execute("SELECT count(*) AS n FROM flights").fetchone() == {"n": 11}


def test_a_changed_feed_writes_only_its_new_changed_and_vanished_rows(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    sync()
    server.update_row("Stops", 30, name="Renamed stop")
    server.add_row("Routes", {"ID": 81, "fromStop_ID": 1, "toStop_ID": 2, "mode": "bus",
                              "distanceKm": 3.5})
    server.delete_row("Flights", 5)
    before = conn.execute("SELECT sum(n_tup_upd) AS upd FROM pg_stat_user_tables "
                          "WHERE relname IN ('stops', 'routes', 'flights')").fetchone()
    rec = sync()
    assert rec.status == "success", rec.error
    assert (rec.extra["inserted"], rec.extra["updated"], rec.extra["deleted"]) == (
        {"stops": 0, "routes": 1, "flights": 0}, {"stops": 1, "routes": 0, "flights": 0},
        {"stops": 0, "routes": 0, "flights": 1})
    assert conn.execute("SELECT name FROM stops WHERE id = '30'").fetchone() == {
        "name": "Renamed stop"}
    assert conn.execute("SELECT from_stop_id, distance_km FROM routes WHERE id = '81'"
                        ).fetchone() == {"from_stop_id": "1", "distance_km": 3.5}
    assert conn.execute("SELECT count(*) AS n FROM flights WHERE id = '5'").fetchone() == {
        "n": 0}
    conn.execute("SELECT pg_stat_force_next_flush()")
    after = conn.execute("SELECT sum(n_tup_upd) AS upd FROM pg_stat_user_tables "
                         "WHERE relname IN ('stops', 'routes', 'flights')").fetchone()
    assert after is not None and before is not None and after["upd"] - before["upd"] <= 1


def test_a_read_model_changed_behind_the_pipelines_back_is_repaired(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    sync()
    conn.execute("DELETE FROM flights WHERE id = '3'")  # not by the pipeline
    conn.execute("INSERT INTO stops (id, latitude, longitude) VALUES ('stray', 1, 1)")
    server.update_row("Stops", 30, name="Renamed stop")
    rec = sync()
    assert rec.status == "success", rec.error
    assert rec.extra["inserted"] == {"stops": 0, "routes": 0, "flights": 1}
    assert rec.extra["updated"] == {"stops": 1, "routes": 0, "flights": 0}
    assert rec.extra["deleted"] == {"stops": 1, "routes": 0, "flights": 0}
    assert [conn.execute(f"SELECT count(*) AS n FROM {t}").fetchone()["n"]  # noqa: S608
            for t in ("stops", "routes", "flights")] == [40, 80, 12]


def test_a_sync_whose_database_session_dies_fails_and_writes_nothing(
        sync: Callable[..., RunRecord], server: ODataServer, conn: psycopg.Connection[Any],
        backups: BackupStore) -> None:
    sync()
    before = snapshot(conn)
    objects = set(backups.list("datasets/"))
    server.update_row("Stops", 30, name="Renamed stop")
    server.add_fault(delay(0.3), entity_set="Routes", times=None)  # time to find the session
    result: list[RunRecord] = []
    runner = threading.Thread(target=lambda: result.append(sync()))
    runner.start()
    try:
        killed = False
        for _ in range(200):
            row = conn.execute(
                "SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity "
                "WHERE datname = current_database() AND xact_start IS NOT NULL "
                "AND application_name ~ '^pipeline sync-odata [0-9a-f]{8}$'").fetchone()
            if row is not None and row["done"]:
                killed = True
                break
            runner.join(0.05)
        assert killed, "no sync session found"
    finally:
        runner.join(30)
        server.clear_faults()
    rec = result[0]
    assert rec.status == "failed" and rec.exit_code == 1
    assert (rec.error or "").startswith("database error while staging the feed"), rec.error
    assert snapshot(conn) == before
    assert set(backups.list("datasets/")) == objects


def test_a_slow_source_outlasts_an_idle_in_transaction_timeout(
        database_url: str, server: ODataServer, backups: BackupStore) -> None:
    """The sync's transaction idles while the OData server prepares each page; a server's or
    role's idle_in_transaction_session_timeout must not end it mid-sync."""
    url = psycopg.conninfo.make_conninfo(
        database_url, options="-c idle_in_transaction_session_timeout=100")
    server.add_fault(delay(0.3), entity_set="Routes", times=None)
    with client_for(server) as client:
        rec = run(url, lambda ctx: sync_odata(Database(url), client, backups, ctx))
    assert rec.status == "success", rec.error


def test_a_lone_surrogate_is_named_and_nothing_is_written(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    """A string escape \\ud800 without its other half is no text: the run names the set, row
    and field (PostgreSQL alone would refuse the page naming nothing). A pair is an emoji."""
    sync()
    before = snapshot(conn)
    server.update_row("Stops", 7, name="\U0001F689 ok")  # sent as UTF-8, read as one char
    server.update_row("Routes", 9, mode="bus\ud800")
    rec = sync()
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.error is not None and "Routes[ID=" in rec.error and "] mode: a lone UTF-16" \
        " surrogate (\\ud800)" in rec.error, rec.error
    assert snapshot(conn) == before


def test_nan_is_named_and_nothing_is_written(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    """NaN is no JSON number: Python's parser reads it, PostgreSQL's refuses the whole page
    (naming nothing, whatever field holds it); the run names the set, row and field."""
    sync()
    before = snapshot(conn)
    server.update_row("Stops", 7, name=float("nan"))  # a bare NaN in the page's JSON
    rec = sync(skip_invalid=True)  # not a row to skip: the page is not JSON
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.error is not None and "Stops page 1: Stops[ID=7] name: NaN or Infinity is not " \
        "a JSON number; nothing was written" in rec.error, rec.error
    assert snapshot(conn) == before


@pytest.mark.parametrize("annotation", [b"NaN", b'"half \\ud800"'])
def test_a_bad_value_in_a_page_annotation_names_the_set_and_page(
        sync: Callable[..., RunRecord], server: ODataServer, annotation: bytes) -> None:
    # It was "database error while staging the feed: invalid input syntax for type json".
    page = json.dumps({"@x.score": 0, "value": server.rows("Routes")}).encode()
    server.add_fault(wrong_shape(page.replace(b'"@x.score": 0', b'"@x.score": ' + annotation)),
                     entity_set="Routes")
    rec = sync()
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.error == ("OData Routes page 1: an annotation of the page holds NaN, Infinity "
                         "or a lone UTF-16 surrogate, which are not JSON; nothing was written")


def test_a_bad_value_in_a_field_the_mapping_does_not_read_is_named(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    # A service that ignores $select sends every field; PostgreSQL reads the whole page, so a
    # lone surrogate there failed every sync as a bare database error, --skip-invalid too.
    sync()
    before = snapshot(conn)
    server.ignore_select = True
    server.update_row("Stops", 7, remark="bad \udc00 half")
    rec = sync(skip_invalid=True)
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.error is not None and "Stops[ID=7] remark: a lone UTF-16 surrogate (\\udc00) " \
        "is not text" in rec.error, rec.error
    assert snapshot(conn) == before


def test_a_mapped_field_no_entity_has_is_named_not_read_as_null(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    # A service that spells it IsAirport and ignores $select: every is_airport was stored
    # false and every name NULL, exit 0, nothing said; a rename later would wipe them.
    sync()
    before = snapshot(conn)
    server.ignore_select = True
    server.set_rows("Stops", [{("IsAirport" if k == "isAirport" else k): v for k, v in r.items()
                               if k != "name"} for r in server.rows("Stops")])
    rec = sync(skip_invalid=True)
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.error == (
        "OData Stops: no entity has the field(s) 'isAirport' (is_airport; did you mean "
        "'IsAirport'?), 'name' (name) of [odata.mapping.stops.fields]; map each to the "
        "service's name (or an optional one to \"\" to leave it out); nothing was written")
    assert snapshot(conn) == before


def test_value_rules(conn: psycopg.Connection[Any]) -> None:
    """The sync_* functions of sql/015: what each kind of column accepts, and as what (the
    text json_to_recordset read; a key's or text's JSON type comes with it when suspect)."""
    def value(kind: str, text: str | None, jtype: str | None = None) -> Any:
        args = "%s, %s" if kind in ("key", "text") else "%s"
        params = (text, jtype) if kind in ("key", "text") else (text,)
        row = conn.execute(f"SELECT sync_{kind}({args}) AS v", params).fetchone()  # noqa: S608
        assert row is not None
        return row["v"]

    assert value("number", "61.5") == 61.5 and value("number", "7") == 7.0
    assert value("number", "12.5m") == 12.5 and str(value("number", "-0.0")) == "0.0"
    assert value("number", "1e3") == 1000.0 and value("number", " 1.5 ") == 1.5
    for bad in ("NaN", "INF", "", "true", "abc", "1e999", "[1]", "1.2.3",
                "0x10", "0X5A", "0x1p3", "0x1f"):  # the float input reads hexadecimal
        assert value("number", bad) is None, bad
    # A V2 literal's suffix (1.5d, 2.5M, 3f) is one letter right after the number; a unit
    # is no suffix: "500 m" (metres) was read as 500 (km), "10mm" as 10 (sql/035)
    for raw, want in {"1.5d": 1.5, "2.5M": 2.5, "3f": 3.0, " 1e3D ": 1000.0, "7.m": 7.0}.items():
        assert value("number", raw) == want, raw
    for bad in ("500 m", "10mm", "5ff", "12 d", "0.5 M", "1.5dm"):
        assert value("number", bad) is None, bad
    for spelling, want in BOOL_SPELLINGS.items():
        assert value("bool", spelling) is want, spelling
    for bad in BOOL_REFUSED:
        assert value("bool", bad) is None, bad
    assert value("key", "12") == "12" and value("key", "A-1") == "A-1"
    assert value("key", "true", "string") == "true"  # a station may be called that
    for text, jtype in (("", None), ("true", "boolean"), ("{}", "object"), ("a\uffff", None)):
        assert value("key", text, jtype) is None, text
    assert value("text", "5") == "5" and value("text", "[closed]", "string") == "[closed]"
    assert value("text", "false", "boolean") is None
    # gen-virtual's ids, and values no B-tree index entry can hold (2704 bytes)
    for reserved in ("V:MAIN:133:28", "VR:1>2"):
        assert value("key", reserved) is None, reserved
    assert value("key", "VIP:1") == "VIP:1" and value("key", "v:1") == "v:1"
    assert value("key", "k" * 2000) and value("key", "k" * 2001) is None
    assert value("text", "é" * 1000) and value("text", "é" * 1001) is None
    times = {"8:05": "08:05:00", "23:59:59.000": "23:59:59", "PT08H30M00S": "08:30:00",
             "/Date(30600000)/": "08:30:00", "/Date(1700000000000+0000)/": "22:13:20",
             "2024-05-01T06:15:00Z": "06:15:00",
             # A V2 offset is in minutes, and the milliseconds are of the local clock
             # (WCF Data Services writes them so, datajs and Olingo read them so, sql/033).
             "/Date(30600000+0120)/": "08:30:00", "/Date(30600000-0330)/": "08:30:00",
             "/Date(30600000+60)/": "08:30:00", "/Date(1700000000000+0060)/": "22:13:20",
             "P0DT8H0M0S": "08:00:00", "P00DT08H30M00S": "08:30:00",  # Edm.Duration, 0 days
             # .NET services (Business Central, Dataverse): 7 fractional digits, and
             # XmlConvert's shortest duration
             "08:30:00.0000000": "08:30:00", "2024-03-01T07:30:59.9999999+01:00": "07:30:59",
             "PT8H30M": "08:30:00", "PT9H": "09:00:00",
             # HHMM (IATA SSIM), H.MM, HhMM and a 12-hour clock (sql/030)
             "0830": "08:30:00", "2359": "23:59:00", "8.30": "08:30:00", "08h30": "08:30:00",
             "8:30 PM": "20:30:00", "08:30:15 a.m.": "08:30:15", "12 AM": "00:00:00",
             "12:05 pm": "12:05:00", "11PM": "23:00:00"}
    for raw, want in times.items():
        assert str(value("time", raw)) == want, raw
    for bad in ("24:00", "12:60", "noon", "830", "PT", "-PT1H", "/Date(30600000+1100)/",
                "/Date(30600000+12345)/", "2026-13-45T08:00:00", "2026-02-30T08:00:00",
                "P1DT2H", "2460", "8.5", "25:30", "13:00 PM", "0:30 AM", "1230 PM", "8h"):
        assert value("time", bad) is None, bad
    for spelling, want in DAY_SPELLINGS.items():
        assert value("days", spelling) == want, spelling
    for bad in DAYS_REFUSED:
        assert value("days", bad) is None, bad


def test_a_distance_with_a_unit_is_refused_not_read_as_kilometres(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    """"500 m" lost its m as a V2 suffix and was stored as 500 km (sql/035)."""
    server.update_row("Routes", 2, distanceKm="500 m")
    server.update_row("Routes", 3, distanceKm="12.5m")  # a V2 Edm.Decimal literal's suffix
    rec = sync()
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.extra["problems"] == ["Routes[ID=2] distanceKm: expected a number, got '500 m'"]
    assert table(conn, "routes") == []
    server.update_row("Routes", 2, distanceKm="0.5")
    assert sync().status == "success"
    distances = {r["id"]: r["distance_km"] for r in table(conn, "routes")}
    assert (distances["2"], distances["3"]) == (0.5, 12.5)


def test_a_non_finite_number_is_named_under_a_turkish_collation(
        conn: psycopg.Connection[Any]) -> None:
    """lower('INF') is 'ınf' (dotless i) under a Turkish ICU collation, which a database or
    its default may use: the message still says the number is not finite (sql/027)."""
    for collation in ("C", "tr-TR-x-icu"):
        row = conn.execute(sql.SQL("SELECT sync_problem('number', %s COLLATE {}, true, NULL,"
                                   " NULL) AS p").format(sql.Identifier(collation)),
                           ("INF",)).fetchone()
        assert row is not None and row["p"] == [
            "invalid", "expected a finite number, got 'INF'"], collation


# PostgreSQL's boolean input, exactly, and SAP's ABAP flag ('X', blank), in any case and with
# blanks around (sql/027). A JSON true/false and the numbers 1/0 arrive as the same texts.
BOOL_SPELLINGS = {
    **{s: True for s in ("true", "t", "yes", "y", "on", "1", "X", "x", " TRUE ", "Yes", "ON",
                         "T", "Y", "\ttrue\n")},
    **{s: False for s in ("false", "f", "no", "n", "off", "0", "", " ", "  ", "FALSE", "No",
                          "OFF", "F", "N", " 0 ", "\t")}}
# PostgreSQL's unique prefixes ('tr', 'of'), other numbers, doubled flags, words.
BOOL_REFUSED = ("tr", "fa", "ye", "of", "maybe", "2", "-1", "1.0", "01", "XX", "x x", "yes please",
                "null", "none", "[]", "{}", "a\uffff")


# Days of operation as other services write them (sql/029), Monday = 1: digits in any order,
# seven places Monday first (IATA SSIM, a bitmask), lists and ranges of English names, JSON
# arrays. Stored as the distinct digits, sorted.
DAY_SPELLINGS = {
    "531": "135", "67": "67", "12345": "12345", "1 2": "12", "1,3,5": "135",
    "1 3 5 7": "1357", "1.3.5.7": "1357", " 2 4 6 ": "246", "12345  ": "12345",
    "1010100": "135", "1111111": "1234567", "1234560": "123456",
    "Mo-Fr": "12345", "Monday - Friday": "12345", "mon,wed,fri": "135", "MO WE FR": "135",
    "Sat, Sun": "67", "Mon and Thu": "14", "fr-mo": "1567", "1-5": "12345", "Tues;Thurs": "24",
    "daily": "1234567", "Weekdays": "12345", "weekends": "67",
    "[1, 3, 5]": "135", '["Mon", "Wed"]': "13"}
# Repeats, 0 and 8, an empty list, days of no week, words.
DAYS_REFUSED = ("11", "112", "Mon,Mon", "mo-fr,fr", "8", "0", "", "1.5", "0000000", "mo-xx",
                "x", "noon", "[]", "Monday-", "lundi")


def test_other_spellings_of_days_and_times_load_through_a_real_sync(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any]) -> None:
    with ODataServer(sample_network(200), page_size=15) as srv:  # 48 flights
        for key, spelling in enumerate(DAY_SPELLINGS, start=1):
            srv.update_row("Flights", key, daysOfWeek=spelling)
        srv.update_row("Flights", len(DAY_SPELLINGS) + 1, daysOfWeek=[1, 3, 5])  # JSON array
        srv.update_row("Flights", 1, departure="0830", arrival="9:45 PM")  # times too (030)
        rec = sync(srv)
    assert rec.status == "success", rec.error
    got = {r["id"]: r["days_of_week"] for r in table(conn, "flights")}
    assert [got[str(key)] for key in range(1, len(DAY_SPELLINGS) + 2)] == [
        *DAY_SPELLINGS.values(), "135"]
    first = next(r for r in table(conn, "flights") if r["id"] == "1")
    assert (str(first["departure"]), str(first["arrival"])) == ("08:30:00", "21:45:00")


def test_a_v2_date_time_offset_is_read_as_its_local_time(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any]) -> None:
    """WCF Data Services (ODataLib 5.x) writes an Edm.DateTimeOffset as /Date(ticks+offset)/
    with the ticks of the local clock and the offset in minutes; datajs, SAPUI5 and Olingo V2
    read it so (UTC is ticks - offset). A flight leaving Helsinki at 08:30 (+03:00) on
    1 June 2024 is /Date(1717230600000+0180)/: it leaves at 08:30, not at 11:30."""
    with ODataServer(network(), version="v2", page_size=15) as v2:
        v2.update_row("Flights", 1, departure="/Date(1717230600000+0180)/",
                      arrival="/Date(1717236000000-0210)/")  # -03:30
        rec = sync(v2)
    assert rec.status == "success", rec.error
    first = next(r for r in table(conn, "flights") if r["id"] == "1")
    assert (str(first["departure"]), str(first["arrival"])) == ("08:30:00", "10:00:00")


def test_refused_days_are_named_with_the_forms_that_are_read(
        sync: Callable[..., RunRecord], server: ODataServer) -> None:
    """The problem of a refused days value names the forms read (sql/031), not the digits
    alone (sql/029 read many more)."""
    refused = ("Mon,Mon", "lundi", "0000000")
    for key, v in enumerate(refused, start=1):
        server.update_row("Flights", key, daysOfWeek=v)
    rec = sync()
    assert rec.status == "failed" and rec.exit_code == 1
    forms = ("expected days of operation (digits 1-7 \"135\", seven places \"1010100\" or "
             "\"1 3 5 7\", days and ranges \"Mon, Wed\" or \"Mo-Fr\", a JSON array, daily, "
             "weekdays, weekends), got ")
    assert [p for p in rec.extra["problems"] if p.startswith("Flights[")] == [
        f"Flights[ID={key}] daysOfWeek: {forms}'{v}'" for key, v in enumerate(refused, start=1)]


def test_every_boolean_spelling_loads_through_a_real_sync(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    """An SAP service's ABAP flags ('X', ' ', ''), the other spellings as strings, JSON
    true/false and the JSON numbers 1/0 all load; a JSON null is false, as before."""
    values: list[Any] = [*BOOL_SPELLINGS, True, False, 1, 0, None]
    wants = [*BOOL_SPELLINGS.values(), True, False, True, False, False]
    for key, v in enumerate(values, start=1):
        server.update_row("Stops", key, isAirport=v)
    rec = sync()
    assert rec.status == "success", rec.error
    got = {r["id"]: r["is_airport"] for r in table(conn, "stops")}
    assert [got[str(key)] for key in range(1, len(values) + 1)] == wants
    # SAP is an OData V2 service: the same values over V2 give the same rows
    data = {name: server.rows(name) for name in ("Stops", "Routes", "Flights")}
    with ODataServer(data, version="v2", page_size=9) as v2:
        rec = sync(v2)
    assert rec.status == "noop", rec.error


def test_other_boolean_spellings_are_refused_and_named(
        sync: Callable[..., RunRecord], server: ODataServer) -> None:
    refused = ("tr", "maybe", "2", "XX", "of")
    for key, v in enumerate([*refused, 2, 1.0], start=1):
        server.update_row("Stops", key, isAirport=v)
    rec = sync()
    assert rec.status == "failed" and rec.exit_code == 1
    accepted = "expected true or false (or t/f, yes/no, y/n, on/off, 1/0, X/blank), got "
    assert [p for p in rec.extra["problems"] if p.startswith("Stops[")] == [
        f"Stops[ID={key}] isAirport: {accepted}'{v}'"
        for key, v in enumerate([*refused, "2", "1.0"], start=1)]


def test_values_that_are_not_strings_or_hold_nul_are_refused_and_named(
        sync: Callable[..., RunRecord], server: ODataServer) -> None:
    server.update_row("Stops", 3, name=True)
    server.update_row("Stops", 4, city="a\u0000b")
    server.update_row("Stops", 5, name="true", city="[closed]")  # strings: fine
    server.update_row("Routes", 6, fromStop_ID={"x": 1})
    rec = sync()
    assert rec.status == "failed"
    assert rec.extra["problems"] == [
        "Stops[ID=3] name: expected text, got true",
        "Stops[ID=4] city: contains a NUL character",
        'Routes[ID=6] fromStop_ID: expected a string or number key, got {"x":1}']


def test_reserved_ids_and_overlong_values_are_refused_and_skippable(
        sync: Callable[..., RunRecord], server: ODataServer) -> None:
    # A real stop V:MAIN:... broke gen-virtual's unique index on every run after the sync, and
    # a 3,000-byte city failed the whole sync (even --skip-invalid) on stops_city_idx.
    server.add_row("Stops", {**network()["Stops"][0], "ID": "V:MAIN:133:28"})
    server.update_row("Stops", 4, city="c" * 3000)
    server.update_row("Stops", 5, latitude="0x10")
    server.add_row("Stops", {**network()["Stops"][0], "ID": "k" * 3000})
    rec = sync()
    assert rec.status == "failed"
    assert rec.extra["problems"] == [
        "Stops[ID=4] city: longer than 2000 bytes (3000)",
        "Stops[ID=5] latitude: expected a number, got '0x10'",
        "Stops[ID=V:MAIN:133:28] ID: 'V:MAIN:133:28' starts with V:, which names "
        "gen-virtual's stops and routes",
        f"Stops[ID={'k' * 77}...] ID: longer than 2000 bytes (3000)"]  # the key cut short
    rec = sync(skip_invalid=True)
    assert rec.status == "success", rec.error
    assert rec.counts["stops"] == 38


@pytest.mark.parametrize("change", [
    ("Stops", 7, {"latitude": 95.0}, "Stops[ID=7] latitude: 95.0 is outside -90..90"),
    ("Routes", 3, {"fromStop_ID": 999}, "Routes[ID=3] fromStop_ID: names Stops '999'"),
    ("Flights", 2, {"departure": "25:61"}, "Flights[ID=2] departure: expected a time"),
])
def test_bad_data_aborts_and_writes_nothing(
        sync: Callable[..., RunRecord], server: ODataServer, conn: psycopg.Connection[Any],
        backups: BackupStore, change: tuple[str, int, dict[str, Any], str]) -> None:
    sync()
    before = snapshot(conn)
    objects = set(backups.list("datasets/"))
    entity_set, key, fields, expected = change
    server.update_row(entity_set, key, **fields)
    rec = sync()
    assert rec.status == "failed" and rec.exit_code == 1
    assert "validation failed: 1 problem" in (rec.error or "")
    assert rec.extra["problems"][0].startswith(expected)
    assert snapshot(conn) == before
    assert set(backups.list("datasets/")) == objects


def test_a_key_twice_is_refused_even_when_both_rows_equal_the_read_model(
        sync: Callable[..., RunRecord], server: ODataServer, conn: psycopg.Connection[Any]
        ) -> None:
    """The clean strict path leaves duplicates to the apply: an identical second copy of a
    row changes nothing there, so the row counts must catch it."""
    sync()
    before = snapshot(conn)
    server.add_row("Flights", dict(network()["Flights"][4]))
    rec = sync()
    assert rec.status == "failed", rec.error
    assert rec.extra["problems"] == [
        "Flights[ID=5] ID: key occurs 2 times, the same row each time"]
    assert snapshot(conn) == before


def test_skip_invalid_keeps_one_copy_of_a_row_sent_twice(
        sync: Callable[..., RunRecord], server: ODataServer, conn: psycopg.Connection[Any]
        ) -> None:
    """Offset paging that shifts under an insert sends a row again; --skip-invalid dropped
    every copy, so the stop and every route and flight naming it left the read model."""
    sync()
    before = snapshot(conn)
    server.add_row("Stops", dict(network()["Stops"][0]))
    rec = sync(skip_invalid=True, odata={"count": False})
    assert rec.status == "noop", rec.error
    assert rec.counts["rejected"] == 1 and rec.counts["stops"] == 40
    assert rec.extra["rejects"] == [
        "Stops[ID=1] ID: key occurs 2 times, the same row each time; the first is kept"]
    assert snapshot(conn) == before
    server.add_row("Stops", {**network()["Stops"][0], "name": "other"})  # now they differ
    rec = sync(skip_invalid=True, odata={"count": False})
    assert rec.status == "success" and rec.counts["rejected"] > 3, rec.error
    assert conn.execute("SELECT count(*) AS n FROM stops WHERE id = '1'").fetchone() == {"n": 0}


def test_an_id_that_is_only_part_of_a_composite_key_is_refused_and_says_so(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any]) -> None:
    """SAP's StopSet(Plant='1000',Id='A'): mapped by its Id alone, the stops of two plants
    share ids. They are never merged: strict names the keys and what to map, --skip-invalid
    fails on the count."""
    data = network()
    stops = [{"Plant": "1000", "Id": str(s.pop("ID")), **s} for s in data["Stops"]]
    stops += [{**stops[0], "Plant": "2000"}, {**stops[1], "Plant": "2000", "name": "Other"}]
    mapping = {"stops": {"set": "StopSet", "fields": {"id": "Id"}}}
    with ODataServer({**data, "StopSet": stops}, keys={"StopSet": "Id"}, page_size=15) as srv:
        rec = sync(srv, mapping=mapping)
        assert rec.status == "failed" and rec.extra["problems"] == [
            "StopSet[Id=1] Id: key occurs 2 times, the same row each time",
            "StopSet[Id=2] Id: key occurs 2 times"]
        assert rec.error == (
            "validation failed: 2 problem(s) (StopSet: 2 duplicate); nothing was written; Id "
            "is not unique in StopSet: if it is only part of the set's key (SAP's "
            "StopSet(Plant='1000',Id='A')), [odata.mapping.stops] filter must pick one value "
            "of the other part")
        rec = sync(srv, mapping=mapping, skip_invalid=True)
        assert rec.status == "failed" and "a mapped id that is not the set's key" in str(
            rec.error)
    assert table(conn, "stops") == []


def test_strict_mode_reports_the_first_20_problems_and_all_counts(
        sync: Callable[..., RunRecord], server: ODataServer) -> None:
    for key in range(10, 36):
        server.update_row("Stops", key, longitude=-200)
    server.add_row("Routes", {"ID": 80, "fromStop_ID": 1, "toStop_ID": 2, "mode": "bus",
                              "distanceKm": 1.0})
    server.add_row("Routes", {"ID": 500, "fromStop_ID": 1, "toStop_ID": 404, "mode": "bus",
                              "distanceKm": 1.0})
    rec = sync()
    assert rec.status == "failed"
    assert len(rec.extra["problems"]) == 20
    assert rec.extra["problems"][0] == "Stops[ID=10] longitude: -200.0 is outside -180..180"
    # root causes only: routes naming the invalid stops are not reported a second time
    assert rec.extra["problem_counts"] == {
        "Stops": {"out_of_range": 26}, "Routes": {"duplicate": 1, "unknown_reference": 1}}
    assert "validation failed: 28 problem(s)" in (rec.error or "")


def test_a_route_without_distance_or_flight_is_refused(
        sync: Callable[..., RunRecord], server: ODataServer) -> None:
    # It passed, and then every build-graph failed on it ("no flight and no distance").
    server.update_row("Routes", 6, distanceKm=None)  # route 6 has no flight
    rec = sync()
    assert rec.status == "failed"
    assert rec.extra["problems"] == [
        "Routes[ID=6] distanceKm: no distance and no flight: build-graph cannot weigh the route"]
    server.update_row("Flights", 1, daysOfWeek="9")  # route 1's flights, one of them refused
    server.update_row("Routes", 1, distanceKm=None)
    rec = sync(skip_invalid=True)
    assert rec.status == "success", rec.error
    assert rec.counts["routes"] == 79 and rec.extra["rejected_by_set"]["routes"] == 1


def test_a_distance_beyond_any_route_is_refused(sync: Callable[..., RunRecord],
                                               server: ODataServer) -> None:
    # 1e308 km passed, and build-graph then failed on an infinite weight, misnamed.
    server.update_row("Routes", 6, distanceKm=1e308)
    rec = sync()
    assert rec.status == "failed"
    assert rec.extra["problems"] == ["Routes[ID=6] distanceKm: 1e+308 is outside 0..100000"]


def test_paging_that_repeats_rows_in_place_of_others_fails_even_with_skip_invalid(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    # Page 2 served page 1's rows again: the count held (40 rows), --skip-invalid dropped the
    # repeats as duplicate keys, and stops 16-30 vanished with exit 0, named nowhere.
    sync()
    before = snapshot(conn)
    again = {"value": network()["Stops"][:15], "@odata.count": 40,
             "@odata.nextLink": "Stops?$orderby=ID&$skiptoken=30.0."}
    server.add_fault(wrong_shape(again), entity_set="Stops", match="skiptoken=15.0")
    rec = sync(skip_invalid=True)
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.error == (
        "OData Stops: the server counted 40 entities but its pages held 25 distinct keys (15 "
        "row(s) came again: paging that repeated rows in place of others, or a mapped id that "
        "is not the set's key); --skip-invalid does not drop them, so nothing was written "
        "([odata] count = false skips this check)")
    assert snapshot(conn) == before


def test_a_server_that_repeats_its_first_page_never_loads_it_alone(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any]) -> None:
    """Every nextLink answered with the first page again: with --skip-invalid and count =
    false the repeats were dropped as duplicates and the sync succeeded with the first page's
    stops alone, deleting the others from the read model."""
    assert sync().status == "success"
    before = snapshot(conn)
    with ODataServer(network(), page_size=15) as srv:
        srv.ignore_skiptoken = True
        rec = sync(srv, odata={"count": False}, skip_invalid=True)
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.error == ("OData Stops page 2: the rows of page 1 again (the server's "
                         "nextLink led back to them: a paging loop)")
    assert snapshot(conn) == before


def test_a_count_that_is_no_number_fails_instead_of_switching_the_check_off(
        sync: Callable[..., RunRecord], server: ODataServer) -> None:
    page = {"value": network()["Stops"][:15], "@odata.count": "forty"}
    server.add_fault(wrong_shape(page), entity_set="Stops", match="$count=true")
    rec = sync()
    assert rec.status == "failed" and "Stops page 1: malformed count 'forty'" in (rec.error or "")


def test_a_feed_without_one_valid_stop_never_empties_the_read_model(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    sync()
    before = snapshot(conn)
    for row in network()["Stops"]:
        server.update_row("Stops", row["ID"], latitude=200)
    rec = sync(skip_invalid=True)
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.extra["problems"][0] == (
        "Stops: no valid stops in the feed; refusing to empty the read model")
    assert snapshot(conn) == before


def test_skip_invalid_loads_valid_rows_and_records_rejects(
        sync: Callable[..., RunRecord], server: ODataServer, conn: psycopg.Connection[Any],
        backups: BackupStore) -> None:
    server.update_row("Stops", 7, latitude=None)
    server.update_row("Flights", 3, daysOfWeek="1238")
    server.add_row("Routes", {"ID": 80, "fromStop_ID": 1, "toStop_ID": 2, "mode": "bus"})
    # The server counts route 80 twice: repeats that may stand for rows never sent are not
    # dropped, unless the count is not asked for.
    assert "81 entities but its pages held 80 distinct keys" in (
        sync(skip_invalid=True).error or "")
    rec = sync(skip_invalid=True, odata={"count": False})
    assert rec.status == "success", rec.error
    rejected = rec.counts["rejected"]
    assert rejected >= 4 and rec.counts["stops"] == 39
    assert rec.counts["routes"] + rec.counts["flights"] + 39 + rejected == 40 + 81 + 12
    assert conn.execute("SELECT count(*) AS n FROM stops WHERE id = '7'").fetchone() == {"n": 0}
    assert conn.execute("SELECT count(*) AS n FROM routes WHERE id = '80'").fetchone() == {
        "n": 0}
    assert conn.execute("SELECT count(*) AS n FROM routes WHERE from_stop_id = '7' "
                        "OR to_stop_id = '7'").fetchone() == {"n": 0}
    assert any(r.startswith("Stops[ID=7] latitude: missing") for r in rec.extra["rejects"])
    assert "Routes[ID=80] ID: key occurs 2 times" in rec.extra["rejects"]
    import gzip
    import json
    raw = backups.get_bytes(f"datasets/{rec.extra['dataset_version']}/rejects.jsonl.gz")
    rejects = [json.loads(line) for line in gzip.decompress(raw).splitlines()]
    assert {"set": "Stops", "key": "7", "field": "latitude", "kind": "missing",
            "problem": "missing required value"} in rejects
    assert len(rejects) == rejected
    # the same rejects next time: nothing changed
    assert sync(skip_invalid=True, odata={"count": False}).status == "noop"


def test_dry_run_diffs_and_writes_nothing(
        sync: Callable[..., RunRecord], server: ODataServer, conn: psycopg.Connection[Any],
        backups: BackupStore) -> None:
    sync()
    before = snapshot(conn)
    server.update_row("Routes", 4, mode="tram")
    rec = sync(dry_run=True, store=None)
    assert rec.status == "skipped" and rec.extra["dry_run"] is True
    assert rec.extra["updated"]["routes"] == 1
    assert snapshot(conn) == before
    assert not list(backups.list("datasets/ds-v2/"))


def test_force_makes_a_version_of_an_unchanged_feed(
        sync: Callable[..., RunRecord]) -> None:
    first = sync()
    rec = sync(force=True)
    assert rec.status == "success" and rec.extra["dataset_version"] == "ds-v2"
    assert rec.extra["hash"] == first.extra["hash"]
    assert rec.extra["updated"] == {"stops": 0, "routes": 0, "flights": 0}


def test_restore_round_trip(
        sync: Callable[..., RunRecord], server: ODataServer, conn: psycopg.Connection[Any],
        database_url: str, backups: BackupStore) -> None:
    v1 = sync()
    original = {t: table(conn, t) for t in ("stops", "routes", "flights")}
    server.update_row("Stops", 3, name="changed")
    server.delete_row("Flights", 1)
    assert sync().extra["dataset_version"] == "ds-v2"
    rec = restore(database_url, backups, "ds-v1")
    assert rec.status == "success", rec.error
    assert rec.extra["dataset_version"] == "ds-v3"
    assert rec.extra["hash"] == v1.extra["hash"]
    assert rec.extra["updated"]["stops"] == 1 and rec.extra["inserted"]["flights"] == 1
    assert {t: table(conn, t) for t in ("stops", "routes", "flights")} == original
    rows = {d["version"]: d for d in list_datasets(conn)}
    assert rows["ds-v3"]["active"] and rows["ds-v3"]["source"] == "restore"
    assert rows["ds-v3"]["restored_from"] == "ds-v1"
    assert backups.get_json("datasets/ds-v3/manifest.json")["hash"] == v1.extra["hash"]
    # the restored version is itself restorable, and the source feed (= ds-v2) is a change again
    assert sync().extra["dataset_version"] == "ds-v4"
    again = restore(database_url, backups, "ds-v3")
    assert again.status == "success" and again.extra["hash"] == v1.extra["hash"]


def test_a_version_made_before_migration_015_restores_by_its_row_counts(
        sync: Callable[..., RunRecord], server: ODataServer, conn: psycopg.Connection[Any],
        database_url: str, backups: BackupStore) -> None:
    """Backup format 1 (the row worker's) hashed its canonical rows, not its pages: its raw
    pages replay the same way and are checked by the version's row counts."""
    sync()
    old_hash = "f" * 64
    manifest = backups.get_json("datasets/ds-v1/manifest.json")
    backups.put_json("datasets/ds-v1/manifest.json",
                     {**manifest, "format": "pipeline-dataset/1", "hash": old_hash})
    conn.execute("UPDATE datasets SET hash = %s, set_hashes = '{}', feed_digests = NULL",
                 (old_hash,))
    server.update_row("Stops", 3, name="changed")
    assert sync().extra["dataset_version"] == "ds-v2"
    rec = restore(database_url, backups, "ds-v1")
    assert rec.status == "success", rec.error
    assert rec.extra["hash"] == old_hash and rec.extra["updated"]["stops"] == 1
    conn.execute("UPDATE datasets SET counts = jsonb_set(counts, '{stops}', '39') "
                 "WHERE version = 'ds-v1'")
    rec = restore(database_url, backups, "ds-v1")
    assert rec.status == "failed" and "the row counts of stops differ" in (rec.error or "")


def test_restore_reads_the_pages_with_the_mapping_the_version_was_read_with(
        sync: Callable[..., RunRecord], server: ODataServer, conn: psycopg.Connection[Any],
        database_url: str, backups: BackupStore) -> None:
    # A hand-edited manifest (latitude and longitude swapped) restored swapped coordinates
    # under the same hash; a malformed one was "malformed setting [odata.mapping]", exit 78.
    sync()
    server.update_row("Stops", 3, name="changed")
    assert sync().extra["dataset_version"] == "ds-v2"
    before = snapshot(conn)
    key = "datasets/ds-v1/manifest.json"
    manifest = backups.get_json(key)
    fields = manifest["odata"]["mapping"]["stops"]["fields"]
    fields["latitude"], fields["longitude"] = fields["longitude"], fields["latitude"]
    for odata in (manifest["odata"], {**manifest["odata"], "mapping": "garbage"}):
        backups.put_json(key, {**manifest, "odata": odata})
        rec = restore(database_url, backups, "ds-v1")
        assert rec.status == "failed" and rec.exit_code == 1
        assert rec.error == ("backup datasets/ds-v1/manifest.json does not match ds-v1: its "
                             "OData protocol or mapping is not the one the version was read "
                             "with")
        assert snapshot(conn) == before
    # a version recorded without it: the manifest is read, a malformed one named
    conn.execute("UPDATE datasets SET stats = stats - 'odata'")
    backups.put_json(key, {**manifest, "odata": {**manifest["odata"], "mapping": {"buses": {}}}})
    rec = restore(database_url, backups, "ds-v1")
    assert rec.status == "failed" and rec.exit_code == 1
    assert (rec.error or "").startswith("backup datasets/ds-v1/manifest.json: malformed "
                                        "setting [odata.mapping]"), rec.error


def test_restore_of_a_version_with_rejects_rejects_the_same_rows(
        sync: Callable[..., RunRecord], server: ODataServer, database_url: str,
        backups: BackupStore) -> None:
    # the 7th row of the first and of the second page (15 rows a page)
    server.update_row("Stops", 7, latitude=None)
    server.update_row("Stops", 22, latitude=None)
    first = sync(skip_invalid=True)
    assert first.status == "success", first.error
    assert first.extra["rejected_by_set"]["stops"] == 2
    server.update_row("Stops", 3, name="changed")
    assert sync(skip_invalid=True).extra["dataset_version"] == "ds-v2"
    rec = restore(database_url, backups, "ds-v1")
    assert rec.status == "success", rec.error
    assert rec.counts == first.counts and rec.extra["hash"] == first.extra["hash"]


def test_restore_of_an_unknown_version_or_a_corrupt_backup_writes_nothing(
        sync: Callable[..., RunRecord], server: ODataServer, conn: psycopg.Connection[Any],
        database_url: str, backups: BackupStore) -> None:
    sync()
    rec = restore(database_url, backups, "ds-v9")
    assert rec.status == "failed" and "no dataset version 'ds-v9'" in (rec.error or "")
    import gzip
    data = gzip.decompress(backups.get_bytes("datasets/ds-v1/raw/stops.json-seq.gz"))
    backups.put_bytes("datasets/ds-v1/raw/stops.json-seq.gz",
                      gzip.compress(data.replace(b"Helsinki", b"Helsingfors", 1)))
    before = snapshot(conn)
    rec = restore(database_url, backups, "ds-v1")
    assert rec.status == "failed"
    assert "corrupt" in (rec.error or "") and "stops" in (rec.error or "")
    assert snapshot(conn) == before
    # A damaged file (cut short, or no gzip at all) was "internal error: EOFError", unnamed.
    whole = gzip.compress(data)
    for damaged in (whole[:len(whole) // 2], b"not gzip"):
        backups.put_bytes("datasets/ds-v1/raw/stops.json-seq.gz", damaged)
        rec = restore(database_url, backups, "ds-v1")
        assert rec.status == "failed" and rec.exit_code == 1, rec.error
        assert (rec.error or "").startswith(
            "backup datasets/ds-v1/raw/stops.json-seq.gz is damaged: "), rec.error
        assert snapshot(conn) == before


def test_backup_failure_rolls_back_and_the_next_run_reuses_the_version(
        sync: Callable[..., RunRecord], server: ODataServer, conn: psycopg.Connection[Any],
        s3: S3Endpoint, s3_bucket: str, backups: BackupStore) -> None:
    host, port = s3.endpoint.rsplit(":", 1)
    with TcpProxy(host, int(port)) as proxy:
        store = BackupStore.connect(f"127.0.0.1:{proxy.port}", s3.access_key, s3.secret_key,
                                    s3_bucket, secure=s3.secure, region=s3.region,
                                    timeout=3)
        store.ensure_bucket()
        proxy.block()
        rec = sync(store=store)
        assert rec.status == "failed" and rec.exit_code == 1
        assert (rec.error or "").startswith("S3 ")
        assert table(conn, "datasets") == [] and table(conn, "stops") == []
        proxy.unblock()
        rec = sync(store=store)
    assert rec.status == "success" and rec.extra["dataset_version"] == "ds-v1"
    assert backups.get_json("datasets/ds-v1/manifest.json")["hash"] == rec.extra["hash"]


def test_a_version_this_database_never_made_is_kept_and_its_number_skipped(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any],
        backups: BackupStore) -> None:
    """Two deployments on one bucket, or a database restored from an older backup, number
    their versions alike: the next sync overwrote a committed backup in silence (found only
    by a later restore). An orphan of a crashed run here is still reused."""
    assert sync().status == "success"
    theirs = backups.get_bytes("datasets/ds-v1/manifest.json")
    # This database as another deployment's would be: no versions, no runs of its own.
    conn.execute("TRUNCATE datasets, stage_runs CASCADE")
    rec = sync()
    assert rec.status == "success" and rec.extra["dataset_version"] == "ds-v2", rec.error
    assert backups.get_bytes("datasets/ds-v1/manifest.json") == theirs
    assert [r["version"] for r in table(conn, "datasets")] == ["ds-v2"]


def test_source_failure_writes_nothing(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    server.add_fault(status(503), entity_set="Flights", times=None)
    rec = sync()
    assert rec.status == "failed"
    assert rec.error == (f"OData {endpoint(server.url)} Flights page 1: HTTP 503 Injected503: "
                         "injected fault: HTTP 503 after 5 attempts")
    assert table(conn, "stops") == [] and table(conn, "datasets") == []


def test_a_sync_through_a_proxy_keeps_its_password_out_of_the_run_history(
        sync: Callable[..., RunRecord], server: ODataServer,
        conn: psycopg.Connection[Any]) -> None:
    secret = "proxy-Secret-9"
    with ForwardHttpProxy(username="etl", password=secret) as proxy:
        proxied = {"proxy": f"http://etl:{secret}@127.0.0.1:{proxy.port}"}
        rec = sync(odata=proxied)
        assert rec.status == "success", rec.error
        assert len(proxy.forwarded) == len(server.requests) > 3  # every request, every set
        proxy.status = 502
        rec = sync(odata=proxied, force=True)
    assert rec.status == "failed" and rec.error is not None
    assert rec.error.endswith(f"proxy {proxy.url} ([odata] proxy): HTTP 502 after 5 attempts")
    rows = conn.execute("SELECT * FROM stage_runs").fetchall()
    assert len(rows) == 2 and secret not in repr(rows)


def test_a_service_that_refuses_orderby_syncs_with_orderby_false(
        sync: Callable[..., RunRecord], server: ODataServer) -> None:
    server.refuse_orderby = 400
    rec = sync()
    assert rec.status == "failed" and "[odata] orderby = false leaves $orderby out" in str(
        rec.error)
    first = sync(odata={"orderby": False})
    assert first.status == "success", first.error
    assert first.counts == {"stops": 40, "routes": 80, "flights": 12, "rejected": 0}
    assert sync(odata={"orderby": False}).status == "noop"  # its page digests match
    assert not any("orderby" in r.target for r in server.requests if r.entity_set != "Stops")
    mappings = resolve_mapping(None)
    with client_for(server) as ordered, client_for(server, orderby=False) as unordered:
        # the page digests of one are no use to the other: the server orders them otherwise
        assert feed_key(ordered, mappings) != feed_key(unordered, mappings)


def test_a_service_that_refuses_select_syncs_with_select_false(
        sync: Callable[..., RunRecord], server: ODataServer) -> None:
    # ASP.NET Core OData allows only the query options its service enables; a service that
    # refused $select could not be read at all.
    server.add_fault(status(400, message="Query option 'Select' is not allowed. To allow it, "
                            "set the 'AllowedQueryOptions' property on EnableQueryAttribute"),
                     match="select=", times=None)
    rec = sync()
    assert rec.status == "failed" and "[odata] select = false leaves $select out)" in str(
        rec.error)
    first = sync(odata={"select": False})
    assert first.status == "success", first.error
    assert first.counts == {"stops": 40, "routes": 80, "flights": 12, "rejected": 0}
    assert sync(odata={"select": False}).status == "noop"
    server.clear_faults()
    server.add_fault(status(400, message="Could not find a property named 'isAirprt' for "
                            "$select"), entity_set="Stops")  # a name, not the option
    assert "select = false" not in str(sync().error)


@pytest.mark.parametrize("version", ["v4", "v2"])
def test_client_paging_syncs_a_service_that_does_not_page(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any], version: str) -> None:
    client_paged = {"paging": "client", "page_size": 15}
    with ODataServer(network(), version=version) as srv:
        srv.server_paging = False
        first = sync(srv, odata=client_paged)
        assert first.status == "success", first.error
        assert first.counts == {"stops": 40, "routes": 80, "flights": 12, "rejected": 0}
        # digests of every page, the empty last one too, under the client-paged URLs' key
        mappings = resolve_mapping(None)
        with client_for(srv) as server_paged, client_for(srv, **client_paged) as paged:
            key = feed_key(paged, mappings)
            assert feed_key(server_paged, mappings) != key  # switching modes changes it
        digests = conn.execute("SELECT feed_digests FROM datasets").fetchone()["feed_digests"]
        assert digests["key"] == key and len(digests["pages"]["stops"]) == 4 * 32
        assert sync(srv, odata=client_paged).status == "noop"
        assert sync(srv).status == "noop"  # one page per set: other pages, the same rows


def test_client_paging_still_checks_the_count(
        sync: Callable[..., RunRecord], server: ODataServer) -> None:
    stops = network()["Stops"]
    server.add_fault(wrong_shape({"@odata.count": len(stops) + 1, "value": stops}),
                     entity_set="Stops")  # the first page; $skip=40 then finds none
    rec = sync(odata={"paging": "client", "page_size": 15})
    assert rec.status == "failed" and rec.error is not None
    assert rec.error.startswith(f"OData Stops: the server counted {len(stops) + 1} entities "
                                f"but its pages held {len(stops)}")
    assert [r.query.get("$skip") for r in server.requests if r.entity_set == "Stops"] == [
        None, "40"]


def test_route_modes_as_enum_members_have_their_speeds(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any]) -> None:
    """A mode that is an OData enum comes as its member's name: ASP.NET Core OData writes the
    CLR name (CableCar), NeTEx's submodes are camelCase (urbanRailway), Business Central's
    API v2.0 XML-encodes a blank (Light_x0020_Rail). Each is a known mode, not a note."""
    modes = ["CableCar", "LightRail", "Light_x0020_Rail", "urbanRailway", "trolleyBus",
             "SBahn", "Water_x0020_Taxi"]
    data = network()
    for route, mode in zip(data["Routes"][1:], modes, strict=False):
        route["mode"] = mode
    with ODataServer(data, page_size=15) as srv:
        rec = sync(srv)
    assert rec.status == "success", rec.error
    assert rec.extra["unknown_modes"] == {}
    stored = {r["id"]: r["mode"] for r in table(conn, "routes")}
    assert [stored[str(i)] for i in range(2, 9)] == modes  # stored as sent


def test_mapping_renames_sets_and_fields_and_filters(
        database_url: str, backups: BackupStore, conn: psycopg.Connection[Any]) -> None:
    data = sample_network(30)
    stops = [{"Ref_Key": s["ID"], "Description": s["name"], "Lat": s["latitude"],
              "Lon": s["longitude"], "Active": s["ID"] != 30} for s in data["Stops"]]
    routes = [r for r in data["Routes"] if 30 not in (r["fromStop_ID"], r["toStop_ID"])]
    mapping = {
        "stops": {"set": "Ostanovki", "filter": "Active eq true",
                  "fields": {"id": "Ref_Key", "name": "Description", "latitude": "Lat",
                             "longitude": "Lon", "is_airport": "", "city": ""}},
    }
    with ODataServer({"Ostanovki": stops, "Routes": routes, "Flights": data["Flights"]},
                     keys={"Ostanovki": "Ref_Key"}, page_size=8) as srv, \
            client_for(srv) as client:
        rec = run(database_url, lambda ctx: sync_odata(Database(database_url), client, backups, ctx,
                                                       mapping=mapping))
    assert rec.status == "success", rec.error
    assert rec.counts["stops"] == 29
    row = conn.execute("SELECT * FROM stops WHERE id = '1'").fetchone()
    assert row is not None and row["city"] is None and row["is_airport"] is False
    assert row["name"] == data["Stops"][0]["name"]


def test_string_keys_with_quotes_guids_and_numbers_as_text_load_and_are_named(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any]) -> None:
    # Keys are texts: a quote stays a quote, a GUID a string, and a route naming stop 1 by
    # the number 1 (V4 Edm.Int32) finds the stop whose key is "1" (V2 Edm.String).
    data = network()
    keys = {1: "1", 2: "O'Brien", 3: "5f0e4a1c-e2c1-4a7b-9d1e-0c2a7f3b8e11", 4: 'Q"uo\\te'}
    for stop in data["Stops"]:
        stop["ID"] = keys.get(stop["ID"], stop["ID"])
    for route in data["Routes"]:
        route["fromStop_ID"] = keys.get(route["fromStop_ID"], route["fromStop_ID"])
        if route["toStop_ID"] != 1:
            route["toStop_ID"] = keys.get(route["toStop_ID"], route["toStop_ID"])
    data["Stops"][1]["latitude"] = 95.0
    with ODataServer(data, page_size=15) as srv:
        rec = sync(srv)
        assert rec.status == "failed" and rec.extra["problems"] == [
            "Stops[ID=O'Brien] latitude: 95.0 is outside -90..90"]
        srv.update_row("Stops", "O'Brien", latitude=60.0)
        assert sync(srv).status == "success"
    ids = {r["id"] for r in table(conn, "stops")}
    assert set(keys.values()) <= ids
    assert {r["to_stop_id"] for r in table(conn, "routes")} >= {"1", "O'Brien"}


def test_an_empty_page_with_a_next_link_is_read_past(
        sync: Callable[..., RunRecord], server: ODataServer, conn: psycopg.Connection[Any]
        ) -> None:
    # A server that filters after paging sends an empty page with a link to the rest.
    server.add_fault(wrong_shape({"value": [], "@odata.nextLink":
                                  "Stops?$orderby=ID&$skiptoken=15.0.&again=1"}),
                     entity_set="Stops", match="skiptoken=15.0.")
    rec = sync()
    assert rec.status == "success", rec.error
    assert server.pending_faults() == 0
    assert len(table(conn, "stops")) == 40


def test_mapping_takes_names_in_any_script(
        database_url: str, backups: BackupStore, conn: psycopg.Connection[Any]) -> None:
    """A 1C:Enterprise service names its sets and fields in Cyrillic."""
    data = sample_network(30)
    stops = [{"Ref_Key": s["ID"], "Наименование": s["name"], "Широта": s["latitude"],
              "Долгота": s["longitude"]} for s in data["Stops"]]
    mapping = {"stops": {"set": "Catalog_Остановки",
                         "fields": {"id": "Ref_Key", "name": "Наименование", "latitude": "Широта",
                                    "longitude": "Долгота", "is_airport": "", "city": ""}}}
    with ODataServer({"Catalog_Остановки": stops, "Routes": data["Routes"],
                      "Flights": data["Flights"]}, keys={"Catalog_Остановки": "Ref_Key"},
                     page_size=8) as srv, client_for(srv) as client:
        rec = run(database_url, lambda ctx: sync_odata(Database(database_url), client, backups, ctx,
                                                       mapping=mapping))
    assert rec.status == "success", rec.error
    row = conn.execute("SELECT * FROM stops WHERE id = '1'").fetchone()
    assert row is not None and row["name"] == data["Stops"][0]["name"]
    assert row["latitude"] == data["Stops"][0]["latitude"]


# The TripPin-shaped Airports (devtools/odata_data.py): positions and city names inside
# complex values, read through paths.
TRIPPIN: dict[str, Any] = {"stops": {"set": "Airports", "fields": {
    "id": "IcaoCode", "name": "Name", "latitude": "Location/Loc/coordinates/1",
    "longitude": "Location/Loc/coordinates/0", "city": "Location/City/Name", "is_airport": ""}}}


def trippin(version: str = "v4") -> ODataServer:
    data = network()
    return ODataServer({"Airports": trippin_airports(data["Stops"]), "Routes": data["Routes"],
                        "Flights": data["Flights"]}, version=version,
                       keys={"Airports": "IcaoCode"}, page_size=15)


def trippin_with(**fields: str) -> dict[str, Any]:
    return {"stops": {**TRIPPIN["stops"], "fields": {**TRIPPIN["stops"]["fields"], **fields}}}


@pytest.mark.parametrize("version", ["v4", "v2"])
def test_paths_read_positions_and_names_inside_complex_values(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any], version: str) -> None:
    with trippin(version) as srv:
        with client_for(srv) as client:  # V2 gives each complex value its own __metadata
            row = next(iter(client.pages("Airports", select=["Location"]))).rows[0]
        assert ("__metadata" in row["Location"]["City"]) == (version == "v2")
        srv.reset_requests()
        rec = sync(srv, mapping=TRIPPIN)
        assert rec.status == "success", rec.error
        assert rec.counts == {"stops": 40, "routes": 80, "flights": 12, "rejected": 0}
        # Location once, however many columns read from it
        assert [r.target.split("&")[0] for r in srv.requests if r.entity_set == "Airports"][
            0] == "/odata/Airports?$select=IcaoCode,Location,Name"
        assert sync(srv, mapping=TRIPPIN).status == "noop"
    stops = {s["ID"]: s for s in network()["Stops"]}
    assert [(r["name"], r["latitude"], r["longitude"], r["city"], r["is_airport"])
            for r in table(conn, "stops")] == [
        (s["name"], s["latitude"], s["longitude"], s["city"], False)
        for s in sorted(stops.values(), key=lambda s: str(s["ID"]))]


def test_a_null_or_missing_nested_value_is_a_problem_named_by_its_path(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any]) -> None:
    with trippin() as srv:
        loc = srv.rows("Airports")[0]["Location"]
        srv.update_row("Airports", "3", Location=None)
        srv.update_row("Airports", "5", Location={k: v for k, v in loc.items() if k != "Loc"})
        srv.update_row("Airports", "6", Location={**loc, "Loc": {"coordinates": [24.9]}})
        srv.update_row("Airports", "7", Location={**loc, "City": {"Name": True}})
        srv.update_row("Airports", "8", Location={**loc, "City": {"Name": "true"}})  # a name
        srv.update_row("Airports", "9", Location={**loc, "City": None})  # city is optional
        rec = sync(srv, mapping=TRIPPIN)
        assert rec.status == "failed" and rec.extra["problems"] == [
            "Airports[IcaoCode=3] Location/Loc/coordinates/1: missing required value",
            "Airports[IcaoCode=3] Location/Loc/coordinates/0: missing required value",
            "Airports[IcaoCode=5] Location/Loc/coordinates/1: missing required value",
            "Airports[IcaoCode=5] Location/Loc/coordinates/0: missing required value",
            "Airports[IcaoCode=6] Location/Loc/coordinates/1: missing required value",
            "Airports[IcaoCode=7] Location/City/Name: expected text, got true"], rec.error
        rec = sync(srv, mapping=TRIPPIN, skip_invalid=True)
    assert rec.status == "success" and rec.counts["stops"] == 36, rec.error
    stops = {r["id"]: r for r in table(conn, "stops")}
    assert stops["8"]["city"] == "true" and stops["9"]["city"] is None
    assert not {"3", "5", "6", "7"} & set(stops)


@pytest.mark.parametrize(("path", "named"), [
    ("Locaton/Loc/coordinates/1",
     "'Locaton/Loc/coordinates/1' (latitude; did you mean 'Location/Loc/coordinates/1'?)"),
    ("Location/Lco/coordinates/1", "'Location/Lco/coordinates/1' (latitude)"),
    ("Location/Loc/coordinates/x", "'Location/Loc/coordinates/x' (latitude)"),
])
def test_a_mapped_path_no_entity_has_is_named_not_read_as_null(
        sync: Callable[..., RunRecord], path: str, named: str) -> None:
    with trippin() as srv:
        srv.ignore_select = True  # a service that ignores a $select naming no property
        rec = sync(srv, mapping=trippin_with(latitude=path), skip_invalid=True)
    assert rec.status == "failed" and rec.error == (
        f"OData Airports: no entity has the field(s) {named} of [odata.mapping.stops.fields]; "
        "map each to the service's name (or an optional one to \"\" to leave it out); nothing "
        "was written")


def test_a_reference_may_be_a_path(sync: Callable[..., RunRecord],
                                   conn: psycopg.Connection[Any]) -> None:
    data = network()
    data["Routes"] = [{**r, "Ends": {"From": r["fromStop_ID"], "To": [r["toStop_ID"]]}}
                      for r in data["Routes"]]
    mapping = {"routes": {"fields": {"from_stop_id": "Ends/From", "to_stop_id": "Ends/To/0"}}}
    with ODataServer(data, page_size=15) as srv:
        assert sync(srv, mapping=mapping).status == "success"
        assert [(r["from_stop_id"], r["to_stop_id"]) for r in table(conn, "routes")] == [
            (str(r["fromStop_ID"]), str(r["toStop_ID"]))
            for r in sorted(data["Routes"], key=lambda r: str(r["ID"]))]
        srv.update_row("Routes", 2, Ends={"From": 1, "To": [999]})
        rec = sync(srv, mapping=mapping)
    assert rec.extra["problems"] == [
        "Routes[ID=2] Ends/To/0: names Stops '999', which is not in the feed"], rec.error


def test_a_version_read_through_paths_restores_with_them(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any], database_url: str,
        backups: BackupStore) -> None:
    with trippin() as srv:
        v1 = sync(srv, mapping=TRIPPIN)
        original = {t: table(conn, t) for t in ("stops", "routes", "flights")}
        srv.update_row("Airports", "3", Name="changed")
        assert sync(srv, mapping=TRIPPIN).extra["dataset_version"] == "ds-v2"
    manifest = backups.get_json("datasets/ds-v1/manifest.json")
    assert manifest["odata"]["mapping"]["stops"]["fields"]["latitude"] == \
        "Location/Loc/coordinates/1"
    rec = restore(database_url, backups, "ds-v1")
    assert rec.status == "success" and rec.extra["hash"] == v1.extra["hash"], rec.error
    assert {t: table(conn, t) for t in ("stops", "routes", "flights")} == original


def test_the_feed_key_changes_with_a_path(server: ODataServer) -> None:
    # page digests read with latitude and longitude swapped must not vouch for these
    swapped = trippin_with(latitude="Location/Loc/coordinates/0",
                           longitude="Location/Loc/coordinates/1")
    with client_for(server) as client:
        assert feed_key(client, resolve_mapping(TRIPPIN)) != feed_key(
            client, resolve_mapping(swapped))


def test_without_a_path_a_page_is_read_as_before_paths(conn: psycopg.Connection[Any]) -> None:
    """page_insert runs for every value of a 200 k-row feed: without a path mapped, each
    field is json_to_recordset's text itself, with no lateral subquery (the statement is the
    one from before paths); with one, the lateral reads the paths once per row."""
    rows = sample_network_lazy(200_000)["Stops"][:1000]
    plans = {}
    with conn.transaction():
        conn.execute(db.query("sync_odata", "create_stage").format(
            stage=sql.Identifier("stage_stops"), target=sql.Identifier("stops"),
            cols=sql.SQL("id, name, latitude, longitude, is_airport, city")))
        for name, mapping, page in (("plain", None, rows),
                                    ("paths", TRIPPIN, trippin_airports(rows))):
            insert = _Set("stops", resolve_mapping(mapping)["stops"], "v4", Path("-")).page_insert
            params = {"page": json.dumps({"value": page}), "base": 0}
            plans[name] = "\n".join(r["QUERY PLAN"] for r in conn.execute(
                b"EXPLAIN (COSTS OFF) " + insert, params))
            if name == "plain":
                assert insert.decode().endswith(
                    "ROWS FROM (json_to_recordset(p -> 'value') AS (\"ID\" text, \"city\" text, "
                    "\"isAirport\" text, \"latitude\" text, \"longitude\" text, \"name\" text)) "
                    "WITH ORDINALITY AS x(\"f0\", \"f1\", \"f2\", \"f3\", \"f4\", \"f5\", n)\n"
                    "    OFFSET 0\n) s")
            conn.execute(insert, params)
        staged = conn.execute("SELECT count(*) AS n, count(bad) AS bad, "
                              "count(DISTINCT (latitude, longitude, city)) AS same "
                              "FROM stage_stops").fetchone()
    assert staged == {"n": 2000, "bad": 0, "same": 1000}  # the same values both ways
    assert plans == {  # one function scan per page; a path adds a projection per row
        "plain": "Insert on stage_stops\n  ->  Subquery Scan on s\n"
                 "        ->  Function Scan on json_to_recordset x",
        "paths": "Insert on stage_stops\n  ->  Subquery Scan on s\n        ->  Nested Loop\n"
                 "              ->  Function Scan on json_to_recordset x\n"
                 "              ->  Result"}


def test_the_read_rules_are_inlined_into_the_staging_statement(
        conn: psycopg.Connection[Any]) -> None:
    """Each sync_* rule runs for every value of the feed: PostgreSQL inlines an SQL function
    (a few expressions per value) unless its body is more volatile than it is declared, and
    then each value is a function call of its own, about three times the cost. Only the slow
    paths, for values in another notation, may be calls."""
    with conn.transaction():
        for e in ENTITIES:
            conn.execute(db.query("sync_odata", "create_stage").format(
                stage=sql.Identifier(f"stage_{e}"), target=sql.Identifier(e),
                cols=sql.SQL(", ").join(map(sql.Identifier, COLUMNS[e]))))
            insert = _Set(e, resolve_mapping(None)[e], "v4", Path("-")).page_insert
            plan = "\n".join(r["QUERY PLAN"] for r in conn.execute(
                b"EXPLAIN (VERBOSE, COSTS OFF) " + insert,
                {"page": json.dumps({"value": []}), "base": 0}))
            calls = set(re.findall(r"\b(sync_\w+)\(", plan))
            assert calls <= {"sync_number_slow", "sync_time_slow", "sync_days_slow"}, (e, calls)


def test_status_section(sync: Callable[..., RunRecord], conn: psycopg.Connection[Any]) -> None:
    assert status_section(conn)["active"] is None
    sync()
    section = status_section(conn)
    assert section["active"]["version"] == "ds-v1"
    assert section["active"]["counts"]["stops"] == 40
    assert section["versions"] == 1 and section["last_backup_age_s"] >= 0


@pytest.mark.parametrize(("version", "page", "where"), [
    ("v4", {"value": None}, "'value'"), ("v2", {"d": {"results": None}}, "'d.results'")])
def test_a_page_whose_entities_are_null_names_the_set_and_page_url(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any], version: str,
        page: dict[str, Any], where: str) -> None:
    # {"value": null} on a later page failed as "expected a list of entities, got NoneType".
    with ODataServer(network(), version=version, page_size=15) as srv:
        assert sync(srv).status == "success"
        before = snapshot(conn)
        srv.update_row("Stops", 1, name="changed")
        srv.add_fault(wrong_shape(page), entity_set="Stops", match="skiptoken=15.")
        rec = sync(srv)
        url = next(r.target for r in srv.requests[::-1] if "skiptoken=15." in r.target)
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.error == (f"OData Stops page 2: expected a list of entities in {where}, got "
                         f"null ({srv.url.removesuffix('/odata/')}{url})")
    assert snapshot(conn) == before


@pytest.mark.parametrize("version", ["v4", "v2"])
def test_a_property_left_out_when_null_reads_as_null_when_metadata_declares_it(
        sync: Callable[..., RunRecord], conn: psycopg.Connection[Any], version: str) -> None:
    # A service that leaves nulls out (OData 4.01 omit-values=nulls, Dataverse): a city null
    # in every stop failed as "no entity has the field 'city'", a typo's error.
    data = network()
    for row in data["Stops"]:
        row["city"] = None
    with ODataServer(data, version=version, page_size=15) as srv:
        srv.omit_nulls = True
        rec = sync(srv)
        assert rec.status == "success", rec.error
        assert {r["city"] for r in table(conn, "stops")} == {None}
        before = snapshot(conn)
        srv.set_rows("Flights", [{**r, "daysOfWeek": None} for r in data["Flights"]])
        rec = sync(srv)  # a required column left out everywhere: null, named by key
    assert rec.status == "failed" and rec.exit_code == 1
    assert rec.extra["problem_counts"] == {"Flights": {"missing": 12}}
    assert rec.extra["problems"][0].startswith("Flights[ID=1] daysOfWeek: ")
    assert snapshot(conn) == before
