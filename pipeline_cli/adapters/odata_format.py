"""OData without HTTP: the entity mapping and the shape of a page, for the client and for
settings and ``doctor``, which check a mapping without importing requests.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, SourceError
from ..read_model import COLUMNS, KINDS, OPTIONAL_COLUMNS

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
    fields: dict[str, str]  # read-model column -> OData field or path ("" = not provided)
    filter: str | None = None

    @property
    def key_field(self) -> str:
        return self.fields["id"]

    @property
    def select(self) -> list[str]:
        """The distinct properties read ($select), in a fixed order: a property may fill two
        columns, and a path reads inside its first segment's property."""
        return sorted({f.partition("/")[0] for f in self.fields.values() if f})

    @property
    def sources(self) -> list[str]:
        """The distinct mapped fields and paths as written, in a fixed order: what a row is
        read into, one text each (the same as ``select`` when no path is mapped)."""
        return sorted({f for f in self.fields.values() if f})

    def to_json(self) -> dict[str, Any]:
        return {"set": self.entity_set, "fields": dict(self.fields), "filter": self.filter}


# An OData name: a letter of any script or "_", then letters, digits or "_" (CSDL's
# SimpleIdentifier; 1C:Enterprise services name sets and fields in Cyrillic); "." for a
# qualified name.
_NAME_RE = re.compile(r"[^\W\d][\w.]*\Z")
# A field of the mapping: a name, or a path into complex values (OData's own syntax,
# Location/Loc/coordinates/1), whose later segments may be array indexes.
_FIELD_RE = re.compile(r"[^\W\d][\w.]*(/([^\W\d][\w.]*|0|[1-9][0-9]{0,8}))*")
# PostgreSQL reads a field by its name and cuts names at 63 bytes (NAMEDATALEN - 1).
_NAME_BYTES = 63


def resolve_mapping(raw: Mapping[str, Any] | None) -> dict[str, EntityMapping]:
    """The ``[odata.mapping]`` table merged over the defaults; ConfigError names a bad key.

    ``[odata.mapping.stops] set = "Ostanovki", filter = "...", fields = {id = "Ref_Key"}``
    renames the set, adds a ``$filter`` and renames fields; fields not given keep their
    default names; an optional field mapped to ``""`` is not read at all. A field other than
    the key may be a path into complex values: ``latitude = "Location/Loc/coordinates/1"``.
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
            path, _, name = str(entity_set).rstrip("/").rpartition("/")
            raise bad(f".{entity}", f"set must be an entity set name, got {entity_set!r}" + (
                f"; the path to it goes at the end of [odata] url (.../{path}/) and set = "
                f"\"{name}\"" if path and _NAME_RE.match(name) else ""))
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
            if not isinstance(name, str) or (name and not _FIELD_RE.fullmatch(name)):
                raise bad(f".{entity}.fields", f"{column} must be a field name or a path of "
                          f"names and array indexes (Location/City/Name), got {name!r}")
            if column == "id" and "/" in name:  # $orderby sorts by it, and keys are plain
                raise bad(f".{entity}.fields", f"id is the key: a property name, not a path, "
                          f"got {name!r}")
            if len(name.partition("/")[0].encode()) > _NAME_BYTES:
                raise bad(f".{entity}.fields", f"{column}: a field name longer than "
                          f"{_NAME_BYTES} bytes cannot be read, got {name!r}")
            if not name and column not in OPTIONAL_COLUMNS:
                raise bad(f".{entity}.fields", f"{column} is required and cannot be \"\"")
            fields[column] = name
        read: dict[str, str] = {}  # a name may be the key or a city too, not a second position
        for column, name in fields.items():
            if name and column != "id" and KINDS[entity][column][0] != "text":
                if name in read:
                    raise bad(f".{entity}.fields", f"{read[name]} and {column} both read "
                              f"{name!r}; each needs its own field")
                read[name] = column
        out[entity] = EntityMapping(entity, entity_set, fields, filter_)
    return out


def has_field(row: Mapping[str, Any], field: str) -> bool:
    """Whether an entity has a mapped field or path: not if an object on the way lacks a
    segment's name, or the path goes on past a value that is no object or array. A null on
    the way, or an array too short, is an entity without the value, not a wrong path."""
    value: Any = row
    for segment in field.split("/"):
        if value is None:
            return True
        if isinstance(value, list) and segment.isdigit():
            if int(segment) >= len(value):
                return True
            value = value[int(segment)]
        elif isinstance(value, dict) and segment in value:
            value = value[segment]
        else:
            return False
    return True


def close_name(field: str, names: Iterable[str]) -> str | None:
    """The name entities have that a mapped field (or a path's property) they lack comes
    closest to: the same in another case (``IsAirport`` for ``isAirport``; OData names are
    case-sensitive, and a server that resolves them in any case answers with its own), else a
    near spelling; with the rest of the path. None if the property is there."""
    top, slash, path = field.partition("/")
    names = sorted(names)
    if top in names:
        return None
    close = [n for n in names if n.lower() == top.lower()] or \
        difflib.get_close_matches(top, names, n=1)
    return close[0] + slash + path if close else None


# ------------------------------------------------------------------------------ pages


_NEXT_LINKS = ("@odata.nextLink", "odata.nextLink", "@nextLink")
_COUNTS = ("@odata.count", "odata.count", "@count")


def unwrap_page(doc: Any, version: str, what: str, counted: bool = True, url: str = ""
                ) -> tuple[list[dict[str, Any]], str | None, int | None]:
    """(rows, nextLink, count) of a collection page; SourceError for a wrong shape (naming
    ``url``, the page's). Unless ``counted`` (a count asked for), a count the server sends
    anyway is ignored."""
    if version == "v4":
        # OData 4.0 names them @odata.nextLink (odata.nextLink in its first JSON drafts);
        # 4.01 services may drop the prefix. Another spelling would end the feed at this
        # page and delete the rest of the read model: it is refused instead.
        rows = doc.get("value", ...)  # ...: not there at all
        link = next((doc[k] for k in _NEXT_LINKS if k in doc), None)
        count = next((doc[k] for k in _COUNTS if k in doc), None)
        odd = None if link is not None else next(  # a null link is the end, as in V2
            (k for k in doc if k.lower().endswith("nextlink") and k not in _NEXT_LINKS), None)
        if odd is not None:
            raise SourceError(f"OData {what}: a paging link named {odd!r} is not an OData "
                              "nextLink; refusing to read the set as this page alone")
    else:
        d = doc["d"]
        if isinstance(d, list):
            rows, link, count = d, None, None
        else:
            rows, link, count = d.get("results", ...), d.get("__next"), d.get("__count")
    if not isinstance(rows, list):  # JSON's names: null, not Python's NoneType
        where = "'value'" if version == "v4" else "'d.results'"
        got = {type(None): "null", bool: "a boolean", str: "a string", dict: "an object",
               type(...): f"no {where}"}.get(type(rows), "a number")
        raise SourceError(f"OData {what}: expected a list of entities in {where}, got {got}"
                          + (f" ({url[:300]})" if url else ""))
    if rows and not all(isinstance(r, dict) for r in rows):
        raise SourceError(f"OData {what}: an entity is not a JSON object")
    if link is not None and (not isinstance(link, str) or not link):
        raise SourceError(f"OData {what}: malformed nextLink {link!r}")
    total = None
    if count is not None and counted:  # a number, or a string of one (IEEE754Compatible, V2)
        try:
            total = float(count) if not isinstance(count, bool) else math.nan
        except (TypeError, ValueError):
            total = math.nan
        if not (total >= 0 and total.is_integer()):  # unread, the missing-rows check is off
            raise SourceError(f"OData {what}: malformed count {count!r} ([odata] count = false "
                              "stops asking for it)")
    return rows, link, None if total is None else int(total)
