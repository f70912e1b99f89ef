//! [`LifecycleStore`] and [`WebhookStore`] on PostgreSQL: rotation, expiry, the audit chain, the event
//! outbox and webhook deliveries. Every audit append locks the chain head row (`audit_chain`,
//! `FOR UPDATE`) until its transaction ends, so appends from every node are serialized and ids are
//! assigned in chain order. To stay clear of lock cycles, a transaction takes the chain head last: key
//! rows are locked and changed first.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::audit_chain::{AuditContent, ChainWalker, GENESIS};
use keyward_core::{KeyId, OrgId};
use serde_json::json;
use sqlx::postgres::PgConnection;
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use super::{KeyInsert, KeyRow, PostgresStore, append_audit, db, insert_key_rows, select_key, select_org};
use crate::lifecycle::{BrokenLink, expiring_dedup, report, rotate_details};
use crate::webhook::{delivery_body, subscribed_to};
use crate::{
    Actor, ApiKey, Attempt, AttemptOutcome, AuditChainReport, Changed, Delivery, DeliveryJob, Event, LifecycleStore,
    NewKey, NewWebhook, Rotation, StoreError, StoreResult, Webhook, WebhookPatch, WebhookSecret, WebhookStore,
    stored_time,
};

/// The chain link of a new audit row: the current head's hash and the row's own hash.
pub(super) async fn chain_link(conn: &mut PgConnection, content: &AuditContent<'_>) -> StoreResult<(String, String)> {
    let prev: String = sqlx::query_scalar("SELECT last_hash FROM audit_chain WHERE id = 1 FOR UPDATE")
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?
        .unwrap_or_else(|| GENESIS.to_owned());
    let hash = content.row_hash(&prev);
    Ok((prev, hash))
}

/// Moves the chain head to the row just inserted.
pub(super) async fn chain_advance(conn: &mut PgConnection, id: i64, hash: &str) -> StoreResult<()> {
    sqlx::query("UPDATE audit_chain SET last_id = $1, last_hash = $2 WHERE id = 1")
        .bind(id)
        .bind(hash)
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// Writes an outbox event; with a dedup key, only once. Returns whether it was written.
pub(super) async fn insert_event(conn: &mut PgConnection, event: &Event, dedup: Option<&str>) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT INTO events (id, event, organization_id, key_id, dedup_key, payload, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (dedup_key) DO NOTHING",
    )
    .bind(event.id)
    .bind(&event.event)
    .bind(event.organization_id.map(|id| id.0))
    .bind(event.key_id.map(|id| id.0))
    .bind(dedup)
    .bind(Json(&event.payload))
    .bind(event.created_at)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(done.rows_affected() == 1)
}

/// The outbox event of a change to a key, written in the change's transaction next to its audit row.
pub(super) async fn key_event(conn: &mut PgConnection, event: &str, key: &ApiKey, actor: &Actor) -> StoreResult<()> {
    insert_event(conn, &Event::about_key(event, key, json!({ "actor": actor.actor }), actor.at), None).await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct ChainRow {
    id: i64,
    action: String,
    key_id: Option<Uuid>,
    organization_id: Option<Uuid>,
    actor: String,
    actor_ip: Option<String>,
    details: Json<serde_json::Value>,
    created_at: DateTime<Utc>,
    prev_hash: Option<String>,
    row_hash: Option<String>,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    id: Uuid,
    event: String,
    organization_id: Option<Uuid>,
    key_id: Option<Uuid>,
    payload: Json<serde_json::Value>,
    created_at: DateTime<Utc>,
}

impl EventRow {
    fn into_event(self) -> Event {
        Event {
            id: self.id,
            event: self.event,
            organization_id: self.organization_id.map(OrgId),
            key_id: self.key_id.map(KeyId),
            payload: self.payload.0,
            created_at: self.created_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct WebhookRow {
    id: Uuid,
    organization_id: Uuid,
    url: String,
    events: Vec<String>,
    is_active: bool,
    secret: String,
    description: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl WebhookRow {
    fn into_webhook(self) -> Webhook {
        Webhook {
            id: self.id,
            organization_id: OrgId(self.organization_id),
            url: self.url,
            events: self.events,
            is_active: self.is_active,
            secret: WebhookSecret(self.secret),
            description: self.description,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

const WEBHOOK_COLUMNS: &str =
    "id, organization_id, url, events, is_active, secret, description, created_at, updated_at";
const DELIVERY_COLUMNS: &str = "id, endpoint_id, event_id, event, payload, status, attempts, next_attempt_at, \
     give_up_at, last_status_code, last_error, created_at, updated_at";

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    id: Uuid,
    endpoint_id: Uuid,
    event_id: Uuid,
    event: String,
    payload: Json<serde_json::Value>,
    status: String,
    attempts: i64,
    next_attempt_at: Option<DateTime<Utc>>,
    give_up_at: DateTime<Utc>,
    last_status_code: Option<i64>,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl DeliveryRow {
    fn into_delivery(self) -> Delivery {
        Delivery {
            id: self.id,
            endpoint_id: self.endpoint_id,
            event_id: self.event_id,
            event: self.event,
            payload: self.payload.0,
            status: self.status,
            attempts: self.attempts,
            next_attempt_at: self.next_attempt_at,
            give_up_at: self.give_up_at,
            last_status_code: self.last_status_code,
            last_error: self.last_error,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

async fn select_webhook(conn: &mut PgConnection, id: Uuid) -> StoreResult<Webhook> {
    Ok(sqlx::query_as::<_, WebhookRow>(&format!("SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE id = $1"))
        .bind(id)
        .fetch_one(conn)
        .await
        .map_err(db)?
        .into_webhook())
}

/// Rows per read of the chain walk.
const CHAIN_BATCH: i64 = 1_000;

/// Keys usable at `now` (active, not revoked by then).
const USABLE: &str = " is_active AND (revoked_at IS NULL OR revoked_at > ";

#[async_trait]
impl LifecycleStore for PostgresStore {
    async fn rotate_key(
        &self,
        old: KeyId,
        new: NewKey,
        revoke_at: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Changed<Rotation>> {
        let revoke_at = stored_time(revoke_at);
        let mut tx = self.begin().await?;
        let before = select_key(&mut tx, old, true).await?;
        if before.replaced_by.is_some() {
            return Err(StoreError::Conflict("the key was already rotated".to_owned()));
        }
        if before.revoked_at.is_some_and(|at| at <= actor.at) {
            return Err(StoreError::Conflict("the key is revoked".to_owned()));
        }
        if new.organization_id != before.organization_id {
            return Err(StoreError::Internal("a rotation names another organization".to_owned()));
        }
        let new = NewKey { rotated_from: Some(old), ..new };
        insert_key_rows(&mut tx, &[KeyInsert { key: &new, legacy: false, created_at: actor.at }], actor).await?;
        sqlx::query("UPDATE api_keys SET lineage_id = $1 WHERE id = $2")
            .bind(before.lineage().0)
            .bind(new.id.0)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let revoke_at = before.revoked_at.map_or(revoke_at, |at| at.min(revoke_at));
        sqlx::query(
            "UPDATE api_keys SET replaced_by = $1, revoked_at = $2, revoke_reason = 'rotated', updated_at = $3
             WHERE id = $4",
        )
        .bind(new.id.0)
        .bind(revoke_at)
        .bind(actor.at)
        .bind(old.0)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let old_after = select_key(&mut tx, old, false).await?;
        let created = select_key(&mut tx, new.id, false).await?;
        let org = before.organization_id;
        append_audit(&mut tx, "rotate", Some(old), org, actor, &rotate_details(&before, &old_after, new.id)).await?;
        let details = json!({ "after": created.audit_json(), "rotated_from": old });
        append_audit(&mut tx, "create", Some(created.id), org, actor, &details).await?;
        let extra = json!({ "rotated_from": old, "old_key_revoked_at": revoke_at });
        insert_event(&mut tx, &Event::about_key("key.rotated", &created, extra, actor.at), None).await?;
        tx.commit().await.map_err(db)?;
        Ok(Changed::rotated(Rotation { old: old_after, new: created }))
    }

    async fn list_expiring_keys(
        &self,
        organization_id: Option<OrgId>,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<ApiKey>> {
        let mut qb = QueryBuilder::<Postgres>::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE"));
        qb.push(USABLE).push_bind(now).push(")");
        qb.push(" AND expires_at > ").push_bind(now).push(" AND expires_at <= ").push_bind(until);
        if let Some(org) = organization_id {
            qb.push(" AND organization_id = ").push_bind(org.0);
        }
        qb.push(" ORDER BY expires_at, id LIMIT ").push_bind(i64::from(limit.max(1)));
        let rows = qb.build_query_as::<KeyRow>().fetch_all(&self.pool).await.map_err(db)?;
        rows.into_iter().map(KeyRow::into_key).collect()
    }

    async fn expire_keys(
        &self,
        organization_id: Option<OrgId>,
        now: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Changed<Vec<ApiKey>>> {
        let mut tx = self.begin().await?;
        // The key rows are locked (in id order, so two sweepers cannot deadlock) and changed before the
        // first audit append takes the chain head.
        let mut qb = QueryBuilder::<Postgres>::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE"));
        qb.push(USABLE).push_bind(now).push(")");
        qb.push(" AND expires_at IS NOT NULL AND expires_at <= ").push_bind(now);
        if let Some(org) = organization_id {
            qb.push(" AND organization_id = ").push_bind(org.0);
        }
        qb.push(" ORDER BY id FOR UPDATE");
        let rows = qb.build_query_as::<KeyRow>().fetch_all(&mut *tx).await.map_err(db)?;
        let mut changed = Vec::with_capacity(rows.len());
        for row in rows {
            let before = row.into_key()?;
            let after = sqlx::query_as::<_, KeyRow>(concat!(
                "UPDATE api_keys SET is_active = false, updated_at = $1 WHERE id = $2 RETURNING ",
                key_columns!()
            ))
            .bind(actor.at)
            .bind(before.id.0)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?
            .into_key()?;
            changed.push((before, after));
        }
        let mut expired = Vec::with_capacity(changed.len());
        for (before, after) in changed {
            let details =
                keyward_core::diff::diff(&before.audit_json(), &after.audit_json()).unwrap_or_else(|| json!({}));
            append_audit(&mut tx, "expire", Some(after.id), after.organization_id, actor, &details).await?;
            let extra = json!({ "expired_at": after.expires_at });
            insert_event(&mut tx, &Event::about_key("key.expired", &after, extra, actor.at), None).await?;
            expired.push(after);
        }
        tx.commit().await.map_err(db)?;
        Ok(Changed::expired(expired))
    }

    async fn record_expiring_events(&self, now: DateTime<Utc>, days: u32) -> StoreResult<Vec<Event>> {
        let until = now + chrono::Duration::days(i64::from(days));
        let mut tx = self.begin().await?;
        let mut qb = QueryBuilder::<Postgres>::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE"));
        qb.push(USABLE).push_bind(now).push(")");
        qb.push(" AND expires_at > ").push_bind(now).push(" AND expires_at <= ").push_bind(until);
        qb.push(" ORDER BY expires_at, id");
        let rows = qb.build_query_as::<KeyRow>().fetch_all(&mut *tx).await.map_err(db)?;
        let mut events = Vec::new();
        for row in rows {
            let key = row.into_key()?;
            let extra = json!({ "expires_at": key.expires_at, "days": days });
            let event = Event::about_key("key.expiring", &key, extra, now);
            if insert_event(&mut tx, &event, Some(&expiring_dedup(&key, days))).await? {
                events.push(event);
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(events)
    }

    async fn verify_audit_chain(&self) -> StoreResult<AuditChainReport> {
        // One read transaction: the head and every row come from the same snapshot.
        let mut tx = self.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let (head_id, head_hash): (Option<i64>, String) =
            sqlx::query_as("SELECT last_id, last_hash FROM audit_chain WHERE id = 1")
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?
                .unwrap_or((None, GENESIS.to_owned()));
        let mut walker = ChainWalker::new();
        let mut after = i64::MIN;
        loop {
            let rows = sqlx::query_as::<_, ChainRow>(concat!(
                "SELECT ",
                chained_audit_columns!(),
                " FROM audit_log WHERE id > $1 ORDER BY id LIMIT $2"
            ))
            .bind(after)
            .bind(CHAIN_BATCH)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
            let Some(last) = rows.last() else { break };
            after = last.id;
            for row in rows {
                let (key_id, org_id) =
                    (row.key_id.map(|id| id.to_string()), row.organization_id.map(|id| id.to_string()));
                let content = AuditContent {
                    action: &row.action,
                    key_id: key_id.as_deref(),
                    organization_id: org_id.as_deref(),
                    actor: &row.actor,
                    actor_ip: row.actor_ip.as_deref(),
                    details: &row.details.0,
                    created_at: row.created_at,
                };
                if let Err(e) = walker.check(row.id, &content, row.prev_hash.as_deref(), row.row_hash.as_deref()) {
                    let broken = BrokenLink { id: Some(row.id), reason: e.as_str().to_owned() };
                    return Ok(report(&walker, Some(broken)));
                }
            }
        }
        tx.rollback().await.map_err(db)?;
        let broken = walker
            .finish(head_id, &head_hash)
            .err()
            .map(|id| BrokenLink { id, reason: keyward_core::audit_chain::ChainBreak::Truncated.as_str().to_owned() });
        Ok(report(&walker, broken))
    }

    async fn list_events(&self, after: Option<Uuid>, limit: u32) -> StoreResult<Vec<Event>> {
        let mut qb = QueryBuilder::<Postgres>::new(
            "SELECT id, event, organization_id, key_id, payload, created_at FROM events WHERE true",
        );
        if let Some(after) = after {
            qb.push(" AND id > ").push_bind(after);
        }
        qb.push(" ORDER BY id LIMIT ").push_bind(i64::from(limit.max(1)));
        let rows = qb.build_query_as::<EventRow>().fetch_all(&self.pool).await.map_err(db)?;
        Ok(rows.into_iter().map(EventRow::into_event).collect())
    }

    async fn record_event(&self, event: &Event, dedup_key: Option<&str>) -> StoreResult<bool> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        insert_event(&mut conn, event, dedup_key).await
    }
}

#[async_trait]
impl WebhookStore for PostgresStore {
    async fn insert_webhook(&self, hook: NewWebhook, actor: &Actor) -> StoreResult<Webhook> {
        let mut tx = self.begin().await?;
        // An unknown organization is NotFound, as for keys, not a foreign-key failure.
        select_org(&mut tx, hook.organization_id, false).await?;
        sqlx::query(
            "INSERT INTO webhook_endpoints (id, organization_id, url, events, is_active, secret, description,
                 created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        )
        .bind(hook.id)
        .bind(hook.organization_id.0)
        .bind(&hook.url)
        .bind(&hook.events)
        .bind(hook.is_active)
        .bind(&hook.secret.0)
        .bind(&hook.description)
        .bind(stored_time(actor.at))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let created = select_webhook(&mut tx, hook.id).await?;
        let details = json!({ "after": created.audit_json() });
        append_audit(&mut tx, "webhook_create", None, created.organization_id, actor, &details).await?;
        tx.commit().await.map_err(db)?;
        Ok(created)
    }

    async fn get_webhook(&self, id: Uuid) -> StoreResult<Webhook> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        select_webhook(&mut conn, id).await
    }

    async fn list_webhooks(&self, organization_id: Option<OrgId>) -> StoreResult<Vec<Webhook>> {
        let mut qb =
            QueryBuilder::<Postgres>::new(format!("SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE true"));
        if let Some(org) = organization_id {
            qb.push(" AND organization_id = ").push_bind(org.0);
        }
        qb.push(" ORDER BY id DESC LIMIT 1000");
        let rows = qb.build_query_as::<WebhookRow>().fetch_all(&self.pool).await.map_err(db)?;
        Ok(rows.into_iter().map(WebhookRow::into_webhook).collect())
    }

    async fn update_webhook(&self, id: Uuid, patch: WebhookPatch, actor: &Actor) -> StoreResult<Webhook> {
        let mut tx = self.begin().await?;
        let before = sqlx::query_as::<_, WebhookRow>(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?
        .into_webhook();
        let mut after = before.clone();
        if let Some(url) = patch.url {
            after.url = url;
        }
        if let Some(events) = patch.events {
            after.events = events;
        }
        if let Some(is_active) = patch.is_active {
            after.is_active = is_active;
        }
        if let Some(description) = patch.description {
            after.description = description;
        }
        let Some(details) = keyward_core::diff::diff(&before.audit_json(), &after.audit_json()) else {
            return Ok(before);
        };
        sqlx::query(
            "UPDATE webhook_endpoints SET url = $1, events = $2, is_active = $3, description = $4, updated_at = $5
             WHERE id = $6",
        )
        .bind(&after.url)
        .bind(&after.events)
        .bind(after.is_active)
        .bind(&after.description)
        .bind(stored_time(actor.at))
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        append_audit(&mut tx, "webhook_update", None, before.organization_id, actor, &details).await?;
        let updated = select_webhook(&mut tx, id).await?;
        tx.commit().await.map_err(db)?;
        Ok(updated)
    }

    async fn delete_webhook(&self, id: Uuid, actor: &Actor) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let before = select_webhook(&mut tx, id).await?;
        sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1").bind(id).execute(&mut *tx).await.map_err(db)?;
        let details = json!({ "before": before.audit_json() });
        append_audit(&mut tx, "webhook_delete", None, before.organization_id, actor, &details).await?;
        tx.commit().await.map_err(db)
    }

    async fn dispatch_events(&self, now: DateTime<Utc>, give_up_at: DateTime<Utc>, limit: u32) -> StoreResult<usize> {
        let mut tx = self.begin().await?;
        // SKIP LOCKED: two nodes dispatching at once take different events.
        let rows = sqlx::query_as::<_, EventRow>(
            "SELECT id, event, organization_id, key_id, payload, created_at FROM events
             WHERE dispatched_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(i64::from(limit.max(1)))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut made = 0;
        for row in rows {
            let event = row.into_event();
            {
                // An event of no organization goes to the endpoints that named it (see `subscribed_to`).
                let mut qb = QueryBuilder::<Postgres>::new(format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE is_active AND id < "
                ));
                qb.push_bind(event.id);
                if let Some(org) = event.organization_id {
                    qb.push(" AND organization_id = ").push_bind(org.0);
                }
                let hooks = qb.build_query_as::<WebhookRow>().fetch_all(&mut *tx).await.map_err(db)?;
                let body = delivery_body(&event);
                for hook in hooks {
                    let hook = hook.into_webhook();
                    if !subscribed_to(&hook.events, &event) {
                        continue;
                    }
                    let done = sqlx::query(
                        "INSERT INTO webhook_deliveries (id, endpoint_id, event_id, event, payload, status, attempts,
                             next_attempt_at, give_up_at, created_at, updated_at)
                         VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $7, $6, $6)
                         ON CONFLICT (endpoint_id, event_id) DO NOTHING",
                    )
                    .bind(Uuid::now_v7())
                    .bind(hook.id)
                    .bind(event.id)
                    .bind(&event.event)
                    .bind(Json(&body))
                    .bind(stored_time(now))
                    .bind(stored_time(give_up_at))
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                    made += done.rows_affected() as usize;
                }
            }
            sqlx::query("UPDATE events SET dispatched_at = $1 WHERE id = $2")
                .bind(stored_time(now))
                .bind(event.id)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(made)
    }

    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<DeliveryJob>> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query_as::<_, DeliveryRow>(&format!(
            "UPDATE webhook_deliveries SET next_attempt_at = $1
             WHERE id IN (SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= $2
                          ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED)
             RETURNING {DELIVERY_COLUMNS}"
        ))
        .bind(stored_time(lease_until))
        .bind(now)
        .bind(i64::from(limit.max(1)))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in rows {
            let delivery = row.into_delivery();
            let hook = select_webhook(&mut tx, delivery.endpoint_id).await?;
            jobs.push(DeliveryJob { delivery, url: hook.url, secret: hook.secret });
        }
        tx.commit().await.map_err(db)?;
        Ok(jobs)
    }

    async fn record_attempt(&self, delivery: Uuid, attempt: &Attempt, outcome: AttemptOutcome) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempted_at, status_code, latency_ms, error)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(delivery)
        .bind(stored_time(attempt.attempted_at))
        .bind(attempt.status_code)
        .bind(attempt.latency_ms)
        .bind(&attempt.error)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "UPDATE webhook_deliveries SET status = $1, attempts = attempts + 1, next_attempt_at = $2,
                 last_status_code = $3, last_error = $4, updated_at = $5
             WHERE id = $6",
        )
        .bind(outcome.status())
        .bind(outcome.next_attempt_at().map(stored_time))
        .bind(attempt.status_code)
        .bind(&attempt.error)
        .bind(stored_time(attempt.attempted_at))
        .bind(delivery)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn list_deliveries(&self, endpoint: Uuid, limit: u32) -> StoreResult<Vec<Delivery>> {
        let rows = sqlx::query_as::<_, DeliveryRow>(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE endpoint_id = $1 ORDER BY id DESC LIMIT $2"
        ))
        .bind(endpoint)
        .bind(i64::from(limit.max(1)))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows.into_iter().map(DeliveryRow::into_delivery).collect())
    }

    async fn list_attempts(&self, delivery: Uuid) -> StoreResult<Vec<Attempt>> {
        let rows: Vec<(DateTime<Utc>, Option<i64>, i64, Option<String>)> = sqlx::query_as(
            "SELECT attempted_at, status_code, latency_ms, error FROM webhook_attempts WHERE delivery_id = $1
             ORDER BY id",
        )
        .bind(delivery)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|(attempted_at, status_code, latency_ms, error)| Attempt {
                attempted_at,
                status_code,
                latency_ms,
                error,
            })
            .collect())
    }

    async fn retry_delivery(
        &self,
        endpoint: Uuid,
        delivery: Uuid,
        now: DateTime<Utc>,
        give_up_at: DateTime<Utc>,
    ) -> StoreResult<Delivery> {
        let row = sqlx::query_as::<_, DeliveryRow>(&format!(
            "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $1, give_up_at = $2, updated_at = $1
             WHERE id = $3 AND endpoint_id = $4 RETURNING {DELIVERY_COLUMNS}"
        ))
        .bind(stored_time(now))
        .bind(stored_time(give_up_at))
        .bind(delivery)
        .bind(endpoint)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(DeliveryRow::into_delivery).ok_or(StoreError::NotFound)
    }
}
