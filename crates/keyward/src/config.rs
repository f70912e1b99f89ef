//! One `Config`, layered: defaults → `keyward.toml` → `KEYWARD_*` environment → command-line flags.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use keyward_server::settings::{Settings, redact_url};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the HTTP API.
    pub listen: SocketAddr,
    /// `sqlite://path` (created and migrated on start).
    pub database_url: String,
    /// Server-side pepper for HMAC-SHA256 key hashes; at least 32 bytes.
    pub pepper: Option<SecretString>,
    pub log_format: LogFormat,
    /// How often key usage (`last_used_at`, `total_requests`) is written, in milliseconds.
    pub usage_flush_interval_ms: u64,
    /// Proxies (IPs or CIDR blocks) whose `X-Forwarded-For` is believed for the client address.
    pub trusted_proxies: Vec<String>,
    pub gateway: GatewaySettings,
    /// `redis://host:port`: rate limits and quotas shared by every node. Without it, in memory.
    pub redis_url: Option<SecretString>,
    /// What the limiter does while Redis cannot be reached: `fail_open` or `fail_closed`.
    pub limiter_failure_policy: keyward_limit::FailurePolicy,
    /// Extra or changed plans: `[plans.gold] per_minute = 1200 ...`.
    pub plans: std::collections::BTreeMap<String, keyward_core::Limits>,
    pub protection: keyward_server::settings::Protection,
    /// Deadlines and the connection cap of every HTTP listener.
    pub server: keyward_server::settings::ServerLimits,
    /// The verify cache: sizes and times.
    pub cache: keyward_server::settings::CacheConfig,
    /// The expiry sweeper and the `key.expiring` threshold.
    pub lifecycle: keyward_server::settings::LifecycleSettings,
    /// Webhook delivery: private targets, timeout, retries.
    pub webhooks: keyward_server::settings::WebhookSettings,
    pub usage: UsageSettings,
    /// The proxy hooks (`/v1/authz`, ext_authz): key headers, style, nginx compat, signed identity.
    pub authz: keyward_server::settings::AuthzSettings,
    /// The web console at `/console`: on or off, product name, session lifetimes.
    pub console: keyward_server::settings::ConsoleSettings,
}

/// The usage ledger (`[usage]`): batching, spilling during store outages, retention of raw events.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageSettings {
    /// Where events go while the store is unreachable and memory is full (append-only JSON lines,
    /// replayed on recovery and at the next start). Default: next to the SQLite file
    /// (`<db>.usage-spill.jsonl`), else `keyward-usage-spill.jsonl` in the temp directory. One file per
    /// node: two servers must not share one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spill_path: Option<std::path::PathBuf>,
    /// Events held in memory while the store fails, before spilling to the file.
    pub max_buffered: usize,
    /// Events per write transaction; this many buffered trigger a write before the interval.
    pub batch_size: usize,
    /// Raw events older than this many days are pruned (hourly); daily rollups stay.
    pub retention_days: u32,
    /// Batches written at once, each its own transaction.
    pub concurrent_batches: usize,
    /// After a failed write, the first wait before the next attempt (ms); it doubles after each
    /// failure in a row, up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// How long a graceful shutdown keeps retrying the store before spilling what is left (ms).
    pub shutdown_timeout_ms: u64,
    /// How often the daily rollups and the keys' counters catch up with the written events (ms): the
    /// most a usage report lags behind.
    pub fold_interval_ms: u64,
    /// Which events keep a raw row in `usage_events` besides the rollups: `off`, `denied` (every
    /// refused request and every report) or `all`.
    pub raw_events: keyward_store::usage::RawEvents,
    /// A directory: every usage event (all verifications, gateway and authz decisions, reports) is
    /// also appended to gzip-compressed newline-delimited JSON segments there, for analytics engines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export: Option<std::path::PathBuf>,
    /// A segment is completed (renamed from `.part` to `.ndjson.gz`) once it is this old ...
    pub export_rotate_seconds: u64,
    /// ... or once it holds this many compressed bytes.
    pub export_rotate_bytes: u64,
    /// The most the complete segments may hold; past it the oldest are deleted.
    pub export_max_bytes: u64,
}

impl Default for UsageSettings {
    fn default() -> Self {
        let d = keyward_server::settings::UsageConfig::new(Duration::from_secs(1), std::path::PathBuf::new());
        let e = keyward_server::settings::ExportConfig::new(std::path::PathBuf::new());
        Self {
            spill_path: None,
            max_buffered: d.max_buffered,
            batch_size: d.batch_size,
            retention_days: 90,
            concurrent_batches: d.concurrent_batches,
            retry_initial_ms: millis(d.retry_initial),
            retry_max_ms: millis(d.retry_max),
            shutdown_timeout_ms: millis(d.shutdown_timeout),
            fold_interval_ms: millis(d.fold_interval),
            raw_events: d.raw_events,
            export: None,
            export_rotate_seconds: e.rotate_after.as_secs(),
            export_rotate_bytes: e.rotate_bytes,
            export_max_bytes: e.max_bytes,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Gateway mode: on when `upstream` is set.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// `http://host:port` of the API to protect.
    pub upstream: Option<String>,
    /// The gateway's own listener (the management API keeps `listen`).
    pub listen: SocketAddr,
    /// How long the upstream may take to answer, in milliseconds (then 504).
    pub timeout_ms: u64,
    /// Paths that no route matches need a valid key (no scope); `false` makes them public.
    pub require_key_for_unmatched: bool,
    pub routes: Vec<RouteSettings>,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            upstream: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            timeout_ms: 30_000,
            require_key_for_unmatched: true,
            routes: Vec::new(),
        }
    }
}

/// `[[gateway.routes]]`: a path prefix (and optionally methods) and what it needs.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    pub prefix: String,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub cost: Option<u64>,
    #[serde(default)]
    pub public: bool,
}

impl GatewaySettings {
    /// The gateway configuration, or `None` when no upstream is set.
    pub fn build(&self) -> anyhow::Result<Option<keyward_server::gateway::GatewayConfig>> {
        let Some(upstream) = &self.upstream else { return Ok(None) };
        let upstream: axum::http::Uri =
            upstream.parse().with_context(|| format!("gateway.upstream `{upstream}` is not a URL"))?;
        if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
            bail!("gateway.upstream must be an http://host:port URL");
        }
        Ok(Some(keyward_server::gateway::GatewayConfig {
            upstream,
            timeout: std::time::Duration::from_millis(self.timeout_ms.max(1)),
            routes: self.route_list()?,
            unmatched: self.unmatched(),
        }))
    }

    /// The route table (`[[gateway.routes]]`): the gateway's and the proxy hooks' (`/v1/authz`,
    /// ext_authz), with or without an upstream.
    pub fn routes(&self) -> anyhow::Result<keyward_server::authz::Routes> {
        keyward_server::authz::Routes::new(self.route_list()?, self.unmatched()).map_err(anyhow::Error::from)
    }

    fn unmatched(&self) -> keyward_server::authz::RouteRule {
        keyward_server::authz::RouteRule { public: !self.require_key_for_unmatched, scopes: Vec::new(), cost: 1 }
    }

    fn route_list(&self) -> anyhow::Result<Vec<keyward_server::authz::GatewayRoute>> {
        use keyward_server::authz::{GatewayRoute, RouteRule};
        let mut routes = Vec::new();
        for r in &self.routes {
            if !r.prefix.starts_with('/') {
                bail!("gateway route prefix `{}` must start with /", r.prefix);
            }
            let methods = r
                .methods
                .iter()
                .map(|m| m.to_uppercase().parse().with_context(|| format!("gateway route method `{m}`")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let scopes = r
                .scopes
                .iter()
                .map(|s| keyward_core::Scope::parse(s).with_context(|| format!("gateway route `{}`", r.prefix)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            // SECURITY: a route's cost is added to quota counters on every request, like `cost` of
            // /v1/verify, and has the same bound.
            let cost = r.cost.unwrap_or(1);
            if cost > keyward_store::usage::MAX_QUOTA_COST {
                bail!("gateway route `{}`: cost must be 0 to {}", r.prefix, keyward_store::usage::MAX_QUOTA_COST);
            }
            routes.push(GatewayRoute {
                prefix: r.prefix.clone(),
                methods,
                rule: RouteRule { public: r.public, scopes, cost },
            });
        }
        Ok(routes)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: "sqlite://keyward.db".to_owned(),
            pepper: None,
            log_format: LogFormat::Pretty,
            usage_flush_interval_ms: 1_000,
            trusted_proxies: Vec::new(),
            gateway: GatewaySettings::default(),
            redis_url: None,
            limiter_failure_policy: keyward_limit::FailurePolicy::default(),
            plans: Default::default(),
            protection: Default::default(),
            server: Default::default(),
            cache: Default::default(),
            lifecycle: Default::default(),
            webhooks: Default::default(),
            usage: UsageSettings::default(),
            authz: Default::default(),
            console: Default::default(),
        }
    }
}

/// Values given on the command line, each at its key in [`Config`]; only the ones given override.
#[derive(Debug, Default)]
pub struct Overrides(Figment);

impl Overrides {
    /// `value` at `key` (a section's with a dot: `gateway.upstream`), when given. A value not given
    /// is not set at all: set as `None`, it would clear what the file or the environment set. A key
    /// `Config` does not have is refused when the configuration loads.
    pub fn set<T: Serialize>(self, key: &str, value: Option<T>) -> Self {
        match value {
            Some(value) => Self(self.0.merge(Serialized::default(key, value))),
            None => self,
        }
    }
}

const KEYS: [&str; 8] = [
    "listen",
    "database_url",
    "pepper",
    "log_format",
    "usage_flush_interval_ms",
    "trusted_proxies",
    "redis_url",
    "limiter_failure_policy",
];
/// Nested sections, set from the environment as `KEYWARD_<SECTION>__<KEY>`.
const SECTIONS: [&str; 10] = [
    "gateway__",
    "plans__",
    "protection__",
    "server__",
    "cache__",
    "lifecycle__",
    "webhooks__",
    "usage__",
    "authz__",
    "console__",
];

impl Config {
    pub fn load(file: Option<&Path>, overrides: Overrides) -> anyhow::Result<Self> {
        let mut figment = Figment::new();
        let file = match file {
            Some(path) if !path.exists() => bail!("config file {} does not exist", path.display()),
            Some(path) => Some(path),
            None => Some(Path::new("keyward.toml")).filter(|p| p.exists()),
        };
        if let Some(path) = file {
            check_toml_syntax(path)?;
            figment = figment.merge(Toml::file_exact(path));
        }
        let config: Config = figment
            // Only our own names: other KEYWARD_* variables (test settings, ...) are not config.
            .merge(
                Env::prefixed("KEYWARD_")
                    .filter(|k| {
                        let k = k.as_str().to_ascii_lowercase();
                        KEYS.contains(&k.as_str()) || SECTIONS.iter().any(|s| k.starts_with(s))
                    })
                    .split("__"),
            )
            .merge(overrides.0)
            .extract()
            .context("invalid configuration")?;
        config.check()?;
        Ok(config)
    }

    /// Refuse unsafe or unusable combinations at start-up.
    fn check(&self) -> anyhow::Result<()> {
        if let Some(pepper) = &self.pepper
            && pepper.expose_secret().len() < keyward_core::hash::MIN_PEPPER_LEN
        {
            bail!("the pepper (KEYWARD_PEPPER) must be at least {} bytes", keyward_core::hash::MIN_PEPPER_LEN);
        }
        self.trusted_proxy_nets()?;
        self.gateway.build()?;
        self.gateway.routes()?;
        self.authz.key_header_names().map_err(anyhow::Error::msg)?;
        if let Some(secret) = &self.authz.identity_secret
            && secret.expose_secret().len() < keyward_server::settings::MIN_IDENTITY_SECRET_LEN
        {
            bail!(
                "authz.identity_secret (KEYWARD_AUTHZ__IDENTITY_SECRET) must be at least {} bytes",
                keyward_server::settings::MIN_IDENTITY_SECRET_LEN
            );
        }
        if self.authz.grpc_max_in_flight == 0 {
            bail!("authz.grpc_max_in_flight (KEYWARD_AUTHZ__GRPC_MAX_IN_FLIGHT) must be positive");
        }
        if let Some(path) = &self.webhooks.ca_file {
            keyward_server::webhooks::load_ca_file(path).map_err(|e| anyhow::anyhow!("webhooks.ca_file: {e}"))?;
        }
        if self.usage_flush_interval_ms == 0 {
            bail!("usage_flush_interval_ms must be positive");
        }
        if self.usage.batch_size == 0 || self.usage.max_buffered < self.usage.batch_size {
            bail!("usage.batch_size must be positive and at most usage.max_buffered");
        }
        if self.usage.retention_days == 0 {
            bail!("usage.retention_days must be positive");
        }
        if self.usage.concurrent_batches == 0 {
            bail!("usage.concurrent_batches must be positive");
        }
        if self.usage.retry_initial_ms == 0 || self.usage.retry_max_ms < self.usage.retry_initial_ms {
            bail!("usage.retry_initial_ms must be positive and at most usage.retry_max_ms");
        }
        if self.usage.export_rotate_seconds == 0 || self.usage.export_rotate_bytes == 0 {
            bail!("usage.export_rotate_seconds and usage.export_rotate_bytes must be positive");
        }
        if self.usage.export_max_bytes < self.usage.export_rotate_bytes {
            bail!("usage.export_max_bytes must be at least usage.export_rotate_bytes");
        }
        Ok(())
    }

    /// `trusted_proxies` as networks (a bare address is a /32 or /128).
    pub fn trusted_proxy_nets(&self) -> anyhow::Result<Vec<ipnet::IpNet>> {
        let list = keyward_core::IpAllowList::parse(&self.trusted_proxies).context("invalid trusted_proxies")?;
        Ok(list.nets().to_vec())
    }

    /// The ledger writer's settings for `serve`.
    pub fn usage_config(&self) -> keyward_server::settings::UsageConfig {
        let spill = self
            .usage
            .spill_path
            .clone()
            .unwrap_or_else(|| keyward_server::settings::UsageConfig::default_spill_path(&self.database_url));
        keyward_server::settings::UsageConfig {
            batch_size: self.usage.batch_size,
            max_buffered: self.usage.max_buffered,
            concurrent_batches: self.usage.concurrent_batches,
            retry_initial: Duration::from_millis(self.usage.retry_initial_ms),
            retry_max: Duration::from_millis(self.usage.retry_max_ms),
            shutdown_timeout: Duration::from_millis(self.usage.shutdown_timeout_ms),
            fold_interval: Duration::from_millis(self.usage.fold_interval_ms),
            raw_events: self.usage.raw_events,
            export: self.usage.export.clone().map(|dir| keyward_server::settings::ExportConfig {
                rotate_after: Duration::from_secs(self.usage.export_rotate_seconds),
                rotate_bytes: self.usage.export_rotate_bytes,
                max_bytes: self.usage.export_max_bytes,
                ..keyward_server::settings::ExportConfig::new(dir)
            }),
            ..keyward_server::settings::UsageConfig::new(Duration::from_millis(self.usage_flush_interval_ms), spill)
        }
    }

    /// What `serve` builds its node from.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        Ok(Settings {
            database_url: self.database_url.clone(),
            pepper: self.pepper.clone(),
            redis_url: self.redis_url.clone(),
            redis_channel: keyward_server::settings::DEFAULT_CHANNEL.to_owned(),
            limiter_failure_policy: self.limiter_failure_policy,
            plans: self.plans(),
            protection: self.protection,
            trusted_proxies: self.trusted_proxy_nets()?,
            cache: self.cache,
            lifecycle: self.lifecycle,
            webhooks: self.webhooks.clone(),
            usage: self.usage_config(),
            usage_retention: chrono::Duration::days(i64::from(self.usage.retention_days)),
            authz: self.authz.clone(),
            console: self.console.clone(),
        })
    }

    /// The plans: the defaults, with configured ones added or replacing a default of the same name.
    pub fn plans(&self) -> keyward_core::Plans {
        keyward_core::Plans::defaults().with(self.plans.clone())
    }

    /// The effective configuration, secrets redacted.
    pub fn show(&self) -> String {
        let gateway = toml_section(&self.gateway);
        let protection = toml_section(&self.protection);
        let server = toml_section(&self.server);
        let cache = toml_section(&self.cache);
        let usage = toml_section(&self.usage);
        let lifecycle = toml_section(&self.lifecycle);
        let webhooks = toml_section(&self.webhooks);
        let console = toml_section(&self.console);
        let plans = toml_section(&self.plans());
        let identity_secret = if self.authz.identity_secret.is_some() { "\"[redacted]\"" } else { "unset" };
        let authz = format!("{}identity_secret = {identity_secret}\n", toml_section(&self.authz));
        format!(
            "listen = \"{}\"\ndatabase_url = \"{}\"\npepper = {}\nlog_format = \"{}\"\nusage_flush_interval_ms = {}\ntrusted_proxies = {:?}\nredis_url = {}\nlimiter_failure_policy = \"{}\"\n\n[gateway]\n{gateway}\n[protection]\n{protection}\n[server]\n{server}\n[cache]\n{cache}\n[usage]\n{usage}\n[lifecycle]\n{lifecycle}\n[webhooks]\n{webhooks}\n[authz]\n{authz}\n[console]\n{console}\n[plans]\n{plans}",
            self.listen,
            redact_url(&self.database_url),
            if self.pepper.is_some() { "\"[redacted]\"" } else { "unset" },
            match self.log_format {
                LogFormat::Pretty => "pretty",
                LogFormat::Json => "json",
            },
            self.usage_flush_interval_ms,
            self.trusted_proxies,
            self.redis_url
                .as_ref()
                .map(|u| format!("\"{}\"", redact_url(u.expose_secret())))
                .unwrap_or_else(|| "unset".to_owned()),
            self.limiter_failure_policy.as_str(),
        )
    }
}

fn toml_section<T: Serialize>(value: &T) -> String {
    toml::to_string(value).unwrap_or_default()
}

/// A TOML syntax error as one line, `file:line:column: what`, instead of the parser's drawing.
fn check_toml_syntax(path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let Err(e) = text.parse::<toml::Table>() else { return Ok(()) };
    let at = e.span().map_or(0, |span| span.start).min(text.len());
    let before = text.get(..at).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let what = e.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    bail!("{}:{line}:{column}: invalid TOML: {what}", path.display())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::result_large_err)] // figment's own test-jail signature

    use super::*;

    /// The configuration the jail's file and environment give, without flags.
    fn load() -> Result<Config, String> {
        Config::load(None, Overrides::default()).map_err(|e| e.to_string())
    }

    /// With `var` set to `bad` the configuration is refused (`why` names the rule), and with `var` set
    /// back to `good` it loads: the refusal was `bad`'s, and the next check starts from a valid one.
    fn refuses(jail: &mut figment::Jail, var: &str, bad: &str, good: &str, why: &str) {
        jail.set_env(var, bad);
        assert!(load().is_err(), "{why}: {var}={bad} was accepted");
        jail.set_env(var, good);
        if let Err(e) = load() {
            panic!("{why}: {var}={good} was refused too: {e}");
        }
    }

    #[test]
    fn gateway_routes_from_toml() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "keyward.toml",
                r#"
                [gateway]
                upstream = "http://127.0.0.1:9000"
                [[gateway.routes]]
                prefix = "/v1/projects"
                methods = ["get"]
                scopes = ["read:projects"]
                [[gateway.routes]]
                prefix = "/health"
                public = true
                "#,
            )?;
            let c = load()?;
            let gw = c.gateway.build().map_err(|e| e.to_string())?.ok_or("no gateway")?;
            assert_eq!(gw.routes.len(), 2);
            assert_eq!(gw.routes[0].methods, vec![axum::http::Method::GET]);
            assert!(gw.routes[1].rule.public);
            jail.create_file(
                "keyward.toml",
                "[gateway]\nupstream = \"http://x\"\n[[gateway.routes]]\nprefix = \"/a\"\nscopes = [\"bad scope\"]\n",
            )?;
            assert!(load().is_err(), "a scope that does not parse");
            Ok(())
        });
    }

    #[test]
    fn gateway_route_costs_are_bounded() {
        figment::Jail::expect_with(|jail| {
            let route = |cost: &str| {
                format!("[gateway]\nupstream = \"http://x\"\n[[gateway.routes]]\nprefix = \"/a\"\ncost = {cost}\n")
            };
            for ok in ["0", "1", "1000000000"] {
                jail.create_file("keyward.toml", &route(ok))?;
                let c = Config::load(None, Overrides::default()).map_err(|e| format!("{ok}: {e}"))?;
                let gw = c.gateway.build().map_err(|e| e.to_string())?.ok_or("no gateway")?;
                assert_eq!(gw.routes[0].rule.cost.to_string(), ok);
            }
            for bad in ["1000000001", "9223372036854775807", "18446744073709551615", "-1", "1.5", "\"5\""] {
                jail.create_file("keyward.toml", &route(bad))?;
                assert!(load().is_err(), "cost = {bad}");
            }
            Ok(())
        });
    }

    /// `[authz]` from the file and the environment; the route table exists without an upstream; the
    /// identity secret is redacted and a short one or a bad key header is refused.
    #[test]
    #[allow(clippy::result_large_err)] // figment's own test-jail signature
    fn authz_settings_and_routes_without_an_upstream() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "keyward.toml",
                "[authz]\nstyle = \"original\"\nkey_headers = [\"x-client-key\"]\n\
                 [[gateway.routes]]\nprefix = \"/v1/projects\"\nscopes = [\"read:projects\"]\n",
            )?;
            let c = load()?;
            assert!(c.gateway.build().map_err(|e| e.to_string())?.is_none(), "no upstream, no gateway");
            let routes = c.gateway.routes().map_err(|e| e.to_string())?;
            assert_eq!(routes.routes().len(), 1);
            let s = c.settings().map_err(|e| e.to_string())?;
            assert_eq!(s.authz.style, Some(keyward_server::settings::AuthzStyle::Original));
            assert_eq!(s.authz.key_headers, ["x-client-key"]);
            assert!(c.show().contains("style = \"original\""), "{}", c.show());
            assert!(c.show().contains("identity_secret = unset"), "{}", c.show());
            jail.set_env("KEYWARD_AUTHZ__NGINX_COMPAT", "true");
            jail.set_env("KEYWARD_AUTHZ__IDENTITY_SECRET", "s".repeat(32));
            jail.set_env("KEYWARD_AUTHZ__IDENTITY_TTL_SECONDS", "30");
            let c = load()?;
            assert!(c.authz.nginx_compat);
            assert_eq!(c.authz.identity_ttl_seconds, 30);
            assert!(c.show().contains("identity_secret = \"[redacted]\""), "{}", c.show());
            assert!(!c.show().contains("ssss"), "the secret is never shown");
            let secret = "s".repeat(32);
            refuses(jail, "KEYWARD_AUTHZ__IDENTITY_SECRET", "short", &secret, "a short identity secret");
            refuses(
                jail,
                "KEYWARD_AUTHZ__KEY_HEADERS",
                "[\"X-Key\"]",
                "[\"x-client-key\"]",
                "an upper-case key header",
            );
            refuses(jail, "KEYWARD_AUTHZ__STYLE", "auto", "original", "a style that is not one");
            Ok(())
        });
    }

    #[test]
    fn no_file_means_defaults() {
        figment::Jail::expect_with(|_jail| {
            let c = load()?;
            assert_eq!(c.listen.port(), 8080);
            assert_eq!(c.database_url, "sqlite://keyward.db");
            Ok(())
        });
    }

    #[test]
    fn usage_writer_settings_reach_the_writer_and_bad_ones_are_refused() {
        figment::Jail::expect_with(|jail| {
            let c = load()?;
            let u = c.usage_config();
            assert_eq!((u.retry_initial, u.retry_max), (Duration::from_millis(100), Duration::from_secs(5)));
            assert_eq!((u.shutdown_timeout, u.concurrent_batches), (Duration::from_secs(10), 2));
            assert_eq!(u.fold_interval, Duration::from_secs(10));
            jail.create_file(
                "keyward.toml",
                "[usage]\nretry_initial_ms = 50\nretry_max_ms = 2000\nshutdown_timeout_ms = 3000\nconcurrent_batches = 1\n\
                 fold_interval_ms = 2500",
            )?;
            let c = load()?;
            let u = c.usage_config();
            assert_eq!((u.retry_initial, u.retry_max), (Duration::from_millis(50), Duration::from_secs(2)));
            assert_eq!((u.shutdown_timeout, u.concurrent_batches), (Duration::from_secs(3), 1));
            assert_eq!(u.fold_interval, Duration::from_millis(2500));
            assert!(c.show().contains("shutdown_timeout_ms = 3000"), "{}", c.show());
            refuses(jail, "KEYWARD_USAGE__RETRY_MAX_MS", "10", "2000", "retry_max below retry_initial");
            refuses(jail, "KEYWARD_USAGE__CONCURRENT_BATCHES", "0", "1", "no writer at all");
            use keyward_store::usage::RawEvents;
            assert_eq!(c.usage_config().raw_events, RawEvents::Denied);
            jail.create_file("keyward.toml", "[usage]\nraw_events = \"off\"")?;
            assert_eq!(load()?.usage_config().raw_events, RawEvents::Off);
            jail.set_env("KEYWARD_USAGE__RAW_EVENTS", "all");
            let c = load()?;
            assert_eq!(c.usage_config().raw_events, RawEvents::All);
            assert!(c.show().contains("raw_events = \"all\""), "{}", c.show());
            refuses(jail, "KEYWARD_USAGE__RAW_EVENTS", "some", "all", "an unknown choice");
            refuses(jail, "KEYWARD_USAGE__EXPORT_ROTATE_SECONDS", "0", "60", "segments never old enough");
            refuses(jail, "KEYWARD_USAGE__EXPORT_MAX_BYTES", "1000", "67108864", "a bound below one segment");
            Ok(())
        });
    }

    /// Each setting a flag sets, set in every layer: the flag wins over the environment, which wins
    /// over the file, which wins over the default.
    #[test]
    fn flags_win_over_the_environment_over_the_file_over_the_defaults() {
        figment::Jail::expect_with(|jail| {
            let seen = |overrides: Overrides| {
                let c = Config::load(None, overrides).map_err(|e| e.to_string())?;
                let redis = c.redis_url.as_ref().map(|u| u.expose_secret().to_owned());
                Ok::<_, String>((c.listen.port(), c.database_url, redis, c.log_format, c.gateway.upstream))
            };
            let none = || Overrides::default();
            let expect = |port: u16, db: &str, redis: Option<&str>, log, upstream: Option<&str>| {
                (port, db.to_owned(), redis.map(str::to_owned), log, upstream.map(str::to_owned))
            };
            assert_eq!(seen(none())?, expect(8080, "sqlite://keyward.db", None, LogFormat::Pretty, None));
            jail.create_file(
                "keyward.toml",
                "listen = \"127.0.0.1:2\"\ndatabase_url = \"sqlite://file.db\"\nredis_url = \"redis://file:6379\"\n\
                 log_format = \"json\"\n[gateway]\nupstream = \"http://file:9000\"\n",
            )?;
            let file =
                expect(2, "sqlite://file.db", Some("redis://file:6379"), LogFormat::Json, Some("http://file:9000"));
            assert_eq!(seen(none())?, file);
            jail.set_env("KEYWARD_LISTEN", "127.0.0.1:3");
            jail.set_env("KEYWARD_DATABASE_URL", "sqlite://env.db");
            jail.set_env("KEYWARD_REDIS_URL", "redis://env:6379");
            jail.set_env("KEYWARD_LOG_FORMAT", "pretty");
            jail.set_env("KEYWARD_GATEWAY__UPSTREAM", "http://env:9000");
            let env =
                expect(3, "sqlite://env.db", Some("redis://env:6379"), LogFormat::Pretty, Some("http://env:9000"));
            assert_eq!(seen(none())?, env);
            let flags = none()
                .set("listen", Some(SocketAddr::from(([127, 0, 0, 1], 4))))
                .set("database_url", Some("sqlite://flag.db"))
                .set("redis_url", Some("redis://flag:6379"))
                .set("log_format", Some(LogFormat::Json))
                .set("gateway.upstream", Some("http://flag:9000"));
            let flag =
                expect(4, "sqlite://flag.db", Some("redis://flag:6379"), LogFormat::Json, Some("http://flag:9000"));
            assert_eq!(seen(flags)?, flag);
            // `--gateway-listen`: not given, the default; given, its value.
            let gateway_listen = |overrides: Overrides| Config::load(None, overrides).map(|c| c.gateway.listen.port());
            assert_eq!(gateway_listen(none()).map_err(|e| e.to_string())?, 8000);
            let port_5 = Some(SocketAddr::from(([127, 0, 0, 1], 5)));
            assert_eq!(gateway_listen(none().set("gateway.listen", port_5)).map_err(|e| e.to_string())?, 5);
            assert!(Config::load(None, none().set("gateway.lisen", port_5)).is_err(), "a key Config does not have");
            Ok(())
        });
    }

    /// `[authz] grpc_listen`, `KEYWARD_AUTHZ__GRPC_LISTEN`, `--ext-authz-grpc-listen`: later wins, and
    /// the other `[authz]` settings of the file stay.
    #[test]
    #[allow(clippy::result_large_err)] // figment's own test-jail signature
    fn the_ext_authz_grpc_listener_is_layered_like_the_others() {
        figment::Jail::expect_with(|jail| {
            let grpc = |overrides: Overrides| {
                Config::load(None, overrides).map(|c| (c.authz.grpc_listen.map(|a| a.port()), c.authz.nginx_compat))
            };
            assert_eq!(grpc(Overrides::default()).map_err(|e| e.to_string())?, (None, false));
            jail.create_file("keyward.toml", "[authz]\ngrpc_listen = \"127.0.0.1:9191\"\nnginx_compat = true\n")?;
            assert_eq!(grpc(Overrides::default()).map_err(|e| e.to_string())?, (Some(9191), true));
            jail.set_env("KEYWARD_AUTHZ__GRPC_LISTEN", "127.0.0.1:9192");
            assert_eq!(grpc(Overrides::default()).map_err(|e| e.to_string())?, (Some(9192), true));
            let flags = Overrides::default().set("authz.grpc_listen", Some(SocketAddr::from(([127, 0, 0, 1], 9193))));
            assert_eq!(grpc(flags).map_err(|e| e.to_string())?, (Some(9193), true));
            Ok(())
        });
    }

    /// `[authz] grpc_max_in_flight`: a default, the environment over it, and 0 refused at start-up.
    #[test]
    #[allow(clippy::result_large_err)] // figment's own test-jail signature
    fn the_ext_authz_grpc_in_flight_cap_has_a_default_and_a_setting() {
        figment::Jail::expect_with(|jail| {
            let cap = || Config::load(None, Overrides::default()).map(|c| c.authz.grpc_max_in_flight);
            assert_eq!(cap().map_err(|e| e.to_string())?, keyward_server::settings::DEFAULT_GRPC_MAX_IN_FLIGHT);
            jail.set_env("KEYWARD_AUTHZ__GRPC_MAX_IN_FLIGHT", "64");
            assert_eq!(cap().map_err(|e| e.to_string())?, 64);
            jail.set_env("KEYWARD_AUTHZ__GRPC_MAX_IN_FLIGHT", "0");
            let refused = cap().map_err(|e| format!("{e:#}")).unwrap_err();
            assert!(refused.contains("grpc_max_in_flight"), "{refused}");
            Ok(())
        });
    }

    #[test]
    fn layers_apply_in_order_and_short_pepper_is_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("keyward.toml", "listen = \"127.0.0.1:9000\"\ndatabase_url = \"sqlite://a.db\"")?;
            jail.set_env("KEYWARD_DATABASE_URL", "sqlite://b.db");
            jail.set_env("KEYWARD_TEST_POSTGRES_URL", "ignored");
            let c = load()?;
            assert_eq!(c.listen.port(), 9000);
            assert_eq!(c.database_url, "sqlite://b.db");
            let flags = Overrides::default().set("database_url", Some("sqlite://c.db"));
            let c = Config::load(None, flags).map_err(|e| e.to_string())?;
            assert_eq!(c.database_url, "sqlite://c.db");
            jail.set_env("KEYWARD_TRUSTED_PROXIES", "[\"10.0.0.0/8\", \"::1\"]");
            let c = load()?;
            assert_eq!(c.trusted_proxies.len(), 2);
            jail.set_env("KEYWARD_GATEWAY__UPSTREAM", "http://127.0.0.1:9000");
            let c = load()?;
            assert!(c.gateway.build().map_err(|e| e.to_string())?.is_some());
            refuses(jail, "KEYWARD_GATEWAY__UPSTREAM", "ftp://nope", "http://127.0.0.1:9000", "not an HTTP upstream");
            jail.set_env("KEYWARD_PROTECTION__FAILED_AUTH_PER_MINUTE", "3");
            jail.set_env("KEYWARD_PLANS__GOLD__PER_MINUTE", "1200");
            jail.set_env("KEYWARD_LIMITER_FAILURE_POLICY", "fail_closed");
            let c = load()?;
            assert_eq!(c.protection.failed_auth_per_minute, 3);
            assert_eq!(c.protection.management_per_minute, 100);
            assert_eq!(c.plans().get("gold").and_then(|p| p.per_minute), Some(1200));
            assert!(c.plans().get("free").is_some());
            assert_eq!(c.limiter_failure_policy, keyward_limit::FailurePolicy::FailClosed);
            assert!(!c.webhooks.allow_private_targets, "private webhook targets are refused by default");
            jail.set_env("KEYWARD_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true");
            jail.set_env("KEYWARD_LIFECYCLE__EXPIRING_NOTICE_DAYS", "3");
            let c = load()?;
            assert!(c.webhooks.allow_private_targets);
            assert_eq!(c.lifecycle.expiring_notice_days, 3);
            assert!(c.console.enabled, "the console is on by default");
            jail.set_env("KEYWARD_CONSOLE__ENABLED", "false");
            jail.set_env("KEYWARD_CONSOLE__PRODUCT_NAME", "Acme API");
            let c = load()?;
            assert!(!c.console.enabled);
            assert_eq!(c.console.product_name, "Acme API");
            assert_eq!(c.console.session_idle_seconds, 1800);
            assert!(c.show().contains("allow_private_targets = true"), "{}", c.show());
            refuses(jail, "KEYWARD_PEPPER", "too-short", &"x".repeat(32), "a short pepper");
            let c = load()?;
            assert!(!c.show().contains("xxxx"));
            Ok(())
        });
    }
}
