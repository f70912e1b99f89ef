//! A billing month in the console: an organization's (`GET /v1/organizations/{id}/usage`, for
//! `keyward:admin` and the organization's own `keyward:keys:read` keys), or a self-service customer's
//! own keys' (the keys `GET /v1/keys` lists them, their days as `GET /v1/keys/{id}/usage` reads them).
//! One line per key with usage in the month, their totals, the month's days drawn as the key page's
//! chart, the month picker, and the same lines as a CSV download.
//!
//! An organization's month is read from the rollups the usage fold keeps for billing: its days (at
//! most 31 rows) and its keys' months, costliest first along an index, so the page reads its
//! [`LINES_SHOWN`] costliest lines and a count, and the CSV every line in one ordered read, however
//! many keys were used. One owner's month reads the months of that owner's keys (a row each) and the
//! owner's own days (at most 31 rows): nothing is summed, however many keys the owner holds. The page
//! names its lines with one lookup of their keys; the CSV streams every line, naming them
//! [`KEY_LOOKUP_CHUNK`] at a time, so a month of 100,000 keys is 200 lookups, not 100,000.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::Path;
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use futures_util::StreamExt;
use keyward_core::{KeyId, OrgId};
use keyward_store::usage::{DailyCounts, DailyUsage, KEY_LOOKUP_CHUNK, KeyTotals};
use keyward_store::{ApiKey, Store, StoreError};
use maud::html;
use serde::Deserialize;

use super::extract::Signed;
use super::usage::{daily, decimal_dollars, dollars, standing_view};
use super::view::{PageResult, Viewer, failed, layout, page};
use crate::auth::{AnyKey, Caller, KeysRead, KeysReadOrSelf};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::extract::ApiQuery;
use crate::limits::Standing;
use crate::routes::me;
use crate::routes::usage::{DayUsage, billing_month, daily_series, org_billing_month};
use crate::state::AppState;

/// Lines the page shows, the costliest first (the CSV has every line). A billing month is read for
/// who costs most, so the page is its top, not pages in key order: the sort needs the whole month's
/// sums anyway (costs are known only once summed), and the CSV is where every line is.
const LINES_SHOWN: usize = 100;
/// Months the picker offers: the current one and those before it.
const MONTHS_OFFERED: usize = 12;

/// Which lines of a month are read: the page's, or the CSV's.
#[derive(Clone, Copy)]
enum Lines {
    /// The [`LINES_SHOWN`] costliest, and how many there are.
    Shown,
    /// Every one.
    All,
}

/// The month picker's query: `YYYY-MM` (blank: the current month).
#[derive(Deserialize, Default)]
pub struct MonthForm {
    #[serde(default)]
    month: String,
}

impl MonthForm {
    fn month(&self) -> Option<String> {
        Some(self.month.trim().to_owned()).filter(|m| !m.is_empty())
    }
}

/// One key's line of a month.
struct Line {
    key_id: KeyId,
    /// `None`: the key is gone from the store.
    key: Option<ApiKey>,
    counts: DailyCounts,
}

/// `YYYY-MM`, its first day and its last.
type Span = (String, NaiveDate, NaiveDate);

/// A billing month: whose, its lines (the costliest first), every day of it and the totals.
struct Month {
    /// `YYYY-MM`.
    month: String,
    /// What the page is of, as its heading says it.
    of: String,
    /// Where the page and its CSV are: `/console/usage` or an organization's.
    base: String,
    /// The costliest lines: every one, or at least the [`LINES_SHOWN`] a page shows.
    lines: Vec<Line>,
    /// How many keys have a line in the month.
    keys: usize,
    days: Vec<DayUsage>,
    totals: DailyCounts,
    /// The signed-in key's standing, on a self-service customer's month.
    standing: Option<Standing>,
}

impl Month {
    /// `span`: the month as [`billing_month`] gives it; `lines`: its costliest lines (every one, or at
    /// least [`LINES_SHOWN`]) of `keys`; `rows`: its days' rollups.
    fn new(span: Span, of: String, base: String, lines: Vec<KeyTotals>, keys: usize, rows: &[DailyUsage]) -> Self {
        let (month, first, last) = span;
        let (days, totals) = daily_series(rows, first, last);
        let mut lines: Vec<Line> =
            lines.into_iter().map(|l| Line { key_id: l.key_id, key: None, counts: l.counts }).collect();
        lines.sort_by(|a, b| {
            (b.counts.cost_micros, b.counts.requests, a.key_id).cmp(&(
                a.counts.cost_micros,
                a.counts.requests,
                b.key_id,
            ))
        });
        Self { month, of, base, lines, keys, days, totals, standing: None }
    }

    /// Names the lines the page shows, with one lookup of their keys.
    async fn name_shown(&mut self, state: &AppState) -> ApiResult<()> {
        let shown = self.lines.len().min(LINES_SHOWN);
        Ok(name_lines(&*state.store, &mut self.lines[..shown]).await?)
    }
}

/// Names `lines` with one lookup of their keys (a line whose key is gone stays unnamed).
async fn name_lines(store: &dyn Store, lines: &mut [Line]) -> Result<(), StoreError> {
    let ids: Vec<KeyId> = lines.iter().map(|l| l.key_id).collect();
    let mut keys: HashMap<KeyId, ApiKey> = store.keys_by_id(&ids).await?.into_iter().map(|k| (k.id, k)).collect();
    for line in lines {
        line.key = keys.remove(&line.key_id);
    }
    Ok(())
}

/// An organization's month as `GET /v1/organizations/{id}/usage` lets `caller` read it (another
/// organization's is not found, like an unknown one), with its days: `which` lines, from the keys'
/// monthly rollups, costliest first.
async fn org_month(caller: Caller<KeysRead>, org: OrgId, month: Option<String>, which: Lines) -> ApiResult<Month> {
    let state = caller.state();
    let (found, span) = org_billing_month(&caller, org, month).await?;
    let store = &state.store;
    let rows = store.org_usage_daily(org, span.1, span.2).await?;
    let (lines, keys) = match which {
        Lines::Shown => {
            let shown = u32::try_from(LINES_SHOWN).unwrap_or(u32::MAX);
            let lines = store.org_month_by_cost(org, span.1, Some(shown)).await?;
            let keys = store.org_month_keys(org, span.1).await?;
            (lines, usize::try_from(keys).unwrap_or(usize::MAX))
        }
        Lines::All => {
            let lines = store.org_month_by_cost(org, span.1, None).await?;
            let keys = lines.len();
            (lines, keys)
        }
    };
    let own = org == caller.organization_id();
    let base = if own { "/console/usage".to_owned() } else { format!("/console/organizations/{org}/usage") };
    Ok(Month::new(span, found.name, base, lines, keys, &rows))
}

/// A self-service customer's month: the keys `GET /v1/keys` lists the caller (its own owner's in its
/// own organization, whatever their status), their months and the owner's days from the rollups, and
/// where the signed-in key stands.
async fn owner_month(caller: &Caller<KeysReadOrSelf>, month: Option<String>) -> ApiResult<Month> {
    let state = caller.state();
    // SECURITY: exactly the owner and organization `GET /v1/keys` confines this caller to.
    let Some(owner) = caller.listed_owner() else {
        return Err(ApiError::new(ErrorCode::Forbidden, "only a self-service key has an owner's month"));
    };
    let org = caller.organization_id();
    let span = billing_month(month, state.clock.now())?;
    let (first, last) = (span.1, span.2);
    let lines = state.store.owner_month_by_key(org, owner, first).await?;
    let rows = state.store.owner_usage_daily(org, owner, first..=last).await?;
    let keys = lines.len();
    let mut m = Month::new(span, "your keys".to_owned(), "/console/usage".to_owned(), lines, keys, &rows);
    m.standing = Some(me::me(caller.admitted_as::<AnyKey>()?).await?.0.standing);
    Ok(m)
}

/// The month `signed` asks for on `/console/usage`: its organization's with `keyward:keys:read` (or
/// admin), else its own owner's keys'.
async fn signed_month(signed: &Signed<KeysReadOrSelf>, form: &MonthForm, which: Lines) -> ApiResult<Month> {
    match signed.caller.admitted_as::<KeysRead>() {
        Ok(reader) => {
            let org = reader.organization_id();
            org_month(reader, org, form.month(), which).await
        }
        Err(_) => owner_month(&signed.caller, form.month()).await,
    }
}

/// `GET /console/usage`: the signed-in key's organization's billing month (a self-service customer:
/// their own keys' and their standing).
pub async fn usage_page(signed: Signed<KeysReadOrSelf>, ApiQuery(form): ApiQuery<MonthForm>) -> PageResult {
    let state = signed.caller.state().clone();
    let mut month = signed_month(&signed, &form, Lines::Shown).await.map_err(|e| failed(&state, e))?;
    month.name_shown(&state).await.map_err(|e| failed(&state, e))?;
    Ok(month_page(&state, &signed.viewer(), &month))
}

/// `GET /console/usage.csv`: the lines of [`usage_page`], every one of them, as CSV.
pub async fn usage_csv(signed: Signed<KeysReadOrSelf>, ApiQuery(form): ApiQuery<MonthForm>) -> PageResult {
    let state = signed.caller.state().clone();
    let month = signed_month(&signed, &form, Lines::All).await.map_err(|e| failed(&state, e))?;
    Ok(csv(&state, month))
}

type OrgPath = Result<Path<OrgId>, axum::extract::rejection::PathRejection>;

/// An organization's month for `/console/organizations/{id}/usage[.csv]`.
async fn org_path_month(signed: &Signed<KeysRead>, path: OrgPath, form: &MonthForm, which: Lines) -> ApiResult<Month> {
    let org = super::orgs::org_id(path)?;
    org_month(signed.caller.admitted_as()?, org, form.month(), which).await
}

/// `GET /console/organizations/{id}/usage`: `GET /v1/organizations/{id}/usage` as a page.
pub async fn org_usage_page(
    signed: Signed<KeysRead>,
    path: OrgPath,
    ApiQuery(form): ApiQuery<MonthForm>,
) -> PageResult {
    let state = signed.caller.state().clone();
    let mut month = org_path_month(&signed, path, &form, Lines::Shown).await.map_err(|e| failed(&state, e))?;
    month.name_shown(&state).await.map_err(|e| failed(&state, e))?;
    Ok(month_page(&state, &signed.viewer(), &month))
}

/// `GET /console/organizations/{id}/usage.csv`: every line of that page, as CSV.
pub async fn org_usage_csv(signed: Signed<KeysRead>, path: OrgPath, ApiQuery(form): ApiQuery<MonthForm>) -> PageResult {
    let state = signed.caller.state().clone();
    let month = org_path_month(&signed, path, &form, Lines::All).await.map_err(|e| failed(&state, e))?;
    Ok(csv(&state, month))
}

/// `YYYY-MM` of the month `months` before `now`'s.
fn month_before(now: DateTime<Utc>, months: usize) -> String {
    let index = i64::from(now.year()) * 12 + i64::from(now.month0()) - i64::try_from(months).unwrap_or(0);
    format!("{:04}-{:02}", index.div_euclid(12), index.rem_euclid(12) + 1)
}

/// A key as a line names it: its name and `prefix…hint`, or its id when it is gone.
fn key_cells(line: &Line) -> (String, String) {
    match &line.key {
        Some(k) => (k.name.clone(), format!("{}…{}", k.prefix, k.hint)),
        None => (line.key_id.to_string(), String::new()),
    }
}

fn errors(c: &DailyCounts) -> i64 {
    c.errors_4xx.saturating_add(c.errors_5xx)
}

fn month_page(state: &AppState, viewer: &Viewer, m: &Month) -> Response {
    let now = state.clock.now();
    let mut months: Vec<String> = (0..MONTHS_OFFERED).map(|i| month_before(now, i)).collect();
    if !months.contains(&m.month) {
        months.push(m.month.clone());
    }
    let csv_href = format!("{}.csv?month={}", m.base, m.month);
    let totals = &m.totals;
    let body = html! {
        form.filters method="get" action=(m.base) {
            div {
                label for="month" { "Billing month (UTC)" }
                select #month name="month" {
                    @for month in &months { option value=(month) selected[*month == m.month] { (month) } }
                }
            }
            button type="submit" { "Show" }
        }
        @if let Some(standing) = &m.standing { (standing_view("Where your key stands", standing)) }
        h2 #usage { "Every day of " (m.month) }
        (daily(&m.days))
        h2 { "Per key" }
        p { a #csv href=(csv_href) download { "Download these lines as CSV" } }
        @if m.lines.is_empty() { p { "No key was used in " (m.month) "." } } @else {
            div.scroll { table.billing {
                caption { "Requests, denied requests, errors, tokens and cost per key in " (m.month)
                    @if m.keys > LINES_SHOWN { " (the " (LINES_SHOWN) " costliest of " (m.keys) " keys; the CSV has them all)" } }
                thead { tr {
                    th scope="col" { "Key" } th scope="col" { "Hint" } th scope="col" { "Requests" }
                    th scope="col" { "Denied" } th scope="col" { "Errors" } th scope="col" { "Tokens" } th scope="col" { "Cost" }
                } }
                tbody { @for line in m.lines.iter().take(LINES_SHOWN) { tr {
                    @let (name, hint) = key_cells(line);
                    th scope="row" data-label="Key" { a href={ "/console/keys/" (line.key_id) } { (name) } }
                    td data-label="Hint" { code { (hint) } }
                    td data-label="Requests" { (line.counts.requests) }
                    td data-label="Denied" { (line.counts.denied) }
                    td data-label="Errors" { (errors(&line.counts)) }
                    td data-label="Tokens" { (line.counts.tokens_used) }
                    td data-label="Cost" { (dollars(line.counts.cost_micros)) }
                } } }
                tfoot { tr {
                    th scope="row" colspan="2" { "Totals" }
                    td data-label="Requests" { (totals.requests) }
                    td data-label="Denied" { (totals.denied) }
                    td data-label="Errors" { (errors(totals)) }
                    td data-label="Tokens" { (totals.tokens_used) }
                    td data-label="Cost" { (dollars(totals.cost_micros)) }
                } }
            } }
        }
    };
    page(StatusCode::OK, layout(state, Some(viewer), &format!("Usage of {} in {}", m.of, m.month), body))
}

/// A CSV cell of text, quoted (RFC 4180). SECURITY: a spreadsheet reads a cell that starts with `=`,
/// `+`, `-` or `@` as a formula (and some drop a leading tab, carriage return or line feed first), so
/// such a cell gets a leading `'`, which shows it as the text it is.
fn text_cell(text: &str) -> String {
    let guard = if text.starts_with(['=', '+', '-', '@', '\t', '\r', '\n']) { "'" } else { "" };
    format!("\"{guard}{}\"", text.replace('"', "\"\""))
}

/// The CSV's header line (RFC 4180: CRLF line ends).
const CSV_HEADER: &str = "month,key_id,name,hint,owner_id,requests,denied,errors,tokens,cost_usd\r\n";

/// Named lines of `month` as CSV lines.
fn csv_lines(month: &str, lines: &[Line]) -> String {
    let mut out = String::with_capacity(lines.len() * 160);
    for line in lines {
        let (name, hint) = key_cells(line);
        let owner = line.key.as_ref().and_then(|k| k.owner_id.as_deref()).unwrap_or_default();
        let c = &line.counts;
        let texts = [month, &line.key_id.to_string(), &name, &hint, owner].map(text_cell).join(",");
        let figures = [c.requests, c.denied, errors(c), c.tokens_used].map(|n| n.to_string()).join(",");
        out.push_str(&format!("{texts},{figures},{}\r\n", decimal_dollars(c.cost_micros)));
    }
    out
}

/// Every line of a month as CSV, costliest first, streamed: [`KEY_LOOKUP_CHUNK`] lines are named
/// (one lookup) and written at a time, so the answer never holds more than that many keys or lines
/// of text. A store failure midway ends the body short of its last chunk, which a client sees as a
/// broken download, never as a complete file; it is logged.
fn csv(state: &AppState, m: Month) -> Response {
    let name = format!("attachment; filename=\"usage-{}.csv\"", m.month);
    let disposition = HeaderValue::from_str(&name).unwrap_or(HeaderValue::from_static("attachment"));
    let Month { month, lines, .. } = m;
    let mut lines = lines.into_iter().peekable();
    let mut chunks = Vec::new();
    while lines.peek().is_some() {
        chunks.push(lines.by_ref().take(KEY_LOOKUP_CHUNK).collect::<Vec<Line>>());
    }
    let store = state.store.clone();
    let body = futures_util::stream::iter(chunks).then(move |mut chunk| {
        let (store, month) = (store.clone(), month.clone());
        async move {
            if let Err(e) = name_lines(&*store, &mut chunk).await {
                tracing::error!(error = %e, "the usage CSV stopped short: naming its lines failed");
                return Err(e);
            }
            Ok(Bytes::from(csv_lines(&month, &chunk)))
        }
    });
    let header = futures_util::stream::iter([Ok::<_, StoreError>(Bytes::from_static(CSV_HEADER.as_bytes()))]);
    (
        StatusCode::OK,
        [(CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8")), (CONTENT_DISPOSITION, disposition)],
        Body::from_stream(header.chain(body)),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_count_back_across_years() {
        let now = DateTime::parse_from_rfc3339("2030-02-15T10:00:00Z").map(|t| t.with_timezone(&Utc)).unwrap();
        assert_eq!(month_before(now, 0), "2030-02");
        assert_eq!(month_before(now, 1), "2030-01");
        assert_eq!(month_before(now, 2), "2029-12");
        assert_eq!(month_before(now, 14), "2028-12");
    }

    #[test]
    fn cells_are_quoted_and_never_formulas() {
        assert_eq!(text_cell("plain"), "\"plain\"");
        assert_eq!(text_cell("say \"hi\", twice"), "\"say \"\"hi\"\", twice\"");
        for formula in ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "\n=1+1"] {
            assert_eq!(text_cell(formula), format!("\"'{formula}\""), "{formula:?}");
        }
        assert_eq!(text_cell("a=b"), "\"a=b\"");
        assert_eq!(text_cell("line\r\nbreak"), "\"line\r\nbreak\"", "a quoted cell may hold a line break");
    }
}
