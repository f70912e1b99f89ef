-- Keys imported from another system (`keyward import`, `POST /v1/keys/import`); as in
-- migrations/sqlite/0002_import.
--
-- `legacy` marks a key that is not in Keyward's format, or whose plaintext was never seen (imported by
-- its SHA-256): verification finds such a key by the plain hash of whatever string the customer sends.
-- Servers ask "is there any legacy key?" once at start and then now and then (the partial index makes
-- that a lookup of one index entry), so that while there is none a string that is not a Keyward key is
-- refused without a query.
ALTER TABLE api_keys ADD COLUMN legacy boolean NOT NULL DEFAULT false;
CREATE INDEX api_keys_legacy ON api_keys (id) WHERE legacy;

-- PostgreSQL expands `k.*` when a view is created: recreate it so it has the new column.
DROP VIEW v_api_keys;
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
