//! Gateway mode: Keyward in front of any HTTP API. Each request is judged by [`crate::authz`] (the
//! decision every proxy hook shares): its path is normalized once ([`NormalizedPath`]), routes match
//! on that path and it is the path the upstream receives; the key is verified on the same path as
//! `/v1/verify` (status, IP, scopes). A valid request is proxied to the upstream with the key removed
//! and the verified identity added as `X-Keyward-*` headers. Bodies stream both ways: nothing is
//! buffered, so a 100 MB upload never sits in memory. Connections to the upstream are pooled.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::HOST;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keyward_core::NormalizedPath;

use crate::authz::{AuthzRequest, Decision, Judgement};
use crate::error::{ApiError, ErrorCode};
use crate::rules::{canonical_method, is_keyward_header, same_cgi_name};
use crate::state::AppState;
use crate::telemetry::Via;

pub use crate::rules::{GatewayRoute, InvalidRoutePrefix, RouteRule, Routes};

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `http://host:port` (plain HTTP: put TLS in front of the gateway, or beside the upstream).
    pub upstream: Uri,
    pub timeout: Duration,
    pub routes: Vec<GatewayRoute>,
    /// For paths no route matches: by default a valid key and no scope.
    pub unmatched: RouteRule,
}

#[derive(Debug, Clone)]
pub struct Gateway {
    upstream: Uri,
    timeout: Duration,
    routes: Routes,
    client: Client<HttpConnector, Body>,
}

impl Gateway {
    /// Refuses a route prefix that cannot be normalized ([`Routes::new`]).
    pub fn new(config: GatewayConfig) -> Result<Self, InvalidRoutePrefix> {
        Ok(Self::with_routes(config.upstream, config.timeout, Routes::new(config.routes, config.unmatched)?))
    }

    /// A gateway to `upstream` judging requests by `routes` (the node's own, `AppState::routes`, in
    /// `keyward serve`).
    pub fn with_routes(upstream: Uri, timeout: Duration, routes: Routes) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(connector);
        Self { upstream, timeout, routes, client }
    }

    pub fn upstream(&self) -> &Uri {
        &self.upstream
    }
}

/// Every path goes to the upstream.
pub fn router(state: AppState, gateway: Gateway) -> Router {
    Router::new().fallback(proxy).with_state((state, gateway))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) are never forwarded; `proxy-connection` is the obsolete
/// spelling some clients still send.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// What the upstream must never get from the client: identity headers in any spelling, and the key
/// in any header or scheme.
fn is_reserved_for_keyward(name: &HeaderName) -> bool {
    let name_bytes = name.as_str().as_bytes();
    is_keyward_header(name) || [b"x-api-key".as_slice(), b"authorization"].iter().any(|k| same_cgi_name(name_bytes, k))
}

/// Everything the client sent that the upstream must not see. Runs before the identity headers are
/// inserted, and nothing strips request headers after that.
///
/// SECURITY: the order is the guarantee. Hop-by-hop headers first, the ones the client names in
/// `Connection` included, so a client-named header can only remove client headers; then every
/// `x-keyward-*` and key header, in any spelling (`_` for `-`, any case). `Authorization` goes
/// whatever its scheme, on public routes too: a key can ride in `Basic`, `Token` or `ApiKey` as well
/// as in `Bearer`, and Keyward cannot tell a key from another credential in every scheme.
fn strip_client_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    let reserved: Vec<HeaderName> = headers.keys().filter(|name| is_reserved_for_keyward(name)).cloned().collect();
    for name in reserved {
        headers.remove(name);
    }
}

/// The request's URI with the canonical path and the query string untouched.
fn with_path(uri: &Uri, path: &NormalizedPath) -> Result<Uri, ApiError> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    path_and_query.parse().map_err(|_| ApiError::new(ErrorCode::InvalidPath, "the path has a forbidden character"))
}

/// The path as log lines show it. SECURITY: a segment that could hold a key is `…`: a client may put
/// a key (its own or one it found) in a path, and a full key never appears in a log.
fn loggable_path(path: &NormalizedPath) -> String {
    path.as_str()
        .split('/')
        .map(|segment| if keyward_core::key::could_hold_key(segment) { "…" } else { segment })
        .collect::<Vec<_>>()
        .join("/")
}

#[tracing::instrument(skip_all, fields(method = %request.method(), path = tracing::field::Empty))]
async fn proxy(State((state, gateway)): State<(AppState, Gateway)>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip());
    let client_ip = crate::client_ip::client_ip(peer, &parts.headers, &state.trusted_proxies);
    // SECURITY: the method the rule is chosen for is the method the upstream gets.
    parts.method = canonical_method(&parts.method);
    let request = AuthzRequest {
        method: parts.method.as_str(),
        // With the query, which the upstream gets too (it may name a method: `_method`).
        path: parts.uri.path_and_query().map_or(parts.uri.path(), |pq| pq.as_str()),
        headers: &parts.headers,
        client_ip,
        via: Via::Gateway,
    };
    let Judgement { decision, path, event } = crate::authz::judge(&state, &gateway.routes, request).await;
    if let Some(path) = &path {
        tracing::Span::current().record("path", tracing::field::display(loggable_path(path)));
        parts.uri = match with_path(&parts.uri, path) {
            Ok(uri) => uri,
            Err(e) => return e.into_response(),
        };
    }
    let allowed = match decision {
        Decision::Allow(allowed) => allowed,
        Decision::Deny(refusal) => {
            let response = refusal.into_response();
            record_usage(&state, event, &response, None);
            return response;
        }
    };
    // The decision read the key and the user agent first: Keyward is the recipient of a key or a user
    // agent the client names in `Connection`, the upstream is not.
    strip_client_headers(&mut parts.headers);
    for name in &allowed.remove_headers {
        parts.headers.remove(name);
    }
    // SECURITY: inserted last; the key and every client `x-keyward-*` header are already gone.
    parts.headers.extend(allowed.upstream_headers);
    if allowed.key.is_none() {
        return forward(&gateway, parts, body, client_ip).await;
    }
    let started = std::time::Instant::now();
    let mut response = forward(&gateway, parts, body, client_ip).await;
    let upstream_ms = started.elapsed().as_millis();
    response.headers_mut().extend(allowed.response_headers);
    record_usage(&state, event, &response, Some(i64::try_from(upstream_ms).unwrap_or(i64::MAX)));
    response
}

/// Records a gateway request's usage event (from [`crate::authz::judge`]) with the status the client
/// got and the upstream's latency (`None` when Keyward refused the request itself).
fn record_usage(
    state: &AppState,
    event: Option<keyward_store::usage::UsageEvent>,
    response: &Response,
    upstream_ms: Option<i64>,
) {
    if let Some(mut event) = event {
        event.status_code = Some(i32::from(response.status().as_u16()));
        event.response_time_ms = upstream_ms;
        state.usage.record(event);
    }
}

async fn forward(
    gateway: &Gateway,
    mut parts: axum::http::request::Parts,
    body: Body,
    client_ip: Option<std::net::IpAddr>,
) -> Response {
    let upstream = &gateway.upstream;
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let base = upstream.to_string();
    let uri = match format!("{}{}", base.trim_end_matches('/'), path_and_query).parse::<Uri>() {
        Ok(uri) => uri,
        Err(_) => return ApiError::new(ErrorCode::NotFound, "no such route").into_response(),
    };
    // Request headers were stripped in `proxy`, before the identity headers went in: stripping here
    // again would let a client-named `Connection` header remove them.
    parts.headers.remove(HOST);
    if let Some(ip) = client_ip {
        let forwarded = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prior) => format!("{prior}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&forwarded) {
            parts.headers.insert("x-forwarded-for", value);
        }
    }
    parts.uri = uri;
    parts.version = axum::http::Version::HTTP_11;
    let request = Request::from_parts(parts, body);

    match tokio::time::timeout(gateway.timeout, gateway.client.request(request)).await {
        Err(_) => ApiError::new(ErrorCode::UpstreamTimeout, "the upstream did not answer in time").into_response(),
        Ok(Err(e)) => ApiError {
            source: Some(e.to_string()),
            ..ApiError::new(ErrorCode::UpstreamUnavailable, "the upstream cannot be reached")
        }
        .into_response(),
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_headers_in_every_spelling() {
        for name in [
            "x-keyward-key-id",
            "x_keyward_key_id",
            "x-keyward_scopes",
            "x_keyward-owner-id",
            "x-keyward-anything",
            "x_keyward_",
            "x-keyward",
            "x-api-key",
            "x_api_key",
            "authorization",
        ] {
            assert!(is_reserved_for_keyward(&HeaderName::from_static(name)), "{name}");
        }
        for name in ["x-keywardish", "x-request-id", "x-api-keys", "accept"] {
            assert!(!is_reserved_for_keyward(&HeaderName::from_static(name)), "{name}");
        }
    }
}
