use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{TestApp, code, request};

#[tokio::test]
async fn create_returns_the_key_once_with_no_store() {
    let app = TestApp::sqlite().await;
    let r = app
        .post(
            "/v1/keys",
            &app.admin_key,
            json!({
                "name": "acme backend",
                "description": "prod",
                "owner_id": "user_42",
                "environment": "test",
                "prefix": "pk",
                "scopes": ["read:projects", "write:*"],
                "allowed_ips": ["10.0.0.0/8", "2001:db8::1"],
                "expires_in_days": 30,
                "metadata": {"email": "a@acme.test", "company": "Acme"},
                "plan": "pro"
            }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");
    let key = r.body["key"].as_str().unwrap();
    assert!(key.starts_with("pk_test_"));
    let rec = &r.body["api_key"];
    assert_eq!(rec["name"], "acme backend");
    assert_eq!(rec["owner_id"], "user_42");
    assert_eq!(rec["environment"], "test");
    assert_eq!(rec["prefix"], "pk_test_");
    assert_eq!(rec["hint"], &key[key.len() - 4..]);
    assert_eq!(rec["scopes"], json!(["read:projects", "write:*"]));
    assert_eq!(rec["allowed_ips"], json!(["10.0.0.0/8", "2001:db8::1/128"]));
    assert_eq!(rec["status"], "active");
    assert_eq!(rec["is_active"], true);
    assert_eq!(rec["plan"], "pro");
    assert_eq!(rec["metadata"]["company"], "Acme");
    assert_eq!(rec["expires_at"], "2026-07-01T12:00:00Z");
    assert_eq!(rec["total_requests"], 0);
    for field in ["id", "organization_id", "created_at", "updated_at", "revoked_at", "last_used_at", "last_used_ip"] {
        assert!(rec.get(field).is_some(), "record lacks {field}");
    }
    assert!(rec.get("key_hash").is_none() && !r.text.contains("hash"));
    // The key works at once, and is never shown again.
    let id = rec["id"].as_str().unwrap();
    let again = app.get(&format!("/v1/keys/{id}"), &app.admin_key).await;
    assert!(!again.text.contains(key));
    assert_eq!(app.verify(key, json!({"ip": "10.1.2.3"})).await["code"], "VALID");
}

#[tokio::test]
async fn x_api_key_header_works_too() {
    let app = TestApp::sqlite().await;
    let mut req = request(Method::GET, "/v1/me", None, None);
    req.headers_mut().insert("x-api-key", app.admin_key.parse().unwrap());
    let r = app.send(req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn expires_at_is_accepted_in_rfc3339() {
    let app = TestApp::sqlite().await;
    let r = app.post("/v1/keys", &app.admin_key, json!({"name": "k", "expires_at": "2027-01-01T00:00:00+02:00"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["api_key"]["expires_at"], "2026-12-31T22:00:00Z");
}

/// Each body is refused with its status, code and field, and writes nothing: only the seeded admin
/// key exists afterwards.
#[tokio::test]
async fn bad_input_is_refused_with_its_field_and_writes_nothing() {
    const UNPROCESSABLE: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;
    let cases = [
        (json!({}), "invalid_request", None),
        (json!({"name": "  "}), "validation_failed", Some("name")),
        (json!({"name": 5}), "invalid_request", Some("name")),
        (json!({"name": "k", "scopes": ["read:x", "not a scope"]}), "validation_failed", Some("scopes[1]")),
        (json!({"name": "k", "scopes": ["keyward:root"]}), "validation_failed", Some("scopes[0]")),
        (json!({"name": "k", "scopes": "read:x"}), "invalid_request", Some("scopes")),
        (json!({"name": "k", "allowed_ips": ["10.0.0.300"]}), "validation_failed", Some("allowed_ips")),
        (json!({"name": "k", "allowed_ips": ["10.0.0.0/40"]}), "validation_failed", Some("allowed_ips")),
        (json!({"name": "k", "expires_at": "next tuesday"}), "validation_failed", Some("expires_at")),
        (json!({"name": "k", "expires_at": "2020-01-01T00:00:00Z"}), "validation_failed", Some("expires_at")),
        (json!({"name": "k", "expires_at": "9999-12-31T23:59:59-14:00"}), "validation_failed", Some("expires_at")),
        (
            json!({"name": "k", "expires_at": "2030-01-01T00:00:00Z", "expires_in_days": 3}),
            "validation_failed",
            Some("expires_in_days"),
        ),
        (json!({"name": "k", "expires_in_days": 0}), "validation_failed", Some("expires_in_days")),
        (json!({"name": "k", "prefix": "SK_"}), "validation_failed", Some("prefix")),
        (json!({"name": "k", "prefix": "abcdefghijklmnopq"}), "validation_failed", Some("prefix")),
        (json!({"name": "k", "environment": "prod"}), "validation_failed", Some("environment")),
        (json!({"name": "k", "metadata": [1, 2]}), "validation_failed", Some("metadata")),
        (json!({"name": "k", "plan": "platinum"}), "validation_failed", Some("plan")),
        (json!({"name": "k", "organization_id": "nope"}), "validation_failed", Some("organization_id")),
        (
            json!({"name": "k", "organization_id": "0190c6d1-0000-7000-8000-000000000000"}),
            "validation_failed",
            Some("organization_id"),
        ),
    ];
    let app = TestApp::sqlite().await;
    for (body, want_code, field) in cases {
        let r = app.post("/v1/keys", &app.admin_key, body.clone()).await;
        assert_eq!(r.status, UNPROCESSABLE, "{body}: {}", r.text);
        assert_eq!(code(&r), want_code, "{body}: {}", r.text);
        if let Some(field) = field {
            assert_eq!(r.body["error"]["field"], field, "{body}: {}", r.text);
            assert!(r.body["error"]["message"].as_str().unwrap().len() > 5);
        }
        let list = app.get("/v1/keys?include_inactive=true", &app.admin_key).await;
        assert_eq!(list.body["items"].as_array().unwrap().len(), 1, "a partial write: {body}");
    }
    let r = app.post("/v1/keys", &app.admin_key, json!({"name": "k", "colour": "red"})).await;
    assert_eq!(r.status, UNPROCESSABLE);
    assert_eq!(code(&r), "invalid_request");
    assert!(r.body["error"]["message"].as_str().unwrap().contains("colour"), "{}", r.text);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_refused() {
    let app = TestApp::sqlite().await;
    for (content_type, body, status, want) in [
        ("application/json", "{\"name\": ", StatusCode::BAD_REQUEST, "invalid_json"),
        ("text/plain", "{\"name\": \"k\"}", StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
    ] {
        let mut req = request(Method::POST, "/v1/keys", Some(&app.admin_key), None);
        req.headers_mut().insert("content-type", content_type.parse().unwrap());
        *req.body_mut() = axum::body::Body::from(body);
        let r = app.send(req).await;
        assert_eq!((r.status, code(&r)), (status, want), "{content_type} {body}");
    }
}

#[tokio::test]
async fn body_over_64_kib() {
    let app = TestApp::sqlite().await;
    let r = app.post("/v1/keys", &app.admin_key, json!({"name": "k", "description": "x".repeat(70 * 1024)})).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(code(&r), "payload_too_large");
}

#[tokio::test]
async fn max_api_keys_is_enforced() {
    let app = TestApp::sqlite().await;
    let v = keyward_server::service::Validator { plans: &app.state.plans, now: helpers_now(&app) };
    let new = keyward_server::service::CreateOrganizationRequest {
        name: "small".into(),
        slug: "small".into(),
        max_api_keys: Some(2),
        ..Default::default()
    }
    .validate(&v)
    .unwrap();
    let org = app.state.store.insert_org(new, &keyward_store::Actor::cli(helpers_now(&app))).await.unwrap();
    let (writer, _) = app.key(org.id, &["keyward:keys:write"]).await;
    let ok = app.post("/v1/keys", &writer, json!({"name": "second"})).await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text);
    let full = app.post("/v1/keys", &writer, json!({"name": "third"})).await;
    assert_eq!(full.status, StatusCode::CONFLICT);
    assert_eq!(code(&full), "key_limit_reached");
}

fn helpers_now(app: &TestApp) -> chrono::DateTime<chrono::Utc> {
    keyward_core::Clock::now(&app.clock)
}

#[tokio::test]
async fn a_key_grants_only_the_keyward_scopes_it_holds() {
    let app = TestApp::sqlite().await;
    let (writer, _) = app.key(app.default_org.id, &["keyward:keys:write", "read:*"]).await;
    let r = app.post("/v1/keys", &writer, json!({"name": "k", "scopes": ["keyward:admin"]})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(code(&r), "insufficient_scope");
    let r = app.post("/v1/keys", &writer, json!({"name": "k", "scopes": ["keyward:verify"]})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r =
        app.post("/v1/keys", &writer, json!({"name": "k", "scopes": ["keyward:keys:write", "write:anything"]})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}

#[tokio::test]
async fn self_service_keys_stay_within_their_owner_and_scopes() {
    let app = TestApp::sqlite().await;
    let (me, _) = app.owned_key(app.default_org.id, "cust_1", &["keyward:self", "read:*"]).await;
    let r = app.post("/v1/keys", &me, json!({"name": "mine", "scopes": ["read:projects"]})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["api_key"]["owner_id"], "cust_1");
    let r = app.post("/v1/keys", &me, json!({"name": "x", "scopes": ["write:projects"]})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    let r = app.post("/v1/keys", &me, json!({"name": "x", "owner_id": "cust_2"})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    let r = app.post("/v1/keys", &me, json!({"name": "x", "scopes": ["keyward:admin"]})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    // It lists only its own owner's keys.
    let _ = app.key(app.default_org.id, &["read:x"]).await;
    let list = app.get("/v1/keys", &me).await;
    let owners: Vec<_> = list.body["items"].as_array().unwrap().iter().map(|k| k["owner_id"].clone()).collect();
    assert_eq!(owners, vec![json!("cust_1"), json!("cust_1")]);
}
