-- The problems of a refused days of operation and time still named one form each ("distinct
-- day digits 1-7 like "12345"", "a time HH:MM"), while 029 and 030 read seven places, day
-- names and ranges, JSON arrays, daily/weekdays/weekends, and HHMM, 8.30, 8h30 and a 12-hour
-- clock too: the messages sent an operator toward one form alone. They now name the forms
-- read, briefly (docs/sync-odata.md lists them whole). sync_problem is replaced whole, as in
-- 027; only these two messages differ. Only messages change: every value reads as before,
-- and stored page digests still vouch for the feeds they saw.

CREATE OR REPLACE FUNCTION sync_problem(kind text, t text, required boolean,
                                        low double precision, high double precision)
    RETURNS text[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    x double precision;
    quoted text := '''' || replace(t, '''', '\''') || '''';
BEGIN
    IF t IS NULL THEN
        RETURN CASE WHEN required THEN ARRAY['missing', 'missing required value'] END;
    ELSIF strpos(t, U&'\FFFF') > 0 THEN
        RETURN ARRAY['invalid', 'contains a NUL character'];
    ELSIF kind IN ('key', 'text') AND octet_length(t) > 2000 THEN
        RETURN ARRAY['invalid', 'longer than 2000 bytes (' || octet_length(t) || ')'];
    END IF;
    CASE kind
    WHEN 'key' THEN
        IF t = '' THEN
            RETURN ARRAY['invalid', 'key is empty'];
        ELSIF sync_suspect(t) THEN  -- refused, so not a string
            RETURN ARRAY['invalid', 'expected a string or number key, got ' || t];
        ELSIF t LIKE 'V:%' OR t LIKE 'VR:%' THEN
            RETURN ARRAY['invalid', quoted || ' starts with ' || split_part(t, ':', 1)
                                    || ':, which names gen-virtual''s stops and routes'];
        END IF;
    WHEN 'text' THEN
        IF sync_suspect(t) THEN
            RETURN ARRAY['invalid', 'expected text, got ' || t];
        END IF;
    WHEN 'number' THEN
        x := sync_number(t);
        IF x IS NULL THEN
            RETURN ARRAY['invalid', CASE WHEN lower(btrim(t) COLLATE "C")
                                               ~ '^[+-]?(nan|inf|infinity)$'
                                          OR t ~ '^-?[0-9.]+[eE]'
                                         THEN 'expected a finite number, got '
                                         ELSE 'expected a number, got ' END || quoted];
        ELSIF low IS NOT NULL AND high IS NOT NULL AND NOT x BETWEEN low AND high THEN
            RETURN ARRAY['out_of_range', sync_number_out(x) || ' is outside '
                                         || low::text || '..' || high::text];
        ELSIF low IS NOT NULL AND x < low THEN
            RETURN ARRAY['out_of_range', sync_number_out(x) || ' is negative'];
        END IF;
    WHEN 'bool' THEN
        IF sync_bool(t) IS NULL THEN
            RETURN ARRAY['invalid', 'expected true or false (or t/f, yes/no, y/n, on/off, '
                                    || '1/0, X/blank), got ' || quoted];
        END IF;
    WHEN 'time' THEN
        IF sync_time(t) IS NULL THEN
            RETURN ARRAY['invalid', 'expected a time of day (HH:MM, HH:MM:SS, HHMM "0830", '
                                    || '"8.30", "8h30", "8:30 PM"; hours 0-23), got '
                                    || quoted];
        END IF;
    WHEN 'days' THEN
        IF sync_days(t) IS NULL THEN
            RETURN ARRAY['invalid', 'expected days of operation (digits 1-7 "135", seven '
                                    || 'places "1010100" or "1 3 5 7", days and ranges '
                                    || '"Mon, Wed" or "Mo-Fr", a JSON array, daily, weekdays, '
                                    || 'weekends), got ' || quoted];
        END IF;
    END CASE;
    RETURN NULL;
END
$$;
