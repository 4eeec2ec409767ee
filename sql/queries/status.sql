-- Queries of `pipeline status` (pipeline_cli/stages/status.py). Each probe is a LIMIT 1 on
-- stage_runs (stage, status, started_at DESC) or (stage, started_at DESC), so the cost does not
-- grow with the run history (match-gps every minute adds half a million rows a year).

-- name: stage_summary
-- Per stage: the newest run, the newest good (success|noop) run, the newest run that did work,
-- the newest failure, failures since the last good run, and runs still running.
SELECT s.stage,
       last.run_id, last.status, last.started_at, last.finished_at, last.duration_ms,
       last.counts, last.error, last.host,
       ok.started_at AS ok_started_at, ok.finished_at AS ok_finished_at,
       ok.duration_ms AS ok_duration_ms, ok.counts AS ok_counts,
       ok.unknown_modes AS ok_unknown_modes,
       work.finished_at AS work_finished_at,
       bad.finished_at AS bad_finished_at, bad.error AS bad_error,
       fails.n AS consecutive_failures,
       run.n AS running, run.since AS running_since
FROM unnest(%(stages)s::text[]) AS s(stage)
LEFT JOIN LATERAL (
    SELECT r.run_id, r.status, r.started_at, r.finished_at, r.duration_ms, r.counts, r.error,
           r.host
    FROM stage_runs r WHERE r.stage = s.stage ORDER BY r.started_at DESC LIMIT 1
) last ON true
LEFT JOIN LATERAL (
    SELECT * FROM (
        (SELECT r.started_at, r.finished_at, r.duration_ms, r.counts,
                r.result -> 'unknown_modes' AS unknown_modes FROM stage_runs r
         WHERE r.stage = s.stage AND r.status = 'success' ORDER BY r.started_at DESC LIMIT 1)
        UNION ALL
        (SELECT r.started_at, r.finished_at, r.duration_ms, r.counts,
                r.result -> 'unknown_modes' AS unknown_modes FROM stage_runs r
         WHERE r.stage = s.stage AND r.status = 'noop' ORDER BY r.started_at DESC LIMIT 1)
    ) u ORDER BY u.started_at DESC LIMIT 1
) ok ON true
LEFT JOIN LATERAL (
    SELECT r.finished_at FROM stage_runs r
    WHERE r.stage = s.stage AND r.status = 'success' ORDER BY r.started_at DESC LIMIT 1
) work ON true
LEFT JOIN LATERAL (
    SELECT * FROM (
        (SELECT r.started_at, r.finished_at, r.error FROM stage_runs r
         WHERE r.stage = s.stage AND r.status = 'failed' ORDER BY r.started_at DESC LIMIT 1)
        UNION ALL
        (SELECT r.started_at, r.finished_at, r.error FROM stage_runs r
         WHERE r.stage = s.stage AND r.status = 'crashed' ORDER BY r.started_at DESC LIMIT 1)
    ) u ORDER BY u.started_at DESC LIMIT 1
) bad ON true
LEFT JOIN LATERAL (
    -- The failures since the last good run, capped so a long outage stays cheap: an index
    -- range of (stage, status, started_at) per failing status.
    SELECT count(*) AS n
    FROM (SELECT 1 FROM stage_runs r
          WHERE r.stage = s.stage AND r.status IN ('failed', 'crashed')
            AND r.started_at > coalesce(ok.started_at, '-infinity')
          LIMIT 100) f
) fails ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS n, min(r.started_at) AS since FROM stage_runs r
    WHERE r.stage = s.stage AND r.status = 'running'
) run ON true;

-- name: read_only
-- A standby, or default_transaction_read_only: nothing may be written, and the locks of
-- the primary's runs are not seen here.
SELECT current_setting('transaction_read_only') = 'on' AS read_only;

-- name: installed_at
-- When the schema was first installed: the baseline for "overdue" of a stage that never ran.
SELECT min(applied_at) AS installed_at FROM schema_migrations;

-- name: newest_backup
-- The newest dataset version and where its backup lives (datasets.seq is unique: one probe).
SELECT version, backup_prefix, created_at FROM datasets ORDER BY seq DESC LIMIT 1;

