//! The in-memory limiter: exact on one node, state lost on restart (quotas are re-seeded).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::limits::{self, QuotaDecision, RateDecision, RateLimits};

use crate::health::{DecidedBy, Health, Op};
use crate::shard::{Expiring, ShardedMap};
use crate::{FailurePolicy, Limiter, QuotaSeed};

/// Sizing of a [`MemoryLimiter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Lock shards (rounded up to a power of two). Default 64.
    pub shards: usize,
    /// Subjects held at most, for rate limits and for quotas each (40 bytes of state each, 50–100 with the map's slack). Above it
    /// the entries closest to expiry are evicted. Default 1,000,000.
    pub max_subjects: usize,
    /// What to do when the [`QuotaSeed`] fails. Default: fail open.
    pub seed_failure: FailurePolicy,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self { shards: 64, max_subjects: 1_000_000, seed_failure: FailurePolicy::FailOpen }
    }
}

/// Rate-limit state of one subject: the GCRA `tat` of each window (see `keyward_core::limits`), in
/// µs since the epoch, 0 for none (24 bytes rather than 48 with `Option`).
#[derive(Debug, Default, Clone, Copy)]
struct RateEntry {
    tats: [i64; 3],
}

impl RateEntry {
    /// Runs `f` on the windows' states as `keyward_core::limits` takes them.
    fn with_tats<R>(&mut self, f: impl FnOnce(&mut [Option<i64>; 3]) -> R) -> R {
        let get = |t: i64| (t != 0).then_some(t);
        let mut tats = [get(self.tats[0]), get(self.tats[1]), get(self.tats[2])];
        let r = f(&mut tats);
        self.tats = [tats[0].unwrap_or(0), tats[1].unwrap_or(0), tats[2].unwrap_or(0)];
        r
    }

    fn decide(&mut self, limits: &RateLimits, now: i64, cost: u64) -> RateDecision {
        self.with_tats(|tats| RateDecision::decide(limits, tats, now, cost))
    }
}

impl Expiring for RateEntry {
    fn expires(&self) -> i64 {
        self.tats.iter().copied().max().unwrap_or(0)
    }
}

/// Quota state of one subject for one month: expires when the month ends.
#[derive(Debug, Default, Clone, Copy)]
struct QuotaEntry {
    month_end: i64,
    used: u64,
}

impl Expiring for QuotaEntry {
    fn expires(&self) -> i64 {
        self.month_end
    }
}

/// Rate limits and quotas in this process's memory. Use it alone on a single node, or for limits
/// that need not be shared (self-protection per IP is per node anyway when each node sees its
/// own clients).
pub struct MemoryLimiter {
    rates: ShardedMap<RateEntry>,
    quotas: ShardedMap<QuotaEntry>,
    seed: Option<Arc<dyn QuotaSeed>>,
    seed_failure: FailurePolicy,
    seed_health: Health,
}

impl fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLimiter").field("seed", &self.seed).field("seed_failure", &self.seed_failure).finish()
    }
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        Self::new(MemoryConfig::default())
    }
}

impl MemoryLimiter {
    pub fn new(config: MemoryConfig) -> Self {
        Self {
            rates: ShardedMap::new(config.shards, config.max_subjects),
            quotas: ShardedMap::new(config.shards, config.max_subjects),
            seed: None,
            seed_failure: config.seed_failure,
            seed_health: Health::new("quota_store"),
        }
    }

    /// Quota counts not yet in memory are read from `seed` (the durable store).
    pub fn with_quota_seed(mut self, seed: Arc<dyn QuotaSeed>) -> Self {
        self.seed = Some(seed);
        self
    }

    /// [`Limiter::check`], synchronously: for callers that are not async (the benchmark, a tower
    /// layer's `poll_ready`). Never blocks on anything but one shard's lock.
    pub fn check_sync(&self, subject: &str, limits: &RateLimits, cost: u64, now: DateTime<Utc>) -> RateDecision {
        if limits.is_unlimited() {
            return RateDecision::UNLIMITED;
        }
        let now = now.timestamp_micros();
        self.rates.update(subject, now, |e| e.decide(limits, now, cost))
    }

    /// Subjects currently held for rate limits (for tests and metrics).
    pub fn rate_subjects(&self) -> usize {
        self.rates.len()
    }

    fn quota_in_memory(
        &self,
        subject: &str,
        limit: Option<u64>,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Option<QuotaDecision> {
        self.quotas.update_live(subject, now.timestamp_micros(), |e| {
            let d = QuotaDecision::decide(e.used, limit, cost, now);
            e.used = d.used;
            d
        })
    }
}

#[async_trait]
impl Limiter for MemoryLimiter {
    async fn check(&self, subject: &str, limits: &RateLimits, cost: u64, now: DateTime<Utc>) -> RateDecision {
        self.check_sync(subject, limits, cost, now)
    }

    async fn refund(&self, subject: &str, limits: &RateLimits, cost: u64, now: DateTime<Utc>) {
        if limits.is_unlimited() {
            return;
        }
        let now = now.timestamp_micros();
        self.rates.update(subject, now, |e| e.with_tats(|tats| RateDecision::refund(limits, tats, now, cost)));
    }

    async fn consume_quota(&self, subject: &str, limit: Option<u64>, cost: u64, now: DateTime<Utc>) -> QuotaDecision {
        if let Some(d) = self.quota_in_memory(subject, limit, cost, now) {
            return d;
        }
        // First use of this month here: ask the durable store, without holding a lock across it.
        let month_start = limits::month_start(now);
        let seeded = match &self.seed {
            None => 0,
            Some(seed) => match seed.used_in_month(subject, month_start).await {
                Ok(used) => {
                    self.seed_health.succeeded();
                    used
                }
                Err(error) => {
                    self.seed_health.failed(Op::Quota, DecidedBy::Policy(self.seed_failure), self.seed_failure, &error);
                    return QuotaDecision::degraded(limit, self.seed_failure.allows(), now);
                }
            },
        };
        let month_end = limits::next_month_start(now).timestamp_micros();
        self.quotas.update(subject, now.timestamp_micros(), |e| {
            // Another request may have seeded it meanwhile: its count is as good and already spent.
            if e.month_end != month_end {
                *e = QuotaEntry { month_end, used: seeded };
            }
            let d = QuotaDecision::decide(e.used, limit, cost, now);
            e.used = d.used;
            d
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LimitError;
    use chrono::Duration;
    use keyward_core::{Plans, Window};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-05-31T23:59:00Z").map(|d| d.with_timezone(&Utc)).unwrap_or_default()
    }

    fn free() -> RateLimits {
        Plans::defaults().get("free").map(|p| p.rate()).unwrap_or_default()
    }

    #[tokio::test]
    async fn free_tier_boundaries_through_the_trait() {
        let l: Arc<dyn Limiter> = Arc::new(MemoryLimiter::default());
        for i in 0..60 {
            assert!(l.hit("key:a", &free(), t0()).await.allowed, "request {}", i + 1);
        }
        let d = l.hit("key:a", &free(), t0()).await;
        assert!(!d.allowed);
        assert_eq!(
            d.tightest().map(|t| (t.window, t.limit, t.remaining, t.reset_secs())),
            Some((Window::Minute, 60, 0, 60))
        );
        assert_eq!(d.retry_after_secs(), Some(1));
        // Subjects are independent.
        assert!(l.hit("key:b", &free(), t0()).await.allowed);
        // The minute frees on time.
        assert!(!l.hit("key:a", &free(), t0() + Duration::microseconds(999_999)).await.allowed);
        assert!(l.hit("key:a", &free(), t0() + Duration::seconds(1)).await.allowed);
        let peek = l.check("key:a", &free(), 0, t0() + Duration::seconds(61)).await;
        assert_eq!(peek.windows[0].map(|w| w.remaining), Some(60));
        // The hour spent 61 and refilled one unit per 3.6 s for 61 s: 16.
        assert_eq!(peek.windows[1].map(|w| w.remaining), Some(1_000 - 61 + 16));
    }

    #[tokio::test]
    async fn idle_subjects_are_evicted_without_changing_decisions() {
        let l = MemoryLimiter::new(MemoryConfig { shards: 1, ..MemoryConfig::default() });
        let limits = RateLimits::per_minute(10);
        for i in 0..1_000 {
            l.check_sync(&format!("ip:{i}"), &limits, 1, t0());
        }
        assert_eq!(l.rate_subjects(), 1_000);
        // A minute later every bucket is full again: the sweep that the next inserts trigger (when
        // the shard has doubled since its last sweep, at 1,024) drops them all.
        let later = t0() + Duration::seconds(60);
        for i in 0..100 {
            assert!(l.check_sync(&format!("ip:new{i}"), &limits, 1, later).allowed);
        }
        assert_eq!(l.rate_subjects(), 100);
        assert_eq!(l.check_sync("ip:5", &limits, 10, later).windows[0].map(|w| w.remaining), Some(0));
    }

    #[tokio::test]
    async fn quota_counts_cost_denies_without_spending_and_rolls_over_at_the_month() {
        let l = MemoryLimiter::default();
        let d = l.consume_quota("org:a", Some(10), 7, t0()).await;
        assert_eq!((d.allowed, d.used, d.remaining, d.reset_secs()), (true, 7, Some(3), 60));
        let d = l.consume_quota("org:a", Some(10), 4, t0()).await;
        assert_eq!((d.allowed, d.used, d.remaining), (false, 7, Some(3)));
        let d = l.consume_quota("org:a", Some(10), 3, t0() + Duration::seconds(59)).await;
        assert_eq!((d.allowed, d.used, d.remaining), (true, 10, Some(0)));
        assert!(!l.consume_quota("org:a", Some(10), 1, t0() + Duration::microseconds(59_999_999)).await.allowed);
        // 2026-06-01T00:00:00Z: a new month.
        let june = t0() + Duration::seconds(60);
        let d = l.consume_quota("org:a", Some(10), 1, june).await;
        assert_eq!((d.allowed, d.used, d.reset_secs()), (true, 1, 30 * 86_400));
        // No limit: counted all the same.
        assert_eq!(l.consume_quota("org:b", None, 5, june).await.used, 5);
    }

    #[derive(Debug)]
    struct Seed {
        calls: AtomicUsize,
        fail: bool,
    }

    #[async_trait]
    impl QuotaSeed for Seed {
        async fn used_in_month(&self, subject: &str, month_start: DateTime<Utc>) -> Result<u64, LimitError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            assert_eq!(month_start, limits::month_start(t0()));
            if self.fail { Err(LimitError::Seed(format!("store down for {subject}").into())) } else { Ok(9_998) }
        }
    }

    #[tokio::test]
    async fn quota_is_seeded_once_from_the_durable_store() {
        let seed = Arc::new(Seed { calls: AtomicUsize::new(0), fail: false });
        let l = MemoryLimiter::default().with_quota_seed(seed.clone());
        let limit = Some(10_000);
        assert_eq!(l.consume_quota("org:a", limit, 1, t0()).await.used, 9_999);
        assert_eq!(l.consume_quota("org:a", limit, 1, t0()).await.used, 10_000);
        let d = l.consume_quota("org:a", limit, 1, t0()).await;
        assert_eq!((d.allowed, d.used, d.remaining), (false, 10_000, Some(0)));
        assert_eq!(seed.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failing_seed_applies_the_policy_and_is_retried() {
        for policy in [FailurePolicy::FailOpen, FailurePolicy::FailClosed] {
            let seed = Arc::new(Seed { calls: AtomicUsize::new(0), fail: true });
            let config = MemoryConfig { seed_failure: policy, ..MemoryConfig::default() };
            let l = MemoryLimiter::new(config).with_quota_seed(seed.clone());
            for _ in 0..2 {
                let d = l.consume_quota("org:a", Some(10), 1, t0()).await;
                assert_eq!((d.allowed, d.degraded), (policy.allows(), true));
            }
            assert_eq!(seed.calls.load(Ordering::SeqCst), 2);
        }
    }

    proptest::proptest! {
        /// Sweeping idle subjects never changes a decision: the limiter (one shard, so it sweeps
        /// often) decides exactly like a map that forgets nothing.
        #[test]
        fn sweeping_is_lossless(steps in proptest::collection::vec((0u64..300, 0i64..3_000_000, 0u64..3), 1..2_000)) {
            let l = MemoryLimiter::new(MemoryConfig { shards: 1, ..MemoryConfig::default() });
            let limits = RateLimits { per_minute: Some(3), per_hour: Some(10), per_day: None };
            let mut reference: std::collections::HashMap<u64, [Option<i64>; 3]> = Default::default();
            let mut now = t0().timestamp_micros();
            for (subject, dt, cost) in steps {
                now += dt;
                let expected = RateDecision::decide(&limits, reference.entry(subject).or_default(), now, cost);
                let at = DateTime::from_timestamp_micros(now).unwrap_or_default();
                proptest::prop_assert_eq!(l.check_sync(&format!("ip:{subject}"), &limits, cost, at), expected);
            }
        }
    }

    #[test]
    fn many_threads_one_subject_admit_exactly_the_limit() {
        let l = Arc::new(MemoryLimiter::default());
        let limits = RateLimits { per_minute: Some(1_000), per_hour: Some(5_000), per_day: None };
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    (0..500).filter(|_| l.check_sync("key:hot", &limits, 1, t0()).allowed).count()
                })
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
        assert_eq!(admitted, 1_000);
    }
}
