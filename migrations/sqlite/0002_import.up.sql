-- Keys imported from another system (`keyward import`, `POST /v1/keys/import`).
--
-- `legacy` marks a key that is not in Keyward's format, or whose plaintext was never seen (imported by
-- its SHA-256): verification finds such a key by the plain hash of whatever string the customer sends.
-- Servers ask "is there any legacy key?" once at start and then now and then (the partial index makes
-- that a lookup of one index entry), so that while there is none a string that is not a Keyward key is
-- refused without a query.
ALTER TABLE api_keys ADD COLUMN legacy INTEGER NOT NULL DEFAULT 0 CHECK (legacy IN (0, 1));
CREATE INDEX api_keys_legacy ON api_keys (id) WHERE legacy = 1;
