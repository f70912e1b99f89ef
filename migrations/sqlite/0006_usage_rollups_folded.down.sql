-- Reverts 0006. The usage writer folds every pending row at shutdown; rows left by a node that crashed
-- are lost to the rollups (the raw events keep them).
DROP TABLE IF EXISTS usage_pending;
