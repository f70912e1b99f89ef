-- Keyward's first schema on PostgreSQL: organizations, API keys, the audit log and the derived key
-- status. The same version, tables and columns as migrations/sqlite/0001_init, in PostgreSQL's own
-- types: uuid ids (UUIDv7, so `ORDER BY id DESC` lists newest first), timestamptz (microseconds, like
-- SQLite's fixed-width text), bytea hashes, text[] lists, jsonb documents.
--
-- Every object is created unqualified, in the first schema of `search_path`: a deployment may keep
-- Keyward in a schema of its own, and each test runs in a fresh one.

CREATE TABLE organizations (
    id                    uuid        PRIMARY KEY,
    name                  text        NOT NULL,
    slug                  text        NOT NULL CONSTRAINT organizations_slug_unique UNIQUE,
    email                 text,
    plan                  text        NOT NULL,
    is_active             boolean     NOT NULL DEFAULT true,
    -- NULL: the plan's value.
    monthly_request_limit bigint,
    rate_limit_per_minute bigint,
    rate_limit_per_hour   bigint,
    rate_limit_per_day    bigint,
    -- NULL: no limit.
    max_api_keys          bigint,
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL
);

CREATE TABLE api_keys (
    id                    uuid        PRIMARY KEY,
    organization_id       uuid        NOT NULL REFERENCES organizations (id),
    owner_id              text,
    name                  text        NOT NULL,
    description           text,
    environment           text        NOT NULL CHECK (environment IN ('live', 'test')),
    prefix                text        NOT NULL,
    key_hint              text        NOT NULL,
    -- SECURITY: only the hash of a key is stored; the unique index is the lookup on every verify.
    key_hash              bytea       NOT NULL CONSTRAINT api_keys_key_hash_unique UNIQUE
                                      CHECK (octet_length(key_hash) = 32),
    hash_algorithm        text        NOT NULL CHECK (hash_algorithm IN ('sha256', 'hmac_sha256')),
    scopes                text[]      NOT NULL DEFAULT '{}',
    -- Canonical CIDR strings; empty: every address.
    allowed_ips           text[]      NOT NULL DEFAULT '{}',
    expires_at            timestamptz,
    is_active             boolean     NOT NULL DEFAULT true,
    -- May lie in the future: a rotated key keeps working until its grace period ends.
    revoked_at            timestamptz,
    revoke_reason         text,
    -- NULL: the organization's plan and limits.
    plan                  text,
    rate_limit_per_minute bigint,
    rate_limit_per_hour   bigint,
    rate_limit_per_day    bigint,
    monthly_request_limit bigint,
    -- email, company, ...
    metadata              jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    total_requests        bigint      NOT NULL DEFAULT 0,
    last_used_at          timestamptz,
    last_used_ip          text,
    rotated_from          uuid,
    replaced_by           uuid,
    created_by            text,
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL
);

-- Listing an organization's keys newest first (ids are time-ordered, so this is the organization +
-- creation-time index), and counting them against max_api_keys.
CREATE INDEX api_keys_organization_id_id ON api_keys (organization_id, id);
-- `owner_id` filters: self-service keys list their owner's keys, admins across organizations.
CREATE INDEX api_keys_owner_id ON api_keys (owner_id, id);
-- The expiry sweeper and "expiring in N days".
CREATE INDEX api_keys_expires_at ON api_keys (expires_at) WHERE expires_at IS NOT NULL;

-- No foreign keys: the audit trail outlives what it describes.
CREATE TABLE audit_log (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    action          text        NOT NULL,
    key_id          uuid,
    organization_id uuid,
    actor           text        NOT NULL,
    actor_ip        text,
    -- {"after": {...}} on create, {"before": {...}, "after": {...}} of what changed otherwise.
    details         jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL
);

CREATE INDEX audit_log_created_at ON audit_log (created_at);
CREATE INDEX audit_log_key_id ON audit_log (key_id, id);
-- Every non-admin audit listing is scoped to one organization, newest first.
CREATE INDEX audit_log_organization_id_id ON audit_log (organization_id, id);
CREATE INDEX audit_log_actor ON audit_log (actor, id);

-- Status derived at query time, with the precedence of keyward_core::KeyState::status: revoked, then
-- disabled, then expired.
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
