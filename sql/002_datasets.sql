-- sync-odata's output: dataset versions and the read model the routing backend reads.
-- The read-model table and column names are a contract with the backend: do not rename.
CREATE TABLE datasets (
    version     text PRIMARY KEY,                 -- 'ds-v<seq>'
    seq         integer     NOT NULL UNIQUE,
    hash        text        NOT NULL,             -- canonical SHA-256 of the whole dataset
    set_hashes  jsonb       NOT NULL DEFAULT '{}'::jsonb,
    counts      jsonb       NOT NULL DEFAULT '{}'::jsonb,   -- rows per entity set
    diff        jsonb       NOT NULL DEFAULT '{}'::jsonb,   -- per set: inserted/updated/deleted
    stats       jsonb       NOT NULL DEFAULT '{}'::jsonb,   -- later stages add their statistics
    source      text        NOT NULL DEFAULT 'sync',        -- 'sync' | 'restore'
    restored_from text,
    backup_prefix text      NOT NULL,             -- e.g. 'datasets/ds-v3/'
    run_id      uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    active      boolean     NOT NULL DEFAULT false
);
-- At most one active dataset.
CREATE UNIQUE INDEX datasets_one_active_idx ON datasets (active) WHERE active;

CREATE TABLE stops (
    id          text PRIMARY KEY,
    name        text,
    latitude    double precision NOT NULL CHECK (latitude BETWEEN -90 AND 90),
    longitude   double precision NOT NULL CHECK (longitude BETWEEN -180 AND 180),
    is_airport  boolean     NOT NULL DEFAULT false,
    city        text
);
CREATE INDEX stops_city_idx ON stops (city);

CREATE TABLE routes (
    id           text PRIMARY KEY,
    from_stop_id text NOT NULL REFERENCES stops (id) DEFERRABLE INITIALLY DEFERRED,
    to_stop_id   text NOT NULL REFERENCES stops (id) DEFERRABLE INITIALLY DEFERRED,
    mode         text,
    distance_km  double precision
);
CREATE INDEX routes_from_idx ON routes (from_stop_id);
CREATE INDEX routes_to_idx ON routes (to_stop_id);

CREATE TABLE flights (
    id            text PRIMARY KEY,
    route_id      text NOT NULL REFERENCES routes (id) DEFERRABLE INITIALLY DEFERRED,
    departure     time NOT NULL,
    arrival       time NOT NULL,
    days_of_week  text NOT NULL CHECK (days_of_week ~ '^[1-7]{1,7}$')
);
CREATE INDEX flights_route_idx ON flights (route_id);
