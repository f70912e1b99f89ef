//! One error type for the HTTP API and one table of codes. Every error answers
//! `{"error": {"code": "snake_case", "message": "...", "field"?: "..."}}` with the status from the table.
//! A 5xx says `internal_error` (or `store_unavailable`) only; its cause is logged once, in the request span.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keyward_store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

macro_rules! error_codes {
    ($($variant:ident => ($status:ident, $code:literal)),+ $(,)?) => {
        /// Every error code the API can answer with. Renaming one is an API break: the snapshot test of
        /// this table makes it visible.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode { $($variant),+ }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code),+ }
            }

            pub fn status(self) -> StatusCode {
                match self { $(ErrorCode::$variant => StatusCode::$status),+ }
            }
        }
    };
}

error_codes! {
    InvalidJson => (BAD_REQUEST, "invalid_json"),
    InvalidQuery => (BAD_REQUEST, "invalid_query"),
    InvalidPath => (BAD_REQUEST, "invalid_path"),
    InvalidRequest => (UNPROCESSABLE_ENTITY, "invalid_request"),
    ValidationFailed => (UNPROCESSABLE_ENTITY, "validation_failed"),
    UnsupportedMediaType => (UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
    PayloadTooLarge => (PAYLOAD_TOO_LARGE, "payload_too_large"),
    RequestTimeout => (REQUEST_TIMEOUT, "request_timeout"),
    MissingCredentials => (UNAUTHORIZED, "missing_credentials"),
    MalformedKey => (UNAUTHORIZED, "malformed_key"),
    UnknownKey => (UNAUTHORIZED, "unknown_key"),
    KeyRevoked => (UNAUTHORIZED, "key_revoked"),
    KeyDisabled => (UNAUTHORIZED, "key_disabled"),
    KeyExpired => (UNAUTHORIZED, "key_expired"),
    OrganizationDisabled => (UNAUTHORIZED, "organization_disabled"),
    IpNotAllowed => (FORBIDDEN, "ip_not_allowed"),
    InsufficientScope => (FORBIDDEN, "insufficient_scope"),
    Forbidden => (FORBIDDEN, "forbidden"),
    NotFound => (NOT_FOUND, "not_found"),
    MethodNotAllowed => (METHOD_NOT_ALLOWED, "method_not_allowed"),
    Conflict => (CONFLICT, "conflict"),
    KeyLimitReached => (CONFLICT, "key_limit_reached"),
    RateLimited => (TOO_MANY_REQUESTS, "rate_limited"),
    QuotaExceeded => (TOO_MANY_REQUESTS, "quota_exceeded"),
    InternalError => (INTERNAL_SERVER_ERROR, "internal_error"),
    UpstreamUnavailable => (BAD_GATEWAY, "upstream_unavailable"),
    UpstreamTimeout => (GATEWAY_TIMEOUT, "upstream_timeout"),
    StoreUnavailable => (SERVICE_UNAVAILABLE, "store_unavailable"),
}

/// A store failure behind an error, counted in `keyward_store_errors_total` when the error is
/// answered (not when it is made: a conversion has no side effect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    Unavailable,
    Internal,
}

impl StoreFailure {
    /// The metric's `kind` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// Store errors by kind: failures behind answered errors, and the usage writer's (`telemetry`).
pub const STORE_ERRORS_TOTAL: &str = "keyward_store_errors_total";

/// The wire form of an error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable, snake_case.
    #[schema(example = "validation_failed")]
    pub code: &'static str,
    pub message: String,
    /// The request field the error is about, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub field: Option<String>,
    /// Logged for 5xx, never sent.
    pub source: Option<String>,
    /// Counted when answered.
    pub store_failure: Option<StoreFailure>,
    /// Sent with the error (rate-limit headers on a 429); boxed to keep errors small.
    pub headers: Option<Box<axum::http::HeaderMap>>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), field: None, source: None, store_failure: None, headers: None }
    }

    pub fn field(code: ErrorCode, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: Some(field.into()), ..Self::new(code, message) }
    }

    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::field(ErrorCode::ValidationFailed, field, message)
    }

    pub fn not_found() -> Self {
        Self::new(ErrorCode::NotFound, "not found")
    }

    pub fn internal(source: impl Into<String>) -> Self {
        Self { source: Some(source.into()), ..Self::new(ErrorCode::InternalError, "internal error") }
    }

    pub fn insufficient_scope(needed: &str) -> Self {
        Self::new(ErrorCode::InsufficientScope, format!("this key lacks the scope `{needed}`"))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::not_found(),
            StoreError::Conflict(what) => Self::new(ErrorCode::Conflict, what),
            StoreError::KeyLimitReached(max) => Self::new(
                ErrorCode::KeyLimitReached,
                format!("the organization has reached its limit of {max} API keys"),
            ),
            StoreError::Unavailable(cause) => Self {
                source: Some(cause),
                store_failure: Some(StoreFailure::Unavailable),
                ..Self::new(ErrorCode::StoreUnavailable, "the store is unavailable; try again")
            },
            StoreError::Internal(cause) => {
                Self { store_failure: Some(StoreFailure::Internal), ..Self::internal(cause) }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        if let Some(failure) = self.store_failure {
            metrics::counter!(STORE_ERRORS_TOTAL, "kind" => failure.as_str()).increment(1);
        }
        if status.is_server_error() {
            tracing::error!(code = self.code.as_str(), cause = self.source.as_deref().unwrap_or(""), "request failed");
        } else {
            tracing::debug!(code = self.code.as_str(), message = %self.message, "request refused");
        }
        let body =
            ErrorBody { error: ErrorDetail { code: self.code.as_str(), message: self.message, field: self.field } };
        let mut response = (status, Json(body)).into_response();
        if let Some(headers) = self.headers {
            response.headers_mut().extend(*headers);
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A rename here is an API break; this snapshot makes it a visible decision.
    #[test]
    fn error_code_table_is_stable() {
        let table: Vec<String> =
            ErrorCode::ALL.iter().map(|c| format!("{} {}", c.status().as_u16(), c.as_str())).collect();
        insta::assert_snapshot!(table.join("\n"));
    }
}
