//! Legacy keys (imported, not in Keyward's format): looked up only once some organization has them, so
//! that until then a string that is not a Keyward key answers `MALFORMED` without any store query. The
//! proof counts every key lookup the verify path makes, through a counting [`KeyLookup`] under the
//! cache (the cache tests use it too).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::http::StatusCode;
use keyward_core::{HashAlgorithm, KeyHash, KeyHasher};
use keyward_server::auth::{Lookup, lookup};
use keyward_server::{AppState, service};
use keyward_store::{Actor, KeyLookup, KeyRecord, StoreResult};
use serde_json::json;

use crate::helpers::{Guard, TestApp, settings};
use crate::import::import;

/// A [`KeyLookup`] that counts every call (lookups and pings: all the verify path asks of storage), and
/// remembers every hash looked up; with `down` set, it fails as a store outage would.
#[derive(Debug)]
pub(crate) struct Counting {
    pub inner: Arc<dyn KeyLookup>,
    pub calls: AtomicUsize,
    pub hashes: Mutex<Vec<KeyHash>>,
    pub down: std::sync::atomic::AtomicBool,
    /// While `down`: how long a lookup takes to fail (a pool waiting for a connection), in ms.
    pub fails_after_ms: std::sync::atomic::AtomicU64,
    /// Held for writing by a test: a lookup reads the store, says so on `read`, then waits for it (a
    /// lookup slower than a concurrent change).
    pub gate: tokio::sync::RwLock<()>,
    pub read: tokio::sync::Notify,
}

impl Counting {
    pub fn new(inner: Arc<dyn KeyLookup>) -> Self {
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

    fn down(&self) -> StoreResult<()> {
        match self.down.load(Ordering::SeqCst) {
            true => Err(keyward_store::StoreError::Unavailable("the test took the store down".into())),
            false => Ok(()),
        }
    }
}

#[async_trait]
impl KeyLookup for Counting {
    async fn find_key_record(&self, hash: &KeyHash) -> StoreResult<Option<Arc<KeyRecord>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.hashes.lock().unwrap().push(*hash);
        if self.down.load(Ordering::SeqCst) {
            let wait = self.fails_after_ms.load(Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            self.down()?;
        }
        let found = self.inner.find_key_record(hash).await;
        self.read.notify_one();
        let _gate = self.gate.read().await;
        found
    }

    async fn ping(&self) -> StoreResult<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.down()?;
        self.inner.ping().await
    }
}

/// A fresh in-memory store, served through a counting lookup.
pub(crate) async fn counted() -> (TestApp, Arc<Counting>) {
    let store = keyward_store::open("sqlite::memory:", true).await.unwrap();
    let lookup = Arc::new(Counting::new(store.clone()));
    (TestApp::with_lookup(store, lookup.clone(), Guard::None).await, lookup)
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
    let (app, store) = counted().await;
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
    let running = fresh_state(&app).await;
    assert!(!running.legacy.refresh(&*running.store).await.unwrap());

    // The import goes straight to the store, as `keyward import` in another process does.
    let file =
        service::import::parse(service::import::ImportFormat::Csv, format!("key,name\n{LEGACY},old\n").as_bytes())
            .unwrap();
    let cli = fresh_state(&app).await;
    let report =
        service::import::run(&cli, app.default_org.id, file, &Actor::cli(crate::helpers::t0()), false, &mut |_, _| {})
            .await
            .unwrap();
    assert_eq!(report.imported, 1);
    assert!(!app.state.legacy.enabled(), "another process's import is not seen before a refresh");
    assert_eq!(app.verify(LEGACY, json!({})).await["code"], "MALFORMED");

    let restarted = fresh_state(&app).await;
    assert!(restarted.legacy.refresh(&*restarted.store).await.unwrap(), "read at start");
    assert!(app.state.legacy.refresh(&*app.state.store).await.unwrap(), "noticed by the refresh");
    assert_eq!(app.verify(LEGACY, json!({})).await["code"], "VALID");
}

/// Another process on the same database.
async fn fresh_state(app: &TestApp) -> AppState {
    app.another_node(settings()).await.state
}
