use axum::http::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, code, on_every_backend};

#[tokio::test]
async fn every_change_is_audited_with_a_diff() {
    let app = TestApp::sqlite().await;
    let (auditor, auditor_rec) = app.key(app.default_org.id, &["keyward:audit:read", "keyward:keys:write"]).await;
    let r = app.post("/v1/keys", &auditor, json!({"name": "first", "scopes": ["read:x"]})).await;
    let id = r.body["api_key"]["id"].as_str().unwrap().to_owned();
    app.patch(&format!("/v1/keys/{id}"), &auditor, json!({"name": "second", "scopes": ["read:x"]})).await;
    app.patch(&format!("/v1/keys/{id}"), &auditor, json!({"is_active": false})).await;
    app.patch(&format!("/v1/keys/{id}"), &auditor, json!({"is_active": true})).await;
    app.delete(&format!("/v1/keys/{id}"), &auditor).await;

    let r = app.get(&format!("/v1/audit-logs?key_id={id}"), &auditor).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let rows = r.body["items"].as_array().unwrap();
    let actions: Vec<_> = rows.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(actions, vec!["revoke", "activate", "deactivate", "update", "create"]);
    for row in rows {
        assert_eq!(row["actor"], auditor_rec.id.to_string());
        assert_eq!(row["actor_ip"], "203.0.113.7");
        assert_eq!(row["organization_id"], app.default_org.id.to_string());
    }
    // Only the changed field is in the diff.
    assert_eq!(rows[3]["details"], json!({"before": {"name": "first"}, "after": {"name": "second"}}));
    assert_eq!(rows[2]["details"], json!({"before": {"is_active": true}, "after": {"is_active": false}}));
    assert_eq!(rows[4]["details"]["after"]["name"], "first");

    // Filters.
    let r = app.get("/v1/audit-logs?action=deactivate", &auditor).await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
    let r = app.get("/v1/audit-logs?actor=cli", &auditor).await;
    assert!(r.body["items"].as_array().unwrap().iter().all(|r| r["actor"] == "cli"));
    let r = app.get("/v1/audit-logs?since=2026-06-01T12:00:00Z&until=2026-06-01T12:00:01Z", &auditor).await;
    assert!(!r.body["items"].as_array().unwrap().is_empty());
    let r = app.get("/v1/audit-logs?since=2027-01-01T00:00:00Z", &auditor).await;
    assert!(r.body["items"].as_array().unwrap().is_empty());
    let r = app.get("/v1/audit-logs?limit=2", &auditor).await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 2);
    assert!(r.body["next_cursor"].is_string());
}

#[tokio::test]
async fn organization_changes_are_audited() {
    let app = TestApp::sqlite().await;
    let r = app.post("/v1/organizations", &app.admin_key, json!({"name": "A", "slug": "a"})).await;
    let id = r.body["id"].as_str().unwrap().to_owned();
    app.patch(&format!("/v1/organizations/{id}"), &app.admin_key, json!({"plan": "pro"})).await;
    let r = app.get("/v1/audit-logs", &app.admin_key).await;
    let row = &r.body["items"][0];
    assert_eq!(row["action"], "update");
    assert_eq!(row["organization_id"], id);
    assert_eq!(row["details"], json!({"before": {"plan": "free"}, "after": {"plan": "pro"}}));
}

#[tokio::test]
async fn audit_needs_the_scope() {
    let app = TestApp::sqlite().await;
    let (k, _) = app.key(app.default_org.id, &["keyward:keys:write"]).await;
    let r = app.get("/v1/audit-logs", &k).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn bad_audit_queries() {
    let app = TestApp::sqlite().await;
    for q in ["?since=yesterday", "?until=1", "?key_id=abc", "?cursor=abc", "?limit=0"] {
        let r = app.get(&format!("/v1/audit-logs{q}"), &app.admin_key).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(code(&r), "invalid_query", "{q}");
    }
}

on_every_backend!(verify_names_the_row_that_was_changed);

/// `GET /v1/audit-logs/verify`: intact after ordinary writes; after one row is edited directly in the
/// database, it names that row.
async fn verify_names_the_row_that_was_changed(app: TestApp) {
    for name in ["a", "b", "c"] {
        let r = app.post("/v1/keys", &app.admin_key, json!({"name": name})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    let r = app.get("/v1/audit-logs/verify", &app.admin_key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["intact"], true, "{}", r.text);
    assert!(r.body["rows_checked"].as_u64().unwrap() >= 5, "{}", r.text);
    assert_eq!(r.body["broken"], json!(null));

    let rows = app.get("/v1/audit-logs?limit=100", &app.admin_key).await.body["items"].clone();
    let target = rows[1]["id"].as_i64().unwrap();
    app.exec_sql(&format!("UPDATE audit_log SET actor = 'someone-else' WHERE id = {target}")).await;
    let r = app.get("/v1/audit-logs/verify", &app.admin_key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["intact"], false, "{}", r.text);
    assert_eq!(r.body["broken"], json!({"id": target, "reason": "content_changed"}), "{}", r.text);

    // Only keyward:admin walks the chain: it spans every organization.
    let (auditor, _) = app.key(app.default_org.id, &["keyward:audit:read"]).await;
    let r = app.get("/v1/audit-logs/verify", &auditor).await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"));
}
