"""Route modes: the one place that turns a feed's mode name into a speed.

build-graph weighs a real route without a scheduled flight by ``distance ÷ speed of its
mode``; sync-odata uses the same lookup to note modes that have no speed. Names are compared
normalised (lower case, ``-`` and spaces as ``_``) and through the aliases of the common
vocabularies (GTFS route type names, NeTEx, OpenStreetMap); ``[virtual] speeds_kmh`` is
merged over the built-in speeds, so it can change a speed or add a mode.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

SETTING = "[virtual] speeds_kmh"
ENV_VAR = "PIPELINE_VIRTUAL_SPEEDS_KMH"

# km/h by canonical mode; 'virtual' weighs gen-virtual's routes, 'walk' its short ones.
DEFAULT_SPEEDS_KMH: dict[str, float] = {
    "walk": 5.0, "bus": 40.0, "tram": 20.0, "subway": 35.0, "rail": 90.0, "ferry": 30.0,
    "cable_car": 15.0, "funicular": 10.0, "monorail": 40.0, "air": 700.0, "virtual": 50.0,
}

# Names of the common vocabularies (GTFS route type names, NeTEx/Transmodel modes,
# OpenStreetMap route=*, plain English) that name one of the modes above, and only those:
# a name whose mode or speed is a guess has no alias (intercity: a train or a bus;
# high_speed_rail: two to three times rail's speed; shuttle, taxi, share_taxi), so that it
# fails build-graph loudly, naming the setting, instead of weighing routes wrongly in silence.
# Keys are normalised, and without GTFS's "Service" (see canonical).
ALIASES: dict[str, str] = {
    "streetcar": "tram", "light_rail": "tram", "cable_tram": "tram",
    "metro": "subway", "underground": "subway", "u_bahn": "subway", "urban_railway": "subway",
    "train": "rail", "railway": "rail", "railroad": "rail", "commuter_rail": "rail",
    "suburban_railway": "rail", "regional_rail": "rail", "s_bahn": "rail",
    "coach": "bus", "trolleybus": "bus", "trolley_bus": "bus", "minibus": "bus", "brt": "bus",
    "bus_rapid_transit": "bus",
    "boat": "ferry", "ship": "ferry", "water": "ferry", "water_transport": "ferry",
    "water_taxi": "ferry",
    "gondola": "cable_car", "aerial_lift": "cable_car", "aerialway": "cable_car",
    "cableway": "cable_car", "telecabin": "cable_car", "lift": "cable_car",
    "flight": "air", "plane": "air", "airplane": "air", "aeroplane": "air", "aircraft": "air",
}


def normalise(mode: str | None) -> str:
    """``' Light-Rail '`` -> ``'light_rail'``; None -> ``''``. An OData enum member's name
    too: ``LightRail`` (ASP.NET Core's CLR names, NeTEx's camelCase) and ``Light_x0020_Rail``
    (XML-encoded, as Business Central's API v2.0 writes a blank)."""
    name = re.sub(r"_x([0-9A-Fa-f]{4})_", lambda m: chr(int(m.group(1), 16)), mode or "")
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name.strip())
    return re.sub(r"[-\s]+", "_", name.lower())


def canonical(mode: str | None) -> str:
    """The normalised name without a trailing ``_service`` (GTFS's extended route type
    names: ``Railway Service``, ``Tram Service``), with an alias replaced by the mode it
    names."""
    name = normalise(mode)
    if name.endswith("_service") and len(name) > len("_service"):
        name = name[:-len("_service")]
    return ALIASES.get(name, name)


def speed_table(configured: Mapping[str, float]) -> dict[str, float]:
    """Canonical mode -> km/h: the built-in speeds with ``configured`` merged over them."""
    table = {canonical(k): float(v) for k, v in DEFAULT_SPEEDS_KMH.items()}
    table.update({canonical(k): float(v) for k, v in configured.items()})
    return table


def duplicate_names(configured: Mapping[str, float]) -> list[str]:
    """Keys of ``configured`` that name the same mode (``train`` and ``Rail``)."""
    seen: dict[str, str] = {}
    for key in configured:
        if canonical(key) in seen:
            return [seen[canonical(key)], key]
        seen[canonical(key)] = key
    return []


def unknown_modes(route_counts: Mapping[str | None, int], speeds: Mapping[str, float]
                  ) -> dict[str, int]:
    """Normalised mode -> routes, for the modes of ``route_counts`` that ``speeds`` (a
    :func:`speed_table`) has no speed for; most routes first."""
    unknown: dict[str, int] = {}
    for mode, n in route_counts.items():
        if canonical(mode) not in speeds:
            unknown[normalise(mode)] = unknown.get(normalise(mode), 0) + int(n)
    return dict(sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0])))


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def describe_unknown(unknown: Mapping[str, int]) -> str:
    """``no speed for route mode 'x' (3 routes), ...; add ...``: which modes, how many
    routes each, and the exact setting to add them to."""
    unknown = dict(sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0])))
    listed = ", ".join(f"{m!r} ({n} route{'s' if n != 1 else ''}"
                       + (" without a mode" if not m else "") + ")" for m, n in unknown.items())
    toml = ", ".join(f"{_toml_key(m)} = 60" for m in unknown)
    env = json.dumps(dict.fromkeys(unknown, 60))
    plural = "s" if len(unknown) != 1 else ""
    return (f"no speed for route mode{plural} {listed}; add a speed in km/h to {SETTING}, "
            f"e.g. speeds_kmh = {{ {toml} }} under [virtual] in the config file, or "
            f"{ENV_VAR}='{env}'")
