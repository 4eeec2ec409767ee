-- prune: indexes that let the daily retention pass find what is due without scanning whole
-- tables. Each is partial or small, so ingest and matching pay little for them.

-- Finished GPS batches by age: prune deletes a batch and its points once end_time is old.
CREATE INDEX processing_batches_finished_end_idx ON processing_batches (end_time)
    WHERE status IN ('completed', 'too_short');

-- Cached polylines by age (last_accessed has its own index, cached_polylines_access_idx).
CREATE INDEX cached_polylines_created_idx ON cached_polylines (created_at);

-- Run history by age, across stages (the existing indexes lead with the stage).
CREATE INDEX stage_runs_started_idx ON stage_runs (started_at);
