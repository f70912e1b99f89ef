-- Reverts 0003_usage: the usage ledger, its rollups and the durable quota counters are dropped.
DROP TABLE IF EXISTS quota_usage;
DROP TABLE IF EXISTS usage_daily_endpoints;
DROP TABLE IF EXISTS usage_daily;
DROP TABLE IF EXISTS usage_events;
