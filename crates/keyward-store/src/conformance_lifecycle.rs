//! The conformance cases of [`crate::LifecycleStore`]: rotation, expiry, the audit chain and the event
//! outbox, run against every backend like [`crate::conformance`] (see `conformance_tests!`), plus
//! [`audit_tampering_is_detected`], which needs a way to edit the database behind the store's back and
//! a fresh database per kind of tampering.

use std::future::Future;
use std::pin::Pin;

use chrono::{DateTime, Duration, Utc};
use keyward_core::{Environment, KeyId, KeyStatus};
use serde_json::json;

use crate::conformance::{Written, new_key, new_org, t0};
use crate::{Actor, AuditEntry, AuditFilter, EventKind, NewKey, Organization, PageRequest, Store, StoreError};

/// The first page of `limit` items.
fn page(limit: u32) -> PageRequest<uuid::Uuid> {
    PageRequest { after: None, limit }
}

trait Must<T> {
    fn must(self, what: &str) -> T;
}

impl<T, E: std::fmt::Debug> Must<T> for Result<T, E> {
    fn must(self, what: &str) -> T {
        match self {
            Ok(value) => value,
            Err(e) => panic!("{what}: {e:?}"),
        }
    }
}

fn at(minutes: i64) -> DateTime<Utc> {
    t0() + Duration::minutes(minutes)
}

async fn org(store: &dyn Store, max_api_keys: Option<i64>) -> Organization {
    store.insert_org(new_org(max_api_keys), &Actor::cli(t0())).await.must("insert_org")
}

async fn key_audit(store: &dyn Store, id: KeyId) -> Vec<AuditEntry> {
    let filter = AuditFilter { key_id: Some(id), ..Default::default() };
    store.list_audit(&filter, PageRequest { after: None, limit: 100 }).await.must("list_audit").items
}

fn successor(org: &Organization) -> NewKey {
    NewKey { name: "rotated".to_owned(), ..new_key(org, Environment::Live).1 }
}

/// A rotation inserts the new key, links both ways, schedules the old key's revocation, shares the
/// lineage, is audited and emits `key.rotated`; `max_api_keys` does not block it; a rotated key cannot
/// be rotated again.
pub async fn rotation_links_both_keys_and_schedules_revocation(store: &dyn Store) {
    let org = org(store, Some(1)).await;
    let cli = Actor::cli(at(1));
    let old = store.insert_key(new_key(&org, Environment::Live).1, &cli).await.written("insert");
    let rotated = store.rotate_key(old.id, successor(&org), at(61), &Actor::cli(at(1))).await.written("rotate");
    let (o, n) = (&rotated.old, &rotated.new);
    assert_eq!(
        (o.id, o.replaced_by, o.revoked_at, o.revoke_reason.as_deref()),
        (old.id, Some(n.id), Some(at(61)), Some("rotated"))
    );
    assert_eq!((n.rotated_from, n.lineage(), o.lineage()), (Some(old.id), old.id, old.id));
    assert_eq!(o.status(at(60)), KeyStatus::Active, "valid during the grace period");
    assert_eq!(o.status(at(61)), KeyStatus::Revoked, "revoked after it");
    assert_eq!(store.get_key(n.id).await.must("get new"), *n);
    assert_eq!(store.get_key(o.id).await.must("get old"), *o);
    let old_rows = key_audit(store, old.id).await;
    assert_eq!(old_rows[0].action, "rotate");
    assert_eq!(old_rows[0].details["replaced_by"], json!(n.id));
    assert_eq!(old_rows[0].details["after"]["revoke_reason"], json!("rotated"));
    let new_rows = key_audit(store, n.id).await;
    assert_eq!((new_rows.len(), new_rows[0].action.as_str()), (1, "create"));
    assert_eq!(new_rows[0].details["rotated_from"], json!(old.id));

    let again = store.rotate_key(old.id, successor(&org), at(2), &Actor::cli(at(2))).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    let missing = store.rotate_key(KeyId::new(), successor(&org), at(2), &Actor::cli(at(2))).await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
    // The chain goes on under the first key's lineage.
    let third = store.rotate_key(n.id, successor(&org), at(3), &Actor::cli(at(3))).await.written("rotate again");
    assert_eq!(third.new.lineage(), old.id);
    // A revoked key is not rotated.
    let gone = store.insert_key(new_key(&org, Environment::Live).1, &cli).await;
    assert!(matches!(gone, Err(StoreError::KeyLimitReached(1))), "the limit still holds for creation: {gone:?}");
    let events = store.list_events(None, 1_000).await.must("list_events");
    let rotated_events: Vec<_> =
        events.iter().filter(|e| e.event.as_str() == "key.rotated" && e.organization_id == Some(org.id)).collect();
    assert_eq!(rotated_events.len(), 2);
    assert_eq!(rotated_events[0].key_id, Some(n.id));
    assert_eq!(rotated_events[0].payload["rotated_from"], json!(old.id));
    assert!(rotated_events[0].payload["key"].get("key_hash").is_none());
}

/// Rotating a key revoked at once is refused.
pub async fn revoked_keys_are_not_rotated(store: &dyn Store) {
    let org = org(store, None).await;
    let k = store.insert_key(new_key(&org, Environment::Live).1, &Actor::cli(at(1))).await.written("insert");
    store.revoke_key(k.id, "revoked", at(2), &Actor::cli(at(2))).await.written("revoke");
    let r = store.rotate_key(k.id, successor(&org), at(3), &Actor::cli(at(3))).await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
}

/// Expiring keys are listed soonest first; `key.expiring` is written once per key and threshold;
/// expired keys are deactivated once each, audited `expire`, with a `key.expired` event.
pub async fn expiry_lists_notifies_and_deactivates(store: &dyn Store) {
    let org = org(store, None).await;
    let other = org_id_only(store).await;
    let cli = Actor::cli(t0());
    let with_expiry = |minutes: i64| NewKey { expires_at: Some(at(minutes)), ..new_key(&org, Environment::Live).1 };
    let soon = store.insert_key(with_expiry(60), &cli).await.written("soon");
    let later = store.insert_key(with_expiry(60 * 24 * 3), &cli).await.written("later");
    let far = store.insert_key(with_expiry(60 * 24 * 30), &cli).await.written("far");
    let never = store.insert_key(new_key(&org, Environment::Live).1, &cli).await.written("never");
    let disabled = store.insert_key(NewKey { is_active: false, ..with_expiry(30) }, &cli).await.written("disabled");

    let week = at(0) + Duration::days(7);
    let listed = store.list_expiring_keys(Some(org.id), at(0), week, 100).await.must("expiring");
    assert_eq!(listed.iter().map(|k| k.id).collect::<Vec<_>>(), [soon.id, later.id]);
    assert!(store.list_expiring_keys(Some(other), at(0), week, 100).await.must("other org").is_empty());
    let _ = (far, never, disabled);

    let first = store.record_expiring_events(at(0), 7).await.must("record expiring");
    let mine: Vec<_> = first.iter().filter(|e| e.organization_id == Some(org.id)).collect();
    assert_eq!(mine.iter().map(|e| e.key_id).collect::<Vec<_>>(), [Some(soon.id), Some(later.id)]);
    assert!(mine.iter().all(|e| e.event.as_str() == "key.expiring" && e.payload["days"] == json!(7)));
    let again = store.record_expiring_events(at(5), 7).await.must("record again");
    assert!(again.iter().all(|e| e.organization_id != Some(org.id)), "once per key and threshold: {again:?}");
    let one_day = store.record_expiring_events(at(5), 1).await.must("another threshold");
    assert_eq!(
        one_day.iter().filter(|e| e.organization_id == Some(org.id)).map(|e| e.key_id).collect::<Vec<_>>(),
        [Some(soon.id)]
    );

    let system = Actor::system(at(61));
    let expired = store.expire_keys(Some(org.id), at(61), &system).await.written("expire");
    assert_eq!(expired.iter().map(|k| (k.id, k.is_active)).collect::<Vec<_>>(), [(soon.id, false)]);
    let rows = key_audit(store, soon.id).await;
    assert_eq!((rows[0].action.as_str(), rows[0].actor.as_str()), ("expire", "system"));
    assert_eq!(rows[0].details["after"]["is_active"], json!(false));
    assert!(store.expire_keys(Some(org.id), at(62), &system).await.written("expire again").is_empty(), "once");
    let events = store.list_events(None, 1_000).await.must("events");
    assert_eq!(events.iter().filter(|e| e.event.as_str() == "key.expired" && e.key_id == Some(soon.id)).count(), 1);
    // Ids sort by creation: paging after the first returns the rest.
    let rest = store.list_events(Some(events[0].id), 1_000).await.must("events after");
    assert_eq!(rest.len(), events.len() - 1);
}

async fn org_id_only(store: &dyn Store) -> crate::OrgId {
    org(store, None).await.id
}

/// Every kind of write links its audit rows into one intact chain, also under concurrent writers.
/// Numbers a client may send in metadata that PostgreSQL's `jsonb` does not give back as they were
/// written (`-0.0` comes back `0.0`; `1e16` comes back `10000000000000000`, an integer): the audit row
/// is hashed as it is stored, or every later check reports its content changed.
pub async fn audit_chain_survives_numbers_jsonb_rewrites(store: &dyn Store) {
    let org = org(store, None).await;
    let cli = Actor::cli(at(1));
    let k = store.insert_key(new_key(&org, Environment::Live).1, &cli).await.written("insert");
    let variants = [
        json!({"zero": -0.0}),
        json!({"big": 1e16}),
        json!({"negative": -1.5e17}),
        json!({"nested": [{"n": 2e18}], "huge": 1e300}),
    ];
    for (i, metadata) in variants.into_iter().enumerate() {
        let patch = crate::KeyPatch { metadata: Some(metadata.clone()), ..Default::default() };
        let when = at(2 + i as i64);
        store.update_key(k.id, patch, &Actor::cli(when)).await.written("update");
        store.append_audit("import", org.id, metadata.clone(), &Actor::cli(when)).await.must("append");
        let report = store.verify_audit_chain().await.must("verify");
        assert!(report.intact, "{metadata}: {report:?}");
    }
}

pub async fn audit_chain_stays_intact(store: &dyn Store) {
    let org = org(store, None).await;
    let cli = Actor::cli(at(1));
    let k = store.insert_key(new_key(&org, Environment::Live).1, &cli).await.written("insert");
    let patch = crate::KeyPatch {
        name: Some("renamed".into()),
        metadata: Some(json!({"b": 1, "a": [1.5, "x"]})),
        ..Default::default()
    };
    store.update_key(k.id, patch, &Actor::key(k.id, Some("2001:db8::1".into()), at(2))).await.written("update");
    store.append_audit("import", org.id, json!({"z": {"y": 1, "x": null}}), &cli).await.must("append");
    store.rotate_key(k.id, successor(&org), at(9), &cli).await.written("rotate");
    let actors: Vec<Actor> = (0..8).map(|i| Actor::cli(at(10 + i))).collect();
    let mut writes = Vec::new();
    for actor in &actors {
        writes.push(store.insert_key(new_key(&org, Environment::Test).1, actor));
    }
    for r in join_all(writes).await {
        r.written("concurrent insert");
    }
    let report = store.verify_audit_chain().await.must("verify");
    assert!(report.intact, "{report:?}");
    assert!(report.rows_checked >= 13, "{report:?}");
    assert_eq!(report.broken, None);
}

/// Runs futures side by side on this task (no `futures` dependency for one helper).
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in pinned.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// Webhooks: CRUD (audited, never the secret), outbox events dispatched once to the active subscribed
/// endpoints of the event's organization, deliveries claimed under a lease, attempts recorded, retried.
pub async fn webhooks_dispatch_claim_and_record(store: &dyn Store) {
    use crate::{Attempt, AttemptOutcome, NewWebhook, WebhookPatch, WebhookSecret};
    // Clear what other cases left in the outbox, so the counts below are this case's.
    store.dispatch_events(at(0), at(0), 100_000).await.must("drain");
    let org = org(store, None).await;
    let other = org_id_only(store).await;
    let cli = Actor::cli(at(0));
    let hook = |events: &[EventKind], is_active: bool, organization_id| NewWebhook {
        id: uuid::Uuid::now_v7(),
        organization_id,
        url: "http://127.0.0.1:9/hook".to_owned(),
        events: events.to_vec(),
        is_active,
        secret: WebhookSecret("whsec_test_secret_value".to_owned()),
        description: None,
    };
    let created_only = store.insert_webhook(hook(&[EventKind::KeyCreated], true, org.id), &cli).await.must("hook 1");
    let all = store.insert_webhook(hook(&[], true, org.id), &cli).await.must("hook 2");
    let inactive = store.insert_webhook(hook(&[], false, org.id), &cli).await.must("hook 3");
    let foreign = store.insert_webhook(hook(&[], true, other), &cli).await.must("hook 4");
    let unknown = store.insert_webhook(hook(&[], true, keyward_core::OrgId::new()), &cli).await;
    assert!(matches!(unknown, Err(StoreError::NotFound)), "an unknown organization: {unknown:?}");
    assert_eq!(store.get_webhook(all.id).await.must("get"), all);
    let listed: Vec<_> = store.list_webhooks(Some(org.id)).await.must("list").iter().map(|h| h.id).collect();
    assert_eq!(listed, [inactive.id, all.id, created_only.id]);
    let rows = crate::conformance_lifecycle::org_rows(store, org.id).await;
    assert!(rows.iter().any(|r| r.action == "webhook_create"));
    assert!(!format!("{rows:?}").contains("whsec_test_secret_value"), "SECURITY: no secret in the audit trail");

    let k = store.insert_key(new_key(&org, Environment::Live).1, &Actor::cli(at(1))).await.written("insert key");
    store.revoke_key(k.id, "revoked", at(2), &Actor::cli(at(2))).await.written("revoke");
    let made = store.dispatch_events(at(3), at(3) + Duration::hours(24), 1_000).await.must("dispatch");
    assert_eq!(made, 3, "created → 2 endpoints, revoked → 1");
    assert_eq!(store.dispatch_events(at(3), at(3), 1_000).await.must("again"), 0, "each event once");
    assert!(store.list_deliveries(foreign.id, page(10)).await.must("foreign").items.is_empty(), "tenant isolation");
    assert!(store.list_deliveries(inactive.id, page(10)).await.must("inactive").items.is_empty());
    // Newest first, a page at a time: the cursor is the last delivery's id.
    let newest = store.list_deliveries(all.id, page(1)).await.must("page 1");
    assert_eq!((newest.items.len(), newest.next_cursor), (1, Some(newest.items[0].id)));
    let older = PageRequest { after: newest.next_cursor, limit: 1 };
    let older = store.list_deliveries(all.id, older).await.must("page 2");
    assert_eq!((older.items.len(), older.next_cursor), (1, None), "two deliveries in all");
    assert!(older.items[0].id < newest.items[0].id);
    assert_eq!((older.items[0].event, newest.items[0].event), (EventKind::KeyCreated, EventKind::KeyRevoked));

    let jobs = store.claim_deliveries(at(3), at(4), 10).await.must("claim");
    let jobs: Vec<_> =
        jobs.into_iter().filter(|j| [created_only.id, all.id].contains(&j.delivery.endpoint_id)).collect();
    assert_eq!(jobs.len(), 3);
    assert!(jobs.iter().all(|j| j.secret.0 == "whsec_test_secret_value"));
    let first = &jobs[0];
    assert_eq!(first.delivery.payload["type"], json!(first.delivery.event));
    assert_eq!(first.delivery.payload["id"], json!(first.delivery.event_id));
    assert!(
        store
            .claim_deliveries(at(3), at(4), 10)
            .await
            .must("leased")
            .iter()
            .all(|j| !jobs.iter().any(|m| m.delivery.id == j.delivery.id)),
        "leased"
    );

    let failed = Attempt { attempted_at: at(3), status_code: Some(503), latency_ms: 12, error: Some("503".into()) };
    store.record_attempt(first.delivery.id, &failed, AttemptOutcome::RetryAt(at(5))).await.must("attempt 1");
    for j in &jobs[1..] {
        let ok = Attempt { attempted_at: at(3), status_code: Some(200), latency_ms: 3, error: None };
        store.record_attempt(j.delivery.id, &ok, AttemptOutcome::Succeeded).await.must("ok");
    }
    let again = store.claim_deliveries(at(5), at(6), 10).await.must("claim again");
    assert_eq!(again.iter().filter(|j| j.delivery.id == first.delivery.id).count(), 1);
    let ok = Attempt { attempted_at: at(5), status_code: Some(204), latency_ms: 4, error: None };
    store.record_attempt(first.delivery.id, &ok, AttemptOutcome::Succeeded).await.must("attempt 2");
    let attempts = store.list_attempts(first.delivery.id).await.must("attempts");
    assert_eq!(attempts, [failed, ok]);
    // A page of deliveries' attempts in one read: each as `list_attempts` reads it; one never
    // attempted (an unknown id here) has no entry.
    let page_ids: Vec<_> = jobs.iter().map(|j| j.delivery.id).chain([uuid::Uuid::now_v7()]).collect();
    let of_page = store.list_attempts_of(&page_ids).await.must("attempts of a page");
    assert_eq!(of_page.len(), jobs.len());
    for id in &page_ids {
        let one = store.list_attempts(*id).await.must("attempts of one");
        assert_eq!(of_page.get(id).cloned().unwrap_or_default(), one);
    }
    assert_eq!(of_page.get(&first.delivery.id).map(Vec::len), Some(2), "oldest first, as above");
    assert!(store.list_attempts_of(&[]).await.must("no deliveries").is_empty());
    let deliveries = store.list_deliveries(first.delivery.endpoint_id, page(10)).await.must("deliveries").items;
    let d = deliveries.iter().find(|d| d.id == first.delivery.id).must_some(Tamper::Change);
    assert_eq!(
        (d.status.as_str(), d.attempts, d.last_status_code, d.next_attempt_at),
        ("succeeded", 2, Some(204), None)
    );

    let retried = store.retry_delivery(d.endpoint_id, d.id, at(7), at(8)).await.must("retry");
    assert_eq!((retried.status.as_str(), retried.next_attempt_at), ("pending", Some(at(7))));
    let wrong = store.retry_delivery(foreign.id, d.id, at(7), at(8)).await;
    assert!(matches!(wrong, Err(StoreError::NotFound)), "{wrong:?}");

    let patch =
        WebhookPatch { is_active: Some(false), events: Some(vec![EventKind::KeyRevoked]), ..Default::default() };
    let updated = store.update_webhook(all.id, patch, &cli).await.must("update");
    assert_eq!((updated.is_active, updated.events.clone()), (false, vec![EventKind::KeyRevoked]));
    store.delete_webhook(all.id, &cli).await.must("delete");
    assert!(matches!(store.get_webhook(all.id).await, Err(StoreError::NotFound)));
    assert!(store.list_deliveries(all.id, page(10)).await.must("gone").items.is_empty());
    // Events recorded on their own, with a dedup key, happen once.
    let k2 = store.get_key(k.id).await.must("get key");
    let e = crate::Event::about_key(crate::EventKind::QuotaThreshold, &k2, json!({"percent": 80}), at(9));
    assert!(store.record_event(&e, Some("quota:test:80")).await.must("record"));
    let e2 = crate::Event::about_key(crate::EventKind::QuotaThreshold, &k2, json!({"percent": 80}), at(9));
    assert!(!store.record_event(&e2, Some("quota:test:80")).await.must("record twice"));
    assert!(store.verify_audit_chain().await.must("verify").intact);
}

async fn org_rows(store: &dyn Store, org: crate::OrgId) -> Vec<AuditEntry> {
    let filter = AuditFilter { organization_id: Some(org), ..Default::default() };
    store.list_audit(&filter, PageRequest { after: None, limit: 100 }).await.must("list_audit").items
}

/// A way to tamper with the audit log behind the store's back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// Change a field of one row.
    Change,
    /// Delete one row in the middle.
    Delete,
    /// Swap two neighbouring rows.
    Reorder,
    /// Delete the last row.
    Truncate,
}

/// Runs SQL directly on the store's database.
pub type Exec<'a> = &'a (dyn Fn(String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Sync);

/// Writes a few audit rows, tampers with them as `kind` says (with `sql(kind, a, b)` giving the
/// statements for rows `a` and `b`), and checks that verification names the right row.
pub async fn audit_tampering_is_detected(
    store: &dyn Store,
    kind: Tamper,
    exec: Exec<'_>,
    sql: fn(Tamper, i64, i64) -> Vec<String>,
) {
    let org = org(store, None).await;
    for i in 0..4 {
        store.insert_key(new_key(&org, Environment::Live).1, &Actor::cli(at(i))).await.written("insert");
    }
    assert!(store.verify_audit_chain().await.must("verify").intact);
    let filter = AuditFilter::default();
    let mut ids: Vec<i64> = store
        .list_audit(&filter, PageRequest { after: None, limit: 100 })
        .await
        .must("list")
        .items
        .iter()
        .map(|e| e.id)
        .collect();
    ids.sort_unstable();
    assert!(ids.len() >= 5, "{ids:?}");
    let (a, b) = (ids[2], ids[3]);
    let last = ids[ids.len() - 1];
    let (target, other) = if kind == Tamper::Truncate { (last, last) } else { (a, b) };
    for statement in sql(kind, target, other) {
        exec(statement).await;
    }
    let report = store.verify_audit_chain().await.must("verify after tampering");
    assert!(!report.intact, "{kind:?}: {report:?}");
    let broken = report.broken.clone().must_some(kind);
    let want = match kind {
        Tamper::Change => (Some(a), "content_changed"),
        Tamper::Delete => (Some(b), "link_broken"),
        Tamper::Reorder => (Some(a), "link_broken"),
        Tamper::Truncate => (Some(last), "truncated"),
    };
    assert_eq!((broken.id, broken.reason.as_str()), want, "{kind:?}: {report:?}");
}

trait MustSome<T> {
    fn must_some(self, kind: Tamper) -> T;
}

impl<T> MustSome<T> for Option<T> {
    fn must_some(self, kind: Tamper) -> T {
        match self {
            Some(v) => v,
            None => panic!("{kind:?}: no broken row reported"),
        }
    }
}

/// Two stores writing to one database at once, many times over: one intact chain (PostgreSQL: the
/// chain head's row lock; SQLite: `BEGIN IMMEDIATE`).
pub async fn two_stores_writing_at_once_keep_one_intact_chain(a: &dyn Store, b: &dyn Store) {
    let org = org(a, None).await;
    let actor = Actor::cli(t0());
    for _ in 0..10 {
        let (a1, b1, a2, b2) = tokio::join!(
            a.insert_key(new_key(&org, Environment::Live).1, &actor),
            b.insert_key(new_key(&org, Environment::Live).1, &actor),
            a.append_audit("import", org.id, json!({"n": 1}), &actor),
            b.append_audit("import", org.id, json!({"n": 2}), &actor),
        );
        a1.written("insert a");
        b1.written("insert b");
        a2.must("append a");
        b2.must("append b");
    }
    let report = b.verify_audit_chain().await.must("verify");
    assert!(report.intact, "{report:?}");
    assert_eq!(report.rows_checked, 41);
}
