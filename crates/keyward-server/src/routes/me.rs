//! `GET /v1/me`: the calling key and its organization.

use axum::Json;
use keyward_store::Organization;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{AnyKey, Caller};
use crate::error::ApiResult;
use crate::limits::Standing;
use crate::model::KeyResponse;
use crate::openapi::KeyErrors;

#[derive(Debug, Serialize, ToSchema)]
pub struct MeResponse {
    pub key: KeyResponse,
    pub organization: Organization,
    /// The key's effective limits (key override, else organization override, else plan) and where it
    /// stands: the tightest rate-limit window and the monthly quota. Reading them spends nothing.
    #[serde(flatten)]
    pub standing: Standing,
}

/// The calling key and its organization. Any valid key may call it.
#[utoipa::path(get, path = "/v1/me", tag = "keys",
    responses((status = 200, body = MeResponse), KeyErrors))]
pub async fn me(caller: Caller<AnyKey>) -> ApiResult<Json<MeResponse>> {
    let state = caller.state();
    let key = state.store.get_key(caller.key_id()).await?;
    let organization = state.store.get_org(key.organization_id).await?;
    let now = state.clock.now();
    let standing = crate::limits::standing(state, &key, &organization, now).await;
    Ok(Json(MeResponse { key: KeyResponse::new(key, now), organization, standing }))
}
