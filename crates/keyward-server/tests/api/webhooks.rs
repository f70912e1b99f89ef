//! Webhooks end to end with real HTTP receivers on 127.0.0.1: signed deliveries, a receiver that is
//! down and then up, Keyward restarted between attempts, giving up after the retry window, retry on
//! demand; plus the API's bad inputs and tenant isolation. Time moves only by the injected clock; the
//! worker is ticked directly.
//!
//! SSRF by DNS rebinding: a worker with an injected resolver and an injected notion of "internal"
//! (127.0.0.2 counts as public, every other address as internal), so that every connection stays on
//! loopback: nothing here ever sends a packet outside 127.0.0.0/8.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use keyward_server::settings::{Protection, Settings, WebhookSettings};
use keyward_server::webhooks::{Network, Resolve, Worker};
use serde_json::{Value, json};

use crate::helpers::{NowUtc, TestApp, code, on_every_backend, settings};

on_every_backend!(signed_events_arrive_and_verify, receiver_down_then_up_across_a_restart);

/// A webhook receiver that records every request and answers `status`.
#[derive(Clone)]
struct Receiver {
    got: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    fn requests(&self) -> Vec<(HeaderMap, Bytes)> {
        self.got.lock().unwrap().clone()
    }
}

async fn record(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    r.got.lock().unwrap().push((headers, body));
    StatusCode::from_u16(r.status.load(Ordering::SeqCst)).unwrap()
}

async fn receiver_on(listener: tokio::net::TcpListener) -> Receiver {
    let r = Receiver { got: Arc::default(), status: Arc::new(AtomicU16::new(200)) };
    let app = Router::new().route("/hook", post(record)).with_state(r.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    r
}

async fn bind(port: u16) -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap()
}

fn allow_private(mut app: TestApp) -> TestApp {
    let webhooks = WebhookSettings { allow_private_targets: true, ..app.state.webhooks.clone() };
    app.reconfigure(|b| b.webhooks(webhooks));
    app
}

async fn create_hook(app: &TestApp, url: &str, events: Value) -> (String, String) {
    let r = app.post("/v1/webhooks", &app.admin_key, json!({"url": url, "events": events})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");
    (r.body["webhook"]["id"].as_str().unwrap().to_owned(), r.body["secret"].as_str().unwrap().to_owned())
}

async fn signed_events_arrive_and_verify(app: TestApp) {
    let app = allow_private(app);
    let listener = bind(0).await;
    let port = listener.local_addr().unwrap().port();
    let receiver = receiver_on(listener).await;
    let (hook_id, secret) =
        create_hook(&app, &format!("http://127.0.0.1:{port}/hook"), json!(["key.created", "key.rotated"])).await;
    assert!(secret.starts_with("whsec_"));

    let r = app.post("/v1/keys", &app.admin_key, json!({"name": "watched"})).await;
    let plaintext = r.body["key"].as_str().unwrap().to_owned();
    let key_id = r.body["api_key"]["id"].as_str().unwrap().to_owned();
    app.patch(&format!("/v1/keys/{key_id}"), &app.admin_key, json!({"name": "renamed"})).await;
    let worker = Worker::new(app.state.clone());
    let report = worker.tick().await.unwrap();
    assert_eq!((report.dispatched, report.attempted, report.succeeded), (1, 1, 1), "key.updated is not subscribed");

    let got = receiver.requests();
    assert_eq!(got.len(), 1);
    let (headers, body) = &got[0];
    let signature = headers["keyward-signature"].to_str().unwrap();
    let now = app.clock.now_utc().timestamp();
    assert!(signature.starts_with(&format!("t={now},v1=")), "{signature}");
    assert!(keyward_core::webhook::verify(&secret, signature, body, now, 300), "the receiver verifies the signature");
    assert!(!keyward_core::webhook::verify("whsec_wrong", signature, body, now, 300));
    let payload: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(payload["type"], "key.created");
    assert_eq!(payload["id"].as_str(), headers["keyward-event-id"].to_str().ok());
    assert_eq!(payload["data"]["key_id"], key_id.as_str());
    let text = String::from_utf8_lossy(body);
    assert!(!text.contains(&plaintext) && !text.contains("key_hash"), "SECURITY: no key material: {text}");

    // Rotation is delivered too; nothing is delivered twice.
    let r = app.post(&format!("/v1/keys/{key_id}/rotate"), &app.admin_key, json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let report = worker.tick().await.unwrap();
    assert_eq!((report.attempted, report.succeeded), (1, 1), "key.rotated (it names the new key)");
    assert_eq!(worker.tick().await.unwrap().attempted, 0);
    let types: Vec<String> = receiver
        .requests()
        .iter()
        .map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap()["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types.iter().filter(|t| *t == "key.rotated").count(), 1, "{types:?}");

    let r = app.get(&format!("/v1/webhooks/{hook_id}/deliveries"), &app.admin_key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|d| d["status"] == "succeeded" && d["attempt_log"][0]["status_code"] == 200));
    // SECURITY: the secret is shown once, at creation.
    for path in [format!("/v1/webhooks/{hook_id}"), "/v1/webhooks".to_owned()] {
        let r = app.get(&path, &app.admin_key).await;
        assert!(!r.text.contains(&secret), "{path}");
    }
    let r = app.get("/v1/audit-logs?action=webhook_create", &app.admin_key).await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
    assert!(!r.text.contains(&secret));

    // Tenant isolation: another organization neither sees this endpoint nor gets these events.
    let other = app.org("other").await;
    let (outsider, _) = app.key(other.id, &["keyward:keys:write"]).await;
    assert_eq!(app.get(&format!("/v1/webhooks/{hook_id}"), &outsider).await.status, StatusCode::NOT_FOUND);
    assert_eq!(app.get(&format!("/v1/webhooks/{hook_id}/deliveries"), &outsider).await.status, StatusCode::NOT_FOUND);
    let r = app.patch(&format!("/v1/webhooks/{hook_id}"), &outsider, json!({"is_active": false})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(app.delete(&format!("/v1/webhooks/{hook_id}"), &outsider).await.status, StatusCode::NOT_FOUND);
    assert_eq!(app.get("/v1/webhooks", &outsider).await.body["items"], json!([]));
    app.key(other.id, &[]).await;
    assert_eq!(worker.tick().await.unwrap().attempted, 0, "the other organization's key.created goes nowhere");
}

async fn receiver_down_then_up_across_a_restart(app: TestApp) {
    let app = allow_private(app);
    // A port nobody listens on, yet.
    let port = bind(0).await.local_addr().unwrap().port();
    let (hook_id, secret) = create_hook(&app, &format!("http://127.0.0.1:{port}/hook"), json!([])).await;
    app.post("/v1/keys", &app.admin_key, json!({"name": "k"})).await;
    let first = Worker::new(app.state.clone());
    let report = first.tick().await.unwrap();
    assert_eq!((report.attempted, report.succeeded), (1, 0), "the receiver is down");
    let r = app.get(&format!("/v1/webhooks/{hook_id}/deliveries"), &app.admin_key).await;
    let d = &r.body["items"][0];
    assert_eq!((d["status"].as_str(), d["attempts"].as_i64()), (Some("pending"), Some(1)), "{d}");
    assert_eq!(d["attempt_log"][0]["status_code"], Value::Null);
    assert!(d["last_error"].as_str().unwrap().contains("request failed"), "{d}");
    let event_id = d["event_id"].as_str().unwrap().to_owned();

    // Keyward restarts: a new process state over the same database; the first worker is gone.
    drop(first);
    let webhooks = WebhookSettings { allow_private_targets: true, ..Default::default() };
    let restarted = app.another_node(Settings { webhooks, ..settings() }).await.state;
    let worker = Worker::new(restarted.clone());
    assert_eq!(worker.tick().await.unwrap().attempted, 0, "not due yet: the backoff holds across the restart");

    // The receiver comes up; once the backoff has passed the event arrives, once.
    let receiver = receiver_on(bind(port).await).await;
    app.clock.advance(chrono::Duration::minutes(2));
    let report = worker.tick().await.unwrap();
    assert_eq!((report.attempted, report.succeeded), (1, 1));
    assert_eq!(worker.tick().await.unwrap().attempted, 0);
    app.clock.advance(chrono::Duration::hours(2));
    assert_eq!(worker.tick().await.unwrap().attempted, 0, "delivered exactly once");
    let got = receiver.requests();
    assert_eq!(got.len(), 1);
    let (headers, body) = &got[0];
    assert_eq!(headers["keyward-event-id"].to_str().unwrap(), event_id);
    let now = restarted.clock.now().timestamp() - 2 * 3600;
    assert!(keyward_core::webhook::verify(&secret, headers["keyward-signature"].to_str().unwrap(), body, now, 5));
    let r = app.get(&format!("/v1/webhooks/{hook_id}/deliveries"), &app.admin_key).await;
    let d = &r.body["items"][0];
    assert_eq!((d["status"].as_str(), d["attempts"].as_i64()), (Some("succeeded"), Some(2)), "{d}");
    assert_eq!(d["attempt_log"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_given_up_after_a_day_and_retried_on_demand() {
    let app = allow_private(TestApp::sqlite().await);
    let listener = bind(0).await;
    let port = listener.local_addr().unwrap().port();
    let receiver = receiver_on(listener).await;
    receiver.status.store(500, Ordering::SeqCst);
    let (hook_id, _) = create_hook(&app, &format!("http://127.0.0.1:{port}/hook"), json!(["key.created"])).await;
    app.post("/v1/keys", &app.admin_key, json!({"name": "k"})).await;
    let worker = Worker::new(app.state.clone());
    let start = app.clock.now_utc();
    let mut attempts = 0;
    for _ in 0..200 {
        attempts += worker.tick().await.unwrap().attempted;
        app.clock.advance(chrono::Duration::minutes(10));
    }
    let r = app.get(&format!("/v1/webhooks/{hook_id}/deliveries"), &app.admin_key).await;
    let d = &r.body["items"][0];
    assert_eq!(d["status"], "failed", "{d}");
    assert_eq!(d["attempts"].as_u64(), Some(attempts as u64));
    assert!((15..40).contains(&attempts), "backoff spaces about a day of attempts: {attempts}");
    let last =
        chrono::DateTime::parse_from_rfc3339(d["attempt_log"][attempts - 1]["attempted_at"].as_str().unwrap()).unwrap();
    let span = last.with_timezone(&chrono::Utc) - start;
    assert!(span > chrono::Duration::hours(20) && span <= chrono::Duration::hours(25), "{span}");
    assert_eq!(receiver.requests().len(), attempts);

    // Retry on demand: pending again, delivered once the receiver is fixed.
    receiver.status.store(204, Ordering::SeqCst);
    let delivery_id = d["id"].as_str().unwrap();
    let r =
        app.post(&format!("/v1/webhooks/{hook_id}/deliveries/{delivery_id}/retry"), &app.admin_key, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["status"], "pending");
    let report = worker.tick().await.unwrap();
    assert_eq!((report.attempted, report.succeeded), (1, 1));
    let r = app.post(&format!("/v1/webhooks/{hook_id}/deliveries/{hook_id}/retry"), &app.admin_key, json!({})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "an unknown delivery");
}

#[tokio::test]
async fn bad_inputs_are_refused() {
    let app = TestApp::sqlite().await;
    for (body, field) in [
        (json!({"url": "ftp://example.com/x"}), "url"),
        (json!({"url": "not a url"}), "url"),
        (json!({"url": "http://127.0.0.1:9000/hook"}), "url"),
        (json!({"url": "http://169.254.169.254/"}), "url"),
        (json!({"url": "http://localhost./hook"}), "url"),
        (json!({"url": "http://[::ffff:127.0.0.1]:8080/"}), "url"),
        (json!({"url": "http://hooks.example.com/", "events": ["key.created", "nope"]}), "events[1]"),
        (json!({"url": "http://hooks.example.com/", "description": "x".repeat(2001)}), "description"),
        (json!({"url": "http://hooks.example.com/", "organization_id": "nope"}), "organization_id"),
    ] {
        let r = app.post("/v1/webhooks", &app.admin_key, body.clone()).await;
        assert_eq!((r.status, code(&r)), (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"), "{body}: {}", r.text);
        assert_eq!(r.body["error"]["field"], field, "{body}");
    }
    for body in [json!({"url": "http://hooks.example.com/", "secret": "mine"}), json!({"events": []})] {
        let r = app.post("/v1/webhooks", &app.admin_key, body.clone()).await;
        assert_eq!((r.status, code(&r)), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"), "{body}");
    }
    // Another organization's id: admin only.
    let other = app.org("other").await;
    let (writer, _) = app.key(app.default_org.id, &["keyward:keys:write"]).await;
    let r = app
        .post("/v1/webhooks", &writer, json!({"url": "http://hooks.example.com/", "organization_id": other.id}))
        .await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"));
    let r = app.post("/v1/webhooks", &writer, json!({"url": "http://hooks.example.com/"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["webhook"]["id"].as_str().unwrap().to_owned();
    let r = app.patch(&format!("/v1/webhooks/{id}"), &writer, json!({"url": "http://10.0.0.1/"})).await;
    assert_eq!(r.body["error"]["field"], "url");
    let r = app
        .patch(&format!("/v1/webhooks/{id}"), &writer, json!({"events": ["key.expiring"], "description": "d"}))
        .await;
    assert_eq!((r.body["events"].clone(), r.body["description"].clone()), (json!(["key.expiring"]), json!("d")));
    let r = app.get("/v1/webhooks/not-a-uuid", &writer).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.delete(&format!("/v1/webhooks/{id}"), &writer).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(app.get(&format!("/v1/webhooks/{id}"), &writer).await.status, StatusCode::NOT_FOUND);
    // A self-service key manages no webhooks.
    let (me, _) = app.owned_key(app.default_org.id, "u", &["keyward:self"]).await;
    assert_eq!(app.get("/v1/webhooks", &me).await.status, StatusCode::FORBIDDEN);
}

/// Polls until `f` holds, at most about 2 s: the hooks write their events in a task of their own.
async fn eventually<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

async fn events_of(app: &TestApp, event: &str) -> Vec<keyward_store::Event> {
    app.state.store.list_events(None, 10_000).await.unwrap().into_iter().filter(|e| e.event.as_str() == event).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_threshold_fires_at_80_and_100_percent_once_each() {
    let app = TestApp::sqlite().await;
    let (key, rec) = app.key(app.default_org.id, &[]).await;
    let patch = keyward_store::KeyPatch {
        limits: keyward_store::LimitPatch { monthly_request_limit: Some(Some(5)), ..Default::default() },
        ..Default::default()
    };
    app.state
        .store
        .update_key(rec.id, patch, &keyward_store::Actor::cli(app.clock.now_utc()))
        .await
        .unwrap()
        .apply(&app.state.keys);
    for _ in 0..3 {
        assert_eq!(app.verify(&key, json!({})).await["code"], "VALID");
    }
    assert_eq!(app.verify(&key, json!({})).await["code"], "VALID", "4 of 5: 80 %");
    assert!(eventually(|| async { events_of(&app, "quota.threshold").await.len() == 1 }).await);
    assert_eq!(app.verify(&key, json!({})).await["code"], "VALID", "5 of 5: 100 %");
    assert!(eventually(|| async { events_of(&app, "quota.threshold").await.len() == 2 }).await);
    assert_eq!(app.verify(&key, json!({})).await["code"], "QUOTA_EXCEEDED");
    let events = events_of(&app, "quota.threshold").await;
    let percents: Vec<_> = events.iter().map(|e| e.payload["percent"].as_u64()).collect();
    assert_eq!(percents, [Some(80), Some(100)]);
    assert!(events.iter().all(|e| e.key_id == Some(rec.id) && e.payload["quota"] == "key"));
    assert_eq!(events[0].payload["limit"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spike_of_failed_authentications_reaches_admin_endpoints() {
    let mut app = allow_private(TestApp::sqlite().await);
    let protection = Protection { failed_auth_per_minute: 1_000, ..app.state.protection };
    let webhooks = WebhookSettings { failures_spike_per_minute: 3, ..app.state.webhooks.clone() };
    app.reconfigure(|b| b.protection(protection).webhooks(webhooks));
    let listener = bind(0).await;
    let port = listener.local_addr().unwrap().port();
    let receiver = receiver_on(listener).await;
    let url = format!("http://127.0.0.1:{port}/hook");
    // Not the organization's to watch: admin only.
    let (writer, _) = app.key(app.default_org.id, &["keyward:keys:write"]).await;
    let r = app.post("/v1/webhooks", &writer, json!({"url": url, "events": ["auth.failures_spike"]})).await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"));
    let r = app.post("/v1/webhooks", &writer, json!({"url": url})).await;
    assert_eq!(r.status, StatusCode::CREATED, "every event, which leaves out the spike");
    create_hook(&app, &url, json!(["auth.failures_spike"])).await;
    for _ in 0..5 {
        let r = app.get("/v1/me", "sk_live_not_a_real_key").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(events_of(&app, "auth.failures_spike").await.len(), 1, "once per IP and minute");
    let report = Worker::new(app.state.clone()).tick().await.unwrap();
    assert_eq!((report.attempted, report.succeeded), (1, 1));
    let got = receiver.requests();
    let payload: Value = serde_json::from_slice(&got[0].1).unwrap();
    assert_eq!(
        (payload["type"].as_str(), payload["data"]["ip"].as_str()),
        (Some("auth.failures_spike"), Some("203.0.113.7"))
    );

    // Against one key prefix, from many addresses: well-formed keys that do not exist.
    for i in 0..4 {
        let guess = keyward_core::PlainKey::generate(&Default::default(), keyward_core::Environment::Test).unwrap();
        let body = json!({"key": guess.expose_secret(), "ip": format!("198.51.100.{i}")});
        let r = app.post("/v1/verify", &app.admin_key, body).await;
        assert_eq!(r.body["code"], "NOT_FOUND");
    }
    let spikes = events_of(&app, "auth.failures_spike").await;
    assert_eq!(spikes.len(), 2, "{spikes:?}");
    assert_eq!(spikes[1].payload["key_prefix"], "sk_test_");
}

/// An `https://` receiver on `listener` with a certificate for `names` signed by a private CA; the
/// CA's PEM file (in the returned directory), and every TLS server name the receiver was asked for.
async fn tls_receiver(
    listener: tokio::net::TcpListener,
    names: &[&str],
) -> (Receiver, std::path::PathBuf, tempfile::TempDir, Arc<Mutex<Vec<Option<String>>>>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let server_cert = rcgen::CertificateParams::new(names).unwrap().signed_by(&server_key, &issuer).unwrap();
    let dir = tempfile::TempDir::new().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(server_cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let receiver = Receiver { got: Arc::default(), status: Arc::new(AtomicU16::new(200)) };
    let server_names: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let app_router = Router::new().route("/hook", post(record)).with_state(receiver.clone());
    let seen = server_names.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, router, seen) = (acceptor.clone(), app_router.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else { return };
                seen.lock().unwrap().push(stream.get_ref().1.server_name().map(str::to_owned));
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let router = router.clone();
                    async move { tower::ServiceExt::oneshot(router, req.map(axum::body::Body::new)).await }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (receiver, ca_file, dir, server_names)
}

/// An `https://` receiver behind a private CA (`webhooks.ca_file`): delivered over TLS and verified.
#[tokio::test]
async fn https_receivers_behind_a_private_ca() {
    let listener = bind(0).await;
    let port = listener.local_addr().unwrap().port();
    let (receiver, ca_file, _dir, _) = tls_receiver(listener, &["127.0.0.1"]).await;

    let mut app = allow_private(TestApp::sqlite().await);
    let url = format!("https://127.0.0.1:{port}/hook");
    let (_, secret) = create_hook(&app, &url, json!(["key.created"])).await;
    app.post("/v1/keys", &app.admin_key, json!({"name": "over tls"})).await;

    // Without the CA the receiver's certificate is not trusted: the attempt fails and is kept.
    let report = Worker::new(app.state.clone()).tick().await.unwrap();
    assert_eq!((report.attempted, report.succeeded), (1, 0));
    assert!(receiver.requests().is_empty());

    let webhooks = WebhookSettings { ca_file: Some(ca_file), ..app.state.webhooks.clone() };
    app.reconfigure(|b| b.webhooks(webhooks));
    app.clock.advance(chrono::Duration::hours(2));
    let report = Worker::new(app.state.clone()).tick().await.unwrap();
    assert_eq!((report.attempted, report.succeeded), (1, 1), "delivered over TLS");
    let (headers, body) = &receiver.requests()[0];
    let signature = headers["keyward-signature"].to_str().unwrap();
    let now = app.clock.now_utc().timestamp();
    assert!(keyward_core::webhook::verify(&secret, signature, body, now, 300));
}

/// The one address the rebinding tests treat as public.
const PUBLIC: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const INTERNAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const NAME: &str = "hooks.rebind.test";

/// A resolver whose answer changes from call to call (the last one repeats); `None` is a failed
/// lookup. It records every name it was asked.
struct ScriptedResolver {
    answers: Vec<Option<Vec<IpAddr>>>,
    asked: Mutex<Vec<String>>,
}

impl ScriptedResolver {
    fn new(answers: Vec<Option<Vec<IpAddr>>>) -> Arc<Self> {
        Arc::new(Self { answers, asked: Mutex::default() })
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Resolve for ScriptedResolver {
    fn lookup(&self, host: &str) -> futures_util::future::BoxFuture<'static, std::io::Result<Vec<IpAddr>>> {
        let mut asked = self.asked.lock().unwrap();
        let answer = self.answers[asked.len().min(self.answers.len() - 1)].clone();
        asked.push(host.to_owned());
        Box::pin(async move { answer.ok_or_else(|| std::io::Error::other("no such host")) })
    }
}

/// Only [`PUBLIC`] is public.
fn loopback_network(resolver: Arc<ScriptedResolver>) -> Network {
    Network { resolver, is_internal: Arc::new(|ip| ip != PUBLIC) }
}

/// A receiver on [`PUBLIC`] and one on [`INTERNAL`], on the same port (the URL names one port).
async fn public_and_internal_receivers() -> (u16, Receiver, Receiver) {
    for _ in 0..50 {
        let public = tokio::net::TcpListener::bind((PUBLIC, 0)).await.unwrap();
        let port = public.local_addr().unwrap().port();
        if let Ok(internal) = tokio::net::TcpListener::bind((INTERNAL, port)).await {
            return (port, receiver_on(public).await, receiver_on(internal).await);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.1");
}

/// The newest delivery of `hook_id`, as the API shows it.
async fn last_delivery(app: &TestApp, hook_id: &str) -> Value {
    let r = app.get(&format!("/v1/webhooks/{hook_id}/deliveries"), &app.admin_key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["items"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_is_resolved_once_and_every_answer_checked() {
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
    let internal_refused = Some("the target resolves to an internal address");
    for (answer, refused) in [
        (Some(vec![PUBLIC]), None),
        (Some(vec![PUBLIC, INTERNAL]), internal_refused),
        (Some(vec![INTERNAL, PUBLIC]), internal_refused),
        (Some(vec![INTERNAL]), internal_refused),
        (Some(vec![PUBLIC, v6]), internal_refused),
        (Some(vec![mapped]), internal_refused),
        (Some(vec![]), Some("the target's host has no address")),
        (None, Some("resolving the target's host failed")),
    ] {
        let case = format!("{answer:?}");
        let app = TestApp::sqlite().await;
        let (port, public, internal) = public_and_internal_receivers().await;
        let (hook_id, secret) = create_hook(&app, &format!("http://{NAME}:{port}/hook"), json!(["key.created"])).await;
        app.post("/v1/keys", &app.admin_key, json!({"name": "k"})).await;
        let resolver = ScriptedResolver::new(vec![answer]);
        let worker = Worker::with_network(app.state.clone(), loopback_network(resolver.clone()));
        let report = worker.tick().await.unwrap();
        assert_eq!((report.attempted, report.succeeded), (1, usize::from(refused.is_none())), "{case}");
        assert_eq!(resolver.asked(), [NAME], "{case}: resolved once, by name");
        assert!(internal.requests().is_empty(), "{case}: SECURITY: nothing reached the internal address");
        let d = last_delivery(&app, &hook_id).await;
        match refused {
            None => {
                let got = public.requests();
                assert_eq!(got.len(), 1, "{case}");
                assert_eq!(got[0].0["host"], format!("{NAME}:{port}").as_str(), "{case}: the Host stays the name");
                assert_eq!(d["status"], "succeeded", "{case}");
            }
            Some(why) => {
                assert!(public.requests().is_empty(), "{case}: a refused answer is refused whole");
                let error = d["attempt_log"][0]["error"].as_str().unwrap();
                assert!(error.starts_with(why), "{case}: {error}");
                assert!(!error.contains(&secret) && !error.contains("whsec_"), "{case}: {error}");
                assert_eq!(
                    (d["status"].as_str(), d["attempt_log"][0]["status_code"].clone()),
                    (Some("pending"), Value::Null)
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_rebinds_to_an_internal_address_is_never_reached() {
    let app = TestApp::sqlite().await;
    let (port, public, internal) = public_and_internal_receivers().await;
    let (hook_id, _) = create_hook(&app, &format!("http://{NAME}:{port}/hook"), json!(["key.created"])).await;
    // Public at the first lookup, loopback from the second on: the classic rebinding answer.
    let resolver = ScriptedResolver::new(vec![Some(vec![PUBLIC]), Some(vec![INTERNAL])]);
    let worker = Worker::with_network(app.state.clone(), loopback_network(resolver.clone()));

    app.post("/v1/keys", &app.admin_key, json!({"name": "first"})).await;
    let report = worker.tick().await.unwrap();
    assert_eq!((report.attempted, report.succeeded), (1, 1));
    assert_eq!(resolver.asked().len(), 1, "one lookup for one attempt: the connector has no other");
    assert_eq!(public.requests().len(), 1, "delivered to the address that was checked");

    app.post("/v1/keys", &app.admin_key, json!({"name": "second"})).await;
    let report = worker.tick().await.unwrap();
    assert_eq!((report.attempted, report.succeeded), (1, 0), "the name now answers loopback");
    assert_eq!(resolver.asked().len(), 2, "a new attempt looks up again (no pooled connection)");
    let d = last_delivery(&app, &hook_id).await;
    assert!(d["last_error"].as_str().unwrap().contains("internal address"), "{d}");

    // The retry resolves again and is refused again.
    app.clock.advance(chrono::Duration::minutes(2));
    let report = worker.tick().await.unwrap();
    assert_eq!((report.attempted, report.succeeded), (1, 0));
    assert_eq!(resolver.asked().len(), 3);
    assert_eq!(public.requests().len(), 1);
    assert!(internal.requests().is_empty(), "SECURITY: the internal listener saw nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_private_targets_still_connect_to_the_one_lookup() {
    let app = allow_private(TestApp::sqlite().await);
    let (port, public, internal) = public_and_internal_receivers().await;
    create_hook(&app, &format!("http://{NAME}:{port}/hook"), json!(["key.created"])).await;
    app.post("/v1/keys", &app.admin_key, json!({"name": "k"})).await;
    let resolver = ScriptedResolver::new(vec![Some(vec![INTERNAL]), Some(vec![PUBLIC])]);
    let worker = Worker::with_network(app.state.clone(), loopback_network(resolver.clone()));
    let report = worker.tick().await.unwrap();
    assert_eq!((report.attempted, report.succeeded), (1, 1));
    assert_eq!(resolver.asked().len(), 1);
    assert_eq!((internal.requests().len(), public.requests().len()), (1, 0), "the lookup's answer, not another");
}

/// IP literals in the forms `getaddrinfo` reads without asking DNS (decimal, short, hex, octal) are
/// refused when an endpoint is created or its URL changed, whether or not private targets are
/// allowed: 422 on the `url` field, nothing written.
#[tokio::test]
async fn numeric_host_spellings_are_refused_when_given() {
    let app = TestApp::sqlite().await;
    let (hook_id, _) = create_hook(&app, "http://hooks.example.com/k", json!(["key.created"])).await;
    for app in [TestApp::sqlite().await, allow_private(TestApp::sqlite().await)] {
        for host in NUMERIC_LOOPBACK {
            let url = format!("http://{host}:8080/hook");
            let r = app.post("/v1/webhooks", &app.admin_key, json!({"url": url})).await;
            assert_eq!(
                (r.status, code(&r)),
                (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
                "{url}: {}",
                r.text
            );
            assert_eq!(r.body["error"]["field"], "url", "{url}: {}", r.text);
        }
        let listed = app.get("/v1/webhooks", &app.admin_key).await;
        assert_eq!(listed.body["items"].as_array().map(Vec::len), Some(0), "{}", listed.text);
    }
    for host in NUMERIC_LOOPBACK {
        let r = app
            .patch(&format!("/v1/webhooks/{hook_id}"), &app.admin_key, json!({"url": format!("http://{host}/")}))
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{host}: {}", r.text);
    }
    let kept = app.get(&format!("/v1/webhooks/{hook_id}"), &app.admin_key).await;
    assert_eq!(kept.body["url"], "http://hooks.example.com/k", "{}", kept.text);
}

/// 127.0.0.1 as `getaddrinfo` reads it without asking DNS.
const NUMERIC_LOOPBACK: [&str; 4] = ["2130706433", "127.1", "0x7f000001", "0177.0.0.1"];

/// The worker refuses them too, for an endpoint stored before the check at creation existed
/// (written here straight to the store): it checks the URL again before each attempt, and nothing
/// reaches the receiver on 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_host_spellings_of_loopback_are_refused_at_delivery() {
    let listener = bind(0).await;
    let port = listener.local_addr().unwrap().port();
    let receiver = receiver_on(listener).await;
    for host in NUMERIC_LOOPBACK {
        let app = TestApp::sqlite().await;
        let hook = keyward_store::NewWebhook {
            id: uuid::Uuid::now_v7(),
            organization_id: app.default_org.id,
            url: format!("http://{host}:{port}/hook"),
            events: vec![keyward_store::EventKind::KeyCreated],
            is_active: true,
            secret: keyward_store::WebhookSecret("whsec_test".to_owned()),
            description: None,
        };
        let hook_id = hook.id.to_string();
        app.state.store.insert_webhook(hook, &keyward_store::Actor::cli(app.clock.now_utc())).await.unwrap();
        app.post("/v1/keys", &app.admin_key, json!({"name": "k"})).await;
        let report = Worker::new(app.state.clone()).tick().await.unwrap();
        assert_eq!((report.attempted, report.succeeded), (1, 0), "{host}");
        let d = last_delivery(&app, &hook_id).await;
        assert!(d["last_error"].as_str().unwrap().contains("four decimal numbers"), "{host}: {d}");
    }
    assert!(receiver.requests().is_empty());
}

/// Every write on an endpoint needs what creating it needs, with its current
/// events and its new ones. An endpoint subscribed to `auth.failures_spike` is admin-only: a
/// `keyward:keys:write` key of the same organization sees it (GET), and every write answers 403
/// `insufficient_scope` before the body is even read; a key of another organization gets 404.
/// Deliveries are only dispatched here, never sent: the URLs are not resolved.
#[tokio::test]
async fn keys_write_cannot_touch_an_admin_only_endpoint() {
    let app = TestApp::sqlite().await;
    let (writer, _) = app.key(app.default_org.id, &["keyward:keys:write"]).await;
    let (hook_id, secret) =
        create_hook(&app, "http://hooks.example.com/spike", json!(["auth.failures_spike", "key.created"])).await;
    let path = format!("/v1/webhooks/{hook_id}");
    let before = app.get(&path, &app.admin_key).await.body;
    assert_eq!(app.get(&path, &writer).await.body, before, "visible to its organization's keys:write");

    let forbidden = |r: &crate::helpers::Response, case: &str| {
        assert_eq!((r.status, code(r)), (StatusCode::FORBIDDEN, "insufficient_scope"), "{case}: {}", r.text);
        assert!(r.body["error"]["message"].as_str().unwrap().contains("keyward:admin"), "{case}: {}", r.text);
        assert!(!r.text.contains(&secret), "{case}");
    };
    for body in [
        json!({"url": "http://attacker.example.net/collect"}),
        json!({"events": ["key.created"]}),
        json!({"events": []}),
        json!({"is_active": false}),
        json!({"description": "mine now"}),
        json!({"secret": "whsec_chosen_by_me"}),
        json!({"url": "not even a url"}),
        json!({}),
    ] {
        forbidden(&app.patch(&path, &writer, body.clone()).await, &body.to_string());
    }
    forbidden(&app.delete(&path, &writer).await, "delete");
    forbidden(&app.get(&format!("{path}/deliveries"), &writer).await, "deliveries");

    // A delivery to retry (dispatched from a key.created event, not sent).
    app.post("/v1/keys", &app.admin_key, json!({"name": "k"})).await;
    let now = app.clock.now_utc();
    app.state.store.dispatch_events(now, now + chrono::Duration::hours(24), 100).await.unwrap();
    let hook_uuid = hook_id.parse().unwrap();
    let delivery = app
        .state
        .store
        .list_deliveries(hook_uuid, keyward_store::PageRequest { after: None, limit: 10 })
        .await
        .unwrap()
        .items[0]
        .id;
    let retry = format!("{path}/deliveries/{delivery}/retry");
    forbidden(&app.post(&retry, &writer, json!({})).await, "retry");
    assert_eq!(app.get(&path, &app.admin_key).await.body, before, "nothing changed");

    // Another organization's keys:write does not even learn that it exists.
    let other = app.org("other").await;
    let (outsider, _) = app.key(other.id, &["keyward:keys:write"]).await;
    assert_eq!(app.patch(&path, &outsider, json!({"is_active": false})).await.status, StatusCode::NOT_FOUND);
    assert_eq!(app.delete(&path, &outsider).await.status, StatusCode::NOT_FOUND);
    assert_eq!(app.post(&retry, &outsider, json!({})).await.status, StatusCode::NOT_FOUND);

    // The admin can do all of it.
    assert_eq!(app.get(&format!("{path}/deliveries"), &app.admin_key).await.status, StatusCode::OK);
    assert_eq!(app.post(&retry, &app.admin_key, json!({})).await.status, StatusCode::OK);
    let r =
        app.patch(&path, &app.admin_key, json!({"url": "http://hooks.example.com/moved", "is_active": false})).await;
    assert_eq!((r.status, r.body["url"].as_str()), (StatusCode::OK, Some("http://hooks.example.com/moved")));
    let r = app.patch(&path, &app.admin_key, json!({"events": ["key.created"]})).await;
    assert_eq!(r.body["events"], json!(["key.created"]));
    // No longer admin-only: what creating it now needs is keys:write.
    let r = app.patch(&path, &writer, json!({"is_active": true})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    forbidden(&app.patch(&path, &writer, json!({"events": ["auth.failures_spike"]})).await, "re-subscribe");
    let (second, _) = create_hook(&app, "http://hooks.example.com/b", json!(["auth.failures_spike"])).await;
    assert_eq!(app.delete(&format!("/v1/webhooks/{second}"), &app.admin_key).await.status, StatusCode::NO_CONTENT);
}

/// A keys:write key cannot make its own endpoint admin-only by PATCH, in any spelling of the list.
#[tokio::test]
async fn keys_write_cannot_subscribe_its_endpoint_to_admin_events() {
    let app = TestApp::sqlite().await;
    let (writer, _) = app.key(app.default_org.id, &["keyward:keys:write"]).await;
    let r =
        app.post("/v1/webhooks", &writer, json!({"url": "http://hooks.example.com/", "events": ["key.created"]})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let path = format!("/v1/webhooks/{}", r.body["webhook"]["id"].as_str().unwrap());
    for events in [
        json!(["auth.failures_spike"]),
        json!(["key.created", "auth.failures_spike"]),
        json!(["auth.failures_spike", "auth.failures_spike"]),
    ] {
        for body in [json!({"events": events}), json!({"events": events, "url": "http://hooks.example.com/x"})] {
            let r = app.patch(&path, &writer, body.clone()).await;
            assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"), "{body}: {}", r.text);
        }
    }
    let r = app.get(&path, &writer).await;
    assert_eq!(
        (r.body["events"].clone(), r.body["url"].as_str()),
        (json!(["key.created"]), Some("http://hooks.example.com/"))
    );
    // Its own endpoint, every other change: allowed.
    let r = app.patch(&path, &writer, json!({"events": ["key.revoked"], "is_active": false})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // The admin may subscribe it; from then on the writer may not touch it.
    let r = app.patch(&path, &app.admin_key, json!({"events": ["auth.failures_spike"]})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app.patch(&path, &writer, json!({"is_active": true})).await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"));
    let r = app.delete(&path, &writer).await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"));
}

/// Over TLS, the checked address is connected to while the server name (SNI and certificate check)
/// and the `Host` header stay the URL's name; a certificate for another name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_by_name_keeps_the_name_for_tls_and_host() {
    for (cert_names, delivered) in [(vec![NAME], true), (vec!["other.rebind.test", "127.0.0.2"], false)] {
        let listener = tokio::net::TcpListener::bind((PUBLIC, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (receiver, ca_file, _dir, server_names) = tls_receiver(listener, &cert_names).await;
        let mut app = TestApp::sqlite().await;
        let webhooks = WebhookSettings { ca_file: Some(ca_file), ..app.state.webhooks.clone() };
        app.reconfigure(|b| b.webhooks(webhooks));
        create_hook(&app, &format!("https://{NAME}:{port}/hook"), json!(["key.created"])).await;
        app.post("/v1/keys", &app.admin_key, json!({"name": "k"})).await;
        let resolver = ScriptedResolver::new(vec![Some(vec![PUBLIC])]);
        let report = Worker::with_network(app.state.clone(), loopback_network(resolver.clone())).tick().await.unwrap();
        assert_eq!((report.attempted, report.succeeded), (1, usize::from(delivered)), "{cert_names:?}");
        assert_eq!(resolver.asked(), [NAME]);
        assert_eq!(server_names.lock().unwrap().clone(), vec![Some(NAME.to_owned()); usize::from(delivered)]);
        if delivered {
            assert_eq!(receiver.requests()[0].0["host"], format!("{NAME}:{port}").as_str());
        } else {
            assert!(receiver.requests().is_empty());
        }
    }
}
