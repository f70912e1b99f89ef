//! The key forms: create (`POST /v1/keys`) with every field of the API, and edit (`PATCH /v1/keys/{id}`)
//! with every field the API lets change. Both go through their API route's function, so a form is
//! validated as a JSON body is, with the same permission checks.

use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, SecondsFormat, Utc};
use keyward_store::{ApiKey, Organization};
use maud::{Markup, html};
use serde::Deserialize;

use super::extract::{FormBody, KeyForm, KeyPath, Signed, blank, see_other};
use super::view::{PageResult, failed, layout, message, page};
use crate::auth::{Admin, Caller, KeysWrite, KeysWriteOrSelf};
use crate::extract::ApiQuery;
use crate::model::PageQuery;
use crate::routes::keys;
use crate::routes::orgs::list_orgs;
use crate::service::{CreateKeyRequest, UpdateKeyRequest};

/// What the key forms post. Every field is text as typed; blank means "none" (or "unchanged" where the
/// key already has none).
#[derive(Deserialize, Default)]
pub struct KeyFields {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    scopes: String,
    #[serde(default)]
    allowed_ips: String,
    #[serde(default)]
    expires_at: String,
    #[serde(default)]
    metadata: String,
    #[serde(default)]
    plan: String,
    // Only on creation.
    #[serde(default)]
    owner_id: String,
    #[serde(default)]
    environment: String,
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    expires_in_days: String,
    #[serde(default)]
    organization_id: String,
}

impl KeyFields {
    /// The fields of an existing key, as its edit form shows them.
    fn of(key: &ApiKey) -> Self {
        Self {
            name: key.name.clone(),
            description: key.description.clone().unwrap_or_default(),
            scopes: key.scopes.to_strings().join(" "),
            allowed_ips: key.allowed_ips.to_strings().join(" "),
            expires_at: key.expires_at.map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true)).unwrap_or_default(),
            metadata: if is_empty_object(&key.metadata) { String::new() } else { key.metadata.to_string() },
            plan: key.plan.clone().unwrap_or_default(),
            ..Self::default()
        }
    }
}

fn is_empty_object(value: &serde_json::Value) -> bool {
    value.as_object().is_some_and(|o| o.is_empty())
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// The metadata field: blank is an empty object.
fn metadata(state: &crate::state::AppState, text: &str) -> Result<serde_json::Value, Response> {
    blank(text).map_or(Ok(serde_json::json!({})), |m| {
        serde_json::from_str(&m)
            .map_err(|_| message(state, StatusCode::UNPROCESSABLE_ENTITY, "Metadata must be a JSON object."))
    })
}

/// Who creates a key: an operator chooses the owner (and, as admin, the organization); a customer's
/// self-service key creates keys for its own owner only, so its form has no owner field.
struct Creator {
    operator: bool,
    organizations: Option<Vec<Organization>>,
}

impl Creator {
    async fn of(caller: &Caller<KeysWriteOrSelf>) -> Self {
        let organizations = match caller.admitted_as::<Admin>() {
            Ok(admin) => {
                let first = PageQuery { cursor: None, limit: Some(100) };
                list_orgs(admin, ApiQuery(first)).await.ok().map(|listed| listed.0.items)
            }
            Err(_) => None,
        };
        Self { operator: caller.admitted_as::<KeysWrite>().is_ok(), organizations }
    }
}

/// The fields both forms share, filled with `f`; `creator` adds those only a new key has.
fn fields(f: &KeyFields, plans: &keyward_core::Plans, creator: Option<&Creator>) -> Markup {
    html! {
        label for="name" { "Name" } input #name name="name" required maxlength="255" value=(f.name);
        @if let Some(creator) = creator {
            @if let Some(orgs) = &creator.organizations {
                label for="organization_id" { "Organization" }
                select #organization_id name="organization_id" {
                    option value="" { "Mine" }
                    @for org in orgs { option value=(org.id) selected[f.organization_id == org.id.to_string()] { (org.name) " (" (org.slug) ")" } }
                }
            }
            @if creator.operator {
                label for="owner_id" { "Owner id (your customer's user id)" }
                input #owner_id name="owner_id" maxlength="255" value=(f.owner_id);
            }
            label for="environment" { "Environment" }
            select #environment name="environment" {
                option value="live" selected[f.environment != "test"] { "live" }
                option value="test" selected[f.environment == "test"] { "test" }
            }
            label for="prefix" { "Prefix (1–16 lowercase letters or digits; blank: sk)" }
            input #prefix name="prefix" maxlength="16" pattern="[a-z0-9]+" value=(f.prefix);
        }
        label for="description" { "Description" }
        textarea #description name="description" maxlength="2000" { (f.description) }
        label for="scopes" { "Scopes (separated by spaces)" } input #scopes name="scopes" value=(f.scopes);
        label for="allowed_ips" { "Allowed addresses (IPs and CIDR blocks, separated by spaces; blank: any)" }
        input #allowed_ips name="allowed_ips" value=(f.allowed_ips);
        label for="plan" { "Plan" }
        select #plan name="plan" {
            option value="" { "The organization's" }
            @for name in plans.names() { option value=(name) selected[f.plan == name] { (name) } }
        }
        @if creator.is_some() {
            label for="expires_in_days" { "Expires in days (blank: never, or the time below)" }
            input #expires_in_days type="number" name="expires_in_days" min="1" max="3650" value=(f.expires_in_days);
        }
        label for="expires_at" { "Expires at (RFC 3339, e.g. 2027-01-31T00:00:00Z; blank: never)" }
        input #expires_at name="expires_at" value=(f.expires_at);
        label for="metadata" { "Metadata (a JSON object)" }
        textarea #metadata name="metadata" { (f.metadata) }
    }
}

/// `GET /console/keys/new`.
pub async fn new_key(signed: Signed<KeysWriteOrSelf>) -> Response {
    let state = signed.caller.state();
    let viewer = signed.viewer();
    let csrf = viewer.csrf.clone();
    let creator = Creator::of(&signed.caller).await;
    page(
        StatusCode::OK,
        layout(
            state,
            Some(&viewer),
            "New key",
            html! {
                form method="post" action="/console/keys" {
                    input type="hidden" name="csrf" value=(csrf);
                    (fields(&KeyFields::default(), &state.plans, Some(&creator)))
                    button type="submit" { "Create key" }
                }
            },
        ),
    )
}

/// `POST /console/keys`: `POST /v1/keys`; the new key is on this answer only.
#[tracing::instrument(skip_all)]
pub async fn create_key(signed: Signed<KeysWriteOrSelf>, FormBody(form): FormBody<KeyFields>) -> PageResult {
    signed.check_csrf(&form.csrf)?;
    let state = signed.caller.state().clone();
    let viewer = signed.viewer();
    let metadata = blank(&form.metadata).map(|_| metadata(&state, &form.metadata)).transpose()?;
    let expires_in_days = blank(&form.expires_in_days)
        .map(|d| {
            d.parse().map_err(|_| {
                message(&state, StatusCode::UNPROCESSABLE_ENTITY, "Expires in days must be a whole number.")
            })
        })
        .transpose()?;
    let body = CreateKeyRequest {
        name: form.name,
        description: blank(&form.description),
        owner_id: blank(&form.owner_id),
        environment: blank(&form.environment),
        prefix: blank(&form.prefix),
        scopes: words(&form.scopes),
        allowed_ips: words(&form.allowed_ips),
        expires_at: blank(&form.expires_at),
        expires_in_days,
        metadata,
        plan: blank(&form.plan),
        organization_id: blank(&form.organization_id),
    };
    let (_, created) = keys::create(&signed.caller, body).await.map_err(|e| failed(&state, e))?;
    Ok(super::pages::shown_once(&state, &viewer, &created.api_key, &created.key))
}

/// `GET /console/keys/{id}/edit`: the key's fields as `PATCH /v1/keys/{id}` may change them.
pub async fn edit_page(signed: Signed<KeysWrite>, KeyPath(id): KeyPath) -> PageResult {
    let plans = signed.caller.state().plans.clone();
    super::pages::writable_key_page(signed, id, |key, csrf| {
        let body = html! {
            p { "Key " code { (key.prefix) "…" (key.hint) } }
            form method="post" action={ "/console/keys/" (key.id) "/edit" } {
                input type="hidden" name="csrf" value=(csrf);
                (fields(&KeyFields::of(key), &plans, None))
                button type="submit" { "Save" }
            }
            p { a href={ "/console/keys/" (key.id) } { "Cancel" } }
        };
        (format!("Edit {}", key.name), body)
    })
    .await
}

/// `POST /console/keys/{id}/edit`: `PATCH /v1/keys/{id}` with the fields that differ from the key's, so
/// the audit trail records what was changed and nothing else.
#[tracing::instrument(skip_all)]
pub async fn edit_key(changed: KeyForm<KeysWrite, KeyFields>) -> PageResult {
    let KeyForm { key, state, form, .. } = changed;
    let before = KeyFields::of(&key.target);
    let differs = |typed: &str, was: &str| typed.trim() != was;
    let same_words = |typed: &str, was: &str| {
        let (mut a, mut b) = (words(typed), words(was));
        a.sort();
        b.sort();
        a == b
    };
    let metadata = metadata(&state, &form.metadata)?;
    let expires_at = match blank(&form.expires_at) {
        None => key.target.expires_at.is_some().then_some(None),
        Some(text) => match DateTime::parse_from_rfc3339(&text) {
            Ok(t) if Some(t.with_timezone(&Utc)) == key.target.expires_at => None,
            // A time the validator refuses is passed on, for its own message.
            _ => Some(Some(text)),
        },
    };
    let body = UpdateKeyRequest {
        name: (form.name != before.name).then(|| form.name.clone()),
        description: differs(&form.description, &before.description).then(|| blank(&form.description)),
        scopes: (!same_words(&form.scopes, &before.scopes)).then(|| words(&form.scopes)),
        allowed_ips: (!same_words(&form.allowed_ips, &before.allowed_ips)).then(|| words(&form.allowed_ips)),
        expires_at,
        metadata: (metadata != key.target.metadata).then_some(metadata),
        plan: differs(&form.plan, &before.plan).then(|| blank(&form.plan)),
        is_active: None,
    };
    let id = key.target.id;
    let unchanged = body.name.is_none()
        && body.description.is_none()
        && body.scopes.is_none()
        && body.allowed_ips.is_none()
        && body.expires_at.is_none()
        && body.metadata.is_none()
        && body.plan.is_none();
    if unchanged {
        return Ok(see_other(&format!("/console/keys/{id}")));
    }
    keys::update(key, body).await.map_err(|e| failed(&state, e))?;
    Ok(see_other(&format!("/console/keys/{id}")))
}
