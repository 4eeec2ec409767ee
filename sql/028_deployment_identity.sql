-- The identity of this database as a deployment. build-graph claims its Redis prefix with it
-- (the key <prefix>:graph:owner) and refuses a prefix another database claimed: two
-- installations with one Redis URL and the default prefix (staging next to production, two
-- cities) deleted each other's graph versions as orphans and switched each other's pointer.
--
-- One row, made here once: a random UUID, so two databases differ, also on one server. A copy
-- of the database (pg_dump and restore, CREATE DATABASE ... TEMPLATE, a promoted replica) keeps
-- it and owns the same prefix, which is what a restore means; a copy meant to be another
-- deployment gets its own with UPDATE deployment SET id = gen_random_uuid()
-- (docs/build-graph.md "One prefix, one database").
CREATE TABLE deployment (
    one_row    boolean PRIMARY KEY DEFAULT true CHECK (one_row),
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO deployment DEFAULT VALUES;

-- A role that may write graph_versions (the pipeline's own role, when another role owns the
-- tables and runs the migrations) gets the same privileges here: build-graph reads the row,
-- and `pipeline doctor` expects the role to be able to write every pipeline table.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                         ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS grantee,
                    a.privilege_type, a.is_grantable
             FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = 'graph_versions'::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON deployment TO %s%s', g.privilege_type, g.grantee,
                       CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$$;
