//! The web console at `/console` on the management listener: server-rendered pages (maud, which
//! escapes every value it prints) over the same handlers and object rules as the API. A browser signs
//! in with a key and gets a server-side session ([`sessions`]); every request looks the key up again
//! through the verify cache and builds the same `Caller<P>` the API route would, so a console page can
//! do exactly what its key may do through the API, and a revoked or disabled key ends the session.

// A refusal is the page sent in its place, built at most once per request: boxing it buys nothing.
#![allow(clippy::result_large_err)]

mod audit;
mod billing;
mod extract;
mod keyform;
mod orgs;
mod pages;
pub mod sessions;
mod usage;
mod view;
mod webhooks;

use axum::Router;
use axum::http::HeaderValue;
use axum::http::StatusCode;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::state::AppState;
pub use extract::COOKIE_NAME;
pub use sessions::Console;
use view::{CSS, JS};

/// SECURITY: no inline script or style, nothing from elsewhere, no framing.
pub const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; \
                       form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes; `lib.rs` mounts them when `[console] enabled`.
pub fn router(state: &AppState) -> Router<AppState> {
    let pages = Router::new()
        .route("/console", get(pages::sign_in_page))
        .route("/console/sign-in", post(pages::sign_in))
        .route("/console/sign-out", post(pages::sign_out))
        .route("/console/keys", get(pages::keys_list).post(keyform::create_key))
        .route("/console/keys/new", get(keyform::new_key))
        .route("/console/keys/{id}/edit", get(keyform::edit_page).post(keyform::edit_key))
        .route("/console/keys/{id}", get(pages::key_page))
        .route("/console/keys/{id}/active", post(pages::set_active))
        .route("/console/keys/{id}/rotate", post(pages::rotate_key))
        .route("/console/keys/{id}/revoke", get(pages::revoke_confirm).post(pages::revoke_key))
        .route("/console/usage", get(billing::usage_page))
        .route("/console/usage.csv", get(billing::usage_csv))
        .route("/console/organizations/{id}/usage", get(billing::org_usage_page))
        .route("/console/organizations/{id}/usage.csv", get(billing::org_usage_csv))
        .route("/console/audit", get(audit::audit_page))
        .route("/console/organizations", get(orgs::orgs_list).post(orgs::create))
        .route("/console/organizations/{id}", get(orgs::org_page).post(orgs::update))
        .route("/console/webhooks", get(webhooks::hooks_list).post(webhooks::create_hook))
        .route("/console/webhooks/{id}", get(webhooks::hook_page).post(webhooks::update_hook))
        .route("/console/webhooks/{id}/active", post(webhooks::set_active))
        .route("/console/webhooks/{id}/delete", get(webhooks::delete_confirm).post(webhooks::delete_hook))
        .route("/console/webhooks/{id}/deliveries/{delivery_id}/retry", post(webhooks::retry))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), crate::limits::management))
        .layer(axum::middleware::map_response(page_headers));
    Router::new().route("/console/static/{file}", get(asset)).merge(pages)
}

/// SECURITY: every page forbids inline script, framing, sniffing, referrers and caching.
async fn page_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let found = [&*CSS, &*JS].into_iter().find(|a| a.path.rsplit('/').next() == Some(file.as_str()));
    let Some(asset) = found else { return StatusCode::NOT_FOUND.into_response() };
    (
        [
            (CONTENT_TYPE, HeaderValue::from_static(asset.mime)),
            (CACHE_CONTROL, HeaderValue::from_static("public, max-age=31536000, immutable")),
            (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        asset.body,
    )
        .into_response()
}
