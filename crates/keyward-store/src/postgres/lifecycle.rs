//! [`LifecycleStore`] on PostgreSQL: rotation, expiry, the audit chain and the event outbox. Every
//! audit append locks the chain head row (`audit_chain`, `FOR UPDATE`) until its transaction ends, so
//! appends from every node are serialized and ids are assigned in chain order. To stay clear of lock
//! cycles, a transaction takes the chain head last: key rows are locked and changed first.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::audit_chain::{AuditContent, ChainWalker, GENESIS};
use keyward_core::{KeyId, OrgId};
use serde_json::json;
use sqlx::postgres::PgConnection;
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use super::{KeyInsert, KeyRow, PostgresStore, append_audit, db, insert_key_rows, select_key};
use crate::lifecycle::{BrokenLink, expiring_dedup, report, rotate_details};
use crate::{
    Actor, ApiKey, AuditChainReport, Event, LifecycleStore, NewKey, Rotation, StoreError, StoreResult, stored_time,
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
    ) -> StoreResult<Rotation> {
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
        Ok(Rotation { old: old_after, new: created })
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
    ) -> StoreResult<Vec<ApiKey>> {
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
        Ok(expired)
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
}
