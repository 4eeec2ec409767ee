-- gen-virtual stores the service of its flights once per mode instead of once per route.
-- Every virtual flight of a generation had the same window, headway and days (the [virtual]
-- settings): 4.6 M identical rows at 1 M virtual stops. virtual_flights becomes a view that
-- gives each route of a mode with a frequency row its flight, with the old table's columns,
-- types and ids ('VF:' + the route id after 'VR:').

-- Like the entity tables, this holds the newest generation only (gen-virtual replaces it in
-- the same transaction); generation_id says which one.
CREATE TABLE virtual_frequencies (
    generation_id   bigint  NOT NULL,           -- virtual_generations.id
    mode            text    NOT NULL,           -- the virtual_routes.mode it serves
    start_time      time    NOT NULL,
    end_time        time    NOT NULL,
    headway_s       integer NOT NULL CHECK (headway_s > 0),
    days_of_week    text    NOT NULL DEFAULT '1234567',
    dataset_version text    NOT NULL,
    PRIMARY KEY (generation_id, mode)
);

-- An operator's view on the old table would be dropped with it: stop, naming it, instead.
DO $$
DECLARE
    views text;
BEGIN
    SELECT string_agg(DISTINCT r.ev_class::regclass::text, ', ') INTO views
    FROM pg_depend d
    JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
    WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = 'virtual_flights'::regclass
      AND r.ev_class <> 'virtual_flights'::regclass;
    IF views IS NOT NULL THEN
        RAISE EXCEPTION 'migration 012 turns the table virtual_flights into a view, and views '
            'read it: %; drop them, migrate, then create them again', views;
    END IF;
END
$$;

-- The existing generation keeps its flights: its one service per mode moves into the new
-- table. Flights that differed within a mode (never written by gen-virtual) would violate the
-- primary key and stop the migration instead of being lost.
ALTER TABLE virtual_flights RENAME TO virtual_flights_before_012;
INSERT INTO virtual_frequencies
    (generation_id, mode, start_time, end_time, headway_s, days_of_week, dataset_version)
SELECT DISTINCT coalesce((SELECT max(id) FROM virtual_generations), 0), r.mode,
       f.start_time, f.end_time, f.headway_s, f.days_of_week, f.dataset_version
FROM virtual_flights_before_012 f
JOIN virtual_routes r ON r.id = f.route_id;

CREATE VIEW virtual_flights AS
SELECT ('VF:' || substr(r.id, 4))::text AS id,
       r.id AS route_id,
       f.start_time,
       f.end_time,
       f.headway_s,
       f.days_of_week,
       r.dataset_version
FROM virtual_routes r
JOIN virtual_frequencies f ON f.mode = r.mode;
COMMENT ON VIEW virtual_flights IS
    'One frequency-based flight per virtual route whose mode has a virtual_frequencies row';

-- A role that could read the old table (a routing backend's) can read the view.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                    ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS grantee,
               a.privilege_type, a.is_grantable
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = 'virtual_flights_before_012'::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON virtual_flights TO %s%s', g.privilege_type, g.grantee,
                       CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$$;

DROP TABLE virtual_flights_before_012;
