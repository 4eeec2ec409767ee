"""The OSRM adapter against a real osrm-routed on the Helsinki extract."""

from __future__ import annotations

import contextlib
import random

import pytest

from devtools import traces
from devtools.procs import free_port
from pipeline_cli.adapters.osrm import (
    OsrmClient,
    OsrmNoMatch,
    OsrmTooBig,
    OsrmUnavailable,
    clamp_confidence,
)
from pipeline_cli.errors import OsrmError
from tests.support.proxy import CountingHttpProxy

pytestmark = pytest.mark.osrm


@pytest.fixture
def client(osrm_url: str) -> OsrmClient:
    with OsrmClient(osrm_url, retries=2, retry_wait_max=0.1) as c:
        yield c


def test_match_returns_every_matching_and_tracepoints(client: OsrmClient) -> None:
    trace = traces.make_trace(client, random.Random(5))
    points = trace.points[:60]
    stamps = [1714550400 + int(s) * 2 for s in range(len(points))]
    result = client.match(points, stamps, 5.0)
    assert result.matchings and len(result.tracepoints) == len(points)
    assert all(0.0 <= m.confidence <= 1.0 for m in result.matchings)
    assert all(len(m.geometry) >= 2 for m in result.matchings)
    matched = [tp for tp in result.tracepoints if tp is not None]
    assert {tp.matchings_index for tp in matched} == set(range(len(result.matchings)))
    lat, lon = matched[0].location
    assert 60.1 < lat < 60.2 and 24.9 < lon < 25.0


def test_too_big_is_distinct(client: OsrmClient) -> None:
    points = [(60.17 + i * 1e-5, 24.94) for i in range(101)]
    with pytest.raises(OsrmTooBig):
        client.match(points, list(range(1000, 1101)), 5.0)


def test_no_segment_outside_the_extract(client: OsrmClient) -> None:
    with pytest.raises(OsrmNoMatch) as info:
        client.match([(60.168, 25.94), (60.168, 25.941)], [0, 10], 5.0)
    assert info.value.code == "NoSegment"


def test_no_match(client: OsrmClient) -> None:
    with pytest.raises(OsrmNoMatch) as info:
        client.match([(60.168, 24.940), (60.168, 24.941), (60.1681, 24.942)], [0, 10, 20], 15)
    assert info.value.code == "NoMatch"


def test_timestamps_must_strictly_increase(client: OsrmClient) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        client.match([(60.17, 24.94), (60.171, 24.941)], [5, 5], 5.0)


def test_connection_errors_are_retried_then_wrapped() -> None:
    with OsrmClient(f"http://127.0.0.1:{free_port()}", retries=3, retry_wait_max=0.05) as c:
        with pytest.raises(OsrmUnavailable, match="3 attempt"):
            c.match([(60.17, 24.94), (60.171, 24.941)], [0, 5], 5.0)
        assert c.requests == 3


def test_osrm_down_is_one_short_line_naming_the_endpoint() -> None:
    base = f"http://127.0.0.1:{free_port()}"
    trace = [(60.17 + i * 1e-4, 24.94 + i * 1e-4) for i in range(100)]  # a long polyline
    with (OsrmClient(base, retries=2, retry_wait_max=0.05) as c,
          pytest.raises(OsrmUnavailable) as err):
        c.match(trace, list(range(0, 500, 5)), 5.0)
    message = str(err.value)
    assert message == f"OSRM {base} unavailable after 2 attempts: connection refused"
    assert "\n" not in message and len(message) < 200 and "polyline" not in message


def test_blocked_proxy_then_back(osrm_url: str) -> None:
    with CountingHttpProxy(osrm_url) as proxy, OsrmClient(proxy.url, retries=2,
                                                          retry_wait_max=0.05) as c:
        points, stamps = [(60.1699, 24.9414), (60.1702, 24.9420)], [0, 10]
        proxy.block()
        with pytest.raises(OsrmError):
            c.match(points, stamps, 5.0)
        proxy.unblock()
        with contextlib.suppress(OsrmNoMatch):  # any OSRM answer proves the client recovered
            c.match(points, stamps, 5.0)
        assert proxy.count("/match/") >= 1


HOSTILE = ("<html><head><title>\x1b[2J\x1b]0;owned\x07Bad\u202e\x00 gateway</title></head>"
           "</html>")


@pytest.mark.parametrize(("status", "said"), [
    (200, "answered HTTP 200 with a non-JSON body (text/html) reading "),
    (502, "unavailable after 2 attempts: HTTP 502 "),
])
def test_a_page_in_place_of_osrm_is_quoted_printable(osrm_url: str, status: int,
                                                     said: str) -> None:
    """A proxy's page is quoted by its title, its control characters escaped as in a log line
    and other unprintable ones (a bidi override) left out: a 5xx page went into the line whole,
    an ANSI escape to the operator's terminal and a NUL into the failed batch's error, which
    PostgreSQL then refused to store."""
    with CountingHttpProxy(osrm_url) as proxy, OsrmClient(proxy.url, retries=2,
                                                          retry_wait_max=0.05) as c:
        proxy.answer(status, HOSTILE, "text/html; charset=utf-8")
        with pytest.raises(OsrmError) as err:
            c.nearest((60.17, 24.94))
    message = str(err.value)
    assert message.startswith(f"OSRM {proxy.url} {said}"
                              "'\\x1b[2J\\x1b]0;owned\\x07Bad\\x00 gateway'"), message
    assert message.isprintable() and "<title>" not in message, message


def test_route_decodes_geometry(client: OsrmClient) -> None:
    route = client.route([(60.168, 24.940), (60.175, 24.950)])
    assert route["distance"] > 0 and len(route["coordinates"]) >= 2


@pytest.mark.parametrize(("raw", "want"), [(1.0000001, 1.0), (0.4, 0.4), (-1, 0.0),
                                          (None, 0.0), ("nan", 0.0)])
def test_confidence_is_clamped(raw: object, want: float) -> None:
    assert clamp_confidence(raw) == want
