//! The verify cache: warm verifications touch no store, unknown hashes are remembered briefly, every
//! write that changes what verification answers invalidates at once (on this node directly, on others
//! through Redis), a stale entry is served only while the store is down and only up to the ceiling,
//! and a miss then is a 503.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use keyward_core::{Environment, KeyHasher, KeyPrefix, ManualClock, PlainKey};
use keyward_server::settings::CacheConfig;
use keyward_server::settings::Settings;
use keyward_server::telemetry::Via;
use keyward_server::{App, AppState, service};
use keyward_store::{Actor, NoCache, Store};
use serde_json::json;

use crate::helpers::{OwnRedis, TestApp, on_every_backend, settings, t0};
use crate::legacy::counted;

fn hash(key: &str) -> keyward_core::KeyHash {
    KeyHasher::default().candidates(key).next().unwrap().1
}

on_every_backend!(every_store_write_is_seen_through_the_node_cache, writes_through_the_api_are_seen_at_once);

/// The store's conformance case for the verify cache (one case per kind of write that can change what
/// verification answers), with this server's cache in front of the store.
async fn every_store_write_is_seen_through_the_node_cache(app: TestApp) {
    keyward_store::conformance::invalidation::writes_are_seen_through(&*app.state.store, &app.state.keys).await;
}

/// Every management API write that changes what verification answers, on one node: the very next
/// verification there sees it, with no clock moving (entries would otherwise live for the TTL).
async fn writes_through_the_api_are_seen_at_once(app: TestApp) {
    let admin = app.admin_key.clone();
    let org = app.org("acme").await;
    let key = |expires_at: Option<&str>| {
        let request = service::CreateKeyRequest {
            name: "k".into(),
            expires_at: expires_at.map(str::to_owned),
            ..Default::default()
        };
        app.key_with(org.id, request)
    };
    let code = |key: String| {
        let app = &app;
        async move { app.verify(&key, json!({})).await["code"].as_str().unwrap_or_default().to_owned() }
    };

    // Revoked; deactivated.
    for (method, body, status, want) in [
        (Method::DELETE, None, StatusCode::NO_CONTENT, "REVOKED"),
        (Method::PATCH, Some(json!({"is_active": false})), StatusCode::OK, "DISABLED"),
    ] {
        let (plain, rec) = key(None).await;
        assert_eq!(code(plain.clone()).await, "VALID");
        let r = app.call(method, &format!("/v1/keys/{}", rec.id), Some(&admin), body).await;
        assert_eq!(r.status, status, "{}", r.text);
        assert_eq!(code(plain).await, want);
    }

    // Rotated with no grace period: the old key stops, the new one works.
    let (plain, rec) = key(None).await;
    assert_eq!(code(plain.clone()).await, "VALID");
    let r = app.post(&format!("/v1/keys/{}/rotate", rec.id), &admin, json!({"grace_period_seconds": 0})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(code(plain).await, "REVOKED");
    assert_eq!(code(r.body["key"].as_str().unwrap().to_owned()).await, "VALID");

    // Expired, then deactivated by the cleanup.
    let expiry = (t0() + chrono::Duration::seconds(10)).to_rfc3339();
    let (plain, _) = key(Some(&expiry)).await;
    assert_eq!(code(plain.clone()).await, "VALID");
    app.clock.advance(chrono::Duration::seconds(11));
    assert_eq!(code(plain.clone()).await, "EXPIRED");
    let r = app.post("/v1/keys/cleanup-expired", &admin, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(code(plain).await, "DISABLED");

    // Unknown (and remembered as such), then imported.
    let unknown = PlainKey::generate(&KeyPrefix::default(), Environment::Live).unwrap();
    let unknown = unknown.expose_secret().to_owned();
    assert_eq!(code(unknown.clone()).await, "NOT_FOUND");
    let body = format!("{}\n", json!({"key": unknown, "name": "imported"}));
    let r = crate::import::import(&app, &format!("?organization_id={}", org.id), "application/x-ndjson", &body).await;
    assert_eq!(r.body["imported"], 1, "{}", r.text);
    assert_eq!(code(unknown).await, "VALID");

    // Its organization disabled: every key of it.
    let (plain, _) = key(None).await;
    assert_eq!(code(plain.clone()).await, "VALID");
    let r = app.patch(&format!("/v1/organizations/{}", org.id), &admin, json!({"is_active": false})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(code(plain).await, "ORG_DISABLED");
}

#[tokio::test]
async fn a_warm_verification_touches_no_store() {
    let (app, store) = counted().await;
    let (key, _) = app.key(app.default_org.id, &[]).await;
    for _ in 0..5 {
        assert_eq!(app.verify(&key, json!({})).await["code"], "VALID");
    }
    assert_eq!(store.lookups_of(&hash(&key)), 1, "one lookup, then the cache");
}

#[tokio::test]
async fn unknown_hashes_are_remembered_briefly() {
    let (app, store) = counted().await;
    let unknown = PlainKey::generate(&KeyPrefix::default(), Environment::Live).unwrap();
    for _ in 0..3 {
        assert_eq!(app.verify(unknown.expose_secret(), json!({})).await["code"], "NOT_FOUND");
    }
    assert_eq!(store.lookups_of(&hash(unknown.expose_secret())), 1);
    app.clock.advance(chrono::Duration::milliseconds(CacheConfig::default().negative_ttl_ms as i64));
    app.verify(unknown.expose_secret(), json!({})).await;
    assert_eq!(store.lookups_of(&hash(unknown.expose_secret())), 2);
}

#[tokio::test]
async fn a_lookup_that_raced_a_revocation_does_not_keep_what_it_read() {
    let (app, store) = counted().await;
    let (key, rec) = app.key(app.default_org.id, &[]).await;
    // The lookup reads the key while it is valid, and is slow to come back...
    let gate = store.gate.write().await;
    let state = app.state.clone();
    let presented = key.clone();
    let racing = tokio::spawn(async move { check(&state, &presented).await });
    tokio::time::timeout(Duration::from_secs(5), store.read.notified()).await.expect("the lookup read the store");
    // ...while the key is revoked through this node (the cache is invalidated).
    let now = keyward_core::Clock::now(&app.clock);
    app.state.store.revoke_key(rec.id, "raced", now, &Actor::cli(now)).await.unwrap().apply(&app.state.keys);
    drop(gate);
    let raced = tokio::time::timeout(Duration::from_secs(5), racing).await.unwrap().unwrap();
    assert_eq!(raced, "VALID", "the racing request answers from what it read");
    // What it read is not kept: the next verification sees the revocation.
    assert_eq!(app.verify(&key, json!({})).await["code"], "REVOKED");
}

#[tokio::test]
async fn a_change_made_around_keyward_shows_after_the_ttl() {
    let (app, _) = counted().await;
    let (key, rec) = app.key(app.default_org.id, &[]).await;
    assert_eq!(app.verify(&key, json!({})).await["code"], "VALID");
    // A change no cache hears of, as an operator editing the database makes.
    let now = keyward_core::Clock::now(&app.clock);
    app.state.store.revoke_key(rec.id, "by hand", now, &Actor::cli(now)).await.unwrap().apply(&NoCache);
    assert_eq!(app.verify(&key, json!({})).await["code"], "VALID", "cached until the TTL");
    app.clock.advance(chrono::Duration::milliseconds(CacheConfig::default().ttl_ms as i64));
    assert_eq!(app.verify(&key, json!({})).await["code"], "REVOKED");
}

/// The caller's own key (remembered by the worker thread that authenticated it) is refused exactly
/// when the verify cache would refuse it: at once after a revocation through Keyward, after the TTL for
/// a change made around it.
#[tokio::test]
async fn a_caller_key_is_refused_as_soon_as_the_cache_would_refuse_it() {
    let (app, _) = counted().await;
    let (key, _) = app.key(app.default_org.id, &[]).await;
    let answer = |caller: String| {
        let (app, key) = (&app, key.clone());
        async move {
            let r = app.post("/v1/verify", &caller, json!({"key": key})).await;
            (r.status, r.body["error"]["code"].as_str().unwrap_or_default().to_owned())
        }
    };
    let (by_api, by_api_rec) = app.key(app.default_org.id, &["keyward:verify"]).await;
    let (by_hand, by_hand_rec) = app.key(app.default_org.id, &["keyward:verify"]).await;
    for caller in [&by_api, &by_hand, &by_api] {
        assert_eq!(answer(caller.clone()).await.0, StatusCode::OK);
    }
    let r = app.delete(&format!("/v1/keys/{}", by_api_rec.id), &app.admin_key).await;
    assert!(r.status.is_success(), "{}", r.text);
    assert_eq!(answer(by_api.clone()).await, (StatusCode::UNAUTHORIZED, "key_revoked".to_owned()));

    assert_eq!(answer(by_hand.clone()).await.0, StatusCode::OK);
    let now = keyward_core::Clock::now(&app.clock);
    app.state.store.revoke_key(by_hand_rec.id, "by hand", now, &Actor::cli(now)).await.unwrap().apply(&NoCache);
    assert_eq!(answer(by_hand.clone()).await.0, StatusCode::OK, "cached until the TTL");
    app.clock.advance(chrono::Duration::milliseconds(CacheConfig::default().ttl_ms as i64));
    assert_eq!(answer(by_hand.clone()).await, (StatusCode::UNAUTHORIZED, "key_revoked".to_owned()));
}

#[tokio::test]
async fn while_the_store_is_down_cached_keys_answer_and_misses_are_503() {
    let (app, store) = counted().await;
    let (key, _) = app.key(app.default_org.id, &[]).await;
    let (cold, _) = app.key(app.default_org.id, &[]).await;
    assert_eq!(app.verify(&key, json!({})).await["code"], "VALID");
    store.down.store(true, Ordering::SeqCst);
    app.clock.advance(chrono::Duration::milliseconds(CacheConfig::default().ttl_ms as i64 + 1));
    assert_eq!(app.verify(&key, json!({})).await["code"], "VALID", "stale, within the ceiling");
    let r = app.post("/v1/verify", &app.admin_key, json!({"key": cold})).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "store_unavailable");
    app.clock.advance(chrono::Duration::milliseconds(CacheConfig::default().stale_ceiling_ms as i64));
    let r = app.post("/v1/verify", &app.admin_key, json!({"key": key})).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "past the ceiling: {}", r.text);
    store.down.store(false, Ordering::SeqCst);
    answers_again(&app, &key).await;
}

/// Once the store is back, the breaker's probe notices within a few probe intervals.
async fn answers_again(app: &TestApp, key: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = app.post("/v1/verify", &app.admin_key, json!({"key": key})).await;
        if r.status == StatusCode::OK && r.body["code"] == "VALID" {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "still failing after the store came back: {}", r.text);
        tokio::time::sleep(keyward_server::cache::PROBE_EVERY).await;
    }
}

/// Once cached entries' TTL has passed during an outage, no verification waits the pool timeout (for
/// the calling key or for the verified key) before answering from the cache: the outage is noticed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_noticed_once_and_cached_keys_answer_at_cache_speed() {
    let (app, store) = counted().await;
    let mut keys = Vec::new();
    for _ in 0..5 {
        keys.push(app.key(app.default_org.id, &[]).await.0);
    }
    let (cold, _) = app.key(app.default_org.id, &[]).await;
    for key in &keys {
        assert_eq!(app.verify(key, json!({})).await["code"], "VALID");
    }
    // The store goes away; a lookup now takes 300 ms to fail, as a pool waiting for a connection does.
    store.fails_after_ms.store(300, Ordering::SeqCst);
    store.down.store(true, Ordering::SeqCst);
    app.clock.advance(chrono::Duration::milliseconds(CacheConfig::default().ttl_ms as i64 + 1));
    let started = std::time::Instant::now();
    let lookups_before = store.calls();
    let mut latencies = Vec::new();
    for round in 0..40 {
        for key in &keys {
            let at = std::time::Instant::now();
            let r = app.post("/v1/verify", &app.admin_key, json!({"key": key})).await;
            latencies.push(at.elapsed());
            assert_eq!((r.status, r.body["code"].as_str()), (StatusCode::OK, Some("VALID")), "round {round}");
        }
        // Uncached: 503 at once, not after a pool timeout.
        let at = std::time::Instant::now();
        let r = app.post("/v1/verify", &app.admin_key, json!({"key": cold})).await;
        latencies.push(at.elapsed());
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
        assert_eq!(r.body["error"]["code"], "store_unavailable");
    }
    // The first request noticed the outage (one failed lookup); none after it waited on the store, which
    // takes 300 ms to fail. (The p99 target is measured end to end by crates/keyward/tests/faults.rs.)
    let slowest = latencies[1..].iter().max().copied().unwrap_or_default();
    assert!(slowest < Duration::from_millis(150), "a request waited on the store: {slowest:?}");
    // One lookup noticed the outage (plus the probe's pings), not one per request.
    let store_calls = store.calls() - lookups_before;
    let probes = started.elapsed().as_millis() / keyward_server::cache::PROBE_EVERY.as_millis() + 2;
    assert!(store_calls as u128 <= 2 + probes, "{store_calls} store calls during the outage");
    // /readyz says what is degraded, without waiting on the store.
    let r = app.call(axum::http::Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert_eq!((r.body["status"].as_str(), r.body["store"].as_str()), (Some("degraded"), Some("unreachable")));
    assert!(r.body["store_down_for_s"].is_u64(), "{}", r.text);
    store.down.store(false, Ordering::SeqCst);
    answers_again(&app, &cold).await;
    let r = app.call(axum::http::Method::GET, "/readyz", None, None).await;
    assert_eq!((r.status, r.body["store"].as_str()), (StatusCode::OK, Some("ok")), "{}", r.text);
}

fn redis_url() -> Option<String> {
    if std::env::var("KEYWARD_TEST_SKIP_REDIS").is_ok_and(|v| v == "1") {
        eprintln!("!!!!! SKIPPED: Redis is not reachable (KEYWARD_TEST_SKIP_REDIS=1) !!!!!");
        return None;
    }
    Some(std::env::var("KEYWARD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()))
}

/// A second node: its own cache over the same database, subscribed to the same channel.
async fn node(store: Arc<dyn Store>, url: &str, channel: &str, clock: &ManualClock) -> AppState {
    let settings = Settings { redis_url: Some(url.into()), redis_channel: channel.to_owned(), ..settings() };
    let app = App::builder(settings).store(store).clock(Arc::new(clock.clone())).without_jobs().build().await;
    // The node's tasks (its bus subscription) run on after `Tasks` is dropped.
    app.expect("a node on the test's Redis").state
}

#[tokio::test]
async fn a_revocation_on_one_node_reaches_the_other_within_a_second() {
    let Some(url) = redis_url() else { return };
    let dir = tempfile::TempDir::new().unwrap();
    let db = keyward_store::open(&format!("sqlite://{}", dir.path().join("k.db").display()), true).await.unwrap();
    let channel = format!("keyward:test:{}", uuid::Uuid::new_v4());
    let clock = ManualClock::new(t0());
    let a = node(db.clone(), &url, &channel, &clock).await;
    let b = node(db, &url, &channel, &clock).await;
    // Let both subscriptions settle (each drops its cache once when it subscribes).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seeded = service::seed(&a, &Actor::cli(t0())).await.unwrap().unwrap();
    let key = seeded.key.expose_secret().to_owned();
    assert_eq!(check(&b, &key).await, "VALID", "node B has the key cached now");
    a.store.revoke_key(seeded.record.id, "test", t0(), &Actor::cli(t0())).await.unwrap().apply(&a.keys);
    revoked_within_a_second(&b, &key).await;
}

/// What this node's verification answers for `key`, by its code.
async fn check(state: &AppState, key: &str) -> &'static str {
    let check = keyward_server::verifier::Check {
        presented: key,
        client_ip: None,
        required_scopes: &[],
        organization: None,
        user_agent: "",
        via: Via::Verify,
        cost: 1,
        failures: keyward_server::limits::FailureScope::Edge,
    };
    keyward_server::verifier::verify(state, check).await.unwrap().outcome.code()
}

async fn revoked_within_a_second(node: &AppState, key: &str) {
    let started = std::time::Instant::now();
    loop {
        if check(node, key).await == "REVOKED" {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(1), "the other node still answers VALID after 1 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// After Redis restarts, node A's first publish meets a broken connection: it must be retried, not
/// dropped, or node B answers VALID for a revoked key until its cache entry expires (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_revocation_after_a_redis_restart_still_reaches_every_node() {
    if redis_url().is_none() {
        return;
    }
    let mut redis = OwnRedis::start();
    let dir = tempfile::TempDir::new().unwrap();
    let db = keyward_store::open(&format!("sqlite://{}", dir.path().join("k.db").display()), true).await.unwrap();
    let channel = "keyward:invalidate";
    let clock = ManualClock::new(t0());
    let a = node(db.clone(), &redis.url(), channel, &clock).await;
    let b = node(db, &redis.url(), channel, &clock).await;
    redis.subscribed(channel, 2).await;
    let org = service::seed(&a, &Actor::cli(t0())).await.unwrap().unwrap().organization.id;
    let mut keys = Vec::new();
    for _ in 0..3 {
        let v = service::Validator { plans: &a.plans, now: t0() };
        let draft = service::CreateKeyRequest { name: "k".into(), ..Default::default() }.validate(&v, org).unwrap();
        let (plain, record) = service::create_key(&a, draft, &Actor::cli(t0())).await.unwrap();
        keys.push((plain.expose_secret().to_owned(), record));
    }
    for (key, _) in &keys {
        assert_eq!(check(&b, key).await, "VALID");
    }
    // Load on both nodes throughout: verifications of a key nobody revokes.
    let v = service::Validator { plans: &a.plans, now: t0() };
    let draft = service::CreateKeyRequest { name: "busy".into(), ..Default::default() }.validate(&v, org).unwrap();
    let busy = service::create_key(&a, draft, &Actor::cli(t0())).await.unwrap().0.expose_secret().to_owned();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|node| {
            let (busy, stop) = (busy.clone(), stop.clone());
            tokio::spawn(async move {
                let mut answered = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    // The manual clock never moves: past the free plan's minute, RATE_LIMITED.
                    let code = check(&node, &busy).await;
                    assert!(code == "VALID" || code == "RATE_LIMITED", "{code}");
                    answered += 1;
                    tokio::task::yield_now().await;
                }
                answered
            })
        })
        .collect();
    // Redis goes away and comes back on the same port; both nodes subscribe again (dropping their
    // caches), and node B caches the keys again.
    redis.restart();
    redis.subscribed(channel, 2).await;
    for (key, _) in &keys {
        assert_eq!(check(&b, key).await, "VALID");
    }
    // The first revocation through node A after the restart, then two more.
    for (key, record) in &keys {
        a.store.revoke_key(record.id, "test", t0(), &Actor::cli(t0())).await.unwrap().apply(&a.keys);
        revoked_within_a_second(&b, key).await;
    }
    stop.store(true, Ordering::SeqCst);
    for node in load {
        assert!(node.await.unwrap() > 0, "the load ran");
    }
}

/// `keyward keys revoke` and `keyward keys update` are a process that builds a node, writes, shuts its
/// tasks down and exits. Its revocation must reach Redis before it exits, even when its first publish
/// meets a connection Redis closed (a Redis restart since the CLI connected): else every running node
/// answers VALID for the revoked key until its cache entry expires (30 s). The CLI runs on a runtime
/// of its own, dropped when its command is done, as a process's is at exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_by_the_cli_reaches_running_nodes_before_the_cli_exits() {
    if redis_url().is_none() {
        return;
    }
    for variant in ["revoke", "deactivate"] {
        let mut redis = OwnRedis::start();
        let channel = keyward_server::cache::DEFAULT_CHANNEL;
        let dir = tempfile::TempDir::new().unwrap();
        let database_url = format!("sqlite://{}", dir.path().join("k.db").display());
        let db = keyward_store::open(&database_url, true).await.unwrap();
        let clock = ManualClock::new(t0());
        let server = node(db, &redis.url(), channel, &clock).await;
        redis.subscribed(channel, 1).await;
        let seeded = service::seed(&server, &Actor::cli(t0())).await.unwrap().unwrap();
        let key = seeded.key.expose_secret().to_owned();
        let settings = keyward_server::settings::Settings {
            database_url,
            redis_url: Some(redis.url().into()),
            ..crate::helpers::settings()
        };
        let (ready_tx, ready) = tokio::sync::oneshot::channel::<()>();
        let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (id, cli_clock) = (seeded.record.id, Arc::new(clock.clone()));
        let cli = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let keyward_server::App { state, tasks } =
                    keyward_server::App::builder(settings).clock(cli_clock).without_jobs().build().await.unwrap();
                ready_tx.send(()).unwrap();
                go_rx.await.unwrap();
                let now = state.clock.now();
                let actor = Actor::cli(now);
                if variant == "revoke" {
                    state.store.revoke_key(id, "cli", now, &actor).await.unwrap().apply(&state.keys);
                } else {
                    let patch = keyward_store::KeyPatch { is_active: Some(false), ..Default::default() };
                    state.store.update_key(id, patch, &actor).await.unwrap().apply(&state.keys);
                }
                tasks.shutdown().await;
            });
        });
        ready.await.unwrap();
        redis.subscribed(channel, 2).await;
        // Redis restarts: both subscribe again (dropping their caches); the CLI's publishing connection
        // is broken until its next command fails.
        redis.restart();
        redis.subscribed(channel, 2).await;
        assert_eq!(check(&server, &key).await, "VALID", "{variant}: the running node has the key cached");
        go.send(()).unwrap();
        tokio::task::spawn_blocking(move || cli.join().unwrap()).await.unwrap();
        let want = if variant == "revoke" { "REVOKED" } else { "DISABLED" };
        let started = std::time::Instant::now();
        loop {
            let code = check(&server, &key).await;
            if code == want {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{variant}: the running node still answers {code} 2 s after the CLI exited"
            );
            // Slowly: the free plan's minute runs out on a clock that does not move.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
