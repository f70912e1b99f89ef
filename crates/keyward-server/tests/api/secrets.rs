//! The full key never appears in a log line, an error body, an audit row or `/openapi.json`.

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::http::Method;
use keyward_server::settings::WebhookSettings;
use serde_json::json;

use crate::helpers::TestApp;

/// Log lines of every test in this binary. One global subscriber: a per-test (scoped) subscriber
/// misses events when tests on other threads cached a callsite's interest first.
#[derive(Clone, Default)]
pub(crate) struct Capture(pub(crate) Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub(crate) fn capture_logs() -> Capture {
    static CAPTURE: std::sync::OnceLock<Capture> = std::sync::OnceLock::new();
    let capture = CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,keyward_server=trace,keyward_store=trace"))
            .with_writer(move || writer.clone())
            .json()
            .with_current_span(true)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        capture
    });
    capture.clone()
}

#[tokio::test]
async fn the_plaintext_key_leaks_nowhere() {
    let capture = capture_logs();

    let app = TestApp::sqlite().await;
    let created = app
        .post("/v1/keys", &app.admin_key, json!({"name": "leaky", "scopes": ["read:x"], "allowed_ips": ["10.0.0.0/8"]}))
        .await;
    let key = created.body["key"].as_str().unwrap().to_owned();
    let id = created.body["api_key"]["id"].as_str().unwrap().to_owned();
    let secret_part = &key[8..40];

    let mut bodies = Vec::new();
    // Successful and refused uses, errors that echo input, and every read of the key.
    bodies.push(app.post("/v1/verify", &app.admin_key, json!({"key": key, "ip": "10.0.0.1"})).await.text);
    bodies.push(app.post("/v1/verify", &app.admin_key, json!({"key": key, "ip": "11.0.0.1"})).await.text);
    bodies.push(app.post("/v1/verify", &app.admin_key, json!({"key": key, "required_scopes": [key]})).await.text);
    bodies.push(app.post("/v1/verify", &app.admin_key, json!({"key": key, "ip": key})).await.text);
    bodies.push(app.post("/v1/verify", &app.admin_key, json!({"key": key, "required_scopes": key})).await.text);
    bodies.push(app.post("/v1/verify", &app.admin_key, json!({"key": [key]})).await.text);
    bodies.push(app.get("/v1/me", &key).await.text);
    let mut truncated = key.clone();
    truncated.pop();
    bodies.push(app.get("/v1/me", &truncated).await.text);
    bodies.push(
        app.post(
            "/v1/keys",
            &app.admin_key,
            json!({"name": key, "scopes": [key], "allowed_ips": [key], "prefix": key}),
        )
        .await
        .text,
    );
    let mut keyed_field = serde_json::Map::new();
    keyed_field.insert(key.clone(), json!(1));
    bodies.push(app.post("/v1/keys", &app.admin_key, serde_json::Value::Object(keyed_field)).await.text);
    bodies.push(app.get(&format!("/v1/keys/{id}"), &app.admin_key).await.text);
    bodies.push(app.patch(&format!("/v1/keys/{id}"), &app.admin_key, json!({"name": "renamed"})).await.text);
    bodies.push(app.delete(&format!("/v1/keys/{id}"), &app.admin_key).await.text);
    bodies.push(app.get("/v1/me", &key).await.text);
    bodies.push(app.get("/v1/keys?include_inactive=true", &app.admin_key).await.text);
    bodies.push(app.get("/v1/audit-logs?limit=100", &app.admin_key).await.text);
    bodies.push(app.call(Method::GET, "/openapi.json", None, None).await.text);
    bodies.push(app.call(Method::GET, "/metrics", None, None).await.text);
    app.state.usage.flush().await;

    for (i, body) in bodies.iter().enumerate() {
        assert!(!body.contains(secret_part), "response {i} contains the key: {body}");
    }
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("authentication failed"), "the capture works: {logs}");
    assert!(!logs.contains(secret_part), "logs contain the key");
    assert!(!app.admin_key.is_empty() && !logs.contains(&app.admin_key[8..40]), "logs contain the admin key");
    // Audit rows hold neither the key nor its hash.
    let audit = app
        .state
        .store
        .list_audit(&Default::default(), keyward_store::PageRequest { after: None, limit: 100 })
        .await
        .unwrap();
    let hash_hex = app.state.hasher.candidates(&key).next().unwrap().1.to_hex();
    for row in audit.items {
        let details = row.details.to_string();
        assert!(!details.contains(secret_part) && !details.contains(&hash_hex), "audit row {} leaks", row.id);
    }
}

/// The captured `authentication failed` line of key `key_id`.
fn failed_auth_line(capture: &Capture, key_id: &str) -> serde_json::Value {
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    logs.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "authentication failed" && l["fields"]["key_id"] == key_id)
        .expect("a failed-auth line")
}

#[tokio::test]
async fn a_failed_authentication_is_one_structured_line_with_context() {
    let capture = capture_logs();
    let app = TestApp::sqlite().await;
    let (key, rec) = app.revoked_key(app.default_org.id).await;
    let mut req = crate::helpers::request(Method::GET, "/v1/me", Some(&key), None);
    req.headers_mut().insert("user-agent", "curl/8.0".parse().unwrap());
    let request_id = format!("req-{}", rec.id);
    req.headers_mut().insert("x-request-id", request_id.parse().unwrap());
    assert_eq!(app.send(req).await.status, axum::http::StatusCode::UNAUTHORIZED);

    let line = failed_auth_line(&capture, &rec.id.to_string());
    let f = &line["fields"];
    assert_eq!(f["reason"], "REVOKED");
    assert_eq!(f["via"], "management");
    assert_eq!(f["key"], format!("sk_live_…{}", &key[key.len() - 4..]));
    assert_eq!(f["key_id"], rec.id.to_string());
    assert_eq!(f["client_ip"], "203.0.113.7");
    assert_eq!(f["user_agent"], "curl/8.0");
    assert_eq!(line["span"]["path"], "/v1/me", "{line}");
    assert_eq!(line["span"]["request_id"], request_id);

    let metrics = app.call(Method::GET, "/metrics", None, None).await.text;
    assert!(metrics.contains("keyward_auth_failures_total{reason=\"REVOKED\",via=\"management\"}"), "{metrics}");
}

/// The request span carries the verification's outcome: a refused key's log line says what was asked.
#[tokio::test]
async fn a_refused_verification_logs_its_outcome_in_the_request_span() {
    let capture = capture_logs();
    let app = TestApp::sqlite().await;
    let (key, rec) = app.revoked_key(app.default_org.id).await;
    assert_eq!(app.verify(&key, json!({})).await["code"], "REVOKED");

    let line = failed_auth_line(&capture, &rec.id.to_string());
    assert_eq!(line["fields"]["via"], "verify");
    let spans = line["spans"].as_array().expect("the line's spans");
    let request = spans.iter().find(|s| s["name"] == "request").expect("the request span");
    assert_eq!((&request["method"], &request["path"]), (&json!("POST"), &json!("/v1/verify")), "{line}");
    assert!(request["request_id"].as_str().is_some_and(|id| id.parse::<uuid::Uuid>().is_ok()), "{line}");
    // Into the innermost span that declares it: the request span at the default `info` level, the
    // verification's own (a `debug` span, enabled here) when it exists.
    assert!(spans.iter().any(|s| s["outcome"] == "REVOKED"), "{line}");
}

#[tokio::test]
async fn metrics_count_verifications_by_outcome() {
    let app = TestApp::sqlite().await;
    let (key, _) = app.key(app.default_org.id, &[]).await;
    // The recorder is the process's: other tests count too, so counts are compared, never equal.
    const VERIFY_OK: &str = "keyward_http_requests_total{method=\"POST\",route=\"/v1/verify\",status=\"2xx\"}";
    let count = |text: &str, name: &str| -> u64 {
        text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0)
    };
    let before = count(&app.call(Method::GET, "/metrics", None, None).await.text, VERIFY_OK);
    app.verify(&key, serde_json::json!({})).await;
    app.verify("garbage", serde_json::json!({})).await;
    let r = app.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status, axum::http::StatusCode::OK);
    assert!(r.text.contains("keyward_verify_total{outcome=\"VALID\"}"), "{}", r.text);
    assert!(r.text.contains("keyward_verify_total{outcome=\"MALFORMED\"}"));
    assert!(r.text.contains("keyward_verify_duration_seconds_bucket"));
    assert!(count(&r.text, VERIFY_OK) >= before + 2, "{}", r.text);
    assert!(r.text.contains("keyward_http_request_duration_seconds_count{route=\"/v1/verify\"}"));
    assert!(r.text.contains("keyward_http_requests_total{method=\"GET\",route=\"/metrics\",status=\"2xx\"}"));
    // An unknown path is counted under one label, never by its raw path.
    app.call(Method::GET, "/v1/nothing/0c9e", None, None).await;
    let r = app.call(Method::GET, "/metrics", None, None).await;
    assert!(
        r.text.contains("keyward_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"4xx\"}"),
        "{}",
        r.text
    );
    assert!(!r.text.contains("0c9e"));
}

/// Rotation's new key and a webhook's signing secret: shown once each, then in no log line, response,
/// audit row, event or delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_and_webhook_secrets_leak_nowhere() {
    let capture = capture_logs();
    let mut app = TestApp::sqlite().await;
    let webhooks = WebhookSettings { allow_private_targets: true, ..app.state.webhooks.clone() };
    app.reconfigure(|b| b.webhooks(webhooks));
    let hook = app.post("/v1/webhooks", &app.admin_key, json!({"url": "http://127.0.0.1:9/hook"})).await;
    let secret = hook.body["secret"].as_str().unwrap().to_owned();
    let hook_id = hook.body["webhook"]["id"].as_str().unwrap().to_owned();
    let (old, rec) = app.key(app.default_org.id, &["read:x"]).await;
    let rotated =
        app.post(&format!("/v1/keys/{}/rotate", rec.id), &app.admin_key, json!({"grace_period_seconds": 60})).await;
    let new = rotated.body["key"].as_str().unwrap().to_owned();
    app.verify(&new, json!({})).await;
    app.verify(&old, json!({})).await;
    keyward_server::webhooks::Worker::new(app.state.clone()).tick().await.unwrap();

    let mut bodies = Vec::new();
    for path in [
        format!("/v1/keys/{}", rec.id),
        format!("/v1/webhooks/{hook_id}"),
        "/v1/webhooks".to_owned(),
        format!("/v1/webhooks/{hook_id}/deliveries"),
        "/v1/audit-logs?limit=100".to_owned(),
    ] {
        bodies.push(app.get(&path, &app.admin_key).await.text);
    }
    bodies.push(format!("{:?}", app.state.store.list_events(None, 1000).await.unwrap()));
    bodies.push(format!("{:?}", app.state.store.get_webhook(hook_id.parse().unwrap()).await.unwrap()));
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    bodies.push(logs);
    for (i, body) in bodies.iter().enumerate() {
        assert!(!body.contains(&new[8..40]) && !body.contains(&old[8..40]), "{i} contains a key: {body}");
        assert!(!body.contains(&secret[6..]), "{i} contains the webhook secret: {body}");
    }
}

/// A key a client puts in a path (its own or one it found) must not reach the request's log lines
/// through the gateway's request span, which names the path: segments that could hold a key are
/// logged as `…`.
#[tokio::test]
async fn a_key_in_a_gateway_path_is_not_logged() {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use keyward_server::gateway::{self, Gateway, GatewayConfig, RouteRule};

    let capture = capture_logs();
    let app = TestApp::sqlite().await;
    let (key, _) = app.key(app.default_org.id, &[]).await;
    let gw = Gateway::new(GatewayConfig {
        upstream: "http://127.0.0.1:1".parse().unwrap(),
        timeout: std::time::Duration::from_secs(5),
        routes: vec![],
        unmatched: RouteRule::default(),
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = gateway::router(app.state.clone(), gw);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>()).await;
    });
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let secret = &key[8..];
    for (path, header) in [
        (format!("/reset/{key}"), None),
        (format!("/a/{key}/b?x=1"), Some("sk_live_wrong")),
        (format!("/a/%73{}", &key[1..]), None),
    ] {
        let mut request = axum::http::Request::get(format!("http://{addr}{path}"));
        if let Some(header) = header {
            request = request.header("x-api-key", header);
        }
        let response = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.request(request.body(Body::empty()).unwrap()),
        )
        .await
        .expect("the gateway answered in time")
        .unwrap();
        assert_eq!(response.status(), axum::http::StatusCode::UNAUTHORIZED, "{path}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(!String::from_utf8_lossy(&body).contains(secret), "{path}: the answer has the key");
    }
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("\"via\":\"gateway\""), "the capture works: {logs}");
    assert!(!logs.contains(secret), "a gateway log line has the key");
}

/// A `GET` of `uri` with these headers, as a proxy asking `/v1/authz` sends it.
async fn get_with(app: &TestApp, uri: &str, headers: Vec<(&'static str, String)>) -> crate::helpers::Response {
    let mut request = crate::helpers::request(Method::GET, uri, None, None);
    for (name, value) in headers {
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    app.send(request).await
}

/// Through the proxy hook, the end client's key (allowed, refused, or put in the original path or a
/// forwarded URI) reaches no log line, no answer and no header of the answer.
#[tokio::test]
async fn a_key_through_the_proxy_hook_leaks_nowhere() {
    let capture = capture_logs();
    let app = TestApp::sqlite().await;
    let created = app.post("/v1/keys", &app.admin_key, json!({"name": "hooked", "allowed_ips": ["10.0.0.0/8"]})).await;
    let key = created.body["key"].as_str().unwrap().to_owned();
    let (open, _) = app.key(app.default_org.id, &[]).await;
    let secret = &key[8..40];
    let requests = [
        ("/v1/authz/projects".to_owned(), vec![("authorization", format!("Bearer {key}"))]),
        (format!("/v1/authz/reset/{key}"), vec![("x-api-key", open.clone())]),
        (format!("/v1/authz/reset/{key}"), vec![("x-api-key", "sk_live_wrong".to_owned())]),
        (
            "/v1/authz?style=forwarded".to_owned(),
            vec![
                ("x-forwarded-method", "GET".to_owned()),
                ("x-forwarded-uri", format!("/a/{key}?k={key}")),
                ("x-api-key", key.clone()),
            ],
        ),
    ];
    for (uri, headers) in requests {
        let r = get_with(&app, &uri, headers).await;
        assert!(!r.text.contains(secret), "{uri}: the answer has the key: {}", r.text);
        for (name, value) in &r.headers {
            assert!(!value.to_str().unwrap_or_default().contains(secret), "{uri}: `{name}` has the key");
        }
    }
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("\"via\":\"ext_authz_http\""), "the capture works");
    assert!(!logs.contains(secret), "a proxy-hook log line has the key");
}

/// A key pasted where a plan or an event name goes is never quoted back in the error (as in
/// `unknown plan `sk_live_…``), on any route that takes one.
#[tokio::test]
async fn a_key_given_as_a_plan_or_event_name_is_not_repeated() {
    let app = TestApp::sqlite().await;
    let (key, rec) = app.key(app.default_org.id, &[]).await;
    let secret = &key[8..];
    let org = format!("/v1/organizations/{}", app.default_org.id);
    let item = format!("/v1/keys/{}", rec.id);
    for name in [key.clone(), format!("pro {key}"), format!("{key}.json")] {
        for r in [
            app.post("/v1/keys", &app.admin_key, json!({"name": "k", "plan": name})).await,
            app.patch(&item, &app.admin_key, json!({"plan": name})).await,
            app.patch(&org, &app.admin_key, json!({"plan": name})).await,
            app.post("/v1/organizations", &app.admin_key, json!({"name": "o", "slug": "o-1", "plan": name})).await,
            app.post("/v1/webhooks", &app.admin_key, json!({"url": "http://hooks.example.com/", "events": [name]}))
                .await,
        ] {
            assert!(r.status.is_client_error(), "{}", r.text);
            assert!(!r.text.contains(secret), "the key is repeated: {}", r.text);
        }
    }
    // A customer scope is free text after `action:`: a self-service key granting one it lacks.
    let (own, _) = app.owned_key(app.default_org.id, "u1", &["keyward:self", "read:projects"]).await;
    let r = app.post("/v1/keys", &own, json!({"name": "k", "scopes": [format!("read:{key}")]})).await;
    assert_eq!(r.status, axum::http::StatusCode::FORBIDDEN, "{}", r.text);
    assert!(!r.text.contains(secret), "the key is repeated: {}", r.text);
    let r = app.post("/v1/keys", &own, json!({"name": "k", "scopes": ["write:projects"]})).await;
    assert!(r.text.contains("`write:projects`"), "{}", r.text);
    // A name that cannot hold a key is still quoted, so a typo stays easy to see.
    let r = app.post("/v1/keys", &app.admin_key, json!({"name": "k", "plan": "enterprize"})).await;
    assert!(r.text.contains("`enterprize`"), "{}", r.text);
    let r = app
        .post("/v1/webhooks", &app.admin_key, json!({"url": "http://hooks.example.com/", "events": ["key.craeted"]}))
        .await;
    assert!(r.text.contains("`key.craeted`"), "{}", r.text);
}

/// A key a client put in a path or an endpoint (a proxied `/hooks/sk_live_…`, an endpoint given to
/// `POST /v1/verify` or `POST /v1/usage`) is recorded as its prefix and hint: the usage rows, and the
/// exports made from them, never hold it.
#[tokio::test]
async fn a_key_in_a_recorded_path_or_endpoint_is_redacted() {
    let app = TestApp::sqlite().await;
    let (open, rec) = app.key(app.default_org.id, &[]).await;
    let (leaked, leaked_rec) = app.key(app.default_org.id, &[]).await;
    let redacted = format!("{}…{}", leaked_rec.prefix, leaked_rec.hint);
    let secret = &leaked[8..40];
    let hooks = [
        (format!("/v1/authz/reset/{leaked}"), vec![("x-api-key", open.clone())]),
        (
            "/v1/authz?style=forwarded".to_owned(),
            vec![
                ("x-forwarded-method", "GET".to_owned()),
                ("x-forwarded-uri", format!("/a/x_{leaked}/b")),
                ("x-api-key", open.clone()),
            ],
        ),
    ];
    for (uri, headers) in hooks {
        assert_eq!(get_with(&app, &uri, headers).await.status, axum::http::StatusCode::OK, "{uri}");
    }
    assert_eq!(app.verify(&open, json!({"endpoint": format!("/hooks/{leaked}")})).await["valid"], true);
    // Respelled: percent-encoded, upper case.
    let encoded = format!("/e/sk%5Flive%5F{}", &leaked[8..]);
    assert_eq!(app.verify(&open, json!({"endpoint": encoded})).await["valid"], true);
    assert_eq!(app.verify(&open, json!({"endpoint": format!("/U/{}", leaked.to_uppercase())})).await["valid"], true);
    let report =
        json!({"id": "r1", "key_id": rec.id.to_string(), "endpoint": format!("/r/{leaked}"), "tokens_used": 1});
    assert_eq!(app.post("/v1/usage", &app.admin_key, report).await.status, axum::http::StatusCode::ACCEPTED);
    assert!(app.state.usage.flush().await);
    let usage = app.get(&format!("/v1/keys/{}/usage?days=1", rec.id), &app.admin_key).await;
    let endpoints: Vec<&str> =
        usage.body["top_endpoints"].as_array().unwrap().iter().map(|e| e["endpoint"].as_str().unwrap()).collect();
    let mut want = vec![
        format!("/reset/{redacted}"),
        format!("/a/x_{redacted}/b"),
        format!("/hooks/{redacted}"),
        format!("/r/{redacted}"),
        format!("/e/{redacted}"),
        "/U/SK_LIVE_[redacted]".to_owned(),
    ];
    want.sort();
    let mut got: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
    got.sort();
    assert_eq!(got, want, "{}", usage.text);
    assert!(!usage.text.contains(secret) && !usage.text.contains(&secret.to_uppercase()));
}
