-- Queries of `pipeline export geojson` (pipeline_cli/export.py), each read through a
-- server-side cursor so that an export streams.

-- name: polylines
-- Cached polylines overlapping [since, until] (either end open), optionally of one device.
SELECT id, device_id, start_time, end_time, encoded_polyline, point_count, osrm_confidence,
       batch_id
FROM cached_polylines
WHERE (%(device)s::text IS NULL OR device_id = %(device)s::text)
  AND (%(since)s::timestamptz IS NULL OR end_time >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR start_time <= %(until)s::timestamptz)
ORDER BY start_time, id;

-- name: stops
-- Real stops, inside the box when %(bbox)s (west > east: the box crosses the antimeridian).
SELECT id, name, city, is_airport, longitude, latitude
FROM stops
WHERE NOT %(bbox)s
   OR (latitude BETWEEN %(south)s::float8 AND %(north)s::float8
       AND CASE WHEN %(west)s::float8 <= %(east)s::float8
                THEN longitude BETWEEN %(west)s::float8 AND %(east)s::float8
                     -- 180 and -180 are one meridian
                     OR abs(longitude) = 180
                        AND -longitude BETWEEN %(west)s::float8 AND %(east)s::float8
                ELSE longitude >= %(west)s::float8 OR longitude <= %(east)s::float8 END)
ORDER BY id;

-- name: virtual_stops
-- Of the active dataset only: after a gen-virtual that failed on a new dataset, the table
-- still holds an older dataset's generation (until prune deletes that dataset).
SELECT id, kind, anchor_id, dataset_version, longitude, latitude
FROM virtual_stops
WHERE dataset_version = (SELECT version FROM datasets WHERE active)
  AND (NOT %(bbox)s
   OR (latitude BETWEEN %(south)s::float8 AND %(north)s::float8
       AND CASE WHEN %(west)s::float8 <= %(east)s::float8
                THEN longitude BETWEEN %(west)s::float8 AND %(east)s::float8
                     -- 180 and -180 are one meridian
                     OR abs(longitude) = 180
                        AND -longitude BETWEEN %(west)s::float8 AND %(east)s::float8
                ELSE longitude >= %(west)s::float8 OR longitude <= %(east)s::float8 END))
ORDER BY id;

-- name: drawn_at
-- Whose stops graph_nodes reads: the active dataset's real stops, and the virtual stops of the
-- newest generation (gen-virtual replaces the tables' content with each one).
SELECT (SELECT version FROM datasets WHERE active) AS dataset_version,
       (SELECT max(id) FROM virtual_generations) AS virtual_generation_id;

-- name: graph_nodes
-- Every stop a graph node can be: real and virtual stops share one id space.
SELECT id, longitude, latitude FROM stops
UNION ALL
SELECT id, longitude, latitude FROM virtual_stops
ORDER BY id;

-- name: node_coordinates
SELECT id, longitude, latitude FROM stops WHERE id = ANY(%(ids)s::text[])
UNION ALL
SELECT id, longitude, latitude FROM virtual_stops WHERE id = ANY(%(ids)s::text[]);
