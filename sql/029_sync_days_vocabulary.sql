-- A flight's days of operation took only distinct digits 1-7 ("135", or the number 135), so a
-- service that spells them otherwise had every flight refused. Read now as well, Monday = 1:
--   seven places, Monday first, each its day's digit or 1 if the flight runs, else one of
--   0 space . - _ : IATA SSIM's "1 3 5 7" or "1.3.5.7", and a bitmask "1010100";
--   a list of days and ranges, separated by , ; / | + & or blanks: digits 1-7 or English names
--   and abbreviations (mo, mon, monday; tu, tue, tues; ... su, sun, sunday), "mo-fr",
--   "Monday - Friday", a range across the week's end ("fr-mo"), "daily", "weekdays",
--   "weekends"; in a JSON array too (["Mon", "Wed"], [1, 3, 5]).
-- Any case, blanks around. A day named twice, an empty list, 0 or 8 as a day, another word are
-- still refused. The stored value is the same as before: the distinct digits, sorted.
-- The common "12345" still takes sync_days' one pattern; only other spellings reach this
-- function. Only values refused before are read now, so stored page digests still vouch for
-- the feeds they saw (as for 022 and 027).

-- One day: a digit 1-7 or an English name or abbreviation, Monday = 1; NULL for another word.
CREATE FUNCTION sync_day(t text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN t ~ '^[1-7]$' THEN t::integer
                WHEN t IN ('mo', 'mon', 'monday') THEN 1
                WHEN t IN ('tu', 'tue', 'tues', 'tuesday') THEN 2
                WHEN t IN ('we', 'wed', 'weds', 'wednesday') THEN 3
                WHEN t IN ('th', 'thu', 'thur', 'thurs', 'thursday') THEN 4
                WHEN t IN ('fr', 'fri', 'friday') THEN 5
                WHEN t IN ('sa', 'sat', 'saturday') THEN 6
                WHEN t IN ('su', 'sun', 'sunday') THEN 7 END
$$;

CREATE OR REPLACE FUNCTION sync_days_slow(t text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    s text := lower(btrim(t COLLATE "C", E' \t\r\n'));
    days integer[] := '{}';
    c text;
    part text;
    m text[];
    a integer;
    b integer;
BEGIN
    IF s ~ '^[1-7]{1,7}$' AND s !~ '(.).*\1' THEN  -- distinct digits in another order
        RETURN array_to_string(ARRAY(SELECT d FROM unnest(string_to_array(s, NULL)) d
                                     ORDER BY d), '');
    END IF;
    IF t ~ '^[0-7 ._-]{7}$' THEN  -- seven places, Monday first
        FOR i IN 1..7 LOOP
            c := substr(t, i, 1);
            IF c = i::text OR c = '1' THEN
                days := days || i;
            ELSIF c !~ '^[0 ._-]$' THEN
                days := NULL;  -- another day's digit here: not this form
                EXIT;
            END IF;
        END LOOP;
        IF days IS NOT NULL THEN
            RETURN CASE WHEN days <> '{}' THEN array_to_string(days, '') END;
        END IF;
        days := '{}';
    END IF;
    IF s ~ '^\[.*\]$' THEN  -- a JSON array of days
        s := btrim(translate(substr(s, 2, length(s) - 2), '"', ''));
    END IF;
    s := regexp_replace(s, '\s*-\s*', '-', 'g');
    FOREACH part IN ARRAY regexp_split_to_array(s, '\s*[,;/|+&]\s*|\s+and\s+|\s+') LOOP
        IF part IN ('daily', 'everyday') THEN
            m := ARRAY['1', '7'];
        ELSIF part IN ('weekdays', 'workdays') THEN
            m := ARRAY['1', '5'];
        ELSIF part IN ('weekends', 'weekend') THEN
            m := ARRAY['6', '7'];
        ELSE
            m := regexp_match(part, '^([a-z1-7]+)(?:-([a-z1-7]+))?$');
            IF m IS NULL THEN
                RETURN NULL;
            END IF;
        END IF;
        a := sync_day(m[1]);
        b := coalesce(sync_day(coalesce(m[2], m[1])), 0);
        IF a IS NULL OR b = 0 THEN
            RETURN NULL;
        END IF;
        LOOP  -- a to b, across the week's end if b comes first
            IF a = ANY (days) THEN
                RETURN NULL;  -- a day twice
            END IF;
            days := days || a;
            EXIT WHEN a = b;
            a := a % 7 + 1;
        END LOOP;
    END LOOP;
    RETURN CASE WHEN days <> '{}'
                THEN array_to_string(ARRAY(SELECT d FROM unnest(days) d ORDER BY d), '') END;
END
$$;
