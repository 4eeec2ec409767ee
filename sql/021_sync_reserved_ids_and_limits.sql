-- Feeds from other services showed four values that 015 let through and that later failed or
-- lied. The sync rules now refuse them, each named like any other refused value (and skipped
-- with --skip-invalid); the stage's CHECKS says so too, so stored page digests no longer vouch
-- for a feed read with the old rules.
--   * A key starting with V: or VR: is refused: gen-virtual names its stops V:<kind>:... and
--     its routes VR:<from>><to>, so a real stop V:MAIN:133:28 broke gen-virtual's unique index
--     or build-graph's check that no id is both real and virtual, on every run after the sync.
--   * A key or text of more than 2000 bytes is refused: a B-tree index entry holds at most
--     2704 bytes, so a longer id or city failed the whole sync with a database error that
--     --skip-invalid could not skip.
--   * A number written in hexadecimal ('0x10', '0x1p3') is refused: the float input read it
--     (as 16, 8), and '0x1f' even lost its f as a suffix (1).
--   * An ISO date-time with an impossible date ('2026-13-45T08:00:00') is refused: only its
--     time of day is kept, but a date that does not exist says the value is not what it seems.

CREATE OR REPLACE FUNCTION sync_key(t text, jtype text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN t = '' OR strpos(t, U&'\FFFF') > 0 OR octet_length(t) > 2000
                     OR (ascii(t) = 86 AND (t LIKE 'V:%' OR t LIKE 'VR:%'))  -- V
                     OR jtype NOT IN ('string', 'number') THEN NULL ELSE t END
$$;

CREATE OR REPLACE FUNCTION sync_text(t text, jtype text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN strpos(t, U&'\FFFF') > 0 OR octet_length(t) > 2000
                     OR jtype NOT IN ('string', 'number') THEN NULL ELSE t END
$$;

CREATE OR REPLACE FUNCTION sync_number_slow(t text) RETURNS double precision
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    x double precision;
BEGIN
    IF strpos(lower(t), 'x') > 0 THEN  -- hexadecimal, which the float input would read
        RETURN NULL;
    END IF;
    x := rtrim(btrim(t, E' \t\n\r'), 'dDmMfF')::double precision;
    IF x IN ('NaN', 'Infinity', '-Infinity') THEN
        RETURN NULL;
    END IF;
    RETURN x + 0.0;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END
$$;

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
            RETURN ARRAY['invalid', CASE WHEN lower(btrim(t)) ~ '^[+-]?(nan|inf|infinity)$'
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
            RETURN ARRAY['invalid', 'expected true or false, got ' || quoted];
        END IF;
    WHEN 'time' THEN
        IF sync_time(t) IS NULL THEN
            RETURN ARRAY['invalid', 'expected a time HH:MM, got ' || quoted];
        END IF;
    WHEN 'days' THEN
        IF sync_days(t) IS NULL THEN
            RETURN ARRAY['invalid', 'expected distinct day digits 1-7 like "12345", got '
                                    || quoted];
        END IF;
    END CASE;
    RETURN NULL;
END
$$;
