//! Liveness, readiness and metrics.

use axum::Json;
use axum::extract::State;
use keyward_store::KeyLookup;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::state::AppState;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = HealthResponse)), security())]
pub async fn healthz() -> Json<HealthResponse> {
    Json(HealthResponse { status: "ok" })
}

/// `GET /readyz`: whether this node can answer, and what is degraded.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyResponse {
    /// `ready`, or `degraded` when the store (503) or the limiter's Redis (200) is unreachable.
    #[schema(example = "ready")]
    pub status: &'static str,
    /// `ok` or `unreachable`. While unreachable, cached keys answer for up to `cache.stale_ceiling_ms`
    /// and everything else is 503.
    #[schema(example = "ok")]
    pub store: &'static str,
    /// Seconds the store has been unreachable, while it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_down_for_s: Option<u64>,
    /// The rate limiter's backend: `ok` (in memory, or Redis answering) or `unreachable`: limits then
    /// follow `limiter_failure_policy` (still 200: the node answers).
    #[schema(example = "ok")]
    pub limiter: &'static str,
    /// Seconds Redis has been unreachable, while it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limiter_down_for_s: Option<u64>,
}

/// Ready when the store and the limiter's backend answer; what is degraded otherwise (503 when it is
/// the store, which only cached keys survive; 200 when it is Redis, whose outage the limiter's policy
/// covers). While the verify path's
/// breaker is open the store is not pinged again: the probe does that.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = ReadyResponse), (status = 503, body = ReadyResponse)), security())]
pub async fn readyz(State(state): State<AppState>) -> axum::response::Response {
    let down_for = state.keys.breaker().down_for();
    let reachable = down_for.is_none() && KeyLookup::ping(&state.keys).await.is_ok();
    let limiter = state.limiter.health();
    let body = ReadyResponse {
        status: if reachable && limiter.up { "ready" } else { "degraded" },
        store: if reachable { "ok" } else { "unreachable" },
        store_down_for_s: down_for.map(|d| d.as_secs()),
        limiter: if limiter.up { "ok" } else { "unreachable" },
        limiter_down_for_s: limiter.degraded_for.map(|d| d.as_secs()),
    };
    let status = if reachable { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// Prometheus metrics (text format). Labels never carry a key, a key id or an IP.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, content_type = "text/plain", body = String)), security())]
pub async fn metrics() -> axum::response::Response {
    match crate::telemetry::install() {
        Some(handle) => ([(CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => ApiError::internal("another metrics recorder is installed").into_response(),
    }
}
