-- The audit log's filters by action and by actor walk an index of their own, newest first, instead
-- of every row of the organization (or of the whole log, for an admin). `audit_log_actor` (actor, id)
-- already serves an admin's actor filter.
CREATE INDEX audit_log_organization_id_action_id ON audit_log (organization_id, action, id);
CREATE INDEX audit_log_organization_id_actor_id ON audit_log (organization_id, actor, id);
CREATE INDEX audit_log_action_id ON audit_log (action, id);
