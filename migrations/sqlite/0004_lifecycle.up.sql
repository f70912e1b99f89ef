-- Key lifecycle (issue 6): rotation lineage, the tamper-evident audit chain, and the event outbox.
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
    created_at      TEXT NOT NULL
);
CREATE INDEX events_organization_id_id ON events (organization_id, id);
