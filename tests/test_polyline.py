"""Google polyline precision 5: the reference example, round trips and malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline_cli import polyline

GOOGLE_EXAMPLE = [(38.5, -120.2), (40.7, -120.95), (43.252, -126.453)]


def test_encodes_googles_reference_example() -> None:
    assert polyline.encode(GOOGLE_EXAMPLE) == "_p~iF~ps|U_ulLnnqC_mqNvxq`@"


def test_decodes_googles_reference_example() -> None:
    assert polyline.decode("_p~iF~ps|U_ulLnnqC_mqNvxq`@") == GOOGLE_EXAMPLE


def test_empty() -> None:
    assert polyline.encode([]) == ""
    assert polyline.decode("") == []


def test_rounds_half_away_from_zero() -> None:
    assert polyline.decode(polyline.encode([(0.000005, -0.000005)])) == [(0.00001, -0.00001)]


@pytest.mark.parametrize("bad", ["_p~iF~ps|U_", "_p~iF", "\x01\x02"])
def test_malformed_raises_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        polyline.decode(bad)


coords = st.tuples(st.floats(-90, 90), st.floats(-180, 180))


@given(st.lists(coords, max_size=50))
def test_round_trip_within_precision(points: list[tuple[float, float]]) -> None:
    decoded = polyline.decode(polyline.encode(points))
    assert len(decoded) == len(points)
    for (lat, lon), (dlat, dlon) in zip(points, decoded, strict=True):
        assert abs(lat - dlat) <= 0.5e-5 + 1e-9
        assert abs(lon - dlon) <= 0.5e-5 + 1e-9
