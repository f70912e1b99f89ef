//! The authorization matrix: every route of `/openapi.json`, called by
//! every kind of caller on every kind of target, answers the status written in [`MATRIX`], one table.
//!
//! Keys that cannot be used (revoked, disabled, expired, of a disabled organization, unknown,
//! malformed, from an address not allowed), each holding `keyward:admin`, must answer like no key
//! at all, with the error code of their reason.
//!
//! Every caller but [`Caller::OrgB`] belongs to organization A (the seeded `default`); targets are made
//! fresh for each call, so a DELETE or a rotation never changes what the next call sees, and each
//! caller kind runs on a TestApp of its own. Bodies are valid, so a 2xx proves the permission and not a
//! validation error. A target the caller may not see must get the very answer (status and body) a
//! missing one gets: 404, the 422 of `/v1/usage`'s `key_id`, the `NOT_FOUND` of `/v1/verify`. A route
//! missing from the table, or a row naming no route, fails [`every_route_is_in_the_matrix`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::http::Method;
use keyward_core::{Environment, HashAlgorithm, KeyHasher, KeyPrefix, OrgId, PlainKey};
use keyward_server::service::CreateKeyRequest;
use keyward_server::settings::Protection;
use serde_json::{Value, json};

use crate::helpers::{NowUtc, Response, TestApp, request};

/// Who calls. The column order of [`MATRIX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// No key at all.
    Anonymous,
    KeysRead,
    KeysWrite,
    Verify,
    AuditRead,
    /// `keyward:self` on a key without an `owner_id`: it owns nothing.
    SelfNoOwner,
    /// `keyward:self` of owner `alice`, who owns the `KeyA` and `KeyAdmin` targets (and, in
    /// organization B, `KeyB`: same owner id, another organization).
    SelfAlice,
    /// `keyward:self` of owner `bob`, who owns no target.
    SelfBob,
    /// A key of organization B with `keys:write`, `keys:read`, `audit:read` and `verify`.
    OrgB,
    /// The seeded `keyward:admin` key.
    Admin,
    /// Only customer scopes, wildcards included (`*`, `admin:all`): they never cover a `keyward:` scope.
    Customer,
    // Keys that cannot be used, each holding `keyward:admin`: every route answers as without a key.
    RevokedAdmin,
    DisabledAdmin,
    ExpiredAdmin,
    /// Of an organization that was disabled.
    OrgDisabledAdmin,
    /// Well-formed, never issued.
    UnknownKey,
    Malformed,
    /// Allowed from 10.0.0.0/8 only; the tests call from 203.0.113.7: 403 where no key gets 401.
    IpRestrictedAdmin,
}

const CALLERS: [Caller; 11] = [
    Caller::Anonymous,
    Caller::KeysRead,
    Caller::KeysWrite,
    Caller::Verify,
    Caller::AuditRead,
    Caller::SelfNoOwner,
    Caller::SelfAlice,
    Caller::SelfBob,
    Caller::OrgB,
    Caller::Admin,
    Caller::Customer,
];

/// Callers whose key cannot be used: the table's first column (no key) holds for them.
const UNUSABLE: [Caller; 7] = [
    Caller::RevokedAdmin,
    Caller::DisabledAdmin,
    Caller::ExpiredAdmin,
    Caller::OrgDisabledAdmin,
    Caller::UnknownKey,
    Caller::Malformed,
    Caller::IpRestrictedAdmin,
];

/// The error code of a refused caller: proves the refusal is for the reason the caller stands for.
fn refusal_code(caller: Caller) -> Option<&'static str> {
    Some(match caller {
        Caller::Anonymous => "missing_credentials",
        Caller::RevokedAdmin => "key_revoked",
        Caller::DisabledAdmin => "key_disabled",
        Caller::ExpiredAdmin => "key_expired",
        Caller::OrgDisabledAdmin => "organization_disabled",
        Caller::UnknownKey => "unknown_key",
        Caller::Malformed => "malformed_key",
        Caller::IpRestrictedAdmin => "ip_not_allowed",
        _ => return None,
    })
}

/// What `row` answers `caller`.
fn expected(row: &Row, caller: Caller) -> u16 {
    match CALLERS.iter().position(|c| *c == caller) {
        Some(column) => row.expect[column],
        None if caller == Caller::IpRestrictedAdmin && row.expect[0] == 401 => 403,
        None => row.expect[0],
    }
}

/// What the call is about: the `{id}` of the path; for `/v1/verify` the key in the body, for
/// `/v1/usage` its `key_id`; for `POST /v1/keys`, `POST /v1/webhooks` and the import the
/// `organization_id` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    /// A collection or a route without a target.
    None,
    /// Organization A, owner `alice`, no scopes.
    KeyA,
    /// Organization A, owner `carol`, no scopes.
    KeyOtherOwner,
    /// Organization A, owner `alice`, `keyward:admin`.
    KeyAdmin,
    /// Organization B, owner `alice`, no scopes.
    KeyB,
    /// Organization A, subscribed to `key.created`.
    HookA,
    /// Organization A, subscribed to `auth.failures_spike` (admin-only) and `key.created`.
    HookAdmin,
    /// Organization B, subscribed to `key.created`.
    HookB,
    OrgA,
    OrgB,
}

const KEYS: &[Target] = &[Target::KeyA, Target::KeyOtherOwner, Target::KeyAdmin, Target::KeyB];
const HOOKS: &[Target] = &[Target::HookA, Target::HookAdmin, Target::HookB];
const ORGS: &[Target] = &[Target::OrgA, Target::OrgB];

struct Row {
    method: &'static str,
    path: &'static str,
    target: Target,
    /// One status per caller, in [`CALLERS`] order.
    expect: [u16; 11],
}

const fn row(method: &'static str, path: &'static str, target: Target, expect: [u16; 11]) -> Row {
    Row { method, path, target, expect }
}

use Target::{HookA, HookAdmin, HookB, KeyA, KeyAdmin, KeyB, KeyOtherOwner, None as NoTarget, OrgA, OrgB};

/// The expected status of every call. Reading a column: what one kind of caller may do.
#[rustfmt::skip]
const MATRIX: &[Row] = &[
    //                                                                anon read write verif audit self0 alice  bob  orgB admin cust
    // The body's key: always 200, the outcome is a value; one the caller may not see is NOT_FOUND,
    // exactly like an unknown key (checked apart from the table, see `verify_hides`).
    row("post",   "/v1/verify",                       KeyA,          [401, 403, 403, 200, 403, 403, 403, 403, 200, 200, 403]),
    row("post",   "/v1/verify",                       KeyOtherOwner, [401, 403, 403, 200, 403, 403, 403, 403, 200, 200, 403]),
    row("post",   "/v1/verify",                       KeyAdmin,      [401, 403, 403, 200, 403, 403, 403, 403, 200, 200, 403]),
    row("post",   "/v1/verify",                       KeyB,          [401, 403, 403, 200, 403, 403, 403, 403, 200, 200, 403]),
    // The body's key_id: another organization's key is refused exactly like an unknown one (422).
    row("post",   "/v1/usage",                        KeyA,          [401, 403, 403, 202, 403, 403, 403, 403, 422, 202, 403]),
    row("post",   "/v1/usage",                        KeyOtherOwner, [401, 403, 403, 202, 403, 403, 403, 403, 422, 202, 403]),
    row("post",   "/v1/usage",                        KeyAdmin,      [401, 403, 403, 202, 403, 403, 403, 403, 422, 202, 403]),
    row("post",   "/v1/usage",                        KeyB,          [401, 403, 403, 422, 403, 403, 403, 403, 202, 202, 403]),

    // The body's organization_id; a self key without an owner creates nothing.
    row("post",   "/v1/keys",                         OrgA,          [401, 403, 201, 403, 403, 403, 201, 201, 403, 201, 403]),
    row("post",   "/v1/keys",                         OrgB,          [401, 403, 403, 403, 403, 403, 403, 403, 201, 201, 403]),
    row("get",    "/v1/keys",                         NoTarget,      [401, 200, 200, 403, 403, 200, 200, 200, 200, 200, 403]),

    row("get",    "/v1/keys/{id}",                    KeyA,          [401, 200, 200, 403, 403, 404, 200, 404, 404, 200, 403]),
    row("get",    "/v1/keys/{id}",                    KeyOtherOwner, [401, 200, 200, 403, 403, 404, 404, 404, 404, 200, 403]),
    row("get",    "/v1/keys/{id}",                    KeyAdmin,      [401, 200, 200, 403, 403, 404, 200, 404, 404, 200, 403]),
    row("get",    "/v1/keys/{id}",                    KeyB,          [401, 404, 404, 403, 403, 404, 404, 404, 200, 200, 403]),
    // PATCH needs keys:write (a self key only lists, reads, creates, rotates and revokes), and every
    // keyward: scope the target holds.
    row("patch",  "/v1/keys/{id}",                    KeyA,          [401, 403, 200, 403, 403, 403, 403, 403, 404, 200, 403]),
    row("patch",  "/v1/keys/{id}",                    KeyOtherOwner, [401, 403, 200, 403, 403, 403, 403, 403, 404, 200, 403]),
    row("patch",  "/v1/keys/{id}",                    KeyAdmin,      [401, 403, 403, 403, 403, 403, 403, 403, 404, 200, 403]),
    row("patch",  "/v1/keys/{id}",                    KeyB,          [401, 403, 404, 403, 403, 403, 403, 403, 200, 200, 403]),
    row("delete", "/v1/keys/{id}",                    KeyA,          [401, 403, 204, 403, 403, 404, 204, 404, 404, 204, 403]),
    row("delete", "/v1/keys/{id}",                    KeyOtherOwner, [401, 403, 204, 403, 403, 404, 404, 404, 404, 204, 403]),
    row("delete", "/v1/keys/{id}",                    KeyAdmin,      [401, 403, 403, 403, 403, 404, 403, 404, 404, 204, 403]),
    row("delete", "/v1/keys/{id}",                    KeyB,          [401, 403, 404, 403, 403, 404, 404, 404, 204, 204, 403]),
    row("post",   "/v1/keys/{id}/rotate",             KeyA,          [401, 403, 201, 403, 403, 404, 201, 404, 404, 201, 403]),
    row("post",   "/v1/keys/{id}/rotate",             KeyOtherOwner, [401, 403, 201, 403, 403, 404, 404, 404, 404, 201, 403]),
    row("post",   "/v1/keys/{id}/rotate",             KeyAdmin,      [401, 403, 403, 403, 403, 404, 403, 404, 404, 201, 403]),
    row("post",   "/v1/keys/{id}/rotate",             KeyB,          [401, 403, 404, 403, 403, 404, 404, 404, 201, 201, 403]),
    row("get",    "/v1/keys/{id}/usage",              KeyA,          [401, 200, 200, 403, 403, 404, 200, 404, 404, 200, 403]),
    row("get",    "/v1/keys/{id}/usage",              KeyOtherOwner, [401, 200, 200, 403, 403, 404, 404, 404, 404, 200, 403]),
    row("get",    "/v1/keys/{id}/usage",              KeyAdmin,      [401, 200, 200, 403, 403, 404, 200, 404, 404, 200, 403]),
    row("get",    "/v1/keys/{id}/usage",              KeyB,          [401, 404, 404, 403, 403, 404, 404, 404, 200, 200, 403]),
    row("get",    "/v1/keys/expiring",                NoTarget,      [401, 200, 200, 403, 403, 200, 200, 200, 200, 200, 403]),
    // Acts on the whole organization: keyward:self is not enough.
    row("post",   "/v1/keys/cleanup-expired",         NoTarget,      [401, 403, 200, 403, 403, 403, 403, 403, 200, 200, 403]),
    // The query's organization_id (a dry run: it changes nothing).
    row("post",   "/v1/keys/import",                  OrgA,          [401, 403, 403, 403, 403, 403, 403, 403, 403, 200, 403]),
    row("post",   "/v1/keys/import",                  OrgB,          [401, 403, 403, 403, 403, 403, 403, 403, 403, 200, 403]),
    row("get",    "/v1/me",                           NoTarget,      [401, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),

    row("post",   "/v1/organizations",                NoTarget,      [401, 403, 403, 403, 403, 403, 403, 403, 403, 201, 403]),
    row("get",    "/v1/organizations",                NoTarget,      [401, 403, 403, 403, 403, 403, 403, 403, 403, 200, 403]),
    row("get",    "/v1/organizations/{id}",           OrgA,          [401, 403, 403, 403, 403, 403, 403, 403, 403, 200, 403]),
    row("get",    "/v1/organizations/{id}",           OrgB,          [401, 403, 403, 403, 403, 403, 403, 403, 403, 200, 403]),
    row("patch",  "/v1/organizations/{id}",           OrgA,          [401, 403, 403, 403, 403, 403, 403, 403, 403, 200, 403]),
    row("patch",  "/v1/organizations/{id}",           OrgB,          [401, 403, 403, 403, 403, 403, 403, 403, 403, 200, 403]),
    // Billing needs keys:read (keyward:self is not enough): its own organization only.
    row("get",    "/v1/organizations/{id}/usage",     OrgA,          [401, 200, 200, 403, 403, 403, 403, 403, 404, 200, 403]),
    row("get",    "/v1/organizations/{id}/usage",     OrgB,          [401, 404, 404, 403, 403, 403, 403, 403, 200, 200, 403]),

    row("get",    "/v1/audit-logs",                   NoTarget,      [401, 403, 403, 403, 200, 403, 403, 403, 200, 200, 403]),
    // The chain spans every organization.
    row("get",    "/v1/audit-logs/verify",            NoTarget,      [401, 403, 403, 403, 403, 403, 403, 403, 403, 200, 403]),

    // Webhooks need keys:write (keyward:self is not enough); admin-only endpoints keyward:admin for
    // every write and for deliveries, while its organization's keys:write may still read them.
    row("post",   "/v1/webhooks",                     OrgA,          [401, 403, 201, 403, 403, 403, 403, 403, 403, 201, 403]),
    row("post",   "/v1/webhooks",                     OrgB,          [401, 403, 403, 403, 403, 403, 403, 403, 201, 201, 403]),
    row("get",    "/v1/webhooks",                     NoTarget,      [401, 403, 200, 403, 403, 403, 403, 403, 200, 200, 403]),
    row("get",    "/v1/webhooks/{id}",                HookA,         [401, 403, 200, 403, 403, 403, 403, 403, 404, 200, 403]),
    row("get",    "/v1/webhooks/{id}",                HookAdmin,     [401, 403, 200, 403, 403, 403, 403, 403, 404, 200, 403]),
    row("get",    "/v1/webhooks/{id}",                HookB,         [401, 403, 404, 403, 403, 403, 403, 403, 200, 200, 403]),
    row("patch",  "/v1/webhooks/{id}",                HookA,         [401, 403, 200, 403, 403, 403, 403, 403, 404, 200, 403]),
    row("patch",  "/v1/webhooks/{id}",                HookAdmin,     [401, 403, 403, 403, 403, 403, 403, 403, 404, 200, 403]),
    row("patch",  "/v1/webhooks/{id}",                HookB,         [401, 403, 404, 403, 403, 403, 403, 403, 200, 200, 403]),
    row("delete", "/v1/webhooks/{id}",                HookA,         [401, 403, 204, 403, 403, 403, 403, 403, 404, 204, 403]),
    row("delete", "/v1/webhooks/{id}",                HookAdmin,     [401, 403, 403, 403, 403, 403, 403, 403, 404, 204, 403]),
    row("delete", "/v1/webhooks/{id}",                HookB,         [401, 403, 404, 403, 403, 403, 403, 403, 204, 204, 403]),
    row("get",    "/v1/webhooks/{id}/deliveries",     HookA,         [401, 403, 200, 403, 403, 403, 403, 403, 404, 200, 403]),
    row("get",    "/v1/webhooks/{id}/deliveries",     HookAdmin,     [401, 403, 403, 403, 403, 403, 403, 403, 404, 200, 403]),
    row("get",    "/v1/webhooks/{id}/deliveries",     HookB,         [401, 403, 404, 403, 403, 403, 403, 403, 200, 200, 403]),
    row("post",   "/v1/webhooks/{id}/deliveries/{delivery_id}/retry", HookA,     [401, 403, 200, 403, 403, 403, 403, 403, 404, 200, 403]),
    row("post",   "/v1/webhooks/{id}/deliveries/{delivery_id}/retry", HookAdmin, [401, 403, 403, 403, 403, 403, 403, 403, 404, 200, 403]),
    row("post",   "/v1/webhooks/{id}/deliveries/{delivery_id}/retry", HookB,     [401, 403, 404, 403, 403, 403, 403, 403, 200, 200, 403]),

    // A proxy hook: the key judged is the end client's, on the request it makes (here `GET /` and
    // `POST /`, which the default route table gives to any usable key).
    row("get",    "/v1/authz",                        NoTarget,      [401, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    row("post",   "/v1/authz",                        NoTarget,      [401, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),

    row("get",    "/healthz",                         NoTarget,      [200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    row("get",    "/readyz",                          NoTarget,      [200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    row("get",    "/metrics",                         NoTarget,      [200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
];

/// The targets a route is called on: `{id}` names a key, an endpoint or an organization; a few
/// collection routes take their target from the body or the query.
fn targets_of(method: &str, path: &str) -> &'static [Target] {
    match (method, path) {
        ("post", "/v1/verify" | "/v1/usage") => KEYS,
        ("post", "/v1/keys" | "/v1/keys/import" | "/v1/webhooks") => ORGS,
        (_, p) if p.starts_with("/v1/keys/{id}") => KEYS,
        (_, p) if p.starts_with("/v1/webhooks/{id}") => HOOKS,
        (_, p) if p.starts_with("/v1/organizations/{id}") => ORGS,
        _ => &[Target::None],
    }
}

async fn openapi_routes(app: &TestApp) -> BTreeSet<(String, String)> {
    let spec = app.call(Method::GET, "/openapi.json", None, None).await.body;
    let mut routes = BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().expect("paths") {
        for method in ops.as_object().expect("operations").keys() {
            routes.insert((method.clone(), path.clone()));
        }
    }
    routes
}

/// The table and `/openapi.json` name the same routes, and each route has one row per target kind.
#[tokio::test]
async fn every_route_is_in_the_matrix() {
    let app = TestApp::sqlite().await;
    let spec = openapi_routes(&app).await;
    let mut table: BTreeMap<(String, String), Vec<Target>> = BTreeMap::new();
    for r in MATRIX {
        table.entry((r.method.to_owned(), r.path.to_owned())).or_default().push(r.target);
    }
    let mut problems = Vec::new();
    for (method, path) in &spec {
        if !table.contains_key(&(method.clone(), path.clone())) {
            problems.push(format!("{method} {path} is in /openapi.json but not in the authorization matrix"));
        }
    }
    for ((method, path), targets) in &table {
        if !spec.contains(&(method.clone(), path.clone())) {
            problems.push(format!("{method} {path} is in the authorization matrix but not in /openapi.json"));
        }
        let mut got = targets.clone();
        got.sort();
        let mut want = targets_of(method, path).to_vec();
        want.sort();
        if got != want {
            problems.push(format!("{method} {path}: rows for targets {got:?}, want one per {want:?}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Unique names, slugs, ids across a test's calls.
static SEQ: AtomicU64 = AtomicU64::new(0);

fn seq() -> u64 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

fn owned(owner: Option<&str>, scopes: &[&str]) -> CreateKeyRequest {
    CreateKeyRequest {
        name: format!("matrix {}", seq()),
        owner_id: owner.map(str::to_owned),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A target made for one call.
struct Made {
    /// The `{id}` (and the body's `key_id` or `organization_id`).
    id: String,
    /// For an endpoint, one of its deliveries.
    delivery: String,
    /// For a key, its secret (what `/v1/verify` is asked about).
    secret: String,
}

impl Made {
    fn id(id: String) -> Self {
        Self { id, delivery: String::new(), secret: String::new() }
    }

    /// What no target is: a fresh id, and a well-formed key that was never issued.
    fn missing() -> Self {
        let id = uuid::Uuid::now_v7().to_string();
        let secret =
            PlainKey::generate(&KeyPrefix::default(), Environment::Live).expect("key").expose_secret().to_owned();
        Self { delivery: id.clone(), id, secret }
    }
}

/// One caller kind's world: organization A (the seeded one, with the admin key) and B.
struct World {
    app: TestApp,
    org_b: OrgId,
    caller: Option<String>,
}

impl World {
    async fn new(caller: Caller) -> Self {
        let mut app = TestApp::sqlite().await;
        // Hundreds of calls from one address, many without a key, many creating keys: the matrix is
        // about permissions, not the abuse limits (tests/api/limits.rs holds those).
        app.reconfigure(|b| {
            b.protection(Protection {
                management_per_minute: 1_000_000,
                failed_auth_per_minute: 1_000_000,
                key_creation_per_minute: 1_000_000,
            })
        });
        let a = app.default_org.id;
        let org_b = app.org("org-b").await.id;
        let key = |org, owner, scopes| {
            let app = &app;
            async move { Some(app.key_with(org, owned(owner, scopes)).await.0) }
        };
        let caller = match caller {
            Caller::Anonymous => None,
            Caller::KeysRead => key(a, None, &["keyward:keys:read"]).await,
            Caller::KeysWrite => key(a, None, &["keyward:keys:write"]).await,
            Caller::Verify => key(a, None, &["keyward:verify"]).await,
            Caller::AuditRead => key(a, None, &["keyward:audit:read"]).await,
            Caller::SelfNoOwner => key(a, None, &["keyward:self"]).await,
            Caller::SelfAlice => key(a, Some("alice"), &["keyward:self"]).await,
            Caller::SelfBob => key(a, Some("bob"), &["keyward:self"]).await,
            Caller::OrgB => {
                key(org_b, None, &["keyward:keys:write", "keyward:keys:read", "keyward:audit:read", "keyward:verify"])
                    .await
            }
            Caller::Admin => Some(app.admin_key.clone()),
            Caller::Customer => key(a, Some("alice"), &["*", "admin:all"]).await,
            Caller::RevokedAdmin | Caller::DisabledAdmin => {
                let (secret, made) = app.key_with(a, owned(None, &["keyward:admin"])).await;
                let path = format!("/v1/keys/{}", made.id);
                let r = match caller {
                    Caller::RevokedAdmin => app.delete(&path, &app.admin_key).await,
                    _ => app.patch(&path, &app.admin_key, json!({"is_active": false})).await,
                };
                assert!(r.status.is_success(), "{}", r.text);
                Some(secret)
            }
            Caller::ExpiredAdmin => {
                let request = CreateKeyRequest { expires_in_days: Some(1), ..owned(None, &["keyward:admin"]) };
                let secret = app.key_with(a, request).await.0;
                app.clock.advance(chrono::Duration::days(2));
                Some(secret)
            }
            Caller::OrgDisabledAdmin => {
                let c = app.org("org-c").await.id;
                let secret = app.key_with(c, owned(None, &["keyward:admin"])).await.0;
                let r = app.patch(&format!("/v1/organizations/{c}"), &app.admin_key, json!({"is_active": false})).await;
                assert!(r.status.is_success(), "{}", r.text);
                Some(secret)
            }
            Caller::UnknownKey => Some(Made::missing().secret),
            Caller::Malformed => Some("sk_live_not-a-key".to_owned()),
            Caller::IpRestrictedAdmin => {
                let request =
                    CreateKeyRequest { allowed_ips: vec!["10.0.0.0/8".into()], ..owned(None, &["keyward:admin"]) };
                Some(app.key_with(a, request).await.0)
            }
        };
        Self { app, org_b, caller }
    }

    fn org(&self, target: Target) -> OrgId {
        match target {
            KeyB | HookB | OrgB => self.org_b,
            _ => self.app.default_org.id,
        }
    }

    async fn key(&self, org: OrgId, owner: &str, scopes: &[&str]) -> Made {
        let (secret, key) = self.app.key_with(org, owned(Some(owner), scopes)).await;
        Made { secret, ..Made::id(key.id.to_string()) }
    }

    /// An endpoint of `org`, with a delivery to retry: a `key.created` event of its organization,
    /// dispatched (never sent: no worker runs).
    async fn hook(&self, org: OrgId, events: Value) -> Made {
        let url = format!("http://hooks.example.com/{}", seq());
        let body = json!({"url": url, "events": events, "organization_id": org});
        let r = self.app.post("/v1/webhooks", &self.app.admin_key, body).await;
        assert_eq!(r.status.as_u16(), 201, "{}", r.text);
        let id = r.body["webhook"]["id"].as_str().expect("webhook id").to_owned();
        self.app.key_with(org, owned(None, &[])).await;
        let now = self.app.clock.now_utc();
        let store = &self.app.state.store;
        while store.dispatch_events(now, now + chrono::Duration::hours(24), 100).await.expect("dispatch") > 0 {}
        let deliveries = store
            .list_deliveries(id.parse().expect("uuid"), keyward_store::PageRequest { after: None, limit: 1 })
            .await
            .expect("deliveries");
        Made { delivery: deliveries.items[0].id.to_string(), ..Made::id(id) }
    }

    /// A fresh target of this kind.
    async fn make(&self, target: Target) -> Made {
        let org = self.org(target);
        match target {
            Target::None => Made::id(String::new()),
            KeyA | KeyB => self.key(org, "alice", &[]).await,
            KeyOtherOwner => self.key(org, "carol", &[]).await,
            KeyAdmin => self.key(org, "alice", &["keyward:admin"]).await,
            HookA | HookB => self.hook(org, json!(["key.created"])).await,
            HookAdmin => self.hook(org, json!(["auth.failures_spike", "key.created"])).await,
            OrgA | OrgB => Made::id(org.to_string()),
        }
    }

    /// The call of `row` on `target`, with a valid body.
    async fn call(&self, row: &Row, target: &Made) -> Response {
        let method: Method = row.method.to_uppercase().parse().expect("method");
        let id = &target.id;
        let path = row.path.replace("{id}", id).replace("{delivery_id}", &target.delivery);
        let key = self.caller.as_deref();
        let n = seq();
        let body = match (row.method, row.path) {
            ("post", "/v1/verify") => Some(json!({"key": target.secret})),
            ("post", "/v1/usage") => Some(json!({"id": format!("report-{n}"), "key_id": id})),
            ("post", "/v1/keys") => Some(json!({"name": format!("created {n}"), "organization_id": id})),
            ("post", "/v1/keys/import") => {
                let hash = KeyHasher::default().hash_str(HashAlgorithm::Sha256, &format!("legacy key number {n}"));
                let line = json!({"key_sha256": hash.to_hex(), "name": format!("imported {n}")});
                let uri = format!("{path}?dry_run=true&organization_id={id}");
                let mut req = request(method, &uri, key, None);
                req.headers_mut().insert("content-type", "application/x-ndjson".parse().expect("header"));
                *req.body_mut() = Body::from(format!("{line}\n"));
                return self.app.send(req).await;
            }
            ("patch", "/v1/keys/{id}") => Some(json!({"name": format!("renamed {n}")})),
            ("post", "/v1/organizations") => Some(json!({"name": format!("org {n}"), "slug": format!("org-{n}")})),
            ("patch", "/v1/organizations/{id}") => Some(json!({"name": format!("renamed {n}")})),
            ("post", "/v1/webhooks") => {
                Some(json!({"url": format!("http://hooks.example.com/new/{n}"), "organization_id": id}))
            }
            ("patch", "/v1/webhooks/{id}") => Some(json!({"description": format!("changed {n}")})),
            // Rotation with the defaults, retry and cleanup take no fields.
            ("post", _) => Some(json!({})),
            _ => None,
        };
        self.app.call(method, &path, key, body).await
    }
}

/// Whether a caller that may verify gets told about the target key: `/v1/verify` answers 200 either
/// way, but a key of another organization is `NOT_FOUND` unless the caller holds `keyward:admin`.
fn verify_hides(caller: Caller, target: Target) -> bool {
    match caller {
        Caller::Admin => false,
        Caller::OrgB => target != KeyB,
        _ => target == KeyB,
    }
}

fn label(caller: Caller, row: &Row) -> String {
    format!("{} {} {caller:?} {:?}", row.method.to_uppercase(), row.path, row.target)
}

fn short(r: &Response) -> String {
    r.text.chars().take(300).collect()
}

/// Every row of the table, for one kind of caller: mismatches, and how many calls were compared with
/// the same call on a missing target.
async fn walk(caller: Caller) -> (Vec<String>, usize) {
    let world = World::new(caller).await;
    let (mut problems, mut compared) = (Vec::new(), 0);
    for row in MATRIX {
        let expected = expected(row, caller);
        let target = world.make(row.target).await;
        let r = world.call(row, &target).await;
        let got = r.status.as_u16();
        if got != expected {
            problems.push(format!("{}: expected {expected} got {got} ({})", label(caller, row), short(&r)));
            continue;
        }
        if let Some(code) = refusal_code(caller).filter(|_| got >= 400)
            && r.body["error"]["code"] != code
        {
            problems.push(format!("{}: refused, but not as `{code}` ({})", label(caller, row), short(&r)));
        }
        // SECURITY: what the caller may not see answers exactly as if it did not exist, so ids (and
        // keys) of other organizations and owners cannot be probed.
        let verify = row.path == "/v1/verify" && got == 200;
        let hidden =
            got == 404 || (row.path == "/v1/usage" && got == 422) || (verify && verify_hides(caller, row.target));
        if verify && !hidden && r.body["code"] != "VALID" {
            problems.push(format!("{}: a key the caller may see is not VALID ({})", label(caller, row), short(&r)));
        }
        if hidden {
            compared += 1;
            let m = world.call(row, &Made::missing()).await;
            if (m.status, &m.text) != (r.status, &r.text) {
                problems.push(format!(
                    "{}: the hidden target answered {got} ({}), a missing one {} ({})",
                    label(caller, row),
                    short(&r),
                    m.status.as_u16(),
                    short(&m)
                ));
            }
        }
    }
    (problems, compared)
}

/// Each kind of caller walks the table on a TestApp of its own; the walks run side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caller_gets_the_status_the_matrix_names_on_every_target() {
    let started = std::time::Instant::now();
    let walks = CALLERS.into_iter().chain(UNUSABLE).map(|caller| tokio::spawn(walk(caller)));
    let (mut problems, mut compared) = (Vec::new(), 0);
    for walk in walks.collect::<Vec<_>>() {
        let (p, c) = walk.await.expect("walk");
        problems.extend(p);
        compared += c;
    }
    let calls = MATRIX.len() * (CALLERS.len() + UNUSABLE.len());
    eprintln!(
        "authorization matrix: {calls} calls ({compared} compared with a missing target) in {:?}",
        started.elapsed()
    );
    assert!(
        problems.is_empty(),
        "{} of {calls} calls disagree with the matrix:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
