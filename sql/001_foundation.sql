-- Run history: one row per stage run. A row stays 'running' only while the backend session that
-- wrote it is alive; the runner and `status` turn orphaned rows into 'crashed'.
CREATE TABLE stage_runs (
    run_id        uuid PRIMARY KEY,
    stage         text        NOT NULL,
    host          text        NOT NULL,
    pid           integer     NOT NULL,
    backend_pid   integer     NOT NULL,
    backend_start timestamptz NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    duration_ms   bigint,
    status        text        NOT NULL DEFAULT 'running'
                  CHECK (status IN ('running', 'success', 'noop', 'failed', 'skipped', 'crashed')),
    counts        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    result        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    options       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    error         text
);

CREATE INDEX stage_runs_stage_started_idx ON stage_runs (stage, started_at DESC);
CREATE INDEX stage_runs_running_idx ON stage_runs (stage) WHERE status = 'running';
CREATE INDEX stage_runs_stage_status_idx ON stage_runs (stage, status, started_at DESC);
