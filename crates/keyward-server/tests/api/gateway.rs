//! Gateway mode against a real upstream on 127.0.0.1: identity headers arrive, the key does not,
//! spoofed `X-Keyward-*` headers do not (in any spelling, nor by naming them in `Connection`), every
//! spelling of a path gets that path's rule and the upstream gets the normalized path, paths without
//! a safe reading are refused, large bodies stream, and every rejection has its status.

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
use keyward_server::gateway::{self, Gateway, GatewayConfig, RouteRule};
use serde_json::{Value, json};

use crate::helpers::{TestApp, protected_api_routes};

/// Echoes method, path, headers and the body's length, counting the body as it streams in.
pub(crate) async fn echo(request: Request) -> axum::Json<Value> {
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

pub(crate) async fn spawn(router: Router) -> SocketAddr {
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

async fn setup_with(upstream: SocketAddr, timeout: Duration) -> Setup {
    let app = TestApp::sqlite().await;
    let gw = Gateway::new(GatewayConfig {
        upstream: format!("http://{upstream}").parse().unwrap(),
        timeout,
        routes: protected_api_routes(),
        unmatched: RouteRule::default(),
    })
    .unwrap();
    let gateway = spawn(gateway::router(app.state.clone(), gw)).await;
    Setup { app, gateway, client: Client::builder(TokioExecutor::new()).build_http() }
}

async fn setup() -> Setup {
    let upstream = spawn(Router::new().fallback(any(echo))).await;
    setup_with(upstream, Duration::from_secs(5)).await
}

/// What the gateway answered, as a refusal reads: the status and `error.code`.
fn refusal((status, body): &(StatusCode, Value)) -> (StatusCode, Option<&str>) {
    (*status, body["error"]["code"].as_str())
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

    /// Asserts that `method` on each of `paths`, with `headers`, is refused with `want`'s status and
    /// `error.code`.
    async fn assert_refused(&self, method: Method, paths: &[&str], headers: Headers<'_>, want: Refusal) {
        let names: Vec<_> = headers.iter().map(|(name, _)| name).collect();
        for path in paths {
            let answer = self.send(method.clone(), path, headers, Body::empty()).await;
            assert_eq!(refusal(&answer), (want.0, Some(want.1)), "{method} {path} with {names:?}: {}", answer.1);
        }
    }
}

/// A refusal as [`Setup::assert_refused`] expects it: the status and `error.code`.
type Refusal = (StatusCode, &'static str);

/// Request headers: name and value.
type Headers<'a> = &'a [(&'a str, &'a str)];

const NEEDS_SCOPE: Refusal = (StatusCode::FORBIDDEN, "insufficient_scope");

#[tokio::test]
async fn a_valid_key_is_proxied_with_identity_and_without_the_key() {
    let s = setup().await;
    let (key, rec) = owner_key(&s).await;
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
    let walled = s.app.walled_key(org, "10.0.0.0/8").await;
    let (revoked, _) = s.app.revoked_key(org).await;

    for (method, key, want) in [
        (Method::GET, None, (StatusCode::UNAUTHORIZED, "missing_credentials")),
        (Method::GET, Some("sk_live_nope"), (StatusCode::UNAUTHORIZED, "malformed_key")),
        (Method::GET, Some(revoked.as_str()), (StatusCode::UNAUTHORIZED, "key_revoked")),
        (Method::GET, Some(walled.as_str()), (StatusCode::FORBIDDEN, "ip_not_allowed")),
        (Method::POST, Some(reader.as_str()), NEEDS_SCOPE),
    ] {
        let headers: Vec<_> = key.map(|k| ("x-api-key", k)).into_iter().collect();
        s.assert_refused(method, &["/projects"], &headers, want).await;
    }
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
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited")));
    assert_eq!(headers["retry-after"], "30");
    assert!(headers.contains_key("ratelimit-policy"));
    // The quota: the third request of the month passes, the fourth does not.
    s.app.clock.advance(chrono::Duration::minutes(1));
    let (status, _) = s.get("/x", &[("x-api-key", &key)]).await;
    assert_eq!(status, StatusCode::OK);
    s.assert_refused(Method::GET, &["/x"], &[("x-api-key", &key)], (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"))
        .await;
}

/// What a gateway in front of `upstream`, waiting `timeout` for it, answers a valid key's request.
async fn through_gateway_to(upstream: SocketAddr, timeout: Duration) -> (StatusCode, Option<String>) {
    let s = setup_with(upstream, timeout).await;
    let (key, _) = s.app.key(s.app.default_org.id, &[]).await;
    let answer = s.get("/x", &[("x-api-key", &key)]).await;
    let (status, code) = refusal(&answer);
    (status, code.map(str::to_owned))
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    // A port that was just free: nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let answer = through_gateway_to(closed, Duration::from_secs(5)).await;
    assert_eq!(answer, (StatusCode::BAD_GATEWAY, Some("upstream_unavailable".into())));
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let slow = spawn(Router::new().fallback(any(|| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        "late"
    })))
    .await;
    let answer = through_gateway_to(slow, Duration::from_millis(200)).await;
    assert_eq!(answer, (StatusCode::GATEWAY_TIMEOUT, Some("upstream_timeout".into())));
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

/// The five identity headers the upstream got, asserted to carry `key`'s identity.
fn assert_identity(echo: &Value, key: &keyward_store::ApiKey, context: &str) {
    let h = &echo["headers"];
    assert_eq!(h["x-keyward-key-id"], key.id.to_string(), "{context}: {echo}");
    assert_eq!(h["x-keyward-organization-id"], key.organization_id.to_string(), "{context}: {echo}");
    assert_eq!(h["x-keyward-owner-id"], "user_9", "{context}: {echo}");
    assert_eq!(h["x-keyward-environment"], "live", "{context}: {echo}");
    assert_eq!(h["x-keyward-scopes"], "read:*", "{context}: {echo}");
}

/// Names of the headers the upstream got that a CGI/WSGI server would read as `X-Keyward-*`.
fn keyward_like_headers(echo: &Value) -> Vec<String> {
    echo["headers"]
        .as_object()
        .map(|h| h.keys().filter(|k| k.replace('_', "-").starts_with("x-keyward")).cloned().collect())
        .unwrap_or_default()
}

async fn owner_key(s: &Setup) -> (String, keyward_store::ApiKey) {
    s.app.owned_key(s.app.default_org.id, "user_9", &["read:*"]).await
}

/// Routes match on the normalized path: a `read:projects` key cannot reach the `write:projects` rule
/// through another spelling of `/projects`, and no spelling climbs out of the public `/public` route
/// into a protected one. What has no reading every upstream agrees on is refused with 400 before any
/// route or key is looked at.
#[tokio::test]
async fn every_spelling_of_a_path_gets_that_paths_rule() {
    let s = setup().await;
    let (reader, _) = s.app.key(s.app.default_org.id, &["read:projects"]).await;
    let reader: Headers = &[("x-api-key", &reader)];
    let unsafe_paths: &[&str] = &[
        "/public/..%2fprojects",
        "/public%2F..%2Fprojects",
        "/projects%2f7",
        "/public/..%5Cprojects",
        "/public/..%5cprojects",
        "/public\\..\\projects",
        "/public/%00",
        "/public/x%00.json",
        "/public/%zz",
        "/public/%2",
        "/public/%ff",
        "/public/%c3",
        "/..",
        "/public/../../projects",
        "/%2e%2e/projects",
        "/public/..;/projects",
        "/public/%2e%2e;x=1/projects",
    ];
    let invalid_path = (StatusCode::BAD_REQUEST, "invalid_path");
    let table: [(Method, Headers, &[&str], Refusal); 4] = [
        (
            Method::POST,
            reader,
            &[
                "/projects",
                "//projects",
                "///projects//",
                "/%70rojects",
                "/%70%72%6F%6a%65%63%74%73",
                "/./projects",
                "/x/../projects",
                "/x/%2E%2E/projects/7",
                "/public/../projects",
                "/projects/7/..",
                "/projects/%37",
            ],
            NEEDS_SCOPE,
        ),
        (
            Method::GET,
            &[],
            &[
                "/public/../projects",
                "/public/%2e%2e/projects",
                "/public/%2E%2e/projects",
                "/public/.%2E/projects",
                "/public/%2e./projects",
                "/public//..//projects",
                "/public/./../projects/7",
                "/public/a/../../projects",
                "/public/x/%2e%2e/%2e%2e/public/../projects",
            ],
            (StatusCode::UNAUTHORIZED, "missing_credentials"),
        ),
        (Method::GET, &[], unsafe_paths, invalid_path),
        (Method::GET, reader, unsafe_paths, invalid_path),
    ];
    for (method, headers, paths, want) in table {
        s.assert_refused(method, paths, headers, want).await;
    }
}

/// The upstream gets the path the rule was chosen for, and the query string exactly as sent.
#[tokio::test]
async fn the_upstream_gets_the_normalized_path_and_the_query_as_sent() {
    let s = setup().await;
    let (writer, _) = s.app.key(s.app.default_org.id, &["write:projects"]).await;
    let (status, echo) = s
        .send(Method::POST, "//public/../projects/./7/?q=%2e%2e/../a&b=%2F", &[("x-api-key", &writer)], Body::empty())
        .await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    assert_eq!(echo["path"], "/projects/7/?q=%2e%2e/../a&b=%2F");
    for (path, forwarded) in [
        ("/public//a/./b/../%7Euser", "/public/a/~user"),
        ("/public/caf%c3%a9", "/public/caf%C3%A9"),
        ("/public/a%20b/", "/public/a%20b/"),
        ("/public/%252e%252e/x", "/public/%252e%252e/x"),
    ] {
        let (status, echo) = s.get(path, &[]).await;
        assert_eq!((status, echo["path"].as_str()), (StatusCode::OK, Some(forwarded)), "{path}: {echo}");
    }
}

/// Hop-by-hop stripping runs before the identity headers go in, so a header the
/// client names in `Connection` (any case, any list, several `Connection` headers) removes nothing
/// of Keyward's. A key header named there still authenticates: Keyward is its recipient.
#[tokio::test]
async fn connection_cannot_remove_identity_headers() {
    let s = setup().await;
    let (key, rec) = owner_key(&s).await;
    let bearer = format!("Bearer {key}");
    let variants: [&[(&str, &str)]; 7] = [
        &[("connection", "X-Keyward-Key-Id")],
        &[("connection", "x-keyward-owner-id, X-KEYWARD-SCOPES")],
        &[
            ("connection", "keep-alive"),
            ("connection", "X-Keyward-Organization-Id"),
            ("connection", "x-keyward-environment"),
        ],
        &[(
            "connection",
            " x-keyward-key-id ,,x-keyward-owner-id,x-keyward-scopes ,x-keyward-environment,X-Keyward-Organization-ID",
        )],
        &[("Connection", "x-keyward-key-id"), ("x-keyward-key-id", "spoofed"), ("keep-alive", "timeout=5")],
        &[("connection", "x-api-key, authorization")],
        &[("connection", "X_Keyward_Key_Id, x-forwarded-for"), ("x-forwarded-for", "10.0.0.1")],
    ];
    for (i, variant) in variants.iter().enumerate() {
        let mut headers = variant.to_vec();
        headers.push(if i % 2 == 0 { ("x-api-key", key.as_str()) } else { ("authorization", bearer.as_str()) });
        let (status, echo) = s.get("/anything", &headers).await;
        assert_eq!(status, StatusCode::OK, "{variant:?}: {echo}");
        assert_identity(&echo, &rec, &format!("{variant:?}"));
        let h = &echo["headers"];
        assert!(h.get("keep-alive").is_none() && h.get("x-api-key").is_none(), "{variant:?}: {echo}");
    }
}

/// CGI, WSGI and Rack read `X_Keyward_Owner_Id` as `X-Keyward-Owner-Id`, so
/// every spelling that maps to an `x-keyward-` name goes, on protected and public routes alike.
#[tokio::test]
async fn identity_headers_in_any_spelling_are_stripped() {
    let s = setup().await;
    let (key, rec) = owner_key(&s).await;
    let spoofs = [
        ("x_keyward_key_id", "spoofed"),
        ("X-KEYWARD_scopes", "spoofed"),
        ("X_Keyward_Owner_Id", "spoofed"),
        ("x_keyward_organization_id", "spoofed"),
        ("x-keyward_environment", "spoofed"),
        ("X_KEYWARD-EXTRA", "spoofed"),
        ("x-keyward-key-id", "spoofed"),
        ("x_keyward", "spoofed"),
    ];
    let mut headers = spoofs.to_vec();
    headers.push(("x-api-key", &key));
    let (status, echo) = s.get("/anything", &headers).await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    assert_identity(&echo, &rec, "protected");
    let mut names = keyward_like_headers(&echo);
    names.sort();
    let canonical = [
        "x-keyward-environment",
        "x-keyward-key-id",
        "x-keyward-organization-id",
        "x-keyward-owner-id",
        "x-keyward-scopes",
    ];
    assert_eq!(names, canonical, "only Keyward's own spellings arrive");
    assert!(!echo.to_string().contains("spoofed"), "{echo}");

    let (status, echo) = s.get("/public/x", &spoofs).await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    assert!(keyward_like_headers(&echo).is_empty(), "{echo}");
    assert!(!echo.to_string().contains("spoofed"), "{echo}");
}

/// The key header is removed on every route, public ones included, whatever
/// carries it: `Authorization` in any scheme (a key can ride in `Basic` or `Token` too), `X-API-Key`
/// and its underscore spelling.
#[tokio::test]
async fn the_key_never_reaches_the_upstream_on_any_route() {
    let s = setup().await;
    let (key, _) = s.app.key(s.app.default_org.id, &[]).await;
    let secret = &key[8..];
    let bearer = format!("Bearer {key}");
    let lower_bearer = format!("bearer {key}");
    let token = format!("Token {key}");
    let variants: [&[(&str, &str)]; 7] = [
        &[("authorization", &bearer)],
        &[("Authorization", &lower_bearer)],
        &[("x-api-key", &key)],
        &[("X_Api_Key", &key), ("x-api-key", &key)],
        &[("authorization", &token), ("x-api-key", &key)],
        &[("authorization", "Basic dXNlcjpwYXNz"), ("x-api-key", &key)],
        &[("x-api-key", &key), ("authorization", &bearer), ("authorization", "Basic dXNlcjpwYXNz")],
    ];
    for path in ["/public/x", "/anything", "/projects/1"] {
        for variant in variants {
            let (status, echo) = s.get(path, variant).await;
            if path == "/public/x"
                || variant.iter().any(|(name, _)| name.eq_ignore_ascii_case("x-api-key"))
                || variant.len() == 1
            {
                assert_ne!(status, StatusCode::UNAUTHORIZED, "{path} {variant:?}: {echo}");
            }
            let h = &echo["headers"];
            for name in ["authorization", "x-api-key", "x_api_key"] {
                assert!(h.get(name).is_none(), "{path} {variant:?}: {name} reached the upstream: {echo}");
            }
            assert!(!echo.to_string().contains(secret), "{path} {variant:?}: the key reached the upstream");
        }
    }
}

/// HTTP methods are case-sensitive on the wire, but Django and Werkzeug (Flask)
/// upper-case the method before routing, so `post` is `POST` to them. The gateway checks and forwards
/// the upper-case method: `post` gets `POST`'s rule, and the upstream gets `POST`.
#[tokio::test]
async fn a_method_in_any_case_gets_that_methods_rule() {
    let s = setup().await;
    let (reader, _) = s.app.key(s.app.default_org.id, &["read:projects"]).await;
    let (writer, _) = s.app.key(s.app.default_org.id, &["write:projects"]).await;
    for method in ["post", "Post", "pOST", "poSt"] {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        s.assert_refused(method.clone(), &["/projects"], &[("x-api-key", &reader)], NEEDS_SCOPE).await;
        let (status, echo) = s.send(method.clone(), "/projects", &[("x-api-key", &writer)], Body::empty()).await;
        assert_eq!((status, echo["method"].as_str()), (StatusCode::OK, Some("POST")), "{method}: {echo}");
    }
}

/// Express's `method-override`, Rack, Laravel and ASP.NET Core run a request
/// as the method named in `X-HTTP-Method-Override` (or `X-HTTP-Method`, `X-Method-Override`). The
/// header reaches the upstream, so the request needs the rule of every method it names as well.
#[tokio::test]
async fn a_method_override_needs_the_rule_of_the_method_it_names() {
    let s = setup().await;
    let (reader, _) = s.app.key(s.app.default_org.id, &["read:projects"]).await;
    for (name, value) in [
        ("x-http-method-override", "POST"),
        ("X-HTTP-Method-Override", "post"),
        ("x-http-method", "POST"),
        ("x-method-override", " Post "),
        ("X_HTTP_Method_Override", "POST"),
        ("x-http-method-override", "POST, GET"),
        ("x-http-method-override", "GET,post"),
    ] {
        for method in [Method::GET, Method::PUT] {
            let headers = [("x-api-key", reader.as_str()), (name, value)];
            s.assert_refused(method, &["/projects/7"], &headers, NEEDS_SCOPE).await;
        }
    }
    let headers = [("x-api-key", reader.as_str()), ("x-http-method-override", "GET")];
    let (status, echo) = s.send(Method::GET, "/projects/7", &headers, Body::empty()).await;
    assert_eq!(status, StatusCode::OK, "an override to a method the key may use passes: {echo}");
    // The query's `_method` (Symfony, Laravel, Express's `method-override('_method')`) too.
    for uri in ["/projects/7?_method=POST", "/projects/7?a=1&%5Fmethod=post"] {
        assert_eq!(
            refusal(&s.send(Method::GET, uri, &[("x-api-key", reader.as_str())], Body::empty()).await),
            (StatusCode::FORBIDDEN, Some("insufficient_scope")),
            "GET {uri}"
        );
    }
}

/// The upstream may read a path another way than its canonical form. Tomcat,
/// Jetty and Spring drop `;` parameters from every segment (`/projects;x` is `/projects`),
/// Express, ASP.NET Core and IIS match routes without regard to case (`/PROJECTS` is `/projects`),
/// and Rails routes `/projects.json` as `/projects` with a format.
/// A request needs the rule of every such reading that a route matches, so neither dodges a rule.
#[tokio::test]
async fn path_parameters_and_case_do_not_dodge_a_rule() {
    let s = setup().await;
    let (reader, _) = s.app.key(s.app.default_org.id, &["read:projects"]).await;
    let (nobody, _) = s.app.key(s.app.default_org.id, &[]).await;
    let other_readings = [
        "/projects;x",
        "/projects;",
        "/projects;jsessionid=1/7",
        "/;x/projects",
        "/PROJECTS",
        "/Projects/7",
        "/%50ROJECTS;a=b/7",
        "/project%C5%BF",
        "/projects.json",
        "/Projects.xml;x",
        "/projects.",
    ];
    s.assert_refused(Method::POST, &other_readings, &[("x-api-key", &reader)], NEEDS_SCOPE).await;
    s.assert_refused(Method::GET, &other_readings, &[("x-api-key", &nobody)], NEEDS_SCOPE).await;
    // Another reading only ever adds requirements: what passed before still passes.
    for path in ["/public/x", "/public/A;b", "/Public/x", "/public/app.js", "/public.d/x"] {
        let headers: &[(&str, &str)] = if path.starts_with("/public/") { &[] } else { &[("x-api-key", &nobody)] };
        let (status, echo) = s.get(path, headers).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {echo}");
    }
    let (status, echo) = s.get("/Projects;v=2/7", &[("x-api-key", &reader)]).await;
    assert_eq!((status, echo["path"].as_str()), (StatusCode::OK, Some("/Projects;v=2/7")), "{echo}");
}

/// Flask, Express, Rails and Go's `ServeMux` answer `HEAD` with the `GET`
/// handler, so a `GET`-only route's rule holds for `HEAD` too (the handler runs; its headers and
/// side effects are the upstream's answer).
#[tokio::test]
async fn head_needs_the_rule_of_get() {
    let s = setup().await;
    let (nobody, _) = s.app.key(s.app.default_org.id, &[]).await;
    let (reader, _) = s.app.key(s.app.default_org.id, &["read:reports"]).await;
    for method in [Method::HEAD, Method::from_bytes(b"head").unwrap()] {
        let (status, _) = s.send(method.clone(), "/reports/7", &[("x-api-key", &nobody)], Body::empty()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} /reports/7 without read:reports");
        let (status, _) = s.send(method.clone(), "/reports/7", &[("x-api-key", &reader)], Body::empty()).await;
        assert_eq!(status, StatusCode::OK, "{method} /reports/7 with read:reports");
    }
}
