//! One node's wiring: [`App::build`] turns [`Settings`] into the [`AppState`] every handler shares
//! and the [`Tasks`] that keep it true. `keyward serve`, the CLI, the HTTP tests and the tower layer's
//! `InProcess` all build through it, so what they run is what a server runs: the verify cache in front
//! of the store (with Redis, kept in step with other nodes), the limiter with monthly quotas seeded
//! from the store, the usage writer, and the scheduled jobs.

use std::sync::Arc;
use std::time::Duration;

use keyward_core::{Clock, KeyHasher, SystemClock};
use keyward_limit::{Limiter, MemoryLimiter, QuotaSeed, RedisConfig, RedisLimiter};
use keyward_store::{Store, StoreError};
use secrecy::ExposeSecret;
use tokio::task::JoinHandle;

use crate::cache::{CachedLookup, KeyCache, RedisBus};
use crate::rules::Routes;
use crate::settings::{Settings, redact_url};
use crate::state::{AppState, LEGACY_REFRESH};
use crate::usage::{StoreQuotaSeed, UsageRecorder, UsageWorker};

/// How long [`Tasks::shutdown`] waits for Redis to take the cache invalidations still owed to it.
const FLUSH_INVALIDATIONS_WITHIN: Duration = Duration::from_secs(5);

/// How often raw usage events past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// A node: the state handlers share, and what runs beside it.
#[derive(Debug)]
pub struct App {
    pub state: AppState,
    pub tasks: Tasks,
}

/// What runs beside a node's state: the usage writer, the cache's invalidation subscriber (with
/// Redis) and, unless left off, the scheduled jobs. Dropping it leaves them running until the runtime
/// stops; [`Tasks::shutdown`] stops them and writes the pending usage.
#[derive(Debug)]
pub struct Tasks {
    usage: UsageWorker,
    running: Vec<JoinHandle<()>>,
    /// The bus this node publishes its changes on (with Redis).
    bus: Option<RedisBus>,
}

impl Tasks {
    /// Stops the subscriber and the jobs, waits (a bounded time) until Redis has taken every cache
    /// invalidation this node published, then writes every pending usage event (see
    /// [`UsageWorker::shutdown`]).
    ///
    /// SECURITY: the publisher task dies with the process: without the wait, a change the CLI made
    /// (`keyward keys revoke`) could leave the other nodes answering from their caches until the TTL.
    pub async fn shutdown(self) {
        for task in &self.running {
            task.abort();
        }
        if let Some(bus) = &self.bus
            && !bus.flush(FLUSH_INVALIDATIONS_WITHIN).await
        {
            tracing::error!(
                "Redis did not take every cache invalidation in time: other nodes learn of them only when their cache entries expire"
            );
        }
        self.usage.shutdown().await;
    }
}

/// Why a node could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// SECURITY: the URL is shown redacted; it may carry a password.
    #[error("cannot open the database at {url}")]
    Database {
        url: String,
        #[source]
        source: StoreError,
    },
    #[error("invalid pepper")]
    Pepper(#[from] keyward_core::hash::PepperError),
    #[error("invalid redis_url")]
    Redis(#[source] keyward_limit::LimitError),
    #[error("cannot read the store at start")]
    Store(#[source] StoreError),
    /// An `[authz]` setting that cannot work (a key header name, a short identity secret).
    #[error("invalid [authz] setting: {0}")]
    Authz(String),
}

impl App {
    /// A node as `keyward serve` runs it: the database of `settings` opened and migrated, the system
    /// clock, every scheduled job started.
    pub async fn build(settings: Settings) -> Result<App, BuildError> {
        Self::builder(settings).build().await
    }

    /// [`App::build`] with parts of its own: an open store, a clock, no scheduled jobs.
    pub fn builder(settings: Settings) -> AppBuilder {
        AppBuilder { settings, store: None, clock: Arc::new(SystemClock), jobs: true, routes: Routes::default() }
    }
}

/// Builds an [`App`]; see [`App::builder`].
#[must_use]
pub struct AppBuilder {
    settings: Settings,
    store: Option<Arc<dyn Store>>,
    clock: Arc<dyn Clock>,
    jobs: bool,
    routes: Routes,
}

impl AppBuilder {
    /// This store instead of opening `settings.database_url` (a test's own database, or a store
    /// wrapped to count its calls). The verify cache still goes in front of it.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Leaves the scheduled jobs off (expiry sweeper, webhook deliveries, usage pruning, legacy-key
    /// refresh): the caller runs each when it chooses, at its clock's time (the tests; the CLI, which
    /// runs one command and exits).
    /// The route table of the protected API (`[[gateway.routes]]`), for the gateway and the proxy
    /// hooks; by default every path needs a valid key.
    pub fn routes(mut self, routes: Routes) -> Self {
        self.routes = routes;
        self
    }

    pub fn without_jobs(mut self) -> Self {
        self.jobs = false;
        self
    }

    pub async fn build(self) -> Result<App, BuildError> {
        let Self { settings, store, clock, jobs, routes } = self;
        let store = match store {
            Some(store) => store,
            None => keyward_store::open(&settings.database_url, true)
                .await
                .map_err(|source| BuildError::Database { url: redact_url(&settings.database_url), source })?,
        };
        settings.authz.key_header_names().map_err(BuildError::Authz)?;
        if let Some(secret) = &settings.authz.identity_secret
            && secret.expose_secret().len() < crate::settings::MIN_IDENTITY_SECRET_LEN
        {
            return Err(BuildError::Authz(format!(
                "authz.identity_secret must be at least {} bytes",
                crate::settings::MIN_IDENTITY_SECRET_LEN
            )));
        }
        let hasher = KeyHasher::new(settings.pepper.as_ref().map(|p| p.expose_secret().as_bytes()))?;
        let cache = KeyCache::new(settings.cache);
        let mut keys = CachedLookup::new(store.clone(), cache.clone(), clock.clone());
        let mut running = Vec::new();
        let mut published_on = None;
        if let Some(url) = &settings.redis_url {
            // Changes reach every node's cache through Redis; without it, within the cache TTL.
            match RedisBus::connect(url.expose_secret(), &settings.redis_channel).await {
                Ok(bus) => {
                    running.push(bus.subscribe(cache));
                    keys = keys.with_bus(Arc::new(bus.clone()));
                    published_on = Some(bus);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Redis unreachable: other nodes learn of changes only when their cache entries expire")
                }
            }
        }
        let (usage, writer) = UsageRecorder::spawn_with(store.clone(), settings.usage.clone());
        // Monthly quotas survive restarts: a subject's month is seeded from the durable counters, which
        // the usage writer keeps current.
        let seed: Arc<dyn QuotaSeed> = Arc::new(StoreQuotaSeed::new(store.clone()));
        let limiter: Arc<dyn Limiter> = match &settings.redis_url {
            Some(url) => {
                let redis = RedisConfig::new(url.expose_secret()).with_policy(settings.limiter_failure_policy);
                Arc::new(RedisLimiter::new(redis).map_err(BuildError::Redis)?.with_quota_seed(seed))
            }
            None => Arc::new(MemoryLimiter::default().with_quota_seed(seed)),
        };
        let state = AppState::builder(store, clock, usage)
            .hasher(hasher)
            .limiter(limiter)
            .plans(settings.plans)
            .protection(settings.protection)
            .trusted_proxies(settings.trusted_proxies)
            .lifecycle(settings.lifecycle)
            .webhooks(settings.webhooks)
            .keys(keys)
            .routes(routes)
            .authz(settings.authz)
            .console(settings.console)
            .build();
        // Whether legacy (imported) keys exist decides whether non-Keyward strings are looked up at all.
        state.legacy.refresh(&*state.store).await.map_err(BuildError::Store)?;
        if jobs {
            running.extend(start_jobs(&state, settings.usage_retention));
        }
        Ok(App { state, tasks: Tasks { usage: writer, running, bus: published_on } })
    }
}

/// The jobs a node runs on a schedule beside its listeners.
fn start_jobs(state: &AppState, usage_retention: chrono::Duration) -> Vec<JoinHandle<()>> {
    let mut jobs = vec![
        crate::usage::spawn_pruner(state.store.clone(), state.clock.clone(), usage_retention, PRUNE_EVERY),
        // Imports made by the CLI or another node while this one runs are noticed within LEGACY_REFRESH.
        state.legacy.spawn_refresher(state.store.clone(), LEGACY_REFRESH),
        // Outbox events become signed webhook deliveries.
        crate::webhooks::spawn_worker(state.clone()),
    ];
    // Expired keys are deactivated and `key.expiring` notices written (unless the sweeper is off).
    jobs.extend(crate::lifecycle::spawn_sweeper(state.clone()));
    jobs
}
