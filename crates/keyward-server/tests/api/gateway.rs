//! Gateway mode against a real upstream on 127.0.0.1: identity headers arrive, the key does not,
//! spoofed `X-Keyward-*` headers do not, large bodies stream, and every rejection has its status.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::routing::any;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keyward_core::Scope;
use keyward_server::gateway::{self, Gateway, GatewayConfig, GatewayRoute, RouteRule};
use keyward_server::service::CreateKeyRequest;
use serde_json::{Value, json};

use crate::helpers::TestApp;

/// Echoes method, path, headers and the body's length, counting the body as it streams in.
async fn echo(request: Request) -> axum::Json<Value> {
    let (parts, mut body) = request.into_parts();
    let mut bytes = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            bytes += data.len() as u64;
        }
    }
    let headers: serde_json::Map<String, Value> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), Value::from(v.to_str().unwrap_or_default())))
        .collect();
    axum::Json(
        json!({"method": parts.method.as_str(), "path": parts.uri.to_string(), "headers": headers, "bytes": bytes}),
    )
}

async fn spawn(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await;
    });
    addr
}

struct Setup {
    app: TestApp,
    gateway: SocketAddr,
    client: Client<HttpConnector, Body>,
}

fn rule(scopes: &[&str]) -> RouteRule {
    RouteRule { scopes: scopes.iter().map(|s| Scope::parse(s).unwrap()).collect(), ..Default::default() }
}

async fn setup_with(upstream: SocketAddr, timeout: Duration) -> Setup {
    let app = TestApp::sqlite().await;
    let gw = Gateway::new(GatewayConfig {
        upstream: format!("http://{upstream}").parse().unwrap(),
        timeout,
        routes: vec![
            GatewayRoute {
                prefix: "/public".into(),
                methods: vec![],
                rule: RouteRule { public: true, ..Default::default() },
            },
            GatewayRoute { prefix: "/projects".into(), methods: vec![], rule: rule(&["read:projects"]) },
            GatewayRoute { prefix: "/projects".into(), methods: vec![Method::POST], rule: rule(&["write:projects"]) },
        ],
        unmatched: RouteRule::default(),
    });
    let gateway = spawn(gateway::router(app.state.clone(), gw)).await;
    Setup { app, gateway, client: Client::builder(TokioExecutor::new()).build_http() }
}

async fn setup() -> Setup {
    let upstream = spawn(Router::new().fallback(any(echo))).await;
    setup_with(upstream, Duration::from_secs(5)).await
}

impl Setup {
    async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)], body: Body) -> (StatusCode, Value) {
        let (status, _, body) = self.send_full(method, path, headers, body).await;
        (status, body)
    }

    async fn send_full(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut req = Request::builder().method(method).uri(format!("http://{}{path}", self.gateway));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = tokio::time::timeout(Duration::from_secs(30), self.client.request(req.body(body).unwrap()))
            .await
            .expect("gateway answered in time")
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        self.send(Method::GET, path, headers, Body::empty()).await
    }
}

#[tokio::test]
async fn a_valid_key_is_proxied_with_identity_and_without_the_key() {
    let s = setup().await;
    let (key, rec) = s
        .app
        .key_with(
            s.app.default_org.id,
            CreateKeyRequest {
                name: "gw".into(),
                owner_id: Some("user_9".into()),
                scopes: vec!["read:*".into()],
                ..Default::default()
            },
        )
        .await;
    let bearer = format!("Bearer {key}");
    let (status, echo) = s
        .get(
            "/projects/7?x=1",
            &[
                ("authorization", &bearer),
                ("x-keyward-key-id", "spoofed"),
                ("x-keyward-owner-id", "admin"),
                ("x-keyward-extra", "1"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    assert_eq!(echo["path"], "/projects/7?x=1");
    let h = &echo["headers"];
    assert_eq!(h["x-keyward-key-id"], rec.id.to_string());
    assert_eq!(h["x-keyward-organization-id"], s.app.default_org.id.to_string());
    assert_eq!(h["x-keyward-owner-id"], "user_9");
    assert_eq!(h["x-keyward-environment"], "live");
    assert_eq!(h["x-keyward-scopes"], "read:*");
    assert!(h.get("x-keyward-extra").is_none(), "spoofed headers are stripped");
    assert!(h.get("authorization").is_none(), "the key never reaches the upstream");
    assert!(!echo.to_string().contains(&key[8..]), "the key never reaches the upstream");

    // X-API-Key works the same way and is removed too.
    let (status, echo) = s.get("/anything", &[("x-api-key", &key)]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(echo["headers"].get("x-api-key").is_none());
}

#[tokio::test]
async fn public_routes_need_no_key_and_still_lose_spoofed_headers() {
    let s = setup().await;
    let (status, echo) = s.get("/public/status", &[("x-keyward-key-id", "spoofed")]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(echo["headers"].get("x-keyward-key-id").is_none());
}

#[tokio::test]
async fn rejections_carry_the_outcome_code_and_status() {
    let s = setup().await;
    let org = s.app.default_org.id;
    let (reader, _) = s.app.key(org, &["read:projects"]).await;
    let (walled, _) = s
        .app
        .key_with(
            org,
            CreateKeyRequest { name: "w".into(), allowed_ips: vec!["10.0.0.0/8".into()], ..Default::default() },
        )
        .await;
    let (revoked, rec) = s.app.key(org, &[]).await;
    s.app.delete(&format!("/v1/keys/{}", rec.id), &s.app.admin_key).await;

    let (status, body) = s.get("/projects", &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("missing_credentials")));
    let (status, body) = s.get("/projects", &[("x-api-key", "sk_live_nope")]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("MALFORMED")));
    let (status, body) = s.get("/projects", &[("x-api-key", &revoked)]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("REVOKED")));
    let (status, body) = s.get("/projects", &[("x-api-key", &walled)]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("IP_NOT_ALLOWED")));
    let (status, body) = s.send(Method::POST, "/projects", &[("x-api-key", &reader)], Body::empty()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("INSUFFICIENT_SCOPE")));
    let (status, _) = s.get("/projects", &[("x-api-key", &reader)]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn over_the_limit_is_429_with_the_rate_limit_headers() {
    let s = setup().await;
    let r = s
        .app
        .post(
            "/v1/organizations",
            &s.app.admin_key,
            json!({"name": "tiny", "slug": "tiny", "plan": "pro", "rate_limit_per_minute": 2, "monthly_request_limit": 3}),
        )
        .await;
    let org = r.body["id"].as_str().unwrap().parse().unwrap();
    let (key, _) = s.app.key(org, &[]).await;
    for _ in 0..2 {
        let (status, headers, _) = s.send_full(Method::GET, "/x", &[("x-api-key", &key)], Body::empty()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-ratelimit-limit"], "2", "proxied responses carry the limit headers");
    }
    let (status, headers, body) = s.send_full(Method::GET, "/x", &[("x-api-key", &key)], Body::empty()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("RATE_LIMITED")));
    assert_eq!(headers["retry-after"], "30");
    assert!(headers.contains_key("ratelimit-policy"));
    // The quota: the third request of the month passes, the fourth does not.
    s.app.clock.advance(chrono::Duration::minutes(1));
    let (status, _) = s.get("/x", &[("x-api-key", &key)]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = s.get("/x", &[("x-api-key", &key)]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("QUOTA_EXCEEDED")));
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    // A port that was just free: nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let s = setup_with(closed, Duration::from_secs(5)).await;
    let (key, _) = s.app.key(s.app.default_org.id, &[]).await;
    let (status, body) = s.get("/x", &[("x-api-key", &key)]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_GATEWAY, Some("upstream_unavailable")));
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let slow = spawn(Router::new().fallback(any(|| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        "late"
    })))
    .await;
    let s = setup_with(slow, Duration::from_millis(200)).await;
    let (key, _) = s.app.key(s.app.default_org.id, &[]).await;
    let (status, body) = s.get("/x", &[("x-api-key", &key)]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::GATEWAY_TIMEOUT, Some("upstream_timeout")));
}

/// Streaming, proven by order rather than by measuring memory (which other tests share): the client
/// sends 50 MiB through a channel that holds 4 chunks, and the upstream sees the first bytes before
/// the client has finished sending. A gateway that buffered the body could not forward anything
/// before the last chunk; one that streams holds only a few chunks at a time.
#[tokio::test]
async fn a_50_mb_body_streams_through_with_bounded_memory() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 800; // 50 MiB
    let client_done = Arc::new(AtomicBool::new(false));
    let seen_before_done = Arc::new(AtomicBool::new(false));
    let (done, seen) = (client_done.clone(), seen_before_done.clone());
    let upstream = spawn(Router::new().fallback(any(move |request: Request| {
        let (done, seen) = (done.clone(), seen.clone());
        async move {
            let mut body = request.into_body();
            let mut bytes = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    if bytes == 0 && !done.load(Ordering::SeqCst) {
                        seen.store(true, Ordering::SeqCst);
                    }
                    bytes += data.len() as u64;
                }
            }
            axum::Json(json!({"bytes": bytes}))
        }
    })))
    .await;
    let s = setup_with(upstream, Duration::from_secs(30)).await;
    let (key, _) = s.app.key(s.app.default_org.id, &[]).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<axum::body::Bytes>, std::io::Error>>(4);
    let done = client_done.clone();
    tokio::spawn(async move {
        let chunk = axum::body::Bytes::from(vec![b'x'; CHUNK]);
        for _ in 0..CHUNKS {
            if tx.send(Ok(hyper::body::Frame::data(chunk.clone()))).await.is_err() {
                break;
            }
        }
        done.store(true, Ordering::SeqCst);
    });
    let body = Body::new(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
    let (status, echo) = s.send(Method::POST, "/upload", &[("x-api-key", &key)], body).await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    assert_eq!(echo["bytes"], (CHUNK * CHUNKS) as u64);
    assert!(seen_before_done.load(Ordering::SeqCst), "the upstream saw nothing before the whole body was sent");
}

/// Every gateway request of a known key is a usage event with the status the client got and, when
/// proxied, the upstream's latency; the path is recorded without its query string.
#[tokio::test]
async fn gateway_requests_are_usage_events_with_the_upstream_status() {
    let upstream = spawn(
        Router::new().route("/boom", any(|| async { (StatusCode::SERVICE_UNAVAILABLE, "down") })).fallback(any(echo)),
    )
    .await;
    let s = setup_with(upstream, Duration::from_secs(5)).await;
    let (key, rec) = s.app.key(s.app.default_org.id, &["read:*"]).await;
    let bearer = format!("Bearer {key}");
    let auth = [("authorization", bearer.as_str())];
    assert_eq!(s.get("/projects/1?token=hush", &auth).await.0, StatusCode::OK);
    assert_eq!(s.get("/boom", &auth).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(s.send(Method::POST, "/projects", &auth, Body::empty()).await.0, StatusCode::FORBIDDEN);
    assert!(s.app.state.usage.flush().await);
    let r = s.app.get(&format!("/v1/keys/{}/usage?days=1", rec.id), &s.app.admin_key).await;
    let t = &r.body["totals"];
    assert_eq!((t["requests"].clone(), t["denied"].clone()), (json!(3), json!(1)), "{}", r.text);
    assert_eq!((t["errors_4xx"].clone(), t["errors_5xx"].clone()), (json!(1), json!(1)));
    assert!(t["mean_latency_ms"].is_number(), "{t}");
    let endpoints: Vec<&str> =
        r.body["top_endpoints"].as_array().unwrap().iter().map(|e| e["endpoint"].as_str().unwrap()).collect();
    assert!(endpoints.contains(&"/projects/1") && endpoints.contains(&"/boom"), "{endpoints:?}");
    assert!(!r.text.contains("hush"), "no query string is recorded");
}
