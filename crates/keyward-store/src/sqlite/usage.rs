//! The usage ledger's SQL for SQLite: events and pending rollup rows inserted with multi-row statements,
//! quota counters upserted by adding, all in one `BEGIN IMMEDIATE` transaction per batch (see
//! `crate::sql::usage`); pending rows folded into the rollups by transactions of statements, each on
//! the single write connection.

use sqlx::{Connection, QueryBuilder, Sqlite, SqliteConnection};

use super::{SqliteStore, db, ts};
use crate::StoreResult;
use crate::sql::usage::{UsageBackend, UsageDialect};
use crate::usage::{BatchEffects, DAILY_COLUMNS, FOLD_ROWS, UsageEvent, daily_add_set, endpoint_add_set};

/// The write connection's page cache during a fold, KiB (its sorts' in-memory bound too).
const FOLD_CACHE_KIB: u32 = 8 * 1024;

/// Rows per INSERT: 17 parameters a row stays under SQLite's 32,766.
const INSERT_ROWS: usize = 1_000;

pub(super) fn day(d: chrono::NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

/// `a + b` clamped to the i64 range. SQLite's `+` does not fail on overflow: it turns the result
/// into a REAL, which an INTEGER column then keeps as REAL and no reader decodes as i64. Each branch
/// only computes a sum that fits (`9223372036854775807 - b` for `b > 0` cannot overflow).
fn sat_add(a: &str, b: &str) -> String {
    format!(
        "(CASE WHEN ({b}) > 0 THEN (CASE WHEN ({a}) > 9223372036854775807 - ({b}) THEN 9223372036854775807 \
         ELSE ({a}) + ({b}) END) ELSE (CASE WHEN ({a}) < -9223372036854775808 - ({b}) \
         THEN -9223372036854775808 ELSE ({a}) + ({b}) END) END)"
    )
}

/// A fold's `SUM(c)` of a pending column: [`Sqlite::sat_sum`] for the columns one batch can make large
/// (tokens, cost, latency), and for the counts (of events, so below 2^32 in any batch) a plain `SUM`
/// of the value clamped to `0..=2^32-1`, which cannot overflow over at most [`FOLD_ROWS`] rows and
/// costs a fold about half of what `sat_sum` does.
fn fold_sum(c: &str) -> String {
    const _: () = assert!(FOLD_ROWS < 1 << 31, "FOLD_ROWS * (2^32 - 1) must fit an i64");
    if ["tokens_used", "cost_micros", "latency_sum_ms"].contains(&c) {
        Sqlite::sat_sum(c)
    } else {
        format!("SUM(MIN(MAX({c}, 0), 4294967295))")
    }
}

impl UsageDialect for Sqlite {
    /// `SUM(c)` clamped to the i64 range, exact below it. SQLite's `SUM()` fails the whole statement with
    /// "integer overflow" (and `TOTAL()` is a float, inexact past 2^53), so each value is split into its
    /// high 32 bits (`c >> 32`, arithmetic) and low 32 bits (`c & 0xFFFFFFFF`, never negative): neither
    /// sum can overflow below 2^31 rows. With `h` the high sum plus the carry of the low one, the total
    /// `h * 2^32 + (low mod 2^32)` fits an i64 exactly when `h` fits an i32. NULL over no rows, as `SUM`.
    fn sat_sum(c: &str) -> String {
        let high = format!("(SUM(({c}) >> 32) + (SUM(({c}) & 4294967295) >> 32))");
        format!(
            "(CASE WHEN {high} > 2147483647 THEN 9223372036854775807 \
             WHEN {high} < -2147483648 THEN -9223372036854775808 \
             ELSE ({high} << 32) + (SUM(({c}) & 4294967295) & 4294967295) END)"
        )
    }

    /// `checked`: `ON CONFLICT DO NOTHING RETURNING id`: a known id or idempotency id is skipped, the
    /// new rows are named, and any other constraint fails the statement. Otherwise `INSERT OR IGNORE`,
    /// which skips a row that breaks any constraint: such a statement can never stop half-way, so SQLite
    /// keeps no statement journal for it (a copy of every page it touches). The caller compares the rows
    /// inserted with the events and, when one is missing, for whatever reason, rolls back and takes the
    /// checked path, where a bad row is an error, not a skip.
    fn event_inserts(events: &[UsageEvent], checked: bool) -> Vec<QueryBuilder<'_, Sqlite>> {
        events
            .chunks(INSERT_ROWS)
            .map(|chunk| {
                let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(if checked {
                    "INSERT INTO usage_events "
                } else {
                    "INSERT OR IGNORE INTO usage_events "
                });
                q.push(
                    "(id, key_id, organization_id, occurred_at, kind, outcome, endpoint, method, status_code, \
                     response_time_ms, tokens_used, cost_micros, ip, user_agent, error_code, error_message, \
                     idempotency_id) ",
                );
                q.push_values(chunk, |mut b, e| {
                    b.push_bind(e.id.to_string())
                        .push_bind(e.key_id.to_string())
                        .push_bind(e.organization_id.to_string())
                        .push_bind(ts(e.at))
                        .push_bind(e.kind.as_str())
                        .push_bind(e.outcome.as_deref())
                        .push_bind(e.endpoint.as_deref())
                        .push_bind(e.method.as_deref())
                        .push_bind(e.status_code)
                        .push_bind(e.response_time_ms)
                        .push_bind(e.tokens_used)
                        .push_bind(e.cost_micros)
                        .push_bind(e.ip.map(|ip| ip.to_string()))
                        .push_bind(e.user_agent.as_deref())
                        .push_bind(e.error_code.as_deref())
                        .push_bind(e.error_message.as_deref())
                        .push_bind(e.idempotency_id.as_deref());
                });
                if checked {
                    // Without a conflict target: a known id and a known idempotency id are both skipped.
                    q.push(" ON CONFLICT DO NOTHING RETURNING id");
                }
                q
            })
            .collect()
    }

    fn effect_statements(fx: &BatchEffects) -> Vec<QueryBuilder<'_, Sqlite>> {
        let mut statements = Vec::new();
        // 33 parameters a row: 900 rows stay under SQLite's 32,766.
        for chunk in fx.pending.chunks(900) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
                "INSERT INTO usage_pending (key_id, organization_id, day, endpoint, {}, endpoint_errors, \
                 last_used_at, last_used_ip) ",
                DAILY_COLUMNS.join(", ")
            ));
            q.push_values(chunk, |mut b, p| {
                b.push_bind(p.key_id.to_string())
                    .push_bind(p.organization_id.to_string())
                    .push_bind(day(p.day))
                    .push_bind(p.endpoint.as_str());
                for v in p.counts.values() {
                    b.push_bind(v);
                }
                b.push_bind(p.endpoint_errors).push_bind(p.last_used_at.map(ts)).push_bind(p.last_used_ip.as_deref());
            });
            statements.push(q);
        }
        for chunk in fx.quota.chunks(1000) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new("INSERT INTO quota_usage (subject, month, used) ");
            q.push_values(chunk, |mut b, (subject, month, used)| {
                b.push_bind(subject.as_str()).push_bind(month.as_str()).push_bind(*used);
            });
            q.push(format!(
                " ON CONFLICT (subject, month) DO UPDATE SET used = {}",
                sat_add("quota_usage.used", "excluded.used")
            ));
            statements.push(q);
        }
        statements
    }
}

/// One fold transaction on the write connection: at most [`FOLD_ROWS`] pending rows, oldest first.
async fn fold_once(conn: &mut SqliteConnection) -> StoreResult<u64> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
    // The newest row of this fold: at most FOLD_ROWS rows, oldest first. One writer at a time
    // (BEGIN IMMEDIATE), so no row below it can appear later.
    let last: Option<i64> =
        sqlx::query_scalar("SELECT MAX(seq) FROM (SELECT seq FROM usage_pending ORDER BY seq LIMIT ?)")
            .bind(FOLD_ROWS)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
    let Some(last) = last else {
        tx.rollback().await.map_err(db)?;
        return Ok(0);
    };
    let columns = DAILY_COLUMNS.join(", ");
    let sums = DAILY_COLUMNS.iter().map(|c| fold_sum(c)).collect::<Vec<_>>().join(", ");
    let endpoint_sums = ["requests", "endpoint_errors", "tokens_used", "cost_micros"].map(fold_sum).join(", ");
    // Rows grouped, hence sorted, by key: each rollup page is visited once. `WHERE` before
    // `ON CONFLICT` as SQLite's upsert-from-SELECT needs.
    let statements = [
        format!(
            "INSERT INTO usage_daily (key_id, day, organization_id, {columns})
                 SELECT key_id, day, MIN(organization_id), {sums} FROM usage_pending WHERE seq <= ?1
                 GROUP BY key_id, day
                 ON CONFLICT (key_id, day) DO UPDATE SET {}",
            daily_add_set("usage_daily", sat_add)
        ),
        format!(
            "INSERT INTO usage_daily_endpoints (key_id, day, endpoint, requests, errors, tokens_used, cost_micros)
             SELECT key_id, day, endpoint, {endpoint_sums}
             FROM usage_pending WHERE seq <= ?1 GROUP BY key_id, day, endpoint
             ON CONFLICT (key_id, day, endpoint) DO UPDATE SET {}",
            endpoint_add_set(sat_add)
        ),
        // The billing rollups, from the same rows: an organization's day, a key's month (its first day).
        format!(
            "INSERT INTO usage_org_daily (organization_id, day, {columns})
             SELECT organization_id, day, {sums} FROM usage_pending WHERE seq <= ?1
             GROUP BY organization_id, day
             ON CONFLICT (organization_id, day) DO UPDATE SET {}",
            daily_add_set("usage_org_daily", sat_add)
        ),
        format!(
            "INSERT INTO usage_key_monthly (key_id, month, organization_id, {columns})
             SELECT key_id, substr(day, 1, 8) || '01', MIN(organization_id), {sums} FROM usage_pending
             WHERE seq <= ?1 GROUP BY key_id, substr(day, 1, 8)
             ON CONFLICT (key_id, month) DO UPDATE SET {}",
            daily_add_set("usage_key_monthly", sat_add)
        ),
        // An owner's day: the owner its key has (and always had: a key's owner never changes).
        format!(
            "INSERT INTO usage_owner_daily (organization_id, owner_id, day, {columns})
             SELECT k.organization_id, k.owner_id, p.day, {sums}
             FROM usage_pending AS p JOIN api_keys AS k ON k.id = p.key_id
             WHERE p.seq <= ?1 AND k.owner_id IS NOT NULL
             GROUP BY k.organization_id, k.owner_id, p.day
             ON CONFLICT (organization_id, owner_id, day) DO UPDATE SET {}",
            daily_add_set("usage_owner_daily", sat_add)
        ),
        // VALID requests are requests - denied. `ip` is a bare column beside MAX(): SQLite takes
        // it from the row holding the newest use. As in record_key_usage, the CASEs compare
        // against the old `last_used_at`, and an unknown address keeps the last known one.
        format!(
            "UPDATE api_keys SET
                 total_requests = {},
                 last_used_ip = CASE WHEN last_used_at IS NULL OR last_used_at < v.at
                                     THEN COALESCE(v.ip, last_used_ip) ELSE last_used_ip END,
                 last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < v.at
                                     THEN v.at ELSE last_used_at END
             FROM (SELECT key_id, {} AS requests, MAX(last_used_at) AS at,
                          last_used_ip AS ip
                   FROM usage_pending WHERE seq <= ?1 AND last_used_at IS NOT NULL GROUP BY key_id) AS v
             WHERE api_keys.id = v.key_id",
            sat_add("total_requests", "v.requests"),
            fold_sum("requests - denied"),
        ),
        "DELETE FROM usage_pending WHERE seq <= ?1".to_owned(),
    ];
    let mut rows = 0;
    for sql in &statements {
        rows = sqlx::query(sql).bind(last).execute(&mut *tx).await.map_err(db)?.rows_affected();
    }
    tx.commit().await.map_err(db)?;
    Ok(rows)
}

/// The write connection's `temp_store` and page cache (KiB).
async fn set_temp_store_and_cache(conn: &mut SqliteConnection, temp_store: &str, cache_kib: u32) -> StoreResult<()> {
    sqlx::query(&format!("PRAGMA temp_store = {temp_store}")).execute(&mut *conn).await.map_err(db)?;
    sqlx::query(&format!("PRAGMA cache_size = -{cache_kib}")).execute(&mut *conn).await.map_err(db)?;
    Ok(())
}

impl UsageBackend for SqliteStore {
    async fn fold_pending(&self) -> StoreResult<u64> {
        let mut conn = self.write.acquire().await.map_err(db)?;
        // A fold's GROUP BYs sort up to FOLD_ROWS rows, in memory up to the page cache's size, then in
        // temporary files. With the write connection's temp_store=memory their temporary b-trees would
        // grow in memory without bound (and the C allocator keeps what it took); in files, with a small
        // cache for the fold, it stays near that cache, in the same time: the fold visits each page
        // once, in key order, so a large cache buys it nothing.
        set_temp_store_and_cache(&mut conn, "file", FOLD_CACHE_KIB).await?;
        let result = self.fold_all(&mut conn).await;
        set_temp_store_and_cache(&mut conn, super::WRITE_TEMP_STORE, super::WRITE_CACHE_KIB).await?;
        result
    }

    fn batch_written(&self) {
        self.checkpoint_in_background();
    }
}

impl SqliteStore {
    /// Fold transactions until one finds fewer than [`FOLD_ROWS`] pending rows; the rows folded.
    async fn fold_all(&self, conn: &mut SqliteConnection) -> StoreResult<u64> {
        let mut folded = 0;
        loop {
            let rows = fold_once(conn).await?;
            folded += rows;
            self.checkpoint_in_background();
            if rows < FOLD_ROWS as u64 {
                return Ok(folded);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The saturating SQL against i128 arithmetic, at the edges: exact inside the i64 range, clamped
    /// outside it, and never an error.
    #[tokio::test]
    async fn saturating_sum_and_add_are_exact_and_clamp() {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        sqlx::query("CREATE TABLE t (g INTEGER NOT NULL, c INTEGER NOT NULL)").execute(&mut conn).await.unwrap();
        let (max, min) = (i64::MAX, i64::MIN);
        let groups: Vec<Vec<i64>> = vec![
            vec![1, 2, 3],
            vec![max, 1],
            vec![max, max, max],
            vec![max - 1, 1],
            vec![max, -1],
            vec![min, -1],
            vec![min, max],
            vec![min, min],
            vec![4_294_967_295, 4_294_967_295, 4_294_967_296],
            vec![-4_294_967_297, 12, -1],
            vec![max / 2, max / 2, 1],
            vec![max / 2, max / 2, 2],
            vec![0],
        ];
        for (g, values) in groups.iter().enumerate() {
            for v in values {
                sqlx::query("INSERT INTO t VALUES (?, ?)").bind(g as i64).bind(*v).execute(&mut conn).await.unwrap();
            }
        }
        let sql = format!(
            "SELECT g, {}, typeof({}) FROM t GROUP BY g ORDER BY g",
            Sqlite::sat_sum("c"),
            Sqlite::sat_sum("c")
        );
        let got: Vec<(i64, i64, String)> = sqlx::query_as(&sql).fetch_all(&mut conn).await.unwrap();
        let clamp = |n: i128| n.clamp(i128::from(min), i128::from(max)) as i64;
        for ((g, sum, kind), values) in got.iter().zip(&groups) {
            let want = clamp(values.iter().map(|&v| i128::from(v)).sum());
            assert_eq!((*sum, kind.as_str()), (want, "integer"), "group {g}: {values:?}");
        }
        // A count column of rows an older version could not have written (2^63 events in a batch) is
        // clamped per row: the fold still goes through.
        let sql = format!("SELECT {} FROM t WHERE g = 2", fold_sum("c"));
        let (sum,): (i64,) = sqlx::query_as(&sql).fetch_one(&mut conn).await.unwrap();
        assert_eq!(sum, 3 * 4_294_967_295);
        let pairs = [(max, 1), (max, max), (1, max), (max, -1), (min, -1), (min, min), (min, max), (5, -7), (0, 0)];
        for (a, b) in pairs {
            let sql = format!("SELECT {}, typeof({})", sat_add("?1", "?2"), sat_add("?1", "?2"));
            let (sum, kind): (i64, String) = sqlx::query_as(&sql).bind(a).bind(b).fetch_one(&mut conn).await.unwrap();
            assert_eq!((sum, kind.as_str()), (clamp(i128::from(a) + i128::from(b)), "integer"), "{a} + {b}");
        }
    }
}
