//! The audit trail in the console, from the handlers of `GET /v1/audit-logs` and
//! `GET /v1/audit-logs/verify`: a key's trail on its page, and the audit log page with its filters,
//! its pages and the chain's status. Each row's diff is shown field by field, as text.

use axum::http::StatusCode;
use keyward_core::KeyId;
use keyward_store::AuditEntry;
use maud::{Markup, html};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::extract::{Signed, blank};
use super::view::{PageResult, failed, layout, page};
use crate::auth::{Admin, AuditRead, Caller, KeysReadOrSelf};
use crate::error::{ApiResult, ErrorCode};
use crate::extract::ApiQuery;
use crate::model::PageResponse;
use crate::routes::audit::{AuditQuery, AuditVerifyResponse, list_audit, verify_audit};

/// Rows of a key's trail on its page (the newest; the audit log page has the rest).
const KEY_TRAIL_ROWS: u32 = 20;

/// A JSON value as a reader wants it: a string without its quotes, anything else as JSON.
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "none".to_owned(),
        other => other.to_string(),
    }
}

/// A row's `details` made readable: each changed field with its value before and after, then any
/// other detail; a value that is not an object as JSON. maud escapes every value.
fn diff(details: &Value) -> Markup {
    let Value::Object(fields) = details else { return html! { code { (details.to_string()) } } };
    let side = |name: &str| fields.get(name).and_then(Value::as_object);
    let (before, after) = (side("before"), side("after"));
    let mut changed: Vec<&String> = before.into_iter().chain(after).flat_map(|m| m.keys()).collect();
    changed.sort();
    changed.dedup();
    let value_in = |m: Option<&serde_json::Map<String, Value>>, field: &str| m.and_then(|m| m.get(field)).map(plain);
    html! {
        ul.diff {
            @for field in changed {
                li {
                    code { (field) } ": "
                    @match (value_in(before, field), value_in(after, field)) {
                        (Some(b), Some(a)) => { "from " del { (b) } " to " ins { (a) } }
                        (Some(b), None) => { "was " del { (b) } }
                        (None, Some(a)) => { "set to " ins { (a) } }
                        (None, None) => {}
                    }
                }
            }
            @for (name, value) in fields {
                @if !(matches!(name.as_str(), "before" | "after") && value.is_object()) {
                    li { code { (name) } ": " (plain(value)) }
                }
            }
        }
    }
}

/// Audit rows as a table, newest first; `with_key`: a column naming each row's key.
fn rows(entries: &[AuditEntry], with_key: bool) -> Markup {
    html! {
        @if entries.is_empty() { p { "No audit rows." } } @else {
            div.scroll { table.audit {
                thead { tr {
                    th scope="col" { "When (UTC)" } th scope="col" { "Action" }
                    @if with_key { th scope="col" { "Key" } }
                    th scope="col" { "Actor" } th scope="col" { "Change" }
                } }
                tbody { @for e in entries { tr {
                    td data-label="When" { (e.created_at.format("%Y-%m-%d %H:%M:%S")) }
                    td data-label="Action" { (e.action) }
                    @if with_key { td data-label="Key" { @if let Some(k) = e.key_id { a href={ "/console/keys/" (k) } { code { (k) } } } @else { "—" } } }
                    td data-label="Actor" { code { (e.actor) } @if let Some(ip) = &e.actor_ip { " from " (ip) } }
                    td data-label="Change" { (diff(&e.details)) }
                } } }
            } }
        }
    }
}

/// A key's audit trail for its page: what `GET /v1/audit-logs?key_id=` answers the same key, or
/// `None` when that key may not read the audit log (its page then has no trail).
pub(super) async fn key_trail(caller: &Caller<KeysReadOrSelf>, key: KeyId) -> ApiResult<Option<Markup>> {
    let Ok(reader) = caller.admitted_as::<AuditRead>() else { return Ok(None) };
    let query = AuditQuery { key_id: Some(key.to_string()), limit: Some(KEY_TRAIL_ROWS), ..AuditQuery::default() };
    let listed = list_audit(reader, ApiQuery(query)).await?.0;
    Ok(Some(html! {
        h2 #audit { "Audit trail" }
        (rows(&listed.items, false))
        @if listed.next_cursor.is_some() {
            p { a href={ "/console/audit?key=" (key) } { "The whole trail in the audit log" } }
        }
    }))
}

/// The audit log page's filters, as its form sends them (blank: any).
#[derive(Deserialize, Serialize, Default, Clone)]
pub struct AuditForm {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    action: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    actor: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    since: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    until: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    cursor: String,
    /// `chain`: check the audit chain too, on top of the page.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    check: String,
}

/// A typed instant as the API takes it: a bare day (`2030-01-31`) is that day's start, UTC.
fn instant(typed: &str) -> Option<String> {
    let typed = typed.trim();
    match typed.len() {
        0 => None,
        10 => Some(format!("{typed}T00:00:00Z")),
        _ => Some(typed.to_owned()),
    }
}

impl AuditForm {
    fn query(&self) -> AuditQuery {
        AuditQuery {
            key_id: blank(&self.key),
            action: blank(&self.action),
            actor: blank(&self.actor),
            since: instant(&self.since),
            until: instant(&self.until),
            cursor: blank(&self.cursor),
            limit: None,
        }
    }
}

/// The chain's status, from `GET /v1/audit-logs/verify` when the caller may ask it (`keyward:admin`:
/// the chain spans every organization) and asked for it (`check`); else the link that asks.
///
/// Checking walks and hashes every row of the log (about 10 µs a row, release build): a page that
/// did it on every load would take a second at 100,000 rows, so it is done when asked.
async fn chain_status(caller: &Caller<AuditRead>, form: &AuditForm) -> ApiResult<Markup> {
    let Ok(admin) = caller.admitted_as::<Admin>() else {
        return Ok(
            html! { p.hint { "Only a keyward:admin key may check the audit chain, which spans every organization." } },
        );
    };
    if form.check != "chain" {
        let asked = AuditForm { check: "chain".to_owned(), ..form.clone() };
        let href = format!("/console/audit?{}", serde_urlencoded::to_string(&asked).unwrap_or_default());
        return Ok(
            html! { p { a #check-chain href=(href) { "Check the audit chain" } " (walks every row of the log)" } },
        );
    }
    let AuditVerifyResponse { intact, rows_checked, unchained_rows, broken } = verify_audit(admin).await?.0;
    Ok(html! {
        @if intact {
            p.ok role="status" { "Audit chain intact: " (rows_checked) " rows checked"
                @if unchained_rows > 0 { ", " (unchained_rows) " written before the chain existed" } "." }
        } @else {
            p.error role="alert" { "Audit chain broken"
                @if let Some(b) = broken {
                    @if let Some(id) = b.id { " at row " (id) } ": " (b.reason)
                }
                " (" (rows_checked) " rows checked)." }
        }
    })
}

/// `GET /console/audit`: `GET /v1/audit-logs` with the form's filters, newest first, a page at a time,
/// under the chain's status (or the link that checks it). A key without `keyward:audit:read` gets the API's 403.
pub async fn audit_page(signed: Signed<AuditRead>, ApiQuery(form): ApiQuery<AuditForm>) -> PageResult {
    let state = signed.caller.state().clone();
    let viewer = signed.viewer();
    let status = chain_status(&signed.caller, &form).await.map_err(|e| failed(&state, e))?;
    let listed = list_audit(signed.caller, ApiQuery(form.query())).await;
    let (entries, problem) = match listed {
        Ok(axum::Json(PageResponse { items, next_cursor })) => ((items, next_cursor), None),
        Err(e) if e.code == ErrorCode::InvalidQuery => ((Vec::new(), None), Some(e.message)),
        Err(e) => return Err(failed(&state, e)),
    };
    let (items, next_cursor) = entries;
    let next = next_cursor.map(|cursor| {
        let next = AuditForm { cursor, check: String::new(), ..form.clone() };
        format!("/console/audit?{}", serde_urlencoded::to_string(&next).unwrap_or_default())
    });
    let field = |id: &'static str, label: &'static str, value: &str, hint: &'static str| {
        html! { div { label for=(id) { (label) } input id=(id) name=(id) value=(value) placeholder=(hint); } }
    };
    let status_code = if problem.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    Ok(page(
        status_code,
        layout(
            &state,
            Some(&viewer),
            "Audit log",
            html! {
                (status)
                form.filters method="get" action="/console/audit" role="search" {
                    (field("key", "Key id", &form.key, ""))
                    (field("action", "Action", &form.action, "create, update, revoke…"))
                    (field("actor", "Actor", &form.actor, "a key id, cli or system"))
                    (field("since", "Since (UTC)", &form.since, "2030-01-31 or RFC 3339"))
                    (field("until", "Until (UTC)", &form.until, "2030-01-31 or RFC 3339"))
                    button type="submit" { "Filter" }
                }
                @if let Some(problem) = problem { p.error role="alert" { (problem) } }
                (rows(&items, true))
                @if let Some(next) = next { p { a href=(next) rel="next" { "Older rows" } } }
            },
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_diff_names_each_field_before_and_after() {
        let d = diff(&json!({"before": {"name": "a", "scopes": ["x"]}, "after": {"name": "<b>", "plan": null},
            "reason": "rotated"}))
        .into_string();
        assert!(d.contains("<code>name</code>: from <del>a</del> to <ins>&lt;b&gt;</ins>"), "{d}");
        assert!(d.contains("<code>scopes</code>: was <del>[&quot;x&quot;]</del>"), "{d}");
        assert!(d.contains("<code>plan</code>: set to <ins>none</ins>"), "{d}");
        assert!(d.contains("<code>reason</code>: rotated"), "{d}");
        assert_eq!(diff(&json!("<i>")).into_string(), "<code>&quot;&lt;i&gt;&quot;</code>");
    }

    #[test]
    fn a_bare_day_is_its_start() {
        assert_eq!(instant(" 2030-01-31 ").as_deref(), Some("2030-01-31T00:00:00Z"));
        assert_eq!(instant("2030-01-31T10:00:00Z").as_deref(), Some("2030-01-31T10:00:00Z"));
        assert_eq!(instant(""), None);
    }
}
