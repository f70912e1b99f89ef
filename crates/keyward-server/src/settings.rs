//! Every setting a node runs with, in one place: [`Settings`], what [`crate::app::App::build`] wires a
//! node from, and the sections of the configuration file (`[protection]`, `[server]`, `[cache]`,
//! `[lifecycle]`, `[webhooks]`) and the usage writer's settings. The binary reads them from the file,
//! the environment and its flags; tests and embedders write them in code. `[authz]` is
//! [`AuthzSettings`].
//!
//! This module imports no other module of the crate, so any module may read its settings here without
//! importing a module that imports it back (`module_graph` holds every module to that).

use std::path::PathBuf;
use std::time::Duration;

use keyward_core::Plans;
use keyward_limit::FailurePolicy;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// The channel of [`Settings::redis_channel`] unless told otherwise.
pub const DEFAULT_CHANNEL: &str = "keyward:invalidate";

/// What a node is built from ([`crate::app::App::build`]). `Default` is a single node on
/// `sqlite://keyward.db` with every limit and schedule at its documented default.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `sqlite://path` or `postgres://user:password@host/db`: opened, and migrated, unless the builder
    /// is handed an open store.
    pub database_url: String,
    /// HMAC-SHA256 pepper for key hashes (at least 32 bytes); `None`: SHA-256.
    pub pepper: Option<SecretString>,
    /// `redis://host:port`: rate limits and quotas shared by every node, and the channel that carries
    /// cache invalidations to them. `None`: limits in memory, on this node alone.
    pub redis_url: Option<SecretString>,
    /// The Redis channel cache invalidations travel on: the nodes of one deployment share it; two
    /// deployments on one Redis need one each.
    pub redis_channel: String,
    /// What the limiter does while Redis cannot be reached.
    pub limiter_failure_policy: FailurePolicy,
    /// The tiers keys and organizations may name.
    pub plans: Plans,
    pub protection: Protection,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub cache: CacheConfig,
    pub lifecycle: LifecycleSettings,
    pub webhooks: WebhookSettings,
    /// The usage writer. Its default spill file is the process's own ([`UsageConfig::private_spill_path`]):
    /// give a `spill_path` of the node's own for events spilled before a crash to be replayed at the next
    /// start, as `keyward serve` does.
    pub usage: UsageConfig,
    /// Raw usage events older than this are pruned; daily rollups stay.
    pub usage_retention: chrono::Duration,
    /// The proxy hooks (`/v1/authz`, ext_authz) and what every decision adds (the signed identity).
    pub authz: AuthzSettings,
    /// The web console at `/console` on the management listener.
    pub console: ConsoleSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: "sqlite://keyward.db".to_owned(),
            pepper: None,
            redis_url: None,
            redis_channel: DEFAULT_CHANNEL.to_owned(),
            limiter_failure_policy: FailurePolicy::default(),
            plans: Plans::defaults(),
            protection: Protection::default(),
            trusted_proxies: Vec::new(),
            cache: CacheConfig::default(),
            lifecycle: LifecycleSettings::default(),
            webhooks: WebhookSettings::default(),
            usage: UsageConfig::default(),
            usage_retention: chrono::Duration::days(90),
            authz: AuthzSettings::default(),
            console: ConsoleSettings::default(),
        }
    }
}

/// Keyward's limits on its own callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Protection {
    /// Management API requests per client IP per minute (`/v1/verify` is not counted).
    pub management_per_minute: u64,
    /// Failed authentications per client IP per minute; past it even a right key gets 429.
    pub failed_auth_per_minute: u64,
    /// Keys created per organization per minute.
    pub key_creation_per_minute: u64,
}

impl Default for Protection {
    fn default() -> Self {
        Self { management_per_minute: 100, failed_auth_per_minute: 10, key_creation_per_minute: 5 }
    }
}

/// `[server]` in the configuration: limits of every HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerLimits {
    /// How long a client may take to send a request's headers, in milliseconds.
    pub header_read_timeout_ms: u64,
    /// How long a client may take to send a request's body, in milliseconds (408 after it).
    pub body_read_timeout_ms: u64,
    /// Connections served at once per listener; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// How long a graceful shutdown waits for requests in flight, in milliseconds.
    pub shutdown_grace_ms: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            max_connections: 10_000,
            shutdown_grace_ms: 10_000,
        }
    }
}

/// Sizes and times of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Keys held (the memory each takes: BENCHMARKS.md).
    pub capacity: usize,
    /// Unknown hashes held, separately.
    pub negative_capacity: usize,
    /// How long an entry is trusted without a word from the bus, in milliseconds.
    pub ttl_ms: u64,
    /// How long an unknown hash is remembered, in milliseconds.
    pub negative_ttl_ms: u64,
    /// How long an entry may be served while the store is unreachable, in milliseconds.
    pub stale_ceiling_ms: u64,
    /// How long a lookup that missed the cache waits for the store before the store counts as
    /// unreachable (the breaker opens), in milliseconds.
    pub lookup_timeout_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity: 1_000_000,
            negative_capacity: 100_000,
            ttl_ms: 30_000,
            negative_ttl_ms: 2_000,
            stale_ceiling_ms: 300_000,
            lookup_timeout_ms: 1_000,
        }
    }
}

/// `[lifecycle]` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleSettings {
    /// How often the expiry sweeper runs, in seconds; 0 turns it off (`POST /v1/keys/cleanup-expired`
    /// still works).
    pub sweep_interval_seconds: u64,
    /// `key.expiring` is sent this many days before a key expires.
    pub expiring_notice_days: u32,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        Self { sweep_interval_seconds: 60, expiring_notice_days: 7 }
    }
}

/// `[console]` in the configuration: the web console at `/console`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Serve the console (on by default).
    pub enabled: bool,
    /// The name shown at the top of every page.
    pub product_name: String,
    /// A session unused this long ends, in seconds.
    pub session_idle_seconds: u64,
    /// A session ends this long after sign-in however much it is used, in seconds.
    pub session_absolute_seconds: u64,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            product_name: "Keyward".to_owned(),
            session_idle_seconds: 1800,
            session_absolute_seconds: 43_200,
        }
    }
}

/// `[webhooks]` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// Extra certificate authorities (PEM) trusted for `https://` targets, beside the bundled Mozilla
    /// roots: for receivers behind a private CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Allow targets on loopback, private and link-local addresses (off: refused). Tests and
    /// single-host setups turn it on.
    pub allow_private_targets: bool,
    /// How long a receiver may take to answer, in milliseconds.
    pub timeout_ms: u64,
    /// Retries stop this long after the event; the delivery is then `failed`.
    pub retry_for_hours: u64,
    /// How often the worker looks for due deliveries without being woken, in milliseconds.
    pub poll_interval_ms: u64,
    /// `auth.failures_spike`: this many failed authentications from one IP, or against one key prefix,
    /// within a minute; 0 turns it off.
    pub failures_spike_per_minute: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            ca_file: None,
            allow_private_targets: false,
            timeout_ms: 10_000,
            retry_for_hours: 24,
            poll_interval_ms: 1_000,
            failures_spike_per_minute: 50,
        }
    }
}

/// Where `/v1/authz` reads the method and URI of the request a proxy asks about. Chosen by the proxy's
/// configuration (the recipe's URL or `[authz] style`), never guessed from the headers present: a
/// proxy passes its client's headers on, so a client behind nginx could otherwise send its own
/// `X-Forwarded-Uri` and be judged on a path it chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzStyle {
    /// `X-Forwarded-Method` and `X-Forwarded-Uri` (Traefik, Caddy, APISIX).
    Forwarded,
    /// `X-Original-Method` and `X-Original-URI` (nginx `auth_request`, ingress-nginx).
    Original,
    /// Envoy's HTTP ext_authz: `/v1/authz/<original path>`, with the original method.
    Envoy,
}

impl AuthzStyle {
    pub const ALL: [AuthzStyle; 3] = [Self::Forwarded, Self::Original, Self::Envoy];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Original => "original",
            Self::Envoy => "envoy",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|style| style.as_str() == s)
    }
}

/// `[authz]` in the configuration: the proxy hooks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthzSettings {
    /// The headers a key is read from, in order, lower case: `authorization` holds it as
    /// `Bearer <key>`, any other header as the bare key. Each is removed before the upstream.
    pub key_headers: Vec<String>,
    /// The style of every `/v1/authz` request; unset, each request names it (`?style=`, or
    /// `?compat=nginx` for `original`), and one that names none is refused (400).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub style: Option<AuthzStyle>,
    /// nginx's `auth_request` turns every status but 2xx, 401 and 403 into 500: a 429 or 503 is sent
    /// as 403 with `X-Keyward-Status` (per request: `?compat=nginx`).
    pub nginx_compat: bool,
    /// The shared secret of the signed `x-keyward-identity` header (HMAC-SHA256, at least 32 bytes);
    /// unset, no such header is sent.
    #[serde(skip_serializing)]
    pub identity_secret: Option<SecretString>,
    /// How long a signed identity is valid, in seconds.
    pub identity_ttl_seconds: u64,
    /// Where Envoy's ext_authz over gRPC is served (`--ext-authz-grpc-listen`); unset: not served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<std::net::SocketAddr>,
    /// gRPC calls open at once on that listener, over all its connections; more are answered
    /// `RESOURCE_EXHAUSTED` at once.
    pub grpc_max_in_flight: usize,
}

/// The default of `authz.grpc_max_in_flight`: a call waiting for its message holds ~5.4 KB, so
/// ~55 MB at most, far above what a node deciding 50,000 times a second in 1 ms keeps open (50).
pub const DEFAULT_GRPC_MAX_IN_FLIGHT: usize = 10_000;

/// The shortest `identity_secret` taken: as long as an HMAC-SHA256 key should be.
pub const MIN_IDENTITY_SECRET_LEN: usize = 32;

impl Default for AuthzSettings {
    fn default() -> Self {
        Self {
            key_headers: vec!["authorization".to_owned(), "x-api-key".to_owned()],
            style: None,
            nginx_compat: false,
            identity_secret: None,
            identity_ttl_seconds: 60,
            grpc_listen: None,
            grpc_max_in_flight: DEFAULT_GRPC_MAX_IN_FLIGHT,
        }
    }
}

impl AuthzSettings {
    /// `key_headers` as header names; an invalid or upper-case name is refused.
    pub fn key_header_names(&self) -> Result<Vec<axum::http::HeaderName>, String> {
        if self.key_headers.is_empty() {
            return Err("authz.key_headers must name at least one header".to_owned());
        }
        self.key_headers
            .iter()
            .map(|name| {
                axum::http::HeaderName::from_bytes(name.as_bytes())
                    .ok()
                    .filter(|parsed| parsed.as_str() == name)
                    .ok_or_else(|| format!("authz.key_headers: `{name}` is not a lower-case header name"))
            })
            .collect()
    }
}

/// How the ledger's writer batches, retries and spills.
#[derive(Debug, Clone)]
pub struct UsageConfig {
    pub flush_interval: Duration,
    /// Events per transaction; this many buffered wake the writer before the interval.
    pub batch_size: usize,
    /// Events held in memory while the store fails; past it they go to the spill file.
    pub max_buffered: usize,
    pub spill_path: PathBuf,
    /// The first wait after a failed write; it doubles after each failure in a row.
    pub retry_initial: Duration,
    /// The longest wait between two attempts.
    pub retry_max: Duration,
    /// How long shutdown keeps retrying before spilling what is left.
    pub shutdown_timeout: Duration,
    /// Batches written at once, each its own transaction (at least 1).
    pub concurrent_batches: usize,
    /// How often the rollups catch up with the batches ([`keyward_store::UsageStore::fold_usage`]):
    /// the most a usage report, a key's `total_requests` and its `last_used_*` lag behind. A flush
    /// and shutdown fold at once.
    pub fold_interval: Duration,
    /// Which events keep a raw row besides the rollups (`usage.raw_events`).
    pub raw_events: keyward_store::usage::RawEvents,
    /// Every usage event also appended to segment files analytics engines read
    /// ([`crate::export`]); `None`: no export.
    pub export: Option<ExportConfig>,
}

/// Where and how the raw usage events are exported ([`crate::export`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ExportConfig {
    /// The directory of the segments (created if missing).
    pub dir: PathBuf,
    /// A segment is completed once it is this old ...
    pub rotate_after: Duration,
    /// ... or once this many compressed bytes are written to it.
    pub rotate_bytes: u64,
    /// The most the complete segments in the directory may hold: past it the oldest are deleted.
    pub max_bytes: u64,
    /// In every segment's name, so nodes sharing a directory or a bucket never write the same file.
    pub node: String,
}

impl ExportConfig {
    /// Defaults: a segment every 5 minutes or 64 MiB, at most 10 GiB kept, named for this host and process.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            rotate_after: Duration::from_secs(300),
            rotate_bytes: 64 << 20,
            max_bytes: 10 << 30,
            node: Self::default_node(),
        }
    }

    /// `<host>-<pid>`, kept to letters, digits, `-` and `_` (it is part of a file name).
    pub fn default_node() -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let host = if host.is_empty() { "node".to_owned() } else { host };
        format!("{host}-{}", std::process::id())
    }
}

impl UsageConfig {
    /// Defaults, flushing every `flush_interval`, spilling to `spill_path`.
    pub fn new(flush_interval: Duration, spill_path: PathBuf) -> Self {
        Self {
            flush_interval,
            batch_size: 5_000,
            max_buffered: 100_000,
            spill_path,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            concurrent_batches: 2,
            fold_interval: Duration::from_secs(10),
            raw_events: keyward_store::usage::RawEvents::default(),
            export: None,
        }
    }

    /// A spill file of this process's own in the temp directory: never another node's or another
    /// command's, so never replayed (and emptied) by them.
    pub fn private_spill_path() -> PathBuf {
        std::env::temp_dir().join(format!("keyward-usage-spill-{}.jsonl", uuid::Uuid::now_v7()))
    }

    /// The spill file next to a SQLite database file, else in the temp directory.
    pub fn default_spill_path(database_url: &str) -> PathBuf {
        let file = database_url
            .strip_prefix("sqlite://")
            .or_else(|| database_url.strip_prefix("sqlite:"))
            .map(|rest| rest.split('?').next().unwrap_or_default())
            .filter(|p| !p.is_empty() && !p.contains(":memory:"));
        match file {
            Some(path) => PathBuf::from(format!("{path}.usage-spill.jsonl")),
            None => std::env::temp_dir().join("keyward-usage-spill.jsonl"),
        }
    }
}

impl Default for UsageConfig {
    /// Flushing every second, spilling (only if ever needed) to [`UsageConfig::private_spill_path`].
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Self::private_spill_path())
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:[redacted]@host/db`: how a database or Redis
/// URL is shown in errors and in `keyward config show`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:[redacted]{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(redact_url("postgres://u:pw@h/db"), "postgres://u:[redacted]@h/db");
        assert_eq!(redact_url("sqlite://keyward.db"), "sqlite://keyward.db");
    }

    #[test]
    fn the_spill_file_sits_next_to_a_sqlite_file() {
        assert_eq!(
            UsageConfig::default_spill_path("sqlite:///var/lib/keyward/keyward.db?mode=rwc"),
            PathBuf::from("/var/lib/keyward/keyward.db.usage-spill.jsonl")
        );
        assert_eq!(UsageConfig::default_spill_path("sqlite:kw.db"), PathBuf::from("kw.db.usage-spill.jsonl"));
        let tmp = std::env::temp_dir().join("keyward-usage-spill.jsonl");
        assert_eq!(UsageConfig::default_spill_path("sqlite::memory:"), tmp);
        assert_eq!(UsageConfig::default_spill_path("postgres://h/db"), tmp);
    }
}
