-- Key lifecycle (issue 6): rotation lineage, the tamper-evident audit chain, the event outbox and
-- webhooks.
--
-- lineage_id: the first key of a rotation chain; rotated keys share their rate-limit and quota counters
-- under it. NULL: the key's own id (a key never rotated).
ALTER TABLE api_keys ADD COLUMN lineage_id TEXT;

-- Each audit row stores the hash of the row before it and of its own canonical content (see
-- keyward_core::audit_chain). Rows written before this migration have neither and are reported as
-- "unchained" by `keyward audit verify`.
ALTER TABLE audit_log ADD COLUMN prev_hash TEXT;
ALTER TABLE audit_log ADD COLUMN row_hash TEXT;

-- The chain head: one row, updated in the transaction of every audit append, so deleting rows at the
-- end of the log is detected too. Appends are serialized by SQLite's single writer.
CREATE TABLE audit_chain (
    id        INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    last_id   INTEGER,
    last_hash TEXT    NOT NULL
);
INSERT INTO audit_chain (id, last_id, last_hash) VALUES (1, NULL, '0000000000000000000000000000000000000000000000000000000000000000');

-- The event outbox: written in the same transaction as the change it reports; webhook deliveries are
-- made from it. dedup_key makes an event happen once (key.expiring: once per key per threshold).
CREATE TABLE events (
    id              TEXT PRIMARY KEY NOT NULL,
    event           TEXT NOT NULL,
    organization_id TEXT,
    key_id          TEXT,
    dedup_key       TEXT UNIQUE,
    payload         TEXT NOT NULL CHECK (json_valid(payload)),
    created_at      TEXT NOT NULL,
    -- Set once the webhook worker has made the event's deliveries (one per subscribed endpoint).
    dispatched_at   TEXT
);
CREATE INDEX events_organization_id_id ON events (organization_id, id);
CREATE INDEX events_undispatched ON events (id) WHERE dispatched_at IS NULL;

-- Webhook endpoints belong to an organization and receive its events. SECURITY: the signing secret
-- must be readable to sign deliveries, so it is stored as is (shown once over the API).
CREATE TABLE webhook_endpoints (
    id              TEXT    PRIMARY KEY NOT NULL,
    organization_id TEXT    NOT NULL REFERENCES organizations (id),
    url             TEXT    NOT NULL,
    -- JSON array of event names; empty: every event.
    events          TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(events)),
    is_active       INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    secret          TEXT    NOT NULL,
    description     TEXT,
    created_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL
);
CREATE INDEX webhook_endpoints_organization_id ON webhook_endpoints (organization_id);

-- One delivery per event and endpoint, retried with backoff until give_up_at.
CREATE TABLE webhook_deliveries (
    id               TEXT    PRIMARY KEY NOT NULL,
    endpoint_id      TEXT    NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id         TEXT    NOT NULL,
    event            TEXT    NOT NULL,
    -- The JSON body that is POSTed.
    payload          TEXT    NOT NULL CHECK (json_valid(payload)),
    status           TEXT    NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT,
    give_up_at       TEXT    NOT NULL,
    last_status_code INTEGER,
    last_error       TEXT,
    created_at       TEXT    NOT NULL,
    updated_at       TEXT    NOT NULL,
    UNIQUE (endpoint_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE INDEX webhook_deliveries_endpoint_id_id ON webhook_deliveries (endpoint_id, id);

-- Every attempt, with its outcome and latency.
CREATE TABLE webhook_attempts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id  TEXT    NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at TEXT    NOT NULL,
    status_code  INTEGER,
    latency_ms   INTEGER NOT NULL,
    error        TEXT
);
CREATE INDEX webhook_attempts_delivery_id ON webhook_attempts (delivery_id, id);
