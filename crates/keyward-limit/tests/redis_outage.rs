//! Redis stopped mid-test: the failure policy holds (open and closed), the outage is counted in the
//! metrics, and limits are exact again once Redis is back. Each test runs its own `redis-server` on
//! a free loopback port (the shared one on 6379 is never touched), kills it and restarts it on the
//! same port; every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use keyward_limit::{FailurePolicy, Limiter, RateLimits, RedisConfig, RedisLimiter, metric};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Counts every counter increment by name and labels, e.g.
/// `keyward_limiter_errors_total{backend=redis,op=rate,policy=fail_open}`.
#[derive(Default)]
struct Counters(Mutex<HashMap<String, Arc<AtomicU64>>>);

struct Count(Arc<AtomicU64>);

impl metrics::CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::SeqCst);
    }
}

fn key_name(key: &Key) -> String {
    let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Recorder for Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let count = self.0.lock().unwrap().entry(key_name(key)).or_default().clone();
        Counter::from_arc(Arc::new(Count(count)))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// The process-wide recorder of this test binary (tests tell their counts apart by label).
fn counters() -> &'static Counters {
    static RECORDER: OnceLock<&'static Counters> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder: &'static Counters = Box::leak(Box::default());
        metrics::set_global_recorder(recorder).expect("the only recorder of this binary");
        recorder
    })
}

/// One test at a time: they read process-wide counters by label, and time decisions.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn count(name: &str) -> u64 {
    counters().0.lock().unwrap().get(name).map_or(0, |c| c.load(Ordering::SeqCst))
}

/// A `redis-server` of our own, killed on drop.
struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    /// `None` (after a loud line) when `redis-server` is not installed, unless `CI=true`, where
    /// that fails the test.
    fn start() -> Option<Self> {
        let installed = Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_ok();
        if !installed {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "redis-server is not installed and CI=true");
            eprintln!("!!!!! SKIPPED Redis outage test: redis-server is not installed !!!!!");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = Self { port, child: None };
        redis.spawn();
        Some(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {} within 10 s", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill redis-server");
            child.wait().expect("reap redis-server");
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn t0() -> DateTime<Utc> {
    common::at("2026-05-31T12:00:00Z")
}

/// Waits (polling the limiter's health, never Redis) until the breaker says `up`, at most `within`.
async fn wait_for_health(l: &RedisLimiter, up: bool, within: Duration) -> Duration {
    let started = Instant::now();
    while l.health().up != up {
        assert!(
            started.elapsed() < within,
            "the limiter did not see Redis {} within {within:?}",
            if up { "up" } else { "down" }
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// The longest a decision may take while Redis is down and the breaker knows it: half the 300 ms
/// Redis timeout the tests configure. A decision that waited for Redis takes the whole timeout; one
/// that did not takes microseconds; halfway, a busy 2-core machine's scheduling cannot fail the
/// test. (Speed itself is the benchmarks' to measure.)
const MEMORY_SPEED: Duration = Duration::from_millis(150);

/// Runs a test of this file: within 60 s, and alone.
async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(60), async {
        let _serial = SERIAL.lock().await;
        test.await
    })
    .await
    .expect("bounded");
}

/// A Redis of the test's own and a limiter on it with `policy`, `timeout` and a probe (and
/// heartbeat) every `probe_interval`; `None` where no `redis-server` can be started.
async fn own_redis(
    policy: FailurePolicy,
    timeout: Duration,
    probe_interval: Duration,
) -> Option<(OwnRedis, RedisLimiter)> {
    let redis = OwnRedis::start()?;
    let config =
        RedisConfig::new(redis.url()).with_policy(policy).with_timeout(timeout).with_probe_interval(probe_interval);
    let l = RedisLimiter::connect(config).await.expect("our own redis-server answers");
    Some((redis, l))
}

async fn outage(policy: FailurePolicy) {
    counters();
    let timeout = Duration::from_millis(300);
    // A probe every 200 ms at most once Redis is down; the heartbeat (same interval) is not what
    // notices the outage here: the first decision after the kill does.
    let Some((mut redis, l)) = own_redis(policy, timeout, Duration::from_millis(200)).await else { return };
    let limits = RateLimits::per_minute(3);
    let errors = format!("{}{{backend=redis,op=rate,policy={}}}", metric::ERRORS, policy.as_str());
    let quota_errors = format!("{}{{backend=redis,op=quota,policy={}}}", metric::ERRORS, policy.as_str());
    let local_errors = format!("{}{{backend=redis,op=rate,policy=local}}", metric::ERRORS);
    let (errors_before, quota_before, local_before) = (count(&errors), count(&quota_errors), count(&local_errors));

    // Up: exact.
    for _ in 0..3 {
        assert!(l.hit("key:k", &limits, t0()).await.allowed);
    }
    let d = l.hit("key:k", &limits, t0()).await;
    assert!(!d.allowed && !d.degraded);
    assert_eq!(l.health().degraded_total, Duration::ZERO);

    // Down: the first decision notices (bounded by the timeout), every later one is answered by
    // the policy at memory speed, without touching Redis; each is counted.
    redis.kill();
    let started = Instant::now();
    let first = l.hit("key:k", &limits, t0()).await;
    let noticed = started.elapsed();
    assert!(first.degraded && first.allowed == policy.allows(), "{first:?}");
    assert!(noticed <= timeout * 3 / 2, "noticing the outage took {noticed:?}");
    assert!(!l.is_up() && !l.health().up);
    let mut slowest = Duration::ZERO;
    for i in 0..200 {
        let started = Instant::now();
        let d = l.hit("key:k", &limits, t0()).await;
        let q = l.consume_quota("org:o", Some(100), 1, t0()).await;
        slowest = slowest.max(started.elapsed() / 2);
        assert!(d.degraded, "decision {i} while Redis is down");
        assert_eq!(d.allowed, policy.allows(), "decision {i} follows {policy:?}");
        if !policy.allows() {
            assert_eq!(d.retry_after_secs(), Some(1));
        }
        assert_eq!((q.allowed, q.degraded), (policy.allows(), true));
    }
    // A limit that holds through the outage: this node's own count, whatever the policy.
    for i in 0..4 {
        let started = Instant::now();
        let d = l.check_or_local("auth-fail:198.51.100.1", &limits, 1, t0()).await;
        slowest = slowest.max(started.elapsed());
        assert!(!d.degraded, "counted, not by the policy");
        assert_eq!(d.allowed, i < 3, "local decision {i}");
    }
    eprintln!("{policy:?}: outage noticed in {noticed:?}, slowest decision after that {slowest:?}");
    assert!(slowest < MEMORY_SPEED, "a decision took {slowest:?} while the breaker was open");
    assert_eq!(count(&errors) - errors_before, 201);
    assert_eq!(count(&quota_errors) - quota_before, 200);
    assert_eq!(count(&local_errors) - local_before, 4);
    let down = l.health();
    assert!(!down.up && down.degraded_for.is_some_and(|d| d > Duration::ZERO));

    // Back on the same port (empty: no persistence). The probe notices by itself, with no
    // request to pay for it; then the very first decision is exact, no restart needed.
    redis.spawn();
    let recovered_in = wait_for_health(&l, true, Duration::from_secs(5)).await;
    eprintln!("{policy:?}: recovery seen {recovered_in:?} after Redis listened");
    for _ in 0..3 {
        let d = l.hit("key:k", &limits, t0()).await;
        assert!(d.allowed && !d.degraded, "{d:?}");
    }
    let d = l.hit("key:k", &limits, t0()).await;
    assert!(!d.allowed && !d.degraded);
    assert_eq!(l.consume_quota("org:o", Some(100), 1, t0()).await.used, 1);
    assert_eq!(count(&errors) - errors_before, 201, "no error counted once Redis is back");
    let after = l.health();
    assert!(after.up && after.degraded_for.is_none() && after.degraded_total >= down.degraded_for.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fail_open_admits_at_memory_speed_then_limits_again_after_restart() {
    bounded(outage(FailurePolicy::FailOpen)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fail_closed_denies_at_memory_speed_then_limits_again_after_restart() {
    bounded(outage(FailurePolicy::FailClosed)).await;
}

/// Redis restarts while the node is idle (no request, and no heartbeat in between): the first
/// decision after it must not fail on the dead connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_decision_after_a_restart_on_an_idle_node_succeeds() {
    bounded(async {
        // A generous timeout: this test is about the dead connection, not about speed.
        let (timeout, probe) = (Duration::from_secs(2), Duration::from_secs(3600));
        let Some((mut redis, l)) = own_redis(FailurePolicy::FailClosed, timeout, probe).await else { return };
        let limits = RateLimits::per_minute(3);
        assert!(!l.hit("key:idle", &limits, t0()).await.degraded);
        redis.kill();
        redis.spawn();
        let d = l.hit("key:idle", &limits, t0()).await;
        assert!(d.allowed && !d.degraded, "the first decision after the restart: {d:?}");
        assert!(l.health().up);
        assert_eq!(l.health().degraded_total, Duration::ZERO, "no outage was seen");
    })
    .await;
}

/// An idle node notices the outage by its heartbeat, before any request pays for it; then the
/// very first decision is already at memory speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_node_notices_an_outage_by_itself() {
    bounded(async {
        let (timeout, probe) = (Duration::from_millis(300), Duration::from_millis(100));
        let Some((mut redis, l)) = own_redis(FailurePolicy::FailOpen, timeout, probe).await else { return };
        redis.kill();
        wait_for_health(&l, false, Duration::from_secs(5)).await;
        let started = Instant::now();
        let d = l.hit("key:idle", &RateLimits::per_minute(3), t0()).await;
        assert!(d.allowed && d.degraded);
        assert!(started.elapsed() < MEMORY_SPEED, "the first decision took {:?}", started.elapsed());
        redis.spawn();
        wait_for_health(&l, true, Duration::from_secs(5)).await;
        assert!(!l.hit("key:idle", &RateLimits::per_minute(3), t0()).await.degraded);
    })
    .await;
}
