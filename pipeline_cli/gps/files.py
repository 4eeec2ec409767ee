"""Readers for GPS files that feed ``pipeline ingest-gps``: GPX and GeoJSON are parsed here;
CSV goes to PostgreSQL as raw lines and only its header is read here.

Each reader yields :class:`GpsRow`, a point's fields as text, and :class:`RowProblem` for what
is not a point at all (a track point without a time, a feature without coordinates), both with
the line they came from. The fields are checked by PostgreSQL, with the same checks as CSV
(``ingest_check``). A file that cannot be read at all raises :class:`GpsFileError`.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import json
import re
import xml.parsers.expat
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

FORMATS = ("csv", "gpx", "geojson")
# For messages about a file in another format (KML, NMEA, JSON Lines, FIT).
READ_FORMATS = ("ingest-gps reads CSV (.csv, .tsv, .txt), GPX (.gpx) and GeoJSON (.geojson, "
                ".json; .geojsonl, .geojsons: one Feature a line), each also gzipped (.gz)")
CSV_COLUMNS = ("device_id", "recorded_at", "latitude", "longitude")
_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".gpx": "gpx",
             ".geojson": "geojson", ".json": "geojson", ".geojsonl": "geojson",
             ".geojsons": "geojson"}


class GpsFileError(Exception):
    """The file cannot be read as the format at all (missing, not UTF-8, malformed XML/JSON)."""


@dataclass(frozen=True)
class GpsRow:
    """A point's fields as text, unchecked (see ``ingest_check`` in sql/queries)."""
    device_id: str | None
    recorded_at: str | None
    latitude: str | None
    longitude: str | None
    line: int
    where: str = ""  # extra position detail, e.g. "feature 3, coordinate 7"


@dataclass(frozen=True)
class RowProblem:
    line: int
    message: str
    where: str = ""  # extra position detail, e.g. "feature 3, coordinate 7"

    def describe(self, path: str) -> str:
        detail = f" ({self.where})" if self.where else ""
        return f"{path}:{self.line}{detail}: {self.message}"


Item = GpsRow | RowProblem


def detect_format(path: str | Path, fmt: str | None = None) -> str:
    """The format named by ``fmt``, else by the file's suffix (before a ``.gz``)."""
    if fmt:
        if fmt not in FORMATS:
            raise GpsFileError(f"unknown format {fmt!r} (expected {', '.join(FORMATS)})")
        return fmt
    name = Path(path).name.lower()
    suffix = Path(name.removesuffix(".gz")).suffix
    try:
        return _SUFFIXES[suffix]
    except KeyError:
        raise GpsFileError(
            f"cannot tell the format from the name {Path(path).name!r}: {READ_FORMATS}; "
            "--format names the format of such a file under another name") from None


_GZIP_MAGIC = b"\x1f\x8b"
# What reading a damaged gzip file raises.
READ_ERRORS = (OSError, EOFError, zlib.error)


@contextlib.contextmanager
def open_binary(path: str | Path) -> Iterator[io.BufferedIOBase]:
    """The file for reading, decompressed as it is read if it is gzip (told by its first
    bytes, whatever its name). Opened once: a pipe (``<(zcat ...)``, /dev/stdin) cannot be
    read twice."""
    try:
        raw = open(path, "rb")  # noqa: SIM115
        gzipped = raw.peek(2)[:2] == _GZIP_MAGIC
    except OSError as exc:
        raise GpsFileError(f"cannot read: {exc.strerror}") from None
    with raw:
        if not gzipped:
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            yield unzipped


_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_UTF16_BARE = "UTF-16 text without a byte-order mark: save it as UTF-8 (or UTF-16 with the mark)"


def _utf16(start: bytes) -> bool:
    """Whether a file starting with ``start`` (its first two bytes) is UTF-16 with a
    byte-order mark. Without the mark, every other byte of ASCII text is NUL: refused by name
    rather than read as one bad row a line."""
    if start in _UTF16_BOMS:
        return True
    if len(start) == 2 and (start[0] == 0) != (start[1] == 0):
        raise GpsFileError(_UTF16_BARE)
    return False


def utf8(handle: io.BufferedIOBase) -> io.BufferedIOBase | codecs.StreamRecoder:
    """``handle`` as UTF-8: UTF-16 with a byte-order mark (Excel's "Unicode text",
    PowerShell) is re-encoded as it is read."""
    start = handle.peek(2)[:2]  # type: ignore[attr-defined]  # buffered and gzip files peek
    return codecs.EncodedFile(handle, "utf-8", "utf-16") if _utf16(start) else handle


def _decode(data: bytes) -> str:
    """A GeoJSON file's text: UTF-8 (a BOM aside), or UTF-16 with a byte-order mark."""
    utf16 = _utf16(data[:2])
    try:
        return data.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError:
        raise GpsFileError("not UTF-16 text, though it starts as UTF-16 does" if utf16
                           else "not UTF-8 text (save it as UTF-8)") from None


def _read_all(path: str | Path) -> bytes:
    with open_binary(path) as handle:
        try:
            return handle.read()
        except READ_ERRORS as exc:
            raise GpsFileError(f"cannot read: {exc}") from None


def read(path: str | Path, fmt: str | None = None, device_id: str | None = None
         ) -> Iterator[Item]:
    """Yield the points of a GPX or GeoJSON file, in file order; ``device_id`` fills in ids.
    CSV files are split and checked by PostgreSQL itself (stages/ingest_gps.py)."""
    kind = detect_format(path, fmt)
    if kind == "csv":
        raise GpsFileError("CSV files are read by PostgreSQL (ingest-gps), not here")
    if kind == "gpx":
        return read_gpx(path, device_id)
    return read_geojson(path, device_id)


# ---------------------------------------------------------------- fields


def _text(value: Any) -> str | None:
    """A field as the text the checks in SQL read: JSON numbers as Python writes them,
    anything else that is not a string as JSON (refused there as not a number or time)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value)


_NO_DEVICE = "no device id: read from a pipe, the file has no name to take it from (--device)"


def file_device(path: str | Path) -> str | None:
    """The device a file's name gives (``bus-12.2024-01-06.gpx`` is ``bus-12``); None for a
    pipe (``<(zcat ...)`` is /dev/fd/63, /dev/stdin), whose name is no device."""
    return Path(path).name.split(".")[0] if Path(path).is_file() else None


def text_point(device: Any, when: Any, lat: Any, lon: Any, line: int, where: str = "") -> Item:
    """The fields of one point as text; PostgreSQL checks them (the same checks as CSV). A
    device id is text or a whole number (12.0 is the listener's "12")."""
    if isinstance(device, float) and device.is_integer():
        device = int(device)
    if isinstance(device, (bool, float, dict, list)):
        return RowProblem(line, f"device_id {json.dumps(device)[:40]} is not text or a whole "
                          "number", where)
    fields = (_text(device), _text(when), _text(lat), _text(lon))
    for name, value in zip(CSV_COLUMNS, fields, strict=True):
        if value is not None and "\x00" in value:  # PostgreSQL text cannot hold it
            return RowProblem(line, f"{name} contains a NUL character", where)
    return GpsRow(*fields, line=line, where=where)


# ---------------------------------------------------------------- CSV

# Tiers, most specific first: a header naming the time twice ("time" local beside
# "time_utc", a portal's "timestamp" of receipt beside "gps_time") takes the UTC or fix
# time. Within a tier the first column wins ("time" ISO before an app's "timestamp" in ms).
_ALIASES = {
    "device_id": (("device_id", "device", "deviceid", "vehicle", "vehicle_id", "vehicleid",
                   "unit_id", "imei"),
                  ("device_name", "devicename")),  # beside an id, the id
    "recorded_at": (("recorded_at",),
                    ("time_utc", "timestamp_utc", "gps_time", "fixtime", "fix_time",  # Traccar
                     "utc", "utc_time", "datetime_utc", "date_time_utc"),
                    ("time", "timestamp", "datetime", "date_time")),
    "latitude": (("latitude", "lat"),),
    "longitude": (("longitude", "lon", "lng", "long"),),
    # GPSBabel's unicsv, i-gotU and Qstarz loggers: the date in a column of its own, beside a
    # time of day (the SQL joins them; see gps_ingest_fields)
    "date": (("date", "utc_date", "date_utc", "gps_date"),),
    # Qstarz's QTravel, NMEA-like logs, exiftool: unsigned coordinates, the hemisphere beside
    # them (N/S, E/W); ignored, a point west or south was stored east or north. No shorter
    # names: "ns" (nanoseconds?) or "lat_ref" (a reference position?) made a file's every row
    # a bad one.
    "lat_hemisphere": (("n_s", "lat_hemisphere", "latitude_hemisphere", "lat_dir",
                        "gpslatituderef"),),
    "lon_hemisphere": (("e_w", "lon_hemisphere", "longitude_hemisphere", "lon_dir",
                        "gpslongituderef"),),
}
_FIELD_OF = {alias: field for field, tiers in _ALIASES.items() for tier in tiers
             for alias in tier}
# A unit in parentheses or brackets after a header's name ("Latitude (deg)", "lat [°]"):
# those below read as the plain name; any other (radians, a local time, milliseconds, a
# southern or western hemisphere) makes the column no field's, named if the field is missing.
# A device's "unit" is the kind of id (IMEI, serial): any.
_UNIT = re.compile(r"(.*?[^\s(\[])\s*[(\[]([^()\[\]]*)[)\]]")
_DEGREES = {"", "°", "º", "deg", "degs", "degree", "degrees", "decimaldegree", "decimaldegrees",
            "dd", "decimal", "dec", "decdeg", "wgs84", "°wgs84", "degwgs84", "ddwgs84",
            "epsg4326"}
_UTC_UNITS = {"utc", "gmt", "z", "zulu", "utc+0", "utc+00", "utc+0000", "utc+00:00", "utc±0",
              "gmt+0", "gmt+00:00"}
_NEUTRAL_UNITS = {
    "latitude": _DEGREES | {d + h for d in ("°", "º", "deg", "degree", "degrees")
                            for h in ("n", "north", "_north")},
    "longitude": _DEGREES | {d + h for d in ("°", "º", "deg", "degree", "degrees")
                             for h in ("e", "east", "_east")},
    # ISO-8601 times carry their offset (none is UTC); epoch seconds are UTC by definition
    "recorded_at": _UTC_UNITS | {"iso", "iso8601", "iso_8601", "unix", "epoch", "posix"},
    "date": _UTC_UNITS | {"iso", "iso8601", "iso_8601"},
}
# A time's unit written into its name (an app's "timestamp_ms", Google's "timestampMs").
_TIME_UNIT_SUFFIX = re.compile(r"(.+?)[\s_-]?(ms|msec|millis|milliseconds|us|usec|micros|ns|"
                               r"nanos)", re.IGNORECASE)
# What each field's values are read as, for the message refusing another unit.
_UNIT_READ = {"latitude": "decimal degrees, north positive",
              "longitude": "decimal degrees, east positive",
              "recorded_at": "UTC, an ISO-8601 offset or epoch seconds",
              "date": "UTC"}


def _unit_key(unit: str) -> str:
    """A unit as compared: no case, spaces, dots or commas (``Decimal Degrees``, ``deg.``,
    ``deg, WGS84``)."""
    return re.sub(r"[\s.,]+", "", unit.lower())


CSV_DELIMITERS = (",", ";", "\t")  # a comma first: it wins every tie
# $GPRMC, $GNGGA, $PGRMZ (talker and sentence), ending in the checksum: no device's name
_NMEA = re.compile(r"(\$[A-Z]{5}),.*\*[0-9A-Fa-f]{2}")
# phyphox's "Time (s)", an app's "elapsed_s": a time that counts from the recording's start.
_ELAPSED = re.compile(r"(time|t|elapsed|elapsed_time)_(s|sec|secs|seconds)|elapsed(_s)?")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _cells(line: str, delimiter: str) -> list[str]:
    """``line`` split at ``delimiter`` as CSV. The csv module refuses a field above its limit
    (128 KiB): a first line with a long note failed the run as an internal error. The line is
    in memory already, so the limit protects nothing here."""
    if len(line) > csv.field_size_limit():
        csv.field_size_limit(len(line))
    return next(csv.reader([line], delimiter=delimiter), [])


@dataclass(frozen=True)
class CsvLayout:
    delimiter: str
    columns: dict[str, int]  # field -> column, from 0; no device_id: the file has none; a
    # "date": the date of a time column that holds a time of day; "lat_hemisphere",
    # "lon_hemisphere": the N/S, E/W of unsigned coordinates
    header_line: int  # 0: no header


def csv_layout(first: str, line: int, device_given: bool = False) -> CsvLayout:
    """How a CSV file is laid out, from its first non-blank line (``first``, at ``line``).

    A header (a cell naming a field, case, spaces and punctuation aside) is split by the
    delimiter under which most of its cells name one, and must name every field; the device
    may be missing when ``device_given`` (--device). Otherwise the line is data in the order
    of CSV_COLUMNS, split by the delimiter it holds most of."""
    nmea = _NMEA.fullmatch(first.strip())
    if nmea:  # read as data, every row was a device "$GPRMC" at a time before 1980
        raise GpsFileError(f"line {line}: NMEA sentences ({nmea.group(1)}), not CSV; "
                           f"{READ_FORMATS}")
    # A GPX file saved as .txt, a GeoJSON file given --format csv: read as data, every line
    # was a row of one field.
    other = "XML" if re.match(r"<[?!A-Za-z]", first.strip()) else "JSON" if re.match(
        r"\{\s*$|\{\s*\"|\[\s*$|\[\s*[{\[]", first.strip()) else None
    if other:
        raise GpsFileError(f"line {line}: {other}, not CSV; {READ_FORMATS}")
    named = {d: _named(first, d) for d in CSV_DELIMITERS}
    delimiter = max(CSV_DELIMITERS, key=lambda d: len(named[d]))
    columns = named[delimiter]
    if sum(bool(_NUMBER.fullmatch(c.strip().replace(",", ".")))
           for c in _cells(first, delimiter)) >= 2:
        columns = {}  # numbers: a row whose device is named like a column ("lat", "long")
    if not columns:
        delimiter = max(CSV_DELIMITERS, key=first.count)
        cells = _cells(first, delimiter)
        if len(cells) > 1 and not any(_NUMBER.fullmatch(c.strip().replace(",", "."))
                                      for c in cells):
            # Cells, not one of them a number: a header in names this reader does not know
            # ("Breite"), which read as data would put the columns in the default order and
            # could swap latitude and longitude in silence.
            raise GpsFileError(f"line {line}: neither a header naming the columns nor a row of "
                               f"data: {first.strip()[:80]!r} (header names: device_id, "
                               "recorded_at, latitude, longitude, or their aliases)")
        return CsvLayout(delimiter, {c: i for i, c in enumerate(CSV_COLUMNS)}, 0)
    missing = [c for c in CSV_COLUMNS
               if c not in columns and not (c == "device_id" and device_given)]
    if missing:
        hint = " (--device names the device of a file without one)" \
            if "device_id" in missing else ""
        elapsed = next((c.strip() for c in _cells(first, delimiter)
                        if _ELAPSED.fullmatch(_header_name(c))), None)
        if "recorded_at" in missing and elapsed:
            hint += (f" ({elapsed!r} counts seconds from the start of the recording, not a "
                     "date and time)")
        units = []
        for cell in _cells(first, delimiter):
            refused = _refused_unit(cell)
            if refused and refused[0] in missing and not (elapsed and refused[0] ==
                                                           "recorded_at"):
                units.append(f"{cell.strip()!r}: unit {refused[1]!r} is not one ingest-gps "
                             f"reads for {refused[0]}: {_UNIT_READ[refused[0]]}")
        if units:
            hint += f" ({'; '.join(units)})"
        raise GpsFileError(f"line {line}: header lacks column(s) {', '.join(missing)}{hint}")
    return CsvLayout(delimiter, columns, line)


def above_csv_header(line: str) -> bool:
    """A spreadsheet's ``sep=;`` line, or a ``#`` comment (an exporter's "# exported by
    MyTracker 2.1", "# Time (UTC)"), that is not itself a header naming at least the time and
    coordinate columns (``#device,time,lat,lon``):
    skipped above the header or first row. Read as the first row, a comment put the file in
    the default column order, which could swap latitude and longitude."""
    if re.fullmatch(r"sep=.", line.strip(" \r\n")):
        return True
    return line.lstrip().startswith("#") and not any(
        {"recorded_at", "latitude", "longitude"} <= _named(line, d).keys()
        for d in CSV_DELIMITERS)


def title_line(line: str) -> bool:
    """A line of one cell (an exporter's title, "GPS export 2024"), which is neither a header
    nor a row: every row has at least a time and two coordinates. Read as the first row, it
    put the file in the default column order, which could swap latitude and longitude. A line
    with an odd number of quotes is a row's quoted field going on past the line end: a bad row,
    reported, not a title."""
    return line.count('"') % 2 == 0 and all(
        len(_cells(line, d)) <= 1 for d in CSV_DELIMITERS)


def _plain_name(cell: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", cell.strip().lower()).strip("_")


def _header_name(cell: str) -> str:
    """A column's name as compared: no case, spaces or punctuation (``Device ID``); a unit
    that keeps the field's meaning is dropped (``Latitude (deg)`` is ``latitude``), and UTC
    ranks a time as ``time_utc`` does (``Time (GMT)``). Another unit stays in the name
    (``latitude_rad``), which names no field: see :func:`_refused_unit`."""
    plain = _plain_name(cell)
    unit = _UNIT.fullmatch(cell.strip())
    if unit and plain not in _FIELD_OF:  # "Device (name)" is device_name, of its own rank
        base = _plain_name(unit.group(1))
        field, key = _FIELD_OF.get(base), _unit_key(unit.group(2))
        if field == "device_id" or field is not None and key in _NEUTRAL_UNITS[field]:
            utc = f"{base}_utc"
            return utc if key in _UTC_UNITS and _FIELD_OF.get(utc) == field else base
    return plain


def _refused_unit(cell: str) -> tuple[str, str] | None:
    """The field a header cell names with a unit that changes its meaning (``Latitude
    (rad)``, ``Time (local)``), and the unit; None for any other cell."""
    unit = _UNIT.fullmatch(cell.strip())
    if not unit:
        unit = _TIME_UNIT_SUFFIX.fullmatch(cell.strip())
        if not unit or _FIELD_OF.get(_plain_name(unit.group(1))) != "recorded_at":
            return None
    field = _FIELD_OF.get(_plain_name(unit.group(1)))
    if field is None or _header_name(cell) in _FIELD_OF:
        return None
    return field, unit.group(2).strip()


def _named(line: str, delimiter: str) -> dict[str, int]:
    """The column of each field that a cell of ``line``, split at ``delimiter``, names."""
    cells = _cells(line, delimiter)
    names = [_header_name(c) for c in cells]
    found: dict[str, int] = {}
    for column, tiers in _ALIASES.items():
        for tier in tiers:
            hit = next((i for i, name in enumerate(names) if name in tier), None)
            if hit is not None:
                found[column] = hit
                break
    return found


# ---------------------------------------------------------------- GPX


# Why a point without a time is no point of a trace: a track's has lost its time; a
# waypoint and a route point never had one, being a place marked or planned.
_UNTIMED = {"wpt": ": a marked place, not a recorded position",
            "rtept": ": a planned route's point, not a recorded position"}


def read_gpx(path: str | Path, device_id: str | None = None) -> Iterator[Item]:
    """Track, route and way points with a ``<time>``; the device is ``device_id``, else the
    ``<trk><name>``, else the file name up to its first dot."""
    data = _read_all(path)
    if not data.removeprefix(b"\xef\xbb\xbf").strip():
        return  # an empty file (an exporter's quiet hour), as an empty CSV file: no points
    # Blank lines before the XML declaration (a web export's stray line break) are no XML
    # error worth refusing a file for; lines are still counted from the file's first.
    lead = re.match(rb"(\xef\xbb\xbf)?[ \t\r\n]+(?=<\?xml[ \t\r\n])", data)
    skipped = 0
    if lead:
        skipped = len(re.findall(rb"\r\n|\r|\n", lead.group(0)))
        data = data[lead.end():]
    parser = xml.parsers.expat.ParserCreate()
    items: list[Item] = []
    state: dict[str, Any] = {"text": [], "point": None, "trk_name": None}
    stack: list[str] = []
    # Where a point is, for the problems of a file that puts several on one line.
    counts = {"trk": 0, "trkseg": 0, "trkpt": 0, "rte": 0, "rtept": 0, "wpt": 0}
    default_device = file_device(path)

    def local(tag: str) -> str:
        return tag.rsplit(":", 1)[-1]

    def start(tag: str, attrs: dict[str, str]) -> None:
        name = local(tag)
        if not stack and name != "gpx":  # KML or other XML: it read as a GPX without points
            raise GpsFileError(f"line {parser.CurrentLineNumber + skipped}: not GPX: its root "
                               f"element is <{name}>; {READ_FORMATS}")
        stack.append(name)
        state["text"] = []
        if name in counts:
            counts[name] += 1
        if name == "trk":
            state["trk_name"] = None
            counts["trkseg"] = 0
        elif name == "trkseg":
            counts["trkpt"] = 0
        elif name == "rte":
            counts["rtept"] = 0
        if name in ("trkpt", "rtept", "wpt"):
            where = {"trkpt": f"track {counts['trk']}, segment {counts['trkseg']}, point "
                              f"{counts['trkpt']}",
                     "rtept": f"route {counts['rte']}, point {counts['rtept']}",
                     "wpt": f"waypoint {counts['wpt']}"}[name]
            state["point"] = {"lat": attrs.get("lat"), "lon": attrs.get("lon"), "time": None,
                              "line": parser.CurrentLineNumber + skipped, "where": where}

    def end(tag: str) -> None:
        name = local(tag)
        stack.pop()
        text = "".join(state["text"]).strip()
        point = state["point"]
        if name == "time" and point is not None and stack and stack[-1] in (
                "trkpt", "rtept", "wpt"):  # the point's own, not an extension's <e:time>
            point["time"] = text
        elif name == "name" and stack and stack[-1] == "trk":
            state["trk_name"] = text or None
        elif name in ("trkpt", "rtept", "wpt") and point is not None:
            device = device_id or (state["trk_name"] if name == "trkpt" else None) \
                or default_device
            if point["time"] is None:
                items.append(RowProblem(point["line"], f"<{name}> has no <time>"
                                        + _UNTIMED.get(name, ""), point["where"]))
            elif device is None:
                items.append(RowProblem(point["line"], _NO_DEVICE, point["where"]))
            else:
                items.append(text_point(device, point["time"], point["lat"], point["lon"],
                                        point["line"], point["where"]))
            state["point"] = None
        state["text"] = []

    def chars(data: str) -> None:
        state["text"].append(data)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as exc:
        reason = f"malformed GPX: {xml.parsers.expat.ErrorString(exc.code)}"
        if _not_utf8(data, exc.code):
            reason = ("not UTF-8 text (save it as UTF-8, or name its encoding in the XML "
                      'declaration: encoding="windows-1252")')
        raise GpsFileError(f"line {exc.lineno + skipped}: {reason}") from None
    # A point's line says where it is, unless the file puts several on one line (a GPX
    # written without line breaks named line 1 for each of them): those also name the point.
    per_line = Counter(item.line for item in items)
    for item in items:
        yield item if per_line[item.line] > 1 else replace(item, where="")


def _not_utf8(data: bytes, code: int) -> bool:
    """Whether expat's ``code`` on ``data`` is text in another encoding than the UTF-8 XML
    assumes when none is declared (a Windows tool's windows-1252): an "invalid token" to it,
    which read as a broken tag."""
    errors = xml.parsers.expat.errors
    if code != errors.codes[errors.XML_ERROR_INVALID_TOKEN] or data[:2] in _UTF16_BOMS:
        return False
    declared = re.match(rb"\s*<\?xml[^>]*encoding\s*=\s*[\"']([^\"']*)", data)
    if declared and declared.group(1).lower().replace(b"-", b"") != b"utf8":
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# ---------------------------------------------------------------- GeoJSON

_WS = re.compile(r"\s*")


def _feature_lines(text: str, array: str = "features") -> list[int]:
    """Line numbers of each element of the top-level ``array`` (best effort)."""
    decoder = json.JSONDecoder()
    lines: list[int] = []
    counted_to, line = 0, 1

    def line_at(pos: int) -> int:
        nonlocal counted_to, line
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        return line

    try:
        i = _WS.match(text, 0).end()  # type: ignore[union-attr]
        if text[i] != "{":
            return []
        i += 1
        while True:
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i] == "}":
                return []
            key, i = decoder.raw_decode(text, i)
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]  # skip ':'
            if key == array and text[i] == "[":
                i += 1
                while True:
                    i = _WS.match(text, i).end()  # type: ignore[union-attr]
                    if text[i] == "]":
                        return lines
                    lines.append(line_at(i))
                    _, i = decoder.raw_decode(text, i)
                    i = _WS.match(text, i).end()  # type: ignore[union-attr]
                    if text[i] == ",":
                        i += 1
            _, i = decoder.raw_decode(text, i)
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i] == ",":
                i += 1
    except (IndexError, ValueError):
        return lines


def _times(props: dict[str, Any]) -> Any:
    for key in ("times", "coordTimes", "timestamps"):
        if key in props:
            return props[key]
    coord_props = props.get("coordinateProperties")
    if isinstance(coord_props, dict):
        for key in ("times", "coordTimes"):
            if key in coord_props:
                return coord_props[key]
    return None


def _property(props: dict[str, Any], field: str, blank: bool = True) -> Any:
    """The value of the property naming ``field`` as a CSV header's cell would (Traccar's
    ``deviceId`` and ``fixTime``, ``Device ID``): of the best-ranked alias, then in the order
    the aliases are listed. With ``blank`` false, a null or blank value names nothing."""
    named: dict[str, Any] = {}
    for key, value in props.items():
        if blank or not (value is None or isinstance(value, str) and not value.strip()):
            named.setdefault(_header_name(str(key)), value)
    for tier in _ALIASES[field]:
        for alias in tier:
            if alias in named:
                return named[alias]
    return None


def read_geojson(path: str | Path, device_id: str | None = None) -> Iterator[Item]:
    """Point features with a time property, and LineStrings with a ``times`` array, of a
    FeatureCollection, one Feature, Features one a line, or Overland's ``{"locations": [...]}``.

    The device is the feature's property naming it (as a CSV header would: ``device_id``,
    ``device``, ``deviceId``, ...), else ``device_id``, else the file name up to its first dot.
    """
    text = _decode(_read_all(path))
    if not text.strip():
        return  # an empty file (an exporter's quiet hour), as an empty CSV file: no points
    sequence: tuple[Any, list[int]] | None = None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" or text.lstrip(" \t\r\n").startswith("\x1e"):
            sequence = _sequence(text)
        if sequence is None and exc.msg == "Extra data":  # one object a line, as OwnTracks
            raise GpsFileError(f"line {exc.lineno}: a second JSON value after the first (JSON "
                               f"Lines?): not GeoJSON; {READ_FORMATS}") from None
        if sequence is None:
            raise GpsFileError(f"line {exc.lineno}: malformed JSON: {exc.msg}") from None
    except RecursionError:  # was "internal error", naming no file
        raise GpsFileError("JSON nested too deeply to read") from None
    if sequence is not None:
        features, lines = sequence
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise GpsFileError("line 1: FeatureCollection without a features array")
        lines = _feature_lines(text)
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features, lines = [doc], [1]
    elif isinstance(doc, dict) and "type" not in doc and isinstance(doc.get("locations"), list):
        # Overland's batches: {"locations": [Feature, ...]}, GeoJSON under another key. Google
        # Takeout's location history has that key too, of objects of its own (latitudeE7).
        features, lines = doc["locations"], _feature_lines(text, "locations")
        if features and not any(isinstance(f, dict) and f.get("type") == "Feature"
                                for f in features):
            google = " (Google's location history?)" if isinstance(features[0], dict) and \
                "latitudeE7" in features[0] else ""
            raise GpsFileError("line 1: expected a GeoJSON FeatureCollection or Feature, found "
                               f"an object whose locations are not GeoJSON Features{google}; "
                               f"{READ_FORMATS}")
    else:
        raise GpsFileError("line 1: expected a GeoJSON FeatureCollection or Feature, found "
                           f"{_found(doc)}; {READ_FORMATS}")
    default_device = device_id or file_device(path)
    for n, feature in enumerate(features, start=1):
        line = lines[n - 1] if n - 1 < len(lines) else 1
        yield from _feature_items(feature, n, line, default_device)


def _sequence(text: str) -> tuple[list[Any], list[int]] | None:
    """The Features of GeoJSON one a line, each perhaps after an RS (RFC 8142's text
    sequences, ogr2ogr's GeoJSONSeq), with their lines; None if a line is no Feature."""
    features, lines = [], []
    for line, raw in enumerate(text.split("\n"), start=1):
        if raw.strip():  # str.strip takes the RS (U+001E) too
            try:
                doc = json.loads(raw.strip())
            except (ValueError, RecursionError):
                return None
            if not (isinstance(doc, dict) and doc.get("type") == "Feature"):
                return None
            features.append(doc)
            lines.append(line)
    return features, lines


def _found(doc: Any) -> str:
    """What a JSON document that is no GeoJSON is, for the message refusing it."""
    if isinstance(doc, dict):
        for key in ("type", "_type"):  # OwnTracks names its type "_type"
            if isinstance(doc.get(key), str):
                return f"an object of {key} {doc[key][:40]!r}"
        return "an object without a type"
    if isinstance(doc, list):
        return "an array"
    return "a string" if isinstance(doc, str) else f"the value {json.dumps(doc)}"  # 3, null


def _feature_items(feature: Any, n: int, line: int, default_device: str | None
                   ) -> Iterator[Item]:
    where = f"feature {n}"
    if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
        yield RowProblem(line, "not a Feature with a geometry", where)
        return
    props = feature.get("properties") or {}
    if not isinstance(props, dict):
        props = {}
    # A null or blank property is no device (Overland's device_id is "" until one is set):
    # --device or the file's name is used.
    device = _property(props, "device_id", blank=False)
    if device is None:
        device = default_device
    if device is None:
        yield RowProblem(line, _NO_DEVICE, where)
        return
    geometry = feature["geometry"]
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    if kind == "Point":
        if not isinstance(coords, list) or len(coords) < 2:
            yield RowProblem(line, "Point without [lon, lat] coordinates", where)
            return
        when = _property(props, "recorded_at")
        if when is None:
            yield RowProblem(line, "Point has no time property", where)
            return
        yield text_point(device, when, coords[1], coords[0], line, where)
    elif kind == "LineString":
        yield from _line(device, coords, _times(props), line, where)
    elif kind == "MultiLineString":  # a track of several segments, e.g. from togeojson
        times = _times(props)
        if not isinstance(coords, list) or not isinstance(times, list) \
                or len(times) != len(coords):
            yield RowProblem(line, "MultiLineString needs coordinates and a times array per "
                             "segment", where)
            return
        for j, (part, part_times) in enumerate(zip(coords, times, strict=True), start=1):
            yield from _line(device, part, part_times, line, f"{where}, segment {j}")
    else:
        yield RowProblem(line, f"unsupported geometry type {kind!r} (Point, LineString or "
                         "MultiLineString)", where)


def _line(device: Any, coords: Any, times: Any, line: int, where: str) -> Iterator[Item]:
    """The points of one line: its coordinates with the times of the same index."""
    if not isinstance(coords, list) or not isinstance(times, list):
        yield RowProblem(line, "LineString needs coordinates and a times array", where)
        return
    if len(times) != len(coords):
        yield RowProblem(
            line, f"LineString has {len(coords)} coordinates but {len(times)} times", where)
        return
    for i, (pos, when) in enumerate(zip(coords, times, strict=True), start=1):
        at = f"{where}, coordinate {i}"
        if not isinstance(pos, list) or len(pos) < 2:
            yield RowProblem(line, "coordinate is not [lon, lat]", at)
            continue
        yield text_point(device, when, pos[1], pos[0], line, at)
