//! [`crate::LifecycleStore`]'s statements and reads, once for both SQL backends: the audit chain, the
//! event outbox, expiry and webhook deliveries.

use chrono::{DateTime, Utc};
use keyward_core::OrgId;
use keyward_core::audit_chain::{AuditContent, ChainBreak, ChainWalker, GENESIS};
use serde_json::json;
use uuid::Uuid;

use super::rows::{ChainHead, ChainedRow};
use super::{Backend, Db, Dialect, Reads, Stmt};
use crate::lifecycle::{BrokenLink, report};
use crate::{Actor, ApiKey, Attempt, AuditChainReport, Delivery, Event, EventKind, StoreResult, Webhook};

const WEBHOOK_COLUMNS: &str =
    "id, organization_id, url, events, is_active, secret, description, created_at, updated_at";
const DELIVERY_COLUMNS: &str = "id, endpoint_id, event_id, event, payload, status, attempts, next_attempt_at, \
     give_up_at, last_status_code, last_error, created_at, updated_at";

/// Rows per read of the chain walk.
const CHAIN_BATCH: i64 = 1_000;

/// The audit chain's head; the genesis hash before the first chained row.
async fn chain_head<D: Db + Reads<ChainHead>>(conn: &mut D::Connection, lock: &str) -> StoreResult<ChainHead> {
    let q = Stmt::new(format!("SELECT last_id, last_hash FROM audit_chain WHERE id = 1{lock}"));
    Ok(D::fetch_optional(conn, q).await?.unwrap_or_else(|| ChainHead(None, GENESIS.to_owned())))
}

/// The head, locked until the transaction ends (see [`super::store::append_audit`]).
pub(crate) async fn lock_chain_head<D: Db + Reads<ChainHead>>(conn: &mut D::Connection) -> StoreResult<ChainHead> {
    chain_head::<D>(conn, D::FOR_UPDATE).await
}

/// Writes an outbox event; with a dedup key, only once. Returns whether it was written.
pub(crate) async fn insert_event<D: Db>(
    conn: &mut D::Connection,
    event: &Event,
    dedup: Option<&str>,
) -> StoreResult<bool> {
    let q = Stmt::new(
        "INSERT INTO events (id, event, organization_id, key_id, dedup_key, payload, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (dedup_key) DO NOTHING",
    )
    .arg(event.id)
    .arg(event.event.as_str())
    .arg(event.organization_id.map(|id| id.0))
    .arg(event.key_id)
    .arg(dedup)
    .arg(&event.payload)
    .arg(event.created_at);
    Ok(D::execute(conn, q).await? == 1)
}

/// The outbox event of a change to a key, written in the change's transaction next to its audit row.
pub(crate) async fn key_event<D: Db>(
    conn: &mut D::Connection,
    event: EventKind,
    key: &ApiKey,
    actor: &Actor,
) -> StoreResult<()> {
    insert_event::<D>(conn, &Event::about_key(event, key, json!({ "actor": actor.actor }), actor.at), None).await?;
    Ok(())
}

/// Keys usable at `now` (active, not revoked by then) that expire in `(now, until]`, soonest first.
pub(crate) fn expiring<D: Db>(now: DateTime<Utc>, until: DateTime<Utc>, organization_id: Option<OrgId>) -> Stmt {
    let mut q = Stmt::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE"));
    q.push(&format!(" is_active = {} AND (revoked_at IS NULL OR revoked_at > ", D::TRUE)).push_arg(now).push(")");
    q.push(" AND expires_at > ").push_arg(now).push(" AND expires_at <= ").push_arg(until);
    if let Some(org) = organization_id {
        q.push(" AND organization_id = ").push_arg(org);
    }
    q.push(" ORDER BY expires_at, id");
    q
}

pub(crate) async fn list_expiring_keys<B: Backend>(
    b: &B,
    organization_id: Option<OrgId>,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
    limit: u32,
) -> StoreResult<Vec<ApiKey>> {
    let mut q = expiring::<B::Db>(now, until, organization_id);
    q.push(" LIMIT ").push_arg(i64::from(limit.max(1)));
    B::Db::fetch_all(&mut *b.reader().await?, q).await
}

/// Walks the whole audit chain, oldest row first, in one snapshot: the head and every row agree.
pub(crate) async fn verify_audit_chain<B: Backend>(b: &B) -> StoreResult<AuditChainReport> {
    let mut tx = b.snapshot().await?;
    let ChainHead(head_id, head_hash) = chain_head::<B::Db>(&mut *tx, "").await?;
    let mut walker = ChainWalker::new();
    let mut after = i64::MIN;
    loop {
        let q = Stmt::new(concat!(
            "SELECT ",
            chained_audit_columns!(),
            " FROM audit_log WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .arg(after)
        .arg(CHAIN_BATCH);
        let rows: Vec<ChainedRow> = B::Db::fetch_all(&mut *tx, q).await?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        for row in &rows {
            let content = AuditContent {
                action: &row.action,
                key_id: row.key_id.as_deref(),
                organization_id: row.organization_id.as_deref(),
                actor: &row.actor,
                actor_ip: row.actor_ip.as_deref(),
                details: &row.details,
                created_at: row.created_at,
            };
            if let Err(e) = walker.check(row.id, &content, row.prev_hash.as_deref(), row.row_hash.as_deref()) {
                let broken = BrokenLink { id: Some(row.id), reason: e.as_str().to_owned() };
                return Ok(report(&walker, Some(broken)));
            }
        }
    }
    tx.rollback().await.map_err(B::Db::error)?;
    let broken = walker
        .finish(head_id, &head_hash)
        .err()
        .map(|id| BrokenLink { id, reason: ChainBreak::Truncated.as_str().to_owned() });
    Ok(report(&walker, broken))
}

pub(crate) async fn list_events<B: Backend>(b: &B, after: Option<Uuid>, limit: u32) -> StoreResult<Vec<Event>> {
    let mut q = Stmt::new("SELECT id, event, organization_id, key_id, payload, created_at FROM events WHERE 1 = 1");
    if let Some(after) = after {
        q.push(" AND id > ").push_arg(after);
    }
    q.push(" ORDER BY id LIMIT ").push_arg(i64::from(limit.max(1)));
    B::Db::fetch_all(&mut *b.reader().await?, q).await
}

pub(crate) async fn select_webhook<D: Db + Reads<Webhook>>(conn: &mut D::Connection, id: Uuid) -> StoreResult<Webhook> {
    D::fetch_one(conn, Stmt::new(format!("SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE id = $1")).arg(id))
        .await
}

pub(crate) async fn get_webhook<B: Backend>(b: &B, id: Uuid) -> StoreResult<Webhook> {
    select_webhook::<B::Db>(&mut *b.reader().await?, id).await
}

pub(crate) async fn list_webhooks<B: Backend>(b: &B, organization_id: Option<OrgId>) -> StoreResult<Vec<Webhook>> {
    let mut q = Stmt::new(format!("SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE 1 = 1"));
    if let Some(org) = organization_id {
        q.push(" AND organization_id = ").push_arg(org);
    }
    q.push(" ORDER BY id DESC LIMIT 1000");
    B::Db::fetch_all(&mut *b.reader().await?, q).await
}

pub(crate) async fn select_delivery<D: Db + Reads<Delivery>>(
    conn: &mut D::Connection,
    id: Uuid,
) -> StoreResult<Delivery> {
    let q = Stmt::new(format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1")).arg(id);
    D::fetch_one(conn, q).await
}

pub(crate) async fn list_deliveries<B: Backend>(b: &B, endpoint: Uuid, limit: u32) -> StoreResult<Vec<Delivery>> {
    let q = Stmt::new(format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE endpoint_id = $1 ORDER BY id DESC LIMIT $2"
    ))
    .arg(endpoint)
    .arg(i64::from(limit.max(1)));
    B::Db::fetch_all(&mut *b.reader().await?, q).await
}

pub(crate) async fn list_attempts<B: Backend>(b: &B, delivery: Uuid) -> StoreResult<Vec<Attempt>> {
    let q = Stmt::new(
        "SELECT attempted_at, status_code, latency_ms, error FROM webhook_attempts WHERE delivery_id = $1
         ORDER BY id",
    )
    .arg(delivery);
    B::Db::fetch_all(&mut *b.reader().await?, q).await
}
