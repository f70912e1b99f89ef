//! [`UsageStore`] for both SQL backends, written once: how a batch is written (optimistically, then
//! checked when some event was stored already), and every read of the rollups. What differs between the
//! databases is theirs ([`UsageDialect`]: how events and pending rows are inserted in bulk, how a sum
//! saturates) and so is the fold ([`UsageBackend::fold_pending`]), whose SQL differs whole.

use std::collections::HashSet;
use std::future::Future;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use keyward_core::{KeyId, OrgId};
use sqlx::{ColumnIndex, Decode, FromRow, QueryBuilder, Row, Transaction, Type};
use uuid::Uuid;

use super::{Arg, Backend, Db, Dialect, Reads, Stmt};
use crate::usage::{
    BatchEffects, DAILY_COLUMNS, DailyCounts, DailyUsage, Days, EndpointCounts, EndpointUsage, EventTotals,
    KEY_LOOKUP_CHUNK, KeyTotals, RecordedBatch, UsageBatch, UsageEvent, UsageStore,
};
use crate::{ApiKey, StoreResult};

/// The usage ledger's SQL that differs between the databases.
pub(crate) trait UsageDialect:
    Db + Reads<DailyUsage> + Reads<KeyTotals> + Reads<EndpointUsage> + Reads<EventTotals>
{
    /// `SUM(c)` of a bigint column, clamped to the i64 range instead of failing.
    fn sat_sum(c: &str) -> String;
    /// The events' `INSERT`s. Unchecked, a statement may skip a known event (SQLite) or fail with a
    /// unique violation (PostgreSQL); `checked`, it skips known events and returns the new ones' ids.
    fn event_inserts(events: &[UsageEvent], checked: bool) -> Vec<QueryBuilder<'_, Self>>;
    /// Everything a batch's effects change besides the events: its `usage_pending` rows and the quota
    /// counters.
    fn effect_statements(fx: &BatchEffects) -> Vec<QueryBuilder<'_, Self>>;
}

/// A backend's usage ledger: its fold, and what it does after a batch.
pub(crate) trait UsageBackend: Backend<Db: UsageDialect> {
    /// [`UsageStore::fold_usage`].
    fn fold_pending(&self) -> impl Future<Output = StoreResult<u64>> + Send;

    /// Called after each batch is committed.
    fn batch_written(&self) {}
}

/// The rollup values, in [`DAILY_COLUMNS`] order, from column `offset` of a row.
fn counts<'r, R: Row>(row: &'r R, offset: usize) -> Result<DailyCounts, sqlx::Error>
where
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let mut v = [0i64; 25];
    for (i, slot) in v.iter_mut().enumerate() {
        *slot = row.try_get(offset + i)?;
    }
    Ok(DailyCounts::from_values(&v))
}

/// A rollup row, or a sum of them: a key (or a day) and its counts.
pub(crate) struct CountsRow<T> {
    of: T,
    counts: DailyCounts,
}

impl<'r, R: Row, T> FromRow<'r, R> for CountsRow<T>
where
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    T: Decode<'r, R::Database> + Type<R::Database>,
{
    fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
        Ok(Self { of: row.try_get(0)?, counts: counts(row, 1)? })
    }
}

impl<D: Dialect> Reads<DailyUsage> for D
where
    CountsRow<D::Day>: for<'r> FromRow<'r, D::Row>,
{
    type Shape = CountsRow<D::Day>;

    fn record(row: Self::Shape) -> StoreResult<DailyUsage> {
        Ok(DailyUsage { day: D::read_day(row.of, "usage_daily.day")?, counts: row.counts })
    }
}

impl<D: Dialect> Reads<KeyTotals> for D
where
    CountsRow<D::Id>: for<'r> FromRow<'r, D::Row>,
{
    type Shape = CountsRow<D::Id>;

    fn record(row: Self::Shape) -> StoreResult<KeyTotals> {
        Ok(KeyTotals { key_id: KeyId(D::read_id(row.of, "usage_daily.key_id")?), counts: row.counts })
    }
}

impl<D: Dialect> Reads<EndpointUsage> for D
where
    (String, i64, i64, i64, i64): for<'r> FromRow<'r, D::Row>,
{
    type Shape = (String, i64, i64, i64, i64);

    fn record((endpoint, requests, errors, tokens_used, cost_micros): Self::Shape) -> StoreResult<EndpointUsage> {
        Ok(EndpointUsage { endpoint, counts: EndpointCounts { requests, errors, tokens_used, cost_micros } })
    }
}

impl<D: Dialect> Reads<EventTotals> for D
where
    (i64, i64, i64, i64, i64): for<'r> FromRow<'r, D::Row>,
{
    type Shape = (i64, i64, i64, i64, i64);

    fn record((events, requests, tokens_used, cost_micros, latency_sum_ms): Self::Shape) -> StoreResult<EventTotals> {
        Ok(EventTotals { events, requests, tokens_used, cost_micros, latency_sum_ms })
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|e| e.is_unique_violation())
}

/// Every rollup column, summed (saturating), in [`DAILY_COLUMNS`] order.
fn daily_sums<D: UsageDialect>() -> String {
    DAILY_COLUMNS.iter().map(|c| format!("COALESCE({}, 0)", D::sat_sum(c))).collect::<Vec<_>>().join(", ")
}

/// The rollups of an organization's keys over `from..=to`, every column summed per `group` (`key_id`
/// or `day`) and ordered by it.
fn sums<D: UsageDialect>(group: &str, org: OrgId, from: NaiveDate, to: NaiveDate) -> Stmt {
    Stmt::new(format!(
        "SELECT {group}, {} FROM usage_daily WHERE organization_id = $1 AND day >= $2 AND day <= $3
         GROUP BY {group} ORDER BY {group}",
        daily_sums::<D>()
    ))
    .arg(org)
    .arg(from)
    .arg(to)
}

/// Records the batch's id in `usage_batches`; `false` when it is there already (the batch was written).
async fn claim_batch<B: UsageBackend>(tx: &mut Transaction<'static, B::Db>, batch: &UsageBatch) -> StoreResult<bool> {
    let q = Stmt::new("INSERT INTO usage_batches (id, at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .arg(batch.id)
        .arg(batch.newest);
    Ok(B::Db::execute(&mut *tx, q).await? == 1)
}

/// What a batch write did when it was written before: nothing.
fn written_before(batch: &UsageBatch) -> RecordedBatch {
    RecordedBatch { inserted: 0, duplicates: batch.events() }
}

/// The batch when some of its raw events may be stored already: learns which ones went in
/// (`RETURNING`) and applies the effects of those, and of the folded events, only.
async fn record_batch_checked<B: UsageBackend>(b: &B, batch: &UsageBatch) -> StoreResult<RecordedBatch> {
    let mut tx = b.writer().await?;
    if !claim_batch::<B>(&mut tx, batch).await? {
        tx.rollback().await.map_err(B::Db::error)?;
        return Ok(written_before(batch));
    }
    let mut inserted: HashSet<Uuid> = HashSet::with_capacity(batch.raw.len());
    for mut q in B::Db::event_inserts(&batch.raw, true) {
        let ids: Vec<Uuid> = B::Db::fetch_built(&mut tx, &mut q).await?;
        inserted.extend(ids);
    }
    let fresh: Vec<&UsageEvent> = batch.raw.iter().filter(|e| inserted.contains(&e.id)).collect();
    let fx = batch.effects(fresh.iter().copied());
    for mut q in B::Db::effect_statements(&fx) {
        B::Db::execute_built(&mut tx, &mut q).await.map_err(B::Db::error)?;
    }
    tx.commit().await.map_err(B::Db::error)?;
    b.batch_written();
    let counted = batch.folded.events() + fresh.len() as u64;
    Ok(RecordedBatch { inserted: counted, duplicates: batch.events() - counted })
}

#[async_trait]
impl<B: UsageBackend> UsageStore for B {
    /// Optimistic: nearly every batch is new and all its raw events too, so its statements and
    /// effects are built before the transaction starts (a second batch gets ready while the first one
    /// writes), and the raw events go in unchecked. A batch whose id is recorded already is skipped.
    /// When a raw event is stored already (the same events in another batch), an insert reports fewer
    /// rows or fails with a unique violation; the transaction is rolled back and the batch written
    /// again, checked.
    async fn record_batch(&self, batch: &UsageBatch) -> StoreResult<RecordedBatch> {
        if batch.is_empty() {
            return Ok(RecordedBatch::default());
        }
        let inserts = B::Db::event_inserts(&batch.raw, false);
        let fx = batch.effects(&batch.raw);
        let effects = B::Db::effect_statements(&fx);
        let mut tx = self.writer().await?;
        if !claim_batch::<B>(&mut tx, batch).await? {
            tx.rollback().await.map_err(B::Db::error)?;
            return Ok(written_before(batch));
        }
        let mut rows = 0;
        for mut q in inserts {
            match B::Db::execute_built(&mut tx, &mut q).await {
                Ok(inserted) => rows += inserted,
                Err(e) if is_unique_violation(&e) => break,
                Err(e) => return Err(B::Db::error(e)),
            }
        }
        if rows != batch.raw.len() as u64 {
            tx.rollback().await.map_err(B::Db::error)?;
            return record_batch_checked(self, batch).await;
        }
        for mut q in effects {
            B::Db::execute_built(&mut tx, &mut q).await.map_err(B::Db::error)?;
        }
        tx.commit().await.map_err(B::Db::error)?;
        self.batch_written();
        Ok(RecordedBatch { inserted: batch.events(), duplicates: 0 })
    }

    async fn prune_usage_batches(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let mut tx = self.writer().await?;
        let deleted = B::Db::execute(&mut tx, Stmt::new("DELETE FROM usage_batches WHERE at < $1").arg(before)).await?;
        tx.commit().await.map_err(B::Db::error)?;
        Ok(deleted)
    }

    async fn fold_usage(&self) -> StoreResult<u64> {
        self.fold_pending().await
    }

    async fn key_usage_daily(&self, key_id: KeyId, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<DailyUsage>> {
        let q = Stmt::new(format!(
            "SELECT day, {} FROM usage_daily WHERE key_id = $1 AND day >= $2 AND day <= $3 ORDER BY day",
            DAILY_COLUMNS.join(", ")
        ))
        .arg(key_id)
        .arg(from)
        .arg(to);
        B::Db::fetch_all(&mut *self.reader().await?, q).await
    }

    async fn key_usage_endpoints(
        &self,
        key_id: KeyId,
        from: NaiveDate,
        to: NaiveDate,
        limit: u32,
    ) -> StoreResult<Vec<EndpointUsage>> {
        let q = Stmt::new(format!(
            "SELECT endpoint, {} FROM usage_daily_endpoints WHERE key_id = $1 AND day >= $2 AND day <= $3
             GROUP BY endpoint ORDER BY 2 DESC, endpoint LIMIT $4",
            ["requests", "errors", "tokens_used", "cost_micros"].map(B::Db::sat_sum).join(", ")
        ))
        .arg(key_id)
        .arg(from)
        .arg(to)
        .arg(i64::from(limit));
        B::Db::fetch_all(&mut *self.reader().await?, q).await
    }

    async fn org_usage_by_key(&self, org: OrgId, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<KeyTotals>> {
        B::Db::fetch_all(&mut *self.reader().await?, sums::<B::Db>("key_id", org, from, to)).await
    }

    async fn org_usage_daily(&self, org: OrgId, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<DailyUsage>> {
        let q = Stmt::new(format!(
            "SELECT day, {} FROM usage_org_daily WHERE organization_id = $1 AND day >= $2 AND day <= $3 ORDER BY day",
            DAILY_COLUMNS.join(", ")
        ))
        .arg(org)
        .arg(from)
        .arg(to);
        B::Db::fetch_all(&mut *self.reader().await?, q).await
    }

    async fn org_month_by_cost(&self, org: OrgId, month: NaiveDate, limit: Option<u32>) -> StoreResult<Vec<KeyTotals>> {
        // The order of the index usage_key_monthly_org_cost, so no sort.
        let mut q = Stmt::new(format!(
            "SELECT key_id, {} FROM usage_key_monthly WHERE organization_id = $1 AND month = $2
             ORDER BY cost_micros DESC, requests DESC, key_id",
            DAILY_COLUMNS.join(", ")
        ))
        .arg(org)
        .arg(month);
        if let Some(limit) = limit {
            q.push(" LIMIT ").push_arg(i64::from(limit));
        }
        B::Db::fetch_all(&mut *self.reader().await?, q).await
    }

    async fn org_month_keys(&self, org: OrgId, month: NaiveDate) -> StoreResult<u64> {
        let q = Stmt::new("SELECT COUNT(*) FROM usage_key_monthly WHERE organization_id = $1 AND month = $2")
            .arg(org)
            .arg(month);
        let n: i64 = B::Db::fetch_one(&mut *self.reader().await?, q).await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn owner_month_by_key(&self, org: OrgId, owner: &str, month: NaiveDate) -> StoreResult<Vec<KeyTotals>> {
        // One primary-key read per key of the owner (api_keys_owner_id), nothing summed.
        let q = Stmt::new(format!(
            "SELECT key_id, {} FROM usage_key_monthly
             WHERE key_id IN (SELECT id FROM api_keys WHERE organization_id = $1 AND owner_id = $2) AND month = $3
             ORDER BY key_id",
            DAILY_COLUMNS.join(", ")
        ))
        .arg(org)
        .arg(owner)
        .arg(month);
        B::Db::fetch_all(&mut *self.reader().await?, q).await
    }

    async fn owner_usage_daily(&self, org: OrgId, owner: &str, days: Days) -> StoreResult<Vec<DailyUsage>> {
        let q = Stmt::new(format!(
            "SELECT day, {} FROM usage_owner_daily
             WHERE organization_id = $1 AND owner_id = $2 AND day >= $3 AND day <= $4 ORDER BY day",
            DAILY_COLUMNS.join(", ")
        ))
        .arg(org)
        .arg(owner)
        .arg(*days.start())
        .arg(*days.end());
        B::Db::fetch_all(&mut *self.reader().await?, q).await
    }

    async fn keys_by_id(&self, ids: &[KeyId]) -> StoreResult<Vec<ApiKey>> {
        let mut conn = self.reader().await?;
        let mut keys = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(KEY_LOOKUP_CHUNK) {
            let mut q = Stmt::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE id IN ("));
            q.push_list(chunk.iter().map(|id| Arg::from(*id))).push(")");
            keys.extend(B::Db::fetch_all::<ApiKey>(&mut *conn, q).await?);
        }
        Ok(keys)
    }

    async fn quota_used(&self, subject: &str, month: &str) -> StoreResult<i64> {
        let q = Stmt::new("SELECT used FROM quota_usage WHERE subject = $1 AND month = $2").arg(subject).arg(month);
        Ok(B::Db::fetch_optional(&mut *self.reader().await?, q).await?.unwrap_or(0))
    }

    async fn usage_event_totals(
        &self,
        key_id: KeyId,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<EventTotals> {
        let q = Stmt::new(format!(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN kind IN ('verify', 'gateway') THEN 1 ELSE 0 END), 0),
                    COALESCE({}, 0), COALESCE({}, 0), COALESCE({}, 0)
             FROM usage_events WHERE key_id = $1 AND occurred_at >= $2 AND occurred_at < $3",
            B::Db::sat_sum("tokens_used"),
            B::Db::sat_sum("cost_micros"),
            B::Db::sat_sum("response_time_ms")
        ))
        .arg(key_id)
        .arg(from)
        .arg(until);
        B::Db::fetch_one(&mut *self.reader().await?, q).await
    }

    async fn prune_usage_events(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<u64> {
        let mut tx = self.writer().await?;
        let q = Stmt::new(
            "DELETE FROM usage_events WHERE id IN
                 (SELECT id FROM usage_events WHERE occurred_at < $1 ORDER BY occurred_at LIMIT $2)",
        )
        .arg(before)
        .arg(i64::from(limit));
        let deleted = B::Db::execute(&mut tx, q).await?;
        tx.commit().await.map_err(B::Db::error)?;
        Ok(deleted)
    }
}
