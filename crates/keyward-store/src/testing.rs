//! Test support shared by every crate's tests (not part of the API): a fresh PostgreSQL schema per
//! test, on the server `KEYWARD_TEST_POSTGRES_URL` names.
//!
//! - Each [`PgSchema`] is `kw_test_<UUIDv7>`, created empty; its URL selects it with libpq's
//!   `options` (`search_path`), so the store and its migrations see nothing else. It is dropped when
//!   the guard is, also when the test panicked.
//! - Schemas of crashed runs are swept the first time a process asks for a schema: the UUIDv7 in the
//!   name carries its creation time, and those older than [`STALE_AFTER`] are dropped.
//! - `KEYWARD_TEST_SKIP_POSTGRES=1` (set by `scripts/test.sh` when PostgreSQL cannot be reached outside
//!   CI) turns every PostgreSQL test into one loud line and a pass. Without it an unreachable server
//!   fails the test.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use keyward_core::{Environment, HashAlgorithm, IpAllowList, KeyHash, KeyId, OrgId, ScopeSet};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::{ApiKey, LimitOverrides};

/// Where the PostgreSQL tests connect.
pub const URL_ENV: &str = "KEYWARD_TEST_POSTGRES_URL";
/// Set to `1` to skip the PostgreSQL tests.
pub const SKIP_ENV: &str = "KEYWARD_TEST_SKIP_POSTGRES";
/// The development and CI machines' server: local, trust auth, database `test`.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// A test schema older than this belongs to a run that crashed before dropping it.
pub const STALE_AFTER: Duration = Duration::from_secs(60 * 60);
const PREFIX: &str = "kw_test_";

/// The server's URL, from the environment or the default.
pub fn base_url() -> String {
    std::env::var(URL_ENV).ok().filter(|u| !u.trim().is_empty()).unwrap_or_else(|| DEFAULT_URL.to_owned())
}

/// Whether the PostgreSQL tests are to be skipped; says so loudly when they are.
pub fn skip_postgres(test: &str) -> bool {
    let skip = std::env::var(SKIP_ENV).is_ok_and(|v| v == "1");
    if skip {
        eprintln!("!!!!! SKIPPED {test}: {SKIP_ENV}=1 (PostgreSQL not reachable) !!!!!");
    }
    skip
}

/// An empty schema of its own for one test; dropped with the guard.
#[derive(Debug)]
pub struct PgSchema {
    name: String,
    base_url: String,
    url: String,
}

static SWEPT: OnceCell<()> = OnceCell::const_new();

impl PgSchema {
    /// A fresh schema, or `None` when PostgreSQL tests are skipped. Panics (failing the test) when the
    /// server cannot be reached.
    pub async fn create(test: &str) -> Option<Self> {
        if skip_postgres(test) {
            return None;
        }
        let base_url = base_url();
        let mut conn = match PgConnection::connect(&base_url).await {
            Ok(conn) => conn,
            Err(e) => panic!(
                "PostgreSQL at {} is not reachable ({e}); start it (scripts/test.sh does), point {URL_ENV} at \
                 one, or set {SKIP_ENV}=1 to skip these tests",
                redact(&base_url)
            ),
        };
        SWEPT
            .get_or_init(|| async {
                if let Err(e) = sweep(&mut conn, STALE_AFTER).await {
                    eprintln!("warning: sweeping stale test schemas failed: {e}");
                }
                // Migration 0008 creates pg_trgm where it is missing, in the first schema of the search
                // path: a test's own, whose drop would take the extension, and with it the trigram
                // indexes of every other test's schema, from under them. Here it lives in `public`, as
                // on a server. Without it (no contrib package) the migrations still run.
                if let Err(e) =
                    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA public").execute(&mut conn).await
                {
                    eprintln!("warning: creating pg_trgm failed: {e}");
                }
            })
            .await;
        let name = format!("{PREFIX}{}", Uuid::now_v7().simple());
        if let Err(e) = sqlx::query(&format!("CREATE SCHEMA \"{name}\"")).execute(&mut conn).await {
            panic!("creating test schema {name}: {e}");
        }
        let _ = conn.close().await;
        let separator = if base_url.contains('?') { '&' } else { '?' };
        let url = format!("{base_url}{separator}options[search_path]={name}");
        Some(Self { name, base_url, url })
    }

    /// The database URL that selects this schema.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on: a thread of its own with a
        // small runtime does the async work. A failure only leaves the schema for the next sweep.
        let (name, base_url) = (self.name.clone(), self.base_url.clone());
        let worker = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&base_url).await {
                    // Never hang a test run on a lock some leftover connection still holds.
                    let _ = sqlx::query("SET lock_timeout = '5s'").execute(&mut conn).await;
                    if let Err(e) =
                        sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE")).execute(&mut conn).await
                    {
                        eprintln!("warning: dropping test schema {name} failed: {e}");
                    }
                    let _ = conn.close().await;
                }
            });
        });
        let _ = worker.join();
    }
}

/// Drops every `kw_test_*` schema created more than `older_than` ago; returns how many.
pub async fn sweep(conn: &mut PgConnection, older_than: Duration) -> Result<usize, sqlx::Error> {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)")
            .bind(PREFIX)
            .fetch_all(&mut *conn)
            .await?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut dropped = 0;
    for name in names {
        let created = name
            .strip_prefix(PREFIX)
            .and_then(|id| Uuid::parse_str(id).ok())
            .and_then(|id| id.get_timestamp())
            .map(|t| Duration::from_secs(t.to_unix().0));
        // A name that does not parse was not made by this module: left alone.
        if created.is_some_and(|at| now.saturating_sub(at) > older_than) {
            sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE")).execute(&mut *conn).await?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// `postgres://user:secret@host/db` → `postgres://user:…@host/db`, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => match url[scheme + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:…{}", &url[..scheme + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

/// A key of `organization_id` with nothing set but what every key has, as a store returns it: for
/// unit tests here and in the crates that serve keys.
pub fn key(organization_id: OrgId, at: DateTime<Utc>) -> ApiKey {
    ApiKey {
        id: KeyId::new(),
        organization_id,
        owner_id: None,
        name: "k".into(),
        description: None,
        environment: Environment::Live,
        prefix: "sk_live_".into(),
        hint: "abcd".into(),
        hash_algorithm: HashAlgorithm::Sha256,
        key_hash: KeyHash([0; 32]),
        scopes: ScopeSet::default(),
        allowed_ips: IpAllowList::default(),
        expires_at: None,
        is_active: true,
        revoked_at: None,
        revoke_reason: None,
        plan: None,
        limits: LimitOverrides::default(),
        metadata: json!({}),
        total_requests: 0,
        last_used_at: None,
        last_used_ip: None,
        rotated_from: None,
        replaced_by: None,
        created_by: None,
        created_at: at,
        updated_at: at,
        lineage_id: None,
    }
}
