//! `/v1/authz`: Envoy's HTTP ext_authz and forward-auth (Traefik, Caddy, APISIX, nginx
//! `auth_request`, ingress-nginx) ask here whether their client's request may pass. The encoding
//! only: the decision is [`crate::authz::decide`]'s.
//!
//! SECURITY: a proxy passes its client's headers on to the auth request, so where the original
//! method and URI are read is the proxy configuration's choice ([`AuthzStyle`]), never a guess from
//! the headers present: otherwise a client behind nginx could send its own `X-Forwarded-Uri: /public`
//! and be judged on a path it chose. The style comes from `[authz] style` or from the URL the recipe
//! configures (`?style=`, `?compat=nginx`), which the client cannot change; in Envoy's path-prefix form
//! (`/v1/authz/<original path>`) the query is the client's, so it is not read at all. Without a
//! style, the auth request is the original request (Envoy's form; `/v1/authz` itself is `/`), and one
//! that carries a header of another style is refused: the recipe forgot its style.

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;

use crate::authz::{AuthzRequest, Decision, IDENTITY_HEADERS};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::settings::AuthzStyle;
use crate::state::AppState;
use crate::telemetry::Via;

/// Where this route is mounted; `PATH/<original path>` is Envoy's path-prefix form.
pub const PATH: &str = "/v1/authz";

const X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
const X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
const X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
const X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");

/// On a deny in nginx mode: the status Keyward meant, when it had to send 403 instead.
pub const X_KEYWARD_STATUS: HeaderName = HeaderName::from_static("x-keyward-status");

/// How one auth request is read: its style, whether the style was named, and nginx's statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reading {
    style: AuthzStyle,
    /// Named by the setting or the URL (else Envoy's form by default).
    named: bool,
    nginx: bool,
}

/// `?style=` and `?compat=` of the auth request's own URL, with `[authz]`'s settings.
fn reading(state: &AppState, parts: &Parts) -> Result<Reading, ApiError> {
    let setting = state.authz.style;
    let nginx = state.authz.nginx_compat;
    if parts.uri.path() != PATH {
        // Envoy's path-prefix form: the query is the client's.
        return Ok(Reading { style: AuthzStyle::Envoy, named: true, nginx });
    }
    let mut asked = None;
    let mut compat_nginx = false;
    for (name, value) in parts.uri.query().unwrap_or_default().split('&').filter_map(|p| p.split_once('=')) {
        let style = match (name, value) {
            ("style", value) => AuthzStyle::parse(value).ok_or_else(|| {
                ApiError::field(ErrorCode::InvalidQuery, "style", "`style` is `forwarded`, `original` or `envoy`")
            })?,
            ("compat", "nginx") => {
                compat_nginx = true;
                AuthzStyle::Original
            }
            ("compat", _) => return Err(ApiError::field(ErrorCode::InvalidQuery, "compat", "`compat` is `nginx`")),
            _ => continue,
        };
        if asked.is_some_and(|asked| asked != style) {
            return Err(ApiError::field(ErrorCode::InvalidQuery, "style", "the URL names two styles"));
        }
        asked = Some(style);
    }
    let style = match (setting, asked) {
        (Some(set), Some(asked)) if set != asked => {
            return Err(ApiError::field(ErrorCode::InvalidQuery, "style", "the URL's style is not `[authz] style`"));
        }
        (set, asked) => set.or(asked),
    };
    Ok(Reading { style: style.unwrap_or(AuthzStyle::Envoy), named: style.is_some(), nginx: nginx || compat_nginx })
}

/// The one value of `name`: a header the style names must be there exactly once.
fn single<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<&'h str, ApiError> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => {
            value.to_str().map_err(|_| ApiError::new(ErrorCode::InvalidPath, format!("`{name}` is not visible ASCII")))
        }
        (None, _) => Err(ApiError::new(ErrorCode::InvalidPath, format!("`{name}` is missing"))),
        (Some(_), Some(_)) => Err(ApiError::new(ErrorCode::InvalidPath, format!("`{name}` is sent more than once"))),
    }
}

/// The original method and path (with its query, which the decision ignores).
fn original(parts: &Parts, reading: Reading) -> Result<(&str, &str), ApiError> {
    let headers = &parts.headers;
    match reading.style {
        AuthzStyle::Forwarded => Ok((single(headers, &X_FORWARDED_METHOD)?, single(headers, &X_FORWARDED_URI)?)),
        AuthzStyle::Original => Ok((single(headers, &X_ORIGINAL_METHOD)?, single(headers, &X_ORIGINAL_URI)?)),
        AuthzStyle::Envoy => {
            // SECURITY: no style was named, yet a proxy sent the headers of one: its recipe lacks its
            // style, and every request would be judged as `/`.
            if !reading.named
                && let Some(name) = [X_FORWARDED_METHOD, X_FORWARDED_URI, X_ORIGINAL_METHOD, X_ORIGINAL_URI]
                    .iter()
                    .find(|name| headers.contains_key(*name))
            {
                return Err(ApiError::field(
                    ErrorCode::InvalidQuery,
                    "style",
                    format!("`{name}` was sent: name the proxy's style (`?style=` or `[authz] style`)"),
                ));
            }
            let rest = parts.uri.path().strip_prefix(PATH).unwrap_or_default();
            // In the path-prefix form the query is the client's: the decision reads the method it
            // may name (`_method`), never a style.
            let with_query = parts.uri.path_and_query().and_then(|pq| pq.as_str().strip_prefix(PATH));
            let path = if rest.is_empty() { "/" } else { with_query.unwrap_or(rest) };
            Ok((parts.method.as_str(), path))
        }
    }
}

/// `/v1/authz` (any method) and `/v1/authz/<original path>`: whether the request a proxy asks about
/// may pass. The end client's key is the credential (the proxy presents no key of its own); its
/// failures count against the client's address like the gateway's.
#[utoipa::path(method(get, post), path = "/v1/authz", tag = "authz",
    params(
        ("style" = Option<String>, Query, description = "Where the original method and URI are read: `forwarded` (`X-Forwarded-Method`, `X-Forwarded-Uri`: Traefik, Caddy, APISIX), `original` (`X-Original-Method`, `X-Original-URI`: nginx), `envoy` (this request is the original one; Envoy's path-prefix form `/v1/authz/<path>`). Unset: `[authz] style`, else `envoy`, refusing a request that carries another style's headers.", pattern = "^(forwarded|original|envoy)$"),
        ("compat" = Option<String>, Query, description = "`nginx`: style `original`, and a 429 or 503 is sent as 403 with `X-Keyward-Status`.", pattern = "^nginx$"),
    ),
    responses(
        (status = 200, description = "Allowed: the identity headers (`X-Keyward-Key-Id`, `-Organization-Id`, `-Owner-Id`, `-Environment`, `-Scopes`, each sent, empty when the key has none; `X-Keyward-Identity` when signing is on) and the rate-limit headers."),
        (status = 400, body = ErrorBody, description = "`invalid_query` (a style that is not one, two styles), `invalid_path` (the original path has no safe reading, or a header the style names is missing or repeated)."),
        (status = 401, body = ErrorBody, description = "The end client's key is missing, malformed, unknown, revoked, disabled or expired, or its organization is disabled."),
        (status = 403, body = ErrorBody, description = "`insufficient_scope` (the route's scopes), `ip_not_allowed`; in nginx mode also a 429 or 503, with `X-Keyward-Status`."),
        (status = 429, body = ErrorBody, description = "`rate_limited` (with `Retry-After`) or `quota_exceeded`."),
        (status = 503, body = ErrorBody, description = "`store_unavailable`: the store and the cache cannot answer."),
    ),
    security((), ("bearer" = [])))]
pub async fn authz(State(state): State<AppState>, request: Request) -> Response {
    let (parts, _body) = request.into_parts();
    let reading = match reading(&state, &parts) {
        Ok(reading) => reading,
        Err(e) => return e.into_response(),
    };
    let (method, path) = match original(&parts, reading) {
        Ok(original) => original,
        Err(e) => return nginx_status(e.into_response(), reading.nginx),
    };
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip());
    let client_ip = crate::client_ip::client_ip(peer, &parts.headers, &state.trusted_proxies);
    let request = AuthzRequest { method, path, headers: &parts.headers, client_ip, via: Via::ExtAuthzHttp };
    match crate::authz::decide(&state, &state.routes, request).await {
        Decision::Allow(allowed) => {
            if let Some(key) = &allowed.key {
                let span = tracing::Span::current();
                span.record("key_id", tracing::field::display(key.id));
                span.record("organization_id", tracing::field::display(key.organization_id));
            }
            // The identity, then the rate-limit headers, moved into the answer without another copy.
            let mut response = Response::new(Body::empty());
            let headers = response.headers_mut();
            *headers = allowed.upstream_headers;
            // Every identity header, empty when the key has no value: a proxy copying them overwrites
            // one its client forged.
            for name in IDENTITY_HEADERS {
                if !headers.contains_key(&name) {
                    headers.insert(name, HeaderValue::from_static(""));
                }
            }
            headers.extend(allowed.response_headers);
            response
        }
        Decision::Deny(refusal) => nginx_status(refusal.into_response(), reading.nginx),
    }
}

/// nginx's `auth_request` answers 500 for any status but 2xx, 401 and 403: in nginx mode another
/// status is sent as 403, the meant one in `X-Keyward-Status` (the recipe rebuilds a 429 from it);
/// `Retry-After` and the body stay.
fn nginx_status(mut response: Response, nginx: bool) -> Response {
    let status = response.status();
    if nginx && !status.is_success() && status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
        response.headers_mut().insert(X_KEYWARD_STATUS, HeaderValue::from(status.as_u16()));
        *response.status_mut() = StatusCode::FORBIDDEN;
    }
    response
}
