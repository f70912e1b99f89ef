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
//! Queries are checked at run time (no `DATABASE_URL` at build time); the conformance suite is what
//! proves the SQL. Rows are read into private `FromRow` structs and converted into the public records
//! in one place each ([`KeyRow::into_key`], [`OrgRow::into_org`], [`AuditRow::into_entry`]).

mod usage;

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::diff::diff;
use keyward_core::{Environment, HashAlgorithm, IpAllowList, KeyHash, KeyId, OrgId, ScopeSet};
use serde_json::{Value, json};
use sqlx::migrate::{Migrate, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite};

mod lifecycle;

use crate::lookup::key_record;
use crate::{
    Actor, ApiKey, AuditEntry, AuditFilter, Changed, ImportOutcome, KeyFilter, KeyImport, KeyLookup, KeyPatch,
    KeyRecord, KeyUsage, KeyWithOrg, LimitOverrides, MigrationInfo, NewKey, NewOrganization, Organization,
    OrganizationPatch, Page, PageRequest, Store, StoreError, StoreResult, plan_import, stored_time,
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

    /// A write transaction holding the database write lock from its first statement.
    async fn begin_write(&self) -> StoreResult<sqlx::Transaction<'static, Sqlite>> {
        self.write.begin_with("BEGIN IMMEDIATE").await.map_err(db)
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

fn migrate_err(e: sqlx::migrate::MigrateError) -> StoreError {
    match e {
        sqlx::migrate::MigrateError::Execute(inner) => db(inner),
        other => StoreError::Internal(format!("migration: {other}")),
    }
}

/// A stored value that does not parse: the database was edited by hand or by a newer version.
fn corrupt(column: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("invalid value in column `{column}`: {what}"))
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

fn parse_opt_ts(s: Option<String>, column: &str) -> StoreResult<Option<DateTime<Utc>>> {
    s.map(|s| parse_ts(&s, column)).transpose()
}

fn parse_id<T: FromStr>(s: &str, column: &str) -> StoreResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| corrupt(column, e))
}

fn parse_opt_id<T: FromStr>(s: Option<String>, column: &str) -> StoreResult<Option<T>>
where
    T::Err: std::fmt::Display,
{
    s.map(|s| parse_id(&s, column)).transpose()
}

fn json_text(value: &impl serde::Serialize) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Internal(format!("encoding JSON: {e}")))
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str, column: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| corrupt(column, e))
}

// -----------------------------------------------------------------------------------------------
// Rows

#[derive(sqlx::FromRow)]
struct OrgRow {
    id: String,
    name: String,
    slug: String,
    email: Option<String>,
    plan: String,
    is_active: bool,
    monthly_request_limit: Option<i64>,
    rate_limit_per_minute: Option<i64>,
    rate_limit_per_hour: Option<i64>,
    rate_limit_per_day: Option<i64>,
    max_api_keys: Option<i64>,
    created_at: String,
    updated_at: String,
}

impl OrgRow {
    fn into_org(self) -> StoreResult<Organization> {
        Ok(Organization {
            id: parse_id(&self.id, "organizations.id")?,
            name: self.name,
            slug: self.slug,
            email: self.email,
            plan: self.plan,
            is_active: self.is_active,
            limits: LimitOverrides {
                rate_limit_per_minute: self.rate_limit_per_minute,
                rate_limit_per_hour: self.rate_limit_per_hour,
                rate_limit_per_day: self.rate_limit_per_day,
                monthly_request_limit: self.monthly_request_limit,
            },
            max_api_keys: self.max_api_keys,
            created_at: parse_ts(&self.created_at, "organizations.created_at")?,
            updated_at: parse_ts(&self.updated_at, "organizations.updated_at")?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    organization_id: String,
    owner_id: Option<String>,
    name: String,
    description: Option<String>,
    environment: String,
    prefix: String,
    key_hint: String,
    key_hash: Vec<u8>,
    hash_algorithm: String,
    scopes: String,
    allowed_ips: String,
    expires_at: Option<String>,
    is_active: bool,
    revoked_at: Option<String>,
    revoke_reason: Option<String>,
    plan: Option<String>,
    rate_limit_per_minute: Option<i64>,
    rate_limit_per_hour: Option<i64>,
    rate_limit_per_day: Option<i64>,
    monthly_request_limit: Option<i64>,
    metadata: String,
    total_requests: i64,
    last_used_at: Option<String>,
    last_used_ip: Option<String>,
    rotated_from: Option<String>,
    replaced_by: Option<String>,
    created_by: Option<String>,
    created_at: String,
    updated_at: String,
    lineage_id: Option<String>,
}

impl KeyRow {
    fn into_key(self) -> StoreResult<ApiKey> {
        let scopes: Vec<String> = parse_json(&self.scopes, "api_keys.scopes")?;
        let allowed_ips: Vec<String> = parse_json(&self.allowed_ips, "api_keys.allowed_ips")?;
        Ok(ApiKey {
            id: parse_id(&self.id, "api_keys.id")?,
            organization_id: parse_id(&self.organization_id, "api_keys.organization_id")?,
            owner_id: self.owner_id,
            name: self.name,
            description: self.description,
            environment: Environment::parse(&self.environment).map_err(|e| corrupt("api_keys.environment", e))?,
            prefix: self.prefix,
            hint: self.key_hint,
            hash_algorithm: HashAlgorithm::parse(&self.hash_algorithm)
                .ok_or_else(|| corrupt("api_keys.hash_algorithm", &self.hash_algorithm))?,
            // SECURITY: the error names the length only, never the bytes.
            key_hash: KeyHash::from_slice(&self.key_hash)
                .ok_or_else(|| corrupt("api_keys.key_hash", format!("{} bytes", self.key_hash.len())))?,
            scopes: ScopeSet::parse(&scopes).map_err(|e| corrupt("api_keys.scopes", e))?,
            allowed_ips: IpAllowList::parse(&allowed_ips).map_err(|e| corrupt("api_keys.allowed_ips", e))?,
            expires_at: parse_opt_ts(self.expires_at, "api_keys.expires_at")?,
            is_active: self.is_active,
            revoked_at: parse_opt_ts(self.revoked_at, "api_keys.revoked_at")?,
            revoke_reason: self.revoke_reason,
            plan: self.plan,
            limits: LimitOverrides {
                rate_limit_per_minute: self.rate_limit_per_minute,
                rate_limit_per_hour: self.rate_limit_per_hour,
                rate_limit_per_day: self.rate_limit_per_day,
                monthly_request_limit: self.monthly_request_limit,
            },
            metadata: parse_json(&self.metadata, "api_keys.metadata")?,
            total_requests: self.total_requests,
            last_used_at: parse_opt_ts(self.last_used_at, "api_keys.last_used_at")?,
            last_used_ip: self.last_used_ip,
            rotated_from: parse_opt_id(self.rotated_from, "api_keys.rotated_from")?,
            replaced_by: parse_opt_id(self.replaced_by, "api_keys.replaced_by")?,
            created_by: self.created_by,
            created_at: parse_ts(&self.created_at, "api_keys.created_at")?,
            updated_at: parse_ts(&self.updated_at, "api_keys.updated_at")?,
            lineage_id: parse_opt_id(self.lineage_id, "api_keys.lineage_id")?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct KeyWithOrgRow {
    #[sqlx(flatten)]
    key: KeyRow,
    org_is_active: bool,
    org_plan: String,
    org_rate_limit_per_minute: Option<i64>,
    org_rate_limit_per_hour: Option<i64>,
    org_rate_limit_per_day: Option<i64>,
    org_monthly_request_limit: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    action: String,
    key_id: Option<String>,
    organization_id: Option<String>,
    actor: String,
    actor_ip: Option<String>,
    details: String,
    created_at: String,
}

impl AuditRow {
    fn into_entry(self) -> StoreResult<AuditEntry> {
        Ok(AuditEntry {
            id: self.id,
            action: self.action,
            key_id: parse_opt_id(self.key_id, "audit_log.key_id")?,
            organization_id: parse_opt_id(self.organization_id, "audit_log.organization_id")?,
            actor: self.actor,
            actor_ip: self.actor_ip,
            details: parse_json(&self.details, "audit_log.details")?,
            created_at: parse_ts(&self.created_at, "audit_log.created_at")?,
        })
    }
}

/// Turns `limit + 1` fetched rows into a page: the extra row only says that there is a next page.
fn into_page<R, T, C>(
    rows: Vec<R>,
    limit: usize,
    convert: impl Fn(R) -> StoreResult<T>,
    cursor: impl Fn(&T) -> C,
) -> StoreResult<Page<T, C>> {
    let more = rows.len() > limit;
    let items = rows.into_iter().take(limit).map(convert).collect::<StoreResult<Vec<T>>>()?;
    let next_cursor = if more { items.last().map(cursor) } else { None };
    Ok(Page { items, next_cursor })
}

/// Rows to fetch for a page. A limit of 0 is read as 1, so that paging always moves forward.
fn fetch_limit<C>(page: &PageRequest<C>) -> (usize, i64) {
    let limit = page.limit.max(1);
    (limit as usize, i64::from(limit) + 1)
}

// -----------------------------------------------------------------------------------------------
// Statements shared by several methods; each runs on the caller's transaction.

async fn select_org(conn: &mut SqliteConnection, id: OrgId) -> StoreResult<Organization> {
    sqlx::query_as::<_, OrgRow>(concat!("SELECT ", org_columns!(), " FROM organizations WHERE id = ?"))
        .bind(id.to_string())
        .fetch_one(conn)
        .await
        .map_err(db)?
        .into_org()
}

async fn select_key(conn: &mut SqliteConnection, id: KeyId) -> StoreResult<ApiKey> {
    sqlx::query_as::<_, KeyRow>(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE id = ?"))
        .bind(id.to_string())
        .fetch_one(conn)
        .await
        .map_err(db)?
        .into_key()
}

/// Keys that count against `max_api_keys`: every key not revoked.
async fn held_keys(conn: &mut SqliteConnection, org: OrgId) -> StoreResult<i64> {
    sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE organization_id = ? AND revoked_at IS NULL")
        .bind(org.to_string())
        .fetch_one(conn)
        .await
        .map_err(db)
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

/// The audit row of a change, written in the change's own transaction.
async fn append_audit(
    conn: &mut SqliteConnection,
    action: &str,
    key_id: Option<KeyId>,
    organization_id: OrgId,
    actor: &Actor,
    details: &Value,
) -> StoreResult<()> {
    // The row is linked into the audit chain (see `lifecycle::chain_link`); this connection holds the
    // write lock, so appends are serialized.
    let key_id = key_id.map(|id| id.to_string());
    let organization_id = organization_id.to_string();
    let (prev_hash, row_hash) = lifecycle::chain_link(
        &mut *conn,
        &keyward_core::audit_chain::AuditContent {
            action,
            key_id: key_id.as_deref(),
            organization_id: Some(&organization_id),
            actor: &actor.actor,
            actor_ip: actor.ip.as_deref(),
            details,
            created_at: actor.at,
        },
    )
    .await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO audit_log (action, key_id, organization_id, actor, actor_ip, details, created_at, prev_hash,
             row_hash)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(action)
    .bind(key_id)
    .bind(organization_id)
    .bind(&actor.actor)
    .bind(&actor.ip)
    .bind(json_text(details)?)
    .bind(ts(actor.at))
    .bind(prev_hash)
    .bind(&row_hash)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    lifecycle::chain_advance(conn, id, &row_hash).await
}

/// Appends the status of `key` at `now` to a query, with the precedence of `KeyState::status`.
fn push_status(qb: &mut QueryBuilder<'_, Sqlite>, now: &str) {
    qb.push("(CASE WHEN revoked_at IS NOT NULL AND revoked_at <= ")
        .push_bind(now.to_owned())
        .push(" THEN 'revoked' WHEN is_active = 0 THEN 'disabled' WHEN expires_at IS NOT NULL AND expires_at <= ")
        .push_bind(now.to_owned())
        .push(" THEN 'expired' ELSE 'active' END)");
}

#[async_trait]
impl KeyLookup for SqliteStore {
    async fn find_key_record(&self, hash: &KeyHash) -> StoreResult<Option<Arc<KeyRecord>>> {
        Ok(key_record(self.find_key_by_hash(hash).await?, hash))
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.read).await.map_err(db)?;
        Ok(())
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate_up(&self) -> StoreResult<Vec<MigrationInfo>> {
        MIGRATOR.run(&self.write).await.map_err(migrate_err)?;
        self.migration_status().await
    }

    async fn migrate_down(&self, steps: u32) -> StoreResult<Vec<MigrationInfo>> {
        let mut applied = {
            let mut conn = self.write.acquire().await.map_err(db)?;
            conn.ensure_migrations_table().await.map_err(migrate_err)?;
            conn.list_applied_migrations().await.map_err(migrate_err)?
        };
        applied.sort_by_key(|m| std::cmp::Reverse(m.version));
        // `undo` reverts every applied migration newer than the target: the newest one left standing.
        let target = applied.get(steps as usize).map_or(0, |m| m.version);
        MIGRATOR.undo(&self.write, target).await.map_err(migrate_err)?;
        self.migration_status().await
    }

    async fn migration_status(&self) -> StoreResult<Vec<MigrationInfo>> {
        let applied: HashSet<i64> = {
            let mut conn = self.write.acquire().await.map_err(db)?;
            conn.ensure_migrations_table().await.map_err(migrate_err)?;
            conn.list_applied_migrations().await.map_err(migrate_err)?.into_iter().map(|m| m.version).collect()
        };
        Ok(MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .map(|m| MigrationInfo {
                version: m.version,
                description: m.description.to_string(),
                applied: applied.contains(&m.version),
            })
            .collect())
    }

    async fn insert_org(&self, org: NewOrganization, actor: &Actor) -> StoreResult<Organization> {
        let mut tx = self.begin_write().await?;
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
        let mut conn = self.read.acquire().await.map_err(db)?;
        select_org(&mut conn, id).await
    }

    async fn find_org_by_slug(&self, slug: &str) -> StoreResult<Option<Organization>> {
        sqlx::query_as::<_, OrgRow>(concat!("SELECT ", org_columns!(), " FROM organizations WHERE slug = ?"))
            .bind(slug)
            .fetch_optional(&self.read)
            .await
            .map_err(db)?
            .map(OrgRow::into_org)
            .transpose()
    }

    async fn list_orgs(&self, page: PageRequest<OrgId>) -> StoreResult<Page<Organization, OrgId>> {
        let (limit, fetch) = fetch_limit(&page);
        let mut qb = QueryBuilder::<Sqlite>::new(concat!("SELECT ", org_columns!(), " FROM organizations"));
        if let Some(after) = page.after {
            qb.push(" WHERE id < ").push_bind(after.to_string());
        }
        qb.push(" ORDER BY id DESC LIMIT ").push_bind(fetch);
        let rows = qb.build_query_as::<OrgRow>().fetch_all(&self.read).await.map_err(db)?;
        into_page(rows, limit, OrgRow::into_org, |org| org.id)
    }

    async fn update_org(
        &self,
        id: OrgId,
        patch: OrganizationPatch,
        actor: &Actor,
    ) -> StoreResult<Changed<Organization>> {
        let action = patch.action();
        let mut tx = self.begin_write().await?;
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
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM organizations").fetch_one(&self.read).await.map_err(db)
    }

    async fn insert_key(&self, key: NewKey, actor: &Actor) -> StoreResult<Changed<ApiKey>> {
        // IMMEDIATE: the count below and the insert must see the same keys, also across processes, or
        // two concurrent creations could both pass the limit.
        let mut tx = self.begin_write().await?;
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
        lifecycle::key_event(&mut tx, "key.created", &created, actor).await?;
        tx.commit().await.map_err(db)?;
        Ok(Changed::inserted_key(created))
    }

    async fn find_key_by_hash(&self, hash: &KeyHash) -> StoreResult<Option<KeyWithOrg>> {
        let row = sqlx::query_as::<_, KeyWithOrgRow>(concat!(
            "SELECT ",
            key_columns!(),
            ", o.org_is_active, o.org_plan, o.org_rate_limit_per_minute, o.org_rate_limit_per_hour,
                o.org_rate_limit_per_day, o.org_monthly_request_limit
             FROM api_keys JOIN (
                 SELECT id AS org_id, is_active AS org_is_active, plan AS org_plan,
                        rate_limit_per_minute AS org_rate_limit_per_minute,
                        rate_limit_per_hour AS org_rate_limit_per_hour,
                        rate_limit_per_day AS org_rate_limit_per_day,
                        monthly_request_limit AS org_monthly_request_limit
                 FROM organizations
             ) AS o ON o.org_id = api_keys.organization_id
             WHERE key_hash = ?"
        ))
        .bind(hash.0.as_slice())
        .fetch_optional(&self.read)
        .await
        .map_err(db)?;
        row.map(|r| {
            Ok(KeyWithOrg {
                key: r.key.into_key()?,
                org_is_active: r.org_is_active,
                org_plan: r.org_plan,
                org_limits: LimitOverrides {
                    rate_limit_per_minute: r.org_rate_limit_per_minute,
                    rate_limit_per_hour: r.org_rate_limit_per_hour,
                    rate_limit_per_day: r.org_rate_limit_per_day,
                    monthly_request_limit: r.org_monthly_request_limit,
                },
            })
        })
        .transpose()
    }

    async fn get_key(&self, id: KeyId) -> StoreResult<ApiKey> {
        let mut conn = self.read.acquire().await.map_err(db)?;
        select_key(&mut conn, id).await
    }

    async fn list_keys(&self, filter: &KeyFilter, page: PageRequest<KeyId>) -> StoreResult<Page<ApiKey, KeyId>> {
        let (limit, fetch) = fetch_limit(&page);
        let now = ts(filter.now);
        let mut qb = QueryBuilder::<Sqlite>::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE 1 = 1"));
        if let Some(org) = filter.organization_id {
            qb.push(" AND organization_id = ").push_bind(org.to_string());
        }
        if let Some(owner) = &filter.owner_id {
            qb.push(" AND owner_id = ").push_bind(owner.clone());
        }
        if let Some(environment) = filter.environment {
            qb.push(" AND environment = ").push_bind(environment.as_str());
        }
        match filter.status {
            Some(status) => {
                qb.push(" AND ");
                push_status(&mut qb, &now);
                qb.push(" = ").push_bind(status.as_str());
            }
            None if !filter.include_inactive => {
                // Expired keys stay listed: they are still the customer's, and may be extended.
                qb.push(" AND is_active = 1 AND (revoked_at IS NULL OR revoked_at > ").push_bind(now.clone()).push(")");
            }
            None => {}
        }
        if let Some(after) = page.after {
            qb.push(" AND id < ").push_bind(after.to_string());
        }
        qb.push(" ORDER BY id DESC LIMIT ").push_bind(fetch);
        let rows = qb.build_query_as::<KeyRow>().fetch_all(&self.read).await.map_err(db)?;
        into_page(rows, limit, KeyRow::into_key, |key| key.id)
    }

    async fn update_key(&self, id: KeyId, patch: KeyPatch, actor: &Actor) -> StoreResult<Changed<ApiKey>> {
        let action = patch.action();
        let mut tx = self.begin_write().await?;
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
        lifecycle::key_event(&mut tx, "key.updated", &after, actor).await?;
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
        let mut tx = self.begin_write().await?;
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
        lifecycle::key_event(&mut tx, "key.revoked", &after, actor).await?;
        let revoked = select_key(&mut tx, id).await?;
        tx.commit().await.map_err(db)?;
        Ok(Changed::revoked_key(revoked))
    }

    async fn record_key_usage(&self, usage: &[KeyUsage]) -> StoreResult<()> {
        if usage.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
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
        let mut tx = self.begin_write().await?;
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
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM api_keys WHERE legacy = 1)")
            .fetch_one(&self.read)
            .await
            .map_err(db)
    }

    async fn append_audit(
        &self,
        action: &str,
        organization_id: OrgId,
        details: Value,
        actor: &Actor,
    ) -> StoreResult<AuditEntry> {
        let mut tx = self.begin_write().await?;
        append_audit(&mut tx, action, None, organization_id, actor, &details).await?;
        let row = sqlx::query_as::<_, AuditRow>(concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_log WHERE id = last_insert_rowid()"
        ))
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        row.into_entry()
    }

    async fn list_audit(&self, filter: &AuditFilter, page: PageRequest<i64>) -> StoreResult<Page<AuditEntry, i64>> {
        let (limit, fetch) = fetch_limit(&page);
        let mut qb = QueryBuilder::<Sqlite>::new(concat!("SELECT ", audit_columns!(), " FROM audit_log WHERE 1 = 1"));
        if let Some(org) = filter.organization_id {
            qb.push(" AND organization_id = ").push_bind(org.to_string());
        }
        if let Some(key) = filter.key_id {
            qb.push(" AND key_id = ").push_bind(key.to_string());
        }
        if let Some(action) = &filter.action {
            qb.push(" AND action = ").push_bind(action.clone());
        }
        if let Some(actor) = &filter.actor {
            qb.push(" AND actor = ").push_bind(actor.clone());
        }
        if let Some(since) = filter.since {
            qb.push(" AND created_at >= ").push_bind(ts(since));
        }
        if let Some(until) = filter.until {
            qb.push(" AND created_at < ").push_bind(ts(until));
        }
        if let Some(after) = page.after {
            qb.push(" AND id < ").push_bind(after);
        }
        qb.push(" ORDER BY id DESC LIMIT ").push_bind(fetch);
        let rows = qb.build_query_as::<AuditRow>().fetch_all(&self.read).await.map_err(db)?;
        into_page(rows, limit, AuditRow::into_entry, |entry| entry.id)
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
