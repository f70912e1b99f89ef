-- Reverts 0009.
DROP INDEX IF EXISTS audit_log_organization_id_action_id;
DROP INDEX IF EXISTS audit_log_organization_id_actor_id;
DROP INDEX IF EXISTS audit_log_action_id;
