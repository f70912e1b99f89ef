//! Every error body the API can give, snapshotted in one place: a change of code, status or message
//! shows up here as a diff to review.

use axum::http::Method;
use chrono::Duration;
use keyward_core::VerifyOutcome;
use keyward_server::error::{ErrorCode, RetryAfter};
use keyward_server::service::CreateKeyRequest;
use serde_json::json;

use crate::helpers::{Response, TestApp, request};

fn line(name: &str, r: &Response) -> String {
    format!("{name}: {} {}", r.status.as_u16(), r.text)
}

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

    let (revoked, rec) = app.key(org.id, &[]).await;
    app.delete(&format!("/v1/keys/{}", rec.id), &app.admin_key).await;
    out.push(line("revoked key", &app.get("/v1/me", &revoked).await));
    let (disabled, rec) = app.key(org.id, &[]).await;
    app.patch(&format!("/v1/keys/{}", rec.id), &app.admin_key, json!({"is_active": false})).await;
    out.push(line("disabled key", &app.get("/v1/me", &disabled).await));
    let (expiring, _) = app
        .key_with(org.id, CreateKeyRequest { name: "e".into(), expires_in_days: Some(1), ..Default::default() })
        .await;
    let (walled, _) = app
        .key_with(
            org.id,
            CreateKeyRequest { name: "w".into(), allowed_ips: vec!["10.0.0.0/8".into()], ..Default::default() },
        )
        .await;
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

    for l in &out {
        assert!(!l.contains(" 500 "), "{l}");
    }
    insta::assert_snapshot!(out.join("\n"));
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
