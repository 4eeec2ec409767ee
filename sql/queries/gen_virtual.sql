-- Queries of gen-virtual (pipeline_cli/stages/gen_virtual.py).

-- name: active_dataset
SELECT version, seq FROM datasets WHERE active;

-- name: latest_generation
SELECT id, dataset_version, settings, counts, backup_prefix, duration_ms, run_id, created_at
FROM virtual_generations
WHERE dataset_version = %(version)s
ORDER BY id DESC
LIMIT 1;

-- name: read_stops
-- Ordered by id so that the input, and so every derived row, is the same on every run.
SELECT id, latitude, longitude, is_airport, coalesce(city, '') AS city
FROM stops
ORDER BY id;

-- name: lock_dataset
-- Held until commit: sync-odata cannot switch the active dataset under a generation.
SELECT active FROM datasets WHERE version = %(version)s FOR UPDATE;

-- name: next_generation_id
SELECT nextval(pg_get_serial_sequence('virtual_generations', 'id')) AS id;

-- name: insert_generation
INSERT INTO virtual_generations
    (id, dataset_version, settings, counts, unreached_stops, backup_prefix, duration_ms, run_id)
VALUES (%(id)s, %(version)s, %(settings)s, %(counts)s, %(unreached)s, %(backup_prefix)s,
        %(duration_ms)s, %(run_id)s)
RETURNING created_at;

-- name: delete_flights
DELETE FROM virtual_flights;

-- name: delete_routes
DELETE FROM virtual_routes;

-- name: delete_stops
DELETE FROM virtual_stops;

-- name: copy_stops
COPY virtual_stops (id, latitude, longitude, kind, anchor_id, dataset_version) FROM STDIN;

-- name: copy_routes
COPY virtual_routes (id, from_stop_id, to_stop_id, mode, distance_km, travel_time_s,
                     dataset_version) FROM STDIN;

-- name: copy_flights
COPY virtual_flights (id, route_id, start_time, end_time, headway_s, days_of_week,
                      dataset_version) FROM STDIN;

-- name: orphan_flights
-- Stands in for a foreign key (see sql/003_virtual.sql): one anti-join after the COPY.
SELECT count(*) AS n FROM virtual_flights f
WHERE NOT EXISTS (SELECT 1 FROM virtual_routes r WHERE r.id = f.route_id);

-- name: update_dataset_stats
UPDATE datasets
SET stats = jsonb_set(stats, '{virtual}', %(stats)s)
WHERE version = %(version)s;

-- name: newest_generation
SELECT id, dataset_version, created_at FROM virtual_generations ORDER BY id DESC LIMIT 1;
