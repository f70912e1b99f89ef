//! Property-based fuzzing through the router, in process: arbitrary and near-valid bodies, import
//! files, query strings, credentials and `X-Forwarded-For` values. Whatever comes in, the answer is
//! never a 5xx, every 4xx is `{"error": {"code", "message"}}` with a code from the one table and that
//! code's status, and no error (nor a verify or import answer) repeats a key.
//!
//! Each property runs from a fixed seed, so CI never fails on a case no one can replay;
//! `KEYWARD_FUZZ_SEED=<u64>` explores another part of the input space and `KEYWARD_FUZZ_SCALE=<n>`
//! runs n times as many cases. Counts are chosen so each property takes a few seconds in a debug build.

use std::fmt::Debug;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderValue, Method, Request};
use ipnet::IpNet;
use keyward_server::ErrorCode;
use keyward_server::client_ip::client_ip;
use keyward_server::settings::Protection;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::{Map, Value};

use crate::helpers::{Response, TestApp};

// ---------------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------------

// The seeded runner keyward-core's fuzz suite uses.
#[path = "../../../keyward-core/tests/support/seeded.rs"]
mod seeded;

/// Each case is a request: shrinking is bounded so a failure is reported in seconds, not minutes.
fn runner(cases: u32) -> TestRunner {
    seeded::runner(cases, 512, 20_000)
}

/// An app on a fresh SQLite database, with a runtime of its own that the (synchronous) property drives.
/// Keyward's self-protection limits are lifted: thousands of requests from one address would otherwise
/// be answered 429 and hide everything behind it.
struct Fuzz {
    app: TestApp,
    /// A `read:x` key of the default organization, the target of PATCH, verify, usage and imports.
    key: String,
    key_id: String,
    // Dropped after `app`, whose pools close inside it.
    _enter: tokio::runtime::EnterGuard<'static>,
}

fn setup() -> Fuzz {
    // Leaked: one small runtime per property test, alive until the test process ends.
    let rt: &'static tokio::runtime::Runtime = Box::leak(Box::new(
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap(),
    ));
    let enter = rt.enter();
    let mut app = rt.block_on(TestApp::sqlite());
    app.reconfigure(|b| {
        b.protection(Protection {
            management_per_minute: 1_000_000,
            failed_auth_per_minute: 1_000_000,
            key_creation_per_minute: 1_000_000,
        })
    });
    let (key, record) = rt.block_on(app.key(app.default_org.id, &["read:x"]));
    Fuzz { app, key, key_id: record.id.to_string(), _enter: enter }
}

impl Fuzz {
    fn block_on<F: Future>(&self, f: F) -> F::Output {
        tokio::runtime::Handle::current().block_on(f)
    }

    /// Runs `property` on `cases` values, sending what it builds through the router.
    fn run<S: Strategy>(&self, cases: u32, strategy: S, property: impl Fn(&Self, S::Value) -> Result<(), TestCaseError>)
    where
        S::Value: Debug,
    {
        if let Err(e) = runner(cases).run(&strategy, |value| property(self, value)) {
            panic!("{e}");
        }
    }

    fn send(&self, request: Request<Body>) -> Response {
        self.block_on(self.app.send(request))
    }

    /// Keys that must never come back in an error.
    fn secrets(&self) -> [&str; 2] {
        [&self.app.admin_key, &self.key]
    }
}

/// A request from 203.0.113.7, or `None` when the URI or a header cannot be built (those never reach
/// a server).
fn build(method: Method, uri: &str, headers: &[(&str, &[u8])], body: Vec<u8>) -> Option<Request<Body>> {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, HeaderValue::from_bytes(value).ok()?);
    }
    let mut req = builder.body(Body::from(body)).ok()?;
    req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([203, 0, 113, 7], 40000))));
    Some(req)
}

/// The contract every answer keeps.
fn well_formed(r: &Response, secrets: &[&str], answer_may_hold_data: bool) -> Result<(), TestCaseError> {
    prop_assert!(!r.status.is_server_error(), "{} {}", r.status, r.text);
    if r.status.is_client_error() {
        let body = r.body.as_object();
        prop_assert!(body.is_some_and(|b| b.len() == 1 && b.contains_key("error")), "{} {}", r.status, r.text);
        let error = r.body["error"].as_object();
        prop_assert!(
            error.is_some_and(|e| e.keys().all(|k| ["code", "message", "field"].contains(&k.as_str()))),
            "{}",
            r.text
        );
        let code = r.body["error"]["code"].as_str().unwrap_or_default();
        let entry = ErrorCode::ALL.iter().find(|c| c.as_str() == code);
        prop_assert!(entry.is_some(), "code {code:?} is not in the table: {}", r.text);
        prop_assert_eq!(entry.map(|c| c.status()), Some(r.status), "{}", r.text);
        prop_assert!(r.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", r.text);
        let field = &r.body["error"]["field"];
        prop_assert!(field.is_null() || field.is_string(), "{}", r.text);
    } else {
        prop_assert!(r.status.is_success(), "{} {}", r.status, r.text);
    }
    if r.status.is_client_error() || !answer_may_hold_data {
        for secret in secrets {
            // SECURITY: not even part of a key's secret, in any case: a key cut short by a message's
            // length limit, or lowercased, is still most of a key (and its checksum is public).
            let body = secret.splitn(3, '_').nth(2).unwrap_or(secret).to_ascii_lowercase();
            let text = r.text.to_ascii_lowercase();
            for start in 0..body.len().saturating_sub(16) {
                let part = &body[start..start + 16];
                prop_assert!(!text.contains(part), "part of a key came back: {} {}", r.status, r.text);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------------

/// Strings a validator has to think about: empty, long, control and multi-byte characters, near-valid
/// scopes, addresses, dates, ids and plans, and the target key itself (`{key}`, `{key_id}` are filled in).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => ".{0,24}",
        2 => "[ -~]{0,40}",
        1 => any::<String>(),
        1 => (1usize..400).prop_map(|n| "x".repeat(n)),
        1 => (120usize..140).prop_map(|n| "é".repeat(n)),
        1 => proptest::sample::select(vec![
            "", " ", "\u{0}", "\u{7f}", "\t\n", "\u{202e}", "\u{feff}", "null", "true", "[]", "{}",
            "read:x", "read:*", "*", "keyward:admin", "keyward:verify", "keyward:*", "bad scope", "a::b",
            "10.0.0.0/8", "::1", "::ffff:10.0.0.1", "203.0.113.7", "1.2.3.4/33", "10.0.0.256", "fe80::1%eth0",
            "2026-06-01T12:00:00Z", "2020-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "+275760-09-13T00:00:00Z",
            "2026-13-01T00:00:00Z", "2026-06-01", "1970-01-01T00:00:00+14:00", "2026-06",
            "00000000-0000-0000-0000-000000000000", "018f0000-0000-7000-8000-000000000000", "not-a-uuid",
            "free", "pro", "enterprise", "platinum", "live", "test", "LIVE", "sk", "SK", "a_b",
            "GET", "get", "PATCH", "/v1/x", "-1", "0", "18446744073709551616", "1e400", "NaN",
            "{key}", "{key_id}", "{key}x", "sk_live_", "true", "false", "yes", "1",
        ])
        .prop_map(str::to_owned),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        proptest::sample::select(vec![
            Value::from(0),
            Value::from(-1),
            Value::from(1),
            Value::from(99),
            Value::from(100),
            Value::from(599),
            Value::from(600),
            Value::from(365),
            Value::from(366),
            Value::from(3_600_001),
            Value::from(u32::MAX),
            Value::from(u64::from(u32::MAX) + 1),
            Value::from(i64::MAX),
            Value::from(u64::MAX),
            Value::from(i64::MIN),
            Value::from(1.5),
            Value::from(-0.0),
            Value::from(1e300),
        ]),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        2 => number(),
        4 => text().prop_map(Value::from),
    ]
}

/// What a field holds when it is right; a generated value is of that kind most of the time, so most
/// bodies get past deserialization and into validation, where the interesting code is.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Key,
    Id,
    Hex,
    Scopes,
    Ips,
    Ip,
    Date,
    Int,
    Bool,
    Object,
    OneOf(&'static [&'static str]),
    /// `null` clears, in a PATCH.
    Nullable(&'static Kind),
}

/// A field, its kind, and how often it is present.
type Field = (&'static str, Kind, f64);

fn scope_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "(read|write|admin):[a-z*]{1,6}",
        1 => proptest::sample::select(vec!["*", "keyward:admin", "keyward:keys:write", "keyward:verify", "keyward:self"])
            .prop_map(str::to_owned),
        1 => text(),
    ]
}

fn ip_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<[u8; 4]>().prop_map(|a| IpAddr::from(a).to_string()),
        2 => (any::<[u8; 4]>(), 0u8..40).prop_map(|(a, p)| format!("{}/{p}", IpAddr::from(a))),
        1 => (any::<[u8; 16]>(), 0u8..140).prop_map(|(a, p)| format!("{}/{p}", IpAddr::from(a))),
        1 => text(),
    ]
}

fn date_text() -> impl Strategy<Value = String> {
    // Around the test clock (2026-06-01T12:00:00Z), and far away.
    let t0 = crate::helpers::t0().timestamp();
    prop_oneof![
        3 => (-400i64 * 86_400..400 * 86_400).prop_map(move |d| chrono::DateTime::from_timestamp(t0 + d, 0)
            .map(|t| t.to_rfc3339()).unwrap_or_default()),
        1 => text(),
    ]
}

fn typed(kind: Kind) -> BoxedStrategy<Value> {
    match kind {
        Kind::Text => text().prop_map(Value::from).boxed(),
        Kind::Key => prop_oneof![
            2 => Just("{key}".to_owned()),
            1 => Just("{key}x".to_owned()),
            2 => "[!-~]{14,20}",
            2 => text(),
        ]
        .prop_map(Value::from)
        .boxed(),
        Kind::Id => prop_oneof![3 => Just("{key_id}".to_owned()), 1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()), 1 => text()]
            .prop_map(Value::from)
            .boxed(),
        Kind::Hex => prop_oneof!["[0-9a-fA-F]{62,66}", text()].prop_map(Value::from).boxed(),
        Kind::Scopes => prop_oneof![
            4 => vec(scope_text(), 0..4).prop_map(Value::from),
            1 => vec(scope_text(), 0..4).prop_map(|v| Value::from(v.join(" "))),
        ]
        .boxed(),
        Kind::Ips => vec(ip_text(), 0..4).prop_map(Value::from).boxed(),
        Kind::Ip => ip_text().prop_map(Value::from).boxed(),
        Kind::Date => date_text().prop_map(Value::from).boxed(),
        Kind::Int => prop_oneof![3 => (0u64..1_000).prop_map(Value::from), 1 => number()].boxed(),
        Kind::Bool => any::<bool>().prop_map(Value::from).boxed(),
        Kind::Object => vec(("[a-z]{1,6}", leaf()), 0..4)
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>()))
            .boxed(),
        Kind::OneOf(words) => prop_oneof![3 => proptest::sample::select(words).prop_map(str::to_owned), 1 => text()]
            .prop_map(Value::from)
            .boxed(),
        Kind::Nullable(inner) => prop_oneof![3 => typed(*inner), 1 => Just(Value::Null)].boxed(),
    }
}

fn names(fields: &'static [Field]) -> Vec<&'static str> {
    fields.iter().map(|f| f.0).collect()
}

fn json(fields: &'static [Field]) -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec((field_name(names(fields)), inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn field_name(names: Vec<&'static str>) -> impl Strategy<Value = String> {
    prop_oneof![
        16 => proptest::sample::select(names).prop_map(str::to_owned),
        2 => "[a-z_]{1,10}",
        2 => ".{0,8}",
        1 => Just("my {key}".to_owned()),
    ]
}

/// An object with each field present at its rate, holding a value of its kind nine times in ten and
/// of any type otherwise; now and then a field that does not exist.
fn shaped(fields: &'static [Field]) -> impl Strategy<Value = Value> {
    let present: Vec<BoxedStrategy<Option<(String, Value)>>> = fields
        .iter()
        .map(|&(name, kind, rate)| {
            prop::option::weighted(rate, prop_oneof![9 => typed(kind), 1 => leaf()])
                .prop_map(move |v| v.map(|v| (name.to_owned(), v)))
                .boxed()
        })
        .collect();
    let unknown = prop::option::weighted(0.05, ("[a-z_]{1,10}", leaf()));
    (present, unknown).prop_map(|(present, unknown)| {
        Value::Object(present.into_iter().flatten().chain(unknown).collect::<Map<_, _>>())
    })
}

/// A body: a near-valid object, any JSON, or text that is JSON only sometimes.
fn body(fields: &'static [Field]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => shaped(fields).prop_map(|v| v.to_string().into_bytes()),
        1 => json(fields).prop_map(|v| v.to_string().into_bytes()),
        1 => vec(any::<u8>(), 0..64),
        1 => "[\\[\\]{}\":,0-9a-z. eE+-]{0,48}".prop_map(String::into_bytes),
        // Literals serde_json's Value cannot hold, in a real field.
        1 => (proptest::sample::select(names(fields)), proptest::sample::select(vec![
            "1e400", "-1e400", "18446744073709551616", "-9223372036854775809", "1.0", "-0", "0.5e1",
            "\"\\ud800\"", "\"\\u0000\"", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        ])).prop_map(|(f, lit)| format!("{{\"{f}\": {lit}}}").into_bytes()),
    ]
}

fn json_content_type() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        12 => Just(Some("application/json")),
        1 => proptest::sample::select(vec![
            None,
            Some("application/json; charset=utf-8"),
            Some("APPLICATION/JSON"),
            Some("application/merge-patch+json"),
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some(""),
            Some(";"),
        ]),
    ]
}

/// Fills in the placeholders for the target key.
fn fill(fuzz: &Fuzz, bytes: Vec<u8>) -> Vec<u8> {
    replace(&replace(&bytes, b"{key_id}", fuzz.key_id.as_bytes()), b"{key}", fuzz.key.as_bytes())
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

fn json_post(fuzz: &Fuzz, method: Method, uri: &str, content_type: Option<&str>, body: Vec<u8>) -> Option<Response> {
    let bearer = format!("Bearer {}", fuzz.app.admin_key);
    let mut headers: Vec<(&str, &[u8])> = vec![("authorization", bearer.as_bytes())];
    if let Some(ct) = content_type {
        headers.push(("content-type", ct.as_bytes()));
    }
    Some(fuzz.send(build(method, uri, &headers, fill(fuzz, body))?))
}

/// Every byte outside RFC 3986's unreserved set, percent-encoded.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------
// JSON bodies
// ---------------------------------------------------------------------------------------------------

const ENVIRONMENTS: &[&str] = &["live", "test"];
const PLANS: &[&str] = &["free", "pro", "enterprise", "platinum"];

const CREATE_FIELDS: &[Field] = &[
    ("name", Kind::Text, 0.95),
    ("description", Kind::Text, 0.2),
    ("owner_id", Kind::Text, 0.3),
    ("environment", Kind::OneOf(ENVIRONMENTS), 0.3),
    ("prefix", Kind::OneOf(&["sk", "pk", "x1"]), 0.2),
    ("scopes", Kind::Scopes, 0.6),
    ("allowed_ips", Kind::Ips, 0.3),
    ("expires_at", Kind::Date, 0.2),
    ("expires_in_days", Kind::Int, 0.2),
    ("metadata", Kind::Object, 0.2),
    ("plan", Kind::OneOf(PLANS), 0.2),
    ("organization_id", Kind::Id, 0.05),
];

#[test]
fn create_key_never_fails_on_the_server() {
    let fuzz = setup();
    fuzz.run(1_500, (body(CREATE_FIELDS), json_content_type()), |fuzz, (body, ct)| {
        let Some(r) = json_post(fuzz, Method::POST, "/v1/keys", ct, body) else { return Ok(()) };
        // A new key's record holds what the fuzzer wrote into it.
        well_formed(&r, &fuzz.secrets(), r.status.is_success())
    });
}

const PATCH_FIELDS: &[Field] = &[
    ("name", Kind::Text, 0.3),
    ("description", Kind::Nullable(&Kind::Text), 0.2),
    ("scopes", Kind::Scopes, 0.3),
    ("allowed_ips", Kind::Ips, 0.3),
    ("expires_at", Kind::Nullable(&Kind::Date), 0.2),
    ("metadata", Kind::Object, 0.2),
    ("plan", Kind::Nullable(&Kind::OneOf(PLANS)), 0.2),
    ("is_active", Kind::Bool, 0.3),
];

#[test]
fn patch_key_never_fails_on_the_server() {
    let fuzz = setup();
    let id = prop_oneof![9 => Just("{key_id}".to_owned()), 1 => text()];
    fuzz.run(1_500, (id, body(PATCH_FIELDS), json_content_type()), |fuzz, (id, body, ct)| {
        let id = if id == "{key_id}" { fuzz.key_id.clone() } else { encode(&id) };
        let Some(r) = json_post(fuzz, Method::PATCH, &format!("/v1/keys/{id}"), ct, body) else { return Ok(()) };
        // A PATCH answers with the key's record, which holds what the fuzzer wrote into it.
        well_formed(&r, &fuzz.secrets(), r.status.is_success())
    });
}

const VERIFY_FIELDS: &[Field] = &[
    ("key", Kind::Key, 0.95),
    ("required_scopes", Kind::Scopes, 0.4),
    ("ip", Kind::Ip, 0.4),
    ("cost", Kind::Int, 0.4),
    ("endpoint", Kind::Text, 0.3),
    ("method", Kind::OneOf(&["GET", "POST", "get"]), 0.3),
];

#[test]
fn verify_never_fails_on_the_server() {
    let fuzz = setup();
    fuzz.run(2_000, (body(VERIFY_FIELDS), json_content_type()), |fuzz, (body, ct)| {
        let Some(r) = json_post(fuzz, Method::POST, "/v1/verify", ct, body) else { return Ok(()) };
        well_formed(&r, &fuzz.secrets(), false)?;
        if r.status.is_success() {
            prop_assert!(r.body["valid"].is_boolean() && r.body["code"].is_string(), "{}", r.text);
        }
        Ok(())
    });
}

const USAGE_FIELDS: &[Field] = &[
    ("id", Kind::Text, 0.95),
    ("key_id", Kind::Id, 0.95),
    ("timestamp", Kind::Date, 0.4),
    ("endpoint", Kind::Text, 0.3),
    ("method", Kind::OneOf(&["GET", "POST"]), 0.3),
    ("status_code", Kind::Int, 0.5),
    ("response_time_ms", Kind::Int, 0.4),
    ("tokens_used", Kind::Int, 0.4),
    ("cost_micros", Kind::Int, 0.4),
    ("ip", Kind::Ip, 0.3),
    ("user_agent", Kind::Text, 0.2),
    ("error_code", Kind::Text, 0.2),
    ("error_message", Kind::Text, 0.2),
];

#[test]
fn usage_reports_never_fail_on_the_server() {
    let fuzz = setup();
    let batch = vec(shaped(USAGE_FIELDS), 0..4)
        .prop_map(|events| serde_json::json!({ "events": events }).to_string().into_bytes());
    let body = prop_oneof![3 => body(USAGE_FIELDS), 1 => batch];
    fuzz.run(1_500, (body, json_content_type()), |fuzz, (body, ct)| {
        let Some(r) = json_post(fuzz, Method::POST, "/v1/usage", ct, body) else { return Ok(()) };
        well_formed(&r, &fuzz.secrets(), false)
    });
}

// ---------------------------------------------------------------------------------------------------
// Import files
// ---------------------------------------------------------------------------------------------------

const IMPORT_COLUMNS: &[Field] = &[
    ("key", Kind::Key, 0.7),
    ("key_sha256", Kind::Hex, 0.3),
    ("name", Kind::Text, 0.4),
    ("owner_id", Kind::Text, 0.3),
    ("environment", Kind::OneOf(ENVIRONMENTS), 0.3),
    ("scopes", Kind::Scopes, 0.4),
    ("allowed_ips", Kind::Ips, 0.3),
    ("expires_at", Kind::Date, 0.3),
    ("created_at", Kind::Date, 0.3),
    ("is_active", Kind::Bool, 0.3),
    ("metadata", Kind::Object, 0.2),
];

fn import_content_type() -> impl Strategy<Value = (Option<&'static str>, Option<&'static str>, bool)> {
    let ct = prop_oneof![
        8 => proptest::sample::select(vec![
            Some("application/x-ndjson"),
            Some("application/jsonl"),
            Some("application/x-jsonlines"),
            Some("application/json"),
            Some("text/csv"),
            Some("application/csv"),
            Some("text/csv; charset=utf-8"),
            Some("TEXT/CSV"),
        ]),
        1 => proptest::sample::select(vec![Some("text/plain"), Some(""), None]),
    ];
    let format = prop_oneof![4 => Just(None), 1 => proptest::sample::select(vec![
        Some("jsonl"), Some("ndjson"), Some("json"), Some("csv"), Some("CSV"), Some("xml"), Some(""),
    ])];
    (ct, format, any::<bool>())
}

fn import_uri(format: Option<&str>, dry_run: bool) -> String {
    let mut uri = format!("/v1/keys/import?dry_run={dry_run}");
    if let Some(f) = format {
        uri.push_str(&format!("&format={}", encode(f)));
    }
    uri
}

fn jsonl_row() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => shaped(IMPORT_COLUMNS).prop_map(|row| row.to_string()),
        1 => json(IMPORT_COLUMNS).prop_map(|v| v.to_string()),
        1 => "[ -~]{0,30}",
        1 => Just(String::new()),
        1 => Just("\r".to_owned()),
    ]
}

fn jsonl_file() -> impl Strategy<Value = Vec<u8>> {
    (vec(jsonl_row(), 0..6), prop_oneof![Just("\n"), Just("\r\n")], vec(any::<u8>(), 0..3)).prop_map(
        |(rows, eol, junk)| {
            let mut file = rows.join(eol).into_bytes();
            file.extend(junk);
            file
        },
    )
}

/// One CSV cell of a column's kind: as it is, quoted, or broken.
fn csv_cell(kind: Kind) -> BoxedStrategy<Vec<u8>> {
    let plain = typed(kind).prop_map(|v| match v {
        Value::String(s) => s,
        Value::Array(items) => {
            items.iter().map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned)).collect::<Vec<_>>().join(" ")
        }
        other => other.to_string(),
    });
    prop_oneof![
        6 => plain.clone().prop_map(String::into_bytes),
        2 => plain.prop_map(|s| format!("\"{}\"", s.replace('"', "\"\"")).into_bytes()),
        1 => "[\",\r\n a-z]{0,8}".prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..6),
    ]
    .boxed()
}

fn csv_file() -> impl Strategy<Value = Vec<u8>> {
    let column = prop_oneof![
        12 => proptest::sample::select(IMPORT_COLUMNS).prop_map(|f| (f.0.to_owned(), f.1)),
        1 => proptest::sample::select(vec![" Key ", "KEY", "\"key\"", "\u{feff}key", "colour", "", "key,"])
            .prop_map(|name| (name.to_owned(), Kind::Key)),
    ];
    vec(column, 0..6)
        .prop_flat_map(|columns| {
            let header = columns.iter().map(|c| c.0.clone()).collect::<Vec<_>>().join(",");
            let cells: Vec<BoxedStrategy<Vec<u8>>> = columns.iter().map(|c| csv_cell(c.1)).collect();
            let row = prop_oneof![
                8 => cells.prop_map(|fields| fields.join(&b","[..])),
                1 => vec(any::<u8>(), 0..12),
            ];
            (Just(header), vec(row, 0..6), prop_oneof![Just("\n"), Just("\r\n"), Just("\r")])
        })
        .prop_map(|(header, rows, eol)| {
            let mut file = header.into_bytes();
            for row in rows {
                file.extend_from_slice(eol.as_bytes());
                file.extend(row);
            }
            file
        })
}

fn import(fuzz: &Fuzz, (ct, format, dry_run): (Option<&str>, Option<&str>, bool), file: Vec<u8>) -> Option<Response> {
    json_post(fuzz, Method::POST, &import_uri(format, dry_run), ct, file)
}

#[test]
fn jsonl_imports_never_fail_on_the_server() {
    let fuzz = setup();
    fuzz.run(1_000, (import_content_type(), jsonl_file()), |fuzz, (ct, file)| {
        let Some(r) = import(fuzz, ct, file) else { return Ok(()) };
        well_formed(&r, &fuzz.secrets(), false)
    });
}

#[test]
fn csv_imports_never_fail_on_the_server() {
    let fuzz = setup();
    fuzz.run(1_000, (import_content_type(), csv_file()), |fuzz, (ct, file)| {
        let Some(r) = import(fuzz, ct, file) else { return Ok(()) };
        well_formed(&r, &fuzz.secrets(), false)
    });
}

// ---------------------------------------------------------------------------------------------------
// Query strings
// ---------------------------------------------------------------------------------------------------

const QUERY_NAMES: &[&str] = &[
    "owner_id",
    "environment",
    "status",
    "include_inactive",
    "cursor",
    "limit",
    "key_id",
    "action",
    "actor",
    "since",
    "until",
    "days",
];

fn query() -> impl Strategy<Value = String> {
    let pair = (field_name(QUERY_NAMES.to_vec()), prop_oneof![3 => text(), 1 => number().prop_map(|n| n.to_string())])
        .prop_map(|(k, v)| format!("{}={}", encode(&k), encode(&v)));
    prop_oneof![
        4 => vec(pair, 0..5).prop_map(|pairs| pairs.join("&")),
        // Raw: stray `%`, invalid UTF-8 once decoded, repeated names, `+`, empty names.
        1 => "([A-Za-z0-9=&+;._~!$'()*,:@/?-]|%[0-9A-Fa-f]{2}|%)*",
    ]
}

#[test]
fn query_strings_never_fail_on_the_server() {
    let fuzz = setup();
    let path =
        proptest::sample::select(vec!["/v1/keys", "/v1/audit-logs", "/v1/keys/{key_id}/usage", "/v1/keys/expiring"]);
    fuzz.run(2_000, (path, query()), |fuzz, (path, query)| {
        let uri = format!("{}?{query}", path.replace("{key_id}", &fuzz.key_id));
        let bearer = format!("Bearer {}", fuzz.app.admin_key);
        let Some(req) = build(Method::GET, &uri, &[("authorization", bearer.as_bytes())], Vec::new()) else {
            return Ok(());
        };
        let r = fuzz.send(req);
        well_formed(&r, &fuzz.secrets(), r.status.is_success())?;
        // Only the query is fuzzed, and the caller is admin: it is right or it is refused as a query.
        prop_assert!(r.status.is_success() || r.status.as_u16() == 400 || r.status.as_u16() == 422, "{}", r.text);
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------------
// Credentials and X-Forwarded-For
// ---------------------------------------------------------------------------------------------------

fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[ -~\t]{0,40}".prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..40),
        2 => text().prop_map(String::into_bytes),
    ]
}

fn credential() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    let value = prop_oneof![
        3 => header_bytes(),
        2 => (proptest::sample::select(vec!["Bearer ", "bearer  ", "Basic ", "Bearer", "", " Bearer "]),
            prop_oneof![Just("{key}".to_owned()), Just("{key}x".to_owned()), text(), "[!-~]{16,60}"])
            .prop_map(|(scheme, token)| format!("{scheme}{token}").into_bytes()),
    ];
    (proptest::sample::select(vec!["authorization", "x-api-key"]), value)
}

#[test]
fn any_credential_header_is_refused_cleanly() {
    let fuzz = setup();
    fuzz.run(2_000, credential(), |fuzz, (header, value)| {
        let value = fill(fuzz, value);
        let Some(req) = build(Method::GET, "/v1/me", &[(header, &value)], Vec::new()) else { return Ok(()) };
        let r = fuzz.send(req);
        well_formed(&r, &fuzz.secrets(), r.status.is_success())?;
        // The target key has no keyward: scope; only the admin key could open /v1/me... or the target
        // key itself, which /v1/me always allows.
        prop_assert!(r.status.is_success() || r.status.as_u16() == 401, "{} {}", r.status, r.text);
        Ok(())
    });
}

/// `X-Forwarded-For` values: lists of addresses (v4, v6, mapped, trusted or not), with junk.
fn forwarded() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let hop = prop_oneof![
        4 => any::<[u8; 4]>().prop_map(|a| IpAddr::from(a).to_string()),
        1 => any::<[u8; 16]>().prop_map(|a| IpAddr::from(a).to_string()),
        2 => proptest::sample::select(vec![
            "10.0.0.2", "203.0.113.9", "198.51.100.7", "::1", "::ffff:10.0.0.1", "[::1]", "1.2.3.4:80",
            "unknown", "", " ", "_hidden", "2001:db8::1%eth0",
        ])
        .prop_map(str::to_owned),
        1 => text(),
    ];
    let list = (vec(hop, 0..5), prop_oneof![Just(","), Just(", "), Just(" ,")])
        .prop_map(|(hops, sep)| hops.join(sep).into_bytes());
    vec(prop_oneof![6 => list, 1 => header_bytes()], 0..3)
}

fn trusted() -> Vec<IpNet> {
    vec!["203.0.113.0/24".parse().unwrap(), "10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]
}

#[test]
fn client_ip_is_the_peer_or_a_forwarded_hop() {
    let peers = proptest::sample::select(vec![
        "203.0.113.7",
        "10.1.2.3",
        "::1",
        "::ffff:10.0.0.1",
        "198.51.100.1",
        "2001:db8::1",
    ]);
    let proxies = trusted();
    if let Err(e) = runner(10_000).run(&(peers, forwarded()), |(peer, values)| {
        let peer: IpAddr = peer.parse().unwrap();
        let mut headers = HeaderMap::new();
        for v in &values {
            let Ok(v) = HeaderValue::from_bytes(v) else { return Ok(()) };
            headers.append("x-forwarded-for", v);
        }
        let got = client_ip(Some(peer), &headers, &proxies).unwrap();
        let is_trusted = |ip: &IpAddr| proxies.iter().any(|n| n.contains(ip));
        // The hops a trusted walk may read: from the right, up to the first entry that is not an
        // address (raw bytes: a value need not be UTF-8).
        let readable: Vec<IpAddr> = values
            .iter()
            .rev()
            .flat_map(|v| v.rsplit(|b| *b == b','))
            .map_while(|h| std::str::from_utf8(h).ok().and_then(|h| h.trim().parse::<IpAddr>().ok()))
            .map(|h| h.to_canonical())
            .collect();
        let want = if !is_trusted(&peer.to_canonical()) {
            peer.to_canonical()
        } else {
            // SECURITY: the rightmost hop not trusted; else the last one a trusted hop vouched for
            // (a malformed entry left of it, written by the client, is never read); else the proxy.
            readable.iter().find(|h| !is_trusted(h)).or(readable.last()).copied().unwrap_or(peer.to_canonical())
        };
        prop_assert_eq!(got, want);
        Ok(())
    }) {
        panic!("{e}");
    }
}

#[test]
fn forwarded_for_never_fails_on_the_server() {
    let mut fuzz = setup();
    fuzz.app.reconfigure(|b| b.trusted_proxies(trusted()));
    let route = proptest::sample::select(vec!["/v1/me", "/v1/verify", "/v1/keys"]);
    fuzz.run(2_000, (route, forwarded()), |fuzz, (route, values)| {
        let bearer = format!("Bearer {}", fuzz.app.admin_key);
        let mut headers: Vec<(&str, &[u8])> = vec![("authorization", bearer.as_bytes())];
        headers.extend(values.iter().map(|v| ("x-forwarded-for", v.as_slice())));
        let (method, body) = if route == "/v1/verify" {
            headers.push(("content-type", b"application/json"));
            (Method::POST, serde_json::json!({ "key": fuzz.key }).to_string().into_bytes())
        } else {
            (Method::GET, Vec::new())
        };
        let Some(req) = build(method, route, &headers, body) else { return Ok(()) };
        let r = fuzz.send(req);
        well_formed(&r, &fuzz.secrets(), r.status.is_success())?;
        // The admin key has no allow-list: no forwarded address can make its request fail.
        prop_assert!(r.status.is_success(), "{} {}", r.status, r.text);
        Ok(())
    });
}
