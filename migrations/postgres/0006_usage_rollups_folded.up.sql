-- usage_pending: what usage batches added that the rollups do not show yet (issue 7).
--
-- A batch used to upsert usage_daily, usage_daily_endpoints and api_keys in its own transaction: one
-- row per key it saw in each. With many keys in use every event lands on a different row, so each
-- event rewrote three random pages, and with 1,000,000 keys the SQLite writer stored ~17,000 events/s
-- against 40,000 verifications/s. Now a batch appends one row here per (key, UTC day, endpoint) it
-- touched, in arrival order (pages written once, at the end of the table), and the usage writer folds
-- the rows into the three tables every fold interval (`usage.fold_interval`, 10 s by default), sorted
-- by key, in one transaction that also deletes them: a fold touches each rollup page once however many
-- events it holds. Raw events and quota counters are still written by the batch itself.
--
-- The columns are usage_daily's, plus the endpoint's error count (status >= 400 or a verification
-- that was not VALID) and the newest VALID request's time and address (api_keys.last_used_*; NULL when
-- the row holds no VALID request).
CREATE TABLE usage_pending (
    seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id           uuid   NOT NULL,
    organization_id  uuid   NOT NULL,
    day              date   NOT NULL,
    endpoint         text   NOT NULL,
    requests         bigint NOT NULL,
    denied           bigint NOT NULL,
    reports          bigint NOT NULL,
    errors_4xx       bigint NOT NULL,
    errors_5xx       bigint NOT NULL,
    tokens_used      bigint NOT NULL,
    cost_micros      bigint NOT NULL,
    latency_count    bigint NOT NULL,
    latency_sum_ms   bigint NOT NULL,
    lat_b00          bigint NOT NULL,
    lat_b01          bigint NOT NULL,
    lat_b02          bigint NOT NULL,
    lat_b03          bigint NOT NULL,
    lat_b04          bigint NOT NULL,
    lat_b05          bigint NOT NULL,
    lat_b06          bigint NOT NULL,
    lat_b07          bigint NOT NULL,
    lat_b08          bigint NOT NULL,
    lat_b09          bigint NOT NULL,
    lat_b10          bigint NOT NULL,
    lat_b11          bigint NOT NULL,
    lat_b12          bigint NOT NULL,
    lat_b13          bigint NOT NULL,
    lat_b14          bigint NOT NULL,
    lat_b15          bigint NOT NULL,
    endpoint_errors  bigint NOT NULL,
    last_used_at     timestamptz,
    last_used_ip     text
);
