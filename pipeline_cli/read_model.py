"""The read model that sync-odata keeps and the routing backend reads: the tables ``stops``,
``routes`` and ``flights`` (sql/002_datasets.sql) and their columns. The OData mapping
(``[odata] mapping``, adapters/odata_format.py) says which source field fills each column.
"""

from __future__ import annotations

# Table -> its columns in COPY order; the first is the key. Order matters: routes reference
# stops and flights reference routes, so sets are fetched, checked and written in this order.
COLUMNS: dict[str, tuple[str, ...]] = {
    "stops": ("id", "name", "latitude", "longitude", "is_airport", "city"),
    "routes": ("id", "from_stop_id", "to_stop_id", "mode", "distance_km"),
    "flights": ("id", "route_id", "departure", "arrival", "days_of_week"),
}
ENTITIES = tuple(COLUMNS)
# Columns a feed may leave out: they are then always NULL (false for is_airport).
OPTIONAL_COLUMNS = frozenset({"name", "city", "is_airport", "mode", "distance_km"})
# (child table, column, parent table): checked in this order, so a parent's rejects cascade.
REFERENCES = (("routes", "from_stop_id", "stops"), ("routes", "to_stop_id", "stops"),
              ("flights", "route_id", "routes"))
# Table -> column -> (kind of value, low, high): how sync-odata reads and checks each column
# (the rules of each kind are in sql/015_sync_in_sql.sql and the migrations that replace its
# functions: 016, 019, 021, 022, 027, 029, 030).
KINDS: dict[str, dict[str, tuple[str, float | None, float | None]]] = {
    "stops": {"id": ("key", None, None), "name": ("text", None, None),
              "latitude": ("number", -90, 90), "longitude": ("number", -180, 180),
              "is_airport": ("bool", None, None), "city": ("text", None, None)},
    "routes": {"id": ("key", None, None), "from_stop_id": ("key", None, None),
               "to_stop_id": ("key", None, None), "mode": ("text", None, None),
               # 100,000 km: more than twice round the Earth; 1e308 passed and weighed inf
               "distance_km": ("number", 0, 100_000)},
    "flights": {"id": ("key", None, None), "route_id": ("key", None, None),
                "departure": ("time", None, None), "arrival": ("time", None, None),
                "days_of_week": ("days", None, None)},
}
