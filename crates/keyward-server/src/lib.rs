//! Keyward's HTTP API: the axum router, its handlers and extractors, the error table, the usage
//! batch writer, and the operations the CLI shares with the API.

pub mod app;
pub mod auth;
pub mod authz;
pub mod cache;
pub mod client_ip;
pub mod console;
pub mod error;
pub mod export;
pub mod ext_authz;
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
pub mod rules;
pub mod service;
pub mod settings;
pub mod state;
pub mod telemetry;
pub mod usage;
pub mod verifier;
pub mod webhooks;

use std::future::Future;

use axum::Router;

pub use app::App;
pub use error::{ApiError, ErrorCode};
pub use state::AppState;

use crate::auth::{Admin, AnyKey, AuditRead, KeysRead, KeysReadOrSelf, KeysWrite, KeysWriteOrSelf, Verify};
use crate::routes::RouteTable;
use crate::routes::Verb::{Delete, Get, Patch, Post};
use crate::routes::{
    audit, authz as proxy_hook, health, import, keys, me, orgs, usage as ledger, verify, webhooks as hooks,
};

/// The management API, limited per client IP. Each route names the permission it needs (`auth`'s
/// types); its handler takes a `Caller` of exactly that permission, or this does not compile.
#[rustfmt::skip]
pub fn management_routes() -> RouteTable {
    RouteTable::default()
        .route(Post,   "/v1/keys",                            KeysWriteOrSelf, keys::create_key)
        .route(Get,    "/v1/keys",                            KeysReadOrSelf,  keys::list_keys)
        .route(Post,   "/v1/keys/import",                     Admin,           import::import_keys)
        .route(Get,    "/v1/keys/{id}",                       KeysReadOrSelf,  keys::get_key)
        .route(Patch,  "/v1/keys/{id}",                       KeysWrite,       keys::update_key)
        .route(Delete, "/v1/keys/{id}",                       KeysWriteOrSelf, keys::revoke_key)
        .route(Post,   "/v1/keys/{id}/rotate",                KeysWriteOrSelf, keys::rotate_key)
        .route(Get,    "/v1/keys/expiring",                   KeysReadOrSelf,  keys::list_expiring)
        .route(Post,   "/v1/keys/cleanup-expired",            KeysWrite,       keys::cleanup_expired)
        .route(Get,    "/v1/keys/{id}/usage",                 KeysReadOrSelf,  ledger::key_usage)
        .route(Get,    "/v1/me",                              AnyKey,          me::me)
        .route(Post,   "/v1/organizations",                   Admin,           orgs::create_org)
        .route(Get,    "/v1/organizations",                   Admin,           orgs::list_orgs)
        .route(Get,    "/v1/organizations/{id}",              Admin,           orgs::get_org)
        .route(Patch,  "/v1/organizations/{id}",              Admin,           orgs::update_org)
        .route(Get,    "/v1/organizations/{id}/usage",        KeysRead,        ledger::org_usage)
        .route(Get,    "/v1/audit-logs",                      AuditRead,       audit::list_audit)
        .route(Get,    "/v1/audit-logs/verify",               Admin,           audit::verify_audit)
        .route(Post,   "/v1/webhooks",                        KeysWrite,       hooks::create_webhook)
        .route(Get,    "/v1/webhooks",                        KeysWrite,       hooks::list_webhooks)
        .route(Get,    "/v1/webhooks/{id}",                   KeysWrite,       hooks::get_webhook)
        .route(Patch,  "/v1/webhooks/{id}",                   KeysWrite,       hooks::update_webhook)
        .route(Delete, "/v1/webhooks/{id}",                   KeysWrite,       hooks::delete_webhook)
        .route(Get,    "/v1/webhooks/{id}/deliveries",        KeysWrite,       hooks::list_deliveries)
        .route(Post,   "/v1/webhooks/{id}/deliveries/{delivery_id}/retry", KeysWrite, hooks::retry_delivery)
}

/// The hot path and the probes: not limited per client IP.
#[rustfmt::skip]
pub fn service_routes() -> RouteTable {
    RouteTable::default()
        .route(Post,   "/v1/verify",                          Verify,          verify::verify)
        .route(Post,   "/v1/usage",                           Verify,          ledger::report_usage)
        // The end client's key is the credential: the proxy asking presents none of its own.
        .public(Get,   "/v1/authz",                                            proxy_hook::authz)
        .public(Post,  "/v1/authz",                                            proxy_hook::authz)
        .public(Get,   "/healthz",                                             health::healthz)
        .public(Get,   "/readyz",                                              health::readyz)
        .public(Get,   "/openapi.json",                                        routes::openapi::openapi_json)
        .public(Get,   "/metrics",                                             health::metrics)
}

/// Every route of the API, with request ids and one tracing span per request.
pub fn router(state: AppState) -> Router {
    telemetry::install();
    let management = management_routes()
        .router()
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), limits::management));
    let mut management = management;
    if state.console.settings.enabled {
        management = management.merge(console::router(&state));
    }
    let api = service_routes()
        .router()
        // `/v1/authz` takes every method (Envoy's HTTP ext_authz sends the original one), and Envoy's
        // path-prefix form.
        .route(proxy_hook::PATH, axum::routing::any(proxy_hook::authz))
        .route("/v1/authz/", axum::routing::any(proxy_hook::authz))
        .route("/v1/authz/{*path}", axum::routing::any(proxy_hook::authz))
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
