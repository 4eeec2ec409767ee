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
