-- build-graph's output: one row per published graph version (the adjacency itself lives in Redis
-- under <prefix>:graph:<version>:* and as an export in S3 under graphs/<version>/).
-- No foreign keys to datasets/virtual_generations on purpose: those stages may prune old rows,
-- and a graph version's record must outlive them (it documents what was served).
CREATE SEQUENCE graph_version_seq;

CREATE TABLE graph_versions (
    version               text PRIMARY KEY,            -- 'graph-v<seq>'
    seq                   bigint      NOT NULL UNIQUE,
    dataset_version       text        NOT NULL,
    virtual_generation_id bigint,                      -- the virtual_generations.id it was built from
    nodes                 integer     NOT NULL CHECK (nodes > 0),
    edges                 bigint      NOT NULL CHECK (edges >= 0),
    build_ms              integer     NOT NULL,
    checksum              text        NOT NULL,        -- sha256 of the uncompressed export
    export_key            text        NOT NULL,        -- S3 key of the gzip'd JSON-lines export
    warnings              jsonb       NOT NULL DEFAULT '{}'::jsonb,  -- components, unreachable_real_stops
    run_id                uuid,
    created_at            timestamptz NOT NULL DEFAULT now(),
    activated_at          timestamptz,
    active                boolean     NOT NULL DEFAULT false
);
-- At most one active graph version.
CREATE UNIQUE INDEX graph_versions_one_active_idx ON graph_versions (active) WHERE active;
CREATE INDEX graph_versions_generation_idx
    ON graph_versions (dataset_version, virtual_generation_id, seq DESC);
