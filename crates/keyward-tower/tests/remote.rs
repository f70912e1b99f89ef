//! The layer against a remote Keyward over HTTP: a real server on 127.0.0.1:0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use axum::{Extension, Router};
use keyward_server::App;
use keyward_server::service::{self, CreateKeyRequest, Validator};
use keyward_server::settings::Settings;
use keyward_store::Actor;
use keyward_tower::{Identity, KeywardLayer, Remote};
use tower::ServiceExt;

#[tokio::test]
async fn remote_verification_gives_the_same_answers() {
    let dir = tempfile::TempDir::new().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("k.db").display());
    let App { state, tasks: _tasks } =
        App::builder(Settings { database_url, ..Settings::default() }).without_jobs().build().await.unwrap();
    let seeded = service::seed(&state, &Actor::cli(state.clock.now())).await.unwrap().unwrap();
    let v = Validator { plans: &state.plans, now: state.clock.now() };
    let mk = |scopes: &[&str]| {
        CreateKeyRequest {
            name: "k".into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .validate(&v, seeded.organization.id)
        .unwrap()
    };
    let (service_key, _) =
        service::create_key(&state, mk(&["keyward:verify"]), &Actor::cli(state.clock.now())).await.unwrap();
    let (customer, rec) =
        service::create_key(&state, mk(&["read:projects"]), &Actor::cli(state.clock.now())).await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_state = state.clone();
    tokio::spawn(async move {
        let _ = keyward_server::serve(listener, server_state, Default::default(), std::future::pending()).await;
    });

    let remote = Remote::new(&format!("http://{addr}"), service_key.expose_secret()).unwrap();
    let app = Router::new()
        .route("/projects", get(|Extension(who): Extension<Identity>| async move { who.key_id }))
        .layer(KeywardLayer::new(remote).require(&["read:projects"]).unwrap());
    let call = |key: &str| {
        let app = app.clone();
        let req =
            Request::get("/projects").header("authorization", format!("Bearer {key}")).body(Body::empty()).unwrap();
        async move {
            let res = tokio::time::timeout(Duration::from_secs(10), app.oneshot(req)).await.unwrap().unwrap();
            let status = res.status();
            let body = http_body_util::BodyExt::collect(res.into_body()).await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let (status, body) = call(customer.expose_secret()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, rec.id.to_string());
    let (status, body) = call(service_key.expose_secret()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("\"insufficient_scope\""), "{body}");
    let (status, _) = call("sk_live_x").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A Keyward that cannot be reached: 503, never a pass.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let app = Router::new()
        .route("/projects", get(|| async { "secret" }))
        .layer(KeywardLayer::new(Remote::new(&format!("http://{dead}"), "k").unwrap()));
    let req = Request::get("/projects").header("x-api-key", customer.expose_secret()).body(Body::empty()).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), app.oneshot(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = http_body_util::BodyExt::collect(res.into_body()).await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "verification_unavailable", "{body}");
}
