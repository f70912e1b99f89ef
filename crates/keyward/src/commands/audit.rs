//! `keyward audit`: list the audit log and verify its chain.

use clap::Subcommand;
use comfy_table::Table;
use keyward_server::App;
use keyward_store::{AuditFilter, PageRequest};

use super::{key_id, open, opt, print_json};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Walk the audit chain: exits 0 when intact, 1 naming the first broken row.
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// List audit rows, newest first.
    List {
        #[arg(long)]
        key_id: Option<String>,
        #[arg(long)]
        action: Option<String>,
        #[arg(long)]
        actor: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: Config, action: AuditAction) -> anyhow::Result<()> {
    let App { state, tasks } = open(&config).await?;
    let (key, action, actor, limit, json) = match action {
        AuditAction::Verify { json } => {
            let report = state.store.verify_audit_chain().await;
            tasks.shutdown().await;
            let report = report?;
            if json {
                print_json(&report)?;
            } else if report.intact {
                println!(
                    "Audit chain intact: {} rows verified ({} rows from before the chain)",
                    report.rows_checked, report.unchained_rows
                );
            } else if let Some(broken) = &report.broken {
                println!(
                    "Audit chain BROKEN at row {}: {} ({} rows verified before it)",
                    opt(&broken.id),
                    broken.reason,
                    report.rows_checked
                );
            }
            return if report.intact { Ok(()) } else { Err(crate::Silent(1).into()) };
        }
        AuditAction::List { key_id, action, actor, limit, json } => (key_id, action, actor, limit, json),
    };
    let filter = AuditFilter { key_id: key.as_deref().map(key_id).transpose()?, action, actor, ..Default::default() };
    let page = state.store.list_audit(&filter, PageRequest { after: None, limit: limit.clamp(1, 1_000) }).await;
    tasks.shutdown().await;
    let rows = page?.items;
    if json {
        return print_json(&rows);
    }
    let mut table = Table::new();
    table.set_header(["id", "time", "action", "key", "actor", "details"]);
    for r in rows {
        table.add_row([
            r.id.to_string(),
            r.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            r.action,
            opt(&r.key_id),
            r.actor,
            summary(&r.details.to_string(), 80),
        ]);
    }
    println!("{table}");
    Ok(())
}

/// The first `max` characters, with `…` when cut: tables stay readable; `--json` has everything.
fn summary(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(max).collect::<String>())
    }
}
