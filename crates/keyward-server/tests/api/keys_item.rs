use axum::http::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, code, on_every_backend};

on_every_backend!(create_list_get_update_deactivate_reactivate_revoke);

/// The whole life of a key through the API, verified at every step.
async fn create_list_get_update_deactivate_reactivate_revoke(app: TestApp) {
    let r =
        app.post("/v1/keys", &app.admin_key, json!({"name": "test key", "scopes": ["read:x"], "owner_id": "u1"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let key = r.body["key"].as_str().unwrap().to_owned();
    let id = r.body["api_key"]["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/keys/{id}");
    assert_eq!(app.verify(&key, json!({"required_scopes": ["read:x"]})).await["code"], "VALID");

    let r = app.get("/v1/keys?owner_id=u1", &app.admin_key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let listed: Vec<&str> = r.body["items"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [id.as_str()]);

    let r = app.get(&path, &app.admin_key).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["name"], "test key");

    let r = app
        .patch(
            &path,
            &app.admin_key,
            json!({"name": "renamed", "description": "d", "scopes": ["read:x", "write:y"], "allowed_ips": ["192.0.2.0/24"],
                   "expires_at": "2030-01-01T00:00:00Z", "metadata": {"company": "Acme"}, "plan": "enterprise"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["name"], "renamed");
    assert_eq!(r.body["scopes"], json!(["read:x", "write:y"]));
    assert_eq!(r.body["allowed_ips"], json!(["192.0.2.0/24"]));
    assert_eq!(r.body["plan"], "enterprise");
    assert_eq!(r.body["expires_at"], "2030-01-01T00:00:00Z");

    // null clears nullable fields; absent fields stay.
    let r = app.patch(&path, &app.admin_key, json!({"description": null, "expires_at": null, "plan": null})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["description"], json!(null));
    assert_eq!(r.body["expires_at"], json!(null));
    assert_eq!(r.body["name"], "renamed");

    let r = app.patch(&path, &app.admin_key, json!({"is_active": false})).await;
    assert_eq!(r.body["status"], "disabled");
    assert_eq!(app.verify(&key, json!({"ip": "192.0.2.1"})).await["code"], "DISABLED");
    let r = app.patch(&path, &app.admin_key, json!({"is_active": true})).await;
    assert_eq!(r.body["status"], "active");
    assert_eq!(app.verify(&key, json!({"ip": "192.0.2.1"})).await["code"], "VALID");

    let r = app.delete(&path, &app.admin_key).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app.get(&path, &app.admin_key).await;
    assert_eq!(r.body["status"], "revoked");
    assert!(r.body["revoked_at"].is_string());
    assert_eq!(app.verify(&key, json!({"ip": "192.0.2.1"})).await["code"], "REVOKED");
    // Revoked is permanent: reactivating does not bring it back.
    let r = app.patch(&path, &app.admin_key, json!({"is_active": true})).await;
    assert_eq!(r.body["status"], "revoked");
    // Listed only with include_inactive; the audit trail has every step.
    assert_eq!(app.get("/v1/keys?owner_id=u1", &app.admin_key).await.body["items"], json!([]));
    let r = app.get("/v1/keys?owner_id=u1&include_inactive=true&status=revoked", &app.admin_key).await;
    assert_eq!(r.body["items"][0]["id"], id);
    let r = app.get(&format!("/v1/audit-logs?key_id={id}"), &app.admin_key).await;
    let actions: Vec<&str> =
        r.body["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["revoke", "activate", "deactivate", "update", "update", "create"]);
}

#[tokio::test]
async fn unknown_id_is_404() {
    let app = TestApp::sqlite().await;
    for method in ["get", "patch", "delete"] {
        let path = "/v1/keys/0190c6d1-0000-7000-8000-000000000000";
        let r = match method {
            "get" => app.get(path, &app.admin_key).await,
            "patch" => app.patch(path, &app.admin_key, json!({"name": "x"})).await,
            _ => app.delete(path, &app.admin_key).await,
        };
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{method}");
        assert_eq!(code(&r), "not_found");
    }
}

#[tokio::test]
async fn malformed_id_is_404() {
    let app = TestApp::sqlite().await;
    let r = app.get("/v1/keys/not-a-uuid", &app.admin_key).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(code(&r), "not_found");
    let r = app.delete("/v1/keys/123", &app.admin_key).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// Each patch is refused and changes nothing, not even the fields it named correctly.
#[tokio::test]
async fn a_bad_patch_is_refused_and_changes_nothing() {
    let app = TestApp::sqlite().await;
    let (_, rec) = app.key(app.default_org.id, &["read:x"]).await;
    let path = format!("/v1/keys/{}", rec.id);
    for (body, want) in [
        (json!({"name": "new", "scopes": ["bad scope"]}), "validation_failed"),
        (json!({"allowed_ips": ["300.1.1.1"]}), "validation_failed"),
        (json!({"expires_at": "soon"}), "validation_failed"),
        (json!({"expires_at": "9999-12-31T23:59:59-14:00"}), "validation_failed"),
        (json!({"key_hash": "00"}), "invalid_request"),
        (json!({"is_active": "no"}), "invalid_request"),
        (json!({"name": ""}), "validation_failed"),
    ] {
        let r = app.patch(&path, &app.admin_key, body.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {}", r.text);
        assert_eq!(code(&r), want, "{body}");
        let after = app.get(&path, &app.admin_key).await;
        assert_eq!(after.body["name"], "test key", "{body}");
        assert_eq!(after.body["scopes"], json!(["read:x"]), "{body}");
    }
}

#[tokio::test]
async fn patch_cannot_grant_unheld_reserved_scope() {
    let app = TestApp::sqlite().await;
    let (writer, _) = app.key(app.default_org.id, &["keyward:keys:write"]).await;
    let (_, rec) = app.key(app.default_org.id, &["read:x"]).await;
    let r = app.patch(&format!("/v1/keys/{}", rec.id), &writer, json!({"scopes": ["keyward:admin"]})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(code(&r), "insufficient_scope");
}
