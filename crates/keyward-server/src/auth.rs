//! Who is calling: the key in `Authorization: Bearer` or `X-API-Key`, checked exactly like a verified
//! key, and what that key may do. The client gets the reason a key was refused; the log line carries
//! prefix and hint only.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, USER_AGENT};
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use keyward_core::{KeyFormatError, KeyId, KeywardScope, OrgId, PlainKey, ScopeSet, VerifyOutcome, VerifyRequest};
use std::sync::Arc;

use keyward_store::{Actor, ApiKey, KeyRecord, StoreResult};

use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::state::AppState;

/// The result of looking a presented key up.
#[derive(Debug)]
pub enum Lookup {
    /// Not in keyward's format: refused without touching storage.
    Malformed(KeyFormatError),
    NotFound,
    /// Shared with the verify cache: reading it copies nothing.
    Found(Arc<KeyRecord>),
}

/// Parse, hash, look up by hash, and compare the stored hash in constant time.
///
/// A string that is not a Keyward key may be a legacy key imported from another system: it is looked up
/// by its hash only while some organization has legacy keys (`state.legacy`, an in-memory flag), so
/// that otherwise garbage is refused without touching storage. Not found, it stays `Malformed`: the
/// answer does not depend on whether imports exist, only the cost does.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn lookup(state: &AppState, presented: &str) -> StoreResult<Lookup> {
    let key = match PlainKey::parse(presented) {
        Ok(key) => key,
        Err(e) if state.legacy.enabled() && could_be_legacy(presented) => {
            return Ok(match find_by_hash(state, presented).await? {
                Some(found) => Lookup::Found(found),
                None => Lookup::Malformed(e),
            });
        }
        Err(e) => return Ok(Lookup::Malformed(e)),
    };
    Ok(match find_by_hash(state, key.expose_secret()).await? {
        Some(found) => Lookup::Found(found),
        None => Lookup::NotFound,
    })
}

/// What an imported legacy key can look like (`service::import` accepts no other): visible ASCII, as
/// a header carries it, of a length worth a lookup.
fn could_be_legacy(presented: &str) -> bool {
    (crate::service::import::MIN_LEGACY_LEN..=crate::service::import::MAX_LEGACY_LEN).contains(&presented.len())
        && presented.bytes().all(|b| b.is_ascii_graphic())
}

async fn find_by_hash(state: &AppState, secret: &str) -> StoreResult<Option<Arc<KeyRecord>>> {
    for (algorithm, hash) in state.hasher.candidates(secret) {
        // SECURITY: the store compared the stored hash with this one in constant time before the
        // record was made (`KeyLookup::find_key_record`); the cache holds it under the hash's first 128
        // bits (why that is enough: `cache::Slot`).
        if let Some(found) = state.keys.find(&hash).await?
            && found.hash_algorithm == algorithm
        {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The client's address: the socket peer, or what a trusted proxy forwarded.
pub fn request_ip(parts: &Parts, state: &AppState) -> Option<IpAddr> {
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip());
    crate::client_ip::client_ip(peer, &parts.headers, &state.trusted_proxies)
}

/// The key in the request: `Authorization: Bearer <key>` first, then `X-API-Key`.
fn presented_key(headers: &HeaderMap) -> ApiResult<&str> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let value = value.to_str().unwrap_or_default().trim();
        let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
            return Ok(token.trim());
        }
        return Err(ApiError::new(ErrorCode::MissingCredentials, "the Authorization header must be `Bearer <key>`"));
    }
    match headers.get("x-api-key").map(|v| v.to_str().unwrap_or_default().trim()) {
        Some(key) if !key.is_empty() => Ok(key),
        _ => Err(ApiError::new(
            ErrorCode::MissingCredentials,
            "send a key as `Authorization: Bearer <key>` or `X-API-Key: <key>`",
        )),
    }
}

/// An authenticated caller of the management API.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key: Arc<KeyRecord>,
    pub ip: Option<IpAddr>,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let ip = request_ip(parts, state);
        let user_agent = parts.headers.get(USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let now = state.clock.now();
        // SECURITY: past its failed authentications an address gets 429 even for a right key, so
        // guessing stops.
        if let Some(ip) = ip
            && let Some(retry_after) =
                crate::limits::failed_auth_blocked(state, crate::limits::FailureScope::Management, ip, now).await
        {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert(axum::http::header::RETRY_AFTER, retry_after.into());
            return Err(ApiError {
                headers: Some(Box::new(headers)),
                ..ApiError::new(ErrorCode::RateLimited, "too many failed authentications from this address")
            });
        }
        let (reason, key_id, error) = match authenticate(state, parts, ip, now).await? {
            Ok(caller) => {
                let key = &caller.key;
                tracing::Span::current().record("key_id", tracing::field::display(key.id));
                tracing::Span::current().record("organization_id", tracing::field::display(key.organization_id));
                tracing::debug!(key_id = %key.id, key = %redacted(presented_key(&parts.headers).unwrap_or_default()), "authenticated");
                state.usage.record_key_use(key.id, now, ip);
                return Ok(caller);
            }
            Err(refused) => refused,
        };
        let presented = presented_key(&parts.headers).unwrap_or_default();
        auth_failed(AuthFailure { reason, presented, key_id, ip, user_agent, via: "management" });
        if let Some(ip) = ip {
            crate::limits::count_failed_auth(state, crate::limits::FailureScope::Management, ip, now).await;
        }
        crate::limits::count_failed_prefix(state, presented, now).await;
        Err(error)
    }
}

/// Why a caller was refused: reason code, key id when known, and the error to answer.
type Refusal = (&'static str, Option<KeyId>, ApiError);

async fn authenticate(
    state: &AppState,
    parts: &Parts,
    ip: Option<IpAddr>,
    now: DateTime<Utc>,
) -> Result<Result<Caller, Refusal>, ApiError> {
    let presented = match presented_key(&parts.headers) {
        Ok(p) => p,
        Err(e) => return Ok(Err(("MISSING_CREDENTIALS", None, e))),
    };
    let found = match lookup(state, presented).await? {
        Lookup::Malformed(e) => {
            let error = ApiError::new(ErrorCode::MalformedKey, format!("the API key is malformed: {e}"));
            return Ok(Err((VerifyOutcome::Malformed.code(), None, error)));
        }
        Lookup::NotFound => {
            let error = ApiError::new(ErrorCode::UnknownKey, "the API key is not known");
            return Ok(Err((VerifyOutcome::NotFound.code(), None, error)));
        }
        Lookup::Found(found) => found,
    };
    let request = VerifyRequest { now, client_ip: ip, required_scopes: &[] };
    let outcome = found.check(&request);
    if outcome != VerifyOutcome::Valid {
        return Ok(Err((outcome.code(), Some(found.id), refusal(outcome))));
    }
    Ok(Ok(Caller { key: found, ip }))
}

/// One failed authentication, as logged and counted.
pub struct AuthFailure<'a> {
    /// A verify outcome code, or `MISSING_CREDENTIALS`.
    pub reason: &'static str,
    /// SECURITY: only ever logged through [`redacted`].
    pub presented: &'a str,
    pub key_id: Option<KeyId>,
    pub ip: Option<IpAddr>,
    pub user_agent: &'a str,
    /// `management` (the caller's own key) or `verify` (a key checked through `/v1/verify`).
    pub via: &'static str,
}

/// One structured log line (JSON under `KEYWARD_LOG_FORMAT=json`) and one metric per failed
/// authentication. Path, method and request id come from the request span.
pub fn auth_failed(f: AuthFailure<'_>) {
    crate::telemetry::auth_failure(f.reason, f.via);
    tracing::info!(
        reason = f.reason,
        via = f.via,
        key = %redacted(f.presented),
        key_id = f.key_id.map(|k| k.to_string()).unwrap_or_default(),
        client_ip = f.ip.map(|ip| ip.to_string()).unwrap_or_default(),
        user_agent = f.user_agent,
        "authentication failed"
    );
}

/// `sk_live_…abcd` for a string that parsed, `…` otherwise. SECURITY: never more.
pub fn redacted(presented: &str) -> String {
    PlainKey::parse(presented).map(|k| k.redacted()).unwrap_or_else(|_| "…".to_owned())
}

fn refusal(outcome: VerifyOutcome) -> ApiError {
    let (code, message) = match outcome {
        VerifyOutcome::Revoked => (ErrorCode::KeyRevoked, "the API key was revoked"),
        VerifyOutcome::Disabled => (ErrorCode::KeyDisabled, "the API key is disabled"),
        VerifyOutcome::Expired => (ErrorCode::KeyExpired, "the API key has expired"),
        VerifyOutcome::OrgDisabled => (ErrorCode::OrganizationDisabled, "the key's organization is disabled"),
        VerifyOutcome::IpNotAllowed => (ErrorCode::IpNotAllowed, "the API key may not be used from this address"),
        _ => (ErrorCode::UnknownKey, "the API key is not valid"),
    };
    ApiError::new(code, message)
}

impl Caller {
    pub fn scopes(&self) -> &ScopeSet {
        &self.key.scopes
    }

    pub fn is_admin(&self) -> bool {
        self.key.scopes.holds(KeywardScope::Admin)
    }

    pub fn permits(&self, scope: KeywardScope) -> bool {
        self.key.scopes.permits(scope)
    }

    pub fn require(&self, scope: KeywardScope) -> ApiResult<()> {
        if self.permits(scope) { Ok(()) } else { Err(ApiError::insufficient_scope(scope.as_str())) }
    }

    /// Reading keys: `keyward:keys:read`, or `keyward:self` for its own owner's keys.
    pub fn require_key_read(&self) -> ApiResult<()> {
        if self.permits(KeywardScope::KeysRead) || self.permits(KeywardScope::SelfService) {
            Ok(())
        } else {
            Err(ApiError::insufficient_scope(KeywardScope::KeysRead.as_str()))
        }
    }

    /// Creating and revoking keys: `keyward:keys:write`, or `keyward:self` for its own owner's keys.
    pub fn require_key_write(&self) -> ApiResult<()> {
        if self.permits(KeywardScope::KeysWrite) || self.permits(KeywardScope::SelfService) {
            Ok(())
        } else {
            Err(ApiError::insufficient_scope(KeywardScope::KeysWrite.as_str()))
        }
    }

    /// Holds `keyward:self` and nothing broader for keys: it acts only on its own owner's keys.
    pub fn self_service_only(&self, write: bool) -> bool {
        let broad = if write { KeywardScope::KeysWrite } else { KeywardScope::KeysRead };
        !self.permits(broad) && self.permits(KeywardScope::SelfService)
    }

    /// The organization the caller is confined to; `None` for `keyward:admin`.
    pub fn org_filter(&self) -> Option<OrgId> {
        (!self.is_admin()).then_some(self.key.organization_id)
    }

    /// Whether the caller may see this key at all. A key it may not see answers 404, exactly like
    /// one that does not exist.
    pub fn can_see(&self, key: &ApiKey, write: bool) -> bool {
        if self.is_admin() {
            return true;
        }
        if key.organization_id != self.key.organization_id {
            return false;
        }
        !self.self_service_only(write)
            || (self.key.owner_id.is_some() && key.owner_id.as_deref() == self.key.owner_id.as_deref())
    }

    pub fn actor(&self, at: DateTime<Utc>) -> Actor {
        Actor::key(self.key.id, self.ip.map(|ip| ip.to_string()), at)
    }

    pub fn key_id(&self) -> KeyId {
        self.key.id
    }
}
