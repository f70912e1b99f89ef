-- Reverts 0010.
DROP TABLE IF EXISTS usage_key_monthly;
DROP TABLE IF EXISTS usage_org_daily;
