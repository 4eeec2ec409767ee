-- status counts the batches closed as too_short in the last hour (a point alone, more than
-- gap_seconds from its device's other points: never matched) beside the completed ones; like
-- processing_batches_completed_idx, this keeps that count a probe of the last hour's rows.
CREATE INDEX processing_batches_too_short_idx ON processing_batches (processing_completed_at)
    WHERE status = 'too_short';
