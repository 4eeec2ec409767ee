-- sync-odata writes only the rows that changed (see 008_row_index.sql). With room left on each
-- page, such an update of a column no index names (a stop's name, a route's mode, a flight's
-- days) is a HOT update: no new index entries, no index bloat for the routing backend's reads.
-- Applies to pages written from now on; existing full pages get the room when rewritten.
ALTER TABLE stops SET (fillfactor = 90);
ALTER TABLE routes SET (fillfactor = 90);
ALTER TABLE flights SET (fillfactor = 90);
