-- sync-odata checks and converts the feed in PostgreSQL: each page goes to the server as it
-- arrives, json_to_recordset turns it into rows, and the functions below turn each field into
-- its read-model value (NULL when the value is not acceptable). sync_problem says why a value
-- was refused; it runs only for refused rows. The rules (what the Python normaliser of the
-- row worker accepted until now):
--   key     a JSON string (not empty, no NUL) or an integer number
--   text    a JSON string (no NUL) or a number (its JSON text)
--   number  a JSON number, or a string holding one (V2 Edm.Double/Decimal, IEEE754Compatible;
--           a trailing d/m/f suffix is allowed); finite; -0 is 0
--   bool    true/false, 0/1, or those as a string (any case, blanks around)
--   time    a string: HH:MM, HH:MM:SS(.fff), V2 PT08H30M00S, /Date(ms[+-]HHMM)/ or an ISO
--           date-time (its local time of day); stored as HH:MM:SS
--   days    distinct digits 1-7 as a string or an integer; stored sorted
-- The fast branch of each function is plain SQL that PostgreSQL inlines into the page query;
-- the rare forms go to a PL/pgSQL function.
-- The row index of 008 is no longer read: the diff is a join with the read model.

DROP TABLE dataset_row_index;

COMMENT ON COLUMN datasets.hash IS
    'sha256 over the set hashes; a set hash is the md5 of its rows (as PostgreSQL writes a '
    'row) in key order';

-- The text of a JSON string; NULL for a string holding NUL (PostgreSQL text cannot).
CREATE FUNCTION sync_string(v json) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN strpos(v::text, '\') = 0 THEN substr(v::text, 2, length(v::text) - 2)
                WHEN v::text !~ '(^|[^\\])(\\\\)*\\u0000' THEN v #>> '{}' END
$$;

-- A JSON string's text or a number's own text; NULL for anything else.
CREATE FUNCTION sync_scalar(v json) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE left(v::text, 1)
        WHEN '"' THEN sync_string(v)
        WHEN 't' THEN NULL WHEN 'f' THEN NULL WHEN 'n' THEN NULL
        WHEN '{' THEN NULL WHEN '[' THEN NULL
        ELSE v::text END
$$;

CREATE FUNCTION sync_key(v json) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN left(v::text, 1) = '"' THEN nullif(sync_string(v), '')
                WHEN v::text ~ '^-?[0-9]+$' THEN v::text END
$$;

CREATE FUNCTION sync_text(v json) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT sync_scalar(v)
$$;

CREATE FUNCTION sync_number_text(t text) RETURNS double precision
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
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

CREATE FUNCTION sync_number(v json) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN left(v::text, 1) IN ('-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9')
                     AND length(v::text) < 30
                     AND strpos(v::text, 'e') = 0 AND strpos(v::text, 'E') = 0
                THEN v::text::double precision + 0.0
                ELSE sync_number_text(sync_scalar(v)) END
$$;

CREATE FUNCTION sync_bool(v json) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN v::text IN ('true', '1', '"true"', '"1"') THEN true
                WHEN v::text IN ('false', '0', '"false"', '"0"') THEN false
                WHEN left(v::text, 1) = '"' THEN
                    CASE lower(btrim(sync_string(v)))
                        WHEN 'true' THEN true WHEN '1' THEN true
                        WHEN 'false' THEN false WHEN '0' THEN false END END
$$;

CREATE FUNCTION sync_time_text(t text) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    m text[];
    h integer;
    mi integer;
    s integer;
    shift interval := '0';
BEGIN
    t := btrim(t);
    m := regexp_match(t, '^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?$');
    IF m IS NOT NULL THEN
        h := m[1]::integer; mi := m[2]::integer; s := coalesce(m[3], '0')::integer;
    ELSIF t ~ '^PT(\d+H)?(\d+M)?(\d+(\.\d+)?S)?$' AND t <> 'PT' THEN
        m := regexp_match(t, '^PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)(?:\.\d+)?S)?$');
        h := coalesce(m[1], '0')::integer; mi := coalesce(m[2], '0')::integer;
        s := coalesce(m[3], '0')::integer;
    ELSE
        m := regexp_match(t, '^/Date\((-?\d+)(?:([+-])(\d{2})(\d{2}))?\)/$');
        IF m IS NOT NULL THEN
            IF m[2] IS NOT NULL THEN
                shift := make_interval(hours => m[3]::integer, mins => m[4]::integer);
                IF m[2] = '-' THEN shift := -shift; END IF;
            END IF;
            RETURN to_char(to_timestamp(m[1]::numeric / 1000) AT TIME ZONE 'UTC' + shift,
                           'HH24:MI:SS');
        END IF;
        m := regexp_match(t, '^\d{4}-\d{2}-\d{2}T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?'
                             '(?:Z|[+-]\d{2}(?::?\d{2})?)?$');
        IF m IS NULL THEN
            RETURN NULL;
        END IF;
        h := m[1]::integer; mi := m[2]::integer; s := coalesce(m[3], '0')::integer;
    END IF;
    IF h > 23 OR mi > 59 OR s > 59 THEN
        RETURN NULL;
    END IF;
    RETURN to_char(make_time(h, mi, s), 'HH24:MI:SS');
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END
$$;

CREATE FUNCTION sync_time(v json) RETURNS time
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN v::text ~ '^"([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?"$'
                THEN substr(v::text, 2, length(v::text) - 2)::time
                WHEN left(v::text, 1) = '"' THEN sync_time_text(sync_string(v))::time END
$$;

CREATE FUNCTION sync_days_text(t text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN t ~ '^[1-7]{1,7}$' AND t !~ '(.).*\1'
                THEN array_to_string(ARRAY(SELECT d FROM unnest(string_to_array(t, NULL)) d
                                           ORDER BY d), '') END
$$;

CREATE FUNCTION sync_days(v json) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN v::text ~ '^"1?2?3?4?5?6?7?"$' AND v::text <> '""'
                THEN substr(v::text, 2, length(v::text) - 2)
                WHEN v::text ~ '^1?2?3?4?5?6?7?$' THEN v::text
                WHEN left(v::text, 1) = '"' OR v::text ~ '^[0-9]+$'
                THEN sync_days_text(sync_scalar(v)) END
$$;

-- A value as the problem messages quote it: a string in single quotes, anything else as JSON.
CREATE FUNCTION sync_quote(v json) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN left(v::text, 1) = '"' AND sync_string(v) IS NOT NULL
                THEN '''' || replace(sync_string(v), '''', '\''') || ''''
                ELSE v::text END
$$;

-- How a number prints in a problem message: 95.0, -200.0, 1.5e+20.
CREATE FUNCTION sync_number_out(x double precision) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN x::text ~ '^-?[0-9]+$' THEN x::text || '.0' ELSE x::text END
$$;

-- Why a value of a kind (key, text, number, bool, time, days) was refused: {kind, message}
-- with kind missing, invalid or out_of_range; NULL if it is acceptable. A number must lie
-- within [low, high] (either may be NULL).
CREATE FUNCTION sync_problem(kind text, v json, required boolean,
                             low double precision, high double precision) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    x double precision;
    nul boolean := left(v::text, 1) = '"' AND sync_string(v) IS NULL;
BEGIN
    IF v IS NULL OR v::text = 'null' THEN
        RETURN CASE WHEN required THEN ARRAY['missing', 'missing required value'] END;
    END IF;
    CASE kind
    WHEN 'key' THEN
        IF sync_key(v) IS NULL THEN
            RETURN ARRAY['invalid', CASE WHEN nul THEN 'key contains a NUL character'
                                         WHEN v::text = '""' THEN 'key is empty'
                                         ELSE 'expected a string or integer key, got '
                                              || v::text END];
        END IF;
    WHEN 'text' THEN
        IF sync_text(v) IS NULL THEN
            RETURN ARRAY['invalid', CASE WHEN nul THEN 'text contains a NUL character'
                                         ELSE 'expected text, got ' || json_typeof(v) END];
        END IF;
    WHEN 'number' THEN
        x := sync_number(v);
        IF x IS NULL THEN
            RETURN ARRAY['invalid', CASE WHEN json_typeof(v) = 'number' OR lower(rtrim(btrim(
                                              sync_scalar(v), E' \t\n\r'), 'dDmMfF'))
                                              ~ '^[+-]?(nan|inf|infinity)$'
                                         THEN 'expected a finite number, got '
                                         ELSE 'expected a number, got ' END
                                    || sync_quote(v)];
        ELSIF low IS NOT NULL AND high IS NOT NULL AND NOT x BETWEEN low AND high THEN
            RETURN ARRAY['out_of_range', sync_number_out(x) || ' is outside '
                                         || low::text || '..' || high::text];
        ELSIF low IS NOT NULL AND x < low THEN
            RETURN ARRAY['out_of_range', sync_number_out(x) || ' is negative'];
        END IF;
    WHEN 'bool' THEN
        IF sync_bool(v) IS NULL THEN
            RETURN ARRAY['invalid', 'expected true or false, got ' || sync_quote(v)];
        END IF;
    WHEN 'time' THEN
        IF sync_time(v) IS NULL THEN
            RETURN ARRAY['invalid', 'expected a time HH:MM, got ' || sync_quote(v)];
        END IF;
    WHEN 'days' THEN
        IF sync_days(v) IS NULL THEN
            RETURN ARRAY['invalid', 'expected distinct day digits 1-7 like "12345", got '
                                    || sync_quote(v)];
        END IF;
    END CASE;
    RETURN NULL;
END
$$;
