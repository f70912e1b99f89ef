//! The PostgreSQL backend: the store for several Keyward nodes sharing one database, migrated with the
//! reversible migrations in `migrations/postgres` (the same versions as SQLite's).
//!
//! Connections come from one pool. Every change runs in a transaction that first locks the row it
//! changes (`SELECT ... FOR UPDATE`): the organization for a key creation or an import, so that the
//! `max_api_keys` count and the insert cannot interleave with another node's; the key itself for an
//! update or a revocation, so that the audit diff is computed against what is really replaced.
//!
//! The statements and rows are the ones both backends share (`crate::sql`); this module says how
//! PostgreSQL stores the column types that differ and how its errors read.

mod usage;

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;
use sqlx::error::BoxDynError;
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgQueryResult};
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{Arguments, Database, Postgres, QueryBuilder, Transaction};
use uuid::Uuid;

use crate::sql::{Arg, Backend, Dialect, SearchCandidates, Stmt, TRIGRAM};
use crate::{StoreError, StoreResult};

/// The schema, embedded at build time so the binary migrates its own database.
static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/postgres");

/// How long a caller waits for a free connection before the store answers `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Per node. PostgreSQL's default `max_connections` is 100; ten nodes fit.
const MAX_CONNECTIONS: u32 = 10;

/// A Keyward store in a PostgreSQL database (in the first schema of the connection's `search_path`).
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to the database a URL names: `postgres://user:password@host:5432/db`. libpq's
    /// parameters work, e.g. `?sslmode=require` or `?options[search_path]=keyward` to keep Keyward in a
    /// schema of its own. Does not migrate; see [`crate::Store::migrate_up`].
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url).map_err(db)?.application_name("keyward");
        // One connection outside the pool first: a pool that cannot connect says only "pool timed out"
        // after its timeout; this says why (connection refused, authentication failed, no database).
        match tokio::time::timeout(ACQUIRE_TIMEOUT, sqlx::Connection::connect_with(&options)).await {
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "the server did not answer within {} s",
                    ACQUIRE_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(e)) => return Err(db(e)),
            Ok(Ok(first)) => {
                let first: PgConnection = first;
                let _ = sqlx::Connection::close(first).await;
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(db)?;
        Ok(Self { pool })
    }

    /// The pool, for tests that look at the database directly.
    #[doc(hidden)]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

// -----------------------------------------------------------------------------------------------
// Errors

/// Maps a driver error onto what a caller can act on. SECURITY: only PostgreSQL's primary message is
/// kept (it names constraints and columns); its `DETAIL`, which may quote the values of a row, never
/// leaves this function.
fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        sqlx::Error::Database(dbe) => {
            let code = dbe.code().map(|c| c.into_owned()).unwrap_or_default();
            if dbe.is_unique_violation() {
                let what = match dbe.constraint() {
                    Some("organizations_slug_unique") => "slug already exists",
                    Some("api_keys_key_hash_unique") => "key hash already exists",
                    _ => "id already exists",
                };
                return StoreError::Conflict(what.to_owned());
            }
            let message = format!("{code}: {}", dbe.message());
            // Connection trouble, the server shutting down or out of resources, and the transaction
            // conflicts PostgreSQL asks clients to retry: all may pass, and none is our bug.
            let transient = code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "40001"
                || code == "40P01";
            if transient { StoreError::Unavailable(message) } else { StoreError::Internal(message) }
        }
        other => StoreError::Internal(other.to_string()),
    }
}

// -----------------------------------------------------------------------------------------------
// Column encodings

/// Keys whose name or owner id holds `needle`, of one or two characters, by the GIN index of migration
/// 0012: the needle with ASCII letters folded is one of the indexed substrings, so exactly the keys
/// holding it.
fn short_candidates(q: &mut Stmt, needle: &str) {
    q.push("SELECT id AS k FROM api_keys WHERE api_keys_search_grams(name, owner_id) @> ARRAY[")
        .push_arg(needle.to_ascii_lowercase())
        .push("::text]");
}

/// How many keys hold `needle` (one or two characters), by the statistics `ANALYZE` keeps on the
/// expression of migration 0012's index: its most common substrings, each with the share of keys
/// holding it, times the keys counted. 0 for a rarer one, and before any `ANALYZE`.
fn short_estimate(q: &mut Stmt, needle: &str) {
    q.push(
        "SELECT COALESCE(MAX(e.share * c.reltuples), 0)::bigint
         FROM pg_stats AS s
         CROSS JOIN LATERAL unnest(s.most_common_elems::text::text[], s.most_common_elem_freqs)
             AS e(element, share)
         JOIN pg_class AS c ON c.oid = 'api_keys'::regclass
         WHERE s.schemaname = current_schema() AND s.tablename = 'api_keys_search_grams' AND e.element = ",
    )
    .push_arg(needle.to_ascii_lowercase());
}

/// Ids are `uuid`, times `timestamptz`, JSON `jsonb` and lists of strings `text[]`: sqlx reads them as
/// they are.
impl Dialect for Postgres {
    type Id = Uuid;
    type Time = DateTime<Utc>;
    type Json = Json<Value>;
    type List = Vec<String>;
    type Day = NaiveDate;

    const FOR_UPDATE: &'static str = " FOR UPDATE";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    const TRUE: &'static str = "TRUE";
    const FALSE: &'static str = "FALSE";

    fn ascii_lower(column: &str) -> String {
        format!("translate({column}, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')")
    }

    // A needle of three characters or more: pg_trgm GIN indexes on the searched expressions (migration
    // 0008), with statistics on them: the planner reads a rare needle's keys from them and walks a
    // common one's newest first. A shorter one: the index of short substrings (migration 0012), which
    // the store reads itself, since the search's predicate does not name its expression.
    fn search_candidates(needle: &str) -> Option<SearchCandidates> {
        (1..TRIGRAM).contains(&needle.chars().count()).then_some(SearchCandidates {
            key: "id",
            join: "JOIN",
            select: short_candidates,
            estimate: Some(short_estimate),
        })
    }

    // The trigram indexes are chosen for a rare needle only with statistics on the keys. Autovacuum
    // gathers them, but only some time after a large import (or never, where it is off).
    const ANALYZE_KEYS: Option<&'static str> = Some("ANALYZE api_keys");

    fn error(e: sqlx::Error) -> StoreError {
        db(e)
    }

    fn rows_affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }

    fn arguments<'q>(args: Vec<Arg>) -> Result<<Postgres as Database>::Arguments<'q>, BoxDynError> {
        let mut out = PgArguments::default();
        for arg in args {
            match arg {
                Arg::Id(v) => out.add(v)?,
                Arg::Time(v) => out.add(v)?,
                Arg::Day(v) => out.add(v)?,
                Arg::Text(v) => out.add(v)?,
                Arg::Int(v) => out.add(v)?,
                Arg::Bool(v) => out.add(v)?,
                Arg::Bytes(v) => out.add(v)?,
                Arg::Json(v) => out.add(Json(v))?,
                Arg::List(v) => out.add(v)?,
            }
        }
        Ok(out)
    }

    fn read_id(v: Uuid, _column: &str) -> StoreResult<Uuid> {
        Ok(v)
    }

    fn id_text(v: &Uuid) -> String {
        v.to_string()
    }

    fn read_time(v: DateTime<Utc>, _column: &str) -> StoreResult<DateTime<Utc>> {
        Ok(v)
    }

    fn read_json(v: Json<Value>, _column: &str) -> StoreResult<Value> {
        Ok(v.0)
    }

    fn read_list(v: Vec<String>, _column: &str) -> StoreResult<Vec<String>> {
        Ok(v)
    }

    fn read_day(v: NaiveDate, _column: &str) -> StoreResult<NaiveDate> {
        Ok(v)
    }

    fn build<'a: 'b, 'b>(
        q: &'b mut QueryBuilder<'a, Postgres>,
    ) -> Query<'b, Postgres, <Postgres as Database>::Arguments<'b>> {
        q.build()
    }
}

impl Backend for PostgresStore {
    const NAME: &'static str = "postgres";
    type Db = Postgres;

    async fn reader(&self) -> StoreResult<PoolConnection<Postgres>> {
        self.pool.acquire().await.map_err(db)
    }

    async fn writer(&self) -> StoreResult<Transaction<'static, Postgres>> {
        self.pool.begin().await.map_err(db)
    }

    /// sqlx holds a PostgreSQL advisory lock while it migrates: nodes starting together take turns.
    fn migrations(&self) -> (&'static Migrator, &PgPool) {
        (&MIGRATOR, &self.pool)
    }

    async fn snapshot(&self) -> StoreResult<Transaction<'static, Postgres>> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        Ok(tx)
    }
}
