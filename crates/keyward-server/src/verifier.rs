//! The verify path, shared by `POST /v1/verify`, the gateway and the embeddable layer: parse and
//! checksum → hash → lookup → status, organization, IP, scopes → outcome. Use is recorded after the
//! answer, in memory; failures are logged and counted here, once.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, HeaderValue};
use chrono::{DateTime, Utc};
use keyward_core::{OrgId, Scope, VerifyOutcome, VerifyRequest};
use keyward_store::usage::{UsageEvent, UsageKind};
use keyward_store::{KeyRecord, StoreResult};

use crate::auth::{AuthFailure, Lookup, auth_failed, lookup};
use crate::error::{ApiError, ErrorCode};
use crate::limits::{self, KeyDecision};
use crate::state::AppState;
use crate::telemetry::Via;

/// What to check a presented key against.
#[derive(Debug, Clone, Copy)]
pub struct Check<'a> {
    /// SECURITY: the key as presented; never logged except through `auth::redacted`.
    pub presented: &'a str,
    /// The end client's address, for the key's allow-list.
    pub client_ip: Option<IpAddr>,
    pub required_scopes: &'a [Scope],
    /// Only keys of this organization exist for the caller; `None`: any organization.
    pub organization: Option<OrgId>,
    pub user_agent: &'a str,
    /// Where the check came from: for logs and metrics, and the kind of its usage event.
    pub via: Via,
    /// Units of the monthly quota this request spends (1 by default; tokens for an LLM API).
    pub cost: u64,
    /// Whose failed-authentication counter a refusal counts against and is blocked by.
    pub failures: limits::FailureScope,
}

/// The answer, with the key when it was found (and visible to the caller).
#[derive(Debug)]
pub struct Verdict {
    pub outcome: VerifyOutcome,
    pub key: Option<Arc<KeyRecord>>,
    /// The key's tier limits and quota, when the key got that far.
    pub limits: Option<KeyDecision>,
    /// Seconds until the client's address may try again, when it was refused for too many failed
    /// authentications (no key was looked at, so `limits` has none).
    pub lockout_secs: Option<u64>,
}

impl Verdict {
    /// What every answer about this verification carries, 200 or refusal, on every surface: the
    /// key's rate-limit headers, and `Retry-After` when waiting helps (a limit or a lockout: how
    /// long; the limiter down: the table's fixed delay).
    pub fn headers(&self, now: DateTime<Utc>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        self.put_headers(now, &mut headers);
        headers
    }

    /// [`Verdict::headers`], inserted into `headers` (a response's own map).
    pub fn put_headers(&self, now: DateTime<Utc>, headers: &mut HeaderMap) {
        if let Some(l) = &self.limits {
            limits::put_headers(&l.rate, now, headers);
        }
        let fixed = ErrorCode::of_outcome(self.outcome).and_then(|code| code.retry_after().seconds());
        if let Some(after) = self.lockout_secs.or(fixed) {
            headers.insert(RETRY_AFTER, HeaderValue::from(after));
        }
    }

    /// The answer to a request this verification refused, with [`Verdict::headers`]; `None` when the
    /// key is valid. The gateway and the layer answer with it.
    pub fn refusal(&self, now: DateTime<Utc>) -> Option<ApiError> {
        (!self.outcome.is_valid()).then(|| ApiError::refused(self.outcome).with_headers(self.headers(now)))
    }
}

/// Verifies and records the usage event at once (the layer, and any caller with nothing to add).
pub async fn verify(state: &AppState, check: Check<'_>) -> StoreResult<Verdict> {
    let (verdict, event) = verify_deferred(state, check).await?;
    if let Some(event) = event {
        state.usage.record(event);
    }
    Ok(verdict)
}

/// Verifies and returns the usage event without recording it, for a caller that adds to it first
/// (endpoint and method on `/v1/verify`, the upstream's status and latency in the gateway) and then
/// records it with [`crate::usage::UsageRecorder::record`]. `None` when no key was found: usage
/// belongs to a key. Recording it is the caller's duty.
#[tracing::instrument(level = "debug", skip_all, fields(outcome))]
pub async fn verify_deferred(state: &AppState, check: Check<'_>) -> StoreResult<(Verdict, Option<UsageEvent>)> {
    let started = Instant::now();
    let now = state.clock.now();
    let verdict = decide(state, &check, now).await?;
    tracing::Span::current().record("outcome", verdict.outcome.code());
    crate::telemetry::verify_outcome(verdict.outcome, started.elapsed());
    let event = verdict.key.as_ref().map(|key| {
        let kind = if check.via.judges_requests() { UsageKind::Gateway } else { UsageKind::Verify };
        // Cheap parts only (this runs once per verification): a static code, the address and the
        // quota counter as values (the writer makes text of them), one copy of the user agent.
        let mut event = UsageEvent::new(kind, key.id, key.organization_id, now);
        event.outcome = Some(Cow::Borrowed(verdict.outcome.code()));
        event.ip = check.client_ip.map(|ip| ip.to_canonical());
        event.user_agent = (!check.user_agent.is_empty()).then(|| truncated(check.user_agent, 512).to_owned());
        if verdict.outcome.is_valid() {
            // The units the limiter just spent, so the durable counter matches it.
            event.quota_subject = Some(crate::limits::quota_counter(key));
            event.quota_units = i64::try_from(check.cost).unwrap_or(i64::MAX);
        }
        event
    });
    match &verdict.key {
        Some(_) if verdict.outcome.is_valid() => {}
        // Not an authentication failure: the limiter is down and refused by policy (logged once per
        // outage by the limiter, counted in `keyward_verify_total`).
        Some(_) if verdict.outcome == VerifyOutcome::LimiterUnavailable => {}
        key => {
            auth_failed(AuthFailure {
                reason: verdict.outcome.code(),
                presented: check.presented,
                key_id: key.as_ref().map(|k| k.id),
                ip: check.client_ip,
                user_agent: check.user_agent,
                via: check.via,
            });
            if let Some(ip) = check.client_ip
                && limits::is_failed_auth(verdict.outcome)
            {
                limits::count_failed_auth(state, check.failures, ip, now).await;
            }
            if limits::is_failed_auth(verdict.outcome) {
                limits::count_failed_prefix(state, check.presented, now).await;
            }
        }
    }
    Ok((verdict, event))
}

async fn decide(state: &AppState, check: &Check<'_>, now: DateTime<Utc>) -> StoreResult<Verdict> {
    let bare = |outcome| Verdict { outcome, key: None, limits: None, lockout_secs: None };
    // SECURITY: an address that used up its failed authentications is refused before any lookup,
    // whatever key it sends: guessing stops.
    if let Some(ip) = check.client_ip
        && let Some(secs) = limits::failed_auth_blocked(state, check.failures, ip, now).await
    {
        return Ok(Verdict { lockout_secs: Some(secs), ..bare(VerifyOutcome::RateLimited) });
    }
    let found = match lookup(state, check.presented).await? {
        Lookup::Malformed(_) => return Ok(bare(VerifyOutcome::Malformed)),
        // SECURITY: another organization's key answers exactly like an unknown one.
        Lookup::Found(f) if check.organization.is_none_or(|org| org == f.organization_id) => f,
        Lookup::Found(_) | Lookup::NotFound => return Ok(bare(VerifyOutcome::NotFound)),
    };
    let request = VerifyRequest { now, client_ip: check.client_ip, required_scopes: check.required_scopes };
    let outcome = found.check(&request);
    if !outcome.is_valid() {
        return Ok(Verdict { key: Some(found), ..bare(outcome) });
    }
    let decision = limits::check_key(state, &found, check.cost, now).await;
    Ok(Verdict { outcome: decision.outcome, key: Some(found), limits: Some(decision), lockout_secs: None })
}

/// The first `max` characters of `s` (a borrow: no copy, and no walk over a short string).
pub(crate) fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    match s.char_indices().nth(max) {
        Some((cut, _)) => &s[..cut],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::truncated;

    #[test]
    fn truncated_counts_characters_not_bytes() {
        assert_eq!(truncated("curl/8.5", 512), "curl/8.5");
        assert_eq!(truncated("abcdef", 3), "abc");
        assert_eq!(truncated("ééé", 2), "éé");
        assert_eq!(truncated("ééé", 3), "ééé");
        let long = "ü".repeat(600);
        assert_eq!(truncated(&long, 512).chars().count(), 512);
    }
}
