-- A V2 Edm.DateTimeOffset, /Date(ms+offset)/, carries the milliseconds of its local clock and
-- the offset in minutes: WCF Data Services (ODataLib 5.x) writes the DateTimeOffset's Ticks,
-- not its UtcTicks, and datajs, SAPUI5 and Olingo V2 read it so, taking the offset off to get
-- UTC ("the offset is reversed to get back the UTC date"). 015 and 019 read the milliseconds
-- as UTC and added the offset, so a flight leaving at 08:30 (+03:00), written
-- /Date(1717230600000+0180)/, was stored leaving at 11:30, in silence. The local time of day,
-- which an ISO date-time gives as written, is the milliseconds' clock time: the offset is
-- checked (at most 18 hours, 1080 minutes) and not added. SAP gateways write +0000, which
-- reads as before. sync_time_slow is replaced whole, as in 030; only /Date with an offset
-- reads otherwise (the stage's CHECKS says so, so stored page digests no longer vouch for a
-- feed read with the old rule).

CREATE OR REPLACE FUNCTION sync_time_slow(t text) RETURNS time
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    m text[];
BEGIN
    t := regexp_replace(btrim(t), '^P0+DT', 'PT');
    m := regexp_match(t, '^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?$');
    IF m IS NULL THEN  -- HHMM (IATA SSIM), H.MM, HhMM
        m := regexp_match(t, '^(\d{2})(\d{2})$');
        IF m IS NULL THEN
            m := regexp_match(t, '^(\d{1,2})[.hH](\d{2})$');
        END IF;
    END IF;
    IF m IS NULL THEN  -- a 12-hour clock: 8:30 PM, 08:30:15 a.m., 8 pm; 12 AM is midnight
        m := regexp_match(lower(t COLLATE "C"),
                          '^(\d{1,2})(?::(\d{2})(?::(\d{2}))?)?\s*([ap])\.?\s?m\.?$');
        IF m IS NOT NULL THEN
            IF m[1]::integer NOT BETWEEN 1 AND 12 THEN
                RETURN NULL;
            END IF;
            m := ARRAY[(m[1]::integer % 12 + CASE WHEN m[4] = 'p' THEN 12 ELSE 0 END)::text,
                       m[2], m[3]];
        END IF;
    END IF;
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
    m := regexp_match(t, '^/Date\((-?\d+)(?:[+-](\d{1,4}))?\)/$');
    IF m IS NULL OR m[2]::integer > 1080 THEN  -- an offset of more than 18 hours: no zone
        RETURN NULL;
    END IF;
    -- the milliseconds are the local clock's (UTC is them minus the offset): read as they are
    RETURN date_trunc('second', to_timestamp(m[1]::numeric / 1000) AT TIME ZONE 'UTC')::time;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END
$$;
