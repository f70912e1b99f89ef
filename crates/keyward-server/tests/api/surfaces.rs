//! One situation, one answer: a key refused as the caller's own key on the management API, in gateway
//! mode and by the tower layer gets the same status, error code and `Retry-After` on all three, and
//! that code is the one the error table maps `/v1/verify`'s outcome to (`ErrorCode::of_outcome`). The
//! key's tier limits and quota apply to verified keys only (the gateway, the layer, `/v1/verify`), not
//! to the management API's callers: those situations compare the three of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::header::RETRY_AFTER;
use axum::http::{Method, Request, StatusCode};
use axum::routing::get;
use chrono::{DateTime, Utc};
use http_body_util::BodyExt;
use keyward_core::{Environment, OrgId, PlainKey, Scope, VerifyOutcome};
use keyward_limit::{Limiter, MemoryLimiter, QuotaDecision, RateDecision, RateLimits};
use keyward_server::ErrorCode;
use keyward_server::gateway::{self, Gateway, GatewayConfig, GatewayRoute, RouteRule};
use keyward_server::service::CreateKeyRequest;
use keyward_tower::{InProcess, KeywardLayer};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::helpers::TestApp;

/// What a client can tell two refusals apart by.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    code: String,
    retry_after: Option<String>,
}

/// `GET /me` on the gateway (unmatched: a valid key, no scope) and the layer (no scope), `/v1/me` on
/// the API; `GET /projects` on the gateway and the layer needs `read:projects`.
struct Surfaces {
    app: TestApp,
    gateway: Router,
    layer: Router,
}

/// The gateway in front of `upstream`: `/projects` needs `read:projects`, other paths a valid key.
pub fn gateway_router(app: &TestApp, upstream: SocketAddr, timeout: Duration) -> Router {
    let rule = RouteRule { scopes: vec![Scope::parse("read:projects").unwrap()], ..Default::default() };
    let gw = Gateway::new(GatewayConfig {
        upstream: format!("http://{upstream}").parse().unwrap(),
        timeout,
        routes: vec![GatewayRoute { prefix: "/projects".into(), methods: vec![], rule }],
        unmatched: RouteRule::default(),
    })
    .unwrap();
    gateway::router(app.state.clone(), gw)
}

/// The layer in-process: `/projects` needs `read:projects`, `/me` a valid key.
pub fn layer_router(app: &TestApp) -> Router {
    let layer = |scopes: &[&str]| KeywardLayer::new(InProcess::new(app.state.clone())).require(scopes).unwrap();
    Router::new()
        .route("/me", get(|| async { "me" }))
        .layer(layer(&[]))
        .merge(Router::new().route("/projects", get(|| async { "projects" })).layer(layer(&["read:projects"])))
}

impl Surfaces {
    fn of(app: TestApp) -> Self {
        // Never reached: only refusals are asked for.
        let upstream = SocketAddr::from(([127, 0, 0, 1], 1));
        Self { gateway: gateway_router(&app, upstream, Duration::from_secs(1)), layer: layer_router(&app), app }
    }

    async fn new() -> Self {
        Self::of(TestApp::sqlite().await)
    }

    async fn api(&self, path: &str, headers: &[(&str, &str)], ip: Option<[u8; 4]>) -> Answer {
        answer(self.app.router(), request(path, headers, ip)).await
    }

    /// The gateway's and the layer's answer, the same for both.
    async fn edge(&self, what: &str, path: &str, headers: &[(&str, &str)], ip: Option<[u8; 4]>) -> Answer {
        let gateway = answer(self.gateway.clone(), request(path, headers, ip)).await;
        let layer = answer(self.layer.clone(), request(path, headers, ip)).await;
        assert_eq!(gateway, layer, "{what}: the gateway and the layer differ");
        gateway
    }

    /// The answer of all three surfaces to the same key, headers and address.
    async fn everywhere(&self, what: &str, headers: &[(&str, &str)], ip: Option<[u8; 4]>) -> Answer {
        let edge = self.edge(what, "/me", headers, ip).await;
        let api = self.api("/v1/me", headers, ip).await;
        assert_eq!(api, edge, "{what}: the management API and the gateway/layer differ");
        edge
    }

    /// What the error table maps `/v1/verify`'s outcome for `key` to.
    async fn verified(&self, key: &str) -> Answer {
        let outcome: VerifyOutcome =
            serde_json::from_value(self.app.verify(key, json!({})).await["code"].clone()).unwrap();
        let code = ErrorCode::of_outcome(outcome).unwrap_or_else(|| panic!("{key:.12}… is valid"));
        Answer {
            status: code.status().as_u16(),
            code: code.as_str().to_owned(),
            retry_after: code.retry_after().seconds().map(|s| s.to_string()),
        }
    }

    async fn org(&self, slug: &str, limits: Value) -> OrgId {
        let mut body = json!({"name": slug, "slug": slug, "plan": "pro"});
        body.as_object_mut().unwrap().extend(limits.as_object().unwrap().clone());
        let r = self.app.post("/v1/organizations", &self.app.admin_key, body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.body["id"].as_str().unwrap().parse().unwrap()
    }

    /// A key of a new organization with these limits, after its one allowed verification.
    async fn spent(&self, slug: &str, limits: Value) -> String {
        let (key, _) = self.app.key(self.org(slug, limits).await, &[]).await;
        assert_eq!(self.app.verify(&key, json!({})).await["code"], "VALID", "spends the one request");
        key
    }
}

pub fn request(path: &str, headers: &[(&str, &str)], ip: Option<[u8; 4]>) -> Request<Body> {
    let mut builder = Request::builder().method(Method::GET).uri(path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let mut req = builder.body(Body::empty()).unwrap();
    if let Some(ip) = ip {
        req.extensions_mut().insert(ConnectInfo(SocketAddr::from((ip, 40000))));
    }
    req
}

async fn answer(router: Router, request: Request<Body>) -> Answer {
    let response = tokio::time::timeout(Duration::from_secs(10), router.oneshot(request)).await.unwrap().unwrap();
    let status = response.status().as_u16();
    let retry_after = response.headers().get(RETRY_AFTER).map(|v| v.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("<no error code>").to_owned();
    Answer { status, code, retry_after }
}

fn refused(status: StatusCode, code: &str) -> Answer {
    Answer { status: status.as_u16(), code: code.to_owned(), retry_after: None }
}

fn x_api_key(key: &str) -> [(&'static str, &str); 1] {
    [("x-api-key", key)]
}

#[tokio::test]
async fn a_missing_key_is_missing_credentials_everywhere() {
    let s = Surfaces::new().await;
    let want = refused(StatusCode::UNAUTHORIZED, "missing_credentials");
    for (what, headers) in [
        ("no header", &[][..]),
        ("an empty X-API-Key", &[("x-api-key", " ")][..]),
        ("Basic credentials", &[("authorization", "Basic dXNlcjpwYXNz")][..]),
        ("an empty bearer token", &[("authorization", "Bearer ")][..]),
        ("a bare scheme", &[("authorization", "Bearer")][..]),
    ] {
        assert_eq!(s.everywhere(what, headers, None).await, want, "{what}");
    }
    // Another scheme holds no key, but does not hide the key beside it.
    let (key, _) = s.app.key(s.app.default_org.id, &[]).await;
    let basic_and_key = [("authorization", "Basic dXNlcjpwYXNz"), ("x-api-key", key.as_str())];
    assert_eq!(s.api("/v1/me", &basic_and_key, None).await.status, 200);
    assert_eq!(answer(s.layer.clone(), request("/me", &basic_and_key, None)).await.status, 200);
}

#[tokio::test]
async fn an_invalid_key_is_refused_alike_everywhere() {
    let s = Surfaces::new().await;
    let (real, _) = s.app.key(s.app.default_org.id, &[]).await;
    let mut typo = real.clone().into_bytes();
    let last = typo.len() - 1;
    typo[last] = if typo[last] == b'A' { b'B' } else { b'A' };
    let typo = String::from_utf8(typo).unwrap();
    let unknown = PlainKey::generate(&Default::default(), Environment::Live).unwrap();
    for (what, key, code) in [
        ("too short", "sk_live_nope", "malformed_key"),
        ("not a key at all", "hunter2", "malformed_key"),
        ("a mistyped key (checksum)", typo.as_str(), "malformed_key"),
        ("a well-formed unknown key", unknown.expose_secret(), "unknown_key"),
    ] {
        let bearer = format!("Bearer {key}");
        let want = refused(StatusCode::UNAUTHORIZED, code);
        assert_eq!(s.everywhere(what, &x_api_key(key), None).await, want, "{what}");
        assert_eq!(s.everywhere(what, &[("authorization", &bearer)], None).await, want, "{what}, bearer");
        assert_eq!(s.verified(key).await, want, "{what}: /v1/verify's outcome");
    }
}

#[tokio::test]
async fn a_key_that_no_longer_authenticates_is_401_everywhere() {
    let s = Surfaces::new().await;
    let app = &s.app;
    let org = app.default_org.id;
    let (revoked, _) = app.revoked_key(org).await;
    let (rotated, rec) = app.key(org, &[]).await;
    let r = app.post(&format!("/v1/keys/{}/rotate", rec.id), &app.admin_key, json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let (disabled, rec) = app.key(org, &[]).await;
    app.patch(&format!("/v1/keys/{}", rec.id), &app.admin_key, json!({"is_active": false})).await;
    let (expiring, _) =
        app.key_with(org, CreateKeyRequest { name: "e".into(), expires_in_days: Some(1), ..Default::default() }).await;
    let other = s.org("other", json!({})).await;
    let (orphaned, _) = app.key(other, &["read:projects"]).await;
    let r = app.patch(&format!("/v1/organizations/{other}"), &app.admin_key, json!({"is_active": false})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    app.clock.advance(chrono::Duration::days(2));

    for (what, key, code) in [
        ("revoked", &revoked, "key_revoked"),
        ("rotated without grace", &rotated, "key_revoked"),
        ("disabled", &disabled, "key_disabled"),
        ("expired", &expiring, "key_expired"),
        ("in a disabled organization", &orphaned, "organization_disabled"),
    ] {
        let want = refused(StatusCode::UNAUTHORIZED, code);
        assert_eq!(s.everywhere(what, &x_api_key(key), None).await, want, "{what}");
        assert_eq!(s.edge(what, "/projects", &x_api_key(key), None).await, want, "{what}, on a scoped route");
        assert_eq!(s.verified(key).await, want, "{what}: /v1/verify's outcome");
    }
}

#[tokio::test]
async fn a_key_that_may_not_do_this_is_403_everywhere() {
    let s = Surfaces::new().await;
    let org = s.app.default_org.id;
    let walled = s.app.walled_key(org, "10.0.0.0/8").await;
    let want = refused(StatusCode::FORBIDDEN, "ip_not_allowed");
    assert_eq!(s.everywhere("from outside its allow-list", &x_api_key(&walled), Some([192, 0, 2, 1])).await, want);
    assert_eq!(s.everywhere("from an unknown address", &x_api_key(&walled), None).await, want);
    assert_eq!(s.verified(&walled).await, want);
    assert_eq!(answer(s.layer.clone(), request("/me", &x_api_key(&walled), Some([10, 1, 2, 3]))).await.status, 200);

    // Each surface's own scope: `read:projects` on the gateway's and the layer's route, `keyward:keys:read`
    // on the API's `GET /v1/keys`.
    let (reader, _) = s.app.key(org, &["read:users"]).await;
    let want = refused(StatusCode::FORBIDDEN, "insufficient_scope");
    assert_eq!(s.edge("lacking a scope", "/projects", &x_api_key(&reader), None).await, want);
    assert_eq!(s.api("/v1/keys", &x_api_key(&reader), None).await, want);
    let r = s.app.verify(&reader, json!({"required_scopes": ["read:projects"]})).await;
    assert_eq!(
        ErrorCode::of_outcome(serde_json::from_value(r["code"].clone()).unwrap()),
        Some(ErrorCode::InsufficientScope)
    );
}

#[tokio::test]
async fn over_a_rate_limit_is_429_with_retry_after_on_the_gateway_and_the_layer() {
    let s = Surfaces::new().await;
    let key = s.spent("tight", json!({"rate_limit_per_minute": 1})).await;
    let edge = s.edge("rate limited", "/me", &x_api_key(&key), None).await;
    assert_eq!((edge.status, edge.code.as_str()), (429, "rate_limited"));
    assert_eq!(edge.retry_after.as_deref(), Some("60"), "one request a minute frees up in a minute");
    let verified = s.verified(&key).await;
    assert_eq!((verified.status, verified.code), (edge.status, edge.code));
}

#[tokio::test]
async fn a_spent_quota_is_429_without_retry_after_on_the_gateway_and_the_layer() {
    let s = Surfaces::new().await;
    let key = s.spent("metered", json!({"monthly_request_limit": 1})).await;
    let want = refused(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
    assert_eq!(s.edge("quota spent", "/me", &x_api_key(&key), None).await, want);
    assert_eq!(s.verified(&key).await, want);
}

/// A limiter whose shared backend is down, under the `fail_closed` policy; Keyward's protection of
/// itself counts on this node, as `RedisLimiter` does then.
#[derive(Debug, Default)]
pub struct FailClosed(MemoryLimiter);

#[async_trait]
impl Limiter for FailClosed {
    async fn check(&self, _: &str, limits: &RateLimits, _: u64, _: DateTime<Utc>) -> RateDecision {
        RateDecision::degraded(limits, false)
    }

    async fn consume_quota(&self, _: &str, limit: Option<u64>, _: u64, now: DateTime<Utc>) -> QuotaDecision {
        QuotaDecision::degraded(limit, false, now)
    }

    async fn check_or_local(&self, subject: &str, limits: &RateLimits, cost: u64, now: DateTime<Utc>) -> RateDecision {
        self.0.check(subject, limits, cost, now).await
    }
}

#[tokio::test]
async fn a_limiter_that_cannot_decide_is_503_with_retry_after_on_the_gateway_and_the_layer() {
    let mut app = TestApp::sqlite().await;
    app.reconfigure(|b| b.limiter(Arc::new(FailClosed::default())));
    let s = Surfaces::of(app);
    let (key, _) = s.app.key(s.app.default_org.id, &[]).await;
    let want =
        Answer { retry_after: Some("1".into()), ..refused(StatusCode::SERVICE_UNAVAILABLE, "limiter_unavailable") };
    assert_eq!(s.edge("limiter down", "/me", &x_api_key(&key), None).await, want);
    assert_eq!(s.verified(&key).await, want);
    assert_eq!(s.api("/v1/me", &x_api_key(&key), None).await.status, 200, "the management API does not wait for it");
}

/// Past its failed authentications an address gets 429 even for a right key, with `Retry-After`, on
/// the management API and at the edge alike (each counts in a counter of its own).
#[tokio::test]
async fn a_locked_out_address_is_429_with_retry_after_everywhere() {
    let s = Surfaces::new().await;
    let (key, _) = s.app.key(s.app.default_org.id, &[]).await;
    let guesser = Some([198, 51, 100, 7]);
    for i in 0..10 {
        let unknown = PlainKey::generate(&Default::default(), Environment::Live).unwrap();
        let guess = x_api_key(unknown.expose_secret());
        assert_eq!(s.api("/v1/me", &guess, guesser).await.code, "unknown_key", "guess {i}");
        let gateway = answer(s.gateway.clone(), request("/me", &guess, guesser)).await;
        assert_eq!(gateway.code, "unknown_key", "guess {i}");
    }
    let locked = s.everywhere("locked out", &x_api_key(&key), guesser).await;
    assert_eq!((locked.status, locked.code.as_str()), (429, "rate_limited"));
    let after: u64 = locked.retry_after.as_deref().expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&after), "{after}");
    let elsewhere = Some([192, 0, 2, 9]);
    assert_eq!(s.api("/v1/me", &x_api_key(&key), elsewhere).await.status, 200, "another address");
    assert_eq!(answer(s.layer.clone(), request("/me", &x_api_key(&key), elsewhere)).await.status, 200);
}
