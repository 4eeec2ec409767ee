-- Named queries of build-graph (pipeline_cli/stages/build_graph.py).

-- name: lock_virtual
-- First in the read snapshot's transaction, before the snapshot is taken: gen-virtual
-- truncates and reloads these tables (sql/queries/gen_virtual.sql, lock_tables; the view locks
-- its tables), and a snapshot taken before its commit would see the new rows.
LOCK TABLE virtual_stops, virtual_routes, virtual_flights IN ACCESS SHARE MODE;

-- name: active_dataset
SELECT version FROM datasets WHERE active;

-- name: newest_generation
SELECT id FROM virtual_generations
WHERE dataset_version = %(dataset_version)s
ORDER BY id DESC
LIMIT 1;

-- name: active_graph
SELECT version, seq, dataset_version, virtual_generation_id, nodes, edges, build_ms, checksum,
       export_key, warnings, created_at, activated_at, active
FROM graph_versions
WHERE active;

-- name: graph_for_generation
SELECT version, active, speeds_kmh
FROM graph_versions
WHERE dataset_version = %(dataset_version)s
  AND virtual_generation_id IS NOT DISTINCT FROM %(generation_id)s
ORDER BY seq DESC
LIMIT 1;

-- name: real_stops
-- The positions measure the routes weighed by their distance (a 0 km route between
-- distant stops is named).
SELECT id, latitude, longitude FROM stops ORDER BY id;

-- name: virtual_stops
SELECT id FROM virtual_stops WHERE dataset_version = %(dataset_version)s ORDER BY id;

-- name: real_routes
-- The fastest scheduled flight of each route, in seconds; an arrival at or before the
-- departure wraps past midnight, so an arrival equal to it is a day later (1 to 86400 s: a
-- flight of 0 s would make its route free).
SELECT r.id, r.from_stop_id, r.to_stop_id, r.mode, r.distance_km, f.min_s
FROM routes r
LEFT JOIN (
    SELECT route_id,
           min(mod((extract(epoch FROM arrival) - extract(epoch FROM departure))::numeric
                   + 86399, 86400) + 1)::double precision AS min_s
    FROM flights
    GROUP BY route_id
) f ON f.route_id = r.id
ORDER BY r.id;

-- name: virtual_routes
SELECT id, from_stop_id, to_stop_id, mode, travel_time_s
FROM virtual_routes
WHERE dataset_version = %(dataset_version)s
ORDER BY id;

-- name: next_seq
SELECT nextval('graph_version_seq') AS seq;

-- name: insert_version
INSERT INTO graph_versions (version, seq, dataset_version, virtual_generation_id, nodes, edges,
                            build_ms, checksum, export_key, warnings, run_id, speeds_kmh)
VALUES (%(version)s, %(seq)s, %(dataset_version)s, %(generation_id)s, %(nodes)s, %(edges)s,
        %(build_ms)s, %(checksum)s, %(export_key)s, %(warnings)s, %(run_id)s, %(speeds_kmh)s);

-- name: deactivate_all
UPDATE graph_versions SET active = false WHERE active AND version <> %(version)s;

-- name: activate
UPDATE graph_versions SET active = true, activated_at = now()
WHERE version = %(version)s
RETURNING version;

-- name: get_version
SELECT version, seq, dataset_version, virtual_generation_id, nodes, edges, build_ms, checksum,
       export_key, warnings, created_at, activated_at, active
FROM graph_versions
WHERE version = %(version)s;

-- name: list_versions
SELECT version, seq, dataset_version, virtual_generation_id, nodes, edges, build_ms, checksum,
       export_key, warnings, created_at, activated_at, active
FROM graph_versions
ORDER BY seq DESC
LIMIT %(limit)s;

-- name: never_activated
-- Versions recorded by a publish that never reached its pointer switch (and not served now).
SELECT version FROM graph_versions
WHERE activated_at IS NULL AND NOT active
  AND version IS DISTINCT FROM %(pointer)s
ORDER BY seq;

-- name: delete_unactivated
DELETE FROM graph_versions
WHERE version = %(version)s AND activated_at IS NULL AND NOT active;

-- name: known_versions
SELECT version FROM graph_versions WHERE version = ANY(%(versions)s);

-- name: peek_seq
-- The number the next build would take (a dry run must not consume one).
SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END AS seq
FROM graph_version_seq;
