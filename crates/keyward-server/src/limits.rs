//! Limits as the API applies them: the tier limits and monthly quota of the key being verified, and
//! Keyward's protection of itself per client IP (management API, failed authentications) and per
//! organization (key creation). The decisions come from the [`keyward_limit::Limiter`]; this module
//! chooses subjects, resolves limits and turns decisions into headers.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use keyward_core::limits::{QuotaDecision, RateDecision, RateLimits};
use keyward_core::{OrgId, VerifyOutcome};
use keyward_store::KeyWithOrg;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

/// Keyward's limits on its own callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Protection {
    /// Management API requests per client IP per minute (`/v1/verify` is not counted).
    pub management_per_minute: u64,
    /// Failed authentications per client IP per minute; past it even a right key gets 429.
    pub failed_auth_per_minute: u64,
    /// Keys created per organization per minute.
    pub key_creation_per_minute: u64,
}

impl Default for Protection {
    fn default() -> Self {
        Self { management_per_minute: 100, failed_auth_per_minute: 10, key_creation_per_minute: 5 }
    }
}

/// `rate_limit` in a verify answer: the tightest window.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RateLimitInfo {
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the window is whole again.
    pub reset: u64,
}

/// `quota` in a verify answer: the calendar month (UTC).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct QuotaInfo {
    /// `null`: no monthly quota.
    pub limit: Option<u64>,
    pub used: u64,
    pub remaining: Option<u64>,
    /// Seconds until the next month starts.
    pub reset: u64,
}

impl RateLimitInfo {
    pub fn from_decision(d: &RateDecision) -> Option<Self> {
        d.tightest().map(|w| Self { limit: w.limit, remaining: w.remaining, reset: w.reset_secs() })
    }
}

impl From<&QuotaDecision> for QuotaInfo {
    fn from(q: &QuotaDecision) -> Self {
        Self { limit: q.limit, used: q.used, remaining: q.remaining, reset: q.reset_secs() }
    }
}

/// The limits a verified key ran into.
#[derive(Debug, Clone)]
pub struct KeyDecision {
    pub outcome: VerifyOutcome,
    pub rate: RateDecision,
    pub quota: Option<QuotaDecision>,
}

/// Tier limits, then the monthly quota, for a key that passed every other check. A rate-limited
/// request spends no quota. The quota is the key's own when it has a monthly override, else its
/// organization's pool.
pub async fn check_key(state: &AppState, found: &KeyWithOrg, cost: u64, now: DateTime<Utc>) -> KeyDecision {
    let key = &found.key;
    let limits = state.plans.resolve(
        &found.org_plan,
        key.plan.as_deref(),
        &overrides(&found.org_limits),
        &overrides(&key.limits),
    );
    // Counted under the key's lineage: the old and new key of a rotation share one allowance.
    let rate = state.limiter.check(&rate_subject(key), &limits.rate(), 1, now).await;
    if !rate.allowed {
        return KeyDecision { outcome: VerifyOutcome::RateLimited, rate, quota: None };
    }
    let subject = quota_subject(found);
    let quota = state.limiter.consume_quota(&subject, limits.per_month, cost, now).await;
    quota_threshold_hook(state, found, &subject, &quota, cost, now);
    let outcome = if quota.allowed { VerifyOutcome::Valid } else { VerifyOutcome::QuotaExceeded };
    KeyDecision { outcome, rate, quota: Some(quota) }
}

/// The limits a key has and where it stands in them, spending nothing (`GET /v1/me`).
pub async fn standing(
    state: &AppState,
    key: &keyward_store::ApiKey,
    org: &keyward_store::Organization,
    now: DateTime<Utc>,
) -> Standing {
    let limits = effective(state, key, org);
    // Cost 0 looks without spending.
    let rate = state.limiter.check(&rate_subject(key), &limits.rate(), 0, now).await;
    let quota = state.limiter.consume_quota(&key_quota_subject(key), limits.per_month, 0, now).await;
    Standing { limits, rate_limit: RateLimitInfo::from_decision(&rate), quota: QuotaInfo::from(&quota) }
}

/// The limits in force for a key: field by field its override, else its organization's, else the plan.
pub fn effective(
    state: &AppState,
    key: &keyward_store::ApiKey,
    org: &keyward_store::Organization,
) -> keyward_core::Limits {
    state.plans.resolve(&org.plan, key.plan.as_deref(), &overrides(&org.limits), &overrides(&key.limits))
}

/// A key's effective limits (`null`: unlimited) and its current standing.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Standing {
    #[schema(value_type = Object)]
    pub limits: keyward_core::Limits,
    pub rate_limit: Option<RateLimitInfo>,
    pub quota: QuotaInfo,
}

/// The rate-limit counter of a key, shared by its rotation lineage (rotation never doubles an allowance).
pub fn rate_subject(key: &keyward_store::ApiKey) -> String {
    format!("key:{}", key.lineage())
}

/// The quota counter a key draws from; a key's own quota is shared by its rotation lineage.
pub fn quota_subject(found: &KeyWithOrg) -> String {
    key_quota_subject(&found.key)
}

/// [`quota_subject`] of a key: its own counter when it has a monthly override, else its organization's.
pub fn key_quota_subject(key: &keyward_store::ApiKey) -> String {
    key_quota_counter(key).to_string()
}

/// [`key_quota_subject`] as a value (`quota:key:<lineage>` / `quota:org:<organization>` when written),
/// for a usage event: nothing to format on the request path.
pub fn key_quota_counter(key: &keyward_store::ApiKey) -> keyward_store::usage::QuotaSubject {
    use keyward_store::usage::QuotaSubject;
    match key.limits.monthly_request_limit {
        Some(_) => QuotaSubject::Key(key.lineage()),
        None => QuotaSubject::Org(key.organization_id),
    }
}

fn overrides(l: &keyward_store::LimitOverrides) -> keyward_core::LimitOverrides {
    keyward_core::LimitOverrides::from_signed(
        l.rate_limit_per_minute,
        l.rate_limit_per_hour,
        l.rate_limit_per_day,
        l.monthly_request_limit,
    )
}

/// Whether `ip` has used up its failed authentications; `Some(seconds)` to wait when it has.
pub async fn failed_auth_blocked(state: &AppState, ip: IpAddr, now: DateTime<Utc>) -> Option<u64> {
    let limits = RateLimits::per_minute(state.protection.failed_auth_per_minute);
    // Cost 0 looks without spending: blocked when not one more failure fits.
    let peek = state.limiter.check(&format!("auth-fail:{ip}"), &limits, 0, now).await;
    let w = peek.tightest()?;
    (w.remaining == 0).then(|| {
        let interval = w.window.period_micros() / (w.limit.max(1) as i64);
        keyward_core::limits::ceil_secs(w.reset_micros - (w.limit.saturating_sub(1) as i64) * interval).max(1)
    })
}

/// Counts one failed authentication against `ip`, and reports a spike of them (`auth.failures_spike`).
pub async fn count_failed_auth(state: &AppState, ip: IpAddr, now: DateTime<Utc>) {
    let limits = RateLimits::per_minute(state.protection.failed_auth_per_minute);
    state.limiter.check(&format!("auth-fail:{ip}"), &limits, 1, now).await;
    failures_spike_hook(state, ip, now).await;
}

/// The thresholds of `quota.threshold`, in percent of the monthly quota.
pub const QUOTA_THRESHOLDS: [u64; 2] = [80, 100];

/// The thresholds a request crossed when it moved `used` from `before` to `after` of `limit`.
pub fn crossed_thresholds(before: u64, after: u64, limit: u64) -> Vec<u64> {
    if limit == 0 {
        return Vec::new();
    }
    let (b, a, l) = (u128::from(before) * 100, u128::from(after) * 100, u128::from(limit));
    QUOTA_THRESHOLDS.into_iter().filter(|t| b < u128::from(*t) * l && u128::from(*t) * l <= a).collect()
}

/// The hook the quota decision calls: a `quota.threshold` event for each threshold the request
/// crossed, once per quota counter, month and threshold (the store de-duplicates). Written off the hot
/// path, in a task of its own.
pub fn quota_threshold_hook(
    state: &AppState,
    found: &KeyWithOrg,
    subject: &str,
    quota: &QuotaDecision,
    cost: u64,
    now: DateTime<Utc>,
) {
    let Some(limit) = quota.limit else { return };
    if !quota.allowed || quota.degraded {
        return;
    }
    let crossed = crossed_thresholds(quota.used.saturating_sub(cost), quota.used, limit);
    if crossed.is_empty() {
        return;
    }
    let month = keyward_core::limits::month_id(now);
    let scope = if subject.starts_with("quota:key:") { "key" } else { "organization" };
    let events: Vec<(keyward_store::Event, String)> = crossed
        .into_iter()
        .map(|percent| {
            let data = serde_json::json!({ "percent": percent, "used": quota.used, "limit": limit,
                                            "month": month, "quota": scope });
            let event = keyward_store::Event::about_key("quota.threshold", &found.key, data, now);
            (event, format!("quota.threshold:{subject}:{month}:{percent}"))
        })
        .collect();
    let state = state.clone();
    tokio::spawn(async move {
        for (event, dedup) in events {
            match state.store.record_event(&event, Some(&dedup)).await {
                Ok(true) => state.events_written(),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "recording quota.threshold failed"),
            }
        }
    });
}

/// `auth.failures_spike`: `webhooks.failures_spike_per_minute` failed authentications from one IP, or
/// against one key prefix, within a minute; reported once per IP (or prefix) and minute. It belongs to
/// no organization, so only endpoints that subscribed to it by name receive it, and only
/// `keyward:admin` may subscribe to it.
async fn failures_spike_hook(state: &AppState, ip: IpAddr, now: DateTime<Utc>) {
    spike(state, "ip", &ip.to_string(), now).await;
}

/// Counts a failed authentication against the presented key's prefix (`sk_live_`, ...): many
/// well-formed keys of one prefix failing, from any number of addresses, is someone guessing. A string
/// that is not a well-formed key has no prefix and is counted by IP only. SECURITY: only the prefix is
/// kept, never the key.
pub async fn count_failed_prefix(state: &AppState, presented: &str, now: DateTime<Utc>) {
    if let Ok(key) = keyward_core::PlainKey::parse(presented) {
        spike(state, "key_prefix", key.prefix(), now).await;
    }
}

async fn spike(state: &AppState, kind: &str, value: &str, now: DateTime<Utc>) {
    let per_minute = state.webhooks.failures_spike_per_minute;
    if per_minute == 0 {
        return;
    }
    let limits = RateLimits::per_minute(per_minute);
    let d = state.limiter.check(&format!("auth-spike:{kind}:{value}"), &limits, 1, now).await;
    if d.allowed {
        return;
    }
    let minute = now.timestamp().div_euclid(60);
    let event = keyward_store::Event {
        id: uuid::Uuid::now_v7(),
        event: "auth.failures_spike".to_owned(),
        organization_id: None,
        key_id: None,
        payload: serde_json::json!({ kind: value, "failures_per_minute": per_minute }),
        created_at: keyward_store::stored_time(now),
    };
    match state.store.record_event(&event, Some(&format!("auth.failures_spike:{kind}:{value}:{minute}"))).await {
        Ok(true) => {
            tracing::warn!(kind, value, "failed authentications spike");
            state.events_written();
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "recording auth.failures_spike failed"),
    }
}

/// Whether a verify outcome is a failed authentication (the key itself is no good), which counts
/// toward the per-IP guessing limit. A key refused for its IP or scopes authenticated fine.
pub fn is_failed_auth(outcome: VerifyOutcome) -> bool {
    matches!(
        outcome,
        VerifyOutcome::Malformed
            | VerifyOutcome::NotFound
            | VerifyOutcome::Revoked
            | VerifyOutcome::Disabled
            | VerifyOutcome::Expired
            | VerifyOutcome::OrgDisabled
    )
}

/// Key creation per organization.
pub async fn key_creation(state: &AppState, org: OrgId, now: DateTime<Utc>) -> Result<RateDecision, ApiError> {
    let limits = RateLimits::per_minute(state.protection.key_creation_per_minute);
    let d = state.limiter.check(&format!("key-create:{org}"), &limits, 1, now).await;
    if d.allowed { Ok(d) } else { Err(too_many(&d, now, "too many keys created for this organization; slow down")) }
}

/// A 429 in the error format, with the rate-limit headers and `Retry-After`.
pub fn too_many(d: &RateDecision, now: DateTime<Utc>, message: &str) -> ApiError {
    ApiError { headers: Some(Box::new(headers(d, now))), ..ApiError::new(ErrorCode::RateLimited, message) }
}

/// `RateLimit-Policy` and `RateLimit` (IETF httpapi draft, structured-field form), the common
/// `X-RateLimit-*` (limit, remaining, and reset as Unix time) of the tightest window, and
/// `Retry-After` when denied.
pub fn headers(d: &RateDecision, now: DateTime<Utc>) -> HeaderMap {
    let mut h = HeaderMap::new();
    let policies: Vec<String> =
        d.statuses().map(|w| format!("\"{}\";q={};w={}", w.window.name(), w.limit, w.window.period_secs())).collect();
    let Some(tight) = d.tightest() else { return h };
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    put("ratelimit-policy", policies.join(", "));
    put("ratelimit", format!("\"{}\";r={};t={}", tight.window.name(), tight.remaining, tight.reset_secs()));
    put("x-ratelimit-limit", tight.limit.to_string());
    put("x-ratelimit-remaining", tight.remaining.to_string());
    let reset_at = now.timestamp().saturating_add(tight.reset_secs() as i64);
    put("x-ratelimit-reset", reset_at.to_string());
    if let Some(after) = d.retry_after_secs().filter(|_| !d.allowed) {
        put("retry-after", after.max(1).to_string());
    }
    h
}

/// Management API requests per client IP; the decision's headers go on every response.
pub async fn management(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let peer = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    let ip = crate::client_ip::client_ip(peer, &parts.headers, &state.trusted_proxies);
    let Some(ip) = ip else { return next.run(Request::from_parts(parts, body)).await };
    let limits = RateLimits::per_minute(state.protection.management_per_minute);
    let now = state.clock.now();
    let d = state.limiter.check(&format!("ip-mgmt:{ip}"), &limits, 1, now).await;
    if !d.allowed {
        return too_many(&d, now, "too many requests from this address; slow down").into_response();
    }
    let mut response = next.run(Request::from_parts(parts, body)).await;
    // A route's own, tighter decision (key creation) is not overwritten.
    if !response.headers().contains_key("ratelimit") {
        response.headers_mut().extend(headers(&d, now));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::crossed_thresholds;

    #[test]
    fn thresholds_are_crossed_once() {
        assert_eq!(crossed_thresholds(7, 8, 10), [80]);
        assert_eq!(crossed_thresholds(8, 9, 10), Vec::<u64>::new());
        assert_eq!(crossed_thresholds(9, 10, 10), [100]);
        assert_eq!(crossed_thresholds(0, 10, 10), [80, 100], "one big request crosses both");
        assert_eq!(crossed_thresholds(3, 4, 5), [80]);
        assert_eq!(crossed_thresholds(0, 1, 0), Vec::<u64>::new());
        assert_eq!(crossed_thresholds(u64::MAX - 1, u64::MAX, u64::MAX), [100]);
    }
}
