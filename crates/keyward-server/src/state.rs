//! What every handler shares.

use std::sync::Arc;

use keyward_core::{Clock, KeyHasher};
use keyward_store::Store;

use crate::usage::UsageRecorder;

/// Plans a key or an organization may name. Limits per plan arrive with the rate-limit work.
pub const DEFAULT_PLANS: [&str; 3] = ["free", "pro", "enterprise"];

#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub hasher: KeyHasher,
    pub usage: UsageRecorder,
    pub plans: Arc<[String]>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, hasher: KeyHasher, usage: UsageRecorder) -> Self {
        Self {
            store,
            clock,
            hasher,
            usage,
            plans: DEFAULT_PLANS.iter().map(|p| p.to_string()).collect(),
            trusted_proxies: Arc::new([]),
        }
    }
}
