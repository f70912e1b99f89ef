//! Legacy keys (imported, not in Keyward's format): looked up only once some organization has them, so
//! that until then a string that is not a Keyward key answers `MALFORMED` without any store query. The
//! proof counts every store call through a wrapper used only here.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use keyward_core::{HashAlgorithm, KeyHash, KeyHasher, KeyId, OrgId};
use keyward_server::auth::{Lookup, lookup};
use keyward_server::usage::UsageRecorder;
use keyward_server::{AppState, service};
use keyward_store::{
    Actor, ApiKey, AuditEntry, AuditFilter, ImportOutcome, KeyFilter, KeyImport, KeyPatch, KeyUsage, KeyWithOrg,
    MigrationInfo, NewKey, NewOrganization, Organization, OrganizationPatch, Page, PageRequest, Store, StoreResult,
};
use serde_json::{Value, json};

use crate::helpers::{Guard, TestApp};
use crate::import::import;

/// A store that counts every call, and remembers every hash looked up; with `down` set, lookups by
/// hash fail as a store outage would (the cache tests use it).
#[derive(Debug)]
pub(crate) struct Counting {
    pub inner: Arc<dyn Store>,
    pub calls: AtomicUsize,
    pub hashes: Mutex<Vec<KeyHash>>,
    pub down: std::sync::atomic::AtomicBool,
    /// While `down`: how long a lookup takes to fail (a pool waiting for a connection), in ms.
    pub fails_after_ms: std::sync::atomic::AtomicU64,
    /// Held for writing by a test: a lookup by hash reads the store, says so on `read`, then waits
    /// for it (a lookup slower than a concurrent change).
    pub gate: tokio::sync::RwLock<()>,
    pub read: tokio::sync::Notify,
}

impl Counting {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            calls: AtomicUsize::new(0),
            hashes: Mutex::new(Vec::new()),
            down: Default::default(),
            fails_after_ms: Default::default(),
            gate: Default::default(),
            read: Default::default(),
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn looked_up(&self, hash: &KeyHash) -> bool {
        self.hashes.lock().unwrap().contains(hash)
    }

    pub fn lookups_of(&self, hash: &KeyHash) -> usize {
        self.hashes.lock().unwrap().iter().filter(|h| *h == hash).count()
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl keyward_store::KeyLookup for Counting {
    async fn find_key_record(&self, hash: &KeyHash) -> StoreResult<Option<Arc<keyward_store::KeyRecord>>> {
        Ok(keyward_store::lookup::key_record(self.find_key_by_hash(hash).await?, hash))
    }
    async fn ping(&self) -> StoreResult<()> {
        self.count();
        if self.down.load(Ordering::SeqCst) {
            return Err(keyward_store::StoreError::Unavailable("the test took the store down".into()));
        }
        self.inner.ping().await
    }
}

#[async_trait]
impl Store for Counting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn migrate_up(&self) -> StoreResult<Vec<MigrationInfo>> {
        self.count();
        self.inner.migrate_up().await
    }
    async fn migrate_down(&self, steps: u32) -> StoreResult<Vec<MigrationInfo>> {
        self.count();
        self.inner.migrate_down(steps).await
    }
    async fn migration_status(&self) -> StoreResult<Vec<MigrationInfo>> {
        self.count();
        self.inner.migration_status().await
    }
    async fn insert_org(&self, org: NewOrganization, actor: &Actor) -> StoreResult<Organization> {
        self.count();
        self.inner.insert_org(org, actor).await
    }
    async fn get_org(&self, id: OrgId) -> StoreResult<Organization> {
        self.count();
        self.inner.get_org(id).await
    }
    async fn find_org_by_slug(&self, slug: &str) -> StoreResult<Option<Organization>> {
        self.count();
        self.inner.find_org_by_slug(slug).await
    }
    async fn list_orgs(&self, page: PageRequest<OrgId>) -> StoreResult<Page<Organization, OrgId>> {
        self.count();
        self.inner.list_orgs(page).await
    }
    async fn update_org(
        &self,
        id: OrgId,
        patch: OrganizationPatch,
        actor: &Actor,
    ) -> StoreResult<keyward_store::Changed<Organization>> {
        self.count();
        self.inner.update_org(id, patch, actor).await
    }
    async fn count_orgs(&self) -> StoreResult<i64> {
        self.count();
        self.inner.count_orgs().await
    }
    async fn insert_key(&self, key: NewKey, actor: &Actor) -> StoreResult<keyward_store::Changed<ApiKey>> {
        self.count();
        self.inner.insert_key(key, actor).await
    }
    async fn find_key_by_hash(&self, hash: &KeyHash) -> StoreResult<Option<KeyWithOrg>> {
        self.count();
        self.hashes.lock().unwrap().push(*hash);
        if self.down.load(Ordering::SeqCst) {
            let wait = self.fails_after_ms.load(Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            return Err(keyward_store::StoreError::Unavailable("the test took the store down".into()));
        }
        let found = self.inner.find_key_by_hash(hash).await;
        self.read.notify_one();
        let _gate = self.gate.read().await;
        found
    }
    async fn get_key(&self, id: KeyId) -> StoreResult<ApiKey> {
        self.count();
        self.inner.get_key(id).await
    }
    async fn list_keys(&self, filter: &KeyFilter, page: PageRequest<KeyId>) -> StoreResult<Page<ApiKey, KeyId>> {
        self.count();
        self.inner.list_keys(filter, page).await
    }
    async fn update_key(
        &self,
        id: KeyId,
        patch: KeyPatch,
        actor: &Actor,
    ) -> StoreResult<keyward_store::Changed<ApiKey>> {
        self.count();
        self.inner.update_key(id, patch, actor).await
    }
    async fn revoke_key(
        &self,
        id: KeyId,
        reason: &str,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<keyward_store::Changed<ApiKey>> {
        self.count();
        self.inner.revoke_key(id, reason, at, actor).await
    }
    async fn record_key_usage(&self, usage: &[KeyUsage]) -> StoreResult<()> {
        self.count();
        self.inner.record_key_usage(usage).await
    }
    async fn import_keys(
        &self,
        organization_id: OrgId,
        keys: Vec<KeyImport>,
        actor: &Actor,
        dry_run: bool,
    ) -> StoreResult<keyward_store::Changed<Vec<ImportOutcome>>> {
        self.count();
        self.inner.import_keys(organization_id, keys, actor, dry_run).await
    }
    async fn has_legacy_keys(&self) -> StoreResult<bool> {
        self.count();
        self.inner.has_legacy_keys().await
    }
    async fn append_audit(
        &self,
        action: &str,
        organization_id: OrgId,
        details: Value,
        actor: &Actor,
    ) -> StoreResult<AuditEntry> {
        self.count();
        self.inner.append_audit(action, organization_id, details, actor).await
    }
    async fn list_audit(&self, filter: &AuditFilter, page: PageRequest<i64>) -> StoreResult<Page<AuditEntry, i64>> {
        self.count();
        self.inner.list_audit(filter, page).await
    }
}

#[async_trait]
impl keyward_store::LifecycleStore for Counting {
    async fn rotate_key(
        &self,
        old: KeyId,
        new: NewKey,
        revoke_at: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<keyward_store::Changed<keyward_store::Rotation>> {
        self.count();
        self.inner.rotate_key(old, new, revoke_at, actor).await
    }
    async fn list_expiring_keys(
        &self,
        organization_id: Option<OrgId>,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<ApiKey>> {
        self.count();
        self.inner.list_expiring_keys(organization_id, now, until, limit).await
    }
    async fn expire_keys(
        &self,
        organization_id: Option<OrgId>,
        now: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<keyward_store::Changed<Vec<ApiKey>>> {
        self.count();
        self.inner.expire_keys(organization_id, now, actor).await
    }
    async fn record_expiring_events(&self, now: DateTime<Utc>, days: u32) -> StoreResult<Vec<keyward_store::Event>> {
        self.count();
        self.inner.record_expiring_events(now, days).await
    }
    async fn verify_audit_chain(&self) -> StoreResult<keyward_store::AuditChainReport> {
        self.count();
        self.inner.verify_audit_chain().await
    }
    async fn list_events(&self, after: Option<uuid::Uuid>, limit: u32) -> StoreResult<Vec<keyward_store::Event>> {
        self.count();
        self.inner.list_events(after, limit).await
    }
    async fn record_event(&self, event: &keyward_store::Event, dedup_key: Option<&str>) -> StoreResult<bool> {
        self.inner.record_event(event, dedup_key).await
    }
}

#[async_trait]
impl keyward_store::WebhookStore for Counting {
    async fn insert_webhook(
        &self,
        hook: keyward_store::NewWebhook,
        actor: &Actor,
    ) -> StoreResult<keyward_store::Webhook> {
        self.inner.insert_webhook(hook, actor).await
    }
    async fn get_webhook(&self, id: uuid::Uuid) -> StoreResult<keyward_store::Webhook> {
        self.inner.get_webhook(id).await
    }
    async fn list_webhooks(&self, organization_id: Option<OrgId>) -> StoreResult<Vec<keyward_store::Webhook>> {
        self.inner.list_webhooks(organization_id).await
    }
    async fn update_webhook(
        &self,
        id: uuid::Uuid,
        patch: keyward_store::WebhookPatch,
        actor: &Actor,
    ) -> StoreResult<keyward_store::Webhook> {
        self.inner.update_webhook(id, patch, actor).await
    }
    async fn delete_webhook(&self, id: uuid::Uuid, actor: &Actor) -> StoreResult<()> {
        self.inner.delete_webhook(id, actor).await
    }
    async fn dispatch_events(&self, now: DateTime<Utc>, give_up_at: DateTime<Utc>, limit: u32) -> StoreResult<usize> {
        self.inner.dispatch_events(now, give_up_at, limit).await
    }
    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<keyward_store::DeliveryJob>> {
        self.inner.claim_deliveries(now, lease_until, limit).await
    }
    async fn record_attempt(
        &self,
        delivery: uuid::Uuid,
        attempt: &keyward_store::Attempt,
        outcome: keyward_store::AttemptOutcome,
    ) -> StoreResult<()> {
        self.inner.record_attempt(delivery, attempt, outcome).await
    }
    async fn list_deliveries(&self, endpoint: uuid::Uuid, limit: u32) -> StoreResult<Vec<keyward_store::Delivery>> {
        self.inner.list_deliveries(endpoint, limit).await
    }
    async fn list_attempts(&self, delivery: uuid::Uuid) -> StoreResult<Vec<keyward_store::Attempt>> {
        self.inner.list_attempts(delivery).await
    }
    async fn retry_delivery(
        &self,
        endpoint: uuid::Uuid,
        delivery: uuid::Uuid,
        now: DateTime<Utc>,
        give_up_at: DateTime<Utc>,
    ) -> StoreResult<keyward_store::Delivery> {
        self.inner.retry_delivery(endpoint, delivery, now, give_up_at).await
    }
}

fn sha256(s: &str) -> KeyHash {
    KeyHasher::default().hash_str(HashAlgorithm::Sha256, s)
}

const LEGACY: &str = "acme-legacy-key-000111222333";
const GARBAGE: [&str; 5] = [
    "definitely not a key",
    "sk_live_tooshort",
    "Bearer-ish-garbage-0123456789abcdef",
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "x",
];

#[tokio::test]
async fn garbage_costs_no_store_query_until_legacy_keys_exist() {
    let inner = keyward_store::open("sqlite::memory:", true).await.unwrap();
    let store = Arc::new(Counting::new(inner));
    let app = TestApp::with_store(store.clone(), Guard::None).await;
    assert!(!app.state.legacy.enabled(), "a fresh database has no legacy keys");

    // Straight through `lookup`: not one store call.
    for garbage in GARBAGE {
        let before = store.calls();
        assert!(matches!(lookup(&app.state, garbage).await.unwrap(), Lookup::Malformed(_)), "{garbage}");
        assert_eq!(store.calls(), before, "a store query for {garbage:?}");
    }
    // Through the API: at most one store call, the caller's own key (then cached); never the presented
    // string.
    let admin = sha256(&app.admin_key);
    for garbage in GARBAGE {
        let (calls, looked_up) = (store.calls(), store.hashes.lock().unwrap().len());
        assert_eq!(app.verify(garbage, json!({})).await["code"], "MALFORMED");
        assert!(store.calls() - calls <= 1, "{garbage:?}");
        assert!(store.hashes.lock().unwrap()[looked_up..].iter().all(|h| *h == admin), "{garbage:?}");
    }
    // A customer of the old system is refused too, until its key is imported.
    assert_eq!(app.verify(LEGACY, json!({})).await["code"], "MALFORMED");
    assert!(!store.looked_up(&sha256(LEGACY)));

    // The import switches lookups on at once, in this process.
    let body = format!("{}\n", json!({"key_sha256": sha256(LEGACY).to_hex(), "name": "old"}));
    let r = import(&app, "", "application/x-ndjson", &body).await;
    assert_eq!(r.body["imported"], 1, "{}", r.text);
    assert!(app.state.legacy.enabled());
    let v = app.verify(LEGACY, json!({})).await;
    assert_eq!((v["code"].as_str(), v["key_id"].is_string()), (Some("VALID"), true));
    // Garbage is now looked up, and still answers MALFORMED.
    let garbage = GARBAGE[2];
    assert_eq!(app.verify(garbage, json!({})).await["code"], "MALFORMED");
    assert!(store.looked_up(&sha256(garbage)), "with legacy keys, a string of the right shape is looked up");
    // Too short or with a space: never a legacy key, never looked up.
    for never in ["definitely not a key", "x", "short-legacy"] {
        assert_eq!(app.verify(never, json!({})).await["code"], "MALFORMED");
        assert!(!store.looked_up(&sha256(never)), "{never:?}");
    }

    // A legacy key authenticates to the management API like any key (here: with no scopes, /v1/me).
    let me = app.get("/v1/me", LEGACY).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.text);
}

/// A server started after the import (a restart, another node) reads the flag from the store; one
/// running since before notices at its next refresh.
#[tokio::test]
async fn the_flag_is_read_at_start_and_refreshed() {
    let app = TestApp::sqlite().await;
    let running = fresh_state(&app);
    assert!(!running.legacy.refresh(&*running.store).await.unwrap());

    // The import goes straight to the store, as `keyward import` in another process does.
    let file =
        service::import::parse(service::import::ImportFormat::Csv, format!("key,name\n{LEGACY},old\n").as_bytes())
            .unwrap();
    let cli = fresh_state(&app);
    let report =
        service::import::run(&cli, app.default_org.id, file, &Actor::cli(crate::helpers::t0()), false, &mut |_, _| {})
            .await
            .unwrap();
    assert_eq!(report.imported, 1);
    assert!(!app.state.legacy.enabled(), "another process's import is not seen before a refresh");
    assert_eq!(app.verify(LEGACY, json!({})).await["code"], "MALFORMED");

    let restarted = fresh_state(&app);
    assert!(restarted.legacy.refresh(&*restarted.store).await.unwrap(), "read at start");
    assert!(app.state.legacy.refresh(&*app.state.store).await.unwrap(), "noticed by the refresh");
    assert_eq!(app.verify(LEGACY, json!({})).await["code"], "VALID");
}

fn fresh_state(app: &TestApp) -> AppState {
    let (usage, _worker) = UsageRecorder::spawn(app.state.store.clone(), std::time::Duration::from_secs(3600));
    AppState::new(app.state.store.clone(), app.state.clock.clone(), app.state.hasher.clone(), usage)
}

#[async_trait]
impl keyward_store::UsageStore for Counting {
    async fn record_usage_batch(
        &self,
        events: &[keyward_store::usage::UsageEvent],
    ) -> StoreResult<keyward_store::usage::RecordedBatch> {
        self.count();
        self.inner.record_usage_batch(events).await
    }
    async fn key_usage_daily(
        &self,
        key_id: KeyId,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
    ) -> StoreResult<Vec<keyward_store::usage::DailyUsage>> {
        self.count();
        self.inner.key_usage_daily(key_id, from, to).await
    }
    async fn key_usage_endpoints(
        &self,
        key_id: KeyId,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
        limit: u32,
    ) -> StoreResult<Vec<keyward_store::usage::EndpointUsage>> {
        self.count();
        self.inner.key_usage_endpoints(key_id, from, to, limit).await
    }
    async fn org_usage_by_key(
        &self,
        org: OrgId,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
    ) -> StoreResult<Vec<keyward_store::usage::KeyTotals>> {
        self.count();
        self.inner.org_usage_by_key(org, from, to).await
    }
    async fn quota_used(&self, subject: &str, month: &str) -> StoreResult<i64> {
        self.count();
        self.inner.quota_used(subject, month).await
    }
    async fn usage_event_totals(
        &self,
        key_id: KeyId,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<keyward_store::usage::EventTotals> {
        self.count();
        self.inner.usage_event_totals(key_id, from, until).await
    }
    async fn prune_usage_events(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<u64> {
        self.count();
        self.inner.prune_usage_events(before, limit).await
    }
    async fn fold_usage(&self) -> StoreResult<u64> {
        self.count();
        self.inner.fold_usage().await
    }
}
