//! Webhook endpoints in the console, with exactly the permissions of `/v1/webhooks`
//! (`keyward:keys:write` for the caller's organization, `keyward:admin` for any; an endpoint of another
//! organization is not found): the list with the form that creates one (its signing secret is on that
//! answer only), an endpoint's page with its settings and its deliveries newest first, each with every
//! attempt, and the forms that change, silence or delete it and retry a delivery. Every action goes
//! through the API route's handler with the same `Caller<KeysWrite>`, so it is checked as the API checks
//! it. maud escapes every value; a URL is shown as text, never as a link.

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::StatusCode;
use axum::response::Response;
use keyward_store::{EventKind, Webhook};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::extract::{FormBody, Signed, see_other};
use super::view::{PageResult, failed, layout, page};
use crate::auth::{Admin, Caller, KeysWrite};
use crate::error::{ApiError, ErrorCode};
use crate::extract::{ApiPath, ApiQuery, JsonBody};
use crate::model::PageQuery;
use crate::routes::orgs::list_orgs;
use crate::routes::target::{self, Target, Writable};
use crate::routes::webhooks::{
    CreateWebhookRequest, DeliveryResponse, create, delete_webhook, list_deliveries, list_webhooks, retry_delivery,
    update_webhook,
};
use crate::state::AppState;

/// A form's fields as sent, in order: the event boxes repeat one name.
#[derive(Deserialize)]
#[serde(transparent)]
pub struct HookForm(Vec<(String, String)>);

impl HookForm {
    fn csrf(&self) -> &str {
        self.value("csrf").unwrap_or_default()
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// A text field, trimmed; blank: `None`.
    fn text(&self, name: &str) -> Option<String> {
        self.value(name).map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned)
    }

    /// The ticked events (none: every event).
    fn events(&self) -> Vec<String> {
        self.0.iter().filter(|(n, _)| n == "events").map(|(_, v)| v.clone()).collect()
    }
}

/// The endpoint the path names: a "No such webhook" page (404) for anything that is not an id.
fn hook_id<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(id)| id).map_err(|_| ApiError::new(ErrorCode::NotFound, "No such webhook."))
}

fn at(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn events_text(events: &[EventKind]) -> String {
    if events.is_empty() {
        "every event".to_owned()
    } else {
        events.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// The event boxes, `ticked` ticked; an event of no organization only for an admin, who alone may
/// subscribe to it.
fn event_boxes<P>(caller: &Caller<P>, ticked: &[EventKind]) -> Markup {
    html! {
        fieldset {
            legend { "Events (none ticked: every event of the organization)" }
            @for event in EventKind::ALL {
                @if caller.is_admin() || !event.is_global() || ticked.contains(&event) {
                    label.check {
                        input type="checkbox" name="events" value=(event.as_str()) checked[ticked.contains(&event)];
                        " " (event.as_str())
                    }
                }
            }
        }
    }
}

#[derive(Deserialize, Default)]
pub struct ListForm {
    #[serde(default)]
    organization: String,
}

/// The organizations an admin may pick (the newest 100), by id: none for anyone else.
async fn organizations(caller: &Caller<KeysWrite>) -> Result<Vec<(keyward_core::OrgId, String)>, ApiError> {
    if !caller.is_admin() {
        return Ok(Vec::new());
    }
    let paging = PageQuery { cursor: None, limit: Some(crate::model::MAX_PAGE) };
    let listed = list_orgs(caller.admitted_as::<Admin>()?, ApiQuery(paging)).await?.0;
    Ok(listed.items.into_iter().map(|o| (o.id, o.name)).collect())
}

/// `GET /console/webhooks`: `GET /v1/webhooks` (an admin's: every organization's, or the one chosen),
/// with the form that creates one.
pub async fn hooks_list(signed: Signed<KeysWrite>, ApiQuery(form): ApiQuery<ListForm>) -> PageResult {
    let state = signed.caller.state().clone();
    let viewer = signed.viewer();
    let csrf = viewer.csrf.clone();
    let orgs = organizations(&signed.caller).await.map_err(|e| failed(&state, e))?;
    let admin = signed.caller.is_admin();
    let own = signed.caller.organization_id();
    let chosen = form.organization.parse::<keyward_core::OrgId>().ok();
    let boxes = event_boxes(&signed.caller, &[]);
    let mut hooks = list_webhooks(signed.caller).await.map_err(|e| failed(&state, e))?.0.items;
    if let Some(org) = chosen {
        hooks.retain(|h| h.organization_id == org);
    }
    let org_name = |id: keyward_core::OrgId| orgs.iter().find(|(o, _)| *o == id).map(|(_, n)| n.clone());
    Ok(page(
        StatusCode::OK,
        layout(
            &state,
            Some(&viewer),
            "Webhooks",
            html! {
                @if admin {
                    form.filters method="get" action="/console/webhooks" {
                        div {
                            label for="organization" { "Organization" }
                            select #organization name="organization" {
                                option value="" { "Every organization" }
                                @for (id, name) in &orgs { option value=(id) selected[chosen == Some(*id)] { (name) } }
                            }
                        }
                        button type="submit" { "Show" }
                    }
                }
                @if hooks.is_empty() { p { "No webhook endpoints." } } @else {
                    div.scroll { table {
                        thead { tr {
                            th scope="col" { "URL" }
                            @if admin { th scope="col" { "Organization" } }
                            th scope="col" { "Events" } th scope="col" { "Status" } th scope="col" { "Created" }
                        } }
                        tbody { @for hook in &hooks { tr {
                            // SECURITY: the URL is text inside a link to our own page, never an href.
                            td { a href={ "/console/webhooks/" (hook.id) } { code { (hook.url) } } }
                            @if admin { td { (org_name(hook.organization_id).unwrap_or_else(|| hook.organization_id.to_string())) } }
                            td { (events_text(&hook.events)) }
                            td { (if hook.is_active { "active" } else { "inactive" }) }
                            td { (at(hook.created_at)) }
                        } } }
                    } }
                }
                h2 { "New endpoint" }
                form method="post" action="/console/webhooks" {
                    input type="hidden" name="csrf" value=(csrf);
                    label for="url" { "URL (http:// or https://)" }
                    input #url name="url" type="url" required maxlength="2000" placeholder="https://example.com/hooks/keyward";
                    label for="description" { "Description" }
                    textarea #description name="description" maxlength="2000" {}
                    @if admin {
                        label for="organization_id" { "Organization" }
                        select #organization_id name="organization_id" {
                            @for (id, name) in &orgs { option value=(id) selected[*id == own] { (name) } }
                        }
                    }
                    (boxes)
                    label.check { input type="checkbox" name="is_active" value="true" checked; " Active (receives events)" }
                    button type="submit" { "Create endpoint" }
                }
            },
        ),
    ))
}

/// `POST /console/webhooks`: `POST /v1/webhooks`; the signing secret is on this answer only.
#[tracing::instrument(skip_all)]
pub async fn create_hook(signed: Signed<KeysWrite>, FormBody(form): FormBody<HookForm>) -> PageResult {
    signed.check_csrf(form.csrf())?;
    let state = signed.caller.state().clone();
    let viewer = signed.viewer();
    let body = CreateWebhookRequest {
        url: form.text("url").unwrap_or_default(),
        events: form.events(),
        is_active: Some(form.value("is_active") == Some("true")),
        description: form.text("description"),
        organization_id: form.text("organization_id"),
    };
    let created = create(&signed.caller, body).await.map_err(|e| failed(&state, e))?;
    let hook = &created.webhook;
    Ok(page(
        StatusCode::CREATED,
        layout(
            &state,
            Some(&viewer),
            "Webhook endpoint created",
            html! {
                section.secret role="alert" {
                    h2 { "Copy the signing secret now" }
                    p { "It is shown this once: Keyward never shows it again. Your receiver checks each \
                         delivery's Keyward-Signature header with it." }
                    label for="signing-secret" { "Signing secret" }
                    input #signing-secret type="text" readonly value=(created.secret);
                    button type="button" data-copy="signing-secret" { "Copy" }
                }
                (settings(hook))
                p { a href={ "/console/webhooks/" (hook.id) } { "Go to the endpoint" } }
            },
        ),
    ))
}

/// An endpoint's settings.
fn settings(hook: &Webhook) -> Markup {
    html! {
        dl {
            dt { "Id" } dd { code { (hook.id) } }
            dt { "URL" } dd { code { (hook.url) } }
            dt { "Description" } dd { (hook.description.as_deref().unwrap_or("—")) }
            dt { "Events" } dd { (events_text(&hook.events)) }
            dt { "Status" } dd { (if hook.is_active { "active" } else { "inactive: receives nothing" }) }
            dt { "Created" } dd { (at(hook.created_at)) }
            dt { "Updated" } dd { (at(hook.updated_at)) }
        }
    }
}

#[derive(Deserialize, Default)]
pub struct DeliveriesForm {
    #[serde(default)]
    cursor: Option<String>,
}

/// `GET /console/webhooks/{id}`: `GET /v1/webhooks/{id}`, and when the caller may change it, its
/// deliveries (`GET /v1/webhooks/{id}/deliveries`, a page at a time) and the forms that change it.
pub async fn hook_page(
    signed: Signed<KeysWrite>,
    path: Result<Path<Uuid>, PathRejection>,
    ApiQuery(form): ApiQuery<DeliveriesForm>,
) -> PageResult {
    let state = signed.caller.state().clone();
    let viewer = signed.viewer();
    let csrf = viewer.csrf.clone();
    let id = hook_id(path).map_err(|e| failed(&state, e))?;
    let hook = Webhook::visible(&signed.caller, id).await.map_err(|e| failed(&state, e))?;
    let boxes = event_boxes(&signed.caller, &hook.events);
    // SECURITY: what `list_deliveries` and every write on the endpoint need (`Writable`); one who may
    // only see it is told why, as the API would answer.
    let body = match hook.may_change(&signed.caller) {
        Err(refused) => html! { (settings(&hook)) p.error role="status" { (refused.message) } },
        Ok(()) => {
            let writable = Writable { caller: signed.caller, target: hook.clone() };
            let paging = PageQuery { cursor: form.cursor.filter(|c| !c.is_empty()), limit: None };
            let listed = list_deliveries(writable, ApiQuery(paging)).await.map_err(|e| failed(&state, e))?.0;
            html! {
                (settings(&hook))
                h2 { "Change" }
                form method="post" action={ "/console/webhooks/" (hook.id) } {
                    input type="hidden" name="csrf" value=(csrf);
                    label for="url" { "URL" }
                    input #url name="url" type="url" required maxlength="2000" value=(hook.url);
                    label for="description" { "Description" }
                    textarea #description name="description" maxlength="2000" { (hook.description.as_deref().unwrap_or_default()) }
                    (boxes)
                    button type="submit" { "Save" }
                }
                form method="post" action={ "/console/webhooks/" (hook.id) "/active" } {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="active" value=(if hook.is_active { "false" } else { "true" });
                    button type="submit" { (if hook.is_active { "Deactivate" } else { "Activate" }) }
                }
                p { a.danger href={ "/console/webhooks/" (hook.id) "/delete" } { "Delete…" } }
                h2 #deliveries { "Deliveries, newest first" }
                @if listed.items.is_empty() { p { "No deliveries yet." } }
                @for d in &listed.items { (delivery(hook.id, d, &csrf)) }
                @if let Some(cursor) = listed.next_cursor {
                    p { a href={ "/console/webhooks/" (hook.id) "?cursor=" (cursor) "#deliveries" } rel="next" { "Older deliveries" } }
                }
            }
        }
    };
    Ok(page(StatusCode::OK, layout(&state, Some(&viewer), "Webhook endpoint", body)))
}

/// A delivery with every attempt, and the form that retries it.
fn delivery(hook: Uuid, item: &DeliveryResponse, csrf: &str) -> Markup {
    let d = &item.delivery;
    html! {
        article.delivery {
            h3 { (d.event.as_str()) ": " span class={ "status-" (d.status) } { (d.status) } }
            dl {
                dt { "Delivery" } dd { code { (d.id) } }
                dt { "Event id" } dd { code { (d.event_id) } }
                dt { "Created" } dd { (at(d.created_at)) }
                @if let Some(next) = d.next_attempt_at { dt { "Next attempt" } dd { (at(next)) } }
                dt { "Retries until" } dd { (at(d.give_up_at)) }
            }
            @if item.attempt_log.is_empty() { p { "Not attempted yet." } } @else {
                div.scroll { table {
                    caption { (item.attempt_log.len()) " attempt(s), oldest first" }
                    thead { tr { th scope="col" { "Time" } th scope="col" { "Response" } th scope="col" { "Duration" } th scope="col" { "Error" } } }
                    tbody { @for a in &item.attempt_log { tr {
                        td { (at(a.attempted_at)) }
                        td { (a.status_code.map_or("none".to_owned(), |s| s.to_string())) }
                        td { (a.latency_ms) " ms" }
                        td { (a.error.as_deref().unwrap_or("—")) }
                    } } }
                } }
            }
            details {
                summary { "Payload" }
                pre { code { (serde_json::to_string_pretty(&d.payload).unwrap_or_default()) } }
            }
            form method="post" action={ "/console/webhooks/" (hook) "/deliveries/" (d.id) "/retry" } {
                input type="hidden" name="csrf" value=(csrf);
                button type="submit" { "Retry" }
            }
        }
    }
}

/// A form that changes the endpoint its path names: the session's caller admitted as the API admits
/// it, the form's CSRF token checked, then the endpoint loaded as its API route loads it (404 unseen,
/// 403 unchangeable).
pub struct HookChange {
    hook: Writable<KeysWrite, Webhook>,
    form: HookForm,
}

impl FromRequest<AppState> for HookChange {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let signed = Signed::<KeysWrite>::from_request_parts(&mut parts, state).await?;
        let path = Path::<Uuid>::from_request_parts(&mut parts, state).await;
        let FormBody(form) = FormBody::<HookForm>::from_request(Request::from_parts(parts, body), state).await?;
        signed.check_csrf(form.csrf())?;
        let id = hook_id(path).map_err(|e| failed(state, e))?;
        let target = target::writable::<_, Webhook>(&signed.caller, id).await.map_err(|e| failed(state, e))?;
        Ok(Self { hook: Writable { caller: signed.caller, target }, form })
    }
}

/// `PATCH /v1/webhooks/{id}` with `body`, then back to the endpoint's page.
async fn patch(hook: Writable<KeysWrite, Webhook>, body: Value) -> PageResult {
    let state = hook.caller.state().clone();
    let id = hook.target.id;
    let _changed = update_webhook(hook, JsonBody::of(&body)).await.map_err(|e| failed(&state, e))?;
    Ok(see_other(&format!("/console/webhooks/{id}")))
}

/// `POST /console/webhooks/{id}`: `PATCH /v1/webhooks/{id}` with its URL, events and description.
#[tracing::instrument(skip_all)]
pub async fn update_hook(HookChange { hook, form }: HookChange) -> PageResult {
    let mut body = Map::new();
    body.insert("url".to_owned(), json!(form.text("url").unwrap_or_default()));
    body.insert("events".to_owned(), json!(form.events()));
    body.insert("description".to_owned(), json!(form.text("description")));
    patch(hook, Value::Object(body)).await
}

/// `POST /console/webhooks/{id}/active`: `PATCH /v1/webhooks/{id}` with `is_active`.
#[tracing::instrument(skip_all)]
pub async fn set_active(HookChange { hook, form }: HookChange) -> PageResult {
    patch(hook, json!({ "is_active": form.value("active") == Some("true") })).await
}

/// `GET /console/webhooks/{id}/delete`: the confirmation step.
pub async fn delete_confirm(signed: Signed<KeysWrite>, path: Result<Path<Uuid>, PathRejection>) -> PageResult {
    let state = signed.caller.state().clone();
    let viewer = signed.viewer();
    let csrf = viewer.csrf.clone();
    let id = hook_id(path).map_err(|e| failed(&state, e))?;
    let hook = target::writable::<_, Webhook>(&signed.caller, id).await.map_err(|e| failed(&state, e))?;
    Ok(page(
        StatusCode::OK,
        layout(
            &state,
            Some(&viewer),
            "Delete webhook endpoint",
            html! {
                p { "Delete the endpoint " code { (hook.url) } " and every delivery of it? It receives nothing more, for good." }
                form method="post" action={ "/console/webhooks/" (hook.id) "/delete" } {
                    input type="hidden" name="csrf" value=(csrf);
                    button.danger type="submit" { "Delete for good" }
                }
                p { a href={ "/console/webhooks/" (hook.id) } { "Cancel" } }
            },
        ),
    ))
}

/// `POST /console/webhooks/{id}/delete`: `DELETE /v1/webhooks/{id}`.
#[tracing::instrument(skip_all)]
pub async fn delete_hook(HookChange { hook, .. }: HookChange) -> PageResult {
    let state = hook.caller.state().clone();
    delete_webhook(hook).await.map_err(|e| failed(&state, e))?;
    Ok(see_other("/console/webhooks"))
}

/// `POST /console/webhooks/{id}/deliveries/{delivery_id}/retry`:
/// `POST /v1/webhooks/{id}/deliveries/{delivery_id}/retry`, then back to the endpoint's deliveries.
#[tracing::instrument(skip_all)]
pub async fn retry(
    signed: Signed<KeysWrite>,
    path: Result<Path<(Uuid, Uuid)>, PathRejection>,
    FormBody(form): FormBody<HookForm>,
) -> PageResult {
    signed.check_csrf(form.csrf())?;
    let state = signed.caller.state().clone();
    let (id, delivery) = hook_id(path).map_err(|e| failed(&state, e))?;
    let _retried = retry_delivery(signed.caller, ApiPath((id, delivery))).await.map_err(|e| failed(&state, e))?;
    Ok(see_other(&format!("/console/webhooks/{id}#deliveries")))
}
