//! What every handler shares.

use std::sync::Arc;

use keyward_core::{Clock, KeyHasher, Plans};
use keyward_limit::{Limiter, MemoryLimiter};
use keyward_store::Store;

use crate::limits::Protection;
use crate::usage::UsageRecorder;

#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub hasher: KeyHasher,
    pub usage: UsageRecorder,
    /// The tiers keys and organizations may name, with their limits.
    pub plans: Arc<Plans>,
    /// Rate limits and monthly quotas: in memory on one node, on Redis for many.
    pub limiter: Arc<dyn Limiter>,
    /// Keyward's own limits per client IP and organization.
    pub protection: Protection,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
}

impl AppState {
    /// Default plans and protection, limits in memory.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, hasher: KeyHasher, usage: UsageRecorder) -> Self {
        Self {
            store,
            clock,
            hasher,
            usage,
            plans: Arc::new(Plans::defaults()),
            limiter: Arc::new(MemoryLimiter::default()),
            protection: Protection::default(),
            trusted_proxies: Arc::new([]),
        }
    }
}
