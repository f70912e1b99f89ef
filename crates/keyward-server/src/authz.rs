//! The authorization decision: may this request to the protected API pass? One answer, [`decide`],
//! for every way a request reaches Keyward on its way to that API: the gateway, Envoy ext_authz over
//! gRPC and over HTTP, and forward-auth (Traefik, Caddy, APISIX, nginx `auth_request`). Each encoding
//! only reads the original request's method, path, headers and client address, and writes the
//! [`Decision`] back in its own form.
//!
//! The path is normalized once ([`NormalizedPath`]) and the route table ([`Routes`], from
//! `[[gateway.routes]]`) names what it needs (public, scopes, cost); the key is then checked on the
//! verify path (cache, status, IP allow-list, scopes, rate limits, quota), its failures counted
//! against the client's address like the gateway's ([`FailureScope::Edge`]), and the request is a
//! usage event.

use std::net::IpAddr;
use std::sync::Arc;

use axum::http::header::USER_AGENT;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use chrono::{DateTime, Utc};
use keyward_core::NormalizedPath;
use keyward_core::identity::{self, IdentityClaims};
use keyward_store::KeyRecord;
use keyward_store::usage::{MAX_ENDPOINT_LEN, UsageEvent};
use secrecy::{ExposeSecret, SecretString};

use crate::auth::{AuthFailure, auth_failed};
use crate::error::{ApiError, ErrorCode};
use crate::limits::FailureScope;
use crate::rules::{canonical_method, is_keyward_header, methods_in_query, methods_of, same_cgi_name};
use crate::state::AppState;
use crate::telemetry::Via;
use crate::verifier::{self, Check};

pub use crate::rules::{GatewayRoute, InvalidRoutePrefix, RouteRule, Routes};

/// The identity an allowed request carries to the upstream, in this order. A proxy hook sends every
/// one on allow, empty when the key has none (an owner id), so that a proxy copying them overwrites
/// one its client forged.
pub const IDENTITY_HEADERS: [HeaderName; 5] = [
    HeaderName::from_static("x-keyward-key-id"),
    HeaderName::from_static("x-keyward-organization-id"),
    HeaderName::from_static("x-keyward-owner-id"),
    HeaderName::from_static("x-keyward-environment"),
    HeaderName::from_static("x-keyward-scopes"),
];

/// The signed identity ([`keyward_core::identity`]), when `[authz] identity_secret` is set.
pub const IDENTITY_TOKEN_HEADER: HeaderName = HeaderName::from_static("x-keyward-identity");

/// The request a proxy asks about, as the proxy saw it.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// The original method, in any case (`get` is `GET`).
    pub method: &'a str,
    /// The original path as sent, not normalized; a `?query` is ignored.
    pub path: &'a str,
    /// The original request's headers: the key is read from them.
    pub headers: &'a HeaderMap,
    /// The end client's address (the peer the proxy saw), for the key's allow-list, the failed
    /// authentication limits and the usage event.
    pub client_ip: Option<IpAddr>,
    pub via: Via,
}

/// The answer.
#[derive(Debug)]
pub enum Decision {
    Allow(Allowed),
    /// Keyward's error: its status (400, 401, 403, 429, 503), JSON body and headers
    /// (`Retry-After`, rate limits).
    Deny(ApiError),
}

/// What an allowed request carries on.
#[derive(Debug)]
pub struct Allowed {
    /// `None` on a public route: no key was asked for.
    pub key: Option<Arc<KeyRecord>>,
    /// For the upstream: the key's identity ([`IDENTITY_HEADERS`] it has values for, and
    /// [`IDENTITY_TOKEN_HEADER`] when signing is on). Empty on a public route.
    pub upstream_headers: HeaderMap,
    /// To remove before the upstream: every header a key is read from (`[authz] key_headers`), and
    /// every one the client sent that an upstream may read as a key header or an `x-keyward-*` one
    /// ([`headers_to_remove`]). Empty for `/v1/authz` ([`Via::ExtAuthzHttp`]): its answer has no
    /// field for it, and the proxy's recipe is what keeps the key from the upstream.
    pub remove_headers: Vec<HeaderName>,
    /// For the client: the key's rate-limit headers.
    pub response_headers: HeaderMap,
}

/// A decision with what [`decide`] does not hand out: the canonical path (the gateway forwards it)
/// and the usage event, not yet recorded (the gateway adds the upstream's status and latency).
#[derive(Debug)]
pub(crate) struct Judgement {
    pub(crate) decision: Decision,
    /// `None` when the path has no canonical form (then the decision is a 400).
    pub(crate) path: Option<NormalizedPath>,
    /// With method and endpoint; `None` when no key was found.
    pub(crate) event: Option<UsageEvent>,
}

impl Judgement {
    fn denied(error: ApiError, path: Option<NormalizedPath>) -> Self {
        Self { decision: Decision::Deny(error), path, event: None }
    }
}

/// Decides, and records the usage event (with the refusal's status on a deny; an allowed request's
/// status and latency are the upstream's, unknown here).
pub async fn decide(state: &AppState, routes: &Routes, request: AuthzRequest<'_>) -> Decision {
    let Judgement { decision, event, .. } = judge(state, routes, request).await;
    if let Some(mut event) = event {
        if let Decision::Deny(refusal) = &decision {
            event.status_code = Some(i32::from(refusal.code.status().as_u16()));
        }
        state.usage.record(event);
    }
    decision
}

/// [`decide`] without recording the usage event.
#[tracing::instrument(level = "debug", skip_all, fields(via = request.via.as_str()))]
pub(crate) async fn judge(state: &AppState, routes: &Routes, request: AuthzRequest<'_>) -> Judgement {
    let Ok(method) = Method::from_bytes(request.method.as_bytes()) else {
        return Judgement::denied(ApiError::new(ErrorCode::InvalidPath, "the original method is not a method"), None);
    };
    // SECURITY: the method the rule is chosen for is the method the upstream gets.
    let method = canonical_method(&method);
    // The path only: a query string may carry anything, a secret included.
    let raw = request.path.split_once('?').map_or(request.path, |(path, _)| path);
    // SECURITY: one canonical path, for route matching and for the upstream alike. Only the gateway
    // forwards it; a proxy hook's proxy forwards the path as sent, so what an upstream may read as
    // another path than the canonical one is refused (`NormalizedPath::parse_as_sent`).
    let parsed = match request.via {
        Via::Gateway => NormalizedPath::parse(raw),
        _ => NormalizedPath::parse_as_sent(raw),
    };
    let path = match parsed {
        Ok(path) => path,
        Err(e) => return Judgement::denied(ApiError::new(ErrorCode::InvalidPath, e.to_string()), None),
    };
    let mut methods = methods_of(&method, request.headers);
    if let Some((_, query)) = request.path.split_once('?') {
        // SECURITY: the query is read for the method it names only; the rule of that method applies too.
        for named in methods_in_query(query) {
            if !methods.contains(&named) {
                methods.push(named);
            }
        }
    }
    let rule = routes.rule_for_any(&methods, &path);
    if rule.public {
        let allowed = Allowed {
            key: None,
            upstream_headers: HeaderMap::new(),
            remove_headers: headers_to_remove(state, request, &HeaderMap::new()),
            response_headers: HeaderMap::new(),
        };
        return Judgement { decision: Decision::Allow(allowed), path: Some(path), event: None };
    }
    let user_agent = request.headers.get(USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let presented = match crate::auth::presented_key_in(&state.key_headers, request.headers) {
        Ok(presented) => presented,
        Err(missing) => {
            auth_failed(AuthFailure {
                reason: "MISSING_CREDENTIALS",
                presented: "",
                key_id: None,
                ip: request.client_ip,
                user_agent,
                via: request.via,
            });
            return Judgement::denied(missing, Some(path));
        }
    };
    let check = Check {
        presented,
        client_ip: request.client_ip,
        required_scopes: &rule.scopes,
        organization: None,
        user_agent,
        via: request.via,
        cost: rule.cost,
        failures: FailureScope::Edge,
    };
    let (verdict, event) = match verifier::verify_deferred(state, check).await {
        Ok(answer) => answer,
        // SECURITY: the store and the cache cannot answer: closed (503 `store_unavailable`).
        Err(e) => return Judgement::denied(ApiError::from(e), Some(path)),
    };
    let event = event.map(|mut event| {
        event.method = Some(method.as_str().to_owned());
        // SECURITY: a key in the path (`/hooks/sk_live_…`) is recorded as its prefix and hint only.
        let recorded = keyward_core::PlainKey::redact_in(path.as_str());
        event.endpoint = Some(verifier::truncated(&recorded, MAX_ENDPOINT_LEN).to_owned());
        event
    });
    let now = state.clock.now();
    let decision = match (verdict.refusal(now), &verdict.key) {
        (None, Some(key)) => {
            let mut upstream_headers = identity_headers(key);
            if let Some(secret) = &state.authz.identity_secret {
                let token = signed_identity(secret, state.authz.identity_ttl_seconds, key, (&method, &path), now);
                upstream_headers.extend(token.map(|token| (IDENTITY_TOKEN_HEADER, token)));
            }
            Decision::Allow(Allowed {
                remove_headers: headers_to_remove(state, request, &upstream_headers),
                upstream_headers,
                key: Some(key.clone()),
                response_headers: {
                    // Room for what an answer adds (identity, request id, length) without growing.
                    let mut headers = HeaderMap::with_capacity(16);
                    verdict.put_headers(now, &mut headers);
                    headers
                },
            })
        }
        (refusal, _) => Decision::Deny(refusal.unwrap_or_else(|| ApiError::internal("a valid key without a record"))),
    };
    Judgement { decision, path: Some(path), event }
}

/// Each header a key is read from, and each one the client sent that CGI, WSGI and Rack read as one
/// of those or as an `x-keyward-*` header (`X_Keyward_Owner_Id`), except the names the answer `set`s;
/// none for `/v1/authz`, whose answer has no field for them ([`Allowed::remove_headers`]).
///
/// SECURITY: a proxy passes on every client header the answer neither sets nor removes: a forged
/// `x-keyward-owner-id` beside a key without an owner, or any `_` spelling (Envoy accepts those by
/// default). A name the answer sets is never listed, since Envoy removes after it sets.
fn headers_to_remove(state: &AppState, request: AuthzRequest<'_>, set: &HeaderMap) -> Vec<HeaderName> {
    if request.via == Via::ExtAuthzHttp {
        return Vec::new();
    }
    let (key_headers, sent) = (&*state.key_headers, request.headers);
    let mut remove = key_headers.to_vec();
    let reserved = |name: &HeaderName| {
        is_keyward_header(name)
            || key_headers.iter().any(|k| same_cgi_name(k.as_str().as_bytes(), name.as_str().as_bytes()))
    };
    for name in sent.keys() {
        if reserved(name) && !set.contains_key(name) && !remove.contains(name) {
            remove.push(name.clone());
        }
    }
    remove
}

/// The `x-keyward-identity` token for this key and request, valid `ttl_seconds` from `now`.
fn signed_identity(
    secret: &SecretString,
    ttl_seconds: u64,
    key: &KeyRecord,
    (method, path): (&Method, &NormalizedPath),
    now: DateTime<Utc>,
) -> Option<HeaderValue> {
    let iat = now.timestamp();
    let claims = IdentityClaims {
        key_id: key.id.to_string(),
        org: key.organization_id.to_string(),
        owner: key.owner_id.as_ref().map(ToString::to_string),
        env: key.environment.to_string(),
        scopes: key.scopes.to_strings(),
        iat,
        exp: iat.saturating_add(i64::try_from(ttl_seconds).unwrap_or(i64::MAX)),
        method: method.as_str().to_owned(),
        path: path.to_string(),
    };
    HeaderValue::from_str(&identity::sign(secret.expose_secret().as_bytes(), &claims)).ok()
}

/// The key's identity for the upstream ([`IDENTITY_HEADERS`]; a value a header cannot carry is left
/// out).
fn identity_headers(key: &KeyRecord) -> HeaderMap {
    let [key_id, organization, owner, environment, scopes] = IDENTITY_HEADERS;
    let mut headers = HeaderMap::with_capacity(IDENTITY_HEADERS.len() + 1);
    let set = |headers: &mut HeaderMap, name: HeaderName, value: Result<HeaderValue, _>| {
        if let Ok(value) = value {
            headers.insert(name, value);
        }
    };
    // Ids written on the stack and copied once into the header, without the formatting machinery.
    let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
    set(&mut headers, key_id, HeaderValue::from_bytes(key.id.0.as_hyphenated().encode_lower(&mut id).as_bytes()));
    let org = key.organization_id.0.as_hyphenated().encode_lower(&mut id);
    set(&mut headers, organization, HeaderValue::from_bytes(org.as_bytes()));
    headers.insert(environment, HeaderValue::from_static(key.environment.as_str()));
    let mut joined = String::with_capacity(key.scopes.iter().map(|s| s.as_str().len() + 1).sum());
    for scope in key.scopes.iter() {
        if !joined.is_empty() {
            joined.push(' ');
        }
        joined.push_str(scope.as_str());
    }
    // The joined text becomes the header's own bytes (no copy).
    set(&mut headers, scopes, HeaderValue::try_from(joined));
    if let Some(owner_id) = &key.owner_id {
        set(&mut headers, owner, HeaderValue::from_bytes(owner_id.as_bytes()));
    }
    headers
}
