-- Reverts 0002_import. Imported keys stay; they simply stop being found by their legacy form.
DROP INDEX IF EXISTS api_keys_legacy;
ALTER TABLE api_keys DROP COLUMN legacy;
