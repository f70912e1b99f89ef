-- A self-service customer's billing month without summing its keys' days (issue 19).
--
-- The self-serve month summed every (key, day) row of an owner's keys twice, per key (the lines) and
-- per day (the chart): an owner of 2,000 keys over a 30-day month is 60,000 rows, hundreds of
-- milliseconds a page. Its lines are now the keys' months (usage_key_monthly, 0010), and its chart
-- reads one more rollup, kept by the usage fold in the same transaction as usage_daily, from the same
-- pending rows, so it always equals those keys' daily sums:
--
-- usage_owner_daily: an organization's keys of one owner (api_keys.owner_id) summed per UTC day (at
-- most 31 rows a month). Keys without an owner have no row. It is keyed by the owner a key has when
-- its usage is folded, which is the owner it always had: no write changes a key's owner_id (a rotation
-- makes a new key with the same one), and the trigger below refuses one that tries, since that key's
-- days would then have to move from one owner's rows to the other's.
--
-- Filled here from usage_daily, so a database upgraded mid-month shows the same months. Pending rows
-- are folded into it later. Nothing prunes usage_daily, so nothing prunes it either.
CREATE TABLE usage_owner_daily (LIKE usage_daily INCLUDING DEFAULTS);
ALTER TABLE usage_owner_daily DROP COLUMN key_id, ADD COLUMN owner_id text NOT NULL,
    ADD PRIMARY KEY (organization_id, owner_id, day);

-- A sum past the bigint range fails the migration (the fold saturates instead); no real month comes
-- near one.
INSERT INTO usage_owner_daily (organization_id, owner_id, day,
        requests, denied, reports, errors_4xx, errors_5xx, tokens_used, cost_micros, latency_count,
        latency_sum_ms, lat_b00, lat_b01, lat_b02, lat_b03, lat_b04, lat_b05, lat_b06, lat_b07,
        lat_b08, lat_b09, lat_b10, lat_b11, lat_b12, lat_b13, lat_b14, lat_b15)
    SELECT k.organization_id, k.owner_id, d.day,
        SUM(d.requests), SUM(d.denied), SUM(d.reports), SUM(d.errors_4xx), SUM(d.errors_5xx),
        SUM(d.tokens_used), SUM(d.cost_micros), SUM(d.latency_count), SUM(d.latency_sum_ms),
        SUM(d.lat_b00), SUM(d.lat_b01), SUM(d.lat_b02), SUM(d.lat_b03), SUM(d.lat_b04), SUM(d.lat_b05),
        SUM(d.lat_b06), SUM(d.lat_b07), SUM(d.lat_b08), SUM(d.lat_b09), SUM(d.lat_b10), SUM(d.lat_b11),
        SUM(d.lat_b12), SUM(d.lat_b13), SUM(d.lat_b14), SUM(d.lat_b15)
    FROM usage_daily AS d JOIN api_keys AS k ON k.id = d.key_id
    WHERE k.owner_id IS NOT NULL
    GROUP BY k.organization_id, k.owner_id, d.day;

CREATE FUNCTION api_keys_owner_id_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a key''s owner_id never changes (usage_owner_daily is kept by it)';
END
$$;
CREATE TRIGGER api_keys_owner_id_fixed BEFORE UPDATE OF owner_id ON api_keys
    FOR EACH ROW WHEN (OLD.owner_id IS DISTINCT FROM NEW.owner_id)
    EXECUTE FUNCTION api_keys_owner_id_fixed();
