//! The store behaviour suite: what every [`Store`] backend must do, as plain async functions that panic
//! on failure. Each backend's test file runs every case as its own `#[tokio::test]`, so a failure names
//! backend and case.
//!
//! The cases assume nothing about the backend beyond the trait, and each creates its own organizations
//! with unique slugs and owner ids, so cases may share one database and run side by side. Times are
//! fixed (2030-01-01 onwards) and passed in, so nothing here sleeps.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

use chrono::{DateTime, Duration, Utc};
use keyward_core::{Environment, IpAllowList, KeyHasher, KeyId, KeyPrefix, KeyStatus, OrgId, PlainKey, ScopeSet};
use serde_json::json;
use uuid::Uuid;

pub mod invalidation;
pub mod usage;

pub use invalidation::every_write_is_seen_by_the_next_verification;

use crate::{
    Actor, ApiKey, AuditEntry, AuditFilter, Changed, ImportOutcome, KeyFilter, KeyImport, KeyPatch, KeyUsage,
    LimitOverrides, LimitPatch, NewKey, NewOrganization, NoCache, Organization, OrganizationPatch, Page, PageRequest,
    Store, StoreError, StoreResult,
};

// -----------------------------------------------------------------------------------------------
// Helpers

/// Every page of a list from the first on: each page's size and the ids of all items, in order. A
/// page's cursor is its last item's id.
async fn walk_pages<T, C, Fut>(mut list: impl FnMut(Option<C>) -> Fut, id: impl Fn(&T) -> C) -> (Vec<usize>, Vec<C>)
where
    C: Copy + PartialEq + Debug,
    Fut: Future<Output = StoreResult<Page<T, C>>>,
{
    let (mut sizes, mut seen) = (Vec::new(), Vec::new());
    let mut after = None;
    loop {
        let page = list(after).await.must("list page");
        sizes.push(page.items.len());
        seen.extend(page.items.iter().map(&id));
        match page.next_cursor {
            Some(cursor) => {
                assert_eq!(Some(cursor), seen.last().copied(), "the cursor is the last item's id");
                after = Some(cursor);
            }
            None => return (sizes, seen),
        }
        assert!(sizes.len() < 10, "pagination does not end");
    }
}

/// `unwrap` with the operation named in the panic (clippy keeps `unwrap` out of library code).
trait Must<T> {
    fn must(self, what: &str) -> T;
}

impl<T, E: Debug> Must<T> for Result<T, E> {
    fn must(self, what: &str) -> T {
        match self {
            Ok(value) => value,
            Err(e) => panic!("{what}: {e:?}"),
        }
    }
}

/// [`Must`] for a write that can change what verification answers: no cache stands in front of the
/// store in these cases, so its invalidations go nowhere.
pub(crate) trait Written<T> {
    fn written(self, what: &str) -> T;
}

impl<T, E: Debug> Written<T> for Result<Changed<T>, E> {
    fn written(self, what: &str) -> T {
        self.must(what).apply(&NoCache)
    }
}

/// 2030-01-01T00:00:00Z: the suite's epoch.
pub fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).unwrap_or_default()
}

/// `minutes` after [`t0`].
fn at(minutes: i64) -> DateTime<Utc> {
    t0() + Duration::minutes(minutes)
}

/// A value no other case (or run) uses.
fn unique(label: &str) -> String {
    format!("{label}-{}", Uuid::now_v7().simple())
}

/// An active organization with a unique slug; not yet inserted.
pub fn new_org(max_api_keys: Option<i64>) -> NewOrganization {
    NewOrganization {
        id: OrgId::new(),
        name: "Acme".to_owned(),
        slug: unique("acme"),
        email: Some("ops@acme.test".to_owned()),
        plan: "free".to_owned(),
        is_active: true,
        limits: LimitOverrides::default(),
        max_api_keys,
    }
}

/// An organization inserted with every optional field empty, at most `max_api_keys` keys.
pub async fn org(store: &dyn Store, max_api_keys: Option<i64>) -> Organization {
    store.insert_org(new_org(max_api_keys), &Actor::cli(t0())).await.must("insert_org")
}

/// A fresh key (and its plaintext) for `org`, with every optional field empty; not yet inserted.
pub fn new_key(org: &Organization, environment: Environment) -> (PlainKey, NewKey) {
    let plain = PlainKey::generate(&KeyPrefix::default(), environment).must("generate key");
    let (hash_algorithm, key_hash) = KeyHasher::default().hash(&plain);
    let key = NewKey {
        id: KeyId::new(),
        organization_id: org.id,
        owner_id: None,
        name: "test key".to_owned(),
        description: None,
        environment,
        prefix: plain.prefix().to_owned(),
        hint: plain.hint().to_owned(),
        hash_algorithm,
        key_hash,
        scopes: ScopeSet::default(),
        allowed_ips: IpAllowList::default(),
        expires_at: None,
        is_active: true,
        plan: None,
        limits: LimitOverrides::default(),
        metadata: json!({}),
        rotated_from: None,
    };
    (plain, key)
}

/// `key` inserted.
pub async fn insert(store: &dyn Store, key: NewKey) -> ApiKey {
    store.insert_key(key, &Actor::cli(t0())).await.written("insert_key")
}

async fn key(store: &dyn Store, org: &Organization) -> ApiKey {
    insert(store, new_key(org, Environment::Live).1).await
}

fn filter(organization_id: Option<OrgId>, now: DateTime<Utc>) -> KeyFilter {
    KeyFilter {
        organization_id,
        owner_id: None,
        environment: None,
        status: None,
        include_inactive: false,
        search: None,
        expires_by: None,
        now,
    }
}

/// Every key a filter lists, following the cursor to the end.
async fn all_keys(store: &dyn Store, filter: &KeyFilter) -> Vec<KeyId> {
    let mut out = Vec::new();
    let mut after = None;
    for _ in 0..1_000 {
        let page = store.list_keys(filter, PageRequest { after, limit: 100 }).await.must("list_keys");
        out.extend(page.items.iter().map(|k| k.id));
        match page.next_cursor {
            Some(cursor) => after = Some(cursor),
            None => return out,
        }
    }
    panic!("list_keys never reached its last page");
}

/// Every audit row a filter lists, newest first.
async fn all_audit(store: &dyn Store, filter: &AuditFilter) -> Vec<AuditEntry> {
    let mut out = Vec::new();
    let mut after = None;
    for _ in 0..1_000 {
        let page = store.list_audit(filter, PageRequest { after, limit: 100 }).await.must("list_audit");
        out.extend(page.items);
        match page.next_cursor {
            Some(cursor) => after = Some(cursor),
            None => return out,
        }
    }
    panic!("list_audit never reached its last page");
}

async fn key_audit(store: &dyn Store, id: KeyId) -> Vec<AuditEntry> {
    all_audit(store, &AuditFilter { key_id: Some(id), ..Default::default() }).await
}

async fn org_audit(store: &dyn Store, id: OrgId) -> Vec<AuditEntry> {
    all_audit(store, &AuditFilter { organization_id: Some(id), ..Default::default() }).await
}

fn actions(entries: &[AuditEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.action.as_str()).collect()
}

/// Ids as a listing must return them: newest first.
fn newest_first(keys: &[&ApiKey]) -> Vec<KeyId> {
    let mut ids: Vec<KeyId> = keys.iter().map(|k| k.id).collect();
    ids.sort_by(|a, b| b.cmp(a));
    ids
}

// -----------------------------------------------------------------------------------------------
// Cases

/// The store answers and names itself.
pub async fn ping_and_backend(store: &dyn Store) {
    store.ping().await.must("ping");
    assert!(["sqlite", "postgres"].contains(&store.backend()), "backend {}", store.backend());
}

/// After `migrate_up` every known migration is applied, listed in version order.
pub async fn migrations_are_all_applied(store: &dyn Store) {
    let status = store.migration_status().await.must("migration_status");
    assert!(!status.is_empty());
    assert!(status.iter().all(|m| m.applied), "{status:?}");
    assert!(status.windows(2).all(|w| w[0].version < w[1].version), "{status:?}");
    assert_eq!(status[0].version, 1);
}

/// A key is stored field for field, found by its hash with its organization's state, and read by id.
pub async fn create_find_and_get_a_key(store: &dyn Store) {
    let org = org(store, None).await;
    let (plain, mut new) = new_key(&org, Environment::Test);
    new.owner_id = Some(unique("user"));
    new.name = "billing service".to_owned();
    new.description = Some("used by the billing cron".to_owned());
    new.scopes = ScopeSet::parse(&["read:projects", "write:*", "keyward:verify"]).must("scopes");
    new.allowed_ips = IpAllowList::parse(&["10.1.2.3/8", "2001:db8::/32", "192.0.2.7"]).must("ips");
    new.expires_at = Some(at(60 * 24) + Duration::microseconds(654_321));
    new.plan = Some("pro".to_owned());
    new.limits = LimitOverrides {
        rate_limit_per_minute: Some(10),
        rate_limit_per_hour: Some(100),
        rate_limit_per_day: None,
        monthly_request_limit: Some(5_000),
    };
    new.metadata = json!({"email": "dev@acme.test", "company": "Acme", "seats": 3, "tags": ["a", "b"]});
    // Microseconds survive storage; the actor's time is the key's creation time.
    let actor = Actor::key(KeyId::new(), Some("192.0.2.1".to_owned()), at(1) + Duration::microseconds(250_001));

    let created = store.insert_key(new.clone(), &actor).await.written("insert_key");
    assert_eq!(created.id, new.id);
    assert_eq!(created.organization_id, org.id);
    assert_eq!(created.owner_id, new.owner_id);
    assert_eq!(created.name, new.name);
    assert_eq!(created.description, new.description);
    assert_eq!(created.environment, Environment::Test);
    assert_eq!(created.prefix, plain.prefix());
    assert_eq!(created.hint, plain.hint());
    assert_eq!(created.hash_algorithm, new.hash_algorithm);
    assert!(created.key_hash.ct_eq(&new.key_hash));
    assert_eq!(created.scopes, new.scopes);
    assert_eq!(created.allowed_ips.to_strings(), ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
    assert_eq!(created.expires_at, new.expires_at);
    assert!(created.is_active);
    assert_eq!((created.revoked_at, created.revoke_reason.as_deref()), (None, None));
    assert_eq!(created.plan.as_deref(), Some("pro"));
    assert_eq!(created.limits, new.limits);
    assert_eq!(created.metadata, new.metadata);
    assert_eq!(created.total_requests, 0);
    assert_eq!((created.last_used_at, created.last_used_ip.as_deref()), (None, None));
    assert_eq!((created.rotated_from, created.replaced_by), (None, None));
    assert_eq!(created.created_by.as_deref(), Some(actor.actor.as_str()));
    assert_eq!(created.created_at, actor.at);
    assert_eq!(created.updated_at, actor.at);

    let found = store.find_key_by_hash(&new.key_hash).await.must("find_key_by_hash");
    let found = found.unwrap_or_else(|| panic!("the key is not found by its hash"));
    assert_eq!(found.key, created);
    assert!(found.org_is_active);
    assert_eq!(store.get_key(created.id).await.must("get_key"), created);

    let (_, stranger) = new_key(&org, Environment::Test);
    assert_eq!(store.find_key_by_hash(&stranger.key_hash).await.must("find unknown hash"), None);

    let audit = key_audit(store, created.id).await;
    assert_eq!(actions(&audit), ["create"]);
    let row = &audit[0];
    assert_eq!(row.key_id, Some(created.id));
    assert_eq!(row.organization_id, Some(org.id));
    assert_eq!(row.actor, actor.actor);
    assert_eq!(row.actor_ip.as_deref(), Some("192.0.2.1"));
    assert_eq!(row.created_at, actor.at);
    assert_eq!(row.details, json!({ "after": created.audit_json() }));

    // Verification sees the organization's state with the key.
    let off = OrganizationPatch { is_active: Some(false), ..Default::default() };
    store.update_org(org.id, off, &Actor::cli(at(2))).await.written("deactivate org");
    let found = store.find_key_by_hash(&new.key_hash).await.must("find_key_by_hash");
    assert_eq!(found.map(|f| f.org_is_active), Some(false));
}

/// Unknown ids are `NotFound` (or `None` for `find_*`), and nothing is created by trying.
pub async fn unknown_ids_are_not_found(store: &dyn Store) {
    let cli = Actor::cli(t0());
    let r = store.get_key(KeyId::new()).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "get_key: {r:?}");
    let r = store.get_org(OrgId::new()).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "get_org: {r:?}");
    let r = store.update_key(KeyId::new(), KeyPatch { name: Some("x".into()), ..Default::default() }, &cli).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "update_key: {r:?}");
    let r = store.revoke_key(KeyId::new(), "gone", t0(), &cli).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "revoke_key: {r:?}");
    let r =
        store.update_org(OrgId::new(), OrganizationPatch { name: Some("x".into()), ..Default::default() }, &cli).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "update_org: {r:?}");
    assert_eq!(store.find_org_by_slug(&unique("nobody")).await.must("find_org_by_slug"), None);

    // A key for an organization that does not exist.
    let ghost = Organization {
        id: OrgId::new(),
        name: "ghost".into(),
        slug: unique("ghost"),
        email: None,
        plan: "free".into(),
        is_active: true,
        limits: LimitOverrides::default(),
        max_api_keys: None,
        created_at: t0(),
        updated_at: t0(),
    };
    let (_, orphan) = new_key(&ghost, Environment::Live);
    let r = store.insert_key(orphan.clone(), &cli).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "insert_key into unknown org: {r:?}");
    assert_eq!(store.find_key_by_hash(&orphan.key_hash).await.must("find orphan"), None);
    assert!(key_audit(store, orphan.id).await.is_empty());
}

/// Each list filter, and the status of every key derived at the filter's `now`.
pub async fn list_keys_filters(store: &dyn Store) {
    let org = org(store, None).await;
    let alice = unique("alice");
    let bob = unique("bob");
    let carol = unique("carol");
    let make = |owner: &str, env, f: fn(&mut NewKey)| {
        let (_, mut k) = new_key(&org, env);
        k.owner_id = Some(owner.to_owned());
        f(&mut k);
        k
    };
    let a = insert(store, make(&alice, Environment::Live, |_| {})).await;
    let b = insert(store, make(&bob, Environment::Test, |_| {})).await;
    let c = insert(store, make(&alice, Environment::Live, |k| k.is_active = false)).await;
    let d = insert(store, make(&alice, Environment::Live, |_| {})).await;
    let e = insert(store, make(&bob, Environment::Live, |k| k.expires_at = Some(at(20)))).await;
    let f = insert(store, make(&alice, Environment::Test, |_| {})).await;
    let g = insert(
        store,
        make(&carol, Environment::Live, |k| {
            k.is_active = false;
            k.expires_at = Some(at(20));
        }),
    )
    .await;
    let d = store.revoke_key(d.id, "leaked", at(10), &Actor::cli(at(10))).await.written("revoke d");
    // Revoked in the future: a rotation's grace period.
    let f = store.revoke_key(f.id, "rotated", at(100), &Actor::cli(at(10))).await.written("revoke f");

    let now = at(30);
    let base = filter(Some(org.id), now);
    let with_status = |status, now| KeyFilter { status: Some(status), ..filter(Some(org.id), now) };
    let cases: Vec<(&str, KeyFilter, Vec<&ApiKey>)> = vec![
        ("default leaves out disabled and revoked", base.clone(), vec![&a, &b, &e, &f]),
        ("include_inactive", KeyFilter { include_inactive: true, ..base.clone() }, vec![&a, &b, &c, &d, &e, &f, &g]),
        ("active", with_status(KeyStatus::Active, now), vec![&a, &b, &f]),
        ("disabled (wins over expired)", with_status(KeyStatus::Disabled, now), vec![&c, &g]),
        ("expired", with_status(KeyStatus::Expired, now), vec![&e]),
        ("revoked", with_status(KeyStatus::Revoked, now), vec![&d]),
        ("active before anything happened", with_status(KeyStatus::Active, at(5)), vec![&a, &b, &d, &e, &f]),
        ("revoked before the revocation", with_status(KeyStatus::Revoked, at(5)), vec![]),
        ("expired at the expiry instant", with_status(KeyStatus::Expired, at(20)), vec![&e]),
        ("revoked at the revocation instant", with_status(KeyStatus::Revoked, at(100)), vec![&d, &f]),
        ("default after the grace period", filter(Some(org.id), at(100)), vec![&a, &b, &e]),
        ("owner", KeyFilter { owner_id: Some(alice.clone()), ..base.clone() }, vec![&a, &f]),
        (
            "owner with include_inactive",
            KeyFilter { owner_id: Some(alice.clone()), include_inactive: true, ..base.clone() },
            vec![&a, &c, &d, &f],
        ),
        ("environment", KeyFilter { environment: Some(Environment::Test), ..base.clone() }, vec![&b, &f]),
        (
            "owner, environment and status",
            KeyFilter {
                owner_id: Some(bob.clone()),
                environment: Some(Environment::Live),
                status: Some(KeyStatus::Expired),
                ..base.clone()
            },
            vec![&e],
        ),
        (
            "every organization, by owner",
            KeyFilter { owner_id: Some(alice.clone()), ..filter(None, now) },
            vec![&a, &f],
        ),
    ];
    for (name, filter, want) in cases {
        assert_eq!(all_keys(store, &filter).await, newest_first(&want), "{name}");
    }
    // The status the store filters by is the one the records derive, at every instant of interest.
    let records: HashMap<KeyId, &ApiKey> = [&a, &b, &c, &d, &e, &f, &g].into_iter().map(|k| (k.id, k)).collect();
    for now in [at(0), at(10), at(20), at(30), at(100), at(1_000)] {
        let mut listed = 0;
        for status in [KeyStatus::Active, KeyStatus::Disabled, KeyStatus::Expired, KeyStatus::Revoked] {
            for id in all_keys(store, &with_status(status, now)).await {
                assert_eq!(records[&id].status(now), status, "key {id} at {now}");
                listed += 1;
            }
        }
        assert_eq!(listed, records.len(), "every key has exactly one status at {now}");
    }
}

/// The search matches a name or an owner id by substring (ASCII letters in any case, `%`, `_` and `\\`
/// as plain characters) or a hint exactly, and never reaches another organization; `expires_by`
/// lists keys that expire in `(now, expires_by]`. Both work with the other filters and the cursor.
pub async fn list_keys_searches_and_finds_expiring(store: &dyn Store) {
    let org = org(store, None).await;
    let other = self::org(store, None).await;
    let make = |org: &Organization, name: &str, owner: Option<&str>, expires: Option<i64>| {
        let (_, mut k) = new_key(org, Environment::Live);
        k.name = name.to_owned();
        k.owner_id = owner.map(str::to_owned);
        k.expires_at = expires.map(at);
        k
    };
    let billing = insert(store, make(&org, "Billing Service", Some("cust_42"), Some(10))).await;
    let percent = insert(store, make(&org, "100% uptime", None, Some(60))).await;
    let slash = insert(store, make(&org, r"a\b", Some("CUST-7"), Some(200))).await;
    let accent = insert(store, make(&org, "Émile's key", None, None)).await;
    let plain = insert(store, make(&org, "plain", Some("cust-42"), Some(90))).await;
    let theirs = insert(store, make(&other, "Billing Service", Some("cust_42"), Some(60))).await;

    let now = at(30);
    let base = KeyFilter { include_inactive: true, ..filter(Some(org.id), now) };
    let search = |q: &str| KeyFilter { search: Some(q.to_owned()), ..base.clone() };
    // Part of a hint matches only as part of a name or an owner id (a random hint may be one).
    let short_hint: String = plain.hint.chars().take(3).collect();
    let mine = [&billing, &percent, &slash, &accent, &plain];
    let holds = |text: &str| text.to_ascii_lowercase().contains(&short_hint.to_ascii_lowercase());
    let by_part_of_hint: Vec<&ApiKey> =
        mine.into_iter().filter(|k| holds(&k.name) || k.owner_id.as_deref().is_some_and(holds)).collect();
    let cases: Vec<(&str, KeyFilter, Vec<&ApiKey>)> = vec![
        ("name, any ASCII case", search("bILLING s"), vec![&billing]),
        ("owner id", search("Cust"), vec![&billing, &slash, &plain]),
        ("`_` is a plain character", search("t_4"), vec![&billing]),
        ("`_` alone", search("_"), vec![&billing]),
        ("`%` is a plain character", search("0%"), vec![&percent]),
        ("`%` never matches everything", search("%"), vec![&percent]),
        ("`\\` is a plain character", search(r"\"), vec![&slash]),
        ("other letters match as they are", search("Émile"), vec![&accent]),
        ("only ASCII letters are folded", search("émile"), vec![]),
        ("the hint, exactly", search(&plain.hint), vec![&plain]),
        ("part of a hint is no hint match", search(&short_hint), by_part_of_hint),
        ("never another organization's", search("billing"), vec![&billing]),
        ("every organization", KeyFilter { organization_id: None, ..search("billing") }, vec![&billing, &theirs]),
        (
            "expiring by at(100), not the expired",
            KeyFilter { expires_by: Some(at(100)), ..base.clone() },
            vec![&percent, &plain],
        ),
        ("expiring and searched", KeyFilter { expires_by: Some(at(100)), ..search("cust") }, vec![&plain]),
        ("expiring at the instant itself", KeyFilter { expires_by: Some(at(60)), ..base.clone() }, vec![&percent]),
        ("searched with a status", KeyFilter { status: Some(KeyStatus::Expired), ..search("cust") }, vec![&billing]),
    ];
    for (name, filter, want) in cases {
        assert_eq!(all_keys(store, &filter).await, newest_first(&want), "{name}");
    }
    // A search pages like any list: one key a page, each once, newest first.
    let mut after = None;
    let mut paged = Vec::new();
    for _ in 0..10 {
        let page = store.list_keys(&search("cust"), PageRequest { after, limit: 1 }).await.must("list_keys");
        paged.extend(page.items.iter().map(|k| k.id));
        match page.next_cursor {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }
    assert_eq!(paged, newest_first(&[&billing, &slash, &plain]));
}

/// The search stays exact whichever way the store finds its keys (by index for a rare needle of three
/// characters or more, walking newest first otherwise): it follows renames and imports, takes a
/// needle's quotes and operators as plain characters, folds only ASCII letters, and pages through more
/// matches than the store reads by index.
pub async fn list_keys_search_follows_writes_and_many_matches(store: &dyn Store) {
    let org = org(store, None).await;
    let named = |name: &str, owner: Option<&str>| {
        let (_, mut k) = new_key(&org, Environment::Live);
        k.name = name.to_owned();
        k.owner_id = owner.map(str::to_owned);
        k
    };
    let renamed = insert(store, named("Alpha gateway", Some("team-a"))).await;
    let quoted = insert(store, named(r#"say "hi" (now) OR -x* : NEAR"#, None)).await;
    let school = insert(store, named("ÉCOLE Straße", Some("ÉQUIPE"))).await;
    let patch = KeyPatch { name: Some("Beta proxy".to_owned()), ..Default::default() };
    store.update_key(renamed.id, patch, &Actor::cli(at(1))).await.written("rename");

    let many = crate::sql::store::SEARCH_CANDIDATES_MAX as usize + 5;
    let mut bulk: Vec<KeyImport> = (0..many)
        .map(|i| KeyImport { key: named(&format!("Bulk {i}"), Some("bulk-owner")), legacy: false, created_at: None })
        .collect();
    bulk[many / 2].key.name = "Bulk needle-in-haystack".to_owned();
    let haystack = bulk[many / 2].key.id;
    store.import_keys(org.id, bulk.clone(), &Actor::cli(at(2)), false).await.written("import");
    let mut bulk_ids: Vec<KeyId> = bulk.iter().map(|k| k.key.id).collect();
    bulk_ids.sort_by(|a, b| b.cmp(a));

    let base = KeyFilter { include_inactive: true, ..filter(Some(org.id), at(3)) };
    let search = |q: &str| KeyFilter { search: Some(q.to_owned()), ..base.clone() };
    let cases: Vec<(&str, KeyFilter, Vec<KeyId>)> = vec![
        ("the old name is gone", search("gateway"), vec![]),
        ("the new name", search("beta PROXY"), vec![renamed.id]),
        ("the owner stays", search("team-a"), vec![renamed.id]),
        ("quotes are plain", search(r#""hi""#), vec![quoted.id]),
        ("operators are plain", search("(now) OR -x* :"), vec![quoted.id]),
        ("an operator word", search("near"), vec![quoted.id]),
        ("one quote", search(r#"""#), vec![quoted.id]),
        ("other letters match as they are", search("ÉCOLE"), vec![school.id]),
        ("other letters are not folded", search("école"), vec![]),
        ("nor in an owner id", search("équipe"), vec![]),
        ("ASCII letters next to others", search("STRAßE"), vec![school.id]),
        ("an imported key", search("NEEDLE-in"), vec![haystack]),
        ("more matches than are read by index", search("bulk"), bulk_ids.clone()),
        ("more matches, short needle", search("bu"), bulk_ids.clone()),
    ];
    for (name, filter, want) in cases {
        assert_eq!(all_keys(store, &filter).await, want, "{name}");
    }
    let first = store.list_keys(&search("bulk"), PageRequest { after: None, limit: 7 }).await.must("first page");
    assert_eq!(first.items.iter().map(|k| k.id).collect::<Vec<_>>(), bulk_ids[..7], "newest first");
    assert_eq!(first.next_cursor, Some(bulk_ids[6]));
}

/// A needle of one or two characters (no trigram index can look it up) finds what a longer one would:
/// a substring of the name or the owner id, ASCII letters in any case and no other letter folded, in
/// the organization asked for, after renames and imports, with the other filters, page by page.
pub async fn list_keys_finds_short_needles(store: &dyn Store) {
    let org = org(store, None).await;
    let other = self::org(store, None).await;
    let make = |org: &Organization, name: &str, owner: Option<&str>, environment: Environment| {
        let (_, mut k) = new_key(org, environment);
        k.name = name.to_owned();
        k.owner_id = owner.map(str::to_owned);
        k
    };
    let alpha = insert(store, make(&org, "Alpha Zq one", None, Environment::Live)).await;
    let two = insert(store, make(&org, "zQ two", Some("x"), Environment::Test)).await;
    let owned = insert(store, make(&org, "plain", Some("team-ZQ"), Environment::Live)).await;
    let school = insert(store, make(&org, "École", None, Environment::Live)).await;
    let lone = insert(store, make(&org, "q", Some("Q"), Environment::Live)).await;
    let theirs = insert(store, make(&other, "zq theirs", None, Environment::Live)).await;

    let base = KeyFilter { include_inactive: true, ..filter(Some(org.id), at(3)) };
    let search = |q: &str| KeyFilter { search: Some(q.to_owned()), ..base.clone() };
    let zq = [&alpha, &two, &owned];
    let cases: Vec<(&str, KeyFilter, Vec<&ApiKey>)> = vec![
        ("two characters", search("zq"), zq.to_vec()),
        ("any ASCII case", search("ZQ"), zq.to_vec()),
        ("one character", search("Q"), vec![&alpha, &two, &owned, &lone]),
        ("a whole name", search("q"), vec![&alpha, &two, &owned, &lone]),
        ("no match", search("xj"), vec![]),
        ("no match, one character", search("!"), vec![]),
        ("other letters match as they are", search("É"), vec![&school]),
        ("other letters are not folded", search("é"), vec![]),
        ("ASCII letters next to others", search("ÉC"), vec![&school]),
        (
            "every organization",
            KeyFilter { organization_id: None, ..search("zq") },
            vec![&alpha, &two, &owned, &theirs],
        ),
        ("with an owner", KeyFilter { owner_id: Some("team-ZQ".to_owned()), ..search("zq") }, vec![&owned]),
        ("with an environment", KeyFilter { environment: Some(Environment::Test), ..search("zq") }, vec![&two]),
    ];
    for (name, filter, want) in cases {
        assert_eq!(all_keys(store, &filter).await, newest_first(&want), "{name}");
    }
    // One key a page, then two: each once, newest first.
    let by_zq = search("zq");
    for limit in [1, 2] {
        let (sizes, seen) =
            walk_pages(|after| store.list_keys(&by_zq, PageRequest { after, limit }), |k: &ApiKey| k.id).await;
        assert_eq!(seen, newest_first(&zq), "pages of {limit}");
        assert_eq!(sizes.iter().sum::<usize>(), 3, "pages of {limit}");
    }

    // Renamed and imported keys are found as they are now.
    let patch = KeyPatch { name: Some("Alpha one".to_owned()), ..Default::default() };
    store.update_key(alpha.id, patch, &Actor::cli(at(1))).await.written("rename");
    let imports: Vec<KeyImport> = ["imported ZQ 1", "imported zq 2"]
        .into_iter()
        .map(|name| KeyImport { key: make(&org, name, None, Environment::Live), legacy: false, created_at: None })
        .collect();
    let imported: Vec<KeyId> = imports.iter().map(|k| k.key.id).collect();
    store.import_keys(org.id, imports, &Actor::cli(at(2)), false).await.written("import");
    let mut want: Vec<KeyId> = [two.id, owned.id].into_iter().chain(imported).collect();
    want.sort_by(|a, b| b.cmp(a));
    assert_eq!(all_keys(store, &search("zq")).await, want, "after a rename and an import");
    assert_eq!(all_keys(store, &search("ha")).await, vec![alpha.id], "the new name");
}

/// Cursor pages: newest first, each key exactly once, `next_cursor` only while more remain.
pub async fn list_keys_paginates_newest_first(store: &dyn Store) {
    let org = org(store, None).await;
    let mut inserted = Vec::new();
    for _ in 0..7 {
        inserted.push(key(store, &org).await.id);
    }
    let want: Vec<KeyId> = inserted.iter().rev().copied().collect();
    let all = filter(Some(org.id), t0());

    let (sizes, seen) =
        walk_pages(|after| store.list_keys(&all, PageRequest { after, limit: 3 }), |k: &ApiKey| k.id).await;
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(seen, want, "newest first, none missing, none twice");

    let exact = store.list_keys(&all, PageRequest { after: None, limit: 7 }).await.must("list_keys 7");
    assert_eq!(exact.items.len(), 7);
    assert_eq!(exact.next_cursor, None, "no cursor when nothing is left");
    let tail = store.list_keys(&all, PageRequest { after: Some(want[5]), limit: 3 }).await.must("tail");
    assert_eq!(tail.items.iter().map(|k| k.id).collect::<Vec<_>>(), [want[6]]);
    assert_eq!(tail.next_cursor, None);
}

/// An update writes exactly the changed fields into its audit row; a no-op writes nothing.
pub async fn update_key_records_a_diff(store: &dyn Store) {
    let org = org(store, None).await;
    let (_, mut new) = new_key(&org, Environment::Live);
    new.name = "old name".to_owned();
    new.description = Some("to be cleared".to_owned());
    new.scopes = ScopeSet::parse(&["read:a"]).must("scopes");
    let created = insert(store, new).await;

    let actor = Actor::key(KeyId::new(), Some("198.51.100.4".to_owned()), at(5));
    let patch = KeyPatch {
        name: Some("new name".to_owned()),
        description: Some(None),
        scopes: Some(ScopeSet::parse(&["write:b", "read:a"]).must("scopes")),
        // Unchanged values in a patch are not changes.
        plan: Some(None),
        ..Default::default()
    };
    let updated = store.update_key(created.id, patch, &actor).await.written("update_key");
    assert_eq!(updated.name, "new name");
    assert_eq!(updated.description, None);
    assert_eq!(updated.scopes.to_strings(), ["read:a", "write:b"]);
    assert_eq!(updated.updated_at, at(5));
    assert_eq!(updated.created_at, created.created_at);
    assert_eq!(store.get_key(created.id).await.must("get_key"), updated);

    let audit = key_audit(store, created.id).await;
    assert_eq!(actions(&audit), ["update", "create"]);
    let row = &audit[0];
    assert_eq!((row.actor.as_str(), row.actor_ip.as_deref()), (actor.actor.as_str(), Some("198.51.100.4")));
    assert_eq!(row.created_at, at(5));
    assert_eq!(row.organization_id, Some(org.id));
    assert_eq!(
        row.details,
        json!({
            "before": {"name": "old name", "description": "to be cleared", "scopes": ["read:a"]},
            "after": {"name": "new name", "description": null, "scopes": ["read:a", "write:b"]},
        })
    );

    // The same values again, and an empty patch: no write, no row, `updated_at` unchanged.
    let same = KeyPatch { name: Some("new name".to_owned()), description: Some(None), ..Default::default() };
    let unchanged = store.update_key(created.id, same, &Actor::cli(at(6))).await.written("no-op update");
    assert_eq!(unchanged, updated);
    let unchanged = store.update_key(created.id, KeyPatch::default(), &Actor::cli(at(7))).await.written("empty patch");
    assert_eq!(unchanged, updated);
    assert_eq!(key_audit(store, created.id).await.len(), 2);

    // Every patchable field round-trips.
    let full = KeyPatch {
        allowed_ips: Some(IpAllowList::parse(&["203.0.113.0/24"]).must("ips")),
        expires_at: Some(Some(at(90) + Duration::microseconds(17))),
        metadata: Some(json!({"company": "Acme", "tier": 2})),
        plan: Some(Some("enterprise".to_owned())),
        limits: LimitPatch {
            rate_limit_per_minute: Some(Some(1)),
            rate_limit_per_hour: Some(Some(2)),
            rate_limit_per_day: Some(Some(3)),
            monthly_request_limit: Some(Some(4)),
        },
        ..Default::default()
    };
    let all = store.update_key(created.id, full, &Actor::cli(at(8))).await.written("full update");
    assert_eq!(all.allowed_ips.to_strings(), ["203.0.113.0/24"]);
    assert_eq!(all.expires_at, Some(at(90) + Duration::microseconds(17)));
    assert_eq!(all.metadata, json!({"company": "Acme", "tier": 2}));
    assert_eq!(all.plan.as_deref(), Some("enterprise"));
    assert_eq!(
        all.limits,
        LimitOverrides {
            rate_limit_per_minute: Some(1),
            rate_limit_per_hour: Some(2),
            rate_limit_per_day: Some(3),
            monthly_request_limit: Some(4),
        }
    );
    assert_eq!(store.get_key(created.id).await.must("get_key"), all);
    let audit = key_audit(store, created.id).await;
    assert_eq!(actions(&audit), ["update", "update", "create"]);
    let changed = audit[0].details["after"].as_object().map(|m| m.len());
    assert_eq!(changed, Some(8), "{}", audit[0].details);
}

/// Switching `is_active` alone is audited as `deactivate` / `activate`.
pub async fn deactivate_and_activate_are_named(store: &dyn Store) {
    let org = org(store, None).await;
    let k = key(store, &org).await;
    let off = KeyPatch { is_active: Some(false), ..Default::default() };
    let on = KeyPatch { is_active: Some(true), ..Default::default() };

    let disabled = store.update_key(k.id, off.clone(), &Actor::cli(at(1))).await.written("deactivate");
    assert!(!disabled.is_active);
    assert_eq!(disabled.status(at(1)), KeyStatus::Disabled);
    store.update_key(k.id, off, &Actor::cli(at(2))).await.written("deactivate again");
    let enabled = store.update_key(k.id, on, &Actor::cli(at(3))).await.written("activate");
    assert!(enabled.is_active);
    let both = KeyPatch { is_active: Some(false), name: Some("renamed".to_owned()), ..Default::default() };
    store.update_key(k.id, both, &Actor::cli(at(4))).await.written("deactivate and rename");

    let audit = key_audit(store, k.id).await;
    assert_eq!(actions(&audit), ["update", "activate", "deactivate", "create"]);
    assert_eq!(audit[2].details, json!({"before": {"is_active": true}, "after": {"is_active": false}}));
    assert_eq!(audit[1].details, json!({"before": {"is_active": false}, "after": {"is_active": true}}));
}

/// Revocation keeps the row, is audited once, and only ever moves earlier.
pub async fn revoke_keeps_the_row(store: &dyn Store) {
    let org = org(store, None).await;
    let (_, new) = new_key(&org, Environment::Live);
    let hash = new.key_hash;
    let k = insert(store, new).await;

    let revoked = store.revoke_key(k.id, "leaked", at(5), &Actor::cli(at(5))).await.written("revoke");
    assert_eq!(revoked.revoked_at, Some(at(5)));
    assert_eq!(revoked.revoke_reason.as_deref(), Some("leaked"));
    assert!(revoked.is_active, "revocation does not touch is_active");
    assert_eq!(revoked.updated_at, at(5));
    assert_eq!(revoked.status(at(5)), KeyStatus::Revoked);
    assert_eq!(store.get_key(k.id).await.must("get revoked"), revoked);
    let found = store.find_key_by_hash(&hash).await.must("find revoked");
    assert_eq!(found.map(|f| f.key), Some(revoked.clone()), "the row is kept, so verify can say REVOKED");

    let again = store.revoke_key(k.id, "again", at(6), &Actor::cli(at(6))).await.written("revoke again");
    assert_eq!(again, revoked, "a second revocation changes nothing");
    let audit = key_audit(store, k.id).await;
    assert_eq!(actions(&audit), ["revoke", "create"]);
    assert_eq!(
        audit[0].details,
        json!({
            "before": {"revoked_at": null, "revoke_reason": null},
            "after": {"revoked_at": at(5), "revoke_reason": "leaked"},
        })
    );

    // A key revoked for later (a rotation's grace period) works until then; revoking it for an earlier
    // time brings the end forward, a later time changes nothing.
    let grace = key(store, &org).await;
    let scheduled = store.revoke_key(grace.id, "rotated", at(100), &Actor::cli(at(10))).await.written("schedule");
    assert_eq!(scheduled.status(at(50)), KeyStatus::Active);
    let later = store.revoke_key(grace.id, "later", at(200), &Actor::cli(at(11))).await.written("revoke later");
    assert_eq!(later, scheduled);
    let now = store.revoke_key(grace.id, "leaked", at(60), &Actor::cli(at(60))).await.written("revoke sooner");
    assert_eq!(now.revoked_at, Some(at(60)));
    assert_eq!(now.revoke_reason.as_deref(), Some("leaked"));
    assert_eq!(actions(&key_audit(store, grace.id).await), ["revoke", "revoke", "create"]);
}

/// Audit listing by organization, key, action, actor and time range, with cursor pages.
pub async fn audit_list_filters_and_paginates(store: &dyn Store) {
    let org = org(store, None).await;
    let k1 = store.insert_key(new_key(&org, Environment::Live).1, &Actor::cli(at(1))).await.written("k1");
    let by_key = Actor::key(k1.id, Some("203.0.113.5".to_owned()), at(2));
    let k2 = store.insert_key(new_key(&org, Environment::Live).1, &by_key).await.written("k2");
    let rename = KeyPatch { name: Some("renamed".to_owned()), ..Default::default() };
    store.update_key(k1.id, rename, &Actor::system(at(3))).await.written("update k1");
    store.revoke_key(k2.id, "done", at(4), &Actor::cli(at(4))).await.written("revoke k2");

    let everything = org_audit(store, org.id).await;
    assert_eq!(actions(&everything), ["revoke", "update", "create", "create", "create"]);
    assert!(everything.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert!(everything.iter().all(|e| e.organization_id == Some(org.id)));
    assert_eq!(everything[4].key_id, None, "the organization's own creation");

    let by = |f: AuditFilter| AuditFilter { organization_id: Some(org.id), ..f };
    /// An audit row as the cases name it: its action and key.
    type Row<'a> = (&'a str, Option<KeyId>);
    let cases: Vec<(&str, AuditFilter, Vec<Row<'_>>)> = vec![
        (
            "key",
            AuditFilter { key_id: Some(k1.id), ..Default::default() },
            vec![("update", Some(k1.id)), ("create", Some(k1.id))],
        ),
        (
            "action",
            by(AuditFilter { action: Some("create".into()), ..Default::default() }),
            vec![("create", Some(k2.id)), ("create", Some(k1.id)), ("create", None)],
        ),
        ("actor", AuditFilter { actor: Some(k1.id.to_string()), ..Default::default() }, vec![("create", Some(k2.id))]),
        (
            "system actor",
            by(AuditFilter { actor: Some("system".into()), ..Default::default() }),
            vec![("update", Some(k1.id))],
        ),
        (
            "since is inclusive, until exclusive",
            by(AuditFilter { since: Some(at(2)), until: Some(at(4)), ..Default::default() }),
            vec![("update", Some(k1.id)), ("create", Some(k2.id))],
        ),
        ("since alone", by(AuditFilter { since: Some(at(4)), ..Default::default() }), vec![("revoke", Some(k2.id))]),
        ("until alone", by(AuditFilter { until: Some(at(1)), ..Default::default() }), vec![("create", None)]),
        ("nothing matches", by(AuditFilter { action: Some("delete".into()), ..Default::default() }), vec![]),
    ];
    for (name, filter, want) in cases {
        let got = all_audit(store, &filter).await;
        let got: Vec<Row<'_>> = got.iter().map(|e| (e.action.as_str(), e.key_id)).collect();
        assert_eq!(got, want, "{name}");
    }
    let created_by_key = all_audit(store, &AuditFilter { actor: Some(k1.id.to_string()), ..Default::default() }).await;
    assert_eq!(created_by_key[0].actor_ip.as_deref(), Some("203.0.113.5"));
    assert_eq!(created_by_key[0].created_at, at(2));

    let only_org = AuditFilter { organization_id: Some(org.id), ..Default::default() };
    let (sizes, seen) =
        walk_pages(|after| store.list_audit(&only_org, PageRequest { after, limit: 2 }), |e: &AuditEntry| e.id).await;
    assert_eq!(sizes, [2, 2, 1]);
    assert_eq!(seen, everything.iter().map(|e| e.id).collect::<Vec<_>>());
}

/// Organizations: create, read, find by slug, update with a diff, activation actions, slug conflicts.
pub async fn organizations_create_update_and_find(store: &dyn Store) {
    let mut new = new_org(Some(5));
    new.limits = LimitOverrides {
        rate_limit_per_minute: Some(60),
        rate_limit_per_hour: None,
        rate_limit_per_day: Some(1_000),
        monthly_request_limit: Some(10_000),
    };
    let actor = Actor::cli(at(1) + Duration::microseconds(42));
    let created = store.insert_org(new.clone(), &actor).await.must("insert_org");
    assert_eq!(created.id, new.id);
    assert_eq!((created.name.as_str(), created.slug.as_str()), (new.name.as_str(), new.slug.as_str()));
    assert_eq!(created.email, new.email);
    assert_eq!(created.plan, "free");
    assert!(created.is_active);
    assert_eq!(created.limits, new.limits);
    assert_eq!(created.max_api_keys, Some(5));
    assert_eq!((created.created_at, created.updated_at), (actor.at, actor.at));
    assert_eq!(store.get_org(created.id).await.must("get_org"), created);
    assert_eq!(store.find_org_by_slug(&new.slug).await.must("find_org_by_slug"), Some(created.clone()));

    let audit = org_audit(store, created.id).await;
    assert_eq!(actions(&audit), ["create"]);
    assert_eq!(audit[0].key_id, None);
    assert_eq!(audit[0].actor, "cli");
    assert_eq!(audit[0].details, json!({ "after": created.audit_json() }));

    let patch = OrganizationPatch {
        name: Some("Acme Corp".to_owned()),
        email: Some(None),
        plan: Some("free".to_owned()),
        max_api_keys: Some(None),
        limits: LimitPatch { rate_limit_per_hour: Some(Some(500)), ..Default::default() },
        ..Default::default()
    };
    let updated = store.update_org(created.id, patch, &Actor::system(at(5))).await.written("update_org");
    assert_eq!(updated.name, "Acme Corp");
    assert_eq!(updated.email, None);
    assert_eq!(updated.max_api_keys, None);
    assert_eq!(updated.limits.rate_limit_per_hour, Some(500));
    assert_eq!(updated.updated_at, at(5));
    assert_eq!(updated.created_at, created.created_at);
    assert_eq!(store.get_org(created.id).await.must("get_org"), updated);

    let off = OrganizationPatch { is_active: Some(false), ..Default::default() };
    let on = OrganizationPatch { is_active: Some(true), ..Default::default() };
    assert!(!store.update_org(created.id, off, &Actor::cli(at(6))).await.written("deactivate").is_active);
    assert!(store.update_org(created.id, on.clone(), &Actor::cli(at(7))).await.written("activate").is_active);
    let unchanged = store.update_org(created.id, on, &Actor::cli(at(8))).await.written("no-op");
    assert_eq!(unchanged.updated_at, at(7), "a no-op writes nothing");

    let audit = org_audit(store, created.id).await;
    assert_eq!(actions(&audit), ["activate", "deactivate", "update", "create"]);
    assert_eq!(
        audit[2].details,
        json!({
            "before": {"name": "Acme", "email": "ops@acme.test", "max_api_keys": 5, "rate_limit_per_hour": null},
            "after": {"name": "Acme Corp", "email": null, "max_api_keys": null, "rate_limit_per_hour": 500},
        })
    );

    let taken = NewOrganization { id: OrgId::new(), ..new.clone() };
    let r = store.insert_org(taken.clone(), &Actor::cli(at(9))).await;
    assert!(matches!(r, Err(StoreError::Conflict(ref m)) if m.contains("slug")), "duplicate slug: {r:?}");
    let r = store.get_org(taken.id).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "nothing was written: {r:?}");
}

/// `list_orgs` pages newest first over every organization; `count_orgs` counts them.
pub async fn list_and_count_orgs(store: &dyn Store) {
    let before = store.count_orgs().await.must("count_orgs");
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(org(store, None).await.id);
    }
    assert!(store.count_orgs().await.must("count_orgs") >= before + 3);

    let mut seen = Vec::new();
    let mut after = None;
    for _ in 0..100_000 {
        let page = store.list_orgs(PageRequest { after, limit: 2 }).await.must("list_orgs");
        assert!(page.items.len() <= 2);
        seen.extend(page.items.iter().map(|o| o.id));
        match page.next_cursor {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first, none twice");
    for id in &mine {
        assert!(seen.contains(id), "organization {id} is listed");
    }
}

/// `max_api_keys` counts the keys that are not revoked, checked at insert.
pub async fn max_api_keys_is_enforced(store: &dyn Store) {
    let org = org(store, Some(2)).await;
    let first = key(store, &org).await;
    key(store, &org).await;
    let (_, third) = new_key(&org, Environment::Live);
    let r = store.insert_key(third.clone(), &Actor::cli(at(1))).await;
    assert!(matches!(r, Err(StoreError::KeyLimitReached(2))), "third key: {r:?}");
    assert_eq!(store.find_key_by_hash(&third.key_hash).await.must("refused key"), None);
    assert!(key_audit(store, third.id).await.is_empty(), "a refused key leaves no audit row");

    // Disabled keys still count; revoked ones do not.
    let off = KeyPatch { is_active: Some(false), ..Default::default() };
    store.update_key(first.id, off, &Actor::cli(at(2))).await.written("disable");
    let r = store.insert_key(third.clone(), &Actor::cli(at(2))).await;
    assert!(matches!(r, Err(StoreError::KeyLimitReached(2))), "with a disabled key: {r:?}");
    store.revoke_key(first.id, "make room", at(3), &Actor::cli(at(3))).await.written("revoke");
    store.insert_key(third, &Actor::cli(at(4))).await.written("third key after a revocation");
    let r = store.insert_key(new_key(&org, Environment::Live).1, &Actor::cli(at(5))).await;
    assert!(matches!(r, Err(StoreError::KeyLimitReached(2))), "fourth key: {r:?}");

    let raise = OrganizationPatch { max_api_keys: Some(Some(3)), ..Default::default() };
    store.update_org(org.id, raise, &Actor::cli(at(6))).await.written("raise the limit");
    key(store, &org).await;
    let unlimited = OrganizationPatch { max_api_keys: Some(None), ..Default::default() };
    store.update_org(org.id, unlimited, &Actor::cli(at(7))).await.written("no limit");
    for _ in 0..3 {
        key(store, &org).await;
    }
}

/// Two keys with one hash cannot exist; neither can two keys with one id.
pub async fn duplicate_hash_is_a_conflict(store: &dyn Store) {
    let org = org(store, None).await;
    let (plain, original) = new_key(&org, Environment::Live);
    let k = insert(store, original.clone()).await;

    let twin = NewKey { id: KeyId::new(), ..original.clone() };
    let r = store.insert_key(twin.clone(), &Actor::cli(at(1))).await;
    match &r {
        Err(e @ StoreError::Conflict(message)) => {
            assert!(message.contains("hash"), "{message}");
            // SECURITY: the error says which constraint, never the value.
            let text = format!("{e} {e:?}");
            assert!(!text.contains(&original.key_hash.to_hex()), "{text}");
            assert!(!text.contains(plain.expose_secret()), "{text}");
        }
        other => panic!("duplicate hash: {other:?}"),
    }
    let r = store.get_key(twin.id).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "nothing was written: {r:?}");

    let (_, other) = new_key(&org, Environment::Live);
    let same_id = NewKey { id: k.id, ..other };
    let r = store.insert_key(same_id, &Actor::cli(at(2))).await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "duplicate id: {r:?}");
    assert_eq!(actions(&key_audit(store, k.id).await), ["create"]);
}

/// Usage adds up, and `last_used_*` only moves forward.
pub async fn record_key_usage_accumulates(store: &dyn Store) {
    let org = org(store, None).await;
    let k = key(store, &org).await;
    let other = key(store, &org).await;
    let usage = |key: &ApiKey, requests, minute, ip: Option<&str>| KeyUsage {
        key_id: key.id,
        requests,
        last_used_at: at(minute),
        last_used_ip: ip.map(str::to_owned),
    };

    store.record_key_usage(&[]).await.must("empty batch");
    store.record_key_usage(&[usage(&k, 3, 10, Some("192.0.2.1"))]).await.must("first batch");
    let got = store.get_key(k.id).await.must("get_key");
    assert_eq!((got.total_requests, got.last_used_at), (3, Some(at(10))));
    assert_eq!(got.last_used_ip.as_deref(), Some("192.0.2.1"));

    // Older news (a batch from a slower node) adds requests but does not move last use back.
    store.record_key_usage(&[usage(&k, 2, 5, Some("192.0.2.2"))]).await.must("older batch");
    let got = store.get_key(k.id).await.must("get_key");
    assert_eq!((got.total_requests, got.last_used_at), (5, Some(at(10))));
    assert_eq!(got.last_used_ip.as_deref(), Some("192.0.2.1"));

    // Several keys in one batch; a key that no longer exists is skipped; an unknown address does not
    // erase the known one.
    let batch = [
        usage(&k, 1, 20, None),
        usage(&other, 7, 15, Some("2001:db8::1")),
        KeyUsage { key_id: KeyId::new(), ..usage(&k, 1, 20, None) },
    ];
    store.record_key_usage(&batch).await.must("mixed batch");
    let got = store.get_key(k.id).await.must("get_key");
    assert_eq!((got.total_requests, got.last_used_at), (6, Some(at(20))));
    assert_eq!(got.last_used_ip.as_deref(), Some("192.0.2.1"));
    let got_other = store.get_key(other.id).await.must("get other");
    assert_eq!((got_other.total_requests, got_other.last_used_at), (7, Some(at(15))));
    assert_eq!(got_other.last_used_ip.as_deref(), Some("2001:db8::1"));

    // Usage is not a management change: no audit row, `updated_at` untouched.
    assert_eq!(got.updated_at, k.updated_at);
    assert_eq!(actions(&key_audit(store, k.id).await), ["create"]);
}

/// With room for one more key, two simultaneous inserts: exactly one wins.
pub async fn concurrent_inserts_respect_the_limit(store: &dyn Store) {
    for round in 0..3 {
        let org = org(store, Some(3)).await;
        key(store, &org).await;
        key(store, &org).await;
        let cli = Actor::cli(at(1));
        let (a, b) = tokio::join!(
            store.insert_key(new_key(&org, Environment::Live).1, &cli),
            store.insert_key(new_key(&org, Environment::Test).1, &cli),
        );
        let wins = [&a, &b].iter().filter(|r| r.is_ok()).count();
        let refused = [&a, &b].iter().filter(|r| matches!(r, Err(StoreError::KeyLimitReached(3)))).count();
        assert_eq!((wins, refused), (1, 1), "round {round}: {a:?} / {b:?}");
        let held = all_keys(store, &KeyFilter { include_inactive: true, ..filter(Some(org.id), at(1)) }).await;
        assert_eq!(held.len(), 3, "round {round}");
    }
}

/// SECURITY: no audit row carries the key's hash or the key itself, whatever happened to the key.
pub async fn audit_rows_never_hold_key_material(store: &dyn Store) {
    let org = org(store, None).await;
    let (plain, new) = new_key(&org, Environment::Live);
    let hash_hex = new.key_hash.to_hex();
    let k = insert(store, new).await;
    let patch = KeyPatch {
        name: Some("renamed".to_owned()),
        metadata: Some(json!({"note": "rotating soon"})),
        is_active: Some(false),
        ..Default::default()
    };
    store.update_key(k.id, patch, &Actor::cli(at(1))).await.written("update");
    store.revoke_key(k.id, "done", at(2), &Actor::cli(at(2))).await.written("revoke");

    let rows = org_audit(store, org.id).await;
    assert_eq!(rows.len(), 4);
    let secret_body = &plain.expose_secret()[plain.prefix().len()..];
    for row in rows {
        let text = serde_json::to_string(&row).must("serialize audit row");
        assert!(!text.contains(&hash_hex), "hash in audit row {}", row.id);
        assert!(!text.to_lowercase().contains(&hash_hex[..16]), "part of the hash in audit row {}", row.id);
        assert!(!text.contains(secret_body), "key in audit row {}", row.id);
        assert!(!text.contains("key_hash"), "hash field in audit row {}", row.id);
    }
}

/// An import: known hashes are left alone, a hash of another organization is refused, the limit holds,
/// a dry run says what would happen and writes nothing, and running it again changes nothing.
pub async fn import_keys_is_idempotent_and_respects_the_limit(store: &dyn Store) {
    let org = org(store, Some(4)).await;
    let other = org_with_key(store).await;
    let existing = key(store, &org).await;
    let legacy = |created_at| {
        let (_, mut k) = new_key(&org, Environment::Live);
        k.prefix = String::new();
        k.hint = String::new();
        k.owner_id = Some(unique("legacy-owner"));
        k.metadata = json!({"source": "old system"});
        KeyImport { key: k, legacy: true, created_at }
    };
    let first = legacy(Some(t0() - Duration::days(400) + Duration::microseconds(7)));
    let second = KeyImport { legacy: false, ..legacy(None) };
    let twice = KeyImport { key: NewKey { id: KeyId::new(), ..first.key.clone() }, ..first.clone() };
    let known = KeyImport {
        key: NewKey { id: KeyId::new(), key_hash: existing.key_hash, ..first.key.clone() },
        ..first.clone()
    };
    let theirs =
        KeyImport { key: NewKey { id: KeyId::new(), key_hash: other.1, ..first.key.clone() }, ..first.clone() };
    let third = legacy(None);
    let over = legacy(None);
    let batch = vec![first.clone(), second.clone(), twice, known, theirs, third.clone(), over.clone()];
    let want = [
        ImportOutcome::Imported,
        ImportOutcome::Imported,
        ImportOutcome::Unchanged,
        ImportOutcome::Unchanged,
        ImportOutcome::HashInOtherOrganization,
        ImportOutcome::Imported,
        ImportOutcome::KeyLimitReached(4),
    ];
    let actor = Actor::cli(at(1));

    let dry = store.import_keys(org.id, batch.clone(), &actor, true).await.written("dry run");
    assert_eq!(dry, want, "a dry run answers what a real run would do");
    assert_eq!(store.find_key_by_hash(&first.key.key_hash).await.must("find after dry run"), None);
    assert_eq!(all_keys(store, &KeyFilter { include_inactive: true, ..filter(Some(org.id), at(1)) }).await.len(), 1);

    let done = store.import_keys(org.id, batch.clone(), &actor, false).await.written("import");
    assert_eq!(done, want);
    let found = store.find_key_by_hash(&first.key.key_hash).await.must("find imported");
    let found = found.unwrap_or_else(|| panic!("the imported key is not found by its hash")).key;
    assert_eq!(found.id, first.key.id);
    assert_eq!(found.created_at, first.created_at.unwrap_or_default(), "the old system's creation time is kept");
    assert_eq!(found.updated_at, at(1));
    assert_eq!(found.created_by.as_deref(), Some("cli"));
    assert_eq!((found.prefix.as_str(), found.hint.as_str()), ("", ""));
    assert_eq!(found.owner_id, first.key.owner_id);
    assert_eq!(found.metadata, json!({"source": "old system"}));
    let second_found = store.get_key(second.key.id).await.must("get second");
    assert_eq!(second_found.created_at, at(1), "without a creation time, the import's");
    assert!(store.get_key(over.key.id).await.is_err(), "over the limit: not imported");
    assert!(key_audit(store, first.key.id).await.is_empty(), "no audit row per imported key");
    assert!(store.has_legacy_keys().await.must("has_legacy_keys"));

    // Again: nothing changes.
    let again = store.import_keys(org.id, batch, &Actor::cli(at(2)), false).await.written("import again");
    assert_eq!(
        again[..6],
        [
            ImportOutcome::Unchanged,
            ImportOutcome::Unchanged,
            ImportOutcome::Unchanged,
            ImportOutcome::Unchanged,
            ImportOutcome::HashInOtherOrganization,
            ImportOutcome::Unchanged,
        ]
    );
    assert_eq!(again[6], ImportOutcome::KeyLimitReached(4));
    assert_eq!(store.get_key(first.key.id).await.must("get first"), found);
    assert_eq!(all_keys(store, &KeyFilter { include_inactive: true, ..filter(Some(org.id), at(2)) }).await.len(), 4);

    // Revoked keys make room, as for insert_key.
    store.revoke_key(existing.id, "make room", at(3), &Actor::cli(at(3))).await.written("revoke");
    let last = store.import_keys(org.id, vec![over.clone()], &Actor::cli(at(4)), false).await.written("after revoke");
    assert_eq!(last, [ImportOutcome::Imported]);

    let r = store.import_keys(OrgId::new(), vec![], &actor, false).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "unknown organization: {r:?}");
    let stray = legacy(None);
    let r = store.import_keys(other.0.id, vec![stray.clone()], &actor, false).await;
    assert!(matches!(r, Err(StoreError::Internal(_))), "a key naming another organization: {r:?}");
    assert_eq!(store.find_key_by_hash(&stray.key.key_hash).await.must("find stray"), None);
}

/// An organization holding one key; returns the key's hash too.
async fn org_with_key(store: &dyn Store) -> (Organization, keyward_core::KeyHash) {
    let o = org(store, None).await;
    let k = key(store, &o).await;
    (o, k.key_hash)
}

/// Keys imported as not legacy do not make `has_legacy_keys` true; one legacy key does.
pub async fn has_legacy_keys_follows_imports(store: &dyn Store) {
    let before = store.has_legacy_keys().await.must("has_legacy_keys");
    let org = org(store, None).await;
    let plain = KeyImport { key: new_key(&org, Environment::Live).1, legacy: false, created_at: None };
    store.import_keys(org.id, vec![plain], &Actor::cli(at(1)), false).await.written("import");
    assert_eq!(store.has_legacy_keys().await.must("has_legacy_keys"), before);
    let legacy = KeyImport { key: new_key(&org, Environment::Live).1, legacy: true, created_at: None };
    store.import_keys(org.id, vec![legacy.clone()], &Actor::cli(at(2)), true).await.written("dry run");
    assert_eq!(store.has_legacy_keys().await.must("has_legacy_keys"), before, "a dry run changes nothing");
    store.import_keys(org.id, vec![legacy], &Actor::cli(at(3)), false).await.written("import legacy");
    assert!(store.has_legacy_keys().await.must("has_legacy_keys"));
}

/// `append_audit` writes exactly one row, returned as it reads back.
pub async fn append_audit_writes_one_row(store: &dyn Store) {
    let org = org(store, None).await;
    let actor = Actor::key(KeyId::new(), Some("192.0.2.9".to_owned()), at(3) + Duration::microseconds(5));
    let details = json!({"imported": 3, "unchanged": 1, "rejected": 2});
    let row = store.append_audit("import", org.id, details.clone(), &actor).await.must("append_audit");
    assert_eq!(row.action, "import");
    assert_eq!((row.key_id, row.organization_id), (None, Some(org.id)));
    assert_eq!((row.actor.as_str(), row.actor_ip.as_deref()), (actor.actor.as_str(), Some("192.0.2.9")));
    assert_eq!((row.details.clone(), row.created_at), (details, actor.at));
    let rows = all_audit(store, &AuditFilter { action: Some("import".into()), ..Default::default() }).await;
    let mine: Vec<&AuditEntry> = rows.iter().filter(|r| r.organization_id == Some(org.id)).collect();
    assert_eq!(mine, [&row]);
}

/// It drops every table, so it needs a store of its own (as every case has). Migrating down one step
/// reverts the newest migration only and keeps the data; down to nothing drops the tables; up
/// again gives a working store, and up once more changes nothing.
pub async fn migrate_down_and_up(store: &dyn Store) {
    let org = org(store, None).await;
    let k = key(store, &org).await;
    let all = store.migration_status().await.must("migration_status");
    assert!(all.len() >= 2 && all.iter().all(|m| m.applied), "{all:?}");

    let status = store.migrate_down(1).await.must("migrate down 1");
    let applied: Vec<bool> = status.iter().map(|m| m.applied).collect();
    let mut want = vec![true; all.len()];
    if let Some(last) = want.last_mut() {
        *last = false;
    }
    assert_eq!(applied, want, "only the newest is reverted");
    // The code reads the newest schema: the data is checked once it is back up.
    store.migrate_up().await.must("migrate up after one step down");
    assert_eq!(store.get_key(k.id).await.must("the data survives one step down"), k);

    let status = store.migrate_down(u32::MAX).await.must("migrate down all");
    assert!(status.iter().all(|m| !m.applied), "{status:?}");
    assert_eq!(store.migration_status().await.must("status"), status);
    let gone = store.get_org(org.id).await;
    assert!(matches!(gone, Err(StoreError::Internal(_))), "the tables are gone: {gone:?}");
    // Nothing left to revert is not an error.
    store.migrate_down(3).await.must("nothing to revert");

    let status = store.migrate_up().await.must("migrate up");
    assert_eq!(
        status.iter().map(|m| (m.version, m.applied)).collect::<Vec<_>>(),
        all.iter().map(|m| (m.version, true)).collect::<Vec<_>>()
    );
    assert_eq!((status[0].version, status[0].description.as_str()), (1, "init"));
    assert_eq!((status[1].version, status[1].description.as_str()), (2, "import"));
    // Up again is a no-op.
    assert_eq!(store.migrate_up().await.must("migrate up again"), status);
    assert!(!store.has_legacy_keys().await.must("has_legacy_keys"));
    create_find_and_get_a_key(store).await;
    audit_list_filters_and_paginates(store).await;
    import_keys_is_idempotent_and_respects_the_limit(store).await;
}

/// Two stores on one database (two nodes, or the server and the CLI on one file), each with its own
/// connections: the organization's `max_api_keys` holds across them, and each sees the other's write
/// at once.
pub async fn two_stores_respect_the_limit(a: &dyn Store, b: &dyn Store) {
    for round in 0..5 {
        let org = a.insert_org(new_org(Some(1)), &Actor::cli(t0())).await.must("insert_org");
        let actor = Actor::cli(t0());
        let (x, y) = tokio::join!(
            a.insert_key(new_key(&org, Environment::Live).1, &actor),
            b.insert_key(new_key(&org, Environment::Live).1, &actor)
        );
        let wins = [&x, &y].iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {x:?} / {y:?}");
        assert!(matches!(x.as_ref().err().or(y.as_ref().err()), Some(StoreError::KeyLimitReached(1))));
        let filter = KeyFilter { include_inactive: true, ..filter(Some(org.id), t0()) };
        let page = PageRequest { after: None, limit: 10 };
        assert_eq!(a.list_keys(&filter, page).await.must("list a").items.len(), 1);
        assert_eq!(b.list_keys(&filter, page).await.must("list b").items.len(), 1);
    }
}

/// Reads the status column of the `v_api_keys` view for a key.
pub type StatusOf<'a> = &'a (dyn Fn(KeyId) -> Pin<Box<dyn Future<Output = String> + Send>> + Sync);

/// `v_api_keys` derives the status against the database clock with the precedence of
/// `KeyState::status`.
pub async fn status_view_agrees_with_key_state(store: &dyn Store, status_of: StatusOf<'_>) {
    let org = org(store, None).await;
    let wall = Utc::now();
    let hour = Duration::hours(1);
    let cli = Actor::cli(wall);
    let mut keys = Vec::new();
    for (is_active, expires_at, revoked_at) in [
        (true, None, None),
        (false, None, None),
        (true, Some(wall - hour), None),
        (true, Some(wall + hour), None),
        (false, Some(wall - hour), None),
        (true, None, Some(wall - hour)),
        (false, Some(wall - hour), Some(wall - hour)),
        (true, None, Some(wall + hour)),
    ] {
        let new = NewKey { is_active, expires_at, ..new_key(&org, Environment::Live).1 };
        let mut key = store.insert_key(new, &cli).await.written("insert_key");
        if let Some(at) = revoked_at {
            key = store.revoke_key(key.id, "test", at, &cli).await.written("revoke_key");
        }
        keys.push(key);
    }
    for key in keys {
        assert_eq!(status_of(key.id).await, key.status(Utc::now()).as_str(), "{:?}", key.state());
    }
}

/// Declares the whole suite in a backend's test file: one `#[tokio::test]` per case, each on a store
/// of its own. `$fresh(test_name)` gives `Some((guard, store))`, or `None` when the backend's tests
/// are skipped; `$done(guard, store)` releases them; `$tamper(kind)` runs
/// [`crate::conformance_lifecycle::audit_tampering_is_detected`] on a fresh database. The cases are
/// listed here only, so every backend runs every one.
#[doc(hidden)]
#[macro_export]
macro_rules! conformance_tests {
    ($fresh:ident, $done:ident, $tamper:ident) => {
        mod store {
            use super::*;
            use $crate::conformance as cases;

            $crate::conformance_tests!(@cases $fresh, $done:
                ping_and_backend,
                migrations_are_all_applied,
                create_find_and_get_a_key,
                unknown_ids_are_not_found,
                list_keys_filters,
                list_keys_paginates_newest_first,
                list_keys_searches_and_finds_expiring,
                list_keys_search_follows_writes_and_many_matches,
                list_keys_finds_short_needles,
                update_key_records_a_diff,
                deactivate_and_activate_are_named,
                revoke_keeps_the_row,
                audit_list_filters_and_paginates,
                organizations_create_update_and_find,
                list_and_count_orgs,
                max_api_keys_is_enforced,
                duplicate_hash_is_a_conflict,
                record_key_usage_accumulates,
                concurrent_inserts_respect_the_limit,
                audit_rows_never_hold_key_material,
                import_keys_is_idempotent_and_respects_the_limit,
                has_legacy_keys_follows_imports,
                append_audit_writes_one_row,
                every_write_is_seen_by_the_next_verification,
                migrate_down_and_up,
            );
        }

        mod lifecycle {
            use super::*;
            use $crate::conformance_lifecycle as cases;
            use $crate::conformance_lifecycle::Tamper;

            $crate::conformance_tests!(@cases $fresh, $done:
                rotation_links_both_keys_and_schedules_revocation,
                revoked_keys_are_not_rotated,
                expiry_lists_notifies_and_deactivates,
                audit_chain_stays_intact,
                audit_chain_survives_numbers_jsonb_rewrites,
                webhooks_dispatch_claim_and_record,
            );

            $crate::conformance_tests!(@tamper $tamper:
                a_changed_audit_row_is_named: Change,
                a_deleted_audit_row_is_detected_at_the_next_row: Delete,
                reordered_audit_rows_are_named: Reorder,
                a_truncated_audit_log_is_detected: Truncate,
            );
        }

        mod usage {
            use super::*;
            use $crate::conformance::usage as cases;

            $crate::conformance_tests!(@cases $fresh, $done:
                usage_batch_writes_events_rollups_and_counters,
                usage_batch_is_idempotent,
                usage_batch_of_known_and_new_events_counts_the_new_once,
                usage_prune_keeps_rollups,
                usage_fold_counts_each_pending_row_once,
                usage_extreme_rows_saturate_and_never_stop_the_fold,
                usage_raw_events_choice_keeps_counts_exact,
                usage_batches_side_by_side_add_up_and_their_ids_expire,
                usage_folded_batch_counts_once_and_only_new_raw_events,
                usage_by_owner_sums_that_owners_keys_only,
                billing_rollups_equal_the_daily_sums,
                billing_rollups_are_back_filled_by_their_migration,
                owner_rollups_equal_the_daily_sums,
                owner_rollups_are_back_filled_by_their_migration,
                keys_by_id_reads_many_at_once,
            );
        }
    };
    (@tamper $tamper:ident: $($name:ident: $kind:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                $tamper(Tamper::$kind).await;
            }
        )*
    };
    (@cases $fresh:ident, $done:ident: $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((guard, store)) = $fresh(concat!(module_path!(), "::", stringify!($case))).await else {
                    return;
                };
                cases::$case(&store).await;
                $done(guard, store).await;
            }
        )*
    };
}
