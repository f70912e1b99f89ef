//! Keyward's HTTP API: the axum router, its handlers and extractors, the error table, the usage
//! batch writer, and the operations the CLI shares with the API.

pub mod app;
pub mod auth;
pub mod cache;
pub mod client_ip;
pub mod error;
pub mod extract;
pub mod gateway;
pub mod lifecycle;
pub mod limits;
pub mod listen;
pub mod model;
#[cfg(test)]
mod module_graph;
pub mod openapi;
pub mod routes;
pub mod service;
pub mod settings;
pub mod state;
pub mod telemetry;
pub mod usage;
pub mod verifier;
pub mod webhooks;

use std::future::Future;

use axum::Router;
use axum::routing::{get, post};

pub use app::App;
pub use error::{ApiError, ErrorCode};
pub use state::AppState;

use crate::routes::{audit, health, keys, me, orgs, verify, webhooks as hooks};

/// Every route of the API, with request ids and one tracing span per request.
pub fn router(state: AppState) -> Router {
    telemetry::install();
    // The management API is limited per client IP; the hot path and the probes are not.
    let management = Router::new()
        .route("/v1/keys", post(keys::create_key).get(keys::list_keys))
        .route("/v1/keys/import", post(routes::import::import_keys))
        .route("/v1/keys/{id}", get(keys::get_key).patch(keys::update_key).delete(keys::revoke_key))
        .route("/v1/keys/{id}/rotate", post(keys::rotate_key))
        .route("/v1/keys/expiring", get(keys::list_expiring))
        .route("/v1/keys/cleanup-expired", post(keys::cleanup_expired))
        .route("/v1/keys/{id}/usage", get(routes::usage::key_usage))
        .route("/v1/me", get(me::me))
        .route("/v1/organizations", post(orgs::create_org).get(orgs::list_orgs))
        .route("/v1/organizations/{id}", get(orgs::get_org).patch(orgs::update_org))
        .route("/v1/organizations/{id}/usage", get(routes::usage::org_usage))
        .route("/v1/audit-logs", get(audit::list_audit))
        .route("/v1/audit-logs/verify", get(audit::verify_audit))
        .route("/v1/webhooks", post(hooks::create_webhook).get(hooks::list_webhooks))
        .route("/v1/webhooks/{id}", get(hooks::get_webhook).patch(hooks::update_webhook).delete(hooks::delete_webhook))
        .route("/v1/webhooks/{id}/deliveries", get(hooks::list_deliveries))
        .route("/v1/webhooks/{id}/deliveries/{delivery_id}/retry", post(hooks::retry_delivery))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), limits::management));
    let api = Router::new()
        .route("/v1/verify", post(verify::verify))
        .route("/v1/usage", post(routes::usage::report_usage))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(routes::openapi::openapi_json))
        .route("/metrics", get(health::metrics))
        .merge(management)
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorCode::MethodNotAllowed, "this route does not take that method")
        })
        .with_state(state);
    api.layer(telemetry::RequestLayer)
}

/// Serves the API until `shutdown` resolves, then finishes the requests in flight (see [`listen`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: settings::ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listen::serve(listener, router(state), limits, shutdown).await
}
