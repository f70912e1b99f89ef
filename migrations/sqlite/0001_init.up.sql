-- Keyward's first schema: organizations, API keys, the audit log and the derived key status.
--
-- Timestamps are TEXT in one fixed-width UTC form, `YYYY-MM-DDTHH:MM:SS.ffffffZ`, so comparing the
-- strings compares the times and every range filter can use an index. Ids are hyphenated lowercase
-- UUIDv7 strings: they sort by creation, so `ORDER BY id DESC` lists newest first. Booleans are 0/1.

CREATE TABLE organizations (
    id                    TEXT    PRIMARY KEY NOT NULL,
    name                  TEXT    NOT NULL,
    slug                  TEXT    NOT NULL UNIQUE,
    email                 TEXT,
    plan                  TEXT    NOT NULL,
    is_active             INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    -- NULL: the plan's value.
    monthly_request_limit INTEGER,
    rate_limit_per_minute INTEGER,
    rate_limit_per_hour   INTEGER,
    rate_limit_per_day    INTEGER,
    -- NULL: no limit.
    max_api_keys          INTEGER,
    created_at            TEXT    NOT NULL,
    updated_at            TEXT    NOT NULL
);

CREATE TABLE api_keys (
    id                    TEXT    PRIMARY KEY NOT NULL,
    organization_id       TEXT    NOT NULL REFERENCES organizations (id),
    owner_id              TEXT,
    name                  TEXT    NOT NULL,
    description           TEXT,
    environment           TEXT    NOT NULL CHECK (environment IN ('live', 'test')),
    prefix                TEXT    NOT NULL,
    key_hint              TEXT    NOT NULL,
    -- SECURITY: only the hash of a key is stored; the unique index is the lookup on every verify.
    key_hash              BLOB    NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    hash_algorithm        TEXT    NOT NULL CHECK (hash_algorithm IN ('sha256', 'hmac_sha256')),
    -- JSON array of scope strings.
    scopes                TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(scopes)),
    -- JSON array of canonical CIDR strings; empty: every address.
    allowed_ips           TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(allowed_ips)),
    expires_at            TEXT,
    is_active             INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    -- May lie in the future: a rotated key keeps working until its grace period ends.
    revoked_at            TEXT,
    revoke_reason         TEXT,
    -- NULL: the organization's plan and limits.
    plan                  TEXT,
    rate_limit_per_minute INTEGER,
    rate_limit_per_hour   INTEGER,
    rate_limit_per_day    INTEGER,
    monthly_request_limit INTEGER,
    -- JSON object (email, company, ...).
    metadata              TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
    total_requests        INTEGER NOT NULL DEFAULT 0,
    last_used_at          TEXT,
    last_used_ip          TEXT,
    rotated_from          TEXT,
    replaced_by           TEXT,
    created_by            TEXT,
    created_at            TEXT    NOT NULL,
    updated_at            TEXT    NOT NULL
);

-- Listing an organization's keys newest first, and counting them against max_api_keys.
CREATE INDEX api_keys_organization_id_id ON api_keys (organization_id, id);
CREATE INDEX api_keys_owner_id ON api_keys (owner_id);
-- The expiry sweeper and "expiring in N days".
CREATE INDEX api_keys_expires_at ON api_keys (expires_at);

-- No foreign keys: the audit trail outlives what it describes.
CREATE TABLE audit_log (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    action          TEXT    NOT NULL,
    key_id          TEXT,
    organization_id TEXT,
    actor           TEXT    NOT NULL,
    actor_ip        TEXT,
    -- JSON: {"after": {...}} on create, {"before": {...}, "after": {...}} of what changed otherwise.
    details         TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(details)),
    created_at      TEXT    NOT NULL
);

CREATE INDEX audit_log_created_at ON audit_log (created_at);
CREATE INDEX audit_log_key_id ON audit_log (key_id);
-- Every non-admin audit listing is scoped to one organization, newest first.
CREATE INDEX audit_log_organization_id_id ON audit_log (organization_id, id);

-- Status derived at query time, with the precedence of keyward_core::KeyState::status: revoked, then
-- disabled, then expired. `now` here has millisecond precision; the stored microseconds only make a
-- timestamp within the current millisecond count as reached, never a past one as not.
CREATE VIEW v_api_keys AS
SELECT
    k.*,
    CASE
        WHEN k.revoked_at IS NOT NULL AND k.revoked_at <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now') THEN 'revoked'
        WHEN k.is_active = 0 THEN 'disabled'
        WHEN k.expires_at IS NOT NULL AND k.expires_at <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now') THEN 'expired'
        ELSE 'active'
    END AS status
FROM api_keys AS k;
