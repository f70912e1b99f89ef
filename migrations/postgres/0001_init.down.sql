-- Reverts 0001_init: drops everything it created, dependants first.
DROP VIEW IF EXISTS v_api_keys;
DROP TABLE IF EXISTS audit_log;
DROP TABLE IF EXISTS api_keys;
DROP TABLE IF EXISTS organizations;
