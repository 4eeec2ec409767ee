"""Route mode names: normalising, the aliases of the common vocabularies, user speeds."""

from __future__ import annotations

import pytest

from pipeline_cli.modes import canonical, describe_unknown, speed_table, unknown_modes
from pipeline_cli.settings import load_settings


@pytest.mark.parametrize(("names", "mode"), [
    (["tram", "Streetcar", "light-rail", "Light Rail"], "tram"),
    (["subway", "METRO"], "subway"), (["rail", "Train"], "rail"),
    (["bus", "coach", "trolleybus"], "bus"), (["ferry", "Boat"], "ferry"),
    (["cable_car", "gondola", "aerial lift", "Aerial-Lift"], "cable_car"),
    (["funicular"], "funicular"), (["monorail"], "monorail"),
    (["air", "flight", "Plane"], "air"), (["walk", " Walk "], "walk"),
])
def test_common_vocabularies_have_a_default_speed(names: list[str], mode: str) -> None:
    speeds = speed_table({})
    assert {canonical(n) for n in names} == {mode}
    assert speeds[mode] > 0
    assert unknown_modes(dict.fromkeys(names, 1), speeds) == {}


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
