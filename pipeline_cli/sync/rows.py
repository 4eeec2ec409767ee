"""Canonical rows of sync-odata: each source row checked and turned into one line, hashed.

The canonical line (COPY text format, read-model column order, normalised values) is what is
loaded, backed up and hashed, so equal data always gives equal lines. ``SetProcessor`` runs the
raw pages of one entity set through it and compares every line with the active version's row
index. It runs in the row worker process (:mod:`.worker`): no HTTP, no database here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import compress, islice
from operator import itemgetter, ne
from pathlib import Path
from typing import IO, Any

from .. import db
from ..adapters.odata_format import (
    EntityMapping,
    page_rows,
    parse_bool,
    parse_key,
    parse_number,
    parse_text,
    parse_time,
)
from ..read_model import COLUMNS, ENTITIES, REFERENCES

try:  # ISA-L's deflate writes gzip three times as fast as zlib's level 1, and smaller
    from isal import isal_zlib as _deflate
except ImportError:  # pragma: no cover - a platform without an isal wheel
    import zlib as _deflate  # type: ignore[no-redef]


MAX_PROBLEMS = 20
# Bump whenever the canonical form of a row or the validation rules change: page digests and
# row indexes stored with an older format then no longer vouch for a feed.
CANONICAL_FORMAT = 1
GZIP_LEVEL = 1  # within ~15 % of the default level's size on this data, at a fraction of the CPU
_NULL = "\\N"


# ------------------------------------------------------------------------------ rows


@dataclass(frozen=True)
class Problem:
    """One bad value or row, named by entity set, key and field as the source calls them."""

    entity_set: str
    key_field: str
    key: str | None
    field: str
    kind: str  # missing, invalid, out_of_range, duplicate, unknown_reference, empty
    message: str

    def __str__(self) -> str:
        key = "?" if self.key is None else self.key
        return f"{self.entity_set}[{self.key_field}={key}] {self.field}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"set": self.entity_set, "key": self.key, "field": self.field,
                "kind": self.kind, "problem": self.message}


def unescape_key(text: str) -> str:
    """The key itself from its canonical (COPY-escaped) text."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"t": "\t", "n": "\n", "r": "\r"}.get(nxt, nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _days(value: Any) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(text, str) or not text or not text.isdigit()
            or any(c not in "1234567" for c in text) or len(set(text)) != len(text)):
        raise ValueError(f"expected distinct day digits 1-7 like \"12345\", got {value!r}")
    return "".join(sorted(text))


def _range(low: float, high: float) -> Callable[[float], str | None]:
    def check(v: float) -> str | None:
        return None if low <= v <= high else f"{v!r} is outside {low:g}..{high:g}"
    return check


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else f"{v!r} is negative"


# column -> (parser, canonical text, required, check, text when absent)
_Spec = tuple[Callable[[Any], Any], Callable[[Any], str], bool,
              Callable[[Any], str | None] | None, str]
_KEY: _Spec = (parse_key, db.copy_escape, True, None, _NULL)
_TEXT: _Spec = (parse_text, db.copy_escape, False, None, _NULL)
SPECS: dict[str, dict[str, _Spec]] = {
    "stops": {
        "id": _KEY, "name": _TEXT,
        "latitude": (parse_number, repr, True, _range(-90, 90), _NULL),
        "longitude": (parse_number, repr, True, _range(-180, 180), _NULL),
        "is_airport": (parse_bool, lambda b: "t" if b else "f", False, None, "f"),
        "city": _TEXT,
    },
    "routes": {
        "id": _KEY, "from_stop_id": _KEY, "to_stop_id": _KEY, "mode": _TEXT,
        "distance_km": (parse_number, repr, False, _non_negative, _NULL),
    },
    "flights": {
        "id": _KEY, "route_id": _KEY,
        "departure": (parse_time, str, True, None, _NULL),
        "arrival": (parse_time, str, True, None, _NULL),
        "days_of_week": (_days, str, True, None, _NULL),
    },
}


class RowNormaliser:
    """Turns one source row into its canonical COPY line, or into problems.

    The canonical line (COPY text format, read-model column order, normalised values) is both
    what is loaded and what is hashed, so equal data always gives equal lines.
    """

    def __init__(self, mapping: EntityMapping) -> None:
        self.mapping = mapping
        self.plan = [(col, mapping.fields[col], *SPECS[mapping.entity][col])
                     for col in COLUMNS[mapping.entity]]

    def __call__(self, row: dict[str, Any]) -> tuple[str | None, list[Problem]]:
        parts: list[str] = []
        problems: list[Problem] = []
        for _col, source, parse, fmt, required, check, absent in self.plan:
            value = row.get(source) if source else None
            if value is None:
                if required:
                    problems.append(self._problem(row, source, "missing",
                                                  "missing required value"))
                parts.append(absent)
                continue
            try:
                parsed = parse(value)
            except ValueError as exc:
                problems.append(self._problem(row, source, "invalid", str(exc)))
                continue
            if check is not None and (why := check(parsed)) is not None:
                problems.append(self._problem(row, source, "out_of_range", why))
                continue
            parts.append(fmt(parsed))
        if problems:
            return None, problems
        return "\t".join(parts) + "\n", problems

    def _problem(self, row: dict[str, Any], source: str, kind: str, message: str) -> Problem:
        key = row.get(self.mapping.key_field)
        return Problem(self.mapping.entity_set, self.mapping.key_field,
                       None if key is None else str(key), source, kind, message)


# Per-kind fast paths of the compiled page normaliser (see compile_normaliser). Each accepts
# only values whose canonical text is obvious and otherwise hands the row to the generic
# RowNormaliser (``slow``), so the canonical form and every problem message are defined in one
# place: a LookupError hands the row over (so does a row without one of the fields, KeyError).
# Numbers: ``-0.0`` becomes 0.0.
_FAST = {
    "key": """v = row[{f}]
if type(v) is int:
    c{i} = str(v)
elif type(v) is str and v and v.isprintable() and "\\\\" not in v:
    c{i} = v
else:
    raise LookupError
""",
    "text": """v = row[{f}]
if v is None:
    c{i} = "\\\\N"
elif type(v) is str and v.isprintable() and "\\\\" not in v:
    c{i} = v
else:
    raise LookupError
""",
    "number": """v = row[{f}]
if type(v) is str:
    try:
        x = float(v)
    except ValueError:
        raise LookupError
    if not {lo!r} <= x <= {hi!r}:
        raise LookupError
    c{i} = repr(x) if x else "0.0"
elif (type(v) is float or type(v) is int) and {lo!r} <= v <= {hi!r}:
    c{i} = repr(v + 0.0)
{absent}else:
    raise LookupError
""",
    "bool": """v = row[{f}]
if v is True:
    c{i} = "t"
elif v is False or v is None:
    c{i} = "f"
else:
    raise LookupError
""",
    "memo": """v = row[{f}]
if type(v) is not str:
    raise LookupError
c{i} = memo{i}.get(v)
if c{i} is None:
    try:
        c{i} = parse{i}(v)
    except ValueError:
        raise LookupError
    if len(memo{i}) < 100_000:
        memo{i}[v] = c{i}
""",
}
_MAX_FLOAT = 1.7976931348623157e308

# normalise_page(rows, lines, keys, refs, slow): appends each valid row's canonical line to
# ``lines`` and its key to ``keys``, adds the keys it references to ``refs``; a row off the
# fast path goes to ``slow(row, lines, keys, refs)``.
PageNormaliser = Callable[[list[dict[str, Any]], list[str], list[str], set[str],
                           Callable[..., None]], None]


def compile_normaliser(mapping: EntityMapping) -> PageNormaliser:
    """A per-mapping page loop with the common cases inlined (about 5x the generic speed).

    Generated code, because the per-field function calls of the generic loop are most of a
    sync's CPU time; only field names from the validated mapping reach the source text.
    """
    spec = SPECS[mapping.entity]
    namespace: dict[str, Any] = {}
    body = []
    names = []
    for i, col in enumerate(COLUMNS[mapping.entity]):
        source = mapping.fields[col]
        parse, _fmt_, required, check, _absent = spec[col]
        names.append(f"c{i}")
        if not source:  # not provided by this service: always the absent value
            body.append(f"c{i} = {_absent!r}\n")
            continue
        f = repr(source)
        if parse is parse_key:
            body.append(_FAST["key"].format(f=f, i=i))
        elif parse is parse_text:
            body.append(_FAST["text"].format(f=f, i=i))
        elif parse is parse_number:
            lo, hi = (-_MAX_FLOAT, _MAX_FLOAT)
            if col == "latitude":
                lo, hi = -90.0, 90.0
            elif col == "longitude":
                lo, hi = -180.0, 180.0
            elif check is _non_negative:
                lo = 0.0
            absent = "" if required else f'elif v is None:\n    c{i} = "\\\\N"\n'
            body.append(_FAST["number"].format(f=f, i=i, lo=lo, hi=hi, absent=absent))
        elif parse is parse_bool:
            body.append(_FAST["bool"].format(f=f, i=i))
        else:
            namespace[f"memo{i}"] = {}
            namespace[f"parse{i}"] = parse
            body.append(_FAST["memo"].format(f=f, i=i))
    fields = "\\t".join(f"{{{n}}}" for n in names)
    line = f'line_append(f"{fields}\\n")\nkey_append(c0)\n'
    for child, col, _parent in REFERENCES:
        if child == mapping.entity:
            line += f"ref_add(c{COLUMNS[child].index(col)})\n"
    source_text = ("def normalise_page(rows, lines, keys, refs, slow):\n"
                   "    line_append, key_append, ref_add = lines.append, keys.append, refs.add\n"
                   "    for row in rows:\n        try:\n"
                   + "".join(f"            {text}\n" for text in "".join(body).splitlines())
                   + "        except LookupError:\n"
                   "            slow(row, lines, keys, refs)\n            continue\n"
                   + "".join(f"        {text}\n" for text in line.splitlines()))
    exec(source_text, namespace)  # noqa: S102 - see the docstring
    fn: PageNormaliser = namespace["normalise_page"]
    return fn


class RowDigests:
    """An order-independent multiset hash of canonical lines.

    Each line's SHA-256 is read as four big-endian 64-bit words; the words are summed lane by
    lane (mod 2^64), so any order of the same lines gives the same sums. A page is unpacked
    with one struct call and summed by ``sum`` over slices: all in C, and without releasing
    the GIL. (numpy did the same sums, but each call released and re-took the GIL, and with
    the read-ahead thread parsing JSON every re-take waited out a switch interval: 0.7 s of
    a 200k-row sync when rows were still normalised in the fetching process.)
    """

    _MASK = (1 << 64) - 1

    def __init__(self) -> None:
        self.rows = 0
        self.lanes = [0, 0, 0, 0]

    def add(self, lines: list[bytes], *, sign: int = 1) -> tuple[int, ...]:
        """Add (or with ``sign=-1`` take out) lines; returns their digests as 64-bit words,
        four per line (the first of each is the line's entry in the row index)."""
        if not lines:
            return ()
        sha = hashlib.sha256
        words = struct.unpack(f">{4 * len(lines)}Q",
                              b"".join([sha(line).digest() for line in lines]))
        mask = self._MASK
        self.lanes = [(lane + sign * sum(words[i::4])) & mask
                      for i, lane in enumerate(self.lanes)]
        self.rows += sign * len(lines)
        return words

    def hexdigest(self, entity: str) -> str:
        lanes = "".join(f"{x:016x}" for x in self.lanes)
        return hashlib.sha256(f"{entity}\n{self.rows}\n{lanes}".encode()).hexdigest()


def dataset_hash(set_hashes: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{e}:{set_hashes[e]}\n" for e in ENTITIES).encode()
                          ).hexdigest()


# ------------------------------------------------------------------------------ problems


@dataclass
class Problems:
    """Every problem is counted; the first MAX_PROBLEMS are kept; rejects go to a file."""

    reject_file: IO[str] | None = None
    first: list[Problem] = field(default_factory=list)
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)  # per entity

    def add(self, problem: Problem) -> None:
        self.counts[(problem.entity_set, problem.kind)] += 1
        if len(self.first) < MAX_PROBLEMS:
            self.first.append(problem)
        if self.reject_file is not None:
            self.reject_file.write(json.dumps(problem.to_json(), ensure_ascii=False) + "\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_set(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (entity_set, kind), n in sorted(self.counts.items()):
            out.setdefault(entity_set, {})[kind] = n
        return out

    def summary(self) -> str:
        return "; ".join(
            f"{s}: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in kinds.items())
            for s, kinds in self.by_set().items())

    def to_json(self) -> dict[str, Any]:
        """What the row worker found, for :meth:`merge` in the sync's own process."""
        return {"first": [asdict(p) for p in self.first],
                "counts": [[s, k, n] for (s, k), n in self.counts.items()],
                "rejected": dict(self.rejected)}

    def merge(self, doc: dict[str, Any]) -> None:
        for p in doc["first"]:
            if len(self.first) < MAX_PROBLEMS:
                self.first.append(Problem(**p))
        for entity_set, kind, n in doc["counts"]:
            self.counts[(entity_set, kind)] += n
        self.rejected.update(doc["rejected"])


# ------------------------------------------------------------------------------ row index

# The row index of a dataset version: every row's canonical key (each followed by a newline)
# and the first 8 bytes of its canonical line's SHA-256 (big-endian), in the same order. A
# sync compares the feed's lines with the active version's index and writes only what differs.
SEEN = -1  # an index entry whose key the feed has (digests are >= 0)
INDEX_CHUNK = 65_536  # keys per stored row of a row index


def write_index(spool: Path, keys: Path, digests: Path) -> None:
    """The row index files of a spool of canonical lines."""
    sha = hashlib.sha256
    with spool.open("rb") as src, keys.open("wb") as k, digests.open("wb") as d:
        for line in src:
            k.write(line[:line.index(b"\t")] + b"\n")
            d.write(sha(line).digest()[:8])


def index_chunks(keys: Path, digests: Path) -> Iterator[tuple[bytes, bytes, int]]:
    """(keys, digests, how many) of INDEX_CHUNK keys at a time, from row index files."""
    with keys.open("rb") as k, digests.open("rb") as d:
        while lines := list(islice(k, INDEX_CHUNK)):
            yield b"".join(lines), d.read(8 * len(lines)), len(lines)


def load_index(keys: bytes, digests: bytes) -> dict[str, int]:
    """key -> digest of a row index."""
    names = keys.decode().split("\n")[:-1]
    return dict(zip(names, map(itemgetter(0), struct.iter_unpack(">Q", digests)),
                    strict=True))


# ------------------------------------------------------------------------------ processing


@dataclass(frozen=True)
class SetFiles:
    """The files of one entity set in a sync's work folder (shared by both processes)."""

    spool: Path  # canonical lines of the valid rows, in feed order
    raw: Path  # the pages as received, one RFC 7464 record each (written by the sync)
    spool_gz: Path  # backup: a header line, then the canonical lines
    raw_gz: Path  # backup: the raw records
    keys: Path  # the new row index (see write_index)
    digests: Path
    old_keys: Path  # the active version's row index (written by the sync)
    old_digests: Path
    changes: Path  # lines of new and changed rows
    deleted: Path  # canonical keys of vanished rows, one per line
    invalid: Path  # JSON lines: keys of rows that failed the per-row checks

    @classmethod
    def of(cls, workdir: Path, entity: str) -> SetFiles:
        return cls(*(workdir / f"{entity}.{suffix}" for suffix in (
            "tsv", "raw.json-seq", "tsv.gz", "raw.json-seq.gz", "keys", "digests",
            "old.keys", "old.digests", "changes.tsv", "deleted", "invalid.jsonl")))


@dataclass
class SetOutput:
    """What processing one set produced; inserted/updated/deleted only against an index."""

    entity: str
    rows: int = 0  # valid rows (canonical lines)
    read: int = 0  # rows read
    pages: int = 0
    lanes: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    indexed: bool = False
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    key_problems: int = 0  # duplicate keys and unknown references seen against the index

    def digests(self) -> RowDigests:
        d = RowDigests()
        d.rows, d.lanes = self.rows, list(self.lanes)
        return d


class _GzipWriter:
    """A gzip file written a block at a time (the deflate runs without the GIL)."""

    def __init__(self, path: Path, header: bytes = b"") -> None:
        self.fh = path.open("wb")
        self.z = _deflate.compressobj(GZIP_LEVEL, _deflate.DEFLATED, 31)
        if header:
            self.write(header)

    def write(self, data: bytes) -> None:
        self.fh.write(self.z.compress(data))

    def close(self) -> None:
        self.fh.write(self.z.flush())
        self.fh.close()


def gzip_file(src: Path, dst: Path, header: bytes = b"") -> None:
    out = _GzipWriter(dst, header)
    with src.open("rb") as fin:
        while block := fin.read(1024 * 1024):
            out.write(block)
    out.close()


class SetProcessor:
    """One entity set's raw pages -> canonical lines, problems, hash, backup files, row index.

    With the active version's row index (``index``: key -> digest), every valid line is also
    classified as new, changed or unchanged, and the keys never seen are the vanished rows.
    ``parents`` holds the index dicts of the sets this one references, holding just the keys
    of the feed once those are done: a reference to a key not in the feed, and a duplicate key,
    make ``key_problems`` non-zero (the sync then checks keys in SQL, which names them).
    """

    def __init__(self, mapping: EntityMapping, files: SetFiles, protocol: str,
                 problems: Problems, index: dict[str, int] | None,
                 parents: dict[str, dict[str, int]]) -> None:
        self.mapping = mapping
        self.files = files
        self.protocol = protocol
        self.problems = problems
        self.index = index
        self.out = SetOutput(mapping.entity, indexed=index is not None)
        self.normalise = compile_normaliser(mapping)
        self.slow = RowNormaliser(mapping)
        self.digests = RowDigests()
        references = [(COLUMNS[child].index(col), parent) for child, col, parent in REFERENCES
                      if child == mapping.entity]
        self.ref_columns = [column for column, _ in references]
        # every reference of a set names one parent set
        self.parent = parents[references[0][1]] if references and index is not None else None
        self._stack = contextlib.ExitStack()
        opened = self._stack.enter_context
        self.raw = opened(files.raw.open("rb"))
        self.spool = opened(files.spool.open("wb"))
        self.keys = opened(files.keys.open("wb"))
        self.new_digests = opened(files.digests.open("wb"))
        self.changes = opened(files.changes.open("wb"))
        self.invalid = opened(files.invalid.open("w", encoding="utf-8"))
        self.spool_gz = _GzipWriter(files.spool_gz,
                                    ("\t".join(COLUMNS[mapping.entity]) + "\n").encode())
        self.raw_gz = _GzipWriter(files.raw_gz)

    def page(self, offset: int, length: int, number: int) -> None:
        """The page whose body is ``length`` bytes at ``offset`` of the raw spool."""
        self.raw.seek(offset - 1)
        record = self.raw.read(length + 2)  # with the record's RS and LF
        self.raw_gz.write(record)
        rows = page_rows(record[1:-1], self.protocol, f"{self.mapping.entity_set} page {number}")
        self.out.pages += 1
        self.out.read += len(rows)
        lines: list[str] = []
        keys: list[str] = []
        refs: set[str] = set()
        self.normalise(rows, lines, keys, refs, self._slow)
        encoded = [line.encode() for line in lines]
        firsts = self.digests.add(encoded)[0::4]
        if self.index is not None:
            self._compare(keys, encoded, firsts, refs)
        data = b"".join(encoded)
        self.spool.write(data)
        self.spool_gz.write(data)
        if keys:
            self.keys.write(("\n".join(keys) + "\n").encode())
            self.new_digests.write(struct.pack(f">{len(firsts)}Q", *firsts))

    def _slow(self, row: dict[str, Any], lines: list[str], keys: list[str],
              refs: set[str]) -> None:
        """A row the compiled fast path does not take: the generic normaliser decides."""
        line, found = self.slow(row)
        if line is None:
            self._reject(row, found)
            return
        lines.append(line)
        parts = line.split("\t")
        keys.append(parts[0])
        refs.update(parts[i] for i in self.ref_columns)

    def _compare(self, keys: list[str], encoded: list[bytes], firsts: tuple[int, ...],
                 refs: set[str]) -> None:
        """Classify the page's lines against the index with operations that loop in C: only
        the few new, changed or repeated keys are looked at one by one."""
        index, out = self.index, self.out
        assert index is not None
        olds = list(map(index.get, keys))
        changed: list[bytes] = []
        for i in compress(range(len(keys)), map(ne, olds, firsts)):
            old = olds[i]
            if old == SEEN:  # the key was on an earlier page
                out.key_problems += 1
                continue
            if old is None:
                out.inserted += 1
            else:
                out.updated += 1
            changed.append(encoded[i])
        if changed:
            self.changes.write(b"".join(changed))
        marks = dict.fromkeys(keys, SEEN)
        out.key_problems += len(keys) - len(marks)  # a key twice on this page
        index.update(marks)
        if self.parent is not None:
            out.key_problems += len(refs.difference(self.parent))

    def _reject(self, row: dict[str, Any], found: list[Problem]) -> None:
        for p in found:
            self.problems.add(p)
        self.problems.rejected[self.mapping.entity] += 1
        # a row without a usable key cannot be referenced anyway
        with contextlib.suppress(ValueError):
            self.invalid.write(json.dumps(parse_key(row.get(self.mapping.key_field))) + "\n")

    def close(self) -> SetOutput:
        """Finish the files; the vanished keys are the index entries never seen."""
        self.spool_gz.close()
        self.raw_gz.close()
        if self.index is not None:
            gone = [key for key, digest in self.index.items() if digest != SEEN]
            for key in gone:  # what is left are the keys of the feed, for references to them
                del self.index[key]
            self.out.deleted = len(gone)
            with self.files.deleted.open("w", encoding="utf-8") as fh:
                fh.writelines(key + "\n" for key in gone)
        self._stack.close()
        self.out.rows, self.out.lanes = self.digests.rows, self.digests.lanes
        return self.out
