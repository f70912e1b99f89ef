//! `GET /v1/audit-logs`: the caller's organization's audit trail (every organization for admin), and
//! `GET /v1/audit-logs/verify`: the tamper-evidence check of the whole chain (admin).

use axum::Json;
use chrono::{DateTime, Utc};
use keyward_core::KeyId;
use keyward_store::{AuditEntry, AuditFilter};
use serde::Deserialize;

use super::{Listed, listed};
use crate::auth::{Admin, AuditRead, Caller};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::extract::ApiQuery;
use crate::model::{PageQuery, PageResponse};
use crate::openapi::{KeyErrors, QueryErrors};

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    #[param(format = Uuid)]
    pub key_id: Option<String>,
    /// `create`, `update`, `activate`, `deactivate`, `revoke`, ...
    pub action: Option<String>,
    /// A key id, `cli` or `system`.
    pub actor: Option<String>,
    /// RFC 3339, inclusive.
    #[param(format = DateTime)]
    pub since: Option<String>,
    /// RFC 3339, exclusive.
    #[param(format = DateTime)]
    pub until: Option<String>,
    /// `next_cursor` of the previous page.
    #[param(min_length = 1, max_length = 18, pattern = "^[0-9]+$")]
    pub cursor: Option<String>,
    /// 1-100, default 50.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
}

fn time(name: &str, value: Option<&str>) -> ApiResult<Option<DateTime<Utc>>> {
    value
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| ApiError::new(ErrorCode::InvalidQuery, format!("`{name}` must be an RFC 3339 date-time")))
        })
        .transpose()
}

/// List audit rows, newest first.
#[utoipa::path(get, path = "/v1/audit-logs", tag = "audit", params(AuditQuery),
    responses((status = 200, body = PageResponse<AuditEntry>), QueryErrors, KeyErrors))]
pub async fn list_audit(caller: Caller<AuditRead>, ApiQuery(q): ApiQuery<AuditQuery>) -> Listed<AuditEntry> {
    let state = caller.state();
    let key_id = q
        .key_id
        .as_deref()
        .map(|k| k.parse::<KeyId>().map_err(|_| ApiError::new(ErrorCode::InvalidQuery, "`key_id` must be a key id")))
        .transpose()?;
    let filter = AuditFilter {
        organization_id: caller.org_filter(),
        key_id,
        action: q.action,
        actor: q.actor,
        since: time("since", q.since.as_deref())?,
        until: time("until", q.until.as_deref())?,
    };
    // The schema's pattern, exactly: audit ids are positive, and 18 digits always fit an i64.
    if q.cursor.as_deref().is_some_and(|c| !(1..=18).contains(&c.len()) || !c.bytes().all(|b| b.is_ascii_digit())) {
        return Err(ApiError::new(ErrorCode::InvalidQuery, "`cursor` is not valid"));
    }
    let page = PageQuery { cursor: q.cursor, limit: q.limit }.request::<i64>()?;
    let page = state.store.list_audit(&filter, page).await?;
    listed(page, std::convert::identity)
}

/// The result of walking the audit chain.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct AuditVerifyResponse {
    /// Every row's hashes check out and the chain head is the last row.
    pub intact: bool,
    pub rows_checked: u64,
    /// Rows written before the chain existed (migration 0004): not covered.
    pub unchained_rows: u64,
    /// The first row that breaks the chain; `null` when intact.
    pub broken: Option<BrokenRow>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct BrokenRow {
    /// The audit row id (for `truncated`, the id of the last row, which is gone).
    pub id: Option<i64>,
    /// `content_changed` (the row was edited), `link_broken` (a row before it was deleted, or rows were
    /// reordered), `unhashed_row` (inserted behind Keyward's back) or `truncated` (rows at the end were
    /// deleted).
    pub reason: String,
}

/// Verify the tamper-evident audit chain, oldest row first. `keyward:admin` only: the chain spans every
/// organization. Always 200; `intact` says the outcome.
#[utoipa::path(get, path = "/v1/audit-logs/verify", tag = "audit",
    responses((status = 200, body = AuditVerifyResponse), KeyErrors))]
pub async fn verify_audit(admin: Caller<Admin>) -> ApiResult<Json<AuditVerifyResponse>> {
    let state = admin.state();
    let report = state.store.verify_audit_chain().await?;
    if !report.intact {
        tracing::warn!(broken = ?report.broken, "the audit chain is broken");
    }
    Ok(Json(AuditVerifyResponse {
        intact: report.intact,
        rows_checked: report.rows_checked,
        unchained_rows: report.unchained_rows,
        broken: report.broken.map(|b| BrokenRow { id: b.id, reason: b.reason }),
    }))
}
