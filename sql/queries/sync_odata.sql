-- Queries of sync-odata (pipeline_cli/stages/sync_odata.py). Templates in braces ({stage},
-- {target}, {cols}, ...) are filled with psycopg.sql identifiers and fragments made by the
-- stage from the read model's columns and the OData mapping, never with text from the feed.

-- name: stage_settings
-- For this transaction. The staging tables of a 200 k-row feed take about 30 MB; with the
-- default 8 MB of buffers for temporary tables each check would read them back from disk
-- (memory is taken only as used; the setting must come before the session's first temporary
-- table). The checks and the diff hash a whole feed's keys: with the default 4 MB of
-- work_mem those hashes spill to disk. JIT: the planner costs the checks over a whole feed
-- high enough to compile them, which took 0.15 s per query for a query that runs in
-- milliseconds. ANALYZE samples 3,000 rows instead of 30,000.
SELECT set_config('temp_buffers', '256MB', true), set_config('work_mem', '64MB', true),
       set_config('jit', 'off', true), set_config('default_statistics_target', '10', true);

-- name: create_stage
-- One set of the feed for this transaction: the read-model columns without their constraints
-- (so that duplicates and dangling references can be found and named), the row's place in the
-- feed (n) and, for a row with a refused value, the text of its source fields (bad).
CREATE TEMP TABLE {stage} ON COMMIT DROP AS
SELECT 0::bigint AS n, {cols}, NULL::text[] AS bad FROM {target} WITH NO DATA;

-- name: page_insert
-- One page: json_to_recordset reads the source fields as text (f0, f1, ...), the sync_*
-- functions of sql/015_sync_in_sql.sql make them read-model values (NULL if refused), and a
-- row with a refused value keeps those texts for the problem report. OFFSET 0 keeps the inner
-- query whole, so each function runs once per value. A mapped path reads into a property,
-- which is then read as json (t0, t1, ...): a lateral subquery takes the text at each path
-- (f0, f1, ...) from it (see _Set.page_insert); without paths the lateral is left out.
INSERT INTO {stage} (n, {cols}, bad)
SELECT n, {out}, CASE WHEN {bad} THEN ARRAY[{raw}] END
FROM (
    SELECT %(base)s::bigint + x.n AS n, {values}, {raw}
    FROM (SELECT %(page)s::json AS p) page,
         ROWS FROM (json_to_recordset({rows}) AS ({defs})) WITH ORDINALITY AS x({props}, n){lateral}
    OFFSET 0
) s;

-- name: analyze_stage
-- autovacuum never analyzes temporary tables; without statistics the checks and the apply
-- plan badly. The key columns are all they join or group on, and a small sample (see
-- stage_settings) tells the planner enough: how many rows, and that keys are near unique.
ANALYZE {stage} ({cols});

-- name: problems
-- Why each refused row was refused: one row per refused value, in feed and column order.
WITH refused AS MATERIALIZED (SELECT n, bad FROM {stage} WHERE bad IS NOT NULL)
SELECT b.n, c.col, p.problem[1] AS kind, p.problem[2] AS message,
       b.bad[%(key)s::integer] AS key
FROM refused b
CROSS JOIN LATERAL unnest(%(cols)s::text[], %(kinds)s::text[], %(fields)s::integer[],
                          %(required)s::boolean[], %(lows)s::float8[], %(highs)s::float8[])
    WITH ORDINALITY AS c(col, kind, field, required, low, high, ord)
CROSS JOIN LATERAL (SELECT sync_problem(c.kind, b.bad[c.field], c.required, c.low, c.high)
                    AS problem) p
WHERE p.problem IS NOT NULL
ORDER BY b.n, c.ord;

-- name: delete_refused
DELETE FROM {stage} WHERE bad IS NOT NULL;

-- name: duplicate_keys
-- Keys that more than one accepted row has, and whether those rows are all the same ({cols}:
-- every column; a row repeated by paging that shifted under it).
SELECT id, count(*) AS n, count(DISTINCT ({cols})) = 1 AS same
FROM {stage}
WHERE bad IS NULL
GROUP BY id
HAVING count(*) > 1
ORDER BY min(n);

-- name: delete_duplicates
-- --skip-invalid: every row of a key whose rows differ goes (which of them is right is
-- unknowable); of rows that are all the same, the first stays.
DELETE FROM {stage} s
USING (SELECT id, min(n) AS first, count(DISTINCT ({cols})) = 1 AS same
       FROM {stage} GROUP BY id HAVING count(*) > 1) d
WHERE s.id = d.id AND NOT (d.same AND s.n = d.first);

-- name: dangling
-- Accepted rows naming a parent key that no row of the feed has. A parent row that was
-- refused still counts as there: the report names root causes only.
SELECT c.n, c.id, c.{col} AS ref
FROM {stage} c
WHERE c.bad IS NULL
  AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE p.id = c.{col});

-- name: delete_dangling
-- --skip-invalid: refused and duplicated parents are gone already, so this cascades.
DELETE FROM {stage} c
WHERE NOT EXISTS (SELECT 1 FROM {parent} p WHERE p.id = c.{col})
RETURNING c.n, c.id, c.{col} AS ref;

-- name: unweighable_routes
-- Accepted routes that build-graph could not weigh: no distance and no flight in the feed (a
-- refused flight still counts as there: the report names root causes only).
SELECT r.n, r.id
FROM {routes} r
WHERE r.bad IS NULL AND r.distance_km IS NULL
  AND NOT EXISTS (SELECT 1 FROM {flights} f WHERE f.route_id = r.id);

-- name: delete_unweighable_routes
-- --skip-invalid: after the flights' rejects, so a route whose flights all went goes too.
DELETE FROM {routes} r
WHERE r.distance_km IS NULL
  AND NOT EXISTS (SELECT 1 FROM {flights} f WHERE f.route_id = r.id)
RETURNING r.n, r.id;

-- name: count_stage
SELECT count(*) AS n FROM {stage};

-- name: apply
-- Write one set's stage into the read model: insert the new rows, update the changed, delete
-- the vanished (the foreign keys are deferred, so the order of the sets does not matter).
-- One hash full join finds all three; only they reach the writes (an unchanged row that hit
-- ON CONFLICT would still be locked, its tuple and page written). Counts what it did: xmax is
-- 0 for a freshly inserted row and set for a row updated by ON CONFLICT.
WITH diff AS MATERIALIZED (
    SELECT {s_cols}, CASE WHEN s.id IS NULL THEN t.id END AS vanished
    FROM {stage} s
    FULL JOIN {target} t ON t.id = s.id
    WHERE s.id IS NULL OR t.id IS NULL OR ({s_cols}) IS DISTINCT FROM ({t_cols})
), up AS (
    INSERT INTO {target} ({cols})
    SELECT {cols} FROM diff WHERE vanished IS NULL
    ON CONFLICT (id) DO UPDATE SET {assignments}
    RETURNING (xmax = 0) AS inserted
), gone AS (  -- through the primary key: the planner cannot know how few rows vanished
    DELETE FROM {target}
    WHERE id = ANY (ARRAY(SELECT vanished FROM diff WHERE vanished IS NOT NULL))
    RETURNING 1
)
SELECT (SELECT count(*) FROM up WHERE inserted) AS inserted,
       (SELECT count(*) FROM up WHERE NOT inserted) AS updated,
       (SELECT count(*) FROM gone) AS deleted;

-- name: savepoint_apply
SAVEPOINT apply;

-- name: rollback_apply
ROLLBACK TO SAVEPOINT apply;

-- name: constraints_now
-- Check the deferred foreign keys now (a reference to a row the feed does not have), before
-- the backup upload, not at COMMIT.
SET CONSTRAINTS ALL IMMEDIATE;

-- name: count_rows
SELECT count(*) AS n FROM {target};

-- name: active_dataset
SELECT version, seq, hash, set_hashes, counts, created_at, feed_digests, stats
FROM datasets
WHERE active;

-- name: get_dataset
SELECT version, seq, hash, set_hashes, counts, diff, source, restored_from, backup_prefix,
       created_at, active, stats
FROM datasets
WHERE version = %(version)s;

-- name: next_seq
SELECT coalesce(max(seq), 0) + 1 AS seq FROM datasets;

-- name: run_known
-- Whether a backup's run is one of this database's (an orphan upload of a crashed run).
SELECT EXISTS (SELECT 1 FROM stage_runs WHERE run_id::text = %(run_id)s) AS known;

-- name: insert_dataset
INSERT INTO datasets (version, seq, hash, set_hashes, counts, diff, source, restored_from,
                      backup_prefix, run_id, feed_digests, stats, active)
VALUES (%(version)s, %(seq)s, %(hash)s, %(set_hashes)s, %(counts)s, %(diff)s, %(source)s,
        %(restored_from)s, %(backup_prefix)s, %(run_id)s, %(feed_digests)s, %(stats)s, false)
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
-- Ages are in seconds at %(now)s, to a tenth.
SELECT a.version, a.hash, a.counts, a.diff, a.source, a.created_at,
       round(extract(epoch FROM %(now)s - a.created_at), 1)::float8 AS age_s,
       n.version AS newest_version, n.created_at AS newest_created_at,
       round(extract(epoch FROM %(now)s - n.created_at), 1)::float8 AS newest_age_s,
       (SELECT count(*) FROM datasets) AS versions
FROM (SELECT 1) one
LEFT JOIN datasets a ON a.active
LEFT JOIN LATERAL (
    SELECT version, created_at FROM datasets ORDER BY seq DESC LIMIT 1
) n ON true;

-- name: route_modes
-- Routes without a scheduled flight, per mode: build-graph weighs them by distance / speed.
-- Recorded with each version (datasets.stats.route_modes), so an unchanged feed need not ask.
-- Asked of the stage once an apply has made the read model equal to it: its statistics are
-- fresh, so the planner hashes (on the read model, before autovacuum has analyzed it, it
-- sorted every key: 0.1 s at 120 k routes).
SELECT r.mode, count(*) AS routes
FROM {routes} r
WHERE NOT EXISTS (SELECT 1 FROM {flights} f WHERE f.route_id = r.id)
GROUP BY r.mode;
