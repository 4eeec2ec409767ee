"""sync-odata: an OData service -> a versioned, validated dataset in the read model.

One path for every sync (first load, changed or unchanged feed, ``--force``, ``--dry-run``) and
for a restore: stage the pages, check, diff and apply in SQL, record the version, back it up
and commit, all in one transaction; docs/sync-odata.md ("One path") describes each step.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import re
import shutil
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .. import db
from ..adapters.backups import BackupStore
from ..adapters.odata import ODataClient, Page
from ..adapters.odata_format import EntityMapping, close_name, has_field, resolve_mapping
from ..errors import (
    BackupError,
    ConfigError,
    DatabaseError,
    NothingToDo,
    SourceError,
    ValidationError,
)
from ..modes import describe_unknown, speed_table, unknown_modes
from ..read_model import COLUMNS, ENTITIES, KINDS, OPTIONAL_COLUMNS, REFERENCES
from ..runner import NOOP, SKIPPED, SUCCESS, RunContext, StageResult

BACKUP_FORMAT = "pipeline-dataset/2"  # /1: the row worker's; its raw pages replay the same way
# Bump whenever the sync_* rules of sql/ change: stored page digests then no longer vouch for a
# feed (1 was the row worker's Python rules; 3: V2 /Date offsets in minutes, sql/019; 4: reserved
# ids, length limits, no hexadecimal, real dates, sql/021; 5: distance_km at most 100,000; 6: a V2
# /Date's milliseconds are local, sql/033; 7: a number's suffix is one letter right after it,
# sql/035). A change that only reads values refused before (sql/022's durations, sql/027's
# booleans) needs no bump: a version with refused rows records no digests, so every digest stored
# is of pages whose values the new rules read the same. A bump costs more than one full check: an
# unchanged feed's run is a noop that rolls back, so the digests stay stale and every run checks
# the whole feed again until the feed changes.
CHECKS = 7
MAX_PROBLEMS = 20
_DIGEST_HEX = 32  # blake2b, 16 bytes, of a raw page body
_RS = b"\x1e"  # RFC 7464 JSON text sequence: the spool and its backup hold one record per page

_ABSENT = {"bool": "false", "number": "NULL::double precision", "time": "NULL::time"}


# ------------------------------------------------------------------------------ problems


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
        if self.key is None:  # of the whole set: no valid stops
            return f"{self.entity_set}: {self.message}"
        key = self.key if len(self.key) <= 80 else self.key[:77] + "..."  # refused as too long
        return f"{self.entity_set}[{self.key_field}={key}] {self.field}: {self.message}"


@dataclass
class Problems:
    """Every problem is counted; the first MAX_PROBLEMS are kept; rejects go to a file."""

    reject_file: IO[str] | None = None
    first: list[Problem] = field(default_factory=list)
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)  # rows per entity

    def add(self, problem: Problem, *, lead: bool = False) -> None:
        """Count it, keep it if among the first (``lead``: put it first), record a reject."""
        self.counts[(problem.entity_set, problem.kind)] += 1
        self.first[:] = ([problem, *self.first] if lead else [*self.first, problem]
                         )[:MAX_PROBLEMS]
        if self.reject_file is not None:
            self.reject_file.write(json.dumps({
                "set": problem.entity_set, "key": problem.key, "field": problem.field,
                "kind": problem.kind, "problem": problem.message}, ensure_ascii=False) + "\n")

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


# ------------------------------------------------------------------------------ SQL


def _q(name: str, **parts: Any) -> sql.Composed:
    return db.query("sync_odata", name).format(**parts)


def _one(conn: psycopg.Connection[Any], query: sql.SQL | sql.Composed,
         params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    row: dict[str, Any] | None = conn.execute(query, params).fetchone()
    assert row is not None
    return row


def _list(names: Iterator[str] | tuple[str, ...], prefix: str | None = None) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(*([prefix] if prefix else []), n) for n in names)


@dataclass
class _Set:
    """One entity set: how it is read (its mapping, and the statements made from it) and what
    this run has received of it."""

    entity: str
    mapping: EntityMapping
    protocol: str
    raw: Path  # the spooled pages
    rows: int = 0  # rows received
    digests: list[str] = field(default_factory=list)  # per page, of the raw body
    pages: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) in raw
    staged: int = 0  # pages handed to PostgreSQL
    announced: int | None = None  # the server's count of the set, when it sent one
    gz: Future[Path] | None = None  # the spool gzipped for the backup

    @property
    def stage(self) -> sql.Identifier:
        return sql.Identifier(f"stage_{self.entity}")

    @cached_property
    def page_insert(self) -> bytes:
        """INSERT one page (``%(page)s``, its rows numbered from ``%(base)s``) into the stage.
        A row's number ``n`` is its place in the feed: page number << 32 plus its place in the
        page, so it needs no count of the rows before it (a restore has none). Composed once,
        as the bytes sent: psycopg would compose it again for each page."""
        m = self.mapping
        f = {name: sql.Identifier(f"f{i}") for i, name in enumerate(m.sources)}
        rows = (sql.SQL("p -> 'value'") if self.protocol == "v4"
                else sql.SQL("coalesce(p -> 'd' -> 'results', p -> 'd')"))
        # A property a path reads into is read as json (t0, t1, ...), and each mapped field is
        # one text of it in a lateral subquery (OFFSET 0: once per row, not at each use).
        # Without paths the statement is the plain one: json_to_recordset's texts are the f's.
        nested = {name.partition("/")[0] for name in m.sources if "/" in name}
        t = {name: sql.Identifier(f"t{i}") for i, name in enumerate(m.select)} if nested else f

        def at(src: str, op: str) -> sql.Composable | None:  # None: its property is text
            top, *path = src.split("/")
            return sql.SQL("x.{} {} {}").format(t[top], sql.SQL(op), sql.Literal(path)
                                                ) if top in nested else None
        values, bad = [], []
        for col in COLUMNS[self.entity]:
            kind, low, high = KINDS[self.entity][col]
            c, src = sql.Identifier(f"c_{col}"), m.fields[col]
            if not src:
                values.append(sql.SQL(_ABSENT.get(kind, "NULL::text") + " AS {}").format(c))
                continue
            if kind in ("key", "text"):  # the JSON type, only for a value that needs it
                of = at(src, "#>") or sql.SQL("{} -> (x.n - 1)::integer -> {}").format(
                    rows, sql.Literal(src))
                values.append(sql.SQL("sync_{}({}, CASE WHEN sync_suspect({}) THEN "
                                      "json_typeof({}) END) AS {}").format(
                    sql.SQL(kind), f[src], f[src], of, c))
            else:
                values.append(sql.SQL("sync_{}({}) AS {}").format(sql.SQL(kind), f[src], c))
            bad.append(sql.SQL("{} IS NULL").format(c) if col not in OPTIONAL_COLUMNS
                       else sql.SQL("({} IS NULL AND {} IS NOT NULL)").format(c, f[src]))
            if low is not None and high is not None:
                bad.append(sql.SQL("NOT {} BETWEEN {} AND {}").format(
                    c, sql.Literal(low), sql.Literal(high)))
            elif low is not None:
                bad.append(sql.SQL("{} < {}").format(c, sql.Literal(low)))
        out = [sql.SQL("coalesce({}, false)" if KINDS[self.entity][col][0] == "bool" else "{}"
                       ).format(sql.Identifier(f"c_{col}")) for col in COLUMNS[self.entity]]
        lateral = sql.SQL(", LATERAL (SELECT {} OFFSET 0) AS y({})").format(
            sql.SQL(", ").join(at(name, "#>>") or sql.SQL("x.{}").format(t[name])
                               for name in m.sources),
            sql.SQL(", ").join(f.values())
        ) if nested else sql.SQL("")
        return _q("page_insert", stage=self.stage, cols=_list(COLUMNS[self.entity]),
                  out=sql.SQL(", ").join(out), values=sql.SQL(", ").join(values),
                  raw=sql.SQL(", ").join(f.values()), bad=sql.SQL(" OR ").join(bad),
                  rows=rows, props=sql.SQL(", ").join(t.values()), lateral=lateral,
                  defs=sql.SQL(", ").join(sql.SQL("{} json" if n in nested else "{} text"
                                                  ).format(sql.Identifier(n)) for n in m.select)
                  ).as_bytes(None)

    def checks(self) -> dict[str, Any]:
        """Parameters of the ``problems`` query: the checked columns with their fields."""
        cols = [c for c in COLUMNS[self.entity] if self.mapping.fields[c]]
        kinds, lows, highs = zip(*(KINDS[self.entity][c] for c in cols), strict=True)
        sources = self.mapping.sources  # field numbers in the ARRAY of texts, counted from 1
        return {"cols": cols, "fields": [sources.index(self.mapping.fields[c]) + 1 for c in cols],
                "kinds": list(kinds), "lows": list(lows), "highs": list(highs),
                "required": [c not in OPTIONAL_COLUMNS for c in cols],
                "key": sources.index(self.mapping.key_field) + 1}


# ------------------------------------------------------------------------------ staging


class _Loader:
    """One transaction on its own connection: stage, check, diff and apply. Its files (the
    spooled pages, their gzipped copies, the rejects) are in a temporary directory."""

    def __init__(self, conn: psycopg.Connection[Any], ctx: RunContext,
                 mappings: dict[str, EntityMapping], protocol: str) -> None:
        self.conn = conn
        self.ctx = ctx
        self.tmp = tempfile.TemporaryDirectory(prefix=f"pipeline-{ctx.stage}-")
        self.workdir = Path(self.tmp.name)
        self.sets = {e: _Set(e, mappings[e], protocol, self.workdir / f"{e}.json-seq")
                     for e in ENTITIES}
        self.staging = False  # from the first page that differs from the active version's
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync-gzip")

    def __enter__(self) -> _Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.tmp.cleanup()

    def compress(self) -> None:
        """Gzip the raw spools for the backup, in a thread while PostgreSQL checks and applies
        (zlib leaves the GIL free)."""
        for st in self.sets.values():
            st.gz = self.pool.submit(_gzip, st.raw, st.raw.with_suffix(".json-seq.gz"))

    # ---------------------------------------------------------------- stage

    def fetch(self, client: ODataClient, expected: Mapping[str, str]) -> bool:
        """Fetch and spool every set; True if every page equals the active version's
        (``expected``: its page digests per set, concatenated hex), so nothing was staged.

        PostgreSQL takes each page while the next is fetched: the INSERTs go out in pipeline
        mode, without waiting for their results (a failed one fails the pipeline at its end).
        """
        with db.wrap_errors("staging the feed"), self.conn.pipeline():
            for e in ENTITIES:
                st, m = self.sets[e], self.sets[e].mapping
                absent, names = set(m.sources), set[str]()  # mapped fields no entity has shown
                with st.raw.open("wb") as out, self.ctx.progress(m.entity_set, None) as bar:
                    for page in client.pages(m.entity_set, orderby=m.key_field,
                                             select=m.select, filter=m.filter):
                        self.ctx.check_stop()
                        for row in page.rows if absent else ():  # mostly the first row only
                            names |= row.keys()
                            absent -= {f for f in absent if has_field(row, f)}
                            if not absent:
                                break
                        if page.number == 1 and page.count is not None:
                            st.announced = page.count
                            bar.set_total(page.count)
                        if _suspect(page.body):
                            _refuse_not_json(m, page)
                        self._spool(st, out, page.body, len(page.rows))
                        bar.advance(len(page.rows))
                        i = len(st.digests) - 1
                        if self.staging:
                            self._stage(st, page.body)
                        elif expected.get(e, "")[
                                i * _DIGEST_HEX:(i + 1) * _DIGEST_HEX] != st.digests[i]:
                            out.flush()
                            self.stage()  # this page differs: stage it and those held back
                self.ctx.log.info("%s: %d rows in %d pages", m.entity_set, st.rows,
                                  len(st.pages))
                if absent and st.rows:  # unless $metadata declares it: left out as null
                    declared = client.declared(m.entity_set) - names
                    absent = {f for f in absent if f.partition("/")[0] not in declared}
                if absent and st.rows:  # every value NULL, every is_airport false, in silence
                    raise SourceError(_absent_fields(m, absent, names))
                if st.announced is not None and st.rows < st.announced:
                    # Rows the pages never held would be deleted from the read model. (More
                    # is no loss: a row added meanwhile, or a server that caps its count.)
                    one = len(st.pages) == 1 and client.settings.paging != "client"
                    raise SourceError(
                        f"OData {m.entity_set}: the server counted {st.announced} entities "
                        f"but its pages held {st.rows} (" + (
                            "one page without a nextLink: a server that caps its answers in "
                            "silence is read whole with [odata] paging = \"client\"" if one
                            else "the set changed while it was read, or its paging skipped "
                            "rows") + "); nothing was written ([odata] count = false skips "
                        "this check)")
                if st.announced is None and client.settings.count:
                    self.ctx.log.warning(
                        "OData %s: the server sent no count, so rows its paging skips cannot "
                        "be noticed ([odata] count = false stops asking for one)", m.entity_set)
            if not self.staging and any(len(expected.get(e, "")) != _DIGEST_HEX * len(s.digests)
                                        for e, s in self.sets.items()):
                self.stage()  # the active version had a page more
        return not self.staging

    def replay(self, backups: BackupStore, raw_prefix: str) -> None:
        """Spool a version's backed-up ``<set>.json-seq.gz`` files (restore)."""
        for e, st in self.sets.items():
            path, key = self.workdir / f"{e}.download.gz", f"{raw_prefix}{e}.json-seq.gz"
            backups.get_file(key, str(path))
            try:
                with gzip.open(path, "rb") as src, st.raw.open("wb") as out:
                    for body in _records(src):
                        self.ctx.check_stop()
                        self._spool(st, out, body, 0)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # cut short, or not gzip
                raise BackupError(f"backup {key} is damaged: {exc}") from None

    def _spool(self, st: _Set, out: IO[bytes], body: bytes, rows: int) -> None:
        out.write(_RS)
        st.pages.append((out.tell(), len(body)))
        out.write(body + b"\n")
        st.digests.append(hashlib.blake2b(body, digest_size=16).hexdigest())
        st.rows += rows

    def stage(self) -> None:
        """Create the staging tables (once) and stage every page spooled and not staged."""
        if not self.staging:
            self.conn.execute(db.query("sync_odata", "stage_settings"))
            for e, st in self.sets.items():
                self.conn.execute(_q("create_stage", stage=st.stage, target=sql.Identifier(e),
                                     cols=_list(COLUMNS[e])))
            self.staging = True
        for st in self.sets.values():
            if st.staged == len(st.pages):
                continue
            with st.raw.open("rb") as src:
                for offset, length in st.pages[st.staged:]:
                    src.seek(offset)
                    self._stage(st, src.read(length))

    def _stage(self, st: _Set, body: bytes) -> None:
        """Stage the set's next page not staged yet."""
        self.conn.execute(st.page_insert, {"page": _page_text(body, st.mapping.entity_set),
                                           "base": st.staged << 32})
        st.staged += 1

    # ---------------------------------------------------------------- check

    def check(self, problems: Problems, *, reject: bool) -> None:
        """Refused rows, in SQL. With ``reject`` they leave the stage."""
        with db.wrap_errors("checking the feed"), self.conn.cursor() as cur:
            for e, s in self.sets.items():
                keys = ("id", "bad", *(c for child, c, _ in REFERENCES if child == e))
                cur.execute(_q("analyze_stage", stage=s.stage, cols=_list(keys)))
                m, n_last = s.mapping, None
                for r in cur.stream(_q("problems", stage=s.stage), s.checks()):
                    problems.add(Problem(m.entity_set, m.key_field, r["key"],
                                         m.fields[r["col"]], r["kind"], r["message"]))
                    if reject and r["n"] != n_last:
                        problems.rejected[e] += 1
                    n_last = r["n"]
                if reject:
                    cur.execute(_q("delete_refused", stage=s.stage))

    def check_keys(self, problems: Problems, *, reject: bool) -> None:
        """Duplicate keys and dangling references, in SQL. With ``reject`` the offending rows
        leave the stage (a reference to a rejected row cascades); otherwise a reference to a
        refused row is not reported again (root causes only)."""
        with db.wrap_errors("checking keys and references"):
            for e in ENTITIES:  # then references, parents' first: rejects cascade down
                self._duplicates(e, problems, reject=reject)
            for child, col, parent in REFERENCES:
                self._dangling(child, col, parent, problems, reject=reject)

    def _duplicates(self, e: str, problems: Problems, *, reject: bool) -> None:
        st = self.sets[e]
        m, stage = st.mapping, st.stage
        cols = _list(COLUMNS[e])
        rows = self.conn.execute(_q("duplicate_keys", stage=stage, cols=cols)).fetchall()
        distinct = st.rows - sum(r["n"] - 1 for r in rows)
        if reject and st.announced is not None and distinct < st.announced:
            # Repeats may stand in for rows that never came (paging without a stable order):
            # dropping them as duplicates would lose those in silence.
            raise SourceError(
                f"OData {m.entity_set}: the server counted {st.announced} entities but its "
                f"pages held {distinct} distinct keys ({st.rows - distinct} row(s) came again: "
                "paging that repeated rows in place of others, or a mapped id that is not the "
                "set's key); --skip-invalid does not drop them, so nothing was written "
                "([odata] count = false skips this check)")
        for r in rows:
            # strict: one problem per key; reject: one record per rejected row (of rows all
            # the same, the first is kept: dropping it would delete a row the source has)
            left_out = r["n"] - 1 if r["same"] else r["n"]
            for _ in range(left_out if reject else 1):
                problems.add(Problem(m.entity_set, m.key_field, r["id"], m.key_field,
                                     "duplicate", f"key occurs {r['n']} times" + (
                                         ", the same row each time" if r["same"] else "")
                                     + ("; the first is kept" if reject and r["same"] else "")))
            if reject:
                problems.rejected[e] += left_out
        if reject and rows:
            self.conn.execute(_q("delete_duplicates", stage=stage, cols=cols))

    def _dangling(self, e: str, col: str, parent: str, problems: Problems, *,
                  reject: bool) -> None:
        m = self.sets[e].mapping
        parent_set = self.sets[parent].mapping.entity_set
        rows = self.conn.execute(_q("delete_dangling" if reject else "dangling",
                                    stage=self.sets[e].stage, col=sql.Identifier(col),
                                    parent=self.sets[parent].stage)).fetchall()
        for r in sorted(rows, key=lambda r: r["n"]):
            problems.add(Problem(m.entity_set, m.key_field, r["id"], m.fields[col],
                                 "unknown_reference",
                                 f"names {parent_set} {r['ref']!r}, which is not in the feed"
                                 + (" or was rejected" if reject else "")))
        if reject:
            problems.rejected[e] += len(rows)

    def _unweighable(self, problems: Problems, *, reject: bool) -> None:
        """Routes with neither a distance nor a flight, which would fail every build-graph."""
        m = self.sets["routes"].mapping
        with db.wrap_errors("checking the routes' weights"):
            rows = self.conn.execute(_q(
                "delete_unweighable_routes" if reject else "unweighable_routes",
                routes=self.sets["routes"].stage, flights=self.sets["flights"].stage)).fetchall()
        for r in sorted(rows, key=lambda r: r["n"]):
            problems.add(Problem(m.entity_set, m.key_field, r["id"],
                                 m.fields["distance_km"] or "distance_km", "missing",
                                 "no distance and no flight: build-graph cannot weigh the route"))
        problems.rejected["routes"] += len(rows) if reject else 0

    def hashes(self) -> tuple[str, dict[str, str]]:
        """The version's hash and each set's: of the raw pages read (their digests, in order),
        so a restore, which replays them, must come out with the same."""
        per_set = {e: hashlib.sha256("".join(s.digests).encode()).hexdigest()
                   for e, s in self.sets.items()}
        return hashlib.sha256("".join(f"{e}:{per_set[e]}\n" for e in ENTITIES).encode()
                              ).hexdigest(), per_set

    # ---------------------------------------------------------------- diff and apply

    def load(self, problems: Problems, *, reject: bool
             ) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """Check the stage, then apply it: its row counts (and ``rejected``), and what
        changed. ValidationError, nothing applied, if a problem is left (``reject`` false) or
        no stop is. A clean strict run leaves duplicate keys and dangling references to the
        apply, which has PostgreSQL verify them; only if that fails are they looked for, to
        name them all."""
        self.check(problems, reject=reject)
        if reject or problems.total:
            self.check_keys(problems, reject=reject)
        self._unweighable(problems, reject=reject)
        with db.wrap_errors("counting the staged rows"):
            counts = {e: int(_one(self.conn, _q("count_stage", stage=s.stage))["n"])
                      for e, s in self.sets.items()}
        if counts["stops"] == 0:
            m = self.sets["stops"].mapping
            problems.add(Problem(m.entity_set, m.key_field, None, "-", "empty",
                                 "no valid stops in the feed; refusing to empty the read model"),
                         lead=True)  # why the run stops, with --skip-invalid too
        if counts["stops"] == 0 or (problems.total and not reject):
            raise _invalid(problems, self)
        counts["rejected"] = sum(problems.rejected.values())
        diff = self.apply(counts)
        if diff is None:  # a duplicate key or a dangling reference: name them
            self.check_keys(problems, reject=False)
            raise _invalid(problems, self)
        return counts, diff

    def apply(self, staged: Mapping[str, int]) -> dict[str, dict[str, int]] | None:
        """Write the staged dataset into the read model: what changed, per entity.

        PostgreSQL then verifies the keys, which check_keys need not have: the deferred
        foreign keys (a reference to a row not in the feed), an upsert that meets a key twice,
        and a read model left with fewer rows than the stage holds (``staged``, per entity: a
        key twice in the feed). If any fails, the apply is undone and None returned.
        """
        with db.wrap_errors("writing the read model"):
            self.conn.execute(db.query("sync_odata", "savepoint_apply"))
            try:
                diff = {e: self._apply(e) for e in ENTITIES}
                self.conn.execute(db.query("sync_odata", "constraints_now"))
            except (psycopg.errors.ForeignKeyViolation, psycopg.errors.CardinalityViolation):
                diff = None
            if diff is None or any(  # fewer rows than staged: a key twice in the feed
                    _one(self.conn, _q("count_rows", target=sql.Identifier(e)))["n"] != staged[e]
                    for e in ENTITIES):
                self.conn.execute(db.query("sync_odata", "rollback_apply"))
                return None
        return diff

    def _apply(self, e: str) -> dict[str, int]:
        cols = COLUMNS[e]
        row = _one(self.conn, _q(
            "apply", stage=self.sets[e].stage, target=sql.Identifier(e), cols=_list(cols),
            s_cols=_list(cols, "s"), t_cols=_list(cols, "t"),
            assignments=sql.SQL(", ").join(sql.SQL("{} = EXCLUDED.{}").format(
                sql.Identifier(c), sql.Identifier(c)) for c in cols if c != "id")))
        return {k: int(v) for k, v in row.items()}


def _records(src: gzip.GzipFile) -> Iterator[bytes]:
    """The records of a JSON text sequence, each without its separator and final newline."""
    buf = b""
    while block := src.read(1024 * 1024):
        *done, buf = (buf + block).split(_RS)
        yield from (r[:-1] if r.endswith(b"\n") else r for r in done if r)
    if buf:
        yield buf[:-1] if buf.endswith(b"\n") else buf


# A JSON \u0000 escape (not an escaped backslash before "u0000"): PostgreSQL text cannot hold
# NUL, so it is sent as \uffff, which the sync_* rules refuse.
_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


# A UTF-16 surrogate escape (a pair is one character, an emoji; half of one is no text, RFC
# 8259 8.2), or NaN/Infinity, which Python's parser reads and PostgreSQL's refuses. Only a page
# where one is found is looked at row by row. Three plain scans, not one pattern with three
# alternatives: a third of the time, and the scan holds the fetching thread's interpreter.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _suspect(body: bytes) -> bool:
    return b"NaN" in body or b"Infinity" in body or _SURROGATE.search(body) is not None


def _refuse_not_json(m: EntityMapping, page: Page) -> None:
    """SourceError naming the row and field (mapped or not: PostgreSQL reads the whole page)
    of a value that is not JSON; PostgreSQL refuses the page naming nothing."""
    for row in page.rows:
        for field_name, v in row.items():
            try:
                json.dumps(v, allow_nan=False, ensure_ascii=False).encode()
            except ValueError as exc:  # UnicodeEncodeError: a lone surrogate
                why = (f"a lone UTF-16 surrogate (\\u{ord(exc.object[exc.start]):04x}) is not "
                       "text" if isinstance(exc, UnicodeEncodeError) else "NaN or Infinity is "
                       "not a JSON number")
                key = str(row.get(m.key_field)).encode("utf-8", "backslashreplace").decode()
                raise SourceError(f"OData {m.entity_set} page {page.number}: {m.entity_set}["
                                  f"{m.key_field}={key}] {field_name}: {why}; nothing was written"
                                  ) from None
    try:  # not in a row: in an annotation of the page (PostgreSQL reads it too)
        json.dumps(json.loads(page.body), allow_nan=False, ensure_ascii=False).encode()
    except ValueError:
        raise SourceError(f"OData {m.entity_set} page {page.number}: an annotation of the page "
                          "holds NaN, Infinity or a lone UTF-16 surrogate, which are not JSON; "
                          "nothing was written") from None


def _absent_fields(m: EntityMapping, absent: set[str], names: set[str]) -> str:
    """Which mapped fields (or paths) no entity of the set had, with the names it did have
    that come close (another service's spelling: ``IsAirport`` for ``isAirport``)."""
    def one(name: str) -> str:
        columns = "/".join(c for c, f in m.fields.items() if f == name)
        close = close_name(name, names)  # a path whose property is there: no guess
        return f"{name!r} ({columns}" + (f"; did you mean {close!r}?)" if close else ")")
    return (f"OData {m.entity_set}: no entity has the field(s) "
            f"{', '.join(one(n) for n in sorted(absent))} of [odata.mapping.{m.entity}.fields];"
            " map each to the service's name (or an optional one to \"\" to leave it out); "
            "nothing was written")


def _page_text(body: bytes, entity_set: str) -> str:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SourceError(f"OData {entity_set}: a page is not UTF-8") from None
    return _NUL.sub(r"\1\\uffff", text) if "\\u0000" in text else text


def feed_key(client: ODataClient, mappings: dict[str, EntityMapping]) -> str:
    """What page digests are valid for: the checks, protocol, mapping and first-page URLs."""
    urls = [client.collection_url(m.entity_set, orderby=m.key_field, select=m.select,
                                  filter=m.filter) for m in mappings.values()]
    doc = {"checks": CHECKS, "protocol": client.protocol, "urls": urls,
           "mapping": {e: m.to_json() for e, m in mappings.items()}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _odata_digest(odata: Any) -> str:
    """Of the protocol and mapping a version's pages are read with: recorded with the version
    (``stats``), so a restore reads them as they were read, whatever its manifest says."""
    doc = [odata.get("protocol"), odata.get("mapping")] if isinstance(odata, dict) else odata
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def backup_prefix(version: str) -> str:
    return f"datasets/{version}/"


# ------------------------------------------------------------------------------ versions


def _gzip(src: Path, dst: Path) -> Path:
    with src.open("rb") as fin, gzip.open(dst, "wb", compresslevel=1) as fout:
        shutil.copyfileobj(fin, fout, 1024 * 1024)
    return dst


def _upload_raw(backups: BackupStore, st: _Set, prefix: str) -> dict[str, Any]:
    assert st.gz is not None
    gz, key = st.gz.result(), f"raw/{st.entity}.json-seq.gz"
    backups.put_file(prefix + key, str(gz), "application/gzip")
    return {f"raw/{st.entity}": {"key": key, "pages": len(st.pages), "rows": st.rows,
                                 "bytes": gz.stat().st_size}}


def _upload_rejects(backups: BackupStore, rejects: Path, prefix: str) -> dict[str, Any]:
    backups.put_file(prefix + "rejects.jsonl.gz", str(rejects), "application/gzip")
    return {"rejects": {"key": "rejects.jsonl.gz"}}


def write_version(conn: psycopg.Connection[Any], loader: _Loader, backups: BackupStore,
                  ctx: RunContext, diff: dict[str, dict[str, int]], *, counts: dict[str, int],
                  manifest: dict[str, Any], source: str, restored_from: str | None = None,
                  feed_digests: dict[str, Any] | None = None, rejects: Path | None = None,
                  hashes: tuple[str, dict[str, str]] | None = None
                  ) -> tuple[str, str, list[tuple[str | None, int]]]:
    """Record the applied dataset as the new active version, back it up, then commit; returns
    the version, its hash and its route modes (recorded in ``stats``, for the runs after).
    ``hashes`` (the version's, each set's) are those of the pages read unless given.

    Order: reserve ``ds-v<N>``; upload the raw pages of a sync (in threads, while the version
    is recorded in this transaction); upload the manifest; COMMIT. Any failure before the
    COMMIT rolls the transaction back, so a version never points at a missing backup; an
    orphan backup of an uncommitted number is overwritten by the next run.
    """
    with db.wrap_errors("reserving the dataset version"):
        seq = int(_one(conn, db.query("sync_odata", "next_seq"))["seq"])
    # A version's prefix may hold an orphan upload of a crashed run here (reused), or a
    # version this database never made (another deployment on the bucket, or a database
    # restored from an older backup): never overwritten, the number is skipped.
    version, prefix = f"ds-v{seq}", backup_prefix(f"ds-v{seq}")
    while backups.exists(prefix + "manifest.json"):
        theirs = str(backups.get_json(prefix + "manifest.json").get("run_id"))
        if _one(conn, db.query("sync_odata", "run_known"), {"run_id": theirs})["known"]:
            break
        seq += 1
        ctx.log.warning("S3 bucket %r holds %s of run %s, which this database never ran "
                        "(another deployment backing up into it, or a database restored from "
                        "an older backup?); kept, and this version is ds-v%d", backups.bucket,
                        version, theirs[:8], seq)
        version, prefix = f"ds-v{seq}", backup_prefix(f"ds-v{seq}")
    with ThreadPoolExecutor(max_workers=len(ENTITIES), thread_name_prefix="backup") as pool:
        uploads = [pool.submit(_upload_raw, backups, st, prefix)
                   for st in loader.sets.values() if source == "sync"]
        if rejects is not None:
            uploads.append(pool.submit(_upload_rejects, backups, rejects, prefix))
        try:
            hash_, set_hashes = hashes or loader.hashes()
            modes = _route_modes(conn, loader.sets["routes"].stage, loader.sets["flights"].stage)
            with db.wrap_errors("recording the dataset version"):
                created = _one(conn, db.query("sync_odata", "insert_dataset"), {
                    "version": version, "seq": seq, "hash": hash_,
                    "set_hashes": Jsonb(set_hashes), "counts": Jsonb(counts),
                    "diff": Jsonb(diff), "source": source, "restored_from": restored_from,
                    "backup_prefix": prefix, "run_id": ctx.run_id,
                    "feed_digests": None if feed_digests is None else Jsonb(feed_digests),
                    "stats": Jsonb({"route_modes": modes,
                                    "odata": _odata_digest(manifest.get("odata"))}),
                })["created_at"]
                conn.execute(db.query("sync_odata", "deactivate"))
                conn.execute(db.query("sync_odata", "activate"), {"version": version})
        finally:
            files: dict[str, Any] = {}
            for upload in uploads:  # a BackupError wins: it is the root cause more often
                files |= upload.result()
    backups.put_json(prefix + "manifest.json", {
        **manifest, "version": version, "hash": hash_, "set_hashes": set_hashes,
        "counts": counts, "diff": diff, "created_at": created.isoformat(), "files": files,
        "run_id": ctx.run_id, "source": source})
    with db.wrap_errors("committing the dataset"):
        conn.commit()
    return version, hash_, modes


def _result_extra(version: str | None, hash_: str, diff: dict[str, dict[str, int]]
                  ) -> dict[str, Any]:
    return {"dataset_version": version, "hash": hash_} | {
        k: {e: d[k] for e, d in diff.items()} for k in ("inserted", "updated", "deleted")}


def _diff_text(diff: dict[str, dict[str, int]]) -> str:
    parts = [f"{e} +{d['inserted']} ~{d['updated']} -{d['deleted']}" for e, d in diff.items()]
    return ": " + ", ".join(parts)


def _connect(database: db.Database, ctx: RunContext) -> psycopg.Connection[Any]:
    """The connection of the run's one transaction (begun here)."""
    conn = database.connect(name=f"pipeline {ctx.stage} {ctx.run_id[:8]}")
    db.long_transaction(conn)  # it waits on the OData server between pages
    return conn


def _noop(active: dict[str, Any], counts: dict[str, Any], extra: dict[str, Any] | None = None
          ) -> StageResult:
    return StageResult(status=NOOP, counts=counts,
                       extra=_result_extra(active["version"], active["hash"], {
                           e: dict.fromkeys(("inserted", "updated", "deleted"), 0)
                           for e in ENTITIES}) | (extra or {}),
                       message=f"unchanged since {active['version']}")


# ------------------------------------------------------------------------------ sync


def sync_odata(
    database: db.Database,
    client: ODataClient,
    backups: BackupStore | None,
    ctx: RunContext,
    *,
    mapping: dict[str, Any] | None = None,
    skip_invalid: bool = False,
    dry_run: bool = False,
    force: bool = False,
    speeds_kmh: Mapping[str, float] | None = None,
) -> StageResult:
    """Fetch, check and diff the feed; write a new dataset version if it changed.

    Strict by default: any problem raises ValidationError and nothing is written. With
    ``skip_invalid`` bad rows (and rows that reference them) are left out and recorded.
    ``backups`` may be None only for a dry run. The result notes the route modes of the
    active dataset (of the feed, for a dry run) that have no speed in ``speeds_kmh``
    (``[virtual] speeds_kmh``), on which build-graph would fail.
    """
    result, modes = _sync(database, client, backups, ctx, mapping=mapping,
                          skip_invalid=skip_invalid, dry_run=dry_run, force=force)
    if modes is None and dry_run:  # the read model still holds the active dataset, not the feed
        return result
    if modes is None:  # an active version made before its route modes were recorded
        with _connect(database, ctx) as conn:
            modes = _route_modes(conn)
    unknown = unknown_modes(dict(modes), speed_table(speeds_kmh or {}))
    result.extra["unknown_modes"] = unknown
    if unknown:
        note = f"note: {describe_unknown(unknown)}; build-graph fails until then"
        result.message = f"{result.message}; {note}" if result.message else note
    return result


def _invalid(problems: Problems, loader: _Loader) -> ValidationError:
    first = [str(p) for p in problems.first]
    if not problems.total:  # the read model's own constraints refused what the checks passed
        raise DatabaseError("database error while writing the read model: its keys or "
                            "references refuse the feed, which has no duplicate key and no "
                            "unknown reference")
    dup = next((s.mapping for s in loader.sets.values()
                if (s.mapping.entity_set, "duplicate") in problems.counts), None)
    return ValidationError(
        f"validation failed: {problems.total} problem(s) ({problems.summary()}); "
        "nothing was written" + (
            f"; {dup.key_field} is not unique in {dup.entity_set}: if it is only part of the "
            "set's key (SAP's StopSet(Plant='1000',Id='A')), [odata.mapping."
            f"{dup.entity}] filter must pick one value of the other part" if dup else ""),
        first, partial=StageResult(
            counts={e: s.rows for e, s in loader.sets.items()},
            extra={"problems": first, "problem_counts": problems.by_set()}))


def _route_modes(conn: psycopg.Connection[Any], *tables: sql.Identifier
                 ) -> list[tuple[str | None, int]]:
    """Of the read model, or of the stage (``tables``) an apply has just made equal to it."""
    routes, flights = tables or (sql.Identifier("routes"), sql.Identifier("flights"))
    with db.wrap_errors("reading the route modes"):
        return [(r["mode"], int(r["routes"]))
                for r in conn.execute(_q("route_modes", routes=routes, flights=flights))]


def _sync(database: db.Database, client: ODataClient, backups: BackupStore | None,
          ctx: RunContext, *, mapping: dict[str, Any] | None, skip_invalid: bool,
          dry_run: bool, force: bool
          ) -> tuple[StageResult, list[tuple[str | None, int]] | None]:
    """The sync, and the route modes of the dataset now active (None if not recorded)."""
    mappings = resolve_mapping(mapping)
    if backups is None and not dry_run:
        raise ValueError("a backup store is needed unless dry_run")
    with ctx.interruptible():  # a stop signal ends the run even while the server hangs
        protocol = client.protocol  # the first request: the service document
    # closed without a commit, the connection rolls everything back
    with contextlib.closing(_connect(database, ctx)) as conn, \
            _Loader(conn, ctx, mappings, protocol) as loader:
        with db.wrap_errors("reading the active dataset"):
            active = conn.execute(db.query("sync_odata", "active_dataset")).fetchone()
        with ctx.interruptible():  # nothing is written before write_version: stopping rolls back
            key = feed_key(client, mappings)
            stored = (active or {}).get("feed_digests") or {}
            expected = stored.get("pages", {}) if not force and stored.get("key") == key else {}
            unchanged = loader.fetch(client, expected)
        if unchanged:
            # every page byte for byte the active version's: nothing was even staged
            assert active is not None
            return _noop(active, {e: int(active["counts"].get(e, 0)) for e in ENTITIES}
                         | {"rejected": 0}), active["stats"].get("route_modes")
        if not dry_run:
            loader.compress()
        rejects = loader.workdir / "rejects.jsonl.gz"
        with gzip.open(rejects, "wt", encoding="utf-8", compresslevel=1) as reject_file:
            problems = Problems(reject_file if skip_invalid else None)
            counts, diff = loader.load(problems, reject=skip_invalid)
        rejected = counts["rejected"]
        reject_extra: dict[str, Any] = {}
        if rejected:
            reject_extra = {"rejects": [str(p) for p in problems.first],
                            "rejected_by_set": dict(problems.rejected)}
            ctx.log.warning("skipped %d invalid rows; their problems: %s", rejected,
                            problems.summary())
        if active is not None and not force and not any(
                n for d in diff.values() for n in d.values()):
            # the same rows: rolled back
            return _noop(active, counts, reject_extra), active["stats"].get("route_modes")
        if dry_run:  # what a run would have written; the connection closes uncommitted
            modes = _route_modes(conn, loader.sets["routes"].stage, loader.sets["flights"].stage)
            return StageResult(
                status=SKIPPED, counts=counts,
                extra=_result_extra(active["version"] if active else None,
                                    loader.hashes()[0], diff)
                | reject_extra | {"dry_run": True},
                message="dry run: nothing written" + _diff_text(diff)), modes
        assert backups is not None
        version, hash_, modes = write_version(
            conn, loader, backups, ctx, diff, counts=counts, source="sync",
            manifest={"format": BACKUP_FORMAT, "raw_prefix": None,
                      "odata": {"service": client.service_url, "protocol": client.protocol,
                                "mapping": {e: m.to_json() for e, m in mappings.items()}}},
            # a feed with rejects always gets the full check again
            feed_digests=None if rejected else {"key": key, "pages": {
                e: "".join(st.digests) for e, st in loader.sets.items()}},
            rejects=rejects if rejected else None)
        ctx.log.info("dataset %s active%s", version, _diff_text(diff))
        return StageResult(status=SUCCESS, counts=counts,
                           extra=_result_extra(version, hash_, diff) | reject_extra
                           | {"backup_prefix": backup_prefix(version)},
                           message=f"{version} active" + _diff_text(diff)), modes


# ------------------------------------------------------------------------------ restore


def restore_dataset(database: db.Database, backups: BackupStore, ctx: RunContext, version: str
                    ) -> StageResult:
    """Make ``version``'s S3 backup the active dataset again, as a new version (same hash).

    The backed-up raw pages must be those the version was read from (its hash, per set) and
    are then staged and checked as a sync stages them (with its rejects, if it had any), to
    the version's row counts; a mismatch is a BackupError and nothing is written. A version
    of backup format 1 (made by the row worker, whose hashes were of its canonical rows) is
    checked by its row counts only.
    """
    with contextlib.closing(_connect(database, ctx)) as conn:
        with db.wrap_errors("reading the dataset version"):
            row = conn.execute(db.query("sync_odata", "get_dataset"),
                               {"version": version}).fetchone()
        if row is None:
            raise NothingToDo(f"no dataset version {version!r} (see `pipeline datasets list`)")
        prefix = row["backup_prefix"]
        manifest = backups.get_json(prefix + "manifest.json")
        if not isinstance(manifest, dict) or manifest.get("format") not in (
                BACKUP_FORMAT, "pipeline-dataset/1"):
            raise BackupError(f"backup {prefix}manifest.json is not a {BACKUP_FORMAT} manifest")
        if manifest.get("hash") != row["hash"]:
            raise BackupError(f"backup {prefix} does not match {version}: hash differs")
        odata = manifest.get("odata") or {}
        recorded = row["stats"].get("odata")  # None: a version recorded before it was
        if recorded is None:
            ctx.log.warning("%s does not record its [odata.mapping]: that of %smanifest.json is "
                            "taken unchecked", version, prefix)
        elif recorded != _odata_digest(odata):
            raise BackupError(f"backup {prefix}manifest.json does not match {version}: its "
                              "OData protocol or mapping is not the one the version was read "
                              "with")
        try:
            if not isinstance(odata, dict) or not isinstance(odata.get("mapping") or {}, dict):
                raise BackupError(f"backup {prefix}manifest.json: its OData mapping is malformed")
            mappings = resolve_mapping(odata.get("mapping"))
        except ConfigError as exc:
            raise BackupError(f"backup {prefix}manifest.json: {exc}") from None
        raw_prefix = manifest.get("raw_prefix") or prefix + "raw/"
        with _Loader(conn, ctx, mappings, odata.get("protocol", "v4")) as loader:
            loader.replay(backups, raw_prefix)
            hash_, set_hashes = loader.hashes()
            if manifest["format"] == BACKUP_FORMAT:
                bad = [e for e in ENTITIES if set_hashes[e] != row["set_hashes"].get(e)]
                if bad:
                    raise BackupError(f"backup {prefix} is corrupt: the pages of "
                                      f"{', '.join(bad)} are not those {version} was read from")
            else:  # format 1 hashed its canonical rows: its row counts are checked below
                hash_, set_hashes = row["hash"], row["set_hashes"]
            with db.wrap_errors("staging the backup"), conn.pipeline():
                loader.stage()
            try:  # rejects again the rows the version rejected
                counts, diff = loader.load(Problems(),
                                           reject=bool(row["counts"].get("rejected")))
            except ValidationError as exc:
                raise BackupError(f"backup {prefix} does not give {version}: {exc}") from None
            wrong = [e for e in ENTITIES if counts[e] != row["counts"].get(e)]
            if wrong:  # still uncommitted: the connection closes without a commit
                raise BackupError(f"backup {prefix} does not give {version}: the row counts "
                                  f"of {', '.join(wrong)} differ")
            new_version, _, _ = write_version(
                conn, loader, backups, ctx, diff, counts=counts, source="restore",
                restored_from=version, hashes=(hash_, set_hashes),
                manifest={"format": manifest["format"], "raw_prefix": raw_prefix,
                          "restored_from": version, "odata": odata})
    return StageResult(status=SUCCESS, counts=counts,
                       extra=_result_extra(new_version, hash_, diff)
                       | {"restored_from": version, "backup_prefix": backup_prefix(new_version)},
                       message=f"{new_version} active (restored from {version})"
                       + _diff_text(diff))


# ------------------------------------------------------------------------------ reading


def dataset_exists(conn: psycopg.Connection[Any], version: str) -> bool:
    with db.wrap_errors("reading the dataset version"):
        return conn.execute(db.query("sync_odata", "get_dataset"),
                            {"version": version}).fetchone() is not None


def list_datasets(conn: psycopg.Connection[Any], limit: int = 50) -> list[dict[str, Any]]:
    """The newest dataset versions first."""
    with db.wrap_errors("listing datasets"):
        rows = conn.execute(db.query("sync_odata", "list_datasets"), {"limit": limit}).fetchall()
    return [dict(r) for r in rows]


def status_section(conn: psycopg.Connection[Any], now: datetime | None = None
                   ) -> dict[str, Any]:
    """The active dataset (version, counts, age) and the newest backup's age, for ``status``.

    Every version is backed up before it is committed, so the newest version's creation time
    is the time of the last dataset backup.
    """
    with db.wrap_errors("reading the dataset summary"):
        r = _one(conn, db.query("sync_odata", "dataset_summary"),
                 {"now": now or datetime.now(UTC)})
    newest = r["newest_created_at"]
    return {
        "active": None if r["version"] is None else {
            **{k: r[k] for k in ("version", "hash", "counts", "diff", "source")},
            "created_at": r["created_at"].isoformat(), "age_s": r["age_s"]},
        "versions": int(r["versions"]),
        "newest_version": r["newest_version"],
        "last_backup_at": newest.isoformat() if newest else None,
        "last_backup_age_s": r["newest_age_s"],
    }
