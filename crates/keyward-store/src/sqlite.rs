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

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use keyward_core::diff::diff;
use keyward_core::{KeyHash, KeyId, OrgId};
use serde_json::{Value, json};
use sqlx::error::BoxDynError;
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::query::Query;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteQueryResult, SqliteSynchronous,
};
use sqlx::{Arguments, Database, QueryBuilder, Sqlite, Transaction};
use uuid::Uuid;

mod lifecycle;

use crate::sql::{Arg, Backend, Dialect, rows, store};
use crate::{
    Actor, ApiKey, AuditEntry, AuditFilter, Changed, EventKind, ImportOutcome, KeyFilter, KeyImport, KeyPatch,
    KeyUsage, KeyWithOrg, MigrationInfo, NewKey, NewOrganization, Organization, OrganizationPatch, Page, PageRequest,
    Store, StoreError, StoreResult, corrupt, plan_import, stored_time,
};

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
    /// `sqlite:keyward.db` or `sqlite::memory:`. Does not migrate; see [`Store::migrate_up`].
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
        // Its page cache is larger than SQLite's 2 MiB default: the usage ledger's batches insert into
        // four indexes of a growing table, and with the default cache every batch re-read from the OS
        // most of the pages it touched (`pread` was a third of the writer's time in a profile). Since
        // the events' key index is gone (migration 0005) and rollups are folded (0006), batches only
        // append: 16 MiB serve them as well as 64 did (42,000 verifications/s and the same writer CPU
        // either way at 1,000 keys) and keep 48 MiB less resident. Its temporary files (the statement
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
    /// automatic checkpoint, the copy (and its fsyncs) ran inside every other batch's commit and held
    /// the single writer for a quarter of its time. A passive checkpoint runs beside the writer; the
    /// write connection's own automatic checkpoint, at a higher mark, stays as the fallback.
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
/// timestamp per usage event: 1 % of a loaded server).
fn ts(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn opt_ts(at: Option<DateTime<Utc>>) -> Option<String> {
    at.map(ts)
}

fn parse_ts(s: &str, column: &str) -> StoreResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).map_err(|e| corrupt(column, e))
}

fn parse_id<T: FromStr>(s: &str, column: &str) -> StoreResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| corrupt(column, e))
}

fn json_text(value: &impl serde::Serialize) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Internal(format!("encoding JSON: {e}")))
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str, column: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| corrupt(column, e))
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
    const TRUE: &'static str = "1";
    const FALSE: &'static str = "0";

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
        parse_id(&v, column)
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
    type Db = Sqlite;

    async fn reader(&self) -> StoreResult<PoolConnection<Sqlite>> {
        self.read.acquire().await.map_err(db)
    }

    /// Holds the database write lock from its first statement (see the module's doc).
    async fn writer(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        self.write.begin_with("BEGIN IMMEDIATE").await.map_err(db)
    }

    /// A deferred transaction on a reader: under WAL its first read fixes the snapshot.
    fn migrations(&self) -> (&'static Migrator, &SqlitePool) {
        (&MIGRATOR, &self.write)
    }

    async fn snapshot(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        self.read.begin().await.map_err(db)
    }
}

// -----------------------------------------------------------------------------------------------
// Statements of the writes

type KeyRow = rows::KeyRow<Sqlite>;

async fn select_org(conn: &mut SqliteConnection, id: OrgId) -> StoreResult<Organization> {
    store::select_org::<Sqlite>(conn, id).await
}

async fn select_key(conn: &mut SqliteConnection, id: KeyId) -> StoreResult<ApiKey> {
    store::select_key::<Sqlite>(conn, id).await
}

async fn held_keys(conn: &mut SqliteConnection, org: OrgId) -> StoreResult<i64> {
    store::held_keys::<Sqlite>(conn, org).await
}

async fn append_audit(
    conn: &mut SqliteConnection,
    action: &str,
    key_id: Option<KeyId>,
    organization_id: OrgId,
    actor: &Actor,
    details: &Value,
) -> StoreResult<AuditEntry> {
    store::append_audit::<Sqlite>(conn, action, key_id, organization_id, actor, details).await
}

/// A key row to insert: created keys and imported keys alike.
struct KeyInsert<'a> {
    key: &'a NewKey,
    legacy: bool,
    created_at: DateTime<Utc>,
}

/// Rows per multi-row INSERT: 25 parameters a row stays well under SQLite's 32,766. One statement per
/// few hundred rows, not per row: each statement is a round trip to sqlx's SQLite worker thread.
const INSERT_ROWS: usize = 500;
/// Hashes per `IN (...)` lookup of an import.
const LOOKUP_HASHES: usize = 500;

/// The one INSERT of key rows.
async fn insert_key_rows(conn: &mut SqliteConnection, rows: &[KeyInsert<'_>], actor: &Actor) -> StoreResult<()> {
    for chunk in rows.chunks(INSERT_ROWS) {
        let mut encoded = Vec::with_capacity(chunk.len());
        for row in chunk {
            encoded.push((
                json_text(&row.key.scopes.to_strings())?,
                json_text(&row.key.allowed_ips.to_strings())?,
                json_text(&row.key.metadata)?,
            ));
        }
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO api_keys (id, organization_id, owner_id, name, description, environment, prefix, key_hint,
                 key_hash, hash_algorithm, scopes, allowed_ips, expires_at, is_active, plan, rate_limit_per_minute,
                 rate_limit_per_hour, rate_limit_per_day, monthly_request_limit, metadata, rotated_from, created_by,
                 created_at, updated_at, legacy) ",
        );
        qb.push_values(chunk.iter().zip(encoded), |mut b, (row, (scopes, allowed_ips, metadata))| {
            let key = row.key;
            b.push_bind(key.id.to_string())
                .push_bind(key.organization_id.to_string())
                .push_bind(key.owner_id.clone())
                .push_bind(key.name.clone())
                .push_bind(key.description.clone())
                .push_bind(key.environment.as_str())
                .push_bind(key.prefix.clone())
                .push_bind(key.hint.clone())
                .push_bind(key.key_hash.0.to_vec())
                .push_bind(key.hash_algorithm.as_str())
                .push_bind(scopes)
                .push_bind(allowed_ips)
                .push_bind(opt_ts(key.expires_at))
                .push_bind(key.is_active)
                .push_bind(key.plan.clone())
                .push_bind(key.limits.rate_limit_per_minute)
                .push_bind(key.limits.rate_limit_per_hour)
                .push_bind(key.limits.rate_limit_per_day)
                .push_bind(key.limits.monthly_request_limit)
                .push_bind(metadata)
                .push_bind(key.rotated_from.map(|id| id.to_string()))
                .push_bind(actor.actor.clone())
                .push_bind(ts(row.created_at))
                .push_bind(ts(actor.at))
                .push_bind(row.legacy);
        });
        qb.build().execute(&mut *conn).await.map_err(db)?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.read).await.map_err(db)?;
        Ok(())
    }

    async fn migrate_up(&self) -> StoreResult<Vec<MigrationInfo>> {
        store::migrate_up(self).await
    }

    async fn migrate_down(&self, steps: u32) -> StoreResult<Vec<MigrationInfo>> {
        store::migrate_down(self, steps).await
    }

    async fn migration_status(&self) -> StoreResult<Vec<MigrationInfo>> {
        store::migration_status(self).await
    }

    async fn insert_org(&self, org: NewOrganization, actor: &Actor) -> StoreResult<Organization> {
        let mut tx = self.writer().await?;
        sqlx::query(
            "INSERT INTO organizations (id, name, slug, email, plan, is_active, monthly_request_limit,
                 rate_limit_per_minute, rate_limit_per_hour, rate_limit_per_day, max_api_keys, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(org.id.to_string())
        .bind(&org.name)
        .bind(&org.slug)
        .bind(&org.email)
        .bind(&org.plan)
        .bind(org.is_active)
        .bind(org.limits.monthly_request_limit)
        .bind(org.limits.rate_limit_per_minute)
        .bind(org.limits.rate_limit_per_hour)
        .bind(org.limits.rate_limit_per_day)
        .bind(org.max_api_keys)
        .bind(ts(actor.at))
        .bind(ts(actor.at))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let created = select_org(&mut tx, org.id).await?;
        append_audit(&mut tx, "create", None, created.id, actor, &json!({ "after": created.audit_json() })).await?;
        tx.commit().await.map_err(db)?;
        Ok(created)
    }

    async fn get_org(&self, id: OrgId) -> StoreResult<Organization> {
        store::get_org(self, id).await
    }

    async fn find_org_by_slug(&self, slug: &str) -> StoreResult<Option<Organization>> {
        store::find_org_by_slug(self, slug).await
    }

    async fn list_orgs(&self, page: PageRequest<OrgId>) -> StoreResult<Page<Organization, OrgId>> {
        store::list_orgs(self, page).await
    }

    async fn update_org(
        &self,
        id: OrgId,
        patch: OrganizationPatch,
        actor: &Actor,
    ) -> StoreResult<Changed<Organization>> {
        let action = patch.action();
        let mut tx = self.writer().await?;
        let before = select_org(&mut tx, id).await?;
        let after = patch.apply_to(&before);
        let Some(details) = diff(&before.audit_json(), &after.audit_json()) else {
            // Nothing changed: no write, no audit row, and `updated_at` stays put.
            return Ok(Changed::updated_org(before));
        };
        sqlx::query(
            "UPDATE organizations SET name = ?, email = ?, plan = ?, is_active = ?, monthly_request_limit = ?,
                 rate_limit_per_minute = ?, rate_limit_per_hour = ?, rate_limit_per_day = ?, max_api_keys = ?,
                 updated_at = ?
             WHERE id = ?",
        )
        .bind(&after.name)
        .bind(&after.email)
        .bind(&after.plan)
        .bind(after.is_active)
        .bind(after.limits.monthly_request_limit)
        .bind(after.limits.rate_limit_per_minute)
        .bind(after.limits.rate_limit_per_hour)
        .bind(after.limits.rate_limit_per_day)
        .bind(after.max_api_keys)
        .bind(ts(actor.at))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        append_audit(&mut tx, action, None, id, actor, &details).await?;
        let updated = select_org(&mut tx, id).await?;
        tx.commit().await.map_err(db)?;
        Ok(Changed::updated_org(updated))
    }

    async fn count_orgs(&self) -> StoreResult<i64> {
        store::count_orgs(self).await
    }

    async fn insert_key(&self, key: NewKey, actor: &Actor) -> StoreResult<Changed<ApiKey>> {
        // IMMEDIATE: the count below and the insert must see the same keys, also across processes, or
        // two concurrent creations could both pass the limit.
        let mut tx = self.writer().await?;
        let org = select_org(&mut tx, key.organization_id).await?;
        if let Some(max) = org.max_api_keys
            && held_keys(&mut tx, org.id).await? >= max
        {
            return Err(StoreError::KeyLimitReached(max));
        }
        insert_key_rows(&mut tx, &[KeyInsert { key: &key, legacy: false, created_at: actor.at }], actor).await?;
        // Read back, so the record returned is exactly what later reads return.
        let created = select_key(&mut tx, key.id).await?;
        let details = json!({ "after": created.audit_json() });
        append_audit(&mut tx, "create", Some(created.id), created.organization_id, actor, &details).await?;
        lifecycle::key_event(&mut tx, EventKind::KeyCreated, &created, actor).await?;
        tx.commit().await.map_err(db)?;
        Ok(Changed::inserted_key(created))
    }

    async fn find_key_by_hash(&self, hash: &KeyHash) -> StoreResult<Option<KeyWithOrg>> {
        store::find_key_by_hash(self, hash).await
    }

    async fn get_key(&self, id: KeyId) -> StoreResult<ApiKey> {
        store::get_key(self, id).await
    }

    async fn list_keys(&self, filter: &KeyFilter, page: PageRequest<KeyId>) -> StoreResult<Page<ApiKey, KeyId>> {
        store::list_keys(self, filter, page).await
    }

    async fn update_key(&self, id: KeyId, patch: KeyPatch, actor: &Actor) -> StoreResult<Changed<ApiKey>> {
        let action = patch.action();
        let mut tx = self.writer().await?;
        let before = select_key(&mut tx, id).await?;
        let after = patch.apply_to(&before);
        let Some(details) = diff(&before.audit_json(), &after.audit_json()) else {
            // Nothing changed: no write, no audit row, and `updated_at` stays put.
            return Ok(Changed::updated_key(before));
        };
        sqlx::query(
            "UPDATE api_keys SET name = ?, description = ?, scopes = ?, allowed_ips = ?, expires_at = ?, metadata = ?,
                 plan = ?, is_active = ?, rate_limit_per_minute = ?, rate_limit_per_hour = ?, rate_limit_per_day = ?,
                 monthly_request_limit = ?, updated_at = ?
             WHERE id = ?",
        )
        .bind(&after.name)
        .bind(&after.description)
        .bind(json_text(&after.scopes.to_strings())?)
        .bind(json_text(&after.allowed_ips.to_strings())?)
        .bind(opt_ts(after.expires_at))
        .bind(json_text(&after.metadata)?)
        .bind(&after.plan)
        .bind(after.is_active)
        .bind(after.limits.rate_limit_per_minute)
        .bind(after.limits.rate_limit_per_hour)
        .bind(after.limits.rate_limit_per_day)
        .bind(after.limits.monthly_request_limit)
        .bind(ts(actor.at))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        append_audit(&mut tx, action, Some(id), before.organization_id, actor, &details).await?;
        lifecycle::key_event(&mut tx, EventKind::KeyUpdated, &after, actor).await?;
        let updated = select_key(&mut tx, id).await?;
        tx.commit().await.map_err(db)?;
        Ok(Changed::updated_key(updated))
    }

    async fn revoke_key(
        &self,
        id: KeyId,
        reason: &str,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Changed<ApiKey>> {
        let at = stored_time(at);
        let mut tx = self.writer().await?;
        let before = select_key(&mut tx, id).await?;
        // SECURITY: a revocation only ever moves earlier. A key already revoked by `at` stays as it is;
        // a key scheduled to stop later (a rotation's grace period) is brought forward, so revoking a
        // leaked key during its grace period stops it now.
        if before.revoked_at.is_some_and(|revoked| revoked <= at) {
            return Ok(Changed::revoked_key(before));
        }
        let mut after = before.clone();
        after.revoked_at = Some(at);
        after.revoke_reason = Some(reason.to_owned());
        let details = diff(&before.audit_json(), &after.audit_json()).unwrap_or_else(|| json!({}));
        sqlx::query("UPDATE api_keys SET revoked_at = ?, revoke_reason = ?, updated_at = ? WHERE id = ?")
            .bind(ts(at))
            .bind(reason)
            .bind(ts(actor.at))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        append_audit(&mut tx, "revoke", Some(id), before.organization_id, actor, &details).await?;
        lifecycle::key_event(&mut tx, EventKind::KeyRevoked, &after, actor).await?;
        let revoked = select_key(&mut tx, id).await?;
        tx.commit().await.map_err(db)?;
        Ok(Changed::revoked_key(revoked))
    }

    async fn record_key_usage(&self, usage: &[KeyUsage]) -> StoreResult<()> {
        if usage.is_empty() {
            return Ok(());
        }
        let mut tx = self.writer().await?;
        for u in usage {
            // SET expressions all see the row as it was, so the two CASEs compare against the old
            // `last_used_at`. An unknown address does not erase the last known one. A key that was
            // deleted since the request matches no row, which is fine.
            sqlx::query(
                "UPDATE api_keys SET
                     total_requests = total_requests + ?1,
                     last_used_ip = CASE WHEN last_used_at IS NULL OR last_used_at < ?2
                                         THEN COALESCE(?3, last_used_ip) ELSE last_used_ip END,
                     last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < ?2
                                         THEN ?2 ELSE last_used_at END
                 WHERE id = ?4",
            )
            .bind(u.requests)
            .bind(ts(u.last_used_at))
            .bind(&u.last_used_ip)
            .bind(u.key_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn import_keys(
        &self,
        organization_id: OrgId,
        keys: Vec<KeyImport>,
        actor: &Actor,
        dry_run: bool,
    ) -> StoreResult<Changed<Vec<ImportOutcome>>> {
        // IMMEDIATE for the same reason as insert_key: the limit and the hashes checked below must be
        // what the inserts land on.
        let mut tx = self.writer().await?;
        let org = select_org(&mut tx, organization_id).await?;
        let held = match org.max_api_keys {
            Some(_) => held_keys(&mut tx, org.id).await?,
            None => 0,
        };
        if keys.iter().any(|k| k.key.organization_id != organization_id) {
            return Err(StoreError::Internal("an imported key names another organization".to_owned()));
        }
        let mut known = HashMap::new();
        for chunk in keys.chunks(LOOKUP_HASHES) {
            let mut qb =
                QueryBuilder::<Sqlite>::new("SELECT key_hash, organization_id FROM api_keys WHERE key_hash IN (");
            let mut list = qb.separated(", ");
            for import in chunk {
                list.push_bind(import.key.key_hash.0.to_vec());
            }
            qb.push(")");
            for (hash, owner) in qb.build_query_as::<(Vec<u8>, String)>().fetch_all(&mut *tx).await.map_err(db)? {
                let hash = KeyHash::from_slice(&hash).ok_or_else(|| corrupt("api_keys.key_hash", "not 32 bytes"))?;
                known.insert(hash, parse_id::<OrgId>(&owner, "api_keys.organization_id")?);
            }
        }
        let (outcomes, to_insert) = plan_import(&org, held, &keys, &known);
        let inserts: Vec<KeyInsert<'_>> = to_insert
            .into_iter()
            .map(|i| {
                let import = &keys[i];
                KeyInsert {
                    key: &import.key,
                    legacy: import.legacy,
                    created_at: stored_time(import.created_at.unwrap_or(actor.at)),
                }
            })
            .collect();
        insert_key_rows(&mut tx, &inserts, actor).await?;
        if dry_run {
            tx.rollback().await.map_err(db)?;
        } else {
            tx.commit().await.map_err(db)?;
        }
        Ok(Changed::imported(outcomes, &keys, dry_run))
    }

    async fn has_legacy_keys(&self) -> StoreResult<bool> {
        store::has_legacy_keys(self).await
    }

    async fn append_audit(
        &self,
        action: &str,
        organization_id: OrgId,
        details: Value,
        actor: &Actor,
    ) -> StoreResult<AuditEntry> {
        let mut tx = self.writer().await?;
        let entry = append_audit(&mut tx, action, None, organization_id, actor, &details).await?;
        tx.commit().await.map_err(db)?;
        Ok(entry)
    }

    async fn list_audit(&self, filter: &AuditFilter, page: PageRequest<i64>) -> StoreResult<Page<AuditEntry, i64>> {
        store::list_audit(self, filter, page).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
