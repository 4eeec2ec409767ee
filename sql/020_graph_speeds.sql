-- The route speeds a graph was weighed with (the built-in speeds with [virtual] speeds_kmh
-- merged over them, by canonical mode): build-graph builds again when they differ from the
-- settings', where a graph weighed with the old speeds stayed active in silence. NULL for
-- graphs built before this migration: their speeds are unknown, and they are not rebuilt for
-- that alone.
ALTER TABLE graph_versions ADD COLUMN speeds_kmh jsonb;
