//! The usage ledger's SQL for PostgreSQL: events and pending rollup rows inserted from arrays, quota
//! counters upserted by adding, all in one transaction per batch (see `crate::sql::usage`); pending rows
//! folded into the rollups by one statement per transaction. Quota rows are upserted in subject order
//! ([`BatchEffects::of`] sorts), so two nodes flushing overlapping batches cannot deadlock.

use sqlx::{Postgres, QueryBuilder};

use super::{PostgresStore, db};
use crate::StoreResult;
use crate::sql::Backend;
use crate::sql::usage::{UsageBackend, UsageDialect};
use crate::usage::{BatchEffects, DAILY_COLUMNS, FOLD_ROWS, UsageEvent, daily_add_set, endpoint_add_set};

/// Rows per INSERT (arrays of this length, one per column).
const INSERT_ROWS: usize = 5_000;

/// A numeric SQL expression clamped to the i64 range, as a bigint. PostgreSQL's bigint `+` and the
/// `::bigint` cast of a larger numeric fail the statement (and the fold is one statement for every
/// organization); numeric arithmetic does not overflow.
fn clamp(numeric: &str) -> String {
    format!("LEAST(GREATEST({numeric}, -9223372036854775808), 9223372036854775807)::bigint")
}

/// `a + b` of two bigints, saturating.
fn sat_add(a: &str, b: &str) -> String {
    clamp(&format!("({a})::numeric + ({b})"))
}

impl UsageDialect for Postgres {
    /// `SUM(bigint)` is a numeric, exact at any size: clamped.
    fn sat_sum(c: &str) -> String {
        clamp(&format!("SUM({c})"))
    }

    /// One array per column (UNNEST), 17 parameters per statement whatever its size, and no per-value
    /// placeholder parsing, which dominates a multi-row VALUES list at this volume. `checked`:
    /// `ON CONFLICT DO NOTHING RETURNING id` (known events are skipped and the new ones named);
    /// otherwise a known event fails the statement with a unique violation, and the unique-index checks
    /// of `ON CONFLICT` (a speculative insertion into each unique index, per row) are not made.
    fn event_inserts(events: &[UsageEvent], checked: bool) -> Vec<QueryBuilder<'_, Postgres>> {
        events
            .chunks(INSERT_ROWS)
            .map(|chunk| {
                let text = |f: fn(&UsageEvent) -> Option<&str>| chunk.iter().map(f).collect::<Vec<_>>();
                let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
                    "INSERT INTO usage_events (id, key_id, organization_id, occurred_at, kind, outcome, endpoint, \
                     method, status_code, response_time_ms, tokens_used, cost_micros, ip, user_agent, error_code, \
                     error_message, idempotency_id) SELECT * FROM UNNEST(",
                );
                let mut a = q.separated(", ");
                a.push_bind(chunk.iter().map(|e| e.id).collect::<Vec<_>>()).push_unseparated("::uuid[]");
                a.push_bind(chunk.iter().map(|e| e.key_id.0).collect::<Vec<_>>()).push_unseparated("::uuid[]");
                a.push_bind(chunk.iter().map(|e| e.organization_id.0).collect::<Vec<_>>()).push_unseparated("::uuid[]");
                a.push_bind(chunk.iter().map(|e| e.at).collect::<Vec<_>>()).push_unseparated("::timestamptz[]");
                a.push_bind(chunk.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>()).push_unseparated("::text[]");
                a.push_bind(text(|e| e.outcome.as_deref())).push_unseparated("::text[]");
                a.push_bind(text(|e| e.endpoint.as_deref())).push_unseparated("::text[]");
                a.push_bind(text(|e| e.method.as_deref())).push_unseparated("::text[]");
                a.push_bind(chunk.iter().map(|e| e.status_code).collect::<Vec<_>>()).push_unseparated("::int4[]");
                a.push_bind(chunk.iter().map(|e| e.response_time_ms).collect::<Vec<_>>()).push_unseparated("::int8[]");
                a.push_bind(chunk.iter().map(|e| e.tokens_used).collect::<Vec<_>>()).push_unseparated("::int8[]");
                a.push_bind(chunk.iter().map(|e| e.cost_micros).collect::<Vec<_>>()).push_unseparated("::int8[]");
                a.push_bind(chunk.iter().map(|e| e.ip.map(|ip| ip.to_string())).collect::<Vec<_>>())
                    .push_unseparated("::text[]");
                a.push_bind(text(|e| e.user_agent.as_deref())).push_unseparated("::text[]");
                a.push_bind(text(|e| e.error_code.as_deref())).push_unseparated("::text[]");
                a.push_bind(text(|e| e.error_message.as_deref())).push_unseparated("::text[]");
                a.push_bind(text(|e| e.idempotency_id.as_deref())).push_unseparated("::text[]");
                q.push(if checked { ") ON CONFLICT DO NOTHING RETURNING id" } else { ")" });
                q
            })
            .collect()
    }

    fn effect_statements(fx: &BatchEffects) -> Vec<QueryBuilder<'_, Postgres>> {
        let mut statements = Vec::new();
        for chunk in fx.pending.chunks(INSERT_ROWS) {
            let mut q: QueryBuilder<Postgres> = QueryBuilder::new(format!(
                "INSERT INTO usage_pending (key_id, organization_id, day, endpoint, {}, endpoint_errors, last_used_at, \
                 last_used_ip) SELECT * FROM UNNEST(",
                DAILY_COLUMNS.join(", ")
            ));
            let values: Vec<[i64; 25]> = chunk.iter().map(|p| p.counts.values()).collect();
            let mut a = q.separated(", ");
            a.push_bind(chunk.iter().map(|p| p.key_id.0).collect::<Vec<_>>()).push_unseparated("::uuid[]");
            a.push_bind(chunk.iter().map(|p| p.organization_id.0).collect::<Vec<_>>()).push_unseparated("::uuid[]");
            a.push_bind(chunk.iter().map(|p| p.day).collect::<Vec<_>>()).push_unseparated("::date[]");
            a.push_bind(chunk.iter().map(|p| p.endpoint.as_str()).collect::<Vec<_>>()).push_unseparated("::text[]");
            for i in 0..DAILY_COLUMNS.len() {
                a.push_bind(values.iter().map(|v| v[i]).collect::<Vec<_>>()).push_unseparated("::int8[]");
            }
            a.push_bind(chunk.iter().map(|p| p.endpoint_errors).collect::<Vec<_>>()).push_unseparated("::int8[]");
            a.push_bind(chunk.iter().map(|p| p.last_used_at).collect::<Vec<_>>()).push_unseparated("::timestamptz[]");
            a.push_bind(chunk.iter().map(|p| p.last_used_ip.as_deref()).collect::<Vec<_>>())
                .push_unseparated("::text[]");
            q.push(")");
            statements.push(q);
        }
        // Sorted by subject (BatchEffects::of), one row each.
        if !fx.quota.is_empty() {
            let mut q: QueryBuilder<Postgres> =
                QueryBuilder::new("INSERT INTO quota_usage (subject, month, used) SELECT * FROM UNNEST(");
            let mut a = q.separated(", ");
            a.push_bind(fx.quota.iter().map(|(s, ..)| s.as_str()).collect::<Vec<_>>()).push_unseparated("::text[]");
            a.push_bind(fx.quota.iter().map(|(_, m, _)| m.as_str()).collect::<Vec<_>>()).push_unseparated("::text[]");
            a.push_bind(fx.quota.iter().map(|(.., u)| *u).collect::<Vec<_>>()).push_unseparated("::int8[]");
            q.push(format!(
                ") ON CONFLICT (subject, month) DO UPDATE SET used = {}",
                sat_add("quota_usage.used", "excluded.used")
            ));
            statements.push(q);
        }
        statements
    }
}

impl UsageBackend for PostgresStore {
    async fn fold_pending(&self) -> StoreResult<u64> {
        let columns = DAILY_COLUMNS.join(", ");
        let sums = DAILY_COLUMNS.iter().map(|c| Postgres::sat_sum(c)).collect::<Vec<_>>().join(", ");
        let endpoint_sums =
            ["requests", "endpoint_errors", "tokens_used", "cost_micros"].map(Postgres::sat_sum).join(", ");
        // One statement, so one snapshot: the rows it deletes are exactly the rows it adds up (a batch
        // committing meanwhile is left for the next fold). Rows are grouped by key; the keys' rows are
        // locked in id order first, as in record_key_usage.
        let sql = format!(
            "WITH moved AS (
                 DELETE FROM usage_pending WHERE seq IN (SELECT seq FROM usage_pending ORDER BY seq LIMIT $1)
                 RETURNING *
             ),
             daily AS (
                 INSERT INTO usage_daily (key_id, day, organization_id, {columns})
                 SELECT key_id, day, MIN(organization_id::text)::uuid, {sums} FROM moved GROUP BY key_id, day
                 ON CONFLICT (key_id, day) DO UPDATE SET {add}
             ),
             endpoints AS (
                 INSERT INTO usage_daily_endpoints (key_id, day, endpoint, requests, errors, tokens_used, cost_micros)
                 SELECT key_id, day, endpoint, {endpoint_sums}
                 FROM moved GROUP BY key_id, day, endpoint
                 ON CONFLICT (key_id, day, endpoint) DO UPDATE SET {endpoint_add}
             ),
             org_days AS (
                 INSERT INTO usage_org_daily (organization_id, day, {columns})
                 SELECT organization_id, day, {sums} FROM moved GROUP BY organization_id, day
                 ON CONFLICT (organization_id, day) DO UPDATE SET {org_add}
             ),
             months AS (
                 INSERT INTO usage_key_monthly (key_id, month, organization_id, {columns})
                 SELECT key_id, date_trunc('month', day)::date, MIN(organization_id::text)::uuid, {sums}
                 FROM moved GROUP BY key_id, date_trunc('month', day)::date
                 ON CONFLICT (key_id, month) DO UPDATE SET {month_add}
             ),
             owner_days AS (
                 INSERT INTO usage_owner_daily (organization_id, owner_id, day, {columns})
                 SELECT k.organization_id, k.owner_id, m.day, {sums}
                 FROM moved AS m JOIN api_keys AS k ON k.id = m.key_id
                 WHERE k.owner_id IS NOT NULL
                 GROUP BY k.organization_id, k.owner_id, m.day
                 ON CONFLICT (organization_id, owner_id, day) DO UPDATE SET {owner_add}
             ),
             used AS (
                 SELECT key_id, {valid_sum} AS requests, MAX(last_used_at) AS at,
                        (array_agg(last_used_ip ORDER BY last_used_at DESC))[1] AS ip
                 FROM moved WHERE last_used_at IS NOT NULL GROUP BY key_id
             ),
             locked AS (
                 SELECT id FROM api_keys WHERE id IN (SELECT key_id FROM used) ORDER BY id FOR UPDATE
             ),
             keys AS (
                 UPDATE api_keys AS k SET
                     total_requests = {total_add},
                     last_used_ip = CASE WHEN k.last_used_at IS NULL OR k.last_used_at < v.at
                                         THEN COALESCE(v.ip, k.last_used_ip) ELSE k.last_used_ip END,
                     last_used_at = CASE WHEN k.last_used_at IS NULL OR k.last_used_at < v.at
                                         THEN v.at ELSE k.last_used_at END
                 FROM used AS v JOIN locked ON locked.id = v.key_id
                 WHERE k.id = v.key_id
             )
             SELECT COUNT(*) FROM moved",
            add = daily_add_set("usage_daily", sat_add),
            endpoint_add = endpoint_add_set(sat_add),
            org_add = daily_add_set("usage_org_daily", sat_add),
            month_add = daily_add_set("usage_key_monthly", sat_add),
            owner_add = daily_add_set("usage_owner_daily", sat_add),
            valid_sum = Postgres::sat_sum("requests::numeric - denied"),
            total_add = sat_add("k.total_requests", "v.requests"),
        );
        let mut folded = 0;
        loop {
            let mut tx = self.writer().await?;
            // Folds run one at a time across the nodes: two would wait on each other's rows.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keyward.fold_usage'))")
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            let rows: i64 = sqlx::query_scalar(&sql).bind(FOLD_ROWS).fetch_one(&mut *tx).await.map_err(db)?;
            tx.commit().await.map_err(db)?;
            folded += rows as u64;
            if rows < FOLD_ROWS {
                return Ok(folded);
            }
        }
    }
}
