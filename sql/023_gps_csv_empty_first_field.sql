-- gps_csv_fields (018) split a quoted line with its pattern anchored at ^ or a delimiter: an
-- empty first field was a match of no length, after which the search went on one character
-- further, past the delimiter that ended it, so the field was lost and every column after it
-- moved one to the left. ',"Bus 1, north",2024-01-06T10:00:00Z,60.17,24.93' was read as the
-- device 2024-01-06T10:00:00Z at epoch 60.17 s, --strict too. Every field is now matched with
-- the delimiter before it (one is put in front of the line), so no match is empty.
CREATE OR REPLACE FUNCTION gps_csv_fields(line text, delim text) RETURNS text[]
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT array_agg(CASE WHEN m[1] ~ '^".*"$' AND length(m[1]) >= 2
                          THEN replace(substr(m[1], 2, length(m[1]) - 2), '""', '"')
                          ELSE m[1] END ORDER BY n)
    FROM regexp_matches(delim || line, delim || '("(?:[^"]|"")*"|[^' || delim || ']*)', 'g')
         WITH ORDINALITY AS r(m, n)
$$;
