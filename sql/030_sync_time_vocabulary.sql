-- A flight's departure and arrival took HH:MM[:SS], Edm.TimeOfDay, Edm.Duration (PT8H30M),
-- an ISO date-time and V2's /Date(...)/. Read now as well: four digits HHMM (IATA SSIM,
-- "0830"), H.MM and HhMM ("8.30", "8h30"), and a 12-hour clock ("8:30 PM", "08:30:15 a.m.",
-- "8 pm"; 12 AM is midnight, 12 PM noon). Hours past 23 (GTFS's 25:30 for after midnight)
-- stay refused: stored as a time of day they would move the flight to another day of its
-- days of operation. Three digits ("830") stay refused too. Only values refused before are
-- read now, so stored page digests still vouch for the feeds they saw (as for 022).

CREATE OR REPLACE FUNCTION sync_time_slow(t text) RETURNS time
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    m text[];
    shift interval := '0';
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
