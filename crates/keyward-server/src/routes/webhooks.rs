//! `/v1/webhooks`: an organization's webhook endpoints (create: the signing secret is shown once;
//! list, read, update, delete) and their deliveries (list with every attempt, retry one).
//!
//! Authorization: `keyward:keys:write` for the caller's own organization (webhooks carry every key
//! event of it; `keyward:self` is not enough), `keyward:admin` for any organization. An endpoint of
//! another organization answers 404, like one that does not exist.
//!
//! SECURITY: changing an endpoint needs everything creating it needs: creating one subscribed to an
//! event that belongs to no organization (`auth.failures_spike`) needs `keyward:admin`, so does every
//! write on an endpoint that is subscribed to one now (PATCH of any field, DELETE, retrying a delivery)
//! and every PATCH that would subscribe it to one; so does listing its deliveries, which carry those
//! events' payloads. Such an endpoint stays visible to `keyward:keys:write` of its organization (403
//! `insufficient_scope` on the writes, as for a key holding `keyward:` scopes the caller lacks), and the
//! signing secret is never shown again after creation, to anyone.

use axum::Json;
use axum::http::StatusCode;
use axum::response::Response;
use keyward_store::{Attempt, Delivery, EventKind, NewWebhook, Webhook, WebhookPatch, WebhookSecret};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{Caller, KeysWrite};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::extract::{ApiPath, ApiQuery, JsonBody, double_option};
use crate::model::{PageQuery, PageResponse};
use crate::openapi::{JsonBodyErrors, KeyErrors, NotFoundErrors, QueryErrors};
use crate::routes::Listed;
use crate::routes::target::{self, Target, Visible, Writable};
use crate::webhooks::check_url;

const MAX_DESCRIPTION: usize = 2_000;

/// `201` of `POST /v1/webhooks`: the only time the signing secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedWebhookResponse {
    /// The signing secret (`whsec_...`). Shown once; store it now.
    pub secret: String,
    pub webhook: Webhook,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookListResponse {
    pub items: Vec<Webhook>,
}

/// A delivery as the API shows it: the stored record and every attempt at it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryResponse {
    #[serde(flatten)]
    pub delivery: Delivery,
    /// Every attempt, oldest first.
    pub attempt_log: Vec<Attempt>,
}

/// The body of `POST /v1/webhooks`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookRequest {
    #[schema(value_type = WebhookUrl)]
    pub url: String,
    /// Events to receive (see the README); empty or absent: every event. `auth.failures_spike` needs
    /// `keyward:admin`.
    #[serde(default)]
    #[schema(value_type = Vec<EventKind>)]
    pub events: Vec<String>,
    pub is_active: Option<bool>,
    /// At most 2,000 characters; blank: none.
    #[schema(max_length = 2000)]
    pub description: Option<String>,
    /// Only with `keyward:admin`; default: the caller's organization.
    #[schema(format = Uuid)]
    pub organization_id: Option<String>,
}

/// A webhook target as `check_url` takes it.
pub struct WebhookUrl;

impl utoipa::PartialSchema for WebhookUrl {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        // A subset of what `http::Uri` takes (it also takes IPv6 literals, user info and a few more
        // characters): the common form, so a client's check never admits what the server refuses.
        // The lookahead refuses a host made only of numeric parts (`127.1`, `0x7f000001`) unless it
        // is a dotted quad, as `check_url` does.
        crate::model::text_schema(
            8,
            2000,
            concat!(
                r"^[Hh][Tt][Tt][Pp][Ss]?://",
                r"(?!(?!(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])",
                r"\.?(?:[:/?]|$))(?:(?:[0-9]+|0[Xx][0-9A-Fa-f]*)\.)*(?:[0-9]+|0[Xx][0-9A-Fa-f]*)\.?(?:[:/?]|$))",
                r"[A-Za-z0-9\-._~!$&'()*+,;=]+(:[0-9]{1,5})?(/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*)?",
                r"(\?[A-Za-z0-9\-._~!$&'()*+,;=:@/%?]*)?$",
            ),
            "An absolute `http://` or `https://` URL naming a host, at most 2,000 characters. An IPv4 \
             address is written as four decimal numbers (`127.1`, `2130706433` and `0x7f000001` are \
             refused). Loopback and private addresses are refused unless the server allows them.",
        )
    }
}

impl ToSchema for WebhookUrl {}

/// The body of `PATCH /v1/webhooks/{id}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhookRequest {
    #[schema(value_type = Option<WebhookUrl>)]
    pub url: Option<String>,
    /// As at creation; empty: every event.
    #[schema(value_type = Option<Vec<EventKind>>)]
    pub events: Option<Vec<String>>,
    pub is_active: Option<bool>,
    /// At most 2,000 characters; blank or `null`: none.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, max_length = 2000)]
    pub description: Option<Option<String>>,
}

/// What an endpoint subscribed to `events` needs beyond `keyward:keys:write` in its organization:
/// checked at creation, and on every write with the endpoint's current events and its new ones.
fn check_admin_events<P>(caller: &Caller<P>, events: &[EventKind]) -> ApiResult<()> {
    // Events that belong to no organization: only `keyward:admin` may subscribe to them.
    match events.iter().find(|e| e.is_global()) {
        Some(event) if !caller.is_admin() => Err(ApiError::new(
            ErrorCode::InsufficientScope,
            format!("an endpoint subscribed to `{event}` needs the scope `keyward:admin`"),
        )),
        _ => Ok(()),
    }
}

/// The events named, each once, in the order of their names.
fn check_events(events: &[String]) -> ApiResult<Vec<EventKind>> {
    let mut out = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let Some(kind) = EventKind::parse(e) else {
            return Err(ApiError::validation(
                format!("events[{i}]"),
                // SECURITY: the name is client input, and could be a key pasted in the wrong place.
                format!(
                    "unknown event {}; known events: {}",
                    keyward_core::key::quote_if_not_key(e),
                    EventKind::ALL.map(EventKind::as_str).join(", ")
                ),
            ));
        };
        out.push(kind);
    }
    out.sort_by_key(|e| e.as_str());
    out.dedup();
    Ok(out)
}

fn check_description(d: Option<String>) -> ApiResult<Option<String>> {
    match d {
        Some(d) if d.chars().count() > MAX_DESCRIPTION => {
            Err(ApiError::validation("description", format!("must be at most {MAX_DESCRIPTION} characters")))
        }
        Some(d) if d.trim().is_empty() => Ok(None),
        d => Ok(d),
    }
}

/// An endpoint is visible to a caller that reaches its organization, and writable (changed, or its
/// deliveries read) by one that could have created it.
impl Target for Webhook {
    type Id = Uuid;

    async fn visible<P>(caller: &Caller<P>, id: Uuid) -> ApiResult<Webhook> {
        let hook = caller.state().store.get_webhook(id).await?;
        if caller.reaches_org(hook.organization_id) { Ok(hook) } else { Err(ApiError::not_found()) }
    }

    fn may_change<P>(&self, caller: &Caller<P>) -> ApiResult<()> {
        // SECURITY: without this, `keyward:keys:write` could repoint, silence or delete an endpoint that
        // only `keyward:admin` may create.
        check_admin_events(caller, &self.events)
    }
}

/// Create a webhook endpoint. The signing secret is in this response only.
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", request_body = CreateWebhookRequest,
    responses((status = 201, body = CreatedWebhookResponse), KeyErrors, JsonBodyErrors))]
#[tracing::instrument(skip_all)]
pub async fn create_webhook(caller: Caller<KeysWrite>, body: JsonBody) -> ApiResult<Response> {
    let created = create(&caller, body.parse()?).await?;
    Ok(super::created_with_secret(Default::default(), created))
}

/// What `POST /v1/webhooks` does with its body (the console's form calls it too).
pub async fn create(caller: &Caller<KeysWrite>, body: CreateWebhookRequest) -> ApiResult<CreatedWebhookResponse> {
    let state = caller.state();
    let organization_id = caller.organization_for(body.organization_id.as_deref())?;
    check_url(&body.url, state.webhooks.allow_private_targets).map_err(|m| ApiError::validation("url", m))?;
    let events = check_events(&body.events)?;
    check_admin_events(caller, &events)?;
    let description = check_description(body.description)?;
    let secret = keyward_core::webhook::generate_secret()
        .map_err(|e| ApiError::internal(format!("the OS random generator failed: {e}")))?;
    let now = state.clock.now();
    let new = NewWebhook {
        id: Uuid::now_v7(),
        organization_id,
        url: body.url,
        events,
        is_active: body.is_active.unwrap_or(true),
        secret: WebhookSecret(secret.clone()),
        description,
    };
    let hook = state.store.insert_webhook(new, &caller.actor(now)).await.map_err(|e| match e {
        keyward_store::StoreError::NotFound => ApiError::validation("organization_id", "no such organization"),
        e => e.into(),
    })?;
    Ok(CreatedWebhookResponse { secret, webhook: hook })
}

/// List the caller's organization's webhook endpoints (every organization's for `keyward:admin`).
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks",
    responses((status = 200, body = WebhookListResponse), KeyErrors))]
pub async fn list_webhooks(caller: Caller<KeysWrite>) -> ApiResult<Json<WebhookListResponse>> {
    let state = caller.state();
    let hooks = state.store.list_webhooks(caller.org_filter()).await?;
    Ok(Json(WebhookListResponse { items: hooks }))
}

/// Read one webhook endpoint.
#[utoipa::path(get, path = "/v1/webhooks/{id}", tag = "webhooks", params(("id" = Uuid, Path, description = "webhook id")),
    responses((status = 200, body = Webhook), NotFoundErrors, KeyErrors))]
pub async fn get_webhook(hook: Visible<KeysWrite, Webhook>) -> ApiResult<Json<Webhook>> {
    Ok(Json(hook.target))
}

/// Update a webhook endpoint (url, events, is_active, description). The secret stays.
#[utoipa::path(patch, path = "/v1/webhooks/{id}", tag = "webhooks", params(("id" = Uuid, Path, description = "webhook id")),
    request_body = UpdateWebhookRequest,
    responses((status = 200, body = Webhook), NotFoundErrors, KeyErrors, JsonBodyErrors))]
#[tracing::instrument(skip_all)]
pub async fn update_webhook(hook: Writable<KeysWrite, Webhook>, body: JsonBody) -> ApiResult<Json<Webhook>> {
    let Writable { caller, target: hook } = hook;
    let state = caller.state();
    let body: UpdateWebhookRequest = body.parse()?;
    if let Some(url) = &body.url {
        check_url(url, state.webhooks.allow_private_targets).map_err(|m| ApiError::validation("url", m))?;
    }
    let events = body.events.as_deref().map(check_events).transpose()?;
    // SECURITY: the events it will have are checked as at creation (the current ones were, above).
    check_admin_events(&caller, events.as_deref().unwrap_or_default())?;
    let patch = WebhookPatch {
        url: body.url,
        events,
        is_active: body.is_active,
        description: body.description.map(check_description).transpose()?,
    };
    let now = state.clock.now();
    Ok(Json(state.store.update_webhook(hook.id, patch, &caller.actor(now)).await?))
}

/// Delete a webhook endpoint and its deliveries.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks", params(("id" = Uuid, Path, description = "webhook id")),
    responses((status = 204), NotFoundErrors, KeyErrors))]
#[tracing::instrument(skip_all)]
pub async fn delete_webhook(hook: Writable<KeysWrite, Webhook>) -> ApiResult<StatusCode> {
    let Writable { caller, target: hook } = hook;
    let state = caller.state();
    state.store.delete_webhook(hook.id, &caller.actor(state.clock.now())).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The endpoint's deliveries, newest first, a page at a time, each with every attempt.
#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = Uuid, Path, description = "webhook id"), PageQuery),
    responses((status = 200, body = PageResponse<DeliveryResponse>), QueryErrors, NotFoundErrors, KeyErrors))]
pub async fn list_deliveries(
    hook: Writable<KeysWrite, Webhook>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Listed<DeliveryResponse> {
    // Deliveries carry the payloads of the endpoint's events: reading them needs what receiving them
    // does, hence `Writable`.
    let state = hook.caller.state();
    let page = state.store.list_deliveries(hook.target.id, q.request::<Uuid>()?).await?;
    // The page's attempts in one read, not one per delivery.
    let ids: Vec<Uuid> = page.items.iter().map(|d| d.id).collect();
    let mut attempts = state.store.list_attempts_of(&ids).await?;
    let items = page
        .items
        .into_iter()
        .map(|d| DeliveryResponse { attempt_log: attempts.remove(&d.id).unwrap_or_default(), delivery: d })
        .collect();
    Ok(Json(PageResponse { items, next_cursor: page.next_cursor.map(|c| c.to_string()) }))
}

/// Send a delivery again now (also a failed one): it is pending again, with a fresh retry window.
#[utoipa::path(post, path = "/v1/webhooks/{id}/deliveries/{delivery_id}/retry", tag = "webhooks",
    params(("id" = Uuid, Path, description = "webhook id"), ("delivery_id" = Uuid, Path, description = "delivery id")),
    responses((status = 200, body = DeliveryResponse), NotFoundErrors, KeyErrors))]
#[tracing::instrument(skip_all)]
pub async fn retry_delivery(
    caller: Caller<KeysWrite>,
    ApiPath((id, delivery)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<DeliveryResponse>> {
    let state = caller.state();
    target::writable::<_, Webhook>(&caller, id).await?;
    let now = state.clock.now();
    let give_up = now + chrono::Duration::hours(state.webhooks.retry_for_hours.min(24 * 30) as i64);
    let d = state.store.retry_delivery(id, delivery, now, give_up).await?;
    let attempts = state.store.list_attempts(d.id).await?;
    state.events_written();
    Ok(Json(DeliveryResponse { delivery: d, attempt_log: attempts }))
}
