"""Google encoded polylines, the format of ``cached_polylines.encoded_polyline``.

OSRM returns matched geometries in this format (``geometries=polyline``); match-gps decodes them
to cut and stitch chunk results, then encodes the stitched line again. Points are (lat, lon).
The codec is the `polyline` package; this module only makes malformed input a ValueError, which
the package lets through as an IndexError (truncated) or as made-up points (bad characters).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import polyline as _codec

PRECISION = 5


def encode(points: Iterable[Sequence[float]], precision: int = PRECISION) -> str:
    """Encode (lat, lon) pairs as a Google polyline string."""
    pairs = [(p[0], p[1]) for p in points]
    return str(_codec.encode(pairs, precision)) if pairs else ""  # the package fails on []


def decode(text: str, precision: int = PRECISION) -> list[tuple[float, float]]:
    """Decode a Google polyline string into (lat, lon) pairs.

    Raises ValueError for a truncated or malformed string.
    """
    bad = next((i for i, ch in enumerate(text) if not 63 <= ord(ch) <= 126), None)
    if bad is not None:
        raise ValueError(f"invalid polyline character at {bad}")
    try:
        return [(float(lat), float(lon)) for lat, lon in _codec.decode(text, precision)]
    except IndexError:
        raise ValueError("truncated polyline") from None
