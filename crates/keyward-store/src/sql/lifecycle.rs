//! [`LifecycleStore`] for every SQL backend, written once: rotation, expiry, the audit chain, the event
//! outbox and webhook deliveries. Each change runs in one transaction (see [`super::store`]); a
//! transaction takes the audit chain head last, after the rows it changes, so that appends from every
//! process are serialized without lock cycles.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::audit_chain::{AuditContent, ChainBreak, ChainWalker, GENESIS};
use keyward_core::{KeyId, OrgId};
use uuid::Uuid;

use super::rows::{ChainHead, ChainedRow};
use super::store::{KeyInsert, finish, insert_key_rows, lock_key, record, select_key, select_org};
use super::{Backend, Db, Dialect, Reads, Stmt};
use crate::effects;
use crate::lifecycle::{BrokenLink, delivery_body, expiring_dedup, report, subscribed_to};
use crate::{
    Actor, ApiKey, Attempt, AttemptOutcome, AuditChainReport, Changed, Delivery, DeliveryJob, Event, EventKind,
    LifecycleStore, NewKey, NewWebhook, Rotation, StoreError, StoreResult, Webhook, WebhookPatch,
};

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

/// Keys usable at `now` (active, not revoked by then), `AND` more conditions.
fn usable<D: Dialect>(now: DateTime<Utc>) -> Stmt {
    let mut q = Stmt::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE"));
    q.push(&format!(" is_active = {} AND (revoked_at IS NULL OR revoked_at > ", D::TRUE)).push_arg(now).push(")");
    q
}

/// Keys usable at `now` that expire in `(now, until]`, soonest first.
fn expiring<D: Dialect>(now: DateTime<Utc>, until: DateTime<Utc>, organization_id: Option<OrgId>) -> Stmt {
    let mut q = usable::<D>(now);
    q.push(" AND expires_at > ").push_arg(now).push(" AND expires_at <= ").push_arg(until);
    if let Some(org) = organization_id {
        q.push(" AND organization_id = ").push_arg(org);
    }
    q.push(" ORDER BY expires_at, id");
    q
}

async fn select_webhook<D: Db + Reads<Webhook>>(conn: &mut D::Connection, id: Uuid) -> StoreResult<Webhook> {
    D::fetch_one(conn, Stmt::new(format!("SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE id = $1")).arg(id))
        .await
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
            let rows: Vec<ChainedRow> = B::Db::fetch_all(&mut tx, q).await?;
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

    // Webhooks: endpoints, and delivering the outbox to them.

    async fn insert_webhook(&self, hook: NewWebhook, actor: &Actor) -> StoreResult<Webhook> {
        let mut tx = self.writer().await?;
        // An unknown organization is NotFound, as for keys, not a foreign-key failure.
        select_org::<B::Db>(&mut tx, hook.organization_id).await?;
        let insert = Stmt::new(format!(
            "INSERT INTO webhook_endpoints (id, organization_id, url, events, is_active, secret, description,
                 created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
             RETURNING {WEBHOOK_COLUMNS}"
        ))
        .arg(hook.id)
        .arg(hook.organization_id)
        .arg(&hook.url)
        .arg(hook.events.clone())
        .arg(hook.is_active)
        .arg(&hook.secret.0)
        .arg(&hook.description)
        .arg(actor.at);
        let created: Webhook = B::Db::fetch_one(&mut tx, insert).await?;
        record::<B::Db>(&mut tx, &effects::webhook_created(&created), actor).await?;
        tx.commit().await.map_err(B::Db::error)?;
        Ok(created)
    }

    async fn get_webhook(&self, id: Uuid) -> StoreResult<Webhook> {
        select_webhook::<B::Db>(&mut *self.reader().await?, id).await
    }

    async fn list_webhooks(&self, organization_id: Option<OrgId>) -> StoreResult<Vec<Webhook>> {
        let mut q = Stmt::new(format!("SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE 1 = 1"));
        if let Some(org) = organization_id {
            q.push(" AND organization_id = ").push_arg(org);
        }
        q.push(" ORDER BY id DESC LIMIT 1000");
        B::Db::fetch_all(&mut *self.reader().await?, q).await
    }

    async fn update_webhook(&self, id: Uuid, patch: WebhookPatch, actor: &Actor) -> StoreResult<Webhook> {
        let mut tx = self.writer().await?;
        let lock = format!("SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE id = $1{}", B::Db::FOR_UPDATE);
        let before: Webhook = B::Db::fetch_one(&mut tx, Stmt::new(lock).arg(id)).await?;
        let Some((after, effects)) = effects::webhook_updated(&before, patch) else {
            return Ok(before);
        };
        let update = Stmt::new(format!(
            "UPDATE webhook_endpoints SET url = $1, events = $2, is_active = $3, description = $4, updated_at = $5
             WHERE id = $6
             RETURNING {WEBHOOK_COLUMNS}"
        ))
        .arg(&after.url)
        .arg(after.events.clone())
        .arg(after.is_active)
        .arg(&after.description)
        .arg(actor.at)
        .arg(id);
        finish(tx, update, &effects, actor).await
    }

    async fn delete_webhook(&self, id: Uuid, actor: &Actor) -> StoreResult<()> {
        let mut tx = self.writer().await?;
        let before = select_webhook::<B::Db>(&mut tx, id).await?;
        B::Db::execute(&mut tx, Stmt::new("DELETE FROM webhook_endpoints WHERE id = $1").arg(id)).await?;
        record::<B::Db>(&mut tx, &effects::webhook_deleted(&before), actor).await?;
        tx.commit().await.map_err(B::Db::error)
    }

    async fn dispatch_events(&self, now: DateTime<Utc>, give_up_at: DateTime<Utc>, limit: u32) -> StoreResult<usize> {
        let mut tx = self.writer().await?;
        // Skipping locked rows: two nodes dispatching at once take different events.
        let due = Stmt::new(format!(
            "SELECT id, event, organization_id, key_id, payload, created_at FROM events
             WHERE dispatched_at IS NULL ORDER BY id LIMIT $1{}",
            B::Db::SKIP_LOCKED
        ))
        .arg(i64::from(limit.max(1)));
        let events: Vec<Event> = B::Db::fetch_all(&mut tx, due).await?;
        let mut made = 0;
        for event in events {
            // An event of no organization goes to the endpoints that named it (see `subscribed_to`).
            let mut q = Stmt::new(format!(
                "SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE is_active = {} AND id < ",
                B::Db::TRUE
            ));
            q.push_arg(event.id);
            if let Some(org) = event.organization_id {
                q.push(" AND organization_id = ").push_arg(org);
            }
            let hooks: Vec<Webhook> = B::Db::fetch_all(&mut tx, q).await?;
            let body = delivery_body(&event);
            for hook in hooks.iter().filter(|hook| subscribed_to(&hook.events, &event)) {
                let delivery = Stmt::new(
                    "INSERT INTO webhook_deliveries (id, endpoint_id, event_id, event, payload, status, attempts,
                         next_attempt_at, give_up_at, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $7, $6, $6)
                     ON CONFLICT (endpoint_id, event_id) DO NOTHING",
                )
                .arg(Uuid::now_v7())
                .arg(hook.id)
                .arg(event.id)
                .arg(event.event.as_str())
                .arg(&body)
                .arg(now)
                .arg(give_up_at);
                made += B::Db::execute(&mut tx, delivery).await? as usize;
            }
            let dispatched = Stmt::new("UPDATE events SET dispatched_at = $1 WHERE id = $2").arg(now).arg(event.id);
            B::Db::execute(&mut tx, dispatched).await?;
        }
        tx.commit().await.map_err(B::Db::error)?;
        Ok(made)
    }

    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<DeliveryJob>> {
        let mut tx = self.writer().await?;
        let claim = Stmt::new(format!(
            "UPDATE webhook_deliveries SET next_attempt_at = $1
             WHERE id IN (SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= $2
                          ORDER BY next_attempt_at, id LIMIT $3{})
             RETURNING {DELIVERY_COLUMNS}",
            B::Db::SKIP_LOCKED
        ))
        .arg(lease_until)
        .arg(now)
        .arg(i64::from(limit.max(1)));
        let mut claimed: Vec<Delivery> = B::Db::fetch_all(&mut tx, claim).await?;
        claimed.sort_by_key(|delivery| delivery.id);
        let mut jobs = Vec::with_capacity(claimed.len());
        for delivery in claimed {
            let hook = select_webhook::<B::Db>(&mut tx, delivery.endpoint_id).await?;
            jobs.push(DeliveryJob { delivery, url: hook.url, secret: hook.secret });
        }
        tx.commit().await.map_err(B::Db::error)?;
        Ok(jobs)
    }

    async fn record_attempt(&self, delivery: Uuid, attempt: &Attempt, outcome: AttemptOutcome) -> StoreResult<()> {
        let mut tx = self.writer().await?;
        let insert = Stmt::new(
            "INSERT INTO webhook_attempts (delivery_id, attempted_at, status_code, latency_ms, error)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .arg(delivery)
        .arg(attempt.attempted_at)
        .arg(attempt.status_code)
        .arg(attempt.latency_ms)
        .arg(&attempt.error);
        B::Db::execute(&mut tx, insert).await?;
        let update = Stmt::new(
            "UPDATE webhook_deliveries SET status = $1, attempts = attempts + 1, next_attempt_at = $2,
                 last_status_code = $3, last_error = $4, updated_at = $5
             WHERE id = $6",
        )
        .arg(outcome.status())
        .arg(outcome.next_attempt_at())
        .arg(attempt.status_code)
        .arg(&attempt.error)
        .arg(attempt.attempted_at)
        .arg(delivery);
        B::Db::execute(&mut tx, update).await?;
        tx.commit().await.map_err(B::Db::error)
    }

    async fn list_deliveries(&self, endpoint: Uuid, limit: u32) -> StoreResult<Vec<Delivery>> {
        let q = Stmt::new(format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE endpoint_id = $1 ORDER BY id DESC LIMIT $2"
        ))
        .arg(endpoint)
        .arg(i64::from(limit.max(1)));
        B::Db::fetch_all(&mut *self.reader().await?, q).await
    }

    async fn list_attempts(&self, delivery: Uuid) -> StoreResult<Vec<Attempt>> {
        let q = Stmt::new(
            "SELECT attempted_at, status_code, latency_ms, error FROM webhook_attempts WHERE delivery_id = $1
             ORDER BY id",
        )
        .arg(delivery);
        B::Db::fetch_all(&mut *self.reader().await?, q).await
    }

    async fn retry_delivery(
        &self,
        endpoint: Uuid,
        delivery: Uuid,
        now: DateTime<Utc>,
        give_up_at: DateTime<Utc>,
    ) -> StoreResult<Delivery> {
        let mut tx = self.writer().await?;
        let retry = Stmt::new(format!(
            "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $1, give_up_at = $2, updated_at = $1
             WHERE id = $3 AND endpoint_id = $4
             RETURNING {DELIVERY_COLUMNS}"
        ))
        .arg(now)
        .arg(give_up_at)
        .arg(delivery)
        .arg(endpoint);
        let retried = B::Db::fetch_optional(&mut tx, retry).await?.ok_or(StoreError::NotFound)?;
        tx.commit().await.map_err(B::Db::error)?;
        Ok(retried)
    }
}
