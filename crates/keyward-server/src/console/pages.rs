//! The console's pages: each handler builds the same caller and calls the same handler or service
//! function as its API route (`routes::keys`), then renders what it answered. maud escapes every value.

use axum::http::StatusCode;
use axum::http::header::SET_COOKIE;
use axum::http::request::Parts;
use axum::response::Response;
use keyward_core::KeyId;
use keyward_store::{ApiKey, MAX_KEY_SEARCH_CHARS};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};

use super::extract::{
    CsrfForm, FormBody, KeyForm, KeyPath, Signed, blank, cookie, over_https, same_origin, see_other, session_cookie,
};
use super::view::{PageResult, Viewer, failed, layout, message, page};
use crate::auth::{Caller, KeysReadOrSelf, KeysWrite, KeysWriteOrSelf, Permission};
use crate::error::{ApiError, ErrorCode};
use crate::extract::ApiQuery;
use crate::model::{KeyResponse, PageQuery};
use crate::routes::keys::{self, ListKeysQuery};
use crate::routes::target::{self, Target, Visible};
use crate::service::{RotateKeyRequest, UpdateKeyRequest};
use crate::state::AppState;

fn sign_in_form(state: &AppState, error: Option<&str>) -> Markup {
    layout(
        state,
        None,
        "Sign in",
        html! {
            @if let Some(error) = error { p.error role="alert" { (error) } }
            form method="post" action="/console/sign-in" {
                label for="key" { "API key" }
                input #key type="password" name="key" autocomplete="off" required autofocus;
                button type="submit" { "Sign in" }
            }
            p.hint { "Sign in with a key that may read keys (an operator's, or a customer's self-service key)." }
        },
    )
}

/// `GET /console`: the sign-in form, or the keys for a live session.
pub async fn sign_in_page(parts: Parts, state: axum::extract::State<AppState>) -> Response {
    let live = session_cookie(&parts.headers).is_some_and(|id| state.console.sessions.touch(id).is_some());
    if live { see_other("/console/keys") } else { page(StatusCode::OK, sign_in_form(&state, None)) }
}

#[derive(Deserialize)]
pub struct SignInForm {
    #[serde(default)]
    key: String,
}

/// `POST /console/sign-in`: the key checked as the API checks it; a session for it.
#[tracing::instrument(skip_all)]
pub async fn sign_in(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
) -> PageResult {
    let (parts, body) = request.into_parts();
    if !same_origin(&parts) {
        return Err(message(&state, StatusCode::FORBIDDEN, "This request did not come from the console."));
    }
    let request = axum::extract::Request::from_parts(parts.clone(), body);
    let FormBody(form) =
        <FormBody<SignInForm> as axum::extract::FromRequest<AppState>>::from_request(request, &state).await?;
    let caller = match Caller::<KeysReadOrSelf>::signed_in(&parts, &state, form.key.trim()).await {
        Ok(caller) => caller,
        Err(e) => {
            let status = e.code.status();
            let text = if status == StatusCode::TOO_MANY_REQUESTS {
                "Too many failed sign-ins from this address: wait a minute."
            } else if status == StatusCode::FORBIDDEN {
                "This key may not read keys, so it cannot use the console."
            } else {
                "That key was not accepted."
            };
            return Err(page(status, sign_in_form(&state, Some(text))));
        }
    };
    let record = caller.record();
    let hash = state.hasher.hash_str(record.hash_algorithm, form.key.trim());
    let Some(id) = state.console.sessions.start(record.id, hash) else {
        return Err(message(&state, StatusCode::INTERNAL_SERVER_ERROR, "Internal error: try again later."));
    };
    tracing::info!(key_id = %record.id, "console session started");
    let mut response = see_other("/console/keys");
    response.headers_mut().insert(SET_COOKIE, cookie(id.expose(), over_https(&parts, &state)));
    Ok(response)
}

/// `POST /console/sign-out`: the session ends here and its cookie in the browser.
pub async fn sign_out(
    signed: Signed<crate::auth::AnyKey>,
    parts: Parts,
    FormBody(form): FormBody<CsrfForm>,
) -> PageResult {
    signed.check_csrf(&form.csrf)?;
    if let Some(id) = session_cookie(&parts.headers) {
        signed.caller.state().console.sessions.end(id);
    }
    let mut response = see_other("/console");
    response.headers_mut().insert(SET_COOKIE, cookie("", over_https(&parts, signed.caller.state())));
    Ok(response)
}

#[derive(Deserialize, Serialize, Default, Clone)]
pub struct ListForm {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    q: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    owner: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    environment: String,
    /// Days ahead, as `expiring_within_days`; blank for any expiry.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    expiring: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    cursor: String,
}

const STATUSES: [(&str, &str); 6] = [
    ("", "Usable"),
    ("all", "All"),
    ("active", "Active"),
    ("disabled", "Disabled"),
    ("expired", "Expired"),
    ("revoked", "Revoked"),
];

const ENVIRONMENTS: [(&str, &str); 3] = [("", "Any"), ("live", "Live"), ("test", "Test")];

const EXPIRING: [(&str, &str); 4] =
    [("", "Any time"), ("7", "Within 7 days"), ("30", "Within 30 days"), ("90", "Within 90 days")];

/// A select of `options` (value, label) named `name`, labelled `label`, with `current` selected.
fn select(name: &str, label: &str, options: &[(&str, &str)], current: &str) -> Markup {
    html! {
        div {
            label for=(name) { (label) }
            select #(name) name=(name) {
                @for (value, text) in options { option value=(value) selected[current == *value] { (text) } }
            }
        }
    }
}

/// `GET /console/keys`: `GET /v1/keys` with the same search and filters, newest first, a page at a
/// time; the next page's link keeps them.
pub async fn keys_list(signed: Signed<KeysReadOrSelf>, ApiQuery(form): ApiQuery<ListForm>) -> PageResult {
    let state = signed.caller.state().clone();
    let viewer = signed.viewer();
    let expiring_within_days = match blank(&form.expiring) {
        Some(days) => Some(days.parse::<u32>().map_err(|_| {
            failed(&state, ApiError::new(ErrorCode::InvalidQuery, "`expiring` must be a number of days"))
        })?),
        None => None,
    };
    let query = ListKeysQuery {
        owner_id: blank(&form.owner),
        environment: blank(&form.environment),
        status: blank(&form.status).filter(|s| s != "all"),
        include_inactive: Some(!form.status.is_empty()),
        q: blank(&form.q),
        expiring_within_days,
    };
    let paging = PageQuery { cursor: blank(&form.cursor), limit: None };
    let listed =
        keys::list_keys(signed.caller, ApiQuery(query), ApiQuery(paging)).await.map_err(|e| failed(&state, e))?.0;
    let next = listed.next_cursor.map(|cursor| {
        let next = ListForm { cursor, ..form.clone() };
        format!("/console/keys?{}", serde_urlencoded::to_string(&next).unwrap_or_default())
    });
    Ok(page(
        StatusCode::OK,
        layout(
            &state,
            Some(&viewer),
            "Keys",
            html! {
                form.filters method="get" action="/console/keys" role="search" {
                    div {
                        label for="q" { "Name, owner or hint" }
                        input #q type="search" name="q" maxlength=(MAX_KEY_SEARCH_CHARS) value=(form.q);
                    }
                    div { label for="owner" { "Owner" } input #owner name="owner" value=(form.owner); }
                    (select("status", "Status", &STATUSES, &form.status))
                    (select("environment", "Environment", &ENVIRONMENTS, &form.environment))
                    (select("expiring", "Expires", &EXPIRING, &form.expiring))
                    button type="submit" { "Search" }
                }
                @if listed.items.is_empty() { p { "No keys." } } @else {
                    div.scroll tabindex="0" role="region" aria-label="Keys" { table {
                        thead { tr { th { "Name" } th { "Owner" } th { "Key" } th { "Status" } th { "Created" } } }
                        tbody { @for listed in &listed.items { tr {
                            @let k = &listed.key;
                            td { a href={ "/console/keys/" (k.id) } { (k.name) } }
                            td { (k.owner_id.as_deref().unwrap_or("—")) }
                            td { code { (k.prefix) "…" (k.hint) } }
                            td { (listed.status.as_str()) }
                            td { (k.created_at.format("%Y-%m-%d %H:%M")) }
                        } } }
                    } }
                }
                @if let Some(next) = next { p { a href=(next) rel="next" { "Next page" } } }
            },
        ),
    ))
}

/// `GET /console/keys/{id}`: `GET /v1/keys/{id}`, with the actions the key's page offers.
pub async fn key_page(signed: Signed<KeysReadOrSelf>, KeyPath(id): KeyPath) -> PageResult {
    let state = signed.caller.state().clone();
    let viewer = signed.viewer();
    let target = ApiKey::visible(&signed.caller, id).await.map_err(|e| failed(&state, e))?;
    let usage = super::usage::section(&signed.caller, &target).await.map_err(|e| failed(&state, e))?;
    let trail = super::audit::key_trail(&signed.caller, id).await.map_err(|e| failed(&state, e))?;
    let editable = target.revoked_at.is_none() && signed.caller.admitted_as::<KeysWrite>().is_ok();
    let key = keys::get_key(Visible { caller: signed.caller, target }).await.map_err(|e| failed(&state, e))?.0;
    let body = html! {
        (key_view(&key, &viewer.csrf, None))
        @if editable { p { a href={ "/console/keys/" (id) "/edit" } { "Edit settings" } } }
        (usage)
        @if let Some(trail) = trail { (trail) }
    };
    Ok(page(StatusCode::OK, layout(&state, Some(&viewer), &key.key.name, body)))
}

/// A key's settings and actions, with a secret just made (`fresh`) shown once above them.
fn key_view(response: &KeyResponse, csrf: &str, fresh: Option<&str>) -> Markup {
    let key = &response.key;
    let limits = response.effective_limits.as_ref().and_then(|l| serde_json::to_value(l).ok());
    let usable = key.revoked_at.is_none();
    html! {
        @if let Some(secret) = fresh {
            section.secret role="alert" {
                h2 { "Copy this key now" }
                p { "It is shown this once: Keyward keeps only its hash. Store it somewhere safe." }
                label for="new-key" { "New key" }
                input #new-key type="text" readonly value=(secret);
                button type="button" data-copy="new-key" { "Copy" }
            }
        }
        dl {
            dt { "Id" } dd { code { (key.id) } }
            dt { "Key" } dd { code { (key.prefix) "…" (key.hint) } }
            dt { "Status" } dd { (response.status.as_str()) }
            dt { "Owner" } dd { (key.owner_id.as_deref().unwrap_or("—")) }
            dt { "Description" } dd { (key.description.as_deref().unwrap_or("—")) }
            dt { "Environment" } dd { (key.environment.as_str()) }
            dt { "Scopes" } dd { (if key.scopes.is_empty() { "—".to_owned() } else { key.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ") }) }
            dt { "Allowed addresses" } dd { (if key.allowed_ips.is_empty() { "any".to_owned() } else { key.allowed_ips.to_strings().join(" ") }) }
            dt { "Metadata" } dd { code { (key.metadata) } }
            dt { "Plan" } dd { (key.plan.as_deref().unwrap_or("organization's")) }
            dt { "Expires" } dd { (key.expires_at.map_or("never".to_owned(), |t| t.to_rfc3339())) }
            dt { "Created" } dd { (key.created_at.to_rfc3339()) }
            dt { "Last used" } dd { (key.last_used_at.map_or("never".to_owned(), |t| t.to_rfc3339())) }
            dt { "Requests" } dd { (key.total_requests) }
            @if let Some(by) = key.replaced_by { dt { "Replaced by" } dd { a href={ "/console/keys/" (by) } { (by) } } }
            @if let Some(from) = key.rotated_from { dt { "Rotated from" } dd { a href={ "/console/keys/" (from) } { (from) } } }
        }
        @if let Some(serde_json::Value::Object(limits)) = limits {
            h2 { "Effective limits" }
            dl { @for (name, value) in &limits { dt { (name) } dd { (if value.is_null() { "none".to_owned() } else { value.to_string() }) } } }
        }
        @if usable {
            h2 { "Actions" }
            form method="post" action={ "/console/keys/" (key.id) "/active" } {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="active" value=(if key.is_active { "false" } else { "true" });
                button type="submit" { (if key.is_active { "Deactivate" } else { "Activate" }) }
            }
            @if key.replaced_by.is_none() {
                form method="post" action={ "/console/keys/" (key.id) "/rotate" } {
                    input type="hidden" name="csrf" value=(csrf);
                    label for="grace" { "Grace period for the old key (seconds, up to 604800)" }
                    input #grace type="number" name="grace_period_seconds" min="0" max="604800" value="0";
                    button type="submit" { "Rotate" }
                }
            }
            p { a.danger href={ "/console/keys/" (key.id) "/revoke" } { "Revoke…" } }
        }
    }
}

/// A key just made, with its secret shown this once.
pub(super) fn shown_once(state: &AppState, viewer: &Viewer, key: &KeyResponse, secret: &str) -> Response {
    page(StatusCode::CREATED, layout(state, Some(viewer), &key.key.name, key_view(key, &viewer.csrf, Some(secret))))
}

#[derive(Deserialize)]
pub struct ActiveForm {
    active: bool,
}

/// `POST /console/keys/{id}/active`: `PATCH /v1/keys/{id}` with `is_active`.
#[tracing::instrument(skip_all)]
pub async fn set_active(changed: KeyForm<KeysWrite, ActiveForm>) -> PageResult {
    let KeyForm { key, state, form, .. } = changed;
    let id = key.target.id;
    let body = UpdateKeyRequest { is_active: Some(form.active), ..UpdateKeyRequest::default() };
    keys::update(key, body).await.map_err(|e| failed(&state, e))?;
    Ok(see_other(&format!("/console/keys/{id}")))
}

#[derive(Deserialize)]
pub struct RotateForm {
    #[serde(default)]
    grace_period_seconds: Option<i64>,
}

/// `POST /console/keys/{id}/rotate`: `POST /v1/keys/{id}/rotate`; the new key is on this answer only.
#[tracing::instrument(skip_all)]
pub async fn rotate_key(changed: KeyForm<KeysWriteOrSelf, RotateForm>) -> PageResult {
    let KeyForm { key, state, viewer, form } = changed;
    let body = RotateKeyRequest { grace_period_seconds: form.grace_period_seconds, name: None };
    let (_, rotated) = keys::rotate(key, body).await.map_err(|e| failed(&state, e))?;
    Ok(shown_once(&state, &viewer, &rotated.api_key, &rotated.key))
}

/// A page about a key the caller may change (404 unseen, 403 unchangeable, as its API route answers):
/// `content` makes its title and body from the key and the session's CSRF token.
pub(super) async fn writable_key_page<P: Permission>(
    signed: Signed<P>,
    id: KeyId,
    content: impl FnOnce(&ApiKey, &str) -> (String, Markup),
) -> PageResult {
    let state = signed.caller.state().clone();
    let viewer = signed.viewer();
    let key = target::writable::<_, ApiKey>(&signed.caller, id).await.map_err(|e| failed(&state, e))?;
    let (title, body) = content(&key, &viewer.csrf);
    Ok(page(StatusCode::OK, layout(&state, Some(&viewer), &title, body)))
}

/// `GET /console/keys/{id}/revoke`: the confirmation step.
pub async fn revoke_confirm(signed: Signed<KeysWriteOrSelf>, KeyPath(id): KeyPath) -> PageResult {
    writable_key_page(signed, id, |key, csrf| {
        let body = html! {
            p { "Revoke " strong { (key.name) } " (" code { (key.prefix) "…" (key.hint) } ")? It stops working at once, for good." }
            form method="post" action={ "/console/keys/" (key.id) "/revoke" } {
                input type="hidden" name="csrf" value=(csrf);
                button.danger type="submit" { "Revoke for good" }
            }
            p { a href={ "/console/keys/" (key.id) } { "Cancel" } }
        };
        ("Revoke key".to_owned(), body)
    })
    .await
}

/// `POST /console/keys/{id}/revoke`: `DELETE /v1/keys/{id}`.
#[tracing::instrument(skip_all)]
pub async fn revoke_key(changed: KeyForm<KeysWriteOrSelf, CsrfForm>) -> PageResult {
    let KeyForm { key, state, .. } = changed;
    let id = key.target.id;
    keys::revoke_key(key).await.map_err(|e| failed(&state, e))?;
    Ok(see_other(&format!("/console/keys/{id}")))
}
