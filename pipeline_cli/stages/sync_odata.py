"""sync-odata: an OData service -> a versioned, validated dataset in the read model.

Pages are fetched and spooled raw; a row worker process (:mod:`pipeline_cli.sync.worker`) turns
them into canonical lines, checks, hashes and compares them with the active version's row index
while the fetch goes on. An unchanged dataset (same canonical, order-independent hash as the
active one) is a ``noop``. A changed one is written to stops/routes/flights (only its new,
changed and vanished rows when it could be compared with the row index, else every row through
staging tables and SQL checks), recorded as ``ds-v<N>``, backed up to S3 and committed, in that
order. Restore loads a version's backup; ``status_section`` feeds ``status``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .. import db
from ..adapters.backups import BackupStore
from ..adapters.odata import ODataClient
from ..adapters.odata_format import EntityMapping, resolve_mapping
from ..errors import BackupError, NothingToDo, ValidationError
from ..modes import describe_unknown, speed_table, unknown_modes
from ..runner import NOOP, SKIPPED, SUCCESS, RunContext, StageResult
from ..sync.rows import (
    CANONICAL_FORMAT,
    COLUMNS,
    ENTITIES,
    INDEX_CHUNK,
    MAX_PROBLEMS,
    REFERENCES,
    Problem,
    Problems,
    RowDigests,
    SetFiles,
    SetOutput,
    dataset_hash,
    gzip_file,
    index_chunks,
    unescape_key,
    write_index,
)
from ..sync.worker import RowWorker

BACKUP_FORMAT = "pipeline-dataset/1"
_PAGE_DIGEST_HEX = 32  # blake2b, 16 bytes
# Spool writes are buffered: each write to the file gives up the GIL, which the read-ahead
# thread then holds.
_SPOOL_BUFFER = 4 * 1024 * 1024


# ------------------------------------------------------------------------------ loading


@dataclass
class _SetState:
    entity: str
    mapping: EntityMapping
    files: SetFiles
    digests: RowDigests = field(default_factory=RowDigests)
    read: int = 0
    pages: int = 0
    has_raw: bool = True  # False for a restore: the raw pages stay with the original version
    page_digests: list[str] = field(default_factory=list)  # of the raw bodies, in order
    page_spans: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) in raw
    deferred: int = 0  # leading pages not sent to the worker yet (equal to the active version's)
    out: IO[bytes] | None = None  # the raw spool while this set is being fetched
    output: SetOutput | None = None  # what the row worker made of the set
    rewritten: bool = False  # rejects were taken out of the spool after the worker wrote it

    @property
    def worker_files_current(self) -> bool:
        """Whether the worker's gzipped spool and row index files match the spool: not after
        rejects were taken out of it, nor for a spool it never saw (restore)."""
        return self.output is not None and not self.rewritten


def _fmt(template: str, **parts: Any) -> sql.Composed:
    return db.query("sync_odata", template).format(**parts)


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


def _cols(entity: str) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS[entity])


class _Loader:
    """One transaction on its own connection: the fetch with its row worker, staging tables,
    checks, diff and apply."""

    def __init__(self, conn: psycopg.Connection[Any], workdir: Path, ctx: RunContext,
                 mappings: dict[str, EntityMapping], active: dict[str, Any] | None = None
                 ) -> None:
        self.conn = conn
        self.workdir = workdir
        self.ctx = ctx
        self.active = active
        self.sets = {e: _SetState(e, mappings[e], SetFiles.of(workdir, e)) for e in ENTITIES}
        self.protocol = "v4"
        self.expected: dict[str, str] = {}
        self.matching = False
        self.worker: RowWorker | None = None
        self.rejects: Path | None = None  # where the worker writes rejects (--skip-invalid)
        self.worker_stats: dict[str, Any] = {}
        self.changes_only = False  # write only what differs from the active version's index
        self.feed_digests: dict[str, Any] | None = None  # recorded with the version

    def spool(self, entity: str, chunks: Iterable[bytes]) -> None:
        """Write chunks of canonical lines to the entity's spool file."""
        with self.sets[entity].files.spool.open("wb") as spool:
            for chunk in chunks:
                spool.write(chunk)

    def stage(self) -> None:
        """Staging tables for this transaction, filled by COPY from the spools, analyzed."""
        with db.wrap_errors("staging the dataset"):
            for e in ENTITIES:
                self._stage_file(e, self.sets[e].files.spool)
                self.ctx.check_stop()

    def _stage_file(self, entity: str, path: Path, *, analyze: bool = True) -> None:
        stage = _ident(f"stage_{entity}")
        self.conn.execute(_fmt("create_stage", stage=stage, target=_ident(entity)))
        with self.conn.cursor() as cur, cur.copy(
                _fmt("copy_stage", stage=stage, cols=_cols(entity))) as copy, \
                path.open("rb") as src:
            while block := src.read(1024 * 1024):
                copy.write(block)
        if not analyze:
            return
        # only the key columns: the checks and joins need nothing else
        cols = ["id", *(c for child, c, _ in REFERENCES if child == entity)]
        self.conn.execute(_fmt("analyze_stage", stage=stage, cols=sql.SQL(", ").join(
            _ident(c) for c in cols)))

    # ---------------------------------------------------------------- fetch

    def fetch(self, client: ODataClient, problems: Problems,
              expected: dict[str, str] | None, *, rejects: Path | None = None) -> bool:
        """Fetch every set into its raw spool; True if the feed is unchanged.

        ``expected`` holds the page digests of the active version (per set, concatenated
        hex). While the pages received equal those byte for byte, they are only spooled. At
        the first page that differs (or a page too many or too few), the row worker starts,
        takes the pages held back, and then every page as it arrives. True means every page
        was equal: the feed is the active dataset, which passed every check. Otherwise the
        worker's results are in each set's ``output`` and its problems in ``problems``.
        """
        self.protocol = client.protocol
        self.expected = expected or {}
        self.matching = expected is not None
        self.rejects = rejects
        try:
            for e in ENTITIES:
                state = self.sets[e]
                self._fetch_set(state, client)
                self.ctx.log.info("%s: %d rows in %d pages", state.mapping.entity_set,
                                  state.read, state.pages)
            if self.matching and any(
                    len(self.expected.get(e, "")) != _PAGE_DIGEST_HEX * s.pages
                    for e, s in self.sets.items()):
                self._start_worker(ENTITIES[-1])
            if self.worker is None:
                return True
            outputs, found, self.worker_stats = self.worker.finish()
        finally:
            if self.worker is not None:
                self.worker.close()
        problems.merge(found)
        for e, state in self.sets.items():
            state.output = outputs[e]
            state.digests = outputs[e].digests()
        self.ctx.log.info("row worker: %.2f s CPU, peak RSS %d MB",
                          self.worker_stats["cpu_s"], self.worker_stats["peak_rss_kb"] // 1024)
        return False

    def _fetch_set(self, state: _SetState, client: ODataClient) -> None:
        m = state.mapping
        expected = self.expected.get(state.entity, "")
        with state.files.raw.open("wb", buffering=_SPOOL_BUFFER) as raw, \
                self.ctx.progress(m.entity_set, None) as bar:
            state.out = raw
            try:
                if self.worker is not None:
                    self.worker.send({"op": "set", "set": state.entity})
                elif not self.matching:
                    self._start_worker(state.entity)
                for page in client.pages(m.entity_set, orderby=m.key_field,
                                         select=_select(m), filter=m.filter):
                    self.ctx.check_stop()
                    if page.number == 1 and page.count is not None:
                        bar.set_total(page.count)
                    raw.write(b"\x1e")  # RFC 7464 JSON text sequence: one record per page
                    span = (raw.tell(), len(page.body))
                    state.page_spans.append(span)
                    raw.write(page.body)
                    raw.write(b"\n")
                    digest = hashlib.blake2b(page.body, digest_size=16).hexdigest()
                    i = len(state.page_digests) * _PAGE_DIGEST_HEX
                    state.page_digests.append(digest)
                    state.pages += 1
                    state.read += len(page.rows)
                    bar.advance(len(page.rows))
                    if self.matching:
                        if expected[i:i + _PAGE_DIGEST_HEX] == digest:
                            state.deferred += 1
                            continue
                        self._start_worker(state.entity)
                    raw.flush()
                    assert self.worker is not None
                    self.worker.page(state.entity, *span, state.pages)
            finally:
                state.out = None

    def _start_worker(self, upto: str) -> None:
        """The feed differs from the active version: start the row worker and hand it every
        page held back, set by set up to ``upto`` (the set being fetched)."""
        self.matching = False
        self.worker = RowWorker(self.workdir)
        indexed = self._write_active_index()
        self.worker.start(protocol=self.protocol,
                          mappings={e: s.mapping for e, s in self.sets.items()},
                          indexed=indexed, rejects=self.rejects)
        for e in ENTITIES:
            state = self.sets[e]
            if state.out is not None:
                state.out.flush()
            self.worker.send({"op": "set", "set": e})
            for number, (offset, length) in enumerate(state.page_spans[:state.deferred],
                                                      start=1):
                self.worker.page(e, offset, length, number)
            state.deferred = 0
            if e == upto:
                return

    def _write_active_index(self) -> bool:
        """The active version's row index as files for the worker; False if it has none
        (a version made before row indexes existed, or of another canonical format)."""
        if self.active is None:
            return False
        counts = self.active["counts"]
        seen: dict[str, int] = dict.fromkeys(ENTITIES, 0)
        with contextlib.ExitStack() as stack:
            files = {e: (stack.enter_context(s.files.old_keys.open("wb")),
                         stack.enter_context(s.files.old_digests.open("wb")))
                     for e, s in self.sets.items()}
            cur = stack.enter_context(self.conn.cursor(binary=True))
            with db.wrap_errors("reading the row index"):
                for r in cur.stream(db.query("sync_odata", "row_index"),
                                    {"version": self.active["version"]}):
                    e = r["entity"]
                    if (r["format"] != CANONICAL_FORMAT or r["chunk"] != seen[e] // INDEX_CHUNK
                            or len(r["digests"]) != 8 * r["rows"]
                            or r["keys"].count(b"\n") != r["rows"]):
                        return False
                    seen[e] += r["rows"]
                    files[e][0].write(r["keys"])
                    files[e][1].write(r["digests"])
        return all(seen[e] == counts.get(e) for e in ENTITIES)

    def can_write_changes(self, problems: Problems) -> bool:
        """Whether every set was compared with the active version's row index and nothing
        at all was wrong: then only new, changed and vanished rows need writing."""
        return not problems.total and all(
            s.output is not None and s.output.indexed and not s.output.key_problems
            for s in self.sets.values())

    def backup_chunks(self, state: _SetState, path: Path) -> Iterator[bytes]:
        """Lines of a backed-up ``<entity>.tsv.gz`` (header first), hashed as they go."""
        with gzip.open(path, "rb") as fh, self.ctx.progress(state.entity, None) as bar:
            header = fh.readline().decode().rstrip("\n").split("\t")
            if tuple(header) != COLUMNS[state.entity]:
                raise BackupError(f"backup {path.name}: unexpected columns {header}")
            batch: list[bytes] = []
            for line in fh:
                batch.append(line)
                if len(batch) >= 5000:
                    self.ctx.check_stop()
                    state.digests.add(batch)
                    bar.advance(len(batch))
                    yield b"".join(batch)
                    batch = []
            state.digests.add(batch)
            if batch:
                yield b"".join(batch)

    def check_keys(self, problems: Problems, *, reject: bool) -> None:
        """Duplicate keys and dangling references, in SQL. With ``reject`` the offending rows
        leave the staging tables (and their spool lines and digests) and count as rejects."""
        removed: dict[str, set[str]] = {e: set() for e in ENTITIES}
        with db.wrap_errors("checking keys and references"):
            for e in ENTITIES:
                # Strict mode reports root causes: a reference to a row that is in the feed
                # but invalid is not also reported as unknown. With reject, it cascades.
                self.conn.execute(_fmt("create_invalid", invalid=_ident(f"invalid_{e}")))
                invalid = self.sets[e].files.invalid
                if not reject and invalid.exists() and invalid.stat().st_size:
                    with self.conn.cursor() as cur, cur.copy(_fmt(
                            "copy_invalid", invalid=_ident(f"invalid_{e}"))) as copy, \
                            invalid.open(encoding="utf-8") as lines:
                        for line in lines:
                            copy.write_row((json.loads(line),))
            for e in ENTITIES:
                m = self.sets[e].mapping
                stage = _ident(f"stage_{e}")
                if reject:
                    rows = self.conn.execute(_fmt("delete_duplicates", stage=stage)).fetchall()
                    dup_counts = Counter(r["id"] for r in rows)
                    items = [(k, n) for k, n in sorted(dup_counts.items())]
                else:
                    rows = self.conn.execute(_fmt("duplicate_keys", stage=stage),
                                             {"limit": MAX_PROBLEMS}).fetchall()
                    items = [(r["id"], r["n"]) for r in rows]
                    if rows and rows[0]["total"] > len(rows):
                        problems.counts[(m.entity_set, "duplicate")] += (
                            rows[0]["total"] - len(rows))
                for key, n in items:
                    # strict: one problem per key; reject: one record per rejected row
                    for _ in range(n if reject else 1):
                        problems.add(Problem(m.entity_set, m.key_field, key, m.key_field,
                                             "duplicate", f"key occurs {n} times"))
                    if reject:
                        removed[e].add(key)
                        problems.rejected[e] += n
                for child, col, parent in REFERENCES:
                    if child != e:
                        continue
                    field_name = m.fields[col]
                    parts = {"stage": stage, "col": _ident(col),
                             "parent": _ident(f"stage_{parent}"),
                             "invalid": _ident(f"invalid_{parent}")}
                    if reject:
                        rows = self.conn.execute(_fmt("delete_dangling", **parts)).fetchall()
                    else:
                        rows = self.conn.execute(_fmt("dangling", **parts),
                                                 {"limit": MAX_PROBLEMS}).fetchall()
                        if rows and rows[0]["total"] > len(rows):
                            problems.counts[(m.entity_set, "unknown_reference")] += (
                                rows[0]["total"] - len(rows))
                    parent_set = self.sets[parent].mapping.entity_set
                    for r in sorted(rows, key=lambda r: r["id"]):
                        problems.add(Problem(m.entity_set, m.key_field, r["id"], field_name,
                                             "unknown_reference",
                                             f"names {parent_set} {r['ref']!r}, which is not "
                                             "in the feed" + (" or was rejected" if reject
                                                              else "")))
                        if reject:
                            removed[e].add(r["id"])
                            problems.rejected[e] += 1
        for e, keys in removed.items():
            if keys:
                self._drop_spooled(self.sets[e], keys)

    def _drop_spooled(self, state: _SetState, keys: set[str]) -> None:
        """Rewrite the spool without rows of rejected keys and take them out of the hash."""
        kept = state.files.spool.with_suffix(".kept")
        dropped: list[bytes] = []
        with state.files.spool.open("rb") as src, kept.open("wb") as dst:
            for line in src:
                key = unescape_key(line.split(b"\t", 1)[0].decode())
                if key in keys:
                    dropped.append(line)
                else:
                    dst.write(line)
        kept.replace(state.files.spool)
        state.digests.add(dropped, sign=-1)
        state.rewritten = True

    # ---------------------------------------------------------------- diff and apply

    def hashes(self) -> tuple[str, dict[str, str]]:
        per_set = {e: s.digests.hexdigest(e) for e, s in self.sets.items()}
        return dataset_hash(per_set), per_set

    def diff(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        with db.wrap_errors("computing the diff"):
            for e in ENTITIES:
                row = self.conn.execute(_fmt("diff", stage=_ident(f"stage_{e}"),
                                             target=_ident(e))).fetchone()
                assert row is not None
                out[e] = {k: int(row[k]) for k in ("inserted", "updated", "deleted")}
        return out

    def apply(self) -> dict[str, dict[str, int]]:
        """Write the dataset into the read model; returns what changed per entity (counted
        by the statements).

        With ``changes_only``, only the rows the worker found new, changed or vanished are
        written; if the read model then does not hold exactly the feed's row counts (it was
        changed behind the row index's back), that is undone and every row is compared.
        """
        if self.changes_only:
            with db.wrap_errors("writing the changes to the read model"):
                self.conn.execute(db.query("sync_odata", "savepoint_changes"))
                diff = self._apply_changes()
                counts = {e: self._count(e) for e in ENTITIES}
                if all(counts[e] == s.digests.rows for e, s in self.sets.items()):
                    return diff
                self.conn.execute(db.query("sync_odata", "rollback_changes"))
            self.ctx.log.warning(
                "the read model differs from the row index of %s (rows %s, index says %s); "
                "comparing every row", self.active and self.active["version"], counts,
                {e: s.digests.rows for e, s in self.sets.items()})
            self.changes_only = False
            self.stage()
        return self._apply_all()

    def _apply_changes(self) -> dict[str, dict[str, int]]:
        diff: dict[str, dict[str, int]] = {}
        for e in ENTITIES:
            state = self.sets[e]
            assert state.output is not None
            diff[e] = {"inserted": 0, "updated": 0}
            if state.output.inserted or state.output.updated:
                self._stage_file(e, state.files.changes, analyze=False)
                diff[e] = self._upsert(e, "upsert_changes")
        for e in reversed(ENTITIES):
            text = self.sets[e].files.deleted.read_text(encoding="utf-8")
            keys = [unescape_key(k) for k in text.split("\n")[:-1]]
            row = self.conn.execute(_fmt("delete_keys", target=_ident(e)),
                                    {"keys": keys}).fetchone() if keys else {"deleted": 0}
            assert row is not None
            diff[e]["deleted"] = int(row["deleted"])
        return {e: diff[e] for e in ENTITIES}

    def _count(self, entity: str) -> int:
        row = self.conn.execute(_fmt("count_rows", target=_ident(entity))).fetchone()
        assert row is not None
        return int(row["n"])

    def _apply_all(self) -> dict[str, dict[str, int]]:
        """Upsert every staged row (unchanged ones are skipped in SQL) and delete vanished."""
        diff: dict[str, dict[str, int]] = {}
        with db.wrap_errors("writing the read model"):
            for e in ENTITIES:
                diff[e] = self._upsert(e)
            for e in reversed(ENTITIES):
                row = self.conn.execute(_fmt("delete_vanished", stage=_ident(f"stage_{e}"),
                                             target=_ident(e))).fetchone()
                assert row is not None
                diff[e]["deleted"] = int(row["deleted"])
        return {e: diff[e] for e in ENTITIES}

    def _upsert(self, entity: str, query: str = "upsert") -> dict[str, int]:
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = EXCLUDED.{}").format(_ident(c), _ident(c))
            for c in COLUMNS[entity] if c != "id")
        row = self.conn.execute(_fmt(
            query, stage=_ident(f"stage_{entity}"), target=_ident(entity),
            cols=_cols(entity),
            s_cols=sql.SQL(", ").join(sql.Identifier("s", c) for c in COLUMNS[entity]),
            assignments=assignments)).fetchone()
        assert row is not None
        return {"inserted": int(row["inserted"]), "updated": int(row["updated"])}

    def reserve_version(self) -> tuple[int, str]:
        """The next ``ds-v<N>``: safe because we hold the stage lock (seq is UNIQUE too)."""
        with db.wrap_errors("reserving the dataset version"):
            seq_row = self.conn.execute(db.query("sync_odata", "next_seq")).fetchone()
        assert seq_row is not None
        return int(seq_row["seq"]), f"ds-v{seq_row['seq']}"

    def record_version(self, seq: int, version: str, *, hash_: str,
                       set_hashes: dict[str, str], diff: dict[str, dict[str, int]],
                       source: str, restored_from: str | None, extra_counts: dict[str, int]
                       ) -> datetime:
        """Insert the version, make it active with its row index (the only one kept); check
        the deferred foreign keys now."""
        with db.wrap_errors("recording the dataset version"):
            counts = {e: s.digests.rows for e, s in self.sets.items()} | extra_counts
            created = self.conn.execute(db.query("sync_odata", "insert_dataset"), {
                "version": version, "seq": seq, "hash": hash_, "set_hashes": Jsonb(set_hashes),
                "counts": Jsonb(counts), "diff": Jsonb(diff), "source": source,
                "restored_from": restored_from, "backup_prefix": backup_prefix(version),
                "run_id": self.ctx.run_id,
                "feed_digests": None if self.feed_digests is None else Jsonb(self.feed_digests),
            }).fetchone()
            assert created is not None
            self.conn.execute(db.query("sync_odata", "deactivate"))
            self.conn.execute(db.query("sync_odata", "activate"), {"version": version})
            self.conn.execute(db.query("sync_odata", "drop_row_indexes"))
            for e, state in self.sets.items():
                chunks = index_chunks(*self._index_files(state))
                for chunk, (keys, digests, n) in enumerate(chunks):
                    self.conn.execute(db.query("sync_odata", "insert_row_index"), {
                        "version": version, "entity": e, "chunk": chunk,
                        "format": CANONICAL_FORMAT, "rows": n, "keys": keys,
                        "digests": digests})
            self.conn.execute(db.query("sync_odata", "constraints_now"))
        created_at: datetime = created["created_at"]
        return created_at



    @staticmethod
    def _index_files(state: _SetState) -> tuple[Path, Path]:
        """The row index files of the set as written (the worker's, if still current)."""
        if not state.worker_files_current:
            write_index(state.files.spool, state.files.keys, state.files.digests)
        return state.files.keys, state.files.digests


def _select(m: EntityMapping) -> list[str]:
    return sorted({f for f in m.fields.values() if f})


def feed_key(client: ODataClient, mappings: dict[str, EntityMapping]) -> str:
    """What the page digests are valid for: same protocol, mapping and first-page URLs."""
    urls = [client.collection_url(m.entity_set, orderby=m.key_field, select=_select(m),
                                  filter=m.filter) for m in mappings.values()]
    doc = {"format": CANONICAL_FORMAT, "protocol": client.protocol, "urls": urls,
           "mapping": {e: m.to_json() for e, m in mappings.items()}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def backup_prefix(version: str) -> str:
    return f"datasets/{version}/"


def _active(conn: psycopg.Connection[Any]) -> dict[str, Any] | None:
    with db.wrap_errors("reading the active dataset"):
        row: dict[str, Any] | None = conn.execute(
            db.query("sync_odata", "active_dataset")).fetchone()
    return row


def _upload_set(backups: BackupStore, state: _SetState, prefix: str) -> dict[str, Any]:
    """One set's files of a version's backup: its canonical lines and its raw pages.

    The row worker gzipped the set while it went; if that file is not current, it is made here.
    """
    e, files = state.entity, {}
    gz = state.files.spool_gz
    if not state.worker_files_current:
        gzip_file(state.files.spool, gz, ("\t".join(COLUMNS[e]) + "\n").encode())
    backups.put_file(prefix + f"{e}.tsv.gz", str(gz), "application/gzip")
    files[e] = {"key": f"{e}.tsv.gz", "rows": state.digests.rows, "bytes": gz.stat().st_size}
    if state.has_raw:
        raw_gz = state.files.raw_gz
        backups.put_file(prefix + f"raw/{e}.json-seq.gz", str(raw_gz), "application/gzip")
        files[f"raw/{e}"] = {"key": f"raw/{e}.json-seq.gz", "pages": state.pages,
                             "bytes": raw_gz.stat().st_size}
    return files


def _upload_rejects(backups: BackupStore, rejects: Path, prefix: str) -> dict[str, Any]:
    rejects_gz = rejects.with_name("rejects.jsonl.gz")
    gzip_file(rejects, rejects_gz)
    backups.put_file(prefix + "rejects.jsonl.gz", str(rejects_gz), "application/gzip")
    return {"rejects": {"key": "rejects.jsonl.gz"}}


def write_version(conn: psycopg.Connection[Any], loader: _Loader, backups: BackupStore, *,
                  hash_: str, set_hashes: dict[str, str], manifest: dict[str, Any],
                  source: str, restored_from: str | None = None, rejected: int = 0,
                  rejects: Path | None = None) -> tuple[str, dict[str, dict[str, int]]]:
    """Apply the staged dataset as a new active version, back it up, then commit.

    Order: reserve ``ds-v<N>``; upload the data files (in a thread, while PostgreSQL applies
    the upsert in this transaction); record the version; upload the manifest; COMMIT. Any
    failure before the COMMIT rolls the transaction back, so a version never points at a
    missing backup; an orphan backup of an uncommitted number is overwritten by the next run.
    """
    seq, version = loader.reserve_version()
    prefix = backup_prefix(version)
    # one upload thread per set (gzip and the S3 client's work mostly leave the GIL free)
    with ThreadPoolExecutor(max_workers=len(ENTITIES), thread_name_prefix="backup") as pool:
        uploads = [pool.submit(_upload_set, backups, state, prefix)
                   for state in loader.sets.values()]
        if rejects is not None and rejects.stat().st_size:
            uploads.append(pool.submit(_upload_rejects, backups, rejects, prefix))
        try:
            diff = loader.apply()
            created_at = loader.record_version(
                seq, version, hash_=hash_, set_hashes=set_hashes, diff=diff, source=source,
                restored_from=restored_from, extra_counts={"rejected": rejected})
        finally:
            files: dict[str, Any] = {}
            for upload in uploads:  # a BackupError wins: it is the root cause more often
                files |= upload.result()
    backups.put_json(prefix + "manifest.json", {
        **manifest, "version": version, "diff": diff, "created_at": created_at.isoformat(),
        "files": files})
    with db.wrap_errors("committing the dataset"):
        conn.commit()
    return version, diff


def _result_extra(version: str | None, hash_: str, diff: dict[str, dict[str, int]]
                  ) -> dict[str, Any]:
    return {
        "dataset_version": version,
        "hash": hash_,
        "inserted": {e: d["inserted"] for e, d in diff.items()},
        "updated": {e: d["updated"] for e, d in diff.items()},
        "deleted": {e: d["deleted"] for e, d in diff.items()},
    }


def _zero_diff() -> dict[str, dict[str, int]]:
    return {e: {"inserted": 0, "updated": 0, "deleted": 0} for e in ENTITIES}


def _connect(database: db.Database, ctx: RunContext) -> psycopg.Connection[Any]:
    return database.connect(name=f"pipeline {ctx.stage} {ctx.run_id[:8]}")


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
    """Fetch, validate, hash and diff the feed; write a new dataset version if it changed.

    Strict by default: any problem raises ValidationError and nothing is written. With
    ``skip_invalid`` bad rows (and rows that reference them) are left out and recorded.
    ``backups`` may be None only for a dry run. The result notes the route modes of the
    active dataset that have no speed in ``speeds_kmh`` (``[virtual] speeds_kmh``), on which
    build-graph would fail.
    """
    result = _sync(database, client, backups, ctx, mapping=mapping,
                   skip_invalid=skip_invalid, dry_run=dry_run, force=force)
    if dry_run:  # the read model still holds the active dataset, not the feed
        return result
    with _connect(database, ctx) as conn, db.wrap_errors("reading the route modes"):
        counts = {r["mode"]: r["routes"]
                  for r in conn.execute(db.query("sync_odata", "route_modes"))}
    unknown = unknown_modes(counts, speed_table(speeds_kmh or {}))
    result.extra["unknown_modes"] = unknown
    if unknown:
        note = f"note: {describe_unknown(unknown)}; build-graph fails until then"
        result.message = f"{result.message}; {note}" if result.message else note
    return result


def _sync(
    database: db.Database,
    client: ODataClient,
    backups: BackupStore | None,
    ctx: RunContext,
    *,
    mapping: dict[str, Any] | None,
    skip_invalid: bool,
    dry_run: bool,
    force: bool,
) -> StageResult:
    mappings = resolve_mapping(mapping)
    if backups is None and not dry_run:
        raise ValueError("a backup store is needed unless dry_run")
    conn = _connect(database, ctx)
    try:
        with tempfile.TemporaryDirectory(prefix="pipeline-sync-") as tmp:
            workdir = Path(tmp)
            rejects_path = workdir / "rejects.jsonl"
            problems = Problems()
            active = _active(conn)
            loader = _Loader(conn, workdir, ctx, mappings, active)
            key = feed_key(client, mappings)
            stored = (active or {}).get("feed_digests") or {}
            expected = (stored.get("pages") if not force and stored.get("key") == key
                        else None)
            if loader.fetch(client, problems, expected,
                            rejects=rejects_path if skip_invalid else None):
                # Every page byte for byte the active version's: no row was even parsed.
                assert active is not None
                return StageResult(
                    status=NOOP, counts={e: int(active["counts"].get(e, 0))
                                         for e in ENTITIES} | {"rejected": 0},
                    extra=_result_extra(active["version"], active["hash"], _zero_diff()),
                    message=f"unchanged since {active['version']}")
            counts: dict[str, Any] = {e: s.digests.rows for e, s in loader.sets.items()}
            # Same hash as the active dataset, which passed every check: nothing to do,
            # and nothing to stage. (The checks below can only remove rows.)
            if not problems.total and not force and active:
                hash_, _ = loader.hashes()
                if active["hash"] == hash_:
                    return StageResult(
                        status=NOOP, counts=counts | {"rejected": 0},
                        extra=_result_extra(active["version"], hash_, _zero_diff()),
                        message=f"unchanged since {active['version']}")
            # --force and --dry-run compare every row with the read model in SQL.
            loader.changes_only = (not force and not dry_run
                                   and loader.can_write_changes(problems))
            if not loader.changes_only:
                with contextlib.ExitStack() as stack:
                    if skip_invalid:  # after the worker's rejects, the key checks' ones
                        problems.reject_file = stack.enter_context(
                            rejects_path.open("a", encoding="utf-8"))
                    loader.stage()
                    loader.check_keys(problems, reject=skip_invalid)
                problems.reject_file = None
            read = {e: s.read for e, s in loader.sets.items()}
            empty = loader.sets["stops"].digests.rows == 0
            if empty:
                problems.add(Problem(mappings["stops"].entity_set, mappings["stops"].key_field,
                                     None, "-", "empty", "no valid stops in the feed; "
                                     "refusing to empty the read model"))
            if empty or (problems.total and not skip_invalid):
                first = [str(p) for p in problems.first]
                raise ValidationError(
                    f"validation failed: {problems.total} problem(s) ({problems.summary()}); "
                    "nothing was written", first, partial=StageResult(
                        counts=read,
                        extra={"problems": first, "problem_counts": problems.by_set()}))
            hash_, set_hashes = loader.hashes()
            rejected = sum(problems.rejected.values())
            counts = {e: s.digests.rows for e, s in loader.sets.items()}
            counts["rejected"] = rejected
            reject_extra: dict[str, Any] = {}
            if rejected:
                reject_extra = {"rejects": [str(p) for p in problems.first],
                                "rejected_by_set": dict(problems.rejected)}
                ctx.log.warning("skipped %d invalid rows (%s)", rejected, problems.summary())
            if active and active["hash"] == hash_ and not force:
                return StageResult(
                    status=NOOP, counts=counts,
                    extra=_result_extra(active["version"], hash_, _zero_diff()) | reject_extra,
                    message=f"unchanged since {active['version']}")
            if dry_run:
                diff = loader.diff()
                return StageResult(
                    status=SKIPPED, counts=counts,
                    extra=_result_extra(active["version"] if active else None, hash_, diff)
                    | reject_extra | {"dry_run": True},
                    message="dry run: nothing written" + _diff_text(diff))
            assert backups is not None
            if not rejected:  # a feed with rejects always gets the full check again
                loader.feed_digests = {"key": key, "pages": {
                    e: "".join(st.page_digests) for e, st in loader.sets.items()}}
            manifest = {
                "format": BACKUP_FORMAT, "hash": hash_, "set_hashes": set_hashes,
                "counts": counts, "run_id": ctx.run_id, "source": "sync",
                "odata": {"service": client.service_url, "protocol": client.protocol,
                          "mapping": {e: m.to_json() for e, m in mappings.items()}},
                "columns": {e: list(COLUMNS[e]) for e in ENTITIES},
            }
            version, diff = write_version(
                conn, loader, backups, hash_=hash_, set_hashes=set_hashes, manifest=manifest,
                source="sync", rejected=rejected, rejects=rejects_path if rejected else None)
        diffed = "row_index" if loader.changes_only else "read_model"
        ctx.log.info("dataset %s active%s (diffed against the %s)", version, _diff_text(diff),
                     diffed.replace("_", " "))
        return StageResult(status=SUCCESS, counts=counts,
                           extra=_result_extra(version, hash_, diff) | reject_extra
                           | {"backup_prefix": backup_prefix(version), "diffed_against": diffed,
                              "row_worker": loader.worker_stats},
                           message=f"{version} active" + _diff_text(diff))
    finally:
        conn.close()  # without a commit this rolls everything back


def _diff_text(diff: dict[str, dict[str, int]]) -> str:
    parts = [f"{e} +{d['inserted']} ~{d['updated']} -{d['deleted']}" for e, d in diff.items()]
    return ": " + ", ".join(parts)


# ------------------------------------------------------------------------------ restore


def restore_dataset(database: db.Database, backups: BackupStore, ctx: RunContext, version: str
                    ) -> StageResult:
    """Make ``version``'s S3 backup the active dataset again, as a new version (same hash).

    The backup is verified against its manifest and the ``datasets`` row (hash per set);
    a mismatch is a BackupError and nothing is written.
    """
    conn = _connect(database, ctx)
    try:
        with db.wrap_errors("reading the dataset version"):
            row = conn.execute(db.query("sync_odata", "get_dataset"),
                               {"version": version}).fetchone()
        if row is None:
            raise NothingToDo(f"no dataset version {version!r} (see `pipeline datasets list`)")
        prefix = row["backup_prefix"]
        manifest = backups.get_json(prefix + "manifest.json")
        if not isinstance(manifest, dict) or manifest.get("format") != BACKUP_FORMAT:
            raise BackupError(f"backup {prefix}manifest.json is not a {BACKUP_FORMAT} manifest")
        if manifest.get("hash") != row["hash"]:
            raise BackupError(f"backup {prefix} does not match {version}: hash differs")
        mappings = resolve_mapping(manifest.get("odata", {}).get("mapping"))
        with tempfile.TemporaryDirectory(prefix="pipeline-restore-") as tmp:
            workdir = Path(tmp)
            loader = _Loader(conn, workdir, ctx, mappings)
            for e in ENTITIES:
                info = manifest.get("files", {}).get(e)
                if not isinstance(info, dict) or "key" not in info:
                    raise BackupError(f"backup {prefix}manifest.json lists no file for {e}")
                local = workdir / f"{e}.download.tsv.gz"
                backups.get_file(prefix + info["key"], str(local))
                state = loader.sets[e]
                loader.spool(e, loader.backup_chunks(state, local))
                local.unlink()
            hash_, set_hashes = loader.hashes()
            if hash_ != row["hash"]:
                bad = [e for e in ENTITIES if set_hashes[e] != row["set_hashes"].get(e)]
                raise BackupError(f"backup {prefix} is corrupt: the data of "
                                  f"{', '.join(bad) or 'the dataset'} does not match its hash")
            loader.stage()
            problems = Problems()
            loader.check_keys(problems, reject=False)
            if problems.total:
                raise BackupError(f"backup {prefix} is inconsistent: {problems.summary()}")
            counts: dict[str, Any] = {e: s.digests.rows for e, s in loader.sets.items()}
            for state in loader.sets.values():
                state.has_raw = False  # the raw pages stay with the original version
            new_version, diff = write_version(
                conn, loader, backups, hash_=hash_, set_hashes=set_hashes,
                manifest={**manifest, "counts": counts, "run_id": ctx.run_id,
                          "source": "restore", "restored_from": version,
                          "raw_prefix": manifest.get("raw_prefix", prefix + "raw/")},
                source="restore", restored_from=version)
        return StageResult(status=SUCCESS, counts=counts,
                           extra=_result_extra(new_version, hash_, diff)
                           | {"restored_from": version,
                              "backup_prefix": backup_prefix(new_version)},
                           message=f"{new_version} active (restored from {version})"
                           + _diff_text(diff))
    finally:
        conn.close()


# ------------------------------------------------------------------------------ reading


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
    now = now or datetime.now(UTC)
    with db.wrap_errors("reading the dataset summary"):
        r = conn.execute(db.query("sync_odata", "dataset_summary")).fetchone()
    assert r is not None
    active = None
    if r["version"] is not None:
        active = {
            "version": r["version"], "hash": r["hash"], "counts": r["counts"],
            "diff": r["diff"], "source": r["source"],
            "created_at": r["created_at"].isoformat(),
            "age_s": round((now - r["created_at"]).total_seconds(), 1),
        }
    return {
        "active": active,
        "versions": int(r["versions"]),
        "newest_version": r["newest_version"],
        "last_backup_at": r["newest_created_at"].isoformat() if r["newest_created_at"] else None,
        "last_backup_age_s": (round((now - r["newest_created_at"]).total_seconds(), 1)
                              if r["newest_created_at"] else None),
    }
