-- Reverts 0004_lifecycle. Audit rows stay; they lose their hashes.
DROP TABLE IF EXISTS webhook_attempts;
DROP TABLE IF EXISTS webhook_deliveries;
DROP TABLE IF EXISTS webhook_endpoints;
DROP TABLE IF EXISTS events;
DROP TABLE IF EXISTS audit_chain;
ALTER TABLE audit_log DROP COLUMN row_hash;
ALTER TABLE audit_log DROP COLUMN prev_hash;
DROP VIEW v_api_keys;
ALTER TABLE api_keys DROP COLUMN lineage_id;
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
