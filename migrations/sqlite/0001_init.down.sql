-- Reverts 0001_init: drops everything it created, dependants first. (SQLite keeps its internal
-- sqlite_sequence table, created for audit_log's AUTOINCREMENT; it cannot be dropped and is harmless.)
DROP VIEW IF EXISTS v_api_keys;
DROP TABLE IF EXISTS audit_log;
DROP TABLE IF EXISTS api_keys;
DROP TABLE IF EXISTS organizations;
