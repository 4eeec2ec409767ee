-- An Edm.Duration may carry a day part: P0DT08H30M00S is the same time of day as PT08H30M00S
-- (as some V2 and V4 services write it), and was refused as "expected a time HH:MM". A day
-- part of zero is read; any other (P1DT2H) is no time of day and stays refused. Only values
-- refused before are read now, so stored page digests still vouch for the feeds they saw.

CREATE OR REPLACE FUNCTION sync_time_slow(t text) RETURNS time
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    m text[];
    shift interval := '0';
BEGIN
    t := regexp_replace(btrim(t), '^P0+DT', 'PT');
    m := regexp_match(t, '^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?$');
    IF m IS NULL AND t ~ '^PT(\d+H)?(\d+M)?(\d+(\.\d+)?S)?$' AND t <> 'PT' THEN
        m := regexp_match(t, '^PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)(?:\.\d+)?S)?$');
    END IF;
    IF m IS NULL THEN
        m := regexp_match(t, '^\d{4}-\d{2}-\d{2}T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?'
                             '(?:Z|[+-]\d{2}(?::?\d{2})?)?$');
        IF m IS NOT NULL THEN
            PERFORM left(t, 10)::date;  -- a date that does not exist raises data_exception
        END IF;
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
