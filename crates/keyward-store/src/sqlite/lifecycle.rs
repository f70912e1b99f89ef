//! [`LifecycleStore`] on SQLite: rotation, expiry, the audit chain and the event outbox. Every change
//! runs in a `BEGIN IMMEDIATE` transaction on the single write connection, so audit appends (and the
//! chain head they move) are serialized.

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
    select_key, ts,
};
use crate::lifecycle::{BrokenLink, expiring_dedup, report, rotate_details};
use crate::{
    Actor, ApiKey, AuditChainReport, Event, LifecycleStore, NewKey, Rotation, StoreError, StoreResult, stored_time,
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
    ) -> StoreResult<Rotation> {
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
        Ok(Rotation { old: old_after, new: created })
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
    ) -> StoreResult<Vec<ApiKey>> {
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
        Ok(expired)
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
}
