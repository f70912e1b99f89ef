//! Webhook storage ([`WebhookStore`], a supertrait of [`crate::Store`]): an organization's endpoints,
//! the deliveries made from the event outbox ([`crate::LifecycleStore::list_events`]) and their
//! attempts. Nothing here changes what a verification answers.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::OrgId;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{Actor, Event, EventKind, Page, PageRequest, StoreResult};

/// A webhook signing secret. SECURITY: its `Debug` shows nothing; it leaves only to sign, and once in
/// the creation response.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(pub String);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret([redacted])")
    }
}

/// A webhook endpoint of an organization.
// Serialized, it is the API's endpoint. SECURITY: never the secret (`serde(skip)`, and `WebhookSecret`
// has no `Serialize`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema), schema(as = WebhookResponse))]
pub struct Webhook {
    pub id: Uuid,
    #[cfg_attr(feature = "utoipa", schema(value_type = String, format = Uuid))]
    pub organization_id: OrgId,
    pub url: String,
    /// Subscribed events; empty: every event (of its organization).
    pub events: Vec<EventKind>,
    pub is_active: bool,
    #[serde(skip)]
    pub secret: WebhookSecret,
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Webhook {
    /// The fields an audit row shows. SECURITY: never the secret.
    pub fn audit_json(&self) -> Value {
        json!({ "webhook_id": self.id, "url": self.url, "events": self.events, "is_active": self.is_active,
                "description": self.description })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewWebhook {
    pub id: Uuid,
    pub organization_id: OrgId,
    pub url: String,
    pub events: Vec<EventKind>,
    pub is_active: bool,
    pub secret: WebhookSecret,
    pub description: Option<String>,
}

/// A partial update of a webhook: `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WebhookPatch {
    pub url: Option<String>,
    pub events: Option<Vec<EventKind>>,
    pub is_active: Option<bool>,
    pub description: Option<Option<String>>,
}

/// One event for one endpoint, with its retry state.
// Serialized, it is what the API shows of it (the endpoint is the one the URL names).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct Delivery {
    pub id: Uuid,
    #[serde(skip)]
    pub endpoint_id: Uuid,
    pub event_id: Uuid,
    pub event: EventKind,
    /// The JSON body that is POSTed.
    #[cfg_attr(feature = "utoipa", schema(value_type = Object))]
    pub payload: Value,
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Retries stop at this time and the delivery is marked failed.
    pub give_up_at: DateTime<Utc>,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(skip)]
    pub updated_at: DateTime<Utc>,
}

/// A delivery claimed for an attempt, with what sending it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryJob {
    pub delivery: Delivery,
    pub url: String,
    pub secret: WebhookSecret,
}

/// One attempt at a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema), schema(as = AttemptResponse))]
pub struct Attempt {
    pub attempted_at: DateTime<Utc>,
    /// The receiver's HTTP status; `null` when no answer came (refused, timeout, ...).
    pub status_code: Option<i64>,
    pub latency_ms: i64,
    pub error: Option<String>,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Succeeded,
    RetryAt(DateTime<Utc>),
    Failed,
}

impl AttemptOutcome {
    pub fn status(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::RetryAt(_) => "pending",
            Self::Failed => "failed",
        }
    }

    pub fn next_attempt_at(self) -> Option<DateTime<Utc>> {
        match self {
            Self::RetryAt(at) => Some(at),
            _ => None,
        }
    }
}

/// The JSON body of a delivery: the event id (receivers de-duplicate by it), its type, time and data.
pub fn delivery_body(event: &Event) -> Value {
    json!({ "id": event.id, "type": event.event, "created_at": event.created_at, "data": event.payload })
}

/// Whether an endpoint (already of the event's organization) that subscribed to `events` (empty: every
/// event) receives `event`. An event of no organization (`auth.failures_spike`) goes only to endpoints
/// that named it, which only `keyward:admin` may do; "every event" does not include it.
pub fn subscribed_to(events: &[EventKind], event: &Event) -> bool {
    let named = events.contains(&event.event);
    match event.organization_id {
        Some(_) => events.is_empty() || named,
        None => named,
    }
}

/// Deliveries whose attempts one statement of [`WebhookStore::list_attempts_of`] reads: more than a
/// page of deliveries, few enough placeholders for any database.
pub const ATTEMPT_LOOKUP_CHUNK: usize = 500;

/// Webhook endpoints, and the delivery of outbox events to them.
#[async_trait]
pub trait WebhookStore: Send + Sync {
    /// Creates a webhook endpoint (audited `webhook_create`, without the secret).
    async fn insert_webhook(&self, hook: NewWebhook, actor: &Actor) -> StoreResult<Webhook>;
    async fn get_webhook(&self, id: Uuid) -> StoreResult<Webhook>;
    /// Newest first; `None`: every organization.
    async fn list_webhooks(&self, organization_id: Option<OrgId>) -> StoreResult<Vec<Webhook>>;
    /// Audited `webhook_update`.
    async fn update_webhook(&self, id: Uuid, patch: WebhookPatch, actor: &Actor) -> StoreResult<Webhook>;
    /// Deletes the endpoint and its deliveries (audited `webhook_delete`).
    async fn delete_webhook(&self, id: Uuid, actor: &Actor) -> StoreResult<()>;

    /// Turns undispatched outbox events (oldest first, at most `limit`) into one pending delivery per
    /// active subscribed endpoint of the event's organization that existed before the event (ids are
    /// UUIDv7, so they compare by creation time), due at `now` and given up at
    /// `give_up_at`, and marks the events dispatched; one transaction. Returns deliveries made.
    async fn dispatch_events(&self, now: DateTime<Utc>, give_up_at: DateTime<Utc>, limit: u32) -> StoreResult<usize>;
    /// Claims up to `limit` pending deliveries due at `now` for one attempt each: their next attempt
    /// moves to `lease_until`, so no other worker (or node) takes them meanwhile, and a worker that dies
    /// mid-attempt leaves them to be retried after the lease.
    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<DeliveryJob>>;
    /// Records an attempt and what follows it.
    async fn record_attempt(&self, delivery: Uuid, attempt: &Attempt, outcome: AttemptOutcome) -> StoreResult<()>;
    /// A page of an endpoint's deliveries, newest first (the cursor is a delivery id).
    async fn list_deliveries(&self, endpoint: Uuid, page: PageRequest<Uuid>) -> StoreResult<Page<Delivery, Uuid>>;
    /// A delivery's attempts, oldest first.
    async fn list_attempts(&self, delivery: Uuid) -> StoreResult<Vec<Attempt>>;
    /// The attempts of each of `deliveries` (a page of them), oldest first, read in one statement per
    /// [`ATTEMPT_LOOKUP_CHUNK`] deliveries; a delivery never attempted has no entry.
    async fn list_attempts_of(&self, deliveries: &[Uuid]) -> StoreResult<HashMap<Uuid, Vec<Attempt>>>;
    /// Makes a delivery of `endpoint` pending again, due at `now`, given up at `give_up_at`.
    async fn retry_delivery(
        &self,
        endpoint: Uuid,
        delivery: Uuid,
        now: DateTime<Utc>,
        give_up_at: DateTime<Utc>,
    ) -> StoreResult<Delivery>;
}
