//! Every error body Keyward can give, on the management API, in gateway mode and in the tower layer,
//! snapshotted in one place: a change of code, status, message or `Retry-After` shows up here as a
//! diff to review, and a code of the error table that no line answers fails the test.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::header::RETRY_AFTER;
use axum::http::{Method, Request};
use axum::routing::get;
use chrono::Duration;
use http_body_util::BodyExt;
use keyward_core::VerifyOutcome;
use keyward_server::error::{ErrorCode, RetryAfter};
use keyward_server::listen::BodyReadTimeout;
use keyward_server::service::CreateKeyRequest;
use keyward_tower::{KeywardLayer, Remote};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::helpers::{Response, TestApp, request};
use crate::surfaces;

fn line(name: &str, r: &Response) -> String {
    let retry =
        r.headers.get(RETRY_AFTER).map(|v| format!(" (retry-after: {})", v.to_str().unwrap())).unwrap_or_default();
    format!("{name}: {} {}{retry}", r.status.as_u16(), r.text)
}

/// The line of a router that is not the API's (the gateway, a layer).
async fn edge_line(name: &str, router: &Router, request: Request<Body>) -> String {
    let response =
        tokio::time::timeout(StdDuration::from_secs(10), router.clone().oneshot(request)).await.unwrap().unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    line(name, &Response { status, headers, body: Value::Null, text })
}

/// Codes no line below answers, and the test that shows each.
const ANSWERED_ELSEWHERE: &[(&str, &str)] =
    &[("store_unavailable", "cache.rs: while_the_store_is_down_cached_keys_answer_and_misses_are_503")];

#[tokio::test]
async fn every_error_body() {
    let app = TestApp::sqlite().await;
    let org = app.org("acme").await;
    let mut out = Vec::new();

    out.push(line("missing credentials", &app.call(Method::GET, "/v1/me", None, None).await));
    let mut basic = request(Method::GET, "/v1/me", None, None);
    basic.headers_mut().insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
    out.push(line("wrong auth scheme", &app.send(basic).await));
    out.push(line("malformed key", &app.get("/v1/me", "sk_live_short").await));
    let unknown =
        keyward_core::PlainKey::generate(&keyward_core::KeyPrefix::default(), keyward_core::Environment::Live).unwrap();
    out.push(line("unknown key", &app.get("/v1/me", unknown.expose_secret()).await));

    let (revoked, _) = app.revoked_key(org.id).await;
    out.push(line("revoked key", &app.get("/v1/me", &revoked).await));
    let (disabled, rec) = app.key(org.id, &[]).await;
    app.patch(&format!("/v1/keys/{}", rec.id), &app.admin_key, json!({"is_active": false})).await;
    out.push(line("disabled key", &app.get("/v1/me", &disabled).await));
    let (expiring, _) = app
        .key_with(org.id, CreateKeyRequest { name: "e".into(), expires_in_days: Some(1), ..Default::default() })
        .await;
    let walled = app.walled_key(org.id, "10.0.0.0/8").await;
    out.push(line("ip not allowed", &app.get("/v1/me", &walled).await));
    let (member, _) = app.key(org.id, &[]).await;
    out.push(line("insufficient scope", &app.get("/v1/keys", &member).await));
    app.patch(&format!("/v1/organizations/{}", org.id), &app.admin_key, json!({"is_active": false})).await;
    out.push(line("organization disabled", &app.get("/v1/me", &member).await));
    app.clock.advance(Duration::days(2));
    app.patch(&format!("/v1/organizations/{}", org.id), &app.admin_key, json!({"is_active": true})).await;
    out.push(line("expired key", &app.get("/v1/me", &expiring).await));

    let admin = &app.admin_key;
    out.push(line("not found", &app.get("/v1/keys/0190c6d1-0000-7000-8000-000000000000", admin).await));
    out.push(line("no route", &app.call(Method::GET, "/nope", None, None).await));
    out.push(line("wrong method", &app.call(Method::PUT, "/v1/keys", Some(admin), None).await));
    out.push(line("validation", &app.post("/v1/keys", admin, json!({"name": "k", "scopes": ["bad scope"]})).await));
    out.push(line("unknown field", &app.post("/v1/keys", admin, json!({"name": "k", "extra": 1})).await));
    out.push(line("wrong type", &app.post("/v1/keys", admin, json!({"name": ["k"]})).await));
    out.push(line(
        "secret in wrong field",
        &app.post("/v1/verify", admin, json!({"key": "x", "required_scopes": "sk_live_secretvalue"})).await,
    ));
    out.push(line("bad query", &app.get("/v1/keys?limit=abc", admin).await));
    out.push(line("conflict", &app.post("/v1/organizations", admin, json!({"name": "x", "slug": "acme"})).await));
    let mut broken = request(Method::POST, "/v1/keys", Some(admin), None);
    broken.headers_mut().insert("content-type", "application/json".parse().unwrap());
    *broken.body_mut() = axum::body::Body::from("{");
    out.push(line("invalid json", &app.send(broken).await));
    let mut no_type = request(Method::POST, "/v1/keys", Some(admin), None);
    *no_type.body_mut() = axum::body::Body::from("{}");
    out.push(line("no content type", &app.send(no_type).await));

    let mut big = request(Method::POST, "/v1/keys", Some(admin), None);
    big.headers_mut().insert("content-type", "application/json".parse().unwrap());
    *big.body_mut() = Body::from(json!({"name": "k", "description": "x".repeat(70 * 1024)}).to_string());
    out.push(line("too large", &app.send(big).await));
    let mut stalled = request(Method::POST, "/v1/keys", Some(admin), None);
    stalled.headers_mut().insert("content-type", "application/json".parse().unwrap());
    *stalled.body_mut() = Body::from_stream(futures_util::stream::pending::<Result<Bytes, std::io::Error>>());
    stalled.extensions_mut().insert(BodyReadTimeout(StdDuration::from_millis(1)));
    out.push(line("body too slow", &app.send(stalled).await));
    let (ownerless, _) = app.key(org.id, &["keyward:self"]).await;
    out.push(line("forbidden", &app.post("/v1/keys", &ownerless, json!({"name": "k"})).await));
    let small = app
        .post("/v1/organizations", admin, json!({"name": "small", "slug": "small", "max_api_keys": 1}))
        .await
        .body["id"]
        .clone();
    app.key(small.as_str().unwrap().parse().unwrap(), &[]).await;
    out.push(line("key limit", &app.post("/v1/keys", admin, json!({"name": "k", "organization_id": small})).await));

    // The same table at the edge. The gateway's upstream is a port just freed (nothing answers), or a
    // listener that never accepts (nothing answers in time).
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = surfaces::gateway_router(&app, closed, StdDuration::from_secs(5));
    let mute = surfaces::gateway_router(&app, silent.local_addr().unwrap(), StdDuration::from_millis(100));
    let layer = surfaces::layer_router(&app);
    let remote = Router::new()
        .route("/me", get(|| async { "me" }))
        .layer(KeywardLayer::new(Remote::new(&format!("http://{closed}"), "sk_live_x").unwrap()));
    let with = |key: &str| vec![("x-api-key", key.to_owned())];
    let get_ = |path: &str, headers: Vec<(&str, String)>| {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        surfaces::request(path, &headers, None)
    };
    out.push(edge_line("gateway: no key", &gateway, get_("/me", vec![])).await);
    out.push(edge_line("gateway: revoked key", &gateway, get_("/me", with(&revoked))).await);
    out.push(edge_line("layer: revoked key", &layer, get_("/me", with(&revoked))).await);
    out.push(edge_line("gateway: expired key", &gateway, get_("/me", with(&expiring))).await);
    out.push(edge_line("layer: ip not allowed", &layer, get_("/me", with(&walled))).await);
    out.push(edge_line("gateway: insufficient scope", &gateway, get_("/projects", with(&member))).await);
    out.push(edge_line("gateway: invalid path", &gateway, get_("/a/%2Fb", with(&member))).await);
    let tight = app
        .post(
            "/v1/organizations",
            admin,
            json!({"name": "t", "slug": "tight", "plan": "pro", "rate_limit_per_minute": 1}),
        )
        .await
        .body["id"]
        .clone();
    let (limited, _) = app.key(tight.as_str().unwrap().parse().unwrap(), &[]).await;
    let metered = app
        .post("/v1/organizations", admin, json!({"name": "m", "slug": "metered", "monthly_request_limit": 1}))
        .await
        .body["id"]
        .clone();
    let (spent, _) = app.key(metered.as_str().unwrap().parse().unwrap(), &[]).await;
    for key in [&limited, &spent] {
        assert_eq!(app.verify(key, json!({})).await["code"], "VALID");
    }
    out.push(edge_line("gateway: rate limited", &gateway, get_("/me", with(&limited))).await);
    out.push(edge_line("layer: quota exceeded", &layer, get_("/me", with(&spent))).await);
    out.push(edge_line("gateway: upstream unreachable", &gateway, get_("/me", with(&member))).await);
    out.push(edge_line("gateway: upstream too slow", &mute, get_("/me", with(&member))).await);
    out.push(edge_line("layer (remote): keyward unreachable", &remote, get_("/me", with(&member))).await);
    let mut down = TestApp::sqlite().await;
    down.reconfigure(|b| b.limiter(Arc::new(surfaces::FailClosed::default())));
    let (member, _) = down.key(down.default_org.id, &[]).await;
    let down_gateway = surfaces::gateway_router(&down, closed, StdDuration::from_secs(5));
    out.push(edge_line("gateway: limiter down", &down_gateway, get_("/me", with(&member))).await);

    // A fault inside: a table gone from under the store.
    app.exec_sql("DROP TABLE audit_log").await;
    let fault = line("internal error", &app.get("/v1/audit-logs", admin).await);

    for l in &out {
        assert!(!l.contains(" 500 "), "{l}");
    }
    out.push(fault);
    let all = out.join("\n");
    for code in ErrorCode::ALL {
        let answered = all.contains(&format!("\"code\":\"{}\"", code.as_str()));
        let elsewhere = ANSWERED_ELSEWHERE.iter().any(|(c, _)| *c == code.as_str());
        assert!(answered != elsewhere, "`{}`: answered here {answered}, listed elsewhere {elsewhere}", code.as_str());
    }
    insta::assert_snapshot!(all);
}

/// The README's table of errors is the table in `error.rs`, row for row: a code added, renamed or
/// described anew without its README row fails here, and the message prints the rows to paste.
#[test]
fn the_readme_lists_every_error_code() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let mut want =
        vec!["| code | status | when it is answered | `Retry-After` |".to_owned(), "|---|---|---|---|".to_owned()];
    for code in ErrorCode::ALL {
        let retry = match code.retry_after() {
            RetryAfter::Never => "no".to_owned(),
            RetryAfter::Seconds(s) => format!("`{s}`"),
            RetryAfter::UntilAdmitted => "seconds until the limit admits a request again".to_owned(),
        };
        want.push(format!("| `{}` | {} | {} | {retry} |", code.as_str(), code.status().as_u16(), code.description()));
    }
    let want = want.join("\n");
    assert!(readme.contains(&format!("{want}\n")), "README.md's error table must read:\n\n{want}\n");
}

/// The README's table of verify outcomes names, for each, the error it is refused with elsewhere: the
/// one mapping, `ErrorCode::of_outcome`.
#[test]
fn the_readme_maps_every_outcome_to_its_error() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    for outcome in VerifyOutcome::ALL {
        let start = format!("| `{}` |", outcome.code());
        let row = readme.lines().find(|l| l.starts_with(&start)).unwrap_or_else(|| panic!("no README row {start}"));
        let end = match ErrorCode::of_outcome(outcome) {
            Some(code) => format!("| {} `{}` |", code.status().as_u16(), code.as_str()),
            None => "| — |".to_owned(),
        };
        assert!(row.ends_with(&end), "{row}\nshould end with {end}");
    }
}
