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

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use keyward_core::diff::diff;
use keyward_core::{KeyHash, KeyId, OrgId};
use serde_json::{Value, json};
use sqlx::error::BoxDynError;
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgQueryResult};
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{Arguments, Database, Postgres, QueryBuilder, Transaction};
use uuid::Uuid;

mod lifecycle;

use crate::sql::{Arg, Backend, Dialect, rows, store};
use crate::{
    Actor, ApiKey, AuditEntry, AuditFilter, Changed, EventKind, ImportOutcome, KeyFilter, KeyImport, KeyPatch,
    KeyUsage, KeyWithOrg, MigrationInfo, NewKey, NewOrganization, Organization, OrganizationPatch, Page, PageRequest,
    Store, StoreError, StoreResult, corrupt, plan_import, stored_time,
};

/// The schema, embedded at build time so the binary migrates its own database.
static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/postgres");

/// How long a caller waits for a free connection before the store answers `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Per node. PostgreSQL's default `max_connections` is 100; ten nodes fit.
const MAX_CONNECTIONS: u32 = 10;
/// Rows per multi-row INSERT of an import: 26 parameters a row stays well under PostgreSQL's 65,535.
const INSERT_ROWS: usize = 1_000;

/// A Keyward store in a PostgreSQL database (in the first schema of the connection's `search_path`).
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to the database a URL names: `postgres://user:password@host:5432/db`. libpq's
    /// parameters work, e.g. `?sslmode=require` or `?options[search_path]=keyward` to keep Keyward in a
    /// schema of its own. Does not migrate; see [`Store::migrate_up`].
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

/// Ids are `uuid`, times `timestamptz`, JSON `jsonb` and lists of strings `text[]`: sqlx reads them as
/// they are.
impl Dialect for Postgres {
    type Id = Uuid;
    type Time = DateTime<Utc>;
    type Json = Json<Value>;
    type List = Vec<String>;
    type Day = NaiveDate;

    const FOR_UPDATE: &'static str = " FOR UPDATE";
    const TRUE: &'static str = "TRUE";
    const FALSE: &'static str = "FALSE";

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

// -----------------------------------------------------------------------------------------------
// Statements of the writes

type KeyRow = rows::KeyRow<Postgres>;
type OrgRow = rows::OrgRow<Postgres>;

async fn select_org(conn: &mut PgConnection, id: OrgId, lock: bool) -> StoreResult<Organization> {
    if lock { store::lock_org::<Postgres>(conn, id).await } else { store::select_org::<Postgres>(conn, id).await }
}

async fn select_key(conn: &mut PgConnection, id: KeyId, lock: bool) -> StoreResult<ApiKey> {
    if lock { store::lock_key::<Postgres>(conn, id).await } else { store::select_key::<Postgres>(conn, id).await }
}

async fn held_keys(conn: &mut PgConnection, org: OrgId) -> StoreResult<i64> {
    store::held_keys::<Postgres>(conn, org).await
}

async fn append_audit(
    conn: &mut PgConnection,
    action: &str,
    key_id: Option<KeyId>,
    organization_id: OrgId,
    actor: &Actor,
    details: &Value,
) -> StoreResult<AuditEntry> {
    store::append_audit::<Postgres>(conn, action, key_id, organization_id, actor, details).await
}

/// A key row to insert: created keys and imported keys alike.
struct KeyInsert<'a> {
    key: &'a NewKey,
    legacy: bool,
    created_at: DateTime<Utc>,
}

/// The one INSERT of key rows: one statement for many rows.
async fn insert_key_rows(conn: &mut PgConnection, rows: &[KeyInsert<'_>], actor: &Actor) -> StoreResult<()> {
    for chunk in rows.chunks(INSERT_ROWS) {
        let mut qb = QueryBuilder::<Postgres>::new(
            "INSERT INTO api_keys (id, organization_id, owner_id, name, description, environment, prefix, key_hint,
                 key_hash, hash_algorithm, scopes, allowed_ips, expires_at, is_active, plan, rate_limit_per_minute,
                 rate_limit_per_hour, rate_limit_per_day, monthly_request_limit, metadata, rotated_from, created_by,
                 created_at, updated_at, legacy) ",
        );
        qb.push_values(chunk, |mut b, row| {
            let key = row.key;
            b.push_bind(key.id.0)
                .push_bind(key.organization_id.0)
                .push_bind(key.owner_id.clone())
                .push_bind(key.name.clone())
                .push_bind(key.description.clone())
                .push_bind(key.environment.as_str())
                .push_bind(key.prefix.clone())
                .push_bind(key.hint.clone())
                .push_bind(key.key_hash.0.to_vec())
                .push_bind(key.hash_algorithm.as_str())
                .push_bind(key.scopes.to_strings())
                .push_bind(key.allowed_ips.to_strings())
                .push_bind(key.expires_at)
                .push_bind(key.is_active)
                .push_bind(key.plan.clone())
                .push_bind(key.limits.rate_limit_per_minute)
                .push_bind(key.limits.rate_limit_per_hour)
                .push_bind(key.limits.rate_limit_per_day)
                .push_bind(key.limits.monthly_request_limit)
                .push_bind(Json(key.metadata.clone()))
                .push_bind(key.rotated_from.map(|id| id.0))
                .push_bind(actor.actor.clone())
                .push_bind(row.created_at)
                .push_bind(actor.at)
                .push_bind(row.legacy);
        });
        qb.build().execute(&mut *conn).await.map_err(db)?;
    }
    Ok(())
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(db)?;
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
        let created = sqlx::query_as::<_, OrgRow>(concat!(
            "INSERT INTO organizations (id, name, slug, email, plan, is_active, monthly_request_limit,
                 rate_limit_per_minute, rate_limit_per_hour, rate_limit_per_day, max_api_keys, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12)
             RETURNING ",
            org_columns!()
        ))
        .bind(org.id.0)
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
        .bind(actor.at)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?
        .into_org()?;
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
        let before = select_org(&mut tx, id, true).await?;
        let after = patch.apply_to(&before);
        let Some(details) = diff(&before.audit_json(), &after.audit_json()) else {
            // Nothing changed: no write, no audit row, and `updated_at` stays put.
            return Ok(Changed::updated_org(before));
        };
        let updated = sqlx::query_as::<_, OrgRow>(concat!(
            "UPDATE organizations SET name = $1, email = $2, plan = $3, is_active = $4, monthly_request_limit = $5,
                 rate_limit_per_minute = $6, rate_limit_per_hour = $7, rate_limit_per_day = $8, max_api_keys = $9,
                 updated_at = $10
             WHERE id = $11
             RETURNING ",
            org_columns!()
        ))
        .bind(&after.name)
        .bind(&after.email)
        .bind(&after.plan)
        .bind(after.is_active)
        .bind(after.limits.monthly_request_limit)
        .bind(after.limits.rate_limit_per_minute)
        .bind(after.limits.rate_limit_per_hour)
        .bind(after.limits.rate_limit_per_day)
        .bind(after.max_api_keys)
        .bind(actor.at)
        .bind(id.0)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?
        .into_org()?;
        append_audit(&mut tx, action, None, id, actor, &details).await?;
        tx.commit().await.map_err(db)?;
        Ok(Changed::updated_org(updated))
    }

    async fn count_orgs(&self) -> StoreResult<i64> {
        store::count_orgs(self).await
    }

    async fn insert_key(&self, key: NewKey, actor: &Actor) -> StoreResult<Changed<ApiKey>> {
        let mut tx = self.writer().await?;
        // The organization's row lock serializes key creations per organization across every node: the
        // count below (a fresh snapshot under READ COMMITTED, taken after the lock) sees every key
        // committed before, so two creations cannot both pass the limit.
        let org = select_org(&mut tx, key.organization_id, true).await?;
        if let Some(max) = org.max_api_keys
            && held_keys(&mut tx, org.id).await? >= max
        {
            return Err(StoreError::KeyLimitReached(max));
        }
        insert_key_rows(&mut tx, &[KeyInsert { key: &key, legacy: false, created_at: actor.at }], actor).await?;
        // Read back, so the record returned is exactly what later reads return.
        let created = select_key(&mut tx, key.id, false).await?;
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
        let before = select_key(&mut tx, id, true).await?;
        let after = patch.apply_to(&before);
        let Some(details) = diff(&before.audit_json(), &after.audit_json()) else {
            // Nothing changed: no write, no audit row, and `updated_at` stays put.
            return Ok(Changed::updated_key(before));
        };
        let updated = sqlx::query_as::<_, KeyRow>(concat!(
            "UPDATE api_keys SET name = $1, description = $2, scopes = $3, allowed_ips = $4, expires_at = $5,
                 metadata = $6, plan = $7, is_active = $8, rate_limit_per_minute = $9, rate_limit_per_hour = $10,
                 rate_limit_per_day = $11, monthly_request_limit = $12, updated_at = $13
             WHERE id = $14
             RETURNING ",
            key_columns!()
        ))
        .bind(&after.name)
        .bind(&after.description)
        .bind(after.scopes.to_strings())
        .bind(after.allowed_ips.to_strings())
        .bind(after.expires_at)
        .bind(Json(&after.metadata))
        .bind(&after.plan)
        .bind(after.is_active)
        .bind(after.limits.rate_limit_per_minute)
        .bind(after.limits.rate_limit_per_hour)
        .bind(after.limits.rate_limit_per_day)
        .bind(after.limits.monthly_request_limit)
        .bind(actor.at)
        .bind(id.0)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?
        .into_key()?;
        append_audit(&mut tx, action, Some(id), before.organization_id, actor, &details).await?;
        lifecycle::key_event(&mut tx, EventKind::KeyUpdated, &after, actor).await?;
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
        let before = select_key(&mut tx, id, true).await?;
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
        let revoked = sqlx::query_as::<_, KeyRow>(concat!(
            "UPDATE api_keys SET revoked_at = $1, revoke_reason = $2, updated_at = $3 WHERE id = $4 RETURNING ",
            key_columns!()
        ))
        .bind(at)
        .bind(reason)
        .bind(actor.at)
        .bind(id.0)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?
        .into_key()?;
        append_audit(&mut tx, "revoke", Some(id), before.organization_id, actor, &details).await?;
        lifecycle::key_event(&mut tx, EventKind::KeyRevoked, &after, actor).await?;
        tx.commit().await.map_err(db)?;
        Ok(Changed::revoked_key(revoked))
    }

    async fn record_key_usage(&self, usage: &[KeyUsage]) -> StoreResult<()> {
        if usage.is_empty() {
            return Ok(());
        }
        // Rows are locked in id order, so two nodes flushing overlapping batches cannot deadlock. The
        // sort is stable: one key's notes keep their order.
        let mut ordered: Vec<&KeyUsage> = usage.iter().collect();
        ordered.sort_by_key(|u| u.key_id);
        let mut tx = self.writer().await?;
        for u in ordered {
            // SET expressions all see the row as it was, so the two CASEs compare against the old
            // `last_used_at`. An unknown address does not erase the last known one. A key that was
            // deleted since the request matches no row, which is fine.
            sqlx::query(
                "UPDATE api_keys SET
                     total_requests = total_requests + $1,
                     last_used_ip = CASE WHEN last_used_at IS NULL OR last_used_at < $2
                                         THEN COALESCE($3, last_used_ip) ELSE last_used_ip END,
                     last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < $2
                                         THEN $2 ELSE last_used_at END
                 WHERE id = $4",
            )
            .bind(u.requests)
            .bind(u.last_used_at)
            .bind(&u.last_used_ip)
            .bind(u.key_id.0)
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
        if keys.iter().any(|k| k.key.organization_id != organization_id) {
            return Err(StoreError::Internal("an imported key names another organization".to_owned()));
        }
        let mut tx = self.writer().await?;
        // The same lock as insert_key: the limit counted here holds until the inserts are committed.
        let org = select_org(&mut tx, organization_id, true).await?;
        let held = match org.max_api_keys {
            Some(_) => held_keys(&mut tx, org.id).await?,
            None => 0,
        };
        let hashes: Vec<Vec<u8>> = keys.iter().map(|k| k.key.key_hash.0.to_vec()).collect();
        let mut known = HashMap::new();
        for (hash, owner) in sqlx::query_as::<_, (Vec<u8>, Uuid)>(
            "SELECT key_hash, organization_id FROM api_keys WHERE key_hash = ANY($1)",
        )
        .bind(&hashes)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?
        {
            let hash = KeyHash::from_slice(&hash).ok_or_else(|| corrupt("api_keys.key_hash", "not 32 bytes"))?;
            known.insert(hash, OrgId(owner));
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
        // A transaction: the chain head stays locked until the row is committed.
        let mut tx = self.writer().await?;
        let entry = append_audit(&mut tx, action, None, organization_id, actor, &details).await?;
        tx.commit().await.map_err(db)?;
        Ok(entry)
    }

    async fn list_audit(&self, filter: &AuditFilter, page: PageRequest<i64>) -> StoreResult<Page<AuditEntry, i64>> {
        store::list_audit(self, filter, page).await
    }
}
