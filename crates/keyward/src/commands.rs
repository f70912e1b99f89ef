//! The subcommands. The CLI works straight on the database through the same store and the same
//! validation as the API; its changes are audited with actor `cli`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Subcommand;
use comfy_table::Table;
use keyward_core::{Clock, KeyHasher, KeyId, SystemClock};
use keyward_limit::{MemoryLimiter, RedisConfig, RedisLimiter};
use keyward_server::AppState;
use keyward_server::cache::{CachedLookup, DEFAULT_CHANNEL, KeyCache, RedisBus};
use keyward_server::model::{
    AuditEntryResponse, CreatedKeyResponse, KeyResponse, OrganizationResponse, RotatedKeyResponse,
};
use keyward_server::service::{
    self, CreateKeyRequest, CreateOrganizationRequest, RotateKeyRequest, UpdateKeyRequest, Validator,
};
use keyward_server::usage::{StoreQuotaSeed, UsageConfig, UsageRecorder, UsageWorker};
use keyward_store::{Actor, AuditFilter, KeyFilter, PageRequest};
use secrecy::ExposeSecret;
use serde::Serialize;

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

/// The same state the server runs with, over the configured database.
pub(crate) async fn open(config: &Config) -> anyhow::Result<(AppState, UsageWorker)> {
    // The CLI's own writer: a spill file of its own, so it never replays (and empties) a server's.
    open_with(config, None).await
}

/// [`open`], with the ledger writer `serve` runs (its spill file, batching and retention).
async fn open_with(config: &Config, usage: Option<UsageConfig>) -> anyhow::Result<(AppState, UsageWorker)> {
    let store = keyward_store::open(&config.database_url, true)
        .await
        // SECURITY: the URL may carry a password.
        .with_context(|| format!("cannot open the database at {}", crate::config::redact_url(&config.database_url)))?;
    let hasher = KeyHasher::new(config.pepper.as_ref().map(|p| p.expose_secret().as_bytes()))?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let cache = KeyCache::new(config.cache);
    let mut keys = CachedLookup::new(store.clone(), cache.clone(), clock.clone());
    if let Some(url) = &config.redis_url {
        // Changes reach every node's cache through Redis; without it, within the cache TTL.
        match RedisBus::connect(url.expose_secret(), DEFAULT_CHANNEL).await {
            Ok(bus) => {
                bus.subscribe(cache);
                keys = keys.with_bus(Arc::new(bus));
            }
            Err(e) => {
                tracing::warn!(error = %e, "Redis unreachable: other nodes learn of changes only when their cache entries expire")
            }
        }
    }
    let (usage, worker) = match usage {
        Some(usage) => UsageRecorder::spawn_with(store.clone(), usage),
        None => UsageRecorder::spawn(store.clone(), Duration::from_millis(config.usage_flush_interval_ms)),
    };
    // Monthly quotas survive restarts: a subject's month is seeded from the durable counters, which
    // the ledger writer keeps current.
    let seed: Arc<dyn keyward_limit::QuotaSeed> = Arc::new(StoreQuotaSeed::new(store.clone()));
    let mut state = AppState::new(store, clock, hasher, usage);
    state.limiter = Arc::new(MemoryLimiter::default().with_quota_seed(seed.clone()));
    state.trusted_proxies = config.trusted_proxy_nets()?.into();
    state.plans = Arc::new(config.plans());
    state.protection = config.protection;
    state.lifecycle = config.lifecycle;
    state.webhooks = config.webhooks.clone();
    state.keys = keys;
    if let Some(url) = &config.redis_url {
        let redis = RedisConfig::new(url.expose_secret()).with_policy(config.limiter_failure_policy);
        state.limiter = Arc::new(RedisLimiter::new(redis).context("invalid redis_url")?.with_quota_seed(seed));
    }
    // Whether legacy (imported) keys exist decides whether non-Keyward strings are looked up at all.
    state.legacy.refresh(&*state.store).await?;
    Ok((state, worker))
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn opt(value: &Option<impl ToString>) -> String {
    value.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".to_owned())
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    // Listeners first: a port in use is found before the first start creates the database and prints
    // an admin key that an operator reading only the error would lose.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let gateway_config = config.gateway.build()?;
    let gateway_listener = match &gateway_config {
        Some(_) => Some(
            tokio::net::TcpListener::bind(config.gateway.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.gateway.listen))?,
        ),
        None => None,
    };
    let (state, worker) = open_with(&config, Some(config.usage_config())).await?;
    let retention = chrono::Duration::days(i64::from(config.usage.retention_days));
    let _pruner = keyward_server::usage::spawn_pruner(
        state.store.clone(),
        state.clock.clone(),
        retention,
        Duration::from_secs(3600),
    );
    if let Some(seeded) = service::seed(&state, &Actor::system(state.clock.now())).await? {
        // SECURITY: printed once, to stdout only, never logged.
        println!("Created organization `default` and an admin key (scope keyward:admin).");
        println!("Admin key: {}", seeded.key.expose_secret());
        println!("Store it now: it will not be shown again.");
    }
    // Imports made by the CLI or another node while this one runs are noticed within LEGACY_REFRESH.
    let _legacy_refresher = state.legacy.spawn_refresher(state.store.clone(), keyward_server::state::LEGACY_REFRESH);
    // Expired keys are deactivated and `key.expiring` notices written on a schedule.
    let _sweeper = keyward_server::lifecycle::spawn_sweeper(state.clone());
    // Outbox events become signed webhook deliveries.
    let _webhooks = keyward_server::webhooks::spawn_worker(state.clone());
    tracing::info!(address = %listener.local_addr()?, database = state.store.backend(), "keyward is listening");
    // One shutdown signal, seen by every listener.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let gateway = match (gateway_config, gateway_listener) {
        (Some(gw), Some(listener)) => {
            tracing::info!(address = %listener.local_addr()?, upstream = %gw.upstream, "gateway is listening");
            let app = keyward_server::gateway::router(state.clone(), keyward_server::gateway::Gateway::new(gw)?);
            let shutdown = stopped(stop_rx.clone());
            let limits = config.server;
            Some(tokio::spawn(async move { keyward_server::listen::serve(listener, app, limits, shutdown).await }))
        }
        _ => None,
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    keyward_server::serve(listener, state, config.server, stopped(stop_rx)).await?;
    if let Some(gateway) = gateway {
        gateway.await??;
    }
    tracing::info!("shutting down: writing pending usage");
    worker.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

pub async fn seed(config: Config, json: bool) -> anyhow::Result<()> {
    let (state, worker) = open(&config).await?;
    let seeded = service::seed(&state, &Actor::cli(state.clock.now())).await?;
    worker.shutdown().await;
    match (seeded, json) {
        (Some(s), true) => print_json(&serde_json::json!({
            "seeded": true,
            "organization": OrganizationResponse::from(s.organization),
            "key": s.key.expose_secret(),
            "api_key": KeyResponse::new(s.record, state.clock.now()),
        })),
        (Some(s), false) => {
            println!("Created organization `default` and an admin key (scope keyward:admin).");
            println!("Admin key: {}", s.key.expose_secret());
            println!("Store it now: it will not be shown again.");
            Ok(())
        }
        (None, true) => print_json(&serde_json::json!({ "seeded": false })),
        (None, false) => {
            println!("Already seeded: the database has organizations; nothing changed.");
            Ok(())
        }
    }
}

pub async fn orgs(config: Config, action: OrgsAction) -> anyhow::Result<()> {
    let (state, worker) = open(&config).await?;
    let now = state.clock.now();
    let result = match action {
        OrgsAction::Create { name, slug, email, plan, max_api_keys, json } => {
            let new = CreateOrganizationRequest { name, slug, email, plan, max_api_keys, ..Default::default() }
                .validate(&Validator { plans: &state.plans, now })?;
            let org = OrganizationResponse::from(state.store.insert_org(new, &Actor::cli(now)).await?);
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
                all.extend(page.items.into_iter().map(OrganizationResponse::from));
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
    worker.shutdown().await;
    result
}

/// The first `max` characters, with `…` when cut: tables stay readable; `--json` has everything.
fn summary(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(max).collect::<String>())
    }
}

fn key_id(raw: &str) -> anyhow::Result<KeyId> {
    raw.parse().map_err(|_| anyhow!("`{raw}` is not a key id"))
}

fn json_object(raw: &str, flag: &str) -> anyhow::Result<serde_json::Value> {
    let value: serde_json::Value = serde_json::from_str(raw).with_context(|| format!("{flag} must be JSON"))?;
    if value.is_object() { Ok(value) } else { Err(anyhow!("{flag} must be a JSON object")) }
}

fn key_table(keys: Vec<KeyResponse>) -> Table {
    let mut table = Table::new();
    table.set_header(["id", "name", "key", "owner", "env", "status", "scopes", "expires", "last used"]);
    for k in keys {
        table.add_row([
            k.id.to_string(),
            k.name,
            format!("{}…{}", k.prefix, k.hint),
            opt(&k.owner_id),
            k.environment.to_string(),
            k.status.as_str().to_owned(),
            k.scopes.join(","),
            opt(&k.expires_at.map(|t| t.format("%Y-%m-%d").to_string())),
            opt(&k.last_used_at.map(|t| t.format("%Y-%m-%d %H:%M").to_string())),
        ]);
    }
    table
}

pub async fn keys(config: Config, action: KeysAction) -> anyhow::Result<()> {
    let (state, worker) = open(&config).await?;
    let result = keys_inner(&state, action).await;
    worker.shutdown().await;
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
            if key_only {
                println!("{}", created.key);
                Ok(())
            } else if json {
                print_json(&created)
            } else {
                println!("Created key {} ({}) in {}", created.api_key.id, created.api_key.name, org.slug);
                println!("Key: {}", created.key);
                println!("Store it now: it will not be shown again.");
                Ok(())
            }
        }
        KeysAction::List { org, owner_id, include_inactive, limit, json } => {
            let organization_id = match org {
                Some(o) => Some(service::find_org(&*state.store, &o).await?.id),
                None => None,
            };
            let filter =
                KeyFilter { organization_id, owner_id, environment: None, status: None, include_inactive, now };
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
                println!("Updated key {} (status {})", key.id, key.status.as_str());
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
            if key_only {
                println!("{}", rotated.key);
                Ok(())
            } else if json {
                print_json(&rotated)
            } else {
                println!("Rotated key {} into {}", rotated.old_api_key.id, rotated.api_key.id);
                println!("Key: {}", rotated.key);
                println!("Store it now: it will not be shown again.");
                match rotated.old_api_key.revoked_at {
                    Some(at) if at > now => println!("The old key keeps working until {}", at.to_rfc3339()),
                    _ => println!("The old key no longer works."),
                }
                Ok(())
            }
        }
        KeysAction::Revoke { id, reason, json } => {
            let key = state.store.revoke_key(key_id(&id)?, &reason, now, &Actor::cli(now)).await?.apply(&state.keys);
            let key = KeyResponse::new(key, now);
            if json {
                print_json(&key)
            } else {
                println!("Revoked key {} ({}…{})", key.id, key.prefix, key.hint);
                Ok(())
            }
        }
    }
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

pub async fn audit(config: Config, action: AuditAction) -> anyhow::Result<()> {
    let (state, worker) = open(&config).await?;
    let (key, action, actor, limit, json) = match action {
        AuditAction::Verify { json } => {
            let report = state.store.verify_audit_chain().await;
            worker.shutdown().await;
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
    worker.shutdown().await;
    let rows: Vec<AuditEntryResponse> = page?.items.into_iter().map(AuditEntryResponse::from).collect();
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

/// `keyward usage <key-id> --days 30`: the same report as `GET /v1/keys/{id}/usage`.
pub async fn usage(config: Config, key: &str, days: u32, json: bool) -> anyhow::Result<()> {
    use keyward_server::routes::usage::{MAX_DAYS, key_usage_report};
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
    let peak = report.days.iter().map(|d| d.counts.requests).max().unwrap_or(0).max(1);
    let mut table = Table::new();
    table.set_header(["day", "requests", "denied", "errors", "tokens", "cost $", "p95 ms", "chart"]);
    for d in &report.days {
        let c = &d.counts;
        let width = usize::try_from(c.requests * 30 / peak).unwrap_or(0);
        let bar = if c.requests > 0 && width == 0 { ".".to_owned() } else { "#".repeat(width) };
        table.add_row([
            d.day.to_string(),
            c.requests.to_string(),
            c.denied.to_string(),
            (c.errors_4xx + c.errors_5xx).to_string(),
            c.tokens_used.to_string(),
            dollars(c.cost_micros),
            c.p95_latency_ms.map(|v| v.to_string()).unwrap_or_else(|| "-".to_owned()),
            bar,
        ]);
    }
    println!("{table}");
    let t = &report.totals;
    println!(
        "total: {} requests ({} denied), {} reports, {} tokens, ${}, mean latency {}, p95 {}",
        t.requests,
        t.denied,
        t.reports,
        t.tokens_used,
        dollars(t.cost_micros),
        t.mean_latency_ms.map(|v| format!("{v:.1} ms")).unwrap_or_else(|| "-".to_owned()),
        t.p95_latency_ms.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".to_owned()),
    );
    if !report.top_endpoints.is_empty() {
        println!("top endpoints:");
        for e in &report.top_endpoints {
            let name = if e.endpoint.is_empty() { "(none)" } else { e.endpoint.as_str() };
            println!("  {name:<40} {:>10} requests {:>8} errors", e.requests, e.errors);
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
