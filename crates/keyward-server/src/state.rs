//! What every handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keyward_core::{Clock, KeyHasher, Plans};
use keyward_limit::{Limiter, MemoryLimiter};
use keyward_store::{Store, StoreResult};

use axum::http::HeaderName;

use crate::cache::{CachedLookup, KeyCache};
use crate::rules::Routes;
use crate::settings::{AuthzSettings, CacheConfig, LifecycleSettings, Protection, WebhookSettings};
use crate::usage::UsageRecorder;

/// What every handler shares, behind one `Arc`: handing it to a handler is one reference count, not
/// one per part. Built by [`AppState::builder`] (a whole node: [`crate::app::App::build`]) and never
/// changed afterwards.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
#[derive(Clone, Debug)]
pub struct Shared {
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
    /// Whether strings that are not Keyward keys must be looked up as legacy keys.
    pub legacy: LegacyKeys,
    /// The expiry sweeper's schedule and the `key.expiring` threshold.
    pub lifecycle: LifecycleSettings,
    /// Webhook delivery settings (private targets, timeout, retries).
    pub webhooks: WebhookSettings,
    /// Rung after a change wrote outbox events, so the webhook worker looks at once.
    pub events: Arc<tokio::sync::Notify>,
    /// Key lookups by hash, through the verify cache; the invalidator every store write applies its
    /// changes to (`Changed::apply`). Its breaker is the store's health for `/readyz`.
    pub keys: CachedLookup,
    /// What each path of the protected API needs (`[[gateway.routes]]`): the route table of the
    /// gateway and the proxy hooks.
    pub routes: Routes,
    /// `[authz]`: the proxy hooks' style and the signed identity.
    pub authz: Arc<AuthzSettings>,
    /// `authz.key_headers` as header names: where every decision reads the key.
    pub key_headers: Arc<[HeaderName]>,
    /// `[console]` and this node's console sessions.
    pub console: crate::console::sessions::Console,
}

impl AppState {
    /// A state over these parts; every other part has its default (SHA-256 hashes, the default plans
    /// and protection, limits in memory without a quota seed, key lookups through a cache of default
    /// size) until the builder is told otherwise.
    pub fn builder(store: Arc<dyn Store>, clock: Arc<dyn Clock>, usage: UsageRecorder) -> StateBuilder {
        let keys = CachedLookup::new(store.clone(), KeyCache::new(CacheConfig::default()), clock.clone());
        let clock_for_console = clock.clone();
        StateBuilder(Shared {
            store,
            clock,
            hasher: KeyHasher::default(),
            usage,
            plans: Arc::new(Plans::defaults()),
            limiter: Arc::new(MemoryLimiter::default()),
            protection: Protection::default(),
            trusted_proxies: Arc::new([]),
            legacy: LegacyKeys::default(),
            lifecycle: LifecycleSettings::default(),
            webhooks: WebhookSettings::default(),
            events: Arc::new(tokio::sync::Notify::new()),
            keys,
            routes: Routes::default(),
            key_headers: key_headers(&AuthzSettings::default()),
            authz: Arc::new(AuthzSettings::default()),
            console: crate::console::sessions::Console::new(Default::default(), clock_for_console),
        })
    }

    /// A builder holding this state's parts, for a state that differs in some of them (a test that
    /// changes a setting mid-way). The two share the legacy-key flag and the webhook worker's signal.
    pub fn to_builder(&self) -> StateBuilder {
        StateBuilder(Shared::clone(&self.0))
    }

    /// Wakes the webhook worker: events are waiting in the outbox.
    pub fn events_written(&self) {
        self.events.notify_one();
    }
}

/// Builds an [`AppState`]; see [`AppState::builder`].
#[derive(Debug)]
#[must_use]
pub struct StateBuilder(Shared);

/// A setter on [`StateBuilder`] for each part that is taken as given.
macro_rules! setters {
    ($($(#[$doc:meta])* $part:ident: $ty:ty,)*) => {
        impl StateBuilder {
            $(
                $(#[$doc])*
                pub fn $part(mut self, $part: $ty) -> Self {
                    self.0.$part = $part;
                    self
                }
            )*
        }
    };
}

setters! {
    /// How presented keys are hashed: with the server's pepper, when it has one.
    hasher: KeyHasher,
    usage: UsageRecorder,
    limiter: Arc<dyn Limiter>,
    protection: Protection,
    lifecycle: LifecycleSettings,
    webhooks: WebhookSettings,
    /// The verify cache in front of the store's key lookups (configured, and on the bus with many
    /// nodes).
    keys: CachedLookup,
    /// The route table of the protected API (default: every path needs a valid key).
    routes: Routes,
}

impl StateBuilder {
    pub fn plans(mut self, plans: Plans) -> Self {
        self.0.plans = Arc::new(plans);
        self
    }

    pub fn trusted_proxies(mut self, proxies: impl Into<Arc<[ipnet::IpNet]>>) -> Self {
        self.0.trusted_proxies = proxies.into();
        self
    }

    /// `[authz]`. A key header name that is not valid is left out ([`crate::app::App::build`] refuses
    /// it first).
    pub fn authz(mut self, authz: AuthzSettings) -> Self {
        self.0.key_headers = key_headers(&authz);
        self.0.authz = Arc::new(authz);
        self
    }

    /// `[console]`: its sessions run on the state's clock.
    pub fn console(mut self, console: crate::settings::ConsoleSettings) -> Self {
        self.0.console = crate::console::sessions::Console::new(console, self.0.clock.clone());
        self
    }

    pub fn build(self) -> AppState {
        AppState(Arc::new(self.0))
    }
}

fn key_headers(authz: &AuthzSettings) -> Arc<[HeaderName]> {
    authz.key_headers.iter().filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok()).collect()
}

/// How often a server that has not seen a legacy key yet asks the store again, so that an import made
/// by the CLI or by another node is noticed.
pub const LEGACY_REFRESH: Duration = Duration::from_secs(10);

/// Whether any organization has imported legacy keys (keys not in Keyward's format, or known only by
/// their SHA-256): one in-memory flag, so that deciding costs nothing on the verify path.
///
/// While it is off, a presented string that is not a Keyward key answers `MALFORMED` without any store
/// query, exactly as before imports existed: random garbage cannot make a server hit its database. Once
/// on, such a string costs one indexed lookup by hash, like an unknown well-formed key. The flag is read
/// from the store at start ([`LegacyKeys::refresh`]), switched on at once by an import through this
/// process, and, while off, read again every [`LEGACY_REFRESH`] by [`LegacyKeys::spawn_refresher`] for
/// imports made elsewhere. It never goes back off: keys are never deleted, and a revoked legacy key must
/// keep answering `REVOKED`.
#[derive(Clone, Debug, Default)]
pub struct LegacyKeys(Arc<AtomicBool>);

impl LegacyKeys {
    pub fn enabled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Called after a legacy key was imported.
    pub fn enable(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Asks the store, unless already on; returns the flag.
    pub async fn refresh(&self, store: &dyn Store) -> StoreResult<bool> {
        if !self.enabled() && store.has_legacy_keys().await? {
            self.enable();
        }
        Ok(self.enabled())
    }

    /// Refreshes every `every` until the flag is on, off the request path.
    pub fn spawn_refresher(&self, store: Arc<dyn Store>, every: Duration) -> tokio::task::JoinHandle<()> {
        let flag = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !flag.enabled() {
                tick.tick().await;
                match flag.refresh(&*store).await {
                    Ok(true) => tracing::info!("legacy keys exist: keys not in Keyward's format are now looked up"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "checking for legacy keys failed; will retry"),
                }
            }
        })
    }
}
