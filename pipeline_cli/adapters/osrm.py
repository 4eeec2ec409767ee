"""The OSRM adapter: HTTP calls to osrm-routed's ``/match`` (and ``/route`` for test traces).

One ``requests.Session`` with a connection pool as large as the number of requests in flight,
timeouts on every call, tenacity retries for connection errors and 5xx. Every failure leaves
this module as an :class:`~pipeline_cli.errors.OsrmError`; OSRM's own answer codes that the
matcher handles differently (``TooBig``, ``NoMatch``, ``NoSegment``) are distinct subclasses.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from .. import polyline
from ..errors import EXIT_CONFIG, OsrmError, cause, public_url, service_error
from ..logs import one_line

LatLon = tuple[float, float]


class OsrmUnavailable(OsrmError):
    """Connection errors, timeouts or 5xx answers outlasted every retry."""


class OsrmTooBig(OsrmError):
    """``TooBig``: more coordinates than the server's ``--max-matching-size``."""


class OsrmRefused(OsrmError):
    """The server refuses what every request of this configuration sends: ``TooBig`` for the
    radiuses (above its ``--max-matching-radius``), a URL that is not osrm-routed's API
    (``InvalidUrl``/``InvalidService``/``InvalidVersion``, or a proxy's 401/403/404/405), or a
    request too large for it (413/414/431, or osrm-routed's closed connection past its
    ``--max-header-size``). No trace would fare better, so a run stops and
    gives its batches back rather than fail batch after batch."""

    exit_code = EXIT_CONFIG


class OsrmNoMatch(OsrmError):
    """``NoMatch`` (no plausible route through the points) or ``NoSegment`` (no road near a
    point). The trace is the problem, not the server: retrying the same request is useless."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, code=code)
        self.code = code


# osrm-routed's answers to a path it has no service for: a wrong [osrm] url path or prefix.
_URL_CODES = frozenset({"InvalidUrl", "InvalidService", "InvalidVersion"})
# A proxy's answers (HTML or empty) to a path it does not serve, or may not: the same setting.
_URL_STATUSES = frozenset({401, 403, 404, 405})
# Payload, URI or header too large: a server or proxy limit on the request's size.
_SIZE_STATUSES = frozenset({413, 414, 431})


class _Transient(Exception):
    """A failure worth retrying (wrapped so tenacity retries only these); ``args[0]`` is the
    driver's exception or a short text such as ``HTTP 503``."""


@dataclass(frozen=True)
class Tracepoint:
    matchings_index: int
    waypoint_index: int
    location: LatLon  # snapped position on the road, (lat, lon)


@dataclass
class Matching:
    encoded: str  # OSRM's own polyline (precision 5), decoded only when needed
    confidence: float  # clamped to [0, 1]: OSRM sometimes reports slightly more than 1
    distance: float
    duration: float
    _geometry: list[LatLon] | None = field(default=None, repr=False)

    @property
    def geometry(self) -> list[LatLon]:
        if self._geometry is None:
            try:
                self._geometry = polyline.decode(self.encoded)
            except ValueError as exc:
                raise OsrmError(f"OSRM returned a malformed polyline: {exc}") from None
        return self._geometry


@dataclass
class MatchResult:
    matchings: list[Matching] = field(default_factory=list)
    tracepoints: list[Tracepoint | None] = field(default_factory=list)


def clamp_confidence(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    if number != number:
        return 0.0
    return min(1.0, max(0.0, number))


class OsrmClient:
    """A thread-safe client for one osrm-routed; call :meth:`close` when done."""

    def __init__(
        self,
        base_url: str,
        *,
        profile: str = "driving",
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        retries: int = 4,
        retry_wait_max: float = 5.0,
        pool_size: int = 4,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.profile = profile
        self.timeout = (min(connect_timeout, timeout), timeout)
        self.retries = max(1, retries)
        self.retry_wait_max = retry_wait_max
        self.session = requests.Session()
        # One pooled connection per request in flight; never block waiting for one.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(1, pool_size),
                              max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._lock = threading.Lock()
        self.requests = 0  # HTTP requests sent, retries included

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> OsrmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- calls

    def match(
        self,
        coordinates: Sequence[LatLon],
        timestamps: Sequence[int],
        radius_m: float | Sequence[float],
    ) -> MatchResult:
        """``/match`` one trace. ``timestamps`` must be integer seconds, strictly increasing.

        Raises OsrmTooBig, OsrmNoMatch, OsrmUnavailable or OsrmError.
        """
        if len(coordinates) < 2:
            raise ValueError("a match needs at least two coordinates")
        if len(timestamps) != len(coordinates):
            raise ValueError("one timestamp per coordinate")
        if any(b <= a for a, b in zip(timestamps, timestamps[1:], strict=False)):
            raise ValueError("timestamps must be strictly increasing")
        radii = ([float(radius_m)] * len(coordinates) if isinstance(radius_m, (int, float))
                 else [float(r) for r in radius_m])
        # Compact requests: coordinates as a precision-6 polyline (0.1 m), timestamps relative
        # to the first point (OSRM only uses their differences). A 100-point request shrinks
        # about fourfold, and so does the client's URL handling.
        encoded = quote(polyline.encode(coordinates, 6), safe="")
        path = f"/match/v1/{self.profile}/polyline6({encoded})"
        first = int(timestamps[0])
        params = {
            "timestamps": ";".join(str(int(t) - first) for t in timestamps),
            "radiuses": ";".join(f"{r:g}" for r in radii),
            "gaps": "split",
            "geometries": "polyline",
            "overview": "full",
            "generate_hints": "false",
        }
        try:
            body = self._get(path, params)
        except OsrmTooBig as exc:
            # osrm-routed answers TooBig both for too many coordinates and for radiuses above
            # --max-matching-radius; only its message tells them apart.
            if "radius" not in str(exc).lower():
                raise
            raise service_error(
                OsrmRefused, "OSRM", self.base_url,
                f"refuses /match radiuses of {max(radii):g} m ({exc}): lower [match] radius_m "
                "to its --max-matching-radius or raise that osrm-routed option",
                code="TooBig") from None
        return _parse_match(body)

    def route(self, waypoints: Sequence[LatLon]) -> dict[str, Any]:
        """``/route`` through the waypoints (full polyline geometry); the first route."""
        path = f"/route/v1/{self.profile}/" + ";".join(
            f"{lon:.6f},{lat:.6f}" for lat, lon in waypoints)
        body = self._get(path, {"overview": "full", "geometries": "polyline",
                                "generate_hints": "false", "continue_straight": "true"})
        routes = body.get("routes")
        if not isinstance(routes, list) or not routes:
            raise service_error(OsrmError, "OSRM", self.base_url, "/route answered without routes",
                                str(body))
        route: dict[str, Any] = routes[0]
        route["coordinates"] = polyline.decode(str(route.get("geometry", "")))
        return route

    def nearest(self, point: LatLon) -> dict[str, Any]:
        """``/nearest`` for one (lat, lon): the first waypoint (``location`` is [lon, lat],
        ``distance`` in metres)."""
        lat, lon = point
        body = self._get(f"/nearest/v1/{self.profile}/{lon:.6f},{lat:.6f}",
                         {"number": "1", "generate_hints": "false"})
        waypoints = body.get("waypoints")
        if not isinstance(waypoints, list) or not waypoints or not isinstance(waypoints[0], dict):
            raise OsrmError(f"OSRM /nearest answered without waypoints: {str(body)[:200]}")
        return waypoints[0]

    # ---------------------------------------------------------------- HTTP

    def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        url = self.base_url + path
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(self.retries),
                wait=wait_exponential(multiplier=0.1, max=self.retry_wait_max)
                + wait_random(0, min(0.1, self.retry_wait_max)),
                retry=retry_if_exception_type(_Transient),
                reraise=True,
            ):
                with attempt:
                    return self._once(url, params)
        except _Transient as exc:
            size = self._too_large(url, params, exc.args[0])
            if size:
                raise self._refused(
                    f"closed the connection without answering a {size}-byte request (a "
                    "short one it answers)",
                    "raise osrm-routed's --max-header-size (or a proxy's limit on the request "
                    "line) or lower [match] chunk_size", code="closed") from None
            tries = f" after {self.retries} attempts" if self.retries > 1 else ""
            raise service_error(OsrmUnavailable, "OSRM", self.base_url,
                                f"unavailable{tries}", exc.args[0]) from None
        except RetryError as exc:  # pragma: no cover - reraise=True makes this unreachable
            raise service_error(OsrmUnavailable, "OSRM", self.base_url, "unavailable",
                                exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _too_large(self, url: str, params: dict[str, str], error: object) -> int:
        """The request's size in bytes when the server closed the connection without an
        answer only because of it (osrm-routed past its --max-header-size answers nothing and
        closes), else 0. Told apart by two probes: a short ``/nearest`` must be answered and
        the same one padded to the request's size must not, so a server that is down, or
        that drops this one trace, still counts as unavailable."""
        if not _closed(error):
            return 0
        prepared = self.session.prepare_request(requests.Request("GET", url, params=params))
        size = len(prepared.path_url or "")
        short = f"{self.base_url}/nearest/v1/{self.profile}/0,0"
        probe = {"number": "1"}
        try:
            with self.session.get(short, params=probe, timeout=self.timeout):
                pass
        except requests.RequestException:
            return 0  # down, or gone: an outage after all
        shown = self.session.prepare_request(requests.Request("GET", short, params=probe))
        padding = size - len(shown.path_url or "") - len("&pad=")
        if padding <= 0:
            return 0
        try:
            with self.session.get(short, params={**probe, "pad": "x" * padding},
                                  timeout=self.timeout):
                return 0  # answered (an error about "pad" is an answer): size is no problem
        except requests.RequestException as exc:
            return size if _closed(exc) else 0

    def _once(self, url: str, params: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            self.requests += 1
        try:
            response = self.session.get(url, params=params, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(exc) from None
        except requests.RequestException as exc:
            raise service_error(OsrmError, "OSRM", self.base_url, "request failed",
                                exc) from None
        with response:
            status = response.status_code
            if status >= 500:
                raise _Transient(f"HTTP {status}" + (f" {_text(response.text)}"
                                                     if response.text.strip() else ""))
            if status in _SIZE_STATUSES:
                size = len(response.request.path_url or "") if response.request else 0
                raise self._refused(
                    f"refuses a {size}-byte request: HTTP {status} {response.reason or ''}",
                    "raise the server's limit (osrm-routed --max-header-size, a proxy's "
                    "large_client_header_buffers) or lower [match] chunk_size", code=str(status))
            try:
                body = response.json()
            except ValueError:
                kind = response.headers.get("Content-Type", "").split(";")[0].strip()
                if status in _URL_STATUSES or "json" not in kind:
                    # osrm-routed answers JSON to every request: a page of another kind (a
                    # web server's, a proxy's error page) says [osrm] url reaches something
                    # else, for every batch alike.
                    raise self._refused(
                        f"answered HTTP {status} with a non-JSON body ({kind or 'empty'})"
                        + (f" reading {_text(response.text)}" if response.text.strip() else ""),
                        "check the path in [osrm] url and [osrm] profile"
                        if status in _URL_STATUSES else
                        "check that [osrm] url reaches osrm-routed (or a proxy that passes "
                        "its answers)", code=str(status)) from None
                raise service_error(
                    OsrmError, "OSRM", self.base_url,
                    f"answered HTTP {response.status_code} with a non-JSON body",
                    _text(response.text) if response.text.strip() else None) from None
        if not isinstance(body, dict):
            raise service_error(OsrmError, "OSRM", self.base_url, "answered with unexpected JSON",
                                str(body)[:2000])
        code = str(body.get("code", ""))
        if code == "Ok":
            return body
        message = str(body.get("message", "")) or f"HTTP {response.status_code}"
        if code == "TooBig":
            raise OsrmTooBig(f"OSRM TooBig: {message}", code=code)
        if code in ("NoMatch", "NoSegment"):
            raise OsrmNoMatch(f"OSRM {code}: {message}", code)
        if code in _URL_CODES or (not code and status in _URL_STATUSES):
            said = str(body.get("message", "")) or str(body.get("error", ""))
            raise self._refused(f"answered {code or f'HTTP {status}'}"
                                + (f" ({cause(said)})" if said else ""),
                                "check the path in [osrm] url and [osrm] profile",
                                code=code or str(status))
        raise service_error(OsrmError, "OSRM", self.base_url, f"answered {code or 'an error'}",
                            message, code=code)

    def _refused(self, said: str, fix: str, *, code: str) -> OsrmRefused:
        # The URL with its path: a wrong path is what this names. Never its credentials.
        return OsrmRefused(" ".join(f"OSRM {public_url(self.base_url)} {said}: {fix}".split()),
                           code=code)


def _text(page: str) -> str:
    """A page's title or first words, quoted for a one-line message. A proxy's page is text
    from outside: its control characters (an ANSI escape's ESC, a NUL PostgreSQL cannot store
    with the batch's error) are escaped as in a log line, other unprintable ones (a bidi
    override) left out."""
    title = re.search(r"<title[^>]*>([^<]*)</title>", page, re.IGNORECASE)
    words = " ".join((title.group(1) if title else re.sub(r"<[^>]*>", " ", page)).split())
    return "'" + "".join(filter(str.isprintable, one_line(words[:80]))) + "'"


def _closed(error: object) -> bool:
    """Whether the server took the connection down without an answer (not a refused
    connection or a timeout)."""
    return isinstance(error, requests.ConnectionError) and not isinstance(
        error, requests.ConnectTimeout) and cause(error) in (
        "connection closed by the server", "connection reset", "connection aborted")


def _parse_match(body: dict[str, Any]) -> MatchResult:
    try:
        matchings = [
            Matching(
                encoded=str(m["geometry"]),
                confidence=clamp_confidence(m.get("confidence")),
                distance=float(m.get("distance", 0.0)),
                duration=float(m.get("duration", 0.0)),
            )
            for m in body.get("matchings", [])
        ]
        tracepoints: list[Tracepoint | None] = []
        for tp in body.get("tracepoints", []):
            if tp is None:
                tracepoints.append(None)
                continue
            lon, lat = tp["location"]
            tracepoints.append(Tracepoint(int(tp["matchings_index"]),
                                          int(tp["waypoint_index"]), (float(lat), float(lon))))
    except (KeyError, TypeError, ValueError) as exc:
        raise OsrmError(f"OSRM /match answer is malformed: {exc!r}") from None
    return MatchResult(matchings=matchings, tracepoints=tracepoints)
