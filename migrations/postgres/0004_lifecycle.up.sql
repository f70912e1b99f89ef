-- Key lifecycle (issue 6), as in migrations/sqlite/0004_lifecycle: rotation lineage, the tamper-evident
-- audit chain, and the event outbox.
ALTER TABLE api_keys ADD COLUMN lineage_id uuid;

ALTER TABLE audit_log ADD COLUMN prev_hash text;
ALTER TABLE audit_log ADD COLUMN row_hash text;

-- The chain head. Every audit append locks this row (`FOR UPDATE`), so appends from every node are
-- serialized per chain (per schema), and ids are assigned in chain order.
CREATE TABLE audit_chain (
    id        integer PRIMARY KEY CHECK (id = 1),
    last_id   bigint,
    last_hash text NOT NULL
);
INSERT INTO audit_chain (id, last_id, last_hash) VALUES (1, NULL, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TABLE events (
    id              uuid        PRIMARY KEY,
    event           text        NOT NULL,
    organization_id uuid,
    key_id          uuid,
    dedup_key       text        CONSTRAINT events_dedup_key_unique UNIQUE,
    payload         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL
);
CREATE INDEX events_organization_id_id ON events (organization_id, id);

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
