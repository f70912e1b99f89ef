//! `POST /v1/keys/import`: keys issued by another system, as JSON Lines or CSV in the body (admin only,
//! up to 10,000 rows a call). The same operation as `keyward import`; see `service::import`.

use axum::Json;
use axum::body::Body;
use axum::http::HeaderMap;
use axum::http::header::CONTENT_TYPE;
use serde::Deserialize;

use crate::auth::{Admin, Caller};
use crate::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use crate::extract::ApiQuery;
use crate::openapi::{KeyErrors, QueryErrors};
use crate::service::import::{self, ImportFormat, ImportReport};

/// Large enough for 10,000 rows of a few hundred bytes each.
pub const MAX_IMPORT_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImportQuery {
    /// Default: the caller's organization.
    #[param(format = Uuid)]
    pub organization_id: Option<String>,
    /// Check every row and report what would happen; change nothing.
    pub dry_run: Option<bool>,
    /// Default: from `Content-Type` (`application/x-ndjson`, `text/csv`). Case does not matter.
    #[param(value_type = Option<ImportFormatName>, inline)]
    pub format: Option<String>,
}

/// `jsonl` (also spelled `ndjson` or `json`) or `csv`: how `?format=` spells [`ImportFormat`].
#[derive(utoipa::ToSchema)]
#[schema(as = ImportFormat, rename_all = "lowercase")]
#[allow(dead_code)] // documentation only: the values are `ImportFormat::parse`'s
pub enum ImportFormatName {
    Jsonl,
    Ndjson,
    Json,
    Csv,
}

/// Import keys issued by another system. Each row has `key` (plaintext) or `key_sha256` (hex SHA-256
/// of it), plus optional `name`, `owner_id`, `environment`, `scopes`, `allowed_ips`, `expires_at`,
/// `created_at`, `is_active`, `metadata`. Bad rows are reported by line; the others are imported; keys
/// already stored are left as they are, so sending the same file again changes nothing.
#[utoipa::path(post, path = "/v1/keys/import", tag = "keys", params(ImportQuery),
    request_body(content = String, content_type = "application/x-ndjson",
        description = "JSON Lines (`application/x-ndjson`) or CSV with a header line (`text/csv`)"),
    responses(
        (status = 200, body = ImportReport),
        (status = 413, body = ErrorBody, description = "`payload_too_large`: more than 8 MiB or 10,000 rows"),
        (status = 415, body = ErrorBody, description = "`unsupported_media_type`: neither JSON Lines nor CSV"),
        (status = 422, body = ErrorBody, description = "`validation_failed`: a CSV file without a usable header, or no such organization"),
        QueryErrors,
        KeyErrors,
    ))]
#[tracing::instrument(skip_all)]
pub async fn import_keys(
    caller: Caller<Admin>,
    ApiQuery(q): ApiQuery<ImportQuery>,
    headers: HeaderMap,
    timeout: Option<axum::Extension<crate::listen::BodyReadTimeout>>,
    body: Body,
) -> ApiResult<Json<ImportReport>> {
    let state = caller.state();
    let format = match q.format.as_deref() {
        Some(f) => ImportFormat::parse(f)
            .ok_or_else(|| ApiError::new(ErrorCode::InvalidQuery, "`format` must be `jsonl` or `csv`"))?,
        None => headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(ImportFormat::from_content_type)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::UnsupportedMediaType,
                    "send JSON Lines (`Content-Type: application/x-ndjson`) or CSV (`text/csv`)",
                )
            })?,
    };
    let organization_id = caller.organization_for(q.organization_id.as_deref())?;
    let bytes = crate::extract::read_body(body, MAX_IMPORT_BYTES, timeout.map(|t| t.0)).await?;
    let file = import::parse(format, &bytes)?;
    import::check_call_size(&file)?;
    let now = state.clock.now();
    let report =
        import::run(state, organization_id, file, &caller.actor(now), q.dry_run.unwrap_or(false), &mut |_, _| {})
            .await?;
    tracing::info!(
        organization_id = %organization_id,
        imported = report.imported,
        unchanged = report.unchanged,
        rejected = report.rejected.len(),
        dry_run = report.dry_run,
        "keys imported"
    );
    Ok(Json(report))
}
