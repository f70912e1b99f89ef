//! [`WebhookStore`] for every SQL backend, written once: endpoints, and the delivery of outbox events
//! to them. Each change runs in one transaction (see [`super::store`]).

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::OrgId;
use uuid::Uuid;

use super::rows::DeliveryAttempt;
use super::store::{fetch_limit, finish, into_page, record, select_org};
use super::{Arg, Backend, Db, Dialect, Reads, Stmt};
use crate::effects;
use crate::webhook::{ATTEMPT_LOOKUP_CHUNK, delivery_body, subscribed_to};
use crate::{
    Actor, Attempt, AttemptOutcome, Delivery, DeliveryJob, Event, EventKind, NewWebhook, Page, PageRequest, StoreError,
    StoreResult, Webhook, WebhookPatch, WebhookStore,
};

const WEBHOOK_COLUMNS: &str =
    "id, organization_id, url, events, is_active, secret, description, created_at, updated_at";
const DELIVERY_COLUMNS: &str = "id, endpoint_id, event_id, event, payload, status, attempts, next_attempt_at, \
     give_up_at, last_status_code, last_error, created_at, updated_at";

/// Subscriptions as stored: the events' names.
fn names(events: &[EventKind]) -> Vec<String> {
    events.iter().map(|e| e.as_str().to_owned()).collect()
}

async fn select_webhook<D: Db + Reads<Webhook>>(conn: &mut D::Connection, id: Uuid) -> StoreResult<Webhook> {
    D::fetch_one(conn, Stmt::new(format!("SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE id = $1")).arg(id))
        .await
}

#[async_trait]
impl<B: Backend> WebhookStore for B {
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
        .arg(names(&hook.events))
        .arg(hook.is_active)
        .arg(&hook.secret.0)
        .arg(&hook.description)
        .arg(actor.at);
        finish(tx, insert, effects::webhook_created, actor).await
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
        .arg(names(&after.events))
        .arg(after.is_active)
        .arg(&after.description)
        .arg(actor.at)
        .arg(id);
        finish(tx, update, |_| effects, actor).await
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

    async fn list_deliveries(&self, endpoint: Uuid, page: PageRequest<Uuid>) -> StoreResult<Page<Delivery, Uuid>> {
        let (limit, fetch) = fetch_limit(&page);
        let mut q = Stmt::new(format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE endpoint_id = "));
        q.push_arg(endpoint);
        if let Some(after) = page.after {
            q.push(" AND id < ").push_arg(after);
        }
        q.push(" ORDER BY id DESC LIMIT ").push_arg(fetch);
        let deliveries = B::Db::fetch_all(&mut *self.reader().await?, q).await?;
        Ok(into_page(deliveries, limit, |d: &Delivery| d.id))
    }

    async fn list_attempts(&self, delivery: Uuid) -> StoreResult<Vec<Attempt>> {
        let q = Stmt::new(
            "SELECT attempted_at, status_code, latency_ms, error FROM webhook_attempts WHERE delivery_id = $1
             ORDER BY id",
        )
        .arg(delivery);
        B::Db::fetch_all(&mut *self.reader().await?, q).await
    }

    async fn list_attempts_of(&self, deliveries: &[Uuid]) -> StoreResult<HashMap<Uuid, Vec<Attempt>>> {
        let mut conn = self.reader().await?;
        let mut attempts: HashMap<Uuid, Vec<Attempt>> = HashMap::new();
        for chunk in deliveries.chunks(ATTEMPT_LOOKUP_CHUNK) {
            let mut q = Stmt::new(
                "SELECT delivery_id, attempted_at, status_code, latency_ms, error FROM webhook_attempts
                 WHERE delivery_id IN (",
            );
            q.push_list(chunk.iter().map(|id| Arg::from(*id))).push(") ORDER BY delivery_id, id");
            for DeliveryAttempt(delivery, attempt) in B::Db::fetch_all(&mut *conn, q).await? {
                attempts.entry(delivery).or_default().push(attempt);
            }
        }
        Ok(attempts)
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
