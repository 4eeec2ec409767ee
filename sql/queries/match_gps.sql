-- Queries of match-gps and ingest-gps (pipeline_cli/stages/match_gps.py, ingest_gps.py).

-- name: batching_lock
-- Serialises batch making across workers; held until the making transaction ends.
SELECT pg_advisory_xact_lock(%(key)s);

-- name: batching_pass
-- A pass starts with a snapshot: once every slice of the pass is done, every arrival this
-- snapshot sees has been looked at, and it becomes the cursor. An arrival the cursor does not
-- see is at or after its xmax or in its list of transactions then running: the queries take
-- those two as plain values, so the planner estimates them and probes the BRIN index.
SELECT txid_current_snapshot()::text AS upto, seen::text AS seen FROM gps_batching_cursor;

-- name: batching_cursor
SELECT seen::text AS seen FROM gps_batching_cursor;

-- name: fresh_devices
-- Devices with arrivals the cursor does not see (through the BRIN index on arrival), with the
-- earliest time among them, and devices whose newest run was still open last time.
SELECT device_id, min(recorded_at) AS earliest
FROM gps_points
WHERE arrival >= %(seen_xmax)s::bigint
   OR arrival = ANY(%(seen_xip)s::bigint[])
GROUP BY device_id
UNION ALL
SELECT device_id, NULL FROM gps_waiting_devices;

-- name: plan_batches
-- The points of these devices that no batch holds, cut into runs: the points after the
-- device's last batch, and late arrivals that fall between two batches (grouped by the batch
-- that follows them: a run never spans a batch, so batches never overlap). A gap above
-- gap_seconds starts a new segment, and a segment is cut into max_batch_seconds buckets. A
-- bucket is closed (final) when it lies between batches, when a later bucket or segment of
-- the same run exists, or when its segment ended more than gap_seconds ago. Windows and
-- groups use a per-slice device number, not device_id, so the sort compares integers, not
-- text under the database's collation. Points dated more than gap_seconds ahead wait
-- (future_points): a device clock's glitch would otherwise close the live run at once, and
-- every run after it until that time came. Each device's points are read through the primary
-- key, one range scan per device (OFFSET 0 keeps the planner from flattening the LATERAL into
-- a hash join): without fresh statistics, as after a bulk load, it read every new point of
-- every device twice per slice of 50 devices. The `freed` batches (freed_batches) count as
-- gone and their points as new arrivals: they are cut again with the arrivals next to them.
WITH chosen AS MATERIALIZED (
    SELECT c.device_id, c.dev, c.earliest,
           (SELECT b.end_time FROM processing_batches b WHERE b.device_id = c.device_id
              AND b.batch_id <> ALL(%(freed)s::uuid[])
            ORDER BY b.start_time DESC LIMIT 1) AS until
    FROM unnest(%(devices)s::text[], %(earliest)s::timestamptz[])
         WITH ORDINALITY AS c(device_id, earliest, dev)
), pts AS (
    SELECT c.dev, p.recorded_at, 'infinity'::timestamptz AS run
    FROM chosen c
    CROSS JOIN LATERAL (SELECT p.recorded_at FROM gps_points p
                        WHERE p.device_id = c.device_id
                          AND p.recorded_at > coalesce(c.until, '-infinity')
                          AND p.recorded_at <= now() + make_interval(secs => %(gap_seconds)s)
                        OFFSET 0) p
    UNION ALL
    SELECT c.dev, p.recorded_at, nb.start_time
    FROM chosen c
    CROSS JOIN LATERAL (SELECT p.recorded_at FROM gps_points p
                        WHERE p.device_id = c.device_id
                          AND p.recorded_at BETWEEN c.earliest
                                                    - make_interval(secs => %(gap_seconds)s)
                                                AND c.until
                          AND (p.arrival >= %(seen_xmax)s::bigint
                               OR p.arrival = ANY(%(seen_xip)s::bigint[])
                               OR (p.device_id, p.recorded_at) IN (
                                   SELECT f.device_id, f.start_time FROM processing_batches f
                                   WHERE f.batch_id = ANY(%(freed)s::uuid[])))
                        OFFSET 0) p
    LEFT JOIN LATERAL (SELECT b.end_time FROM processing_batches b
                       WHERE b.device_id = c.device_id AND b.start_time <= p.recorded_at
                         AND b.batch_id <> ALL(%(freed)s::uuid[])
                       ORDER BY b.start_time DESC LIMIT 1) pb ON true
    CROSS JOIN LATERAL (SELECT b.start_time FROM processing_batches b
                        WHERE b.device_id = c.device_id AND b.start_time > p.recorded_at
                          AND b.batch_id <> ALL(%(freed)s::uuid[])
                        ORDER BY b.start_time LIMIT 1) nb
    WHERE pb.end_time IS NULL OR pb.end_time < p.recorded_at
), starts AS (
    SELECT dev, run, recorded_at,
           coalesce(recorded_at - lag(recorded_at) OVER w
                    > make_interval(secs => %(gap_seconds)s), true) AS starts_segment
    FROM pts
    WINDOW w AS (PARTITION BY dev, run ORDER BY recorded_at)
), segs AS (
    SELECT dev, run, recorded_at,
           count(*) FILTER (WHERE starts_segment) OVER w AS seg,
           max(recorded_at) FILTER (WHERE starts_segment) OVER w AS seg_start
    FROM starts
    WINDOW w AS (PARTITION BY dev, run ORDER BY recorded_at)
), grouped AS (
    SELECT dev, run, seg,
           -- date_part is double precision: extract() would compute in numeric, slowly.
           floor(date_part('epoch', recorded_at - seg_start) / %(max_batch_seconds)s)::bigint
               AS bucket,
           min(recorded_at) AS start_time, max(recorded_at) AS end_time, count(*) AS n
    FROM segs
    GROUP BY dev, run, seg, bucket
), marked AS (
    SELECT dev, run, start_time, end_time, n, seg, bucket,
           max(seg) OVER (PARTITION BY dev, run) AS last_seg,
           max(bucket) OVER (PARTITION BY dev, run, seg) AS last_bucket,
           max(end_time) OVER (PARTITION BY dev, run, seg) AS seg_end
    FROM grouped
)
SELECT c.device_id, m.start_time, m.end_time, m.n::integer AS n,
       m.run <> 'infinity' AS between_batches,
       m.run <> 'infinity'
           OR m.seg < m.last_seg
           OR m.bucket < m.last_bucket
           OR m.seg_end < now() - make_interval(secs => %(gap_seconds)s) AS closed,
       extract(epoch FROM now() - m.end_time)::double precision AS age_s,
       g.batch_id AS grows, g.start_time AS grows_start, g.end_time AS grows_end
FROM marked m JOIN chosen c USING (dev)
LEFT JOIN LATERAL (
    -- A point alone within gap_seconds of the batch before it (the first of its run) or after
    -- it (the last of a run between batches) grows that batch, if the batch stays within
    -- max_batch_seconds, instead of closing as too_short: a backlog arriving a point or a few
    -- at a time is matched. Not a dead batch (it waits for a requeue), nor a finished one that
    -- prune deleted points of (see late_arrivals: a new match would replace their lines).
    -- Its range comes along: two points alone, one each side, must fit together (batches.py).
    SELECT b.batch_id, b.start_time, b.end_time
    FROM ((SELECT b.batch_id, 1 AS side FROM processing_batches b
           WHERE b.device_id = c.device_id AND b.start_time < m.start_time
             AND m.n = 1 AND m.seg = 1 AND m.bucket = 0
             AND b.batch_id <> ALL(%(freed)s::uuid[])
           ORDER BY b.start_time DESC LIMIT 1)
          UNION ALL
          (SELECT b.batch_id, 2 FROM processing_batches b
           WHERE b.device_id = c.device_id AND b.start_time > m.end_time
             AND m.n = 1 AND m.run <> 'infinity' AND m.seg = m.last_seg
             AND m.bucket = m.last_bucket AND b.batch_id <> ALL(%(freed)s::uuid[])
           ORDER BY b.start_time LIMIT 1)) near
    JOIN processing_batches b USING (batch_id)
    WHERE b.status <> 'dead'
      AND greatest(m.start_time - b.end_time, b.start_time - m.end_time)
          <= make_interval(secs => %(gap_seconds)s)
      AND greatest(b.end_time, m.end_time) - least(b.start_time, m.start_time)
          < make_interval(secs => %(max_batch_seconds)s)
      AND NOT (b.status IN ('completed', 'too_short') AND b.points_snapshot IS NOT NULL
               AND (SELECT count(*) FROM gps_points p
                    WHERE p.device_id = b.device_id
                      AND p.recorded_at BETWEEN b.start_time AND b.end_time
                      AND txid_visible_in_snapshot(p.arrival, b.points_snapshot))
                   < b.coordinate_count)
    ORDER BY near.side
    LIMIT 1
) g ON true
ORDER BY c.device_id, m.start_time;

-- name: freed_batches
-- The too_short batches of these devices whose point now has company: an arrival the cursor
-- does not see lies within gap_seconds of it. plan_batches cuts that point again with its
-- neighbours (the batch is dropped in the same transaction, drop_batches): a trace that
-- arrives a point or a few at a time, in any order, is not left with points closed alone.
-- An arrival lies at or after its device's earliest, so the batch at most gap_seconds before:
-- a probe of the device's batches from there on, then of the points around each one.
SELECT b.batch_id
FROM unnest(%(devices)s::text[], %(earliest)s::timestamptz[]) AS c(device_id, earliest)
JOIN processing_batches b
  ON b.device_id = c.device_id
 AND b.start_time >= c.earliest - make_interval(secs => %(gap_seconds)s)
WHERE b.status = 'too_short' AND b.coordinate_count = 1
  AND EXISTS (SELECT 1 FROM gps_points p
              WHERE p.device_id = b.device_id
                AND p.recorded_at BETWEEN b.start_time - make_interval(secs => %(gap_seconds)s)
                                      AND b.end_time + make_interval(secs => %(gap_seconds)s)
                AND p.recorded_at <> b.start_time
                AND (p.arrival >= %(seen_xmax)s::bigint
                     OR p.arrival = ANY(%(seen_xip)s::bigint[])));

-- name: drop_batches
-- The freed batches (freed_batches) go: their points are in the batches this pass makes.
DELETE FROM processing_batches WHERE batch_id = ANY(%(freed)s::uuid[]) AND status = 'too_short';

-- name: future_points
-- The points of these devices dated more than gap_seconds ahead, which plan_batches leaves
-- for a later pass: their devices wait until that time has come.
SELECT c.device_id, count(*)::integer AS n, max(p.recorded_at) AS latest
FROM unnest(%(devices)s::text[]) AS c(device_id)
JOIN gps_points p ON p.device_id = c.device_id
                 AND p.recorded_at > now() + make_interval(secs => %(gap_seconds)s)
GROUP BY c.device_id
ORDER BY c.device_id;

-- name: waiting_devices
-- The devices a batcher pass set aside (an open run, points dated ahead), for status's
-- future_points: a primary-key scan, unlike the new arrivals.
SELECT device_id FROM gps_waiting_devices ORDER BY device_id;

-- name: late_arrivals
-- The batches that arrivals the cursor does not see (of these devices, from their earliest
-- time on) fall into, each with those arrivals. Part of reopen_batches and reopen_preview.
-- Only devices whose last batch ends at or after that earliest time can have any (batches
-- never overlap, so the last one ends last): a device whose new points all follow its batches,
-- as a live device's do, costs one index probe here, not one per new point.
-- `pruned`: a finished batch that holds fewer of the points it read than it was finished
-- with (coordinate_count): prune deleted some. Matched again, it would read the late points
-- and what is left, and replace the polylines of the pruned points with lines of those alone.
-- A finished batch row cannot change under the batcher's lock (only a `processing` one can,
-- by a completion: then `pruned` is false and it is reopened as before).
SELECT l.batch_id, l.arrivals,
       pb.status IN ('completed', 'too_short') AND pb.points_snapshot IS NOT NULL
       AND (SELECT count(*) FROM gps_points p
            WHERE p.device_id = pb.device_id
              AND p.recorded_at BETWEEN pb.start_time AND pb.end_time
              AND txid_visible_in_snapshot(p.arrival, pb.points_snapshot))
           < pb.coordinate_count AS pruned
FROM (
SELECT cb.batch_id, array_agg(p.arrival) AS arrivals
FROM unnest(%(devices)s::text[], %(earliest)s::timestamptz[]) AS c(device_id, earliest)
JOIN gps_points p ON p.device_id = c.device_id AND p.recorded_at >= c.earliest
                 AND (p.arrival >= %(seen_xmax)s::bigint
                      OR p.arrival = ANY(%(seen_xip)s::bigint[]))
CROSS JOIN LATERAL (SELECT b.batch_id, b.end_time FROM processing_batches b
                    WHERE b.device_id = c.device_id AND b.start_time <= p.recorded_at
                    ORDER BY b.start_time DESC LIMIT 1) cb
WHERE cb.end_time >= p.recorded_at
  AND (SELECT b.end_time FROM processing_batches b WHERE b.device_id = c.device_id
       ORDER BY b.start_time DESC LIMIT 1) >= c.earliest
GROUP BY cb.batch_id
) l
JOIN processing_batches pb USING (batch_id)

-- name: reopen_batches
-- Late arrivals inside a batch's time range that the batch did not read: a finished or
-- running batch goes back to pending and is matched again with them (its polylines are
-- replaced then; a running worker loses its lease). A pending, failed or dead batch only gets
-- its count updated: the first two read them when claimed, a dead one waits for a requeue
-- (and `batches list`, `status` and the requeue show its points). The snapshot test is on the
-- batch row itself, so a claim or completion committing meanwhile is re-checked.
-- A finished batch whose points prune deleted (late.pruned) is not matched again: it stays
-- finished with its polylines, and reads the late points now (a fresh points_snapshot, so
-- they are processed and pruned with the rest of their day); coordinate_count adds them, so
-- it stays above what the batch holds and a later late point is kept out the same way.
UPDATE processing_batches b
SET status = CASE WHEN late.pruned THEN b.status
                  WHEN b.status IN ('completed', 'too_short', 'processing') THEN 'pending'
                  ELSE b.status END,
    retry_count = CASE WHEN b.status IN ('completed', 'too_short') AND NOT late.pruned THEN 0
                       ELSE b.retry_count END,
    next_attempt_at = CASE WHEN late.pruned THEN b.next_attempt_at
                           WHEN b.status IN ('completed', 'too_short', 'processing')
                           THEN now() ELSE b.next_attempt_at END,
    lease_expires_at = NULL,
    lease_token = NULL,
    points_snapshot = CASE WHEN late.pruned THEN txid_current_snapshot()
                           ELSE b.points_snapshot END,
    coordinate_count = CASE
        WHEN late.pruned
        THEN b.coordinate_count + (SELECT count(*) FROM unnest(late.arrivals) a
                                   WHERE NOT txid_visible_in_snapshot(a, b.points_snapshot))
        ELSE (SELECT count(*) FROM gps_points p
              WHERE p.device_id = b.device_id
                AND p.recorded_at BETWEEN b.start_time AND b.end_time) END,
    error_message = CASE WHEN late.pruned
                         THEN 'late points after prune: not matched again (the batch''s '
                              || 'other points are pruned)'
                         WHEN b.status IN ('completed', 'too_short', 'processing')
                         THEN 'reopened: points arrived late' ELSE b.error_message END,
    updated_at = now()
FROM ({late_arrivals}) late
WHERE b.batch_id = late.batch_id
  AND (b.points_snapshot IS NULL
       OR EXISTS (SELECT 1 FROM unnest(late.arrivals) a
                  WHERE NOT txid_visible_in_snapshot(a, b.points_snapshot)))
RETURNING b.batch_id, b.status, late.pruned;

-- name: reopen_preview
-- The batches reopen_batches would send back to pending now, and those it would keep
-- finished (their points pruned) (match-gps --dry-run): it reads.
SELECT count(*) FILTER (WHERE NOT late.pruned)::integer AS batches,
       count(*) FILTER (WHERE late.pruned)::integer AS kept
FROM processing_batches b
JOIN ({late_arrivals}) late USING (batch_id)
WHERE b.status IN ('completed', 'too_short', 'processing')
  AND (b.points_snapshot IS NULL
       OR EXISTS (SELECT 1 FROM unnest(late.arrivals) a
                  WHERE NOT txid_visible_in_snapshot(a, b.points_snapshot)));

-- name: insert_batches
-- A too_short batch is closed at once (its point counts as processed: there is nothing to
-- match); it read what its making statement sees.
INSERT INTO processing_batches (device_id, start_time, end_time, coordinate_count, status,
                                processing_completed_at, error_message, points_snapshot)
SELECT device_id, start_time, end_time, coordinate_count, status,
       CASE WHEN status = 'too_short' THEN now() END,
       CASE WHEN status = 'too_short' THEN 'fewer than 2 points' END,
       CASE WHEN status = 'too_short' THEN txid_current_snapshot() END
FROM unnest(%(device_ids)s::text[], %(starts)s::timestamptz[], %(ends)s::timestamptz[],
            %(counts)s::integer[], %(statuses)s::text[])
     AS p(device_id, start_time, end_time, coordinate_count, status);

-- name: grow_batches
-- Points alone (plan_batches' `grows`) join the batch next to them: its range takes them in,
-- and a finished or running batch goes back to pending to be matched again with them (a
-- running worker loses its lease), as late points inside its range would send it. Its
-- points_snapshot is this statement's, which sees them: reopen_batches then leaves it alone.
UPDATE processing_batches b
SET start_time = least(b.start_time, g.start_time),
    end_time = greatest(b.end_time, g.end_time),
    status = CASE WHEN b.status IN ('completed', 'too_short', 'processing') THEN 'pending'
                  ELSE b.status END,
    retry_count = CASE WHEN b.status IN ('completed', 'too_short') THEN 0
                       ELSE b.retry_count END,
    next_attempt_at = CASE WHEN b.status IN ('completed', 'too_short', 'processing')
                           THEN now() ELSE b.next_attempt_at END,
    lease_expires_at = NULL,
    lease_token = NULL,
    points_snapshot = txid_current_snapshot(),
    coordinate_count = (SELECT count(*) FROM gps_points p
                        WHERE p.device_id = b.device_id
                          AND p.recorded_at BETWEEN least(b.start_time, g.start_time)
                                                AND greatest(b.end_time, g.end_time)),
    error_message = CASE WHEN b.status IN ('completed', 'too_short', 'processing')
                         THEN 'reopened: a point alone arrived next to it'
                         ELSE b.error_message END,
    updated_at = now()
FROM (SELECT batch_id, min(t) AS start_time, max(t) AS end_time
      FROM unnest(%(batch_ids)s::uuid[], %(times)s::timestamptz[]) AS x(batch_id, t)
      GROUP BY batch_id) g
WHERE b.batch_id = g.batch_id;

-- name: set_waiting
-- The devices of a slice whose newest run is still open are looked at again next pass.
WITH gone AS (
    DELETE FROM gps_waiting_devices
    WHERE device_id = ANY(%(slice)s::text[]) AND device_id <> ALL(%(waiting)s::text[])
)
INSERT INTO gps_waiting_devices (device_id)
SELECT unnest(%(waiting)s::text[])
ON CONFLICT (device_id) DO UPDATE SET updated_at = now();

-- name: advance_cursor
-- Never backwards: another process may have finished a later pass meanwhile.
UPDATE gps_batching_cursor
SET seen = %(upto)s::txid_snapshot, updated_at = now()
WHERE txid_snapshot_xmax(seen) <= txid_snapshot_xmax(%(upto)s::txid_snapshot);

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
-- Claims the oldest ready batch (claim_points then reads its points).
UPDATE processing_batches b
SET status = 'processing',
    worker = %(worker)s,
    lease_token = %(token)s,
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
    processing_started_at = now(),
    points_snapshot = txid_current_snapshot(),
    updated_at = now()
WHERE b.batch_id = (
    SELECT batch_id FROM processing_batches
    WHERE status IN ('pending', 'failed') AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING b.batch_id, b.device_id, b.start_time, b.end_time, b.coordinate_count,
          b.retry_count;

-- name: claim_points
-- The points of a batch just claimed, if this worker still holds its lease; the batch records
-- the snapshot they were read with (every point of its time range that this statement sees).
-- The device and time range come as values, never from a join, so that PostgreSQL plans only
-- the partitions of the batch's days: a join left every partition in the plan, and eight
-- workers claiming at once over 500 daily partitions ran out of the server's lock table. Run
-- unprepared for the same reason (a generic plan locks every partition). Times come as epoch
-- seconds (double precision holds every microsecond exactly for centuries, and to_timestamp
-- gives back the same timestamptz): far cheaper for the worker to load than timestamptz.
-- Latitude and longitude are domains (026): an array of them is an array of the domain, which
-- the driver would read as text, so they are aggregated as float8.
WITH leased AS (
    UPDATE processing_batches SET points_snapshot = txid_current_snapshot()
    WHERE batch_id = %(batch_id)s AND lease_token = %(token)s
    RETURNING batch_id
)
SELECT EXISTS (SELECT 1 FROM leased) AS leased,
       array_agg(date_part('epoch', recorded_at) ORDER BY recorded_at) AS times,
       array_agg(latitude::float8 ORDER BY recorded_at) AS lats,
       array_agg(longitude::float8 ORDER BY recorded_at) AS lons
FROM gps_points
WHERE device_id = %(device_id)s AND recorded_at BETWEEN %(start_time)s AND %(end_time)s;

-- name: complete_batch
-- One statement, so one transaction: the batch row and its polylines change together or not
-- at all, and no point row is written. Matching a batch again (late points) replaces the
-- polylines of its time range, except those of a batch that no longer exists: prune deleted
-- it with all its points, and late points there got a batch of their own, which must not
-- take that trip's line with it. (A line of another batch that exists is replaced: batches
-- cut apart by 024 share their lines' batch_id.) Nothing happens unless this worker still
-- holds the lease.
WITH b AS (
    UPDATE processing_batches
    SET status = 'completed',
        coordinate_count = %(points)s,
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
), stale AS (  -- an earlier matching of this range that the new one does not overwrite
    DELETE FROM cached_polylines c
    USING b
    WHERE c.device_id = b.device_id AND c.start_time BETWEEN b.start_time AND b.end_time
      AND (c.batch_id IS NULL
           OR EXISTS (SELECT 1 FROM processing_batches x WHERE x.batch_id = c.batch_id))
      AND c.start_time NOT IN (SELECT to_timestamp(t)
                               FROM unnest(%(starts)s::double precision[]) t)
    RETURNING 1
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
)
SELECT (SELECT count(*) FROM b)::integer AS batches,
       (SELECT count(*) FROM lines)::integer AS polylines,
       (SELECT count(*) FROM stale)::integer AS replaced;

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
-- Whether another round could find anything: a ready batch, an arrival the batcher has not
-- looked at (BRIN probe), or a device with an open run.
SELECT EXISTS (SELECT 1 FROM processing_batches
               WHERE status IN ('pending', 'failed') AND next_attempt_at <= now()) AS batches,
       EXISTS (SELECT 1 FROM gps_points p
               WHERE p.arrival >= %(seen_xmax)s::bigint
                  OR p.arrival = ANY(%(seen_xip)s::bigint[]))
       OR EXISTS (SELECT 1 FROM gps_waiting_devices) AS points;

-- name: release_batch
-- Give a claimed batch back untouched, no attempt counted: a stop was requested before it
-- was finished, or the OSRM server refuses this configuration (the batch is not at fault).
UPDATE processing_batches
SET status = CASE WHEN retry_count = 0 THEN 'pending' ELSE 'failed' END,
    lease_expires_at = NULL,
    lease_token = NULL,
    updated_at = now()
WHERE batch_id = %(batch_id)s AND lease_token = %(token)s AND status = 'processing'
RETURNING status;

-- name: ready_batches
-- The batches a worker would claim next, in claim order.
SELECT batch_id, device_id, start_time, end_time, status, coordinate_count, retry_count
FROM processing_batches
WHERE status IN ('pending', 'failed') AND next_attempt_at <= now()
ORDER BY next_attempt_at
LIMIT %(limit)s;

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
-- The exact number of unprocessed points, without reading processed history: the points in
-- open batches (their time ranges, through the primary key), the points after the last batch
-- of a device with an open run or a new arrival, and new arrivals that fall between batches
-- or into a finished batch that did not read them. A new arrival is one the cursor snapshot
-- does not see: at or after its xmax, or in its list of transactions then running (both
-- probes of the BRIN index). Every per-device and per-batch count is a correlated subquery,
-- so it is an index range scan whatever the planner estimates.
WITH fresh AS MATERIALIZED (
    SELECT p.device_id, p.recorded_at, p.arrival FROM gps_points p
    WHERE p.arrival >= %(seen_xmax)s::bigint
       OR p.arrival = ANY(%(seen_xip)s::bigint[])
), devices AS MATERIALIZED (
    SELECT d.device_id,
           (SELECT b.end_time FROM processing_batches b WHERE b.device_id = d.device_id
            ORDER BY b.start_time DESC LIMIT 1) AS until
    FROM (SELECT device_id FROM gps_waiting_devices
          UNION SELECT device_id FROM fresh) d
), in_open AS (
    SELECT sum(x.n) AS n, min(x.oldest) AS oldest
    FROM processing_batches b
    CROSS JOIN LATERAL (SELECT count(*) AS n, min(p.recorded_at) AS oldest
                        FROM gps_points p
                        WHERE p.device_id = b.device_id
                          AND p.recorded_at BETWEEN b.start_time AND b.end_time) x
    WHERE b.status IN ('pending', 'processing', 'failed', 'dead')
), unbatched AS (
    SELECT sum(x.n) AS n, min(x.oldest) AS oldest
    FROM devices d
    CROSS JOIN LATERAL (SELECT count(*) AS n, min(p.recorded_at) AS oldest
                        FROM gps_points p
                        WHERE p.device_id = d.device_id
                          AND p.recorded_at > coalesce(d.until, '-infinity')) x
), behind AS MATERIALIZED (  -- arrivals at or before their device's last batch: usually few
    SELECT f.device_id, f.recorded_at, f.arrival
    FROM fresh f JOIN devices d ON d.device_id = f.device_id AND f.recorded_at <= d.until
), late AS (
    SELECT count(*) AS n, min(f.recorded_at) AS oldest
    FROM behind f
    LEFT JOIN LATERAL (SELECT b.status, b.end_time, b.points_snapshot
                       FROM processing_batches b
                       WHERE b.device_id = f.device_id AND b.start_time <= f.recorded_at
                       ORDER BY b.start_time DESC LIMIT 1) cb
           ON cb.end_time >= f.recorded_at
    WHERE cb.status IS NULL
       OR (cb.status IN ('completed', 'too_short')
           AND NOT txid_visible_in_snapshot(f.arrival, cb.points_snapshot))
)
SELECT coalesce((SELECT n FROM in_open), 0)::bigint AS in_batches,
       (coalesce((SELECT n FROM unbatched), 0) + (SELECT n FROM late))::bigint AS unbatched,
       least((SELECT oldest FROM in_open), (SELECT oldest FROM unbatched),
             (SELECT oldest FROM late)) AS oldest,
       now() AS now;

-- name: no_jit
-- For the rest of the transaction. A query over every daily partition has a cost estimate
-- past the JIT thresholds, and compiling it took 5 s of a 5.7 s status at 10 M points.
SELECT set_config('jit', 'off', true);

-- name: default_partition_points
-- Points whose day has no partition yet (capped: the count is information).
SELECT count(*)::bigint AS n FROM (SELECT 1 FROM gps_points_default LIMIT %(cap)s) t;

-- name: partition_locks
-- A batching pass reads every partition of gps_points through its arrival index, so it takes
-- two locks per partition from the server's shared lock table, which holds
-- max_locks_per_transaction x (max_connections + max_prepared_transactions) for all sessions.
SELECT (SELECT count(*) FROM pg_inherits WHERE inhparent = 'gps_points'::regclass) AS partitions,
       current_setting('max_locks_per_transaction')::bigint
       * (current_setting('max_connections')::bigint
          + current_setting('max_prepared_transactions')::bigint) AS lock_slots;

-- name: open_batches
SELECT status, count(*)::bigint AS n, sum(coordinate_count)::bigint AS points,
       min(next_attempt_at) AS next_attempt_at, min(start_time) AS oldest
FROM processing_batches
WHERE status IN ('pending', 'processing', 'failed', 'dead')
GROUP BY status;

-- name: recent_batches
-- Of the completed ones, those that matched nothing (the note of workers._complete: every
-- chunk NoSegment, no fix, ...); a stationary batch is not counted, it did not move. Beside
-- them, the batches of a point alone (too_short), which are never matched.
SELECT h.completed_last_hour, h.unmatched_last_hour,
       (SELECT count(*) FROM processing_batches
        WHERE status = 'too_short' AND processing_completed_at > now() - interval '1 hour'
       )::bigint AS too_short_last_hour,
       (SELECT max(processing_completed_at) FROM processing_batches
        WHERE status = 'completed') AS last_completed_at
FROM (SELECT count(*)::bigint AS completed_last_hour,
             count(*) FILTER (WHERE polyline_count = 0
                              AND error_message LIKE 'no matching:%')::bigint
                 AS unmatched_last_hour
      FROM processing_batches
      WHERE status = 'completed' AND processing_completed_at > now() - interval '1 hour') h;

-- name: expired_leases
SELECT count(*)::bigint AS n FROM processing_batches
WHERE status = 'processing' AND lease_expires_at < now();

-- ---------------------------------------------------------------- partitions

-- name: partition_days
SELECT to_date(substr(c.relname, 13), 'YYYYMMDD') AS day
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'gps_points'::regclass AND c.relname ~ '^gps_points_p[0-9]{8}$';

-- name: default_partition_days
SELECT DISTINCT (recorded_at AT TIME ZONE 'UTC')::date AS day FROM gps_points_default;

-- name: add_partition
SELECT gps_add_partition(%(day)s::date);

-- name: prunable_partitions
-- Daily partitions that begin before the cutoff, then the default partition. A day is done
-- when no open batch overlaps it, no arrival there is new to the batcher, and no device with
-- an open run has points there after its last batch: then every point of it lies in a
-- finished batch that read it. With %(only)s, that day alone (prune's check under the lock).
WITH parts AS (
    SELECT c.relname::text AS name, c.reltuples,
           to_date(substr(c.relname, 13), 'YYYYMMDD')::timestamp AT TIME ZONE 'UTC' AS lo
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'gps_points'::regclass AND c.relname ~ '^gps_points_p[0-9]{8}$'
), due AS (
    -- 24 hours, not '1 day': a day added to a timestamptz is one of the session's TimeZone,
    -- 23 hours on a daylight-saving day there, and the day's last hour went unchecked.
    SELECT name, reltuples, lo, lo + interval '24 hours' AS hi FROM parts
    WHERE lo < %(cutoff)s AND (%(only)s::text IS NULL OR name = %(only)s::text)
)
-- A day is never dropped before yesterday is over: the days ahead are kept for new points.
SELECT name,
       hi <= %(cutoff)s
       AND hi <= (date_trunc('day', now() AT TIME ZONE 'UTC') - interval '1 day')
                 AT TIME ZONE 'UTC' AS whole,
       greatest(reltuples, 0)::bigint AS points,
       NOT EXISTS (SELECT 1 FROM processing_batches b
                   WHERE b.status IN ('pending', 'processing', 'failed', 'dead')
                     AND b.start_time < hi AND b.end_time >= lo)
       AND NOT EXISTS (SELECT 1 FROM gps_points p
                       WHERE p.recorded_at >= lo AND p.recorded_at < hi
                         AND (p.arrival >= %(seen_xmax)s::bigint
                              OR p.arrival = ANY(%(seen_xip)s::bigint[])))
       AND NOT EXISTS (SELECT 1 FROM gps_waiting_devices w
                       JOIN gps_points p ON p.device_id = w.device_id
                        AND p.recorded_at >= lo AND p.recorded_at < hi
                       WHERE p.recorded_at > coalesce(
                           (SELECT b.end_time FROM processing_batches b
                            WHERE b.device_id = w.device_id
                            ORDER BY b.start_time DESC LIMIT 1), '-infinity')) AS done
FROM due
UNION ALL
SELECT 'gps_points_default', false, 0, false WHERE %(only)s::text IS NULL
ORDER BY name;

-- name: partition_points
-- Exact, for prune's counts: one index-only pass over the day.
SELECT count(*) AS n FROM {part};

-- name: lock_partition
-- Before a day is dropped, so that no point enters it between the check and the drop: the
-- parent first (ONLY: not every day), as an INSERT routed through it locks them, then the day.
LOCK TABLE ONLY gps_points, {part} IN ACCESS EXCLUSIVE MODE;

-- name: drop_partition
ALTER TABLE gps_points DETACH PARTITION {part};
DROP TABLE {part};

-- name: prune_doomed
-- The processed points of one partition recorded before the cutoff, at most %(limit)s of
-- them (null: all), by ctid: the subquery of prune_chunk and prune_due. Not those
-- of a batch that an arrival new to the batcher falls into (`reopening`): the batcher sends
-- it back to be matched again, and a match of the late points alone would replace the
-- polylines of the points pruned meanwhile. New arrivals are few (since the last pass) and
-- found through the BRIN index on arrival, as the batcher finds them.
WITH reopening AS MATERIALIZED (
    SELECT cb.batch_id FROM gps_points l
    CROSS JOIN LATERAL (SELECT b.batch_id, b.end_time, b.points_snapshot
                        FROM processing_batches b
                        WHERE b.device_id = l.device_id AND b.start_time <= l.recorded_at
                        ORDER BY b.start_time DESC LIMIT 1) cb
    WHERE (l.arrival >= %(seen_xmax)s::bigint OR l.arrival = ANY(%(seen_xip)s::bigint[]))
      AND cb.end_time >= l.recorded_at
      AND NOT txid_visible_in_snapshot(l.arrival, cb.points_snapshot)
)
SELECT p.ctid
FROM {part} p
JOIN LATERAL (SELECT b.batch_id, b.status, b.end_time, b.points_snapshot
              FROM processing_batches b
              WHERE b.device_id = p.device_id AND b.start_time <= p.recorded_at
              ORDER BY b.start_time DESC LIMIT 1) b ON b.end_time >= p.recorded_at
WHERE p.recorded_at < %(cutoff)s AND b.status IN ('completed', 'too_short')
  AND txid_visible_in_snapshot(p.arrival, b.points_snapshot)
  AND b.batch_id <> ALL(ARRAY(SELECT batch_id FROM reopening))
LIMIT %(limit)s::bigint;

-- name: prune_chunk
-- Deletes up to %(limit)s of prune_doomed's points of one partition; how many.
WITH gone AS (
    DELETE FROM {part} p WHERE p.ctid = ANY(ARRAY({doomed})) RETURNING 1
)
SELECT count(*) AS n FROM gone;

-- name: prune_due
-- How many points prune_chunk would delete in all (prune --dry-run): a statement that only
-- reads, as a standby or a read-only database allows (a DELETE in it is refused even when
-- it would delete nothing).
SELECT count(*) AS n FROM ({doomed}) d;

-- ---------------------------------------------------------------- ingest-gps

-- name: ingest_staging
-- The raw lines of a CSV file and how they split (its layout, one row while the file is read),
-- the fields of a GPX or GeoJSON file, and every file's rows after the checks. The fields
-- of either kind are the view gps_ingest_fields: a CSV file's lines are split in the
-- statement that checks them, not stored a second time as fields. Times without a zone are
-- UTC. Run without parameters: a % here is itself.
SET LOCAL TimeZone = 'UTC';
CREATE TEMP TABLE gps_ingest_raw (
    line integer GENERATED ALWAYS AS IDENTITY,
    raw  text
) ON COMMIT DROP;
CREATE TEMP TABLE gps_ingest_csv (
    file          integer,
    skip          integer,  -- lines up to here are above the header or first row
    width         integer,  -- fields a row must have
    delimiter     text,
    blank         text,     -- a pattern: a line of blanks and delimiters is no row
    decimal_comma boolean,  -- "60,17" is 60.17 (the delimiter is not a comma)
    device        text,     -- the device of a file without a device column (--device)
    device_col    integer,
    date_col      integer,  -- the date of a time column that holds a time of day
    time_col      integer,
    lat_col       integer,
    lon_col       integer,
    had_nul       boolean,  -- the file had a NUL byte, sent as U+FFFD
    ns_col        integer,  -- the hemisphere (N/S, E/W) of unsigned coordinates (Qstarz)
    ew_col        integer
) ON COMMIT DROP;
CREATE TEMP TABLE gps_ingest_parsed (
    seq       bigint GENERATED ALWAYS AS IDENTITY,  -- file order where lines repeat (GeoJSON)
    file      integer,
    line      integer,
    place     text,
    device_id text,
    recorded  text,
    lat       text,
    lon       text,
    problem   text
) ON COMMIT DROP;
-- gps_csv_fields handles the (rare) lines with quotes; a line with an odd number of quotes
-- has a quoted field that goes on past the line end: the lines are read one by one, so such
-- a row is refused and named, never guessed at. OFFSET 0 splits each line once: flattened,
-- every use of f would split it again. (The view goes with the tables at commit.)
CREATE TEMP VIEW gps_ingest_fields AS
SELECT line::bigint AS seq, file, line, NULL::text AS place,
       coalesce(f[device_col], device) AS device_id,
       -- a date column beside a time of day (08:00:00): one time, the date's slashes as
       -- dashes (2024/01/06); a time column that holds more is taken as it is
       CASE WHEN date_col IS NOT NULL AND f[time_col] ~ '^\s*[0-9]{1,2}:[0-9]{2}'
            THEN replace(btrim(f[date_col]), '/', '-') || ' ' || btrim(f[time_col])
            ELSE f[time_col] END AS recorded,
       -- south and west of a hemisphere column negate the number (a signed one beside a
       -- hemisphere is refused below); without one, f[NULL] is NULL and the sign ''
       CASE WHEN upper(btrim(f[ns_col])) IN ('S', 'SOUTH') THEN '-' ELSE '' END
       || btrim(CASE WHEN decimal_comma
                     THEN regexp_replace(f[lat_col], '^(\s*[+-]?[0-9]*),([0-9]+\s*)$', '\1.\2')
                     ELSE f[lat_col] END) AS lat,
       CASE WHEN upper(btrim(f[ew_col])) IN ('W', 'WEST') THEN '-' ELSE '' END
       || btrim(CASE WHEN decimal_comma
                     THEN regexp_replace(f[lon_col], '^(\s*[+-]?[0-9]*),([0-9]+\s*)$', '\1.\2')
                     ELSE f[lon_col] END) AS lon,
       CASE WHEN nul THEN 'a NUL byte (no text holds one)'
            WHEN f IS NULL THEN 'unbalanced quotes (a quoted field must not span lines)'
            WHEN cardinality(f) < width
            THEN format('expected %s fields, got %s', width, cardinality(f))
            WHEN ns_col IS NOT NULL
                 AND upper(btrim(f[ns_col])) NOT IN ('N', 'S', 'NORTH', 'SOUTH')
            THEN format('hemisphere %L is not N or S', btrim(f[ns_col]))
            WHEN ew_col IS NOT NULL
                 AND upper(btrim(f[ew_col])) NOT IN ('E', 'W', 'EAST', 'WEST')
            THEN format('hemisphere %L is not E or W', btrim(f[ew_col]))
            WHEN ns_col IS NOT NULL AND f[lat_col] ~ '^\s*[+-]'
            THEN format('latitude %L is signed beside its hemisphere %L', btrim(f[lat_col]),
                        btrim(f[ns_col]))
            WHEN ew_col IS NOT NULL AND f[lon_col] ~ '^\s*[+-]'
            THEN format('longitude %L is signed beside its hemisphere %L', btrim(f[lon_col]),
                        btrim(f[ew_col])) END AS problem
FROM (SELECT c.*, r.line,
             CASE WHEN strpos(r.raw, '"') = 0 THEN string_to_array(r.raw, c.delimiter)
                  WHEN (length(r.raw) - length(replace(r.raw, '"', ''))) % 2 = 1 THEN NULL
                  ELSE gps_csv_fields(r.raw, c.delimiter) END AS f,
             c.had_nul AND strpos(r.raw, U&'\FFFD') > 0 AS nul
      FROM gps_ingest_raw r CROSS JOIN gps_ingest_csv c
      WHERE r.raw !~ c.blank AND r.line > c.skip
      OFFSET 0) lines
UNION ALL
SELECT seq, file, line, place, device_id, recorded, lat, lon, problem FROM gps_ingest_parsed;
CREATE TEMP TABLE gps_ingest_checked (
    seq         bigint,
    file        integer,
    line        integer,
    place       text,
    device_id   text,
    recorded_at timestamptz,
    latitude    double precision,
    longitude   double precision,
    source      text,
    problem     text
) ON COMMIT DROP;

-- name: ingest_copy_raw
-- Each line as one field: a delimiter and quote no text file has, so COPY splits nothing.
COPY gps_ingest_raw (raw) FROM STDIN (FORMAT csv, DELIMITER E'\x01', QUOTE E'\x02');

-- name: ingest_copy_fields
COPY gps_ingest_parsed (file, line, place, device_id, recorded, lat, lon, problem) FROM STDIN;

-- name: ingest_first_lines
-- The first %(limit)s lines after %(after)s with more than blanks and separators: a header or
-- the first row, and what may stand above it (comments, titles). Each call reads every line:
-- asked for a few at once, a file with comments above its header is read once, not per line.
SELECT line, raw FROM gps_ingest_raw WHERE raw !~ '^[\s,;]*$' AND line > %(after)s
ORDER BY line LIMIT %(limit)s;

-- name: ingest_csv_layout
-- How the CSV file's lines split (see gps_ingest_fields): split at %(delimiter)s (a comma,
-- semicolon or tab), with the columns counted from 1; where the delimiter is not a comma (a
-- spreadsheet's export where the comma is the decimal mark), "60,17" is a latitude of 60.17.
INSERT INTO gps_ingest_csv (file, skip, width, delimiter, blank, decimal_comma, device,
                            device_col, date_col, time_col, lat_col, lon_col, had_nul, ns_col,
                            ew_col)
VALUES (%(file)s, %(skip)s, %(width)s, %(delimiter)s, %(blank)s, %(decimal_comma)s,
        %(device)s, %(device_col)s, %(date_col)s, %(time_col)s, %(lat_col)s, %(lon_col)s,
        %(nul)s, %(ns_col)s, %(ew_col)s);

-- name: ingest_next_file
TRUNCATE gps_ingest_raw, gps_ingest_csv, gps_ingest_parsed RESTART IDENTITY

-- name: ingest_check
-- The checks of every row, whatever the file format: fields come in as text, a row leaves
-- typed or with the reason it is refused. Casts run only on text the patterns accepted, so
-- no row can fail the statement. OFFSET 0 keeps each level a subquery of its own: flattened,
-- every reference would repeat the expressions below it (hundreds of regex calls a row).
INSERT INTO gps_ingest_checked (seq, file, line, place, device_id, recorded_at, latitude,
                                longitude, source, problem)
SELECT seq, file, line, place, device_id,
       CASE WHEN reason IS NULL THEN t END,
       -- In range, so rounding to 15 decimals loses nothing a double holds and never
       -- underflows.
       CASE WHEN reason IS NULL THEN round(la, 15)::double precision END,
       CASE WHEN reason IS NULL THEN round(lo, 15)::double precision END, %(source)s, reason
FROM (
    SELECT *,
           coalesce(problem,
               CASE WHEN device_id IS NULL THEN 'device_id missing'
                    WHEN btrim(device_id) = '' THEN 'device_id is empty'
                    WHEN length(device_id) > 200 THEN 'device_id longer than 200 characters'
               END,
               CASE WHEN tv IS NULL THEN 'time missing'
                    WHEN tv = '' THEN 'empty time'
                    WHEN t IS NULL AND NOT tiso
                         AND tv ~ '^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$'
                        THEN CASE WHEN octet_length(tv) <= 64 AND tv::numeric < 315964800
                                  THEN format('epoch time %%L before 1980-01-06, when GPS time '
                                              'began (a date written YYYYMMDD?)', tv)
                                  ELSE format('epoch time %%L out of range (1980-01-06..2099; '
                                              'milliseconds?)', left(tv, 64)) END
                    WHEN t IS NULL THEN format('unparseable time %%L', left(tv, 64))
                    WHEN t < '1970-01-01Z' OR t >= '2100-01-01Z'
                        THEN format('time %%L out of range (1970..2099)', tv)
               END,
               CASE WHEN la BETWEEN -90 AND 90 THEN NULL  -- the common case first
                    WHEN lav IS NULL THEN 'latitude missing'
                    WHEN lav ~* '^[+-]?(nan|inf|infinity)$' THEN format('latitude is %%L', lav)
                    WHEN la IS NULL THEN format('latitude %%L is not a number', left(lav, 64))
                    WHEN la NOT BETWEEN -90 AND 90
                        THEN format('latitude %%s out of range (-90..90)', la)
               END,
               CASE WHEN lo BETWEEN -180 AND 180 THEN NULL
                    WHEN lov IS NULL THEN 'longitude missing'
                    WHEN lov ~* '^[+-]?(nan|inf|infinity)$' THEN format('longitude is %%L', lov)
                    WHEN lo IS NULL THEN format('longitude %%L is not a number', left(lov, 64))
                    WHEN lo NOT BETWEEN -180 AND 180
                        THEN format('longitude %%s out of range (-180..180)', lo)
               END) AS reason
    FROM (
        SELECT *,
               -- An ISO time, or else an epoch number (the two patterns exclude each
               -- other; the cheaper one runs only on the few rows the other refused).
               CASE WHEN tiso THEN
                        CASE WHEN substr(ti, 9, 2)::integer <= 28
                                  OR substr(ti, 9, 2)::integer <= date_part('day',
                                      make_date(substr(ti, 1, 4)::integer,
                                                substr(ti, 6, 2)::integer, 1)
                                      + interval '1 month - 1 day')
                             THEN ti::timestamptz END
                    -- At most 64 characters: numeric overflows on a million digits.
                    WHEN octet_length(tv) <= 64
                         AND tv ~ '^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$' THEN
                        -- From the start of GPS time: a smaller number is no
                        -- device's clock but a date written YYYYMMDD (20240109 is 1970-08-23).
                        CASE WHEN tv::numeric >= 315964800 AND tv::numeric < 4102444800
                             THEN to_timestamp(tv::double precision) END
               END AS t,
               CASE WHEN octet_length(lav) <= 64
                         AND lav ~ '^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$'
                    THEN lav::numeric END AS la,
               CASE WHEN octet_length(lov) <= 64
                         AND lov ~ '^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$'
                    THEN lov::numeric END AS lo
        FROM (
            SELECT *,
                   -- Every field in range (the day against its month above); no capture
                   -- groups, which would make the match many times slower.
                   ti ~ ('^[1-9][0-9]{3}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])'
                         '(?:[Tt ](?:[01][0-9]|2[0-3]):[0-5][0-9]'
                         '(?::[0-5][0-9](?:\.[0-9]+)?)?)?'
                         '(?:[Zz]|[+-](?:0[0-9]|1[0-5])(?::?[0-5][0-9])?)?$') AS tiso
            FROM (SELECT *,
                         -- A date written day first with dots (6.1.2024, 06.01.2024 08:00,
                         -- as German, Nordic and Russian tools write it; no country writes
                         -- the month first with dots) is read as its ISO form; messages
                         -- quote the time as the file gives it (tv).
                         CASE WHEN strpos(left(tv, 3), '.') > 0 THEN coalesce(
                             (SELECT format('%%s-%%s-%%s%%s%%s%%s', d[3], lpad(d[2], 2, '0'),
                                            lpad(d[1], 2, '0'), d[4], lpad(d[5], 2, '0'), d[6])
                              FROM regexp_match(tv, '^([0-9]{1,2})\.([0-9]{1,2})\.([0-9]{4})'
                                                    '(?:( )([0-9]{1,2})(:.*))?$') d), tv)
                              ELSE tv END AS ti
                  FROM (SELECT f.*, btrim(f.recorded) AS tv, btrim(f.lat) AS lav,
                               btrim(f.lon) AS lov
                        FROM gps_ingest_fields f OFFSET 0) a0
                  OFFSET 0) a
            OFFSET 0) b
        OFFSET 0) c
    OFFSET 0) d;

-- name: ingest_problems
SELECT file, line, place, problem FROM gps_ingest_checked
WHERE problem IS NOT NULL ORDER BY file, line LIMIT %(limit)s;

-- name: ingest_counts
SELECT file, count(*) FILTER (WHERE problem IS NULL) AS valid,
       count(*) FILTER (WHERE problem IS NOT NULL) AS invalid
FROM gps_ingest_checked GROUP BY file;

-- name: ingest_days
SELECT DISTINCT (recorded_at AT TIME ZONE 'UTC')::date AS day FROM gps_ingest_checked
WHERE problem IS NULL;

-- name: ingest_insert
-- The same device and time is stored once: the first row of the run wins within the load
-- (by file order: the coordinates of a GeoJSON line, or a GPX file on one line, share a line
-- number), and a point already stored wins over the file (the duplicate rule of gps_points).
INSERT INTO gps_points (device_id, recorded_at, latitude, longitude, source)
SELECT DISTINCT ON (device_id, recorded_at) device_id, recorded_at, latitude, longitude, source
FROM gps_ingest_checked
WHERE problem IS NULL
ORDER BY device_id, recorded_at, file, line, seq;

-- name: ingest_conflicts
-- After the insert, the valid rows whose device and time is stored with other coordinates:
-- a second fix in one second (a tracker's time in whole seconds), in the file or against a
-- point stored before. Each is a position dropped, not a repeat: named, the first %(limit)s
-- listed, with the total. Run only when the load skipped duplicates.
SELECT c.file, c.line, c.place, c.device_id, c.recorded_at, c.latitude, c.longitude,
       p.latitude::float8 AS kept_latitude, p.longitude::float8 AS kept_longitude,
       count(*) OVER () AS total
FROM gps_ingest_checked c
JOIN gps_points p ON p.device_id = c.device_id AND p.recorded_at = c.recorded_at
WHERE c.problem IS NULL
  -- Beyond a float's last digits (another writer's rounding of the same fix): 1e-9 degrees.
  AND (abs(p.latitude::float8 - c.latitude) > 1e-9
       OR abs(p.longitude::float8 - c.longitude) > 1e-9)
ORDER BY c.file, c.line, c.seq
LIMIT %(limit)s;
