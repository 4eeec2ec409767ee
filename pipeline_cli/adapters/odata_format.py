"""OData JSON formats without HTTP: the entity mapping, the shape of a page and value formats.

The OData client (:mod:`pipeline_cli.adapters.odata`) uses it to read pages, and the sync-odata
row worker to parse spooled pages in its own process, which therefore never imports requests.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, SourceError
from ..read_model import COLUMNS, OPTIONAL_COLUMNS

# ------------------------------------------------------------------------------ mapping

# Read-model table -> (default OData entity set, {read-model column: default OData field}).
# The read model owns its tables and columns (pipeline_cli/read_model.py); this maps the
# service's names onto them, in the read model's order. A mapped field of "" leaves an
# optional column out.
_DEFAULT_SETS = {"stops": "Stops", "routes": "Routes", "flights": "Flights"}
_DEFAULT_FIELDS = {
    "stops": {"id": "ID", "is_airport": "isAirport"},
    "routes": {"id": "ID", "from_stop_id": "fromStop_ID", "to_stop_id": "toStop_ID",
               "distance_km": "distanceKm"},
    "flights": {"id": "ID", "route_id": "route_ID", "days_of_week": "daysOfWeek"},
}
DEFAULT_MAPPING: dict[str, tuple[str, dict[str, str]]] = {
    table: (_DEFAULT_SETS[table], {c: _DEFAULT_FIELDS[table].get(c, c) for c in columns})
    for table, columns in COLUMNS.items()
}


@dataclass(frozen=True)
class EntityMapping:
    """How one read-model table is read from the service."""

    entity: str  # read-model table: stops, routes, flights
    entity_set: str  # OData entity set name
    fields: dict[str, str]  # read-model column -> OData field ("" = not provided)
    filter: str | None = None

    @property
    def key_field(self) -> str:
        return self.fields["id"]

    def to_json(self) -> dict[str, Any]:
        return {"set": self.entity_set, "fields": dict(self.fields), "filter": self.filter}


_NAME_RE = re.compile(r"^[A-Za-z_][\w.]*$")


def resolve_mapping(raw: Mapping[str, Any] | None) -> dict[str, EntityMapping]:
    """The ``[odata.mapping]`` table merged over the defaults; ConfigError names a bad key.

    ``[odata.mapping.stops] set = "Ostanovki", filter = "...", fields = {id = "Ref_Key"}``
    renames the set, adds a ``$filter`` and renames fields; fields not given keep their
    default names; an optional field mapped to ``""`` is not read at all.
    """
    raw = raw or {}

    def bad(where: str, why: str) -> ConfigError:
        return ConfigError(f"malformed setting [odata.mapping{where}]: {why}",
                           key=f"odata.mapping{where}")

    unknown = sorted(set(raw) - set(DEFAULT_MAPPING))
    if unknown:
        raise bad("", f"unknown entity {unknown[0]!r} (expected stops, routes or flights)")
    out: dict[str, EntityMapping] = {}
    for entity, (default_set, default_fields) in DEFAULT_MAPPING.items():
        table = raw.get(entity, {})
        if not isinstance(table, Mapping):
            raise bad(f".{entity}", "expected a table")
        extra = sorted(set(table) - {"set", "filter", "fields"})
        if extra:
            raise bad(f".{entity}", f"unknown key {extra[0]!r} (expected set, filter, fields)")
        entity_set = table.get("set", default_set)
        if not isinstance(entity_set, str) or not _NAME_RE.match(entity_set):
            raise bad(f".{entity}", f"set must be an entity set name, got {entity_set!r}")
        filter_ = table.get("filter")
        if filter_ is not None and (not isinstance(filter_, str) or not filter_.strip()):
            raise bad(f".{entity}", "filter must be a non-empty $filter expression")
        given = table.get("fields", {})
        if not isinstance(given, Mapping):
            raise bad(f".{entity}.fields", "expected a table of column = \"ODataField\"")
        fields = dict(default_fields)
        for column, name in given.items():
            if column not in default_fields:
                raise bad(f".{entity}.fields", f"unknown column {column!r} (expected one of "
                          f"{', '.join(default_fields)})")
            if not isinstance(name, str) or (name and not _NAME_RE.match(name)):
                raise bad(f".{entity}.fields", f"{column} must be a field name, got {name!r}")
            if not name and column not in OPTIONAL_COLUMNS:
                raise bad(f".{entity}.fields", f"{column} is required and cannot be \"\"")
            fields[column] = name
        out[entity] = EntityMapping(entity, entity_set, fields, filter_)
    return out


# ------------------------------------------------------------------------------ values

_V2_DATE_RE = re.compile(r"^/Date\((-?\d+)(?:([+-])(\d{4}))?\)/$")
_DURATION_RE = re.compile(r"^-?P(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)$")
_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?$")


def parse_number(value: Any) -> float:
    """A JSON number, or a number sent as a string (V2 Edm.Double/Decimal, IEEE754Compatible)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {json.dumps(value)}")
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(f"number {value} is too large") from None
    elif isinstance(value, str):
        try:
            number = float(value.strip().rstrip("dDmMfF") if value.strip() else "x")
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    else:
        raise ValueError(f"expected a number, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number + 0.0  # -0.0 -> 0.0, so equal values have one canonical form


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError(f"expected true or false, got {value!r}")


def parse_key(value: Any) -> str:
    """A key as text: integers (Edm.Int32/Int64, also sent as strings) and strings."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a string or integer key, got {json.dumps(value)}")
    text = str(value)
    if not text or "\x00" in text:
        raise ValueError("key is empty" if not text else "key contains a NUL character")
    return text


def parse_text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected text, got {type(value).__name__}")
    text = str(value)
    if "\x00" in text:
        raise ValueError("text contains a NUL character")
    return text


def parse_datetime(value: str) -> dt.datetime:
    """V2 ``/Date(ms)/`` or ``/Date(ms+0000)/`` (offset in minutes as HHMM), or ISO 8601."""
    m = _V2_DATE_RE.match(value)
    if m:
        moment = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=int(m[1]))
        if m[2]:
            offset = dt.timedelta(hours=int(m[3][:2]), minutes=int(m[3][2:]))
            return moment.astimezone(dt.timezone(offset if m[2] == "+" else -offset))
        return moment
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def parse_time(value: Any) -> str:
    """A time of day as ``HH:MM:SS``: ``HH:MM``, ``HH:MM:SS``, V2 ``PT08H30M00S``, V4
    ``Edm.TimeOfDay``, or a date-time (V2 ``/Date(ms)/``, ISO) whose local time is taken."""
    if not isinstance(value, str):
        raise ValueError(f"expected a time HH:MM, got {json.dumps(value)}")
    text = value.strip()
    hours = minutes = seconds = -1
    m = _TIME_RE.match(text)
    if m:
        hours, minutes, seconds = int(m[1]), int(m[2]), int(m[3] or 0)
    elif (d := _DURATION_RE.match(text)) and any(d.groups()) and not text.startswith("-"):
        hours, minutes = int(d[1] or 0), int(d[2] or 0)
        seconds = int(float(d[3] or 0))
    elif text.startswith("/Date(") or "T" in text:
        try:
            moment = parse_datetime(text)
        except ValueError:
            raise ValueError(f"expected a time HH:MM, got {value!r}") from None
        hours, minutes, seconds = moment.hour, moment.minute, moment.second
    if not (0 <= hours <= 23 and 0 <= minutes <= 59 and 0 <= seconds <= 59):
        raise ValueError(f"expected a time HH:MM, got {value!r}")
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}"



# ------------------------------------------------------------------------------ pages


def unwrap_page(doc: Any, version: str, what: str
                ) -> tuple[list[dict[str, Any]], str | None, int | None]:
    """(rows, nextLink, count) of a collection page; SourceError for a wrong shape."""
    if version == "v4":
        rows, link = doc.get("value"), doc.get("@odata.nextLink", doc.get("odata.nextLink"))
        count = doc.get("@odata.count", doc.get("odata.count"))
    else:
        d = doc["d"]
        if isinstance(d, list):
            rows, link, count = d, None, None
        else:
            rows, link, count = d.get("results"), d.get("__next"), d.get("__count")
    if not isinstance(rows, list):
        raise SourceError(f"OData {what}: expected a list of entities, got "
                          f"{type(rows).__name__}")
    if rows and not all(isinstance(r, dict) for r in rows):
        raise SourceError(f"OData {what}: an entity is not a JSON object")
    if link is not None and (not isinstance(link, str) or not link):
        raise SourceError(f"OData {what}: malformed nextLink {link!r}")
    try:
        total = int(count) if count is not None and not isinstance(count, bool) else None
    except (TypeError, ValueError):
        total = None
    return rows, link, total


def page_rows(body: bytes, version: str, what: str) -> list[dict[str, Any]]:
    """The entities of a page body received earlier (a spooled raw page), checked as
    :meth:`ODataClient.pages` checks them."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise SourceError(f"OData {what}: malformed JSON in a spooled page") from None
    return unwrap_page(doc, version, what)[0]
