-- Reverts 0005: raw events indexed by key and time again.
CREATE INDEX IF NOT EXISTS usage_events_key_time ON usage_events (key_id, occurred_at);
