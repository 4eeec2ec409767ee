"""ingest-gps: load GPS files (CSV, GPX, GeoJSON) into ``gps_points`` with COPY.

All files of one run load in one transaction. A CSV file goes to PostgreSQL as it is, one
COPY of its raw lines, and one SQL statement splits, checks and casts the fields; GPX and
GeoJSON are read in Python and their fields COPYed, as text, to the same checks. Invalid
rows are reported with file and line and skipped; with ``strict`` any invalid row, and
without it any unreadable file or any file without one valid row, rejects the run with
nothing loaded. The same device and time is stored once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from .. import db
from ..errors import ValidationError
from ..gps import files as gpsfiles
from ..gps import partitions
from ..runner import NOOP, SUCCESS, RunContext, StageResult
from ..settings import printable_path

INSERT_ATTEMPTS = 5  # each waits for a concurrent load to commit: more is a busy race
MAX_REPORTED = 100  # problems listed in the result; all of them are counted
COPY_BLOCK = 1 << 20
TITLE_LINES = 5  # lines of one cell skipped above a CSV header or first row, at most
_COPY_LINE = re.compile(r"line (\d+)")


def ingest_gps(
    database: db.Database,
    files: Sequence[str | Path],
    ctx: RunContext,
    *,
    fmt: str | None = None,
    device_id: str | None = None,
    strict: bool = False,
) -> StageResult:
    """Load ``files`` into gps_points; returns counts of rows read, loaded, duplicate, invalid.
    A file named twice (overlapping globs) is read once."""
    unique: dict[Path, str | Path] = {}
    for path in files:
        unique.setdefault(Path(path).resolve(), path)
    files = list(unique.values())
    # A file name that is not UTF-8 (Latin-1) is legitimate, but no message, JSON or database
    # text can hold it: it failed as "invalid input syntax for type json", nothing loaded.
    names = [printable_path(path) for path in files]
    kinds = []
    for path, name in zip(files, names, strict=True):  # an unknown format fails before
        try:                                             # the database is touched
            kinds.append(gpsfiles.detect_format(path, fmt))
        except gpsfiles.GpsFileError as exc:
            raise ValidationError(f"{name}: {exc}") from None
    # Until the commit, a stop signal ends the run at once: the transaction rolls back, and
    # the partitions are made in one transaction of their own (Ctrl-C waited for the load).
    with ctx.interruptible(), database.connect(name="pipeline ingest-gps") as conn, \
            db.wrap_errors("loading GPS files"), conn.transaction():
        conn.execute(db.query("match_gps", "ingest_staging"))
        for index, (path, kind) in enumerate(zip(files, kinds, strict=True)):
            ctx.check_stop()
            try:
                if kind == "csv":
                    _stage_csv(conn, path, index, device_id)
                else:
                    _stage_parsed(conn, path, kind, index, device_id)
            except gpsfiles.GpsFileError as exc:
                raise ValidationError(f"{names[index]}: {exc}; nothing loaded") from None
            conn.execute(db.query("match_gps", "ingest_check"),
                         {"source": f"file:{Path(names[index]).name}"[:200]})
            conn.execute(db.query("match_gps", "ingest_next_file"))
        found = conn.execute(db.query("match_gps", "ingest_problems"),
                             {"limit": MAX_REPORTED}).fetchall()
        problems = [gpsfiles.RowProblem(r["line"], r["problem"], r["place"] or "").describe(
            names[r["file"]]) for r in found]
        per_file: dict[str, dict[str, int]] = {n: {"read": 0, "invalid": 0} for n in names}
        for r in conn.execute(db.query("match_gps", "ingest_counts")):
            per_file[names[r["file"]]] = {"read": int(r["valid"]),
                                          "invalid": int(r["invalid"])}
        for name, stats in per_file.items():
            ctx.log.info("%s: %d valid, %d invalid rows", name, stats["read"],
                         stats["invalid"])
        valid = sum(s["read"] for s in per_file.values())
        invalid = sum(s["invalid"] for s in per_file.values())

        def rejected(message: str) -> ValidationError:
            return ValidationError(message, problems=problems, partial=StageResult(
                counts={"files": len(files), "rows_read": valid + invalid,
                        "invalid_rows": invalid,
                        "rows_loaded": 0},
                extra={"problems": problems}))

        for index, path in enumerate(names):
            stats = per_file[path]
            if stats["invalid"] and not stats["read"]:
                # Not one good row: the file is not what its format says (another layout,
                # another separator), not a file with a few bad rows to skip.
                first = next((p.removeprefix(f"{path}:") for r, p in
                              zip(found, problems, strict=True) if r["file"] == index), None)
                raise rejected(f"{path}: none of its {stats['invalid']} row(s) is valid"
                               + (f" (first: line {first})" if first else "")
                               + "; nothing loaded")
        if strict and invalid:
            raise rejected(
                f"{invalid} invalid row(s) (--strict): nothing loaded; first: {problems[0]}")
        ctx.check_stop()
        days = [r["day"] for r in conn.execute(db.query("match_gps", "ingest_days"))]
        # Committed at once on a connection of its own: attaching a partition locks the
        # default one, and held until this load commits, that lock made the listener wait.
        with database.connect(name="pipeline ingest-gps partitions") as own:
            partitions.ensure(own, days)
        loaded = _insert(conn)
        # A duplicate with other coordinates is a position dropped, not a repeat: named.
        clashes = conn.execute(db.query("match_gps", "ingest_conflicts"),
                               {"limit": MAX_REPORTED}).fetchall() if valid > loaded else []
    conflicts = [gpsfiles.RowProblem(r["line"], (
        f"device {r['device_id']!r} at {r['recorded_at'].isoformat()}: other coordinates "
        f"({r['latitude']:g}, {r['longitude']:g}) than the point kept "
        f"({r['kept_latitude']:g}, {r['kept_longitude']:g})"), r["place"] or "").describe(
        names[r["file"]]) for r in clashes]
    conflicting = int(clashes[0]["total"]) if clashes else 0
    if conflicting:
        ctx.log.warning("%d point(s) skipped with the device and time of a point kept but "
                        "other coordinates; first: %s", conflicting, conflicts[0])
    counts: dict[str, Any] = {
        "files": len(files), "rows_read": valid + invalid, "rows_loaded": loaded,
        "duplicates": valid - loaded, "conflicting_duplicates": conflicting,
        "invalid_rows": invalid,
    }
    message = f"{loaded} point(s) loaded, {valid - loaded} duplicate(s) skipped"
    if conflicting:
        message += f" ({conflicting} with other coordinates)"
    if invalid:
        message += f", {invalid} invalid row(s) skipped"
    extra: dict[str, Any] = {"files": per_file}
    if problems:
        extra["problems"] = problems
    if conflicts:
        extra["conflicts"] = conflicts
    return StageResult(status=SUCCESS if loaded else NOOP, counts=counts, extra=extra,
                       message=message)


def _insert(conn: psycopg.Connection[Any]) -> int:
    """Insert the valid rows; returns how many were new. A load committed meanwhile (another
    ingest-gps, the listener) of the same device and time: the rule that skips stored points
    cannot see its rows before it commits, so the primary key waits for it, then refuses the
    row; run again (a savepoint), the statement sees them and skips them as duplicates."""
    for attempt in Retrying(retry=retry_if_exception_type(psycopg.errors.UniqueViolation),
                            stop=stop_after_attempt(INSERT_ATTEMPTS), reraise=True):
        with attempt, conn.transaction():
            return conn.execute(db.query("match_gps", "ingest_insert")).rowcount
    raise AssertionError("unreachable: the last attempt returns or raises")


# Lines COPY would not take as one field: its end-of-data marker '\.' (the rest of the file
# was lost), and lines holding the delimiter or quote of ingest_copy_raw (control bytes, which
# refused the whole file). Quoted, each is a line like any other, reported as file:line.
_QUOTE_LINE = re.compile(rb"^(?:\\\.|.*[\x01\x02].*)$", re.MULTILINE)


def _quoted(line: re.Match[bytes]) -> bytes:
    return b"\x02" + line.group(0).replace(b"\x02", b"\x02\x02") + b"\x02"


def _stage_csv(conn: psycopg.Connection[Any], path: str | Path, index: int,
               device_id: str | None) -> None:
    """COPY the raw lines, and record the layout of the first line (``gpsfiles.csv_layout``),
    by which the checks split them (the view ``gps_ingest_fields``); ``device_id`` is the
    device of a file without a device column."""
    nul = False  # a NUL byte (a logger's power-loss padding) makes its line a bad row
    with gpsfiles.open_binary(path) as raw:
        try:
            handle = gpsfiles.utf8(raw)
            with conn.transaction(), conn.cursor() as cur, \
                    cur.copy(db.query("match_gps", "ingest_copy_raw")) as cp:
                block = handle.read(COPY_BLOCK)
                if block.startswith(b"\xef\xbb\xbf"):
                    block = block[3:]
                while block:
                    block += handle.readline(COPY_BLOCK)  # end at a line end, mostly
                    while block.endswith(b"\r"):  # keep a CRLF in one block
                        more = handle.read(1)
                        if not more:
                            break
                        block += more
                    # COPY wants one line-end style per file; files edited on two systems
                    # mix them. CRLF and a lone CR (old Mac, or a last line's) -> LF keeps
                    # every line number; a CR within a line is no text a quoted field may hold
                    # here anyway (a quoted field must not span lines).
                    block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                    if b"\x00" in block:  # no text holds one: U+FFFD, refused in SQL
                        block, nul = block.replace(b"\x00", "\ufffd".encode()), True
                    if b"\\." in block or b"\x01" in block or b"\x02" in block:
                        block = _QUOTE_LINE.sub(_quoted, block)
                    cp.write(block)
                    block = handle.read(COPY_BLOCK)
        except psycopg.errors.DataError as exc:
            where = _COPY_LINE.search(exc.diag.context or "")
            line = f"line {where.group(1)}: " if where else ""
            reason = exc.diag.message_primary or ""
            if isinstance(exc, psycopg.errors.CharacterNotInRepertoire):
                reason = "not UTF-8 text (save it as UTF-8; Excel: 'CSV UTF-8')"
            raise gpsfiles.GpsFileError(f"{line}{reason}") from None
        except gpsfiles.READ_ERRORS as exc:  # a damaged gzip file
            raise gpsfiles.GpsFileError(f"cannot read: {exc}") from None
        except UnicodeDecodeError:  # only UTF-16 is decoded here (gpsfiles.utf8)
            raise gpsfiles.GpsFileError(
                "not UTF-16 text, though it starts as UTF-16 does") from None
    # Above the header or first row: a spreadsheet's "sep=;" line, "#" comments, and a few
    # title lines of one cell (more: a file in another separator, refused as it was).
    hint, titles = 0, 0
    first: Any = None
    title: tuple[Any, int] | None = None  # the first title line, and the line above it
    for line in _first_lines(conn):
        if not gpsfiles.above_csv_header(line["raw"]):
            if not gpsfiles.title_line(line["raw"]):
                first = line
                break
            if title is not None and titles == TITLE_LINES:  # one cell a line on and on: rows
                first, hint = title
                break
            titles += 1
            title = title or (line, hint)
        hint = line["line"]
    else:
        if title is not None:  # nothing but lines of one cell: rows, each bad
            first, hint = title
    if first is None:
        return
    layout = gpsfiles.csv_layout(first["raw"], first["line"], device_id is not None)
    cols, sep = layout.columns, layout.delimiter
    device_col, date_col = cols.get("device_id"), cols.get("date")
    conn.execute(db.query("match_gps", "ingest_csv_layout"), {
        "file": index, "skip": max(layout.header_line, hint), "width": max(cols.values()) + 1,
        "delimiter": sep, "blank": f"^[\\s{sep}]*$", "decimal_comma": sep != ",",
        "device": device_id, "device_col": None if device_col is None else device_col + 1,
        "date_col": None if date_col is None else date_col + 1,
        "time_col": cols["recorded_at"] + 1, "lat_col": cols["latitude"] + 1,
        "lon_col": cols["longitude"] + 1, "nul": nul,
        **{f"{h}_col": None if cols.get(f"{field}_hemisphere") is None
           else cols[f"{field}_hemisphere"] + 1 for h, field in (("ns", "lat"), ("ew", "lon"))}})


def _first_lines(conn: psycopg.Connection[Any]) -> Iterator[Any]:
    """The staged CSV file's lines that hold more than blanks and separators, in order,
    asked for a few at a time (``ingest_first_lines`` reads every line each time)."""
    after = 0
    while rows := conn.execute(db.query("match_gps", "ingest_first_lines"),
                               {"after": after, "limit": TITLE_LINES + 3}).fetchall():
        yield from rows
        after = rows[-1]["line"]


def _stage_parsed(conn: psycopg.Connection[Any], path: str | Path, kind: str, index: int,
                  device_id: str | None) -> None:
    """COPY the fields of a GPX or GeoJSON file, as text, to the common checks."""
    with conn.cursor() as cur, cur.copy(db.query("match_gps", "ingest_copy_fields")) as cp:
        for item in gpsfiles.read(path, kind, device_id):
            if isinstance(item, gpsfiles.RowProblem):
                cp.write_row((index, item.line, item.where or None, None, None, None, None,
                              item.message))
            else:
                cp.write_row((index, item.line, item.where or None, item.device_id,
                              item.recorded_at, item.latitude, item.longitude, None))
