//! `keyward orgs`: create and list organizations.

use clap::Subcommand;
use comfy_table::Table;
use keyward_server::App;
use keyward_server::service::{CreateOrganizationRequest, Validator};
use keyward_store::{Actor, PageRequest};

use super::{open, opt, print_json};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum OrgsAction {
    /// Create an organization.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        slug: String,
        #[arg(long)]
        email: Option<String>,
        /// free, pro, enterprise.
        #[arg(long, alias = "tier")]
        plan: Option<String>,
        #[arg(long)]
        max_api_keys: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// List organizations.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: Config, action: OrgsAction) -> anyhow::Result<()> {
    let App { state, tasks } = open(&config).await?;
    let now = state.clock.now();
    let result = match action {
        OrgsAction::Create { name, slug, email, plan, max_api_keys, json } => {
            let new = CreateOrganizationRequest { name, slug, email, plan, max_api_keys, ..Default::default() }
                .validate(&Validator { plans: &state.plans, now })?;
            let org = state.store.insert_org(new, &Actor::cli(now)).await?;
            if json {
                print_json(&org)
            } else {
                println!("Created organization {} ({})", org.slug, org.id);
                Ok(())
            }
        }
        OrgsAction::List { json } => {
            let mut all = Vec::new();
            let mut after = None;
            loop {
                let page = state.store.list_orgs(PageRequest { after, limit: 100 }).await?;
                all.extend(page.items);
                match page.next_cursor {
                    Some(c) => after = Some(c),
                    None => break,
                }
            }
            if json {
                print_json(&all)
            } else {
                let mut table = Table::new();
                table.set_header(["id", "slug", "name", "plan", "active", "max keys", "created"]);
                for o in all {
                    table.add_row([
                        o.id.to_string(),
                        o.slug,
                        o.name,
                        o.plan,
                        o.is_active.to_string(),
                        opt(&o.max_api_keys),
                        o.created_at.format("%Y-%m-%d %H:%M").to_string(),
                    ]);
                }
                println!("{table}");
                Ok(())
            }
        }
    };
    tasks.shutdown().await;
    result
}
