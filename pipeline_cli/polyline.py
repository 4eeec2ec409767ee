"""Google encoded polylines (precision 5), the format of ``cached_polylines.encoded_polyline``.

OSRM returns matched geometries in this format (``geometries=polyline``); match-gps decodes them
to cut and stitch chunk results, then encodes the stitched line again. Points are (lat, lon).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

PRECISION = 5


def _round(value: float, factor: float) -> int:
    # Google's reference rounds half away from zero (Math.round on the absolute value).
    scaled = abs(value) * factor
    n = int(math.floor(scaled + 0.5))
    return -n if value < 0 else n


def _encode_value(value: int, out: list[str]) -> None:
    value = ~(value << 1) if value < 0 else value << 1
    while value >= 0x20:
        out.append(chr((0x20 | (value & 0x1F)) + 63))
        value >>= 5
    out.append(chr(value + 63))


def encode(points: Iterable[Sequence[float]], precision: int = PRECISION) -> str:
    """Encode (lat, lon) pairs as a Google polyline string."""
    factor = 10.0**precision
    out: list[str] = []
    prev_lat = prev_lon = 0
    for point in points:
        lat, lon = _round(point[0], factor), _round(point[1], factor)
        _encode_value(lat - prev_lat, out)
        _encode_value(lon - prev_lon, out)
        prev_lat, prev_lon = lat, lon
    return "".join(out)


def decode(text: str, precision: int = PRECISION) -> list[tuple[float, float]]:
    """Decode a Google polyline string into (lat, lon) pairs.

    Raises ValueError for a truncated or malformed string.
    """
    factor = 10.0**precision
    points: list[tuple[float, float]] = []
    index, lat, lon, length = 0, 0, 0, len(text)
    while index < length:
        deltas = []
        for _ in range(2):
            shift = result = 0
            while True:
                if index >= length:
                    raise ValueError("truncated polyline")
                byte = ord(text[index]) - 63
                index += 1
                if byte < 0 or byte > 63:
                    raise ValueError(f"invalid polyline character at {index - 1}")
                result |= (byte & 0x1F) << shift
                shift += 5
                if byte < 0x20:
                    break
            deltas.append(~(result >> 1) if result & 1 else result >> 1)
        lat += deltas[0]
        lon += deltas[1]
        points.append((lat / factor, lon / factor))
    return points
