//! An axum API protected by Keyward in-process: `GET /projects` needs `read:projects`; the handler
//! reads who is calling from the request's extensions.
//!
//! Run: `cargo run -p keyward-tower --example axum_app` (uses ./keyward.db; prints a demo key).

use std::net::SocketAddr;

use axum::routing::get;
use axum::{Extension, Json, Router};
use keyward_server::settings::Settings;
use keyward_tower::{Identity, InProcess, KeywardLayer};
use serde_json::{Value, json};

/// The example's whole API.
pub fn app(verifier: InProcess) -> Router {
    let layer = KeywardLayer::new(verifier).require(&["read:projects"]).unwrap_or_else(|e| panic!("{e}"));
    Router::new().route("/projects", get(list_projects)).layer(layer).route("/health", get(|| async { "ok" }))
}

async fn list_projects(Extension(who): Extension<Identity>) -> Json<Value> {
    Json(json!({"owner": who.owner_id, "key_id": who.key_id, "projects": ["apollo", "gemini"]}))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The same node as `keyward serve` on ./keyward.db: cache, limits, usage writer, scheduled jobs.
    let settings = Settings { database_url: "sqlite://keyward.db".to_owned(), ..Settings::default() };
    let (verifier, tasks) = InProcess::build(settings).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(verifier).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    tasks.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use keyward_server::service::{self, CreateKeyRequest, Validator};
    use keyward_server::{App, AppState};
    use keyward_store::Actor;
    use tower::ServiceExt;

    async fn state() -> (AppState, tempfile::TempDir) {
        let dir = tempfile::TempDir::new().unwrap();
        let database_url = format!("sqlite://{}", dir.path().join("k.db").display());
        let app = App::builder(Settings { database_url, ..Settings::default() }).without_jobs().build().await.unwrap();
        (app.state, dir)
    }

    async fn key(state: &AppState, scopes: &[&str]) -> String {
        let seeded = service::seed(state, &Actor::cli(state.clock.now())).await.unwrap();
        let org = match seeded {
            Some(s) => s.organization.id,
            None => state.store.find_org_by_slug("default").await.unwrap().unwrap().id,
        };
        let v = Validator { plans: &state.plans, now: state.clock.now() };
        let draft = CreateKeyRequest {
            name: "app".into(),
            owner_id: Some("u1".into()),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .validate(&v, org)
        .unwrap();
        service::create_key(state, draft, &Actor::cli(state.clock.now())).await.unwrap().0.expose_secret().to_owned()
    }

    async fn get(app: Router, key: Option<&str>) -> (StatusCode, Value) {
        let mut req = Request::get("/projects");
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        let res = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn the_layer_lets_valid_keys_through_with_their_identity() {
        let (state, _dir) = state().await;
        let good = key(&state, &["read:projects"]).await;
        let weak = key(&state, &["read:users"]).await;
        let (status, body) = get(app(InProcess::new(state.clone())), Some(&good)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["owner"], "u1");
        let (status, body) = get(app(InProcess::new(state.clone())), Some(&weak)).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("insufficient_scope")));
        let (status, body) = get(app(InProcess::new(state.clone())), Some("sk_live_bad")).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("malformed_key")));
        let (status, body) = get(app(InProcess::new(state)), None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("missing_credentials")));
    }
}
