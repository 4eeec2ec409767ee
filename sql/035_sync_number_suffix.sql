-- A number's V2 literal suffix (1.5d, 2.5M, 3f: Edm.Double, Edm.Decimal, Edm.Single) was
-- taken off as any run of d, m and f letters at its end, after blanks too, so a value with a
-- unit lost the unit in silence: a distanceKm of "500 m" (metres) was read as 500 km, "10mm"
-- as 10, "12 d" as 12. The suffix is now one letter right after the number (a digit or its
-- point); anything else after it is refused, named like any other refused number. The rule
-- refuses values it read before, so the stage's CHECKS says so too: stored page digests no
-- longer vouch for a feed read with the old rule. sync_number_slow is replaced whole, as in
-- 021; only the suffix differs.

CREATE OR REPLACE FUNCTION sync_number_slow(t text) RETURNS double precision
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    x double precision;
BEGIN
    IF strpos(lower(t), 'x') > 0 THEN  -- hexadecimal, which the float input would read
        RETURN NULL;
    END IF;
    t := btrim(t, E' \t\n\r');
    IF t ~ '[0-9.][dDmMfF]$' THEN  -- one suffix, right after the number
        t := left(t, -1);
    END IF;
    x := t::double precision;
    IF x IN ('NaN', 'Infinity', '-Infinity') THEN
        RETURN NULL;
    END IF;
    RETURN x + 0.0;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END
$$;
