-- Indexes for the key search (`KeyFilter::search`: a substring of the name or the owner id, ASCII
-- letters folded, or the hint exactly), so that a rare needle is found without reading every key.
--
-- The hint: an equality, by its own index.
CREATE INDEX api_keys_key_hint ON api_keys (key_hint);

-- Names and owner ids: pg_trgm GIN indexes on exactly the expressions the search's LIKE reads (ASCII
-- letters folded by `translate`), so the planner can use them for the candidates.
--
-- pg_trgm ships with PostgreSQL and is a trusted extension (PostgreSQL 13+: a user with CREATE on the
-- database may create it). Where it cannot be created (no contrib package, no privilege) the
-- migration still succeeds without these two indexes: the search gives the same answers, reading
-- every key for a rare needle as before. Creating the extension later by hand and running
-- `CREATE INDEX` as below adds them. The extension goes where CREATE EXTENSION puts it (the first
-- schema of the search path) or stays where it already is; the operator class is named with that
-- schema, so the indexes do not depend on the search path.
DO $$
DECLARE
    trgm_schema name;
BEGIN
    BEGIN
        CREATE EXTENSION IF NOT EXISTS pg_trgm;
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'pg_trgm not created (%): key search will read every key for rare needles', SQLERRM;
    END;
    SELECT n.nspname INTO trgm_schema
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'pg_trgm';
    IF trgm_schema IS NOT NULL THEN
        EXECUTE format(
            'CREATE INDEX api_keys_name_trgm ON api_keys USING gin '
            '((translate(name, ''ABCDEFGHIJKLMNOPQRSTUVWXYZ'', ''abcdefghijklmnopqrstuvwxyz'')) %I.gin_trgm_ops)',
            trgm_schema);
        EXECUTE format(
            'CREATE INDEX api_keys_owner_id_trgm ON api_keys USING gin '
            '((translate(owner_id, ''ABCDEFGHIJKLMNOPQRSTUVWXYZ'', ''abcdefghijklmnopqrstuvwxyz'')) %I.gin_trgm_ops)',
            trgm_schema);
    END IF;
END
$$;
