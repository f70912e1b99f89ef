use axum::http::{Method, StatusCode};

use crate::helpers::{TestApp, code};

#[tokio::test]
async fn me_shows_the_calling_key_and_its_organization() {
    let app = TestApp::sqlite().await;
    let (k, rec) = app.key(app.default_org.id, &["read:x"]).await;
    let r = app.get("/v1/me", &k).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["key"]["id"], rec.id.to_string());
    assert_eq!(r.body["organization"]["slug"], "default");
    assert_eq!(
        r.body["limits"],
        serde_json::json!({"per_minute": 60, "per_hour": 1000, "per_day": 10000, "per_month": 10000})
    );
    assert_eq!(r.body["quota"]["used"], 0);
    // Verifications of the key show in /v1/me; reading /v1/me spends nothing.
    app.verify(&k, serde_json::json!({"cost": 3})).await;
    let r = app.get("/v1/me", &k).await;
    assert_eq!(r.body["quota"]["used"], 3);
    assert_eq!(r.body["rate_limit"]["remaining"], 59);
    assert_eq!(app.get("/v1/me", &k).await.body["rate_limit"]["remaining"], 59);
}

#[tokio::test]
async fn health_and_readiness() {
    let app = TestApp::sqlite().await;
    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!((r.status, r.body["status"].as_str()), (StatusCode::OK, Some("ok")));
    let r = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!((r.status, r.body["status"].as_str()), (StatusCode::OK, Some("ready")));
}

#[tokio::test]
async fn request_ids_are_echoed() {
    let app = TestApp::sqlite().await;
    // None sent: one is made (a UUID), a new one for each request.
    let made =
        |r: &crate::helpers::Response| r.headers["x-request-id"].to_str().unwrap().parse::<uuid::Uuid>().unwrap();
    let first = made(&app.call(Method::GET, "/healthz", None, None).await);
    let second = made(&app.call(Method::GET, "/healthz", None, None).await);
    assert_ne!(first, second);
    // One sent (a client's or a proxy's): the same comes back, on a matched route and on an unknown one.
    for path in ["/healthz", "/v1/nothing"] {
        let mut req = crate::helpers::request(Method::GET, path, None, None);
        req.headers_mut().insert("x-request-id", "edge-7f3a".parse().unwrap());
        let r = app.send(req).await;
        assert_eq!(r.headers["x-request-id"], "edge-7f3a", "{path}");
    }
}

#[tokio::test]
async fn unknown_route_and_wrong_method() {
    let app = TestApp::sqlite().await;
    let r = app.call(Method::GET, "/v1/nothing", None, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(code(&r), "not_found");
    let r = app.call(Method::PUT, "/v1/keys", Some(&app.admin_key), None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(code(&r), "method_not_allowed");
}

#[tokio::test]
async fn openapi_lists_every_route() {
    let app = TestApp::sqlite().await;
    let r = app.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let paths = r.body["paths"].as_object().unwrap();
    for p in [
        "/v1/verify",
        "/v1/keys",
        "/v1/keys/{id}",
        "/v1/me",
        "/v1/organizations",
        "/v1/organizations/{id}",
        "/v1/audit-logs",
        "/healthz",
        "/readyz",
    ] {
        assert!(paths.contains_key(p), "{p} missing from openapi");
    }
    assert!(r.body["components"]["schemas"]["ErrorBody"].is_object());
}
