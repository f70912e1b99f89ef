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
use keyward_store::usage::QuotaSubject;
use keyward_store::{EventKind, KeyRecord};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

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
    /// `None` for a decision of the failure policy: its figures are not counts.
    pub fn from_decision(d: &RateDecision) -> Option<Self> {
        if d.degraded {
            return None;
        }
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
/// request spends no quota, and a request the quota refuses (exceeded, or the failure policy) gets
/// its rate-limit unit back: only its rate limit makes a key `RATE_LIMITED`, so a client polling an
/// exhausted quota keeps hearing `QUOTA_EXCEEDED`, and one refused while the quota store was down
/// is not rate-limited once it is back. The quota is the key's own when it has a monthly override,
/// else its organization's pool.
///
/// SECURITY: a refusal by the `fail_closed` policy (the limiter is down) is `LIMITER_UNAVAILABLE`,
/// never `RATE_LIMITED` or `QUOTA_EXCEEDED`: the key ran into no limit, and a client told it did
/// would back off for nothing or report a billing problem that is not there.
pub async fn check_key(state: &AppState, key: &KeyRecord, cost: u64, now: DateTime<Utc>) -> KeyDecision {
    let limits = state.plans.resolve(&key.org.plan, key.plan(), &key.org.limits, &key.limits());
    // Counted under the key's lineage: the old and new key of a rotation share one allowance.
    let (rate_subject, rate_limits) = (Subject::new("key:", key.lineage.0), limits.rate());
    let rate = state.limiter.check(rate_subject.as_str(), &rate_limits, 1, now).await;
    if !rate.allowed {
        let outcome = if rate.degraded { VerifyOutcome::LimiterUnavailable } else { VerifyOutcome::RateLimited };
        return KeyDecision { outcome, rate, quota: None };
    }
    let subject = quota_subject(key);
    let quota = state.limiter.consume_quota(subject.as_str(), limits.per_month, cost, now).await;
    quota_threshold_hook(state, key, subject.as_str(), &quota, cost, now);
    let outcome = match (quota.allowed, quota.degraded) {
        (true, _) => VerifyOutcome::Valid,
        (false, true) => VerifyOutcome::LimiterUnavailable,
        (false, false) => VerifyOutcome::QuotaExceeded,
    };
    if !quota.allowed && !rate.degraded {
        state.limiter.refund(rate_subject.as_str(), &rate_limits, 1, now).await;
    }
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
    state.plans.resolve(&org.plan, key.plan.as_deref(), &org.limits.core(), &key.limits.core())
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
    Subject::new("key:", key.lineage().0).as_str().to_owned()
}

/// The quota counter a verified key draws from: its own (shared by its rotation lineage) when it has a
/// monthly override, else its organization's.
pub fn quota_subject(key: &KeyRecord) -> Subject {
    Subject::quota(quota_counter(key))
}

/// [`quota_subject`] as a value for a usage event (`quota:key:<lineage>` / `quota:org:<organization>`
/// when the writer makes text of it): nothing to format on the request path.
pub fn quota_counter(key: &KeyRecord) -> QuotaSubject {
    quota_counter_of(key.own_quota, key.lineage, key.organization_id)
}

/// [`quota_subject`] of a stored key.
pub fn key_quota_subject(key: &keyward_store::ApiKey) -> String {
    quota_counter_of(key.limits.monthly_request_limit.is_some(), key.lineage(), key.organization_id).to_string()
}

fn quota_counter_of(own: bool, lineage: keyward_core::KeyId, organization: OrgId) -> QuotaSubject {
    if own { QuotaSubject::Key(lineage) } else { QuotaSubject::Org(organization) }
}

/// A limiter counter's name (`<prefix><uuid>`, `<prefix><ip>`), written on the stack: the verify path
/// names up to four per verification and allocates for none.
pub struct Subject {
    buf: [u8; Subject::CAPACITY],
    len: usize,
}

impl Subject {
    /// The longest prefix (12), a hyphenated UUID (36), a colon and an IPv6 address (45).
    const CAPACITY: usize = 96;

    /// `prefix` is one of this module's constants (at most 12 bytes).
    pub fn new(prefix: &'static str, id: uuid::Uuid) -> Self {
        let mut subject = Self { buf: [0; Self::CAPACITY], len: 0 };
        subject.push(prefix);
        let end = subject.len + uuid::fmt::Hyphenated::LENGTH;
        if end <= Self::CAPACITY {
            id.as_hyphenated().encode_lower(&mut subject.buf[subject.len..end]);
            subject.len = end;
        }
        subject
    }

    /// A quota counter's name, as [`QuotaSubject`]'s `Display` writes it.
    pub fn quota(counter: QuotaSubject) -> Self {
        match counter {
            QuotaSubject::Key(id) => Self::new("quota:key:", id.0),
            QuotaSubject::Org(id) => Self::new("quota:org:", id.0),
        }
    }

    /// `<prefix><ip>`.
    pub fn ip(prefix: &'static str, ip: IpAddr) -> Self {
        let mut subject = Self { buf: [0; Self::CAPACITY], len: 0 };
        subject.push(prefix);
        // Cannot fail: the capacity holds the longest prefix and the longest address.
        let _ = std::fmt::Write::write_fmt(&mut subject, format_args!("{ip}"));
        subject
    }

    fn push(&mut self, s: &str) {
        let end = (self.len + s.len()).min(Self::CAPACITY);
        let n = end - self.len;
        self.buf[self.len..end].copy_from_slice(&s.as_bytes()[..n]);
        self.len = end;
    }

    pub fn as_str(&self) -> &str {
        // ASCII only: the prefixes, hyphenated UUIDs and IP addresses.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl std::fmt::Write for Subject {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.len + s.len() > Self::CAPACITY {
            return Err(std::fmt::Error);
        }
        self.push(s);
        Ok(())
    }
}

/// Whose failed authentications a failure counts against, and which counter a refusal reads.
///
/// SECURITY: failure counters are per tenant (SECURITY.md). `/v1/verify` counts against the calling
/// organization and the end client's address it names, so one organization's callers (naming any
/// address they like) can never lock out another's, nor the management API; the management API
/// counts against the address of the connection (or what a trusted proxy forwarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureScope {
    /// The management API's own callers.
    Management,
    /// Keys checked through `/v1/verify` by a key of this organization.
    Tenant(OrgId),
    /// The gateway and the embedded layer: the client in front of them.
    Edge,
}

impl FailureScope {
    fn subject(self, ip: IpAddr) -> Subject {
        match self {
            Self::Management => Subject::ip("auth-fail:", ip),
            Self::Tenant(org) => {
                let mut subject = Subject::new("auth-fail:t:", org.0);
                subject.push(":");
                let _ = std::fmt::Write::write_fmt(&mut subject, format_args!("{ip}"));
                subject
            }
            Self::Edge => Subject::ip("auth-fail:e:", ip),
        }
    }
}

/// Whether `ip` has used up its failed authentications in `scope`; `Some(seconds)` to wait when it
/// has.
///
/// SECURITY: Keyward's protection of itself (this, the management API limit, key creation) never
/// follows the failure policy. While Redis is down each node counts alone, in memory
/// (`Limiter::check_or_local`): guessing stays bounded (at most N nodes × the limit per address),
/// yet an outage locks nobody out, and a 429 "too many failed authentications" is always true.
pub async fn failed_auth_blocked(state: &AppState, scope: FailureScope, ip: IpAddr, now: DateTime<Utc>) -> Option<u64> {
    let limits = RateLimits::per_minute(state.protection.failed_auth_per_minute);
    // Cost 0 looks without spending: blocked when not one more failure fits.
    let peek = state.limiter.check_or_local(scope.subject(ip).as_str(), &limits, 0, now).await;
    let w = peek.tightest()?;
    (w.remaining == 0).then(|| {
        let interval = w.window.period_micros() / (w.limit.max(1) as i64);
        keyward_core::limits::ceil_secs(w.reset_micros - (w.limit.saturating_sub(1) as i64) * interval).max(1)
    })
}

/// Counts one failed authentication against `ip` in `scope`, and reports a spike of them
/// (`auth.failures_spike`).
pub async fn count_failed_auth(state: &AppState, scope: FailureScope, ip: IpAddr, now: DateTime<Utc>) {
    let limits = RateLimits::per_minute(state.protection.failed_auth_per_minute);
    state.limiter.check_or_local(scope.subject(ip).as_str(), &limits, 1, now).await;
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
    found: &KeyRecord,
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
    let (state, key_id, subject, used) = (state.clone(), found.id, subject.to_owned(), quota.used);
    tokio::spawn(async move {
        // The event carries the whole key as the store has it; the verify path holds only a record.
        // Read with a few retries: a threshold is crossed once a month, so a lost event stays lost.
        let mut delay = std::time::Duration::from_millis(250);
        let key = loop {
            match state.store.get_key(key_id).await {
                Ok(key) => break key,
                Err(e) if delay < std::time::Duration::from_secs(8) => {
                    tracing::warn!(error = %e, "reading the key for quota.threshold failed; will retry");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return tracing::error!(error = %e, "recording quota.threshold failed"),
            }
        };
        for percent in crossed {
            let data = serde_json::json!({ "percent": percent, "used": used, "limit": limit,
                                            "month": month, "quota": scope });
            let event = keyward_store::Event::about_key(EventKind::QuotaThreshold, &key, data, now);
            let dedup = format!("{}:{subject}:{month}:{percent}", EventKind::QuotaThreshold);
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
        event: EventKind::AuthFailuresSpike,
        organization_id: None,
        key_id: None,
        payload: serde_json::json!({ kind: value, "failures_per_minute": per_minute }),
        created_at: keyward_store::stored_time(now),
    };
    let dedup = format!("{}:{kind}:{value}:{minute}", EventKind::AuthFailuresSpike);
    match state.store.record_event(&event, Some(&dedup)).await {
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

/// Key creation per organization (counted by this node alone while Redis is down, see
/// [`failed_auth_blocked`]).
pub async fn key_creation(state: &AppState, org: OrgId, now: DateTime<Utc>) -> Result<RateDecision, ApiError> {
    let limits = RateLimits::per_minute(state.protection.key_creation_per_minute);
    let d = state.limiter.check_or_local(&format!("key-create:{org}"), &limits, 1, now).await;
    if d.allowed { Ok(d) } else { Err(too_many(&d, now, "too many keys created for this organization; slow down")) }
}

/// A 429 in the error format, with the rate-limit headers and `Retry-After`.
pub fn too_many(d: &RateDecision, now: DateTime<Utc>, message: &str) -> ApiError {
    ApiError { headers: Some(Box::new(headers(d, now))), ..ApiError::new(ErrorCode::RateLimited, message) }
}

/// `RateLimit-Policy` and `RateLimit` (IETF httpapi draft, structured-field form), the common
/// `X-RateLimit-*` (limit, remaining, and reset as Unix time) of the tightest window, and
/// `Retry-After` when denied. A decision of the failure policy has no counts to show: none (its
/// refusal, `limiter_unavailable`, has a fixed `Retry-After` in the error table).
pub fn headers(d: &RateDecision, now: DateTime<Utc>) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(8);
    put_headers(d, now, &mut h);
    h
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// [`headers`], inserted into `h` (a response's own map: no map of their own to merge).
pub fn put_headers(d: &RateDecision, now: DateTime<Utc>, h: &mut HeaderMap) {
    if d.degraded {
        return;
    }
    let Some(tight) = d.tightest() else { return };
    // The five values written one after the other into one buffer, numbers through `itoa`, and each
    // header a slice of it: one allocation instead of one per value (this runs on every verification).
    let mut text = String::with_capacity(192);
    let mut n = itoa::Buffer::new();
    let mut ends = [0usize; 5];
    for w in d.statuses() {
        if !text.is_empty() {
            text.push_str(", ");
        }
        text.push('"');
        text.push_str(w.window.name());
        text.push_str("\";q=");
        text.push_str(n.format(w.limit));
        text.push_str(";w=");
        text.push_str(n.format(w.window.period_secs()));
    }
    ends[0] = text.len();
    text.push('"');
    text.push_str(tight.window.name());
    text.push_str("\";r=");
    text.push_str(n.format(tight.remaining));
    text.push_str(";t=");
    text.push_str(n.format(tight.reset_secs()));
    ends[1] = text.len();
    text.push_str(n.format(tight.limit));
    ends[2] = text.len();
    text.push_str(n.format(tight.remaining));
    ends[3] = text.len();
    text.push_str(n.format(now.timestamp().saturating_add(tight.reset_secs() as i64)));
    ends[4] = text.len();
    let text = axum::body::Bytes::from(text);
    let names = [&RATELIMIT_POLICY, &RATELIMIT, &X_RATELIMIT_LIMIT, &X_RATELIMIT_REMAINING, &X_RATELIMIT_RESET];
    let mut start = 0;
    for (name, end) in names.into_iter().zip(ends) {
        if let Ok(v) = HeaderValue::from_maybe_shared(text.slice(start..end)) {
            h.insert(name.clone(), v);
        }
        start = end;
    }
    if let Some(after) = d.retry_after_secs().filter(|_| !d.allowed) {
        h.insert(axum::http::header::RETRY_AFTER, HeaderValue::from(after.max(1)));
    }
}

/// Management API requests per client IP (counted by this node alone while Redis is down, see
/// [`failed_auth_blocked`]); the decision's headers go on every response.
pub async fn management(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let peer = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    let ip = crate::client_ip::client_ip(peer, &parts.headers, &state.trusted_proxies);
    let Some(ip) = ip else { return next.run(Request::from_parts(parts, body)).await };
    let limits = RateLimits::per_minute(state.protection.management_per_minute);
    let now = state.clock.now();
    let d = state.limiter.check_or_local(&format!("ip-mgmt:{ip}"), &limits, 1, now).await;
    if !d.allowed {
        return too_many(&d, now, "too many requests from this address; slow down").into_response();
    }
    let mut response = next.run(Request::from_parts(parts, body)).await;
    // A route's own, tighter decision (key creation) is not overwritten.
    if !response.headers().contains_key("ratelimit") {
        put_headers(&d, now, response.headers_mut());
    }
    response
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::{Subject, crossed_thresholds};

    #[test]
    fn subjects_are_prefix_and_hyphenated_id() {
        let id = keyward_core::KeyId::new();
        assert_eq!(Subject::new("quota:key:", id.0).as_str(), format!("quota:key:{id}"));
        assert_eq!(Subject::new("key:", id.0).as_str(), format!("key:{id}"));
        let org = keyward_core::OrgId::new();
        for (own, subject) in [(true, format!("quota:key:{id}")), (false, format!("quota:org:{org}"))] {
            let counter = super::quota_counter_of(own, id, org);
            // What the usage writer stores is what the limiter counted.
            assert_eq!(Subject::quota(counter).as_str(), subject);
            assert_eq!(counter.to_string(), subject);
        }
        let ip: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".parse().unwrap_or(IpAddr::from([0; 16]));
        assert_eq!(Subject::ip("auth-fail:", ip).as_str(), format!("auth-fail:{ip}"));
        // Each scope its own counter, whole even for the longest address.
        assert_eq!(super::FailureScope::Management.subject(ip).as_str(), format!("auth-fail:{ip}"));
        assert_eq!(super::FailureScope::Tenant(org).subject(ip).as_str(), format!("auth-fail:t:{org}:{ip}"));
        assert_eq!(super::FailureScope::Edge.subject(ip).as_str(), format!("auth-fail:e:{ip}"));
    }

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
