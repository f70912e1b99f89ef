//! The verify cache: key hash → key record (with what verification needs of its organization), in
//! front of the store, so a warm verification touches no database and takes no lock that all
//! requests share (`quick_cache` is sharded).
//!
//! [`CachedLookup`] wraps a [`KeyLookup`], the one thing the verify path asks of storage, and nothing
//! wider. Every store write that can change what verification answers returns its result as a
//! [`keyward_store::Changed`], whose value comes out only by handing its invalidations to an
//! [`Invalidator`]: the node's `CachedLookup`, which drops them at once and publishes them to every
//! other node through the [`InvalidationBus`] (Redis pub/sub) within milliseconds. Unknown hashes are
//! cached briefly too (negative entries, bounded separately, so a flood of random keys cannot evict
//! real ones). A bounded TTL is the safety net for changes made around Keyward (by hand in the
//! database). After a lost subscription a node drops its whole cache: it cannot know what it missed.
//! While the store is unreachable an entry is served stale up to `stale_ceiling`; a miss then answers
//! `store_unavailable`, never "not found".

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::{Clock, KeyHash, OrgId, ScopeSet};
use keyward_store::{Invalidator, KeyLookup, KeyRecord, OrgRecord, StoreError, StoreResult};
use quick_cache::sync::Cache;

use crate::settings::CacheConfig;

/// The cache's key: the first 128 bits of the key's hash. The record was read from the store under
/// the whole hash (compared there in constant time); another key whose SHA-256 starts with the same 128
/// bits takes about 2^128 attempts to find. Half the bytes of a full hash, per cached key.
type Slot = u128;

fn slot(hash: &KeyHash) -> Slot {
    let mut first = [0; 16];
    first.copy_from_slice(&hash.0[..16]);
    u128::from_le_bytes(first)
}

pub use keyward_store::Invalidation;

/// The node's cache of keys by hash.
#[derive(Clone)]
pub struct KeyCache {
    positive: Arc<Cache<Slot, Arc<KeyRecord>>>,
    negative: Arc<Cache<Slot, DateTime<Utc>>>,
    /// The parts many keys have in common, held once (taken only on a miss).
    shared: Arc<Mutex<Shared>>,
    /// Bumped by every invalidation, which holds this lock while it removes entries: a miss keeps what
    /// it read only if no invalidation began since its lookup did, checked and inserted under the same
    /// lock (see [`Miss`]). Hits never take it.
    generation: Arc<Mutex<u64>>,
    /// The generation as [`KeyCache::apply`] last left it, readable without the lock (see
    /// [`CachedLookup::unchanged_since`]).
    epoch: Arc<AtomicU64>,
    /// Tells this cache apart from any other in the process (tests run many nodes on the same threads).
    id: u64,
    config: CacheConfig,
}

/// The next [`KeyCache`]'s id.
static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(0);

/// Organization parts and scope sets shared between cached keys: a million keys of a few
/// organizations with a few scope sets hold a few copies, not a million.
#[derive(Default)]
struct Shared {
    orgs: HashMap<OrgId, Arc<OrgRecord>>,
    scopes: HashSet<Arc<ScopeSet>>,
}

/// How many organization parts and scope sets are held for sharing. At the bound, the ones no cached key
/// uses any more are let go; if all are in use, a new one is simply not shared (its key keeps its own).
const MAX_SHARED: usize = 10_000;

impl Shared {
    /// Makes room for one more of each, letting go of parts only the table itself still holds.
    fn make_room(&mut self) {
        if self.orgs.len() >= MAX_SHARED {
            self.orgs.retain(|_, org| Arc::strong_count(org) > 1);
        }
        if self.scopes.len() >= MAX_SHARED {
            self.scopes.retain(|scopes| Arc::strong_count(scopes) > 1);
        }
    }
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache").field("keys", &self.positive.len()).field("config", &self.config).finish()
    }
}

impl KeyCache {
    pub fn new(config: CacheConfig) -> Self {
        Self {
            positive: Arc::new(Cache::new(config.capacity.max(1))),
            negative: Arc::new(Cache::new(config.negative_capacity.max(1))),
            shared: Arc::default(),
            generation: Arc::default(),
            epoch: Arc::default(),
            id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed),
            config,
        }
    }

    /// `record`, read at `now`, with its organization part and scope set replaced by equal ones already
    /// held.
    fn shared(&self, mut record: Arc<KeyRecord>, now: DateTime<Utc>) -> Arc<KeyRecord> {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.make_room();
        let org = match shared.orgs.get(&record.organization_id) {
            Some(org) if **org == *record.org => Some(org.clone()),
            _ if shared.orgs.len() < MAX_SHARED || shared.orgs.contains_key(&record.organization_id) => {
                shared.orgs.insert(record.organization_id, record.org.clone());
                None
            }
            _ => None,
        };
        let scopes = match shared.scopes.get(&record.scopes) {
            Some(scopes) => Some(scopes.clone()),
            None if shared.scopes.len() < MAX_SHARED => {
                shared.scopes.insert(record.scopes.clone());
                None
            }
            None => None,
        };
        drop(shared);
        // A record straight from the store is not shared yet: no copy is made.
        let r = Arc::make_mut(&mut record);
        r.fetched_at = now;
        if let Some(org) = org {
            r.org = org;
        }
        if let Some(scopes) = scopes {
            r.scopes = scopes;
        }
        record
    }

    pub fn apply(&self, change: &Invalidation) {
        // SECURITY: bumped before the entries go, and held until they are gone: a lookup that read the
        // store before this change can neither put what it read back afterwards nor in between.
        let mut generation = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        *generation = generation.wrapping_add(1);
        self.epoch.store(*generation, Ordering::Release);
        match change {
            Invalidation::Key(hash) => {
                self.positive.remove(&slot(hash));
                self.negative.remove(&slot(hash));
            }
            Invalidation::Organization(org) => {
                self.positive.retain(|_, record| record.organization_id != *org);
                self.shared.lock().unwrap_or_else(|p| p.into_inner()).orgs.remove(org);
            }
            Invalidation::All => {
                self.positive.clear();
                self.negative.clear();
                *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = Shared::default();
            }
        }
        drop(generation);
        metrics::counter!("keyward_cache_invalidations_total").increment(1);
    }

    /// Starts a lookup that missed: what it reads may be kept only through the returned [`Miss`].
    fn miss(&self, slot: Slot) -> Miss<'_> {
        Miss { cache: self, slot, generation: *self.generation.lock().unwrap_or_else(|p| p.into_inner()) }
    }

    /// Which cache this is, unique in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How many invalidations have begun so far.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.positive.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positive.is_empty()
    }
}

/// A lookup that missed the cache and reads the store.
struct Miss<'a> {
    cache: &'a KeyCache,
    slot: Slot,
    generation: u64,
}

impl Miss<'_> {
    /// Runs `insert` only if no invalidation began since the miss did; the check and the insert hold
    /// the lock [`KeyCache::apply`] holds, so none can fall between them. Whether it ran.
    fn keep(self, insert: impl FnOnce(&KeyCache, Slot)) -> bool {
        let generation = self.cache.generation.lock().unwrap_or_else(|p| p.into_inner());
        let current = *generation == self.generation;
        if current {
            insert(self.cache, self.slot);
        }
        current
    }

    fn keep_found(self, record: Arc<KeyRecord>) -> bool {
        self.keep(|cache, slot| cache.positive.insert(slot, record))
    }

    fn keep_unknown(self, at: DateTime<Utc>) -> bool {
        self.keep(|cache, slot| cache.negative.insert(slot, at))
    }
}

fn age_ms(now: DateTime<Utc>, then: DateTime<Utc>) -> u64 {
    u64::try_from((now - then).num_milliseconds()).unwrap_or(0)
}

/// Publishes changes to the other nodes. Never waits: a change is handed over, and the bus makes sure
/// it goes out.
pub trait InvalidationBus: Send + Sync + std::fmt::Debug {
    fn publish(&self, change: &Invalidation);
}

/// A [`KeyLookup`] with the node's verify cache in front of it, and the [`Invalidator`] every store
/// write hands what it changed to (see [`keyward_store::Changed`]): the change is dropped here at once
/// and published to the other nodes.
#[derive(Debug, Clone)]
pub struct CachedLookup {
    inner: Arc<dyn KeyLookup>,
    cache: KeyCache,
    clock: Arc<dyn Clock>,
    bus: Option<Arc<dyn InvalidationBus>>,
    breaker: Arc<StoreBreaker>,
}

/// The verify path's view of the store's health (a circuit breaker). A lookup that finds the store
/// unreachable opens it; while it is open, lookups that miss the cache do not wait on the store (a
/// cached entry answers, up to the stale ceiling; anything else is `Unavailable` at once), and a
/// background probe pings the store every [`PROBE_EVERY`] until it answers, which closes it. So an
/// outage costs one pool timeout, not one per verification.
#[derive(Debug, Default)]
pub struct StoreBreaker {
    /// Since when the store has been unreachable; `None`: the breaker is closed.
    down_since: Mutex<Option<std::time::Instant>>,
}

/// How often an open breaker pings the store.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

impl StoreBreaker {
    fn since(&self) -> std::sync::MutexGuard<'_, Option<std::time::Instant>> {
        self.down_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_open(&self) -> bool {
        self.since().is_some()
    }

    /// How long the store has been unreachable, while it is.
    pub fn down_for(&self) -> Option<Duration> {
        self.since().map(|at| at.elapsed())
    }

    /// Opens the breaker; `true` for the caller that opened it (it starts the probe).
    fn trip(&self) -> bool {
        let mut since = self.since();
        if since.is_some() {
            return false;
        }
        *since = Some(std::time::Instant::now());
        metrics::gauge!("keyward_store_degraded").set(1.0);
        true
    }

    fn close(&self) {
        let Some(since) = self.since().take() else { return };
        metrics::gauge!("keyward_store_degraded").set(0.0);
        let seconds = since.elapsed().as_secs_f64();
        metrics::counter!("keyward_store_degraded_seconds_total").increment(seconds.ceil() as u64);
        tracing::info!(down_for_s = seconds, "the store answers again: lookups reach it again");
    }
}

impl CachedLookup {
    pub fn new(inner: Arc<dyn KeyLookup>, cache: KeyCache, clock: Arc<dyn Clock>) -> Self {
        Self { inner, cache, clock, bus: None, breaker: Arc::default() }
    }

    pub fn with_bus(mut self, bus: Arc<dyn InvalidationBus>) -> Self {
        self.bus = Some(bus);
        self
    }

    pub fn cache(&self) -> &KeyCache {
        &self.cache
    }

    /// Whether `record`, found when the cache was at `epoch` ([`KeyCache::epoch`], read before the
    /// lookup), is still what a lookup would answer: no invalidation has begun since, and the entry is
    /// within its TTL. A caller that remembers a record (the API caller's own key, per worker thread)
    /// sees a revocation exactly when the cache does.
    pub fn unchanged_since(&self, record: &KeyRecord, epoch: u64) -> bool {
        self.cache.epoch() == epoch && age_ms(self.clock.now(), record.fetched_at) < self.cache.config.ttl_ms
    }

    /// The store's health as the verify path sees it.
    pub fn breaker(&self) -> &StoreBreaker {
        &self.breaker
    }

    /// The key stored under `hash`: from the cache while its entry is fresh (or, while the store is
    /// unreachable, up to the stale ceiling), else from the store. The verify path calls this directly,
    /// not through [`KeyLookup`], so a hit boxes no future: it allocates nothing and takes no lock that
    /// all requests share.
    pub async fn find(&self, hash: &KeyHash) -> StoreResult<Option<Arc<KeyRecord>>> {
        let now = self.clock.now();
        let cfg = self.cache.config;
        let slot = slot(hash);
        let cached = self.cache.positive.get(&slot);
        if let Some(record) = &cached
            && age_ms(now, record.fetched_at) < cfg.ttl_ms
        {
            crate::telemetry::cache_hit();
            return Ok(cached);
        }
        if cached.is_none()
            && let Some(at) = self.cache.negative.get(&slot)
            && age_ms(now, at) < cfg.negative_ttl_ms
        {
            metrics::counter!("keyward_cache_lookups_total", "result" => "negative_hit").increment(1);
            return Ok(None);
        }
        if self.breaker.is_open() {
            return self.stale_or_unavailable(cached, now, "the store is unreachable".to_owned());
        }
        metrics::counter!("keyward_cache_lookups_total", "result" => "miss").increment(1);
        let miss = self.cache.miss(slot);
        // A pool waiting for a connection to a dead server takes its whole acquire timeout (5 s) to
        // say so; the verify path gives up sooner and lets the breaker take over.
        let within = Duration::from_millis(cfg.lookup_timeout_ms.max(1));
        let found = match tokio::time::timeout(within, self.inner.find_key_record(hash)).await {
            Ok(found) => found,
            Err(_) => Err(StoreError::Unavailable(format!("no answer within {} ms", cfg.lookup_timeout_ms))),
        };
        // SECURITY: a change invalidated entries while the store was read (a revocation, here or on
        // another node): what was read may predate it, so it answers this request but is not kept.
        match found {
            Ok(Some(record)) => {
                let record = self.cache.shared(record, now);
                miss.keep_found(record.clone());
                Ok(Some(record))
            }
            Ok(None) => {
                self.cache.positive.remove(&slot);
                miss.keep_unknown(now);
                Ok(None)
            }
            Err(StoreError::Unavailable(cause)) => {
                self.store_unreachable(&cause);
                self.stale_or_unavailable(cached, now, cause)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens the breaker after a lookup found the store unreachable; the first to open it starts the
    /// probe that closes it.
    fn store_unreachable(&self, cause: &str) {
        if !self.breaker.trip() {
            return;
        }
        tracing::warn!(%cause, "the store is unreachable: verifications answer from the cache until it is back");
        let (inner, breaker) = (self.inner.clone(), self.breaker.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), inner.ping()).await {
                    breaker.close();
                    return;
                }
            }
        });
    }

    /// While the store is unreachable: the cached entry up to the stale ceiling, else `Unavailable`.
    fn stale_or_unavailable(
        &self,
        cached: Option<Arc<KeyRecord>>,
        now: DateTime<Utc>,
        cause: String,
    ) -> StoreResult<Option<Arc<KeyRecord>>> {
        match cached {
            // SECURITY: stale only while the store is down, and only up to the ceiling.
            Some(record) if age_ms(now, record.fetched_at) < self.cache.config.stale_ceiling_ms => {
                metrics::counter!("keyward_cache_lookups_total", "result" => "stale").increment(1);
                Ok(Some(record))
            }
            _ => Err(StoreError::Unavailable(cause)),
        }
    }
}

#[async_trait]
impl KeyLookup for CachedLookup {
    async fn find_key_record(&self, hash: &KeyHash) -> StoreResult<Option<Arc<KeyRecord>>> {
        self.find(hash).await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
}

impl Invalidator for CachedLookup {
    fn invalidate(&self, change: &Invalidation) {
        self.cache.apply(change);
        if let Some(bus) = &self.bus {
            bus.publish(change);
        }
    }
}

/// Redis pub/sub between nodes.
///
/// SECURITY: an invalidation is never lost. Publishing hands the change to this node's publisher
/// task, which retries it with backoff until Redis takes it (a restarted Redis fails the first command
/// on the old connection: that one is retried, not dropped). Should changes pile up past
/// [`OUTBOX`] during an outage, the publisher sends `*` (every node drops its whole cache) before the
/// rest. On the receiving side, a node whose subscription was lost drops its whole cache, since it
/// cannot know what it missed.
#[derive(Clone)]
pub struct RedisBus {
    client: redis::Client,
    outbox: tokio::sync::mpsc::Sender<Invalidation>,
    backlog: Arc<Backlog>,
    channel: Arc<str>,
}

/// What the publisher task still owes Redis.
#[derive(Default)]
struct Backlog {
    /// Set when a change did not fit in the outbox: the next publish is `*`.
    overflowed: std::sync::atomic::AtomicBool,
    /// Changes handed over and not yet taken by Redis.
    unpublished: std::sync::atomic::AtomicUsize,
    /// Signalled each time Redis takes one.
    published: tokio::sync::Notify,
}

/// Changes waiting to be published, at most.
pub const OUTBOX: usize = 10_000;

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus").field("channel", &self.channel).finish_non_exhaustive()
    }
}

pub use crate::settings::DEFAULT_CHANNEL;

impl RedisBus {
    pub async fn connect(url: &str, channel: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let publisher = redis::aio::ConnectionManager::new(client.clone()).await?;
        let (outbox, pending) = tokio::sync::mpsc::channel(OUTBOX);
        let backlog = Arc::new(Backlog::default());
        let channel: Arc<str> = channel.into();
        tokio::spawn(publish_until_taken(publisher, channel.clone(), pending, backlog.clone()));
        Ok(Self { client, outbox, backlog, channel })
    }

    /// Waits until Redis has taken every change handed over so far, at most `within`; whether it has.
    /// A process that exits after a write (the CLI) waits here first: its publisher task ends with it,
    /// and a change still queued or being retried would never reach the other nodes.
    pub async fn flush(&self, within: Duration) -> bool {
        let drained = async {
            loop {
                // Registered before the check, so a change published in between still wakes it.
                let published = self.backlog.published.notified();
                if self.backlog.unpublished.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    return;
                }
                published.await;
            }
        };
        tokio::time::timeout(within, drained).await.is_ok()
    }

    /// Applies every change other nodes publish to `cache`, until the task is aborted. A lost
    /// subscription empties the cache (what was missed cannot be known) and is retried with backoff.
    pub fn subscribe(&self, cache: KeyCache) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        let channel = self.channel.to_string();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                        Ok(()) => {
                            backoff = Duration::from_millis(100);
                            // Anything could have changed while unsubscribed.
                            cache.apply(&Invalidation::All);
                            tracing::info!(%channel, "cache invalidation subscribed");
                            let mut messages = pubsub.on_message();
                            while let Some(message) = futures_next(&mut messages).await {
                                let payload: String = message.get_payload().unwrap_or_default();
                                if let Some(change) = Invalidation::decode(&payload) {
                                    cache.apply(&change);
                                }
                            }
                            tracing::warn!("cache invalidation subscription lost; dropping the cache");
                            cache.apply(&Invalidation::All);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot subscribe to cache invalidations"),
                    },
                    Err(e) => tracing::warn!(error = %e, "cannot reach Redis for cache invalidations"),
                }
                cache.apply(&Invalidation::All);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }
}

async fn futures_next<S: futures_util::Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    futures_util::StreamExt::next(s).await
}

impl InvalidationBus for RedisBus {
    fn publish(&self, change: &Invalidation) {
        // Counted before it is handed over: the publisher may take it before `try_send` returns.
        self.backlog.unpublished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let sent = self.outbox.try_send(change.clone());
        if sent.is_err() {
            self.backlog.unpublished.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        match sent {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                self.backlog.overflowed.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("the cache invalidation publisher stopped; other nodes rely on their TTL");
            }
        }
    }
}

/// The publisher task of a [`RedisBus`]: each change, in order, until Redis takes it.
async fn publish_until_taken(
    mut conn: redis::aio::ConnectionManager,
    channel: Arc<str>,
    mut pending: tokio::sync::mpsc::Receiver<Invalidation>,
    backlog: Arc<Backlog>,
) {
    while let Some(change) = pending.recv().await {
        let mut backoff = Duration::from_millis(50);
        let mut failures = 0u32;
        loop {
            // Changes were dropped for want of room: every node drops everything first.
            let sending = if backlog.overflowed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                Invalidation::All
            } else {
                change.clone()
            };
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(&*channel).arg(sending.encode());
            let outcome = tokio::time::timeout(Duration::from_millis(500), cmd.query_async::<i64>(&mut conn)).await;
            match outcome {
                Ok(Ok(_)) if sending == Invalidation::All && change != Invalidation::All => continue,
                Ok(Ok(_)) => {
                    if failures > 0 {
                        tracing::info!(failures, "a cache invalidation was published after retries");
                    }
                    break;
                }
                Ok(Err(e)) => {
                    if failures == 0 {
                        tracing::warn!(error = %e, "publishing a cache invalidation failed; retrying until Redis takes it");
                    }
                }
                Err(_) => {
                    if failures == 0 {
                        tracing::warn!("publishing a cache invalidation timed out; retrying until Redis takes it");
                    }
                }
            }
            failures = failures.saturating_add(1);
            metrics::counter!("keyward_cache_invalidation_retries_total").increment(1);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        backlog.unpublished.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        backlog.published.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use keyward_core::KeyId;

    use super::*;

    fn record(org: OrgId, plan: &str, scopes: &[&str]) -> Arc<KeyRecord> {
        Arc::new(KeyRecord {
            id: KeyId::new(),
            organization_id: org,
            lineage: KeyId::new(),
            hash_algorithm: keyward_core::HashAlgorithm::Sha256,
            environment: keyward_core::Environment::Live,
            state: keyward_core::KeyState { is_active: true, revoked_at: None, expires_at: None },
            own_quota: false,
            fetched_at: DateTime::UNIX_EPOCH,
            owner_id: None,
            scopes: Arc::new(ScopeSet::parse(scopes).unwrap_or_else(|e| panic!("{e}"))),
            org: Arc::new(OrgRecord { is_active: true, plan: plan.into(), limits: keyward_core::LimitOverrides::NONE }),
            extras: None,
        })
    }

    #[test]
    fn a_miss_keeps_nothing_once_an_invalidation_began() {
        let cache = KeyCache::new(CacheConfig::default());
        let hash = KeyHash([9; 32]);
        let rec = record(OrgId::new(), "free", &[]);
        for change in [Invalidation::Key(hash), Invalidation::Organization(rec.organization_id), Invalidation::All] {
            let miss = cache.miss(slot(&hash));
            cache.apply(&change);
            assert!(!miss.keep_found(rec.clone()), "{change:?}");
            assert!(cache.positive.get(&slot(&hash)).is_none(), "{change:?}");
            let miss = cache.miss(slot(&hash));
            cache.apply(&change);
            assert!(!miss.keep_unknown(Utc::now()), "{change:?}");
            assert!(cache.negative.get(&slot(&hash)).is_none(), "{change:?}");
        }
        // Without one in between, it keeps.
        assert!(cache.miss(slot(&hash)).keep_found(rec));
        assert!(cache.positive.get(&slot(&hash)).is_some());
    }

    /// A revocation racing a miss from another thread, many times over: once both are done, the entry
    /// is never there (the miss began before the revocation, so what it read may predate it). Before
    /// the check and the insert were one step under the invalidation's lock, a revocation could fall
    /// between them and leave the stale entry for a TTL.
    #[test]
    fn a_revocation_racing_a_miss_never_leaves_an_entry() {
        let cache = KeyCache::new(CacheConfig::default());
        let hash = KeyHash([3; 32]);
        let rec = record(OrgId::new(), "free", &[]);
        for round in 0..2_000 {
            let miss = cache.miss(slot(&hash));
            let barrier = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                s.spawn(|| {
                    barrier.wait();
                    miss.keep_found(rec.clone());
                });
                s.spawn(|| {
                    barrier.wait();
                    cache.apply(&Invalidation::Key(hash));
                });
            });
            assert!(cache.positive.get(&slot(&hash)).is_none(), "round {round}: a stale entry stayed");
        }
    }

    #[test]
    fn keys_share_equal_organization_parts_and_scope_sets() {
        let cache = KeyCache::new(CacheConfig::default());
        let org = OrgId::new();
        let a = cache.shared(record(org, "pro", &["read:projects", "write:projects"]), Utc::now());
        let b = cache.shared(record(org, "pro", &["write:projects", "read:projects"]), Utc::now());
        assert!(Arc::ptr_eq(&a.org, &b.org));
        assert!(Arc::ptr_eq(&a.scopes, &b.scopes));
        let other = cache.shared(record(org, "pro", &["read:projects"]), Utc::now());
        assert!(!Arc::ptr_eq(&a.scopes, &other.scopes));
        // The organization changed (read after the change): the new part replaces the old one.
        let changed = cache.shared(record(org, "enterprise", &["read:projects"]), Utc::now());
        assert_eq!(&*changed.org.plan, "enterprise");
        assert!(Arc::ptr_eq(&changed.org, &cache.shared(record(org, "enterprise", &[]), Utc::now()).org));
        cache.apply(&Invalidation::Organization(org));
        assert!(!Arc::ptr_eq(&changed.org, &cache.shared(record(org, "enterprise", &[]), Utc::now()).org));
    }

    #[test]
    fn shared_parts_no_key_uses_are_let_go_at_the_bound() {
        let cache = KeyCache::new(CacheConfig::default());
        let held = cache.shared(record(OrgId::new(), "pro", &["read:kept"]), Utc::now());
        for i in 0..MAX_SHARED {
            // Each record is dropped at once: only the table holds its parts.
            cache.shared(record(OrgId::new(), "pro", &[&format!("read:r{i}")]), Utc::now());
        }
        let fresh = cache.shared(record(OrgId::new(), "pro", &["read:fresh"]), Utc::now());
        let again = cache.shared(record(OrgId::new(), "pro", &["read:fresh"]), Utc::now());
        assert!(Arc::ptr_eq(&fresh.scopes, &again.scopes), "new sets are shared again");
        let shared = cache.shared.lock().unwrap_or_else(|p| p.into_inner());
        assert!(shared.scopes.len() < 10 && shared.orgs.len() < 10, "{} {}", shared.scopes.len(), shared.orgs.len());
        assert!(shared.scopes.contains(&held.scopes), "a set a cached key still uses stays");
    }
}
