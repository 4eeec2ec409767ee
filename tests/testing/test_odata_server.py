"""The OData fixture server over real HTTP: paging in V4 and V2, query options, auth, faults.

Other tests trust this server to behave like a real OData service, so its protocol and its
fault injection are checked here with a plain ``requests`` client.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests

from devtools import odata_server as od
from devtools.odata_data import (
    AIRPORTS,
    CITIES,
    haversine_km,
    sample_network,
    sample_network_lazy,
    write_feed,
)
from devtools.odata_server import ODataServer

TIMEOUT = 10
NETWORK = sample_network(120, seed=7)
ServerFactory = Callable[..., ODataServer]


@pytest.fixture
def serve() -> Iterator[ServerFactory]:
    """Start servers on free ports; stop them after the test and fail on internal errors."""
    started: list[ODataServer] = []

    def start(data: Any = NETWORK, **options: Any) -> ODataServer:
        server = ODataServer(data, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
    for server in started:
        assert server.errors == []


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def _rows(body: dict[str, Any]) -> list[dict[str, Any]]:
    return body["value"] if "value" in body else body["d"]["results"]


def _next(body: dict[str, Any]) -> str | None:
    if "d" in body:
        return body["d"].get("__next")
    return body.get("@odata.nextLink")


def pull(
    http: requests.Session,
    server: ODataServer,
    first: str,
    max_pages: int = 1000,
    params: dict[str, str] | None = None,
    **kw: Any,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Follow nextLinks from ``first`` (relative to the service root); return rows and links.

    ``params`` go on the first request only: nextLinks carry the options themselves.
    """
    rows: list[dict[str, Any]] = []
    links: list[str] = []
    url: str | None = urljoin(server.url, first)
    while url is not None and len(links) < max_pages:
        r = http.get(url, timeout=TIMEOUT, params=params if not links else None, **kw)
        assert r.status_code == 200, r.text
        body = r.json()
        rows.extend(_rows(body))
        link = _next(body)
        if link is not None:
            links.append(link)
        url = None if link is None else urljoin(server.url, link)
    return rows, links


# -- paging -----------------------------------------------------------------------------
@pytest.mark.parametrize("next_link", ["absolute", "relative"])
def test_v4_paging_follows_opaque_next_links(
    serve: ServerFactory, http: requests.Session, next_link: str
) -> None:
    server = serve(page_size=25, next_link=next_link)
    rows, links = pull(http, server, "Stops")
    assert [r["ID"] for r in rows] == [s["ID"] for s in NETWORK["Stops"]]
    assert len(links) == math.ceil(120 / 25) - 1
    if next_link == "absolute":
        assert all(link.startswith(server.url + "Stops?$skiptoken=") for link in links)
    else:
        assert all(link.startswith("Stops?$skiptoken=") for link in links)
    # the client followed the links: every later request carries a token and never $skip
    later = server.requests[1:]
    assert len(later) == len(links)
    assert all("$skiptoken" in r.query and "$skip" not in r.query for r in later)
    assert server.request_count("Stops") == len(links) + 1


@pytest.mark.parametrize("next_link", ["absolute", "relative"])
def test_v2_paging_uses_d_results_and_next(
    serve: ServerFactory, http: requests.Session, next_link: str
) -> None:
    server = serve(version="v2", page_size=50, next_link=next_link)
    r = http.get(server.url + "Routes?$format=json&$inlinecount=allpages", timeout=TIMEOUT)
    assert r.headers["DataServiceVersion"] == "2.0"
    body = r.json()
    assert body["d"]["__count"] == str(len(NETWORK["Routes"]))
    assert body["d"]["results"][0]["__metadata"]["type"] == "Pipeline.Fixture.Route"
    assert body["d"]["__next"].startswith(server.url if next_link == "absolute" else "Routes?")
    rows, _ = pull(http, server, "Routes?$format=json")
    assert [r["ID"] for r in rows] == [r["ID"] for r in NETWORK["Routes"]]


@pytest.mark.parametrize(("n_rows", "empty_last_page", "sizes"), [
    (20, True, [10, 10, 0]),
    (20, False, [10, 10]),
    (25, True, [10, 10, 5]),
    (0, True, [0]),
])  # fmt: skip
def test_empty_last_page_on_exact_boundary(
    serve: ServerFactory,
    http: requests.Session,
    n_rows: int,
    empty_last_page: bool,
    sizes: list[int],
) -> None:
    rows = [{"ID": i, "name": f"s{i}"} for i in range(n_rows)]
    server = serve({"Stops": rows}, page_size=10, empty_last_page=empty_last_page)
    got: list[int] = []
    url: str | None = server.url + "Stops"
    while url is not None:
        body = http.get(url, timeout=TIMEOUT).json()
        got.append(len(body["value"]))
        url = body.get("@odata.nextLink")
    assert got == sizes


def test_top_skip_count_and_select_with_paging(
    serve: ServerFactory, http: requests.Session
) -> None:
    server = serve(page_size=10)
    rows, links = pull(http, server, "Stops?$skip=5&$top=25&$count=true&$select=ID,city")
    assert [r["ID"] for r in rows] == list(range(6, 31))
    assert len(links) == 2 and all("$top=25" in link and "$skip=5" in link for link in links)
    assert set(rows[0]) == {"ID", "city"}
    body = http.get(server.url + "Stops?$count=true&$top=1", timeout=TIMEOUT).json()
    assert body["@odata.count"] == 120 and "@odata.nextLink" not in body
    assert body["@odata.context"].endswith("$metadata#Stops")
    r = http.get(server.url + "Stops/$count?$filter=isAirport eq true", timeout=TIMEOUT)
    assert r.text == str(len(AIRPORTS))


def test_orderby_is_stable_by_key(serve: ServerFactory, http: requests.Session) -> None:
    server = serve(page_size=7)
    rows, _ = pull(http, server, "Routes?$orderby=mode desc,distanceKm")
    expected = sorted(NETWORK["Routes"], key=lambda r: r["ID"])
    expected.sort(key=lambda r: r["distanceKm"])
    expected.sort(key=lambda r: r["mode"], reverse=True)
    assert [r["ID"] for r in rows] == [r["ID"] for r in expected]
    rows, _ = pull(http, server, "Stops?$orderby=city")
    by_city = [(r["city"], r["ID"]) for r in rows]
    assert by_city == sorted(by_city)  # ties in city come in key order


def test_prefer_maxpagesize_is_honoured(serve: ServerFactory, http: requests.Session) -> None:
    server = serve(page_size=50)
    r = http.get(server.url + "Stops", headers={"Prefer": "odata.maxpagesize=20"}, timeout=TIMEOUT)
    assert len(r.json()["value"]) == 20
    assert r.headers["Preference-Applied"] == "odata.maxpagesize=20"


def test_lazy_sets_page_without_materialising(serve: ServerFactory, http: requests.Session) -> None:
    lazy = sample_network_lazy(200_000)
    server = serve({"Routes": lazy["Routes"]}, page_size=5000)
    start = time.perf_counter()
    body = http.get(server.url + "Routes?$orderby=ID&$count=true", timeout=TIMEOUT).json()
    assert time.perf_counter() - start < 2
    assert body["@odata.count"] == 400_000
    assert body["value"] == lazy["Routes"][:5000]


# -- $filter ----------------------------------------------------------------------------
@pytest.mark.parametrize(("expr", "check"), [
    ("city eq 'Helsinki'", lambda r: r["city"] == "Helsinki"),
    ("ID eq 5", lambda r: r["ID"] == 5),
    ("city ne 'Helsinki'", lambda r: r["city"] != "Helsinki"),
    ("isAirport eq true", lambda r: r["isAirport"]),
    ("name eq 'O''Hare'", lambda r: False),
    ("city eq null", lambda r: False),
])  # fmt: skip
def test_filter(
    serve: ServerFactory, http: requests.Session, expr: str, check: Callable[[Any], bool]
) -> None:
    server = serve(page_size=30)
    rows, _ = pull(http, server, "Stops", params={"$filter": expr})
    assert [r["ID"] for r in rows] == [r["ID"] for r in NETWORK["Stops"] if check(r)]


@pytest.mark.parametrize("expr", [
    "startswith(name, 'Hel')",
    "substringof('Hel', name)",
    "city eq 'Helsinki' and",
    "isAirport eq true and city eq 'Oulu'",
    "latitude ge 64.5",
    "nosuchfield eq 1",
    "city = 'x'",
    "route/ID eq 1",
])  # fmt: skip
@pytest.mark.parametrize("version", ["v4", "v2"])
def test_unsupported_filter_is_an_odata_400(
    serve: ServerFactory, http: requests.Session, expr: str, version: str
) -> None:
    server = serve(version=version)
    r = http.get(server.url + "Stops", params={"$filter": expr}, timeout=TIMEOUT)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"]
    message = error["message"] if version == "v4" else error["message"]["value"]
    assert isinstance(message, str) and message


@pytest.mark.parametrize("query", [
    "$orderby=nosuch", "$orderby=ID sideways", "$select=ID,nosuch", "$top=-1", "$skip=x",
    "$expand=Routes", "$top=1&$top=2", "$format=atom", "$inlinecount=allpages", "$count=maybe",
])  # fmt: skip
def test_bad_query_options_are_rejected(
    serve: ServerFactory, http: requests.Session, query: str
) -> None:
    server = serve()
    r = http.get(f"{server.url}Stops?{query}", timeout=TIMEOUT)
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"code", "message"}


def test_unknown_paths_and_methods(serve: ServerFactory, http: requests.Session) -> None:
    server = serve()
    r = http.get(server.url + "Nope", timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "NotFound"
    assert http.get(server.url.replace("/odata/", "/other/"), timeout=TIMEOUT).status_code == 404
    assert http.post(server.url + "Stops", json={}, timeout=TIMEOUT).status_code == 405


# -- documents and value formats ----------------------------------------------------------
@pytest.mark.parametrize("version", ["v4", "v2"])
def test_service_document(
    serve: ServerFactory, http: requests.Session, version: str
) -> None:
    server = serve(version=version)
    body = http.get(server.url, timeout=TIMEOUT).json()
    names = [s["name"] for s in body["value"]] if version == "v4" else body["d"]["EntitySets"]
    assert names == ["Stops", "Routes", "Flights"]


TYPED_ROWS = [
    {
        "ID": 1,
        "when": dt.datetime(2024, 3, 1, 12, 30, tzinfo=dt.UTC),
        "price": decimal.Decimal("1.50"),
        "big": 2**40,
        "ratio": 0.25,
        "ok": True,
        "day": dt.date(2024, 3, 1),
        "note": None,
    },
]
BIG = "1099511627776"


@pytest.mark.parametrize(("options", "expected"), [
    ({}, {"when": "/Date(1709296200000)/", "price": "1.50", "big": 2**40, "ratio": 0.25,
          "day": "/Date(1709251200000)/"}),
    ({"v2_numbers_as_strings": True, "v2_date_offset": True},
     {"when": "/Date(1709296200000+0000)/", "price": "1.50", "big": BIG,
      "ratio": "0.25", "day": "/Date(1709251200000+0000)/"}),
])  # fmt: skip
def test_v2_value_formats(
    serve: ServerFactory, http: requests.Session, options: dict[str, Any], expected: dict[str, Any]
) -> None:
    server = serve({"Things": TYPED_ROWS}, version="v2", **options)
    row = http.get(server.url + "Things", timeout=TIMEOUT).json()["d"]["results"][0]
    assert {k: row[k] for k in expected} == expected
    assert row["ok"] is True and row["ID"] == 1 and row["note"] is None


def test_v4_ieee754_numbers_as_strings(serve: ServerFactory, http: requests.Session) -> None:
    server = serve({"Things": TYPED_ROWS})
    plain = http.get(server.url + "Things?$count=true", timeout=TIMEOUT)
    row = plain.json()["value"][0]
    assert row["when"] == "2024-03-01T12:30:00Z" and row["day"] == "2024-03-01"
    assert row["big"] == 2**40 and row["ratio"] == 0.25 and plain.json()["@odata.count"] == 1
    asked = http.get(
        server.url + "Things?$count=true",
        headers={"Accept": "application/json;IEEE754Compatible=true"},
        timeout=TIMEOUT,
    )
    assert "IEEE754Compatible=true" in asked.headers["Content-Type"]
    row = asked.json()["value"][0]
    assert (row["big"], row["price"], row["ratio"], row["ID"]) == (BIG, "1.50", "0.25", 1)
    assert asked.json()["@odata.count"] == "1"
    forced = serve({"Things": TYPED_ROWS}, ieee754_compatible=True)
    assert http.get(forced.url + "Things", timeout=TIMEOUT).json()["value"][0]["big"] == BIG


# -- auth ---------------------------------------------------------------------------------
def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("version", ["v4", "v2"])
def test_basic_auth(serve: ServerFactory, http: requests.Session, version: str) -> None:
    server = serve(version=version, username="svc", password="s3cret", page_size=60)
    missing = http.get(server.url + "Stops", timeout=TIMEOUT)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Basic ")
    assert missing.json()["error"]["code"] == "Unauthorized"
    wrong = http.get(server.url + "Stops", auth=("svc", "nope"), timeout=TIMEOUT)
    assert wrong.status_code == 401
    assert http.get(server.url, timeout=TIMEOUT).status_code == 401
    rows, _ = pull(http, server, "Stops", auth=("svc", "s3cret"))
    assert len(rows) == 120
    assert server.last_request is not None
    assert server.last_request.headers["authorization"] == _basic("svc", "s3cret")


def test_bearer_auth_alongside_basic(serve: ServerFactory, http: requests.Session) -> None:
    server = serve(username="svc", password="pw", token="tok-123")
    missing = http.get(server.url + "Stops", timeout=TIMEOUT)
    challenges = missing.raw.headers.getlist("WWW-Authenticate")
    assert [c.split()[0] for c in challenges] == ["Basic", "Bearer"]
    bad = http.get(server.url + "Stops", headers={"Authorization": "Bearer x"}, timeout=TIMEOUT)
    assert bad.status_code == 401 and 'error="invalid_token"' in bad.headers["WWW-Authenticate"]
    for header in ("Bearer tok-123", _basic("svc", "pw")):
        ok = http.get(server.url + "Stops", headers={"Authorization": header}, timeout=TIMEOUT)
        assert ok.status_code == 200


# -- faults -------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [429, 500, 503, 404, 401])
@pytest.mark.parametrize("version", ["v4", "v2"])
def test_status_faults_are_consumed(
    serve: ServerFactory, http: requests.Session, code: int, version: str
) -> None:
    server = serve(version=version)
    server.add_fault(od.status(code, retry_after=1 if code in (429, 503) else None))
    r = http.get(server.url + "Stops", timeout=TIMEOUT)
    assert r.status_code == code
    error = r.json()["error"]
    assert error["code"] == f"Injected{code}"
    if version == "v2":
        assert error["message"]["lang"] == "en"
    assert r.headers.get("Retry-After") == ("1" if code in (429, 503) else None)
    assert http.get(server.url + "Stops", timeout=TIMEOUT).status_code == 200
    assert server.pending_faults() == 0


def test_faults_can_target_a_set_a_path_and_repeat(
    serve: ServerFactory, http: requests.Session
) -> None:
    server = serve(page_size=50)
    server.add_fault(od.status(500), entity_set="Routes", times=2)
    server.add_fault(od.status(503), match="$skiptoken=")
    assert http.get(server.url + "Stops", timeout=TIMEOUT).status_code == 200
    assert http.get(server.url, timeout=TIMEOUT).status_code == 200
    # the third Routes request has no $skiptoken, so the 503 waits for a paging request
    statuses = [http.get(server.url + "Routes", timeout=TIMEOUT).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert server.pending_faults() == 1
    link = http.get(server.url + "Stops", timeout=TIMEOUT).json()["@odata.nextLink"]
    assert http.get(link, timeout=TIMEOUT).status_code == 503
    server.add_fault(od.status(429), times=None)
    assert all(http.get(server.url, timeout=TIMEOUT).status_code == 429 for _ in range(3))
    server.clear_faults()
    assert http.get(server.url, timeout=TIMEOUT).status_code == 200


def test_truncated_json_with_content_length_is_a_short_read(
    serve: ServerFactory, http: requests.Session
) -> None:
    server = serve()
    server.add_fault(od.truncated_json())
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        http.get(server.url + "Stops", timeout=TIMEOUT)
    assert http.get(server.url + "Stops", timeout=TIMEOUT).status_code == 200


def test_truncated_json_without_length_is_bad_json(
    serve: ServerFactory, http: requests.Session
) -> None:
    server = serve()
    server.add_fault(od.truncated_json(content_length=False))
    r = http.get(server.url + "Stops", timeout=TIMEOUT)
    assert r.status_code == 200 and r.text.startswith('{"@odata.context"')
    with pytest.raises(requests.exceptions.JSONDecodeError):
        r.json()


def test_delay_trips_a_read_timeout(serve: ServerFactory, http: requests.Session) -> None:
    server = serve()
    server.add_fault(od.delay(3))
    start = time.perf_counter()
    with pytest.raises(requests.exceptions.ReadTimeout):
        http.get(server.url + "Stops", timeout=(TIMEOUT, 0.3))
    assert http.get(server.url + "Stops", timeout=TIMEOUT).status_code == 200
    server.stop()  # wakes the delayed handler instead of waiting out its 3 s
    assert time.perf_counter() - start < 2.5


@pytest.mark.parametrize("same_link", [False, True])
def test_never_ending_next_link(
    serve: ServerFactory, http: requests.Session, same_link: bool
) -> None:
    server = serve(page_size=50)
    server.add_fault(od.never_ending_next_link(same_link=same_link), entity_set="Stops")
    rows, links = pull(http, server, "Stops", max_pages=12)
    assert len(links) == 12  # still going
    if same_link:
        assert len(set(links[1:])) == 1
    else:
        assert len(set(links)) == 12
        assert Counter(r["ID"] for r in rows)[1] == 4  # 120 rows / 50 per page: a lap every 3
    rows, links = pull(http, server, "Stops")  # the fault was one chain only
    assert len(rows) == 120 and len(links) == 2


@pytest.mark.parametrize("content_length", [True, False])
def test_huge_response_exceeds_a_client_cap(
    serve: ServerFactory, http: requests.Session, content_length: bool
) -> None:
    server = serve()
    cap = 1 << 20
    server.add_fault(od.huge_response(64 << 20, content_length=content_length))
    with http.get(server.url + "Stops", stream=True, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        if content_length:
            assert int(r.headers["Content-Length"]) == 64 << 20
        else:
            assert r.headers["Transfer-Encoding"] == "chunked"
        seen = 0
        for chunk in r.iter_content(65536):
            seen += len(chunk)
            if seen > cap:
                break
    assert seen > cap
    assert http.get(server.url + "Stops", timeout=TIMEOUT).status_code == 200


def test_small_huge_response_is_valid_json(serve: ServerFactory, http: requests.Session) -> None:
    server = serve(version="v2")
    server.add_fault(od.huge_response(200_000, content_length=False))
    r = http.get(server.url + "Stops", timeout=TIMEOUT)
    assert len(r.content) == 200_000
    assert r.json()["d"]["results"][0]["ID"] == 1


@pytest.mark.parametrize(("version", "payload", "expected"), [
    ("v4", None, {"value": 5}),
    ("v2", None, {"d": {"results": 5}}),
    ("v4", [], []),
    ("v4", {"unexpected": True}, {"unexpected": True}),
])  # fmt: skip
def test_wrong_shape(
    serve: ServerFactory, http: requests.Session, version: str, payload: Any, expected: Any
) -> None:
    server = serve(version=version)
    server.add_fault(od.wrong_shape() if payload is None else od.wrong_shape(payload))
    r = http.get(server.url + "Stops", timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == expected


def test_html_page(serve: ServerFactory, http: requests.Session) -> None:
    server = serve()
    server.add_fault(od.Fault.html)  # an uncalled factory works too
    r = http.get(server.url + "Stops", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert r.text.startswith("<!DOCTYPE html>")


def test_connection_reset(serve: ServerFactory, http: requests.Session) -> None:
    server = serve()
    server.add_fault(od.connection_reset())
    with pytest.raises(requests.exceptions.ConnectionError):
        http.get(server.url + "Stops", timeout=TIMEOUT)
    assert http.get(server.url + "Stops", timeout=TIMEOUT).status_code == 200


# -- mutation, concurrency, lifecycle -------------------------------------------------------
def test_mutations_between_requests(serve: ServerFactory, http: requests.Session) -> None:
    server = serve(page_size=500)
    server.update_row("Stops", 3, name="Renamed")
    server.delete_row("Stops", 4)
    server.add_row("Stops", {**NETWORK["Stops"][0], "ID": 999})
    rows, _ = pull(http, server, "Stops?$orderby=ID")
    ids = [r["ID"] for r in rows]
    assert 4 not in ids and ids[-1] == 999 and rows[2]["name"] == "Renamed"
    assert NETWORK["Stops"][2]["name"] != "Renamed"  # the caller's rows are not touched
    server.shuffle("Stops", seed=1)
    shuffled, _ = pull(http, server, "Stops")
    assert [r["ID"] for r in shuffled] != ids and sorted(r["ID"] for r in shuffled) == ids
    server.set_rows("Stops", [{"ID": 1, "name": "only"}])
    assert pull(http, server, "Stops")[0] == [{"ID": 1, "name": "only"}]
    with pytest.raises(KeyError):
        server.delete_row("Stops", 12345)


def test_concurrent_clients(serve: ServerFactory) -> None:
    server = serve(page_size=10)

    def one_client(i: int) -> list[int]:
        with requests.Session() as session:
            name = ("Stops", "Routes", "Flights")[i % 3]
            rows, _ = pull(session, server, name)
            return [r["ID"] for r in rows]

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one_client, range(24)))
    for i, ids in enumerate(results):
        assert ids == [r["ID"] for r in NETWORK[("Stops", "Routes", "Flights")[i % 3]]]
    pages = {name: 8 * math.ceil(len(rows) / 10) for name, rows in NETWORK.items()}
    assert {name: server.request_count(name) for name in NETWORK} == pages
    assert server.request_count() == sum(pages.values())


def test_stop_does_not_wait_for_idle_keep_alive(
    serve: ServerFactory, http: requests.Session
) -> None:
    server = serve()
    assert http.get(server.url + "Stops", timeout=TIMEOUT).status_code == 200
    start = time.perf_counter()
    server.stop()  # the session still holds its keep-alive connection open
    assert time.perf_counter() - start < 1.5
    with pytest.raises(requests.exceptions.ConnectionError):
        http.get(server.url.replace("/odata/", "/"), timeout=TIMEOUT)


def test_record_requests_and_headers(serve: ServerFactory, http: requests.Session) -> None:
    server = serve()
    http.get(server.url + "Stops?$top=1", headers={"Accept": "application/json"}, timeout=TIMEOUT)
    record = server.requests[-1]
    assert (record.method, record.path, record.entity_set) == ("GET", "/odata/Stops", "Stops")
    assert record.query == {"$top": "1"} and record.headers["accept"] == "application/json"
    server.reset_requests()
    assert server.request_count() == 0 and server.requests == []


# -- sample data --------------------------------------------------------------------------
def test_sample_network_is_deterministic_and_plausible() -> None:
    net = sample_network(300, seed=3)
    assert net == sample_network(300, seed=3) and net != sample_network(300, seed=4)
    assert net == {k: list(v) for k, v in sample_network_lazy(300, seed=3).items()}
    stops = {s["ID"]: s for s in net["Stops"]}
    assert len(stops) == 300
    assert all(59.0 < s["latitude"] < 70.5 and 19.0 < s["longitude"] < 32.0 for s in stops.values())
    assert sum(s["isAirport"] for s in stops.values()) == len(AIRPORTS)
    per_city = Counter(s["city"] for s in stops.values())
    assert {c.name for c in CITIES} == set(per_city)
    assert sum(n >= 10 for n in per_city.values()) >= 8  # the major cities
    modes = Counter(r["mode"] for r in net["Routes"])
    assert (
        set(modes) == {"bus", "tram", "train", "ferry", "flight"} and modes["bus"] > modes["train"]
    )
    routes = {r["ID"]: r for r in net["Routes"]}
    for r in routes.values():
        a, b = stops[r["fromStop_ID"]], stops[r["toStop_ID"]]
        assert a is not b
        assert r["distanceKm"] == pytest.approx(
            haversine_km(a["latitude"], a["longitude"], b["latitude"], b["longitude"]), abs=0.01
        )
        if r["mode"] == "flight":
            assert a["isAirport"] and b["isAirport"]
    assert net["Flights"]
    for f in net["Flights"]:
        assert routes[f["route_ID"]]["mode"] == "flight"
        for t in (f["departure"], f["arrival"]):
            assert dt.datetime.strptime(t, "%H:%M")
        assert f["daysOfWeek"] and set(f["daysOfWeek"]) <= set("1234567")


def test_lazy_network_scales_to_a_million_rows() -> None:
    start = time.perf_counter()
    lazy = sample_network_lazy(1_000_000)
    tail = lazy["Routes"][-5000:]
    assert len(lazy["Routes"]) == 2_000_000 and tail[-1]["ID"] == 2_000_000
    assert lazy["Stops"][999_999]["ID"] == 1_000_000
    assert time.perf_counter() - start < 1


# -- command line -------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["sample", "file"])
def test_cli_serves_until_sigterm(tmp_path: Path, http: requests.Session, source: str) -> None:
    url_file = tmp_path / "odata.url"
    if source == "file":
        feed = tmp_path / "feed.json"
        write_feed(feed, sample_network(40), keys={"Stops": "ID"})
        args = ["--data", str(feed)]
    else:
        args = ["--sample", "40"]
    cmd = [sys.executable, "-m", "devtools.odata_server", "--port", "0",
           "--page-size", "7", "--version", "v2", "--port-file", str(url_file), *args]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:") and url.endswith("/odata/")
            assert url_file.read_text().strip() == url
            body = http.get(url + "Stops?$format=json", timeout=TIMEOUT).json()
            assert len(body["d"]["results"]) == 7 and "__next" in body["d"]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
    assert not url_file.exists()
