-- Reverts 0011_owner_rollups.
DROP INDEX api_keys_owner_id;
CREATE INDEX api_keys_owner_id ON api_keys (owner_id);
DROP TRIGGER IF EXISTS api_keys_owner_id_fixed;
DROP TABLE IF EXISTS usage_owner_daily;
