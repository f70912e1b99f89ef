//! The key lifecycle part of the store ([`LifecycleStore`], a supertrait of [`crate::Store`]): rotation
//! with a grace period, expiry (listing, deactivating, `key.expiring` notices), the tamper-evident audit
//! chain, and the event outbox that webhooks are delivered from ([`crate::webhook`]).
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
