//! [`LifecycleStore`] and [`WebhookStore`] on SQLite: rotation, expiry, the audit chain, the event
//! outbox and webhook deliveries. Every change runs in a `BEGIN IMMEDIATE` transaction on the single
//! write connection, so audit appends (and the chain head they move) are serialized.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::audit_chain::{AuditContent, ChainWalker, GENESIS};
use keyward_core::{KeyId, OrgId};
use serde_json::json;
use sqlx::sqlite::SqliteConnection;
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

use super::{
    KeyInsert, KeyRow, SqliteStore, append_audit, db, insert_key_rows, json_text, parse_json, parse_opt_id, parse_ts,
    select_key, select_org, ts,
};
use crate::lifecycle::{BrokenLink, expiring_dedup, report, rotate_details};
use crate::webhook::{delivery_body, subscribed_to};
use crate::{
    Actor, ApiKey, Attempt, AttemptOutcome, AuditChainReport, Changed, Delivery, DeliveryJob, Event, LifecycleStore,
    NewKey, NewWebhook, Rotation, StoreError, StoreResult, Webhook, WebhookPatch, WebhookSecret, WebhookStore,
    stored_time,
};

/// The chain link of a new audit row: the current head's hash and the row's own hash.
pub(super) async fn chain_link(
    conn: &mut SqliteConnection,
    content: &AuditContent<'_>,
) -> StoreResult<(String, String)> {
    let prev: String = sqlx::query_scalar("SELECT last_hash FROM audit_chain WHERE id = 1")
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?
        .unwrap_or_else(|| GENESIS.to_owned());
    let hash = content.row_hash(&prev);
    Ok((prev, hash))
}

/// Moves the chain head to the row just inserted.
pub(super) async fn chain_advance(conn: &mut SqliteConnection, id: i64, hash: &str) -> StoreResult<()> {
    sqlx::query("UPDATE audit_chain SET last_id = ?, last_hash = ? WHERE id = 1")
        .bind(id)
        .bind(hash)
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// Writes an outbox event; with a dedup key, only once. Returns whether it was written.
pub(super) async fn insert_event(conn: &mut SqliteConnection, event: &Event, dedup: Option<&str>) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT INTO events (id, event, organization_id, key_id, dedup_key, payload, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dedup_key) DO NOTHING",
    )
    .bind(event.id.to_string())
    .bind(&event.event)
    .bind(event.organization_id.map(|id| id.to_string()))
    .bind(event.key_id.map(|id| id.to_string()))
    .bind(dedup)
    .bind(json_text(&event.payload)?)
    .bind(ts(event.created_at))
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(done.rows_affected() == 1)
}

/// The outbox event of a change to a key, written in the change's transaction next to its audit row.
pub(super) async fn key_event(
    conn: &mut SqliteConnection,
    event: &str,
    key: &ApiKey,
    actor: &Actor,
) -> StoreResult<()> {
    insert_event(conn, &Event::about_key(event, key, json!({ "actor": actor.actor }), actor.at), None).await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct ChainRow {
    id: i64,
    action: String,
    key_id: Option<String>,
    organization_id: Option<String>,
    actor: String,
    actor_ip: Option<String>,
    details: String,
    created_at: String,
    prev_hash: Option<String>,
    row_hash: Option<String>,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    id: String,
    event: String,
    organization_id: Option<String>,
    key_id: Option<String>,
    payload: String,
    created_at: String,
}

impl EventRow {
    fn into_event(self) -> StoreResult<Event> {
        Ok(Event {
            id: super::parse_id(&self.id, "events.id")?,
            event: self.event,
            organization_id: parse_opt_id(self.organization_id, "events.organization_id")?,
            key_id: parse_opt_id(self.key_id, "events.key_id")?,
            payload: parse_json(&self.payload, "events.payload")?,
            created_at: parse_ts(&self.created_at, "events.created_at")?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct WebhookRow {
    id: String,
    organization_id: String,
    url: String,
    events: String,
    is_active: bool,
    secret: String,
    description: Option<String>,
    created_at: String,
    updated_at: String,
}

impl WebhookRow {
    fn into_webhook(self) -> StoreResult<Webhook> {
        Ok(Webhook {
            id: super::parse_id(&self.id, "webhook_endpoints.id")?,
            organization_id: super::parse_id(&self.organization_id, "webhook_endpoints.organization_id")?,
            url: self.url,
            events: parse_json(&self.events, "webhook_endpoints.events")?,
            is_active: self.is_active,
            secret: WebhookSecret(self.secret),
            description: self.description,
            created_at: parse_ts(&self.created_at, "webhook_endpoints.created_at")?,
            updated_at: parse_ts(&self.updated_at, "webhook_endpoints.updated_at")?,
        })
    }
}

const WEBHOOK_COLUMNS: &str =
    "id, organization_id, url, events, is_active, secret, description, created_at, updated_at";
const DELIVERY_COLUMNS: &str = "id, endpoint_id, event_id, event, payload, status, attempts, next_attempt_at, \
     give_up_at, last_status_code, last_error, created_at, updated_at";

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    id: String,
    endpoint_id: String,
    event_id: String,
    event: String,
    payload: String,
    status: String,
    attempts: i64,
    next_attempt_at: Option<String>,
    give_up_at: String,
    last_status_code: Option<i64>,
    last_error: Option<String>,
    created_at: String,
    updated_at: String,
}

impl DeliveryRow {
    fn into_delivery(self) -> StoreResult<Delivery> {
        Ok(Delivery {
            id: super::parse_id(&self.id, "webhook_deliveries.id")?,
            endpoint_id: super::parse_id(&self.endpoint_id, "webhook_deliveries.endpoint_id")?,
            event_id: super::parse_id(&self.event_id, "webhook_deliveries.event_id")?,
            event: self.event,
            payload: parse_json(&self.payload, "webhook_deliveries.payload")?,
            status: self.status,
            attempts: self.attempts,
            next_attempt_at: super::parse_opt_ts(self.next_attempt_at, "webhook_deliveries.next_attempt_at")?,
            give_up_at: parse_ts(&self.give_up_at, "webhook_deliveries.give_up_at")?,
            last_status_code: self.last_status_code,
            last_error: self.last_error,
            created_at: parse_ts(&self.created_at, "webhook_deliveries.created_at")?,
            updated_at: parse_ts(&self.updated_at, "webhook_deliveries.updated_at")?,
        })
    }
}

async fn select_webhook(conn: &mut SqliteConnection, id: Uuid) -> StoreResult<Webhook> {
    sqlx::query_as::<_, WebhookRow>(&format!("SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE id = ?"))
        .bind(id.to_string())
        .fetch_one(conn)
        .await
        .map_err(db)?
        .into_webhook()
}

async fn select_delivery(conn: &mut SqliteConnection, id: Uuid) -> StoreResult<Delivery> {
    sqlx::query_as::<_, DeliveryRow>(&format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = ?"))
        .bind(id.to_string())
        .fetch_one(conn)
        .await
        .map_err(db)?
        .into_delivery()
}

/// Rows per read of the chain walk.
const CHAIN_BATCH: i64 = 1_000;

/// Keys usable at `now` (active, not revoked by then).
const USABLE: &str = " is_active = 1 AND (revoked_at IS NULL OR revoked_at > ";

#[async_trait]
impl LifecycleStore for SqliteStore {
    async fn rotate_key(
        &self,
        old: KeyId,
        new: NewKey,
        revoke_at: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Changed<Rotation>> {
        let revoke_at = stored_time(revoke_at);
        let mut tx = self.begin_write().await?;
        let before = select_key(&mut tx, old).await?;
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
        sqlx::query("UPDATE api_keys SET lineage_id = ? WHERE id = ?")
            .bind(before.lineage().to_string())
            .bind(new.id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let revoke_at = before.revoked_at.map_or(revoke_at, |at| at.min(revoke_at));
        sqlx::query(
            "UPDATE api_keys SET replaced_by = ?, revoked_at = ?, revoke_reason = 'rotated', updated_at = ?
             WHERE id = ?",
        )
        .bind(new.id.to_string())
        .bind(ts(revoke_at))
        .bind(ts(actor.at))
        .bind(old.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let old_after = select_key(&mut tx, old).await?;
        let created = select_key(&mut tx, new.id).await?;
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
        let now = ts(now);
        let mut qb = QueryBuilder::<Sqlite>::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE"));
        qb.push(USABLE).push_bind(now.clone()).push(")");
        qb.push(" AND expires_at > ").push_bind(now).push(" AND expires_at <= ").push_bind(ts(until));
        if let Some(org) = organization_id {
            qb.push(" AND organization_id = ").push_bind(org.to_string());
        }
        qb.push(" ORDER BY expires_at, id LIMIT ").push_bind(i64::from(limit.max(1)));
        let rows = qb.build_query_as::<KeyRow>().fetch_all(&self.read).await.map_err(db)?;
        rows.into_iter().map(KeyRow::into_key).collect()
    }

    async fn expire_keys(
        &self,
        organization_id: Option<OrgId>,
        now: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Changed<Vec<ApiKey>>> {
        let now_text = ts(now);
        let mut tx = self.begin_write().await?;
        let mut qb = QueryBuilder::<Sqlite>::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE"));
        qb.push(USABLE).push_bind(now_text.clone()).push(")");
        qb.push(" AND expires_at IS NOT NULL AND expires_at <= ").push_bind(now_text);
        if let Some(org) = organization_id {
            qb.push(" AND organization_id = ").push_bind(org.to_string());
        }
        qb.push(" ORDER BY id");
        let rows = qb.build_query_as::<KeyRow>().fetch_all(&mut *tx).await.map_err(db)?;
        let mut expired = Vec::with_capacity(rows.len());
        for row in rows {
            let before = row.into_key()?;
            sqlx::query("UPDATE api_keys SET is_active = 0, updated_at = ? WHERE id = ?")
                .bind(ts(actor.at))
                .bind(before.id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            let after = select_key(&mut tx, before.id).await?;
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
        let now_text = ts(now);
        let mut tx = self.begin_write().await?;
        let mut qb = QueryBuilder::<Sqlite>::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE"));
        qb.push(USABLE).push_bind(now_text.clone()).push(")");
        qb.push(" AND expires_at > ").push_bind(now_text).push(" AND expires_at <= ").push_bind(ts(until));
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
        let mut tx = self.read.begin().await.map_err(db)?;
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
                " FROM audit_log WHERE id > ? ORDER BY id LIMIT ?"
            ))
            .bind(after)
            .bind(CHAIN_BATCH)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
            let Some(last) = rows.last() else { break };
            after = last.id;
            for row in rows {
                let details = parse_json(&row.details, "audit_log.details")?;
                let content = AuditContent {
                    action: &row.action,
                    key_id: row.key_id.as_deref(),
                    organization_id: row.organization_id.as_deref(),
                    actor: &row.actor,
                    actor_ip: row.actor_ip.as_deref(),
                    details: &details,
                    created_at: parse_ts(&row.created_at, "audit_log.created_at")?,
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
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT id, event, organization_id, key_id, payload, created_at FROM events WHERE 1 = 1",
        );
        if let Some(after) = after {
            qb.push(" AND id > ").push_bind(after.to_string());
        }
        qb.push(" ORDER BY id LIMIT ").push_bind(i64::from(limit.max(1)));
        let rows = qb.build_query_as::<EventRow>().fetch_all(&self.read).await.map_err(db)?;
        rows.into_iter().map(EventRow::into_event).collect()
    }

    async fn record_event(&self, event: &Event, dedup_key: Option<&str>) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let written = insert_event(&mut tx, event, dedup_key).await?;
        tx.commit().await.map_err(db)?;
        Ok(written)
    }
}

#[async_trait]
impl WebhookStore for SqliteStore {
    async fn insert_webhook(&self, hook: NewWebhook, actor: &Actor) -> StoreResult<Webhook> {
        let mut tx = self.begin_write().await?;
        // An unknown organization is NotFound, as for keys, not a foreign-key failure.
        select_org(&mut tx, hook.organization_id).await?;
        sqlx::query(
            "INSERT INTO webhook_endpoints (id, organization_id, url, events, is_active, secret, description,
                 created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(hook.id.to_string())
        .bind(hook.organization_id.to_string())
        .bind(&hook.url)
        .bind(json_text(&hook.events)?)
        .bind(hook.is_active)
        .bind(&hook.secret.0)
        .bind(&hook.description)
        .bind(ts(actor.at))
        .bind(ts(actor.at))
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
        let mut conn = self.read.acquire().await.map_err(db)?;
        select_webhook(&mut conn, id).await
    }

    async fn list_webhooks(&self, organization_id: Option<OrgId>) -> StoreResult<Vec<Webhook>> {
        let mut qb =
            QueryBuilder::<Sqlite>::new(format!("SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE 1 = 1"));
        if let Some(org) = organization_id {
            qb.push(" AND organization_id = ").push_bind(org.to_string());
        }
        qb.push(" ORDER BY id DESC LIMIT 1000");
        let rows = qb.build_query_as::<WebhookRow>().fetch_all(&self.read).await.map_err(db)?;
        rows.into_iter().map(WebhookRow::into_webhook).collect()
    }

    async fn update_webhook(&self, id: Uuid, patch: WebhookPatch, actor: &Actor) -> StoreResult<Webhook> {
        let mut tx = self.begin_write().await?;
        let before = select_webhook(&mut tx, id).await?;
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
            "UPDATE webhook_endpoints SET url = ?, events = ?, is_active = ?, description = ?, updated_at = ?
             WHERE id = ?",
        )
        .bind(&after.url)
        .bind(json_text(&after.events)?)
        .bind(after.is_active)
        .bind(&after.description)
        .bind(ts(actor.at))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        append_audit(&mut tx, "webhook_update", None, before.organization_id, actor, &details).await?;
        let updated = select_webhook(&mut tx, id).await?;
        tx.commit().await.map_err(db)?;
        Ok(updated)
    }

    async fn delete_webhook(&self, id: Uuid, actor: &Actor) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        let before = select_webhook(&mut tx, id).await?;
        sqlx::query("DELETE FROM webhook_endpoints WHERE id = ?")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let details = json!({ "before": before.audit_json() });
        append_audit(&mut tx, "webhook_delete", None, before.organization_id, actor, &details).await?;
        tx.commit().await.map_err(db)
    }

    async fn dispatch_events(&self, now: DateTime<Utc>, give_up_at: DateTime<Utc>, limit: u32) -> StoreResult<usize> {
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query_as::<_, EventRow>(
            "SELECT id, event, organization_id, key_id, payload, created_at FROM events
             WHERE dispatched_at IS NULL ORDER BY id LIMIT ?",
        )
        .bind(i64::from(limit.max(1)))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut made = 0;
        for row in rows {
            let event = row.into_event()?;
            {
                // An event of no organization goes to the endpoints that named it (see `subscribed_to`).
                let mut qb = QueryBuilder::<Sqlite>::new(format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE is_active = 1 AND id < "
                ));
                qb.push_bind(event.id.to_string());
                if let Some(org) = event.organization_id {
                    qb.push(" AND organization_id = ").push_bind(org.to_string());
                }
                let hooks = qb.build_query_as::<WebhookRow>().fetch_all(&mut *tx).await.map_err(db)?;
                let body = json_text(&delivery_body(&event))?;
                for hook in hooks {
                    let hook = hook.into_webhook()?;
                    if !subscribed_to(&hook.events, &event) {
                        continue;
                    }
                    let done = sqlx::query(
                        "INSERT INTO webhook_deliveries (id, endpoint_id, event_id, event, payload, status, attempts,
                             next_attempt_at, give_up_at, created_at, updated_at)
                         VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?)
                         ON CONFLICT (endpoint_id, event_id) DO NOTHING",
                    )
                    .bind(Uuid::now_v7().to_string())
                    .bind(hook.id.to_string())
                    .bind(event.id.to_string())
                    .bind(&event.event)
                    .bind(&body)
                    .bind(ts(now))
                    .bind(ts(give_up_at))
                    .bind(ts(now))
                    .bind(ts(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                    made += done.rows_affected() as usize;
                }
            }
            sqlx::query("UPDATE events SET dispatched_at = ? WHERE id = ?")
                .bind(ts(now))
                .bind(event.id.to_string())
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
        let mut tx = self.begin_write().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= ?
             ORDER BY next_attempt_at, id LIMIT ?",
        )
        .bind(ts(now))
        .bind(i64::from(limit.max(1)))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            sqlx::query("UPDATE webhook_deliveries SET next_attempt_at = ? WHERE id = ?")
                .bind(ts(lease_until))
                .bind(&id)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            let delivery = select_delivery(&mut tx, super::parse_id(&id, "webhook_deliveries.id")?).await?;
            let hook = select_webhook(&mut tx, delivery.endpoint_id).await?;
            jobs.push(DeliveryJob { delivery, url: hook.url, secret: hook.secret });
        }
        tx.commit().await.map_err(db)?;
        Ok(jobs)
    }

    async fn record_attempt(&self, delivery: Uuid, attempt: &Attempt, outcome: AttemptOutcome) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempted_at, status_code, latency_ms, error)
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(delivery.to_string())
        .bind(ts(attempt.attempted_at))
        .bind(attempt.status_code)
        .bind(attempt.latency_ms)
        .bind(&attempt.error)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1, next_attempt_at = ?,
                 last_status_code = ?, last_error = ?, updated_at = ?
             WHERE id = ?",
        )
        .bind(outcome.status())
        .bind(outcome.next_attempt_at().map(ts))
        .bind(attempt.status_code)
        .bind(&attempt.error)
        .bind(ts(attempt.attempted_at))
        .bind(delivery.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn list_deliveries(&self, endpoint: Uuid, limit: u32) -> StoreResult<Vec<Delivery>> {
        let rows = sqlx::query_as::<_, DeliveryRow>(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE endpoint_id = ? ORDER BY id DESC LIMIT ?"
        ))
        .bind(endpoint.to_string())
        .bind(i64::from(limit.max(1)))
        .fetch_all(&self.read)
        .await
        .map_err(db)?;
        rows.into_iter().map(DeliveryRow::into_delivery).collect()
    }

    async fn list_attempts(&self, delivery: Uuid) -> StoreResult<Vec<Attempt>> {
        let rows: Vec<(String, Option<i64>, i64, Option<String>)> = sqlx::query_as(
            "SELECT attempted_at, status_code, latency_ms, error FROM webhook_attempts WHERE delivery_id = ?
             ORDER BY id",
        )
        .bind(delivery.to_string())
        .fetch_all(&self.read)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|(at, status_code, latency_ms, error)| {
                Ok(Attempt {
                    attempted_at: parse_ts(&at, "webhook_attempts.attempted_at")?,
                    status_code,
                    latency_ms,
                    error,
                })
            })
            .collect()
    }

    async fn retry_delivery(
        &self,
        endpoint: Uuid,
        delivery: Uuid,
        now: DateTime<Utc>,
        give_up_at: DateTime<Utc>,
    ) -> StoreResult<Delivery> {
        let mut tx = self.begin_write().await?;
        let found = select_delivery(&mut tx, delivery).await?;
        if found.endpoint_id != endpoint {
            return Err(StoreError::NotFound);
        }
        sqlx::query(
            "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = ?, give_up_at = ?, updated_at = ?
             WHERE id = ?",
        )
        .bind(ts(now))
        .bind(ts(give_up_at))
        .bind(ts(now))
        .bind(delivery.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let updated = select_delivery(&mut tx, delivery).await?;
        tx.commit().await.map_err(db)?;
        Ok(updated)
    }
}
