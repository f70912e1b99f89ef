//! `keyward seed`: organization `default` and an admin key, on an empty database.

use keyward_server::model::KeyResponse;
use keyward_server::{App, service};
use keyward_store::Actor;

use super::{open, print_admin_key, print_json};
use crate::config::Config;

pub async fn run(config: Config, json: bool) -> anyhow::Result<()> {
    let App { state, tasks } = open(&config).await?;
    let seeded = service::seed(&state, &Actor::cli(state.clock.now())).await?;
    tasks.shutdown().await;
    match (seeded, json) {
        (Some(s), true) => print_json(&serde_json::json!({
            "seeded": true,
            "organization": s.organization,
            "key": s.key.expose_secret(),
            "api_key": KeyResponse::new(s.record, state.clock.now()),
        })),
        (Some(s), false) => {
            print_admin_key(&s.key);
            Ok(())
        }
        (None, true) => print_json(&serde_json::json!({ "seeded": false })),
        (None, false) => {
            println!("Already seeded: the database has organizations; nothing changed.");
            Ok(())
        }
    }
}
