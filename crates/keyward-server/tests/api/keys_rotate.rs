//! `POST /v1/keys/{id}/rotate`: a new key with the same settings, the old one valid for the grace
//! period and `REVOKED` after it, counters shared by the pair, 409 on a second rotation.

use axum::http::StatusCode;
use chrono::Duration;
use keyward_core::OrgId;
use keyward_server::service::CreateKeyRequest;
use keyward_store::{Actor, KeyPatch, LimitPatch, OrganizationPatch};
use serde_json::{Value, json};

use crate::helpers::{NowUtc, TestApp, code, on_every_backend};

on_every_backend!(rotation_keeps_the_old_key_for_the_grace_period, the_pair_shares_quota_and_rate_limits);

async fn rotate(app: &TestApp, caller: &str, id: impl std::fmt::Display, body: Value) -> crate::helpers::Response {
    app.post(&format!("/v1/keys/{id}/rotate"), caller, body).await
}

async fn rotation_keeps_the_old_key_for_the_grace_period(app: TestApp) {
    let (old_key, old) = app
        .key_with(
            app.default_org.id,
            CreateKeyRequest {
                name: "billing".into(),
                description: Some("d".into()),
                owner_id: Some("u1".into()),
                scopes: vec!["read:x".into(), "write:y".into()],
                allowed_ips: vec!["192.0.2.0/24".into()],
                expires_in_days: Some(30),
                metadata: Some(json!({"company": "Acme"})),
                plan: Some("pro".into()),
                ..Default::default()
            },
        )
        .await;
    app.clock.advance(Duration::days(10));
    let r = rotate(&app, &app.admin_key, old.id, json!({"grace_period_seconds": 3600})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");
    let new_key = r.body["key"].as_str().unwrap().to_owned();
    let new = &r.body["api_key"];
    let former = &r.body["old_api_key"];
    let new_id = new["id"].as_str().unwrap();
    assert_eq!(new["rotated_from"], json!(old.id));
    assert_eq!(former["replaced_by"], json!(new_id));
    assert_eq!(former["revoke_reason"], "rotated");
    assert_eq!(former["status"], "active", "valid during the grace period");
    for field in
        ["name", "description", "owner_id", "scopes", "allowed_ips", "metadata", "plan", "environment", "prefix"]
    {
        assert_eq!(new[field], former[field], "{field} is copied");
    }
    // The same lifetime (30 days), counted from the rotation.
    let expires = chrono::DateTime::parse_from_rfc3339(new["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires.with_timezone(&chrono::Utc), app.clock.now_utc() + Duration::days(30));

    let ip = json!({"ip": "192.0.2.1"});
    assert_eq!(app.verify(&old_key, ip.clone()).await["code"], "VALID", "old key during the grace period");
    assert_eq!(app.verify(&new_key, ip.clone()).await["code"], "VALID");
    app.clock.advance(Duration::seconds(3599));
    assert_eq!(app.verify(&old_key, ip.clone()).await["code"], "VALID", "one second before the end");
    app.clock.advance(Duration::seconds(1));
    assert_eq!(app.verify(&old_key, ip.clone()).await["code"], "REVOKED", "after the grace period");
    assert_eq!(app.verify(&new_key, ip.clone()).await["code"], "VALID");
    let r = app.get(&format!("/v1/keys/{}", old.id), &app.admin_key).await;
    assert_eq!(r.body["status"], "revoked");

    // Rotated once: never again.
    let r = rotate(&app, &app.admin_key, old.id, json!({})).await;
    assert_eq!((r.status, code(&r)), (StatusCode::CONFLICT, "conflict"), "{}", r.text);
    // Audited on both keys.
    let r = app.get(&format!("/v1/audit-logs?key_id={}", old.id), &app.admin_key).await;
    assert_eq!(r.body["items"][0]["action"], "rotate");
    assert_eq!(r.body["items"][0]["details"]["replaced_by"], json!(new_id));
    let r = app.get(&format!("/v1/audit-logs?key_id={new_id}"), &app.admin_key).await;
    assert_eq!(r.body["items"][0]["action"], "create");
    // SECURITY: neither key appears in the audit trail.
    let r = app.get("/v1/audit-logs?limit=100", &app.admin_key).await;
    assert!(!r.text.contains(&new_key) && !r.text.contains(&old_key));

    // Grace 0 (the default): the old key stops at once; a new name may be given.
    let (k, rec) = app.key(app.default_org.id, &["read:x"]).await;
    let r = rotate(&app, &app.admin_key, rec.id, json!({"name": "fresh"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["api_key"]["name"], "fresh");
    assert_eq!(r.body["old_api_key"]["status"], "revoked");
    assert_eq!(app.verify(&k, json!({})).await["code"], "REVOKED");
}

/// A key with its own monthly quota of 3 and 2 requests a minute: the old and new key draw from one
/// counter each, so rotating never doubles the allowance.
async fn the_pair_shares_quota_and_rate_limits(app: TestApp) {
    let (old_key, old) = app.key(app.default_org.id, &[]).await;
    let limits = KeyPatch {
        limits: LimitPatch {
            monthly_request_limit: Some(Some(3)),
            rate_limit_per_minute: Some(Some(2)),
            ..Default::default()
        },
        ..Default::default()
    };
    app.state.store.update_key(old.id, limits, &Actor::cli(app.clock.now_utc())).await.unwrap().apply(&app.state.keys);
    assert_eq!(app.verify(&old_key, json!({})).await["code"], "VALID");
    assert_eq!(app.verify(&old_key, json!({})).await["code"], "VALID");
    let r = rotate(&app, &app.admin_key, old.id, json!({"grace_period_seconds": 86400})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let new_key = r.body["key"].as_str().unwrap().to_owned();
    let v = app.verify(&new_key, json!({})).await;
    assert_eq!(v["code"], "RATE_LIMITED", "the minute's 2 requests were spent by the old key: {v}");
    app.clock.advance(Duration::minutes(1));
    let v = app.verify(&new_key, json!({})).await;
    assert_eq!((v["code"].as_str(), v["quota"]["used"].as_u64()), (Some("VALID"), Some(3)), "{v}");
    app.clock.advance(Duration::minutes(1));
    assert_eq!(app.verify(&old_key, json!({})).await["code"], "QUOTA_EXCEEDED");
    assert_eq!(app.verify(&new_key, json!({})).await["code"], "QUOTA_EXCEEDED");
}

#[tokio::test]
async fn max_api_keys_does_not_block_a_rotation() {
    let app = TestApp::sqlite().await;
    let org = app.org("capped").await;
    let (_, k) = app.key(org.id, &[]).await;
    let patch = OrganizationPatch { max_api_keys: Some(Some(1)), ..Default::default() };
    app.state.store.update_org(org.id, patch, &Actor::cli(app.clock.now_utc())).await.unwrap().apply(&app.state.keys);
    let r = app.post("/v1/keys", &app.admin_key, json!({"name": "x", "organization_id": org.id})).await;
    assert_eq!(code(&r), "key_limit_reached");
    let r = rotate(&app, &app.admin_key, k.id, json!({"grace_period_seconds": 60})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}

#[tokio::test]
async fn bad_inputs_are_refused() {
    let app = TestApp::sqlite().await;
    let (_, k) = app.key(app.default_org.id, &[]).await;
    for (body, status, error, field) in [
        (json!({"grace_period_seconds": -1}), 422, "validation_failed", Some("grace_period_seconds")),
        (json!({"grace_period_seconds": 604801}), 422, "validation_failed", Some("grace_period_seconds")),
        (json!({"grace_period_seconds": "1h"}), 422, "invalid_request", None),
        (json!({"name": ""}), 422, "validation_failed", Some("name")),
        (json!({"scopes": ["*"]}), 422, "invalid_request", None),
    ] {
        let r = rotate(&app, &app.admin_key, k.id, body.clone()).await;
        assert_eq!((r.status.as_u16(), code(&r)), (status, error), "{body}: {}", r.text);
        if let Some(field) = field {
            assert_eq!(r.body["error"]["field"], field, "{body}");
        }
    }
    let r = app
        .send(
            axum::http::Request::builder()
                .method("POST")
                .uri(format!("/v1/keys/{}/rotate", k.id))
                .header("authorization", format!("Bearer {}", app.admin_key))
                .header("content-type", "application/json")
                .extension(axum::extract::ConnectInfo(std::net::SocketAddr::from(([203, 0, 113, 7], 1))))
                .body(axum::body::Body::from("{not json"))
                .unwrap(),
        )
        .await;
    assert_eq!(code(&r), "invalid_json");
    let r = rotate(&app, &app.admin_key, "not-a-uuid", json!({})).await;
    assert_eq!(r.status.as_u16() / 100, 4, "{}", r.text);
    let r = rotate(&app, &app.admin_key, keyward_core::KeyId::new(), json!({})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // Nothing was rotated by any of these.
    let r = app.get(&format!("/v1/keys/{}", k.id), &app.admin_key).await;
    assert_eq!(r.body["replaced_by"], Value::Null);
}

#[tokio::test]
async fn callers_rotate_only_what_they_may_see_and_grant() {
    let app = TestApp::sqlite().await;
    let other: OrgId = app.org("other").await.id;
    let (_, foreign) = app.key(other, &[]).await;
    let (writer, _) = app.key(app.default_org.id, &["keyward:keys:write", "keyward:keys:read"]).await;
    // Another organization's key does not exist for this caller.
    let r = rotate(&app, &writer, foreign.id, json!({})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    // An admin key's successor would be an admin key: refused to a caller without keyward:admin.
    let (_, admin_rec) = app.key(app.default_org.id, &["keyward:admin"]).await;
    let r = rotate(&app, &writer, admin_rec.id, json!({})).await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"), "{}", r.text);
    // Read-only callers cannot rotate.
    let (reader, _) = app.key(app.default_org.id, &["keyward:keys:read"]).await;
    let (_, plain) = app.key(app.default_org.id, &["read:x"]).await;
    let r = rotate(&app, &reader, plain.id, json!({})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // The writer rotates an ordinary key of its organization; admin rotates any organization's.
    let r = rotate(&app, &writer, plain.id, json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = rotate(&app, &app.admin_key, foreign.id, json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["api_key"]["organization_id"], json!(other));

    // keyward:self: only its own owner's keys.
    let owned = |owner: &str| CreateKeyRequest { name: "k".into(), owner_id: Some(owner.into()), ..Default::default() };
    let (me, _) = app
        .key_with(
            app.default_org.id,
            CreateKeyRequest { scopes: vec!["keyward:self".into(), "write:projects".into()], ..owned("alice") },
        )
        .await;
    let (_, mine) = app
        .key_with(app.default_org.id, CreateKeyRequest { scopes: vec!["write:projects".into()], ..owned("alice") })
        .await;
    let (_, theirs) = app.key_with(app.default_org.id, owned("bob")).await;
    let r = rotate(&app, &me, theirs.id, json!({})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let r = rotate(&app, &me, mine.id, json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["api_key"]["owner_id"], "alice");
    assert_eq!(r.body["api_key"]["scopes"], json!(["write:projects"]), "the owner keeps what it had");
    // Customer scopes the caller's own do not cover are refused, as on creation (escalation.rs).
    // But never a key with keyward: scopes the caller lacks.
    let (_, powerful) = app
        .key_with(app.default_org.id, CreateKeyRequest { scopes: vec!["keyward:keys:write".into()], ..owned("alice") })
        .await;
    let r = rotate(&app, &me, powerful.id, json!({})).await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"), "{}", r.text);
}
