"""sync-odata's canonical rows: the compiled fast path, the row index and one set's processing.

No server here: these are the pure parts the row worker runs; the stage's own tests run them
end to end against the OData fixture server, PostgreSQL and S3.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline_cli.adapters.odata_format import resolve_mapping
from pipeline_cli.sync.rows import (
    COLUMNS,
    INDEX_CHUNK,
    SEEN,
    Problems,
    RowDigests,
    RowNormaliser,
    SetFiles,
    SetProcessor,
    compile_normaliser,
    index_chunks,
    load_index,
    write_index,
)

MAPPINGS = resolve_mapping(None)

number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**20, 10**20),
    st.floats(-200, 200).map(repr), st.integers(-200, 200).map(str),
    st.sampled_from(["-0.0", "0", "1e5", " 60.5", "60.5 ", "+1.5", "1_0.5", "0x10", "nan",
                     "inf", "-inf", "1e400", "60.50", "060.5", "12d", "", "abc"]),
    st.booleans(), st.none())
text = st.one_of(st.none(), st.text(max_size=6), st.integers(-5, 5), st.floats(-5, 5),
                 st.booleans(), st.sampled_from(["a\\b", "tab\there", "new\nline", "\x00",
                                                 "Hämeenlinna \U0001F689", "\x7f", ""]))
key = st.one_of(st.integers(-5, 10**12), st.text(max_size=4), st.none(), st.booleans(),
                st.floats(-5, 5), st.sampled_from(["a\\b", "x\ty", "\x00", "7", ""]))
time_ = st.one_of(st.sampled_from(["06:00", "23:59", "24:00", "6", "PT08H30M00S", "",
                                   "/Date(3600000)/", "2024-05-01T08:30:00Z", "08:30:00.5"]),
                  st.integers(0, 5), st.none())
days = st.one_of(st.sampled_from(["12345", "67", "1234567", "8", "", "11", "76"]),
                 st.integers(0, 99), st.none())
FIELDS = {
    "stops": {"ID": key, "name": text, "latitude": number, "longitude": number,
              "isAirport": st.one_of(st.booleans(), st.none(), st.sampled_from(
                  ["true", "1", 0, 2, "no"])), "city": text},
    "routes": {"ID": key, "fromStop_ID": key, "toStop_ID": key, "mode": text,
               "distanceKm": number},
    "flights": {"ID": key, "route_ID": key, "departure": time_, "arrival": time_,
                "daysOfWeek": days},
}


def rows_of(entity: str) -> st.SearchStrategy[list[dict[str, Any]]]:
    # a field may be missing from a row altogether
    row = st.fixed_dictionaries({}, optional=FIELDS[entity])
    return st.lists(row, max_size=8)


def generic(entity: str, rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    normalise = RowNormaliser(MAPPINGS[entity])
    lines, problems = [], []
    for row in rows:
        line, found = normalise(row)
        if line is None:
            problems += [str(p) for p in found]
        else:
            lines.append(line)
    return lines, problems


@pytest.mark.parametrize("entity", list(FIELDS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_compiled_page_loop_equals_the_generic_normaliser(entity: str,
                                                              data: st.DataObject) -> None:
    rows = data.draw(rows_of(entity))
    want_lines, want_problems = generic(entity, rows)
    page = compile_normaliser(MAPPINGS[entity])
    slow = RowNormaliser(MAPPINGS[entity])
    lines: list[str] = []
    keys: list[str] = []
    refs: set[str] = set()
    problems: list[str] = []

    def on_slow(row: dict[str, Any], out: list[str], out_keys: list[str],
                out_refs: set[str]) -> None:
        line, found = slow(row)
        if line is None:
            problems.extend(str(p) for p in found)
            return
        out.append(line)
        out_keys.append(line.split("\t")[0])

    page(rows, lines, keys, refs, on_slow)
    assert lines == want_lines
    assert problems == want_problems
    assert keys == [line.split("\t")[0] for line in lines]


def test_canonical_numbers() -> None:
    page = compile_normaliser(MAPPINGS["routes"])
    lines: list[str] = []
    page([{"ID": 1, "fromStop_ID": 1, "toStop_ID": 2, "mode": None, "distanceKm": v}
          for v in ("-0.0", "60.50", 3, "1e5", 0.1 + 0.2)], lines, [], set(), None)
    assert [line.split("\t")[4] for line in lines] == [
        "0.0\n", "60.5\n", "3.0\n", "100000.0\n", "0.30000000000000004\n"]


def _spool(tmp_path: Path, entity: str, rows: list[dict[str, Any]], *, pages: int = 2
           ) -> tuple[SetFiles, list[tuple[int, int]]]:
    """Write rows as raw V4 pages the way the sync spools them; returns the page spans."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    files = SetFiles.of(tmp_path, entity)
    spans = []
    size = math.ceil(len(rows) / pages) or 1
    with files.raw.open("wb") as raw:
        for i in range(0, max(len(rows), 1), size):
            body = json.dumps({"value": rows[i:i + size]}).encode()
            raw.write(b"\x1e")
            spans.append((raw.tell(), len(body)))
            raw.write(body + b"\n")
    return files, spans


def _process(tmp_path: Path, entity: str, rows: list[dict[str, Any]],
             index: dict[str, int] | None, parents: dict[str, dict[str, int]] | None = None,
             ) -> tuple[SetProcessor, Problems]:
    files, spans = _spool(tmp_path, entity, rows)
    problems = Problems()
    proc = SetProcessor(MAPPINGS[entity], files, "v4", problems, index, parents or {})
    for number, (offset, length) in enumerate(spans, start=1):
        proc.page(offset, length, number)
    proc.close()
    return proc, problems


def stop(i: int, name: str = "s") -> dict[str, Any]:
    return {"ID": i, "name": name, "latitude": 60.0 + i / 100, "longitude": 24.5,
            "isAirport": False, "city": "Helsinki"}


def test_a_set_against_its_index_finds_new_changed_and_vanished_rows(tmp_path: Path) -> None:
    first, _ = _process(tmp_path / "a", "stops", [stop(i) for i in range(1, 11)], None)
    # the worker's own index files are the index of its spool
    keys, digests = tmp_path / "keys", tmp_path / "digests"
    write_index(first.files.spool, keys, digests)
    assert (first.files.keys.read_bytes(), first.files.digests.read_bytes()) == (
        keys.read_bytes(), digests.read_bytes())
    [(key_bytes, digest_bytes, n)] = list(index_chunks(keys, digests))
    assert n == 10 and key_bytes.startswith(b"1\n2\n")
    index = load_index(key_bytes, digest_bytes)
    assert len(index) == 10

    rows = [stop(i) for i in range(1, 11) if i != 4] + [stop(11)]
    rows[1] = stop(2, "renamed")
    second, problems = _process(tmp_path / "b", "stops", rows, index)
    out = second.out
    assert (out.inserted, out.updated, out.deleted, out.key_problems) == (1, 1, 1, 0)
    assert problems.total == 0
    assert second.files.deleted.read_text() == "4\n"
    changed = sorted(second.files.changes.read_text().splitlines())
    assert [line.split("\t")[:2] for line in changed] == [["11", "s"], ["2", "renamed"]]
    # vanished keys leave the index: what stays are the feed's keys, for references to them
    assert set(index) == {str(i) for i in range(1, 12)} - {"4"}
    assert set(index.values()) == {SEEN}
    # the backup file is a header and the spool, the raw one the pages as spooled
    with gzip.open(second.files.spool_gz) as fh:
        assert fh.read() == ("\t".join(COLUMNS["stops"]) + "\n").encode() \
            + second.files.spool.read_bytes()
    with gzip.open(second.files.raw_gz) as fh:
        assert fh.read() == second.files.raw.read_bytes()


def test_duplicates_and_unknown_references_count_as_key_problems(tmp_path: Path) -> None:
    stops, _ = _process(tmp_path / "s", "stops", [stop(1), stop(2), stop(3)], {})
    assert stops.out.key_problems == 0 and stops.out.inserted == 3
    parents = {"stops": stops.index or {}}
    routes = [{"ID": 1, "fromStop_ID": 1, "toStop_ID": 2, "mode": "bus", "distanceKm": 1.0},
              {"ID": 2, "fromStop_ID": 3, "toStop_ID": 9, "mode": "bus", "distanceKm": 1.0}]
    dangling, _ = _process(tmp_path / "r1", "routes", routes, {}, parents)
    assert dangling.out.key_problems == 1
    # a key on two pages (the spool splits the rows in two)
    twice, _ = _process(tmp_path / "r2", "routes", [routes[0], routes[0]], {}, parents)
    assert twice.out.key_problems == 1


def test_invalid_rows_are_problems_and_their_keys_are_kept(tmp_path: Path) -> None:
    bad = {**stop(7), "latitude": 95}
    proc, problems = _process(tmp_path, "stops", [stop(1), bad], {})
    assert [str(p) for p in problems.first] == [
        "Stops[ID=7] latitude: 95.0 is outside -90..90"]
    assert problems.rejected["stops"] == 1
    assert proc.files.invalid.read_text() == '"7"\n'
    assert proc.out.rows == 1 and proc.out.read == 2


def test_row_digests_are_order_independent_and_subtractable() -> None:
    lines = [f"{i}\tx\n".encode() for i in range(50)]
    a, b = RowDigests(), RowDigests()
    a.add(lines)
    b.add(lines[::-1][:30])
    b.add(lines[::-1][30:])
    assert a.hexdigest("stops") == b.hexdigest("stops")
    b.add(lines[:5], sign=-1)
    c = RowDigests()
    c.add(lines[5:])
    assert b.hexdigest("stops") == c.hexdigest("stops")


def test_a_row_index_is_stored_in_chunks(tmp_path: Path) -> None:
    keys, digests = tmp_path / "keys", tmp_path / "digests"
    n = 2 * INDEX_CHUNK + 7
    keys.write_bytes(b"".join(b"%d\n" % i for i in range(n)))
    digests.write_bytes(b"".join(i.to_bytes(8, "big") for i in range(n)))
    chunks = list(index_chunks(keys, digests))
    assert [c[2] for c in chunks] == [INDEX_CHUNK, INDEX_CHUNK, 7]
    assert b"".join(c[0] for c in chunks) == keys.read_bytes()
    assert b"".join(c[1] for c in chunks) == digests.read_bytes()
    index = load_index(chunks[2][0], chunks[2][1])
    assert index == {str(i): i for i in range(2 * INDEX_CHUNK, n)}
