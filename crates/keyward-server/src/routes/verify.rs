//! `POST /v1/verify`: the hot path. Always 200 for a well-formed request; the outcome is a value.

use std::net::IpAddr;

use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use chrono::{DateTime, Utc};
use keyward_core::{Environment, KeyId, OrgId, Scope, ScopeSet, VerifyOutcome};
use keyward_store::usage::MAX_QUOTA_COST;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::auth::{Caller, Verify};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::limits::{self, QuotaInfo, RateLimitInfo};
use crate::openapi::{JsonBodyErrors, KeyErrors};
use crate::verifier::{self, Check};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyKeyRequest {
    /// The key your client presented.
    pub key: String,
    /// Scopes the request needs; each must be covered by the key's scopes.
    #[serde(default)]
    #[schema(value_type = Vec<crate::model::ScopeName>)]
    pub required_scopes: Vec<String>,
    /// The end client's IP, checked against the key's allow-list. A key with an allow-list is refused
    /// (`IP_NOT_ALLOWED`) when this is missing.
    #[schema(value_type = Option<crate::model::IpAddress>)]
    pub ip: Option<String>,
    /// Units of the monthly quota this request spends: 0 to 1,000,000,000; 1 by default (e.g. tokens
    /// for an LLM API).
    #[schema(minimum = 0, maximum = 1000000000)]
    pub cost: Option<u64>,
    /// The endpoint of your API the request was for (recorded in the key's usage; 1 to 200 characters,
    /// no control characters).
    #[schema(min_length = 1, max_length = 200, pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$")]
    pub endpoint: Option<String>,
    /// The HTTP method of the request (recorded in the key's usage): 1 to 16 letters.
    #[schema(min_length = 1, max_length = 16, pattern = "^[A-Za-z]+$")]
    pub method: Option<String>,
}

/// Borrows from the verified key's shared record: answering copies none of it.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyKeyResponse<'a> {
    pub valid: bool,
    #[schema(value_type = String, example = "VALID")]
    pub code: VerifyOutcome,
    #[schema(value_type = Option<String>)]
    pub key_id: Option<KeyId>,
    #[schema(value_type = Option<String>)]
    pub organization_id: Option<OrgId>,
    pub owner_id: Option<&'a str>,
    #[schema(value_type = Option<String>)]
    pub environment: Option<Environment>,
    #[schema(value_type = Option<Vec<String>>)]
    pub scopes: Option<&'a ScopeSet>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<&'a Value>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The key's tightest rate-limit window, once the key got that far.
    pub rate_limit: Option<RateLimitInfo>,
    /// The monthly quota the key draws from, once the key got that far.
    pub quota: Option<QuotaInfo>,
}

impl VerifyKeyResponse<'_> {
    fn bare(code: VerifyOutcome) -> Self {
        Self {
            valid: false,
            code,
            key_id: None,
            organization_id: None,
            owner_id: None,
            environment: None,
            scopes: None,
            metadata: None,
            expires_at: None,
            rate_limit: None,
            quota: None,
        }
    }
}

/// Verify a key: status, organization, IP allow-list and scopes, in that order.
#[utoipa::path(post, path = "/v1/verify", tag = "verify", request_body = VerifyKeyRequest,
    responses((status = 200, body = VerifyKeyResponse), KeyErrors, JsonBodyErrors))]
pub async fn verify(caller: Caller<Verify>, body: JsonBody) -> ApiResult<Response> {
    let state = caller.state();
    let body: VerifyKeyRequest = body.parse()?;
    let required: Vec<Scope> = body
        .required_scopes
        .iter()
        .enumerate()
        .map(|(i, s)| Scope::parse(s).map_err(|e| ApiError::validation(format!("required_scopes[{i}]"), e.to_string())))
        .collect::<Result<_, _>>()?;
    let client_ip: Option<IpAddr> = body
        .ip
        .as_deref()
        .map(|ip| ip.trim().parse().map_err(|_| ApiError::validation("ip", "`ip` must be an IPv4 or IPv6 address")))
        .transpose()?;
    let endpoint = body.endpoint.as_deref().map(|e| crate::routes::usage::endpoint("endpoint", e)).transpose()?;
    let method = body.method.as_deref().map(|m| crate::routes::usage::method("method", m)).transpose()?;
    // SECURITY: the cost is added to quota counters (in the limiter and in the store): bounded like
    // every counted number.
    let cost = body.cost.unwrap_or(1);
    if cost > MAX_QUOTA_COST {
        return Err(ApiError::validation("cost", format!("must be 0 to {MAX_QUOTA_COST}")));
    }
    let now = state.clock.now();
    let check = Check {
        presented: &body.key,
        client_ip,
        required_scopes: &required,
        organization: caller.org_filter(),
        user_agent: "",
        via: crate::telemetry::Via::Verify,
        cost,
        failures: limits::FailureScope::Tenant(caller.organization_id()),
    };
    let (verdict, event) = verifier::verify_deferred(state, check).await?;
    if let Some(mut event) = event {
        event.endpoint = endpoint;
        event.method = method;
        state.usage.record(event);
    }
    let rate_limit = verdict.limits.as_ref().and_then(|l| RateLimitInfo::from_decision(&l.rate));
    // A decision of the failure policy knows no count: no figures rather than made-up ones.
    let quota = verdict.limits.as_ref().and_then(|l| l.quota.as_ref()).filter(|q| !q.degraded).map(QuotaInfo::from);
    let response = match &verdict.key {
        None => VerifyKeyResponse::bare(verdict.outcome),
        Some(k) => VerifyKeyResponse {
            valid: verdict.outcome.is_valid(),
            code: verdict.outcome,
            key_id: Some(k.id),
            organization_id: Some(k.organization_id),
            owner_id: k.owner_id.as_deref(),
            environment: Some(k.environment),
            scopes: Some(&k.scopes),
            metadata: Some(k.metadata_ref()),
            expires_at: k.state.expires_at,
            rate_limit,
            quota,
        },
    };
    // Serialized here, while the record it borrows from is at hand: straight into a buffer the size of
    // a usual answer, which becomes the body as it is.
    let mut body = Vec::with_capacity(ANSWER_CAPACITY);
    serde_json::to_writer(&mut body, &response).map_err(|e| ApiError::internal(e.to_string()))?;
    let mut answer = Response::new(Body::from(body));
    // Room for the content type, the limit headers and what the request layer adds, without growing.
    *answer.headers_mut() = HeaderMap::with_capacity(10);
    answer.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    verdict.put_headers(now, answer.headers_mut());
    Ok(answer)
}

/// Bytes reserved for an answer: a valid key's, with a few scopes and a little metadata, fits.
const ANSWER_CAPACITY: usize = 1024;
