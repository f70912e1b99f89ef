//! The Redis limiter against a real Redis (`KEYWARD_TEST_REDIS_URL`, default 127.0.0.1:6379): exact
//! across instances under concurrency, the same decisions as in memory, quotas, TTLs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use common::{at, limiter, redis_url, skip_redis, unique_prefix};
use keyward_limit::{FailurePolicy, LimitError, Limiter, MemoryLimiter, QuotaSeed, RateLimits};

fn t0() -> DateTime<Utc> {
    at("2026-05-31T23:50:00Z")
}

/// `tasks` tasks, split over the limiters, each sending one request of cost 1 at `now`.
async fn hammer(
    limiters: &[Arc<dyn Limiter>],
    subject: &str,
    limits: RateLimits,
    tasks: usize,
    now: DateTime<Utc>,
) -> usize {
    let mut handles = Vec::new();
    for i in 0..tasks {
        let l = limiters[i % limiters.len()].clone();
        let subject = subject.to_owned();
        handles.push(tokio::spawn(async move {
            let d = l.hit(&subject, &limits, now).await;
            assert!(!d.degraded, "Redis failed mid-test");
            d.allowed
        }));
    }
    let mut admitted = 0;
    for h in handles {
        admitted += usize::from(h.await.unwrap());
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_hammered_concurrently_admit_exactly_the_limit_together() {
    if skip_redis("two_instances_hammered_concurrently_admit_exactly_the_limit_together") {
        return;
    }
    let prefix = unique_prefix();
    let a: Arc<dyn Limiter> = Arc::new(limiter(&prefix, FailurePolicy::FailClosed).await);
    let b: Arc<dyn Limiter> = Arc::new(limiter(&prefix, FailurePolicy::FailClosed).await);
    let both = [a, b];
    let limits = RateLimits { per_minute: Some(100), per_hour: Some(150), per_day: Some(1_000) };

    let admitted = tokio::time::timeout(std::time::Duration::from_secs(60), hammer(&both, "key:k", limits, 400, t0()))
        .await
        .expect("400 decisions within 60 s");
    assert_eq!(admitted, 100);

    // A minute later the minute window is whole again, but the hour (one unit per 24 s) has only
    // 50 + 2 left: exact over several windows too.
    let later = t0() + Duration::seconds(60);
    let admitted = tokio::time::timeout(std::time::Duration::from_secs(60), hammer(&both, "key:k", limits, 400, later))
        .await
        .expect("400 decisions within 60 s");
    assert_eq!(admitted, 52);
    let d = both[0].hit("key:k", &limits, later).await;
    assert_eq!(d.tightest().map(|t| (t.limit, t.remaining)), Some((150, 0)));
    // 52.5 units had freed in those 60 s: the other half of the 53rd frees 12 s later.
    assert_eq!(d.retry_after_secs(), Some(12));
}

/// A small deterministic generator: the same "random" sequence on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

#[tokio::test]
async fn redis_decides_exactly_like_memory() {
    if skip_redis("redis_decides_exactly_like_memory") {
        return;
    }
    let redis = limiter(&unique_prefix(), FailurePolicy::FailClosed).await;
    let memory = MemoryLimiter::default();
    let limit_sets = [
        RateLimits { per_minute: Some(5), per_hour: Some(20), per_day: Some(50) },
        RateLimits { per_minute: Some(7), per_hour: None, per_day: None },
        RateLimits { per_minute: None, per_hour: Some(3), per_day: Some(4) },
        RateLimits { per_minute: Some(0), per_hour: None, per_day: None },
    ];
    let mut rng = Lcg(42);
    let mut now = t0();
    for step in 0..600 {
        now += Duration::microseconds(rng.next(20_000_000) as i64);
        let subject = format!("s{}", rng.next(3));
        let limits = limit_sets[rng.next(limit_sets.len() as u64) as usize];
        let cost = [0, 1, 1, 1, 2, 3, 9][rng.next(7) as usize];
        let r = redis.check(&subject, &limits, cost, now).await;
        let m = memory.check(&subject, &limits, cost, now).await;
        assert_eq!(r, m, "step {step}: {subject} {limits:?} cost {cost} at {now}");
        // Now and then the request is refused after it (its quota): the unit goes back, alike.
        if r.allowed && rng.next(4) == 0 {
            redis.refund(&subject, &limits, cost, now).await;
            memory.refund(&subject, &limits, cost, now).await;
        }

        let quota = [None, Some(10), Some(30)][rng.next(3) as usize];
        let r = redis.consume_quota(&subject, quota, cost, now).await;
        let m = memory.consume_quota(&subject, quota, cost, now).await;
        assert_eq!(r, m, "step {step}: quota {subject} {quota:?} cost {cost} at {now}");
    }
}

#[derive(Debug, Default)]
struct CountingSeed {
    calls: AtomicUsize,
}

#[async_trait]
impl QuotaSeed for CountingSeed {
    async fn used_in_month(&self, _subject: &str, month_start: DateTime<Utc>) -> Result<u64, LimitError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        // May 2026 was already used 9,998 times according to the durable store; June not at all.
        Ok(if month_start == at("2026-05-01T00:00:00Z") { 9_998 } else { 0 })
    }
}

#[tokio::test]
async fn quota_is_seeded_once_shared_across_instances_and_rolls_over_at_the_month() {
    if skip_redis("quota_is_seeded_once_shared_across_instances_and_rolls_over_at_the_month") {
        return;
    }
    let prefix = unique_prefix();
    let seed = Arc::new(CountingSeed::default());
    let a = limiter(&prefix, FailurePolicy::FailClosed).await.with_quota_seed(seed.clone());
    let b = limiter(&prefix, FailurePolicy::FailClosed).await.with_quota_seed(seed.clone());
    let free = Some(10_000);

    let d = a.consume_quota("org:o", free, 1, t0()).await;
    assert_eq!((d.allowed, d.used, d.remaining, d.reset_secs()), (true, 9_999, Some(1), 600));
    let d = b.consume_quota("org:o", free, 1, t0()).await;
    assert_eq!((d.allowed, d.used, d.remaining), (true, 10_000, Some(0)));
    let d = a.consume_quota("org:o", free, 1, t0()).await;
    assert_eq!((d.allowed, d.used, d.remaining, d.degraded), (false, 10_000, Some(0), false));
    assert_eq!(seed.calls.load(Ordering::SeqCst), 1, "seeded once for both instances");

    // June: a new counter, seeded from the store (0), cost counted.
    let june = at("2026-06-01T00:00:00Z");
    let d = b.consume_quota("org:o", free, 250, june).await;
    assert_eq!((d.allowed, d.used, d.remaining, d.reset_secs()), (true, 250, Some(9_750), 30 * 86_400));
    assert_eq!(seed.calls.load(Ordering::SeqCst), 2);
    // One microsecond before June, May is still full.
    assert!(!a.consume_quota("org:o", free, 1, june - Duration::microseconds(1)).await.allowed);
}

#[tokio::test]
async fn every_key_is_namespaced_and_expires() {
    if skip_redis("every_key_is_namespaced_and_expires") {
        return;
    }
    let prefix = unique_prefix();
    let l = limiter(&prefix, FailurePolicy::FailClosed).await;
    let limits = RateLimits { per_minute: Some(60), per_hour: Some(1_000), per_day: Some(10_000) };
    for _ in 0..3 {
        assert!(l.hit("key:ttl", &limits, t0()).await.allowed);
    }
    assert!(l.consume_quota("org:ttl", Some(10), 1, t0()).await.allowed);

    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await.unwrap();
    keys.sort();
    assert_eq!(keys, [format!("{prefix}:q:202605:org:ttl"), format!("{prefix}:w:key:ttl")]);

    // The rate hash lives until its slowest bucket is full again: 3 units of the day (3 × 8.64 s),
    // plus a second of slack.
    let pttl: i64 = redis::cmd("PTTL").arg(&keys[1]).query_async(&mut conn).await.unwrap();
    assert!(pttl > 25_000 && pttl <= 26_920, "rate key PTTL {pttl}");
    let fields: Vec<String> = redis::cmd("HKEYS").arg(&keys[1]).query_async(&mut conn).await.unwrap();
    assert_eq!(fields, ["minute", "hour", "day"]);
    // The quota counter lives until 7 days after its month (10 minutes away).
    let pttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query_async(&mut conn).await.unwrap();
    let expected = (7 * 86_400 + 600) * 1_000;
    assert!(pttl > expected - 10_000 && pttl <= expected, "quota key PTTL {pttl}");
}
