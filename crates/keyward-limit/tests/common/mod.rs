//! Shared by the Redis test files: where Redis is, whether to skip, a namespace per test.

#![allow(dead_code)]

use chrono::{DateTime, Utc};
use keyward_limit::{FailurePolicy, RedisConfig, RedisLimiter};

/// `KEYWARD_TEST_REDIS_URL`, default the development and CI machines' Redis.
pub fn redis_url() -> String {
    std::env::var("KEYWARD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// True (after one loud line) when `KEYWARD_TEST_SKIP_REDIS=1`; otherwise the test runs, and an
/// unreachable Redis fails it.
pub fn skip_redis(test: &str) -> bool {
    let skip = std::env::var("KEYWARD_TEST_SKIP_REDIS").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("!!!!! SKIPPED {test}: KEYWARD_TEST_SKIP_REDIS=1, Redis tests did not run !!!!!");
    }
    skip
}

/// A key prefix no other test (or run) uses, so tests run in parallel on one Redis.
pub fn unique_prefix() -> String {
    format!("keyward:rl:test:{}", uuid::Uuid::new_v4().simple())
}

/// A limiter on the shared test Redis; panics (fails the test) when Redis does not answer.
pub async fn limiter(prefix: &str, policy: FailurePolicy) -> RedisLimiter {
    let config = RedisConfig::new(redis_url())
        .with_key_prefix(prefix)
        .with_policy(policy)
        .with_timeout(std::time::Duration::from_secs(2));
    match RedisLimiter::connect(config).await {
        Ok(l) => l,
        Err(e) => panic!("Redis at {} is unreachable ({e}); set KEYWARD_TEST_SKIP_REDIS=1 to skip", redis_url()),
    }
}

pub fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339).map(|d| d.with_timezone(&Utc)).unwrap()
}
