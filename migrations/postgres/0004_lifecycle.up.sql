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
    created_at      timestamptz NOT NULL,
    dispatched_at   timestamptz
);
CREATE INDEX events_organization_id_id ON events (organization_id, id);
CREATE INDEX events_undispatched ON events (id) WHERE dispatched_at IS NULL;

-- SECURITY: the signing secret must be readable to sign deliveries, so it is stored as is.
CREATE TABLE webhook_endpoints (
    id              uuid        PRIMARY KEY,
    organization_id uuid        NOT NULL REFERENCES organizations (id),
    url             text        NOT NULL,
    events          text[]      NOT NULL DEFAULT '{}',
    is_active       boolean     NOT NULL DEFAULT true,
    secret          text        NOT NULL,
    description     text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX webhook_endpoints_organization_id ON webhook_endpoints (organization_id);

CREATE TABLE webhook_deliveries (
    id               uuid        PRIMARY KEY,
    endpoint_id      uuid        NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id         uuid        NOT NULL,
    event            text        NOT NULL,
    payload          jsonb       NOT NULL,
    status           text        NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts         bigint      NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    give_up_at       timestamptz NOT NULL,
    last_status_code bigint,
    last_error       text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    CONSTRAINT webhook_deliveries_endpoint_event_unique UNIQUE (endpoint_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE INDEX webhook_deliveries_endpoint_id_id ON webhook_deliveries (endpoint_id, id);

CREATE TABLE webhook_attempts (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  uuid        NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at timestamptz NOT NULL,
    status_code  bigint,
    latency_ms   bigint      NOT NULL,
    error        text
);
CREATE INDEX webhook_attempts_delivery_id ON webhook_attempts (delivery_id, id);

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
