-- Queries of match-gps and ingest-gps (pipeline_cli/stages/match_gps.py, ingest_gps.py).

-- name: batching_lock
-- Serialises batch making across workers; held until the making transaction ends.
SELECT pg_advisory_xact_lock(%(key)s);

-- name: plan_batches
-- Unbatched points cut into runs per device: a gap above gap_seconds starts a new segment,
-- and a segment is cut into max_batch_seconds buckets. A bucket is closed (final) when a later
-- bucket or segment of the same device exists, or when its segment ended more than
-- gap_seconds ago (no point can still join it). Works on the next %(devices)s devices after
-- %(after)s, found by a loose index scan of the unbatched-points index.
-- The per-point work is one sort and one pass of window functions; windows and groups use a
-- per-slice device number, not device_id, so the sort compares integers, not text under the
-- database's collation (half the CPU of partitioning by device_id).
WITH RECURSIVE devs AS (
    (SELECT device_id FROM gps_points
     WHERE batch_id IS NULL AND device_id > %(after)s
     ORDER BY device_id LIMIT 1)
    UNION ALL
    SELECT (SELECT g.device_id FROM gps_points g
            WHERE g.batch_id IS NULL AND g.device_id > devs.device_id
            ORDER BY g.device_id LIMIT 1)
    FROM devs WHERE devs.device_id IS NOT NULL
), chosen AS (  -- referenced twice, so materialised once: each device keeps its number
    SELECT device_id, row_number() OVER () AS dev
    FROM devs WHERE device_id IS NOT NULL LIMIT %(devices)s
), pts AS (
    SELECT c.dev, p.recorded_at,
           coalesce(p.recorded_at - lag(p.recorded_at) OVER w
                    > make_interval(secs => %(gap_seconds)s), true) AS starts_segment
    FROM chosen c
    JOIN gps_points p ON p.device_id = c.device_id AND p.batch_id IS NULL
    WINDOW w AS (PARTITION BY c.dev ORDER BY p.recorded_at)
), segs AS (
    SELECT dev, recorded_at,
           count(*) FILTER (WHERE starts_segment) OVER w AS seg,
           max(recorded_at) FILTER (WHERE starts_segment) OVER w AS seg_start
    FROM pts
    WINDOW w AS (PARTITION BY dev ORDER BY recorded_at)
), grouped AS (
    SELECT dev, seg,
           -- date_part is double precision: extract() would compute in numeric, slowly.
           floor(date_part('epoch', recorded_at - seg_start) / %(max_batch_seconds)s)::bigint
               AS bucket,
           min(recorded_at) AS start_time, max(recorded_at) AS end_time, count(*) AS n
    FROM segs
    GROUP BY dev, seg, bucket
), marked AS (
    SELECT dev, start_time, end_time, n, seg, bucket,
           max(seg) OVER (PARTITION BY dev) AS last_seg,
           max(bucket) OVER (PARTITION BY dev, seg) AS last_bucket,
           max(end_time) OVER (PARTITION BY dev, seg) AS seg_end
    FROM grouped
)
SELECT c.device_id, m.start_time, m.end_time, m.n::integer AS n,
       m.seg < m.last_seg
           OR m.bucket < m.last_bucket
           OR m.seg_end < now() - make_interval(secs => %(gap_seconds)s) AS closed,
       extract(epoch FROM now() - m.end_time)::double precision AS age_s
FROM marked m JOIN chosen c USING (dev)
ORDER BY c.device_id, m.start_time;

-- name: insert_batches
-- Creates the batches and hands each its points in one statement; too_short batches are
-- closed at once (their points count as processed: there is nothing to match).
WITH plan AS (
    SELECT * FROM unnest(%(device_ids)s::text[], %(starts)s::timestamptz[],
                         %(ends)s::timestamptz[], %(counts)s::integer[], %(statuses)s::text[])
        AS p(device_id, start_time, end_time, coordinate_count, status)
), ins AS (
    INSERT INTO processing_batches (device_id, start_time, end_time, coordinate_count, status,
                                    processing_completed_at, error_message)
    SELECT device_id, start_time, end_time, coordinate_count, status,
           CASE WHEN status = 'too_short' THEN now() END,
           CASE WHEN status = 'too_short' THEN 'fewer than 2 points' END
    FROM plan
    RETURNING batch_id, device_id, start_time, end_time, status
)
UPDATE gps_points p
SET batch_id = ins.batch_id, processed = (ins.status = 'too_short')
FROM ins
WHERE p.device_id = ins.device_id
  AND p.recorded_at BETWEEN ins.start_time AND ins.end_time
  AND p.batch_id IS NULL;

-- name: recount_batches
-- After a point arrived inside a batch's time range between planning and inserting.
UPDATE processing_batches b
SET coordinate_count = (SELECT count(*) FROM gps_points p
                        WHERE p.device_id = b.device_id AND p.batch_id = b.batch_id
                          AND p.recorded_at BETWEEN b.start_time AND b.end_time)
WHERE b.status IN ('pending', 'too_short') AND b.created_at = now();

-- name: rescue_expired
-- A lease that ran out belongs to a worker that died or hung: it counts as a failed attempt.
UPDATE processing_batches b
SET status = CASE WHEN b.retry_count + 1 >= %(max_attempts)s THEN 'dead' ELSE 'failed' END,
    retry_count = b.retry_count + 1,
    next_attempt_at = now(),
    error_message = 'lease of worker ' || coalesce(b.worker, '?') || ' expired at '
                    || to_char(b.lease_expires_at AT TIME ZONE 'UTC',
                               'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
    lease_expires_at = NULL,
    lease_token = NULL,
    updated_at = now()
WHERE b.batch_id IN (
    SELECT batch_id FROM processing_batches
    WHERE status = 'processing' AND lease_expires_at < now()
    FOR UPDATE SKIP LOCKED
)
RETURNING b.batch_id, b.status;

-- name: claim_batch
-- Claims the oldest ready batch and returns it with its points, in one round trip. Times come
-- as epoch seconds (double precision holds every microsecond exactly for centuries, and
-- to_timestamp gives back the same timestamptz): far cheaper for the worker to load than
-- timestamptz values.
WITH c AS (
UPDATE processing_batches b
SET status = 'processing',
    worker = %(worker)s,
    lease_token = %(token)s,
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
    processing_started_at = now(),
    updated_at = now()
WHERE b.batch_id = (
    SELECT batch_id FROM processing_batches
    WHERE status IN ('pending', 'failed') AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING b.batch_id, b.device_id, b.start_time, b.end_time, b.coordinate_count,
          b.retry_count
)
SELECT c.*, p.times, p.lats, p.lons
FROM c, LATERAL (
    SELECT array_agg(date_part('epoch', recorded_at) ORDER BY recorded_at) AS times,
           array_agg(latitude ORDER BY recorded_at) AS lats,
           array_agg(longitude ORDER BY recorded_at) AS lons
    FROM gps_points
    WHERE device_id = c.device_id AND recorded_at BETWEEN c.start_time AND c.end_time
      AND batch_id = c.batch_id AND NOT processed
) p;

-- name: complete_batch
-- One statement, so one transaction: the polylines, the points and the batch row change
-- together or not at all. Nothing happens unless this worker still holds the lease.
WITH b AS (
    UPDATE processing_batches
    SET status = 'completed',
        matched_count = %(matched)s,
        polyline_count = %(polylines)s,
        osrm_calls = osrm_calls + %(osrm_calls)s,
        chunk_errors = %(chunk_errors)s,
        error_message = %(note)s,
        processing_completed_at = now(),
        lease_expires_at = NULL,
        lease_token = NULL,
        updated_at = now()
    WHERE batch_id = %(batch_id)s AND lease_token = %(token)s AND status = 'processing'
    RETURNING batch_id, device_id, start_time, end_time, coordinate_count
), lines AS (
    INSERT INTO cached_polylines (device_id, start_time, end_time, encoded_polyline,
                                  osrm_confidence, point_count, source_coordinates_count,
                                  processing_duration_ms, batch_id)
    SELECT b.device_id, to_timestamp(l.start_time), to_timestamp(l.end_time),
           l.encoded_polyline, l.confidence, l.point_count, b.coordinate_count,
           %(duration_ms)s, b.batch_id
    FROM b, unnest(%(starts)s::double precision[], %(ends)s::double precision[],
                   %(encoded)s::text[], %(confidences)s::double precision[],
                   %(point_counts)s::integer[])
             AS l(start_time, end_time, encoded_polyline, confidence, point_count)
    ON CONFLICT (device_id, start_time) DO UPDATE
    SET end_time = EXCLUDED.end_time,
        encoded_polyline = EXCLUDED.encoded_polyline,
        osrm_confidence = EXCLUDED.osrm_confidence,
        point_count = EXCLUDED.point_count,
        source_coordinates_count = EXCLUDED.source_coordinates_count,
        processing_duration_ms = EXCLUDED.processing_duration_ms,
        batch_id = EXCLUDED.batch_id,
        created_at = now()
    RETURNING 1
), pts AS (
    UPDATE gps_points p
    SET processed = true
    FROM b
    WHERE p.device_id = b.device_id AND p.recorded_at BETWEEN b.start_time AND b.end_time
      AND p.batch_id = b.batch_id AND NOT p.processed
    RETURNING 1
)
SELECT (SELECT count(*) FROM b)::integer AS batches,
       (SELECT count(*) FROM lines)::integer AS polylines,
       (SELECT count(*) FROM pts)::integer AS points;

-- name: fail_batch
UPDATE processing_batches
SET status = CASE WHEN retry_count + 1 >= %(max_attempts)s THEN 'dead' ELSE 'failed' END,
    retry_count = retry_count + 1,
    next_attempt_at = now() + make_interval(secs => %(delay_seconds)s),
    error_message = %(error)s,
    osrm_calls = osrm_calls + %(osrm_calls)s,
    lease_expires_at = NULL,
    lease_token = NULL,
    updated_at = now()
WHERE batch_id = %(batch_id)s AND lease_token = %(token)s AND status = 'processing'
RETURNING status, retry_count, next_attempt_at;

-- name: work_waiting
-- Whether another round could find anything: a ready batch, or points not in a batch yet.
-- Both are probes of partial indexes.
SELECT EXISTS (SELECT 1 FROM processing_batches
               WHERE status IN ('pending', 'failed') AND next_attempt_at <= now()) AS batches,
       EXISTS (SELECT 1 FROM gps_points WHERE batch_id IS NULL) AS points;

-- name: release_batch
-- Give a claimed batch back untouched (stop requested before it was finished).
UPDATE processing_batches
SET status = CASE WHEN retry_count = 0 THEN 'pending' ELSE 'failed' END,
    lease_expires_at = NULL,
    lease_token = NULL,
    updated_at = now()
WHERE batch_id = %(batch_id)s AND lease_token = %(token)s AND status = 'processing'
RETURNING status;

-- name: list_batches
SELECT batch_id, device_id, start_time, end_time, status, coordinate_count, matched_count,
       polyline_count, osrm_calls, retry_count, next_attempt_at, lease_expires_at, worker,
       error_message, chunk_errors, processing_completed_at, created_at, updated_at
FROM processing_batches
WHERE (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s)
ORDER BY updated_at DESC, batch_id
LIMIT %(limit)s;

-- name: requeue_batches
UPDATE processing_batches
SET status = 'pending',
    retry_count = 0,
    next_attempt_at = now(),
    lease_expires_at = NULL,
    lease_token = NULL,
    error_message = NULL,
    updated_at = now()
WHERE status = ANY(%(statuses)s::text[])
  AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s)
RETURNING batch_id, coordinate_count;

-- name: backlog_points
-- Points not yet in a batch, capped so status stays fast with millions waiting. Points in
-- open batches are added from open_batches.
SELECT count(*)::bigint AS n
FROM (SELECT 1 FROM gps_points WHERE batch_id IS NULL LIMIT %(cap)s) t;

-- name: oldest_unprocessed
SELECT least((SELECT min(recorded_at) FROM gps_points WHERE batch_id IS NULL),
             (SELECT min(start_time) FROM processing_batches
              WHERE status IN ('pending', 'processing', 'failed', 'dead'))) AS oldest,
       now() AS now;

-- name: open_batches
SELECT status, count(*)::bigint AS n, sum(coordinate_count)::bigint AS points,
       min(next_attempt_at) AS next_attempt_at, min(start_time) AS oldest
FROM processing_batches
WHERE status IN ('pending', 'processing', 'failed', 'dead')
GROUP BY status;

-- name: recent_batches
SELECT (SELECT count(*) FROM processing_batches
        WHERE status = 'completed' AND processing_completed_at > now() - interval '1 hour'
       )::bigint AS completed_last_hour,
       (SELECT max(processing_completed_at) FROM processing_batches
        WHERE status = 'completed') AS last_completed_at;

-- name: expired_leases
SELECT count(*)::bigint AS n FROM processing_batches
WHERE status = 'processing' AND lease_expires_at < now();

-- ---------------------------------------------------------------- ingest-gps

-- name: ingest_staging
CREATE TEMP TABLE gps_ingest (
    device_id   text,
    recorded_at timestamptz,
    latitude    double precision,
    longitude   double precision,
    source      text,
    seq         bigint
) ON COMMIT DROP;

-- name: ingest_copy
COPY gps_ingest (device_id, recorded_at, latitude, longitude, source, seq) FROM STDIN;

-- name: ingest_insert
-- The same device and time is stored once: the first row of a file wins within the load,
-- and a point already stored wins over the file.
INSERT INTO gps_points (device_id, recorded_at, latitude, longitude, source)
SELECT DISTINCT ON (device_id, recorded_at) device_id, recorded_at, latitude, longitude, source
FROM gps_ingest
ORDER BY device_id, recorded_at, seq
ON CONFLICT (device_id, recorded_at) DO NOTHING;
