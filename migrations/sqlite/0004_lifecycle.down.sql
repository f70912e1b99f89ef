-- Reverts 0004_lifecycle. Audit rows stay; they lose their hashes.
DROP TABLE IF EXISTS webhook_attempts;
DROP TABLE IF EXISTS webhook_deliveries;
DROP TABLE IF EXISTS webhook_endpoints;
DROP INDEX IF EXISTS events_undispatched;
DROP INDEX IF EXISTS events_organization_id_id;
DROP TABLE IF EXISTS events;
DROP TABLE IF EXISTS audit_chain;
ALTER TABLE audit_log DROP COLUMN row_hash;
ALTER TABLE audit_log DROP COLUMN prev_hash;
ALTER TABLE api_keys DROP COLUMN lineage_id;
