//! Organizations in the console (`keyward:admin`, as `/v1/organizations` is): the list, a page at a
//! time, a form to create one, and an organization's page to change its plan, limits and standing.
//! A form becomes the JSON body its API route takes and goes through that route's handler, so it is
//! parsed and validated exactly as the API does.

use axum::extract::Path;
use axum::http::StatusCode;
use keyward_core::OrgId;
use keyward_store::Organization;
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::extract::{FormBody, Signed, see_other};
use super::view::{PageResult, failed, layout, page};
use crate::auth::Admin;
use crate::error::{ApiError, ErrorCode};
use crate::extract::{ApiPath, ApiQuery, JsonBody};
use crate::model::PageQuery;
use crate::routes::orgs::{create_org, get_org, list_orgs, update_org};

/// The limits an organization may override, as the API names them, with their labels.
const LIMITS: [(&str, &str); 5] = [
    ("rate_limit_per_minute", "Requests per minute"),
    ("rate_limit_per_hour", "Requests per hour"),
    ("rate_limit_per_day", "Requests per day"),
    ("monthly_request_limit", "Requests per month (quota)"),
    ("max_api_keys", "Keys at most (blank: no limit)"),
];

/// An organization's limit as the page shows it.
fn limit_of(org: &Organization, field: &str) -> Option<i64> {
    let l = &org.limits;
    match field {
        "rate_limit_per_minute" => l.rate_limit_per_minute,
        "rate_limit_per_hour" => l.rate_limit_per_hour,
        "rate_limit_per_day" => l.rate_limit_per_day,
        "monthly_request_limit" => l.monthly_request_limit,
        _ => org.max_api_keys,
    }
}

/// A form's fields: the CSRF token, then every other field as typed.
#[derive(Deserialize)]
pub struct OrgForm {
    #[serde(default)]
    csrf: String,
    #[serde(flatten)]
    fields: std::collections::BTreeMap<String, String>,
}

impl OrgForm {
    fn text(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// The JSON body of the API route: `names` as strings (blank: left out), each limit as a number
    /// (blank: `null`, the plan's), `is_active` when the form has it.
    fn body(&self, names: &[&str]) -> Result<Value, ApiError> {
        let mut body = Map::new();
        for name in names {
            if let Some(v) = self.text(name) {
                body.insert((*name).to_owned(), json!(v));
            }
        }
        for (name, _) in LIMITS {
            let value = match self.text(name) {
                None => Value::Null,
                Some(v) => json!(v.parse::<i64>().map_err(|_| ApiError::validation(name, "must be a whole number"))?),
            };
            body.insert(name.to_owned(), value);
        }
        if let Some(active) = self.text("is_active") {
            body.insert("is_active".to_owned(), json!(active == "true"));
        }
        Ok(Value::Object(body))
    }
}

/// The plan and limit fields of a form, filled with `org`'s values.
fn plan_and_limits(state: &crate::state::AppState, org: Option<&Organization>) -> Markup {
    let plan = org.map_or("free", |o| o.plan.as_str());
    html! {
        label for="plan" { "Plan" }
        select #plan name="plan" {
            @for name in state.plans.names() { option value=(name) selected[name == plan] { (name) } }
        }
        p.hint { "Leave a request limit blank for the plan's." }
        @for (name, label) in LIMITS {
            label for=(name) { (label) }
            input id=(name) name=(name) type="number" min="0" value=[org.and_then(|o| limit_of(o, name))];
        }
    }
}

#[derive(Deserialize, Default)]
pub struct ListForm {
    #[serde(default)]
    cursor: Option<String>,
}

/// `GET /console/organizations`: `GET /v1/organizations`, newest first, with the form that creates one.
pub async fn orgs_list(signed: Signed<Admin>, ApiQuery(form): ApiQuery<ListForm>) -> PageResult {
    let state = signed.caller.state().clone();
    let viewer = signed.viewer();
    let paging = PageQuery { cursor: form.cursor.filter(|c| !c.is_empty()), limit: None };
    let listed = list_orgs(signed.caller, ApiQuery(paging)).await.map_err(|e| failed(&state, e))?.0;
    Ok(page(
        StatusCode::OK,
        layout(
            &state,
            Some(&viewer),
            "Organizations",
            html! {
                div.scroll { table {
                    thead { tr { th scope="col" { "Name" } th scope="col" { "Slug" } th scope="col" { "Plan" }
                        th scope="col" { "Status" } th scope="col" { "Limits" } } }
                    tbody { @for org in &listed.items { tr {
                        td { a href={ "/console/organizations/" (org.id) } { (org.name) } }
                        td { code { (org.slug) } }
                        td { (org.plan) }
                        td { (if org.is_active { "active" } else { "disabled" }) }
                        td { (limits_summary(org)) }
                    } } }
                } }
                @if let Some(cursor) = listed.next_cursor {
                    p { a href={ "/console/organizations?cursor=" (cursor) } rel="next" { "Next page" } }
                }
                h2 { "New organization" }
                form method="post" action="/console/organizations" {
                    input type="hidden" name="csrf" value=(viewer.csrf);
                    label for="name" { "Name" } input #name name="name" required maxlength="255";
                    label for="slug" { "Slug (lowercase letters, digits, dashes)" } input #slug name="slug" required maxlength="63";
                    label for="email" { "Contact email" } input #email name="email" type="email" maxlength="254";
                    (plan_and_limits(&state, None))
                    button type="submit" { "Create organization" }
                }
            },
        ),
    ))
}

/// The limits an organization overrides, in a line ("the plan's" when none).
fn limits_summary(org: &Organization) -> String {
    let set: Vec<String> =
        LIMITS.iter().filter_map(|(name, label)| limit_of(org, name).map(|v| format!("{label}: {v}"))).collect();
    if set.is_empty() { "the plan's".to_owned() } else { set.join("; ") }
}

/// `POST /console/organizations`: `POST /v1/organizations`.
#[tracing::instrument(skip_all)]
pub async fn create(signed: Signed<Admin>, FormBody(form): FormBody<OrgForm>) -> PageResult {
    signed.check_csrf(&form.csrf)?;
    let state = signed.caller.state().clone();
    let body = form.body(&["name", "slug", "email", "plan"]).map_err(|e| failed(&state, e))?;
    let (_, created) = create_org(signed.caller, JsonBody::of(&body)).await.map_err(|e| failed(&state, e))?;
    Ok(see_other(&format!("/console/organizations/{}", created.0.id)))
}

/// The organization of the path: a "No such organization" page (404) for anything that is not one.
pub(super) fn org_id(path: Result<Path<OrgId>, axum::extract::rejection::PathRejection>) -> Result<OrgId, ApiError> {
    path.map(|Path(id)| id).map_err(|_| ApiError::new(ErrorCode::NotFound, "No such organization."))
}

/// `GET /console/organizations/{id}`: `GET /v1/organizations/{id}`, with the form that changes it.
pub async fn org_page(
    signed: Signed<Admin>,
    path: Result<Path<OrgId>, axum::extract::rejection::PathRejection>,
) -> PageResult {
    let state = signed.caller.state().clone();
    let viewer = signed.viewer();
    let id = org_id(path).map_err(|e| failed(&state, e))?;
    let org = get_org(signed.caller, ApiPath(id)).await.map_err(|e| failed(&state, e))?.0;
    Ok(page(
        StatusCode::OK,
        layout(
            &state,
            Some(&viewer),
            &org.name,
            html! {
                dl {
                    dt { "Id" } dd { code { (org.id) } }
                    dt { "Slug" } dd { code { (org.slug) } }
                    dt { "Email" } dd { (org.email.as_deref().unwrap_or("—")) }
                    dt { "Status" } dd { (if org.is_active { "active" } else { "disabled: every key of it is refused" }) }
                    dt { "Created" } dd { (org.created_at.to_rfc3339()) }
                }
                p { a href={ "/console/organizations/" (org.id) "/usage" } { "Its usage, month by month" } }
                h2 { "Plan and limits" }
                form method="post" action={ "/console/organizations/" (org.id) } {
                    input type="hidden" name="csrf" value=(viewer.csrf);
                    label for="org-name" { "Name" } input #org-name name="name" required maxlength="255" value=(org.name);
                    (plan_and_limits(&state, Some(&org)))
                    label for="is_active" { "Status" }
                    select #is_active name="is_active" {
                        option value="true" selected[org.is_active] { "active" }
                        option value="false" selected[!org.is_active] { "disabled (every key of it refused)" }
                    }
                    button type="submit" { "Save" }
                }
            },
        ),
    ))
}

/// `POST /console/organizations/{id}`: `PATCH /v1/organizations/{id}`.
#[tracing::instrument(skip_all)]
pub async fn update(
    signed: Signed<Admin>,
    path: Result<Path<OrgId>, axum::extract::rejection::PathRejection>,
    FormBody(form): FormBody<OrgForm>,
) -> PageResult {
    signed.check_csrf(&form.csrf)?;
    let state = signed.caller.state().clone();
    let id = org_id(path).map_err(|e| failed(&state, e))?;
    let body = form.body(&["name", "plan"]).map_err(|e| failed(&state, e))?;
    let updated = update_org(signed.caller, ApiPath(id), JsonBody::of(&body)).await.map_err(|e| failed(&state, e))?;
    Ok(see_other(&format!("/console/organizations/{}", updated.0.id)))
}
