"""The spatial core: distances, grids in real km (antimeridian, high latitudes), kNN."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_cli import geo


def test_haversine_known_distances() -> None:
    one_degree = np.pi * geo.EARTH_RADIUS_KM / 180
    assert geo.haversine_km(0, 0, 1, 0) == pytest.approx(one_degree)
    assert geo.haversine_km(0, 179.5, 0, -179.5) == pytest.approx(one_degree)
    assert geo.haversine_km(89.5, 0, 89.5, 180) == pytest.approx(one_degree)
    # Helsinki - Tallinn, about 80 km
    assert 79 < float(geo.haversine_km(60.1699, 24.9384, 59.4370, 24.7536)) < 83


def test_chord_round_trip_and_unit_vectors() -> None:
    km = np.array([0.0, 0.5, 10.0, 5000.0, 20000.0])
    assert geo.chord_to_km(geo.km_to_chord(km)) == pytest.approx(km, abs=1e-6)
    xyz = geo.unit_vectors([70.0, -33.0], [179.9, -179.9])
    assert np.linalg.norm(xyz, axis=1) == pytest.approx([1.0, 1.0])
    lat, lon = geo.to_latlon(xyz)
    assert lat == pytest.approx([70.0, -33.0]) and lon == pytest.approx([179.9, -179.9])
    d = geo.chord_to_km(np.linalg.norm(xyz[0] - geo.unit_vectors(70.0, -179.9)))
    assert d == pytest.approx(geo.haversine_km(70, 179.9, 70, -179.9))


def test_centroid_across_the_antimeridian() -> None:
    lat, lon = geo.centroid([10.0, 10.0], [179.0, -179.0])
    assert abs(lon) == pytest.approx(180.0) and lat == pytest.approx(10.0, abs=0.01)


@pytest.mark.parametrize("spacing", [50.0, 10.0, 5.0])
@pytest.mark.parametrize("lat", [0.0, 45.0, -60.0, 70.0, 80.0])
def test_grid_spacing_within_one_percent(spacing: float, lat: float) -> None:
    grid = geo.Grid(spacing)
    rows, cols = grid.cells_in_box(lat, lat + 3 * grid.dlat_deg, -2.0, 4.0)
    plat, plon = grid.points(rows, cols)
    # East-west: consecutive cells of one row.
    same_row = rows[1:] == rows[:-1]
    ew = geo.haversine_km(plat[:-1], plon[:-1], plat[1:], plon[1:])[same_row]
    assert ew.size > 0
    assert np.all(np.abs(ew / spacing - 1) < 0.01), (ew.min(), ew.max())
    # North-south: along the meridian the row spacing is exact.
    ns = geo.haversine_km(grid.row_lat(rows[0]), 0.0, grid.row_lat(rows[0] + 1), 0.0)
    assert ns == pytest.approx(spacing, rel=1e-9)
    # Every point's nearest other point is one spacing away (within 1 %).
    index = geo.PointIndex(plat, plon)
    km, _ = index.nearest(plat, plon, k=2)
    assert np.all(np.abs(km[:, 1] / spacing - 1) < 0.01)


def test_grid_closes_at_the_antimeridian_without_duplicates() -> None:
    grid = geo.Grid(50.0)
    rows, cols = grid.cells_in_box(69.0, 71.0, 178.0, 4.0)  # 178E .. 178W
    plat, plon = grid.points(rows, cols)
    keys = geo.cell_keys(rows, cols)
    assert len(np.unique(keys)) == len(keys)
    assert (plon > 170).any() and (plon < -170).any()
    assert np.all((plon >= -180) & (plon < 180))
    for row in np.unique(rows):
        lon_row = np.sort(np.mod(plon[rows == row], 360))  # seam-free order
        d = geo.haversine_km(plat[rows == row][0], lon_row[:-1], plat[rows == row][0],
                             lon_row[1:])
        assert np.all(np.abs(d / 50.0 - 1) < 0.01)
    # The whole ring: n columns, each exactly once.
    r, c = grid.cells_in_box(70.0, 70.0, -180.0, 360.0)
    n = int(grid.row_columns(np.unique(r)).sum())
    assert len(np.unique(geo.cell_keys(r, c))) == len(r) == n


def test_cells_near_is_a_disc_across_the_antimeridian_and_near_the_pole() -> None:
    grid = geo.Grid(10.0)
    owner, rows, cols, dist = grid.cells_near([70.0, 0.0, 89.8], [179.95, 0.0, 10.0], 30.0)
    assert set(np.unique(owner)) == {0, 1, 2}
    assert np.all(dist <= 30.0 + 1e-9)
    plat, plon = grid.points(rows, cols)
    assert np.allclose(geo.haversine_km(plat, plon, [70.0, 0.0, 89.8][0], 179.95)[owner == 0],
                       dist[owner == 0])
    east = plon[owner == 0]
    assert (east > 179).any() and (east < -179).any()
    # About pi r^2 / s^2 points, away from the pole.
    for o in (0, 1):
        assert 0.8 * np.pi * 9 < np.sum(owner == o) < 1.25 * np.pi * 9 + 8
    assert len(np.unique(geo.cell_keys(rows[owner == 2], cols[owner == 2]))) == np.sum(
        owner == 2)
    # Every grid point within the radius is found: compare with a brute-force ring scan.
    r_all, c_all = grid.cells_in_box(69.0, 71.0, 178.0, 4.0)
    la, lo = grid.points(r_all, c_all)
    inside = geo.haversine_km(la, lo, 70.0, 179.95) <= 30.0
    assert inside.sum() == np.sum(owner == 0)


def _two_continents() -> tuple[np.ndarray, np.ndarray]:
    """Stops around Paris and around Sao Paulo, 9,400 km apart."""
    rng = np.random.default_rng(5)
    lat = np.concatenate((48.85 + rng.normal(0, 0.5, 60), -23.55 + rng.normal(0, 0.5, 60)))
    lon = np.concatenate((2.35 + rng.normal(0, 0.8, 60), -46.63 + rng.normal(0, 0.8, 60)))
    return lat, lon


@pytest.mark.parametrize(("spacing", "radius", "lat", "lon"), [
    (50.0, 200.0, *_two_continents()),
    (25.0, 40.0, *_two_continents()),
    (50.0, 200.0, [70.0, 69.8, 70.2], [179.9, -179.8, 178.9]),  # across the antimeridian
    (50.0, 300.0, [89.9, 88.5, 87.0], [0.0, 120.0, -100.0]),  # a cap holding the pole
    (50.0, 150.0, [-89.99, -85.0], [10.0, -170.0]),
    (50.0, 200.0, [90.0, 90.0, -90.0], [0.0, -123.0, 180.0]),  # on the poles themselves
    (22.5, 20.0, [0.0, 0.001], [0.0, -0.001]),  # a reach smaller than the spacing
])
def test_cells_within_equals_brute_force(spacing: float, radius: float, lat: list[float],
                                         lon: list[float]) -> None:
    grid = geo.Grid(spacing)
    rows, cols = grid.cells_within(lat, lon, radius)
    keys = geo.cell_keys(rows, cols)
    assert len(np.unique(keys)) == len(keys) > 0
    assert np.array_equal(cols, grid.canonical_cols(rows, cols))
    # Every cell within the radius of a point, and no other: check every ring of the band.
    band = np.degrees(radius / geo.EARTH_RADIUS_KM) + 1.0
    r_all, c_all = grid.cells_in_box(min(lat) - band, max(lat) + band, -180.0, 360.0)
    la, lo = grid.points(r_all, c_all)
    index = geo.PointIndex(lat, lon)
    km, _ = index.nearest(la, lo)
    expected = geo.cell_keys(r_all, c_all)[km[:, 0] <= radius]
    assert set(keys.tolist()) == set(expected.tolist())
    assert grid.count_near(lat, lon, radius) >= len(keys)


def test_cells_within_two_regions_gives_two_grids_not_the_ocean() -> None:
    lat, lon = _two_continents()
    grid = geo.Grid(50.0)
    rows, cols = grid.cells_within(lat, lon, 200.0)
    plat, plon = grid.points(rows, cols)
    europe = geo.haversine_km(plat, plon, 48.85, 2.35) < 1500
    brazil = geo.haversine_km(plat, plon, -23.55, -46.63) < 1500
    assert europe.sum() > 30 and brazil.sum() > 30 and np.all(europe | brazil)
    # About the area of two discs of the reach (plus the regions' spread), not the band.
    disc = np.pi * (200.0 + 3 * 80.0) ** 2 / 50.0**2
    assert len(rows) < 2 * disc
    assert grid.count_near(lat, lon, 200.0) < 2 * disc
    assert geo.Grid(50.0).count_near([], [], 200.0) == 0


def test_nearest_cells_snaps_to_a_grid_point() -> None:
    grid = geo.Grid(50.0)
    rows, cols = grid.nearest_cells([70.0, 70.0, -45.0], [179.99, -179.99, 12.0])
    plat, plon = grid.points(rows, cols)
    assert np.all(geo.haversine_km(plat, plon, [70.0, 70.0, -45.0],
                                   [179.99, -179.99, 12.0]) < 50.0)


def test_knn_pairs_equal_brute_force_across_the_antimeridian() -> None:
    rng = np.random.default_rng(7)
    lat = rng.uniform(68, 72, 300)
    lon = np.mod(rng.uniform(176, 184, 300) + 180, 360) - 180
    xyz = geo.unit_vectors(lat, lon)
    sources = np.arange(100, 300, dtype=np.int64)
    a, b, km = geo.knn_pairs(xyz, sources, k=3, max_km=40.0)
    assert np.all(a < b) and len(np.unique(a * 1000 + b)) == len(a)
    full = geo.haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :])
    np.fill_diagonal(full, np.inf)
    expected = set()
    for s in sources.tolist():
        near = np.argsort(full[s], kind="stable")[:3]
        expected |= {(min(s, int(j)), max(s, int(j))) for j in near if full[s, j] <= 40.0}
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == expected
    assert km == pytest.approx(full[a, b], rel=1e-9)
    assert (np.abs(lon[a] - lon[b]) > 180).any(), "no pair crosses the antimeridian"


def test_point_index_within_threshold() -> None:
    index = geo.PointIndex([60.0, 60.0], [24.0, 25.0])
    near = index.within([60.0, 60.0, 61.0], [24.01, 24.5, 24.0], 1.0)
    assert near.tolist() == [True, False, False]
    empty = geo.PointIndex(np.zeros(0), np.zeros(0))
    assert empty.within([1.0], [1.0], 5.0).tolist() == [False]


@pytest.mark.parametrize("spacing", [50.0, 22.5])
def test_whole_globe_points_stay_in_range(spacing: float) -> None:
    grid = geo.Grid(spacing)
    rows, cols = grid.cells_in_box(-90.0, 90.0, -180.0, 360.0)
    lat, lon = grid.points(rows, cols)
    assert lat.min() >= -90 and lat.max() <= 90
    assert lon.min() >= -180 and lon.max() < 180
    assert len(np.unique(geo.cell_keys(rows, cols))) == len(rows)
