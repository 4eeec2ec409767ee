"""A real OData V4/V2 HTTP server on 127.0.0.1 for tests, benchmarks and ``make demo``.

It pages entity sets with opaque ``$skiptoken`` nextLinks, speaks both wire formats, checks
auth, and injects faults (throttling, truncation, timeouts, wrong shapes) on request.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import contextlib
import datetime as dt
import decimal
import hmac
import json
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit
from xml.sax.saxutils import quoteattr

from devtools.odata_data import (
    GeneratedRows,
    read_feed,
    sample_network,
    sample_network_lazy,
    trippin_airports,
)

__all__ = [
    "FaultKind",
    "Fault",
    "ODataServer",
    "RequestRecord",
    "atom",
    "connection_reset",
    "delay",
    "html",
    "huge_response",
    "main",
    "mislabelled",
    "never_ending_next_link",
    "no_content",
    "sample_network",
    "sample_network_lazy",
    "status",
    "trippin_airports",
    "truncated_json",
    "wrong_shape",
]

Row = Mapping[str, Any]
FaultKind = Literal[
    "status", "truncated_json", "delay", "never_ending_next_link", "huge_response",
    "wrong_shape", "html", "atom", "mislabelled", "connection_reset", "no_content",
]  # fmt: skip


# -- faults ------------------------------------------------------------------------------
_DEFAULT_SHAPE = object()


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour. Build it with the factories (``Fault.status(429)`` or the
    module-level ``status(429)``), not directly."""

    kind: FaultKind
    code: int = 0
    retry_after: int | str | None = None
    message: str | None = None
    seconds: float = 0.0
    nbytes: int = 0
    content_length: bool = True
    same_link: bool = False
    payload: Any = None
    content_type: str = ""

    @classmethod
    def status(
        cls, code: int, *, retry_after: int | str | None = None, message: str | None = None,
        body: bytes | None = None,
    ) -> Fault:
        """Answer with this HTTP status and an OData error body (plus ``Retry-After``), or
        with ``body`` as it is: the JSON of a gateway in front (Azure API Management's
        ``{"statusCode": 401, "message": ...}``)."""
        if not 400 <= code <= 599:
            raise ValueError("status faults are 4xx/5xx codes")
        return cls("status", code=code, retry_after=retry_after, message=message, payload=body)

    @classmethod
    def truncated_json(cls, *, content_length: bool = True) -> Fault:
        """Send half of the real body, then close the connection.

        With ``content_length`` the header announces the full size, so the client sees a
        protocol error (short read); without it the response ends at the close and the client
        sees a well-formed HTTP response whose JSON is cut.
        """
        return cls("truncated_json", content_length=content_length)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Wait ``seconds`` before answering normally (to trip client read timeouts)."""
        return cls("delay", seconds=seconds)

    @classmethod
    def never_ending_next_link(cls, *, same_link: bool = False) -> Fault:
        """The paging chain started by the matching request never ends.

        Every page carries a nextLink; past the last row the chain wraps to the first page
        with a new lap number, so the links never repeat. With ``same_link`` every nextLink
        is the link to the page just served instead, the simplest loop to detect.
        """
        return cls("never_ending_next_link", same_link=same_link)

    @classmethod
    def huge_response(cls, nbytes: int, *, content_length: bool = True) -> Fault:
        """A 200 JSON page of ``nbytes`` bytes (one row with a huge string), streamed.

        Without ``content_length`` it is sent chunked: only counting bytes read catches it.
        """
        return cls("huge_response", nbytes=nbytes, content_length=content_length)

    @classmethod
    def wrong_shape(cls, payload: Any = _DEFAULT_SHAPE) -> Fault:
        """A 200 with valid JSON of the wrong shape: by default ``{"value": 5}`` (V4) or
        ``{"d": {"results": 5}}`` (V2); pass any JSON-able ``payload`` (e.g. ``[]``), or
        ``bytes`` to send as they are."""
        return cls("wrong_shape", payload=payload)

    @classmethod
    def html(cls) -> Fault:
        """A 200 ``text/html`` page, like a captive portal or proxy login page."""
        return cls("html")

    @classmethod
    def atom(cls) -> Fault:
        """A 200 Atom XML feed (``application/atom+xml``), as a service that does not answer
        in JSON (an old V2 service, or one that ignores ``$format=json``) sends."""
        return cls("atom")

    @classmethod
    def mislabelled(cls, content_type: str = "text/xml", encoding: str = "utf-8",
                    content_encoding: str | None = None) -> Fault:
        """The real answer under another ``Content-Type`` (services that label their JSON
        ``text/xml`` or ``text/plain`` exist), its body encoded in ``encoding``; with
        ``content_encoding``, under that ``Content-Encoding`` too, the body left as it is (a
        proxy that decompressed it and kept the header)."""
        return cls("mislabelled", content_type=content_type, message=encoding,
                   payload=content_encoding)

    @classmethod
    def no_content(cls, code: int = 204) -> Fault:
        """A success without a body: HTTP 204, or 200 with ``Content-Length: 0``."""
        return cls("no_content", code=code)

    @classmethod
    def connection_reset(cls) -> Fault:
        """Read the request, then reset the TCP connection without any response."""
        return cls("connection_reset")


status = Fault.status
truncated_json = Fault.truncated_json
delay = Fault.delay
never_ending_next_link = Fault.never_ending_next_link
huge_response = Fault.huge_response
wrong_shape = Fault.wrong_shape
html = Fault.html
atom = Fault.atom
mislabelled = Fault.mislabelled
connection_reset = Fault.connection_reset
no_content = Fault.no_content


@dataclass
class _FaultEntry:
    fault: Fault
    entity_set: str | None
    match: str | None
    remaining: int | None  # None: until cleared


# -- request records ---------------------------------------------------------------------
@dataclass(frozen=True)
class RequestRecord:
    """One request as received. ``headers`` keys are lower-cased; ``query`` is decoded."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    entity_set: str | None
    target: str  # the raw request target, e.g. "/odata/Stops?$skiptoken=..."
    body: bytes = b""  # of a POST (the token endpoint's form)


class _ODataError(Exception):
    def __init__(
        self, http_status: int, code: str, message: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message
        self.headers = list(headers)


def _bad_request(message: str, code: str = "BadRequest") -> _ODataError:
    return _ODataError(400, code, message)


# -- $filter -----------------------------------------------------------------------------
# Only what the mapping tests send: one comparison, ``<property> eq|ne <literal>``.
_FILTER_RE = re.compile(
    r"\s*(?P<name>[A-Za-z_]\w*)\s+(?P<op>eq|ne)\s+"
    r"(?P<literal>'(?:[^']|'')*'|-?\d+(?:\.\d+)?|true|false|null)\s*"
)
Predicate = Callable[[Row], bool]


def _filter(text: str, types: Mapping[str, str]) -> Predicate:
    match = _FILTER_RE.fullmatch(text)
    if match is None:
        raise _ODataError(400, "NotImplemented",
                          f"$filter '{text}' is not supported: only '<property> eq|ne <literal>'")
    name, op, literal = match["name"], match["op"], match["literal"]
    if name not in types:
        raise _bad_request(f"Could not find a property named '{name}' on the entity type")
    value: Any
    if literal.startswith("'"):
        value = literal[1:-1].replace("''", "'")
    elif literal in ("true", "false", "null"):
        value = {"true": True, "false": False, "null": None}[literal]
    else:
        value = float(literal) if "." in literal else int(literal)
    if op == "eq":
        return lambda row: row.get(name) == value
    return lambda row: row.get(name) != value


# -- value formatting --------------------------------------------------------------------
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _as_utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _edm_type(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "Edm.Boolean"
    if isinstance(value, int):
        return "Edm.Int32" if -(2**31) <= value < 2**31 else "Edm.Int64"
    if isinstance(value, float):
        return "Edm.Double"
    if isinstance(value, decimal.Decimal):
        return "Edm.Decimal"
    if isinstance(value, dt.datetime):
        return "Edm.DateTimeOffset"
    if isinstance(value, dt.date):
        return "Edm.Date"
    if isinstance(value, dt.time):
        return "Edm.TimeOfDay"
    if isinstance(value, dict):
        return _COMPLEX
    return "Edm.String"


def _number_text(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float | decimal.Decimal):
        return value
    return repr(value) if isinstance(value, float) else str(value)


def _v4_datetime(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return _as_utc(value).isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return value


Converter = Callable[[Any], Any]


def _v2_datetime(offset: bool) -> Converter:
    suffix = "+0000" if offset else ""

    def convert(value: Any) -> Any:
        if isinstance(value, dt.datetime):
            moment = _as_utc(value)
        elif isinstance(value, dt.date):
            moment = dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
        else:
            return value
        ms = (moment - _EPOCH) // dt.timedelta(milliseconds=1)
        return f"/Date({ms}{suffix})/"

    return convert


def _v2_time(value: Any) -> Any:
    if isinstance(value, dt.time):
        return f"PT{value.hour:02d}H{value.minute:02d}M{value.second:02d}S"
    return value


def _v4_decimal(value: Any) -> Any:
    return float(value) if isinstance(value, decimal.Decimal) else value


_STRINGIFIED = {"Edm.Int64", "Edm.Decimal", "Edm.Double"}
_NAMESPACE = "Pipeline.Fixture"
_COMPLEX = f"{_NAMESPACE}.Complex"  # a nested object: a complex type (or a GeoJSON point)


def _v2_complex(name: str) -> Converter:
    """V2 JSON gives each complex value, nested ones too, its own ``__metadata``."""
    def convert(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {"__metadata": {"type": f"{_NAMESPACE}.{name}"},
                **{k: _v2_complex(k)(v) for k, v in value.items()}}
    return convert


# -- per-set state -----------------------------------------------------------------------
@dataclass
class _SetState:
    rows: Sequence[Row]
    key: str
    types: dict[str, str]  # every known field -> Edm type ("Edm.String" when only nulls seen)
    version: int


_INFER_SAMPLE = 200


def _infer_types(rows: Sequence[Row], key: str, overrides: Mapping[str, str]) -> dict[str, str]:
    types: dict[str, str] = {}
    sample = rows[: min(len(rows), _INFER_SAMPLE)]
    for row in sample:
        for name, value in row.items():
            edm = _edm_type(value)
            if edm is None:
                types.setdefault(name, "")
                continue
            seen = types.get(name)
            if not seen or (seen == "Edm.Int32" and edm in ("Edm.Int64", "Edm.Double")):
                types[name] = edm
    types = {name: edm or "Edm.String" for name, edm in types.items()}
    types.setdefault(key, "Edm.Int32")
    types.update(overrides)
    return types


@dataclass(frozen=True)
class _Options:
    filter: str | None
    orderby: tuple[tuple[str, bool], ...]  # (field, descending)
    select: tuple[str, ...] | None
    top: int | None
    skip: int
    count: bool
    skiptoken: str | None


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json;charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


class _ResultCache:
    """Filtered and ordered row lists, computed once per (set version, $filter, $orderby)."""

    def __init__(self, size: int = 32) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple[Any, ...], Sequence[Row]] = (
            collections.OrderedDict()
        )

    def get(self, key: tuple[Any, ...]) -> Sequence[Row] | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
            return hit

    def put(self, key: tuple[Any, ...], rows: Sequence[Row]) -> None:
        with self._lock:
            self._entries[key] = rows
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# -- HTTP plumbing -----------------------------------------------------------------------
class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() shuts connections down and joins handler threads itself

    def __init__(self, app: ODataServer, port: int) -> None:
        self.app = app
        self._track_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        super().__init__(("127.0.0.1", port), _Handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._track_lock:
            self._connections.add(request)
            self._handler_threads.add(threading.current_thread())
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._track_lock:
                self._connections.discard(request)
                self._handler_threads.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response (size caps, timeouts) are expected, not server bugs
        if not isinstance(_current_exception(), ConnectionError | TimeoutError):
            self.app._record_error(traceback.format_exc())

    def close_connections(self, timeout: float) -> None:
        with self._track_lock:
            connections = list(self._connections)
            threads = list(self._handler_threads)
        for conn in connections:
            # OSError: already closed by its handler, nothing left to wake up
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout)


def _current_exception() -> BaseException | None:
    return sys.exc_info()[1]


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, so paging clients reuse one connection
    server_version = "pipeline-odata-fixture/1.0"
    body = b""
    timeout = 30  # an idle keep-alive connection gives up its thread after this
    # headers and body go out in separate writes; with Nagle on, the body waits for the
    # client's delayed ACK and every small page costs ~40 ms
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.app.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self.body = b""  # the handler lives on for the next request of the connection
        self.server.app._handle(self)

    def _read_only(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        self.server.app._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_MERGE = _read_only


# -- the server --------------------------------------------------------------------------
class ODataServer:
    """An OData V4 or V2 read-only service over ``data`` (entity set name -> rows).

    ``with ODataServer(sample_network(200)) as server:`` serves it at ``server.url``; tests
    change data with :meth:`set_rows`/:meth:`update_row`/:meth:`delete_row`/:meth:`shuffle`,
    queue faults with :meth:`add_fault`, and inspect :attr:`requests` and
    :meth:`request_count`. All of these are safe to call while requests are in flight.

    Rows are plain dicts; field types (Edm) are inferred from the first rows and can be
    overridden with ``types={"Stops": {"ID": "Edm.Int64"}}``; a nested dict is a complex value
    (V2 gives it and each dict in it a ``__metadata``; see ``trippin_airports``). Without
    ``$orderby`` rows are served in stored order; with it, ties are broken by the key,
    ascending. The ``$skiptoken`` is an offset into the (filtered, ordered) result, so
    mutating a set between pages shifts rows under a running client, as it does with many
    real services.

    Value format options: ``v2_numbers_as_strings`` (V2: Edm.Int64/Decimal/Double as JSON
    strings), ``v2_date_offset`` (V2 dates as ``/Date(ms+0000)/`` instead of ``/Date(ms)/``),
    ``v2_metadata`` (V2 ``__metadata`` per entity, default on), ``ieee754_compatible`` (V4:
    Int64/Decimal/Double as strings; also applied when the client's Accept asks for
    ``IEEE754Compatible=true``), ``unprefixed_annotations`` (V4: ``@context``, ``@count`` and
    ``@nextLink`` without ``odata.``, as OData 4.01 services may write them).

    ``next_link_base`` makes absolute nextLinks start with another service root than
    :attr:`url`, as a service behind a reverse proxy names its internal host
    (``"http://localhost:{port}/odata/"``; ``{port}`` is the bound port). Set the attribute
    ``ignore_select`` to answer every field whatever ``$select`` asks, as some services do,
    and ``raw_names_in_links`` to write set names unencoded in nextLinks, as 1C does. Set
    ``refuse_orderby`` to 400 or 501 to answer any ``$orderby`` with that status, as services
    with a computed key or some SAP gateway entity sets do. ``$top`` and ``$skip`` are
    honoured (pages within them follow ``page_size``); set ``server_paging`` to False to answer
    every request whole in one page (no nextLink, no ``odata.maxpagesize``), as SEGW-generated
    SAP services do, ``max_top`` to cap ``$top`` there in silence, and ``ignore_skip`` to
    answer as if no ``$skip`` were asked. ``ignore_skiptoken`` answers every page from the
    first row while its nextLinks still move on (a new token each page), as a service whose
    paging code writes tokens it never reads does.

    Names and links: ``context_root`` is the path of the service root whose ``$metadata`` the
    context URL names, when ``root`` lies deeper (a Business Central company:
    ``root="/api/v2.0/companies(7)", context_root="/api/v2.0"``); relative nextLinks are then
    relative to the context URL, as OData JSON 4.0 says (``companies(7)/Stops?...``), or with
    ``next_link="request"`` to the request URL (``Stops?...``). ``service_names`` lists a set
    in the V4 service document under another name than its URL (``{"StopSet": "Stops"}``).
    ``omit_nulls`` leaves a property whose value is null out of the entity, as OData 4.01's
    ``omit-values=nulls`` and Dataverse do; ``$metadata`` (CSDL XML) declares every property.
    Set ``skiptoken_suffix`` to
    end every ``$skiptoken`` with those characters (written form-encoded, checked when read
    back), ``next_link_fragment`` to end every nextLink with it (``#page``), and
    ``case_insensitive`` to resolve ``$select`` and ``$orderby`` names in any case and answer
    with the properties' own names, as ASP.NET Core OData does by default. A set name may be
    container-qualified (``Container.Stops``, as OData V2 addresses a set outside the default
    container), and a root may hold characters URLs percent-encode.
    """

    def __init__(
        self,
        data: Mapping[str, Sequence[Row]] | None = None,
        *,
        version: str = "v4",
        root: str = "/odata",
        context_root: str | None = None,
        page_size: int = 1000,
        next_link: str = "absolute",
        next_link_base: str | None = None,
        empty_last_page: bool = False,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        keys: Mapping[str, str] | None = None,
        port: int = 0,
        types: Mapping[str, Mapping[str, str]] | None = None,
        v2_numbers_as_strings: bool = False,
        v2_date_offset: bool = False,
        v2_metadata: bool = True,
        ieee754_compatible: bool = False,
        unprefixed_annotations: bool = False,
        max_recorded_requests: int = 10_000,
        verbose: bool = False,
    ) -> None:
        if version not in ("v4", "v3", "v2"):
            raise ValueError("version must be 'v4', 'v3' or 'v2'")
        # v3: OData V3 JSON light (WCF Data Services 5.x): V4's shapes, with odata.metadata,
        # odata.count and odata.nextLink, and $inlinecount instead of $count.
        self.v3 = version == "v3"
        version = "v4" if self.v3 else version
        if next_link not in ("absolute", "relative", "request"):
            raise ValueError("next_link must be 'absolute', 'relative' or 'request'")
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        if (username is None) != (password is None):
            raise ValueError("basic auth needs both username and password")
        self.version = version
        self.root = "/" + root.strip("/") if root.strip("/") else ""
        self.context_root = self.root if context_root is None else (
            "/" + context_root.strip("/") if context_root.strip("/") else "")
        if not self.root.startswith(self.context_root):
            raise ValueError("context_root must be root or a path above it")
        self.page_size = page_size
        self.next_link = next_link
        self.next_link_base = next_link_base
        self.ignore_select = False
        self.raw_names_in_links = False  # as 1C writes them: Catalog_Остановки, not %D0%9E...
        self.refuse_orderby = 0  # 400 or 501: the status any $orderby is answered with
        self.server_paging = True  # False: every answer whole, without nextLinks
        self.max_top = 0  # > 0: a larger $top gets this many rows, in silence
        self.ignore_skip = False
        self.ignore_skiptoken = False
        self.skiptoken_suffix = ""
        self.next_link_fragment = ""
        self.case_insensitive = False
        self.service_names: dict[str, str] = {}  # set -> another name in the service document
        self.omit_nulls = False  # leave a null property out of the entity (omit-values=nulls)
        self.metadata: bytes | None = None  # $metadata as it is, in place of the generated one
        self.empty_last_page = empty_last_page
        self.username = username
        self.password = password
        self.token = token
        # OAuth 2.0 client credentials (RFC 6749 4.4): {"client_id": ..., "client_secret": ...,
        # "lifetime": seconds, "scope": optional, "token": optional}. POST /token issues random
        # bearer tokens (or "token", to echo a known one in a page), and the service then
        # takes only a token issued and not expired (nor revoked).
        self.oauth: dict[str, Any] | None = None
        self._issued: dict[str, float] = {}  # token -> monotonic expiry
        self.v2_numbers_as_strings = v2_numbers_as_strings
        self.v2_date_offset = v2_date_offset
        self.v2_metadata = v2_metadata
        self.ieee754_compatible = ieee754_compatible
        self.annotation = "odata." if self.v3 else "@" if unprefixed_annotations else "@odata."
        self.verbose = verbose
        self.errors: list[str] = []  # tracebacks of internal errors (answered with 500)
        self._port = port
        self._keys = dict(keys or {})
        self._type_overrides = {name: dict(t) for name, t in (types or {}).items()}
        self._lock = threading.RLock()
        self._sets: dict[str, _SetState] = {}
        self._versions = 0
        self._faults: list[_FaultEntry] = []
        self._requests: collections.deque[RequestRecord] = collections.deque(
            maxlen=max_recorded_requests
        )
        self._counts: collections.Counter[str | None] = collections.Counter()
        self._total = 0
        self._cache = _ResultCache()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._bound_port: int | None = None
        self._thread: threading.Thread | None = None
        for name, rows in (data or {}).items():
            self.set_rows(name, rows)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> ODataServer:
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._stopping.clear()
        self._httpd = _HTTPServer(self, self._port)
        self._bound_port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"odata-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()  # wakes handlers sleeping in a delay fault
        httpd.shutdown()
        httpd.close_connections(timeout=5)
        httpd.server_close()
        if thread is not None:
            thread.join(5)
        self._httpd = self._thread = None

    def __enter__(self) -> ODataServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port; still known after stop(), so tests can probe a dead server."""
        if self._bound_port is None:
            raise RuntimeError("server not started")
        return self._bound_port

    @property
    def url(self) -> str:
        """The service root with a trailing slash, e.g. ``http://127.0.0.1:54321/odata/``."""
        return f"http://127.0.0.1:{self.port}{quote(self.root, safe=_ROOT_SAFE)}/"

    @property
    def _context_url(self) -> str:
        """The service root whose ``$metadata`` the context URLs name (see ``context_root``)."""
        return f"http://127.0.0.1:{self.port}{quote(self.context_root, safe=_ROOT_SAFE)}/"

    @property
    def token_url(self) -> str:
        """The OAuth token endpoint (answers once :attr:`oauth` is set)."""
        return f"http://127.0.0.1:{self.port}/token"

    # -- data ----------------------------------------------------------------------------
    def set_rows(self, entity_set: str, rows: Sequence[Row]) -> None:
        """Replace (or create) an entity set.

        Rows are copied, so later changes to the caller's dicts do not leak into the server
        (use :meth:`update_row` and friends); lazily generated sequences are kept as they are.
        """
        if not entity_set or not re.fullmatch(r"[A-Za-z_][\w.]*", entity_set):
            raise ValueError(f"not a usable entity set name: {entity_set!r}")
        stored: Sequence[Row] = rows if isinstance(rows, GeneratedRows) else [dict(r) for r in rows]
        key = self._keys.get(entity_set, "ID")
        types = _infer_types(stored, key, self._type_overrides.get(entity_set, {}))
        with self._lock:
            self._versions += 1
            self._sets[entity_set] = _SetState(stored, key, types, self._versions)

    def rows(self, entity_set: str) -> list[dict[str, Any]]:
        """A copy of a set's rows in stored order."""
        with self._lock:
            state = self._state(entity_set)
        return [dict(r) for r in state.rows]

    def update_row(self, entity_set: str, key: Any, **changes: Any) -> None:
        """Change fields of the row with this key (copy-on-write: running pages are unaffected)."""
        with self._lock:
            state = self._state(entity_set)
            rows = list(state.rows)
            pos = self._position(state, key)
            rows[pos] = {**rows[pos], **changes}
            self._replace(entity_set, state, rows)

    def delete_row(self, entity_set: str, key: Any) -> None:
        with self._lock:
            state = self._state(entity_set)
            rows = list(state.rows)
            del rows[self._position(state, key)]
            self._replace(entity_set, state, rows)

    def add_row(self, entity_set: str, row: Mapping[str, Any]) -> None:
        with self._lock:
            state = self._state(entity_set)
            self._replace(entity_set, state, [*state.rows, dict(row)])

    def shuffle(self, entity_set: str, seed: int = 0) -> None:
        """Reorder a set's stored rows (what clients without ``$orderby`` get)."""
        with self._lock:
            state = self._state(entity_set)
            rows = list(state.rows)
            random.Random(seed).shuffle(rows)
            self._replace(entity_set, state, rows)

    def _state(self, entity_set: str) -> _SetState:
        try:
            return self._sets[entity_set]
        except KeyError:
            raise KeyError(f"no entity set {entity_set!r}") from None

    def _position(self, state: _SetState, key: Any) -> int:
        for pos, row in enumerate(state.rows):
            if row.get(state.key) == key:
                return pos
        raise KeyError(f"no row with {state.key}={key!r}")

    def _replace(self, entity_set: str, state: _SetState, rows: list[Row]) -> None:
        self._versions += 1
        self._sets[entity_set] = _SetState(rows, state.key, state.types, self._versions)

    # -- faults and records ------------------------------------------------------------
    def add_fault(
        self,
        fault: Fault | Callable[[], Fault],
        *,
        entity_set: str | None = None,
        times: int | None = 1,
        match: str | None = None,
    ) -> None:
        """Queue a fault for the next ``times`` matching requests (``None``: until cleared).

        A request matches when it addresses ``entity_set`` (if given) and its raw target
        contains ``match`` (if given). Each request consumes at most one fault, the oldest
        matching one. An uncalled factory (``add_fault(html)``) is called with no arguments.
        """
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        if not isinstance(fault, Fault):
            fault = fault()
        with self._lock:
            self._faults.append(_FaultEntry(fault, entity_set, match, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def request_count(self, entity_set: str | None = None) -> int:
        """Requests received in total, or those addressing ``entity_set``."""
        with self._lock:
            return self._total if entity_set is None else self._counts[entity_set]

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the recorded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def last_request(self) -> RequestRecord | None:
        with self._lock:
            return self._requests[-1] if self._requests else None

    def revoke_tokens(self) -> None:
        """Forget every issued OAuth token: the service answers 401 to them from now on."""
        with self._lock:
            self._issued.clear()

    def token_requests(self) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self._requests if r.path == "/token"]

    def reset_requests(self) -> None:
        with self._lock:
            self._requests.clear()
            self._counts.clear()
            self._total = 0

    def _take_fault(self, entity_set: str | None, target: str) -> Fault | None:
        with self._lock:
            for entry in self._faults:
                if entry.entity_set is not None and entry.entity_set != entity_set:
                    continue
                if entry.match is not None and entry.match not in target:
                    continue
                if entry.remaining is not None:
                    entry.remaining -= 1
                    if entry.remaining == 0:
                        self._faults.remove(entry)
                return entry.fault
        return None

    def _record_error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    # -- request handling --------------------------------------------------------------
    def _handle(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        path = unquote(split.path)
        pairs = parse_qsl(split.query, keep_blank_values=True)
        entity_set = self._entity_set_of(path)
        record = RequestRecord(
            method=h.command,
            path=path,
            query=dict(pairs),
            headers={k.lower(): v for k, v in h.headers.items()},
            entity_set=entity_set,
            target=h.path,
            body=h.body,
        )
        with self._lock:
            self._requests.append(record)
            self._counts[entity_set] += 1
            self._total += 1
        fault = self._take_fault(entity_set, h.path)
        if self.oauth is not None and path == "/token" and fault is None:
            self._write(h, self._token_response(h.command, record))
            return
        if fault is not None and fault.kind == "delay":
            if self._stopping.wait(fault.seconds):
                h.close_connection = True
                return
            fault = None
        if fault is not None and fault.kind == "connection_reset":
            # SO_LINGER 0: close() sends RST instead of FIN
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            return
        if fault is not None and fault.kind == "huge_response":
            self._send_huge(h, fault)
            return
        try:
            if fault is not None and fault.kind in ("status", "html", "atom", "wrong_shape",
                                                    "no_content"):
                response = self._fault_response(fault)
            else:
                cycle = fault is not None and fault.kind == "never_ending_next_link"
                same = cycle and fault is not None and fault.same_link
                response = self._respond(h.command, path, pairs, record.headers, cycle, same)
                if fault is not None and fault.kind == "mislabelled":
                    response.content_type = fault.content_type
                    response.body = response.body.decode().encode(fault.message or "utf-8")
                    if fault.payload:
                        response.headers.append(("Content-Encoding", fault.payload))
        except _ODataError as err:
            response = self._error(err.http_status, err.code, err.message, err.headers)
        except Exception:  # a bug in this fixture: answer 500 and keep it for the test to see
            self._record_error(traceback.format_exc())
            response = self._error(500, "InternalError", "fixture server error, see .errors")
        truncate = fault is not None and fault.kind == "truncated_json"
        full_length = fault is None or fault.content_length
        self._write(h, response, truncate=truncate, content_length=full_length)

    def _entity_set_of(self, path: str) -> str | None:
        if not path.startswith(self.root + "/"):
            return None
        first = path[len(self.root) + 1 :].split("/", 1)[0].split("(", 1)[0]
        return first if first and not first.startswith("$") else None

    def _write(
        self,
        h: _Handler,
        response: _Response,
        *,
        truncate: bool = False,
        content_length: bool = True,
    ) -> None:
        body = response.body
        h.send_response(response.status)
        h.send_header("Content-Type", response.content_type)
        for name, value in response.headers:
            h.send_header(name, value)
        if truncate:
            if content_length:
                h.send_header("Content-Length", str(len(body)))
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _send_huge(self, h: _Handler, fault: Fault) -> None:
        if self.version == "v4":
            head, tail = b'{"value":[{"ID":1,"padding":"', b'"}]}'
        else:
            head, tail = b'{"d":{"results":[{"ID":1,"padding":"', b'"}]}}'
        pad = max(0, fault.nbytes - len(head) - len(tail))
        h.send_response(200)
        h.send_header("Content-Type", "application/json;charset=utf-8")
        if fault.content_length:
            h.send_header("Content-Length", str(len(head) + pad + len(tail)))
        else:
            h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        block = b"x" * 65536

        def emit(chunk: bytes) -> None:
            if fault.content_length:
                h.wfile.write(chunk)
            elif chunk:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

        try:
            emit(head)
            remaining = pad
            while remaining > 0 and not self._stopping.is_set():
                emit(block[: min(remaining, len(block))])
                remaining -= len(block)
            emit(tail)
            if not fault.content_length:
                h.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hit its size cap and hung up: that is the point of this fault
        h.close_connection = True

    def _fault_response(self, fault: Fault) -> _Response:
        if fault.kind == "status":
            headers: list[tuple[str, str]] = []
            if fault.retry_after is not None:
                headers.append(("Retry-After", str(fault.retry_after)))
            if fault.code == 401:
                headers.extend(self._challenges(bearer_presented=False))
            if isinstance(fault.payload, bytes):
                return _Response(fault.code, fault.payload, "application/json; charset=utf-8",
                                 headers)
            message = fault.message or f"injected fault: HTTP {fault.code}"
            return self._error(fault.code, f"Injected{fault.code}", message, headers)
        if fault.kind == "html":
            page = (
                "<!DOCTYPE html><html><head><title>Sign in</title></head><body>"
                "<h1>Proxy authentication</h1><form method='post' action='/login'>"
                "<input name='user'><input name='password' type='password'></form></body></html>"
            )
            return _Response(200, page.encode(), "text/html; charset=utf-8")
        if fault.kind == "no_content":
            return _Response(fault.code, b"", self._json_content_type(False))
        if fault.kind == "atom":
            feed = ('<?xml version="1.0" encoding="utf-8"?><feed xmlns='
                    '"http://www.w3.org/2005/Atom"><title type="text">Stops</title></feed>')
            return _Response(200, feed.encode(), "application/atom+xml;type=feed;charset=utf-8")
        payload = fault.payload
        if payload is _DEFAULT_SHAPE:
            payload = {"value": 5} if self.version == "v4" else {"d": {"results": 5}}
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return _Response(200, body, self._json_content_type(False))

    # -- protocol ------------------------------------------------------------------------
    def _json_content_type(self, ieee754: bool) -> str:
        if self.version == "v2":
            return "application/json;charset=utf-8"
        flag = ";IEEE754Compatible=true" if ieee754 else ""
        return f"application/json;odata.metadata=minimal{flag};charset=utf-8"

    def _version_headers(self) -> list[tuple[str, str]]:
        if self.v3:
            return [("DataServiceVersion", "3.0")]
        if self.version == "v4":
            return [("OData-Version", "4.0")]
        return [("DataServiceVersion", "2.0")]

    def _error(
        self, http_status: int, code: str, message: str, headers: Iterable[tuple[str, str]] = ()
    ) -> _Response:
        if self.version == "v4":
            body: dict[str, Any] = {"error": {"code": code, "message": message}}
        else:
            body = {"error": {"code": code, "message": {"lang": "en", "value": message}}}
        return _Response(
            http_status,
            json.dumps(body).encode(),
            self._json_content_type(False),
            [*self._version_headers(), *headers],
        )

    def _challenges(self, *, bearer_presented: bool) -> list[tuple[str, str]]:
        out = []
        if self.username is not None:
            out.append(("WWW-Authenticate", 'Basic realm="odata", charset="UTF-8"'))
        if self.token is not None:
            extra = ', error="invalid_token"' if bearer_presented else ""
            out.append(("WWW-Authenticate", f'Bearer realm="odata"{extra}'))
        return out

    def _token_response(self, method: str, record: RequestRecord) -> _Response:
        """The token endpoint: client authentication by HTTP basic (or client_id and
        client_secret in the form), errors as RFC 6749 5.2 JSON."""
        assert self.oauth is not None

        def refuse(code: int, error: str, description: str) -> _Response:
            body = json.dumps({"error": error, "error_description": description}).encode()
            return _Response(code, body, "application/json;charset=utf-8",
                             [("Cache-Control", "no-store")])

        if method != "POST":
            return refuse(405, "invalid_request", "POST required")
        form = dict(parse_qsl(record.body.decode("utf-8", "replace")))
        scheme, _, credentials = record.headers.get("authorization", "").partition(" ")
        client_id, client_secret = form.get("client_id", ""), form.get("client_secret", "")
        if scheme.lower() == "basic":
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                client_id, _, client_secret = base64.b64decode(
                    credentials.strip(), validate=True).decode().partition(":")
        if not (hmac.compare_digest(client_id.encode(), self.oauth["client_id"].encode())
                and hmac.compare_digest(client_secret.encode(),
                                        self.oauth["client_secret"].encode())):
            return refuse(401, "invalid_client", "Client authentication failed.\r\n"
                          "Trace ID: 0f3c")
        if form.get("grant_type") != "client_credentials":
            return refuse(400, "unsupported_grant_type", "grant_type must be client_credentials")
        if self.oauth.get("scope") and form.get("scope") != self.oauth["scope"]:
            return refuse(400, "invalid_scope", f"scope {form.get('scope')!r} is not valid")
        token = self.oauth.get("token") or base64.urlsafe_b64encode(
            random.randbytes(32)).decode().rstrip("=")
        lifetime = float(self.oauth.get("lifetime", 3600))
        with self._lock:
            self._issued[token] = time.monotonic() + lifetime
        answer = {"access_token": token, "token_type": "Bearer", "expires_in": int(lifetime)}
        return _Response(200, json.dumps(answer).encode(), "application/json;charset=utf-8",
                         [("Cache-Control", "no-store")])

    def _check_auth(self, headers: Mapping[str, str]) -> None:
        if self.oauth is not None:
            scheme, _, given_token = headers.get("authorization", "").partition(" ")
            with self._lock:
                expiry = self._issued.get(given_token.strip()) if scheme.lower() == "bearer" \
                    else None
            if expiry is None or expiry <= time.monotonic():
                raise _ODataError(401, "Unauthorized", "Invalid or expired token", [
                    ("WWW-Authenticate", 'Bearer error="invalid_token"')])
            return
        if self.username is None and self.token is None:
            return
        given = headers.get("authorization", "")
        scheme, _, credentials = given.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic" and self.username is not None and self.password is not None:
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            expected = f"{self.username}:{self.password}"
            if hmac.compare_digest(decoded.encode(), expected.encode()):
                return
        if (
            scheme == "bearer"
            and self.token is not None
            and hmac.compare_digest(credentials.strip().encode(), self.token.encode())
        ):
            return
        message = "Authorization required" if not given else "Invalid credentials"
        raise _ODataError(
            401, "Unauthorized", message, self._challenges(bearer_presented=scheme == "bearer")
        )

    def _respond(
        self,
        method: str,
        path: str,
        pairs: list[tuple[str, str]],
        headers: Mapping[str, str],
        cycle: bool,
        same_link: bool,
    ) -> _Response:
        if path != self.root and not path.startswith(self.root + "/"):
            raise _ODataError(404, "NotFound", f"No service at {path}")
        self._check_auth(headers)
        if method != "GET":
            raise _ODataError(
                405, "MethodNotAllowed", "This service is read-only", [("Allow", "GET")]
            )
        rest = path[len(self.root) :].strip("/")
        if rest == "":
            return self._service_document()
        if rest == "$metadata":
            return self._metadata()
        segments = rest.split("/")
        name = segments[0]
        if "(" in name:
            raise _ODataError(501, "NotImplemented", "Addressing single entities is not supported")
        with self._lock:
            state = self._sets.get(name)
        if state is None:
            raise _ODataError(404, "NotFound", f"Resource not found for the segment '{name}'")
        if len(segments) == 2 and segments[1] == "$count":
            opts = self._parse_options(pairs, state)
            total = len(self._result(name, state, opts))
            return _Response(200, str(total).encode(), "text/plain;charset=utf-8",
                             self._version_headers())  # fmt: skip
        if len(segments) > 1:
            raise _ODataError(404, "NotFound", f"No resource for the segment '{segments[1]}'")
        opts = self._parse_options(pairs, state)
        return self._collection(name, state, opts, pairs, headers, cycle, same_link)

    def _service_document(self) -> _Response:
        with self._lock:
            names = list(self._sets)
        if self.version == "v4":
            body: dict[str, Any] = {
                "odata.metadata" if self.v3 else "@odata.context": f"{self.url}$metadata",
                "value": [{"name": self.service_names.get(n, n), "kind": "EntitySet", "url": n}
                          for n in names],
            }
        else:
            body = {"d": {"EntitySets": names}}
        return _Response(200, json.dumps(body).encode(), self._json_content_type(False),
                         self._version_headers())  # fmt: skip

    def _metadata(self) -> _Response:
        """CSDL XML: an entity type per set (its properties and their types), one container;
        or ``metadata`` as it is."""
        if self.metadata is not None:
            return _Response(200, self.metadata, "application/xml;charset=utf-8")
        with self._lock:
            sets = {name: dict(state.types) for name, state in self._sets.items()}
        v4 = self.version == "v4"
        edm = ("http://docs.oasis-open.org/odata/ns/edm" if v4
               else "http://schemas.microsoft.com/ado/2008/09/edm")
        types = "".join(f"<EntityType Name={quoteattr(_type_name(n))}>" + "".join(
            f"<Property Name={quoteattr(p)} Type={quoteattr(t)}/>" for p, t in props.items())
            + "</EntityType>" for n, props in sets.items())
        container = "".join(f"<EntitySet Name={quoteattr(n)} EntityType="
                            f"{quoteattr(_NAMESPACE + '.' + _type_name(n))}/>" for n in sets)
        body = ('<?xml version="1.0" encoding="utf-8"?><edmx:Edmx '
                f'Version="{"4.0" if v4 else "1.0"}"'
                ' xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx"><edmx:DataServices>'
                f'<Schema Namespace="{_NAMESPACE}" xmlns="{edm}">{types}<EntityContainer '
                f'Name="Container">{container}</EntityContainer></Schema></edmx:DataServices>'
                "</edmx:Edmx>")
        return _Response(200, body.encode(), "application/xml;charset=utf-8",
                         self._version_headers())

    def _parse_options(self, pairs: list[tuple[str, str]], state: _SetState) -> _Options:
        v4 = self.version == "v4"
        allowed = {"$filter", "$orderby", "$top", "$skip", "$select", "$format", "$skiptoken"}
        allowed |= {"$count"} if v4 and not self.v3 else {"$inlinecount"}
        seen: dict[str, str] = {}
        for name, value in pairs:
            if not name.startswith("$"):
                continue  # custom query options are the service's business; ignore them
            if name not in allowed:
                if name in ("$expand", "$search", "$apply"):
                    raise _ODataError(400, "NotImplemented", f"{name} is not supported")
                raise _bad_request(f"The query parameter '{name}' is not supported")
            if name in seen:
                raise _bad_request(f"Query option '{name}' was specified more than once")
            seen[name] = value
        fmt = seen.get("$format")
        if fmt is not None and fmt.split(";")[0] not in ("json", "application/json"):
            raise _ODataError(400, "NotImplemented", f"$format={fmt} is not supported")

        def non_negative(option: str) -> int | None:
            raw = seen.get(option)
            if raw is None:
                return None
            if not raw.isdigit():
                raise _bad_request(f"Invalid value '{raw}' for {option}: expected an integer >= 0")
            return int(raw)

        def named(name: str) -> str:  # a property's own name, in any case if case_insensitive
            if name in state.types or not self.case_insensitive:
                return name
            return next((t for t in state.types if t.lower() == name.lower()), name)

        orderby: list[tuple[str, bool]] = []
        if self.refuse_orderby and "$orderby" in seen:
            raise _ODataError(self.refuse_orderby, "NotSupported",
                              "The query option '$orderby' is not supported for this entity set")
        if seen.get("$orderby"):
            for item in seen["$orderby"].split(","):
                parts = item.split()
                direction = parts[1] if len(parts) == 2 else "asc"
                if not parts or len(parts) > 2 or direction not in ("asc", "desc"):
                    raise _bad_request(f"Invalid $orderby item '{item.strip()}'")
                if named(parts[0]) not in state.types:
                    raise _bad_request(f"Could not find a property named '{parts[0]}' for $orderby")
                orderby.append((named(parts[0]), direction == "desc"))
        select: tuple[str, ...] | None = None
        if seen.get("$select") and seen["$select"].strip() != "*":
            select = tuple(named(s.strip()) for s in seen["$select"].split(","))
            unknown = [s for s in select if s not in state.types]
            if unknown and not self.ignore_select:
                raise _bad_request(f"Could not find a property named '{unknown[0]}' for $select")
        if v4 and not self.v3:
            raw_count = seen.get("$count", "false")
            if raw_count not in ("true", "false"):
                raise _bad_request(f"Invalid value '{raw_count}' for $count")
            count = raw_count == "true"
        else:
            raw_count = seen.get("$inlinecount", "none")
            if raw_count not in ("allpages", "none"):
                raise _bad_request(f"Invalid value '{raw_count}' for $inlinecount")
            count = raw_count == "allpages"
        filter_text = seen.get("$filter")
        if filter_text is not None:
            _filter(filter_text, state.types)  # reject bad filters up front
        return _Options(
            filter=filter_text,
            orderby=tuple(orderby),
            select=select,
            top=non_negative("$top"),
            skip=non_negative("$skip") or 0,
            count=count,
            skiptoken=seen.get("$skiptoken"),
        )

    def _result(self, name: str, state: _SetState, opts: _Options) -> Sequence[Row]:
        """The set's rows after $filter and $orderby, computed once per set version."""
        if opts.filter is None and not opts.orderby:
            return state.rows
        cache_key = (name, state.version, opts.filter, opts.orderby)
        hit = self._cache.get(cache_key)
        if hit is not None:
            return hit
        rows: Sequence[Row] = state.rows
        if opts.filter is not None:
            predicate = _filter(opts.filter, state.types)
            rows = [r for r in rows if predicate(r)]
        already_sorted = (
            opts.orderby == ((state.key, False),)
            and getattr(state.rows, "sorted_by", None) == state.key
        )
        if opts.orderby and not already_sorted:
            # Python's sort is stable, so sorting by the key first and then by each $orderby
            # item from last to first gives ties a stable key order. Nulls sort lowest.
            ordered = sorted(rows, key=lambda r: _null_low(r.get(state.key)))
            try:
                for fld, desc in reversed(opts.orderby):
                    ordered.sort(key=_field_sort_key(fld), reverse=desc)
            except TypeError as err:
                raise _bad_request(f"$orderby over values that do not compare: {err}") from None
            rows = ordered
        self._cache.put(cache_key, rows)
        return rows

    # -- paging --------------------------------------------------------------------------
    @staticmethod
    def _make_token(offset: int, lap: int, flags: str) -> str:
        """``offset.lap.flags``: where the next page starts in the (filtered, ordered) result,
        the lap of a never-ending chain, and the fault flags that travel along it."""
        return f"{offset}.{lap}.{flags}"

    @staticmethod
    def _read_token(token: str) -> tuple[int, int, str]:
        try:
            offset, lap, flags = token.split(".")
            return int(offset), int(lap), flags
        except ValueError:
            raise _bad_request("The $skiptoken is invalid") from None

    def _collection(
        self,
        name: str,
        state: _SetState,
        opts: _Options,
        pairs: list[tuple[str, str]],
        headers: Mapping[str, str],
        cycle: bool,
        same_link: bool,
    ) -> _Response:
        result = self._result(name, state, opts)
        total = len(result)
        skip, top = 0 if self.ignore_skip else opts.skip, opts.top
        if top is not None and self.max_top:
            top = min(top, self.max_top)
        window_start = min(skip, total)
        window_end = total if top is None else min(total, skip + top)
        window_end = max(window_end, window_start)
        lap, flags, offset = 0, "", window_start
        if opts.skiptoken is not None:
            if not opts.skiptoken.endswith(self.skiptoken_suffix):
                raise _bad_request("The $skiptoken is invalid")
            offset, lap, flags = self._read_token(
                opts.skiptoken[:len(opts.skiptoken) - len(self.skiptoken_suffix)])
        # a never-ending fault marks the chain: the flags travel on in every later token
        flags = "".join(sorted(set(flags + ("c" if cycle else "") + ("s" if same_link else ""))))
        # without server paging one page holds the whole window, and no empty page follows
        page_size, applied = (self._page_size(headers) if self.server_paging
                              else (total + 1, False))
        start = min(max(offset, window_start), window_end)
        end = min(start + page_size, window_end)
        page = result[start:end]
        if self.ignore_skiptoken:  # the first rows again; the link still moves on
            page = result[window_start:min(window_start + page_size, window_end)]

        next_offset: int | None = None
        if end < window_end:
            next_offset = end
        elif self.empty_last_page and end - start == page_size:
            next_offset = end  # the data ended on a page boundary: one more, empty page
        if "s" in flags:
            next_offset = offset
        elif "c" in flags and next_offset is None:
            next_offset, lap = window_start, lap + 1
        next_url = None
        if next_offset is not None:
            token = self._make_token(next_offset, lap, flags) + self.skiptoken_suffix
            # the link keeps the client's options and adds the token
            query = [f"{quote(k, safe='$')}={_quote(v)}" for k, v in pairs if k != "$skiptoken"]
            query.append("$skiptoken=" + quote_plus(token, safe="'=/"))
            link = f"{name if self.raw_names_in_links else quote(name)}?{'&'.join(query)}"
            base = (self.next_link_base or self.url).replace("{port}", str(self.port))
            inner = self.url[len(self._context_url):]  # relative to the context URL
            next_url = {"absolute": base + link, "relative": inner + link,
                        "request": link}[self.next_link] + self.next_link_fragment

        ieee754 = self.version == "v4" and (
            self.ieee754_compatible or "ieee754compatible=true" in headers.get("accept", "").lower()
        )
        rows_json = self._serialise_rows(name, state, page,
                                         None if self.ignore_select else opts.select, ieee754)
        extra = self._version_headers()
        if applied:
            extra.append(("Preference-Applied", f"odata.maxpagesize={page_size}"))
        if self.version == "v4":
            context = f"{self._context_url}$metadata#{self.url[len(self._context_url):]}{name}"
            if opts.select:
                context += f"({','.join(opts.select)})"
            a = self.annotation.encode()
            parts = [b'{"odata.metadata":' if self.v3 else b'{"' + a + b'context":',
                     _dumps(context)]
            if opts.count:
                parts += [b',"' + a + b'count":', _dumps(str(total) if ieee754 else total)]
            parts += [b',"value":', rows_json]
            if next_url is not None:
                parts += [b',"' + a + b'nextLink":', _dumps(next_url)]
            parts.append(b"}")
        else:
            parts = [b'{"d":{']
            if opts.count:
                parts += [b'"__count":', _dumps(str(total)), b","]
            parts += [b'"results":', rows_json]
            if next_url is not None:
                parts += [b',"__next":', _dumps(next_url)]
            parts.append(b"}}")
        return _Response(200, b"".join(parts), self._json_content_type(ieee754), extra)

    def _page_size(self, headers: Mapping[str, str]) -> tuple[int, bool]:
        match = re.search(r"odata\.maxpagesize=(\d+)", headers.get("prefer", ""))
        if self.version == "v4" and match and 0 < int(match.group(1)) < self.page_size:
            return int(match.group(1)), True
        return self.page_size, False

    def _converters(self, state: _SetState, ieee754: bool) -> list[tuple[str, Converter]]:
        out: list[tuple[str, Converter]] = []
        for name, edm in state.types.items():
            if self.version == "v4":
                if ieee754 and edm in _STRINGIFIED:
                    out.append((name, _number_text))
                elif edm == "Edm.Decimal":
                    out.append((name, _v4_decimal))
                elif edm in ("Edm.DateTimeOffset", "Edm.Date", "Edm.TimeOfDay"):
                    out.append((name, _v4_datetime))
            else:
                if self.v2_numbers_as_strings and edm in _STRINGIFIED or edm == "Edm.Decimal":
                    out.append((name, _number_text))
                elif edm in ("Edm.DateTimeOffset", "Edm.Date"):
                    out.append((name, _v2_datetime(self.v2_date_offset)))
                elif edm == "Edm.TimeOfDay":
                    out.append((name, _v2_time))
                elif edm == _COMPLEX and self.v2_metadata:
                    out.append((name, _v2_complex(name)))
        return out

    def _serialise_rows(
        self,
        name: str,
        state: _SetState,
        page: Sequence[Row],
        select: tuple[str, ...] | None,
        ieee754: bool,
    ) -> bytes:
        converters = self._converters(state, ieee754)
        if select is not None:
            converters = [(f, c) for f, c in converters if f in select]
        v2_meta = self.version == "v2" and self.v2_metadata
        if not converters and select is None and not v2_meta and not self.omit_nulls:
            return _dumps(page if isinstance(page, list) else list(page))  # the fast path
        out: list[dict[str, Any]] = []
        type_name = f"{_NAMESPACE}.{_type_name(name)}"
        for row in page:
            item = {f: row.get(f) for f in select} if select is not None else dict(row)
            for fld, convert in converters:
                value = item.get(fld)
                if value is not None:
                    item[fld] = convert(value)
            if self.omit_nulls:
                item = {f: v for f, v in item.items() if v is not None}
            if v2_meta:
                key = row.get(state.key)
                literal = quote(f"'{key}'" if isinstance(key, str) else str(key), safe="'")
                uri = f"{self.url}{name}({literal})"
                item = {"__metadata": {"uri": uri, "type": type_name}, **item}
            out.append(item)
        return _dumps(out)


def _type_name(entity_set: str) -> str:
    if entity_set.endswith("s") and len(entity_set) > 1:
        return entity_set[:-1]
    return entity_set + "Type"


def _null_low(value: Any) -> tuple[bool, bool, Any]:
    """Nulls first, then numbers, then strings: a set may mix 7 and "V:1" as keys."""
    return (value is not None, isinstance(value, str), value)


def _field_sort_key(name: str) -> Callable[[Row], tuple[bool, bool, Any]]:
    return lambda row: _null_low(row.get(name))


def _dumps(value: Any) -> bytes:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only a \u escape can carry it
        return json.dumps(value, separators=(",", ":")).encode("ascii")


_ROOT_SAFE = "/()',"  # a root as Business Central writes it: Company('CRONUS%20Ltd.')


def _quote(value: str) -> str:
    return quote(value, safe="$,'():*/")


# -- command line ------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.odata_server",
        description="Serve a feed file or a generated sample network over OData on 127.0.0.1 "
        "until SIGTERM/SIGINT. Prints the service root URL on stdout.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="feed file (see odata_data.write_feed)")
    source.add_argument("--sample", type=int, metavar="N_STOPS", help="generate N stops")
    parser.add_argument("--seed", type=int, default=0, help="sample generator seed (default 0)")
    parser.add_argument("--changed-every", type=int, default=0, metavar="N",
                        help="with --sample: change every Nth row of each set")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--root", default="/odata", help="service root path (default /odata)")
    parser.add_argument("--version", choices=("v4", "v2"), default="v4", help="OData version")
    parser.add_argument("--page-size", type=int, default=1000, help="rows per page")
    parser.add_argument("--next-link", choices=("absolute", "relative", "request"),
                        default="absolute")
    parser.add_argument("--empty-last-page", action="store_true")
    parser.add_argument("--username", help="require HTTP basic auth with this user")
    parser.add_argument("--password", help="password for --username")
    parser.add_argument("--token", help="require (or also accept) this bearer token")
    parser.add_argument("--port-file", type=Path, help="write the service root URL here")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    keys: dict[str, str] = {}
    data: Mapping[str, Sequence[Row]]
    if args.data is not None:
        data, keys = read_feed(args.data)
    else:
        data = sample_network_lazy(args.sample, args.seed, changed_every=args.changed_every)
    server = ODataServer(
        data, version=args.version, root=args.root, page_size=args.page_size,
        next_link=args.next_link, empty_last_page=args.empty_last_page, username=args.username,
        password=args.password, token=args.token, keys=keys, port=args.port, verbose=args.verbose,
    )  # fmt: skip
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with server:
        if args.port_file is not None:
            tmp = args.port_file.with_name(args.port_file.name + ".tmp")
            tmp.write_text(server.url + "\n")
            tmp.replace(args.port_file)  # readers never see a half-written file
        print(server.url, flush=True)  # after the file: seeing the URL means both are ready
        try:
            while not stop.wait(0.2):
                pass
        finally:
            if args.port_file is not None:
                args.port_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
