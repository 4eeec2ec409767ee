"""Fuzzing with hypothesis: OData pages served by the real fixture server (odd types, missing
fields, huge strings, odd unicode, wrong JSON shapes, HTML, truncation) into ``sync-odata``,
and GPS files (CSV, GPX, GeoJSON) into ``ingest-gps --strict``. Over 1 000 cases in total.

Every case must end with a defined exit code (0 or 1), never a traceback, a one-line error
naming the problem, and nothing written when the input is rejected (database counts).
For speed most cases run the CLI in-process (CliRunner) on one database per test, emptied
between examples; a few run as real processes. Examples are derandomized (reproducible CI).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from devtools.odata_server import Fault
from tests.support.clirunner import Cli
from tests.support.reliability import Sandbox, run_pipeline

SandboxFactory = Callable[..., Sandbox]
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
ERROR_LINE = re.compile(r"^pipeline [a-z-]+: error: \S.*$", re.M)

pytestmark = [
    pytest.mark.s3,
    # Examples with huge strings are huge on purpose; hypothesis warns when it reprs them.
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]


def count(sb: Sandbox, table: str) -> int:
    row = sb.connect().execute(f"SELECT count(*) AS n FROM {table}").fetchone()  # noqa: S608
    assert row is not None
    return int(row["n"])


def assert_defined(res: Any, what: str) -> None:
    """Exit 0 or 1, no traceback, and on failure exactly one ``pipeline X: error:`` line."""
    text = res.output + (res.stderr or "")
    assert res.exit_code in (0, 1), f"{what}: exit {res.exit_code}: {text[-800:]}"
    assert "Traceback" not in text, f"{what}: {text[-2000:]}"
    if res.exit_code == 1:
        assert len(ERROR_LINE.findall(res.stderr)) == 1, f"{what}: {res.stderr[-800:]}"


# ------------------------------------------------------------------ OData

weird_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF,
                                   blacklist_categories=("Cs",)), max_size=20),
    st.sampled_from(["", " ", "\x00", "\t\n", "'; DROP TABLE stops; --", "\\N", "\u202e",
                     "😀" * 50, "a" * 100_000]),
)
any_value = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**20, max_value=10**20),
                      st.floats(allow_nan=False, allow_infinity=False), weird_text,
                      st.lists(st.integers(), max_size=3),
                      st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
MISSING = object()


def field(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a good value, sometimes any value, sometimes absent."""
    return st.one_of(good, good, good, any_value, st.just(MISSING))


def rows(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Rows that are all good, or fuzzed field by field (both kinds, so that some feeds load)."""
    return st.one_of(st.fixed_dictionaries(fields),
                     st.fixed_dictionaries({k: field(v) for k, v in fields.items()}))


stop_row = rows({
    "ID": st.integers(min_value=1, max_value=6),
    "name": weird_text,
    "latitude": st.floats(min_value=-100, max_value=100, allow_nan=False),
    "longitude": st.floats(min_value=-200, max_value=200, allow_nan=False),
    "isAirport": st.booleans(),
    "city": st.one_of(st.none(), weird_text),
})
route_row = rows({
    "ID": st.integers(min_value=1, max_value=4),
    "fromStop_ID": st.integers(min_value=1, max_value=7),
    "toStop_ID": st.integers(min_value=1, max_value=7),
    "mode": st.sampled_from(["bus", "tram", "train", "ferry", "flight"]),
    "distanceKm": st.one_of(st.none(), st.floats(min_value=-5, max_value=5000)),
})
flight_row = rows({
    "ID": st.integers(min_value=1, max_value=3),
    "route_ID": st.integers(min_value=1, max_value=5),
    "departure": st.sampled_from(["06:00", "23:59", "24:00", "6", "noon", ""]),
    "arrival": st.sampled_from(["07:10", "00:00", "25:61", ""]),
    "daysOfWeek": st.sampled_from(["12345", "67", "1234567", "8", "", "11"]),
})


def strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if v is not MISSING} for r in rows]


# The fixture server infers its field types from the rows; a real service has a fixed schema,
# so it is declared here and only the values are fuzzed.
TYPES = {
    "Stops": {"ID": "Edm.Int64", "name": "Edm.String", "latitude": "Edm.Double",
              "longitude": "Edm.Double", "isAirport": "Edm.Boolean", "city": "Edm.String"},
    "Routes": {"ID": "Edm.Int64", "fromStop_ID": "Edm.Int64", "toStop_ID": "Edm.Int64",
               "mode": "Edm.String", "distanceKm": "Edm.Double"},
    "Flights": {"ID": "Edm.Int64", "route_ID": "Edm.Int64", "departure": "Edm.String",
                "arrival": "Edm.String", "daysOfWeek": "Edm.String"},
}


@pytest.fixture
def odata_world(make_sandbox: SandboxFactory) -> tuple[Sandbox, Cli]:
    sb = make_sandbox(odata_rows=None)
    sb.start_odata({name: [] for name in TYPES}, types=TYPES)
    sb.env.update({"PIPELINE_ODATA_RETRIES": "1", "PIPELINE_ODATA_READ_TIMEOUT": "3",
                   "PIPELINE_ODATA_MAX_PAGES": "10",
                   "PIPELINE_ODATA_MAX_RESPONSE_BYTES": str(4 * 1024 * 1024)})
    return sb, Cli(sb.env)


def odata_case(sb: Sandbox, cli: Cli, what: str) -> Any:
    sb.reset_tables(["flights", "routes", "stops", "datasets", "stage_runs"])
    res = cli("-q", "sync-odata")
    assert_defined(res, what)
    event(f"sync-odata exit {res.exit_code}")
    event(re.sub(r"\d+", "N", (ERROR_LINE.findall(res.stderr) or [""])[0])[:90])
    if res.exit_code == 1:  # rejected: nothing written
        assert count(sb, "datasets") == 0 and count(sb, "stops") == 0, what
    else:
        assert count(sb, "datasets") == 1, what
        assert sb.check() == [], what
    return res


@settings(FUZZ, max_examples=300)
@given(stops=st.lists(stop_row, min_size=0, max_size=6, unique_by=lambda r: str(r.get('ID'))),
       routes=st.lists(route_row, max_size=4), flights=st.lists(flight_row, max_size=3),
       consistent=st.booleans())
def test_fuzz_odata_rows(odata_world: tuple[Sandbox, Cli], stops: list[dict[str, Any]],
                         routes: list[dict[str, Any]], flights: list[dict[str, Any]],
                         consistent: bool) -> None:
    sb, cli = odata_world
    assert sb.odata is not None
    if consistent and stops:  # keys and references right, the other fields as drawn
        for i, r in enumerate(stops):
            r["ID"] = i + 1
        for i, r in enumerate(routes):
            r.update(ID=i + 1, fromStop_ID=i % len(stops) + 1, toStop_ID=(i + 1) % len(stops) + 1)
        flights = [{**f, "ID": i + 1, "route_ID": i % len(routes) + 1}
                   for i, f in enumerate(flights)] if routes else []
    sb.odata.clear_faults()
    for name, rows in (("Stops", stops), ("Routes", routes), ("Flights", flights)):
        sb.odata.set_rows(name, strip(rows))
    odata_case(sb, cli, f"stops={strip(stops)!r:.300} routes={strip(routes)!r:.200}")


json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), weird_text),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(["value", "d", "results",
                                                             "@odata.nextLink", "__next", "ID",
                                                             "x"]), inner, max_size=4)),
    max_leaves=12)
page_fault = st.one_of(
    json_value.map(Fault.wrong_shape),
    st.just(Fault.wrong_shape()),
    st.just(Fault.html()),
    st.just(Fault.truncated_json()),
    st.just(Fault.truncated_json(content_length=False)),
    st.just(Fault.never_ending_next_link()),
    st.just(Fault.never_ending_next_link(same_link=True)),
    st.just(Fault.huge_response(6 * 1024 * 1024, content_length=False)),
    st.sampled_from([400, 401, 403, 404, 410, 429, 500, 502, 503]).map(
        lambda c: Fault.status(c, retry_after=0)),
)


@settings(FUZZ, max_examples=150)
@given(fault=page_fault, entity_set=st.sampled_from(["Stops", "Routes", "Flights", None]))
def test_fuzz_odata_page_shapes(odata_world: tuple[Sandbox, Cli], fault: Fault,
                                entity_set: str | None) -> None:
    sb, cli = odata_world
    assert sb.odata is not None
    sb.odata.clear_faults()
    sb.odata.add_fault(fault, entity_set=entity_set, times=None)
    res = odata_case(sb, cli, f"{fault!r:.300} on {entity_set}")
    sb.odata.clear_faults()
    if fault.kind not in ("wrong_shape",):
        assert res.exit_code == 1, f"{fault!r:.300}: {res.output}"


# ------------------------------------------------------------------ GPS files

device = st.one_of(st.sampled_from(["car-1", "bus 7", "Ä", "'; DROP TABLE gps_points; --"]),
                   weird_text)
when = st.one_of(
    st.datetimes(timezones=st.none()).map(lambda d: d.isoformat() + "Z"),
    st.sampled_from(["2024-01-01T00:00:00Z", "2024-01-01 00:00:05+02:00", "1704067200",
                     "1704067200000", "yesterday", "", "2024-13-40T25:61:61Z", "NaN"]),
    st.integers(min_value=-10**12, max_value=10**13).map(str),
)
coord = st.one_of(st.floats(min_value=-200, max_value=200).map(repr),
                  st.sampled_from(["nan", "inf", "-inf", "", "1e400", "60,17", "0x10", " 60.1"]),
                  weird_text)


def csv_field(v: str) -> str:
    return '"' + v.replace('"', '""') + '"' if any(c in v for c in ',"\n\r') else v


csv_rows = st.lists(st.tuples(device, when, coord, coord), max_size=6)


@pytest.fixture
def gps_world(make_sandbox: SandboxFactory, tmp_path: Path) -> tuple[Sandbox, Cli, Path]:
    sb = make_sandbox(odata_rows=None)
    return sb, Cli(sb.env), tmp_path


def gps_case(world: tuple[Sandbox, Cli, Path], name: str, content: str | bytes) -> None:
    sb, cli, tmp = world
    sb.reset_tables(["gps_points", "stage_runs"])
    path = tmp / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(content)
    res = cli("-q", "ingest-gps", "--strict", str(path))
    assert_defined(res, f"{name}: {content!r:.400}")
    event(f"ingest-gps exit {res.exit_code}")
    points = count(sb, "gps_points")
    if res.exit_code == 1:
        assert points == 0, f"rejected but {points} point(s) written: {content!r:.400}"
        assert path.name in res.stderr, res.stderr  # the error names the file
    else:
        assert count(sb, "stage_runs") == 1


@settings(FUZZ, max_examples=250)
@given(header=st.sampled_from(["device_id,recorded_at,latitude,longitude",
                               "device,time,lat,lon", "lat,lon", "", "a,b,c,d"]),
       rows=csv_rows, junk=st.one_of(st.none(), weird_text, st.binary(max_size=40)))
def test_fuzz_gps_csv(gps_world: tuple[Sandbox, Cli, Path], header: str,
                      rows: list[tuple[str, str, str, str]], junk: str | bytes | None) -> None:
    lines = [header] if header else []
    lines += [",".join(csv_field(v) for v in row) for row in rows]
    text = "\n".join(lines) + "\n"
    if isinstance(junk, bytes):
        gps_case(gps_world, "points.csv", text.encode() + junk)
    else:
        gps_case(gps_world, "points.csv", text + (junk or ""))


def gpx(points: list[tuple[str, str, str]], name: str, broken: bool) -> str:
    pts = "".join(f'<trkpt lat="{la}" lon="{lo}"><time>{t}</time></trkpt>'
                  for la, lo, t in points)
    doc = (f'<?xml version="1.0" encoding="UTF-8"?><gpx version="1.1" creator="fuzz" '
           f'xmlns="http://www.topografix.com/GPX/1/1"><trk><name>{name}</name><trkseg>{pts}'
           f'</trkseg></trk></gpx>')
    return doc[: len(doc) // 2] if broken else doc


xml_safe = st.text(alphabet=st.characters(blacklist_characters='<>&"',
                                          blacklist_categories=("Cs", "Cc")), max_size=20)


@settings(FUZZ, max_examples=150)
@given(points=st.lists(st.tuples(st.one_of(coord.filter(lambda s: not set(s) & set('<>&"')),
                                           xml_safe),
                                 coord.filter(lambda s: not set(s) & set('<>&"')),
                                 when.filter(lambda s: not set(s) & set("<>&"))), max_size=6),
       name=xml_safe, broken=st.booleans())
def test_fuzz_gps_gpx(gps_world: tuple[Sandbox, Cli, Path], points: list[tuple[str, str, str]],
                      name: str, broken: bool) -> None:
    gps_case(gps_world, "track.gpx", gpx(points, name, broken))


geo_coord = st.one_of(st.floats(min_value=-200, max_value=200, allow_nan=False), st.none(),
                      weird_text, st.integers(), st.booleans())
geometry = st.one_of(
    st.builds(lambda c: {"type": "Point", "coordinates": c},
              st.lists(geo_coord, min_size=0, max_size=3)),
    st.builds(lambda cs: {"type": "LineString", "coordinates": cs},
              st.lists(st.lists(geo_coord, min_size=1, max_size=3), max_size=4)),
    json_value,
)
properties = st.fixed_dictionaries({}, optional={
    "device_id": st.one_of(device, st.integers(), st.none()),
    "time": st.one_of(when, st.integers(), st.none()),
    "times": st.lists(st.one_of(when, st.integers()), max_size=4),
    "coordTimes": st.lists(when, max_size=4),
})
feature = st.one_of(st.builds(lambda g, p: {"type": "Feature", "geometry": g, "properties": p},
                              geometry, properties), json_value)


@settings(FUZZ, max_examples=200)
@given(features=st.lists(feature, max_size=5), wrap=st.sampled_from(["collection", "feature",
                                                                     "bare", "cut"]))
def test_fuzz_gps_geojson(gps_world: tuple[Sandbox, Cli, Path], features: list[Any],
                          wrap: str) -> None:
    if wrap == "feature" and features:
        doc: Any = features[0]
    elif wrap == "bare":
        doc = features
    else:
        doc = {"type": "FeatureCollection", "features": features}
    text = json.dumps(doc, ensure_ascii=False, indent=1)
    if wrap == "cut":
        text = text[: len(text) // 2]
    gps_case(gps_world, "points.geojson", text)


# ------------------------------------------------------------------ as real processes


@pytest.mark.parametrize("name,content", [
    ("bad.csv", "device_id,recorded_at,latitude,longitude\ncar,2024-01-01T00:00:00Z,nan,24\n"),
    ("bad.gpx", "<gpx><trk><trkseg><trkpt lat='x' lon='1'></trkpt>"),
    ("bad.geojson", '{"type": "FeatureCollection", "features": [1, 2'),
    ("bin.csv", "\x00\x01\x02\xff"),
])
def test_rejected_files_as_real_processes(make_sandbox: SandboxFactory, tmp_path: Path,
                                          name: str, content: str) -> None:
    sb = make_sandbox(odata_rows=None)
    path = tmp_path / name
    path.write_text(content, encoding="latin-1")
    res = run_pipeline(["ingest-gps", "--strict", str(path)], sb.env)
    assert res.exit_code == 1, res.describe()
    assert "Traceback" not in res.stderr
    assert len(ERROR_LINE.findall(res.stderr)) == 1 and name in res.stderr, res.stderr
    assert count(sb, "gps_points") == 0


def test_wrong_shape_page_as_a_real_process(sandbox: Sandbox) -> None:
    assert sandbox.odata is not None
    sandbox.odata.add_fault(Fault.wrong_shape({"value": {"not": "a list"}}), times=None)
    res = run_pipeline(["sync-odata"], sandbox.env)
    assert res.exit_code == 1 and "Traceback" not in res.stderr, res.describe()
    assert len(ERROR_LINE.findall(res.stderr)) == 1, res.stderr
    assert count(sandbox, "datasets") == 0
