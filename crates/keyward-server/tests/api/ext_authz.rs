//! Envoy ext_authz over gRPC, through a real tonic client built from the same protos, against the
//! service on `127.0.0.1:0`: every field of an allow and of each kind of deny, the health service,
//! and the key in no field of any answer.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use envoy_types::ext_authz::v3::pb::{Address, CheckRequest, CheckResponse, HeaderAppendAction, HttpResponse};
use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap as EnvoyHeaderMap, HeaderValue, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::google::protobuf::value::Kind;
use keyward_core::KeyHash;
use keyward_server::authz::{RouteRule, Routes};
use keyward_server::ext_authz::{self, ExtAuthz, GrpcLimits};
use keyward_store::{KeyLookup, KeyRecord, StoreError, StoreResult};
use serde_json::Value;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{Guard, TestApp, protected_api_routes};

/// Every wait in this file.
const WITHIN: Duration = Duration::from_secs(10);

fn routes() -> Routes {
    Routes::new(protected_api_routes(), RouteRule::default()).unwrap()
}

/// The service of `app` on a port of its own, and a client connected to it. The server stops when
/// the test's runtime does.
async fn serve(app: &TestApp) -> (SocketAddr, Channel) {
    let addr = start(app, GrpcLimits::default(), std::future::pending()).await;
    (addr, connect(addr).await)
}

async fn start(app: &TestApp, limits: GrpcLimits, stop: impl Future<Output = ()> + Send + 'static) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = ExtAuthz::new(app.state.clone(), routes());
    tokio::spawn(ext_authz::serve(listener, service, limits, stop));
    addr
}

async fn connect(addr: SocketAddr) -> Channel {
    let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap().connect_timeout(WITHIN).timeout(WITHIN);
    tokio::time::timeout(WITHIN, endpoint.connect()).await.unwrap().unwrap()
}

/// A `CheckRequest` as Envoy sends one (headers lower-cased in the `headers` map, pseudo-headers
/// among them), from client `ip`.
fn check_request(method: &str, path: &str, headers: &[(&str, &str)], ip: &str) -> CheckRequest {
    let mut map: HashMap<String, String> = headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    map.insert(":method".into(), method.into());
    map.insert(":path".into(), path.into());
    map.insert(":authority".into(), "api.example.com".into());
    let http = HttpRequest {
        method: method.into(),
        path: path.into(),
        host: "api.example.com".into(),
        scheme: "https".into(),
        headers: map,
        ..HttpRequest::default()
    };
    peer_request(http, ip)
}

fn peer_request(http: HttpRequest, ip: &str) -> CheckRequest {
    let socket = SocketAddress { address: ip.into(), ..SocketAddress::default() };
    let source = Peer {
        address: Some(envoy_types::pb::envoy::config::core::v3::Address {
            address: Some(Address::SocketAddress(socket)),
        }),
        ..Peer::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(source),
            request: Some(Request { http: Some(http), ..Request::default() }),
            ..AttributeContext::default()
        }),
    }
}

async fn check(channel: &Channel, request: CheckRequest) -> CheckResponse {
    let mut client = AuthorizationClient::new(channel.clone());
    tokio::time::timeout(WITHIN, client.check(request)).await.unwrap().unwrap().into_inner()
}

fn headers_of(options: &[HeaderValueOption]) -> HashMap<String, String> {
    options
        .iter()
        .map(|o| {
            let h = o.header.as_ref().unwrap();
            assert_eq!(o.append_action, i32::from(HeaderAppendAction::OverwriteIfExistsOrAdd), "{}", h.key);
            (h.key.clone(), h.value.clone())
        })
        .collect()
}

/// A denial as the client would get it: the gRPC code, the HTTP status, the headers and the body.
struct Denied {
    grpc: tonic::Code,
    status: i32,
    headers: HashMap<String, String>,
    body: Value,
}

fn denied(response: &CheckResponse) -> Denied {
    let grpc = tonic::Code::from(response.status.as_ref().unwrap().code);
    assert_ne!(grpc, tonic::Code::Ok);
    assert!(response.dynamic_metadata.is_none());
    match response.http_response.as_ref().unwrap() {
        HttpResponse::DeniedResponse(d) => Denied {
            grpc,
            status: d.status.as_ref().unwrap().code,
            headers: headers_of(&d.headers),
            body: serde_json::from_str(&d.body).unwrap(),
        },
        other => panic!("not denied: {other:?}"),
    }
}

/// Asserts a denial's gRPC code, HTTP status and `error.code`, and gives it back.
fn assert_denied(response: &CheckResponse, grpc: tonic::Code, status: i32, code: &str) -> Denied {
    let d = denied(response);
    assert_eq!((d.grpc, d.status, d.body["error"]["code"].as_str()), (grpc, status, Some(code)), "{:?}", d.body);
    d
}

fn allowed(response: &CheckResponse) -> &envoy_types::ext_authz::v3::pb::OkHttpResponse {
    assert_eq!(response.status.as_ref().unwrap().code, i32::from(tonic::Code::Ok), "{response:?}");
    match response.http_response.as_ref().unwrap() {
        HttpResponse::OkResponse(ok) => ok,
        other => panic!("not allowed: {other:?}"),
    }
}

/// SECURITY: the key is in no field of the answer, in any encoding Debug shows.
fn assert_no_key(response: &CheckResponse, key: &str) {
    assert!(!format!("{response:?}").contains(key), "the key is in {response:?}");
}

#[tokio::test]
async fn an_allowed_request_carries_identity_key_removal_rate_limits_and_metadata() {
    let app = TestApp::sqlite().await;
    let (key, record) = app.owned_key(app.default_org.id, "user-7", &["read:projects"]).await;
    let (_, channel) = serve(&app).await;
    let bearer = format!("Bearer {key}");
    // A forged identity header from the client is overwritten, not joined.
    let request = check_request(
        "GET",
        "/projects/7?page=2",
        &[("authorization", &bearer), ("x-keyward-key-id", "forged"), ("user-agent", "curl/8")],
        "203.0.113.7",
    );
    let response = check(&channel, request).await;
    assert_no_key(&response, &key);
    let ok = allowed(&response);
    let upstream = headers_of(&ok.headers);
    assert_eq!(upstream["x-keyward-key-id"], record.id.to_string());
    assert_eq!(upstream["x-keyward-organization-id"], app.default_org.id.to_string());
    assert_eq!(upstream["x-keyward-owner-id"], "user-7");
    assert_eq!(upstream["x-keyward-environment"], "live");
    assert_eq!(upstream["x-keyward-scopes"], "read:projects");
    assert!(ok.headers_to_remove.contains(&"authorization".to_owned()), "{:?}", ok.headers_to_remove);
    assert!(ok.headers_to_remove.contains(&"x-api-key".to_owned()), "{:?}", ok.headers_to_remove);
    let to_client = headers_of(&ok.response_headers_to_add);
    assert_eq!(to_client["x-ratelimit-limit"], "60");
    assert_eq!(to_client["x-ratelimit-remaining"], "59");
    assert!(to_client["ratelimit"].starts_with("\"minute\";r=59;t="), "{to_client:?}");
    assert!(to_client.contains_key("ratelimit-policy"), "{to_client:?}");
    assert!(ok.query_parameters_to_set.is_empty() && ok.query_parameters_to_remove.is_empty());
    let metadata = &response.dynamic_metadata.as_ref().unwrap().fields;
    let text = |field: &str| match metadata[field].kind.as_ref().unwrap() {
        Kind::StringValue(s) => s.clone(),
        other => panic!("{field}: {other:?}"),
    };
    assert_eq!(text("key_id"), record.id.to_string());
    assert_eq!(text("organization_id"), app.default_org.id.to_string());
    assert_eq!(text("owner_id"), "user-7");
    assert_eq!(text("environment"), "live");
    match metadata["scopes"].kind.as_ref().unwrap() {
        Kind::ListValue(list) => {
            let scopes: Vec<_> = list.values.iter().map(|v| v.kind.clone()).collect();
            assert_eq!(scopes, vec![Some(Kind::StringValue("read:projects".into()))]);
        }
        other => panic!("scopes: {other:?}"),
    }
}

/// SECURITY: Envoy passes every client header on unless the answer sets or removes it, and accepts
/// names with `_` by default (`headers_with_underscores_action: ALLOW`), which CGI, WSGI and Rack read
/// as `-`. Whatever `x-keyward-*` or key header the client sent, in any spelling, is removed unless the
/// answer sets that very name; one it sets is never removed (Envoy removes after it sets).
#[tokio::test]
async fn forged_identity_and_key_headers_in_any_spelling_never_reach_the_upstream() {
    let app = TestApp::sqlite().await;
    let (no_owner, _) = app.key(app.default_org.id, &["read:projects"]).await;
    let (owned, _) = app.owned_key(app.default_org.id, "user-7", &["read:projects"]).await;
    let (_, channel) = serve(&app).await;
    let forged = [
        "x-keyward-owner-id",
        "x_keyward_owner_id",
        "x-keyward_key-id",
        "x_keyward_scopes",
        "x-keyward-identity",
        "x-keyward",
        "x-keyward-anything",
        "x_api_key",
    ];
    for (key, path) in [(&no_owner, "/projects/1"), (&owned, "/projects/1"), (&no_owner, "/public/x")] {
        let bearer = format!("Bearer {key}");
        let mut headers: Vec<(&str, &str)> = forged.iter().map(|name| (*name, "forged")).collect();
        headers.push(("authorization", &bearer));
        let response = check(&channel, check_request("GET", path, &headers, "192.0.2.1")).await;
        let ok = allowed(&response);
        let set = headers_of(&ok.headers);
        for name in forged.iter().chain(&["authorization"]) {
            let removed = ok.headers_to_remove.iter().any(|r| r == name);
            assert!(
                removed != set.contains_key(*name),
                "{path} {name}: set {set:?}, removed {:?}",
                ok.headers_to_remove
            );
        }
        assert!(set.values().all(|v| v != "forged"), "{set:?}");
    }
}

/// `x-api-key`, and Envoy's `header_map` (sent with `encode_raw_headers: true`, values as bytes).
#[tokio::test]
async fn the_key_is_read_from_x_api_key_and_from_raw_header_maps() {
    let app = TestApp::sqlite().await;
    let (key, record) = app.key(app.default_org.id, &["read:projects"]).await;
    let (_, channel) = serve(&app).await;
    let response = check(&channel, check_request("GET", "/projects", &[("x-api-key", &key)], "192.0.2.1")).await;
    assert_eq!(headers_of(&allowed(&response).headers)["x-keyward-key-id"], record.id.to_string());
    let raw = HttpRequest {
        method: "GET".into(),
        path: "/projects".into(),
        header_map: Some(EnvoyHeaderMap {
            headers: vec![
                HeaderValue { key: ":path".into(), raw_value: b"/projects".to_vec(), ..HeaderValue::default() },
                HeaderValue { key: "x-api-key".into(), raw_value: key.as_bytes().to_vec(), ..HeaderValue::default() },
            ],
        }),
        ..HttpRequest::default()
    };
    let response = check(&channel, peer_request(raw, "192.0.2.1")).await;
    assert_no_key(&response, &key);
    assert_eq!(headers_of(&allowed(&response).headers)["x-keyward-key-id"], record.id.to_string());
}

#[tokio::test]
async fn missing_malformed_unknown_and_revoked_keys_are_401_unauthenticated() {
    let app = TestApp::sqlite().await;
    let (revoked, _) = app.revoked_key(app.default_org.id).await;
    let unknown =
        keyward_core::PlainKey::generate(&keyward_core::KeyPrefix::default(), keyward_core::Environment::Live)
            .unwrap()
            .expose_secret()
            .to_owned();
    let (_, channel) = serve(&app).await;
    for (presented, code) in [
        (None, "missing_credentials"),
        (Some("sk_live_nope"), "malformed_key"),
        (Some(unknown.as_str()), "unknown_key"),
        (Some(revoked.as_str()), "key_revoked"),
    ] {
        let bearer = presented.map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> = bearer.iter().map(|b| ("authorization", b.as_str())).collect();
        let response = check(&channel, check_request("GET", "/projects", &headers, "192.0.2.1")).await;
        if let Some(k) = presented {
            assert_no_key(&response, k);
        }
        let d = assert_denied(&response, tonic::Code::Unauthenticated, 401, code);
        assert!(d.headers.get("content-type").is_some_and(|c| c.starts_with("application/json")), "{:?}", d.headers);
    }
}

/// Route scopes match the normalized path: no spelling of `/projects` escapes its rule, and a path
/// with no single safe reading is refused.
#[tokio::test]
async fn route_scopes_apply_on_the_normalized_path_and_a_wrong_scope_is_403() {
    let app = TestApp::sqlite().await;
    let (reader, _) = app.key(app.default_org.id, &["read:projects"]).await;
    let (other, _) = app.key(app.default_org.id, &["read:reports"]).await;
    let (_, channel) = serve(&app).await;
    let ask = |method: &'static str, path: &'static str, key: &str| {
        let bearer = format!("Bearer {key}");
        let channel = channel.clone();
        async move { check(&channel, check_request(method, path, &[("authorization", &bearer)], "192.0.2.1")).await }
    };
    for path in ["/projects/7", "/projects//7", "/%70rojects/7", "/./projects"] {
        assert_denied(&ask("GET", path, &other).await, tonic::Code::PermissionDenied, 403, "insufficient_scope");
        allowed(&ask("GET", path, &reader).await);
    }
    // The POST rule needs `write:projects`.
    assert_denied(&ask("POST", "/projects", &reader).await, tonic::Code::PermissionDenied, 403, "insufficient_scope");
    // Public paths need no key; a path with an encoded slash has no single reading.
    let public = check(&channel, check_request("GET", "/public/docs", &[], "192.0.2.1")).await;
    assert!(allowed(&public).headers.is_empty());
    assert_denied(&ask("GET", "/projects%2F7", &reader).await, tonic::Code::InvalidArgument, 400, "invalid_path");
    // Envoy forwards the path it checked: without `normalize_path` and `merge_slashes` that is the
    // client's, and a `..` or a leading `//` has no single reading (`NormalizedPath::parse_as_sent`).
    for path in ["//projects/7", "/x/../projects/7", "/projects/../public", "//public/projects"] {
        assert_denied(&ask("GET", path, &reader).await, tonic::Code::InvalidArgument, 400, "invalid_path");
    }
}

/// The client IP is the peer Envoy saw (`attributes.source.address`), checked against the key's
/// allow-list.
#[tokio::test]
async fn the_source_address_is_the_client_ip_for_the_allow_list() {
    let app = TestApp::sqlite().await;
    let key = app.walled_key(app.default_org.id, "10.0.0.0/8").await;
    let (_, channel) = serve(&app).await;
    let bearer = format!("Bearer {key}");
    let inside = check(&channel, check_request("GET", "/x", &[("authorization", &bearer)], "10.1.2.3")).await;
    allowed(&inside);
    let outside = check(
        &channel,
        check_request("GET", "/x", &[("authorization", &bearer), ("x-forwarded-for", "10.1.2.3")], "192.0.2.1"),
    )
    .await;
    assert_denied(&outside, tonic::Code::PermissionDenied, 403, "ip_not_allowed");
}

#[tokio::test]
async fn the_61st_check_in_a_minute_is_429_with_retry_after_and_rate_limit_headers() {
    let app = TestApp::sqlite().await;
    let (key, _) = app.key(app.default_org.id, &[]).await;
    let (_, channel) = serve(&app).await;
    let bearer = format!("Bearer {key}");
    for i in 0..60 {
        let r = check(&channel, check_request("GET", "/x", &[("authorization", &bearer)], "192.0.2.1")).await;
        assert_eq!(r.status.as_ref().unwrap().code, 0, "check {}", i + 1);
    }
    let response = check(&channel, check_request("GET", "/x", &[("authorization", &bearer)], "192.0.2.1")).await;
    assert_no_key(&response, &key);
    let d = assert_denied(&response, tonic::Code::ResourceExhausted, 429, "rate_limited");
    assert_eq!(d.headers["retry-after"], "1");
    assert_eq!(d.headers["x-ratelimit-remaining"], "0");
    assert_eq!(d.headers["x-ratelimit-limit"], "60");
    assert!(d.headers.contains_key("ratelimit-policy"), "{:?}", d.headers);
}

/// Lookups that fail as a store that cannot be reached fails.
#[derive(Debug)]
struct DeadStore;

#[async_trait]
impl KeyLookup for DeadStore {
    async fn find_key_record(&self, _: &KeyHash) -> StoreResult<Option<Arc<KeyRecord>>> {
        Err(StoreError::Unavailable("the test's store is down".into()))
    }

    async fn ping(&self) -> StoreResult<()> {
        Err(StoreError::Unavailable("the test's store is down".into()))
    }
}

/// A key the cache does not hold, with the store down: 503 `store_unavailable`, `UNAVAILABLE`.
#[tokio::test]
async fn a_store_that_cannot_answer_is_503_unavailable() {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keyward.db").display());
    let store = keyward_store::open(&url, true).await.unwrap();
    let app = TestApp::with_lookup(store, Arc::new(DeadStore), Guard::Dir(dir)).await;
    let (key, _) = app.key(app.default_org.id, &[]).await;
    let (_, channel) = serve(&app).await;
    let response = check(&channel, check_request("GET", "/x", &[("x-api-key", &key)], "192.0.2.1")).await;
    assert_no_key(&response, &key);
    assert_denied(&response, tonic::Code::Unavailable, 503, "store_unavailable");
}

/// `grpc.health.v1`: the node and the Authorization service are `SERVING` until the shutdown signal.
#[tokio::test]
async fn health_is_serving_until_shutdown_and_the_listener_then_closes() {
    let app = TestApp::sqlite().await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let addr = start(&app, GrpcLimits::default(), async move {
        let _ = stop_rx.await;
    })
    .await;
    let channel = connect(addr).await;
    let mut health = HealthClient::new(channel);
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let r =
            tokio::time::timeout(WITHIN, health.check(HealthCheckRequest { service: service.into() })).await.unwrap();
        assert_eq!(r.unwrap().into_inner().status(), ServingStatus::Serving, "{service:?}");
    }
    stop_tx.send(()).unwrap();
    // The listener closes: a new connection is refused within the wait.
    tokio::time::timeout(WITHIN, async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
}

/// A `CheckRequest` past the size limit is refused before it is decoded (`OUT_OF_RANGE`: a gRPC
/// error, which Envoy's `failure_mode_allow` decides about).
#[tokio::test]
async fn an_oversized_check_request_is_refused() {
    let app = TestApp::sqlite().await;
    let (_, channel) = serve(&app).await;
    let huge = "a".repeat(ext_authz::MAX_REQUEST_BYTES);
    let mut client = AuthorizationClient::new(channel);
    let r = tokio::time::timeout(WITHIN, client.check(check_request("GET", "/x", &[("x-big", &huge)], "192.0.2.1")))
        .await
        .unwrap();
    assert_eq!(r.unwrap_err().code(), tonic::Code::OutOfRange);
}

/// A header map holds at most 32,768 names (and grows its table past 24,576): a check inside the size
/// bound with more names than that is refused (413), not a panic in the call; never decided on a
/// partial map, where a method override past the cut would go unread.
#[tokio::test]
async fn a_check_with_more_headers_than_a_map_holds_is_refused() {
    let app = TestApp::sqlite().await;
    let (key, _) = app.key(app.default_org.id, &[]).await;
    let (_, channel) = serve(&app).await;
    const DIGITS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut headers: Vec<HeaderValue> = (0..30_000usize)
        .map(|i| {
            let name = [DIGITS[i / 1296 % 26], DIGITS[i / 36 % 36], DIGITS[i % 36]];
            HeaderValue { key: String::from_utf8(name.to_vec()).unwrap(), ..HeaderValue::default() }
        })
        .collect();
    headers.push(HeaderValue { key: "x-api-key".into(), raw_value: key.into_bytes(), ..HeaderValue::default() });
    headers.push(HeaderValue {
        key: "x-http-method-override".into(),
        raw_value: b"POST".to_vec(),
        ..HeaderValue::default()
    });
    let http = HttpRequest {
        method: "GET".into(),
        path: "/projects".into(),
        header_map: Some(EnvoyHeaderMap { headers }),
        ..HttpRequest::default()
    };
    let response = check(&channel, peer_request(http, "192.0.2.1")).await;
    assert_denied(&response, tonic::Code::InvalidArgument, 413, "payload_too_large");
}

/// Past `max_connections`, a new connection waits in the backlog until one closes: a client that
/// connects and sends nothing holds one connection, never the listener.
#[tokio::test]
async fn past_the_connection_cap_a_new_connection_waits_until_one_closes() {
    let app = TestApp::sqlite().await;
    let addr = start(&app, GrpcLimits { max_connections: 1, ..GrpcLimits::default() }, std::future::pending()).await;
    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap().timeout(WITHIN);
    let mut health = HealthClient::new(endpoint.connect_lazy());
    let call = tokio::spawn(async move { health.check(HealthCheckRequest { service: String::new() }).await });
    // The call cannot be served while the silent connection holds the only permit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!call.is_finished());
    drop(silent);
    let answer = tokio::time::timeout(WITHIN, call).await.unwrap().unwrap().unwrap();
    assert_eq!(answer.into_inner().status(), ServingStatus::Serving);
}

/// A connection that sends no HTTP/2 preface, or only part of it, is closed after `preface_timeout`,
/// so silent connections cannot hold the listener's every permit: with a cap of one, a real client
/// is served once the silent one is cut off.
#[tokio::test]
async fn a_connection_without_its_preface_in_time_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::sqlite().await;
    let limits =
        GrpcLimits { max_connections: 1, preface_timeout: Duration::from_millis(300), ..GrpcLimits::default() };
    let addr = start(&app, limits, std::future::pending()).await;
    for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(sent).await.unwrap();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(WITHIN, async {
            loop {
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{sent:?}: still open after {WITHIN:?}");
        let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap().timeout(WITHIN);
        let mut health = HealthClient::new(endpoint.connect_lazy());
        let answer = tokio::time::timeout(WITHIN, health.check(HealthCheckRequest { service: String::new() }))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer.into_inner().status(), ServingStatus::Serving);
    }
}

/// A raw HTTP/2 connection to the listener, for what a well-behaved gRPC client never sends.
async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<axum::body::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = tokio::time::timeout(WITHIN, h2::client::handshake(tcp)).await.unwrap().unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
}

/// Opens a gRPC call to `path` with `headers` on top of gRPC's own, its message still to send.
async fn open_call(
    sender: &h2::client::SendRequest<axum::body::Bytes>,
    path: &str,
    headers: &[(&str, &str)],
) -> (h2::client::ResponseFuture, h2::SendStream<axum::body::Bytes>) {
    let mut request = axum::http::Request::post(format!("http://keyward{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut sender = tokio::time::timeout(WITHIN, sender.clone().ready()).await.unwrap().unwrap();
    sender.send_request(request.body(()).unwrap(), false).unwrap()
}

/// A message with its 5-byte gRPC prefix.
fn grpc_frame(compressed: u8, message: &[u8]) -> axum::body::Bytes {
    let mut frame = vec![compressed];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(message);
    frame.into()
}

/// An answer's `grpc-status` (from its headers when it has no message, else from its trailers) and
/// the bytes of its body.
async fn grpc_answer(response: h2::client::ResponseFuture) -> (i32, Vec<u8>) {
    let status = |headers: &axum::http::HeaderMap| -> Option<i32> {
        headers.get("grpc-status").map(|s| s.to_str().unwrap().parse().unwrap())
    };
    let response = tokio::time::timeout(WITHIN, response).await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    if let Some(code) = status(response.headers()) {
        return (code, Vec::new());
    }
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = tokio::time::timeout(WITHIN, body.data()).await.unwrap() {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        data.extend_from_slice(&chunk);
    }
    let trailers = tokio::time::timeout(WITHIN, body.trailers()).await.unwrap().unwrap().unwrap();
    (status(&trailers).unwrap(), data)
}

/// Returns once `addr` refuses connections: its listener is closed.
async fn until_refused(addr: SocketAddr) {
    let mut every = tokio::time::interval(Duration::from_millis(10));
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        every.tick().await;
    }
}

const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// gRPC's error semantics, as tonic answers them: an unknown method is `UNIMPLEMENTED`, a message
/// that is not a `CheckRequest` or is missing `INTERNAL`, a compressed one `INTERNAL` without a
/// `grpc-encoding` and `UNIMPLEMENTED` with one, a length past the limit `OUT_OF_RANGE` before the
/// message is read.
#[tokio::test]
async fn bad_calls_get_the_grpc_status_tonic_gives_them() {
    let app = TestApp::sqlite().await;
    let (addr, _) = serve(&app).await;
    let sender = h2_client(addr).await;
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<axum::body::Bytes>, tonic::Code);
    let cases: [Case; 7] = [
        ("/envoy.service.auth.v3.Authorization/Nope", &[], Some(grpc_frame(0, b"")), tonic::Code::Unimplemented),
        ("/nope", &[], Some(grpc_frame(0, b"")), tonic::Code::Unimplemented),
        (CHECK, &[], Some(grpc_frame(0, b"\x0a\xff\xff\xff")), tonic::Code::Internal),
        (CHECK, &[], None, tonic::Code::Internal),
        (CHECK, &[], Some(grpc_frame(0, b"\x0a\x00")[..4].to_vec().into()), tonic::Code::Internal),
        (CHECK, &[], Some(grpc_frame(1, b"\x0a\x00")), tonic::Code::Internal),
        (CHECK, &[("grpc-encoding", "gzip")], Some(grpc_frame(1, b"\x0a\x00")), tonic::Code::Unimplemented),
    ];
    for (path, headers, body, code) in cases {
        let (response, mut stream) = open_call(&sender, path, headers).await;
        match body {
            Some(body) => stream.send_data(body, true).unwrap(),
            None => stream.send_trailers(axum::http::HeaderMap::new()).unwrap(),
        }
        assert_eq!(grpc_answer(response).await.0, i32::from(code), "{path} {headers:?}");
    }
    // Only the prefix of a message too large is read: the answer comes before the rest is sent.
    let (response, mut stream) = open_call(&sender, CHECK, &[]).await;
    let length = u32::try_from(ext_authz::MAX_REQUEST_BYTES + 1).unwrap().to_be_bytes();
    stream.send_data(vec![0, length[0], length[1], length[2], length[3]].into(), false).unwrap();
    assert_eq!(grpc_answer(response).await.0, i32::from(tonic::Code::OutOfRange));
    // The connection still serves.
    let (response, mut stream) = open_call(&sender, HEALTH_CHECK, &[]).await;
    stream.send_data(grpc_frame(0, b""), true).unwrap();
    assert_eq!(grpc_answer(response).await, (0, grpc_frame(0, &[0x08, 1]).to_vec()));
}

/// A call whose message does not arrive, or trickles, is cut off at `call_timeout` with
/// `DEADLINE_EXCEEDED`; a client's shorter `grpc-timeout` cuts it off sooner.
#[tokio::test]
async fn a_message_that_does_not_arrive_in_time_is_deadline_exceeded() {
    let app = TestApp::sqlite().await;
    let limits = GrpcLimits { call_timeout: Duration::from_millis(300), ..GrpcLimits::default() };
    let addr = start(&app, limits, std::future::pending()).await;
    let sender = h2_client(addr).await;
    let (silent, _silent_stream) = open_call(&sender, CHECK, &[]).await;
    let (trickled, mut trickled_stream) = open_call(&sender, CHECK, &[]).await;
    trickled_stream.send_data(vec![0, 0, 0].into(), false).unwrap();
    let started = std::time::Instant::now();
    for response in [silent, trickled] {
        assert_eq!(grpc_answer(response).await.0, i32::from(tonic::Code::DeadlineExceeded));
    }
    assert!(started.elapsed() < WITHIN);
    // The client's own deadline, shorter than the server's.
    let limits = GrpcLimits { call_timeout: WITHIN * 10, ..GrpcLimits::default() };
    let addr = start(&app, limits, std::future::pending()).await;
    let sender = h2_client(addr).await;
    let (response, _stream) = open_call(&sender, CHECK, &[("grpc-timeout", "200m")]).await;
    assert_eq!(grpc_answer(response).await.0, i32::from(tonic::Code::DeadlineExceeded));
}

/// The streams a connection may open at once are announced in the server's SETTINGS (h2 refuses
/// more).
#[tokio::test]
async fn the_streams_per_connection_are_capped() {
    let app = TestApp::sqlite().await;
    let limits = GrpcLimits { max_streams_per_connection: 2, ..GrpcLimits::default() };
    let addr = start(&app, limits, std::future::pending()).await;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (_sender, mut connection) = tokio::time::timeout(WITHIN, h2::client::handshake(tcp)).await.unwrap().unwrap();
    let announced = std::future::poll_fn(|cx| {
        let closed = std::pin::Pin::new(&mut connection).poll(cx);
        match connection.max_concurrent_send_streams() {
            2 => std::task::Poll::Ready(true),
            _ if closed.is_ready() => std::task::Poll::Ready(false),
            _ => std::task::Poll::Pending,
        }
    });
    assert!(tokio::time::timeout(WITHIN, announced).await.unwrap());
}

/// A peer that answers no ping is dropped once a ping goes unanswered for `call_timeout`: a
/// connection whose peer vanished does not hold one of `max_connections`.
#[tokio::test]
async fn a_peer_that_answers_no_ping_is_dropped() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::sqlite().await;
    let limits = GrpcLimits {
        keepalive: Duration::from_millis(100),
        call_timeout: Duration::from_millis(200),
        ..GrpcLimits::default()
    };
    let addr = start(&app, limits, std::future::pending()).await;
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The preface and an empty SETTINGS frame; then nothing, not even a PING's answer.
    client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
    // What the server sends is read and thrown away until it closes (or resets) the connection.
    let closed = tokio::time::timeout(WITHIN, tokio::io::copy(&mut client, &mut tokio::io::sink())).await;
    assert!(closed.is_ok(), "still open after {WITHIN:?}");
}

/// `Health/Watch` streams the status: `SERVING`, then `NOT_SERVING` once shutdown begins; an unknown
/// service is `SERVICE_UNKNOWN` on `Watch` and `NOT_FOUND` on `Check`.
#[tokio::test]
async fn health_watch_streams_the_status_until_shutdown() {
    let app = TestApp::sqlite().await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move { stop_rx.await.unwrap_or_default() };
    let mut health = HealthClient::new(connect(start(&app, GrpcLimits::default(), stop).await).await);
    let unknown = tokio::time::timeout(WITHIN, health.check(HealthCheckRequest { service: "nope".into() })).await;
    assert_eq!(unknown.unwrap().unwrap_err().code(), tonic::Code::NotFound);
    let mut streams = Vec::new();
    for (service, status) in [("nope", ServingStatus::ServiceUnknown), ("", ServingStatus::Serving)] {
        let request = HealthCheckRequest { service: service.into() };
        let mut stream = tokio::time::timeout(WITHIN, health.watch(request)).await.unwrap().unwrap().into_inner();
        let first = tokio::time::timeout(WITHIN, stream.message()).await.unwrap().unwrap().unwrap();
        assert_eq!(first.status(), status, "{service:?}");
        streams.push(stream);
    }
    let mut watch = streams.pop().unwrap();
    stop_tx.send(()).unwrap();
    let next = tokio::time::timeout(WITHIN, watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    let end = tokio::time::timeout(WITHIN, watch.message()).await.unwrap();
    assert_eq!(end.unwrap_err().code(), tonic::Code::Unavailable);
}

/// On shutdown a call in flight is still answered (the listener is closed by then); one still open
/// after `shutdown_grace` is dropped, and `serve` returns.
#[tokio::test]
async fn shutdown_answers_calls_in_flight_and_drops_them_after_the_grace() {
    let app = TestApp::sqlite().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let limits = GrpcLimits { shutdown_grace: Duration::from_millis(500), ..GrpcLimits::default() };
    let served = tokio::spawn(ext_authz::serve(listener, ExtAuthz::new(app.state.clone(), routes()), limits, async {
        let _ = stop_rx.await;
    }));
    let sender = h2_client(addr).await;
    let (in_flight, mut in_flight_stream) = open_call(&sender, HEALTH_CHECK, &[]).await;
    let (stalled, _stalled_stream) = open_call(&sender, HEALTH_CHECK, &[]).await;
    // Both calls are open at the server before the signal (a round trip on the same connection).
    let (response, mut stream) = open_call(&sender, HEALTH_CHECK, &[]).await;
    stream.send_data(grpc_frame(0, b""), true).unwrap();
    assert_eq!(grpc_answer(response).await.0, 0);
    stop_tx.send(()).unwrap();
    tokio::time::timeout(WITHIN, until_refused(addr)).await.unwrap();
    in_flight_stream.send_data(grpc_frame(0, b""), true).unwrap();
    // NOT_SERVING: the node is shutting down.
    assert_eq!(grpc_answer(in_flight).await, (0, grpc_frame(0, &[0x08, 2]).to_vec()));
    tokio::time::timeout(WITHIN, served).await.unwrap().unwrap().unwrap();
    let dropped = tokio::time::timeout(WITHIN, stalled).await.unwrap();
    assert!(dropped.is_err(), "{dropped:?}");
}

/// Lookups that never answer, counting those in flight: a store too slow for the calls at hand.
#[derive(Debug)]
struct StuckStore(Arc<std::sync::atomic::AtomicUsize>);

/// One lookup in flight, counted until its future is dropped.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait]
impl KeyLookup for StuckStore {
    async fn find_key_record(&self, _: &KeyHash) -> StoreResult<Option<Arc<KeyRecord>>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _in_flight = InFlight(self.0.clone());
        std::future::pending().await
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}

/// Returns once `ready` holds, polling every few milliseconds; `false` if it did not within `WITHIN`.
async fn until(ready: impl Fn() -> bool) -> bool {
    let polled = tokio::time::timeout(WITHIN, async {
        while !ready() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    polled.await.is_ok()
}

/// A call the client resets stops at once, its work dropped, as hyper dropped the handler of a
/// reset stream. h2 stops counting a stream against `max_streams_per_connection` once the client
/// resets it, so otherwise a client opening and resetting calls in a loop ("rapid reset",
/// CVE-2023-44487) keeps more store lookups running than the cap allows, each until `call_timeout`
/// (or the cache's lookup timeout) ends it.
#[tokio::test]
async fn a_call_the_client_resets_stops_its_work_at_once() {
    use prost::Message;
    use std::sync::atomic::Ordering::SeqCst;
    let app = TestApp::sqlite().await;
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Lookups that hang for longer than the test runs: only the call's end can drop one.
    let mut cache = crate::helpers::settings().cache;
    cache.lookup_timeout_ms = 3_600_000;
    let lookup = Arc::new(StuckStore(in_flight.clone()));
    let keys = keyward_server::cache::CachedLookup::new(
        lookup,
        keyward_server::cache::KeyCache::new(cache),
        Arc::new(app.clock.clone()),
    );
    let state = app.state.to_builder().keys(keys).build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = GrpcLimits { max_streams_per_connection: 2, call_timeout: WITHIN * 10, ..GrpcLimits::default() };
    tokio::spawn(ext_authz::serve(listener, ExtAuthz::new(state, routes()), limits, std::future::pending()));
    let sender = h2_client(addr).await;
    for reset in 1..=4 {
        // A key of its own each time: lookups of one hash may be shared.
        let (key, _) = app.key(app.default_org.id, &[]).await;
        let message = check_request("GET", "/x", &[("x-api-key", &key)], "192.0.2.1").encode_to_vec();
        let (_response, mut stream) = open_call(&sender, CHECK, &[]).await;
        stream.send_data(grpc_frame(0, &message), true).unwrap();
        assert!(until(|| in_flight.load(SeqCst) >= 1).await, "the lookup of call {reset} never began");
        stream.send_reset(h2::Reason::CANCEL);
        let stopped = until(|| in_flight.load(SeqCst) == 0).await;
        assert!(stopped, "{} lookups of reset calls still run after {reset} resets", in_flight.load(SeqCst));
    }
}

/// Messages held back a byte short of whole are capped per connection: past a few MiB of them a
/// call is refused with `RESOURCE_EXHAUSTED` at once, instead of every stream of the connection
/// holding up to `MAX_REQUEST_BYTES` until `call_timeout` (what is received is released to the
/// client's window at once, so flow control does not bound it).
#[tokio::test]
async fn incomplete_messages_are_capped_per_connection() {
    let app = TestApp::sqlite().await;
    let limits = GrpcLimits { call_timeout: WITHIN * 10, ..GrpcLimits::default() };
    let addr = start(&app, limits, std::future::pending()).await;
    let sender = h2_client(addr).await;
    let announced = u32::try_from(ext_authz::MAX_REQUEST_BYTES).unwrap().to_be_bytes();
    let mut held = vec![0, announced[0], announced[1], announced[2], announced[3]];
    held.resize(ext_authz::MAX_REQUEST_BYTES, 0);
    let held = axum::body::Bytes::from(held);
    let (mut calls, mut streams) = (tokio::task::JoinSet::new(), Vec::new());
    // 64 such calls would hold 16 MiB.
    for _ in 0..64 {
        let (response, mut stream) = open_call(&sender, CHECK, &[]).await;
        stream.send_data(held.clone(), false).unwrap();
        calls.spawn(grpc_answer(response));
        streams.push(stream);
    }
    let refused = tokio::time::timeout(WITHIN, calls.join_next()).await.expect("no call refused");
    assert_eq!(refused.unwrap().unwrap().0, i32::from(tonic::Code::ResourceExhausted));
    // Other connections are served meanwhile.
    let (response, mut stream) = open_call(&h2_client(addr).await, HEALTH_CHECK, &[]).await;
    stream.send_data(grpc_frame(0, b""), true).unwrap();
    assert_eq!(grpc_answer(response).await.0, 0);
}

/// Past `max_in_flight` calls open over all connections, a call is `RESOURCE_EXHAUSTED` at once, on
/// any connection: calls waiting for their message no longer hold memory bounded only by connections
/// x streams. One that ends makes room.
#[tokio::test]
async fn past_the_in_flight_cap_calls_are_resource_exhausted_on_every_connection() {
    let app = TestApp::sqlite().await;
    let limits = GrpcLimits { max_in_flight: 2, call_timeout: WITHIN * 10, ..GrpcLimits::default() };
    let addr = start(&app, limits, std::future::pending()).await;
    let holder = h2_client(addr).await;
    let (first, mut first_stream) = open_call(&holder, HEALTH_CHECK, &[]).await;
    let (_second, _second_stream) = open_call(&holder, HEALTH_CHECK, &[]).await;
    // A third call on the same connection comes after the two (streams are accepted in order).
    let (third, mut third_stream) = open_call(&holder, HEALTH_CHECK, &[]).await;
    third_stream.send_data(grpc_frame(0, b""), true).unwrap();
    assert_eq!(grpc_answer(third).await.0, i32::from(tonic::Code::ResourceExhausted));
    let other = h2_client(addr).await;
    let (response, mut stream) = open_call(&other, HEALTH_CHECK, &[]).await;
    stream.send_data(grpc_frame(0, b""), true).unwrap();
    assert_eq!(grpc_answer(response).await.0, i32::from(tonic::Code::ResourceExhausted));
    // The first call gets its message and is answered: its place is free once the answer is out.
    first_stream.send_data(grpc_frame(0, b""), true).unwrap();
    assert_eq!(grpc_answer(first).await.0, 0);
    let (response, mut stream) = open_call(&other, HEALTH_CHECK, &[]).await;
    stream.send_data(grpc_frame(0, b""), true).unwrap();
    assert_eq!(grpc_answer(response).await.0, 0);
}

/// An answer a client does not take (its flow-control window stays at 0) keeps its call open and
/// counted until the call's deadline, which resets it; it is not left in the connection's buffers
/// uncounted for as long as the connection lives.
#[tokio::test]
async fn an_answer_the_client_does_not_read_is_counted_and_reset_at_the_deadline() {
    let app = TestApp::sqlite().await;
    let limits = GrpcLimits { max_in_flight: 1, call_timeout: Duration::from_millis(500), ..GrpcLimits::default() };
    let addr = start(&app, limits, std::future::pending()).await;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let handshake = h2::client::Builder::new().initial_window_size(0).handshake::<_, axum::body::Bytes>(tcp);
    let (stuck, connection) = tokio::time::timeout(WITHIN, handshake).await.unwrap().unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let (response, mut stream) = open_call(&stuck, HEALTH_CHECK, &[]).await;
    stream.send_data(grpc_frame(0, b""), true).unwrap();
    // The answer's headers arrive; its message cannot.
    let response = tokio::time::timeout(WITHIN, response).await.unwrap().unwrap();
    assert!(response.headers().get("grpc-status").is_none(), "{response:?}");
    let other = h2_client(addr).await;
    let (refused, mut refused_stream) = open_call(&other, HEALTH_CHECK, &[]).await;
    refused_stream.send_data(grpc_frame(0, b""), true).unwrap();
    assert_eq!(grpc_answer(refused).await.0, i32::from(tonic::Code::ResourceExhausted));
    // At the deadline the held answer is reset, and the place is free.
    let mut body = response.into_body();
    let end = tokio::time::timeout(WITHIN, body.data()).await.unwrap();
    assert!(matches!(end, Some(Err(ref e)) if e.reason() == Some(h2::Reason::CANCEL)), "{end:?}");
    let (response, mut stream) = open_call(&other, HEALTH_CHECK, &[]).await;
    stream.send_data(grpc_frame(0, b""), true).unwrap();
    assert_eq!(grpc_answer(response).await.0, 0);
}

/// A `Health/Watch` stream is counted in flight only until its first answer is out: it stays open
/// until shutdown, so a few watchers (one per client, as grpc-go's client-side health checking
/// keeps) would otherwise hold every place for good and every `Check` after them would be
/// `RESOURCE_EXHAUSTED`.
#[tokio::test]
async fn a_health_watch_does_not_hold_its_place_in_flight_for_good() {
    let app = TestApp::sqlite().await;
    let limits = GrpcLimits { max_in_flight: 1, call_timeout: WITHIN * 10, ..GrpcLimits::default() };
    let addr = start(&app, limits, std::future::pending()).await;
    let mut health = HealthClient::new(connect(addr).await);
    let watch = tokio::time::timeout(WITHIN, health.watch(HealthCheckRequest { service: String::new() })).await;
    let mut watch = watch.unwrap().unwrap().into_inner();
    let first = tokio::time::timeout(WITHIN, watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    // The watch is still open; a call on another connection is served.
    let (response, mut stream) = open_call(&h2_client(addr).await, HEALTH_CHECK, &[]).await;
    stream.send_data(grpc_frame(0, b""), true).unwrap();
    assert_eq!(grpc_answer(response).await.0, 0);
    drop(watch);
}

/// SECURITY: an owner id is free text, up to 255 characters of anything. One a header cannot carry
/// (CR, LF, NUL, other controls) is left out of the answer, the client's forged `x-keyward-owner-id`
/// is removed instead, and no header value of the answer holds a byte Envoy refuses or splits on.
#[tokio::test]
async fn an_owner_id_a_header_cannot_carry_never_splits_or_forges_one() {
    let app = TestApp::sqlite().await;
    let (_, channel) = serve(&app).await;
    for owner in ["a\r\nx-keyward-scopes: *", "a\nb", "a\rb", "nul\0", "bell\x07", "del\x7f"] {
        let (key, _) = app.owned_key(app.default_org.id, owner, &["read:projects"]).await;
        let bearer = format!("Bearer {key}");
        let headers = [("authorization", bearer.as_str()), ("x-keyward-owner-id", "forged")];
        let response = check(&channel, check_request("GET", "/projects/1", &headers, "192.0.2.1")).await;
        assert_no_key(&response, &key);
        let ok = allowed(&response);
        assert!(!headers_of(&ok.headers).contains_key("x-keyward-owner-id"), "{owner:?}: {ok:?}");
        assert!(ok.headers_to_remove.iter().any(|h| h == "x-keyward-owner-id"), "{owner:?}: {ok:?}");
        for option in ok.headers.iter().chain(&ok.response_headers_to_add) {
            let value = &option.header.as_ref().unwrap().value;
            assert!(!value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f), "{owner:?}: {value:?}");
        }
        let metadata = &response.dynamic_metadata.as_ref().unwrap().fields;
        assert!(!metadata.contains_key("owner_id"), "{owner:?}: {metadata:?}");
    }
}

/// An owner id in any script, with quotes and a tab, reaches the upstream as it is, and the same
/// in the identity metadata: the two are read from the same headers and never disagree.
#[tokio::test]
async fn an_owner_id_in_any_script_is_in_the_header_and_the_metadata_alike() {
    let app = TestApp::sqlite().await;
    let (_, channel) = serve(&app).await;
    // The helper names the key after its owner, and a name is at most 200 characters.
    let long = "\u{e9}".repeat(190);
    for owner in ["caf\u{e9}", "\"\u{1F511}\"\t'x'", "\u{7528}\u{6237}-7", long.as_str()] {
        let (key, _) = app.owned_key(app.default_org.id, owner, &["read:projects"]).await;
        let bearer = format!("Bearer {key}");
        let response =
            check(&channel, check_request("GET", "/projects/1", &[("authorization", &bearer)], "192.0.2.1")).await;
        let ok = allowed(&response);
        assert_eq!(headers_of(&ok.headers)["x-keyward-owner-id"], owner);
        let metadata = &response.dynamic_metadata.as_ref().unwrap().fields;
        let in_metadata = metadata.get("owner_id").and_then(|v| v.kind.clone());
        assert_eq!(in_metadata, Some(Kind::StringValue(owner.to_owned())), "{owner:?}");
    }
}

/// Every way a call can end gives its in-flight place back: a reset stream, a message that never
/// comes (`DEADLINE_EXCEEDED`), a connection dropped with calls open, a refusal at the cap. After
/// each, `max_in_flight` calls can be open at once again.
#[tokio::test]
async fn every_way_a_call_ends_gives_its_in_flight_place_back() {
    let app = TestApp::sqlite().await;
    let limits = GrpcLimits { max_in_flight: 2, call_timeout: WITHIN * 10, ..GrpcLimits::default() };
    let addr = start(&app, limits, std::future::pending()).await;
    // Both places taken at once, then both answered; `false` while a place is still held.
    let both_free = || async {
        let sender = h2_client(addr).await;
        let (first, mut first_stream) = open_call(&sender, HEALTH_CHECK, &[]).await;
        let (second, mut second_stream) = open_call(&sender, HEALTH_CHECK, &[]).await;
        first_stream.send_data(grpc_frame(0, b""), true).unwrap();
        second_stream.send_data(grpc_frame(0, b""), true).unwrap();
        (grpc_answer(first).await.0, grpc_answer(second).await.0) == (0, 0)
    };
    let eventually_free = || async {
        tokio::time::timeout(WITHIN, async {
            while !both_free().await {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_ok()
    };
    // Reset by the client.
    let sender = h2_client(addr).await;
    for _ in 0..2 {
        let (_response, mut stream) = open_call(&sender, HEALTH_CHECK, &[]).await;
        stream.send_reset(h2::Reason::CANCEL);
    }
    assert!(eventually_free().await, "reset calls still hold their places");
    // Never sent: both cut off at the client's deadline, a third refused meanwhile.
    let (silent, _silent_stream) = open_call(&sender, CHECK, &[("grpc-timeout", "1S")]).await;
    let (trickled, mut trickled_stream) = open_call(&sender, CHECK, &[("grpc-timeout", "1S")]).await;
    trickled_stream.send_data(vec![0, 0].into(), false).unwrap();
    let (refused, mut refused_stream) = open_call(&sender, HEALTH_CHECK, &[]).await;
    refused_stream.send_data(grpc_frame(0, b""), true).unwrap();
    assert_eq!(grpc_answer(refused).await.0, i32::from(tonic::Code::ResourceExhausted));
    for response in [silent, trickled] {
        assert_eq!(grpc_answer(response).await.0, i32::from(tonic::Code::DeadlineExceeded));
    }
    assert!(eventually_free().await, "calls past their deadline still hold their places");
    // The connection goes away with both calls open.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (dropped, connection) = tokio::time::timeout(WITHIN, h2::client::handshake(tcp)).await.unwrap().unwrap();
    let driven = tokio::spawn(async move {
        let _ = connection.await;
    });
    let held = [open_call(&dropped, CHECK, &[]).await, open_call(&dropped, CHECK, &[]).await];
    let (refused, mut refused_stream) = open_call(&h2_client(addr).await, HEALTH_CHECK, &[]).await;
    refused_stream.send_data(grpc_frame(0, b""), true).unwrap();
    assert_eq!(grpc_answer(refused).await.0, i32::from(tonic::Code::ResourceExhausted));
    driven.abort();
    drop((held, dropped));
    assert!(eventually_free().await, "calls of a dropped connection still hold their places");
}

/// SECURITY: through the gRPC listener, the end client's key (allowed, in the original path and
/// query, refused for a scope, mistyped by one character, or in a call cut off at its deadline)
/// reaches no log line and no field of any answer, written by hand as the answers now are.
#[tokio::test]
async fn a_key_through_the_grpc_listener_leaks_nowhere() {
    let capture = crate::secrets::capture_logs();
    let app = TestApp::sqlite().await;
    let (key, _) = app.owned_key(app.default_org.id, "user-7", &["read:projects"]).await;
    let secret = key[8..40].to_owned();
    let (addr, channel) = serve(&app).await;
    let bearer = format!("Bearer {key}");
    let mistyped = format!("{}{}", &key[..key.len() - 1], if key.ends_with('x') { 'y' } else { 'x' });
    let in_path = format!("/projects/{key}?key={key}");
    let requests = [
        check_request("GET", "/projects/1", &[("authorization", &bearer)], "192.0.2.1"),
        check_request("GET", &in_path, &[("authorization", &bearer)], "192.0.2.1"),
        check_request("POST", "/projects/1", &[("authorization", &bearer)], "192.0.2.1"),
        check_request("GET", "/projects/1", &[("x-api-key", &mistyped)], "192.0.2.1"),
        check_request("GET", &in_path, &[], "192.0.2.1"),
    ];
    for request in requests {
        let response = check(&channel, request).await;
        assert_no_key(&response, &secret);
    }
    // A call whose message is cut short at its deadline, the key in what did arrive.
    use prost::Message;
    let message = check_request("GET", "/projects/1", &[("authorization", &bearer)], "192.0.2.1").encode_to_vec();
    let (response, mut stream) = open_call(&h2_client(addr).await, CHECK, &[("grpc-timeout", "200m")]).await;
    stream.send_data(grpc_frame(0, &message)[..message.len()].to_vec().into(), false).unwrap();
    assert_eq!(grpc_answer(response).await.0, i32::from(tonic::Code::DeadlineExceeded));
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("\"via\":\"ext_authz_grpc\""), "the capture works");
    assert!(!logs.contains(&secret), "a gRPC ext_authz log line has the key");
}
