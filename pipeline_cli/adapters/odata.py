"""OData V4/V2 client: the one place that talks to the source service of ``sync-odata``.

It follows server-driven paging exactly as the server gives it, retries transient failures
(connection errors, 5xx, 408, 429 with ``Retry-After``) with tenacity, caps pages and response
sizes so a misbehaving server cannot hang cron, and wraps every failure into SourceError with
a one-line message that never carries credentials. It also decodes OData value formats
(``/Date(ms)/``, numbers sent as strings, ``PT08H30M00S``) and resolves the field mapping.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import requests
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from ..errors import ConfigError, SourceError

__all__ = [
    "DEFAULT_MAPPING",
    "EntityMapping",
    "ODataClient",
    "Page",
    "page_rows",
    "parse_bool",
    "parse_key",
    "parse_number",
    "parse_text",
    "parse_time",
    "resolve_mapping",
]

# ------------------------------------------------------------------------------ mapping

# Read-model entity -> (default OData entity set, read-model column -> default OData field).
# The first column of each entity is its key. Order matters: routes reference stops and
# flights reference routes, so sets are fetched and validated in this order.
DEFAULT_MAPPING: dict[str, tuple[str, dict[str, str]]] = {
    "stops": ("Stops", {
        "id": "ID", "name": "name", "latitude": "latitude", "longitude": "longitude",
        "is_airport": "isAirport", "city": "city",
    }),
    "routes": ("Routes", {
        "id": "ID", "from_stop_id": "fromStop_ID", "to_stop_id": "toStop_ID", "mode": "mode",
        "distance_km": "distanceKm",
    }),
    "flights": ("Flights", {
        "id": "ID", "route_id": "route_ID", "departure": "departure", "arrival": "arrival",
        "days_of_week": "daysOfWeek",
    }),
}
# Columns a mapping may leave out (mapped to ""): they are then always NULL / false.
OPTIONAL_COLUMNS = frozenset({"name", "city", "is_airport", "mode", "distance_km"})


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


# ------------------------------------------------------------------------------ client


@dataclass(frozen=True)
class Page:
    """One page as the server sent it (``body``) and as parsed (``rows``)."""

    number: int
    rows: list[dict[str, Any]]
    body: bytes
    version: str  # "v4" or "v2"
    count: int | None  # the total from @odata.count / __count, when the server sent one


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def error_line(status: int, body: bytes, content_type: str = "") -> str:
    """An OData error body (V4 ``error.message``, V2 ``error.message.value``) as one line."""
    code = message = ""
    try:
        doc = json.loads(body)
        err = doc.get("error") or doc.get("odata.error") or {}
        code = str(err.get("code") or "")
        msg = err.get("message")
        message = str(msg.get("value", "") if isinstance(msg, dict) else (msg or ""))
    except (ValueError, AttributeError):
        if "html" not in content_type.lower():
            message = body[:300].decode("utf-8", "replace")
    text = " ".join(f"{code}: {message}".strip(": ").split())
    return f"HTTP {status}" + (f" {text[:300]}" if text else "")


def _strip_userinfo(url: str) -> tuple[str, str | None, str | None]:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=host)), parts.username, parts.password


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class ODataClient:
    """Reads entity sets page by page from one OData service.

    One ``requests.Session`` (pooled keep-alive connections) for the client's life; close it
    with :meth:`close` or a ``with`` block. Credentials go into the session, never into URLs
    or messages.
    """

    def __init__(
        self,
        service_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        version: str = "auto",
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_pages: int = 10_000,
        max_response_bytes: int = 64 * 1024 * 1024,
        retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        page_size: int = 0,
        count: bool = True,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if version not in ("auto", "v4", "v2"):
            raise ConfigError("malformed setting [odata] version: expected auto, v4 or v2")
        url, url_user, url_password = _strip_userinfo(service_url)
        self.service_url = url.rstrip("/") + "/"
        self.version = version
        self.timeout = (connect_timeout, read_timeout)
        self.max_pages = max_pages
        self.max_response_bytes = max_response_bytes
        self.retries = max(1, retries)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        # base * 2^n capped at backoff_max, plus up to base of jitter so clients spread out
        self._backoff = (wait_exponential(multiplier=backoff_base, max=backoff_max)
                         + wait_random(0, backoff_base))
        self.page_size = page_size
        self.count = count
        self._sleep = sleep
        self.session = requests.Session()
        self.session.trust_env = False  # no ~/.netrc or proxy surprises under cron
        self.session.headers["User-Agent"] = "pipeline-cli sync-odata"
        username, password = username or url_user, password or url_password
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        elif username is not None:
            self.session.auth = (username, password or "")
        self._detected: str | None = None if version == "auto" else version

    @classmethod
    def from_settings(cls, s: Any) -> ODataClient:
        """Build from an ``ODataSettings`` (``[odata]`` section)."""
        if not s.url:
            raise ConfigError("missing setting [odata] url (set PIPELINE_ODATA_URL or "
                              "[odata] url in the config file)", key="odata.url")
        return cls(
            s.url, username=s.username, password=s.password, token=s.token, version=s.version,
            connect_timeout=s.connect_timeout, read_timeout=s.read_timeout,
            max_pages=s.max_pages, max_response_bytes=s.max_response_bytes, retries=s.retries,
            backoff_base=s.backoff_base, backoff_max=s.backoff_max, page_size=s.page_size,
            count=s.count,
        )

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> ODataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------- protocol

    @property
    def protocol(self) -> str:
        """``v4`` or ``v2``: forced by settings, else detected from the service document."""
        if self._detected is None:
            doc = self._get_json(self.service_url, "the service document")
            self._detected = self._shape_version(doc, "the service document")
        return self._detected

    def _shape_version(self, doc: Any, what: str) -> str:
        if isinstance(doc, dict) and "value" in doc:
            return "v4"
        if isinstance(doc, dict) and isinstance(doc.get("d"), dict | list):
            return "v2"
        raise SourceError(f"OData {what}: not an OData JSON response (no 'value' or 'd')")

    def _headers(self) -> dict[str, str]:
        if self._detected == "v2":
            return {"Accept": "application/json", "MaxDataServiceVersion": "2.0",
                    "DataServiceVersion": "2.0"}
        headers = {
            "Accept": "application/json;odata.metadata=minimal;IEEE754Compatible=true, "
                      "application/json;q=0.9",
            "OData-MaxVersion": "4.0",
        }
        if self._detected is None:
            headers["MaxDataServiceVersion"] = "3.0"
        if self.page_size > 0:
            headers["Prefer"] = f"odata.maxpagesize={self.page_size}"
        return headers

    def collection_url(self, entity_set: str, *, orderby: str | None = None,
                       select: list[str] | None = None, filter: str | None = None) -> str:
        """The first-page URL; later pages come only from the server's nextLinks."""
        options: list[tuple[str, str]] = []
        if filter:
            options.append(("$filter", filter))
        if select:
            options.append(("$select", ",".join(select)))
        if orderby:
            options.append(("$orderby", orderby))
        if self.count:
            options.append(("$count", "true") if self.protocol == "v4"
                           else ("$inlinecount", "allpages"))
        if self.protocol == "v2":
            options.append(("$format", "json"))
        query = "&".join(f"{k}={quote(v, safe=',()*:/')}" for k, v in options)
        return f"{self.service_url}{quote(entity_set)}" + (f"?{query}" if query else "")

    # -------------------------------------------------------------------- paging

    def pages(self, entity_set: str, *, orderby: str | None = None,
              select: list[str] | None = None, filter: str | None = None,
              read_ahead: int = 2) -> Iterator[Page]:
        """Every page of an entity set, in server order, following nextLinks to the end.

        With ``read_ahead`` > 0 a background thread fetches the next pages while the caller
        works on this one (bounded, so memory stays at a few pages).
        """
        url = self.collection_url(entity_set, orderby=orderby, select=select, filter=filter)
        gen = self._pages(entity_set, url)
        return _read_ahead(gen, read_ahead) if read_ahead > 0 else gen

    def _pages(self, entity_set: str, url: str) -> Generator[Page, None, None]:
        origin = _origin(self.service_url)
        seen: set[str] = {url}
        number = 0
        next_url: str | None = url
        while next_url is not None:
            number += 1
            if number > self.max_pages:
                raise SourceError(
                    f"OData {entity_set}: more than {self.max_pages} pages ([odata] max_pages); "
                    "the server's nextLink never ends")
            what = f"{entity_set} page {number}"
            body, doc = self._get(next_url, what)
            page_version = self._shape_version(doc, what)
            if page_version != self.protocol:
                raise SourceError(f"OData {what}: got a {page_version.upper()} response from "
                                  f"a {self.protocol.upper()} service")
            rows, link, count = _unwrap(doc, page_version, what)
            yield Page(number, rows, body, page_version, count)
            if link is None:
                return
            resolved = urljoin(next_url, link)
            if _origin(resolved) != origin:
                raise SourceError(f"OData {what}: nextLink points to another host "
                                  f"({_origin(resolved)[1]}); refusing to send credentials there")
            if resolved in seen:
                raise SourceError(f"OData {what}: nextLink repeats an earlier page "
                                  "(a paging loop)")
            seen.add(resolved)
            next_url = resolved

    # -------------------------------------------------------------------- HTTP

    def _get_json(self, url: str, what: str) -> Any:
        return self._get(url, what)[1]

    def _get(self, url: str, what: str) -> tuple[bytes, Any]:
        """GET with retries; returns (body, parsed JSON) or raises SourceError."""
        retrying = Retrying(
            stop=stop_after_attempt(self.retries),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(self._get_once, url, what)
        except _Retryable as exc:
            tries = f" after {self.retries} attempts" if self.retries > 1 else ""
            raise SourceError(f"OData {what}: {exc.message}{tries}") from None

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after
        return float(self._backoff(state))

    def _get_once(self, url: str, what: str) -> tuple[bytes, Any]:
        try:
            resp = self.session.get(url, headers=self._headers(), timeout=self.timeout,
                                    stream=True)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Retryable(_transport_text(exc)) from None
        except requests.RequestException as exc:
            raise SourceError(f"OData {what}: {_transport_text(exc)}") from None
        with resp:
            content_type = resp.headers.get("Content-Type", "")
            if resp.status_code >= 300:
                body = self._read(resp, what, limit=64 * 1024)
                line = error_line(resp.status_code, body, content_type)
                if resp.status_code in _RETRY_STATUSES or resp.status_code >= 500:
                    after = _retry_after(resp.headers.get("Retry-After"))
                    if after is not None and after > self.backoff_max:
                        raise SourceError(
                            f"OData {what}: {line}; the server asks to retry after "
                            f"{after:.0f} s, longer than [odata] backoff_max "
                            f"({self.backoff_max:g} s)")
                    raise _Retryable(line, after)
                hint = " (check [odata] username/password/token)" if resp.status_code in (
                    401, 403) else ""
                raise SourceError(f"OData {what}: {line}{hint}")
            body = self._read(resp, what, limit=self.max_response_bytes)
        if "html" in content_type.lower():
            raise SourceError(f"OData {what}: expected JSON, got {content_type.split(';')[0]} "
                              "(a login page or proxy in the way?)")
        try:
            return body, json.loads(body)
        except ValueError as exc:
            # a body cut short by a dropped connection: worth another try
            raise _Retryable(f"malformed JSON ({exc.msg} at byte {exc.pos}; truncated?)"
                             if isinstance(exc, json.JSONDecodeError) else "malformed JSON"
                             ) from None

    def _read(self, resp: requests.Response, what: str, *, limit: int) -> bytes:
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit and limit == self.max_response_bytes:
            raise SourceError(f"OData {what}: response of {int(declared)} bytes is larger than "
                              f"[odata] max_response_bytes ({limit})")
        chunks: list[bytes] = []
        total = 0
        try:
            for chunk in resp.iter_content(256 * 1024):
                total += len(chunk)
                if total > limit:
                    if limit != self.max_response_bytes:
                        break  # an error body: the start is enough
                    raise SourceError(f"OData {what}: response larger than [odata] "
                                      f"max_response_bytes ({limit})")
                chunks.append(chunk)
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError) as exc:
            raise _Retryable(f"response cut short: {_transport_text(exc)}") from None
        return b"".join(chunks)


def _unwrap(doc: Any, version: str, what: str) -> tuple[list[dict[str, Any]], str | None,
                                                         int | None]:
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
    return _unwrap(doc, version, what)[0]


def _transport_text(exc: BaseException) -> str:
    """A short description of a requests error without URLs (they may carry secrets)."""
    if isinstance(exc, requests.Timeout):
        return "timed out" if not isinstance(exc, requests.ConnectTimeout) else (
            "connect timed out")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection closed mid-response"
    if isinstance(exc, requests.ConnectionError):
        text = str(exc)
        for marker in ("Connection refused", "Name or service not known", "Connection reset",
                       "Remote end closed connection", "Connection aborted"):
            if marker in text:
                return f"connection failed: {marker.lower()}"
        return "connection failed"
    return type(exc).__name__


_END = object()


def _read_ahead(gen: Generator[Page, None, None], depth: int) -> Iterator[Page]:
    """Run ``gen`` in a thread, ``depth`` pages ahead of the consumer.

    The consumer's per-row work then overlaps the server's work on the next page. Errors
    from the producer are re-raised in the consumer, in order.
    """
    out: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for page in gen:
                if not put(page):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)
        finally:
            gen.close()

    thread = threading.Thread(target=produce, name="odata-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
