-- Raw usage events lose their (key_id, occurred_at) index (issue 7).
--
-- Every verification writes one event. Events of different keys arrive interleaved, so each batch put
-- entries on as many pages of that index as it had keys: with 1,000 keys a batch of 5,000 events
-- rewrote ~1,000 index pages, 4.4 times the bytes of the events themselves (6.9 kB written per
-- verification instead of 1.6 kB; 41,000 instead of 50,000 verifications/s, p99 8.4 instead of 4.8 ms
-- in scripts/bench-verify.sh). No API reads raw events by key: a key's usage comes from the daily
-- rollups, which the same transaction keeps. Raw events stay ordered by time (usage_events_time, for
-- the retention prune and exports); reading one key's raw events over a range scans that range.
DROP INDEX IF EXISTS usage_events_key_time;
