//! Gateway mode: Keyward in front of any HTTP API. Each request's path is normalized once
//! ([`NormalizedPath`]); routes match on that path and it is the path the upstream receives. The key
//! is verified on the same path as `/v1/verify` (status, IP, scopes); a valid request is proxied to
//! the upstream with the key removed and the verified identity added as `X-Keyward-*` headers. Bodies
//! stream both ways: nothing is buffered, so a 100 MB upload never sits in memory. Connections to the
//! upstream are pooled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{HOST, USER_AGENT};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keyward_core::{NormalizedPath, PathError, Scope};
use keyward_store::KeyRecord;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::verifier::{self, Check};

/// What a path needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    /// No key needed.
    pub public: bool,
    pub scopes: Vec<Scope>,
    /// Counted against the monthly quota; 1 by default.
    pub cost: u64,
}

impl Default for RouteRule {
    /// A valid key, no scope, cost 1.
    fn default() -> Self {
        Self { public: false, scopes: Vec::new(), cost: 1 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRoute {
    /// Matches this path and everything below it (`/v1/projects` matches `/v1/projects/7`). Normalized
    /// like request paths by [`Gateway::new`], so `/v1//projects` is `/v1/projects`.
    pub prefix: String,
    /// Empty: every method.
    pub methods: Vec<Method>,
    pub rule: RouteRule,
}

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
    config: Arc<GatewayConfig>,
    /// Each route's prefix in every [`Reading`], in the order of `config.routes`.
    readings: Arc<Vec<[String; READINGS.len()]>>,
    client: Client<HttpConnector, Body>,
}

/// A way an upstream may read a canonical path differently from Keyward's route table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reading {
    /// Tomcat, Jetty and Spring drop `;` parameters from every segment before routing.
    without_parameters: bool,
    /// Express, ASP.NET Core and IIS route without regard to case (ASP.NET with Unicode case rules).
    case_folded: bool,
}

/// The first one is the canonical path itself.
const READINGS: [Reading; 4] = [
    Reading { without_parameters: false, case_folded: false },
    Reading { without_parameters: true, case_folded: false },
    Reading { without_parameters: false, case_folded: true },
    Reading { without_parameters: true, case_folded: true },
];

impl Reading {
    /// `path` (canonical) as this reading sees it; segments emptied by dropping parameters go, as
    /// runs of slashes do.
    fn of(self, path: &str) -> String {
        let mut out = String::with_capacity(path.len());
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            let segment = if self.without_parameters { segment.split(';').next().unwrap_or_default() } else { segment };
            if segment.is_empty() {
                continue;
            }
            out.push('/');
            if self.case_folded {
                out.push_str(&fold_case(segment));
            } else {
                out.push_str(segment);
            }
        }
        if out.is_empty() || path.ends_with('/') {
            out.push('/');
        }
        out
    }
}

/// `path` without the extension of its last segment (from the segment's first `.`, when something
/// comes before it): Rails routes `/projects.json` as `/projects` with a format, Spring's suffix
/// matching and IIS's trailing dots do the same. `None` when there is none to drop.
fn without_extension(path: &str) -> Option<&str> {
    let start = path.rfind('/')? + 1;
    let dot = path[start..].find('.')?;
    (dot > 0).then(|| &path[..start + dot])
}

/// A segment percent-decoded and case-folded so that every spelling a case-insensitive router takes
/// for one name is one string: upper-casing first maps `ſ` to `S` (as .NET's `OrdinalIgnoreCase`
/// does), lower-casing then maps the Kelvin sign to `k`.
fn fold_case(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(b) => {
                decoded.push(b);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    // A canonical path decodes to UTF-8; anything else keeps its escapes and folds ASCII only.
    match String::from_utf8(decoded) {
        Ok(text) => text.to_uppercase().to_lowercase(),
        Err(_) => segment.to_ascii_lowercase(),
    }
}

/// The request headers that make Express (`method-override`), Rack, Laravel and ASP.NET Core run a
/// request as another method, as CGI names them (`_` read as `-`).
const METHOD_OVERRIDES: [&str; 3] = ["x-http-method-override", "x-http-method", "x-method-override"];

/// The methods a request may run as upstream: its own, upper-cased (Django and Werkzeug upper-case
/// it before routing), `GET` for `HEAD` (Flask, Express, Rails and Go's `ServeMux` run the `GET`
/// handler), and every method an override header names.
fn methods_of(method: &Method, headers: &HeaderMap) -> Vec<Method> {
    let mut methods = vec![canonical_method(method)];
    if methods[0] == Method::HEAD {
        methods.push(Method::GET);
    }
    // Node.js joins repeated headers with `,` and Express's `method-override` takes the first item:
    // every item of every value counts.
    let named = headers
        .iter()
        .filter(|(name, _)| METHOD_OVERRIDES.contains(&cgi_name(name).as_str()))
        .flat_map(|(_, value)| value.as_bytes().split(|b| *b == b','))
        .filter_map(|item| Method::from_bytes(&item.trim_ascii().to_ascii_uppercase()).ok());
    for method in named {
        if !methods.contains(&method) {
            methods.push(method);
        }
    }
    methods
}

/// The method in upper case: routes are configured in upper case, and the upstream gets this one.
fn canonical_method(method: &Method) -> Method {
    Method::from_bytes(method.as_str().to_ascii_uppercase().as_bytes()).unwrap_or_else(|_| method.clone())
}

/// A configured route prefix that has no canonical form; refused at start-up.
#[derive(Debug, thiserror::Error)]
#[error("gateway route prefix `{prefix}`: {source}")]
pub struct InvalidRoutePrefix {
    pub prefix: String,
    pub source: PathError,
}

impl Gateway {
    /// Refuses a route prefix that cannot be normalized: a prefix that matched nothing would hand its
    /// paths to a shorter, possibly weaker, route.
    pub fn new(mut config: GatewayConfig) -> Result<Self, InvalidRoutePrefix> {
        for route in &mut config.routes {
            // SECURITY: prefixes and request paths are compared in the same canonical form.
            route.prefix = NormalizedPath::parse(&route.prefix)
                .map_err(|source| InvalidRoutePrefix { prefix: route.prefix.clone(), source })?
                .to_string();
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout));
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(connector);
        let readings = config.routes.iter().map(|r| READINGS.map(|reading| reading.of(&r.prefix))).collect();
        Ok(Self { config: Arc::new(config), readings: Arc::new(readings), client })
    }

    /// The longest matching prefix wins; among equal prefixes, one that names the method.
    pub fn rule_for(&self, method: &Method, path: &NormalizedPath) -> RouteRule {
        self.rule_for_any(std::slice::from_ref(method), path)
    }

    /// What a request needs that the upstream may run as any of `methods` on any [`Reading`] of
    /// `path`: the rule of the first method on the canonical path (the unmatched rule when no route
    /// matches), and the rule of every other method and reading, and of each reading without its
    /// last segment's extension ([`without_extension`]), that a route matches.
    ///
    /// SECURITY: the rules are combined as all of them: public only when every one is, every scope
    /// any one names, the highest cost. Another reading only ever adds requirements, so a spelling
    /// the upstream reads as a protected path (`/projects;x`, `/PROJECTS`, `/projects.json`, `post`,
    /// an override header) cannot get a weaker rule than that path's.
    pub fn rule_for_any(&self, methods: &[Method], path: &NormalizedPath) -> RouteRule {
        let mut combined: Option<RouteRule> = None;
        let readings = READINGS.iter().enumerate().flat_map(|(r, reading)| {
            let read = reading.of(path.as_str());
            let bare = without_extension(&read).map(|bare| (r, bare.to_owned(), true));
            [Some((r, read, false)), bare].into_iter().flatten()
        });
        for (r, read, bare) in readings {
            for (m, method) in methods.iter().enumerate() {
                let found = self
                    .config
                    .routes
                    .iter()
                    .zip(self.readings.iter())
                    .filter(|(route, _)| route.methods.is_empty() || route.methods.contains(method))
                    .filter(|(_, prefixes)| prefix_matches(&prefixes[r], &read))
                    .max_by_key(|(route, prefixes)| (prefixes[r].len(), !route.methods.is_empty()))
                    .map(|(route, _)| &route.rule);
                let rule = match found {
                    Some(rule) => rule,
                    None if r == 0 && m == 0 && !bare => &self.config.unmatched,
                    None => continue,
                };
                combined = Some(match combined {
                    None => rule.clone(),
                    Some(mut all) => {
                        all.public &= rule.public;
                        for scope in &rule.scopes {
                            if !all.scopes.contains(scope) {
                                all.scopes.push(scope.clone());
                            }
                        }
                        all.cost = all.cost.max(rule.cost);
                        all
                    }
                });
            }
        }
        combined.unwrap_or_else(|| self.config.unmatched.clone())
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty() || path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
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

/// A header name as CGI, WSGI and Rack read it: `X_Keyward_Owner_Id` and `x-keyward-owner-id` are one.
fn cgi_name(name: &HeaderName) -> String {
    name.as_str().replace('_', "-")
}

/// What the upstream must never get from the client: identity headers in any spelling, and the key
/// in any header or scheme.
fn is_reserved_for_keyward(name: &HeaderName) -> bool {
    let name = cgi_name(name);
    name == "x-keyward" || name.starts_with("x-keyward-") || name == "x-api-key" || name == "authorization"
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

fn identity_headers(headers: &mut HeaderMap, key: &KeyRecord) {
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    set("x-keyward-key-id", key.id.to_string());
    set("x-keyward-organization-id", key.organization_id.to_string());
    set("x-keyward-environment", key.environment.to_string());
    set("x-keyward-scopes", key.scopes.to_strings().join(" "));
    if let Some(owner) = &key.owner_id {
        set("x-keyward-owner-id", owner.to_string());
    }
}

/// The request's path in canonical form, set as its URI with the query string untouched.
fn normalize_uri(uri: &mut Uri) -> Result<NormalizedPath, PathError> {
    let path = NormalizedPath::parse(uri.path())?;
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    *uri = path_and_query.parse().map_err(|_| PathError::ForbiddenCharacter)?;
    Ok(path)
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
    // SECURITY: one canonical path, for route matching and for the upstream alike.
    let path = match normalize_uri(&mut parts.uri) {
        Ok(path) => path,
        Err(e) => return ApiError::new(ErrorCode::InvalidPath, e.to_string()).into_response(),
    };
    tracing::Span::current().record("path", tracing::field::display(loggable_path(&path)));
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip());
    let client_ip = crate::client_ip::client_ip(peer, &parts.headers, &state.trusted_proxies);
    // SECURITY: the method the rule is chosen for is the method the upstream gets.
    parts.method = canonical_method(&parts.method);
    let rule = gateway.rule_for_any(&methods_of(&parts.method, &parts.headers), &path);
    // Read before the client headers go: Keyward is the recipient of a key or a user agent the client
    // names in `Connection`, the upstream is not.
    let presented = crate::auth::presented_key(&parts.headers).map(str::to_owned);
    let user_agent = parts.headers.get(USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    strip_client_headers(&mut parts.headers);

    if !rule.public {
        let presented = match presented {
            Ok(presented) => presented,
            Err(missing) => {
                crate::auth::auth_failed(crate::auth::AuthFailure {
                    reason: "MISSING_CREDENTIALS",
                    presented: "",
                    key_id: None,
                    ip: client_ip,
                    user_agent: &user_agent,
                    via: crate::telemetry::Via::Gateway,
                });
                return missing.into_response();
            }
        };
        let check = Check {
            presented: &presented,
            client_ip,
            required_scopes: &rule.scopes,
            organization: None,
            user_agent: &user_agent,
            via: crate::telemetry::Via::Gateway,
            cost: rule.cost,
            failures: crate::limits::FailureScope::Edge,
        };
        let (verdict, event) = match verifier::verify_deferred(&state, check).await {
            Ok(v) => v,
            Err(e) => return ApiError::from(e).into_response(),
        };
        let now = state.clock.now();
        match (&verdict.key, verdict.refusal(now)) {
            // SECURITY: inserted last; the key and every client `x-keyward-*` header are already gone.
            (Some(key), None) => identity_headers(&mut parts.headers, key),
            (_, refusal) => {
                let response =
                    refusal.unwrap_or_else(|| ApiError::internal("a valid key without a record")).into_response();
                record_usage(&state, event, (&parts.method, path.as_str()), &response, None);
                return response;
            }
        }
        let limit_headers = verdict.headers(now);
        // The path only: a query string may carry anything, a secret included.
        let request_line = (parts.method.clone(), path.to_string());
        let started = std::time::Instant::now();
        let mut response = forward(&gateway, parts, body, client_ip).await;
        let upstream_ms = started.elapsed().as_millis();
        response.headers_mut().extend(limit_headers);
        let upstream_ms = Some(i64::try_from(upstream_ms).unwrap_or(i64::MAX));
        record_usage(&state, event, (&request_line.0, &request_line.1), &response, upstream_ms);
        return response;
    }

    forward(&gateway, parts, body, client_ip).await
}

/// Records a gateway request's usage event (from [`verifier::verify_deferred`]) with the status the
/// client got and the upstream's latency (`None` when Keyward refused the request itself).
fn record_usage(
    state: &AppState,
    event: Option<keyward_store::usage::UsageEvent>,
    (method, path): (&axum::http::Method, &str),
    response: &Response,
    upstream_ms: Option<i64>,
) {
    if let Some(mut event) = event {
        event.method = Some(method.as_str().to_owned());
        event.endpoint = Some(verifier::truncated(path, keyward_store::usage::MAX_ENDPOINT_LEN).to_owned());
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
    let upstream = &gateway.config.upstream;
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

    match tokio::time::timeout(gateway.config.timeout, gateway.client.request(request)).await {
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

    fn route(prefix: &str, methods: &[Method], scope: &str) -> GatewayRoute {
        GatewayRoute {
            prefix: prefix.into(),
            methods: methods.to_vec(),
            rule: RouteRule { scopes: vec![Scope::parse(scope).unwrap()], ..Default::default() },
        }
    }

    fn public(prefix: &str) -> GatewayRoute {
        GatewayRoute { prefix: prefix.into(), methods: vec![], rule: RouteRule { public: true, ..Default::default() } }
    }

    fn gateway(routes: Vec<GatewayRoute>, unmatched: RouteRule) -> Result<Gateway, InvalidRoutePrefix> {
        Gateway::new(GatewayConfig {
            upstream: "http://127.0.0.1:1".parse().unwrap(),
            timeout: Duration::from_secs(1),
            routes,
            unmatched,
        })
    }

    fn path(p: &str) -> NormalizedPath {
        NormalizedPath::parse(p).unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_methods_narrow() {
        let gw = gateway(
            vec![
                route("/v1", &[], "read:v1"),
                route("/v1/projects", &[], "read:projects"),
                route("/v1/projects", &[Method::POST], "write:projects"),
                public("/health"),
            ],
            RouteRule::default(),
        )
        .unwrap();
        let scope = |m: Method, p: &str| gw.rule_for(&m, &path(p)).scopes.first().map(|s| s.to_string());
        assert_eq!(scope(Method::GET, "/v1/projects/7").as_deref(), Some("read:projects"));
        assert_eq!(scope(Method::POST, "/v1/projects").as_deref(), Some("write:projects"));
        assert_eq!(scope(Method::GET, "/v1/users").as_deref(), Some("read:v1"));
        assert_eq!(scope(Method::GET, "/v1projects").as_deref(), None, "prefixes match whole segments");
        assert_eq!(scope(Method::GET, "/other").as_deref(), None);
        assert!(gw.rule_for(&Method::GET, &path("/health")).public);
        assert!(!gw.rule_for(&Method::GET, &path("/healthz")).public);
    }

    #[test]
    fn config_prefixes_are_normalized_like_paths() {
        let gw = gateway(
            vec![
                route("/v1//projects/", &[], "read:projects"),
                route("/v1/%75sers/./", &[], "read:users"),
                route("/v1/a/../billing", &[], "read:billing"),
            ],
            RouteRule::default(),
        )
        .unwrap();
        let scope = |p: &str| gw.rule_for(&Method::GET, &path(p)).scopes.first().map(|s| s.to_string());
        assert_eq!(scope("/v1/projects").as_deref(), Some("read:projects"));
        assert_eq!(scope("//v1///projects/7").as_deref(), Some("read:projects"));
        assert_eq!(scope("/v1/users/1").as_deref(), Some("read:users"));
        assert_eq!(scope("/v1/billing").as_deref(), Some("read:billing"));
        assert_eq!(scope("/v1/a/billing").as_deref(), None);
        for bad in ["/v1/%2Fprojects", "/../v1", "v1", "/v1/%zz", "/v1/..;/x"] {
            let err = gateway(vec![route(bad, &[], "read:x")], RouteRule::default()).map(|_| ()).unwrap_err();
            assert_eq!(err.prefix, bad);
        }
    }

    #[test]
    fn readings_of_a_path() {
        let table = [
            ("/", ["/", "/", "/", "/"]),
            ("/v1/projects", ["/v1/projects", "/v1/projects", "/v1/projects", "/v1/projects"]),
            ("/V1/Projects;x=1/", ["/V1/Projects;x=1/", "/V1/Projects/", "/v1/projects;x=1/", "/v1/projects/"]),
            ("/;a/b;c/;", ["/;a/b;c/;", "/b", "/;a/b;c/;", "/b"]),
            ("/caf%C3%89/%C5%BF", ["/caf%C3%89/%C5%BF", "/caf%C3%89/%C5%BF", "/caf\u{e9}/s", "/caf\u{e9}/s"]),
            ("/%E2%84%AA", ["/%E2%84%AA", "/%E2%84%AA", "/k", "/k"]),
        ];
        for (path, want) in table {
            let got = READINGS.map(|reading| reading.of(path));
            assert_eq!(got, want, "{path}");
        }
    }

    #[test]
    fn extensions_of_the_last_segment() {
        for (path, want) in [
            ("/v1/projects.json", Some("/v1/projects")),
            ("/v1/projects.tar.gz", Some("/v1/projects")),
            ("/v1/projects.", Some("/v1/projects")),
            ("/v1.0/projects", None),
            ("/v1/projects", None),
            ("/v1/projects.json/", None),
            ("/.well-known", None),
            ("/", None),
        ] {
            assert_eq!(without_extension(path), want, "{path}");
        }
    }

    #[test]
    fn methods_in_any_case_and_overrides() {
        let mut headers = HeaderMap::new();
        headers.insert("x-http-method-override", HeaderValue::from_static(" delete "));
        headers.append("x_method_override", HeaderValue::from_static("patch"));
        headers.append("x-http-method", HeaderValue::from_static("bad method"));
        headers.append("x-http-method", HeaderValue::from_static("PUT , get"));
        let methods = methods_of(&Method::from_bytes(b"post").unwrap(), &headers);
        assert_eq!(methods, [Method::POST, Method::DELETE, Method::PATCH, Method::PUT, Method::GET]);
        assert_eq!(methods_of(&Method::from_bytes(b"Head").unwrap(), &HeaderMap::new()), [Method::HEAD, Method::GET]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2048, ..Default::default() })]

        /// Other readings only add requirements: the combined rule is never weaker than the rule of
        /// the canonical path and method alone, and a reading's own rule is part of it.
        #[test]
        fn readings_never_weaken_a_rule(
            raw in "(/(v1|V1|projects|Projects|PROJECTS|public|x\\.json|projects\\.json|;a|p;b|%50rojects)){0,4}/?",
            method in proptest::sample::select(vec!["GET", "get", "POST", "post", "HEAD", "DELETE"]),
            over in proptest::option::of(proptest::sample::select(vec!["POST", "delete", "GET, POST"])),
        ) {
            let gw = gateway(
                vec![
                    route("/v1", &[], "read:v1"),
                    route("/v1/projects", &[], "read:projects"),
                    route("/v1/projects", &[Method::POST], "write:projects"),
                    route("/v1/projects", &[Method::DELETE], "delete:projects"),
                    route("/projects", &[Method::GET], "read:p"),
                    public("/public"),
                ],
                RouteRule { public: true, ..Default::default() },
            ).unwrap();
            let Ok(path) = NormalizedPath::parse(&raw) else { return Ok(()) };
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let mut headers = HeaderMap::new();
            if let Some(over) = over {
                headers.insert("x-http-method-override", HeaderValue::from_static(over));
            }
            let methods = methods_of(&method, &headers);
            let all = gw.rule_for_any(&methods, &path);
            for m in &methods {
                let alone = gw.rule_for(m, &path);
                proptest::prop_assert!(!all.public || alone.public || *m != methods[0], "{raw} {m}");
                proptest::prop_assert!(alone.scopes.iter().all(|s| all.scopes.contains(s)), "{raw} {m}");
                proptest::prop_assert!(all.cost >= alone.cost);
            }
        }
    }

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
