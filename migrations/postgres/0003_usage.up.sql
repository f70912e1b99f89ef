-- Usage ledger (issue 5) and durable monthly quota counters (issue 4).
--
-- usage_events: one row per verification, gateway request or reported request. `id` (UUIDv7, made by
-- the node that saw the request) makes a replayed batch (from the spill file) insert nothing twice;
-- `idempotency_id`, given by a backend reporting usage, is unique per organization so that a retried
-- report never counts twice. Raw events are pruned after the retention; rollups stay.
--
-- usage_daily: one row per key per UTC day, upserted in the same transaction as the events: requests
-- (verifications and gateway requests), denied (verifications that were not VALID), reports, errors by
-- class of status code (4xx, 5xx), tokens, cost in integer micro-dollars, and latency as a count, a sum
-- (mean = sum / count) and a fixed-bucket histogram (lat_b00..lat_b15, bucket upper bounds in ms:
-- 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000, +inf). p95 is read from the
-- histogram: the upper bound of the bucket that holds the 95th percentile. Buckets add, so a day's p95
-- is exact to its bucket however many batches and nodes wrote it.
--
-- usage_daily_endpoints: the same day split by endpoint (top endpoints without reading raw events).
--
-- quota_usage: units spent per quota subject (`quota:key:<id>` / `quota:org:<id>`) per UTC month
-- (`YYYY-MM`), kept by the usage writer; limiters seed their monthly counts from it after a restart.

CREATE TABLE usage_events (
    id               uuid        PRIMARY KEY,
    key_id           uuid        NOT NULL,
    organization_id  uuid        NOT NULL,
    occurred_at      timestamptz NOT NULL,
    kind             text        NOT NULL CHECK (kind IN ('verify', 'gateway', 'report')),
    outcome          text,
    endpoint         text,
    method           text,
    status_code      integer,
    response_time_ms bigint,
    tokens_used      bigint      NOT NULL DEFAULT 0,
    cost_micros      bigint      NOT NULL DEFAULT 0,
    ip               text,
    user_agent       text,
    error_code       text,
    error_message    text,
    idempotency_id   text
);
CREATE UNIQUE INDEX usage_events_idempotency ON usage_events (organization_id, idempotency_id)
    WHERE idempotency_id IS NOT NULL;
CREATE INDEX usage_events_key_time ON usage_events (key_id, occurred_at);
CREATE INDEX usage_events_time ON usage_events (occurred_at);

CREATE TABLE usage_daily (
    key_id           uuid   NOT NULL,
    day              date   NOT NULL,
    organization_id  uuid   NOT NULL,
    requests         bigint NOT NULL DEFAULT 0,
    denied           bigint NOT NULL DEFAULT 0,
    reports          bigint NOT NULL DEFAULT 0,
    errors_4xx       bigint NOT NULL DEFAULT 0,
    errors_5xx       bigint NOT NULL DEFAULT 0,
    tokens_used      bigint NOT NULL DEFAULT 0,
    cost_micros      bigint NOT NULL DEFAULT 0,
    latency_count    bigint NOT NULL DEFAULT 0,
    latency_sum_ms   bigint NOT NULL DEFAULT 0,
    lat_b00 bigint NOT NULL DEFAULT 0,
    lat_b01 bigint NOT NULL DEFAULT 0,
    lat_b02 bigint NOT NULL DEFAULT 0,
    lat_b03 bigint NOT NULL DEFAULT 0,
    lat_b04 bigint NOT NULL DEFAULT 0,
    lat_b05 bigint NOT NULL DEFAULT 0,
    lat_b06 bigint NOT NULL DEFAULT 0,
    lat_b07 bigint NOT NULL DEFAULT 0,
    lat_b08 bigint NOT NULL DEFAULT 0,
    lat_b09 bigint NOT NULL DEFAULT 0,
    lat_b10 bigint NOT NULL DEFAULT 0,
    lat_b11 bigint NOT NULL DEFAULT 0,
    lat_b12 bigint NOT NULL DEFAULT 0,
    lat_b13 bigint NOT NULL DEFAULT 0,
    lat_b14 bigint NOT NULL DEFAULT 0,
    lat_b15 bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, day)
);
CREATE INDEX usage_daily_org_day ON usage_daily (organization_id, day);

CREATE TABLE usage_daily_endpoints (
    key_id           uuid   NOT NULL,
    day              date   NOT NULL,
    endpoint         text   NOT NULL,
    requests         bigint NOT NULL DEFAULT 0,
    errors           bigint NOT NULL DEFAULT 0,
    tokens_used      bigint NOT NULL DEFAULT 0,
    cost_micros      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, day, endpoint)
);

CREATE TABLE quota_usage (
    subject text   NOT NULL,
    month   text   NOT NULL,
    used    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, month)
);
