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

-- name: delete_table
-- In place (see swap_blockers): DELETE, not TRUNCATE, so readers keep their snapshot.
DELETE FROM {table};

-- name: copy_into
COPY {table} ({columns}) FROM STDIN {options};

-- name: swap_blockers
-- What a swap of {table} for a new table would break or silently lose; any row means the
-- generation is written in place instead (DELETE + COPY into the live table).
SELECT DISTINCT format('view or rule %%s reads it', r.ev_class::regclass) AS blocker
FROM pg_depend d JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = %(table)s::regclass
  AND r.ev_class <> %(table)s::regclass
UNION ALL
SELECT format('foreign key %%s of %%s references it', conname, conrelid::regclass)
FROM pg_constraint WHERE contype = 'f' AND confrelid = %(table)s::regclass
UNION ALL
SELECT format('trigger %%s', tgname) FROM pg_trigger
WHERE tgrelid = %(table)s::regclass AND NOT tgisinternal
UNION ALL
SELECT format('row-level security policy %%s', polname) FROM pg_policy
WHERE polrelid = %(table)s::regclass
UNION ALL
SELECT format('publication %%s', p.pubname)
FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
WHERE pr.prrelid = %(table)s::regclass
UNION ALL
SELECT 'inheritance or partitioning' FROM pg_inherits
WHERE inhrelid = %(table)s::regclass OR inhparent = %(table)s::regclass
UNION ALL
SELECT 'storage parameters, row security or a table comment' FROM pg_class c
WHERE c.oid = %(table)s::regclass
  AND (c.reloptions IS NOT NULL OR c.relrowsecurity OR c.relkind <> 'r'
       OR obj_description(c.oid, 'pg_class') IS NOT NULL);

-- name: create_next
-- Columns, defaults, CHECK constraints, comments, statistics targets and (dropped again until
-- the rows are in, see next_indexes) the indexes of the live table.
CREATE TABLE {next} (LIKE {live} INCLUDING ALL);

-- name: next_indexes
-- The new table's indexes (as LIKE copied them) with the DDL that rebuilds each, paired with
-- the live table's index of the same shape, whose name it takes at the swap.
WITH idx AS (
    SELECT i.indrelid, i.indexrelid, ic.relname AS name, con.conname,
           pg_get_indexdef(i.indexrelid) AS indexdef, pg_get_constraintdef(con.oid) AS condef,
           concat_ws('|', i.indkey::text, i.indisunique, i.indisprimary, i.indclass::text,
                     i.indcollation::text, i.indoption::text, ic.relam, con.contype,
                     pg_get_expr(i.indexprs, i.indrelid),
                     pg_get_expr(i.indpred, i.indrelid)) AS shape
    FROM pg_index i
    JOIN pg_class ic ON ic.oid = i.indexrelid
    LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
    WHERE i.indrelid IN (%(live)s::regclass, %(next)s::regclass)
), ranked AS (
    SELECT *, row_number() OVER (PARTITION BY indrelid, shape ORDER BY indexrelid) AS n
    FROM idx
)
SELECT x.name, x.conname, x.indexdef, x.condef, l.name AS live_name
FROM ranked x
LEFT JOIN ranked l ON l.indrelid = %(live)s::regclass AND l.shape = x.shape AND l.n = x.n
WHERE x.indrelid = %(next)s::regclass
ORDER BY x.indexrelid;

-- name: drop_constraint
ALTER TABLE {table} DROP CONSTRAINT {name};

-- name: drop_index
DROP INDEX {name};

-- name: add_constraint
-- {definition} is pg_get_constraintdef() of the same constraint, read by next_indexes.
ALTER TABLE {table} ADD CONSTRAINT {name} {definition};

-- name: lock_live
-- Waits for readers that hold the tables (build-graph takes ACCESS SHARE before its
-- snapshot) and holds new ones off for the few milliseconds of the swap.
LOCK TABLE virtual_stops, virtual_routes, virtual_flights IN ACCESS EXCLUSIVE MODE;

-- name: lock_timeout
SELECT set_config('lock_timeout', %(timeout)s, true);

-- name: lock_holders
SELECT DISTINCT a.pid, coalesce(nullif(a.application_name, ''), a.usename) AS who
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.relation IN ('virtual_stops'::regclass, 'virtual_routes'::regclass,
                    'virtual_flights'::regclass)
  AND l.granted AND a.pid <> pg_backend_pid()
ORDER BY a.pid;

-- name: table_owner
SELECT pg_get_userbyid(relowner) AS owner, current_user AS me
FROM pg_class WHERE oid = %(table)s::regclass;

-- name: table_grants
-- Privileges granted on the live table to roles other than its owner (the owner's own are
-- implicit), so that the new table gets the same.
SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END AS grantee,
       a.privilege_type, a.is_grantable
FROM pg_class c, aclexplode(c.relacl) a
WHERE c.oid = %(table)s::regclass AND a.grantee <> c.relowner
ORDER BY 1, 2;

-- name: set_owner
ALTER TABLE {table} OWNER TO {owner};

-- name: grant
GRANT {privilege} ON {table} TO {grantee} {option};

-- name: drop_live
DROP TABLE {live};

-- name: rename_table
ALTER TABLE {next} RENAME TO {live};

-- name: rename_index
-- Renaming a constraint's index renames the constraint too.
ALTER INDEX {name} RENAME TO {new_name};

-- name: analyze
ANALYZE {table};

-- name: update_dataset_stats
UPDATE datasets
SET stats = jsonb_set(stats, '{virtual}', %(stats)s)
WHERE version = %(version)s;

-- name: newest_generation
SELECT id, dataset_version, created_at FROM virtual_generations ORDER BY id DESC LIMIT 1;
