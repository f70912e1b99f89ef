//! `/v1/keys`: create (the key is shown once), list, read, update (audited with a diff), revoke,
//! rotate, and expiry management (`/v1/keys/expiring`, `/v1/keys/cleanup-expired`).

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::{DateTime, Utc};
use keyward_core::{Environment, KeyId, KeyStatus, OrgId};
use keyward_store::{ApiKey, KeyFilter, MAX_KEY_SEARCH_CHARS};
use serde::Deserialize;

use super::target::{Target, Visible, Writable};
use super::{Listed, listed};
use crate::auth::{Caller, KeysReadOrSelf, KeysWrite, KeysWriteOrSelf};
use crate::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use crate::extract::{ApiQuery, JsonBody};
use crate::model::{
    CreatedKeyResponse, EnvironmentName, KeyResponse, KeyStatusName, PageQuery, PageResponse, RotatedKeyResponse,
};
use crate::openapi::{JsonBodyErrors, KeyErrors, NotFoundErrors, QueryErrors};
use crate::service::{self, CreateKeyRequest, RotateKeyRequest, UpdateKeyRequest, Validator};

/// A key is visible to a caller that sees it ([`Caller::sees_key`]), and writable (update, revoke,
/// rotate) by one that may change it ([`Caller::may_change`]).
impl Target for ApiKey {
    type Id = KeyId;

    async fn visible<P>(caller: &Caller<P>, id: KeyId) -> ApiResult<ApiKey> {
        let key = caller.state().store.get_key(id).await?;
        if caller.sees_key(&key) { Ok(key) } else { Err(ApiError::not_found()) }
    }

    fn may_change<P>(&self, caller: &Caller<P>) -> ApiResult<()> {
        caller.may_change(self)
    }
}

/// SECURITY: a key's own plan and limit overrides may only make it tighter than its organization's own
/// settings allow, unless the caller holds `keyward:admin` (SECURITY.md); else a tenant that may create
/// keys could give itself a bigger plan than it pays for.
async fn check_limits<P>(
    caller: &Caller<P>,
    organization_id: OrgId,
    plan: Option<&str>,
    overrides: &keyward_store::LimitOverrides,
) -> ApiResult<()> {
    if caller.is_admin() || (plan.is_none() && *overrides == keyward_store::LimitOverrides::default()) {
        return Ok(());
    }
    let state = caller.state();
    let org = state.store.get_org(organization_id).await?;
    let own = state.plans.resolve(&org.plan, None, &org.limits.core(), &keyward_core::LimitOverrides::NONE);
    let key = state.plans.resolve(&org.plan, plan, &org.limits.core(), &overrides.core());
    match key.looser_than(&own) {
        None => Ok(()),
        Some(w) => {
            let limit = w.limit.map_or_else(|| "no limit".to_owned(), |l| l.to_string());
            Err(ApiError::field(
                ErrorCode::InsufficientScope,
                "plan",
                format!(
                    "a key's plan and limits may only be tighter than its organization's ({} {limit} > {}); \
                     only `keyward:admin` may give a key looser limits",
                    w.window, w.bound
                ),
            ))
        }
    }
}

/// Create a key. The full key is in this response only.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKeyRequest,
    responses((status = 201, body = CreatedKeyResponse), (status = 409, body = ErrorBody), KeyErrors, JsonBodyErrors))]
#[tracing::instrument(skip_all)]
pub async fn create_key(caller: Caller<KeysWriteOrSelf>, body: JsonBody) -> ApiResult<Response> {
    let (headers, created) = create(&caller, body.parse()?).await?;
    Ok(super::created_with_secret(headers, created))
}

/// What `POST /v1/keys` does with its body (the console's form too): the new key, and the headers of
/// the key-creation limit.
pub async fn create(
    caller: &Caller<KeysWriteOrSelf>,
    mut body: CreateKeyRequest,
) -> ApiResult<(HeaderMap, CreatedKeyResponse)> {
    let state = caller.state();
    let organization_id = caller.organization_for(body.organization_id.take().as_deref())?;
    body.owner_id = caller.owner_for(body.owner_id.take())?;
    let now = state.clock.now();
    let draft = body.validate(&Validator { plans: &state.plans, now }, organization_id)?;
    caller.may_grant(&draft.scopes)?;
    check_limits(caller, organization_id, draft.plan.as_deref(), &Default::default()).await?;
    let limit = crate::limits::key_creation(state, organization_id, now).await?;
    let (plain, record) = service::create_key(state, draft, &caller.actor(now)).await?;
    tracing::info!(key_id = %record.id, key = %plain.redacted(), "key created");
    let body = CreatedKeyResponse { key: plain.expose_secret().to_owned(), api_key: KeyResponse::new(record, now) };
    Ok((crate::limits::headers(&limit, now), body))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListKeysQuery {
    pub owner_id: Option<String>,
    #[param(value_type = Option<EnvironmentName>)]
    pub environment: Option<String>,
    #[param(value_type = Option<KeyStatusName>)]
    pub status: Option<String>,
    /// Also list disabled and revoked keys.
    pub include_inactive: Option<bool>,
    /// Keys whose name or owner id contains this text (ASCII letters in any case, every other
    /// character as it is; `%` and `_` are plain characters), or whose hint (last 4 characters) is
    /// exactly it; 1-100 characters.
    #[param(min_length = 1, max_length = 100)]
    pub q: Option<String>,
    /// Only keys not expired yet that expire within this many days, 1-365.
    #[param(minimum = 1, maximum = 365)]
    pub expiring_within_days: Option<u32>,
}

/// Most days ahead an expiry filter looks (`expiring_within_days`, `/v1/keys/expiring?days`).
const MAX_EXPIRY_DAYS: u32 = 365;

/// The end of an expiry window of `days` days from `now`, or 400 naming the parameter.
fn expiry_window(now: DateTime<Utc>, days: u32, param: &str) -> ApiResult<DateTime<Utc>> {
    if !(1..=MAX_EXPIRY_DAYS).contains(&days) {
        return Err(ApiError::new(ErrorCode::InvalidQuery, format!("`{param}` must be 1-{MAX_EXPIRY_DAYS}")));
    }
    Ok(now + chrono::Duration::days(i64::from(days)))
}

/// A search text of 1 to [`MAX_KEY_SEARCH_CHARS`] characters.
fn search_text(q: Option<String>) -> ApiResult<Option<String>> {
    match q {
        Some(q) if q.is_empty() || q.chars().count() > MAX_KEY_SEARCH_CHARS => {
            Err(ApiError::new(ErrorCode::InvalidQuery, format!("`q` must be 1-{MAX_KEY_SEARCH_CHARS} characters")))
        }
        q => Ok(q),
    }
}

/// List the keys of the caller's organization (every organization for `keyward:admin`), newest first.
#[utoipa::path(get, path = "/v1/keys", tag = "keys", params(ListKeysQuery, PageQuery),
    responses((status = 200, body = PageResponse<KeyResponse>), QueryErrors, KeyErrors))]
pub async fn list_keys(
    caller: Caller<KeysReadOrSelf>,
    ApiQuery(q): ApiQuery<ListKeysQuery>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Listed<KeyResponse> {
    let state = caller.state();
    let bad = |m: &str| ApiError::new(ErrorCode::InvalidQuery, m.to_owned());
    let environment = q
        .environment
        .as_deref()
        .map(Environment::parse)
        .transpose()
        .map_err(|_| bad("`environment` must be `live` or `test`"))?;
    let status = q
        .status
        .as_deref()
        .map(|s| KeyStatus::parse(s).ok_or_else(|| bad("`status` must be active, disabled, expired or revoked")))
        .transpose()?;
    let owner_id = caller.listed_owner().map(str::to_owned).or(q.owner_id);
    let search = search_text(q.q)?;
    let page = page.request::<KeyId>()?;
    let now = state.clock.now();
    let expires_by = q.expiring_within_days.map(|d| expiry_window(now, d, "expiring_within_days")).transpose()?;
    // SECURITY: the search narrows the caller's own listing (organization, and owner for
    // `keyward:self`); it never widens it.
    let filter = KeyFilter {
        organization_id: caller.org_filter(),
        owner_id,
        environment,
        status,
        include_inactive: q.include_inactive.unwrap_or(false),
        search,
        expires_by,
        now,
    };
    let page = state.store.list_keys(&filter, page).await?;
    listed(page, |k| KeyResponse::new(k, now))
}

/// Read one key.
#[utoipa::path(get, path = "/v1/keys/{id}", tag = "keys", params(("id" = Uuid, Path, description = "key id")),
    responses((status = 200, body = KeyResponse), NotFoundErrors, KeyErrors))]
pub async fn get_key(key: Visible<KeysReadOrSelf, ApiKey>) -> ApiResult<Json<KeyResponse>> {
    let Visible { caller, target: key } = key;
    let state = caller.state();
    let org = state.store.get_org(key.organization_id).await?;
    let limits = crate::limits::effective(state, &key, &org);
    Ok(Json(KeyResponse { effective_limits: Some(limits), ..KeyResponse::new(key, state.clock.now()) }))
}

/// Update a key; `is_active: false` deactivates it, `true` reactivates it. Audited with a diff.
#[utoipa::path(patch, path = "/v1/keys/{id}", tag = "keys", params(("id" = Uuid, Path, description = "key id")),
    request_body = UpdateKeyRequest,
    responses((status = 200, body = KeyResponse), NotFoundErrors, KeyErrors, JsonBodyErrors))]
#[tracing::instrument(skip_all)]
pub async fn update_key(key: Writable<KeysWrite, ApiKey>, body: JsonBody) -> ApiResult<Json<KeyResponse>> {
    let body = body.parse()?;
    Ok(Json(update(key, body).await?))
}

/// What `PATCH /v1/keys/{id}` does with its body (the console's forms too).
pub async fn update(key: Writable<KeysWrite, ApiKey>, body: UpdateKeyRequest) -> ApiResult<KeyResponse> {
    let Writable { caller, target: key } = key;
    let state = caller.state();
    let now = state.clock.now();
    let patch = body.validate(&Validator { plans: &state.plans, now })?;
    if let Some(scopes) = &patch.scopes {
        caller.may_grant(scopes)?;
    }
    if let Some(Some(plan)) = &patch.plan {
        check_limits(&caller, key.organization_id, Some(plan), &key.limits).await?;
    }
    let key = state.store.update_key(key.id, patch, &caller.actor(now)).await?.apply(&state.keys);
    Ok(KeyResponse::new(key, now))
}

/// Revoke a key: permanent; the record stays for the audit trail.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys", params(("id" = Uuid, Path, description = "key id")),
    responses((status = 204), NotFoundErrors, KeyErrors))]
#[tracing::instrument(skip_all)]
pub async fn revoke_key(key: Writable<KeysWriteOrSelf, ApiKey>) -> ApiResult<StatusCode> {
    let Writable { caller, target: key } = key;
    let state = caller.state();
    let now = state.clock.now();
    state.store.revoke_key(key.id, "revoked", now, &caller.actor(now)).await?.apply(&state.keys);
    Ok(StatusCode::NO_CONTENT)
}

/// Rotate a key: a new key with the same settings (shown once), the old one revoked (reason `rotated`)
/// when the grace period ends. Rate-limit and quota counters are shared by the two. A key rotated
/// before, or revoked, answers 409.
#[utoipa::path(post, path = "/v1/keys/{id}/rotate", tag = "keys", params(("id" = Uuid, Path, description = "key id")),
    request_body = RotateKeyRequest,
    responses((status = 201, body = RotatedKeyResponse), NotFoundErrors, (status = 409, body = ErrorBody),
        KeyErrors, JsonBodyErrors))]
#[tracing::instrument(skip_all)]
pub async fn rotate_key(old: Writable<KeysWriteOrSelf, ApiKey>, body: JsonBody) -> ApiResult<Response> {
    let body = body.parse()?;
    let (headers, rotated) = rotate(old, body).await?;
    Ok(super::created_with_secret(headers, rotated))
}

/// What `POST /v1/keys/{id}/rotate` does with its body (the console's form too): the new key, and
/// the headers of the key-creation limit.
pub async fn rotate(
    old: Writable<KeysWriteOrSelf, ApiKey>,
    body: RotateKeyRequest,
) -> ApiResult<(HeaderMap, RotatedKeyResponse)> {
    let Writable { caller, target: old } = old;
    let state = caller.state();
    let now = state.clock.now();
    let draft = body.validate(&Validator { plans: &state.plans, now })?;
    // SECURITY: the new key carries the old key's scopes, plan and limits, so rotating is granting
    // them: the rules of creation apply (a self-service caller only grants customer scopes its own
    // cover; a grace period would otherwise leave two keys with scopes the caller could never mint).
    caller.may_grant(&old.scopes)?;
    check_limits(&caller, old.organization_id, old.plan.as_deref(), &old.limits).await?;
    let limit = crate::limits::key_creation(state, old.organization_id, now).await?;
    let (plain, rotation) = service::rotate_key(state, &old, draft, &caller.actor(now)).await?;
    tracing::info!(key_id = %rotation.new.id, rotated_from = %old.id, key = %plain.redacted(), "key rotated");
    state.events_written();
    let body = RotatedKeyResponse {
        key: plain.expose_secret().to_owned(),
        api_key: KeyResponse::new(rotation.new, now),
        old_api_key: KeyResponse::new(rotation.old, now),
    };
    Ok((crate::limits::headers(&limit, now), body))
}

/// Most keys `GET /v1/keys/expiring` lists.
const EXPIRING_LIMIT: u32 = 1_000;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExpiringQuery {
    /// Keys expiring within this many days, 1-365; default 7.
    #[param(minimum = 1, maximum = 365)]
    pub days: Option<u32>,
}

/// `GET /v1/keys/expiring`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ExpiringResponse {
    pub days: u32,
    /// Usable keys that expire within `days`, soonest first (at most 1,000).
    pub items: Vec<KeyResponse>,
}

/// List the keys that expire within `days` days (the caller's organization; every organization for
/// `keyward:admin`; a `keyward:self` key sees its own owner's keys).
#[utoipa::path(get, path = "/v1/keys/expiring", tag = "keys", params(ExpiringQuery),
    responses((status = 200, body = ExpiringResponse), QueryErrors, KeyErrors))]
pub async fn list_expiring(
    caller: Caller<KeysReadOrSelf>,
    ApiQuery(q): ApiQuery<ExpiringQuery>,
) -> ApiResult<Json<ExpiringResponse>> {
    let state = caller.state();
    let days = q.days.unwrap_or(7);
    let now = state.clock.now();
    let until = expiry_window(now, days, "days")?;
    let keys = state.store.list_expiring_keys(caller.org_filter(), now, until, EXPIRING_LIMIT).await?;
    let items = keys.into_iter().filter(|k| caller.sees_key(k)).map(|k| KeyResponse::new(k, now)).collect();
    Ok(Json(ExpiringResponse { days, items }))
}

/// `POST /v1/keys/cleanup-expired`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CleanupResponse {
    /// How many expired keys were deactivated.
    pub deactivated: usize,
    #[schema(value_type = Vec<String>)]
    pub key_ids: Vec<KeyId>,
}

/// Deactivate every expired key of the caller's organization (every organization for
/// `keyward:admin`) now, as the sweeper does on its schedule: one `expire` audit row each, with the
/// caller as actor, and a `key.expired` event. Needs `keyward:keys:write` (`keyward:self` is not
/// enough: this acts on the whole organization).
#[utoipa::path(post, path = "/v1/keys/cleanup-expired", tag = "keys",
    responses((status = 200, body = CleanupResponse), KeyErrors))]
#[tracing::instrument(skip_all)]
pub async fn cleanup_expired(caller: Caller<KeysWrite>) -> ApiResult<Json<CleanupResponse>> {
    let state = caller.state();
    let now = state.clock.now();
    let expired = state.store.expire_keys(caller.org_filter(), now, &caller.actor(now)).await?.apply(&state.keys);
    if !expired.is_empty() {
        state.events_written();
    }
    Ok(Json(CleanupResponse { deactivated: expired.len(), key_ids: expired.into_iter().map(|k| k.id).collect() }))
}
