-- The listener inserts one point per statement. For each, PostgreSQL prepares the CHECK
-- constraints of the partition the point goes to, and the latitude and longitude checks of
-- 005/013 compared with integers, so every INSERT also folded four integer-to-double casts:
-- that was most of the listener's cost over a bare table (1.9 x; about 1.6 x with these).
-- Same rules, written with double precision bounds (NaN is still refused: it compares greater
-- than every number). Adding them checks every stored point once (a sequential scan under
-- an exclusive lock on gps_points: the listener waits for it).
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT conname FROM pg_constraint
             WHERE conrelid = 'gps_points'::regclass AND contype = 'c'
               AND pg_get_constraintdef(oid) ~ '\m(latitude|longitude)\M'
    LOOP
        EXECUTE format('ALTER TABLE gps_points DROP CONSTRAINT %I', c.conname);
    END LOOP;
END
$$;

ALTER TABLE gps_points
    ADD CONSTRAINT gps_points_latitude_check
        CHECK (latitude BETWEEN float8 '-90' AND float8 '90'),
    ADD CONSTRAINT gps_points_longitude_check
        CHECK (longitude BETWEEN float8 '-180' AND float8 '180');
