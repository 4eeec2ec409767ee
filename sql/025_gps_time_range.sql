-- A listener that stored a time outside what a partition can name (milliseconds written as
-- seconds give the year 55984; 'infinity'; a date BC) stopped every later ingest-gps and
-- match-gps run: creating the partition of that day failed ("date too large"), for every
-- device, until someone deleted the row by hand. gps_points now takes the times ingest-gps
-- takes (1970..2099); a listener's INSERT of another time fails with this constraint's name.
--
-- Only the default partition can receive such a time (a daily partition's bounds hold only
-- its day), so the check is the default partition's: on gps_points every partition would
-- evaluate it, and the listener's INSERT into today's partition measured 30 % slower.
-- Points already stored outside the range move to gps_points_out_of_range (not a partition
-- of gps_points: nothing batches or prunes them), so nothing is lost. NOT VALID: the
-- constraint holds for every new row, and the stored ones are not scanned again.
CREATE TABLE gps_points_out_of_range (LIKE gps_points INCLUDING DEFAULTS);
ALTER TABLE gps_points_out_of_range ADD COLUMN moved_at timestamptz NOT NULL DEFAULT now();

WITH moved AS (
    DELETE FROM gps_points_default
    WHERE NOT (recorded_at >= timestamptz '1970-01-01 00:00:00+00'
               AND recorded_at < timestamptz '2100-01-01 00:00:00+00')
    RETURNING *
)
INSERT INTO gps_points_out_of_range (device_id, recorded_at, latitude, longitude, received_at,
                                     source, arrival)
SELECT device_id, recorded_at, latitude, longitude, received_at, source, arrival FROM moved;

ALTER TABLE gps_points_default ADD CONSTRAINT gps_points_recorded_at_check
    CHECK (recorded_at >= timestamptz '1970-01-01 00:00:00+00'
           AND recorded_at < timestamptz '2100-01-01 00:00:00+00') NOT VALID;

-- A listener's point of the new day that committed into the default partition between the
-- move and the ATTACH failed the ATTACH, and with it the whole match-gps or ingest-gps run.
-- The default partition is now locked against inserts first (they wait for this short
-- transaction, then go to the new partition). The bounds are written in ISO form and UTC
-- whatever the session's DateStyle and TimeZone: '%L' of a timestamptz under DateStyle 'SQL,
-- DMY' in Asia/Kolkata wrote "... IST", which reads back as Israel time.
CREATE OR REPLACE FUNCTION gps_add_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := 'gps_points_p' || to_char(day, 'YYYYMMDD');
    lo text := to_char(day, 'YYYY-MM-DD') || ' 00:00:00+00';
    hi text := to_char(day + 1, 'YYYY-MM-DD') || ' 00:00:00+00';
BEGIN
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    LOCK TABLE gps_points_default IN SHARE ROW EXCLUSIVE MODE;
    EXECUTE format('CREATE TABLE %I (LIKE gps_points INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   part);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (recorded_at >= %L AND recorded_at < %L)',
                   part, part || '_range', lo, hi);
    EXECUTE format('WITH moved AS (DELETE FROM gps_points_default '
                   'WHERE recorded_at >= $1 AND recorded_at < $2 RETURNING *) '
                   'INSERT INTO %I SELECT * FROM moved', part) USING lo::timestamptz, hi::timestamptz;
    EXECUTE format('ALTER TABLE gps_points ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part, lo, hi);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', part, part || '_range');
    RETURN true;
END
$$;
