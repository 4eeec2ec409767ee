-- sync-odata: digests of the raw pages a dataset version was read from, so that a feed whose
-- pages are byte for byte those of the active version is a noop without parsing a row.
-- {"key": <protocol, mapping and first URLs>, "pages": {"stops": "<32 hex per page>", ...}};
-- NULL for restores and for versions with rejected rows (they get the full check).
ALTER TABLE datasets ADD COLUMN feed_digests jsonb;
