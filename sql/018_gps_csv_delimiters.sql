-- ingest-gps reads CSV files separated by commas, semicolons or tabs: the fields of one line
-- with double quotes, split at `delim` (one of those three characters; none of them means
-- anything in a regular expression). Quoted fields may hold the delimiter and doubled quotes.
CREATE FUNCTION gps_csv_fields(line text, delim text) RETURNS text[]
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT array_agg(CASE WHEN m[1] ~ '^".*"$' AND length(m[1]) >= 2
                          THEN replace(substr(m[1], 2, length(m[1]) - 2), '""', '"')
                          ELSE m[1] END ORDER BY n)
    FROM regexp_matches(line, '(?:^|' || delim || ')("(?:[^"]|"")*"|[^' || delim || ']*)',
                        'g') WITH ORDINALITY AS r(m, n)
$$;

DROP FUNCTION gps_csv_fields(text);
