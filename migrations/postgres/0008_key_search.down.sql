-- Reverts 0008: the key search reads every key again. The pg_trgm extension stays: it belongs to the
-- database, and something else may use it.
DROP INDEX IF EXISTS api_keys_owner_id_trgm;
DROP INDEX IF EXISTS api_keys_name_trgm;
DROP INDEX IF EXISTS api_keys_key_hint;
