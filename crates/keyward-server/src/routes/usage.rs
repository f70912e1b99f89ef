//! The usage ledger over HTTP: `POST /v1/usage` (a backend reports what its verified requests did),
//! `GET /v1/keys/{id}/usage` (a key's daily series, totals and top endpoints, from the rollups) and
//! `GET /v1/organizations/{id}/usage` (the month's billing summary per key, from the rollups).
//!
//! Who may read what: a key's usage needs what reading the key needs (`keyward:keys:read`, or
//! `keyward:self` for its own owner's keys). An organization's billing summary needs `keyward:admin`,
//! or `keyward:keys:read` for the caller's own organization; any other organization answers 404, like
//! an unknown one.

use std::collections::{HashMap, HashSet};

use axum::Json;
use axum::http::StatusCode;
use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use keyward_core::{KeyId, OrgId};
use keyward_store::usage::{
    DailyCounts, DailyUsage, EndpointUsage, MAX_COST_MICROS_PER_EVENT, MAX_ENDPOINT_LEN, MAX_RESPONSE_TIME_MS,
    MAX_TOKENS_PER_EVENT, UsageEvent, UsageKind,
};
use keyward_store::{ApiKey, Store, StoreError};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Caller, KeysRead, KeysReadOrSelf, Verify};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::extract::{ApiPath, ApiQuery, JsonBody};
use crate::openapi::{JsonBodyErrors, KeyErrors, NotFoundErrors, QueryErrors};
use crate::routes::target::Visible;

/// Events one `POST /v1/usage` may carry.
pub const MAX_REPORT_EVENTS: usize = 1_000;
/// Days one `GET /v1/keys/{id}/usage` may cover.
pub const MAX_DAYS: u32 = 366;
const TOP_ENDPOINTS: u32 = 10;

/// An endpoint as recorded: 1 to 200 characters, no control characters.
pub(crate) fn endpoint(field: &str, value: &str) -> ApiResult<String> {
    if value.is_empty() || value.chars().count() > MAX_ENDPOINT_LEN || value.chars().any(char::is_control) {
        return Err(ApiError::validation(field, format!("must be 1 to {MAX_ENDPOINT_LEN} printable characters")));
    }
    // SECURITY: a key a client put in the endpoint is recorded as its prefix and hint only.
    Ok(keyward_core::PlainKey::redact_in(value).into_owned())
}

/// An HTTP method as recorded: 1 to 16 ASCII letters, upper-cased.
pub(crate) fn method(field: &str, value: &str) -> ApiResult<String> {
    if value.is_empty() || value.len() > 16 || !value.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(ApiError::validation(field, "must be an HTTP method (1 to 16 letters)"));
    }
    Ok(value.to_ascii_uppercase())
}

fn text(field: &str, value: Option<String>, max: usize) -> ApiResult<Option<String>> {
    match value {
        Some(v) if v.chars().count() > max || v.chars().any(char::is_control) => {
            Err(ApiError::validation(field, format!("must be at most {max} printable characters")))
        }
        other => Ok(other),
    }
}

/// A counted field of a report, at most `max`: 422 `validation_failed` naming the field beyond it.
/// SECURITY: every counted number has a bound, so that sums over a day, a month or a fold stay far
/// from i64::MAX (they saturate there anyway: see `keyward_store::usage`).
fn bounded(field: impl FnOnce() -> String, value: Option<u64>, max: i64) -> ApiResult<Option<i64>> {
    match value {
        None => Ok(None),
        Some(v) => match i64::try_from(v) {
            Ok(v) if v <= max => Ok(Some(v)),
            _ => Err(ApiError::validation(field(), format!("must be 0 to {max}"))),
        },
    }
}

/// One request a backend verified earlier, as it reports it.
///
/// The `minimum`/`maximum` here state what the server enforces (422 `validation_failed` naming the
/// field): the numbers are `keyward_store::usage`'s `MAX_*` constants, and a test compares them.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageReport {
    /// Your id for this report (1 to 128 characters), unique in your organization: a report sent again
    /// with the same id is counted once.
    #[schema(min_length = 1, max_length = 128, pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$")]
    pub id: String,
    /// The key that made the request (`key_id` of the verify answer).
    #[schema(format = Uuid)]
    pub key_id: String,
    /// When the request happened (RFC 3339); default: now. At most 5 minutes ahead.
    pub timestamp: Option<DateTime<Utc>>,
    /// 1 to 200 characters, no control characters.
    #[schema(min_length = 1, max_length = 200, pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$")]
    pub endpoint: Option<String>,
    /// 1 to 16 letters.
    #[schema(min_length = 1, max_length = 16, pattern = "^[A-Za-z]+$")]
    pub method: Option<String>,
    /// 100 to 599.
    #[schema(minimum = 100, maximum = 599)]
    pub status_code: Option<u16>,
    /// 0 to 3,600,000 (one hour).
    #[schema(minimum = 0, maximum = 3600000)]
    pub response_time_ms: Option<u64>,
    /// 0 to 1,000,000,000.
    #[schema(minimum = 0, maximum = 1000000000)]
    pub tokens_used: Option<u64>,
    /// What the request cost, in integer micro-dollars (1,000,000 = $1): 0 to 1,000,000,000,000 ($1M).
    #[schema(minimum = 0, maximum = 1000000000000_i64)]
    pub cost_micros: Option<u64>,
    /// The end client's IP.
    #[schema(value_type = Option<crate::model::IpAddress>)]
    pub ip: Option<String>,
    /// At most 512 characters, no control characters.
    #[schema(max_length = 512, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")]
    pub user_agent: Option<String>,
    /// At most 100 characters, no control characters.
    #[schema(max_length = 100, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")]
    pub error_code: Option<String>,
    /// At most 1,000 characters, no control characters.
    #[schema(max_length = 1000, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")]
    pub error_message: Option<String>,
}

/// A batch of reports: `{"events": [...]}`; a single report may also be sent on its own.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageReportBatch {
    /// 1 to 1,000 reports.
    #[schema(min_items = 1, max_items = 1000)]
    pub events: Vec<UsageReport>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageAcceptedResponse {
    /// Reports taken (written within a flush interval; a repeated id is counted once).
    pub accepted: usize,
}

/// Report usage (status, latency, tokens, cost) for requests verified earlier: one report or a batch.
#[utoipa::path(post, path = "/v1/usage", tag = "usage", request_body = UsageReportBatch,
    responses((status = 202, body = UsageAcceptedResponse), KeyErrors, JsonBodyErrors))]
#[tracing::instrument(level = "debug", skip_all)]
pub async fn report_usage(
    caller: Caller<Verify>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<UsageAcceptedResponse>)> {
    let state = caller.state();
    let value: serde_json::Value = body.parse()?;
    let (reports, prefix) = if value.get("events").is_some() {
        let batch: UsageReportBatch = body.parse()?;
        (batch.events, "events")
    } else {
        (vec![body.parse::<UsageReport>()?], "")
    };
    if reports.is_empty() || reports.len() > MAX_REPORT_EVENTS {
        return Err(ApiError::validation("events", format!("must hold 1 to {MAX_REPORT_EVENTS} reports")));
    }
    let now = state.clock.now();
    let field = |i: usize, name: &str| if prefix.is_empty() { name.to_owned() } else { format!("events[{i}].{name}") };
    let mut owners: HashMap<KeyId, OrgId> = HashMap::new();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut events = Vec::with_capacity(reports.len());
    for (i, r) in reports.iter().enumerate() {
        if r.id.is_empty() || r.id.chars().count() > 128 || r.id.chars().any(char::is_control) {
            return Err(ApiError::validation(field(i, "id"), "must be 1 to 128 printable characters"));
        }
        seen.insert(&r.id);
        let unknown = || ApiError::validation(field(i, "key_id"), "no such key");
        let key_id: KeyId = r.key_id.parse().map_err(|_| unknown())?;
        let organization_id = match owners.get(&key_id) {
            Some(org) => *org,
            None => {
                let key = match state.store.get_key(key_id).await {
                    Ok(key) => key,
                    Err(StoreError::NotFound) => return Err(unknown()),
                    Err(e) => return Err(e.into()),
                };
                // SECURITY: another organization's key is answered exactly like an unknown one.
                if !caller.reaches_org(key.organization_id) {
                    return Err(unknown());
                }
                owners.insert(key_id, key.organization_id);
                key.organization_id
            }
        };
        let at = r.timestamp.unwrap_or(now);
        if at > now + Duration::minutes(5) {
            return Err(ApiError::validation(field(i, "timestamp"), "must not be in the future"));
        }
        let mut e = UsageEvent::new(UsageKind::Report, key_id, organization_id, at);
        e.idempotency_id = Some(r.id.clone());
        e.endpoint = r.endpoint.as_deref().map(|v| endpoint(&field(i, "endpoint"), v)).transpose()?;
        e.method = r.method.as_deref().map(|v| method(&field(i, "method"), v)).transpose()?;
        if let Some(status) = r.status_code {
            if !(100..=599).contains(&status) {
                return Err(ApiError::validation(field(i, "status_code"), "must be 100 to 599"));
            }
            e.status_code = Some(i32::from(status));
        }
        e.response_time_ms = bounded(|| field(i, "response_time_ms"), r.response_time_ms, MAX_RESPONSE_TIME_MS)?;
        e.tokens_used = bounded(|| field(i, "tokens_used"), r.tokens_used, MAX_TOKENS_PER_EVENT)?.unwrap_or(0);
        e.cost_micros = bounded(|| field(i, "cost_micros"), r.cost_micros, MAX_COST_MICROS_PER_EVENT)?.unwrap_or(0);
        e.ip =
            r.ip.as_deref()
                .map(|ip| {
                    ip.trim()
                        .parse::<std::net::IpAddr>()
                        .map(|ip| ip.to_canonical())
                        .map_err(|_| ApiError::validation(field(i, "ip"), "must be an IPv4 or IPv6 address"))
                })
                .transpose()?;
        e.user_agent = text(&field(i, "user_agent"), r.user_agent.clone(), 512)?;
        e.error_code = text(&field(i, "error_code"), r.error_code.clone(), 100)?;
        e.error_message = text(&field(i, "error_message"), r.error_message.clone(), 1_000)?;
        events.push(e);
    }
    // Nothing is recorded unless every report is valid: no partial write.
    let accepted = events.len();
    for e in events {
        state.usage.record(e);
    }
    Ok((StatusCode::ACCEPTED, Json(UsageAcceptedResponse { accepted })))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DaysQuery {
    /// 1 to 366 days ending today (UTC); default 30.
    #[param(minimum = 1, maximum = 366)]
    pub days: Option<u32>,
}

/// One day, or a span's totals: the stored counters and what the latency histogram makes of them.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageCounts {
    #[serde(flatten)]
    pub counts: DailyCounts,
    pub mean_latency_ms: Option<f64>,
    /// The upper bound of the latency bucket holding the 95th percentile.
    pub p95_latency_ms: Option<i64>,
}

impl From<DailyCounts> for UsageCounts {
    fn from(counts: DailyCounts) -> Self {
        Self { mean_latency_ms: counts.mean_latency_ms(), p95_latency_ms: counts.latency.p95_ms(), counts }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DayUsage {
    #[schema(value_type = String, example = "2030-01-31")]
    pub day: NaiveDate,
    #[serde(flatten)]
    pub counts: UsageCounts,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KeyUsageResponse {
    #[schema(value_type = String)]
    pub key_id: KeyId,
    #[schema(value_type = String)]
    pub from: NaiveDate,
    #[schema(value_type = String)]
    pub to: NaiveDate,
    /// Every day of the span, oldest first (days without use are zeros).
    pub days: Vec<DayUsage>,
    pub totals: UsageCounts,
    /// Most requested first, at most 10.
    pub top_endpoints: Vec<EndpointUsage>,
}

/// Every day of `from..=to` from rollup rows (a day without a row is zeros), oldest first, and their
/// totals.
pub fn daily_series(rows: &[DailyUsage], from: NaiveDate, to: NaiveDate) -> (Vec<DayUsage>, DailyCounts) {
    let by_day: HashMap<NaiveDate, &DailyCounts> = rows.iter().map(|r| (r.day, &r.counts)).collect();
    let mut totals = DailyCounts::default();
    let mut series = Vec::new();
    let mut day = from;
    while day <= to {
        let counts = by_day.get(&day).copied().cloned().unwrap_or_default();
        totals.add(&counts);
        series.push(DayUsage { day, counts: counts.into() });
        day += Duration::days(1);
    }
    (series, totals)
}

/// A key's usage over the `days` days ending `today`, from the rollups (one row per day used).
pub async fn key_usage_report(
    store: &dyn Store,
    key_id: KeyId,
    days: u32,
    today: NaiveDate,
) -> Result<KeyUsageResponse, StoreError> {
    let from = today - Duration::days(i64::from(days.max(1)) - 1);
    let rows = store.key_usage_daily(key_id, from, today).await?;
    let (series, totals) = daily_series(&rows, from, today);
    Ok(KeyUsageResponse {
        key_id,
        from,
        to: today,
        days: series,
        totals: totals.into(),
        top_endpoints: store.key_usage_endpoints(key_id, from, today, TOP_ENDPOINTS).await?,
    })
}

/// A key's daily usage series, totals and top endpoints (from daily rollups).
///
/// The rollups catch up with recorded usage every `usage.fold_interval_ms` (10 s by default).
#[utoipa::path(get, path = "/v1/keys/{id}/usage", tag = "usage",
    params(("id" = Uuid, Path, description = "key id"), DaysQuery),
    responses((status = 200, body = KeyUsageResponse), QueryErrors, NotFoundErrors,
        KeyErrors))]
pub async fn key_usage(
    key: Visible<KeysReadOrSelf, ApiKey>,
    ApiQuery(q): ApiQuery<DaysQuery>,
) -> ApiResult<Json<KeyUsageResponse>> {
    let state = key.caller.state();
    let days = q.days.unwrap_or(30);
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(ApiError::new(ErrorCode::InvalidQuery, format!("`days` must be 1 to {MAX_DAYS}")));
    }
    let today = state.clock.now().date_naive();
    Ok(Json(key_usage_report(&*state.store, key.target.id, days, today).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MonthQuery {
    /// `YYYY-MM` (UTC); default: the current month.
    #[param(pattern = r"^[0-9]{4}-(0[1-9]|1[0-2])$")]
    pub month: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KeyBillingLine {
    #[schema(value_type = String)]
    pub key_id: KeyId,
    #[serde(flatten)]
    pub counts: UsageCounts,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrgUsageResponse {
    #[schema(value_type = String)]
    pub organization_id: OrgId,
    /// `YYYY-MM`.
    pub month: String,
    /// Every key with usage in the month, by key id.
    pub keys: Vec<KeyBillingLine>,
    pub totals: UsageCounts,
}

/// The first and last day of a `YYYY-MM` month.
pub fn parse_month(month: &str) -> Option<(NaiveDate, NaiveDate)> {
    let (y, m) = month.split_once('-')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    let first = NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, 1)?;
    let next = if first.month() == 12 {
        NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)?
    } else {
        NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)?
    };
    Some((first, next.pred_opt()?))
}

/// The billing month `month` names (`YYYY-MM`, UTC; none: the month of `now`, the quota's month),
/// with its first and last day; anything else is 400 `invalid_query`.
pub fn billing_month(month: Option<String>, now: DateTime<Utc>) -> ApiResult<(String, NaiveDate, NaiveDate)> {
    let month = month.unwrap_or_else(|| keyward_store::usage::month_of(now));
    let Some((first, last)) = parse_month(&month) else {
        return Err(ApiError::new(ErrorCode::InvalidQuery, "`month` must be YYYY-MM"));
    };
    Ok((month, first, last))
}

/// Organization `id` and its billing month `month` (see [`billing_month`]) as `caller` may read them:
/// another organization (without `keyward:admin`) is not found, like an unknown one.
pub async fn org_billing_month(
    caller: &Caller<KeysRead>,
    id: OrgId,
    month: Option<String>,
) -> ApiResult<(keyward_store::Organization, (String, NaiveDate, NaiveDate))> {
    // SECURITY: another organization answers like an unknown one.
    if !caller.reaches_org(id) {
        return Err(ApiError::not_found());
    }
    let state = caller.state();
    let span = billing_month(month, state.clock.now())?;
    Ok((state.store.get_org(id).await?, span))
}

/// An organization's billing summary for a month: totals per key, from monthly rollups.
///
/// The rollups catch up with recorded usage every `usage.fold_interval_ms` (10 s by default).
#[utoipa::path(get, path = "/v1/organizations/{id}/usage", tag = "usage",
    params(("id" = Uuid, Path, description = "organization id"), MonthQuery),
    responses((status = 200, body = OrgUsageResponse), QueryErrors, NotFoundErrors,
        KeyErrors))]
pub async fn org_usage(
    caller: Caller<KeysRead>,
    ApiPath(id): ApiPath<OrgId>,
    ApiQuery(q): ApiQuery<MonthQuery>,
) -> ApiResult<Json<OrgUsageResponse>> {
    let state = caller.state();
    let (_, (month, first, _)) = org_billing_month(&caller, id, q.month).await?;
    // The month's rollup per key (kept by the fold, equal to the sums of its days), by key id.
    let mut lines = state.store.org_month_by_cost(id, first, None).await?;
    lines.sort_unstable_by_key(|l| l.key_id);
    let mut totals = DailyCounts::default();
    for line in &lines {
        totals.add(&line.counts);
    }
    Ok(Json(OrgUsageResponse {
        organization_id: id,
        month,
        keys: lines.into_iter().map(|l| KeyBillingLine { key_id: l.key_id, counts: l.counts.into() }).collect(),
        totals: totals.into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_parse_strictly() {
        let d = |y, m, day| NaiveDate::from_ymd_opt(y, m, day).unwrap_or_default();
        assert_eq!(parse_month("2030-02"), Some((d(2030, 2, 1), d(2030, 2, 28))));
        assert_eq!(parse_month("2030-12"), Some((d(2030, 12, 1), d(2030, 12, 31))));
        for bad in ["2030-13", "2030-1", "30-01", "2030/01", "", "2030-00", "abcd-ef"] {
            assert_eq!(parse_month(bad), None, "{bad}");
        }
    }

    #[test]
    fn endpoints_and_methods_are_checked() {
        assert!(endpoint("e", "/v1/x").is_ok());
        assert!(endpoint("e", "").is_err());
        assert!(endpoint("e", "/a\n").is_err());
        assert!(endpoint("e", &"x".repeat(201)).is_err());
        assert_eq!(method("m", "get").ok().as_deref(), Some("GET"));
        assert!(method("m", "G3T").is_err());
    }
}
