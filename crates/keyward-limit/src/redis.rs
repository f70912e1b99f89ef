//! The Redis limiter: the same GCRA as in memory, run by a Lua script so that every window of a
//! subject is checked and updated atomically in one round trip, exact across any number of nodes.
//!
//! Keys (all under `key_prefix`, default `keyward:rl`, each with a TTL so Redis never grows
//! unbounded):
//!
//! - `{prefix}:w:{subject}`: a hash, one field per window (`minute`, `hour`, `day`) holding its GCRA
//!   `tat` in µs; expires when every bucket is full again (plus 1 s).
//! - `{prefix}:q:{yyyymm}:{subject}`: the month's quota count; expires 7 days after the month ends
//!   (time enough to reconcile it with the store).
//!
//! Connections come from a `ConnectionManager`, which reconnects by itself; every call is bounded
//! by `timeout`. Any error or timeout applies the [`FailurePolicy`]: one `warn!` when the outage
//! begins, one `info!` when it ends, and a count per decision in `keyward_limiter_errors_total`.
//! The limiter starts even when Redis is down (the policy applies until it answers).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Script};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::limits::{self, MAX_COST, MAX_LIMIT, QuotaDecision, RateDecision, RateLimits};

use crate::health::Health;
use crate::{FailurePolicy, LimitError, Limiter, QuotaSeed};

/// GCRA over the windows given, all or nothing. Mirrors `RateDecision::decide` in keyward-core:
/// change both together (the `redis_matches_memory` test compares them).
///
/// KEYS[1]: the subject's hash. ARGV[1]: now (µs). ARGV[2]: cost. Then per window: field, interval
/// (µs), capacity (µs). Returns {allowed, tat of each window after the decision}, as strings.
/// Every number stays below 2^53, so Lua's doubles are exact; `%.0f` writes them without exponent.
const RATE_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local n = (#ARGV - 2) / 3
local fields = {}
for i = 1, n do fields[i] = ARGV[3 * i] end
local stored = redis.call('HMGET', KEYS[1], unpack(fields))
local allowed = 1
local base, after = {}, {}
for i = 1, n do
  local interval = tonumber(ARGV[3 * i + 1])
  local capacity = tonumber(ARGV[3 * i + 2])
  local tat = tonumber(stored[i]) or now
  if tat < now then tat = now end
  base[i] = tat
  after[i] = tat + cost * interval
  if after[i] - now > capacity then allowed = 0 end
end
local out = {tostring(allowed)}
if allowed == 1 and cost > 0 then
  local args, ttl = {}, 0
  for i = 1, n do
    local v = string.format('%.0f', after[i])
    args[2 * i - 1] = fields[i]
    args[2 * i] = v
    out[i + 1] = v
    if after[i] - now > ttl then ttl = after[i] - now end
  end
  redis.call('HSET', KEYS[1], unpack(args))
  local ttl_ms = math.ceil(ttl / 1000) + 1000
  if redis.call('PTTL', KEYS[1]) < ttl_ms then redis.call('PEXPIRE', KEYS[1], ttl_ms) end
else
  for i = 1, n do out[i + 1] = string.format('%.0f', base[i]) end
end
return out
";

/// A month's quota count. KEYS[1]: the counter. ARGV: limit (-1: none), cost, time to live (ms,
/// relative like the rate keys' so it follows the caller's clock), seed ('': unknown). Returns {'seed'} when the counter is absent and no seed was given, else
/// {allowed, used after the decision}.
const QUOTA_SCRIPT: &str = r"
local used = tonumber(redis.call('GET', KEYS[1]))
local fresh = false
if used == nil then
  if ARGV[4] == '' then return {'seed'} end
  used = tonumber(ARGV[4])
  fresh = true
end
local limit = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local allowed = 1
if limit >= 0 and used + cost > limit then allowed = 0 else used = used + cost end
if allowed == 1 or fresh then
  redis.call('SET', KEYS[1], string.format('%.0f', used), 'PX', ARGV[3])
end
return {tostring(allowed), string.format('%.0f', used)}
";

/// Days a month's quota counter outlives its month.
const QUOTA_GRACE_DAYS: i64 = 7;

/// How to reach Redis and what to do when it does not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` (`--redis-url` / `KEYWARD_REDIS_URL`).
    pub url: String,
    /// Namespace of every key. Default `keyward:rl`.
    pub key_prefix: String,
    pub policy: FailurePolicy,
    /// Longest wait for one decision, connecting included. Default 250 ms.
    pub timeout: Duration,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: "keyward:rl".to_owned(),
            policy: FailurePolicy::default(),
            timeout: Duration::from_millis(250),
        }
    }

    pub fn with_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// Rate limits and quotas shared by every node through one Redis.
pub struct RedisLimiter {
    conn: ConnectionManager,
    prefix: String,
    policy: FailurePolicy,
    timeout: Duration,
    rate_script: Script,
    quota_script: Script,
    seed: Option<Arc<dyn QuotaSeed>>,
    health: Health,
    seed_health: Health,
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.prefix)
            .field("policy", &self.policy)
            .field("timeout", &self.timeout)
            .field("up", &self.health.is_up())
            .finish()
    }
}

impl RedisLimiter {
    /// A limiter that connects on first use and reconnects by itself. Fails only on an invalid URL;
    /// an unreachable Redis is an outage (the policy applies), not an error. Call inside a Tokio
    /// runtime.
    pub fn new(config: RedisConfig) -> Result<Self, LimitError> {
        let client = Client::open(config.url.as_str()).map_err(LimitError::Config)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_lazy_with_config(client, manager).map_err(LimitError::Config)?;
        Ok(Self {
            conn,
            prefix: config.key_prefix,
            policy: config.policy,
            timeout: config.timeout,
            rate_script: Script::new(RATE_SCRIPT),
            quota_script: Script::new(QUOTA_SCRIPT),
            seed: None,
            health: Health::new("redis"),
            seed_health: Health::new("quota_store"),
        })
    }

    /// [`RedisLimiter::new`], then a `PING`: for a start-up that must not begin without Redis.
    pub async fn connect(config: RedisConfig) -> Result<Self, LimitError> {
        let limiter = Self::new(config)?;
        limiter.ping().await?;
        Ok(limiter)
    }

    /// Quota counters Redis does not hold are seeded from `seed` (the durable store).
    pub fn with_quota_seed(mut self, seed: Arc<dyn QuotaSeed>) -> Self {
        self.seed = Some(seed);
        self
    }

    /// One `PING`, bounded by the timeout (for `/readyz`).
    pub async fn ping(&self) -> Result<(), LimitError> {
        let mut conn = self.conn.clone();
        self.bounded(async move { ::redis::cmd("PING").query_async::<String>(&mut conn).await }).await.map(drop)
    }

    /// Whether the last decision reached Redis.
    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    async fn bounded<T>(&self, f: impl Future<Output = ::redis::RedisResult<T>>) -> Result<T, LimitError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(LimitError::from),
            Err(_) => Err(LimitError::Timeout(self.timeout)),
        }
    }

    async fn rate_in_redis(
        &self,
        subject: &str,
        limits: &RateLimits,
        cost: u64,
        now: i64,
    ) -> Result<RateDecision, LimitError> {
        let rules: Vec<_> = limits.rules().into_iter().flatten().collect();
        let mut invocation = self.rate_script.key(format!("{}:w:{subject}", self.prefix));
        invocation.arg(now).arg(cost.min(MAX_COST));
        for r in &rules {
            invocation.arg(r.window.name()).arg(r.interval).arg(r.capacity);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        let (allowed, after) = match reply.split_first() {
            Some((&allowed, after)) if after.len() == rules.len() => (allowed == 1, after),
            _ => return Err(LimitError::Protocol(format!("rate script answered {reply:?}"))),
        };
        let mut tats = [None; 3];
        for (r, &tat) in rules.iter().zip(after) {
            tats[r.window.index()] = Some(tat);
        }
        Ok(RateDecision::from_tats(limits, &tats, now, cost, allowed))
    }

    async fn quota_in_redis(
        &self,
        key: &str,
        limit: Option<u64>,
        cost: u64,
        seed: Option<u64>,
        now: DateTime<Utc>,
    ) -> Result<Option<QuotaDecision>, LimitError> {
        let ttl = limits::next_month_start(now) + chrono::Duration::days(QUOTA_GRACE_DAYS) - now;
        // Clamped so that every number stays exact in the script's doubles.
        let limit_arg = limit.map_or(-1, |l| l.min(MAX_LIMIT) as i64);
        let mut invocation = self.quota_script.key(key);
        invocation.arg(limit_arg).arg(cost.min(MAX_COST)).arg(ttl.num_milliseconds().max(1));
        invocation.arg(seed.map(|s| s.to_string()).unwrap_or_default());
        let mut conn = self.conn.clone();
        let reply: Vec<String> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        match reply.as_slice() {
            [s] if s == "seed" => Ok(None),
            [allowed, used] => {
                let used =
                    used.parse().map_err(|_| LimitError::Protocol(format!("quota script answered {reply:?}")))?;
                Ok(Some(QuotaDecision::from_used(used, limit, allowed == "1", now)))
            }
            _ => Err(LimitError::Protocol(format!("quota script answered {reply:?}"))),
        }
    }

    async fn quota(
        &self,
        subject: &str,
        limit: Option<u64>,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<QuotaDecision, Fault> {
        let key = format!("{}:q:{}:{subject}", self.prefix, limits::month_id(now));
        // Without a seed source an absent counter starts at 0: no second round trip.
        let first_seed = if self.seed.is_some() { None } else { Some(0) };
        if let Some(d) = self.quota_in_redis(&key, limit, cost, first_seed, now).await.map_err(Fault::Redis)? {
            return Ok(d);
        }
        let Some(seed) = &self.seed else {
            return Err(Fault::Redis(LimitError::Protocol("quota script asked for a seed".to_owned())));
        };
        let used = seed.used_in_month(subject, limits::month_start(now)).await.map_err(Fault::Seed)?;
        self.seed_health.succeeded();
        // Another node may have seeded it meanwhile: the script then ignores ours.
        match self.quota_in_redis(&key, limit, cost, Some(used), now).await.map_err(Fault::Redis)? {
            Some(d) => Ok(d),
            None => Err(Fault::Redis(LimitError::Protocol("quota script refused a seed".to_owned()))),
        }
    }
}

/// Which backend failed a quota decision.
enum Fault {
    Redis(LimitError),
    Seed(LimitError),
}

#[async_trait]
impl Limiter for RedisLimiter {
    async fn check(&self, subject: &str, limits: &RateLimits, cost: u64, now: DateTime<Utc>) -> RateDecision {
        if limits.is_unlimited() {
            return RateDecision::UNLIMITED;
        }
        match self.rate_in_redis(subject, limits, cost, now.timestamp_micros()).await {
            Ok(d) => {
                self.health.succeeded();
                d
            }
            Err(error) => {
                self.health.failed("rate", self.policy, &error);
                RateDecision::degraded(limits, self.policy.allows())
            }
        }
    }

    async fn consume_quota(&self, subject: &str, limit: Option<u64>, cost: u64, now: DateTime<Utc>) -> QuotaDecision {
        match self.quota(subject, limit, cost, now).await {
            Ok(d) => {
                self.health.succeeded();
                d
            }
            Err(Fault::Redis(error)) => {
                self.health.failed("quota", self.policy, &error);
                QuotaDecision::degraded(limit, self.policy.allows(), now)
            }
            Err(Fault::Seed(error)) => {
                self.seed_health.failed("quota", self.policy, &error);
                QuotaDecision::degraded(limit, self.policy.allows(), now)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyward_core::Window;

    #[test]
    fn window_field_names_are_stable() {
        // Renaming a field orphans every counter in Redis (limits reset once): keep these.
        assert_eq!(Window::ALL.map(Window::name), ["minute", "hour", "day"]);
    }

    #[tokio::test]
    async fn an_invalid_url_is_a_config_error_and_an_unreachable_redis_is_an_outage() {
        assert!(matches!(RedisLimiter::new(RedisConfig::new("not a url")), Err(LimitError::Config(_))));
        // Port 1 on loopback: refused at once; nothing leaves the machine.
        let config = RedisConfig::new("redis://127.0.0.1:1").with_policy(FailurePolicy::FailClosed);
        let l = RedisLimiter::new(config.clone()).unwrap();
        let now = DateTime::from_timestamp(1_780_000_000, 0).unwrap();
        let d = l.hit("key:x", &RateLimits::per_minute(5), now).await;
        assert!(!d.allowed && d.degraded);
        assert!(!l.is_up());
        assert!(l.consume_quota("org:x", Some(5), 1, now).await.degraded);
        assert!(RedisLimiter::connect(config).await.is_err());
    }
}
