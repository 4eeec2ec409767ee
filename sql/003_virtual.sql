-- gen-virtual's output: virtual stops, routes and frequency-based flights for one dataset.
-- The tables hold the entities of the newest generation; virtual_generations records each
-- generation with the settings that produced it (build-graph compares ids to decide to build).
CREATE TABLE virtual_generations (
    id              bigserial PRIMARY KEY,
    dataset_version text        NOT NULL REFERENCES datasets (version),
    settings        jsonb       NOT NULL,
    counts          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    unreached_stops jsonb       NOT NULL DEFAULT '[]'::jsonb,  -- real stops no virtual route reaches
    backup_prefix   text,                      -- 'datasets/<version>/virtual/gen-<id>/'
    duration_ms     bigint,
    run_id          uuid,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX virtual_generations_dataset_idx ON virtual_generations (dataset_version, id DESC);

CREATE TABLE virtual_stops (
    id              text PRIMARY KEY,          -- derived from kind and grid cell, e.g. 'V:MAIN:123:-45'
    latitude        double precision NOT NULL CHECK (latitude BETWEEN -90 AND 90),
    longitude       double precision NOT NULL CHECK (longitude BETWEEN -180 AND 180),
    kind            text NOT NULL CHECK (kind IN ('MAIN_GRID', 'CITY_GRID', 'AIRPORT_GRID')),
    anchor_id       text,                      -- the city or airport a dense grid belongs to
    dataset_version text NOT NULL
);

CREATE TABLE virtual_routes (
    id              text PRIMARY KEY,
    from_stop_id    text NOT NULL,             -- a virtual or a real stop id
    to_stop_id      text NOT NULL,
    mode            text NOT NULL,
    distance_km     double precision NOT NULL CHECK (distance_km >= 0),
    travel_time_s   double precision NOT NULL CHECK (travel_time_s >= 0),
    dataset_version text NOT NULL
);
CREATE INDEX virtual_routes_from_idx ON virtual_routes (from_stop_id);

-- Like GTFS frequencies.txt: one row per service window, not one per departure.
-- route_id names a virtual_routes row. No FOREIGN KEY on purpose: its per-row check made COPY
-- of millions of flights 3x slower; gen-virtual writes both tables in one transaction and
-- checks with one anti-join before committing that no flight names a missing route.
CREATE TABLE virtual_flights (
    id              text PRIMARY KEY,
    route_id        text NOT NULL,
    start_time      time NOT NULL,
    end_time        time NOT NULL,
    headway_s       integer NOT NULL CHECK (headway_s > 0),
    days_of_week    text NOT NULL DEFAULT '1234567',
    dataset_version text NOT NULL
);
CREATE INDEX virtual_flights_route_idx ON virtual_flights (route_id);
