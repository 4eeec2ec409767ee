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

-- name: truncate
-- In place: views (virtual_flights among them), grants, indexes and triggers stay attached.
TRUNCATE virtual_stops, virtual_routes, virtual_frequencies;

-- name: copy_into
COPY {table} ({columns}) FROM STDIN WITH (FREEZE);

-- name: lock_tables
-- Waits for readers that hold the tables (build-graph takes ACCESS SHARE before its
-- snapshot) and holds new ones off until the new generation is committed.
LOCK TABLE virtual_stops, virtual_routes, virtual_frequencies IN ACCESS EXCLUSIVE MODE;

-- name: lock_timeout
SELECT set_config('lock_timeout', %(timeout)s, true);

-- name: lock_holders
SELECT DISTINCT a.pid, coalesce(nullif(a.application_name, ''), a.usename) AS who
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.relation IN ('virtual_stops'::regclass, 'virtual_routes'::regclass,
                    'virtual_frequencies'::regclass)
  AND l.granted AND a.pid <> pg_backend_pid()
ORDER BY a.pid;

-- name: analyze
ANALYZE {table};

-- name: update_dataset_stats
UPDATE datasets
SET stats = jsonb_set(stats, '{virtual}', %(stats)s)
WHERE version = %(version)s;

-- name: newest_generation
SELECT id, dataset_version, created_at FROM virtual_generations ORDER BY id DESC LIMIT 1;
