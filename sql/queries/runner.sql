-- Queries of the stage runner (pipeline_cli/runner.py), of `pipeline db migrate` and of the
-- database's identity (pipeline_cli/db.py).

-- name: has_schema_migrations
SELECT to_regclass('schema_migrations') IS NOT NULL AS present,
       current_setting('transaction_read_only') = 'on' AS read_only;

-- name: may_create
-- Where the migrations create their tables (the search_path's first schema that exists),
-- and whether the role may.
SELECT current_user AS role, current_schema() AS schema,
       current_setting('search_path') AS search_path,
       coalesce(has_schema_privilege(current_schema(), 'CREATE'), false) AS may_create;

-- name: create_schema_migrations
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: tables_elsewhere
-- Where the pipeline's tables are when the search_path does not reach them (a search_path
-- changed for the database or role after the migration).
SELECT n.nspname AS schema, current_setting('search_path') AS search_path
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = 'schema_migrations' AND c.relkind = 'r'
  AND to_regclass('schema_migrations') IS NULL
ORDER BY 1;

-- name: applied_migrations
SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO schema_migrations (version, name, checksum)
VALUES (%(version)s, %(name)s, %(checksum)s);

-- name: has_deployment
-- Whether the deployment table exists (migration 028): status of an older schema reads on.
SELECT to_regclass('deployment') IS NOT NULL AS present;

-- name: deployment_id
-- This database's identity as a deployment (sql/028_deployment_identity.sql), the owner it
-- claims its Redis prefix for.
SELECT id::text AS id FROM deployment;

-- name: backend_identity
-- The server session this connection is on right now; inside the run's open transaction that
-- is the one holding the run's locks, even through a transaction pooler.
SELECT pg_backend_pid() AS backend_pid, backend_start
FROM pg_stat_activity WHERE pid = pg_backend_pid();

-- name: try_lock
-- Transaction-scoped: held until the runner ends the transaction it keeps open for the run.
-- That transaction sits idle for the whole run, so a server or role setting of
-- idle_in_transaction_session_timeout would end the session and free the lock mid-run.
SELECT pg_try_advisory_xact_lock(%(key)s) AS locked,
       set_config('idle_in_transaction_session_timeout', '0', true) AS no_idle_timeout;

-- name: lock_alive
-- The session holding the run's locks still answers (it ends with its connection).
SELECT 1 AS alive;

-- name: running_runs
SELECT run_id FROM stage_runs WHERE status = 'running';

-- name: reap_crashed
-- A 'running' row whose run lock nobody holds belongs to a process that died: the runner holds
-- that lock in a transaction open for the whole run, which ends with the process (also through
-- a pooler, which closes the server side of a client that vanished mid-transaction). No
-- backend pid is trusted: a pooler hands one server session to many clients.
UPDATE stage_runs r
SET status = 'crashed',
    finished_at = now(),
    duration_ms = (extract(epoch FROM now() - r.started_at) * 1000)::bigint,
    error = coalesce(r.error, 'the process died without recording a result')
FROM unnest(%(run_ids)s::uuid[], %(keys)s::bigint[]) AS k(run_id, key)
WHERE r.run_id = k.run_id
  AND r.status = 'running'
  AND NOT EXISTS (
      SELECT 1 FROM pg_locks l
      WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND l.classid = ((k.key >> 32) & 4294967295)::oid
        AND l.objid = (k.key & 4294967295)::oid
  )
RETURNING r.run_id, r.stage;

-- name: lock_holders
-- Sessions holding the advisory locks with the given keys, joined to their run rows (the run
-- recorded the server session of its lock transaction; the newest running row wins).
SELECT DISTINCT ON (k.key)
       k.key, a.pid AS backend_pid, a.application_name, a.backend_start,
       r.run_id, r.stage, r.host, r.pid, r.started_at
FROM unnest(%(keys)s::bigint[]) AS k(key)
JOIN pg_locks l
  ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
 AND l.classid = ((k.key >> 32) & 4294967295)::oid
 AND l.objid = (k.key & 4294967295)::oid
JOIN pg_stat_activity a ON a.pid = l.pid
LEFT JOIN stage_runs r
  ON r.backend_pid = a.pid AND r.backend_start = a.backend_start AND r.status = 'running'
ORDER BY k.key, r.started_at DESC NULLS LAST;

-- name: insert_run
INSERT INTO stage_runs (run_id, stage, host, pid, backend_pid, backend_start, options)
VALUES (%(run_id)s, %(stage)s, %(host)s, %(pid)s, %(backend_pid)s, %(backend_start)s,
        %(options)s);

-- name: finish_run
UPDATE stage_runs
SET status = %(status)s,
    finished_at = now(),
    duration_ms = %(duration_ms)s,
    counts = %(counts)s,
    result = %(result)s,
    error = %(error)s
WHERE run_id = %(run_id)s;

-- name: last_runs
-- The newest run of every stage, plus its last success and last failure.
SELECT s.stage,
       last.run_id, last.status, last.started_at, last.finished_at, last.duration_ms,
       last.counts, last.error, last.host, last.pid,
       ok.finished_at AS last_success_at, ok.duration_ms AS last_success_ms,
       ok.counts AS last_success_counts,
       bad.finished_at AS last_failure_at, bad.error AS last_failure_error
FROM (SELECT DISTINCT stage FROM stage_runs) s
CROSS JOIN LATERAL (
    SELECT * FROM stage_runs r WHERE r.stage = s.stage ORDER BY started_at DESC LIMIT 1
) last
LEFT JOIN LATERAL (
    SELECT finished_at, duration_ms, counts FROM stage_runs r
    WHERE r.stage = s.stage AND r.status IN ('success', 'noop')
    ORDER BY started_at DESC LIMIT 1
) ok ON true
LEFT JOIN LATERAL (
    SELECT finished_at, error FROM stage_runs r
    WHERE r.stage = s.stage AND r.status IN ('failed', 'crashed')
    ORDER BY started_at DESC LIMIT 1
) bad ON true
ORDER BY s.stage;
