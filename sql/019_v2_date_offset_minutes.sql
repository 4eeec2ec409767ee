-- OData V2 writes the offset of /Date(ms+offset)/ in minutes: datajs and Olingo write
-- /Date(1700000000000+0120)/ for two hours east of UTC (with up to four digits, zero-padded).
-- 015 read the four digits as HHMM, which agrees with that only for +0000 and +0060 and
-- took +0120 for 1 h 20 min, in silence. The milliseconds stay UTC; the offset turns them into
-- the local time of day, as before. Only this rule changes (the stage's CHECKS says so too,
-- so stored page digests no longer vouch for a feed read with the old one).

CREATE OR REPLACE FUNCTION sync_time_slow(t text) RETURNS time
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    m text[];
    shift interval := '0';
BEGIN
    t := btrim(t);
    m := regexp_match(t, '^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?$');
    IF m IS NULL AND t ~ '^PT(\d+H)?(\d+M)?(\d+(\.\d+)?S)?$' AND t <> 'PT' THEN
        m := regexp_match(t, '^PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)(?:\.\d+)?S)?$');
    END IF;
    IF m IS NULL THEN
        m := regexp_match(t, '^\d{4}-\d{2}-\d{2}T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?'
                             '(?:Z|[+-]\d{2}(?::?\d{2})?)?$');
    END IF;
    IF m IS NOT NULL THEN
        IF coalesce(m[1], '0')::integer > 23 OR coalesce(m[2], '0')::integer > 59
                OR coalesce(m[3], '0')::integer > 59 THEN
            RETURN NULL;
        END IF;
        RETURN make_time(coalesce(m[1], '0')::integer, coalesce(m[2], '0')::integer,
                         coalesce(m[3], '0')::integer);
    END IF;
    m := regexp_match(t, '^/Date\((-?\d+)(?:([+-])(\d{1,4}))?\)/$');
    IF m IS NULL THEN
        RETURN NULL;
    END IF;
    IF m[3]::integer > 1080 THEN  -- more than 18 hours: no time zone
        RETURN NULL;
    END IF;
    IF m[2] IS NOT NULL THEN
        shift := make_interval(mins => m[3]::integer);
        IF m[2] = '-' THEN shift := -shift; END IF;
    END IF;
    RETURN date_trunc('second', (to_timestamp(m[1]::numeric / 1000) AT TIME ZONE 'UTC') + shift)::time;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END
$$;
