//! [`crate::Store`]'s statements and reads, once for both SQL backends.

use keyward_core::audit_chain::AuditContent;
use keyward_core::{KeyHash, KeyId, OrgId};
use serde_json::Value;

use super::rows::ChainHead;
use super::{Backend, Db, Dialect, Reads, Stmt};
use crate::{
    Actor, ApiKey, AuditEntry, AuditFilter, KeyFilter, KeyWithOrg, MigrationInfo, Organization, Page, PageRequest,
    StoreResult, stored_time,
};

/// Rows to fetch for a page: one more than it holds, which only says there is a next page. A limit of
/// 0 is read as 1, so that paging always moves forward.
fn fetch_limit<C>(page: &PageRequest<C>) -> (usize, i64) {
    let limit = page.limit.max(1);
    (limit as usize, i64::from(limit) + 1)
}

/// The page of `limit` items out of `limit + 1` fetched.
fn into_page<T, C>(mut items: Vec<T>, limit: usize, cursor: impl Fn(&T) -> C) -> Page<T, C> {
    let more = items.len() > limit;
    items.truncate(limit);
    let next_cursor = if more { items.last().map(cursor) } else { None };
    Page { items, next_cursor }
}

// -----------------------------------------------------------------------------------------------
// Statements shared by several methods; each runs on the caller's connection or transaction.

pub(crate) async fn select_org<D: Db + Reads<Organization>>(
    conn: &mut D::Connection,
    id: OrgId,
) -> StoreResult<Organization> {
    D::fetch_one(conn, Stmt::new(concat!("SELECT ", org_columns!(), " FROM organizations WHERE id = $1")).arg(id)).await
}

/// The organization, locked until the transaction ends: key creations and imports of one organization
/// take turns, so the `max_api_keys` count and the insert cannot interleave with another's.
pub(crate) async fn lock_org<D: Db + Reads<Organization>>(
    conn: &mut D::Connection,
    id: OrgId,
) -> StoreResult<Organization> {
    let sql = format!(concat!("SELECT ", org_columns!(), " FROM organizations WHERE id = $1{}"), D::FOR_UPDATE);
    D::fetch_one(conn, Stmt::new(sql).arg(id)).await
}

pub(crate) async fn select_key<D: Db + Reads<ApiKey>>(conn: &mut D::Connection, id: KeyId) -> StoreResult<ApiKey> {
    D::fetch_one(conn, Stmt::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE id = $1")).arg(id)).await
}

/// The key, locked until the transaction ends, so that an audit diff is computed against what is
/// really replaced.
pub(crate) async fn lock_key<D: Db + Reads<ApiKey>>(conn: &mut D::Connection, id: KeyId) -> StoreResult<ApiKey> {
    let sql = format!(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE id = $1{}"), D::FOR_UPDATE);
    D::fetch_one(conn, Stmt::new(sql).arg(id)).await
}

/// Keys that count against `max_api_keys`: every key not revoked.
pub(crate) async fn held_keys<D: Db + Reads<i64>>(conn: &mut D::Connection, org: OrgId) -> StoreResult<i64> {
    let sql = "SELECT COUNT(*) FROM api_keys WHERE organization_id = $1 AND revoked_at IS NULL";
    D::fetch_one(conn, Stmt::new(sql).arg(org)).await
}

/// The audit row of a change, written in the change's own transaction and linked into the audit chain
/// (see `keyward_core::audit_chain`). The chain head is read locked (SQLite: under the write lock), so
/// appends from every process are serialized until the transaction ends; a transaction therefore
/// takes it last, after the rows it changes.
pub(crate) async fn append_audit<D: Db + Reads<AuditEntry> + Reads<ChainHead>>(
    conn: &mut D::Connection,
    action: &str,
    key_id: Option<KeyId>,
    organization_id: OrgId,
    actor: &Actor,
    details: &Value,
) -> StoreResult<AuditEntry> {
    let at = stored_time(actor.at);
    let (key_text, org_text) = (key_id.map(|id| id.to_string()), organization_id.to_string());
    let content = AuditContent {
        action,
        key_id: key_text.as_deref(),
        organization_id: Some(&org_text),
        actor: &actor.actor,
        actor_ip: actor.ip.as_deref(),
        details,
        created_at: at,
    };
    let prev_hash = super::lifecycle::lock_chain_head::<D>(conn).await?.1;
    let row_hash = content.row_hash(&prev_hash);
    let insert = Stmt::new(concat!(
        "INSERT INTO audit_log (action, key_id, organization_id, actor, actor_ip, details, created_at, prev_hash,
             row_hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         RETURNING ",
        audit_columns!()
    ))
    .arg(action)
    .arg(key_id)
    .arg(organization_id)
    .arg(&actor.actor)
    .arg(&actor.ip)
    .arg(details)
    .arg(at)
    .arg(prev_hash)
    .arg(&row_hash);
    let entry: AuditEntry = D::fetch_one(conn, insert).await?;
    let advance =
        Stmt::new("UPDATE audit_chain SET last_id = $1, last_hash = $2 WHERE id = 1").arg(entry.id).arg(row_hash);
    D::execute(conn, advance).await?;
    Ok(entry)
}

/// Appends the status of a key at `now` to a query, with the precedence of `KeyState::status`.
fn push_status<D: Db>(q: &mut Stmt, now: chrono::DateTime<chrono::Utc>) {
    q.push("(CASE WHEN revoked_at IS NOT NULL AND revoked_at <= ")
        .push_arg(now)
        .push(&format!(" THEN 'revoked' WHEN is_active = {} THEN 'disabled'", D::FALSE))
        .push(" WHEN expires_at IS NOT NULL AND expires_at <= ")
        .push_arg(now)
        .push(" THEN 'expired' ELSE 'active' END)");
}

// -----------------------------------------------------------------------------------------------
// Migrations

pub(crate) async fn migrate_up<B: Backend>(b: &B) -> StoreResult<Vec<MigrationInfo>> {
    let (migrator, pool) = b.migrations();
    B::Db::migrate_up(pool, migrator).await?;
    B::Db::migration_status(pool, migrator).await
}

pub(crate) async fn migrate_down<B: Backend>(b: &B, steps: u32) -> StoreResult<Vec<MigrationInfo>> {
    let (migrator, pool) = b.migrations();
    B::Db::migrate_down(pool, migrator, steps).await?;
    B::Db::migration_status(pool, migrator).await
}

pub(crate) async fn migration_status<B: Backend>(b: &B) -> StoreResult<Vec<MigrationInfo>> {
    let (migrator, pool) = b.migrations();
    B::Db::migration_status(pool, migrator).await
}

// -----------------------------------------------------------------------------------------------
// Reads

pub(crate) async fn get_org<B: Backend>(b: &B, id: OrgId) -> StoreResult<Organization> {
    select_org::<B::Db>(&mut *b.reader().await?, id).await
}

pub(crate) async fn find_org_by_slug<B: Backend>(b: &B, slug: &str) -> StoreResult<Option<Organization>> {
    let q = Stmt::new(concat!("SELECT ", org_columns!(), " FROM organizations WHERE slug = $1")).arg(slug);
    B::Db::fetch_optional(&mut *b.reader().await?, q).await
}

pub(crate) async fn list_orgs<B: Backend>(b: &B, page: PageRequest<OrgId>) -> StoreResult<Page<Organization, OrgId>> {
    let (limit, fetch) = fetch_limit(&page);
    let mut q = Stmt::new(concat!("SELECT ", org_columns!(), " FROM organizations"));
    if let Some(after) = page.after {
        q.push(" WHERE id < ").push_arg(after);
    }
    q.push(" ORDER BY id DESC LIMIT ").push_arg(fetch);
    let orgs = B::Db::fetch_all(&mut *b.reader().await?, q).await?;
    Ok(into_page(orgs, limit, |org: &Organization| org.id))
}

pub(crate) async fn count_orgs<B: Backend>(b: &B) -> StoreResult<i64> {
    B::Db::fetch_one(&mut *b.reader().await?, Stmt::new("SELECT COUNT(*) FROM organizations")).await
}

pub(crate) async fn find_key_by_hash<B: Backend>(b: &B, hash: &KeyHash) -> StoreResult<Option<KeyWithOrg>> {
    let q = Stmt::new(concat!(
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
    .arg(super::Arg::Bytes(hash.0.to_vec()));
    B::Db::fetch_optional(&mut *b.reader().await?, q).await
}

pub(crate) async fn get_key<B: Backend>(b: &B, id: KeyId) -> StoreResult<ApiKey> {
    select_key::<B::Db>(&mut *b.reader().await?, id).await
}

pub(crate) async fn list_keys<B: Backend>(
    b: &B,
    filter: &KeyFilter,
    page: PageRequest<KeyId>,
) -> StoreResult<Page<ApiKey, KeyId>> {
    let (limit, fetch) = fetch_limit(&page);
    let mut q = Stmt::new(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE 1 = 1"));
    if let Some(org) = filter.organization_id {
        q.push(" AND organization_id = ").push_arg(org);
    }
    if let Some(owner) = &filter.owner_id {
        q.push(" AND owner_id = ").push_arg(owner);
    }
    if let Some(environment) = filter.environment {
        q.push(" AND environment = ").push_arg(environment.as_str());
    }
    match filter.status {
        Some(status) => {
            q.push(" AND ");
            push_status::<B::Db>(&mut q, filter.now);
            q.push(" = ").push_arg(status.as_str());
        }
        None if !filter.include_inactive => {
            // Expired keys stay listed: they are still the customer's, and may be extended.
            q.push(&format!(" AND is_active = {} AND (revoked_at IS NULL OR revoked_at > ", B::Db::TRUE))
                .push_arg(filter.now)
                .push(")");
        }
        None => {}
    }
    if let Some(after) = page.after {
        q.push(" AND id < ").push_arg(after);
    }
    q.push(" ORDER BY id DESC LIMIT ").push_arg(fetch);
    let keys = B::Db::fetch_all(&mut *b.reader().await?, q).await?;
    Ok(into_page(keys, limit, |key: &ApiKey| key.id))
}

pub(crate) async fn has_legacy_keys<B: Backend>(b: &B) -> StoreResult<bool> {
    let sql = format!("SELECT EXISTS (SELECT 1 FROM api_keys WHERE legacy = {})", B::Db::TRUE);
    B::Db::fetch_one(&mut *b.reader().await?, Stmt::new(sql)).await
}

pub(crate) async fn list_audit<B: Backend>(
    b: &B,
    filter: &AuditFilter,
    page: PageRequest<i64>,
) -> StoreResult<Page<AuditEntry, i64>> {
    let (limit, fetch) = fetch_limit(&page);
    let mut q = Stmt::new(concat!("SELECT ", audit_columns!(), " FROM audit_log WHERE 1 = 1"));
    if let Some(org) = filter.organization_id {
        q.push(" AND organization_id = ").push_arg(org);
    }
    if let Some(key) = filter.key_id {
        q.push(" AND key_id = ").push_arg(key);
    }
    if let Some(action) = &filter.action {
        q.push(" AND action = ").push_arg(action);
    }
    if let Some(actor) = &filter.actor {
        q.push(" AND actor = ").push_arg(actor);
    }
    if let Some(since) = filter.since {
        q.push(" AND created_at >= ").push_arg(since);
    }
    if let Some(until) = filter.until {
        q.push(" AND created_at < ").push_arg(until);
    }
    if let Some(after) = page.after {
        q.push(" AND id < ").push_arg(after);
    }
    q.push(" ORDER BY id DESC LIMIT ").push_arg(fetch);
    let entries = B::Db::fetch_all(&mut *b.reader().await?, q).await?;
    Ok(into_page(entries, limit, |entry: &AuditEntry| entry.id))
}
