//! What a change to a key, an organization or a webhook endpoint does besides writing its row, decided
//! here once for every backend, as [`crate::usage::BatchEffects`] does for usage: the record as it is
//! after the change, its audit rows, and its outbox event. A change that changes nothing has no
//! effects at all (no write, no audit row, no event). The backends only run the statements.

use chrono::{DateTime, Utc};
use keyward_core::diff::diff;
use keyward_core::{KeyId, OrgId};
use serde_json::{Value, json};

use crate::{
    Actor, ApiKey, Event, EventKind, KeyPatch, NewKey, Organization, OrganizationPatch, StoreError, StoreResult,
    Webhook, WebhookPatch,
};

/// An audit row of a change; its actor and time are the change's.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Audit {
    pub action: &'static str,
    pub key_id: Option<KeyId>,
    pub organization_id: OrgId,
    pub details: Value,
}

/// What a change writes besides its rows: its audit rows, then its event, in its transaction.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Effects {
    pub audits: Vec<Audit>,
    pub event: Option<Event>,
}

impl Effects {
    fn key(action: &'static str, key: &ApiKey, details: Value, event: Event) -> Self {
        let audit = Audit { action, key_id: Some(key.id), organization_id: key.organization_id, details };
        Self { audits: vec![audit], event: Some(event) }
    }

    fn audit_only(action: &'static str, organization_id: OrgId, details: Value) -> Self {
        Self { audits: vec![Audit { action, key_id: None, organization_id, details }], event: None }
    }
}

/// The diff of a change that is known to change something (a revocation, an expiry).
fn changes(before: &Value, after: &Value) -> Value {
    diff(before, after).unwrap_or_else(|| json!({}))
}

/// The event of a change to a key made by `actor`.
fn key_event(kind: EventKind, key: &ApiKey, actor: &Actor) -> Event {
    Event::about_key(kind, key, json!({ "actor": actor.actor }), actor.at)
}

/// A new key, as read back after its insert.
pub(crate) fn key_created(key: &ApiKey, actor: &Actor) -> Effects {
    let details = json!({ "after": key.audit_json() });
    Effects::key("create", key, details, key_event(EventKind::KeyCreated, key, actor))
}

/// The key after `patch`, audited with the diff under the patch's action; `None` when the patch
/// changes nothing.
pub(crate) fn key_updated(before: &ApiKey, patch: &KeyPatch, actor: &Actor) -> Option<(ApiKey, Effects)> {
    let after = patch.apply_to(before);
    let details = diff(&before.audit_json(), &after.audit_json())?;
    let effects = Effects::key(patch.action(), before, details, key_event(EventKind::KeyUpdated, &after, actor));
    Some((after, effects))
}

/// The key revoked at `at` (already cut to what storage keeps); `None` when that changes nothing.
pub(crate) fn key_revoked(
    before: &ApiKey,
    reason: &str,
    at: DateTime<Utc>,
    actor: &Actor,
) -> Option<(ApiKey, Effects)> {
    // SECURITY: a revocation only ever moves earlier. A key already revoked by `at` stays as it is; a
    // key scheduled to stop later (a rotation's grace period) is brought forward, so revoking a leaked
    // key during its grace period stops it now.
    if before.revoked_at.is_some_and(|revoked| revoked <= at) {
        return None;
    }
    let mut after = before.clone();
    after.revoked_at = Some(at);
    after.revoke_reason = Some(reason.to_owned());
    let details = changes(&before.audit_json(), &after.audit_json());
    let effects = Effects::key("revoke", before, details, key_event(EventKind::KeyRevoked, &after, actor));
    Some((after, effects))
}

/// A key deactivated because its `expires_at` passed (`after` as written).
pub(crate) fn key_expired(before: &ApiKey, after: &ApiKey, actor: &Actor) -> Effects {
    let details = changes(&before.audit_json(), &after.audit_json());
    let event = Event::about_key(EventKind::KeyExpired, after, json!({ "expired_at": after.expires_at }), actor.at);
    Effects::key("expire", after, details, event)
}

/// Whether `before` may be rotated into `new` at `now`, and when the old key is then revoked: at
/// `revoke_at` (cut to what storage keeps), or at an earlier revocation already scheduled (a rotation
/// never extends a key's life).
pub(crate) fn rotation_revokes_at(
    before: &ApiKey,
    new: &NewKey,
    revoke_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> StoreResult<DateTime<Utc>> {
    if before.replaced_by.is_some() {
        return Err(StoreError::Conflict("the key was already rotated".to_owned()));
    }
    if before.revoked_at.is_some_and(|at| at <= now) {
        return Err(StoreError::Conflict("the key is revoked".to_owned()));
    }
    if new.organization_id != before.organization_id {
        return Err(StoreError::Internal("a rotation names another organization".to_owned()));
    }
    let revoke_at = crate::stored_time(revoke_at);
    Ok(before.revoked_at.map_or(revoke_at, |at| at.min(revoke_at)))
}

/// A rotation of `before` (now `old`, revoked at `revoke_at`) into `new`: a `rotate` row for the old
/// key, a `create` row for the new one, and one `key.rotated` event.
pub(crate) fn key_rotated(
    before: &ApiKey,
    old: &ApiKey,
    new: &ApiKey,
    revoke_at: DateTime<Utc>,
    actor: &Actor,
) -> Effects {
    let mut rotate = changes(&before.audit_json(), &old.audit_json());
    if let Some(map) = rotate.as_object_mut() {
        map.insert("replaced_by".to_owned(), json!(new.id));
    }
    let create = json!({ "after": new.audit_json(), "rotated_from": old.id });
    let org = old.organization_id;
    let extra = json!({ "rotated_from": old.id, "old_key_revoked_at": revoke_at });
    Effects {
        audits: vec![
            Audit { action: "rotate", key_id: Some(old.id), organization_id: org, details: rotate },
            Audit { action: "create", key_id: Some(new.id), organization_id: org, details: create },
        ],
        event: Some(Event::about_key(EventKind::KeyRotated, new, extra, actor.at)),
    }
}

/// A new organization, as read back after its insert.
pub(crate) fn org_created(org: &Organization) -> Effects {
    Effects::audit_only("create", org.id, json!({ "after": org.audit_json() }))
}

/// The organization after `patch`, audited with the diff; `None` when the patch changes nothing.
pub(crate) fn org_updated(before: &Organization, patch: &OrganizationPatch) -> Option<(Organization, Effects)> {
    let after = patch.apply_to(before);
    let details = diff(&before.audit_json(), &after.audit_json())?;
    Some((after, Effects::audit_only(patch.action(), before.id, details)))
}

/// A new webhook endpoint (never its secret in the audit row).
pub(crate) fn webhook_created(hook: &Webhook) -> Effects {
    Effects::audit_only("webhook_create", hook.organization_id, json!({ "after": hook.audit_json() }))
}

/// The endpoint after `patch`; `None` when the patch changes nothing.
pub(crate) fn webhook_updated(before: &Webhook, patch: WebhookPatch) -> Option<(Webhook, Effects)> {
    let WebhookPatch { url, events, is_active, description } = patch;
    let mut after = before.clone();
    after.url = url.unwrap_or(after.url);
    after.events = events.unwrap_or(after.events);
    after.is_active = is_active.unwrap_or(after.is_active);
    after.description = description.unwrap_or(after.description);
    let details = diff(&before.audit_json(), &after.audit_json())?;
    Some((after, Effects::audit_only("webhook_update", before.organization_id, details)))
}

pub(crate) fn webhook_deleted(before: &Webhook) -> Effects {
    Effects::audit_only("webhook_delete", before.organization_id, json!({ "before": before.audit_json() }))
}

#[cfg(test)]
mod tests {
    use keyward_core::Environment;

    use super::*;

    fn at(minutes: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_893_456_000 + minutes * 60, 0).unwrap_or_default()
    }

    fn key() -> ApiKey {
        crate::fixtures::key(OrgId::new(), at(0))
    }

    #[test]
    fn a_revocation_only_moves_earlier() {
        let actor = Actor::cli(at(1));
        let k = key();
        let (revoked, fx) = key_revoked(&k, "leaked", at(10), &actor).unwrap_or_else(|| panic!("revokes"));
        assert_eq!((revoked.revoked_at, revoked.revoke_reason.as_deref()), (Some(at(10)), Some("leaked")));
        assert_eq!(fx.audits[0].action, "revoke");
        assert_eq!(fx.event.map(|e| e.event), Some(EventKind::KeyRevoked));
        // Revoked by then already, or at that very time: nothing changes.
        assert_eq!(key_revoked(&revoked, "again", at(20), &actor), None);
        assert_eq!(key_revoked(&revoked, "again", at(10), &actor), None);
        // Scheduled for later (a grace period): brought forward.
        let (sooner, _) = key_revoked(&revoked, "sooner", at(5), &actor).unwrap_or_else(|| panic!("sooner"));
        assert_eq!(sooner.revoked_at, Some(at(5)));
    }

    #[test]
    fn an_update_is_audited_under_its_action_and_a_no_op_does_nothing() {
        let actor = Actor::cli(at(1));
        let k = key();
        assert_eq!(key_updated(&k, &KeyPatch::default(), &actor), None);
        assert_eq!(key_updated(&k, &KeyPatch { name: Some("k".into()), ..Default::default() }, &actor), None);
        let off = KeyPatch { is_active: Some(false), ..Default::default() };
        let (after, fx) = key_updated(&k, &off, &actor).unwrap_or_else(|| panic!("changes"));
        assert!(!after.is_active);
        assert_eq!((fx.audits[0].action, fx.audits[0].key_id), ("deactivate", Some(k.id)));
        assert_eq!(fx.audits[0].details, json!({ "before": { "is_active": true }, "after": { "is_active": false } }));
        let event = fx.event.unwrap_or_else(|| panic!("an event"));
        assert_eq!((event.event, event.payload["actor"].clone()), (EventKind::KeyUpdated, json!("cli")));
    }

    #[test]
    fn a_rotation_never_extends_a_key_and_refuses_what_cannot_be_rotated() {
        let k = key();
        let org = Organization { id: k.organization_id, ..crate::fixtures::org(at(0)) };
        let new = crate::conformance::new_key(&org, Environment::Live).1;
        assert_eq!(rotation_revokes_at(&k, &new, at(60), at(1)).ok(), Some(at(60)));
        let scheduled = ApiKey { revoked_at: Some(at(30)), ..k.clone() };
        assert_eq!(rotation_revokes_at(&scheduled, &new, at(60), at(1)).ok(), Some(at(30)));
        let revoked = ApiKey { revoked_at: Some(at(1)), ..k.clone() };
        assert!(matches!(rotation_revokes_at(&revoked, &new, at(60), at(1)), Err(StoreError::Conflict(_))));
        let rotated = ApiKey { replaced_by: Some(KeyId::new()), ..k.clone() };
        assert!(matches!(rotation_revokes_at(&rotated, &new, at(60), at(1)), Err(StoreError::Conflict(_))));
        let elsewhere = NewKey { organization_id: OrgId::new(), ..new };
        assert!(matches!(rotation_revokes_at(&k, &elsewhere, at(60), at(1)), Err(StoreError::Internal(_))));
    }
}
