use axum::http::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, code};

#[tokio::test]
async fn admin_creates_lists_reads_and_updates_organizations() {
    let app = TestApp::sqlite().await;
    let r = app
        .post(
            "/v1/organizations",
            &app.admin_key,
            json!({"name": "Acme", "slug": "acme", "email": "ops@acme.test", "plan": "pro", "max_api_keys": 10,
                   "monthly_request_limit": 5000, "rate_limit_per_minute": 100}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["slug"], "acme");
    assert_eq!(r.body["plan"], "pro");
    assert_eq!(r.body["max_api_keys"], 10);
    assert_eq!(r.body["is_active"], true);
    let id = r.body["id"].as_str().unwrap().to_owned();

    let r = app.get(&format!("/v1/organizations/{id}"), &app.admin_key).await;
    assert_eq!(r.body["email"], "ops@acme.test");
    let r = app.get("/v1/organizations", &app.admin_key).await;
    let slugs: Vec<_> = r.body["items"].as_array().unwrap().iter().map(|o| o["slug"].clone()).collect();
    assert_eq!(slugs, vec![json!("acme"), json!("default")]);
    let r = app.get("/v1/organizations?limit=1", &app.admin_key).await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
    let next = r.body["next_cursor"].as_str().unwrap();
    let r = app.get(&format!("/v1/organizations?limit=1&cursor={next}"), &app.admin_key).await;
    assert_eq!(r.body["items"][0]["slug"], "default");
    assert_eq!(r.body["next_cursor"], json!(null));

    let r = app
        .patch(&format!("/v1/organizations/{id}"), &app.admin_key, json!({"plan": "enterprise", "email": null}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["plan"], "enterprise");
    assert_eq!(r.body["email"], json!(null));
}

#[tokio::test]
async fn duplicate_slug_conflicts() {
    let app = TestApp::sqlite().await;
    let r = app.post("/v1/organizations", &app.admin_key, json!({"name": "x", "slug": "default"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(code(&r), "conflict");
}

async fn bad_create(body: serde_json::Value, want: &str, field: Option<&str>) {
    let app = TestApp::sqlite().await;
    let r = app.post("/v1/organizations", &app.admin_key, body.clone()).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {}", r.text);
    assert_eq!(code(&r), want, "{body}");
    if let Some(f) = field {
        assert_eq!(r.body["error"]["field"], f);
    }
    let list = app.get("/v1/organizations", &app.admin_key).await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1, "no partial write");
}

#[tokio::test]
async fn bad_slug() {
    bad_create(json!({"name": "x", "slug": "Not A Slug"}), "validation_failed", Some("slug")).await;
}

#[tokio::test]
async fn bad_email() {
    bad_create(json!({"name": "x", "slug": "x", "email": "nope"}), "validation_failed", Some("email")).await;
}

#[tokio::test]
async fn bad_plan() {
    bad_create(json!({"name": "x", "slug": "x", "plan": "gold"}), "validation_failed", Some("plan")).await;
}

#[tokio::test]
async fn negative_limit() {
    bad_create(json!({"name": "x", "slug": "x", "max_api_keys": -1}), "validation_failed", Some("max_api_keys")).await;
}

#[tokio::test]
async fn missing_slug() {
    bad_create(json!({"name": "x"}), "invalid_request", None).await;
}

#[tokio::test]
async fn unknown_org_field() {
    bad_create(json!({"name": "x", "slug": "x", "owner": "me"}), "invalid_request", None).await;
}

#[tokio::test]
async fn unknown_and_malformed_org_ids_are_404() {
    let app = TestApp::sqlite().await;
    for path in ["/v1/organizations/0190c6d1-0000-7000-8000-000000000000", "/v1/organizations/acme"] {
        let r = app.get(path, &app.admin_key).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        let r = app.patch(path, &app.admin_key, json!({"name": "y"})).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn bad_update() {
    let app = TestApp::sqlite().await;
    let path = format!("/v1/organizations/{}", app.default_org.id);
    for (body, want) in [
        (json!({"plan": "gold"}), "validation_failed"),
        (json!({"slug": "new"}), "invalid_request"),
        (json!({"is_active": "yes"}), "invalid_request"),
        (json!({"rate_limit_per_day": -5}), "validation_failed"),
    ] {
        let r = app.patch(&path, &app.admin_key, body.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(code(&r), want, "{body}");
    }
    assert_eq!(app.get(&path, &app.admin_key).await.body["plan"], "free");
}

#[tokio::test]
async fn non_admin_cannot_touch_organizations() {
    let app = TestApp::sqlite().await;
    let (writer, _) = app.key(app.default_org.id, &["keyward:keys:write", "keyward:audit:read", "*"]).await;
    let r = app.get("/v1/organizations", &writer).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(code(&r), "insufficient_scope");
    let r = app.post("/v1/organizations", &writer, json!({"name": "x", "slug": "x"})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}
