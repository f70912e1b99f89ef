//! The PostgreSQL backend: the store for several Keyward nodes sharing one database, migrated with the
//! reversible migrations in `migrations/postgres` (the same versions as SQLite's).
//!
//! Connections come from one pool. Every change runs in a transaction that first locks the row it
//! changes (`SELECT ... FOR UPDATE`): the organization for a key creation or an import, so that the
//! `max_api_keys` count and the insert cannot interleave with another node's; the key itself for an
//! update or a revocation, so that the audit diff is computed against what is really replaced.
//!
//! Queries are checked at run time (no `DATABASE_URL` at build time); the conformance suite, run
//! against a real server, is what proves the SQL. Rows are read into private `FromRow` structs and
//! converted into the public records in one place each.

mod usage;

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::diff::diff;
use keyward_core::{Environment, HashAlgorithm, IpAllowList, KeyHash, KeyId, OrgId, ScopeSet};
use serde_json::{Value, json};
use sqlx::migrate::{Migrate, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

mod lifecycle;

use crate::lookup::key_record;
use crate::{
    Actor, ApiKey, AuditEntry, AuditFilter, Changed, ImportOutcome, KeyFilter, KeyImport, KeyLookup, KeyPatch,
    KeyRecord, KeyUsage, KeyWithOrg, LimitOverrides, MigrationInfo, NewKey, NewOrganization, Organization,
    OrganizationPatch, Page, PageRequest, Store, StoreError, StoreResult, plan_import, stored_time,
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

    async fn begin(&self) -> StoreResult<sqlx::Transaction<'static, Postgres>> {
        self.pool.begin().await.map_err(db)
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
// Rows

#[derive(sqlx::FromRow)]
struct OrgRow {
    id: Uuid,
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
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl OrgRow {
    fn into_org(self) -> StoreResult<Organization> {
        Ok(Organization {
            id: OrgId(self.id),
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
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    organization_id: Uuid,
    owner_id: Option<String>,
    name: String,
    description: Option<String>,
    environment: String,
    prefix: String,
    key_hint: String,
    key_hash: Vec<u8>,
    hash_algorithm: String,
    scopes: Vec<String>,
    allowed_ips: Vec<String>,
    expires_at: Option<DateTime<Utc>>,
    is_active: bool,
    revoked_at: Option<DateTime<Utc>>,
    revoke_reason: Option<String>,
    plan: Option<String>,
    rate_limit_per_minute: Option<i64>,
    rate_limit_per_hour: Option<i64>,
    rate_limit_per_day: Option<i64>,
    monthly_request_limit: Option<i64>,
    metadata: Json<Value>,
    total_requests: i64,
    last_used_at: Option<DateTime<Utc>>,
    last_used_ip: Option<String>,
    rotated_from: Option<Uuid>,
    replaced_by: Option<Uuid>,
    created_by: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    lineage_id: Option<Uuid>,
}

impl KeyRow {
    fn into_key(self) -> StoreResult<ApiKey> {
        Ok(ApiKey {
            id: KeyId(self.id),
            organization_id: OrgId(self.organization_id),
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
            scopes: ScopeSet::parse(&self.scopes).map_err(|e| corrupt("api_keys.scopes", e))?,
            allowed_ips: IpAllowList::parse(&self.allowed_ips).map_err(|e| corrupt("api_keys.allowed_ips", e))?,
            expires_at: self.expires_at,
            is_active: self.is_active,
            revoked_at: self.revoked_at,
            revoke_reason: self.revoke_reason,
            plan: self.plan,
            limits: LimitOverrides {
                rate_limit_per_minute: self.rate_limit_per_minute,
                rate_limit_per_hour: self.rate_limit_per_hour,
                rate_limit_per_day: self.rate_limit_per_day,
                monthly_request_limit: self.monthly_request_limit,
            },
            metadata: self.metadata.0,
            total_requests: self.total_requests,
            last_used_at: self.last_used_at,
            last_used_ip: self.last_used_ip,
            rotated_from: self.rotated_from.map(KeyId),
            replaced_by: self.replaced_by.map(KeyId),
            created_by: self.created_by,
            created_at: self.created_at,
            updated_at: self.updated_at,
            lineage_id: self.lineage_id.map(KeyId),
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
    key_id: Option<Uuid>,
    organization_id: Option<Uuid>,
    actor: String,
    actor_ip: Option<String>,
    details: Json<Value>,
    created_at: DateTime<Utc>,
}

impl AuditRow {
    fn into_entry(self) -> StoreResult<AuditEntry> {
        Ok(AuditEntry {
            id: self.id,
            action: self.action,
            key_id: self.key_id.map(KeyId),
            organization_id: self.organization_id.map(OrgId),
            actor: self.actor,
            actor_ip: self.actor_ip,
            details: self.details.0,
            created_at: self.created_at,
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

async fn select_org(conn: &mut PgConnection, id: OrgId, lock: bool) -> StoreResult<Organization> {
    let sql = if lock {
        concat!("SELECT ", org_columns!(), " FROM organizations WHERE id = $1 FOR UPDATE")
    } else {
        concat!("SELECT ", org_columns!(), " FROM organizations WHERE id = $1")
    };
    sqlx::query_as::<_, OrgRow>(sql).bind(id.0).fetch_one(conn).await.map_err(db)?.into_org()
}

async fn select_key(conn: &mut PgConnection, id: KeyId, lock: bool) -> StoreResult<ApiKey> {
    let sql = if lock {
        concat!("SELECT ", key_columns!(), " FROM api_keys WHERE id = $1 FOR UPDATE")
    } else {
        concat!("SELECT ", key_columns!(), " FROM api_keys WHERE id = $1")
    };
    sqlx::query_as::<_, KeyRow>(sql).bind(id.0).fetch_one(conn).await.map_err(db)?.into_key()
}

/// Keys that count against `max_api_keys`: every key not revoked.
async fn held_keys(conn: &mut PgConnection, org: OrgId) -> StoreResult<i64> {
    sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE organization_id = $1 AND revoked_at IS NULL")
        .bind(org.0)
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

/// The audit row of a change, written in the change's own transaction.
async fn append_audit(
    conn: &mut PgConnection,
    action: &str,
    key_id: Option<KeyId>,
    organization_id: OrgId,
    actor: &Actor,
    details: &Value,
) -> StoreResult<AuditEntry> {
    // The row is linked into the audit chain; `chain_link` locks the chain head, so appends from every
    // node are serialized until this transaction ends.
    let at = stored_time(actor.at);
    let (key_text, org_text) = (key_id.map(|id| id.to_string()), organization_id.to_string());
    let (prev_hash, row_hash) = lifecycle::chain_link(
        &mut *conn,
        &keyward_core::audit_chain::AuditContent {
            action,
            key_id: key_text.as_deref(),
            organization_id: Some(&org_text),
            actor: &actor.actor,
            actor_ip: actor.ip.as_deref(),
            details,
            created_at: at,
        },
    )
    .await?;
    let entry = sqlx::query_as::<_, AuditRow>(concat!(
        "INSERT INTO audit_log (action, key_id, organization_id, actor, actor_ip, details, created_at, prev_hash,
                 row_hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             RETURNING ",
        audit_columns!()
    ))
    .bind(action)
    .bind(key_id.map(|id| id.0))
    .bind(organization_id.0)
    .bind(&actor.actor)
    .bind(&actor.ip)
    .bind(Json(details))
    .bind(at)
    .bind(prev_hash)
    .bind(&row_hash)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?
    .into_entry()?;
    lifecycle::chain_advance(conn, entry.id, &row_hash).await?;
    Ok(entry)
}

/// Appends the status of a key at `now` to a query, with the precedence of `KeyState::status`.
fn push_status(qb: &mut QueryBuilder<'_, Postgres>, now: DateTime<Utc>) {
    qb.push("(CASE WHEN revoked_at IS NOT NULL AND revoked_at <= ")
        .push_bind(now)
        .push(" THEN 'revoked' WHEN NOT is_active THEN 'disabled' WHEN expires_at IS NOT NULL AND expires_at <= ")
        .push_bind(now)
        .push(" THEN 'expired' ELSE 'active' END)");
}

#[async_trait]
impl KeyLookup for PostgresStore {
    async fn find_key_record(&self, hash: &KeyHash) -> StoreResult<Option<Arc<KeyRecord>>> {
        Ok(key_record(self.find_key_by_hash(hash).await?, hash))
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(db)?;
        Ok(())
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate_up(&self) -> StoreResult<Vec<MigrationInfo>> {
        // sqlx holds a PostgreSQL advisory lock while it migrates: nodes starting together take turns.
        MIGRATOR.run(&self.pool).await.map_err(migrate_err)?;
        self.migration_status().await
    }

    async fn migrate_down(&self, steps: u32) -> StoreResult<Vec<MigrationInfo>> {
        let mut applied = {
            let mut conn = self.pool.acquire().await.map_err(db)?;
            conn.ensure_migrations_table().await.map_err(migrate_err)?;
            conn.list_applied_migrations().await.map_err(migrate_err)?
        };
        applied.sort_by_key(|m| std::cmp::Reverse(m.version));
        // `undo` reverts every applied migration newer than the target: the newest one left standing.
        let target = applied.get(steps as usize).map_or(0, |m| m.version);
        MIGRATOR.undo(&self.pool, target).await.map_err(migrate_err)?;
        self.migration_status().await
    }

    async fn migration_status(&self) -> StoreResult<Vec<MigrationInfo>> {
        let applied: HashSet<i64> = {
            let mut conn = self.pool.acquire().await.map_err(db)?;
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
        let mut tx = self.begin().await?;
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
        let mut conn = self.pool.acquire().await.map_err(db)?;
        select_org(&mut conn, id, false).await
    }

    async fn find_org_by_slug(&self, slug: &str) -> StoreResult<Option<Organization>> {
        sqlx::query_as::<_, OrgRow>(concat!("SELECT ", org_columns!(), " FROM organizations WHERE slug = $1"))
            .bind(slug)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?
            .map(OrgRow::into_org)
            .transpose()
    }

    async fn list_orgs(&self, page: PageRequest<OrgId>) -> StoreResult<Page<Organization, OrgId>> {
        let (limit, fetch) = fetch_limit(&page);
        let mut qb = QueryBuilder::<Postgres>::new(concat!("SELECT ", org_columns!(), " FROM organizations"));
        if let Some(after) = page.after {
            qb.push(" WHERE id < ").push_bind(after.0);
        }
        qb.push(" ORDER BY id DESC LIMIT ").push_bind(fetch);
        let rows = qb.build_query_as::<OrgRow>().fetch_all(&self.pool).await.map_err(db)?;
        into_page(rows, limit, OrgRow::into_org, |org| org.id)
    }

    async fn update_org(
        &self,
        id: OrgId,
        patch: OrganizationPatch,
        actor: &Actor,
    ) -> StoreResult<Changed<Organization>> {
        let action = patch.action();
        let mut tx = self.begin().await?;
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
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM organizations").fetch_one(&self.pool).await.map_err(db)
    }

    async fn insert_key(&self, key: NewKey, actor: &Actor) -> StoreResult<Changed<ApiKey>> {
        let mut tx = self.begin().await?;
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
             WHERE key_hash = $1"
        ))
        .bind(hash.0.as_slice())
        .fetch_optional(&self.pool)
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
        let mut conn = self.pool.acquire().await.map_err(db)?;
        select_key(&mut conn, id, false).await
    }

    async fn list_keys(&self, filter: &KeyFilter, page: PageRequest<KeyId>) -> StoreResult<Page<ApiKey, KeyId>> {
        let (limit, fetch) = fetch_limit(&page);
        let mut qb = QueryBuilder::<Postgres>::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE true"));
        if let Some(org) = filter.organization_id {
            qb.push(" AND organization_id = ").push_bind(org.0);
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
                push_status(&mut qb, filter.now);
                qb.push(" = ").push_bind(status.as_str());
            }
            None if !filter.include_inactive => {
                // Expired keys stay listed: they are still the customer's, and may be extended.
                qb.push(" AND is_active AND (revoked_at IS NULL OR revoked_at > ").push_bind(filter.now).push(")");
            }
            None => {}
        }
        if let Some(after) = page.after {
            qb.push(" AND id < ").push_bind(after.0);
        }
        qb.push(" ORDER BY id DESC LIMIT ").push_bind(fetch);
        let rows = qb.build_query_as::<KeyRow>().fetch_all(&self.pool).await.map_err(db)?;
        into_page(rows, limit, KeyRow::into_key, |key| key.id)
    }

    async fn update_key(&self, id: KeyId, patch: KeyPatch, actor: &Actor) -> StoreResult<Changed<ApiKey>> {
        let action = patch.action();
        let mut tx = self.begin().await?;
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
        lifecycle::key_event(&mut tx, "key.updated", &after, actor).await?;
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
        let mut tx = self.begin().await?;
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
        lifecycle::key_event(&mut tx, "key.revoked", &after, actor).await?;
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
        let mut tx = self.begin().await?;
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
        let mut tx = self.begin().await?;
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
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM api_keys WHERE legacy)")
            .fetch_one(&self.pool)
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
        // A transaction: the chain head stays locked until the row is committed.
        let mut tx = self.begin().await?;
        let entry = append_audit(&mut tx, action, None, organization_id, actor, &details).await?;
        tx.commit().await.map_err(db)?;
        Ok(entry)
    }

    async fn list_audit(&self, filter: &AuditFilter, page: PageRequest<i64>) -> StoreResult<Page<AuditEntry, i64>> {
        let (limit, fetch) = fetch_limit(&page);
        let mut qb = QueryBuilder::<Postgres>::new(concat!("SELECT ", audit_columns!(), " FROM audit_log WHERE true"));
        if let Some(org) = filter.organization_id {
            qb.push(" AND organization_id = ").push_bind(org.0);
        }
        if let Some(key) = filter.key_id {
            qb.push(" AND key_id = ").push_bind(key.0);
        }
        if let Some(action) = &filter.action {
            qb.push(" AND action = ").push_bind(action.clone());
        }
        if let Some(actor) = &filter.actor {
            qb.push(" AND actor = ").push_bind(actor.clone());
        }
        if let Some(since) = filter.since {
            qb.push(" AND created_at >= ").push_bind(since);
        }
        if let Some(until) = filter.until {
            qb.push(" AND created_at < ").push_bind(until);
        }
        if let Some(after) = page.after {
            qb.push(" AND id < ").push_bind(after);
        }
        qb.push(" ORDER BY id DESC LIMIT ").push_bind(fetch);
        let rows = qb.build_query_as::<AuditRow>().fetch_all(&self.pool).await.map_err(db)?;
        into_page(rows, limit, AuditRow::into_entry, |entry| entry.id)
    }
}
