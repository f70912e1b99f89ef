//! Liveness and readiness.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = HealthResponse)))]
pub async fn healthz() -> Json<HealthResponse> {
    Json(HealthResponse { status: "ok" })
}

/// The store answers.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = HealthResponse), (status = 503, body = ErrorBody)))]
pub async fn readyz(State(state): State<AppState>) -> ApiResult<Json<HealthResponse>> {
    state.store.ping().await.map_err(|e| ApiError {
        source: Some(e.to_string()),
        ..ApiError::new(ErrorCode::StoreUnavailable, "the store is unavailable")
    })?;
    Ok(Json(HealthResponse { status: "ready" }))
}
