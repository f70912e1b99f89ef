-- usage_batches: the id of every usage batch written (SHA-256 of its events' ids, cut to 128 bits), in
-- the same transaction as the batch's quota counters and pending rollup rows. A batch written again (a
-- retry after a commit whose answer was lost, a spill file replayed) finds its id and is skipped, so it
-- counts once without a raw row per event: raw rows are kept by choice (`usage.raw_events`). One row
-- per batch, not per event; ids are pruned 30 days after the batch's newest event, far past any retry
-- or replay. `at` is that newest event's time.
CREATE TABLE usage_batches (
    id UUID PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL
);

CREATE INDEX usage_batches_at ON usage_batches (at);
