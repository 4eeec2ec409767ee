-- sync-odata: the row index of the active dataset version. For every row of stops, routes and
-- flights, its key and the first 8 bytes of the SHA-256 of its canonical line, in feed order,
-- in chunks of at most 65,536 keys (so neither side ever holds a whole index as one value).
-- A sync compares the feed with it in the row worker and then writes only the new, changed and
-- vanished rows instead of staging and comparing every row in SQL. Only the active version
-- keeps one; a version without one (made before this migration) gets the full comparison.
CREATE TABLE dataset_row_index (
    version  text    NOT NULL REFERENCES datasets (version) ON DELETE CASCADE,
    entity   text    NOT NULL CHECK (entity IN ('stops', 'routes', 'flights')),
    chunk    integer NOT NULL CHECK (chunk >= 0),  -- 0, 1, ... in feed order
    format   integer NOT NULL,  -- the canonical format of the lines the digests were taken of
    rows     integer NOT NULL,  -- keys in this chunk
    keys     bytea   NOT NULL,  -- the canonical keys (COPY text form), each followed by \n
    digests  bytea   NOT NULL,  -- 8 bytes per key, in the same order
    PRIMARY KEY (version, entity, chunk)
);
-- Digests do not compress and keys barely do: spare the rows pglz's effort.
ALTER TABLE dataset_row_index ALTER COLUMN keys SET STORAGE EXTERNAL,
                              ALTER COLUMN digests SET STORAGE EXTERNAL;
