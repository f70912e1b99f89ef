//! The route table: what each path of the protected API needs (public, scopes, cost), read from
//! `[[gateway.routes]]` and shared by every mode that judges a request to that API (the gateway, the
//! proxy hooks of [`crate::authz`]). Routes match the canonical path ([`NormalizedPath`]) and, so that
//! no spelling an upstream reads as a protected path gets a weaker rule, every [`Reading`] of it.
//!
//! This module imports nothing of the crate: the gateway and `authz` both read it.

use std::borrow::Cow;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, Method};
use keyward_core::{NormalizedPath, PathError, Scope};

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
    /// like request paths by [`Routes::new`], so `/v1//projects` is `/v1/projects`.
    pub prefix: String,
    /// Empty: every method.
    pub methods: Vec<Method>,
    pub rule: RouteRule,
}

/// The routes and the rule of paths no route matches, each route's prefix in canonical form and in
/// every [`Reading`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Routes(Arc<Table>);

#[derive(Debug)]
struct Table {
    routes: Vec<GatewayRoute>,
    /// Each route's prefix in every [`Reading`], in the order of `routes`.
    readings: Vec<[String; READINGS.len()]>,
    /// Per [`Reading`]: whether it reads every prefix as the canonical reading does.
    plain: [bool; READINGS.len()],
    unmatched: RouteRule,
}

impl Default for Routes {
    /// No routes: every path needs a valid key and no scope.
    fn default() -> Self {
        Self(Arc::new(Table {
            routes: Vec::new(),
            readings: Vec::new(),
            plain: [true; READINGS.len()],
            unmatched: RouteRule::default(),
        }))
    }
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
    /// runs of slashes do. A borrow when this reading sees a canonical path as it is: no `;` to drop,
    /// and no upper case or escape to fold (most paths, in every reading).
    fn of(self, path: &str) -> Cow<'_, str> {
        let bytes = path.as_bytes();
        let unchanged = (!self.without_parameters || !bytes.contains(&b';'))
            && (!self.case_folded || bytes.iter().all(|b| b.is_ascii() && !b.is_ascii_uppercase() && *b != b'%'));
        // A canonical path has no empty segment but a trailing one, which `of_segments` keeps.
        if unchanged && bytes.first() == Some(&b'/') && !bytes.windows(2).any(|pair| pair == b"//") {
            return Cow::Borrowed(path);
        }
        Cow::Owned(self.of_segments(path))
    }

    /// [`Reading::of`], segment by segment.
    fn of_segments(self, path: &str) -> String {
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
    // A canonical path decodes to UTF-8; anything else keeps its escapes and folds ASCII only.
    match String::from_utf8(percent_decoded(segment, false)) {
        Ok(text) => text.to_uppercase().to_lowercase(),
        Err(_) => segment.to_ascii_lowercase(),
    }
}

/// `text` with its valid `%XX` escapes decoded, and `+` read as a space when `plus_is_space` (a query).
fn percent_decoded(text: &str, plus_is_space: bool) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                decoded.push(b);
                i += 3;
            }
            (None, b'+') if plus_is_space => {
                decoded.push(b' ');
                i += 1;
            }
            (None, b) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    decoded
}

/// The query parameter Symfony and Laravel (on a POST, query or form body) and Express's
/// `method-override('_method')` (the query) run a request as.
const METHOD_PARAMETER: &[u8] = b"_method";

/// The methods a query's `_method` parameters name, in any spelling PHP reads as that name (it
/// turns ` `, `.` and `[` in a parameter's name into `_`), decoded and upper-cased.
pub fn methods_in_query(query: &str) -> impl Iterator<Item = Method> + '_ {
    query.split('&').filter_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        // Decoding only shortens a name: one shorter than `_method` is never it.
        if name.len() < METHOD_PARAMETER.len() {
            return None;
        }
        let name: Vec<u8> = percent_decoded(name, true)
            .into_iter()
            .map(|b| if matches!(b, b' ' | b'.' | b'[') { b'_' } else { b })
            .collect();
        if name != METHOD_PARAMETER {
            return None;
        }
        Method::from_bytes(&percent_decoded(value, true).trim_ascii().to_ascii_uppercase()).ok()
    })
}

/// The request headers that make Express (`method-override`), Rack, Laravel and ASP.NET Core run a
/// request as another method, as CGI names them (`_` read as `-`).
const METHOD_OVERRIDES: [&str; 3] = ["x-http-method-override", "x-http-method", "x-method-override"];

/// The methods a request may run as upstream: its own, upper-cased (Django and Werkzeug upper-case
/// it before routing), `GET` for `HEAD` (Flask, Express, Rails and Go's `ServeMux` run the `GET`
/// handler), and every method an override header names.
pub fn methods_of(method: &Method, headers: &HeaderMap) -> Vec<Method> {
    let mut methods = vec![canonical_method(method)];
    if methods[0] == Method::HEAD {
        methods.push(Method::GET);
    }
    // Node.js joins repeated headers with `,` and Express's `method-override` takes the first item:
    // every item of every value counts.
    let named = headers
        .iter()
        .filter(|(name, _)| METHOD_OVERRIDES.iter().any(|o| same_cgi_name(o.as_bytes(), name.as_str().as_bytes())))
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
pub fn canonical_method(method: &Method) -> Method {
    if !method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return method.clone();
    }
    Method::from_bytes(method.as_str().to_ascii_uppercase().as_bytes()).unwrap_or_else(|_| method.clone())
}

/// A configured route prefix that has no canonical form; refused at start-up.
#[derive(Debug, thiserror::Error)]
#[error("gateway route prefix `{prefix}`: {source}")]
pub struct InvalidRoutePrefix {
    pub prefix: String,
    pub source: PathError,
}
impl Routes {
    /// Refuses a route prefix that cannot be normalized: a prefix that matched nothing would hand its
    /// paths to a shorter, possibly weaker, route.
    pub fn new(mut routes: Vec<GatewayRoute>, unmatched: RouteRule) -> Result<Self, InvalidRoutePrefix> {
        for route in &mut routes {
            // SECURITY: prefixes and request paths are compared in the same canonical form.
            route.prefix = NormalizedPath::parse(&route.prefix)
                .map_err(|source| InvalidRoutePrefix { prefix: route.prefix.clone(), source })?
                .to_string();
        }
        let readings: Vec<[String; READINGS.len()]> =
            routes.iter().map(|r| READINGS.map(|reading| reading.of(&r.prefix).into_owned())).collect();
        let plain = std::array::from_fn(|r| readings.iter().all(|prefixes| prefixes[r] == prefixes[0]));
        Ok(Self(Arc::new(Table { routes, readings, plain, unmatched })))
    }

    /// The routes, prefixes in canonical form.
    pub fn routes(&self) -> &[GatewayRoute] {
        &self.0.routes
    }

    /// The rule of paths no route matches.
    pub fn unmatched(&self) -> &RouteRule {
        &self.0.unmatched
    }

    /// The longest matching prefix wins; among equal prefixes, one that names the method.
    pub fn rule_for(&self, method: &Method, path: &NormalizedPath) -> RouteRule {
        self.rule_for_any(std::slice::from_ref(method), path).into_owned()
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
    ///
    /// A borrow of the table's rule when one rule is all there is to combine (the usual case).
    pub fn rule_for_any(&self, methods: &[Method], path: &NormalizedPath) -> Cow<'_, RouteRule> {
        self.combined_rule(methods, path, true)
    }

    /// [`Routes::rule_for_any`]. With `skip_repeats`, a reading that reads the path and every prefix
    /// as the canonical reading does is not walked again: it would find the rules that reading found,
    /// and combining a rule twice adds nothing (the proptest `skipped_readings_change_nothing`).
    fn combined_rule(&self, methods: &[Method], path: &NormalizedPath, skip_repeats: bool) -> Cow<'_, RouteRule> {
        let mut combined: Option<Cow<'_, RouteRule>> = None;
        let reads = READINGS.map(|reading| reading.of(path.as_str()));
        let repeats = |r: usize, read: &str| skip_repeats && r > 0 && self.0.plain[r] && read == reads[0];
        let readings = reads.iter().enumerate().filter(|(r, read)| !repeats(*r, read)).flat_map(|(r, read)| {
            let bare = without_extension(read).map(|bare| (r, bare, true));
            [Some((r, &**read, false)), bare].into_iter().flatten()
        });
        for (r, read, bare) in readings {
            for (m, method) in methods.iter().enumerate() {
                let found = self
                    .0
                    .routes
                    .iter()
                    .zip(self.0.readings.iter())
                    .filter(|(route, _)| route.methods.is_empty() || route.methods.contains(method))
                    .filter(|(_, prefixes)| prefix_matches(&prefixes[r], read))
                    .max_by_key(|(route, prefixes)| (prefixes[r].len(), !route.methods.is_empty()))
                    .map(|(route, _)| &route.rule);
                let rule = match found {
                    Some(rule) => rule,
                    None if r == 0 && m == 0 && !bare => &self.0.unmatched,
                    None => continue,
                };
                combined = Some(match combined {
                    None => Cow::Borrowed(rule),
                    // The same rule again (another reading or method reaching the same route) adds nothing.
                    Some(all) if std::ptr::eq(&*all, rule) => all,
                    Some(all) => {
                        let mut all = all.into_owned();
                        all.public &= rule.public;
                        for scope in &rule.scopes {
                            if !all.scopes.contains(scope) {
                                all.scopes.push(scope.clone());
                            }
                        }
                        all.cost = all.cost.max(rule.cost);
                        Cow::Owned(all)
                    }
                });
            }
        }
        combined.unwrap_or(Cow::Borrowed(&self.0.unmatched))
    }
}
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty() || path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}
/// A header name as CGI, WSGI and Rack read it: `X_Keyward_Owner_Id` and `x-keyward-owner-id` are one.
pub fn cgi_name(name: &HeaderName) -> String {
    name.as_str().replace('_', "-")
}

/// Whether CGI, WSGI and Rack read two header names as one (`_` is `-`; names are lower case).
pub fn same_cgi_name(a: &[u8], b: &[u8]) -> bool {
    let unify = |c: &u8| if *c == b'_' { b'-' } else { *c };
    a.len() == b.len() && a.iter().map(unify).eq(b.iter().map(unify))
}

/// `x-keyward` or `x-keyward-*` in any spelling CGI reads alike: a name the upstream takes for
/// Keyward's identity.
pub fn is_keyward_header(name: &HeaderName) -> bool {
    const PREFIX: &[u8] = b"x-keyward";
    let name = name.as_str().as_bytes();
    name.get(..PREFIX.len()).is_some_and(|head| same_cgi_name(head, PREFIX))
        && matches!(name.get(PREFIX.len()), None | Some(b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

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

    fn gateway(routes: Vec<GatewayRoute>, unmatched: RouteRule) -> Result<Routes, InvalidRoutePrefix> {
        Routes::new(routes, unmatched)
    }

    fn path(p: &str) -> NormalizedPath {
        NormalizedPath::parse(p).unwrap()
    }

    /// Asserts, for each `(method, path, scope)`, that the rule `routes` give `method path` asks for
    /// `scope` first (`None`: no scope at all).
    fn assert_first_scopes(routes: Vec<GatewayRoute>, table: &[(Method, &str, Option<&str>)]) {
        let gw = gateway(routes, RouteRule::default()).unwrap();
        for (method, p, want) in table {
            let first = gw.rule_for(method, &path(p)).scopes.first().map(ToString::to_string);
            assert_eq!(first.as_deref(), *want, "{method} {p}");
        }
    }

    #[test]
    fn longest_prefix_wins_and_methods_narrow() {
        let routes = vec![
            route("/v1", &[], "read:v1"),
            route("/v1/projects", &[], "read:projects"),
            route("/v1/projects", &[Method::POST], "write:projects"),
            public("/health"),
        ];
        assert_first_scopes(
            routes.clone(),
            &[
                (Method::GET, "/v1/projects/7", Some("read:projects")),
                (Method::POST, "/v1/projects", Some("write:projects")),
                (Method::GET, "/v1/users", Some("read:v1")),
                // Prefixes match whole segments.
                (Method::GET, "/v1projects", None),
                (Method::GET, "/other", None),
            ],
        );
        let gw = gateway(routes, RouteRule::default()).unwrap();
        assert!(gw.rule_for(&Method::GET, &path("/health")).public);
        assert!(!gw.rule_for(&Method::GET, &path("/healthz")).public);
    }

    #[test]
    fn config_prefixes_are_normalized_like_paths() {
        let routes = vec![
            route("/v1//projects/", &[], "read:projects"),
            route("/v1/%75sers/./", &[], "read:users"),
            route("/v1/a/../billing", &[], "read:billing"),
        ];
        assert_first_scopes(
            routes,
            &[
                (Method::GET, "/v1/projects", Some("read:projects")),
                (Method::GET, "//v1///projects/7", Some("read:projects")),
                (Method::GET, "/v1/users/1", Some("read:users")),
                (Method::GET, "/v1/billing", Some("read:billing")),
                (Method::GET, "/v1/a/billing", None),
            ],
        );
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

        /// Skipping the readings that repeat the canonical one gives the rule walking every reading
        /// gives, with prefixes that every reading reads alike and prefixes that some read otherwise.
        #[test]
        fn skipped_readings_change_nothing(
            raw in "(/(v1|V1|projects|Projects|public|x\\.json|projects\\.json|;a|p;b|%50rojects)){0,4}/?",
            prefixes in proptest::collection::vec(
                "(/(v1|V1|projects|Projects|public|p;b|x\\.json)){1,2}/?", 0..4),
            method in proptest::sample::select(vec!["GET", "POST", "HEAD", "DELETE"]),
            over in proptest::option::of(proptest::sample::select(vec!["POST", "delete"])),
        ) {
            let scopes = ["read:a", "write:b", "read:c", "admin:d"];
            let routes = prefixes
                .iter()
                .enumerate()
                .map(|(i, prefix)| match i {
                    3 => public(prefix),
                    1 => route(prefix, &[Method::POST], scopes[i]),
                    _ => route(prefix, &[], scopes[i]),
                })
                .collect();
            let Ok(gw) = gateway(routes, RouteRule { cost: 2, ..Default::default() }) else { return Ok(()) };
            let Ok(path) = NormalizedPath::parse(&raw) else { return Ok(()) };
            let mut headers = HeaderMap::new();
            if let Some(over) = over {
                headers.insert("x-http-method-override", HeaderValue::from_static(over));
            }
            let methods = methods_of(&Method::from_bytes(method.as_bytes()).unwrap(), &headers);
            let fast = gw.combined_rule(&methods, &path, true);
            let every = gw.combined_rule(&methods, &path, false);
            proptest::prop_assert_eq!(&*fast, &*every, "{} {:?}", raw, prefixes);
        }
    }
}
