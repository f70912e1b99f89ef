//! `GET /v1/me`: the calling key and its organization.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiResult, ErrorBody};
use crate::model::{KeyResponse, OrganizationResponse};
use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct MeResponse {
    pub key: KeyResponse,
    pub organization: OrganizationResponse,
}

/// The calling key and its organization. Any valid key may call it.
#[utoipa::path(get, path = "/v1/me", tag = "keys",
    responses((status = 200, body = MeResponse), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn me(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<MeResponse>> {
    let organization = state.store.get_org(caller.key.organization_id).await?;
    Ok(Json(MeResponse { key: KeyResponse::new(caller.key, state.clock.now()), organization: organization.into() }))
}
