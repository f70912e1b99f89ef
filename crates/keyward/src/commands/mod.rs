//! The subcommands, one module each. The CLI works straight on the database through the same store
//! and the same validation as the API; its changes are audited with actor `cli`.

pub mod audit;
pub mod config;
pub mod import;
pub mod keys;
pub mod migrate;
pub mod orgs;
pub mod seed;
pub mod serve;
pub mod usage;

use std::time::Duration;

use anyhow::anyhow;
use keyward_core::{KeyId, PlainKey};
use keyward_server::App;
use keyward_server::settings::UsageConfig;
use serde::Serialize;

use crate::config::Config;

/// The same node the server runs, over the configured database, without the scheduled jobs.
async fn open(config: &Config) -> anyhow::Result<App> {
    let mut settings = config.settings()?;
    // The CLI's own writer: a spill file of its own, so it never replays (and empties) a server's.
    settings.usage =
        UsageConfig { flush_interval: Duration::from_millis(config.usage_flush_interval_ms), ..UsageConfig::default() };
    Ok(App::builder(settings).without_jobs().build().await?)
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn opt(value: &Option<impl ToString>) -> String {
    value.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".to_owned())
}

fn key_id(raw: &str) -> anyhow::Result<KeyId> {
    raw.parse().map_err(|_| anyhow!("`{raw}` is not a key id"))
}

/// The admin key of a first start. SECURITY: printed once, to stdout only, never logged.
fn print_admin_key(key: &PlainKey) {
    println!("Created organization `default` and an admin key (scope keyward:admin).");
    println!("Admin key: {}", key.expose_secret());
    println!("Store it now: it will not be shown again.");
}
