//! Who is calling: the key in `Authorization: Bearer` or `X-API-Key`, checked exactly like a verified
//! key, and what that key may do. The client gets the reason a key was refused; the log line carries
//! prefix and hint only.
//!
//! What a route needs is a type, the `P` of the [`Caller<P>`] its handler takes ([`KeysWrite`],
//! [`Admin`], ...), named again beside the path in the route table (`lib.rs`), which does not compile
//! when the two differ. The object-level rules (which organization, which owner's keys, which scopes a
//! caller may change or grant) are methods of [`Caller`], each written once.

use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::{AUTHORIZATION, USER_AGENT};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName};
use chrono::{DateTime, Utc};
use keyward_core::{
    KeyFormatError, KeyId, KeywardScope, OrgId, PlainKey, Scope, ScopeSet, VerifyOutcome, VerifyRequest,
};
use std::sync::Arc;
use subtle::ConstantTimeEq;

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

/// The header names a key is read from unless `[authz] key_headers` names others.
pub const DEFAULT_KEY_HEADERS: [HeaderName; 2] = [AUTHORIZATION, HeaderName::from_static("x-api-key")];

/// The key in the request, read the same way on every surface (management API, gateway, layer):
/// `Authorization: Bearer <key>` first, then `X-API-Key`. An `Authorization` header of another scheme
/// holds no key; without an `X-API-Key` the answer says which scheme to use.
pub fn presented_key(headers: &HeaderMap) -> ApiResult<&str> {
    presented_key_in(&DEFAULT_KEY_HEADERS, headers)
}

/// The key in the first of `names` that holds one: `authorization` as `Bearer <key>`, any other
/// header as the bare key (the proxy hooks, whose header names are configurable).
pub fn presented_key_in<'h>(names: &[HeaderName], headers: &'h HeaderMap) -> ApiResult<&'h str> {
    for name in names {
        let Some(value) = headers.get(name).map(|v| v.to_str().unwrap_or_default().trim()) else { continue };
        let key = if *name == AUTHORIZATION {
            value
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map_or("", |(_, t)| t.trim())
        } else {
            value
        };
        if !key.is_empty() {
            return Ok(key);
        }
    }
    if names.contains(&AUTHORIZATION) && headers.contains_key(AUTHORIZATION) {
        return Err(ApiError::new(ErrorCode::MissingCredentials, "the Authorization header must be `Bearer <key>`"));
    }
    Err(ApiError::missing_credentials())
}

/// A caller of the API, authenticated and admitted by the permission `P` its route declares in the
/// handler's signature (`Caller<KeysWrite>`): a handler holding one was never reached by a key that
/// lacks it. How far the caller reaches ([`Reach`]) is decided here, once, and the
/// object-level rules below read it. It carries the server's state too: every handler that has a caller
/// acts on the state for it, so neither travels without the other.
#[derive(Debug)]
pub struct Caller<P> {
    state: AppState,
    key: Arc<KeyRecord>,
    ip: Option<IpAddr>,
    reach: Reach,
    permission: PhantomData<fn() -> P>,
}

impl<P: Permission> FromRequestParts<AppState> for Caller<P> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Authenticated { key, ip } = Authenticated::from_request_parts(parts, state).await?;
        Caller::admitted(state, key, ip)
    }
}

impl<P: Permission> Caller<P> {
    /// The caller a usable key makes, admitted by `P` (else 403 `insufficient_scope`): what the
    /// extractor builds once the request's key is authenticated, and what a console session builds from
    /// its key, looked up again on each request.
    pub(crate) fn admitted(state: &AppState, key: Arc<KeyRecord>, ip: Option<IpAddr>) -> ApiResult<Self> {
        let reach = admit(P::GRANTS, &key.scopes).map_err(|lacks| ApiError::insufficient_scope(lacks.as_str()))?;
        Ok(Caller { state: state.clone(), key, ip, reach, permission: PhantomData })
    }

    /// The caller `presented` makes (a key typed into the console's sign-in form), authenticated
    /// exactly as a key in the request's headers: the same lookup and checks, the same log line, and a
    /// refusal counts against the same failed-authentication limit.
    pub(crate) async fn signed_in(parts: &Parts, state: &AppState, presented: &str) -> ApiResult<Self> {
        let presented = if presented.is_empty() { Err(ApiError::missing_credentials()) } else { Ok(presented) };
        let Authenticated { key, ip } = authenticated(parts, state, presented).await?;
        Caller::admitted(state, key, ip)
    }

    /// The key this caller authenticated with.
    pub(crate) fn record(&self) -> &Arc<KeyRecord> {
        &self.key
    }

    /// The same key admitted by another route's permission `Q` (else 403 `insufficient_scope`): a
    /// console page that shows what several API routes answer builds each route's own caller.
    pub(crate) fn admitted_as<Q: Permission>(&self) -> ApiResult<Caller<Q>> {
        Caller::admitted(&self.state, self.key.clone(), self.ip)
    }
}

/// A usable key, before its route's permission admitted it. A refusal is logged and counted as a
/// failed authentication.
struct Authenticated {
    key: Arc<KeyRecord>,
    ip: Option<IpAddr>,
}

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        authenticated(parts, state, presented_key(&parts.headers)).await
    }
}

/// The key `presented` (or why none was), authenticated for the request `parts`: a refusal is logged
/// and counted as a failed authentication from the request's address.
async fn authenticated(parts: &Parts, state: &AppState, presented: ApiResult<&str>) -> ApiResult<Authenticated> {
    let ip = request_ip(parts, state);
    let user_agent = parts.headers.get(USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let now = state.clock.now();
    let text = presented.as_ref().map_or("", |p| *p);
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
    let (reason, key_id, error) = match authenticate(state, presented, ip, now).await? {
        Ok(caller) => {
            let key = &caller.key;
            tracing::Span::current().record("key_id", tracing::field::display(key.id));
            tracing::Span::current().record("organization_id", tracing::field::display(key.organization_id));
            tracing::debug!(key_id = %key.id, key = %redacted(text), "authenticated");
            state.usage.record_key_use(key.id, now, ip);
            return Ok(caller);
        }
        Err(refused) => refused,
    };
    auth_failed(AuthFailure {
        reason,
        presented: text,
        key_id,
        ip,
        user_agent,
        via: crate::telemetry::Via::Management,
    });
    if let Some(ip) = ip {
        crate::limits::count_failed_auth(state, crate::limits::FailureScope::Management, ip, now).await;
    }
    crate::limits::count_failed_prefix(state, text, now).await;
    Err(error)
}

/// Why a caller was refused: reason code, key id when known, and the error to answer.
type Refusal = (&'static str, Option<KeyId>, ApiError);

async fn authenticate(
    state: &AppState,
    presented: ApiResult<&str>,
    ip: Option<IpAddr>,
    now: DateTime<Utc>,
) -> Result<Result<Authenticated, Refusal>, ApiError> {
    let presented = match presented {
        Ok(p) => p,
        Err(e) => return Ok(Err(("MISSING_CREDENTIALS", None, e))),
    };
    let found = match caller_lookup(state, presented).await? {
        Lookup::Malformed(e) => {
            let error = ApiError {
                message: format!("the API key is malformed: {e}"),
                ..ApiError::refused(VerifyOutcome::Malformed)
            };
            return Ok(Err((VerifyOutcome::Malformed.code(), None, error)));
        }
        Lookup::NotFound => {
            return Ok(Err((VerifyOutcome::NotFound.code(), None, ApiError::refused(VerifyOutcome::NotFound))));
        }
        Lookup::Found(found) => found,
    };
    let request = VerifyRequest { now, client_ip: ip, required_scopes: &[] };
    let outcome = found.check(&request);
    if outcome != VerifyOutcome::Valid {
        return Ok(Err((outcome.code(), Some(found.id), ApiError::refused(outcome))));
    }
    Ok(Ok(Authenticated { key: found, ip }))
}

/// The caller key a worker thread last authenticated, and its record: a backend calls `/v1/verify`
/// with the same key on every request, and this spares each one the parse, the hash and the cache
/// lookup of it.
struct LastCaller {
    /// [`crate::cache::KeyCache::id`] of the node that found it.
    cache: u64,
    /// [`crate::cache::KeyCache::epoch`] before it was looked up.
    epoch: u64,
    /// SECURITY: held as a [`PlainKey`] (no `Display`, a redacted `Debug`) and compared in constant time.
    key: PlainKey,
    record: Arc<KeyRecord>,
}

thread_local! {
    static LAST_CALLER: std::cell::RefCell<Option<LastCaller>> = const { std::cell::RefCell::new(None) };
}

/// [`lookup`] for the caller's own key: the record this thread last found for the same key while the
/// verify cache would still answer it (no invalidation since, within the TTL: a revoked key is refused
/// exactly when it is through the cache), else a lookup, remembered when it finds a key.
async fn caller_lookup(state: &AppState, presented: &str) -> StoreResult<Lookup> {
    let cache = state.keys.cache();
    let remembered = LAST_CALLER.with_borrow(|last| {
        last.as_ref()
            .filter(|l| {
                l.cache == cache.id()
                    && bool::from(l.key.expose_secret().as_bytes().ct_eq(presented.as_bytes()))
                    && state.keys.unchanged_since(&l.record, l.epoch)
            })
            .map(|l| l.record.clone())
    });
    if let Some(record) = remembered {
        // Counted as the cache hit it stands for.
        crate::telemetry::cache_hit();
        return Ok(Lookup::Found(record));
    }
    let epoch = cache.epoch();
    let found = lookup(state, presented).await?;
    if let Lookup::Found(record) = &found
        && let Ok(key) = PlainKey::parse(presented)
    {
        let last = LastCaller { cache: cache.id(), epoch, key, record: record.clone() };
        LAST_CALLER.with_borrow_mut(|slot| *slot = Some(last));
    }
    Ok(found)
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
    pub via: crate::telemetry::Via,
}

/// One structured log line (JSON under `KEYWARD_LOG_FORMAT=json`) and one metric per failed
/// authentication. Path, method and request id come from the request span.
pub fn auth_failed(f: AuthFailure<'_>) {
    crate::telemetry::auth_failure(f.reason, f.via);
    tracing::info!(
        reason = f.reason,
        via = f.via.as_str(),
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

/// How far an admitted caller reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// `keyward:admin`: every organization.
    Everywhere,
    /// Its own organization.
    Organization,
    /// The keys of its own `owner_id`, in its own organization (`keyward:self`); a key without an
    /// owner reaches none.
    OwnKeys,
}

/// One way into a route: a `keyward:` scope the key permits (`ScopeSet::permits`: held, implied by
/// `keyward:keys:write` for reading, or by `keyward:admin`), and how far it then reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub scope: KeywardScope,
    pub reach: Reach,
}

const fn grant(scope: KeywardScope, reach: Reach) -> Grant {
    Grant { scope, reach }
}

/// What a route needs of its caller, as a type: the `P` of `Caller<P>`.
pub trait Permission: 'static {
    /// Tried in order: the first the key permits admits it; none, and the answer is 403
    /// `insufficient_scope` naming the first. Empty: any usable key. `keyward:admin` is admitted by
    /// every permission and reaches [`Reach::Everywhere`].
    const GRANTS: &'static [Grant];
}

macro_rules! permissions {
    ($($(#[$doc:meta])* $name:ident => [$($scope:ident: $reach:ident),*];)*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name;

        impl Permission for $name {
            const GRANTS: &'static [Grant] = &[$(grant(KeywardScope::$scope, Reach::$reach)),*];
        }
    )*};
}

permissions! {
    /// Any usable key (its own standing).
    AnyKey => [];
    /// `keyward:verify`: the hot path, in the caller's organization.
    Verify => [Verify: Organization];
    /// `keyward:keys:read` in the caller's organization, or `keyward:self` on its own owner's keys.
    KeysReadOrSelf => [KeysRead: Organization, SelfService: OwnKeys];
    /// `keyward:keys:write` in the caller's organization, or `keyward:self` on its own owner's keys.
    KeysWriteOrSelf => [KeysWrite: Organization, SelfService: OwnKeys];
    /// `keyward:keys:read`: what spans the organization (`keyward:self` is not enough).
    KeysRead => [KeysRead: Organization];
    /// `keyward:keys:write`: what spans the organization (`keyward:self` is not enough).
    KeysWrite => [KeysWrite: Organization];
    /// `keyward:audit:read`, in the caller's organization.
    AuditRead => [AuditRead: Organization];
    /// `keyward:admin`: every organization.
    Admin => [Admin: Everywhere];
}

/// How far a key with `scopes` reaches under `grants`, or the scope a refusal names.
pub fn admit(grants: &[Grant], scopes: &ScopeSet) -> Result<Reach, KeywardScope> {
    if scopes.holds(KeywardScope::Admin) {
        return Ok(Reach::Everywhere);
    }
    match grants.first() {
        None => Ok(Reach::Organization),
        Some(first) => grants.iter().find(|g| scopes.permits(g.scope)).map(|g| g.reach).ok_or(first.scope),
    }
}

/// The object-level rules: each written once, here, and called by name from the handlers.
impl<P> Caller<P> {
    /// The server's state, which this caller's request acts on.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn key_id(&self) -> KeyId {
        self.key.id
    }

    pub fn organization_id(&self) -> OrgId {
        self.key.organization_id
    }

    pub fn scopes(&self) -> &ScopeSet {
        &self.key.scopes
    }

    pub fn is_admin(&self) -> bool {
        self.key.scopes.holds(KeywardScope::Admin)
    }

    /// Whether the permission whose grants are `grants` (`Q::GRANTS`) admits this key: what
    /// [`Caller::admitted_as`] decides, without building the caller (the console shows a page's link
    /// only to the keys its permission admits).
    pub(crate) fn admits(&self, grants: &[Grant]) -> bool {
        admit(grants, &self.key.scopes).is_ok()
    }

    pub fn actor(&self, at: DateTime<Utc>) -> Actor {
        Actor::key(self.key.id, self.ip.map(|ip| ip.to_string()), at)
    }

    /// The organization the caller is confined to; `None` for `keyward:admin`.
    pub fn org_filter(&self) -> Option<OrgId> {
        (self.reach != Reach::Everywhere).then_some(self.key.organization_id)
    }

    /// Whether the caller reaches into this organization. SECURITY: what it does not reach answers
    /// like what does not exist.
    pub fn reaches_org(&self, organization: OrgId) -> bool {
        self.org_filter().is_none_or(|own| own == organization)
    }

    /// Whether the caller reaches only the keys of its own owner (`keyward:self`).
    fn confined_to_owner(&self) -> bool {
        self.reach == Reach::OwnKeys
    }

    /// The owner whose keys alone the caller may list (`""`, no one's, for a `keyward:self` key without
    /// an owner); `None` when it is not confined to one.
    pub fn listed_owner(&self) -> Option<&str> {
        self.confined_to_owner().then(|| self.key.owner_id.as_deref().unwrap_or_default())
    }

    /// Whether the caller may see this key at all. A key it may not see answers 404, exactly like
    /// one that does not exist.
    pub fn sees_key(&self, key: &ApiKey) -> bool {
        let own = self.key.owner_id.as_deref();
        self.reaches_org(key.organization_id)
            && (!self.confined_to_owner() || (own.is_some() && key.owner_id.as_deref() == own))
    }

    /// Whether the caller holds this `keyward:` scope itself (admin holds every one); an unknown reserved
    /// scope needs admin.
    pub fn holds(&self, reserved: &Scope) -> bool {
        self.is_admin() || self.key.scopes.holds(reserved.keyward().unwrap_or(KeywardScope::Admin))
    }

    /// SECURITY: one rule for every write on a key: the caller holds every `keyward:` scope the key
    /// holds, so no key can re-enable, strip or revoke a key more powerful than itself.
    pub fn may_change(&self, key: &ApiKey) -> ApiResult<()> {
        match key.scopes.iter().filter(|s| s.is_reserved()).find(|s| !self.holds(s)) {
            None => Ok(()),
            Some(scope) => Err(ApiError::new(
                ErrorCode::InsufficientScope,
                format!("this key cannot change a key that holds `{scope}`, which it does not hold itself"),
            )),
        }
    }

    /// SECURITY: a key may grant only the `keyward:` scopes it holds itself (admin grants any), and a
    /// key confined to its owner's keys only customer scopes its own scopes cover.
    pub fn may_grant(&self, scopes: &ScopeSet) -> ApiResult<()> {
        let confined = self.confined_to_owner();
        match scopes
            .iter()
            .find(|s| if s.is_reserved() { !self.holds(s) } else { confined && !self.scopes().covers(s) })
        {
            None => Ok(()),
            Some(scope) => Err(ApiError::new(
                ErrorCode::InsufficientScope,
                // SECURITY: a customer scope is client text (`read:<anything>`); it could hold a key.
                format!(
                    "this key cannot grant the scope {} it does not hold",
                    keyward_core::key::quote_if_not_key(scope.as_str())
                ),
            )),
        }
    }

    /// The organization a new key, endpoint or import is for: the caller's own unless it names another,
    /// which needs `keyward:admin`.
    pub fn organization_for(&self, requested: Option<&str>) -> ApiResult<OrgId> {
        let Some(raw) = requested else { return Ok(self.key.organization_id) };
        let id: OrgId =
            raw.parse().map_err(|_| ApiError::validation("organization_id", "must be an organization id"))?;
        if self.reaches_org(id) { Ok(id) } else { Err(ApiError::insufficient_scope(KeywardScope::Admin.as_str())) }
    }

    /// The owner a new key is for: the one asked for, except that a caller confined to its owner's keys
    /// creates keys for that owner only (and, without an owner, none).
    pub fn owner_for(&self, requested: Option<String>) -> ApiResult<Option<String>> {
        if !self.confined_to_owner() {
            return Ok(requested);
        }
        let Some(own) = self.key.owner_id.as_deref() else {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "a self-service key without an owner_id cannot create keys",
            ));
        };
        match requested {
            Some(owner) if *owner != *own => {
                Err(ApiError::new(ErrorCode::Forbidden, "a self-service key creates keys for its own owner only"))
            }
            _ => Ok(Some(own.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Admitted = Result<Reach, KeywardScope>;

    fn reach<P: Permission>(scopes: &[&str]) -> Admitted {
        admit(P::GRANTS, &ScopeSet::parse(scopes).unwrap())
    }

    #[test]
    fn permissions_admit_as_declared() {
        use KeywardScope as S;
        use Reach::{Everywhere, Organization, OwnKeys};
        let cases: &[(&str, Admitted, Admitted)] = &[
            // a key's scope, what `KeysReadOrSelf` admits, what `KeysWrite` admits
            ("keyward:admin", Ok(Everywhere), Ok(Everywhere)),
            ("keyward:keys:write", Ok(Organization), Ok(Organization)),
            ("keyward:keys:read", Ok(Organization), Err(S::KeysWrite)),
            ("keyward:self", Ok(OwnKeys), Err(S::KeysWrite)),
            ("keyward:verify", Err(S::KeysRead), Err(S::KeysWrite)),
            ("*", Err(S::KeysRead), Err(S::KeysWrite)),
        ];
        for (scope, read_or_self, write) in cases {
            assert_eq!(reach::<KeysReadOrSelf>(&[scope]), *read_or_self, "{scope}");
            assert_eq!(reach::<KeysWrite>(&[scope]), *write, "{scope}");
        }
        // The broader scope wins over `keyward:self`.
        assert_eq!(reach::<KeysWriteOrSelf>(&["keyward:self", "keyward:keys:write"]), Ok(Organization));
        assert_eq!(reach::<KeysWriteOrSelf>(&["keyward:self", "keyward:keys:read"]), Ok(OwnKeys));
        assert_eq!(reach::<AnyKey>(&[]), Ok(Organization));
        assert_eq!(reach::<Admin>(&["keyward:keys:write", "keyward:audit:read"]), Err(S::Admin));
        assert_eq!(reach::<AuditRead>(&["keyward:audit:read"]), Ok(Organization));
        assert_eq!(reach::<Verify>(&["keyward:keys:write"]), Err(S::Verify));
    }
}
