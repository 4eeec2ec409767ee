-- A boolean (is_airport) took only true/false and 1/0, so a service that spells it otherwise
-- had every row refused: SAP exposes an ABAP flag as Edm.String, 'X' for true and ' ' or ''
-- for false, and other services send yes/no, Y/N, on/off or t/f. The rule is now PostgreSQL's
-- boolean input, exactly (none of its unique prefixes: 'tr', 'of' stay refused), plus SAP's:
--   true   true, t, yes, y, on, 1, X
--   false  false, f, no, n, off, 0, and a blank string ('', ' ')
-- in any case, blanks (space, tab, CR, LF) around; a JSON true/false and a JSON number 1 or 0
-- reach the rule as those texts. A blank string is SAP's false (abap_false is ' '), a value,
-- not a missing one, so it would be false in a required column too; only a JSON null (or a
-- field mapped to "") is missing, which for the optional is_airport also means false.
-- Only values refused before are read now, so stored page digests still vouch for the feeds
-- they saw (as for 022); the problem message lists the spellings.
-- sync_problem is replaced whole for that message; it also lowers the text with the C
-- collation when it tells a non-finite number: under a Turkish ICU collation lower('INF')
-- is 'ınf' (dotless i), and 'INF' was called "a number" instead of "a finite number".

CREATE OR REPLACE FUNCTION sync_bool(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE t WHEN 'true' THEN true WHEN 'false' THEN false
           ELSE CASE lower(btrim(t, E' \t\n\r'))
                WHEN 'true' THEN true WHEN 't' THEN true WHEN 'yes' THEN true
                WHEN 'y' THEN true WHEN 'on' THEN true WHEN '1' THEN true WHEN 'x' THEN true
                WHEN 'false' THEN false WHEN 'f' THEN false WHEN 'no' THEN false
                WHEN 'n' THEN false WHEN 'off' THEN false WHEN '0' THEN false
                WHEN '' THEN false END END
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
