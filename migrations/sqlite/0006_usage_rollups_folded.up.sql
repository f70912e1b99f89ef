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
    seq              INTEGER PRIMARY KEY,
    key_id           TEXT    NOT NULL,
    organization_id  TEXT    NOT NULL,
    day              TEXT    NOT NULL,
    endpoint         TEXT    NOT NULL,
    requests         INTEGER NOT NULL,
    denied           INTEGER NOT NULL,
    reports          INTEGER NOT NULL,
    errors_4xx       INTEGER NOT NULL,
    errors_5xx       INTEGER NOT NULL,
    tokens_used      INTEGER NOT NULL,
    cost_micros      INTEGER NOT NULL,
    latency_count    INTEGER NOT NULL,
    latency_sum_ms   INTEGER NOT NULL,
    lat_b00          INTEGER NOT NULL,
    lat_b01          INTEGER NOT NULL,
    lat_b02          INTEGER NOT NULL,
    lat_b03          INTEGER NOT NULL,
    lat_b04          INTEGER NOT NULL,
    lat_b05          INTEGER NOT NULL,
    lat_b06          INTEGER NOT NULL,
    lat_b07          INTEGER NOT NULL,
    lat_b08          INTEGER NOT NULL,
    lat_b09          INTEGER NOT NULL,
    lat_b10          INTEGER NOT NULL,
    lat_b11          INTEGER NOT NULL,
    lat_b12          INTEGER NOT NULL,
    lat_b13          INTEGER NOT NULL,
    lat_b14          INTEGER NOT NULL,
    lat_b15          INTEGER NOT NULL,
    endpoint_errors  INTEGER NOT NULL,
    last_used_at     TEXT,
    last_used_ip     TEXT
);
