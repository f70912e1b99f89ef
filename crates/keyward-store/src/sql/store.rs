//! [`Store`] for every SQL backend, written once: each method is its statements (shared by both
//! databases, see [`super`]) around the rules of [`crate::effects`], in one transaction.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::audit_chain::AuditContent;
use keyward_core::{KeyHash, KeyId, OrgId};
use serde_json::Value;
use sqlx::Transaction;

use super::rows::{ChainHead, HashOwner};
use super::usage::UsageBackend;
use super::{Arg, Backend, Db, Dialect, Reads, SearchCandidates, Stmt, contains_pattern, lifecycle, limit_args};
use crate::effects::{self, Effects};
use crate::lookup::key_record;
use crate::{
    Actor, ApiKey, AuditEntry, AuditFilter, Changed, ImportOutcome, KeyFilter, KeyImport, KeyLookup, KeyPatch,
    KeyRecord, KeyUsage, KeyWithOrg, MigrationInfo, NewKey, NewOrganization, Organization, OrganizationPatch, Page,
    PageRequest, Store, StoreError, StoreResult, plan_import, stored_time,
};

/// Rows to fetch for a page: one more than it holds, which only says there is a next page. A limit of
/// 0 is read as 1, so that paging always moves forward.
pub(super) fn fetch_limit<C>(page: &PageRequest<C>) -> (usize, i64) {
    let limit = page.limit.max(1);
    (limit as usize, i64::from(limit) + 1)
}

/// The page of `limit` items out of `limit + 1` fetched.
pub(super) fn into_page<T, C>(mut items: Vec<T>, limit: usize, cursor: impl Fn(&T) -> C) -> Page<T, C> {
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
    let details = &crate::stored_json(details);
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

/// Writes a change's audit rows, then its event, in the change's transaction: after the rows it
/// changed, since the first audit row takes the chain head.
pub(crate) async fn record<D>(conn: &mut D::Connection, effects: &Effects, actor: &Actor) -> StoreResult<()>
where
    D: Db + Reads<AuditEntry> + Reads<ChainHead>,
{
    for audit in &effects.audits {
        append_audit::<D>(conn, audit.action, audit.key_id, audit.organization_id, actor, &audit.details).await?;
    }
    if let Some(event) = &effects.event {
        lifecycle::insert_event::<D>(conn, event, None).await?;
    }
    Ok(())
}

/// Ends a change of one row: runs `write` (which returns the row as written), records the change's
/// effects (`effects` of the row written) after it, and commits.
pub(crate) async fn finish<D, T>(
    mut tx: Transaction<'static, D>,
    write: Stmt,
    effects: impl FnOnce(&T) -> Effects + Send,
    actor: &Actor,
) -> StoreResult<T>
where
    D: Db + Reads<T> + Reads<AuditEntry> + Reads<ChainHead>,
    T: Send,
{
    let written = D::fetch_one(&mut tx, write).await?;
    record::<D>(&mut tx, &effects(&written), actor).await?;
    tx.commit().await.map_err(D::error)?;
    Ok(written)
}

/// A key row to insert: created keys and imported keys alike.
pub(crate) struct KeyInsert<'a> {
    pub key: &'a NewKey,
    pub legacy: bool,
    pub created_at: DateTime<Utc>,
}

/// Rows per multi-row INSERT: 25 parameters a row stays well under SQLite's 32,766 (PostgreSQL takes
/// 65,535). One statement per few hundred rows, not per row: each statement is a round trip.
const INSERT_ROWS: usize = 500;
/// Hashes per `IN (...)` lookup of an import.
const LOOKUP_HASHES: usize = 500;

/// The one INSERT of key rows.
pub(crate) async fn insert_key_rows<D: Db>(
    conn: &mut D::Connection,
    rows: &[KeyInsert<'_>],
    actor: &Actor,
) -> StoreResult<()> {
    for chunk in rows.chunks(INSERT_ROWS) {
        let mut q = Stmt::new(concat!(
            "INSERT INTO api_keys (id, organization_id, owner_id, name, description, environment, prefix, key_hint,
                 key_hash, hash_algorithm, scopes, allowed_ips, expires_at, is_active, plan, ",
            limit_columns!(),
            ", metadata, rotated_from, created_by, created_at, updated_at, legacy) VALUES "
        ));
        q.push_rows(chunk.iter().map(|row| {
            let key = row.key;
            let mut args = vec![
                key.id.into(),
                key.organization_id.into(),
                key.owner_id.as_deref().into(),
                key.name.as_str().into(),
                key.description.as_deref().into(),
                key.environment.as_str().into(),
                key.prefix.as_str().into(),
                key.hint.as_str().into(),
                Arg::Bytes(key.key_hash.0.to_vec()),
                key.hash_algorithm.as_str().into(),
                key.scopes.to_strings().into(),
                key.allowed_ips.to_strings().into(),
                key.expires_at.into(),
                key.is_active.into(),
                key.plan.as_deref().into(),
            ];
            args.extend(limit_args(&key.limits));
            args.extend([
                (&key.metadata).into(),
                key.rotated_from.into(),
                actor.actor.as_str().into(),
                row.created_at.into(),
                actor.at.into(),
                row.legacy.into(),
            ]);
            args
        }));
        D::execute(conn, q).await?;
    }
    Ok(())
}

/// An organization's row, in the order of `org_columns!()`.
fn org_row(org: &Organization) -> Vec<Arg> {
    let mut args = vec![
        org.id.into(),
        (&org.name).into(),
        (&org.slug).into(),
        (&org.email).into(),
        (&org.plan).into(),
        org.is_active.into(),
    ];
    args.extend(limit_args(&org.limits));
    args.extend([org.max_api_keys.into(), org.created_at.into(), org.updated_at.into()]);
    args
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

/// `AND` the key expires in `(now, until]`: not expired yet, expiring by `until`.
pub(crate) fn push_expiring(q: &mut Stmt, now: DateTime<Utc>, until: DateTime<Utc>) {
    q.push(" AND expires_at > ").push_arg(now).push(" AND expires_at <= ").push_arg(until);
}

/// `AND (name or owner id contains the needle, or the hint is it)`: see [`KeyFilter::search`]. The
/// one predicate of a search, whichever way its keys are found.
/// SECURITY: the needle is an argument, never SQL; its `%`, `_` and `\` are escaped, so a search
/// is a substring match and never a pattern the caller writes.
fn push_search<D: Db>(q: &mut Stmt, needle: &str) {
    let pattern = contains_pattern(needle);
    let (name, owner) = (D::ascii_lower("name"), D::ascii_lower("owner_id"));
    q.push(&format!(" AND ({name} LIKE ")).push_arg(pattern.clone()).push(" ESCAPE '\\'");
    q.push(&format!(" OR {owner} LIKE ")).push_arg(pattern).push(" ESCAPE '\\'");
    q.push(" OR key_hint = ").push_arg(needle).push(")");
}

/// Candidates past which a search walks the keys newest first instead of reading its candidates: a
/// needle this common fills a page within a few thousand keys of the walk, while sorting all of its
/// candidates costs more the more keys hold it.
pub(crate) const SEARCH_CANDIDATES_MAX: i64 = 1_000;

/// The candidates a search by `needle` reads, when it reads them rather than walking the keys newest
/// first: where the database has [`SearchCandidates`] for the needle, and they are fewer than
/// [`SEARCH_CANDIDATES_MAX`] keys (in every organization, no other filter).
async fn search_by_index<D: Db + Reads<i64>>(
    conn: &mut D::Connection,
    needle: &str,
) -> StoreResult<Option<SearchCandidates>> {
    let Some(candidates) = D::search_candidates(needle) else { return Ok(None) };
    if let Some(estimate) = candidates.estimate {
        let mut q = Stmt::new("");
        estimate(&mut q, needle);
        if D::fetch_one::<i64>(conn, q).await? >= SEARCH_CANDIDATES_MAX {
            return Ok(None);
        }
    }
    let mut count = Stmt::new("SELECT COUNT(*) FROM (");
    (candidates.select)(&mut count, needle);
    count.push(" LIMIT ").push_arg(SEARCH_CANDIDATES_MAX).push(") AS found");
    let found: i64 = D::fetch_one(conn, count).await?;
    Ok((found < SEARCH_CANDIDATES_MAX).then_some(candidates))
}

/// `(the candidates, and the keys whose hint is the needle) AS found JOIN api_keys`: the keys a search
/// by index reads, each once, before [`push_search`] decides.
fn push_search_from(q: &mut Stmt, candidates: SearchCandidates, needle: &str) {
    let SearchCandidates { key, join, select, estimate: _ } = candidates;
    q.push("(");
    select(q, needle);
    q.push(&format!(" UNION SELECT {key} FROM api_keys WHERE key_hint = ")).push_arg(needle);
    q.push(&format!(") AS found {join} api_keys ON api_keys.{key} = found.k"));
}

// -----------------------------------------------------------------------------------------------
// The store

/// A key with what verification needs of its organization.
async fn find_key<B: Backend>(b: &B, hash: &KeyHash) -> StoreResult<Option<KeyWithOrg>> {
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
    .arg(Arg::Bytes(hash.0.to_vec()));
    B::Db::fetch_optional(&mut *b.reader().await?, q).await
}

#[async_trait]
impl<B: Backend + std::fmt::Debug> KeyLookup for B {
    async fn find_key_record(&self, hash: &KeyHash) -> StoreResult<Option<Arc<KeyRecord>>> {
        Ok(key_record(find_key(self, hash).await?, hash))
    }

    async fn ping(&self) -> StoreResult<()> {
        B::Db::execute(&mut *self.reader().await?, Stmt::new("SELECT 1")).await?;
        Ok(())
    }
}

#[async_trait]
impl<B: UsageBackend + std::fmt::Debug> Store for B {
    fn backend(&self) -> &'static str {
        B::NAME
    }

    async fn migrate_up(&self) -> StoreResult<Vec<MigrationInfo>> {
        let (migrator, pool) = self.migrations();
        B::Db::migrate_up(pool, migrator).await?;
        B::Db::migration_status(pool, migrator).await
    }

    async fn migrate_down(&self, steps: u32) -> StoreResult<Vec<MigrationInfo>> {
        let (migrator, pool) = self.migrations();
        B::Db::migrate_down(pool, migrator, steps).await?;
        B::Db::migration_status(pool, migrator).await
    }

    async fn migration_status(&self) -> StoreResult<Vec<MigrationInfo>> {
        let (migrator, pool) = self.migrations();
        B::Db::migration_status(pool, migrator).await
    }

    async fn insert_org(&self, org: NewOrganization, actor: &Actor) -> StoreResult<Organization> {
        let tx = self.writer().await?;
        let insert = Stmt::new(concat!(
            "INSERT INTO organizations (",
            org_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING ",
            org_columns!()
        ))
        .args(org_row(&org.created(actor.at)));
        finish(tx, insert, effects::org_created, actor).await
    }

    async fn get_org(&self, id: OrgId) -> StoreResult<Organization> {
        select_org::<B::Db>(&mut *self.reader().await?, id).await
    }

    async fn find_org_by_slug(&self, slug: &str) -> StoreResult<Option<Organization>> {
        let q = Stmt::new(concat!("SELECT ", org_columns!(), " FROM organizations WHERE slug = $1")).arg(slug);
        B::Db::fetch_optional(&mut *self.reader().await?, q).await
    }

    async fn list_orgs(&self, page: PageRequest<OrgId>) -> StoreResult<Page<Organization, OrgId>> {
        let (limit, fetch) = fetch_limit(&page);
        let mut q = Stmt::new(concat!("SELECT ", org_columns!(), " FROM organizations"));
        if let Some(after) = page.after {
            q.push(" WHERE id < ").push_arg(after);
        }
        q.push(" ORDER BY id DESC LIMIT ").push_arg(fetch);
        let orgs = B::Db::fetch_all(&mut *self.reader().await?, q).await?;
        Ok(into_page(orgs, limit, |org: &Organization| org.id))
    }

    async fn update_org(
        &self,
        id: OrgId,
        patch: OrganizationPatch,
        actor: &Actor,
    ) -> StoreResult<Changed<Organization>> {
        let mut tx = self.writer().await?;
        let before = lock_org::<B::Db>(&mut tx, id).await?;
        let Some((after, effects)) = effects::org_updated(&before, &patch) else {
            // Nothing changed: no write, no audit row, and `updated_at` stays put.
            return Ok(Changed::updated_org(before));
        };
        let after = Organization { updated_at: actor.at, ..after };
        let update = Stmt::new(concat!(
            "UPDATE organizations SET (",
            org_settings_columns!(),
            ") = ($2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) WHERE id = $1 RETURNING ",
            org_columns!()
        ))
        .args(org_row(&after));
        Ok(Changed::updated_org(finish(tx, update, |_| effects, actor).await?))
    }

    async fn count_orgs(&self) -> StoreResult<i64> {
        B::Db::fetch_one(&mut *self.reader().await?, Stmt::new("SELECT COUNT(*) FROM organizations")).await
    }

    async fn insert_key(&self, key: NewKey, actor: &Actor) -> StoreResult<Changed<ApiKey>> {
        let mut tx = self.writer().await?;
        // Key creations of one organization take turns (its row lock; SQLite: the database's write
        // lock, across processes too): the count below and the insert see the same keys, so two
        // creations cannot both pass the limit.
        let org = lock_org::<B::Db>(&mut tx, key.organization_id).await?;
        if let Some(max) = org.max_api_keys
            && held_keys::<B::Db>(&mut tx, org.id).await? >= max
        {
            return Err(StoreError::KeyLimitReached(max));
        }
        insert_key_rows::<B::Db>(&mut tx, &[KeyInsert { key: &key, legacy: false, created_at: actor.at }], actor)
            .await?;
        // Read back, so the record returned is exactly what later reads return.
        let created = select_key::<B::Db>(&mut tx, key.id).await?;
        record::<B::Db>(&mut tx, &effects::key_created(&created, actor), actor).await?;
        tx.commit().await.map_err(B::Db::error)?;
        Ok(Changed::inserted_key(created))
    }

    async fn find_key_by_hash(&self, hash: &KeyHash) -> StoreResult<Option<KeyWithOrg>> {
        find_key(self, hash).await
    }

    async fn get_key(&self, id: KeyId) -> StoreResult<ApiKey> {
        select_key::<B::Db>(&mut *self.reader().await?, id).await
    }

    async fn list_keys(&self, filter: &KeyFilter, page: PageRequest<KeyId>) -> StoreResult<Page<ApiKey, KeyId>> {
        let (limit, fetch) = fetch_limit(&page);
        let mut conn = self.reader().await?;
        let mut q = Stmt::new(concat!("SELECT ", key_columns!(), " FROM "));
        let by_index = match &filter.search {
            Some(needle) => search_by_index::<B::Db>(&mut conn, needle).await?.map(|c| (c, needle)),
            None => None,
        };
        match by_index {
            Some((candidates, needle)) => push_search_from(&mut q, candidates, needle),
            None => {
                q.push("api_keys");
            }
        }
        q.push(" WHERE 1 = 1");
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
        if let Some(needle) = &filter.search {
            push_search::<B::Db>(&mut q, needle);
            // Planned for its own needle: a rare one reads an index, a common one walks newest first.
            q.one_shot();
        }
        if let Some(by) = filter.expires_by {
            push_expiring(&mut q, filter.now, by);
        }
        if let Some(after) = page.after {
            q.push(" AND id < ").push_arg(after);
        }
        q.push(" ORDER BY id DESC LIMIT ").push_arg(fetch);
        let keys = B::Db::fetch_all(&mut conn, q).await?;
        Ok(into_page(keys, limit, |key: &ApiKey| key.id))
    }

    async fn analyze_keys(&self) -> StoreResult<()> {
        if let Some(analyze) = B::Db::ANALYZE_KEYS {
            B::Db::execute(&mut *self.reader().await?, Stmt::new(analyze)).await?;
        }
        Ok(())
    }

    async fn update_key(&self, id: KeyId, patch: KeyPatch, actor: &Actor) -> StoreResult<Changed<ApiKey>> {
        let mut tx = self.writer().await?;
        let before = lock_key::<B::Db>(&mut tx, id).await?;
        let Some((after, effects)) = effects::key_updated(&before, &patch, actor) else {
            // Nothing changed: no write, no audit row, and `updated_at` stays put.
            return Ok(Changed::updated_key(before));
        };
        let update = Stmt::new(concat!(
            "UPDATE api_keys SET name = $1, description = $2, scopes = $3, allowed_ips = $4, expires_at = $5,
                 metadata = $6, plan = $7, is_active = $8, rate_limit_per_minute = $9, rate_limit_per_hour = $10,
                 rate_limit_per_day = $11, monthly_request_limit = $12, updated_at = $13
             WHERE id = $14
             RETURNING ",
            key_columns!()
        ))
        .arg(&after.name)
        .arg(&after.description)
        .arg(after.scopes.to_strings())
        .arg(after.allowed_ips.to_strings())
        .arg(after.expires_at)
        .arg(&after.metadata)
        .arg(&after.plan)
        .arg(after.is_active)
        .args(limit_args(&after.limits))
        .arg(actor.at)
        .arg(id);
        Ok(Changed::updated_key(finish(tx, update, |_| effects, actor).await?))
    }

    async fn revoke_key(
        &self,
        id: KeyId,
        reason: &str,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Changed<ApiKey>> {
        let mut tx = self.writer().await?;
        let before = lock_key::<B::Db>(&mut tx, id).await?;
        let Some((after, effects)) = effects::key_revoked(&before, reason, stored_time(at), actor) else {
            return Ok(Changed::revoked_key(before));
        };
        let update = Stmt::new(concat!(
            "UPDATE api_keys SET revoked_at = $1, revoke_reason = $2, updated_at = $3 WHERE id = $4 RETURNING ",
            key_columns!()
        ))
        .arg(after.revoked_at)
        .arg(&after.revoke_reason)
        .arg(actor.at)
        .arg(id);
        Ok(Changed::revoked_key(finish(tx, update, |_| effects, actor).await?))
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
            let update = Stmt::new(
                "UPDATE api_keys SET
                     total_requests = total_requests + $1,
                     last_used_ip = CASE WHEN last_used_at IS NULL OR last_used_at < $2
                                         THEN COALESCE($3, last_used_ip) ELSE last_used_ip END,
                     last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < $2
                                         THEN $2 ELSE last_used_at END
                 WHERE id = $4",
            )
            .arg(u.requests)
            .arg(u.last_used_at)
            .arg(&u.last_used_ip)
            .arg(u.key_id);
            B::Db::execute(&mut tx, update).await?;
        }
        tx.commit().await.map_err(B::Db::error)
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
        // As for insert_key: the limit counted here holds until the inserts are committed, and the
        // hashes looked up are what the inserts land on.
        let org = lock_org::<B::Db>(&mut tx, organization_id).await?;
        let held = match org.max_api_keys {
            Some(_) => held_keys::<B::Db>(&mut tx, org.id).await?,
            None => 0,
        };
        let mut known = HashMap::new();
        for chunk in keys.chunks(LOOKUP_HASHES) {
            let mut q = Stmt::new("SELECT key_hash, organization_id FROM api_keys WHERE key_hash IN (");
            q.push_list(chunk.iter().map(|import| Arg::Bytes(import.key.key_hash.0.to_vec()))).push(")");
            for HashOwner(hash, owner) in B::Db::fetch_all(&mut tx, q).await? {
                known.insert(hash, owner);
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
        insert_key_rows::<B::Db>(&mut tx, &inserts, actor).await?;
        if dry_run {
            tx.rollback().await.map_err(B::Db::error)?;
        } else {
            tx.commit().await.map_err(B::Db::error)?;
        }
        Ok(Changed::imported(outcomes, &keys, dry_run))
    }

    async fn has_legacy_keys(&self) -> StoreResult<bool> {
        let sql = format!("SELECT EXISTS (SELECT 1 FROM api_keys WHERE legacy = {})", B::Db::TRUE);
        B::Db::fetch_one(&mut *self.reader().await?, Stmt::new(sql)).await
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
        let entry = append_audit::<B::Db>(&mut tx, action, None, organization_id, actor, &details).await?;
        tx.commit().await.map_err(B::Db::error)?;
        Ok(entry)
    }

    async fn list_audit(&self, filter: &AuditFilter, page: PageRequest<i64>) -> StoreResult<Page<AuditEntry, i64>> {
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
        let entries = B::Db::fetch_all(&mut *self.reader().await?, q).await?;
        Ok(into_page(entries, limit, |entry: &AuditEntry| entry.id))
    }
}
