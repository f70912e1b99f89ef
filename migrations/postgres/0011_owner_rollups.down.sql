-- Reverts 0011_owner_rollups.
DROP TRIGGER IF EXISTS api_keys_owner_id_fixed ON api_keys;
DROP FUNCTION IF EXISTS api_keys_owner_id_fixed();
DROP TABLE IF EXISTS usage_owner_daily;
