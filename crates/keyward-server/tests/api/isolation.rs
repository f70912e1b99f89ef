//! A key sees and changes only its own organization's data; another organization's key id answers
//! 404 exactly like an id that does not exist, and verify answers NOT_FOUND.

use axum::http::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, on_every_backend};

on_every_backend!(organizations_cannot_see_each_other);

async fn organizations_cannot_see_each_other(app: TestApp) {
    let a = app.org("org-a").await;
    let b = app.org("org-b").await;
    let (a_admin, _) = app.key(a.id, &["keyward:keys:write", "keyward:verify", "keyward:audit:read"]).await;
    let (b_key, b_rec) = app.key(b.id, &["read:x"]).await;
    let path = format!("/v1/keys/{}", b_rec.id);
    let missing = "/v1/keys/0190c6d1-0000-7000-8000-000000000000";

    let theirs = app.get(&path, &a_admin).await;
    let nobody = app.get(missing, &a_admin).await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND);
    assert_eq!(theirs.text, nobody.text, "another org's key looks exactly like a missing one");
    assert_eq!(app.patch(&path, &a_admin, json!({"name": "pwned"})).await.status, StatusCode::NOT_FOUND);
    assert_eq!(app.delete(&path, &a_admin).await.status, StatusCode::NOT_FOUND);
    assert_eq!(app.get(&path, &app.admin_key).await.body["name"], "test key", "unchanged");

    let list = app.get("/v1/keys?include_inactive=true", &a_admin).await;
    assert!(list.body["items"].as_array().unwrap().iter().all(|k| k["organization_id"] == a.id.to_string()));

    let v = app.post("/v1/verify", &a_admin, json!({"key": b_key})).await;
    assert_eq!(v.body["code"], "NOT_FOUND");
    assert_eq!(v.body["key_id"], json!(null));

    let audit = app.get("/v1/audit-logs", &a_admin).await;
    assert!(audit.body["items"].as_array().unwrap().iter().all(|r| r["organization_id"] == a.id.to_string()));

    let r = app.post("/v1/keys", &a_admin, json!({"name": "x", "organization_id": b.id.to_string()})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Admin sees everything.
    assert_eq!(app.post("/v1/verify", &app.admin_key, json!({"key": b_key})).await.body["code"], "VALID");
    let r = app.post("/v1/keys", &app.admin_key, json!({"name": "x", "organization_id": b.id.to_string()})).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body["api_key"]["organization_id"], b.id.to_string());
}
