"""Route mode names: normalising, the aliases of the common vocabularies, user speeds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline_cli.modes import (
    ALIASES,
    DEFAULT_SPEEDS_KMH,
    canonical,
    describe_unknown,
    duplicate_names,
    normalise,
    speed_table,
    unknown_modes,
)
from pipeline_cli.settings import load_settings


@pytest.mark.parametrize(("names", "mode"), [
    (["tram", "Streetcar", "light-rail", "Light Rail", "Tram Service", "Cable Tram"], "tram"),
    (["subway", "METRO", "Underground", "U-Bahn", "Underground Service", "Metro Service",
      "Urban Railway Service"], "subway"),
    (["rail", "Train", "railway", "Railroad", "commuter_rail", "Commuter Rail", "S-Bahn",
      "Railway Service", "Suburban Railway", "Regional Rail Service"], "rail"),
    (["bus", "coach", "trolleybus", "trolleyBus", "Trolleybus Service", "Bus Service",
      "Coach Service", "minibus", "BRT", "Bus Rapid Transit"], "bus"),
    (["ferry", "Boat", "ship", "water", "Water Transport Service", "Ferry Service",
      "water_taxi", "Water Taxi"], "ferry"),
    (["cable_car", "gondola", "aerial lift", "Aerial-Lift", "aerialway", "cableway", "telecabin",
      "Telecabin Service", "lift", "Aerial Lift Service", "Cable Car Service"], "cable_car"),
    (["funicular", "Funicular Service"], "funicular"), (["monorail"], "monorail"),
    (["air", "flight", "Plane", "airplane", "aeroplane", "aircraft", "Air Service"], "air"),
    (["walk", " Walk "], "walk"),
])
def test_common_vocabularies_have_a_default_speed(names: list[str], mode: str) -> None:
    speeds = speed_table({})
    assert {canonical(n) for n in names} == {mode}
    assert speeds[mode] > 0
    assert unknown_modes(dict.fromkeys(names, 1), speeds) == {}


@pytest.mark.parametrize("name", [
    "taxi", "Taxi Service", "share_taxi", "shuttle", "intercity", "High Speed Rail Service",
    "high-speed rail", "snowAndIce", "other", "service", "_service", "3", "700", "trolley",
])
def test_names_whose_mode_or_speed_would_be_a_guess_stay_unknown(name: str) -> None:
    """An intercity is a train or a bus, a high-speed train three times rail's speed, a taxi
    no route at all; numbers are GTFS route_type codes only perhaps (docs/decisions.md). They
    fail build-graph loudly instead of weighing routes wrongly in silence."""
    assert canonical(name) not in speed_table({})
    assert unknown_modes({name: 1}, speed_table({})) == {normalise(name): 1}


def test_a_trailing_service_is_gtfs_wording_and_the_setting_takes_either_name() -> None:
    assert canonical("Taxi Service") == canonical("taxi") == "taxi"
    assert canonical("service") == "service" and canonical("-service") == "_service"
    speeds = speed_table({"taxi_service": 30})  # as the unknown-modes message suggests it
    assert unknown_modes({"Taxi Service": 2, "taxi": 1}, speeds) == {}
    assert duplicate_names({"bus": 40, "Bus Service": 30}) == ["bus", "Bus Service"]


def test_aliases_name_built_in_modes_by_normalised_keys() -> None:
    for alias, mode in ALIASES.items():
        assert normalise(alias) == alias and not alias.endswith("_service"), alias
        assert mode in DEFAULT_SPEEDS_KMH and alias not in DEFAULT_SPEEDS_KMH, alias


def test_the_table_in_the_docs_is_the_aliases_and_speeds() -> None:
    text = (Path(__file__).parents[1] / "docs" / "build-graph.md").read_text(encoding="utf-8")
    table = text.split("| mode | aliases | default km/h |", 1)[1].split("\n\n", 1)[0]
    documented: dict[str, tuple[set[str], float]] = {}
    for row in table.strip().splitlines()[1:]:
        mode, aliases, speed = (c.strip() for c in row.strip("|").split("|"))
        names = set(re.findall(r"`([a-z_]+)`", aliases))
        documented[re.findall(r"`([a-z_]+)`", mode)[0]] = (names, float(speed))
    assert documented == {m: ({a for a, to in ALIASES.items() if to == m}, v)
                          for m, v in DEFAULT_SPEEDS_KMH.items()}


def test_configured_speeds_merge_over_the_defaults_by_any_name() -> None:
    speeds = speed_table({"Train": 120, "hovercraft": 60})
    assert speeds["rail"] == 120 and speeds["hovercraft"] == 60 and speeds["bus"] == 40
    assert unknown_modes({"Hovercraft": 2, "zeppelin": 1, "Zeppelin": 2, None: 1}, speeds) == {
        "zeppelin": 3, "": 1}


def test_the_unknown_modes_message_names_counts_and_the_setting() -> None:
    text = describe_unknown({"zeppelin": 3, "sky lift": 1})
    assert "'zeppelin' (3 routes), 'sky lift' (1 route)" in text
    assert '[virtual] speeds_kmh' in text and 'zeppelin = 60, "sky lift" = 60' in text
    assert """PIPELINE_VIRTUAL_SPEEDS_KMH='{"zeppelin": 60, "sky lift": 60}'""" in text


def test_routes_without_a_mode_are_named_so() -> None:
    text = describe_unknown({"": 2})
    assert "'' (2 routes without a mode)" in text and '"" = 60' in text


def test_settings_need_positive_speeds_and_one_name_per_mode() -> None:
    assert load_settings(environ={"PIPELINE_VIRTUAL_SPEEDS_KMH": '{"rail": 100}'})
    for bad, why in (('{"rail": 0}', "must be 0.1 to 10000 km/h, got 0"),
                     ('{"bus": 1e-310}', "must be 0.1 to 10000 km/h, got 1e-310"),
                     ('{"bus": 1e9}', "must be 0.1 to 10000 km/h"),
                     ('{"train": 90, "Rail": 100}', "name the same mode")):
        with pytest.raises(Exception, match=why):
            load_settings(environ={"PIPELINE_VIRTUAL_SPEEDS_KMH": bad})
