//! One table of every error Keyward answers, on the management API, in gateway mode and in the tower
//! layer alike, and the one error type that answers from it. Every error answers
//! `{"error": {"code": "snake_case", "message": "...", "field"?: "..."}}` with the status and the
//! `Retry-After` behaviour of its code in the table. A refused verification is answered through
//! [`ApiError::refused`], the one mapping from a [`VerifyOutcome`] to a code. A 5xx says
//! `internal_error` (or another 5xx code) only; its cause is logged once, in the request span.

use axum::Json;
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keyward_core::VerifyOutcome;
use keyward_store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

/// Whether an answer with a code carries `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// Not sent: waiting does not help, or nobody knows how long it would take.
    Never,
    /// Always this many seconds; added to every answer with the code.
    Seconds(u64),
    /// The seconds until the limit that refused admits a request again, from the limiter's decision
    /// (the answer's rate-limit headers carry it).
    UntilAdmitted,
}

impl RetryAfter {
    /// The fixed delay, when there is one.
    pub fn seconds(self) -> Option<u64> {
        match self {
            Self::Seconds(s) => Some(s),
            Self::Never | Self::UntilAdmitted => None,
        }
    }
}

macro_rules! error_codes {
    ($($variant:ident => ($status:ident, $code:literal, $retry:expr, $description:literal)),+ $(,)?) => {
        /// Every error code Keyward answers with, on every surface. Renaming one is an API break: the
        /// snapshot test of this table makes it visible, and a test holds the README's table to it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $($variant),+ }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),+];

            /// The wire code: stable, lower snake case.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code),+ }
            }

            pub fn status(self) -> StatusCode {
                match self { $(ErrorCode::$variant => StatusCode::$status),+ }
            }

            /// When the code is answered, in the words of the README's table.
            pub fn description(self) -> &'static str {
                match self { $(ErrorCode::$variant => $description),+ }
            }

            pub fn retry_after(self) -> RetryAfter {
                match self { $(ErrorCode::$variant => $retry),+ }
            }
        }
    };
}

use RetryAfter::{Never, Seconds, UntilAdmitted};

error_codes! {
    InvalidJson => (BAD_REQUEST, "invalid_json", Never,
        "The request body is not valid JSON."),
    InvalidQuery => (BAD_REQUEST, "invalid_query", Never,
        "A query parameter cannot be read (a wrong type or value, such as `limit=abc`), or `/v1/authz` got no style, or two, where it needs one."),
    InvalidPath => (BAD_REQUEST, "invalid_path", Never,
        "Gateway and `/v1/authz`: the path has no single safe reading (an encoded `/` or `\\`, `%00`, a broken escape, `..` above the root, `/..;/`; through `/v1/authz` and gRPC ext_authz, whose proxy forwards the path as sent, any `..` and a leading `//`), or the original method or URI header a `/v1/authz` style names is missing, repeated or not one."),
    InvalidRequest => (UNPROCESSABLE_ENTITY, "invalid_request", Never,
        "The JSON body is not an object, or has an unknown, missing or mistyped field (`field` names it)."),
    ValidationFailed => (UNPROCESSABLE_ENTITY, "validation_failed", Never,
        "A value is not acceptable: a scope, IP, date, prefix, name or bound (`field` names it)."),
    UnsupportedMediaType => (UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", Never,
        "The body is not sent as `Content-Type: application/json` (an import: `application/x-ndjson` or `text/csv`)."),
    PayloadTooLarge => (PAYLOAD_TOO_LARGE, "payload_too_large", Never,
        "The body is over 64 KiB (8 MiB or 10,000 rows for an import), or a gRPC ext_authz check carries more headers than Keyward takes."),
    RequestTimeout => (REQUEST_TIMEOUT, "request_timeout", Never,
        "The body did not arrive within `server.body_read_timeout_ms`."),
    MissingCredentials => (UNAUTHORIZED, "missing_credentials", Never,
        "No key: neither `Authorization: Bearer <key>` nor `X-API-Key: <key>`."),
    MalformedKey => (UNAUTHORIZED, "malformed_key", Never,
        "The key is not a Keyward key (wrong shape or checksum)."),
    UnknownKey => (UNAUTHORIZED, "unknown_key", Never,
        "No such key."),
    KeyRevoked => (UNAUTHORIZED, "key_revoked", Never,
        "The key was revoked (permanent)."),
    KeyDisabled => (UNAUTHORIZED, "key_disabled", Never,
        "The key is deactivated (`is_active: false`); it can be reactivated."),
    KeyExpired => (UNAUTHORIZED, "key_expired", Never,
        "The key is past its `expires_at`."),
    OrganizationDisabled => (UNAUTHORIZED, "organization_disabled", Never,
        "The key's organization is disabled: none of its keys authenticates."),
    IpNotAllowed => (FORBIDDEN, "ip_not_allowed", Never,
        "The key has an IP allow-list and the client's address is not in it."),
    InsufficientScope => (FORBIDDEN, "insufficient_scope", Never,
        "The key lacks a scope the route needs, or asks for more than its own scopes or limits allow."),
    Forbidden => (FORBIDDEN, "forbidden", Never,
        "The key may not do this to this target (e.g. a `keyward:self` key without an `owner_id` creating keys)."),
    NotFound => (NOT_FOUND, "not_found", Never,
        "No such route, or no such object for this key (another organization's objects are not found either)."),
    MethodNotAllowed => (METHOD_NOT_ALLOWED, "method_not_allowed", Never,
        "The route does not take this method."),
    Conflict => (CONFLICT, "conflict", Never,
        "A unique value is taken (an organization's slug, say) or the object is in the wrong state for the change."),
    KeyLimitReached => (CONFLICT, "key_limit_reached", Never,
        "The organization already holds its `max_api_keys` keys."),
    RateLimited => (TOO_MANY_REQUESTS, "rate_limited", UntilAdmitted,
        "A rate limit: the key's own (gateway, layer), the management API's per address, key creation per organization, or too many failed authentications from the address."),
    QuotaExceeded => (TOO_MANY_REQUESTS, "quota_exceeded", Never,
        "Gateway and layer: the key's monthly quota is spent (it resets at the start of the next UTC month)."),
    InternalError => (INTERNAL_SERVER_ERROR, "internal_error", Never,
        "A fault inside Keyward; the cause is in Keyward's log, never in the answer."),
    UpstreamUnavailable => (BAD_GATEWAY, "upstream_unavailable", Never,
        "Gateway: the upstream cannot be reached."),
    UpstreamTimeout => (GATEWAY_TIMEOUT, "upstream_timeout", Never,
        "Gateway: the upstream did not answer within `gateway.timeout_ms`."),
    StoreUnavailable => (SERVICE_UNAVAILABLE, "store_unavailable", Never,
        "The database cannot be reached (meanwhile a key the verify cache does not hold cannot be checked)."),
    // The limiter probes Redis at least once a second (`RedisConfig::probe_interval`).
    LimiterUnavailable => (SERVICE_UNAVAILABLE, "limiter_unavailable", Seconds(1),
        "Gateway and layer: Redis cannot be reached and `limiter_failure_policy` is `fail_closed`."),
    VerificationUnavailable => (SERVICE_UNAVAILABLE, "verification_unavailable", Never,
        "Layer with `Remote`: the Keyward server cannot be reached or does not answer the check (its service key refused, its store down)."),
}

impl ErrorCode {
    /// The code of a refused verification: the one mapping from an outcome to an error, for the
    /// management API's own key check, the gateway and the layer. `None` for `VALID`. `/v1/verify`
    /// answers the outcome itself, in its 200 body.
    pub fn of_outcome(outcome: VerifyOutcome) -> Option<ErrorCode> {
        refusal(outcome).map(|(code, _)| code)
    }
}

/// The code and message of a refused verification.
fn refusal(outcome: VerifyOutcome) -> Option<(ErrorCode, &'static str)> {
    Some(match outcome {
        VerifyOutcome::Valid => return None,
        VerifyOutcome::Malformed => (ErrorCode::MalformedKey, "the API key is malformed"),
        VerifyOutcome::NotFound => (ErrorCode::UnknownKey, "the API key is not known"),
        VerifyOutcome::Disabled => (ErrorCode::KeyDisabled, "the API key is disabled"),
        VerifyOutcome::Revoked => (ErrorCode::KeyRevoked, "the API key was revoked"),
        VerifyOutcome::Expired => (ErrorCode::KeyExpired, "the API key has expired"),
        VerifyOutcome::OrgDisabled => (ErrorCode::OrganizationDisabled, "the key's organization is disabled"),
        VerifyOutcome::IpNotAllowed => (ErrorCode::IpNotAllowed, "the API key may not be used from this address"),
        VerifyOutcome::InsufficientScope => {
            (ErrorCode::InsufficientScope, "the API key lacks a scope this route needs")
        }
        VerifyOutcome::RateLimited => (ErrorCode::RateLimited, "rate limit exceeded"),
        VerifyOutcome::QuotaExceeded => (ErrorCode::QuotaExceeded, "monthly quota exceeded"),
        VerifyOutcome::LimiterUnavailable => {
            (ErrorCode::LimiterUnavailable, "rate limits cannot be checked right now; retry shortly")
        }
    })
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
    pub headers: Option<Box<HeaderMap>>,
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

    /// No key in the request, on every surface.
    pub fn missing_credentials() -> Self {
        Self::new(ErrorCode::MissingCredentials, "send a key as `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    }

    /// The answer to a key that verification refused ([`ErrorCode::of_outcome`]). `VALID` is no
    /// refusal: asking for one is a fault.
    pub fn refused(outcome: VerifyOutcome) -> Self {
        match refusal(outcome) {
            Some((code, message)) => Self::new(code, message),
            None => Self::internal("a valid key was refused"),
        }
    }

    /// These headers go with the answer (those already set by the same name are replaced).
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        match &mut self.headers {
            Some(mine) => mine.extend(headers),
            None => self.headers = Some(Box::new(headers)),
        }
        self
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
        if let Some(seconds) = self.code.retry_after().seconds() {
            response.headers_mut().entry(RETRY_AFTER).or_insert(HeaderValue::from(seconds));
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
        let table: Vec<String> = ErrorCode::ALL
            .iter()
            .map(|c| format!("{} {} {:?}", c.status().as_u16(), c.as_str(), c.retry_after()))
            .collect();
        insta::assert_snapshot!(table.join("\n"));
    }

    #[test]
    fn codes_are_unique_lower_snake_case_errors() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{s}");
            assert!(code.status().is_client_error() || code.status().is_server_error(), "{s}");
            assert!(!code.description().is_empty(), "{s}");
        }
    }

    /// Each refusal has a code of its own, so a client tells them apart by `error.code` alone.
    #[test]
    fn every_refused_outcome_has_a_code_of_its_own() {
        let mut seen = std::collections::HashSet::new();
        for outcome in VerifyOutcome::ALL {
            match ErrorCode::of_outcome(outcome) {
                None => assert_eq!(outcome, VerifyOutcome::Valid),
                Some(code) => {
                    assert!(seen.insert(code), "{outcome:?} shares {code:?}");
                    assert_eq!(ApiError::refused(outcome).code, code);
                }
            }
        }
        assert_eq!(ApiError::refused(VerifyOutcome::Valid).code, ErrorCode::InternalError);
    }

    #[test]
    fn a_fixed_retry_after_goes_with_every_answer_of_its_code() {
        let r = ApiError::refused(VerifyOutcome::LimiterUnavailable).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[RETRY_AFTER], "1");
        let mut later = HeaderMap::new();
        later.insert(RETRY_AFTER, HeaderValue::from(7));
        let r = ApiError::refused(VerifyOutcome::RateLimited).with_headers(later).into_response();
        assert_eq!(r.headers()[RETRY_AFTER], "7");
        let r = ApiError::refused(VerifyOutcome::QuotaExceeded).into_response();
        assert!(!r.headers().contains_key(RETRY_AFTER));
    }
}
