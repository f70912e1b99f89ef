-- Reverts 0007. Batches written again after this no longer find their id: only events with a raw row
-- are recognised.
DROP TABLE IF EXISTS usage_batches;
