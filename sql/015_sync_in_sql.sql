-- sync-odata checks and converts the feed in PostgreSQL: each page goes to the server as it
-- arrives, json_to_recordset reads each source field as text (a string's text, a number's or
-- boolean's JSON text, an object's or array's JSON), and the functions below turn that text
-- into the read-model value, or NULL when it is not acceptable. sync_problem says why a value
-- was refused; it runs only for refused rows. The rules:
--   key     a string (not empty) or a number, as its text
--   text    a string or a number, as its text
--   number  a JSON number, or a string holding one (V2 Edm.Double/Decimal, IEEE754Compatible;
--           blanks around and a trailing d/m/f suffix are allowed); finite; -0 is 0
--   bool    true/false, 0/1, or those as a string (any case, blanks around)
--   time    HH:MM, HH:MM:SS(.fff), V2 PT08H30M00S, /Date(ms[+-]HHMM)/ or an ISO date-time
--           (its local time of day)
--   days    distinct digits 1-7, as a string or an integer; stored sorted
-- A key or text must not be a boolean, object or array: those texts (true, false, {..},
-- [..]) are rare, so only for them does the page query look up the value's JSON type.
-- PostgreSQL text cannot hold NUL: the stage sends a string's \u0000 as \uffff, which every
-- rule refuses (as "contains a NUL character").
-- The fast branch of each function is plain SQL that PostgreSQL inlines into the page query;
-- the rare forms go to a *_slow function, STRICT so that a missing value (NULL) never calls
-- it.
-- The row index of 008 is no longer read: the diff is a join with the read model.

DROP TABLE dataset_row_index;

COMMENT ON COLUMN datasets.hash IS
    'sha256 over the set hashes; a set hash is the sha256 of the blake2b digests of the raw '
    'pages the version was read from, in order (before migration 015: of its canonical rows)';

-- Whether a key's or text's value may have been a boolean, object or array.
CREATE FUNCTION sync_suspect(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT t IN ('true', 'false') OR left(t, 1) IN ('{', '[')
$$;

-- jtype: the value's JSON type, looked up only when sync_suspect(t); NULL otherwise.
CREATE FUNCTION sync_key(t text, jtype text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN t = '' OR strpos(t, U&'\FFFF') > 0
                     OR jtype NOT IN ('string', 'number') THEN NULL ELSE t END
$$;

CREATE FUNCTION sync_text(t text, jtype text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN strpos(t, U&'\FFFF') > 0
                     OR jtype NOT IN ('string', 'number') THEN NULL ELSE t END
$$;

CREATE FUNCTION sync_number_slow(t text) RETURNS double precision
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    x double precision;
BEGIN
    x := rtrim(btrim(t, E' \t\n\r'), 'dDmMfF')::double precision;
    IF x IN ('NaN', 'Infinity', '-Infinity') THEN
        RETURN NULL;
    END IF;
    RETURN x + 0.0;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END
$$;

-- Fast branch: digits with at most a leading minus and one point (no regular expression: this
-- runs for every number of every feed), which the cast cannot refuse.
CREATE FUNCTION sync_number(t text) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN translate(t, '0123456789', '') IN ('', '.', '-', '-.')
                     AND t NOT IN ('', '.', '-', '-.') AND strpos(t, '-') < 2
                     AND length(t) < 300
                THEN t::double precision + 0.0
                ELSE sync_number_slow(t) END
$$;

CREATE FUNCTION sync_bool(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE t WHEN 'true' THEN true WHEN 'false' THEN false
           ELSE CASE lower(btrim(t)) WHEN 'true' THEN true WHEN '1' THEN true
                                     WHEN 'false' THEN false WHEN '0' THEN false END END
$$;

CREATE FUNCTION sync_time_slow(t text) RETURNS time
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
    m := regexp_match(t, '^/Date\((-?\d+)(?:([+-])(\d{2})(\d{2}))?\)/$');
    IF m IS NULL THEN
        RETURN NULL;
    END IF;
    IF m[2] IS NOT NULL THEN
        shift := make_interval(hours => m[3]::integer, mins => m[4]::integer);
        IF m[2] = '-' THEN shift := -shift; END IF;
    END IF;
    RETURN date_trunc('second', (to_timestamp(m[1]::numeric / 1000) AT TIME ZONE 'UTC') + shift)::time;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END
$$;

CREATE FUNCTION sync_time(t text) RETURNS time
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN t ~ '^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$' THEN t::time
                ELSE sync_time_slow(t) END
$$;

CREATE FUNCTION sync_days_slow(t text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN t ~ '^[1-7]{1,7}$' AND t !~ '(.).*\1'
                THEN array_to_string(ARRAY(SELECT d FROM unnest(string_to_array(t, NULL)) d
                                           ORDER BY d), '') END
$$;

CREATE FUNCTION sync_days(t text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN t ~ '^1?2?3?4?5?6?7?$' AND t <> '' THEN t ELSE sync_days_slow(t) END
$$;

-- How a number prints in a problem message: 95.0, -200.0, 1.5e+20.
CREATE FUNCTION sync_number_out(x double precision) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN x::text ~ '^-?[0-9]+$' THEN x::text || '.0' ELSE x::text END
$$;

-- Why a value of a kind (key, text, number, bool, time, days) was refused: {kind, message}
-- with kind missing, invalid or out_of_range; NULL if it is acceptable. A number must lie
-- within [low, high] (either may be NULL). The value is the text the page query read.
CREATE FUNCTION sync_problem(kind text, t text, required boolean,
                             low double precision, high double precision) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    x double precision;
    quoted text := '''' || replace(t, '''', '\''') || '''';
BEGIN
    IF t IS NULL THEN
        RETURN CASE WHEN required THEN ARRAY['missing', 'missing required value'] END;
    ELSIF strpos(t, U&'\FFFF') > 0 THEN
        RETURN ARRAY['invalid', 'contains a NUL character'];
    END IF;
    CASE kind
    WHEN 'key' THEN
        IF t = '' THEN
            RETURN ARRAY['invalid', 'key is empty'];
        ELSIF sync_suspect(t) THEN  -- refused, so not a string
            RETURN ARRAY['invalid', 'expected a string or number key, got ' || t];
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
