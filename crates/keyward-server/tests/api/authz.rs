//! The authorization matrix: every route in `/openapi.json`, called by a key that lacks the scope it
//! needs, answers 403; called without a key, 401. A route missing here fails the test.

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::helpers::TestApp;

/// (method, path, the scope that is needed, or None for "any valid key" / public).
const MATRIX: &[(&str, &str, Option<&str>)] = &[
    ("post", "/v1/verify", Some("keyward:verify")),
    ("post", "/v1/usage", Some("keyward:verify")),
    ("get", "/v1/keys/{id}/usage", Some("keyward:keys:read")),
    ("get", "/v1/organizations/{id}/usage", Some("keyward:keys:read")),
    ("post", "/v1/keys", Some("keyward:keys:write")),
    ("get", "/v1/keys", Some("keyward:keys:read")),
    ("get", "/v1/keys/{id}", Some("keyward:keys:read")),
    ("patch", "/v1/keys/{id}", Some("keyward:keys:write")),
    ("delete", "/v1/keys/{id}", Some("keyward:keys:write")),
    ("post", "/v1/keys/{id}/rotate", Some("keyward:keys:write")),
    ("get", "/v1/keys/expiring", Some("keyward:keys:read")),
    ("post", "/v1/keys/cleanup-expired", Some("keyward:keys:write")),
    ("post", "/v1/keys/import", Some("keyward:admin")),
    ("get", "/v1/me", None),
    ("post", "/v1/organizations", Some("keyward:admin")),
    ("get", "/v1/organizations", Some("keyward:admin")),
    ("get", "/v1/organizations/{id}", Some("keyward:admin")),
    ("patch", "/v1/organizations/{id}", Some("keyward:admin")),
    ("get", "/v1/audit-logs", Some("keyward:audit:read")),
    ("get", "/v1/audit-logs/verify", Some("keyward:admin")),
    ("post", "/v1/webhooks", Some("keyward:keys:write")),
    ("get", "/v1/webhooks", Some("keyward:keys:write")),
    ("get", "/v1/webhooks/{id}", Some("keyward:keys:write")),
    ("patch", "/v1/webhooks/{id}", Some("keyward:keys:write")),
    ("delete", "/v1/webhooks/{id}", Some("keyward:keys:write")),
    ("get", "/v1/webhooks/{id}/deliveries", Some("keyward:keys:write")),
    ("post", "/v1/webhooks/{id}/deliveries/{delivery_id}/retry", Some("keyward:keys:write")),
    ("get", "/healthz", None),
    ("get", "/readyz", None),
    ("get", "/metrics", None),
];

const PUBLIC: &[&str] = &["/healthz", "/readyz", "/metrics"];

#[tokio::test]
async fn every_route_is_in_the_matrix() {
    let app = TestApp::sqlite().await;
    let spec = app.call(Method::GET, "/openapi.json", None, None).await.body;
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            assert!(
                MATRIX.iter().any(|(m, p, _)| m == method && p == path),
                "{method} {path} is in /openapi.json but not in the authorization matrix"
            );
        }
    }
}

#[tokio::test]
async fn each_route_refuses_a_key_without_its_scope_and_a_request_without_a_key() {
    let mut app = TestApp::sqlite().await;
    // Every anonymous call below is a failed authentication from one address.
    app.state.protection.failed_auth_per_minute = 1_000;
    let (_, target) = app.key(app.default_org.id, &[]).await;
    let all_but = |needed: &str| -> Vec<&str> {
        ["keyward:keys:read", "keyward:keys:write", "keyward:verify", "keyward:audit:read", "read:*", "*"]
            .into_iter()
            .filter(|s| *s != needed && !(needed == "keyward:keys:read" && *s == "keyward:keys:write"))
            .collect()
    };
    for (method, path, needed) in MATRIX {
        let concrete = path
            .replace(
                "{id}",
                &if path.contains("organizations") { app.default_org.id.to_string() } else { target.id.to_string() },
            )
            .replace("{delivery_id}", &target.id.to_string());
        let method: Method = method.to_uppercase().parse().unwrap();
        let body = matches!(method, Method::POST | Method::PATCH).then(|| json!({}));
        let anonymous = app.call(method.clone(), &concrete, None, body.clone()).await;
        if PUBLIC.contains(path) {
            assert_eq!(anonymous.status, StatusCode::OK, "{method} {path}");
            continue;
        }
        assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED, "{method} {path} without a key");
        if let Some(needed) = needed {
            let (lacking, _) = app.key(app.default_org.id, &all_but(needed)).await;
            let r = app.call(method.clone(), &concrete, Some(&lacking), body.clone()).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {path} without {needed}: {}", r.text);
        }
    }
}
