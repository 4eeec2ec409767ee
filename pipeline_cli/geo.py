"""The vectorised spatial core of gen-virtual: unit vectors, great-circle distances, grids in
real kilometres on the sphere and nearest-neighbour search on 3-D unit vectors.

Everything works on numpy arrays; nothing loops over pairs of points in Python. Distances are
great-circle kilometres on a sphere of :data:`EARTH_RADIUS_KM`. Nearest neighbours come from a
KD-tree on 3-D unit vectors, where the straight-line (chord) distance is monotonic in the
great-circle distance, so the antimeridian and the poles need no special case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # scipy.spatial takes about 0.4 s to import: `status` and `--help` need none
    from scipy.spatial import cKDTree

EARTH_RADIUS_KM = 6371.0088  # IUGG mean radius

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


# ---------------------------------------------------------------- conversions


def unit_vectors(lat_deg: npt.ArrayLike, lon_deg: npt.ArrayLike) -> FloatArray:
    """(n, 3) unit vectors for latitudes/longitudes in degrees."""
    lat = np.radians(np.asarray(lat_deg, dtype=np.float64))
    lon = np.radians(np.asarray(lon_deg, dtype=np.float64))
    cos_lat = np.cos(lat)
    return np.stack((cos_lat * np.cos(lon), cos_lat * np.sin(lon), np.sin(lat)), axis=-1)


def to_latlon(xyz: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Latitude and longitude in degrees of (n, 3) vectors (normalised first)."""
    v = np.asarray(xyz, dtype=np.float64)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    lat = np.degrees(np.arcsin(np.clip(v[..., 2], -1.0, 1.0)))
    lon = np.degrees(np.arctan2(v[..., 1], v[..., 0]))
    return lat, lon


def haversine_km(lat1: npt.ArrayLike, lon1: npt.ArrayLike, lat2: npt.ArrayLike,
                 lon2: npt.ArrayLike) -> FloatArray:
    """Great-circle distance in km, broadcasting over its arguments (degrees)."""
    p1, p2 = np.radians(np.asarray(lat1, dtype=np.float64)), np.radians(
        np.asarray(lat2, dtype=np.float64))
    dlat = p2 - p1
    dlon = np.radians(np.asarray(lon2, dtype=np.float64) - np.asarray(lon1, dtype=np.float64))
    a = np.sin(dlat / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlon / 2) ** 2
    return np.asarray(2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0))))


def km_to_chord(km: npt.ArrayLike) -> FloatArray:
    """Chord length between unit vectors that are ``km`` apart on the surface."""
    angle = np.minimum(np.asarray(km, dtype=np.float64) / EARTH_RADIUS_KM, np.pi)
    return np.asarray(2.0 * np.sin(angle / 2.0))


def chord_to_km(chord: npt.ArrayLike) -> FloatArray:
    """Great-circle km between unit vectors whose chord is ``chord``."""
    c = np.clip(np.asarray(chord, dtype=np.float64), 0.0, 2.0)
    return np.asarray(2.0 * EARTH_RADIUS_KM * np.arcsin(c / 2.0))


def centroid(lat_deg: npt.ArrayLike, lon_deg: npt.ArrayLike) -> tuple[float, float]:
    """The spherical centroid (normalised mean unit vector): correct across the antimeridian."""
    mean = unit_vectors(lat_deg, lon_deg).mean(axis=0)
    if not np.linalg.norm(mean) > 1e-12:  # antipodal points: fall back to the first point
        return float(np.atleast_1d(lat_deg)[0]), float(np.atleast_1d(lon_deg)[0])
    lat, lon = to_latlon(mean)
    return float(lat), float(lon)


def group_centroids(group: IntArray, lat_deg: FloatArray, lon_deg: FloatArray, n_groups: int
                    ) -> tuple[FloatArray, FloatArray]:
    """Spherical centroid of every group (``group`` holds 0..n_groups-1 per point)."""
    xyz = unit_vectors(lat_deg, lon_deg)
    sums = np.zeros((n_groups, 3))
    np.add.at(sums, group, xyz)
    return to_latlon(sums)


def chained(group: IntArray, lat_deg: FloatArray, lon_deg: FloatArray, link_km: float
            ) -> IntArray:
    """A label per point: points of one group that a chain of steps of about ``link_km`` or
    less joins share a label, those of different groups never do. Single linkage over the
    cells, ``link_km / 2`` wide, that the points fall in: a dense city costs its cells, not
    its stops squared."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    grid = Grid(link_km / 2)
    rows, cols = grid.nearest_cells(lat_deg, lon_deg)
    cells, first, back = np.unique(np.column_stack([group, cell_keys(rows, cols)]), axis=0,
                                   return_index=True, return_inverse=True)
    xyz = unit_vectors(*grid.points(rows[first], cols[first])).reshape(-1, 3)
    # A 4th coordinate 4 apart per group (a chord is at most 2): the tree pairs only cells of
    # one group. Pairing every cell with every other one and keeping those of one group cost
    # the square of the names in reach: a city column that holds each stop's own name in a
    # metro of 20,000 stops asked for 200 M pairs (MemoryError, or the OOM killer).
    rank = np.unique(cells[:, 0], return_inverse=True)[1].ravel()
    xyzg = np.column_stack([xyz, 4.0 * rank])
    pairs = cKDTree(xyzg).query_pairs(float(km_to_chord(link_km)), output_type="ndarray")
    links = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                       shape=(len(cells), len(cells)))
    label: IntArray = connected_components(links, directed=False)[1]
    return label[back.ravel()]


# ---------------------------------------------------------------- grids


_KEY_OFFSET = 1 << 31


def cell_keys(rows: IntArray, cols: IntArray) -> IntArray:
    """One int64 per (row, col) cell, for sorting and de-duplication."""
    return (rows.astype(np.int64) + _KEY_OFFSET) * (1 << 32) + (cols.astype(np.int64)
                                                                + _KEY_OFFSET)


@dataclass(frozen=True)
class Grid:
    """A global grid with ``spacing_km`` between neighbours in real kilometres.

    Rows are parallels ``spacing_km`` apart along the meridian (row 0 is the equator). Each row
    holds a whole number of columns around the globe, ``round(circumference / spacing)``, so
    the east-west spacing is the setting corrected for latitude, and the ring closes at the
    antimeridian without a short seam. Column 0 is the prime meridian; column indices run
    from ``-(n // 2)`` so longitudes stay in [-180, 180). A cell ``(row, col)`` is the same
    point for every dataset, which is what makes virtual stop ids deterministic.

    Towards the poles a ring holds few columns and the rounding error grows: it stays within
    1 % of the spacing while a ring holds at least 50 columns (below about 86.4 degrees of
    latitude for a 50 km grid).
    """

    spacing_km: float

    @property
    def dlat_deg(self) -> float:
        return float(np.degrees(self.spacing_km / EARTH_RADIUS_KM))

    @property
    def max_row(self) -> int:
        return int(np.floor(90.0 / self.dlat_deg + 1e-9))

    def row_lat(self, rows: npt.ArrayLike) -> FloatArray:
        return np.clip(np.asarray(rows, dtype=np.float64) * self.dlat_deg, -90.0, 90.0)

    def row_columns(self, rows: npt.ArrayLike) -> IntArray:
        """Columns around the globe in each row (at least 1, at a pole exactly 1)."""
        circumference = 2 * np.pi * EARTH_RADIUS_KM * np.cos(np.radians(self.row_lat(rows)))
        return np.maximum(1, np.rint(circumference / self.spacing_km)).astype(np.int64)

    def canonical_cols(self, rows: IntArray, cols: IntArray) -> IntArray:
        n = self.row_columns(rows)
        half = n // 2
        return np.mod(cols + half, n) - half

    def points(self, rows: IntArray, cols: IntArray) -> tuple[FloatArray, FloatArray]:
        """Latitude and longitude (degrees) of cells; ``cols`` must be canonical."""
        n = self.row_columns(rows)
        # Multiply before dividing: column -n/2 lands on exactly -180, never a hair below.
        lon = np.clip(cols.astype(np.float64) * 360.0 / n, -180.0, 180.0)
        return self.row_lat(rows), lon

    def nearest_cells(self, lat_deg: npt.ArrayLike, lon_deg: npt.ArrayLike
                      ) -> tuple[IntArray, IntArray]:
        """The cell whose grid point is nearest along the row/column axes."""
        rows = np.clip(np.rint(np.asarray(lat_deg, dtype=np.float64) / self.dlat_deg),
                       -self.max_row, self.max_row).astype(np.int64)
        n = self.row_columns(rows)
        cols = np.rint(np.asarray(lon_deg, dtype=np.float64) / (360.0 / n)).astype(np.int64)
        return rows, self.canonical_cols(rows, cols)

    def _expand(self, rows: IntArray, west: FloatArray, east: FloatArray
                ) -> tuple[IntArray, IntArray, IntArray]:
        """Every cell of each (row, [west, east] longitude span); also the span index.

        ``east - west`` may exceed 360 or cross the antimeridian; a row never yields a cell
        twice because the count is capped at the ring size.
        """
        n = self.row_columns(rows)
        step = 360.0 / n
        first = np.floor(west / step + 1e-9).astype(np.int64)
        last = np.ceil(east / step - 1e-9).astype(np.int64)
        count = np.minimum(last - first + 1, n)
        count = np.maximum(count, 0)
        owner = np.repeat(np.arange(rows.size, dtype=np.int64), count)
        starts = np.cumsum(count) - count
        offset = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(starts, count)
        out_rows = rows[owner]
        cols = self.canonical_cols(out_rows, first[owner] + offset)
        return owner, out_rows, cols

    def _box_rows(self, lat_min: float, lat_max: float) -> IntArray:
        lo = max(int(np.floor(lat_min / self.dlat_deg + 1e-9)), -self.max_row)
        hi = min(int(np.ceil(lat_max / self.dlat_deg - 1e-9)), self.max_row)
        return np.arange(lo, hi + 1, dtype=np.int64)

    def cells_in_box(self, lat_min: float, lat_max: float, west: float, width: float
                     ) -> tuple[IntArray, IntArray]:
        """Cells covering a latitude band and a longitude arc, snapped outwards to grid lines.

        The arc runs east from ``west`` for ``width`` degrees and may cross the antimeridian.
        """
        rows = self._box_rows(lat_min, lat_max)
        west_a = np.full(rows.size, float(west))
        _owner, out_rows, cols = self._expand(rows, west_a, west_a + float(width))
        return out_rows, cols

    def cells_within(self, lat_deg: npt.ArrayLike, lon_deg: npt.ArrayLike, radius_km: float
                     ) -> tuple[IntArray, IntArray]:
        """Every cell whose point lies within ``radius_km`` of at least one of the points,
        each once, by (row, column).

        Works on one centre per occupied cell and on row spans (see :meth:`_spans`), so a
        dense network costs no more than a sparse one; a KD-tree query on the points decides
        the cells near the edge of the reach.
        """
        lat = np.atleast_1d(np.asarray(lat_deg, dtype=np.float64))
        lon = np.atleast_1d(np.asarray(lon_deg, dtype=np.float64))
        if lat.size == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        clat, clon, margin = self._thin(lat, lon)
        rows, first, count = self._spans(clat, clon, radius_km + margin, inner=False)
        owner = np.repeat(np.arange(rows.size, dtype=np.int64), count)
        starts = np.cumsum(count) - count
        out_rows = rows[owner]
        cols = first[owner] + np.arange(int(count.sum()), dtype=np.int64) - np.repeat(starts,
                                                                                   count)
        # By the triangle inequality a cell within radius - margin of a centre is within
        # radius of a point: only the cells outside those spans need the KD-tree query.
        check = np.ones(out_rows.size, dtype=bool)
        if radius_km > margin:
            srows, sfirst, scount = self._spans(clat, clon, radius_km - margin, inner=True)
            span_start = self._span_key(srows, sfirst)
            key = self._span_key(out_rows, cols)
            j = np.searchsorted(span_start, key, side="right") - 1
            sure = (j >= 0) & (key < span_start[np.maximum(j, 0)] + scount[np.maximum(j, 0)])
            check = ~sure
        cols = self.canonical_cols(out_rows, cols)
        keep = ~check
        plat, plon = self.points(out_rows[check], cols[check])
        km, _ = PointIndex(lat, lon).nearest(plat, plon, max_km=radius_km)
        keep[check] = km[:, 0] <= radius_km * (1 + 1e-12)
        return out_rows[keep], cols[keep]

    def count_near(self, lat_deg: npt.ArrayLike, lon_deg: npt.ArrayLike, radius_km: float
                   ) -> int:
        """An upper bound on the cells :meth:`cells_within` gives, without building them."""
        lat = np.atleast_1d(np.asarray(lat_deg, dtype=np.float64))
        lon = np.atleast_1d(np.asarray(lon_deg, dtype=np.float64))
        if lat.size == 0:
            return 0
        clat, clon, margin = self._thin(lat, lon)
        return int(self._spans(clat, clon, radius_km + margin, inner=False)[2].sum())

    def _thin(self, lat: FloatArray, lon: FloatArray) -> tuple[FloatArray, FloatArray, float]:
        """One centre per occupied cell (a network has many stops per cell): the cells'
        points, and the farthest any point lies from its cell's point."""
        rows, cols = self.nearest_cells(lat, lon)
        _keys, first = np.unique(cell_keys(rows, cols), return_index=True)
        plat, plon = self.points(rows, cols)
        margin = float(haversine_km(lat, lon, plat, plon).max())
        return plat[first], plon[first], margin

    def _span_key(self, rows: IntArray, cols: IntArray) -> IntArray:
        """Orders cells by row, then column 0 .. n-1."""
        return (rows + self.max_row) * np.int64(1 << 32) + cols

    def _spans(self, clat: FloatArray, clon: FloatArray, radius_km: float, *, inner: bool
               ) -> tuple[IntArray, IntArray, IntArray]:
        """Disjoint spans of cells ``(row, first column, count)``, sorted, covering the cells
        within ``radius_km`` of the centres: all of them and a few more (``inner=False``), or
        only such cells (``inner=True``). Columns count eastwards from the prime meridian,
        0 .. n-1, so a span never crosses the end of its ring.
        """
        delta = min(radius_km / EARTH_RADIUS_KM, np.pi)
        rdeg = np.degrees(delta)
        lo = np.maximum(np.floor((clat - rdeg) / self.dlat_deg), -self.max_row)
        hi = np.minimum(np.ceil((clat + rdeg) / self.dlat_deg), self.max_row)
        nrows = np.maximum(hi - lo + 1, 0).astype(np.int64)
        centre = np.repeat(np.arange(clat.size, dtype=np.int64), nrows)
        starts = np.cumsum(nrows) - nrows
        rows = (np.repeat(lo.astype(np.int64), nrows)
                + np.arange(int(nrows.sum()), dtype=np.int64) - np.repeat(starts, nrows))
        # Where the cap of angular radius delta crosses the row's parallel: half-width
        # arccos(ratio) around the centre's longitude (spherical law of cosines). ratio <= -1:
        # the cap holds the whole ring; > 1: it misses the row. At a pole (the row's or the
        # centre's) the row is all in or all out: in when num <= 0.
        phi, phic = np.radians(self.row_lat(rows)), np.radians(clat[centre])
        denom = np.cos(phi) * np.cos(phic)
        num = np.cos(delta) - np.sin(phi) * np.sin(phic)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(denom > 1e-12, num / denom, np.where(num <= 0, -1.0, 2.0))
        half = np.degrees(np.arccos(np.clip(ratio, -1.0, 1.0)))
        n = self.row_columns(rows)
        step = 360.0 / n
        west, east = (clon[centre] - half) / step, (clon[centre] + half) / step
        if inner:
            first, last = np.ceil(west + 1e-9), np.floor(east - 1e-9)
        else:
            first, last = np.floor(west), np.ceil(east)
        count = np.minimum(last - first + 1, n).astype(np.int64)
        whole = (ratio <= -1.0) | (count >= n)
        first = np.where(whole, 0, np.mod(first.astype(np.int64), n))
        count = np.where(ratio > 1.0, 0, np.where(whole, n, np.maximum(count, 0)))
        # A span past the end of its ring continues at column 0.
        over = np.maximum(first + count - n, 0)
        wrap = over > 0
        rows = np.concatenate((rows, rows[wrap]))
        first = np.concatenate((first, np.zeros(int(wrap.sum()), dtype=np.int64)))
        count = np.concatenate((count - over, over[wrap]))
        used = count > 0
        rows, first, count = rows[used], first[used], count[used]
        # Merge overlapping or touching spans of a row: in (row, first) order a span starts a
        # new group unless it begins at most one column after the furthest end so far.
        order = np.lexsort((first, rows))
        rows, first, end = rows[order], first[order], (first + count - 1)[order]
        base = self._span_key(rows, np.zeros_like(rows))
        furthest = np.maximum.accumulate(base + end) - base
        new = np.ones(rows.size, dtype=bool)
        new[1:] = (rows[1:] != rows[:-1]) | (first[1:] > furthest[:-1] + 1)
        heads = np.flatnonzero(new)
        tails = np.append(heads[1:] - 1, rows.size - 1)
        return rows[heads], first[heads], furthest[tails] - first[heads] + 1

    def cells_near(self, lat_deg: npt.ArrayLike, lon_deg: npt.ArrayLike, radius_km: float
                   ) -> tuple[IntArray, IntArray, IntArray, FloatArray]:
        """Cells within ``radius_km`` of each centre: (centre index, rows, cols, distance km).

        A cell near two centres appears once per centre; callers pick the owner.
        """
        clat = np.atleast_1d(np.asarray(lat_deg, dtype=np.float64))
        clon = np.atleast_1d(np.asarray(lon_deg, dtype=np.float64))
        delta = radius_km / EARTH_RADIUS_KM
        rdeg = np.degrees(delta)
        lo = np.maximum(np.floor((clat - rdeg) / self.dlat_deg + 1e-9), -self.max_row)
        hi = np.minimum(np.ceil((clat + rdeg) / self.dlat_deg - 1e-9), self.max_row)
        nrows = np.maximum(hi - lo + 1, 0).astype(np.int64)
        centre = np.repeat(np.arange(clat.size, dtype=np.int64), nrows)
        starts = np.cumsum(nrows) - nrows
        rows = (np.repeat(lo.astype(np.int64), nrows)
                + np.arange(int(nrows.sum()), dtype=np.int64) - np.repeat(starts, nrows))
        # The widest longitude offset a circle of angular radius delta reaches; a circle that
        # holds a pole spans every longitude.
        cos_c = np.cos(np.radians(clat))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(cos_c > 0, np.sin(delta) / cos_c, np.inf)
        half = np.where((np.abs(clat) + rdeg >= 90.0) | (ratio >= 1.0), 180.0,
                        np.degrees(np.arcsin(np.minimum(ratio, 1.0))))
        west = clon[centre] - half[centre]
        east = clon[centre] + half[centre]
        owner, out_rows, cols = self._expand(rows, west, east)
        owner_centre = centre[owner]
        plat, plon = self.points(out_rows, cols)
        dist = haversine_km(plat, plon, clat[owner_centre], clon[owner_centre])
        keep = dist <= radius_km * (1 + 1e-12)
        return owner_centre[keep], out_rows[keep], cols[keep], dist[keep]


# ---------------------------------------------------------------- nearest neighbours


class PointIndex:
    """A KD-tree over points on the sphere, queried in great-circle km."""

    def __init__(self, lat_deg: npt.ArrayLike, lon_deg: npt.ArrayLike,
                 xyz: FloatArray | None = None) -> None:
        """``xyz``, when given, holds the points' unit vectors already (saves computing them)."""
        self.xyz = unit_vectors(lat_deg, lon_deg).reshape(-1, 3) if xyz is None else xyz
        self.size = len(self.xyz)
        # balanced_tree=False builds much faster on large inputs at a small query cost.
        from scipy.spatial import cKDTree

        self.tree = cKDTree(self.xyz, balanced_tree=False, compact_nodes=False)

    def nearest(self, lat_deg: npt.ArrayLike, lon_deg: npt.ArrayLike, k: int = 1,
                max_km: float | None = None, workers: int = -1
                ) -> tuple[FloatArray, IntArray]:
        """(distance km, index) of the k nearest points; misses give (inf, self.size)."""
        return self.nearest_xyz(unit_vectors(lat_deg, lon_deg).reshape(-1, 3), k, max_km,
                                workers)

    def nearest_xyz(self, xyz: FloatArray, k: int = 1, max_km: float | None = None,
                    workers: int = -1) -> tuple[FloatArray, IntArray]:
        kw: dict[str, Any] = {"k": k, "workers": workers}
        if max_km is not None:
            # A hair over the bound so points at exactly max_km are not lost to rounding.
            kw["distance_upper_bound"] = float(km_to_chord(max_km)) * (1 + 1e-9) + 1e-15
        chord, idx = self.tree.query(xyz, **kw)
        chord = np.asarray(chord, dtype=np.float64).reshape(len(xyz), k)
        idx = np.asarray(idx, dtype=np.int64).reshape(len(xyz), k)
        km = np.where(np.isfinite(chord), chord_to_km(np.where(np.isfinite(chord), chord, 0)),
                      np.inf)
        return km, idx

    def within(self, lat_deg: npt.ArrayLike, lon_deg: npt.ArrayLike, max_km: float
               ) -> npt.NDArray[np.bool_]:
        """True for each query point that has an indexed point closer than ``max_km``."""
        if self.size == 0 or max_km <= 0:
            return np.zeros(np.size(lat_deg), dtype=bool)
        km, _ = self.nearest(lat_deg, lon_deg, k=1, max_km=max_km)
        return np.asarray(km[:, 0] < max_km)


def knn_pairs(xyz: FloatArray, sources: IntArray, k: int, max_km: float, workers: int = -1,
              tree: cKDTree | None = None) -> tuple[IntArray, IntArray, FloatArray]:
    """Undirected pairs linking each source point to its k nearest other points within max_km.

    Returns (a, b, km) with a < b, each pair once, sorted by (a, b). Ties in distance are broken
    by the tree, which is deterministic for the same input order.
    """
    if tree is None:
        from scipy.spatial import cKDTree

        tree = cKDTree(xyz, balanced_tree=False, compact_nodes=False)
    n = len(xyz)
    kq = min(k + 1, n)
    bound = float(km_to_chord(max_km)) * (1 + 1e-9) + 1e-15
    chord, idx = tree.query(xyz[sources], k=kq, distance_upper_bound=bound, workers=workers)
    chord = np.asarray(chord).reshape(len(sources), kq)
    idx = np.asarray(idx, dtype=np.int64).reshape(len(sources), kq)
    src = np.broadcast_to(sources[:, None], idx.shape)
    ok = (idx < n) & (idx != src)
    # Keep the first k hits per row (self is usually the first result and is dropped).
    ok &= np.cumsum(ok, axis=1) <= k
    a, b = src[ok], idx[ok]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = lo * np.int64(n) + hi
    key, first = np.unique(key, return_index=True)
    km = chord_to_km(chord[ok][first])
    return key // n, key % n, km
