-- Queries of `pipeline prune` (pipeline_cli/stages/prune.py). Every delete takes at most
-- %(chunk)s rows (of its own table) and runs in its own short transaction, with
-- FOR UPDATE SKIP LOCKED so a row another session holds is left for the next pass.

-- name: gps_batches_due
-- Finished batches before the cutoff that read every point of their range: once their points
-- are pruned they hold none.
SELECT count(*) AS n FROM processing_batches b
WHERE b.status IN ('completed', 'too_short') AND b.end_time < %(cutoff)s
  AND NOT EXISTS (SELECT 1 FROM gps_points g
                  WHERE g.device_id = b.device_id
                    AND g.recorded_at BETWEEN b.start_time AND b.end_time
                    AND NOT txid_visible_in_snapshot(g.arrival, b.points_snapshot));

-- name: gps_batches_delete_chunk
-- Finished batches before the cutoff whose points are all gone (pruned with their partition
-- or in chunks): a late point there later gets a batch of its own.
WITH due AS (
    SELECT b.batch_id FROM processing_batches b
    WHERE b.status IN ('completed', 'too_short') AND b.end_time < %(cutoff)s
      AND NOT EXISTS (SELECT 1 FROM gps_points g
                      WHERE g.device_id = b.device_id
                        AND g.recorded_at BETWEEN b.start_time AND b.end_time)
    LIMIT %(chunk)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM processing_batches pb USING due WHERE pb.batch_id = due.batch_id;

-- name: polylines_due
SELECT count(*) AS n FROM cached_polylines
WHERE created_at < %(cutoff)s AND (last_accessed IS NULL OR last_accessed < %(cutoff)s);

-- name: polylines_delete_chunk
WITH due AS (
    SELECT id FROM cached_polylines
    WHERE created_at < %(cutoff)s AND (last_accessed IS NULL OR last_accessed < %(cutoff)s)
    LIMIT %(chunk)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM cached_polylines c USING due WHERE c.id = due.id;

-- name: runs_keep
-- Runs kept whatever their age: those `status` reads. Per stage the newest run (last run), the
-- newest success (last work) and noop (with it, the last good run: overdue), and every failed
-- or crashed run after the newest good one (failures in a row: pruning them turned "failed 5
-- times in a row" into 1).
WITH good AS (
    SELECT DISTINCT ON (stage, status) run_id, stage, started_at FROM stage_runs
    WHERE status IN ('success', 'noop') ORDER BY stage, status, started_at DESC
)
SELECT run_id FROM good
UNION
SELECT run_id FROM (
    SELECT DISTINCT ON (stage) run_id FROM stage_runs ORDER BY stage, started_at DESC
) newest
UNION
SELECT r.run_id FROM stage_runs r
LEFT JOIN (SELECT stage, max(started_at) AS started_at FROM good GROUP BY stage) g
    ON g.stage = r.stage
WHERE r.status IN ('failed', 'crashed') AND r.started_at > coalesce(g.started_at, '-infinity');

-- name: runs_due
SELECT count(*) AS n FROM stage_runs
WHERE started_at < %(cutoff)s AND status <> 'running' AND run_id <> ALL(%(keep)s::uuid[]);

-- name: runs_delete_chunk
WITH due AS (
    SELECT run_id FROM stage_runs
    WHERE started_at < %(cutoff)s AND status <> 'running' AND run_id <> ALL(%(keep)s::uuid[])
    LIMIT %(chunk)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM stage_runs r USING due WHERE r.run_id = due.run_id;

-- name: datasets_due
-- Dataset versions beyond the %(keep)s newest, except the active one, any version the
-- active graph was built from, and the versions a kept one was restored from (a restore's
-- backup reads the raw pages under its source's prefix); with the run that recorded it, and
-- the generations and graph versions (with their checksums) made from them: prune checks the
-- S3 manifests against these before it deletes an object (docs/prune.md).
WITH RECURSIVE kept AS (
    SELECT version, restored_from FROM datasets
    WHERE active
       OR version IN (SELECT dataset_version FROM graph_versions WHERE active)
       OR version IN (SELECT version FROM datasets ORDER BY seq DESC LIMIT %(keep)s)
    UNION
    SELECT s.version, s.restored_from FROM kept k JOIN datasets s ON s.version = k.restored_from
)
SELECT d.version, d.backup_prefix, d.run_id::text AS run_id,
       coalesce((SELECT array_agg(g.id ORDER BY g.id) FROM virtual_generations g
                 WHERE g.dataset_version = d.version), '{}') AS generations,
       coalesce((SELECT array_agg(gv.version ORDER BY gv.seq) FROM graph_versions gv
                 WHERE gv.dataset_version = d.version AND NOT gv.active), '{}') AS graphs,
       coalesce((SELECT array_agg(gv.checksum ORDER BY gv.seq) FROM graph_versions gv
                 WHERE gv.dataset_version = d.version AND NOT gv.active), '{}') AS checksums
FROM datasets d
WHERE d.version NOT IN (SELECT version FROM kept)
ORDER BY d.seq;

-- name: dataset_delete
-- One dataset version's rows, re-checking the guards under the row lock (a restore or a graph
-- activation may have happened since datasets_due), with its generations and, when the virtual
-- tables still hold them (gen-virtual failed on every newer dataset), its virtual entities.
WITH d AS (
    SELECT version FROM datasets
    WHERE version = %(version)s AND NOT active
      AND version NOT IN (SELECT dataset_version FROM graph_versions WHERE active)
    FOR UPDATE
), gv AS (
    DELETE FROM graph_versions g USING d
    WHERE g.dataset_version = d.version AND NOT g.active RETURNING 1
), vg AS (
    DELETE FROM virtual_generations g USING d WHERE g.dataset_version = d.version RETURNING 1
), vs AS (
    -- The entity tables hold one generation (gen-virtual truncates them): the first row says
    -- whose, so a dataset whose entities are not there costs no scan of millions of rows.
    DELETE FROM virtual_stops s USING d WHERE s.dataset_version = d.version
      AND (SELECT dataset_version FROM virtual_stops LIMIT 1) = %(version)s RETURNING 1
), vr AS (
    DELETE FROM virtual_routes r USING d WHERE r.dataset_version = d.version
      AND (SELECT dataset_version FROM virtual_routes LIMIT 1) = %(version)s RETURNING 1
), vf AS (
    DELETE FROM virtual_frequencies f USING d WHERE f.dataset_version = d.version RETURNING 1
)
SELECT (SELECT count(*) FROM d) AS datasets, (SELECT count(*) FROM gv) AS graph_versions,
       (SELECT count(*) FROM vg) AS generations, (SELECT count(*) FROM vs) AS virtual_stops,
       (SELECT count(*) FROM vr) AS virtual_routes;

-- name: virtual_due
-- What dataset_delete would delete from the virtual tables (for a dry run).
SELECT (SELECT count(*) FROM virtual_stops WHERE dataset_version = %(version)s
          AND (SELECT dataset_version FROM virtual_stops LIMIT 1) = %(version)s
       ) AS virtual_stops,
       (SELECT count(*) FROM virtual_routes WHERE dataset_version = %(version)s
          AND (SELECT dataset_version FROM virtual_routes LIMIT 1) = %(version)s
       ) AS virtual_routes;

-- name: dataset_delete_row
DELETE FROM datasets WHERE version = %(version)s AND NOT active;

-- name: last_run
-- The newest good prune run, for `pipeline status`.
SELECT status, finished_at, counts FROM stage_runs
WHERE stage = 'prune' AND status IN ('success', 'noop')
ORDER BY started_at DESC LIMIT 1;
