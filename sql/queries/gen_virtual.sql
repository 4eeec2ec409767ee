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
-- In place: views (virtual_flights among them), grants and triggers stay attached; the
-- indexes are set aside for the load and built again (set_aside_indexes).
TRUNCATE virtual_stops, virtual_routes, virtual_frequencies;

-- name: set_aside_indexes
-- The indexes of the emptied tables are dropped for the load and built again after it
-- (rebuild_indexes): one build of sorted rows costs a fraction of a b-tree insertion per row.
-- Their definitions come from the catalog, so an index an operator added comes back as it
-- was, with its comment. An index stays, kept up row by row, when the stage's role does not
-- own its table (dropping needs ownership; TRUNCATE and INSERT are enough for the rest), when
-- something depends on it (a foreign key, a view that relies on a primary key), or when it
-- carries a flag a rebuild would lose (replica identity, CLUSTER). All of it is inside the
-- write's transaction, under its ACCESS EXCLUSIVE lock: a failure or a kill puts every index
-- back as it was.
CREATE TEMP TABLE gen_virtual_indexes ON COMMIT DROP AS
SELECT i.indexrelid::regclass::text AS name,
       CASE WHEN c.oid IS NULL THEN format('DROP INDEX %s', i.indexrelid::regclass)
            ELSE format('ALTER TABLE %s DROP CONSTRAINT %I', i.indrelid::regclass, c.conname)
       END AS drop_ddl,
       CASE WHEN c.oid IS NULL THEN pg_get_indexdef(i.indexrelid)
            ELSE format('ALTER TABLE %s ADD CONSTRAINT %I %s', i.indrelid::regclass,
                        c.conname, pg_get_constraintdef(c.oid))
       END AS create_ddl,
       CASE WHEN c.oid IS NULL
            THEN format('COMMENT ON INDEX %s IS %L', i.indexrelid::regclass,
                        obj_description(i.indexrelid, 'pg_class'))
            ELSE format('COMMENT ON CONSTRAINT %I ON %s IS %L', c.conname,
                        i.indrelid::regclass, obj_description(c.oid, 'pg_constraint'))
       END AS comment_ddl
FROM pg_index i
JOIN pg_class t ON t.oid = i.indrelid
LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
WHERE i.indrelid IN ('virtual_stops'::regclass, 'virtual_routes'::regclass)
  AND pg_has_role(t.relowner, 'USAGE')
  AND NOT i.indisreplident AND NOT i.indisclustered
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.deptype = 'n'
                    AND ((d.refclassid = 'pg_class'::regclass AND d.refobjid = i.indexrelid)
                         OR (d.refclassid = 'pg_constraint'::regclass
                             AND d.refobjid = c.oid)));
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT drop_ddl FROM gen_virtual_indexes ORDER BY name LOOP
        EXECUTE r.drop_ddl;
    END LOOP;
END
$$;

-- name: rebuild_indexes
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT create_ddl, comment_ddl FROM gen_virtual_indexes ORDER BY name LOOP
        EXECUTE r.create_ddl;
        EXECUTE r.comment_ddl;  -- IS NULL when there was none
    END LOOP;
END
$$;
DROP TABLE gen_virtual_indexes;

-- name: copy_into
COPY {table} ({columns}) FROM STDIN WITH (FREEZE);

-- name: lock_tables
-- Waits for readers that hold the tables (build-graph takes ACCESS SHARE before its
-- snapshot) and holds new ones off until the new generation is committed.
LOCK TABLE virtual_stops, virtual_routes, virtual_frequencies IN ACCESS EXCLUSIVE MODE;

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
