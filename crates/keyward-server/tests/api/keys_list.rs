use axum::http::StatusCode;
use chrono::Duration;
use keyward_server::service::CreateKeyRequest;
use serde_json::{Value, json};

use crate::helpers::{TestApp, code};

fn names(body: &Value) -> Vec<String> {
    body["items"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap().to_owned()).collect()
}

async fn app_with_keys() -> TestApp {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let mk = |name: &str, owner: Option<&str>, env: &str, days: Option<i64>| CreateKeyRequest {
        name: name.into(),
        owner_id: owner.map(Into::into),
        environment: Some(env.into()),
        expires_in_days: days,
        ..Default::default()
    };
    app.key_with(org, mk("a-live", Some("u1"), "live", None)).await;
    app.key_with(org, mk("b-test", Some("u1"), "test", None)).await;
    app.key_with(org, mk("c-expiring", Some("u2"), "live", Some(1))).await;
    let (_, disabled) = app.key_with(org, mk("d-disabled", Some("u2"), "live", None)).await;
    let (_, revoked) = app.key_with(org, mk("e-revoked", None, "live", None)).await;
    let r = app.patch(&format!("/v1/keys/{}", disabled.id), &app.admin_key, json!({"is_active": false})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app.delete(&format!("/v1/keys/{}", revoked.id), &app.admin_key).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    app.clock.advance(Duration::days(2));
    app
}

#[tokio::test]
async fn filters_by_owner_environment_status_and_inactive() {
    let app = app_with_keys().await;
    let get = |q: &'static str| {
        let app = &app;
        async move {
            let r = app.get(&format!("/v1/keys{q}"), &app.admin_key).await;
            assert_eq!(r.status, StatusCode::OK, "{q}: {}", r.text);
            names(&r.body)
        }
    };
    assert_eq!(get("").await, vec!["c-expiring", "b-test", "a-live", "bootstrap admin"]);
    assert_eq!(get("?include_inactive=true").await.len(), 6);
    assert_eq!(get("?owner_id=u1").await, vec!["b-test", "a-live"]);
    assert_eq!(get("?environment=test").await, vec!["b-test"]);
    assert_eq!(get("?status=expired").await, vec!["c-expiring"]);
    assert_eq!(get("?status=disabled").await, vec!["d-disabled"]);
    assert_eq!(get("?status=revoked").await, vec!["e-revoked"]);
    assert_eq!(get("?status=active&owner_id=u1&environment=live").await, vec!["a-live"]);
}

#[tokio::test]
async fn cursor_pagination_walks_every_key_once() {
    let app = app_with_keys().await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let q = match &cursor {
            Some(c) => format!("/v1/keys?include_inactive=true&limit=4&cursor={c}"),
            None => "/v1/keys?include_inactive=true&limit=4".to_owned(),
        };
        let r = app.get(&q, &app.admin_key).await;
        assert_eq!(r.status, StatusCode::OK);
        seen.extend(names(&r.body));
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, vec!["e-revoked", "d-disabled", "c-expiring", "b-test", "a-live", "bootstrap admin"]);
}

async fn bad_query(q: &str) {
    let app = TestApp::sqlite().await;
    let r = app.get(&format!("/v1/keys{q}"), &app.admin_key).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {}", r.text);
    assert_eq!(code(&r), "invalid_query", "{q}");
}

#[tokio::test]
async fn bad_status() {
    bad_query("?status=gone").await;
}

#[tokio::test]
async fn bad_environment() {
    bad_query("?environment=prod").await;
}

#[tokio::test]
async fn bad_include_inactive() {
    bad_query("?include_inactive=maybe").await;
}

#[tokio::test]
async fn bad_cursor() {
    bad_query("?cursor=zzz").await;
}

#[tokio::test]
async fn limit_out_of_range() {
    bad_query("?limit=0").await;
    bad_query("?limit=1000").await;
    bad_query("?limit=-1").await;
}
