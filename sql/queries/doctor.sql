-- Queries of `pipeline doctor` (pipeline_cli/doctor.py). Read-only: doctor writes nothing.

-- name: unwritable_tables
-- The pipeline's tables (every table in the schema of schema_migrations) that the role cannot
-- insert into, update and delete from, and the virtual tables it cannot TRUNCATE (gen-virtual
-- replaces their rows so). has_table_privilege checks without writing a row.
SELECT c.oid::regclass::text AS name
FROM pg_class c
WHERE c.relnamespace = (SELECT relnamespace FROM pg_class
                        WHERE oid = to_regclass('schema_migrations'))
  AND c.relkind IN ('r', 'p')
  AND NOT (has_table_privilege(c.oid, 'INSERT') AND has_table_privilege(c.oid, 'UPDATE')
           AND has_table_privilege(c.oid, 'DELETE')
           AND (c.relname NOT IN ('virtual_stops', 'virtual_routes', 'virtual_frequencies')
                OR has_table_privilege(c.oid, 'TRUNCATE')))
ORDER BY 1;

-- name: stops_centroid
-- Where OSRM is asked /nearest when no --point is given.
SELECT avg(longitude) AS lon, avg(latitude) AS lat FROM stops;
