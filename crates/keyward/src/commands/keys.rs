//! `keyward keys`: create, list, show, update, revoke and rotate keys.

use anyhow::{Context, anyhow};
use clap::Subcommand;
use comfy_table::Table;
use keyward_server::model::{CreatedKeyResponse, KeyResponse, RotatedKeyResponse};
use keyward_server::service::{self, CreateKeyRequest, RotateKeyRequest, UpdateKeyRequest, Validator};
use keyward_server::{App, AppState};
use keyward_store::{Actor, KeyFilter, PageRequest};

use super::{key_id, open, opt, print_json};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Create a key; the full key is printed once.
    Create {
        /// Organization slug or id.
        #[arg(long, default_value = "default")]
        org: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long, alias = "user-id")]
        owner_id: Option<String>,
        /// live or test.
        #[arg(long, default_value = "live")]
        environment: String,
        /// Key prefix (default sk).
        #[arg(long)]
        prefix: Option<String>,
        /// Comma-separated scopes, e.g. read:projects,write:*.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Comma-separated IPs and CIDR blocks.
        #[arg(long, value_delimiter = ',')]
        allowed_ips: Vec<String>,
        #[arg(long)]
        expires_in_days: Option<i64>,
        #[arg(long, alias = "tier")]
        plan: Option<String>,
        /// Stored in metadata.
        #[arg(long)]
        email: Option<String>,
        /// Stored in metadata.
        #[arg(long)]
        company: Option<String>,
        /// A JSON object merged into metadata.
        #[arg(long)]
        metadata: Option<String>,
        /// Print the same JSON as `POST /v1/keys`.
        #[arg(long, conflicts_with = "key_only")]
        json: bool,
        /// Print only the key, for scripts: `KEY=$(keyward keys create ... --key-only)`.
        #[arg(long)]
        key_only: bool,
    },
    /// List keys (active ones unless --include-inactive).
    List {
        /// Organization slug or id (default: every organization).
        #[arg(long)]
        org: Option<String>,
        #[arg(long, alias = "user-id")]
        owner_id: Option<String>,
        #[arg(long)]
        include_inactive: bool,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show one key.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Change a key.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long, value_delimiter = ',')]
        scopes: Option<Vec<String>>,
        #[arg(long, value_delimiter = ',')]
        allowed_ips: Option<Vec<String>>,
        /// RFC 3339.
        #[arg(long)]
        expires_at: Option<String>,
        #[arg(long, alias = "tier")]
        plan: Option<String>,
        /// A JSON object; replaces metadata.
        #[arg(long)]
        metadata: Option<String>,
        #[arg(long, conflicts_with = "deactivate")]
        activate: bool,
        #[arg(long)]
        deactivate: bool,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key (permanent).
    Revoke {
        id: String,
        #[arg(long, default_value = "revoked")]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// Rotate a key: a new key with the same settings (printed once); the old one stops after --grace.
    Rotate {
        id: String,
        /// How long the old key keeps working: seconds, or with a unit (90s, 30m, 1h, 7d); at most 7d.
        #[arg(long, default_value = "0")]
        grace: String,
        /// The new key's name (default: the old key's).
        #[arg(long)]
        name: Option<String>,
        /// Print the same JSON as `POST /v1/keys/{id}/rotate`.
        #[arg(long, conflicts_with = "key_only")]
        json: bool,
        /// Print only the new key, for scripts.
        #[arg(long)]
        key_only: bool,
    },
}

pub async fn run(config: Config, action: KeysAction) -> anyhow::Result<()> {
    let App { state, tasks } = open(&config).await?;
    let result = keys_inner(&state, action).await;
    tasks.shutdown().await;
    result
}

async fn keys_inner(state: &AppState, action: KeysAction) -> anyhow::Result<()> {
    let now = state.clock.now();
    let v = Validator { plans: &state.plans, now };
    match action {
        KeysAction::Create {
            org,
            name,
            description,
            owner_id,
            environment,
            prefix,
            scopes,
            allowed_ips,
            expires_in_days,
            plan,
            email,
            company,
            metadata,
            json,
            key_only,
        } => {
            let org = service::find_org(&*state.store, &org).await?;
            let mut meta = match metadata {
                Some(raw) => json_object(&raw, "--metadata")?,
                None => serde_json::json!({}),
            };
            if let Some(map) = meta.as_object_mut() {
                if let Some(email) = email {
                    map.insert("email".into(), email.into());
                }
                if let Some(company) = company {
                    map.insert("company".into(), company.into());
                }
            }
            let draft = CreateKeyRequest {
                name,
                description,
                owner_id,
                environment: Some(environment),
                prefix,
                scopes,
                allowed_ips,
                expires_in_days,
                metadata: Some(meta),
                plan,
                ..Default::default()
            }
            .validate(&v, org.id)?;
            let (plain, record) = service::create_key(state, draft, &Actor::cli(now)).await?;
            let created =
                CreatedKeyResponse { key: plain.expose_secret().to_owned(), api_key: KeyResponse::new(record, now) };
            let headline =
                format!("Created key {} ({}) in {}", created.api_key.key.id, created.api_key.key.name, org.slug);
            print_new_key(&created.key, &created, Shown { key_only, json }, &headline, None)
        }
        KeysAction::List { org, owner_id, include_inactive, limit, json } => {
            let organization_id = match org {
                Some(o) => Some(service::find_org(&*state.store, &o).await?.id),
                None => None,
            };
            let filter = KeyFilter {
                organization_id,
                owner_id,
                environment: None,
                status: None,
                include_inactive,
                search: None,
                expires_by: None,
                now,
            };
            let page =
                state.store.list_keys(&filter, PageRequest { after: None, limit: limit.clamp(1, 1_000) }).await?;
            let keys: Vec<KeyResponse> = page.items.into_iter().map(|k| KeyResponse::new(k, now)).collect();
            if json {
                print_json(&keys)
            } else {
                println!("{}", key_table(keys));
                Ok(())
            }
        }
        KeysAction::Show { id, json } => {
            let key = KeyResponse::new(state.store.get_key(key_id(&id)?).await?, now);
            if json {
                print_json(&key)
            } else {
                println!("{}", key_table(vec![key]));
                Ok(())
            }
        }
        KeysAction::Update {
            id,
            name,
            description,
            scopes,
            allowed_ips,
            expires_at,
            plan,
            metadata,
            activate,
            deactivate,
            json,
        } => {
            let id = key_id(&id)?;
            let request = UpdateKeyRequest {
                name,
                description: description.map(Some),
                scopes,
                allowed_ips,
                expires_at: expires_at.map(Some),
                metadata: metadata.map(|m| json_object(&m, "--metadata")).transpose()?,
                plan: plan.map(Some),
                is_active: if activate {
                    Some(true)
                } else if deactivate {
                    Some(false)
                } else {
                    None
                },
            };
            let patch = request.validate(&v)?;
            let key =
                KeyResponse::new(state.store.update_key(id, patch, &Actor::cli(now)).await?.apply(&state.keys), now);
            if json {
                print_json(&key)
            } else {
                println!("Updated key {} (status {})", key.key.id, key.status.as_str());
                Ok(())
            }
        }
        KeysAction::Rotate { id, grace, name, json, key_only } => {
            let old = state.store.get_key(key_id(&id)?).await?;
            let draft = RotateKeyRequest { grace_period_seconds: Some(grace_seconds(&grace)?), name }.validate(&v)?;
            let (plain, rotation) = service::rotate_key(state, &old, draft, &Actor::cli(now)).await?;
            let rotated = RotatedKeyResponse {
                key: plain.expose_secret().to_owned(),
                api_key: KeyResponse::new(rotation.new, now),
                old_api_key: KeyResponse::new(rotation.old, now),
            };
            let headline = format!("Rotated key {} into {}", rotated.old_api_key.key.id, rotated.api_key.key.id);
            let old = match rotated.old_api_key.key.revoked_at {
                Some(at) if at > now => format!("The old key keeps working until {}", at.to_rfc3339()),
                _ => "The old key no longer works.".to_owned(),
            };
            print_new_key(&rotated.key, &rotated, Shown { key_only, json }, &headline, Some(&old))
        }
        KeysAction::Revoke { id, reason, json } => {
            let key = state.store.revoke_key(key_id(&id)?, &reason, now, &Actor::cli(now)).await?.apply(&state.keys);
            let key = KeyResponse::new(key, now);
            if json {
                print_json(&key)
            } else {
                println!("Revoked key {} ({}…{})", key.key.id, key.key.prefix, key.key.hint);
                Ok(())
            }
        }
    }
}

fn json_object(raw: &str, flag: &str) -> anyhow::Result<serde_json::Value> {
    let value: serde_json::Value = serde_json::from_str(raw).with_context(|| format!("{flag} must be JSON"))?;
    if value.is_object() { Ok(value) } else { Err(anyhow!("{flag} must be a JSON object")) }
}

fn key_table(keys: Vec<KeyResponse>) -> Table {
    let mut table = Table::new();
    table.set_header(["id", "name", "key", "owner", "env", "status", "scopes", "expires", "last used"]);
    for k in keys {
        let KeyResponse { key: k, status, .. } = k;
        table.add_row([
            k.id.to_string(),
            k.name,
            format!("{}…{}", k.prefix, k.hint),
            opt(&k.owner_id),
            k.environment.to_string(),
            status.as_str().to_owned(),
            k.scopes.to_strings().join(","),
            opt(&k.expires_at.map(|t| t.format("%Y-%m-%d").to_string())),
            opt(&k.last_used_at.map(|t| t.format("%Y-%m-%d %H:%M").to_string())),
        ]);
    }
    table
}

/// A grace period: plain seconds or a number with `s`, `m`, `h` or `d`.
fn grace_seconds(raw: &str) -> anyhow::Result<i64> {
    let raw = raw.trim();
    let (number, unit) = match raw.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&raw[..i], c),
        _ => (raw, 's'),
    };
    let n: i64 = number.parse().map_err(|_| anyhow!("--grace must be like 3600, 90s, 30m, 1h or 7d"))?;
    let factor = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        _ => return Err(anyhow!("--grace unit must be s, m, h or d")),
    };
    n.checked_mul(factor).ok_or_else(|| anyhow!("--grace is too long"))
}

/// How `--key-only` and `--json` ask for a new key to be shown.
struct Shown {
    key_only: bool,
    json: bool,
}

/// Prints a key that is shown this once: alone (`--key-only`), as the whole `response` (`--json`), or
/// after `headline` with the warning to store it, then `after`.
fn print_new_key(
    key: &str,
    response: &impl serde::Serialize,
    shown: Shown,
    headline: &str,
    after: Option<&str>,
) -> anyhow::Result<()> {
    if shown.key_only {
        println!("{key}");
    } else if shown.json {
        print_json(response)?;
    } else {
        println!("{headline}");
        println!("Key: {key}");
        println!("Store it now: it will not be shown again.");
        if let Some(after) = after {
            println!("{after}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::grace_seconds;

    #[test]
    fn grace_takes_seconds_and_units() {
        for (raw, want) in [("0", 0), ("3600", 3600), ("90s", 90), ("30m", 1800), ("1h", 3600), ("7d", 604_800)] {
            assert_eq!(grace_seconds(raw).ok(), Some(want), "{raw}");
        }
        for bad in ["", "h", "1w", "-", "1.5h"] {
            assert!(grace_seconds(bad).is_err(), "{bad}");
        }
    }
}
