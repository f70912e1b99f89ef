//! [`LifecycleStore`] for every SQL backend, written once: rotation, expiry, the audit chain and the
//! event outbox. Each change runs in one transaction (see [`super::store`]); a
//! transaction takes the audit chain head last, after the rows it changes, so that appends from every
//! process are serialized without lock cycles.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::audit_chain::{ChainBreak, ChainWalker, GENESIS};
use keyward_core::{KeyId, OrgId};
use uuid::Uuid;

use super::rows::{ChainHead, ChainRow};
use super::store::{KeyInsert, insert_key_rows, lock_key, push_expiring, record, select_key};
use super::{Backend, Db, Dialect, Reads, Stmt};
use crate::effects;
use crate::lifecycle::{BrokenLink, expiring_dedup, report};
use crate::{
    Actor, ApiKey, AuditChainReport, Changed, Event, EventKind, LifecycleStore, NewKey, Rotation, StoreResult,
};

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

/// Keys usable at `now` (active, not revoked by then), `AND` more conditions.
fn usable<D: Dialect>(now: DateTime<Utc>) -> Stmt {
    let mut q = Stmt::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE"));
    q.push(&format!(" is_active = {} AND (revoked_at IS NULL OR revoked_at > ", D::TRUE)).push_arg(now).push(")");
    q
}

/// Keys usable at `now` that expire in `(now, until]`, soonest first.
fn expiring<D: Dialect>(now: DateTime<Utc>, until: DateTime<Utc>, organization_id: Option<OrgId>) -> Stmt {
    let mut q = usable::<D>(now);
    push_expiring(&mut q, now, until);
    if let Some(org) = organization_id {
        q.push(" AND organization_id = ").push_arg(org);
    }
    q.push(" ORDER BY expires_at, id");
    q
}

#[async_trait]
impl<B: Backend> LifecycleStore for B {
    async fn rotate_key(
        &self,
        old: KeyId,
        new: NewKey,
        revoke_at: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Changed<Rotation>> {
        let mut tx = self.writer().await?;
        let before = lock_key::<B::Db>(&mut tx, old).await?;
        let revoke_at = effects::rotation_revokes_at(&before, &new, revoke_at, actor.at)?;
        let new = NewKey { rotated_from: Some(old), ..new };
        insert_key_rows::<B::Db>(&mut tx, &[KeyInsert { key: &new, legacy: false, created_at: actor.at }], actor)
            .await?;
        let lineage = Stmt::new("UPDATE api_keys SET lineage_id = $1 WHERE id = $2").arg(before.lineage()).arg(new.id);
        B::Db::execute(&mut tx, lineage).await?;
        let retire = Stmt::new(concat!(
            "UPDATE api_keys SET replaced_by = $1, revoked_at = $2, revoke_reason = 'rotated', updated_at = $3
             WHERE id = $4
             RETURNING ",
            key_columns!()
        ))
        .arg(new.id)
        .arg(revoke_at)
        .arg(actor.at)
        .arg(old);
        let old_after: ApiKey = B::Db::fetch_one(&mut tx, retire).await?;
        let created = select_key::<B::Db>(&mut tx, new.id).await?;
        let effects = effects::key_rotated(&before, &old_after, &created, revoke_at, actor);
        record::<B::Db>(&mut tx, &effects, actor).await?;
        tx.commit().await.map_err(B::Db::error)?;
        Ok(Changed::rotated(Rotation { old: old_after, new: created }))
    }

    async fn list_expiring_keys(
        &self,
        organization_id: Option<OrgId>,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<ApiKey>> {
        let mut q = expiring::<B::Db>(now, until, organization_id);
        q.push(" LIMIT ").push_arg(i64::from(limit.max(1)));
        B::Db::fetch_all(&mut *self.reader().await?, q).await
    }

    async fn expire_keys(
        &self,
        organization_id: Option<OrgId>,
        now: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Changed<Vec<ApiKey>>> {
        let mut tx = self.writer().await?;
        // The key rows are locked (in id order, so two sweepers cannot deadlock) and changed before the
        // first audit append takes the chain head.
        let mut q = usable::<B::Db>(now);
        q.push(" AND expires_at IS NOT NULL AND expires_at <= ").push_arg(now);
        if let Some(org) = organization_id {
            q.push(" AND organization_id = ").push_arg(org);
        }
        q.push(" ORDER BY id").push(B::Db::FOR_UPDATE);
        let due: Vec<ApiKey> = B::Db::fetch_all(&mut tx, q).await?;
        let mut changed = Vec::with_capacity(due.len());
        for before in due {
            let deactivate = Stmt::new(format!(
                concat!("UPDATE api_keys SET is_active = {}, updated_at = $1 WHERE id = $2 RETURNING ", key_columns!()),
                B::Db::FALSE
            ))
            .arg(actor.at)
            .arg(before.id);
            let after: ApiKey = B::Db::fetch_one(&mut tx, deactivate).await?;
            changed.push((before, after));
        }
        let mut expired = Vec::with_capacity(changed.len());
        for (before, after) in changed {
            record::<B::Db>(&mut tx, &effects::key_expired(&before, &after, actor), actor).await?;
            expired.push(after);
        }
        tx.commit().await.map_err(B::Db::error)?;
        Ok(Changed::expired(expired))
    }

    async fn record_expiring_events(&self, now: DateTime<Utc>, days: u32) -> StoreResult<Vec<Event>> {
        let until = now + chrono::Duration::days(i64::from(days));
        let mut tx = self.writer().await?;
        let keys: Vec<ApiKey> = B::Db::fetch_all(&mut tx, expiring::<B::Db>(now, until, None)).await?;
        let mut events = Vec::new();
        for key in keys {
            let extra = serde_json::json!({ "expires_at": key.expires_at, "days": days });
            let event = Event::about_key(EventKind::KeyExpiring, &key, extra, now);
            if insert_event::<B::Db>(&mut tx, &event, Some(&expiring_dedup(&key, days))).await? {
                events.push(event);
            }
        }
        tx.commit().await.map_err(B::Db::error)?;
        Ok(events)
    }

    /// Walks the whole audit chain, oldest row first, in one snapshot: the head and every row agree.
    async fn verify_audit_chain(&self) -> StoreResult<AuditChainReport> {
        let mut tx = self.snapshot().await?;
        let ChainHead(head_id, head_hash) = chain_head::<B::Db>(&mut tx, "").await?;
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
            let rows: Vec<ChainRow<B::Db>> = B::Db::fetch_all(&mut tx, q).await?;
            let Some(last) = rows.last() else { break };
            after = last.id();
            for row in rows {
                let id = row.id();
                if let Err(e) = row.check(&mut walker)? {
                    let broken = BrokenLink { id: Some(id), reason: e.as_str().to_owned() };
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

    async fn list_events(&self, after: Option<Uuid>, limit: u32) -> StoreResult<Vec<Event>> {
        let mut q = Stmt::new("SELECT id, event, organization_id, key_id, payload, created_at FROM events WHERE 1 = 1");
        if let Some(after) = after {
            q.push(" AND id > ").push_arg(after);
        }
        q.push(" ORDER BY id LIMIT ").push_arg(i64::from(limit.max(1)));
        B::Db::fetch_all(&mut *self.reader().await?, q).await
    }

    async fn record_event(&self, event: &Event, dedup_key: Option<&str>) -> StoreResult<bool> {
        let mut tx = self.writer().await?;
        let written = insert_event::<B::Db>(&mut tx, event, dedup_key).await?;
        tx.commit().await.map_err(B::Db::error)?;
        Ok(written)
    }
}
