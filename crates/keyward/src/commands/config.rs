//! `keyward config`: the effective configuration.

use clap::Subcommand;

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Print the effective configuration (every layer applied), secrets redacted.
    Show,
}

pub fn run(config: &Config, action: ConfigAction) {
    match action {
        ConfigAction::Show => print!("{}", config.show()),
    }
}
