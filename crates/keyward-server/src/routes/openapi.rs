//! The OpenAPI 3 document served at `/openapi.json`: every route, every status it answers and every
//! constraint the server enforces on what it reads, so that generated clients validate the same way.
//! `scripts/schemathesis.sh` holds the document to that.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use utoipa::OpenApi;
use utoipa::openapi::{RefOr, Schema};

use crate::error::{ErrorBody, ErrorCode};
use crate::openapi::BearerAuth;
use crate::routes::{audit, health, keys, me, orgs, usage, verify, webhooks};
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "Keyward", description = "Self-hosted API keys: issue, verify, limit, audit."),
    paths(
        verify::verify,
        crate::routes::authz::authz,
        usage::report_usage, usage::key_usage, usage::org_usage,
        keys::create_key, keys::list_keys, keys::get_key, keys::update_key, keys::revoke_key, keys::rotate_key,
        keys::list_expiring, keys::cleanup_expired,
        crate::routes::import::import_keys,
        me::me,
        orgs::create_org, orgs::list_orgs, orgs::get_org, orgs::update_org,
        audit::list_audit, audit::verify_audit,
        webhooks::create_webhook, webhooks::list_webhooks, webhooks::get_webhook, webhooks::update_webhook,
        webhooks::delete_webhook, webhooks::list_deliveries, webhooks::retry_delivery,
        health::healthz, health::readyz, health::metrics,
    ),
    components(schemas(ErrorBody)),
    // Every route takes a key but the health routes, which say so with an empty `security`.
    security(("bearer" = [])),
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
