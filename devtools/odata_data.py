"""Deterministic sample transport networks (Stops, Routes, Flights) for the OData fixture server.

Tests, benchmarks and ``make demo`` serve these through ``odata_server.ODataServer``; the lazy
form generates any row from its index, so a million-row feed costs no memory up front.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt

Row = dict[str, Any]
U64 = npt.NDArray[np.uint64]
F64 = npt.NDArray[np.float64]

FEED_FORMAT = "pipeline-odata-feed/1"


@dataclass(frozen=True)
class City:
    name: str
    lat: float
    lon: float
    weight: int  # share of the generated (non-airport) stops
    coastal: bool = False
    rail: bool = True


@dataclass(frozen=True)
class Airport:
    code: str
    name: str
    city: str
    lat: float
    lon: float


CITIES: tuple[City, ...] = (
    City("Helsinki", 60.1699, 24.9384, 24, coastal=True),
    City("Espoo", 60.2055, 24.6559, 10, coastal=True),
    City("Tampere", 61.4978, 23.7610, 10),
    City("Vantaa", 60.2934, 25.0378, 8),
    City("Oulu", 65.0121, 25.4651, 7, coastal=True),
    City("Turku", 60.4518, 22.2666, 7, coastal=True),
    City("Jyväskylä", 62.2426, 25.7473, 6),
    City("Lahti", 60.9827, 25.6612, 5),
    City("Kuopio", 62.8924, 27.6770, 5),
    City("Pori", 61.4851, 21.7974, 4, coastal=True),
    City("Joensuu", 62.6010, 29.7636, 3),
    City("Lappeenranta", 61.0587, 28.1887, 3),
    City("Vaasa", 63.0951, 21.6165, 3, coastal=True),
    City("Rovaniemi", 66.5039, 25.7294, 3),
    City("Mariehamn", 60.0973, 19.9348, 1, coastal=True, rail=False),
    City("Ivalo", 68.6577, 27.5390, 1, rail=False),
)

AIRPORTS: tuple[Airport, ...] = (
    Airport("HEL", "Helsinki Airport", "Helsinki", 60.3172, 24.9633),
    Airport("OUL", "Oulu Airport", "Oulu", 64.9301, 25.3546),
    Airport("RVN", "Rovaniemi Airport", "Rovaniemi", 66.5648, 25.8304),
    Airport("TKU", "Turku Airport", "Turku", 60.5141, 22.2628),
    Airport("TMP", "Tampere-Pirkkala Airport", "Tampere", 61.4141, 23.6044),
    Airport("KUO", "Kuopio Airport", "Kuopio", 63.0071, 27.7978),
    Airport("VAA", "Vaasa Airport", "Vaasa", 63.0507, 21.7622),
    Airport("JOE", "Joensuu Airport", "Joensuu", 62.6629, 29.6075),
    Airport("IVL", "Ivalo Airport", "Ivalo", 68.6073, 27.4053),
    Airport("MHQ", "Mariehamn Airport", "Mariehamn", 60.1222, 19.8982),
    Airport("JYV", "Jyväskylä Airport", "Jyväskylä", 62.3995, 25.6783),
    Airport("LPP", "Lappeenranta Airport", "Lappeenranta", 61.0446, 28.1447),
    Airport("POR", "Pori Airport", "Pori", 61.4617, 21.8000),
)

_STOP_WORDS = (
    "Asema", "Keskusta", "Tori", "Kirkko", "Satama", "Koulu", "Sairaala", "Kauppahalli",
    "Puisto", "Yliopisto", "Kirjasto", "Uimahalli", "Teollisuuskatu", "Rantatie", "Kauppatori",
    "Linja-autoasema", "Urheilupuisto", "Ostoskeskus", "Terveysasema", "Kampus",
)  # fmt: skip
_DAY_PATTERNS = ("1234567", "12345", "1234567", "67", "135", "2467", "12345", "5", "1234")
_CITY_INDEX = {c.name: i for i, c in enumerate(CITIES)}
# One slot per unit of weight: stop i (after the airports) belongs to CITIES[_SLOTS[i % len]],
# so stops of one city sit exactly len(_SLOTS) apart and a same-city neighbour is found by index.
_SLOTS = np.array([i for i, c in enumerate(CITIES) for _ in range(c.weight)], dtype=np.int64)
_SLOT_COUNT = len(_SLOTS)
_CITY_LAT = np.array([c.lat for c in CITIES])
_CITY_LON = np.array([c.lon for c in CITIES])
_CITY_COASTAL = np.array([c.coastal for c in CITIES])
_CITY_RAIL = np.array([c.rail for c in CITIES])
_AIRPORT_CITY = np.array([_CITY_INDEX[a.city] for a in AIRPORTS], dtype=np.int64)
_AIRPORT_LAT = np.array([a.lat for a in AIRPORTS])
_AIRPORT_LON = np.array([a.lon for a in AIRPORTS])

FLIGHT_ROUTE_EVERY = 25  # every 25th route is a flight between two airports
EARTH_RADIUS_KM = 6371.0088


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in kilometres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(a))


def _haversine_np(lat1: F64, lon1: F64, lat2: F64, lon2: F64) -> F64:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(lon2 - lon1)
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    result: F64 = 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(a))
    return result


class _Hash:
    """Counter-based random numbers: stream s of row i is a pure function of (seed, s, i).

    That is what lets a lazy sequence produce row 700_000 without producing the rows before it.
    """

    def __init__(self, seed: int) -> None:
        self._seed = np.uint64(seed & 0xFFFFFFFF)

    def u64(self, idx: U64, stream: int) -> U64:
        # splitmix64; array arithmetic on uint64 wraps silently, which is what the mixer relies on
        x = idx * np.uint64(0x100000001B3) + (self._seed << np.uint64(20)) + np.uint64(stream)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        result: U64 = x ^ (x >> np.uint64(31))
        return result

    def uniform(self, idx: U64, stream: int) -> F64:
        result: F64 = (self.u64(idx, stream) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return result

    def below(self, idx: U64, stream: int, n: int | npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        result: npt.NDArray[np.int64] = (self.u64(idx, stream) % np.uint64(1 << 62)).astype(
            np.int64
        ) % n
        return result


@dataclass(frozen=True)
class NetworkShape:
    """Sizes of one generated network; every count is a pure function of the arguments."""

    n_stops: int
    routes_per_stop: int = 2
    flights_per_route: int = 3

    @property
    def n_airports(self) -> int:
        return min(len(AIRPORTS), self.n_stops)

    @property
    def n_routes(self) -> int:
        return self.n_stops * self.routes_per_stop if self.n_stops >= 2 else 0

    @property
    def n_flight_routes(self) -> int:
        # flight routes are the route indices divisible by FLIGHT_ROUTE_EVERY, and need 2 airports
        if self.n_airports < 2 or self.n_routes == 0:
            return 0
        return (self.n_routes - 1) // FLIGHT_ROUTE_EVERY + 1

    @property
    def n_flights(self) -> int:
        return self.n_flight_routes * self.flights_per_route


class _Generator:
    """Vectorised row generation for index ranges of each entity set."""

    def __init__(self, shape: NetworkShape, seed: int) -> None:
        self.shape = shape
        self.h = _Hash(seed)

    # -- stops ---------------------------------------------------------------------------
    def stop_geo(self, idx: npt.NDArray[np.int64]) -> tuple[F64, F64, npt.NDArray[np.int64]]:
        """Latitude, longitude and city index of the stops at ``idx``."""
        a = self.shape.n_airports
        u = idx.astype(np.uint64)
        is_airport = idx < a
        regular = np.maximum(idx - a, 0)
        city = np.where(is_airport, _AIRPORT_CITY[np.minimum(idx, len(AIRPORTS) - 1)], 0)
        city = np.where(is_airport, city, _SLOTS[regular % _SLOT_COUNT])
        # Approximately normal offsets (sum of uniforms): most stops within ~5 km of the centre
        dy = (self.h.uniform(u, 1) + self.h.uniform(u, 2) + self.h.uniform(u, 3) - 1.5) * 0.06
        dx = (self.h.uniform(u, 4) + self.h.uniform(u, 5) + self.h.uniform(u, 6) - 1.5) * 0.06
        lat = _CITY_LAT[city] + dy
        lon = _CITY_LON[city] + dx / np.cos(np.radians(_CITY_LAT[city]))
        ap = np.minimum(idx, len(AIRPORTS) - 1)
        lat = np.where(is_airport, _AIRPORT_LAT[ap], np.round(lat, 6))
        lon = np.where(is_airport, _AIRPORT_LON[ap], np.round(lon, 6))
        return lat, lon, city

    def stops(self, start: int, stop: int) -> list[Row]:
        idx = np.arange(start, stop, dtype=np.int64)
        lat, lon, city = self.stop_geo(idx)
        words = self.h.below(idx.astype(np.uint64), 7, len(_STOP_WORDS)).tolist()
        rows: list[Row] = []
        a = self.shape.n_airports
        columns = (idx.tolist(), lat.tolist(), lon.tolist(), city.tolist(), words)
        for i, la, lo, c, w in zip(*columns, strict=True):
            city_name = CITIES[c].name
            if i < a:
                rows.append(
                    {"ID": i + 1, "name": AIRPORTS[i].name, "latitude": la, "longitude": lo,
                     "isAirport": True, "city": city_name}
                )  # fmt: skip
            else:
                rows.append(
                    {"ID": i + 1, "name": f"{city_name} {_STOP_WORDS[w]} {i + 1}", "latitude": la,
                     "longitude": lo, "isAirport": False, "city": city_name}
                )  # fmt: skip
        return rows

    # -- routes --------------------------------------------------------------------------
    def route_ends(
        self, idx: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """From-stop index, to-stop index and mode code of the routes at ``idx``.

        Mode codes index :data:`ROUTE_MODES`.
        """
        s = self.shape
        n, a = s.n_stops, s.n_airports
        u = idx.astype(np.uint64)
        src = np.minimum(idx // s.routes_per_stop, n - 1)
        roll = self.h.uniform(u, 11)
        step = 1 + self.h.below(u, 12, 4)
        # Same city: the stops of a city are _SLOT_COUNT apart (see _SLOTS)
        local = np.full(idx.shape, -1, dtype=np.int64)
        for cand in (src - _SLOT_COUNT, src + _SLOT_COUNT, src - step * _SLOT_COUNT):
            local = np.where((cand >= a) & (cand < n), cand, local)
        cand = src + step * _SLOT_COUNT
        local = np.where((cand < n) & (src >= a), cand, local)
        local = np.where(src >= a, local, -1)
        other = self.h.below(u, 13, n)
        _, _, src_city = self.stop_geo(src)
        want_local = roll < 0.72
        dst = np.where(want_local & (local >= 0), local, other)
        dst = np.where(dst == src, (src + 1) % n, dst)
        _, _, dst_city = self.stop_geo(dst)
        same_city = src_city == dst_city
        tram_city = np.isin(src_city, [_CITY_INDEX["Helsinki"], _CITY_INDEX["Tampere"]])
        rail = _CITY_RAIL[src_city] & _CITY_RAIL[dst_city]
        mode = np.where(same_city, np.where(tram_city & (roll < 0.2), 1, 0), np.where(rail, 2, 0))
        # some intercity routes between two coastal cities are ferries
        ferry = ~same_city & _CITY_COASTAL[src_city] & _CITY_COASTAL[dst_city] & (roll > 0.9)
        mode = np.where(ferry, 3, mode)
        # flight routes: every FLIGHT_ROUTE_EVERY-th route, between two distinct airports
        if a >= 2:
            flight = idx % FLIGHT_ROUTE_EVERY == 0
            fa = self.h.below(u, 14, a)
            fb = (fa + 1 + self.h.below(u, 15, a - 1)) % a
            src = np.where(flight, fa, src)
            dst = np.where(flight, fb, dst)
            mode = np.where(flight, 4, mode)
        return src, dst, mode

    def routes(self, start: int, stop: int) -> list[Row]:
        idx = np.arange(start, stop, dtype=np.int64)
        src, dst, mode = self.route_ends(idx)
        la1, lo1, _ = self.stop_geo(src)
        la2, lo2, _ = self.stop_geo(dst)
        dist = np.round(_haversine_np(la1, lo1, la2, lo2), 3)
        return [
            {"ID": i + 1, "fromStop_ID": f + 1, "toStop_ID": t + 1, "mode": ROUTE_MODES[m],
             "distanceKm": d}
            for i, f, t, m, d in zip(
                idx.tolist(), src.tolist(), dst.tolist(), mode.tolist(), dist.tolist(), strict=True
            )
        ]  # fmt: skip

    # -- flights -------------------------------------------------------------------------
    def flights(self, start: int, stop: int) -> list[Row]:
        idx = np.arange(start, stop, dtype=np.int64)
        u = idx.astype(np.uint64)
        route = (idx // self.shape.flights_per_route) * FLIGHT_ROUTE_EVERY
        src, dst, _ = self.route_ends(route)
        la1, lo1, _ = self.stop_geo(src)
        la2, lo2, _ = self.stop_geo(dst)
        minutes_in_air = 25 + _haversine_np(la1, lo1, la2, lo2) / 11.0  # ~660 km/h plus taxiing
        slot = idx % self.shape.flights_per_route  # morning, midday, evening waves
        dep = 6 * 60 + slot * 300 + self.h.below(u, 21, 36) * 5
        arr = (dep + np.round(minutes_in_air / 5).astype(np.int64) * 5) % (24 * 60)
        days = self.h.below(u, 22, len(_DAY_PATTERNS)).tolist()
        columns = (idx.tolist(), route.tolist(), dep.tolist(), arr.tolist(), days)
        return [
            {"ID": i + 1, "route_ID": r + 1, "departure": f"{d // 60:02d}:{d % 60:02d}",
             "arrival": f"{a // 60:02d}:{a % 60:02d}", "daysOfWeek": _DAY_PATTERNS[k]}
            for i, r, d, a, k in zip(*columns, strict=True)
        ]  # fmt: skip


ROUTE_MODES = ("bus", "tram", "train", "ferry", "flight")


class GeneratedRows(Sequence[Row]):
    """A read-only sequence whose rows are generated on demand, in ascending key order.

    ``sorted_by`` tells the server it may page ``$orderby=<key>`` without sorting (and thereby
    materialising) the whole set.
    """

    def __init__(self, length: int, make: Callable[[int, int], list[Row]], key: str = "ID"):
        self._length = length
        self._make = make
        self.sorted_by = key

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> Row: ...

    @overload
    def __getitem__(self, index: slice) -> list[Row]: ...

    def __getitem__(self, index: int | slice) -> Row | list[Row]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._length)
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return self._make(start, stop) if start < stop else []
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(index)
        return self._make(index, index + 1)[0]

    def __iter__(self) -> Iterator[Row]:
        chunk = 8192
        for start in range(0, self._length, chunk):
            yield from self._make(start, min(start + chunk, self._length))

    def __repr__(self) -> str:
        return f"<GeneratedRows len={self._length}>"


def change_row(row: Row) -> None:
    """Change one field of a sample row in place (a stop's name, a route's mode, a flight's
    days): how the benchmarks make a feed with a share of its rows changed."""
    if "name" in row:
        row["name"] = "changed 67"
    elif "mode" in row:
        row["mode"] = "bus" if row["mode"] != "bus" else "tram"
    else:
        row["daysOfWeek"] = "67" if row["daysOfWeek"] != "67" else "12345"


def _changing(make: Callable[[int, int], list[Row]], every: int
              ) -> Callable[[int, int], list[Row]]:
    def changed(start: int, stop: int) -> list[Row]:
        rows = make(start, stop)
        for i in range(-start % every, len(rows), every):
            change_row(rows[i])
        return rows
    return changed


def sample_network_lazy(
    n_stops: int, seed: int = 0, *, routes_per_stop: int = 2, flights_per_route: int = 3,
    changed_every: int = 0,
) -> dict[str, GeneratedRows]:
    """The network of :func:`sample_network` as lazily generated sequences (O(1) memory);
    with ``changed_every`` N, every Nth row of each set is changed (see :func:`change_row`)."""
    if n_stops < 0 or routes_per_stop < 1 or flights_per_route < 1 or changed_every < 0:
        raise ValueError("n_stops and changed_every must be >= 0, routes_per_stop and "
                         "flights_per_route >= 1")
    shape = NetworkShape(n_stops, routes_per_stop, flights_per_route)
    gen = _Generator(shape, seed)
    makers = {"Stops": (shape.n_stops, gen.stops), "Routes": (shape.n_routes, gen.routes),
              "Flights": (shape.n_flights, gen.flights)}
    return {name: GeneratedRows(n, _changing(make, changed_every) if changed_every else make)
            for name, (n, make) in makers.items()}


def sample_network(
    n_stops: int, seed: int = 0, *, routes_per_stop: int = 2, flights_per_route: int = 3
) -> dict[str, list[Row]]:
    """A plausible, deterministic Finnish transport network as plain lists of row dicts.

    Stops cluster around the cities in :data:`CITIES` (the first stops are the airports in
    :data:`AIRPORTS`, ``isAirport`` true); with 200+ stops each of the larger cities gets 10+.
    There are ``routes_per_stop * n_stops`` routes (bus, tram, train, ferry; every 25th is a
    flight between two airports) with great-circle ``distanceKm``, and ``flights_per_route``
    flights per flight route with "HH:MM" times and ``daysOfWeek`` like "12345".
    Same arguments, same rows.
    """
    lazy = sample_network_lazy(
        n_stops, seed, routes_per_stop=routes_per_stop, flights_per_route=flights_per_route
    )
    return {name: rows[:] for name, rows in lazy.items()}


def trippin_airports(stops: Sequence[Row]) -> list[Row]:
    """Sample stops in the shape of the Airports of TripPin, OData's V4 sample service
    (services.odata.org/TripPinRESTierService): the key ``IcaoCode`` (the stop's ID as text,
    so the routes still name them) and the city's name and the position, a GeoJSON point
    (``[longitude, latitude]``), inside the complex ``Location``."""
    return [
        {"IcaoCode": str(s["ID"]), "Name": s["name"], "IataCode": f"X{s['ID']:02d}",
         "Location": {"Address": f"{s['ID']} Asematie", "City": {
             "Name": s["city"], "CountryRegion": "Finland", "Region": "Uusimaa"},
             "Loc": {"type": "Point", "coordinates": [s["longitude"], s["latitude"]],
                     "crs": {"type": "name", "properties": {"name": "EPSG:4326"}}}}}
        for s in stops
    ]  # fmt: skip


# -- feed files --------------------------------------------------------------------------
def write_feed(
    path: str | os.PathLike[str],
    data: Mapping[str, Sequence[Mapping[str, Any]]],
    keys: Mapping[str, str] | None = None,
) -> None:
    """Write entity sets to a feed file: ``{"format", "keys", "sets": {name: [rows]}}``."""
    payload = {
        "format": FEED_FORMAT,
        "keys": dict(keys or {}),
        "sets": {name: [dict(r) for r in rows] for name, rows in data.items()},
    }
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(payload, fh, ensure_ascii=False, separators=(",", ":"))
    tmp.replace(target)


def read_feed(path: str | os.PathLike[str]) -> tuple[dict[str, list[Row]], dict[str, str]]:
    """Read a feed file back as ``(sets, keys)``.

    A bare ``{"Stops": [...], ...}`` object is accepted too (keys then default to ``ID``).
    """
    with Path(path).open(encoding="utf-8") as fh:
        payload = json.load(fh)
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: a feed file holds a JSON object")
    if "sets" in payload:
        sets, keys = payload["sets"], payload.get("keys") or {}
    else:
        sets, keys = payload, {}
    if not isinstance(sets, dict) or not all(
        isinstance(rows, list) and all(isinstance(r, dict) for r in rows) for rows in sets.values()
    ):
        raise ValueError(f"{path}: 'sets' must map set names to lists of objects")
    return sets, dict(keys)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.odata_data",
        description="Write a sample network feed file for the OData fixture server.",
    )
    parser.add_argument("n_stops", type=int, help="number of stops to generate")
    parser.add_argument("-o", "--out", type=Path, required=True, help="feed file to write")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    args = parser.parse_args(argv)
    write_feed(args.out, sample_network(args.n_stops, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
