//! A key's usage on its page, from the handler of `GET /v1/keys/{id}/usage`: the last 30 days drawn as
//! an SVG bar chart on the server (with the same figures as a table, for screen readers and for anyone
//! who wants the numbers), the span's totals, the top endpoints, and where the key stands against its
//! limits when the API shows that to the caller (`GET /v1/me`: a key's own standing only).

use keyward_store::ApiKey;
use maud::{Markup, html};

use crate::auth::{AnyKey, Caller, KeysReadOrSelf};
use crate::error::ApiResult;
use crate::extract::ApiQuery;
use crate::limits::Standing;
use crate::routes::me;
use crate::routes::target::Visible;
use crate::routes::usage::{DayUsage, DaysQuery, KeyUsageResponse, key_usage};

/// Days the chart covers: the API's default span.
const DAYS: u32 = 30;
/// The chart's drawing box, in SVG user units (CSS scales it to the page's width).
const SLOT: u32 = 24;
const BAR: u32 = 6;
const PLOT: u32 = 160;
const AXIS: u32 = 20;

/// One of a day's bars: a CSS class (the colour), a label and the figure.
type Series = (&'static str, &'static str, fn(&DayUsage) -> i64);

/// What a day's bars show, in the order drawn.
const SERIES: [Series; 3] = [
    ("requests", "Requests", |d| d.counts.counts.requests),
    ("denied", "Denied", |d| d.counts.counts.denied),
    ("errors", "Errors", |d| d.counts.counts.errors_4xx.saturating_add(d.counts.counts.errors_5xx)),
];

/// Integer micro-dollars as dollars, to the micro-dollar.
pub(super) fn dollars(micros: i64) -> String {
    format!("${}", decimal_dollars(micros))
}

/// Integer micro-dollars as a decimal number of dollars (`1.234567`), as a spreadsheet reads it.
pub(super) fn decimal_dollars(micros: i64) -> String {
    format!("{}.{:06}", micros / 1_000_000, (micros % 1_000_000).abs())
}

/// The usage section of a key's page: what `GET /v1/keys/{id}/usage` answers `caller` for `key`, and
/// the key's standing when it is the caller's own key.
pub(super) async fn section(caller: &Caller<KeysReadOrSelf>, key: &ApiKey) -> ApiResult<Markup> {
    let visible = Visible { caller: caller.admitted_as::<KeysReadOrSelf>()?, target: key.clone() };
    let usage = key_usage(visible, ApiQuery(DaysQuery { days: Some(DAYS) })).await?.0;
    let standing =
        if key.id == caller.key_id() { Some(me::me(caller.admitted_as::<AnyKey>()?).await?.0.standing) } else { None };
    Ok(render(&usage, standing.as_ref()))
}

fn render(usage: &KeyUsageResponse, standing: Option<&Standing>) -> Markup {
    let totals = &usage.totals.counts;
    html! {
        h2 #usage { "Usage, last " (usage.days.len()) " days" }
        (daily(&usage.days))
        dl {
            dt { "Requests" } dd { (totals.requests) }
            dt { "Denied" } dd { (totals.denied) }
            dt { "Errors (4xx / 5xx)" } dd { (totals.errors_4xx) " / " (totals.errors_5xx) }
            dt { "Tokens" } dd { (totals.tokens_used) }
            dt { "Cost" } dd { (dollars(totals.cost_micros)) }
        }
        h2 { "Top endpoints" }
        @if usage.top_endpoints.is_empty() { p { "No endpoint reported yet." } } @else {
            div.scroll { table {
                thead { tr { th scope="col" { "Endpoint" } th scope="col" { "Requests" } th scope="col" { "Errors" }
                    th scope="col" { "Tokens" } th scope="col" { "Cost" } } }
                tbody { @for e in &usage.top_endpoints { tr {
                    td { code { (if e.endpoint.is_empty() { "(none named)" } else { e.endpoint.as_str() }) } }
                    td { (e.counts.requests) } td { (e.counts.errors) } td { (e.counts.tokens_used) }
                    td { (dollars(e.counts.cost_micros)) }
                } } }
            } }
        }
        @if let Some(standing) = standing { (standing_view("Where this key stands", standing)) }
    }
}

/// Where a key stands against its rate limit and monthly quota, under the heading `title`.
pub(super) fn standing_view(title: &str, standing: &Standing) -> Markup {
    html! {
        h2 { (title) }
        dl {
            dt { "Rate limit" }
            dd { @match &standing.rate_limit {
                Some(r) => { (r.remaining) " of " (r.limit) " left; whole again in " (r.reset) " s" }
                None => "none",
            } }
            dt { "Monthly quota" }
            dd { @match standing.quota.limit {
                Some(limit) => { (standing.quota.used) " of " (limit) " used; resets in " (standing.quota.reset) " s" }
                None => { (standing.quota.used) " used; no quota" }
            } }
        }
    }
}

/// Daily bars of `days` (oldest first), their legend, and the same figures as a table.
pub(super) fn daily(days: &[DayUsage]) -> Markup {
    html! {
        (chart(days))
        ul.legend {
            @for (class, label, _) in SERIES { li { span class={ "swatch " (class) } {} (label) } }
        }
        details {
            summary { "The same figures as a table" }
            div.scroll { table {
                caption { "Requests, denied requests and errors per day (UTC)" }
                thead { tr { th scope="col" { "Day" } @for (_, label, _) in SERIES { th scope="col" { (label) } } } }
                tbody { @for day in days { tr {
                    th scope="row" { (day.day) }
                    @for (_, _, figure) in SERIES { td { (figure(day)) } }
                } } }
            } }
        }
    }
}

/// The daily bars as SVG. SECURITY: no `style` attribute (the policy's `style-src 'self'` would drop
/// it): geometry is presentation attributes, colours are classes of the stylesheet.
fn chart(days: &[DayUsage]) -> Markup {
    let (Some(first), Some(last)) = (days.first(), days.last()) else { return html! {} };
    let highest = days.iter().flat_map(|d| SERIES.map(|(_, _, f)| f(d))).max().unwrap_or(0).max(1);
    let width = SLOT * u32::try_from(days.len()).unwrap_or(u32::MAX / SLOT).max(1);
    let height_of = |value: i64| {
        let scaled = i128::from(value.max(0)) * i128::from(PLOT) / i128::from(highest);
        u32::try_from(scaled).unwrap_or(PLOT)
    };
    let total: i64 = days.iter().map(|d| d.counts.counts.requests).sum();
    html! {
        svg.chart xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (width) " " (PLOT + AXIS) }
            role="img" aria-labelledby="usage-title usage-desc" {
            title #usage-title { "Daily usage from " (first.day) " to " (last.day) }
            desc #usage-desc {
                (total) " requests in all; the busiest day's highest bar is " (highest)
                ". Bars per day: requests, denied, errors. The table below has every figure."
            }
            line.axis x1="0" y1=(PLOT) x2=(width) y2=(PLOT) {}
            @for (i, day) in days.iter().enumerate() {
                @let x = SLOT * u32::try_from(i).unwrap_or(0) + (SLOT - 3 * BAR) / 2;
                @for (s, (class, _, figure)) in SERIES.iter().enumerate() {
                    @let h = height_of(figure(day));
                    rect class=(class) x=(x + BAR * u32::try_from(s).unwrap_or(0)) y=(PLOT - h) width=(BAR) height=(h) {}
                }
            }
            text.tick x="0" y=(PLOT + AXIS - 4) { (first.day.format("%b %d")) }
            text.tick x=(width) y=(PLOT + AXIS - 4) text-anchor="end" { (last.day.format("%b %d")) }
            text.tick x="2" y="12" { (highest) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_keep_every_micro_dollar() {
        assert_eq!(dollars(0), "$0.000000");
        assert_eq!(dollars(1_234_567), "$1.234567");
        assert_eq!(dollars(42), "$0.000042");
    }
}
