"""The OData client against the real fixture server over HTTP: paging, faults, values, auth."""

from __future__ import annotations

import gc
import logging
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from devtools.odata_server import (
    ODataServer,
    atom,
    connection_reset,
    delay,
    html,
    huge_response,
    mislabelled,
    never_ending_next_link,
    no_content,
    sample_network,
    status,
    truncated_json,
    wrong_shape,
)
from pipeline_cli.adapters.odata import ODataClient, error_line
from pipeline_cli.adapters.odata_format import has_field, resolve_mapping, unwrap_page
from pipeline_cli.errors import ConfigError, SourceError, endpoint
from pipeline_cli.settings import ODataSettings
from tests.support.proxy import CountingHttpProxy

DATA = sample_network(40)


def client(server: ODataServer, **kw: Any) -> ODataClient:
    opts: dict[str, Any] = {"connect_timeout": 2, "read_timeout": 5, "backoff_base": 0.01,
                            "backoff_max": 2.0}
    sleep = kw.pop("sleep", time.sleep)
    return ODataClient(ODataSettings(**{"url": server.url, **opts, **kw}), sleep=sleep)


def fetch(c: ODataClient, entity_set: str = "Stops", **kw: Any) -> list[dict[str, Any]]:
    return [row for page in c.pages(entity_set, orderby="ID", **kw) for row in page.rows]


@pytest.fixture
def v4() -> Iterator[ODataServer]:
    with ODataServer(DATA, page_size=7) as srv:
        yield srv


@pytest.mark.parametrize("version", ["v4", "v2"])
@pytest.mark.parametrize("next_link", ["absolute", "relative"])
def test_follows_server_paging(version: str, next_link: str) -> None:
    with ODataServer(DATA, version=version, next_link=next_link, page_size=7,
                     empty_last_page=True) as srv, client(srv) as c:
        pages = list(c.pages("Routes", orderby="ID"))
        assert c.protocol == version
        assert [len(p.rows) for p in pages] == [7] * 11 + [3]
        assert [r["ID"] for p in pages for r in p.rows] == list(range(1, 81))
        assert pages[0].count == 80
        targets = [r.target for r in srv.requests if r.entity_set == "Routes"]
        assert "$orderby=ID" in targets[0]
        assert all("$skiptoken=" in t for t in targets[1:])  # only the server's links


def test_an_odata_v3_json_light_service_pages_and_counts() -> None:
    # WCF Data Services 5.x: V4's shapes with odata.metadata, odata.count and odata.nextLink,
    # but $inlinecount; $count=true was refused with HTTP 400, so such a service never synced.
    with ODataServer(DATA, version="v3", page_size=7) as srv, client(srv) as c:
        pages = list(c.pages("Routes", orderby="ID"))
    assert [r["ID"] for p in pages for r in p.rows] == list(range(1, 81))
    assert pages[0].count == 80
    assert "$inlinecount=allpages" in srv.requests[1].target


def test_unprefixed_annotations_of_odata_401_page_on() -> None:
    with ODataServer(DATA, page_size=7, unprefixed_annotations=True) as srv, client(srv) as c:
        pages = list(c.pages("Routes", orderby="ID"))
    assert [r["ID"] for p in pages for r in p.rows] == list(range(1, 81))
    assert pages[0].count == 80


def test_a_paging_link_of_another_name_is_refused_not_taken_for_the_end() -> None:
    with pytest.raises(SourceError, match="'@odata.nextlink' is not an OData nextLink"):
        unwrap_page({"value": [{"ID": 1}], "@odata.nextlink": "Stops?$skiptoken=1"}, "v4",
                    "Stops page 1")


@pytest.mark.parametrize("key", ["@odata.nextLink", "odata.nextLink", "@nextLink"])
def test_a_null_next_link_ends_the_set(key: str) -> None:
    # Some serializers write the link on the last page as null; it was refused as a paging
    # link "of another name" (V2's "__next": null was read as the end).
    assert unwrap_page({"value": [{"ID": 1}], key: None}, "v4", "Stops page 3") == (
        [{"ID": 1}], None, None)


@pytest.mark.parametrize(("link", "context"), [
    ("http://erp:99999/odata/Stops?$skiptoken=5", None),
    ("http://[::1/odata/Stops?$skiptoken=5", None),
    ("Stops?$skiptoken=5", "http://[gw/odata/$metadata#Stops"),
], ids=["port", "ipv6", "context"])
def test_a_malformed_next_link_is_named(v4: ODataServer, link: str, context: str | None
                                        ) -> None:
    page: dict[str, Any] = {"value": DATA["Stops"][:5], "@odata.nextLink": link}
    if context:
        page["@odata.context"] = context
    v4.add_fault(wrong_shape(page), entity_set="Stops")
    with client(v4) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == f"OData Stops page 1: malformed nextLink {link!r}"


def test_empty_last_page_is_normal() -> None:
    with ODataServer(DATA, page_size=10, empty_last_page=True) as srv, client(srv) as c:
        pages = list(c.pages("Stops", orderby="ID"))
    assert [len(p.rows) for p in pages] == [10, 10, 10, 10, 0]


def test_a_service_root_that_is_an_entity_is_detected_as_v4(v4: ODataServer) -> None:
    # Business Central's API root is a company, .../api/v2.0/companies(<id>)/: its "service
    # document" is that entity, with an @odata.context and no 'value', and the sync failed
    # with "not an OData JSON response" unless the operator guessed [odata] version = v4.
    v4.add_fault(wrong_shape({"@odata.context": f"{v4.url}$metadata#companies/$entity",
                              "@odata.etag": 'W/"JzE5OzE7Jw=="', "id": "5f0e4a1c-e2c1",
                              "name": "CRONUS"}))
    with client(v4) as c:
        assert c.protocol == "v4" and len(fetch(c)) == 40


def test_forced_version_skips_detection_and_rejects_the_other_shape(v4: ODataServer) -> None:
    with client(v4, version="v4") as c:
        assert len(fetch(c)) == 40
        assert all(r.entity_set == "Stops" for r in v4.requests)
    with client(v4, version="v2", count=False) as c, \
            pytest.raises(SourceError, match="V4 response from a V2 service"):
        fetch(c)


def test_429_with_retry_after_is_honoured(v4: ODataServer) -> None:
    slept: list[float] = []
    v4.add_fault(status(429, retry_after=1), entity_set="Stops")
    with client(v4, sleep=slept.append) as c:
        assert len(fetch(c)) == 40
    assert slept == [1.0]


def test_a_retry_after_that_is_no_date_takes_the_usual_backoff(v4: ODataServer) -> None:
    slept: list[float] = []
    for value in ("Fri, 31 Dec 99999 23:59:59 GMT", "soon", "1.5"):
        v4.add_fault(status(503, retry_after=value), entity_set="Stops")
    with client(v4, sleep=slept.append) as c:
        assert len(fetch(c)) == 40
    assert len(slept) == 3 and max(slept) < 1


def test_retry_after_longer_than_backoff_max_fails_at_once(v4: ODataServer) -> None:
    v4.add_fault(status(503, retry_after=3600), entity_set="Stops")
    with client(v4) as c, pytest.raises(SourceError, match="retry after 3600 s, longer than "
                                                           r"\[odata\] backoff_max"):
        fetch(c)
    assert v4.request_count("Stops") == 1


@pytest.mark.parametrize("fault", [
    status(500), status(502), status(408), truncated_json(content_length=True),
    truncated_json(content_length=False), connection_reset(),
], ids=["500", "502", "408", "truncated-with-length", "truncated-json", "reset"])
def test_transient_faults_are_retried(v4: ODataServer, fault: Any) -> None:
    v4.add_fault(fault, entity_set="Stops", match="skiptoken")  # a later page, mid-set
    with client(v4) as c:
        assert [r["ID"] for r in fetch(c)] == list(range(1, 41))
    assert v4.pending_faults() == 0


def test_retries_give_up_with_one_line(v4: ODataServer) -> None:
    v4.add_fault(truncated_json(content_length=False), entity_set="Stops", times=None)
    with client(v4, retries=3) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value).startswith(f"OData {endpoint(v4.url)} Stops page 1: malformed JSON")
    assert str(err.value).endswith("after 3 attempts")
    assert v4.request_count("Stops") == 3


@pytest.mark.parametrize("code", [501, 505])
def test_not_implemented_fails_at_once(v4: ODataServer, code: int) -> None:
    # 501 (a service that does not implement $orderby, say) was asked for five times.
    v4.add_fault(status(code), entity_set="Stops", times=None)
    with client(v4) as c, pytest.raises(SourceError, match=f"HTTP {code} Injected{code}"):
        fetch(c)
    assert v4.request_count("Stops") == 1


def test_json_nested_too_deeply_is_named(v4: ODataServer) -> None:
    # It was "internal error: RecursionError", naming no set or page.
    deep = b'{"value": [{"ID": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"
    v4.add_fault(wrong_shape(deep), entity_set="Stops", times=None)
    # No garbage collection during the parse: an earlier test's object finalized at the
    # recursion limit raised RecursionError in its finalizer, which pytest failed this test
    # for (once in a full run).
    gc.collect()
    gc.disable()
    try:
        with client(v4) as c, pytest.raises(SourceError) as err:
            fetch(c)
    finally:
        gc.enable()
    assert str(err.value) == "OData Stops page 1: JSON nested too deeply to read"
    assert v4.request_count("Stops") == 1


@pytest.mark.parametrize("code", [400, 404])
def test_other_4xx_fail_at_once_with_the_odata_error(v4: ODataServer, code: int) -> None:
    v4.add_fault(status(code, message="No such\nthing"), entity_set="Stops")
    with client(v4) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == (f"OData {endpoint(v4.url)} Stops page 1 (check the names in "
                              f"[odata.mapping]): HTTP {code} Injected{code}: No such thing")
    assert v4.request_count("Stops") == 1


@pytest.mark.parametrize("version", ["v4", "v3", "v2"])
def test_a_refused_count_points_at_the_count_setting(version: str) -> None:
    # ASP.NET Core OData allows no $count unless the service enables it, and some gateways
    # no $inlinecount: the 400 was blamed on the names of [odata.mapping] alone. (A 400 that
    # does not mention a count, a field's name, says nothing of the setting.)
    with ODataServer(DATA, version=version) as srv:
        srv.add_fault(status(400, message="Query option 'Count' is not allowed."),
                      entity_set="Stops")
        with client(srv) as c, pytest.raises(SourceError, match=r"Stops page 1 \(check the "
                r"names in \[odata.mapping\], or \[odata\] count = false if it refuses"):
            fetch(c)
        with client(srv, count=False) as c:
            assert len(fetch(c)) == 40


@pytest.mark.parametrize(("code", "hint"), [
    (400, "(check the names in [odata.mapping], or [odata] orderby = false leaves $orderby "
          "out)"), (501, "([odata] orderby = false leaves $orderby out)")])
def test_a_refused_orderby_points_at_the_orderby_setting(v4: ODataServer, code: int,
                                                         hint: str) -> None:
    # Services with a computed key, custom Web API services and some SAP gateway entity sets
    # refuse $orderby; the sync always sent it.
    v4.refuse_orderby = code
    with client(v4) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == (f"OData {endpoint(v4.url)} Stops page 1 {hint}: HTTP {code} "
                              "NotSupported: The query option '$orderby' is not supported for "
                              "this entity set")
    assert v4.request_count("Stops") == 1  # a 501 is not retried either
    with client(v4, orderby=False) as c:
        assert sorted(r["ID"] for r in fetch(c)) == list(range(1, 41))
        assert c.probe("Stops", orderby="ID") == 1
    assert [r.target for r in v4.requests if "orderby" in r.target] == [
        "/odata/Stops?$orderby=ID&$count=true"]


@pytest.mark.parametrize(("code", "match", "message", "hint"), [
    (400, "$top", "Query option 'Top' is not allowed.", "Stops page 1 (check the names in "
     "[odata.mapping], or [odata] paging = \"server\" if it refuses $top/$skip)"),
    (501, "$skip", "The query option '$skip' is not supported", "Stops page 2 ([odata] "
     "paging = \"server\" if it refuses $top/$skip)")])
def test_a_refused_top_or_skip_points_at_the_paging_setting(
        v4: ODataServer, code: int, match: str, message: str, hint: str) -> None:
    # ASP.NET Core OData allows no $top or $skip unless the service enables them, and some
    # gateways implement neither: client paging got the bare error.
    v4.add_fault(status(code, message=message), entity_set="Stops", match=match)
    with client(v4, paging="client", page_size=7) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == (f"OData {endpoint(v4.url)} {hint}: HTTP {code} Injected{code}: "
                              f"{message}")
    # under server paging no hint names it (doctor's $top=1 is not paging), nor without a
    # $top or $skip named (the 'top' of 'Stops' is not)
    v4.add_fault(status(400, message=message), entity_set="Stops")
    with client(v4) as c, pytest.raises(SourceError) as err:
        c.probe("Stops")
    assert "paging" not in str(err.value)
    v4.add_fault(status(400, message="No property 'Name' in Stops"), entity_set="Stops")
    with client(v4, paging="client") as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert "paging" not in str(err.value)


def test_a_hint_needs_the_option_named_not_a_word_holding_it(v4: ODataServer) -> None:
    # 'account' holds 'count'; and client paging needs $orderby, so its refusal does not
    # point at orderby = false (a configuration error in that mode)
    v4.add_fault(status(400, message="No property 'Account' in Stops"), entity_set="Stops")
    with client(v4) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert "count = false" not in str(err.value)
    v4.refuse_orderby = 400
    with client(v4, paging="client", page_size=7) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert "orderby = false" not in str(err.value)


def test_an_unknown_field_name_points_at_the_mapping(v4: ODataServer) -> None:
    # Another service's vocabulary: the server's 400 names the field, the hint the setting.
    with client(v4) as c, pytest.raises(SourceError) as err:
        fetch(c, select=["ID", "isAirprt"])
    assert "(check the names in [odata.mapping]): HTTP 400" in str(err.value)
    assert "Could not find a property named 'isAirprt'" in str(err.value)


def test_v2_error_body_is_one_line() -> None:
    with ODataServer(DATA, version="v2") as srv, client(srv) as c, \
            pytest.raises(SourceError) as err:
        fetch(c, "NoSuchSet")
    assert str(err.value) == (f"OData {endpoint(srv.url)} NoSuchSet page 1 (check the names in "
                              "[odata.mapping]): HTTP 404 NotFound: Resource not found for the "
                              "segment 'NoSuchSet'; the service document lists no set "
                              "'NoSuchSet' (it lists Flights, Routes, Stops)")


@pytest.mark.parametrize("version", ["v4", "v2"])
@pytest.mark.parametrize("setting", ["auto", "forced"])
def test_a_set_the_service_does_not_list_is_named_with_the_sets_it_does(
        version: str, setting: str) -> None:
    # A typo in [odata.mapping.stops] set: the server's 404 names the segment only; the
    # service document says which sets there are (read for it when the version is forced).
    with ODataServer(DATA, version=version) as srv, \
            client(srv, version=version if setting == "forced" else "auto") as c:
        for name, suggestion in (("stops", "did you mean 'Stops'? "), ("Stop", "did you mean "
                                 "'Stops'? "), ("Container.Flights", "")):
            with pytest.raises(SourceError) as err:
                fetch(c, name)
            assert str(err.value).endswith(f"; the service document lists no set {name!r} "
                                           f"({suggestion}it lists Flights, Routes, Stops)")
            with pytest.raises(SourceError) as err:
                c.probe(name, orderby="ID")
            assert f"lists no set {name!r} ({suggestion}it lists" in str(err.value)
        srv.add_fault(status(404, message="Not Found"), entity_set="Stops")  # a listed set
        with pytest.raises(SourceError) as err:
            fetch(c)
        assert "lists no set" not in str(err.value)


@pytest.mark.parametrize("version", ["v4", "v2"])
def test_a_url_that_ends_with_the_set_is_named_as_such(version: str) -> None:
    # [odata] url = .../odata/Stops: its "service document" is the set; the entities' names
    # were listed as the sets the service has.
    with ODataServer(DATA, version=version) as srv, \
            ODataClient(ODataSettings(url=srv.url + "Stops", retries=1)) as c, \
            pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value).endswith(
        "HTTP 404 NotFound: No resource for the segment 'Stops'; [odata] url ends with the set "
        "'Stops': give the service root, without the set")


def test_error_line_of_non_odata_bodies() -> None:
    assert error_line(502, b"<html><body>Bad gateway</body></html>", "text/html") == "HTTP 502"
    assert error_line(500, b"  upstream\n failed ") == "HTTP 500 upstream failed"
    # a code that only repeats the status
    assert error_line(401, b'{"error": {"code": "401", "message": "Unauthorized"}}') == \
        "HTTP 401 Unauthorized"


def test_a_gateways_own_json_error_is_shown(v4: ODataServer) -> None:
    """A gateway in front of the service answers in JSON of its own, not OData's (Azure API
    Management, ASP.NET Core's problem details, Kong): its message says what is wrong (a
    subscription key, not the password), so it is shown as sent."""
    apim = (b'{ "statusCode": 401, "message": "Access denied due to missing subscription key.'
            b' Make sure to include subscription key when making requests to an API." }')
    v4.add_fault(status(401, body=apim), entity_set="Stops")
    with client(v4) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == (
        f"OData {endpoint(v4.url)} Stops page 1 (check [odata] username/password/token): HTTP "
        '401 { "statusCode": 401, "message": "Access denied due to missing subscription key. '
        'Make sure to include subscription key when making requests to an API." }')
    assert error_line(400, b'{"title": "One or more validation errors occurred.", '
                           b'"status": 400}') == \
        'HTTP 400 {"title": "One or more validation errors occurred.", "status": 400}'


@pytest.mark.parametrize("same_link", [False, True])
def test_never_ending_next_link_is_capped(v4: ODataServer, same_link: bool) -> None:
    v4.add_fault(never_ending_next_link(same_link=same_link), entity_set="Stops")
    with client(v4, max_pages=25) as c, pytest.raises(SourceError) as err:
        fetch(c)
    expected = "paging loop" if same_link else "more than 25 pages"
    assert expected in str(err.value)
    assert v4.request_count("Stops") <= 26


@pytest.mark.parametrize("content_length", [True, False])
def test_response_size_is_capped(v4: ODataServer, content_length: bool) -> None:
    v4.add_fault(huge_response(3_000_000, content_length=content_length), entity_set="Stops")
    with client(v4, max_response_bytes=1_000_000) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert "max_response_bytes (1000000); a service that sends the whole set at once needs " \
        '[odata] paging = "client"' in str(err.value)  # a first page too large: no paging


@pytest.mark.parametrize(("paging", "match"), [("server", "skiptoken"), ("client", None)])
def test_a_large_page_of_a_paging_client_or_server_has_no_paging_hint(
        v4: ODataServer, paging: str, match: str | None) -> None:
    v4.add_fault(huge_response(3_000_000), entity_set="Stops", match=match)
    with client(v4, max_response_bytes=1_000_000, paging=paging) as c, \
            pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value).endswith("max_response_bytes (1000000)")


def test_an_error_body_under_http_200_is_shown(v4: ODataServer) -> None:
    # SAP gateways do this when the backend is down; it was "not an OData JSON response".
    v4.add_fault(wrong_shape({"error": {"code": "SY/530", "message": {
        "lang": "en", "value": "Backend system ERP_100 not reachable"}}}), entity_set="Stops")
    with client(v4) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == ("OData Stops page 1: HTTP 200 SY/530: Backend system ERP_100 not "
                              "reachable")


@pytest.mark.parametrize("code", [204, 200])
def test_an_empty_success_fails_at_once(v4: ODataServer, code: int) -> None:
    # It was "malformed JSON (Expecting value at byte 0; truncated?)", asked for five times.
    v4.add_fault(no_content(code), entity_set="Stops", times=None)
    with client(v4) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == f"OData Stops page 1: HTTP {code} with an empty body"
    assert v4.request_count("Stops") == 1


def test_html_and_wrong_shapes_are_clear_errors(v4: ODataServer) -> None:
    v4.add_fault(html(), entity_set="Stops")
    with client(v4) as c, pytest.raises(SourceError, match="got text/html"):
        fetch(c)
    v4.add_fault(wrong_shape(), entity_set="Stops")
    with client(v4) as c, pytest.raises(SourceError, match="expected a list of entities"):
        fetch(c)


def test_an_xml_answer_fails_at_once_naming_its_type(v4: ODataServer) -> None:
    # An Atom feed was "malformed JSON (...; truncated?)", asked for five times with backoff.
    v4.add_fault(atom(), times=None)  # the service document (auto-detection) and every set
    with client(v4) as c, pytest.raises(SourceError, match=r"the service document: expected "
                                        r"JSON, got application/atom\+xml \(the service answers "
                                        r"in XML.*; for a V2 service set \[odata\] version = v2"):
        fetch(c)
    assert len(v4.requests) == 1


def test_a_v2_service_found_by_its_json_service_document_is_asked_without_format() -> None:
    # WCF Data Services before 5.0 (SharePoint 2010's ListData.svc) answer JSON to the Accept
    # header and refuse $format: "The query parameter '$format' begins with a system-reserved
    # '$' character but is not recognized." Only version = v2 (no service document) sends it.
    refused = ("The query parameter '$format' begins with a system-reserved '$' character "
               "but is not recognized.")
    with ODataServer(DATA, version="v2") as srv:
        srv.add_fault(status(400, message=refused), match="$format", times=None)
        with client(srv) as c:
            assert len(fetch(c)) == 40 and c.probe("Stops") == 1
        with client(srv, version="v2") as c, pytest.raises(SourceError, match=r"Stops page 1 "
                r"\(check the names in \[odata.mapping\], or \[odata\] version = \"auto\" "
                r"leaves \$format out\)"):
            fetch(c)
        srv.clear_faults()  # a service whose sets answer XML to the Accept header
        srv.add_fault(atom(), entity_set="Stops", times=None)
        with client(srv) as c, pytest.raises(SourceError, match=r"Stops page 1: expected "
                                             r"JSON, .*; for a V2 service set \[odata\] version"):
            fetch(c)


@pytest.mark.parametrize("content_type", ["text/xml", "text/plain; charset=utf-8"])
def test_json_under_another_content_type_is_read(v4: ODataServer, content_type: str) -> None:
    with client(v4) as c:
        expected = fetch(c)
    v4.add_fault(mislabelled(content_type), times=None)
    with client(v4) as c:
        assert fetch(c) == expected and len(expected) == 40


def test_a_page_not_in_utf8_fails_at_once(v4: ODataServer) -> None:
    # It was "malformed JSON", asked for five times with backoff.
    v4.update_row("Stops", 3, name="Töölö")
    v4.add_fault(mislabelled("application/json; charset=iso-8859-1", "latin-1"),
                 entity_set="Stops", times=None)
    with client(v4) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == ("OData Stops page 1: a page is not UTF-8 (Content-Type: "
                              "application/json; charset=iso-8859-1)")
    assert v4.request_count("Stops") == 1


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16", "utf-32"])
def test_a_page_in_utf16_or_utf32_fails_at_once(v4: ODataServer, encoding: str) -> None:
    """Python's JSON parser reads UTF-16 and UTF-32 too, so such a page was taken and then
    failed in PostgreSQL: `database error while staging the feed: PostgreSQL text fields
    cannot contain NUL (0x00) bytes` for one of ASCII text."""
    v4.add_fault(mislabelled("application/json; charset=utf-16", encoding),
                 entity_set="Stops", times=None)
    with client(v4) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == ("OData Stops page 1: a page is not UTF-8 (Content-Type: "
                              "application/json; charset=utf-16)")
    assert v4.request_count("Stops") == 1


def test_a_body_not_in_its_content_encoding_fails_at_once(v4: ODataServer) -> None:
    """A gateway that decompresses the service's answer and keeps its Content-Encoding: gzip
    header: no retry would read it, and it is no body cut short."""
    v4.add_fault(mislabelled("application/json", content_encoding="gzip"), times=None)
    with client(v4, version="v4") as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == ("OData Stops page 1: the body is not encoded as its header "
                              "Content-Encoding: gzip says (a proxy that decoded it?)")
    assert v4.request_count("Stops") == 1


def test_read_timeout_is_retried(v4: ODataServer) -> None:
    v4.add_fault(delay(2), entity_set="Stops")
    with client(v4, read_timeout=0.5) as c:
        assert len(fetch(c)) == 40


def test_unreachable_service_fails_without_hanging() -> None:
    with ODataServer(DATA) as srv:
        url = srv.url
    with ODataClient(ODataSettings(url=url, retries=2, backoff_base=0.01,
                                   connect_timeout=1)) as c, \
            pytest.raises(SourceError, match="connection failed"):
        fetch(c)


def test_unicode_and_nulls_pass_through() -> None:
    rows = [{"ID": 1, "name": "Äänekoski – Яуза \U0001F68C", "city": None}]
    with ODataServer({"Stops": rows}) as srv, client(srv) as c:
        assert fetch(c, select=["ID", "name", "city"]) == rows


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_auth_and_secrets_stay_out_of_messages(auth: str) -> None:
    secret = "s3cr3t-Pa55"
    kw: dict[str, Any] = ({"username": "etl", "password": secret} if auth == "basic"
                          else {"token": secret})
    with ODataServer(DATA, **kw) as srv:
        with client(srv, **kw) as c:
            assert len(fetch(c)) == 40
        wrong = ({"username": "etl", "password": "nope-" + secret} if auth == "basic"
                 else {"token": "nope-" + secret})
        with client(srv, **wrong) as c, pytest.raises(SourceError) as err:
            fetch(c)
    assert "HTTP 401" in str(err.value) and "check [odata]" in str(err.value)
    assert secret not in str(err.value)


def test_credentials_in_the_url_are_used_but_never_shown() -> None:
    with ODataServer(DATA, username="etl", password="pw-in-url") as srv:
        url = srv.url.replace("http://", "http://etl:pw-in-url@")
        with ODataClient(ODataSettings(url=url, backoff_base=0.01)) as c:
            assert "pw-in-url" not in c.service_url
            assert len(fetch(c)) == 40


def test_percent_encoded_credentials_in_the_url_are_decoded() -> None:
    # A password with @ : / or a space can only be written percent-encoded in a URL; it was
    # sent encoded, and the service answered 401.
    with ODataServer(DATA, username="etl ops", password="p@ss w/rd:1") as srv:
        url = srv.url.replace("http://", "http://etl%20ops:p%40ss%20w%2Frd%3A1@")
        with ODataClient(ODataSettings(url=url, backoff_base=0.01)) as c:
            assert len(fetch(c)) == 40


@pytest.mark.parametrize("version", ["v4", "v2"])
def test_the_urls_own_query_goes_with_every_request(version: str) -> None:
    # SAP gateways want ?sap-client=100 on every request; it became "?sap-client=100/Stops".
    with ODataServer(DATA, version=version, page_size=8) as srv, ODataClient(ODataSettings(
            url=f"{srv.url}?sap-client=100", backoff_base=0.01)) as c:
        assert len(fetch(c)) == 40
        assert c.service_url == srv.url.rstrip("/") + "/"
        assert len(srv.requests) == 6  # the service document and five pages
        assert all(r.query.get("sap-client") == "100" for r in srv.requests), srv.requests
        assert all(r.target.count("sap-client") == 1 for r in srv.requests)


def test_the_urls_own_query_keeps_a_space_as_percent_20() -> None:
    # Business Central's OData web services take ?company=CRONUS%20International%20Ltd.; it
    # went out form-encoded, CRONUS+International+Ltd., and a '+' is a plus to a service
    # that reads its query as RFC 3986 says: a company that does not exist.
    company = "company=CRONUS%20International%20Ltd."
    with ODataServer(DATA, page_size=20) as srv, ODataClient(ODataSettings(
            url=f"{srv.url}?{company}", backoff_base=0.01)) as c:
        assert len(fetch(c)) == 40
    assert all(company in r.target for r in srv.requests), srv.requests


@pytest.mark.parametrize("version", ["v4", "v2"])
def test_next_link_on_another_host_is_followed_on_the_configured_origin(version: str) -> None:
    # The links name a "foreign" host (localhost, on a proxy's port) that counts what it gets:
    # the pages come from the configured 127.0.0.1 and the credentials never go there.
    auth = {"username": "etl", "password": "pw-Foreign-1"}
    with ODataServer(DATA, version=version, page_size=7, **auth) as srv, \
            CountingHttpProxy(srv.url) as foreign:
        srv.next_link_base = foreign.url.replace("127.0.0.1", "localhost") + "/odata/"
        seen: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = seen.append  # type: ignore[method-assign]
        logger = logging.getLogger("pipeline.odata")
        logger.addHandler(handler)
        level, logger.level = logger.level, logging.INFO
        try:
            with client(srv, **auth) as c:
                assert [r["ID"] for r in fetch(c)] == list(range(1, 41))
                assert [r["ID"] for r in fetch(c, "Routes")] == list(range(1, 81))
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        assert foreign.count() == 0
        pages = [r for r in srv.requests if r.entity_set is not None]
        assert len(pages) == 6 + 12 and all("authorization" in r.headers for r in pages)
        assert all("$skiptoken=" in r.target for r in pages if "$orderby" not in r.target)
    assert len(seen) == 1 and "localhost" in seen[0].getMessage()  # once, not per page


def test_a_next_link_behind_a_path_mapping_proxy_is_rerooted_on_the_service_root() -> None:
    # The proxy publishes the gateway's /odata as /gw/odata; the gateway names itself and its
    # own path. Followed as written, page 2 was /odata/Stops: a 404 blamed on the mapping.
    with ODataServer(DATA, root="/gw/odata", page_size=10,
                     next_link_base="http://sapgw01.corp.internal:8000/odata/") as srv, \
            client(srv) as c:
        assert [r["ID"] for r in fetch(c)] == list(range(1, 41))
    assert [r.path for r in srv.requests[1:]] == ["/gw/odata/Stops"] * 4


def test_a_next_link_on_the_same_host_outside_the_service_root_is_rerooted() -> None:
    # A gateway behind a proxy that passes on X-Forwarded-Host but not the path prefix names
    # the published host with its own path: page 2 was /odata/Stops there, a 404. No other
    # host is involved, so foreign_next_link = refuse does not refuse it.
    with ODataServer(DATA, root="/gw/odata", page_size=10,
                     next_link_base="http://127.0.0.1:{port}/odata/") as srv, \
            client(srv, foreign_next_link="refuse") as c:
        assert [r["ID"] for r in fetch(c)] == list(range(1, 41))
    assert [r.path for r in srv.requests[1:]] == ["/gw/odata/Stops"] * 4


def test_a_next_link_naming_a_cyrillic_set_is_rerooted_too() -> None:
    # A 1C:Enterprise set named in its links unencoded: looked for only as upper-case
    # %-escapes, the name was not found, and page 2 went to /odata/... (a 404).
    name = "Catalog_Остановки"
    with ODataServer({name: DATA["Stops"]}, root="/gw/odata", page_size=10,
                     next_link_base="http://1c.corp.internal/odata/") as srv, \
            client(srv) as c:
        srv.raw_names_in_links = True
        assert [r["ID"] for r in fetch(c, name)] == list(range(1, 41))
    assert {r.path for r in srv.requests[1:]} == {"/gw/odata/" + name}


def test_a_failing_next_link_does_not_blame_the_mapping(v4: ODataServer) -> None:
    v4.add_fault(status(404, message="skiptoken expired"), entity_set="Stops",
                 match="skiptoken")
    with client(v4, page_size=10) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert "Stops page 2: HTTP 404" in str(err.value) and "mapping" not in str(err.value)


def test_next_link_to_another_host_is_refused_when_configured() -> None:
    refused = (r"nextLink points to another host \(localhost\); "
               r"refusing to follow it \(\[odata\] foreign_next_link = refuse\)")
    with ODataServer(DATA, page_size=10, next_link_base="http://localhost:{port}/odata/") as srv, \
            client(srv, foreign_next_link="refuse") as c, \
            pytest.raises(SourceError, match=refused):
        list(c.pages("Stops", orderby="ID"))
    assert srv.request_count("Stops") == 1


@pytest.mark.parametrize("next_link", ["relative", "request"])
def test_a_relative_next_link_below_a_deeper_root_resolves_against_the_context_url(
        next_link: str) -> None:
    # OData JSON 4.0 (4.6): a relative URL is relative to the context URL, the service root
    # where $metadata is. Below a root that is a company (Business Central's
    # .../api/v2.0/companies(7)/), companies(7)/Stops?... was read against the request URL:
    # .../companies(7)/companies(7)/Stops, an error. A link relative to the request URL, as
    # some servers write it, is still followed.
    with ODataServer(DATA, root="/api/v2.0/companies(7)", context_root="/api/v2.0",
                     next_link=next_link, page_size=10) as srv, client(srv) as c:
        assert [r["ID"] for r in fetch(c)] == list(range(1, 41))
    assert [r.path for r in srv.requests[1:]] == ["/api/v2.0/companies(7)/Stops"] * 4


def test_a_relative_context_url_and_next_link_page_on() -> None:
    # SAP S/4HANA (RAP), CAP and Olingo write the context URL itself relative, "$metadata#Stops",
    # with a relative nextLink, an ETag per entity and SAP's metadataEtag.
    with ODataServer(DATA, root="/sap/opu/odata4/sap/zapi/srvd_a2x/sap/zstops/0001") as srv:
        page = {"@odata.context": "$metadata#Stops", "@odata.metadataEtag": 'W/"20240517"'}
        rows = [{"@odata.etag": f'W/"SADL-0{r["ID"]}"', **r} for r in DATA["Stops"]]
        srv.add_fault(wrong_shape({**page, "value": rows[20:]}), match="skiptoken=20")
        srv.add_fault(wrong_shape({**page, "value": rows[:20],
                                   "@odata.nextLink": "Stops?$skiptoken=20"}), entity_set="Stops")
        with client(srv) as c:
            assert fetch(c) == rows
        assert srv.requests[-1].target == "/sap/opu/odata4/sap/zapi/srvd_a2x/sap/zstops/0001/" \
            "Stops?$skiptoken=20"


@pytest.mark.parametrize("context", ["$metadata#Stops", "absolute"])
def test_a_next_link_that_is_only_a_query_reads_the_set_on(context: str) -> None:
    # SAP Datasphere's consumption API writes "@odata.nextLink": "?$skip=10" under the context
    # "$metadata#...": against the context URL that is $metadata?$skip=10, the schema, which
    # failed as "expected JSON, got application/xml (the service answers in XML ...)".
    with ODataServer(DATA) as srv:
        page = {"@odata.context": (f"{srv.url}$metadata#Stops" if context == "absolute"
                                   else context)}
        srv.add_fault(wrong_shape({**page, "value": DATA["Stops"][20:]}), match="skip=20")
        srv.add_fault(wrong_shape({**page, "value": DATA["Stops"][:20],
                                   "@odata.nextLink": "?$skip=20"}), entity_set="Stops")
        with client(srv) as c:
            assert fetch(c) == DATA["Stops"]
        assert srv.requests[-1].target == "/odata/Stops?$skip=20"


@pytest.mark.parametrize("version", ["v4", "v2"])
def test_a_skiptoken_and_a_fragment_reach_the_server_as_written(version: str) -> None:
    # '+' for a blank, %2B for a plus, quotes, '=' and '/' of a base64 token: sent as the
    # server wrote them (the server reads its token back, or answers 400); the #fragment not.
    with ODataServer(DATA, version=version, page_size=10) as srv, client(srv) as c:
        srv.skiptoken_suffix, srv.next_link_fragment = "'O''B+r%2B/x= y'==", "#page"
        assert [r["ID"] for r in fetch(c)] == list(range(1, 41))
    later = [r for r in srv.requests if "$skiptoken" in r.query]
    assert len(later) == 3 and all("#" not in r.target for r in later)
    assert all(r.query["$skiptoken"].endswith(srv.skiptoken_suffix) for r in later)


@pytest.mark.parametrize("version", ["v4", "v2"])
def test_a_filter_with_quotes_ampersands_hashes_and_any_script_pages_on(version: str) -> None:
    name = "O'Brien & Søn #1 +Åbo/Турку?"
    rows = [{**r, "name": name if r["ID"] % 3 else r["name"]} for r in DATA["Stops"]]
    odata_filter = "name eq '" + name.replace("'", "''") + "'"
    with ODataServer({"Stops": rows}, version=version, page_size=10) as srv, \
            client(srv) as c:
        assert [r["ID"] for r in fetch(c, filter=odata_filter)] == [
            r["ID"] for r in rows if r["name"] == name]
    assert [r.query["$filter"] for r in srv.requests[1:]] == [odata_filter] * 3


@pytest.mark.parametrize("version", ["v4", "v2"])
@pytest.mark.parametrize("next_link", ["absolute", "relative"])
def test_set_and_root_names_that_urls_encode(version: str, next_link: str) -> None:
    # OData V2 names a set outside the default container Container.Set; Business Central's
    # OData web services put the company, a quoted string with blanks, in the root.
    root = "/ODataV4/Company('CRONUS USA, Inc.')"
    with ODataServer({"Fixture_Container.Stops": DATA["Stops"]}, version=version, root=root,
                     next_link=next_link, page_size=10) as srv, client(srv) as c:
        assert "%20" in srv.url
        assert [r["ID"] for r in fetch(c, "Fixture_Container.Stops")] == list(range(1, 41))
    assert {r.path for r in srv.requests[1:]} == {f"{root}/Fixture_Container.Stops"}


def test_a_field_in_another_case_is_named_with_the_services_spelling() -> None:
    # ASP.NET Core OData resolves $select and $orderby in any case and answers with its own
    # names: doctor said only "the entity has no field 'id'", where the sync suggests 'ID'.
    with ODataServer(DATA) as srv, client(srv) as c:
        srv.case_insensitive = True
        with pytest.raises(SourceError) as err:
            c.probe("Stops", orderby="id", select=["id", "latitude"])
    assert str(err.value) == ("OData Stops $top=1: the entity has no field 'id' (did you mean "
                              "'ID'? check the names in [odata.mapping])")


def test_page_size_preference_is_sent(v4: ODataServer) -> None:
    with client(v4, page_size=5) as c:
        assert len(list(c.pages("Stops", orderby="ID"))) == 8
    assert v4.last_request is not None
    assert v4.last_request.headers["prefer"] == "odata.maxpagesize=5"


def skips(srv: ODataServer, entity_set: str) -> list[str | None]:
    return [r.query.get("$skip") for r in srv.requests if r.entity_set == entity_set]


@pytest.mark.parametrize("version", ["v4", "v2"])
def test_client_paging_reads_a_service_that_does_not_page(version: str) -> None:
    # A SEGW service sends a whole set in one answer: past max_response_bytes, or one page
    # PostgreSQL reads as one JSON text. $top/$skip pages it, to the first empty page.
    with ODataServer(DATA, version=version) as srv:
        srv.server_paging = False
        with client(srv) as c:
            assert [len(p.rows) for p in c.pages("Routes", orderby="ID")] == [80]
        with client(srv, paging="client", page_size=7) as c:
            pages = list(c.pages("Routes", orderby="ID"))
    assert [len(p.rows) for p in pages] == [7] * 11 + [3, 0]
    assert [r["ID"] for p in pages for r in p.rows] == list(range(1, 81))
    assert [p.count for p in pages][0] == 80
    first = next(r for r in srv.requests if r.query.get("$top") == "7")
    assert first.query["$orderby"] == "ID" and "$skip" not in first.query
    assert skips(srv, "Routes")[2:] == [str(n) for n in range(7, 81, 7)] + ["80"]
    # the set is counted once: with the first page
    counted = [r for r in srv.requests if r.query.get("$top") == "7"
               and ("$count" in r.query or "$inlinecount" in r.query)]
    assert [r.query.get("$skip") for r in counted] == [None]


@pytest.mark.parametrize("cap", ["max_top", "server_pages"])
def test_client_paging_advances_by_the_rows_a_capped_server_sends(cap: str) -> None:
    # A server that sends fewer rows than $top asks (its cap, or its own page within $top,
    # with a nextLink) would lose the rest if $skip advanced by $top.
    with ODataServer(DATA, page_size=5 if cap == "server_pages" else 1000) as srv:
        srv.max_top = 5 if cap == "max_top" else 0
        with client(srv, paging="client", page_size=7) as c:
            pages = list(c.pages("Stops", orderby="ID"))
    assert [len(p.rows) for p in pages] == [5] * 8 + [0]
    assert [r["ID"] for p in pages for r in p.rows] == list(range(1, 41))
    assert skips(srv, "Stops") == [None, *(str(n) for n in range(5, 41, 5))]
    assert not any("$skiptoken" in r.target for r in srv.requests)  # nextLinks not followed


def test_client_paging_of_an_empty_set_is_one_page() -> None:
    with ODataServer({**DATA, "Stops": []}) as srv, client(srv, paging="client") as c:
        pages = list(c.pages("Stops", orderby="ID"))
        assert c.collection_url("Stops").endswith("$count=true&$top=1000")  # 0: 1000
        assert "$top=1&" in c.collection_url("Stops", top=1) + "&"  # doctor's probe
    assert [(len(p.rows), p.count) for p in pages] == [(0, 0)]
    assert srv.request_count("Stops") == 1


def test_client_paging_of_a_server_that_ignores_skip_fails_at_once() -> None:
    with ODataServer(DATA) as srv, client(srv, paging="client", page_size=7) as c:
        srv.ignore_skip = True
        with pytest.raises(SourceError) as err:
            list(c.pages("Stops", orderby="ID"))
    assert str(err.value) == ('OData Stops page 2: the rows of page 1 again (the server '
                              'ignores $skip; [odata] paging = "server")')
    assert srv.request_count("Stops") == 2


@pytest.mark.parametrize("version", ["v4", "v2"])
def test_a_server_that_sends_its_first_page_for_every_next_link_fails_at_once(
        version: str) -> None:
    """A service whose paging code writes a new $skiptoken on each page but never reads it
    (a hand-written SAP gateway or Web API paging) sends its first rows again and again: the
    links never repeat, so it ran to max_pages, and the repeats were taken for duplicate
    keys (or, with --skip-invalid and count = false, dropped: only the first page loaded)."""
    with ODataServer(DATA, version=version, page_size=7) as srv, client(srv) as c:
        srv.ignore_skiptoken = True
        with pytest.raises(SourceError) as err:
            list(c.pages("Stops", orderby="ID"))
    assert str(err.value) == ("OData Stops page 2: the rows of page 1 again (the server's "
                              "nextLink led back to them: a paging loop)")
    assert srv.request_count("Stops") == 2


def test_client_paging_is_capped_by_max_pages(v4: ODataServer) -> None:
    with client(v4, paging="client", page_size=7, max_pages=3) as c, \
            pytest.raises(SourceError) as err:
        list(c.pages("Stops", orderby="ID"))
    assert str(err.value) == ("OData Stops: more than 3 pages ([odata] max_pages); raise it or "
                              "[odata] page_size")


def test_mapping_merges_over_defaults_and_names_bad_keys() -> None:
    m = resolve_mapping({"stops": {"set": "Ostanovki", "filter": "A eq 1",
                                   "fields": {"id": "Ref_Key", "city": ""}}})
    assert m["stops"].entity_set == "Ostanovki" and m["stops"].key_field == "Ref_Key"
    assert m["stops"].fields["latitude"] == "latitude" and m["stops"].fields["city"] == ""
    assert m["routes"].entity_set == "Routes"
    assert resolve_mapping({"stops": {"set": "Остановки", "fields": {"name": "Д" * 31}}}
                           )["stops"].entity_set == "Остановки"
    bad: list[dict[str, Any]] = [
        {"buses": {}}, {"stops": {"sets": "X"}}, {"stops": {"fields": {"lat": "L"}}},
        {"stops": {"fields": {"latitude": ""}}}, {"stops": {"set": "bad name"}},
        {"flights": {"filter": ""}}, {"stops": {"set": "1Stops"}},
        {"stops": {"set": "Stops\n"}},  # was sent as Stops%0A
        {"stops": {"fields": {"name": "Д" * 32}}},  # 64 bytes: PostgreSQL would cut it
    ]
    for raw in bad:
        with pytest.raises(ConfigError, match=r"\[odata.mapping"):
            resolve_mapping(raw)


def test_two_columns_reading_one_field_are_refused_unless_one_is_text_or_the_key() -> None:
    # A typo that maps longitude to the latitude's field, or a route's ends to one field,
    # stored every stop on the diagonal or every route as a loop, in silence.
    cases = {("stops", "longitude", "latitude"): "latitude and longitude both read 'latitude'",
             ("routes", "from_stop_id", "toStop_ID"):
                 "from_stop_id and to_stop_id both read 'toStop_ID'",
             ("flights", "arrival", "departure"): "departure and arrival both read 'departure'"}
    for (entity, column, name), why in cases.items():
        with pytest.raises(ConfigError, match=rf"\[odata.mapping.{entity}.fields\]: {why}"):
            resolve_mapping({entity: {"fields": {column: name}}})
    # a name that is also the key or the city, a schedule keyed by its route: as mapped
    m = resolve_mapping({"stops": {"fields": {"name": "ID", "city": "ID"}},
                         "flights": {"fields": {"id": "route_ID"}}})
    assert m["stops"].sources == ["ID", "isAirport", "latitude", "longitude"]
    assert m["flights"].fields["id"] == m["flights"].fields["route_id"] == "route_ID"


def test_a_set_given_with_its_path_points_at_the_url() -> None:
    # Business Central's OData web services address a set below its company:
    # .../ODataV4/Company('CRONUS USA, Inc.')/Customers. The path belongs in [odata] url.
    with pytest.raises(ConfigError) as err:
        resolve_mapping({"stops": {"set": "Company('CRONUS USA, Inc.')/Customers"}})
    assert str(err.value) == (
        "malformed setting [odata.mapping.stops]: set must be an entity set name, got "
        "\"Company('CRONUS USA, Inc.')/Customers\"; the path to it goes at the end of [odata] "
        "url (.../Company('CRONUS USA, Inc.')/) and set = \"Customers\"")


def test_a_mapped_field_may_be_a_path_into_complex_values_but_not_the_key() -> None:
    m = resolve_mapping({"stops": {"fields": {
        "latitude": "Location/Loc/coordinates/1", "longitude": "Location/Loc/coordinates/0",
        "city": "Location/City/Name", "name": "Location/Д" * 30}}})["stops"]
    assert m.select == ["ID", "Location", "isAirport"]  # $select: each property once
    assert m.sources == ["ID", "Location/City/Name", "Location/Loc/coordinates/0",
                         "Location/Loc/coordinates/1", "Location/Д" * 30, "isAirport"]
    bad = {"Location/": "must be a field name or a path", "/Loc": "", "Location//Loc": "",
           "Location/01": "", "Location/-1": "", "Location/1a": "", "Location/ Loc": "",
           "Lat\n": "", "Location/Loc\n": "", "Д" * 32 + "/Loc": "longer than 63 bytes"}
    for name, why in bad.items():
        with pytest.raises(ConfigError, match=r"\[odata.mapping.stops.fields\]: latitude.*"
                           + (why or "must be")):
            resolve_mapping({"stops": {"fields": {"latitude": name}}})
    with pytest.raises(ConfigError, match=r"id is the key: a property name, not a path, "
                       "got 'Location/Code'"):
        resolve_mapping({"stops": {"fields": {"id": "Location/Code"}}})


def test_an_entity_has_a_path_unless_an_object_on_it_lacks_a_name() -> None:
    row = {"ID": 1, "Location": {"City": None, "Loc": {"coordinates": [24.9]}}, "Gone": None}
    for path in ("ID", "Gone", "Gone/Name", "Location/City/Name", "Location/Loc/coordinates/0",
                 "Location/Loc/coordinates/1"):  # a null on the way, or an array too short
        assert has_field(row, path), path
    for path in ("id", "Location/Lco", "Location/Loc/coordinates/x", "ID/Name",
                 "Location/Loc/0", "Location/Loc/coordinates/0/x"):
        assert not has_field(row, path), path


@pytest.mark.parametrize("count", [5, "unknown"])
def test_a_count_not_asked_for_is_ignored(v4: ODataServer, count: Any) -> None:
    # [odata] count = false, and the server counts anyway (ignoring $filter, or as a word):
    # "the server counted 5 entities but its pages held 1", or "malformed count".
    v4.add_fault(wrong_shape({"value": [{"ID": 1}], "@odata.count": count}), entity_set="Stops")
    with client(v4, count=False) as c:
        assert [(p.rows, p.count) for p in c.pages("Stops")] == [([{"ID": 1}], None)]


@pytest.mark.parametrize(("user", "password"), [("Администратор", "пароль"),
                                                ("José", "pässwörd")])
def test_basic_credentials_are_sent_in_utf8(user: str, password: str) -> None:
    # Cyrillic was "internal error: UnicodeEncodeError: 'latin-1'"; Latin-1 went as Latin-1,
    # and a service reading UTF-8 (RFC 7617) answered 401.
    with ODataServer(DATA, username=user, password=password) as srv, \
            client(srv, username=user, password=password) as c:
        assert len(fetch(c)) == 40


def test_a_wrong_service_url_points_at_the_url_not_the_mapping(v4: ODataServer) -> None:
    with client(v4, url=v4.url.replace("/odata", "/odta")) as c, \
            pytest.raises(SourceError) as err:
        fetch(c)
    assert "the service document (check [odata] url): HTTP 404" in str(err.value)


def test_an_upper_case_scheme_is_a_url_like_any_other(v4: ODataServer) -> None:
    with client(v4, url=v4.url.replace("http://", "HTTP://")) as c:
        assert len(fetch(c)) == 40


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[str]:
    """An HTTPS port with a self-signed certificate: every handshake fails to verify."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout",
                    str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.handle_error = lambda *a: None  # type: ignore[method-assign]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}/odata/"
    httpd.shutdown()
    httpd.server_close()


def test_tls_failures_are_named_and_not_retried(tls_server: str, v4: ODataServer) -> None:
    # Both were "connection failed after 5 attempts".
    with ODataClient(ODataSettings(url=tls_server, backoff_base=1)) as c, \
            pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == (f"OData {endpoint(tls_server)} the service document: TLS "
                              "certificate verification failed: self-signed certificate (a "
                              "private CA: set [odata] ca_file)")
    with client(v4, url=v4.url.replace("http://", "https://"), backoff_base=1) as c, \
            pytest.raises(SourceError, match=r"the service document: TLS error: \w+") as err:
        fetch(c)
    assert "attempts" not in str(err.value)


def test_a_private_ca_is_trusted_from_ca_file(tls_server: str, tmp_path: Path) -> None:
    """requests trusts only certifi's CAs, and trust_env keeps REQUESTS_CA_BUNDLE out: a
    gateway signed by a company's own CA could not be reached at all."""
    settings = ODataSettings(url=tls_server, retries=1, ca_file=str(tmp_path / "cert.pem"))
    with ODataClient(settings) as c, pytest.raises(SourceError) as err:
        fetch(c)  # the handshake passes; the bare server answers GET with 501
    assert "HTTP 501" in str(err.value) and "TLS" not in str(err.value)
    with pytest.raises(ConfigError, match=r"\[odata\] ca_file '/nowhere.pem' is not a"):
        ODataClient(ODataSettings(url=tls_server, ca_file="/nowhere.pem"))
    # a job started by cron looks for a relative path elsewhere than the operator's shell
    with pytest.raises(ConfigError, match=r"is not a readable file \(relative to the working "
                       r"directory /.*: give the full path\)$"):
        ODataClient(ODataSettings(url=tls_server, ca_file="etc/nowhere.pem"))


@pytest.mark.parametrize("ca_file", ["x" * 10_000, "/etc/passwd/x.pem"])
def test_a_ca_file_that_no_file_can_be_is_a_config_error(ca_file: str) -> None:
    """A name longer than the system takes gave doctor and sync-odata an OSError traceback
    ("File name too long"), found by tests/reliability/test_fuzz_cli.py."""
    with pytest.raises(ConfigError, match=r"\[odata\] ca_file '.*' is not a readable file"):
        ODataClient(ODataSettings(url="http://127.0.0.1:9/odata/", ca_file=ca_file))


class _Redirects(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(307)
        self.send_header("Location", self.server.target + self.path)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def redirecting(v4: ODataServer) -> Iterator[str]:
    """A service URL that redirects every request to ``v4`` named ``localhost``."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Redirects)
    httpd.target = f"http://localhost:{v4.port}"  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/odata/"
    httpd.shutdown()
    httpd.server_close()


def test_a_redirect_to_another_host_follows_the_foreign_next_link_policy(
        v4: ODataServer, redirecting: str, caplog: pytest.LogCaptureFixture) -> None:
    # Redirects were followed in silence, with foreign_next_link = refuse too.
    with client(v4, url=redirecting, foreign_next_link="refuse") as c, \
            pytest.raises(SourceError, match=r"the service document: redirected to another host "
                          r"\(localhost\); refusing to follow it"):
        fetch(c)
    assert v4.request_count() == 0
    with caplog.at_level(logging.INFO, logger="pipeline.odata"), \
            client(v4, url=redirecting) as c:
        assert len(fetch(c)) == 40 and len(fetch(c, "Routes")) == 80
    assert [r.getMessage() for r in caplog.records if "redirects" in r.getMessage()] == [
        f"the OData service redirects to http://localhost:{v4.port}; following it ([odata] "
        "foreign_next_link = rewrite)"]
    v4.add_fault(status(404), entity_set="Stops")  # named as the host that answered
    with client(v4, url=redirecting) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value).startswith(f"OData http://localhost:{v4.port} Stops page 1")


def test_an_xml_error_body_is_read() -> None:
    # SAP's V2 errors were shown raw, cut at 300 characters.
    body = (b'<?xml version="1.0" encoding="utf-8"?><error xmlns="http://schemas.microsoft.com/'
            b'ado/2007/08/dataservices/metadata"><code>SY/530</code><message xml:lang="en">'
            b'Backend system ERP_100 not reachable</message><innererror><transactionid>'
            b'5F0C</transactionid></innererror></error>')
    assert error_line(503, body, "application/xml") == (
        "HTTP 503 SY/530: Backend system ERP_100 not reachable")
    # a DTD (entities that expand) is not parsed: the text is shown as it is
    bomb = b'<!DOCTYPE e [<!ENTITY a "aaaa">]><error><code>&a;</code></error>'
    assert error_line(500, bomb, "application/xml").startswith("HTTP 500 <!DOCTYPE")


def test_the_attempts_survive_a_long_error(v4: ODataServer) -> None:
    v4.add_fault(status(503, message="overloaded " * 50), entity_set="Stops", times=None)
    with client(v4, retries=2) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value).endswith("… after 2 attempts")


def test_markup_labelled_json_fails_at_once_showing_its_start(v4: ODataServer) -> None:
    # A login page labelled application/json was "malformed JSON (Expecting value at byte 0;
    # truncated?) after 5 attempts".
    v4.add_fault(wrong_shape(b"\n<html>\n<head><title>Sign in</title></head><body>Please "
                             b"sign in to continue to the gateway</body></html>"),
                 entity_set="Stops", times=None)
    with client(v4) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == (
        "OData Stops page 1: expected JSON, got application/json starting '<html> <head>"
        "<title>Sign in</title></head><body>Please sign '")
    assert v4.request_count("Stops") == 1


def test_a_raw_control_character_is_named_once(v4: ODataServer) -> None:
    v4.add_fault(wrong_shape(b'{"value": [{"ID": 1, "name": "a\tb"}]}'), entity_set="Stops")
    with client(v4, retries=1) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert "malformed JSON (Invalid control character at byte 31; truncated?)" in str(err.value)


def test_a_raw_nul_in_a_utf8_page_is_malformed_json_not_another_encoding(
        v4: ODataServer) -> None:
    v4.add_fault(wrong_shape(b'{"value": [{"ID": 1, "name": "a\0b"}]}'), entity_set="Stops")
    with client(v4, retries=1) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert "malformed JSON (Invalid control character at byte 31; truncated?)" in str(err.value)


def test_a_set_is_requested_by_the_url_its_service_document_entry_gives() -> None:
    # A V4 service document may list a set under a name other than its URL (name "Stops",
    # url "StopSet"): requested by its name, the set was a 404 blamed on the mapping.
    data = {"StopSet": DATA["Stops"]}
    with ODataServer(data, root="/gw/odata", page_size=10,
                     next_link_base="http://sapgw01.corp.internal:8000/odata/") as srv, \
            client(srv) as c:
        srv.service_names = {"StopSet": "Stops"}
        assert [r["ID"] for r in fetch(c)] == list(range(1, 41))
        assert c.probe("Stops", orderby="ID", select=["ID"]) == 1
        srv.add_fault(status(404, message="gone"), entity_set="StopSet", match="skiptoken")
        with pytest.raises(SourceError, match=r"OData .* Stops page 2: HTTP 404"):
            fetch(c)
    assert {r.path for r in srv.requests[1:]} == {"/gw/odata/StopSet"}


def test_probe_reads_a_property_left_out_as_null_when_metadata_declares_it() -> None:
    # doctor's $top=1 row of a service that leaves nulls out: "the entity has no field 'city'"
    data = {"Stops": [{**DATA["Stops"][0], "city": None}, *DATA["Stops"][1:]]}
    with ODataServer(data) as srv, client(srv) as c:
        srv.omit_nulls = True
        assert c.probe("Stops", orderby="ID", select=["ID", "city"]) == 1
        with pytest.raises(SourceError, match="the entity has no field 'cty'"):
            c.probe("Stops", orderby="ID", fields=["ID", "cty"])


@pytest.mark.parametrize(("doc", "version", "got"), [
    ({"@odata.context": "x"}, "v4", "no 'value'"), ({"value": None}, "v4", "null"),
    ({"value": "x"}, "v4", "a string"), ({"d": {"__count": "3"}}, "v2", "no 'd.results'"),
    ({"d": {"results": {"a": 1}}}, "v2", "an object")])
def test_a_page_without_a_list_of_entities_says_what_it_has(doc: Any, version: str, got: str
                                                             ) -> None:
    # a missing 'value' was 'got NoneType', as a null one
    where = "'value'" if version == "v4" else "'d.results'"
    with pytest.raises(SourceError) as err:
        unwrap_page(doc, version, "Stops page 1")
    assert str(err.value) == (f"OData Stops page 1: expected a list of entities in {where}, "
                              f"got {got}")


SAP_METADATA = b"""<?xml version="1.0" encoding="utf-8"?>
<edmx:Edmx Version="1.0" xmlns:edmx="http://schemas.microsoft.com/ado/2007/06/edmx"
    xmlns:sap="http://www.sap.com/Protocols/SAPData"><edmx:DataServices>
<Schema Namespace="ZPIPE_SRV" Alias="Z" xmlns="http://schemas.microsoft.com/ado/2008/09/edm">
 <EntityType Name="Base"><Key><PropertyRef Name="ID"/></Key>
  <Property Name="ID" Type="Edm.String" sap:label="Id"/></EntityType>
 <EntityType Name="Stop" BaseType="Z.Base"><Property Name="city" Type="Edm.String"/>
  <NavigationProperty Name="toRoutes" Relationship="Z.R" FromRole="A" ToRole="B"/></EntityType>
 <EntityType Name="Loop" BaseType="ZPIPE_SRV.Loop"><Property Name="x" Type="Edm.String"/>
 </EntityType>
 <EntityContainer Name="ZPIPE_SRV_Entities" m:IsDefaultEntityContainer="true"
   xmlns:m="http://schemas.microsoft.com/ado/2007/08/dataservices/metadata">
  <EntitySet Name="StopSet" EntityType="ZPIPE_SRV.Stop"/>
  <EntitySet Name="Loops" EntityType="Z.Loop"/></EntityContainer>
</Schema></edmx:DataServices></edmx:Edmx>"""


@pytest.mark.parametrize(("metadata", "entity_set", "declared"), [
    (SAP_METADATA, "StopSet", {"ID", "city"}),  # with its base type's, not navigation ones
    (SAP_METADATA, "Loops", {"x"}),  # a type its own base: read once
    (SAP_METADATA, "Stops", set()),  # no such set
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><x/>', "StopSet", set()),
    (b"<edmx:Edmx", "StopSet", set()),  # not XML
    (b'{"$Version": "4.01"}', "StopSet", set()),  # CSDL JSON, though XML was asked for
])
def test_declared_reads_the_entity_type_of_a_set_from_metadata(
        v4: ODataServer, metadata: bytes, entity_set: str, declared: set[str]) -> None:
    v4.metadata = metadata
    with client(v4) as c:
        assert c.declared(entity_set) == declared
    assert v4.requests[-1].headers["accept"] == "application/xml"


def test_declared_is_empty_when_metadata_fails(v4: ODataServer) -> None:
    v4.add_fault(status(404), match="$metadata")
    with client(v4, retries=1) as c:
        assert c.declared("Stops") == set()


def test_probe_names_the_url_of_a_page_without_entities(v4: ODataServer) -> None:
    v4.add_fault(wrong_shape({"value": None}), entity_set="Stops")
    with client(v4) as c, pytest.raises(SourceError) as err:
        c.probe("Stops", orderby="ID", select=["ID"])
    assert str(err.value) == ("OData Stops $top=1: expected a list of entities in 'value', got "
                              f"null ({v4.url}Stops?$select=ID&$orderby=ID&$count=true&$top=1)")
