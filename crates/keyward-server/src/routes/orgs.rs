//! `/v1/organizations`: `keyward:admin` only.

use axum::Json;
use axum::http::StatusCode;
use keyward_core::OrgId;
use keyward_store::Organization;

use super::{Listed, listed};
use crate::auth::{Admin, Caller};
use crate::error::{ApiResult, ErrorBody};
use crate::extract::{ApiPath, ApiQuery, JsonBody};
use crate::model::{PageQuery, PageResponse};
use crate::openapi::{JsonBodyErrors, KeyErrors, NotFoundErrors, QueryErrors};
use crate::service::{CreateOrganizationRequest, UpdateOrganizationRequest, Validator};

/// Create an organization.
#[utoipa::path(post, path = "/v1/organizations", tag = "organizations", request_body = CreateOrganizationRequest,
    responses((status = 201, body = Organization), (status = 409, body = ErrorBody), KeyErrors, JsonBodyErrors))]
pub async fn create_org(caller: Caller<Admin>, body: JsonBody) -> ApiResult<(StatusCode, Json<Organization>)> {
    let state = caller.state();
    let body: CreateOrganizationRequest = body.parse()?;
    let now = state.clock.now();
    let new = body.validate(&Validator { plans: &state.plans, now })?;
    let org = state.store.insert_org(new, &caller.actor(now)).await?;
    Ok((StatusCode::CREATED, Json(org)))
}

/// List organizations, newest first.
#[utoipa::path(get, path = "/v1/organizations", tag = "organizations", params(PageQuery),
    responses((status = 200, body = PageResponse<Organization>), QueryErrors, KeyErrors))]
pub async fn list_orgs(admin: Caller<Admin>, ApiQuery(q): ApiQuery<PageQuery>) -> Listed<Organization> {
    let state = admin.state();
    let page = state.store.list_orgs(q.request::<OrgId>()?).await?;
    listed(page, std::convert::identity)
}

/// Read an organization.
#[utoipa::path(get, path = "/v1/organizations/{id}", tag = "organizations", params(("id" = Uuid, Path, description = "organization id")),
    responses((status = 200, body = Organization), NotFoundErrors, KeyErrors))]
pub async fn get_org(admin: Caller<Admin>, ApiPath(id): ApiPath<OrgId>) -> ApiResult<Json<Organization>> {
    let state = admin.state();
    Ok(Json(state.store.get_org(id).await?))
}

/// Update an organization (`is_active: false` disables every key of it). Audited with a diff.
#[utoipa::path(patch, path = "/v1/organizations/{id}", tag = "organizations", params(("id" = Uuid, Path, description = "organization id")),
    request_body = UpdateOrganizationRequest,
    responses((status = 200, body = Organization), NotFoundErrors, KeyErrors, JsonBodyErrors))]
pub async fn update_org(
    caller: Caller<Admin>,
    ApiPath(id): ApiPath<OrgId>,
    body: JsonBody,
) -> ApiResult<Json<Organization>> {
    let state = caller.state();
    let body: UpdateOrganizationRequest = body.parse()?;
    let now = state.clock.now();
    let patch = body.validate(&Validator { plans: &state.plans, now })?;
    Ok(Json(state.store.update_org(id, patch, &caller.actor(now)).await?.apply(&state.keys)))
}
