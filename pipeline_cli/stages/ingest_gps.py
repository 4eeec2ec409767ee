"""ingest-gps: load GPS files (CSV, GPX, GeoJSON) into ``gps_points`` with COPY.

All files of one run load in one transaction: rows stream through COPY into a temporary table
and move into ``gps_points`` with ``ON CONFLICT DO NOTHING`` (the same device and time is
stored once). Invalid rows are reported with file and line and skipped; with ``strict`` any
invalid row, and without it any unreadable file, rejects the run with nothing loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import db
from ..errors import ValidationError
from ..gps import files as gpsfiles
from ..runner import NOOP, SUCCESS, RunContext, StageResult

MAX_REPORTED = 100  # problems listed in the result; all of them are counted


def ingest_gps(
    database: db.Database,
    files: Sequence[str | Path],
    ctx: RunContext,
    *,
    fmt: str | None = None,
    device_id: str | None = None,
    strict: bool = False,
) -> StageResult:
    """Load ``files`` into gps_points; returns counts of rows read, loaded, duplicate, invalid."""
    problems: list[str] = []
    invalid = copied = 0
    per_file: dict[str, dict[str, int]] = {}
    for path in files:  # fail on an unknown format before touching the database
        try:
            gpsfiles.detect_format(path, fmt)
        except gpsfiles.GpsFileError as exc:
            raise ValidationError(f"{path}: {exc}") from None
    with database.connect(name="pipeline ingest-gps") as conn, \
            db.wrap_errors("loading GPS files"), conn.transaction():
        conn.execute(db.query("match_gps", "ingest_staging"))
        for path in files:
            ctx.check_stop()
            name = str(path)
            source = f"file:{Path(path).name}"[:200]
            stats = {"read": 0, "invalid": 0}
            with conn.cursor() as cur, cur.copy(db.query("match_gps", "ingest_copy")) as cp:
                try:
                    for item in gpsfiles.read(path, fmt, device_id):
                        if isinstance(item, gpsfiles.RowProblem):
                            stats["invalid"] += 1
                            if len(problems) < MAX_REPORTED:
                                problems.append(item.describe(name))
                            continue
                        copied += 1
                        stats["read"] += 1
                        cp.write_row((item.device_id, item.recorded_at, item.latitude,
                                      item.longitude, source, copied))
                except gpsfiles.GpsFileError as exc:
                    raise ValidationError(f"{name}: {exc}; nothing loaded") from None
            invalid += stats["invalid"]
            per_file[name] = stats
            ctx.log.info("%s: %d valid, %d invalid rows", name, stats["read"],
                         stats["invalid"])
        if strict and invalid:
            raise ValidationError(
                f"{invalid} invalid row(s) (--strict): nothing loaded; first: {problems[0]}",
                problems=problems, partial=StageResult(
                    counts={"files": len(files), "rows_read": copied, "invalid_rows": invalid,
                            "rows_loaded": 0},
                    extra={"problems": problems}))
        ctx.check_stop()
        loaded = conn.execute(db.query("match_gps", "ingest_insert")).rowcount
    counts: dict[str, Any] = {
        "files": len(files), "rows_read": copied + invalid, "rows_loaded": loaded,
        "duplicates": copied - loaded, "invalid_rows": invalid,
    }
    message = f"{loaded} point(s) loaded, {copied - loaded} duplicate(s) skipped"
    if invalid:
        message += f", {invalid} invalid row(s) skipped"
    extra: dict[str, Any] = {"files": per_file}
    if problems:
        extra["problems"] = problems
    return StageResult(status=SUCCESS if loaded else NOOP, counts=counts, extra=extra,
                       message=message)
