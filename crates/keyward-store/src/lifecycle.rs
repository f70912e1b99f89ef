//! The key lifecycle part of the store ([`LifecycleStore`], a supertrait of [`crate::Store`]): rotation
//! with a grace period, expiry (listing, deactivating, `key.expiring` notices), the tamper-evident audit
//! chain, and the event outbox that webhooks are delivered from.
//!
//! Every change here, like every change in [`crate::Store`], writes its audit rows and its outbox
//! events in its own transaction.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::{KeyId, OrgId};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{Actor, ApiKey, Changed, NewKey, StoreResult};

/// The two keys of a rotation, as stored after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotation {
    /// The rotated key: `replaced_by` the new one, revoked (reason `rotated`) at the end of the grace
    /// period.
    pub old: ApiKey,
    /// The new key: `rotated_from` the old one, in the same lineage.
    pub new: ApiKey,
}

/// What an outbox event says happened: the closed set of names a webhook endpoint subscribes to. The
/// names ([`EventKind::as_str`]) are part of the API: stored in the outbox and in subscriptions, sent
/// as a delivery's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    KeyCreated,
    KeyUpdated,
    KeyRotated,
    KeyRevoked,
    KeyExpiring,
    KeyExpired,
    /// A quota crossed one of its notice thresholds.
    QuotaThreshold,
    /// Many failed authentications from one address or against one key prefix (no organization's).
    AuthFailuresSpike,
}

impl EventKind {
    /// Every event, in the order the API lists them.
    pub const ALL: [Self; 8] = [
        Self::KeyCreated,
        Self::KeyUpdated,
        Self::KeyRotated,
        Self::KeyRevoked,
        Self::KeyExpiring,
        Self::KeyExpired,
        Self::QuotaThreshold,
        Self::AuthFailuresSpike,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeyCreated => "key.created",
            Self::KeyUpdated => "key.updated",
            Self::KeyRotated => "key.rotated",
            Self::KeyRevoked => "key.revoked",
            Self::KeyExpiring => "key.expiring",
            Self::KeyExpired => "key.expired",
            Self::QuotaThreshold => "quota.threshold",
            Self::AuthFailuresSpike => "auth.failures_spike",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == name)
    }

    /// A name read back from `column`: one this version does not know is a corrupt row.
    pub(crate) fn stored(name: &str, column: &str) -> StoreResult<Self> {
        Self::parse(name).ok_or_else(|| crate::corrupt(column, name))
    }

    /// Whether the event belongs to no organization: only endpoints that name it receive it ("every
    /// event" does not include it), and only `keyward:admin` may subscribe to it.
    pub fn is_global(self) -> bool {
        matches!(self, Self::AuthFailuresSpike)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// An event of the outbox: what happened, once, with the id every webhook payload carries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub id: Uuid,
    pub event: EventKind,
    pub organization_id: Option<OrgId>,
    pub key_id: Option<KeyId>,
    pub payload: Value,
    pub created_at: DateTime<Utc>,
}

impl Event {
    /// A new event about a key. SECURITY: the payload is the key's audit form (prefix and hint only).
    pub fn about_key(event: EventKind, key: &ApiKey, extra: Value, at: DateTime<Utc>) -> Self {
        let mut data = json!({ "key_id": key.id, "organization_id": key.organization_id, "key": key.audit_json() });
        if let (Some(data), Value::Object(extra)) = (data.as_object_mut(), extra) {
            data.extend(extra);
        }
        Self {
            id: Uuid::now_v7(),
            event,
            organization_id: Some(key.organization_id),
            key_id: Some(key.id),
            payload: data,
            created_at: crate::stored_time(at),
        }
    }
}

/// Where the audit chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenLink {
    /// The first row that does not verify; for `truncated`, the id the chain head names (a row that is
    /// gone); `None` when the head names no row.
    pub id: Option<i64>,
    /// `content_changed`, `link_broken` (a row before it was deleted, or rows were reordered),
    /// `unhashed_row` or `truncated` (rows at the end were deleted).
    pub reason: String,
}

/// The result of walking the whole audit chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditChainReport {
    pub intact: bool,
    /// Rows whose hashes were checked.
    pub rows_checked: u64,
    /// Rows written before the chain existed (before migration 0004): not covered.
    pub unchained_rows: u64,
    pub broken: Option<BrokenLink>,
}

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
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub id: Uuid,
    pub organization_id: OrgId,
    pub url: String,
    /// Event names it receives; empty: every event.
    pub events: Vec<String>,
    pub is_active: bool,
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
    pub events: Vec<String>,
    pub is_active: bool,
    pub secret: WebhookSecret,
    pub description: Option<String>,
}

/// A partial update of a webhook: `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WebhookPatch {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    pub is_active: Option<bool>,
    pub description: Option<Option<String>>,
}

/// One event for one endpoint, with its retry state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub event_id: Uuid,
    pub event: EventKind,
    /// The JSON body that is POSTed.
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
pub struct Attempt {
    pub attempted_at: DateTime<Utc>,
    /// The receiver's HTTP status; `None` when no answer came (refused, timeout, ...).
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
pub fn subscribed_to(events: &[String], event: &Event) -> bool {
    let named = events.iter().any(|e| e == event.event.as_str());
    match event.organization_id {
        Some(_) => events.is_empty() || named,
        None => named,
    }
}

/// Rotation, expiry, the audit chain and the event outbox.
#[async_trait]
pub trait LifecycleStore: Send + Sync {
    /// Rotates `old` into `new` in one transaction: inserts `new` (its settings are the caller's to
    /// copy; `max_api_keys` is not checked, the old key is going away) with `rotated_from` = `old` and
    /// the old key's lineage, sets the old key's `replaced_by` and schedules its revocation (reason
    /// `rotated`) at `revoke_at` (never later than an earlier scheduled revocation), writes a `rotate`
    /// audit row for the old key and a `create` row for the new one, and a `key.rotated` event.
    /// `Conflict` when `old` was already rotated or is revoked; `NotFound` when it does not exist.
    async fn rotate_key(
        &self,
        old: KeyId,
        new: NewKey,
        revoke_at: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Changed<Rotation>>;

    /// Keys that are usable at `now` and expire in `(now, until]`, soonest first (at most `limit`);
    /// `organization_id` `None`: every organization.
    async fn list_expiring_keys(
        &self,
        organization_id: Option<OrgId>,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<ApiKey>>;

    /// Deactivates every active, unrevoked key of `organization_id` (every organization for `None`)
    /// whose `expires_at` has passed at `now`: one `expire` audit row and one `key.expired` event each.
    /// Returns the keys as they are after.
    async fn expire_keys(
        &self,
        organization_id: Option<OrgId>,
        now: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Changed<Vec<ApiKey>>>;

    /// Writes a `key.expiring` event for every usable key expiring within `days` days of `now` that has
    /// not had one for this threshold (and this expiry) yet; returns the new events.
    async fn record_expiring_events(&self, now: DateTime<Utc>, days: u32) -> StoreResult<Vec<Event>>;

    /// Walks the whole audit chain, oldest row first.
    async fn verify_audit_chain(&self) -> StoreResult<AuditChainReport>;

    /// Outbox events after `after` (by id, oldest first), at most `limit`.
    async fn list_events(&self, after: Option<Uuid>, limit: u32) -> StoreResult<Vec<Event>>;

    /// Writes an event that is not part of another change (`quota.threshold`, `auth.failures_spike`);
    /// with a dedup key, at most once. Returns whether it was written.
    async fn record_event(&self, event: &Event, dedup_key: Option<&str>) -> StoreResult<bool>;

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
    /// An endpoint's deliveries, newest first, at most `limit`.
    async fn list_deliveries(&self, endpoint: Uuid, limit: u32) -> StoreResult<Vec<Delivery>>;
    /// A delivery's attempts, oldest first.
    async fn list_attempts(&self, delivery: Uuid) -> StoreResult<Vec<Attempt>>;
    /// Makes a delivery of `endpoint` pending again, due at `now`, given up at `give_up_at`.
    async fn retry_delivery(
        &self,
        endpoint: Uuid,
        delivery: Uuid,
        now: DateTime<Utc>,
        give_up_at: DateTime<Utc>,
    ) -> StoreResult<Delivery>;
}

/// The dedup key of a `key.expiring` event: once per key, threshold and expiry date (a key whose
/// expiry is moved gets a new notice).
pub(crate) fn expiring_dedup(key: &ApiKey, days: u32) -> String {
    let expires = key.expires_at.map(|at| at.timestamp()).unwrap_or_default();
    format!("{}:{}:{days}d:{expires}", EventKind::KeyExpiring, key.id)
}

/// Turns a walk of rows into a report; shared by both backends.
pub(crate) fn report(walker: &keyward_core::audit_chain::ChainWalker, broken: Option<BrokenLink>) -> AuditChainReport {
    AuditChainReport {
        intact: broken.is_none(),
        rows_checked: walker.checked,
        unchained_rows: walker.unchained,
        broken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_the_wire_names_and_read_back() {
        let names: Vec<&str> = EventKind::ALL.map(EventKind::as_str).to_vec();
        assert_eq!(
            names,
            [
                "key.created",
                "key.updated",
                "key.rotated",
                "key.revoked",
                "key.expiring",
                "key.expired",
                "quota.threshold",
                "auth.failures_spike"
            ]
        );
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
            assert_eq!(serde_json::to_value(kind).ok(), Some(json!(kind.as_str())));
        }
        assert_eq!(EventKind::parse("key.deleted"), None);
        let global: Vec<_> = EventKind::ALL.into_iter().filter(|e| e.is_global()).collect();
        assert_eq!(global, [EventKind::AuthFailuresSpike]);
    }
}
