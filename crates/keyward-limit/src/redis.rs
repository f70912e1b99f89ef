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
//! # Outages: a circuit breaker
//!
//! Redis being down is noticed once, not paid for by every request. The first call that fails (an
//! error, or no answer within `timeout`) opens the breaker: from then on every decision is taken at
//! once, in memory, without touching Redis, by the [`FailurePolicy`] (or, for
//! [`Limiter::check_or_local`], by this node's own count), and is marked `degraded`. A background
//! task probes Redis on a fresh connection (`PING`, backoff from 50 ms up to `probe_interval`);
//! when it answers, that fresh connection replaces the old one and the breaker closes, so the first
//! call after a recovery runs on a connection known to work. While Redis is up the same task sends a
//! `PING` every `probe_interval`, so that an idle node notices an outage (and `/readyz` can say so)
//! before a request does; and a call whose connection turns out to have dropped (Redis restarted
//! while the node was idle) is retried once, within the same `timeout`, on the reconnected one.
//!
//! That retry is only made when the connection was dropped or refused, never after a timeout; if a
//! connection drops after Redis ran the script but before its answer arrived, the request is counted
//! twice (a limit errs on the tight side, never the loose one).
//!
//! Logging: one `warn!` when an outage begins, one `info!` when it ends; metrics: a count per
//! decision taken without Redis (`keyward_limiter_errors_total`), `keyward_limiter_backend_up` and
//! `keyward_limiter_degraded_seconds_total`. The limiter starts even when Redis is down (the policy
//! applies until it answers).

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, RedisResult, Script};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::limits::{self, MAX_COST, MAX_LIMIT, QuotaDecision, RateDecision, RateLimits};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::health::{DecidedBy, Health, Op};
use crate::memory::{MemoryConfig, MemoryLimiter};
use crate::{FailurePolicy, LimitError, Limiter, LimiterHealth, QuotaSeed};

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

/// Gives back what `RATE_SCRIPT` consumed: the inverse of its step, never past a full bucket (the
/// field goes). Mirrors `RateDecision::refund` in keyward-core.
///
/// KEYS[1]: the subject's hash. ARGV[1]: now (µs). ARGV[2]: cost. Then per window: field, interval
/// (µs).
const REFUND_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
for i = 1, (#ARGV - 2) / 2 do
  local field = ARGV[2 * i + 1]
  local tat = tonumber(redis.call('HGET', KEYS[1], field))
  if tat then
    local back = tat - cost * tonumber(ARGV[2 * i + 2])
    if back > now then
      redis.call('HSET', KEYS[1], field, string.format('%.0f', back))
    else
      redis.call('HDEL', KEYS[1], field)
    end
  end
end
return 1
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
    /// While Redis is up, the interval of the `PING` that notices an outage on an idle node; while
    /// it is down, the longest pause between probes. Default 1 s.
    pub probe_interval: Duration,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: "keyward:rl".to_owned(),
            policy: FailurePolicy::default(),
            timeout: Duration::from_millis(250),
            probe_interval: Duration::from_secs(1),
        }
    }

    pub fn with_probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval.max(PROBE_MIN);
        self
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

/// The first pause between probes once Redis is down (then doubled up to `probe_interval`).
const PROBE_MIN: Duration = Duration::from_millis(50);

/// Subjects this node counts alone while Redis is down ([`Limiter::check_or_local`]: Keyward's
/// protection of itself, a few per client address or organization).
const LOCAL_SUBJECTS: usize = 100_000;

/// Rate limits and quotas shared by every node through one Redis.
pub struct RedisLimiter {
    link: Arc<Link>,
    prefix: String,
    policy: FailurePolicy,
    rate_script: Script,
    refund_script: Script,
    quota_script: Script,
    seed: Option<Arc<dyn QuotaSeed>>,
    seed_health: Health,
    /// What [`Limiter::check_or_local`] decides with while Redis is down.
    local: MemoryLimiter,
    /// The probe; aborted when the limiter is dropped.
    watcher: JoinHandle<()>,
}

/// The connection to Redis and whether it answers: the breaker, shared with the probe task.
struct Link {
    client: Client,
    manager: ConnectionManagerConfig,
    conn: RwLock<ConnectionManager>,
    health: Health,
    /// Wakes the probe task when a call opened the breaker.
    wake: Notify,
    policy: FailurePolicy,
    timeout: Duration,
    probe_interval: Duration,
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.prefix)
            .field("policy", &self.policy)
            .field("timeout", &self.link.timeout)
            .field("up", &self.link.health.is_up())
            .finish()
    }
}

impl Drop for RedisLimiter {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl RedisLimiter {
    /// A limiter that connects on first use and reconnects by itself. Fails only on an invalid URL;
    /// an unreachable Redis is an outage (the policy applies), not an error. Call inside a Tokio
    /// runtime: the probe runs as a task of its own.
    pub fn new(config: RedisConfig) -> Result<Self, LimitError> {
        let client = Client::open(config.url.as_str()).map_err(LimitError::Config)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            // One attempt per reconnection: retrying is the breaker's probe's job, and a manager
            // that retried by itself would hold the call that noticed the outage for its backoff.
            .set_number_of_retries(0);
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), manager.clone()).map_err(LimitError::Config)?;
        let link = Arc::new(Link {
            client,
            manager,
            conn: RwLock::new(conn),
            health: Health::new("redis"),
            wake: Notify::new(),
            policy: config.policy,
            timeout: config.timeout,
            probe_interval: config.probe_interval.max(PROBE_MIN),
        });
        let watcher = tokio::spawn(watch(link.clone()));
        Ok(Self {
            link,
            prefix: config.key_prefix,
            policy: config.policy,
            rate_script: Script::new(RATE_SCRIPT),
            refund_script: Script::new(REFUND_SCRIPT),
            quota_script: Script::new(QUOTA_SCRIPT),
            seed: None,
            seed_health: Health::new("quota_store"),
            local: MemoryLimiter::new(MemoryConfig { max_subjects: LOCAL_SUBJECTS, ..MemoryConfig::default() }),
            watcher,
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

    /// One `PING`, bounded by the timeout, whatever the breaker says.
    pub async fn ping(&self) -> Result<(), LimitError> {
        self.link.run(|mut conn| async move { ping(&mut conn).await }).await
    }

    /// Whether the breaker is closed: Redis answered the last call or probe.
    pub fn is_up(&self) -> bool {
        self.link.health.is_up()
    }

    /// A call to Redis failed: the breaker opens (the probe task is woken when this began it).
    fn failed(&self, op: Op, by: DecidedBy, error: &LimitError) {
        if self.link.health.failed(op, by, self.policy, error) {
            self.link.wake.notify_one();
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
        let invocation = &invocation;
        let reply: Vec<i64> = self.link.run(|mut conn| async move { invocation.invoke_async(&mut conn).await }).await?;
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
        let invocation = &invocation;
        let reply: Vec<String> =
            self.link.run(|mut conn| async move { invocation.invoke_async(&mut conn).await }).await?;
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
        let by = DecidedBy::Policy(self.policy);
        // The breaker is open: the policy answers at once, Redis is not asked.
        if !self.link.health.is_up() {
            self.link.health.count(Op::Rate, by);
            return RateDecision::degraded(limits, self.policy.allows());
        }
        match self.rate_in_redis(subject, limits, cost, now.timestamp_micros()).await {
            Ok(d) => {
                self.link.health.succeeded();
                d
            }
            Err(error) => {
                self.failed(Op::Rate, by, &error);
                RateDecision::degraded(limits, self.policy.allows())
            }
        }
    }

    async fn check_or_local(&self, subject: &str, limits: &RateLimits, cost: u64, now: DateTime<Utc>) -> RateDecision {
        if limits.is_unlimited() {
            return RateDecision::UNLIMITED;
        }
        if self.link.health.is_up() {
            match self.rate_in_redis(subject, limits, cost, now.timestamp_micros()).await {
                Ok(d) => {
                    self.link.health.succeeded();
                    return d;
                }
                Err(error) => self.failed(Op::Rate, DecidedBy::Local, &error),
            }
        } else {
            self.link.health.count(Op::Rate, DecidedBy::Local);
        }
        // SECURITY: this node's own count. Each node counts apart, so N nodes admit at most N times
        // the limit during an outage: bounded, never open, and a refusal is a true one (its figures
        // are counts, so the decision is not `degraded`).
        self.local.check_sync(subject, limits, cost, now)
    }

    async fn refund(&self, subject: &str, limits: &RateLimits, cost: u64, now: DateTime<Utc>) {
        if limits.is_unlimited() || !self.link.health.is_up() {
            return;
        }
        let mut invocation = self.refund_script.key(format!("{}:w:{subject}", self.prefix));
        invocation.arg(now.timestamp_micros()).arg(cost.min(MAX_COST));
        for r in limits.rules().into_iter().flatten() {
            invocation.arg(r.window.name()).arg(r.interval);
        }
        let invocation = &invocation;
        // Not a decision: a failure is noticed (and counted) by the next one.
        if let Err(error) =
            self.link.run(|mut conn| async move { invocation.invoke_async::<i64>(&mut conn).await }).await
        {
            tracing::debug!(%error, "giving back a rate-limit unit failed");
        }
    }

    async fn consume_quota(&self, subject: &str, limit: Option<u64>, cost: u64, now: DateTime<Utc>) -> QuotaDecision {
        let by = DecidedBy::Policy(self.policy);
        if !self.link.health.is_up() {
            self.link.health.count(Op::Quota, by);
            return QuotaDecision::degraded(limit, self.policy.allows(), now);
        }
        match self.quota(subject, limit, cost, now).await {
            Ok(d) => {
                self.link.health.succeeded();
                d
            }
            Err(Fault::Redis(error)) => {
                self.failed(Op::Quota, by, &error);
                QuotaDecision::degraded(limit, self.policy.allows(), now)
            }
            Err(Fault::Seed(error)) => {
                self.seed_health.failed(Op::Quota, by, self.policy, &error);
                QuotaDecision::degraded(limit, self.policy.allows(), now)
            }
        }
    }

    fn health(&self) -> LimiterHealth {
        self.link.health.status()
    }
}

impl Link {
    /// The connection of the moment: a clone of a handle (no allocation), replaced on recovery.
    fn conn(&self) -> ConnectionManager {
        self.conn.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// `call` on the current connection, all of it bounded by `timeout`. A connection found dropped
    /// or refused (Redis restarted while this node was idle) is tried once more: the manager has
    /// begun reconnecting, and the second call waits for that. Never after a timeout, which may
    /// mean the script ran.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T, LimitError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let attempts = async {
            match call(self.conn()).await {
                Err(e) if e.is_connection_dropped() || e.is_connection_refusal() => call(self.conn()).await,
                other => other,
            }
        };
        match tokio::time::timeout(self.timeout, attempts).await {
            Ok(r) => r.map_err(LimitError::from),
            Err(_) => Err(LimitError::Timeout(self.timeout)),
        }
    }

    /// A new connection, proven by a `PING`, in place of the old one. The old manager may hold a
    /// failed connection attempt it would only retry on the next call's error: a fresh one means
    /// the first decision after a recovery succeeds.
    async fn reconnect(&self) -> Result<(), LimitError> {
        let fresh = async {
            let mut conn = ConnectionManager::new_with_config(self.client.clone(), self.manager.clone()).await?;
            ping(&mut conn).await?;
            Ok::<_, ::redis::RedisError>(conn)
        };
        let conn = match tokio::time::timeout(self.timeout, fresh).await {
            Ok(r) => r?,
            Err(_) => return Err(LimitError::Timeout(self.timeout)),
        };
        *self.conn.write().unwrap_or_else(PoisonError::into_inner) = conn;
        Ok(())
    }
}

async fn ping(conn: &mut ConnectionManager) -> RedisResult<()> {
    ::redis::cmd("PING").query_async::<String>(conn).await.map(drop)
}

/// The probe task: a heartbeat while Redis is up, probes with backoff while it is down.
async fn watch(link: Arc<Link>) {
    let mut pause = PROBE_MIN;
    loop {
        if link.health.is_up() {
            pause = PROBE_MIN;
            // Also connects the lazy manager at start, so the first request finds it warm.
            if let Err(error) = link.run(|mut conn| async move { ping(&mut conn).await }).await {
                link.health.went_down(link.policy, &error);
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(link.probe_interval) => {}
                () = link.wake.notified() => {}
            }
            continue;
        }
        tokio::time::sleep(pause).await;
        match link.reconnect().await {
            Ok(()) => {
                link.health.succeeded();
            }
            Err(error) => {
                tracing::debug!(%error, "Redis probe failed");
                pause = (pause * 2).min(link.probe_interval);
                link.health.publish_degraded();
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
