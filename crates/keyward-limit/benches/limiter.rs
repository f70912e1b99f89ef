//! Decision cost: in memory for one key and for 100,000 distinct keys (target < 200 ns), and Redis
//! decisions per second with 64 concurrent callers. Figures and commands: BENCHMARKS.md.
//!
//! `cargo bench -p keyward-limit --bench limiter`; the Redis group uses `KEYWARD_TEST_REDIS_URL`
//! (default 127.0.0.1:6379) and is skipped, loudly, when Redis does not answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keyward_limit::{FailurePolicy, Limiter, MemoryLimiter, RateLimits, RedisConfig, RedisLimiter};

/// The pro tier: 600/min, 20,000/h, 500,000/day, all three windows checked on every decision.
const PRO: RateLimits = RateLimits { per_minute: Some(600), per_hour: Some(20_000), per_day: Some(500_000) };

fn at(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap()
}

const T0: i64 = 1_780_000_000_000_000;

fn memory(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory");
    group.sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(1));

    let limiter = MemoryLimiter::default();
    let now = Cell::new(T0);
    group.bench_function("one_key", |b| {
        b.iter(|| {
            // 1 ms apart: a mix of admitted (one per 100 ms) and denied decisions, as under load.
            now.set(now.get() + 1_000);
            black_box(limiter.check_sync("key:0194f1a2-7c55-7c3e-9b1d-2f4e6a8c0d11", &PRO, 1, at(now.get())))
        })
    });

    let limiter = MemoryLimiter::default();
    let keys: Vec<String> = (0..100_000).map(|i| format!("key:0194f1a2-7c55-7c3e-9b1d-{i:012}")).collect();
    // Every key present before measuring: the map is at its working size.
    for k in &keys {
        limiter.check_sync(k, &PRO, 1, at(T0));
    }
    let i = Cell::new(0usize);
    let now = Cell::new(T0);
    group.bench_function("100k_keys", |b| {
        b.iter(|| {
            let n = i.get();
            i.set(if n + 1 == keys.len() { 0 } else { n + 1 });
            now.set(now.get() + 10);
            black_box(limiter.check_sync(&keys[n], &PRO, 1, at(now.get())))
        })
    });
    group.finish();
}

fn redis(c: &mut Criterion) {
    const CALLERS: usize = 64;
    const PER_CALLER: usize = 50;
    let url = std::env::var("KEYWARD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let prefix = format!("keyward:rl:bench:{}", std::process::id());
    let config = RedisConfig::new(url.clone()).with_key_prefix(prefix).with_policy(FailurePolicy::FailClosed);
    let limiter = match rt.block_on(RedisLimiter::connect(config)) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            eprintln!("!!!!! SKIPPED Redis benchmark: {url} does not answer ({e}) !!!!!");
            return;
        }
    };

    let mut group = c.benchmark_group("redis");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    // One criterion iteration = 64 callers × 50 sequential decisions each, all concurrent.
    group.throughput(Throughput::Elements((CALLERS * PER_CALLER) as u64));
    group.bench_function("64_callers", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for iter in 0..iters {
                    let tasks: Vec<_> = (0..CALLERS)
                        .map(|caller| {
                            let l = limiter.clone();
                            tokio::spawn(async move {
                                let now = at(T0 + iter as i64 * 1_000_000);
                                for _ in 0..PER_CALLER {
                                    let d = l.check(&format!("key:{caller}"), &PRO, 1, now).await;
                                    assert!(!d.degraded, "Redis failed during the benchmark");
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, memory, redis);
criterion_main!(benches);
