//! `keyward usage`: a key's daily usage, totals and top endpoints.

use comfy_table::Table;

use super::{key_id, print_json};
use crate::config::Config;

/// `keyward usage <key-id> --days 30`: the same report as `GET /v1/keys/{id}/usage`.
pub async fn run(config: Config, key: &str, days: u32, json: bool) -> anyhow::Result<()> {
    use keyward_server::routes::usage::{MAX_DAYS, UsageCounts, key_usage_report};
    if !(1..=MAX_DAYS).contains(&days) {
        anyhow::bail!("--days must be 1 to {MAX_DAYS}");
    }
    let id = key_id(key)?;
    let store = keyward_store::open(&config.database_url, true).await?;
    store.get_key(id).await.map_err(|e| match e {
        keyward_store::StoreError::NotFound => anyhow::anyhow!("no key with id {id}"),
        other => other.into(),
    })?;
    let report = key_usage_report(&*store, id, days, chrono::Utc::now().date_naive()).await?;
    if json {
        return print_json(&report);
    }
    let peak = report.days.iter().map(|d| d.counts.counts.requests).max().unwrap_or(0).max(1);
    let mut table = Table::new();
    table.set_header(["day", "requests", "denied", "errors", "tokens", "cost $", "p95 ms", "chart"]);
    for d in &report.days {
        let UsageCounts { counts: c, p95_latency_ms, .. } = &d.counts;
        let width = usize::try_from(c.requests * 30 / peak).unwrap_or(0);
        let bar = if c.requests > 0 && width == 0 { ".".to_owned() } else { "#".repeat(width) };
        table.add_row([
            d.day.to_string(),
            c.requests.to_string(),
            c.denied.to_string(),
            (c.errors_4xx + c.errors_5xx).to_string(),
            c.tokens_used.to_string(),
            dollars(c.cost_micros),
            p95_latency_ms.map(|v| v.to_string()).unwrap_or_else(|| "-".to_owned()),
            bar,
        ]);
    }
    println!("{table}");
    let UsageCounts { counts: t, mean_latency_ms, p95_latency_ms } = &report.totals;
    println!(
        "total: {} requests ({} denied), {} reports, {} tokens, ${}, mean latency {}, p95 {}",
        t.requests,
        t.denied,
        t.reports,
        t.tokens_used,
        dollars(t.cost_micros),
        mean_latency_ms.map(|v| format!("{v:.1} ms")).unwrap_or_else(|| "-".to_owned()),
        p95_latency_ms.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".to_owned()),
    );
    if !report.top_endpoints.is_empty() {
        println!("top endpoints:");
        for e in &report.top_endpoints {
            let name = if e.endpoint.is_empty() { "(none)" } else { e.endpoint.as_str() };
            println!("  {name:<40} {:>10} requests {:>8} errors", e.counts.requests, e.counts.errors);
        }
    }
    Ok(())
}

/// Micro-dollars as dollars, exactly (no float).
fn dollars(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}
