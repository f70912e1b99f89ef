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

/// Polls a decision (a peek, cost 0) until Redis answers again, at most `within`.
async fn wait_until_up(l: &RedisLimiter, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let d = l.check("probe", &RateLimits::per_minute(1), 0, t0()).await;
        if !d.degraded {
            return;
        }
        assert!(Instant::now() < deadline, "the limiter did not recover within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn outage(policy: FailurePolicy) {
    counters();
    let Some(mut redis) = OwnRedis::start() else { return };
    let timeout = Duration::from_millis(300);
    let config = RedisConfig::new(redis.url()).with_policy(policy).with_timeout(timeout);
    let l = RedisLimiter::connect(config).await.expect("our own redis-server answers");
    let limits = RateLimits::per_minute(3);
    let errors = format!("{}{{backend=redis,op=rate,policy={}}}", metric::ERRORS, policy.as_str());
    let quota_errors = format!("{}{{backend=redis,op=quota,policy={}}}", metric::ERRORS, policy.as_str());

    // Up: exact.
    for _ in 0..3 {
        assert!(l.hit("key:k", &limits, t0()).await.allowed);
    }
    let d = l.hit("key:k", &limits, t0()).await;
    assert!(!d.allowed && !d.degraded);
    assert_eq!(count(&errors), 0);

    // Down: the policy decides, fast, every time; each decision is counted.
    redis.kill();
    for i in 0..5 {
        let started = Instant::now();
        let d = l.hit("key:k", &limits, t0()).await;
        assert!(d.degraded, "decision {i} while Redis is down");
        assert_eq!(d.allowed, policy.allows(), "decision {i} follows {policy:?}");
        if !policy.allows() {
            assert_eq!(d.retry_after_secs(), Some(1));
        }
        assert!(started.elapsed() < timeout * 3, "a decision took {:?} while Redis was down", started.elapsed());
        let q = l.consume_quota("org:o", Some(100), 1, t0()).await;
        assert_eq!((q.allowed, q.degraded), (policy.allows(), true));
    }
    assert!(!l.is_up());
    assert_eq!(count(&errors), 5);
    assert_eq!(count(&quota_errors), 5);

    // Back on the same port (empty: no persistence): limits are exact again, no restart needed.
    redis.spawn();
    wait_until_up(&l, Duration::from_secs(15)).await;
    assert!(l.is_up());
    for _ in 0..3 {
        assert!(l.hit("key:k", &limits, t0()).await.allowed);
    }
    let d = l.hit("key:k", &limits, t0()).await;
    assert!(!d.allowed && !d.degraded);
    assert_eq!(l.consume_quota("org:o", Some(100), 1, t0()).await.used, 1);
    assert_eq!(count(&errors), 5, "no error counted once Redis is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fail_open_admits_then_limits_again_after_restart() {
    tokio::time::timeout(Duration::from_secs(60), outage(FailurePolicy::FailOpen)).await.expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fail_closed_denies_then_limits_again_after_restart() {
    tokio::time::timeout(Duration::from_secs(60), outage(FailurePolicy::FailClosed)).await.expect("bounded");
}
