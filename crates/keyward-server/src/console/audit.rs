//! The audit trail in the console, from the handlers of `GET /v1/audit-logs` and
//! `GET /v1/audit-logs/verify`: a key's trail on its page, and the audit log page with its filters,
//! its pages and the chain's status. Each row's diff is shown field by field, as text.

use keyward_core::KeyId;
use keyward_store::AuditEntry;
use maud::{Markup, html};
use serde_json::Value;

use crate::auth::{AuditRead, Caller, KeysReadOrSelf};
use crate::error::ApiResult;
use crate::extract::ApiQuery;
use crate::routes::audit::{AuditQuery, list_audit};

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
                    td { (e.created_at.format("%Y-%m-%d %H:%M:%S")) }
                    td { (e.action) }
                    @if with_key { td { @if let Some(k) = e.key_id { a href={ "/console/keys/" (k) } { code { (k) } } } @else { "—" } } }
                    td { code { (e.actor) } @if let Some(ip) = &e.actor_ip { " from " (ip) } }
                    td { (diff(&e.details)) }
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
}
