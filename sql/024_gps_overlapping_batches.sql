-- Before 013, late points inside a finished batch's time range got a batch of their own, so a
-- device's batches could overlap. Since 013 a point belongs to the latest batch that starts at
-- or before it, and only if that batch reaches it: the points of the older batch after the
-- late one ended belonged to no batch. They counted as unprocessed in gps_point_status, while
-- status (which reads only the backlog) counted them nowhere, no batcher pass ever looked at
-- them again, and prune deleted them with their day. A helper's upgrade from schema 009 lost
-- 237 of 4,800 processed points that way.
--
-- Each device's overlapping batches are cut into pieces that do not overlap, by the rule 013
-- reads them with: every instant of their union goes to the covering batch that starts last.
-- A batch's first piece keeps its row; further pieces (the older batch's part after a late
-- one) are copies of it, with its status and snapshot, so its points stay processed exactly
-- as they were. A batch left without a piece (another started at the same time and reaches
-- further) is removed: its points were the other's already. Point counts are counted again.
CREATE TEMP TABLE gps_batch_pieces ON COMMIT DROP AS
WITH overlapping AS (
    SELECT DISTINCT a.device_id
    FROM processing_batches a
    JOIN processing_batches b ON b.device_id = a.device_id AND b.batch_id <> a.batch_id
                             AND b.start_time <= a.end_time AND a.start_time <= b.end_time
), bounds AS (  -- half-open: a batch holds [start_time, end_time + 1 µs)
    SELECT b.device_id, b.start_time AS t
    FROM processing_batches b JOIN overlapping USING (device_id)
    UNION
    SELECT b.device_id, b.end_time + interval '1 microsecond'
    FROM processing_batches b JOIN overlapping USING (device_id)
), spans AS (
    SELECT device_id, t AS lo, lead(t) OVER (PARTITION BY device_id ORDER BY t) AS hi
    FROM bounds
), owned AS (
    SELECT s.device_id, s.lo, s.hi,
           (SELECT b.batch_id FROM processing_batches b
            WHERE b.device_id = s.device_id AND b.start_time <= s.lo
              AND b.end_time + interval '1 microsecond' >= s.hi
            ORDER BY b.start_time DESC, b.end_time DESC, b.batch_id LIMIT 1) AS owner
    FROM spans s
    WHERE s.hi IS NOT NULL
), runs AS (  -- consecutive spans of one owner (a span of no batch, or another's, breaks it)
    SELECT *, row_number() OVER (PARTITION BY device_id ORDER BY lo)
              - row_number() OVER (PARTITION BY device_id, owner ORDER BY lo) AS run
    FROM owned
)
SELECT device_id, owner, min(lo) AS start_time,
       max(hi) - interval '1 microsecond' AS end_time,
       row_number() OVER (PARTITION BY owner ORDER BY min(lo)) AS piece
FROM runs
WHERE owner IS NOT NULL
GROUP BY device_id, owner, run;

DELETE FROM processing_batches b
WHERE b.device_id IN (SELECT device_id FROM gps_batch_pieces)
  AND NOT EXISTS (SELECT 1 FROM gps_batch_pieces p WHERE p.owner = b.batch_id);

INSERT INTO processing_batches (device_id, start_time, end_time, status, coordinate_count,
                                matched_count, polyline_count, osrm_calls, retry_count,
                                next_attempt_at, lease_expires_at, worker, error_message,
                                chunk_errors, processing_started_at, processing_completed_at,
                                created_at, points_snapshot)
SELECT b.device_id, p.start_time, p.end_time, b.status, 0, b.matched_count, b.polyline_count,
       b.osrm_calls, b.retry_count, b.next_attempt_at, b.lease_expires_at, b.worker,
       b.error_message, b.chunk_errors, b.processing_started_at, b.processing_completed_at,
       b.created_at, b.points_snapshot
FROM gps_batch_pieces p
JOIN processing_batches b ON b.batch_id = p.owner
WHERE p.piece > 1;

UPDATE processing_batches b
SET start_time = p.start_time, end_time = p.end_time, updated_at = now()
FROM gps_batch_pieces p
WHERE p.owner = b.batch_id AND p.piece = 1;

UPDATE processing_batches b
SET coordinate_count = (SELECT count(*) FROM gps_points g
                        WHERE g.device_id = b.device_id
                          AND g.recorded_at BETWEEN b.start_time AND b.end_time)
WHERE b.device_id IN (SELECT device_id FROM gps_batch_pieces);
