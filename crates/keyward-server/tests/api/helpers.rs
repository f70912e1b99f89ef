//! `TestApp`: a fresh database (a SQLite file in a temp dir, or a PostgreSQL schema of its own), seeded,
//! with an injected clock; requests go through the router with `oneshot`. [`on_every_backend!`] runs a
//! test body once per backend.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use chrono::{DateTime, Utc};
use http_body_util::BodyExt;
use keyward_core::{ManualClock, OrgId, Scope};
use keyward_server::app::{AppBuilder, Tasks};
use keyward_server::authz::{GatewayRoute, RouteRule};
use keyward_server::cache::{CachedLookup, KeyCache};
use keyward_server::service::{self, CreateKeyRequest, CreateOrganizationRequest, Validator};
use keyward_server::settings::{Settings, UsageConfig};
use keyward_server::state::StateBuilder;
use keyward_server::{App, AppState, router};
use keyward_store::testing::PgSchema;
use keyward_store::{Actor, ApiKey, KeyLookup, Organization, Store};
use serde_json::Value;
use tempfile::TempDir;
use tower::ServiceExt;

pub fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z").unwrap().with_timezone(&Utc)
}

pub struct TestApp {
    pub state: AppState,
    pub clock: ManualClock,
    /// The seeded `keyward:admin` key of organization `default`.
    pub admin_key: String,
    pub default_org: Organization,
    _tasks: Tasks,
    _guard: Guard,
}

/// The tests' settings: the defaults, with a usage writer that writes when a test flushes it and keeps
/// every raw event, so that tests can reconcile the rollups with the raw rows. What the other
/// `usage.raw_events` choices keep is tested in the conformance suite and in `usage.rs`.
pub fn settings() -> Settings {
    Settings {
        usage: UsageConfig {
            flush_interval: Duration::from_secs(3600),
            raw_events: keyward_store::usage::RawEvents::All,
            ..UsageConfig::default()
        },
        ..Settings::default()
    }
}

/// A node on the test's clock without the scheduled jobs: a test runs each (the expiry sweep, the
/// webhook worker's tick) when it chooses, at the clock's time.
fn node(settings: Settings, clock: &ManualClock) -> AppBuilder {
    App::builder(settings).clock(Arc::new(clock.clone())).without_jobs()
}

/// What keeps the database alive for the test, and removes it after (held for its `Drop`).
#[allow(dead_code)]
pub enum Guard {
    Dir(TempDir),
    Schema(PgSchema),
    None,
}

pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl TestApp {
    pub async fn sqlite() -> Self {
        let dir = TempDir::new().unwrap();
        let url = format!("sqlite://{}", dir.path().join("keyward.db").display());
        let store = keyward_store::open(&url, true).await.unwrap();
        Self::with_store(store, Guard::Dir(dir)).await
    }

    /// On a fresh schema of the PostgreSQL server `KEYWARD_TEST_POSTGRES_URL` names; `None` (after a
    /// loud line) when `KEYWARD_TEST_SKIP_POSTGRES=1`. An unreachable server fails the test.
    pub async fn postgres(test: &str) -> Option<Self> {
        let schema = PgSchema::create(test).await?;
        let store = keyward_store::open(schema.url(), true).await.unwrap();
        assert_eq!(store.backend(), "postgres");
        Some(Self::with_store(store, Guard::Schema(schema)).await)
    }

    /// A node built as `keyward serve` builds one ([`App`]) on `store`, seeded as `serve` seeds an empty
    /// database.
    pub async fn with_store(store: Arc<dyn Store>, guard: Guard) -> Self {
        Self::with_lookup(store.clone(), store, guard).await
    }

    /// [`TestApp::with_store`], with verification's key lookups made through `lookup` (a test double
    /// in front of the store).
    pub async fn with_lookup(store: Arc<dyn Store>, lookup: Arc<dyn KeyLookup>, guard: Guard) -> Self {
        let clock = ManualClock::new(t0());
        let App { state, tasks } = node(settings(), &clock).store(store).build().await.unwrap();
        // Verification's lookups through `lookup`, behind a verify cache as `keyward serve` runs.
        let keys = CachedLookup::new(lookup, KeyCache::new(settings().cache), Arc::new(clock.clone()));
        let state = state.to_builder().keys(keys).build();
        let seeded = service::seed(&state, &Actor::system(t0())).await.unwrap().unwrap();
        Self {
            admin_key: seeded.key.expose_secret().to_owned(),
            default_org: seeded.organization,
            state,
            clock,
            _tasks: tasks,
            _guard: guard,
        }
    }

    /// Another node on the test's database and clock (a restart, or a second process), built with
    /// `settings`; its store is opened anew, so it has a cache of its own.
    #[allow(dead_code)]
    pub async fn another_node(&self, settings: Settings) -> App {
        let store = keyward_store::open(&self.database_url(), true).await.unwrap();
        node(settings, &self.clock).store(store).build().await.unwrap()
    }

    /// The URL of the test's database, for a second "process" on it.
    pub fn database_url(&self) -> String {
        match &self._guard {
            Guard::Dir(dir) => format!("sqlite://{}", dir.path().join("keyward.db").display()),
            Guard::Schema(schema) => schema.url().to_owned(),
            Guard::None => panic!("no database URL"),
        }
    }

    /// Runs SQL on the test's database behind the store's back (to tamper with it).
    pub async fn exec_sql(&self, sql: &str) {
        use sqlx::Connection;
        match &self._guard {
            Guard::Dir(dir) => {
                let url = format!("sqlite://{}", dir.path().join("keyward.db").display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                sqlx::query(sql).execute(&mut conn).await.unwrap();
            }
            Guard::Schema(schema) => {
                let mut conn = sqlx::PgConnection::connect(schema.url()).await.unwrap();
                sqlx::query(sql).execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
            }
            Guard::None => panic!("no database to tamper with"),
        }
    }

    /// The state rebuilt with some parts changed (`|b| b.protection(..)`), as a node started with
    /// them would hold it.
    #[allow(dead_code)]
    pub fn reconfigure(&mut self, change: impl FnOnce(StateBuilder) -> StateBuilder) {
        self.state = change(self.state.to_builder()).build();
    }

    /// The same database and clock with another state (a restart).
    #[allow(dead_code)]
    pub fn with_state(self, state: AppState) -> Self {
        Self { state, ..self }
    }

    #[allow(dead_code)]
    pub fn guard(&self) -> &Guard {
        &self._guard
    }

    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    pub async fn org(&self, slug: &str) -> Organization {
        let v = Validator { plans: &self.state.plans, now: self.clock.now_utc() };
        let new = CreateOrganizationRequest { name: slug.to_owned(), slug: slug.to_owned(), ..Default::default() }
            .validate(&v)
            .unwrap();
        self.state.store.insert_org(new, &Actor::cli(self.clock.now_utc())).await.unwrap()
    }

    /// A key in `org` with these scopes, created the way the CLI does.
    pub async fn key(&self, org: OrgId, scopes: &[&str]) -> (String, ApiKey) {
        self.key_with(
            org,
            CreateKeyRequest {
                name: "test key".into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        )
        .await
    }

    /// A key in `org` belonging to the customer `owner`, with these scopes.
    pub async fn owned_key(&self, org: OrgId, owner: &str, scopes: &[&str]) -> (String, ApiKey) {
        let request = CreateKeyRequest {
            name: format!("{owner}'s key"),
            owner_id: Some(owner.into()),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        self.key_with(org, request).await
    }

    /// A key in `org` that may only be used from `allowed` (an address or a block).
    pub async fn walled_key(&self, org: OrgId, allowed: &str) -> String {
        let request =
            CreateKeyRequest { name: "walled".into(), allowed_ips: vec![allowed.into()], ..Default::default() };
        self.key_with(org, request).await.0
    }

    /// A key in `org` revoked through the API.
    pub async fn revoked_key(&self, org: OrgId) -> (String, ApiKey) {
        let (plain, record) = self.key(org, &[]).await;
        let r = self.delete(&format!("/v1/keys/{}", record.id), &self.admin_key).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        (plain, record)
    }

    pub async fn key_with(&self, org: OrgId, request: CreateKeyRequest) -> (String, ApiKey) {
        let v = Validator { plans: &self.state.plans, now: self.clock.now_utc() };
        let draft = request.validate(&v, org).unwrap();
        let (plain, record) = service::create_key(&self.state, draft, &Actor::cli(self.clock.now_utc())).await.unwrap();
        (plain.expose_secret().to_owned(), record)
    }

    pub async fn send(&self, request: Request<Body>) -> Response {
        let response = self.router().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Response { status, headers, body, text }
    }

    /// A JSON request from 203.0.113.7 with the key as a bearer token.
    pub async fn call(&self, method: Method, path: &str, key: Option<&str>, body: Option<Value>) -> Response {
        self.send(request(method, path, key, body)).await
    }

    pub async fn get(&self, path: &str, key: &str) -> Response {
        self.call(Method::GET, path, Some(key), None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> Response {
        self.call(Method::POST, path, Some(key), Some(body)).await
    }

    pub async fn patch(&self, path: &str, key: &str, body: Value) -> Response {
        self.call(Method::PATCH, path, Some(key), Some(body)).await
    }

    pub async fn delete(&self, path: &str, key: &str) -> Response {
        self.call(Method::DELETE, path, Some(key), None).await
    }

    /// `POST /v1/verify` with the admin key as the caller.
    pub async fn verify(&self, key: &str, extra: Value) -> Value {
        let mut body = serde_json::json!({ "key": key });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let r = self.post("/v1/verify", &self.admin_key, body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.body
    }
}

pub fn request(method: Method, path: &str, key: Option<&str>, body: Option<Value>) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        builder = builder.header("authorization", format!("Bearer {key}"));
    }
    let mut req = match body {
        Some(b) => builder.header("content-type", "application/json").body(Body::from(b.to_string())).unwrap(),
        None => builder.body(Body::empty()).unwrap(),
    };
    req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([203, 0, 113, 7], 40000))));
    req
}

pub trait NowUtc {
    fn now_utc(&self) -> DateTime<Utc>;
}

impl NowUtc for ManualClock {
    fn now_utc(&self) -> DateTime<Utc> {
        keyward_core::Clock::now(self)
    }
}

/// The error code of an error body.
pub fn code(r: &Response) -> &str {
    r.body["error"]["code"].as_str().unwrap_or("<no error code>")
}

/// Runs each named `async fn(TestApp)` once per backend, as the tests `<name>::sqlite` and
/// `<name>::postgres`, so a failure names backend and test.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name(crate::helpers::TestApp::sqlite().await).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if let Some(app) = crate::helpers::TestApp::postgres(module_path!()).await {
                        super::$name(app).await;
                    }
                }
            }
        )*
    };
}
pub(crate) use on_every_backend;

/// A `redis-server` of the test's own on a free loopback port (never the shared one), killed on drop.
pub struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = Self { port, dir: tempfile::TempDir::new().unwrap(), child: None };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts it on the same port and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (the test script installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `want` nodes listen on `channel`.
    pub async fn subscribed(&self, channel: &str, want: i64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while self.subscribers(channel).await < want {
            assert!(std::time::Instant::now() < deadline, "the nodes did not (re)subscribe");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many nodes listen on `channel`.
    pub async fn subscribers(&self, channel: &str) -> i64 {
        let client = redis::Client::open(self.url()).unwrap();
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return 0 };
        let counts: Vec<(String, i64)> =
            redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(&mut conn).await.unwrap_or_default();
        counts.first().map_or(0, |(_, n)| *n)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The rule of a route that needs `scopes`.
fn rule(scopes: &[&str]) -> RouteRule {
    RouteRule { scopes: scopes.iter().map(|s| Scope::parse(s).unwrap()).collect(), ..Default::default() }
}

/// The protected API of the gateway and proxy-hook tests: `/public` open, `/projects` needing
/// `read:projects` (`write:projects` to POST), `GET /reports` needing `read:reports`.
pub fn protected_api_routes() -> Vec<GatewayRoute> {
    vec![
        GatewayRoute {
            prefix: "/public".into(),
            methods: vec![],
            rule: RouteRule { public: true, ..Default::default() },
        },
        GatewayRoute { prefix: "/projects".into(), methods: vec![], rule: rule(&["read:projects"]) },
        GatewayRoute { prefix: "/projects".into(), methods: vec![Method::POST], rule: rule(&["write:projects"]) },
        GatewayRoute { prefix: "/reports".into(), methods: vec![Method::GET], rule: rule(&["read:reports"]) },
    ]
}
