-- Reverts 0008: the key search reads every key again.
DROP TRIGGER IF EXISTS api_keys_search_update;
DROP TRIGGER IF EXISTS api_keys_search_delete;
DROP TRIGGER IF EXISTS api_keys_search_insert;
DROP TABLE IF EXISTS api_keys_search;
DROP INDEX IF EXISTS api_keys_key_hint;
