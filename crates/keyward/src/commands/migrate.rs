//! `keyward migrate`: apply, revert or list database migrations.

use clap::Subcommand;

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert the newest migrations.
    Down {
        #[arg(long, default_value_t = 1)]
        steps: u32,
    },
    /// List migrations and whether each is applied.
    Status,
}

pub async fn run(config: Config, action: MigrateAction) -> anyhow::Result<()> {
    let store = keyward_store::open(&config.database_url, false).await?;
    let list = match action {
        MigrateAction::Up => store.migrate_up().await?,
        MigrateAction::Down { steps } => store.migrate_down(steps).await?,
        MigrateAction::Status => store.migration_status().await?,
    };
    for m in list {
        println!("{:>04} {:<30} {}", m.version, m.description, if m.applied { "applied" } else { "pending" });
    }
    Ok(())
}
