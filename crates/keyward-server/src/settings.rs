//! Every setting a node runs with, in one place: the sections of the configuration file
//! (`[protection]`, `[server]`, `[cache]`, `[lifecycle]`, `[webhooks]`). The binary reads them from the
//! file, the environment and its flags; tests and embedders write them in code.
//!
//! This module imports no other module of the crate, so any module may read its settings here without
//! importing a module that imports it back (`module_graph` holds every module to that).

use serde::{Deserialize, Serialize};

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
    /// Keys held (about 270 bytes each, measured with 1,000,000 keys; see BENCHMARKS.md).
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
