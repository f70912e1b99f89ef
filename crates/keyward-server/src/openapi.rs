//! The OpenAPI 3 document served at `/openapi.json`: every route, every status it answers and every
//! constraint the server enforces on what it reads, so that generated clients validate the same way.
//! `scripts/schemathesis.sh` holds the document to that.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{IntoResponses, Modify, OpenApi};

use crate::error::{ErrorBody, ErrorCode};
use crate::routes::{audit, health, keys, me, orgs, usage, verify, webhooks};
use crate::state::AppState;

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

/// What every route that takes a key may answer besides its own statuses (the `Caller` extractor
/// and the management API's per-address limit). The codes named are those of `error::ErrorCode`
/// with that status (a test holds them to it).
#[derive(IntoResponses)]
#[allow(dead_code)] // documentation only: the errors themselves are `ApiError`s
pub enum KeyErrors {
    /// No key (`missing_credentials`), or one that is malformed (`malformed_key`), unknown
    /// (`unknown_key`), revoked (`key_revoked`), disabled (`key_disabled`) or expired (`key_expired`),
    /// or whose organization is disabled (`organization_disabled`).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The key lacks a scope the route needs (`insufficient_scope`), may not act on this target
    /// (`forbidden`), or may not be used from this address (`ip_not_allowed`).
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// `rate_limited`: too many requests, or too many failed authentications, from this address
    /// (with `Retry-After`).
    #[response(status = 429)]
    TooManyRequests(ErrorBody),
    /// `store_unavailable`: the store cannot be reached; try again.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// What every route that reads a JSON body may answer about the body itself (`extract::JsonBody`).
#[derive(IntoResponses)]
#[allow(dead_code)] // documentation only: the errors themselves are `ApiError`s
pub enum JsonBodyErrors {
    /// `invalid_json`: the body is not JSON.
    #[response(status = 400)]
    InvalidJson(ErrorBody),
    /// `request_timeout`: the body did not arrive within the server's body read timeout.
    #[response(status = 408)]
    RequestTimeout(ErrorBody),
    /// `payload_too_large`: the body is larger than 64 KiB.
    #[response(status = 413)]
    PayloadTooLarge(ErrorBody),
    /// `unsupported_media_type`: the body is not sent as `Content-Type: application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// `invalid_request` (an unknown, missing or mistyped field) or `validation_failed` (a value the
    /// schema cannot express, such as a date in the past or an IP list entry); `field` names it.
    #[response(status = 422)]
    Unprocessable(ErrorBody),
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
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// Request schemas with a `plan` field. Plans come from the configuration, so the document names
/// them when it is served, not when it is compiled.
const PLAN_FIELDS: &[&str] =
    &["CreateKeyRequest", "UpdateKeyRequest", "CreateOrganizationRequest", "UpdateOrganizationRequest"];

/// The document with this server's plans as the only values its requests' `plan` fields take
/// (`null` too: each of them may be absent or null).
pub fn document(plans: &keyward_core::Plans) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    let mut values: Vec<Value> = plans.names().map(Value::from).collect();
    values.push(Value::Null);
    if let Some(components) = doc.components.as_mut() {
        // `CreateKeyRequest::validate` takes `expires_at` or `expires_in_days`, not both. utoipa has no
        // attribute for `not`; its extensions are flattened into the schema object, so they carry it.
        if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut("CreateKeyRequest") {
            let both = json!({
                "required": ["expires_at", "expires_in_days"],
                "properties": {"expires_at": {"type": "string"}, "expires_in_days": {"type": "integer"}},
            });
            object.extensions.get_or_insert_with(Default::default).insert("not".to_owned(), both);
        }
        // Every code of the one error table (gateway and layer codes too: one envelope everywhere).
        if let Some(RefOr::T(Schema::Object(detail))) = components.schemas.get_mut("ErrorDetail")
            && let Some(RefOr::T(Schema::Object(code))) = detail.properties.get_mut("code")
        {
            code.enum_values = Some(ErrorCode::ALL.iter().map(|c| Value::from(c.as_str())).collect());
        }
        for name in PLAN_FIELDS {
            if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(*name)
                && let Some(RefOr::T(Schema::Object(plan))) = object.properties.get_mut("plan")
            {
                plan.enum_values = Some(values.clone());
            }
        }
    }
    doc
}

/// `GET /openapi.json`.
pub async fn openapi_json(State(state): State<AppState>) -> Json<utoipa::openapi::OpenApi> {
    Json(document(&state.plans))
}
