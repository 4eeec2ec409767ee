-- GPS storage at fleet scale: gps_points becomes append-only and partitioned by day.
--
-- Nothing updates a point any more. A point records its arrival: the 64-bit id of the
-- transaction that inserted it (txid_current(), which never wraps). A batch records what it
-- read: the snapshot of the statement that claimed it (points_snapshot). A point is processed
-- when a completed or too_short batch of its device covers its time and that batch's snapshot
-- sees the point (gps_point_status below says so per point). The batcher finds new points
-- through a cursor, the snapshot up to which it has looked at every arrival
-- (gps_batching_cursor), and a BRIN index on arrival; a late point in a finished batch's time
-- range sends that batch back to pending. Existing points, batches and polylines are kept, and
-- points processed before the upgrade count as processed after it.

ALTER TABLE gps_points RENAME TO gps_points_v5;
ALTER TABLE gps_points_v5 RENAME CONSTRAINT gps_points_pkey TO gps_points_v5_pkey;
DROP TRIGGER gps_points_skip_duplicate ON gps_points_v5;
DROP FUNCTION gps_points_skip_duplicate();

CREATE TABLE gps_points (
    device_id   text             NOT NULL CHECK (device_id <> ''),
    recorded_at timestamptz      NOT NULL,
    -- NaN compares greater than every number in PostgreSQL, so these reject it too.
    latitude    double precision NOT NULL CHECK (latitude BETWEEN -90 AND 90),
    longitude   double precision NOT NULL CHECK (longitude BETWEEN -180 AND 180),
    received_at timestamptz      NOT NULL DEFAULT now(),
    source      text             NOT NULL DEFAULT 'listener',
    -- The inserting transaction: compared with snapshots, it says exactly which batch and
    -- which batcher pass saw the point, even for a transaction that commits late.
    arrival     bigint           NOT NULL DEFAULT txid_current(),
    -- A unique key of a partitioned table must hold the partition key: recorded_at is in it.
    CONSTRAINT gps_points_pkey PRIMARY KEY (device_id, recorded_at)
) PARTITION BY RANGE (recorded_at);

-- Points are only appended, so arrival grows with the physical order of each partition and a
-- BRIN index (a few pages for millions of rows) finds the newest arrivals.
CREATE INDEX gps_points_arrival_idx ON gps_points USING brin (arrival)
    WITH (pages_per_range = 16, autosummarize = on);

-- Catches the times no daily partition covers; gps_add_partition moves them out.
CREATE TABLE gps_points_default PARTITION OF gps_points DEFAULT;

-- The same device and time is stored once: a repeated plain INSERT (a listener resending
-- after a reconnect) becomes a no-op instead of an error, so the listener needs no ON
-- CONFLICT clause. A rule costs a third of the row trigger it replaces. Rules do not apply to
-- COPY or to inserts into a partition, which ingest-gps uses with ON CONFLICT DO NOTHING.
CREATE RULE gps_points_skip_duplicate AS ON INSERT TO gps_points
    WHERE EXISTS (SELECT 1 FROM gps_points p
                  WHERE p.device_id = NEW.device_id AND p.recorded_at = NEW.recorded_at)
    DO INSTEAD NOTHING;

-- The daily partition of `day` (UTC), created unless it exists; points of that day in the
-- default partition move into it first. Attaching takes only a SHARE UPDATE EXCLUSIVE lock
-- on gps_points, so inserts go on meanwhile; the CHECK constraint spares the validation scan.
CREATE FUNCTION gps_add_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := 'gps_points_p' || to_char(day, 'YYYYMMDD');
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE gps_points INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   part);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (recorded_at >= %L AND recorded_at < %L)',
                   part, part || '_range', lo, hi);
    EXECUTE format('WITH moved AS (DELETE FROM gps_points_default '
                   'WHERE recorded_at >= $1 AND recorded_at < $2 RETURNING *) '
                   'INSERT INTO %I SELECT * FROM moved', part) USING lo, hi;
    EXECUTE format('ALTER TABLE gps_points ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part, lo, hi);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', part, part || '_range');
    RETURN true;
END
$$;

SELECT gps_add_partition(d)
FROM (SELECT DISTINCT (recorded_at AT TIME ZONE 'UTC')::date AS d FROM gps_points_v5) days;
SELECT gps_add_partition(((now() AT TIME ZONE 'UTC')::date + i))
FROM generate_series(-1, 7) i;

-- Points already in a batch arrived long ago (arrival 1: every snapshot sees them); points in
-- no batch yet arrive now, so the batcher looks at them on its next pass.
INSERT INTO gps_points (device_id, recorded_at, latitude, longitude, received_at, source,
                        arrival)
SELECT device_id, recorded_at, latitude, longitude, received_at, source,
       CASE WHEN batch_id IS NULL THEN txid_current() ELSE 1 END
FROM gps_points_v5;
DROP TABLE gps_points_v5;

-- What a batch read: the snapshot of its claim (or of its making, for too_short). NULL while
-- pending. Existing batches saw every point that was in them.
ALTER TABLE processing_batches ADD COLUMN points_snapshot txid_snapshot;
UPDATE processing_batches
SET points_snapshot = (txid_current() || ':' || txid_current() || ':')::txid_snapshot
WHERE status <> 'pending';

-- Not a partition of gps_points: the snapshot up to which the batcher has looked at every
-- arrival. One row.
CREATE TABLE gps_batching_cursor (
    only_row   boolean      PRIMARY KEY DEFAULT true CHECK (only_row),
    seen       txid_snapshot NOT NULL,
    updated_at timestamptz  NOT NULL DEFAULT now()
);
INSERT INTO gps_batching_cursor (seen)
VALUES ((txid_current() || ':' || txid_current() || ':')::txid_snapshot);

-- Not a partition of gps_points: devices whose newest points are in no batch yet (a run
-- that may still grow), so the batcher looks at them again without a new arrival.
CREATE TABLE gps_waiting_devices (
    device_id  text        PRIMARY KEY,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO gps_waiting_devices (device_id)
SELECT DISTINCT device_id FROM gps_points WHERE arrival <> 1;

-- Each point with the batch whose time range holds it and whether it is processed. Batches
-- of a device never overlap, so the latest batch starting at or before the point is the
-- only candidate.
CREATE VIEW gps_point_status AS
SELECT p.device_id, p.recorded_at, p.latitude, p.longitude, p.received_at, p.source,
       p.arrival, b.batch_id, b.status AS batch_status,
       coalesce(b.status IN ('completed', 'too_short')
                AND txid_visible_in_snapshot(p.arrival, b.points_snapshot), false) AS processed
FROM gps_points p
LEFT JOIN LATERAL (
    SELECT batch_id, status, end_time, points_snapshot FROM processing_batches pb
    WHERE pb.device_id = p.device_id AND pb.start_time <= p.recorded_at
    ORDER BY pb.start_time DESC LIMIT 1
) b ON b.end_time >= p.recorded_at;

-- The fields of one CSV line with double quotes (ingest-gps splits the others with
-- string_to_array): quoted fields may hold commas and doubled quotes.
CREATE FUNCTION gps_csv_fields(line text) RETURNS text[]
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT array_agg(CASE WHEN m[1] ~ '^".*"$' AND length(m[1]) >= 2
                          THEN replace(substr(m[1], 2, length(m[1]) - 2),
                                                           '""', '"')
                          ELSE m[1] END ORDER BY n)
    FROM regexp_matches(line, '(?:^|,)("(?:[^"]|"")*"|[^,]*)', 'g') WITH ORDINALITY AS r(m, n)
$$;
