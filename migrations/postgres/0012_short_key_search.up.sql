-- An index for the key search's needles of one or two characters, which pg_trgm cannot look up:
-- without it a rare one (`zq`) reads every key. A GIN index on every substring of one and of two
-- characters of a key's name and of its owner id, ASCII letters folded as the search folds them (the
-- `translate` of `Dialect::ascii_lower`): a needle finds its candidates as one element, and the search
-- applies its own predicate to them. An expression index: no column, no trigger, nothing to keep in
-- step by hand.
--
-- The function names only pg_catalog's functions, so it means the same whatever the search path
-- (a restore runs with an empty one). Its cost is set high (it builds an array of ~60 substrings), so
-- that the planner reads a needle's candidates from the index rather than computing it for every key
-- of a scan. The store counts them only for a needle its statistics do not show common (a common one
-- walks the keys newest first): a GIN index reads all of a needle's keys before the first.
CREATE FUNCTION api_keys_search_grams(name text, owner_id text) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE COST 1000 AS $$
    SELECT coalesce(array_agg(substr(t, i, 1)) || array_agg(substr(t, i, 2)), '{}')
    FROM unnest(ARRAY[translate(name, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'),
                      translate(owner_id, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')]) AS s(t),
         generate_series(1, length(t)) AS i
$$;

CREATE INDEX api_keys_search_grams ON api_keys USING gin (api_keys_search_grams(name, owner_id));

-- Statistics for the planner, on the keys and on this index's expression: without them, after a
-- large import, a rare search is planned as a scan of every key.
ANALYZE api_keys;
