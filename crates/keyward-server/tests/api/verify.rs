use axum::http::StatusCode;
use chrono::Duration;
use keyward_server::service::CreateKeyRequest;
use serde_json::json;

use crate::helpers::{TestApp, code};

#[tokio::test]
async fn valid_key_answers_with_its_identity() {
    let app = TestApp::sqlite().await;
    let (key, rec) = app
        .key_with(
            app.default_org.id,
            CreateKeyRequest {
                name: "k".into(),
                owner_id: Some("user_1".into()),
                scopes: vec!["read:*".into()],
                metadata: Some(json!({"company": "Acme"})),
                ..Default::default()
            },
        )
        .await;
    let v = app.verify(&key, json!({"required_scopes": ["read:projects"]})).await;
    assert_eq!(v["valid"], true);
    assert_eq!(v["code"], "VALID");
    assert_eq!(v["key_id"], rec.id.to_string());
    assert_eq!(v["organization_id"], app.default_org.id.to_string());
    assert_eq!(v["owner_id"], "user_1");
    assert_eq!(v["environment"], "live");
    assert_eq!(v["scopes"], json!(["read:*"]));
    assert_eq!(v["metadata"]["company"], "Acme");
    assert_eq!(v["expires_at"], json!(null));
}

#[tokio::test]
async fn each_outcome_in_order() {
    let app = TestApp::sqlite().await;
    let org = app.org("acme").await;
    let (key, rec) = app
        .key_with(
            org.id,
            CreateKeyRequest {
                name: "k".into(),
                scopes: vec!["read:projects".into()],
                allowed_ips: vec!["10.0.0.0/8".into()],
                expires_in_days: Some(7),
                ..Default::default()
            },
        )
        .await;
    let inside = json!({"ip": "10.1.1.1", "required_scopes": ["read:projects"]});
    assert_eq!(app.verify(&key, inside.clone()).await["code"], "VALID");
    assert_eq!(app.verify("sk_live_garbage", json!({})).await["code"], "MALFORMED");
    assert_eq!(app.verify("", json!({})).await["code"], "MALFORMED");
    let mut typo = key.clone();
    typo.replace_range(10..11, if &key[10..11] == "a" { "b" } else { "a" });
    assert_eq!(app.verify(&typo, json!({})).await["code"], "MALFORMED");
    let (other, _) = app.key(org.id, &[]).await;
    app.state
        .store
        .revoke_key(
            app.state.store.find_key_by_hash(&hash(&app, &other)).await.unwrap().unwrap().key.id,
            "x",
            keyward_core::Clock::now(&app.clock),
            &keyward_store::Actor::cli(keyward_core::Clock::now(&app.clock)),
        )
        .await
        .unwrap()
        .apply(&app.state.keys);
    assert_eq!(app.verify(&other, json!({})).await["code"], "REVOKED");
    assert_eq!(app.verify(&key, json!({"ip": "11.1.1.1"})).await["code"], "IP_NOT_ALLOWED");
    assert_eq!(app.verify(&key, json!({})).await["code"], "IP_NOT_ALLOWED");
    assert_eq!(
        app.verify(&key, json!({"ip": "10.1.1.1", "required_scopes": ["write:projects"]})).await["code"],
        "INSUFFICIENT_SCOPE"
    );
    assert_eq!(
        app.verify(&key, json!({"ip": "10.1.1.1", "required_scopes": ["keyward:verify"]})).await["code"],
        "INSUFFICIENT_SCOPE"
    );

    // Organization disabled → ORG_DISABLED.
    let r = app.patch(&format!("/v1/organizations/{}", org.id), &app.admin_key, json!({"is_active": false})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(app.verify(&key, inside.clone()).await["code"], "ORG_DISABLED");
    app.patch(&format!("/v1/organizations/{}", org.id), &app.admin_key, json!({"is_active": true})).await;

    // Expiry with the injected clock: valid until the moment, expired from it on. No sleeping.
    app.clock.advance(Duration::days(7) - Duration::seconds(1));
    assert_eq!(app.verify(&key, inside.clone()).await["code"], "VALID");
    app.clock.advance(Duration::seconds(1));
    assert_eq!(app.verify(&key, inside.clone()).await["code"], "EXPIRED");

    // Disabled wins over expired.
    app.patch(&format!("/v1/keys/{}", rec.id), &app.admin_key, json!({"is_active": false})).await;
    assert_eq!(app.verify(&key, inside).await["code"], "DISABLED");
}

fn hash(app: &TestApp, key: &str) -> keyward_core::KeyHash {
    app.state.hasher.candidates(key).next().unwrap().1
}

#[tokio::test]
async fn unknown_key_is_not_found() {
    let app = TestApp::sqlite().await;
    let never_stored =
        keyward_core::PlainKey::generate(&keyward_core::KeyPrefix::default(), keyward_core::Environment::Live).unwrap();
    let v = app.verify(never_stored.expose_secret(), json!({})).await;
    assert_eq!(
        v,
        json!({"valid": false, "code": "NOT_FOUND", "key_id": null, "organization_id": null, "owner_id": null,
        "environment": null, "scopes": null, "metadata": null, "expires_at": null, "rate_limit": null, "quota": null})
    );
}

#[tokio::test]
async fn caller_needs_keyward_verify() {
    let app = TestApp::sqlite().await;
    let (plain, _) = app.key(app.default_org.id, &["read:*", "*"]).await;
    let r = app.post("/v1/verify", &plain, json!({"key": plain})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(code(&r), "insufficient_scope");
    let (verifier, _) = app.key(app.default_org.id, &["keyward:verify"]).await;
    let r = app.post("/v1/verify", &verifier, json!({"key": plain})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["code"], "VALID");
}

#[tokio::test]
async fn verified_use_is_recorded_after_the_answer() {
    let app = TestApp::sqlite().await;
    let (key, rec) = app.key(app.default_org.id, &[]).await;
    for _ in 0..3 {
        app.verify(&key, json!({"ip": "198.51.100.4"})).await;
    }
    let before = app.state.store.get_key(rec.id).await.unwrap();
    assert_eq!(before.total_requests, 0, "usage is written in batches, not on the request path");
    app.state.usage.flush().await;
    let after = app.state.store.get_key(rec.id).await.unwrap();
    assert_eq!(after.total_requests, 3);
    assert_eq!(after.last_used_ip.as_deref(), Some("198.51.100.4"));
    assert!(after.last_used_at.is_some());
}

async fn bad_verify(body: serde_json::Value, status: StatusCode, want: &str) {
    let app = TestApp::sqlite().await;
    let r = app.post("/v1/verify", &app.admin_key, body.clone()).await;
    assert_eq!(r.status, status, "{body}: {}", r.text);
    assert_eq!(code(&r), want, "{body}");
}

#[tokio::test]
async fn missing_key_field() {
    bad_verify(json!({}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request").await;
}

#[tokio::test]
async fn key_of_wrong_type() {
    bad_verify(json!({"key": 42}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request").await;
}

#[tokio::test]
async fn bad_required_scope() {
    bad_verify(
        json!({"key": "x", "required_scopes": ["no scope"]}),
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
}

#[tokio::test]
async fn bad_ip() {
    bad_verify(json!({"key": "x", "ip": "localhost"}), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
}

#[tokio::test]
async fn unknown_field() {
    bad_verify(json!({"key": "x", "tenant": "y"}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request").await;
}

#[tokio::test]
async fn body_not_json() {
    let app = TestApp::sqlite().await;
    let mut req = crate::helpers::request(axum::http::Method::POST, "/v1/verify", Some(&app.admin_key), None);
    req.headers_mut().insert("content-type", "application/json".parse().unwrap());
    *req.body_mut() = axum::body::Body::from("key=abc");
    let r = app.send(req).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(code(&r), "invalid_json");
}
