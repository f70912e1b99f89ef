//! The OpenAPI 3 document served at `/openapi.json`: every route and every error body.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{audit, health, keys, me, orgs, usage, verify, webhooks};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Keyward", description = "Self-hosted API keys: issue, verify, limit, audit."),
    paths(
        verify::verify,
        usage::report_usage, usage::key_usage, usage::org_usage,
        keys::create_key, keys::list_keys, keys::get_key, keys::update_key, keys::revoke_key, keys::rotate_key,
        keys::list_expiring, keys::cleanup_expired,
        crate::routes::import::import_keys,
        me::me,
        orgs::create_org, orgs::list_orgs, orgs::get_org, orgs::update_org,
        audit::list_audit, audit::verify_audit,
        webhooks::create_webhook, webhooks::list_webhooks, webhooks::get_webhook, webhooks::update_webhook,
        webhooks::delete_webhook, webhooks::list_deliveries, webhooks::retry_delivery,
        health::healthz, health::readyz, crate::telemetry::render,
    ),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
