-- Queries of sync-odata (pipeline_cli/stages/sync_odata.py). Templates in braces ({stage},
-- {target}, {cols}, ...) are filled with psycopg.sql identifiers by the stage, never with text.

-- name: create_stage
-- A staging copy of one read-model table for this transaction: no keys, so duplicates and
-- dangling references can be found (and reported) in SQL after the COPY.
CREATE TEMP TABLE {stage} (LIKE {target} INCLUDING DEFAULTS) ON COMMIT DROP;

-- name: copy_stage
COPY {stage} ({cols}) FROM STDIN;

-- name: analyze_stage
-- autovacuum never analyzes temporary tables; without statistics the checks below plan badly.
ANALYZE {stage} ({cols});

-- name: duplicate_keys
SELECT id, count(*) AS n, count(*) OVER () AS total
FROM {stage}
GROUP BY id
HAVING count(*) > 1
ORDER BY id
LIMIT %(limit)s;

-- name: delete_duplicates
-- --skip-invalid: every row of a duplicated key goes (which of them is right is unknowable).
DELETE FROM {stage}
WHERE id IN (SELECT id FROM {stage} GROUP BY id HAVING count(*) > 1)
RETURNING id;

-- name: create_invalid
-- Keys of rows that failed the per-row checks (strict mode), so that references to them are
-- not reported a second time as unknown.
CREATE TEMP TABLE {invalid} (id text) ON COMMIT DROP;

-- name: copy_invalid
COPY {invalid} (id) FROM STDIN;

-- name: dangling
SELECT c.id, c.{col} AS ref, count(*) OVER () AS total
FROM {stage} c
WHERE NOT EXISTS (SELECT 1 FROM {parent} p WHERE p.id = c.{col})
  AND NOT EXISTS (SELECT 1 FROM {invalid} i WHERE i.id = c.{col})
ORDER BY c.id
LIMIT %(limit)s;

-- name: delete_dangling
DELETE FROM {stage} c
WHERE NOT EXISTS (SELECT 1 FROM {parent} p WHERE p.id = c.{col})
RETURNING c.id, c.{col} AS ref;

-- name: diff
-- Rows the sync would insert, change and delete in one read-model table.
SELECT
    (SELECT count(*) FROM {stage} s
      WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE t.id = s.id)) AS inserted,
    (SELECT count(*) FROM {stage} s JOIN {target} t ON t.id = s.id
      WHERE ROW(s.*) IS DISTINCT FROM ROW(t.*)) AS updated,
    (SELECT count(*) FROM {target} t
      WHERE NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.id = t.id)) AS deleted;

-- name: upsert
-- Only new and changed rows reach the INSERT: an unchanged row that hit ON CONFLICT would
-- still be locked (its tuple and page written) even when the WHERE below rejects it. The
-- anti-join is one hash join. Counts what it did: xmax is 0 for a freshly inserted row and
-- set for a row updated by ON CONFLICT.
WITH up AS (
    INSERT INTO {target} ({cols})
    SELECT {s_cols} FROM {stage} s
    LEFT JOIN {target} t ON t.id = s.id
    WHERE t.id IS NULL OR ROW(s.*) IS DISTINCT FROM ROW(t.*)
    ON CONFLICT (id) DO UPDATE SET {assignments}
    WHERE ROW({target}.*) IS DISTINCT FROM ROW(EXCLUDED.*)
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted) AS inserted,
       count(*) FILTER (WHERE NOT inserted) AS updated
FROM up;

-- name: upsert_changes
-- Only the rows the row worker found new or changed are staged, so no anti-join is needed; a
-- row that turns out equal after all is left alone by the WHERE and counted by neither.
WITH up AS (
    INSERT INTO {target} ({cols})
    SELECT {cols} FROM {stage}
    ON CONFLICT (id) DO UPDATE SET {assignments}
    WHERE ROW({target}.*) IS DISTINCT FROM ROW(EXCLUDED.*)
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted) AS inserted,
       count(*) FILTER (WHERE NOT inserted) AS updated
FROM up;

-- name: delete_vanished
WITH gone AS (
    DELETE FROM {target} t
    WHERE NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.id = t.id)
    RETURNING 1
)
SELECT count(*) AS deleted FROM gone;

-- name: constraints_now
-- Check the deferred foreign keys now, before the backup upload, not at COMMIT.
SET CONSTRAINTS ALL IMMEDIATE;

-- name: active_dataset
SELECT version, seq, hash, set_hashes, counts, created_at, feed_digests
FROM datasets
WHERE active;

-- name: get_dataset
SELECT version, seq, hash, set_hashes, counts, diff, source, restored_from, backup_prefix,
       created_at, active
FROM datasets
WHERE version = %(version)s;

-- name: next_seq
SELECT coalesce(max(seq), 0) + 1 AS seq FROM datasets;

-- name: insert_dataset
INSERT INTO datasets (version, seq, hash, set_hashes, counts, diff, source, restored_from,
                      backup_prefix, run_id, feed_digests, active)
VALUES (%(version)s, %(seq)s, %(hash)s, %(set_hashes)s, %(counts)s, %(diff)s, %(source)s,
        %(restored_from)s, %(backup_prefix)s, %(run_id)s, %(feed_digests)s, false)
RETURNING created_at;

-- name: deactivate
UPDATE datasets SET active = false WHERE active;

-- name: activate
UPDATE datasets SET active = true WHERE version = %(version)s;

-- name: list_datasets
SELECT version, seq, hash, counts, diff, source, restored_from, backup_prefix, created_at,
       active
FROM datasets
ORDER BY seq DESC
LIMIT %(limit)s;

-- name: dataset_summary
-- For status: the active dataset, the newest version (its backup is the newest) and how many.
SELECT a.version, a.hash, a.counts, a.diff, a.source, a.created_at,
       n.version AS newest_version, n.created_at AS newest_created_at,
       (SELECT count(*) FROM datasets) AS versions
FROM (SELECT 1) one
LEFT JOIN datasets a ON a.active
LEFT JOIN LATERAL (
    SELECT version, created_at FROM datasets ORDER BY seq DESC LIMIT 1
) n ON true;

-- ---------------------------------------------------------------- row index

-- name: row_index
SELECT entity, chunk, format, rows, keys, digests
FROM dataset_row_index
WHERE version = %(version)s
ORDER BY entity, chunk;

-- name: drop_row_indexes
-- Only the active version keeps its row index: it is what the next sync compares with.
DELETE FROM dataset_row_index;

-- name: insert_row_index
INSERT INTO dataset_row_index (version, entity, chunk, format, rows, keys, digests)
VALUES (%(version)s, %(entity)s, %(chunk)s, %(format)s, %(rows)s, %(keys)b, %(digests)b);

-- name: savepoint_changes
SAVEPOINT changes_only;

-- name: rollback_changes
ROLLBACK TO SAVEPOINT changes_only;

-- name: delete_keys
-- The rows of the active version that the feed no longer has (found with the row index).
WITH gone AS (
    DELETE FROM {target}
    WHERE id = ANY(%(keys)s::text[])
    RETURNING 1
)
SELECT count(*) AS deleted FROM gone;

-- name: count_rows
-- After writing only the changes: the read model must hold exactly the feed's rows.
SELECT count(*) AS n FROM {target};

-- name: route_modes
-- Routes without a scheduled flight, per mode: build-graph weighs them by distance / speed.
SELECT r.mode, count(*) AS routes
FROM routes r
WHERE NOT EXISTS (SELECT 1 FROM flights f WHERE f.route_id = r.id)
GROUP BY r.mode;
