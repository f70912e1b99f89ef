//! The SQLite backend: one file in WAL mode (or `sqlite::memory:` for tests), migrated with the
//! reversible migrations in `migrations/sqlite`.
//!
//! Reads go through a pool of connections that run side by side (WAL lets readers proceed while a
//! write is in progress). Writes go through a second pool with a single connection, so writes from
//! this process queue here instead of fighting over the database lock; every write transaction starts
//! with `BEGIN IMMEDIATE`, which takes the write lock up front, so another process writing the same
//! file (the CLI next to a running server) waits for the busy timeout instead of interleaving between
//! our read and our write.
//!
//! The statements and rows are the ones both backends share (`crate::sql`); this module says how
//! SQLite stores the column types that differ (all as TEXT) and how its errors read.

mod usage;

use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;
use sqlx::error::BoxDynError;
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::query::Query;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteQueryResult,
    SqliteSynchronous,
};
use sqlx::{Arguments, Database, QueryBuilder, Sqlite, Transaction};
use uuid::Uuid;

use crate::sql::{Arg, Backend, Dialect, SearchCandidates, Stmt, TRIGRAM};
use crate::{StoreError, StoreResult, corrupt};

/// The schema, embedded at build time so the binary migrates its own database.
static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/sqlite");

/// How long a statement waits for another process's write lock before giving up as `Unavailable`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Readers run side by side under WAL; a few are plenty on the small machines keyward targets.
const READ_CONNECTIONS: u32 = 4;
/// The write connection's page cache, KiB (an upper bound, filled as pages are touched).
const WRITE_CACHE_KIB: u32 = 16 * 1024;
/// Where the write connection keeps its temporary b-trees (statement journals): in memory. A fold sets
/// its own for its duration and restores this one.
const WRITE_TEMP_STORE: &str = "memory";
/// WAL pages past which a commit checkpoints on the write connection itself (SQLite's default is
/// 1,000): a fallback, the usage writer checkpoints in the background first
/// ([`SqliteStore::checkpoint_in_background`]).
const WRITE_AUTOCHECKPOINT_PAGES: u32 = 4_000;

/// A Keyward store in one SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    /// One connection: this process's writes are serialized here.
    write: SqlitePool,
    /// Whether a background WAL checkpoint is running; `None` for an in-memory database (no WAL).
    checkpointing: Option<Arc<AtomicBool>>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database a URL names: `sqlite://path/to/keyward.db`,
    /// `sqlite:keyward.db` or `sqlite::memory:`. Does not migrate; see [`crate::Store::migrate_up`].
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(db)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        if is_memory(url) {
            // Each connection to `:memory:` would be a database of its own, and the database vanishes
            // with its last connection: one connection, kept for the life of the pool, serves both.
            let pool = SqlitePoolOptions::new()
                .min_connections(1)
                .max_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options)
                .await
                .map_err(db)?;
            return Ok(Self { read: pool.clone(), write: pool, checkpointing: None });
        }
        // The write pool first: it creates the file and switches it to WAL before any reader opens it.
        // Its page cache is larger than SQLite's 2 MiB default, so that a usage batch finds the pages
        // it writes in memory instead of re-reading them from the OS. Batches only append (raw events
        // are indexed by time, rollups are folded), so a modest cache serves them; a larger one only
        // stays resident (BENCHMARKS.md, "Tried and not kept"). Its temporary files (the statement
        // journal of a multi-row insert) stay in memory.
        let write_options = options
            .clone()
            .pragma("cache_size", format!("-{WRITE_CACHE_KIB}"))
            .pragma("temp_store", WRITE_TEMP_STORE)
            .pragma("wal_autocheckpoint", WRITE_AUTOCHECKPOINT_PAGES.to_string());
        let write = SqlitePoolOptions::new().max_connections(1).connect_with(write_options).await.map_err(db)?;
        let read =
            SqlitePoolOptions::new().max_connections(READ_CONNECTIONS).connect_with(options).await.map_err(db)?;
        Ok(Self { read, write, checkpointing: Some(Arc::new(AtomicBool::new(false))) })
    }

    /// Copies the WAL into the database file from a reader connection, in the background, unless a
    /// copy is already running. Called after each usage batch: left to the write connection's
    /// automatic checkpoint, the copy (and its fsyncs) runs inside a batch's commit and holds the
    /// single writer meanwhile. A passive checkpoint runs beside the writer; the write connection's own
    /// automatic checkpoint, at a higher mark, stays as the fallback.
    fn checkpoint_in_background(&self) {
        let Some(running) = &self.checkpointing else { return };
        if running.swap(true, Ordering::AcqRel) {
            return;
        }
        let (pool, running) = (self.read.clone(), running.clone());
        tokio::spawn(async move {
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
                tracing::debug!(error = %e, "background WAL checkpoint failed; the writer's own will run");
            }
            running.store(false, Ordering::Release);
        });
    }
}

fn is_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

// -----------------------------------------------------------------------------------------------
// Errors

/// Maps a driver error onto what a caller can act on. SQLite's messages name tables and columns, never
/// bound values, so no key material can reach an error from here.
fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::Database(ref dbe) if dbe.is_unique_violation() => {
            let message = dbe.message();
            let what = if message.contains("organizations.slug") {
                "slug already exists"
            } else if message.contains("api_keys.key_hash") {
                "key hash already exists"
            } else {
                "id already exists"
            };
            StoreError::Conflict(what.to_owned())
        }
        // Another process held the lock past the busy timeout, or the file cannot be reached: both may
        // pass, and neither is our bug.
        sqlx::Error::Database(ref dbe)
            if matches!(primary_code(dbe.as_ref()), Some(SQLITE_BUSY | SQLITE_LOCKED | SQLITE_CANTOPEN)) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        other => StoreError::Internal(other.to_string()),
    }
}

const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_CANTOPEN: i32 = 14;

/// SQLite's primary result code: sqlx reports extended codes, whose low byte is the primary one.
fn primary_code(e: &dyn sqlx::error::DatabaseError) -> Option<i32> {
    e.code()?.parse::<i32>().ok().map(|code| code & 0xff)
}

// -----------------------------------------------------------------------------------------------
// Column encodings

/// The one stored form of a timestamp: fixed width, UTC, microseconds, so text order is time order.
/// `2026-11-23T17:43:56.170511Z`, by chrono's RFC 3339 writer, not a `format` string, which would be parsed again for every value (a
/// timestamp per usage event, on the ledger's write path).
fn ts(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn opt_ts(at: Option<DateTime<Utc>>) -> Option<String> {
    at.map(ts)
}

fn parse_ts(s: &str, column: &str) -> StoreResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).map_err(|e| corrupt(column, e))
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str, column: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| corrupt(column, e))
}

/// Keys whose name or owner id holds `needle` by the FTS5 trigram table: an FTS5 string (a phrase) of
/// the needle, `"` doubled, every other character as it is. The trigram tokenizer folds letters by
/// Unicode case rules, more than the search's ASCII folding: the phrase finds every key the search
/// finds, and perhaps some it does not.
fn trigram_candidates(q: &mut Stmt, needle: &str) {
    let phrase = format!("\"{}\"", needle.replace('"', "\"\""));
    q.push("SELECT rowid AS k FROM api_keys_search WHERE api_keys_search MATCH ").push_arg(phrase);
}

/// Keys whose name or owner id holds `needle`, of one or two characters, by the FTS5 table of
/// migration 0012: the needle with ASCII letters folded is one of its tokens, written as the table
/// writes them (its UTF-8 bytes in hex), so exactly the keys holding it.
fn short_candidates(q: &mut Stmt, needle: &str) {
    let token = needle.to_ascii_lowercase().bytes().fold(String::from("\""), |mut token, b| {
        let _ = write!(token, "{b:02X}");
        token
    });
    q.push("SELECT rowid AS k FROM api_keys_grams WHERE api_keys_grams MATCH ").push_arg(token + "\"");
}

/// Ids, times, days, JSON documents and lists of strings are all TEXT: ids hyphenated, times as [`ts`]
/// writes them, days `YYYY-MM-DD`, lists as JSON arrays.
impl Dialect for Sqlite {
    type Id = String;
    type Time = String;
    type Json = String;
    type List = String;
    type Day = String;

    const FOR_UPDATE: &'static str = "";
    const SKIP_LOCKED: &'static str = "";
    const TRUE: &'static str = "1";
    const FALSE: &'static str = "0";

    fn ascii_lower(column: &str) -> String {
        // Without the ICU extension (not built in), SQLite's `lower` folds ASCII only.
        format!("lower({column})")
    }

    // The FTS5 tables of migrations 0008 (trigrams) and 0012 (shorter needles), keyed by api_keys'
    // rowid. CROSS JOIN keeps the candidates the outer loop: SQLite never reorders it.
    fn search_candidates(needle: &str) -> Option<SearchCandidates> {
        let select = match needle.chars().count() {
            0 => return None,
            n if n < TRIGRAM => short_candidates,
            _ => trigram_candidates,
        };
        // An FTS5 count stops at its limit, however common the needle.
        Some(SearchCandidates { key: "rowid", join: "CROSS JOIN", select, estimate: None })
    }

    // The store's queries are written for SQLite's plans without statistics (the key search chooses
    // its own candidates): `ANALYZE` would only let the planner change them.
    const ANALYZE_KEYS: Option<&'static str> = None;

    fn error(e: sqlx::Error) -> StoreError {
        db(e)
    }

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    fn arguments<'q>(args: Vec<Arg>) -> Result<SqliteArguments<'q>, BoxDynError> {
        let mut out = SqliteArguments::default();
        for arg in args {
            match arg {
                Arg::Id(v) => out.add(v.map(|id| id.to_string()))?,
                Arg::Time(v) => out.add(opt_ts(v))?,
                Arg::Day(v) => out.add(usage::day(v))?,
                Arg::Text(v) => out.add(v)?,
                Arg::Int(v) => out.add(v)?,
                Arg::Bool(v) => out.add(v)?,
                Arg::Bytes(v) => out.add(v)?,
                Arg::Json(v) => out.add(serde_json::to_string(&v)?)?,
                Arg::List(v) => out.add(serde_json::to_string(&v)?)?,
            }
        }
        Ok(out)
    }

    fn read_id(v: String, column: &str) -> StoreResult<Uuid> {
        Uuid::parse_str(&v).map_err(|e| corrupt(column, e))
    }

    fn id_text(v: &String) -> String {
        v.clone()
    }

    fn read_time(v: String, column: &str) -> StoreResult<DateTime<Utc>> {
        parse_ts(&v, column)
    }

    fn read_json(v: String, column: &str) -> StoreResult<Value> {
        parse_json(&v, column)
    }

    fn read_list(v: String, column: &str) -> StoreResult<Vec<String>> {
        parse_json(&v, column)
    }

    fn read_day(v: String, column: &str) -> StoreResult<NaiveDate> {
        NaiveDate::parse_from_str(&v, "%Y-%m-%d").map_err(|e| corrupt(column, e))
    }

    fn build<'a: 'b, 'b>(
        q: &'b mut QueryBuilder<'a, Sqlite>,
    ) -> Query<'b, Sqlite, <Sqlite as Database>::Arguments<'b>> {
        q.build()
    }
}

impl Backend for SqliteStore {
    const NAME: &'static str = "sqlite";
    type Db = Sqlite;

    async fn reader(&self) -> StoreResult<PoolConnection<Sqlite>> {
        self.read.acquire().await.map_err(db)
    }

    /// Holds the database write lock from its first statement (see the module's doc).
    async fn writer(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        self.write.begin_with("BEGIN IMMEDIATE").await.map_err(db)
    }

    fn migrations(&self) -> (&'static Migrator, &SqlitePool) {
        (&MIGRATOR, &self.write)
    }

    /// A deferred transaction on a reader: under WAL its first read fixes the snapshot.
    async fn snapshot(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        self.read.begin().await.map_err(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stored_time;

    #[test]
    fn timestamps_are_fixed_width_and_round_trip() {
        let at = DateTime::from_timestamp(1_800_000_000, 123_456_789).unwrap_or_default();
        let text = ts(at);
        assert_eq!(text, "2027-01-15T08:00:00.123456Z");
        assert_eq!(parse_ts(&text, "t").ok(), Some(stored_time(at)));
        let whole = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        assert_eq!(ts(whole), "2027-01-15T08:00:00.000000Z");
        assert!(ts(whole) < text, "text order is time order");
        assert!(matches!(parse_ts("yesterday", "t"), Err(StoreError::Internal(_))));
    }

    #[test]
    fn memory_urls_are_recognised() {
        assert!(is_memory("sqlite::memory:"));
        assert!(is_memory("sqlite://file:x?mode=memory&cache=shared"));
        assert!(!is_memory("sqlite://data/keyward.db"));
    }
}
