//! `/v1/authz`, the proxy hook (forward-auth, nginx `auth_request`, Envoy's HTTP ext_authz): each
//! style reads the original method and URI where its proxy writes them and nowhere else, so a client
//! cannot choose the path it is judged on; allow answers the identity, deny Keyward's status; routes
//! match the normalized path; the client address comes from `X-Forwarded-For` behind trusted proxies
//! only; the signed identity verifies and expires; every decision is a usage event; the key is never
//! echoed.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use keyward_core::Scope;
use keyward_core::identity::{self, IdentityError};
use keyward_server::authz::{GatewayRoute, RouteRule, Routes};
use keyward_server::settings::{AuthzSettings, AuthzStyle};
use secrecy::SecretString;
use serde_json::json;

use crate::helpers::{Response, TestApp, code, request};

const SECRET: &str = "an identity secret of 32 bytes!!";

/// `/v1/projects` needs `read:projects` (`write:projects` to POST), `/public` nothing, anything else a
/// usable key.
fn routes() -> Routes {
    let route = |prefix: &str, methods: Vec<Method>, scopes: &[&str], public: bool| GatewayRoute {
        prefix: prefix.into(),
        methods,
        rule: RouteRule { public, scopes: scopes.iter().map(|s| Scope::parse(s).unwrap()).collect(), cost: 1 },
    };
    Routes::new(
        vec![
            route("/v1/projects", vec![], &["read:projects"], false),
            route("/v1/projects", vec![Method::POST], &["write:projects"], false),
            route("/public", vec![], &[], true),
        ],
        RouteRule::default(),
    )
    .unwrap()
}

async fn app() -> TestApp {
    app_with(AuthzSettings::default()).await
}

async fn app_with(authz: AuthzSettings) -> TestApp {
    let mut app = TestApp::sqlite().await;
    app.reconfigure(|b| b.routes(routes()).authz(authz));
    app
}

/// An auth request from 203.0.113.7 (the proxy) to `uri`, with these headers.
fn ask(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = request(method, uri, None, None);
    for (name, value) in headers {
        req.headers_mut().append(axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
    }
    req
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// The auth request each style's proxy sends for `GET <uri>` with `key`.
fn styled(style: AuthzStyle, uri: &str, key: &str) -> Request<Body> {
    let auth = bearer(key);
    match style {
        AuthzStyle::Forwarded => ask(
            Method::GET,
            "/v1/authz?style=forwarded",
            &[
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", uri),
                ("x-forwarded-host", "api.example.com"),
                ("authorization", &auth),
            ],
        ),
        AuthzStyle::Original => ask(
            Method::GET,
            "/v1/authz?compat=nginx",
            &[("x-original-method", "GET"), ("x-original-uri", uri), ("authorization", &auth)],
        ),
        AuthzStyle::Envoy => ask(Method::GET, &format!("/v1/authz{uri}"), &[("authorization", &auth)]),
    }
}

fn assert_never_echoed(r: &Response, key: &str) {
    assert!(!r.text.contains(key), "the key is in the body: {}", r.text);
    for (name, value) in &r.headers {
        assert!(!value.to_str().unwrap_or_default().contains(key), "the key is in `{name}`");
    }
}

#[tokio::test]
async fn each_style_allows_with_every_identity_header_and_the_rate_limit_headers() {
    let app = app().await;
    let (key, rec) = app.owned_key(app.default_org.id, "user_9", &["read:projects"]).await;
    for style in AuthzStyle::ALL {
        let r = app.send(styled(style, "/v1/projects/7?q=1", &key)).await;
        assert_eq!(r.status, StatusCode::OK, "{style:?}: {}", r.text);
        let h = &r.headers;
        assert_eq!(h["x-keyward-key-id"], rec.id.to_string().as_str(), "{style:?}");
        assert_eq!(h["x-keyward-organization-id"], rec.organization_id.to_string().as_str());
        assert_eq!(h["x-keyward-owner-id"], "user_9");
        assert_eq!(h["x-keyward-environment"], "live");
        assert_eq!(h["x-keyward-scopes"], "read:projects");
        assert!(h.contains_key("ratelimit") && h.contains_key("x-ratelimit-remaining"), "{style:?}: {h:?}");
        assert!(!h.contains_key("x-keyward-identity"), "signing is off");
        assert_never_echoed(&r, &key);
    }
    // No owner: the header is still sent, empty, so a proxy copying it overwrites a forged one.
    let (plain, _) = app.key(app.default_org.id, &["read:projects"]).await;
    let r = app.send(styled(AuthzStyle::Forwarded, "/v1/projects", &plain)).await;
    assert_eq!((r.status, r.headers["x-keyward-owner-id"].to_str().unwrap()), (StatusCode::OK, ""));
}

#[tokio::test]
async fn each_style_denies_with_keywards_status_and_error() {
    let app = app().await;
    let (reader, _) = app.key(app.default_org.id, &["read:projects"]).await;
    for style in AuthzStyle::ALL {
        let r = app.send(styled(style, "/v1/projects", "sk_live_short")).await;
        assert_eq!((r.status, code(&r)), (StatusCode::UNAUTHORIZED, "malformed_key"), "{style:?}");
        assert_never_echoed(&r, "sk_live_short");
        let mut no_key = styled(style, "/v1/projects", "x");
        no_key.headers_mut().remove("authorization");
        let r = app.send(no_key).await;
        assert_eq!((r.status, code(&r)), (StatusCode::UNAUTHORIZED, "missing_credentials"), "{style:?}");
        let r = app.send(styled(style, "/v1/projects", &reader)).await;
        assert_eq!(r.status, StatusCode::OK, "{style:?}");
    }
    // The method matters: POST needs write:projects.
    let r = app.send(ask(Method::POST, "/v1/authz/v1/projects", &[("authorization", &bearer(&reader))])).await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"), "{}", r.text);
    let r = app
        .send(ask(
            Method::GET,
            "/v1/authz?style=original",
            &[("x-original-method", "post"), ("x-original-uri", "/v1/projects"), ("authorization", &bearer(&reader))],
        ))
        .await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"), "{}", r.text);
}

/// A key of an organization allowed one request a minute, once it is spent.
async fn spent_key(app: &TestApp) -> String {
    let body = json!({"name": "tight", "slug": "tight", "plan": "pro", "rate_limit_per_minute": 1});
    let r = app.post("/v1/organizations", &app.admin_key, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let org = r.body["id"].as_str().unwrap().parse().unwrap();
    let (key, _) = app.key(org, &[]).await;
    let r = app.send(styled(AuthzStyle::Envoy, "/anything", &key)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    key
}

#[tokio::test]
async fn over_the_rate_limit_is_429_and_in_nginx_mode_403_with_the_status_beside_it() {
    let app = app().await;
    let key = spent_key(&app).await;
    let r = app.send(styled(AuthzStyle::Forwarded, "/anything", &key)).await;
    assert_eq!((r.status, code(&r)), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"));
    assert!(r.headers.contains_key("retry-after") && r.headers.contains_key("ratelimit"), "{:?}", r.headers);
    assert!(!r.headers.contains_key("x-keyward-status"));
    // `?compat=nginx`: auth_request would make a 429 a 500.
    let r = app.send(styled(AuthzStyle::Original, "/anything", &key)).await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "rate_limited"), "{}", r.text);
    assert_eq!(r.headers["x-keyward-status"], "429");
    assert!(r.headers.contains_key("retry-after"));
    // 401 and 403 stay what they are.
    let r = app.send(styled(AuthzStyle::Original, "/anything", "sk_live_short")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(!r.headers.contains_key("x-keyward-status"));
    // The setting does for every request what `?compat=nginx` does for one.
    let mut app = app;
    app.reconfigure(|b| b.authz(AuthzSettings { nginx_compat: true, ..Default::default() }));
    let r = app.send(styled(AuthzStyle::Forwarded, "/anything", &key)).await;
    assert_eq!((r.status, r.headers["x-keyward-status"].to_str().unwrap()), (StatusCode::FORBIDDEN, "429"));
}

type Headers = &'static [(&'static str, &'static str)];

/// Spoofing attempts: what each is, the auth request's URI and headers (the caller's key is added),
/// and the status and error code it gets.
#[rustfmt::skip]
const SPOOFS: &[(&str, &str, Headers, u16, &str)] = &[
    ("behind nginx, the client's X-Forwarded-Uri is not read",
        "/v1/authz?compat=nginx", &[("x-forwarded-method", "GET"), ("x-forwarded-uri", "/public"), ("x-original-method", "GET"), ("x-original-uri", "/v1/projects")], 403, "insufficient_scope"),
    ("behind Traefik, the client's X-Original-URI is not read",
        "/v1/authz?style=forwarded", &[("x-original-method", "GET"), ("x-original-uri", "/public"), ("x-forwarded-method", "GET"), ("x-forwarded-uri", "/v1/projects")], 403, "insufficient_scope"),
    ("a second X-Original-URI (the client's, beside the proxy's) is ambiguous",
        "/v1/authz?style=original", &[("x-original-method", "GET"), ("x-original-uri", "/public"), ("x-original-uri", "/v1/projects")], 400, "invalid_path"),
    ("a second X-Forwarded-Method is ambiguous",
        "/v1/authz?style=forwarded", &[("x-forwarded-method", "GET"), ("x-forwarded-method", "POST"), ("x-forwarded-uri", "/v1/projects")], 400, "invalid_path"),
    ("Envoy's form: the client's query and headers name no style",
        "/v1/authz/v1/projects?style=forwarded", &[("x-forwarded-method", "GET"), ("x-forwarded-uri", "/public")], 403, "insufficient_scope"),
    ("no style named, yet a style's headers: the recipe forgot its style",
        "/v1/authz", &[("x-forwarded-uri", "/public")], 400, "invalid_query"),
    ("no style named, nginx's headers",
        "/v1/authz", &[("x-original-method", "GET")], 400, "invalid_query"),
    ("the style's header is missing",
        "/v1/authz?style=forwarded", &[("x-forwarded-method", "GET"), ("x-original-uri", "/public")], 400, "invalid_path"),
    ("a URI that is not a path",
        "/v1/authz?style=forwarded", &[("x-forwarded-method", "GET"), ("x-forwarded-uri", "http://evil.example/public")], 400, "invalid_path"),
    ("a method that is not one",
        "/v1/authz?style=forwarded", &[("x-forwarded-method", "GE T"), ("x-forwarded-uri", "/public")], 400, "invalid_path"),
    ("two styles in the URL",
        "/v1/authz?style=forwarded&compat=nginx", &[("x-forwarded-method", "GET"), ("x-forwarded-uri", "/public")], 400, "invalid_query"),
    ("a style that is not one",
        "/v1/authz?style=auto", &[("x-forwarded-method", "GET"), ("x-forwarded-uri", "/public")], 400, "invalid_query"),
];

/// SECURITY: the proxy passes its client's headers on. Whatever the client adds, the request is judged
/// on what the configured style reads, and an ambiguous one is refused.
#[tokio::test]
async fn a_client_cannot_choose_the_path_it_is_judged_on() {
    let app = app().await;
    let (key, _) = app.key(app.default_org.id, &[]).await;
    let auth = bearer(&key);
    for &(what, uri, headers, status, want) in SPOOFS {
        let mut headers = headers.to_vec();
        headers.push(("authorization", auth.as_str()));
        let r = app.send(ask(Method::GET, uri, &headers)).await;
        assert_eq!((r.status.as_u16(), code(&r)), (status, want), "{what}: {}", r.text);
    }
    // The setting fixes the style: the URL cannot name another.
    let mut app = app;
    app.reconfigure(|b| b.authz(AuthzSettings { style: Some(AuthzStyle::Original), ..Default::default() }));
    let spoofed = [("x-forwarded-method", "GET"), ("x-forwarded-uri", "/public"), ("authorization", auth.as_str())];
    let r = app.send(ask(Method::GET, "/v1/authz?style=forwarded", &spoofed)).await;
    assert_eq!((r.status, code(&r)), (StatusCode::BAD_REQUEST, "invalid_query"), "{}", r.text);
    let nginx = [("x-original-method", "GET"), ("x-original-uri", "/v1/projects"), ("authorization", auth.as_str())];
    let r = app.send(ask(Method::GET, "/v1/authz", &nginx)).await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"), "{}", r.text);
}

#[tokio::test]
async fn routes_match_the_normalized_path() {
    let app = app().await;
    let (key, _) = app.key(app.default_org.id, &[]).await;
    for spelling in ["/v1//%70rojects", "/v1/./projects/", "/V1/Projects", "/v1/projects;x=1", "/v1/projects.json"] {
        for style in AuthzStyle::ALL {
            let r = app.send(styled(style, spelling, &key)).await;
            assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"), "{style:?} {spelling}");
        }
    }
    // The proxy forwards the path as sent: `..` and a leading `//` are refused, not resolved.
    for unsafe_path in
        ["/public/..%2Fv1/projects", "/public/%2e%2e/%2e%2e/v1", "/v1/%00", "/health/../v1/projects", "//v1/projects"]
    {
        let r = app.send(styled(AuthzStyle::Forwarded, unsafe_path, &key)).await;
        assert_eq!((r.status, code(&r)), (StatusCode::BAD_REQUEST, "invalid_path"), "{unsafe_path}");
    }
}

/// SECURITY: a proxy hook's proxy forwards the path as its client sent it, not the canonical form the
/// gateway forwards. An upstream that does not resolve `..` routes `/v1/projects/../../public` under
/// `/v1/projects`, and one that reads the path as a URL (`urlsplit`, `new URL(path, base)`) takes
/// `//public/v1/projects` for host `public` and path `/v1/projects`: each judged as the public route,
/// each would reach a protected handler with no key. Refused, in every style and without a key.
#[tokio::test]
async fn a_path_the_upstream_may_read_as_another_is_refused() {
    let app = app().await;
    for sent in [
        "/v1/projects/../../public",
        "/v1/projects/x/../../../public/y",
        "/v1/projects/%2e%2e/%2E%2E/public",
        "/v1/projects/.%2e/..%2E/public?page=1",
        "/v1/projects/./../.././public",
        "/v1/projects/../..",
        "//public/v1/projects",
        "///public/v1/projects",
        "//public",
    ] {
        for style in AuthzStyle::ALL {
            let mut asked = styled(style, sent, "x");
            asked.headers_mut().remove("authorization");
            let r = app.send(asked).await;
            // nginx mode sends a 400 as 403 with the status beside it.
            let status =
                r.headers.get("x-keyward-status").map_or(r.status.as_u16(), |s| s.to_str().unwrap().parse().unwrap());
            assert_eq!((status, code(&r)), (400, "invalid_path"), "{style:?} {sent}: {}", r.text);
        }
    }
    // What every upstream reads alike still passes: a `.` segment, slashes inside the path.
    for sent in ["/public/./x", "/public//x", "/public/x/"] {
        let r = app.send(styled(AuthzStyle::Forwarded, sent, "x")).await;
        assert_eq!(r.status, StatusCode::OK, "{sent}: {}", r.text);
    }
}

/// SECURITY: Symfony and Laravel (a POST's `_method`, query or form body) and Express's
/// `method-override('_method')` (the query) run a request as the method its `_method` parameter names,
/// in any spelling PHP reads as that name (`%5F`, `.`, ` ` and `[` for `_`). That method's rule
/// applies too, as for the override headers.
#[tokio::test]
async fn a_method_parameter_in_the_query_needs_the_rule_of_the_method_it_names() {
    let mut app = app().await;
    let route = |methods: Vec<Method>, scope: &str| GatewayRoute {
        prefix: "/v1/projects".into(),
        methods,
        rule: RouteRule { scopes: vec![Scope::parse(scope).unwrap()], ..Default::default() },
    };
    let routes = Routes::new(
        vec![route(vec![], "read:projects"), route(vec![Method::DELETE], "delete:projects")],
        RouteRule::default(),
    )
    .unwrap();
    app.reconfigure(|b| b.routes(routes));
    let (key, _) = app.key(app.default_org.id, &["read:projects"]).await;
    let auth = bearer(&key);
    let forwarded = |uri: &str| {
        let headers = [("x-forwarded-method", "POST"), ("x-forwarded-uri", uri), ("authorization", auth.as_str())];
        ask(Method::GET, "/v1/authz?style=forwarded", &headers)
    };
    let envoy = |uri: &str| ask(Method::POST, &format!("/v1/authz{uri}"), &[("authorization", auth.as_str())]);
    for post in [&forwarded as &dyn Fn(&str) -> Request<Body>, &envoy] {
        assert_eq!(app.send(post("/v1/projects/7?page=2&method=DELETE")).await.status, StatusCode::OK);
    }
    for uri in [
        "/v1/projects/7?_method=DELETE",
        "/v1/projects/7?page=2&_method=delete",
        "/v1/projects/7?%5Fmethod=DELETE",
        "/v1/projects/7?_method=%44ELETE",
        "/v1/projects/7?.method=DELETE",
        "/v1/projects/7?%20method=DELETE",
        "/v1/projects/7?%5Bmethod=DELETE",
    ] {
        for post in [&forwarded as &dyn Fn(&str) -> Request<Body>, &envoy] {
            let r = app.send(post(uri)).await;
            assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"), "{uri}: {}", r.text);
        }
    }
}

#[tokio::test]
async fn a_public_route_needs_no_key_and_overwrites_forged_identity_headers() {
    let app = app().await;
    let r = app
        .send(ask(
            Method::GET,
            "/v1/authz?style=forwarded",
            &[("x-forwarded-method", "GET"), ("x-forwarded-uri", "/public/x"), ("x-keyward-key-id", "forged")],
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    for name in [
        "x-keyward-key-id",
        "x-keyward-organization-id",
        "x-keyward-owner-id",
        "x-keyward-environment",
        "x-keyward-scopes",
    ] {
        assert_eq!(r.headers[name], "", "{name}");
    }
}

#[tokio::test]
async fn the_client_address_comes_from_x_forwarded_for_behind_trusted_proxies_only() {
    let mut app = app().await;
    let walled = app.walled_key(app.default_org.id, "198.51.100.7").await;
    let asked = || {
        ask(
            Method::GET,
            "/v1/authz/anything",
            &[("authorization", &bearer(&walled)), ("x-forwarded-for", "198.51.100.7")],
        )
    };
    let r = app.send(asked()).await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "ip_not_allowed"), "the peer is not trusted");
    app.reconfigure(|b| b.trusted_proxies(vec!["203.0.113.0/24".parse().unwrap()]));
    let r = app.send(asked()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn the_signed_identity_verifies_and_expires_with_the_clock() {
    let authz = AuthzSettings {
        identity_secret: Some(SecretString::from(SECRET)),
        identity_ttl_seconds: 30,
        ..Default::default()
    };
    let app = app_with(authz).await;
    let (key, rec) = app.owned_key(app.default_org.id, "user_9", &["read:projects"]).await;
    let r = app.send(styled(AuthzStyle::Forwarded, "/v1//projects/7?secret=x", &key)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let token = r.headers["x-keyward-identity"].to_str().unwrap().to_owned();
    let now = keyward_core::Clock::now(&app.clock).timestamp();
    let claims = identity::verify(SECRET.as_bytes(), &token, now).unwrap();
    assert_eq!(claims.key_id, rec.id.to_string());
    assert_eq!(claims.org, rec.organization_id.to_string());
    assert_eq!(claims.owner.as_deref(), Some("user_9"));
    assert_eq!((claims.env.as_str(), claims.scopes.clone()), ("live", vec!["read:projects".to_owned()]));
    assert_eq!((claims.method.as_str(), claims.path.as_str()), ("GET", "/v1/projects/7"), "canonical, no query");
    assert_eq!((claims.iat, claims.exp), (now, now + 30));
    assert_eq!(identity::verify(SECRET.as_bytes(), &token, now + 30), Err(IdentityError::Expired));
    assert_eq!(identity::verify(b"another secret of 32 bytes!!!!!", &token, now), Err(IdentityError::BadSignature));
    assert_never_echoed(&r, &key);
    app.clock.advance(chrono::Duration::seconds(31));
    let later = keyward_core::Clock::now(&app.clock).timestamp();
    assert_eq!(identity::verify(SECRET.as_bytes(), &token, later), Err(IdentityError::Expired));
}

#[tokio::test]
async fn every_decision_on_a_key_is_a_usage_event() {
    let app = app().await;
    let (key, rec) = app.key(app.default_org.id, &["read:projects"]).await;
    let mut allowed = styled(AuthzStyle::Forwarded, "/v1/projects/1?token=hush", &key);
    allowed.headers_mut().insert("user-agent", "proxy-test/1".parse().unwrap());
    assert_eq!(app.send(allowed).await.status, StatusCode::OK);
    let denied = ask(Method::DELETE, "/v1/authz/v1/projects/1", &[("authorization", &bearer(&key))]);
    let r = app.send(denied).await;
    assert_eq!(r.status, StatusCode::OK, "DELETE needs only read:projects here: {}", r.text);
    let post = ask(Method::POST, "/v1/authz/v1/projects", &[("authorization", &bearer(&key))]);
    assert_eq!(app.send(post).await.status, StatusCode::FORBIDDEN);
    assert!(app.state.usage.flush().await);
    let r = app.get(&format!("/v1/keys/{}/usage?days=1", rec.id), &app.admin_key).await;
    let t = &r.body["totals"];
    assert_eq!((t["requests"].clone(), t["denied"].clone()), (json!(3), json!(1)), "{}", r.text);
    let endpoints: Vec<&str> =
        r.body["top_endpoints"].as_array().unwrap().iter().map(|e| e["endpoint"].as_str().unwrap()).collect();
    assert!(endpoints.contains(&"/v1/projects/1") && endpoints.contains(&"/v1/projects"), "{endpoints:?}");
    assert!(!r.text.contains("hush"), "no query string is recorded");
}

#[tokio::test]
async fn failed_attempts_count_against_the_clients_address() {
    let app = app().await;
    let (key, _) = app.key(app.default_org.id, &[]).await;
    let unknown =
        keyward_core::PlainKey::generate(&keyward_core::KeyPrefix::default(), keyward_core::Environment::Live).unwrap();
    for _ in 0..10 {
        let r = app.send(styled(AuthzStyle::Envoy, "/x", unknown.expose_secret())).await;
        assert_eq!(code(&r), "unknown_key");
    }
    let r = app.send(styled(AuthzStyle::Envoy, "/x", &key)).await;
    assert_eq!((r.status, code(&r)), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"), "{}", r.text);
    assert!(r.headers.contains_key("retry-after"));
}

#[tokio::test]
async fn key_headers_are_configurable() {
    let authz = AuthzSettings { key_headers: vec!["x-client-key".into()], ..Default::default() };
    let app = app_with(authz).await;
    let (key, _) = app.key(app.default_org.id, &[]).await;
    let r = app.send(ask(Method::GET, "/v1/authz/x", &[("x-client-key", &key)])).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app.send(ask(Method::GET, "/v1/authz/x", &[("authorization", &bearer(&key))])).await;
    assert_eq!((r.status, code(&r)), (StatusCode::UNAUTHORIZED, "missing_credentials"), "not a key header");
}

/// SECURITY: fail closed. A key neither the cache nor the store can answer for is a 503
/// `store_unavailable` deny, not an allow.
#[tokio::test]
async fn while_the_store_cannot_answer_an_uncached_key_is_503() {
    let (mut app, store) = crate::legacy::counted().await;
    app.reconfigure(|b| b.routes(routes()));
    let (key, _) = app.key(app.default_org.id, &[]).await;
    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = app.send(styled(AuthzStyle::Envoy, "/anything", &key)).await;
    assert_eq!((r.status, code(&r)), (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"), "{}", r.text);
    let r = app.send(styled(AuthzStyle::Original, "/anything", &key)).await;
    assert_eq!((r.status, r.headers["x-keyward-status"].to_str().unwrap()), (StatusCode::FORBIDDEN, "503"), "nginx");
    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
}

/// The gateway judges through the same decision: its upstream gets the signed identity too, and a
/// client's own `X-Keyward-Identity` never reaches it.
#[tokio::test]
async fn the_gateway_sends_the_signed_identity_too() {
    let authz = AuthzSettings { identity_secret: Some(SecretString::from(SECRET)), ..Default::default() };
    let app = app_with(authz).await;
    let (key, rec) = app.key(app.default_org.id, &["read:projects"]).await;
    let upstream = crate::gateway::spawn(axum::Router::new().fallback(axum::routing::any(crate::gateway::echo))).await;
    let gw = keyward_server::gateway::Gateway::with_routes(
        format!("http://{upstream}").parse().unwrap(),
        std::time::Duration::from_secs(5),
        app.state.routes.clone(),
    );
    let gateway = crate::gateway::spawn(keyward_server::gateway::router(app.state.clone(), gw)).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let request = Request::get(format!("http://{gateway}/v1/projects/7"))
        .header("authorization", bearer(&key))
        .header("x-keyward-identity", "forged")
        .body(Body::empty())
        .unwrap();
    let response =
        tokio::time::timeout(std::time::Duration::from_secs(10), client.request(request)).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let token = echo["headers"]["x-keyward-identity"].as_str().unwrap();
    let now = keyward_core::Clock::now(&app.clock).timestamp();
    let claims = identity::verify(SECRET.as_bytes(), token, now).unwrap();
    assert_eq!((claims.key_id, claims.path), (rec.id.to_string(), "/v1/projects/7".to_owned()));
}
