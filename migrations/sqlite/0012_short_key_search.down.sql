-- Reverts 0012: a needle of one or two characters reads every key again when it is rare.
DROP TRIGGER IF EXISTS api_keys_grams_update;
DROP TRIGGER IF EXISTS api_keys_grams_delete;
DROP TRIGGER IF EXISTS api_keys_grams_insert;
DROP VIEW IF EXISTS api_keys_grams_of;
DROP TABLE IF EXISTS api_keys_grams;
