-- Reverts 0002_import. Imported keys stay; they simply stop being found by their legacy form.
DROP VIEW v_api_keys;
DROP INDEX IF EXISTS api_keys_legacy;
ALTER TABLE api_keys DROP COLUMN legacy;
CREATE VIEW v_api_keys AS
SELECT
    k.*,
    CASE
        WHEN k.revoked_at IS NOT NULL AND k.revoked_at <= now() THEN 'revoked'
        WHEN NOT k.is_active THEN 'disabled'
        WHEN k.expires_at IS NOT NULL AND k.expires_at <= now() THEN 'expired'
        ELSE 'active'
    END AS status
FROM api_keys AS k;
