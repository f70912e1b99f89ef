-- Billing months without summing a month of daily rows (issue 19).
--
-- The console's billing month summed every (key, day) row of usage_daily twice, per key (the lines)
-- and per day (the chart): with 100,000 keys used on two days, 200,000 rows, seconds a page, and a
-- 30-day month has fifteen times as many. The usage fold now keeps two more rollups, in the same
-- transaction as usage_daily, from the same pending rows, so they always equal its sums:
--
-- usage_org_daily: an organization's keys summed per UTC day (the month's chart: at most 31 rows).
--
-- usage_key_monthly: a key's days summed per UTC month (`month`: the month's first day), with an
-- index giving an organization's month costliest first (cost, then requests, descending; then key
-- id, as the console orders lines): the page's top lines are an index walk, the CSV one ordered read.
--
-- Both are filled here from usage_daily, so a database upgraded mid-month shows the same months.
-- Pending rows are folded into all three later. Nothing prunes usage_daily (the retention prunes raw
-- events and batch ids only), so nothing prunes these either: they stay equal to its sums.
CREATE TABLE usage_org_daily (
    organization_id  TEXT    NOT NULL,
    day              TEXT    NOT NULL,
    requests         INTEGER NOT NULL DEFAULT 0,
    denied           INTEGER NOT NULL DEFAULT 0,
    reports          INTEGER NOT NULL DEFAULT 0,
    errors_4xx       INTEGER NOT NULL DEFAULT 0,
    errors_5xx       INTEGER NOT NULL DEFAULT 0,
    tokens_used      INTEGER NOT NULL DEFAULT 0,
    cost_micros      INTEGER NOT NULL DEFAULT 0,
    latency_count    INTEGER NOT NULL DEFAULT 0,
    latency_sum_ms   INTEGER NOT NULL DEFAULT 0,
    lat_b00          INTEGER NOT NULL DEFAULT 0,
    lat_b01          INTEGER NOT NULL DEFAULT 0,
    lat_b02          INTEGER NOT NULL DEFAULT 0,
    lat_b03          INTEGER NOT NULL DEFAULT 0,
    lat_b04          INTEGER NOT NULL DEFAULT 0,
    lat_b05          INTEGER NOT NULL DEFAULT 0,
    lat_b06          INTEGER NOT NULL DEFAULT 0,
    lat_b07          INTEGER NOT NULL DEFAULT 0,
    lat_b08          INTEGER NOT NULL DEFAULT 0,
    lat_b09          INTEGER NOT NULL DEFAULT 0,
    lat_b10          INTEGER NOT NULL DEFAULT 0,
    lat_b11          INTEGER NOT NULL DEFAULT 0,
    lat_b12          INTEGER NOT NULL DEFAULT 0,
    lat_b13          INTEGER NOT NULL DEFAULT 0,
    lat_b14          INTEGER NOT NULL DEFAULT 0,
    lat_b15          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, day)
);

CREATE TABLE usage_key_monthly (
    key_id           TEXT    NOT NULL,
    month            TEXT    NOT NULL,
    organization_id  TEXT    NOT NULL,
    requests         INTEGER NOT NULL DEFAULT 0,
    denied           INTEGER NOT NULL DEFAULT 0,
    reports          INTEGER NOT NULL DEFAULT 0,
    errors_4xx       INTEGER NOT NULL DEFAULT 0,
    errors_5xx       INTEGER NOT NULL DEFAULT 0,
    tokens_used      INTEGER NOT NULL DEFAULT 0,
    cost_micros      INTEGER NOT NULL DEFAULT 0,
    latency_count    INTEGER NOT NULL DEFAULT 0,
    latency_sum_ms   INTEGER NOT NULL DEFAULT 0,
    lat_b00          INTEGER NOT NULL DEFAULT 0,
    lat_b01          INTEGER NOT NULL DEFAULT 0,
    lat_b02          INTEGER NOT NULL DEFAULT 0,
    lat_b03          INTEGER NOT NULL DEFAULT 0,
    lat_b04          INTEGER NOT NULL DEFAULT 0,
    lat_b05          INTEGER NOT NULL DEFAULT 0,
    lat_b06          INTEGER NOT NULL DEFAULT 0,
    lat_b07          INTEGER NOT NULL DEFAULT 0,
    lat_b08          INTEGER NOT NULL DEFAULT 0,
    lat_b09          INTEGER NOT NULL DEFAULT 0,
    lat_b10          INTEGER NOT NULL DEFAULT 0,
    lat_b11          INTEGER NOT NULL DEFAULT 0,
    lat_b12          INTEGER NOT NULL DEFAULT 0,
    lat_b13          INTEGER NOT NULL DEFAULT 0,
    lat_b14          INTEGER NOT NULL DEFAULT 0,
    lat_b15          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, month)
);
CREATE INDEX usage_key_monthly_org_cost
    ON usage_key_monthly (organization_id, month, cost_micros DESC, requests DESC, key_id);

-- SQLite's SUM fails the migration past the i64 range (the fold saturates instead); no real month
-- comes near one.
INSERT INTO usage_org_daily (organization_id, day,
        requests, denied, reports, errors_4xx, errors_5xx, tokens_used, cost_micros, latency_count,
        latency_sum_ms, lat_b00, lat_b01, lat_b02, lat_b03, lat_b04, lat_b05, lat_b06, lat_b07, lat_b08,
        lat_b09, lat_b10, lat_b11, lat_b12, lat_b13, lat_b14, lat_b15)
    SELECT organization_id, day,
        SUM(requests), SUM(denied), SUM(reports), SUM(errors_4xx), SUM(errors_5xx), SUM(tokens_used),
        SUM(cost_micros), SUM(latency_count), SUM(latency_sum_ms), SUM(lat_b00), SUM(lat_b01), SUM(lat_b02),
        SUM(lat_b03), SUM(lat_b04), SUM(lat_b05), SUM(lat_b06), SUM(lat_b07), SUM(lat_b08), SUM(lat_b09),
        SUM(lat_b10), SUM(lat_b11), SUM(lat_b12), SUM(lat_b13), SUM(lat_b14), SUM(lat_b15)
    FROM usage_daily GROUP BY organization_id, day;
INSERT INTO usage_key_monthly (key_id, month, organization_id,
        requests, denied, reports, errors_4xx, errors_5xx, tokens_used, cost_micros, latency_count,
        latency_sum_ms, lat_b00, lat_b01, lat_b02, lat_b03, lat_b04, lat_b05, lat_b06, lat_b07, lat_b08,
        lat_b09, lat_b10, lat_b11, lat_b12, lat_b13, lat_b14, lat_b15)
    SELECT key_id, substr(day, 1, 8) || '01', MIN(organization_id),
        SUM(requests), SUM(denied), SUM(reports), SUM(errors_4xx), SUM(errors_5xx), SUM(tokens_used),
        SUM(cost_micros), SUM(latency_count), SUM(latency_sum_ms), SUM(lat_b00), SUM(lat_b01), SUM(lat_b02),
        SUM(lat_b03), SUM(lat_b04), SUM(lat_b05), SUM(lat_b06), SUM(lat_b07), SUM(lat_b08), SUM(lat_b09),
        SUM(lat_b10), SUM(lat_b11), SUM(lat_b12), SUM(lat_b13), SUM(lat_b14), SUM(lat_b15)
    FROM usage_daily GROUP BY key_id, substr(day, 1, 8);
