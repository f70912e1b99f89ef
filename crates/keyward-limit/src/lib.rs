//! Keyward's rate limiter and monthly quota: the [`Limiter`] trait, an in-memory implementation
//! ([`MemoryLimiter`], one node) and a Redis one ([`RedisLimiter`], any number of nodes), with the
//! [`FailurePolicy`] that applies when Redis cannot be reached.
//!
//! # Algorithm: GCRA
//!
//! Each window (minute, hour, day) is a GCRA bucket, the math of which lives in
//! [`keyward_core::limits`] so that both implementations (and the Lua script) share one definition.
//! GCRA was chosen over a sliding-window counter because:
//!
//! - **It is exact.** Its definition (a bucket of `limit` units refilled at `limit / period`) is
//!   computed in integer microseconds with no estimate: from idle, exactly `limit` requests pass at
//!   once (free tier: the 61st in a minute is denied), then one unit frees every `period / limit`
//!   (1 s on free), and `Retry-After` is exactly when the request will pass. A sliding-window
//!   counter *estimates* the previous window's contribution by assuming uniform traffic, so it is
//!   wrong both ways when traffic is bursty and its `remaining`/`reset` are approximations.
//! - **One integer per window, no alignment.** State is 3 × `i64` per subject (O(1)), the same in
//!   memory and in a Redis hash; there are no window boundaries at which every client resets at once.
//! - **Idle state is no state.** Once a subject's buckets are full again its entry decides exactly like
//!   no entry, so the memory limiter evicts idle subjects and Redis expires them (TTL = time to full)
//!   without any loss of accuracy.
//!
//! Accuracy, stated precisely: the admitted cost in any span of length `t` is at most
//! `limit + floor(t / interval)` per window (a client idle before may spend its full burst, then
//! continues at the refill rate; so up to twice the limit in one period right after an idle period,
//! never more than `limit` per period sustained). When a period is not a whole number of
//! microseconds per unit the interval rounds *up*, so refill is at most 1 µs per unit slower than
//! nominal, never faster. Decisions use the caller's `now` (never the system clock): on Redis, the
//! nodes' clocks are the time base, so a clock skew of `δ` between nodes can admit at most
//! `δ / interval` extra units (keep nodes on NTP).
//!
//! `cost` counts against every window; `cost = 0` consumes nothing and reports the state (a peek,
//! for `GET /v1/me`); a denied request consumes nothing in any window.
//!
//! # Subjects
//!
//! A subject is an opaque string, and its state is shared by every limit set it is checked against,
//! so give each use its own namespace: `key:{key_id}` for tier limits, `ip-mgmt:{ip}`,
//! `ip-auth-fail:{ip}`, `org-create-key:{org_id}` for self-protection. Changing a subject's limits
//! (a plan change) keeps its state, and the new limits apply at once.
//!
//! # Monthly quota
//!
//! [`Limiter::consume_quota`] counts cost per subject per UTC calendar month and denies (spending
//! nothing) once `used + cost` would exceed the limit. Counts are seeded, the first time a
//! subject's month is seen (by this process, or by Redis), from a [`QuotaSeed`]: the durable store's
//! count for that month. Without one, counts start at 0 on each restart (in memory) or when Redis
//! loses the counter.

mod health;
mod memory;
mod redis;
mod shard;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use keyward_core::limits::{QuotaDecision, RateDecision, RateLimits, Window, WindowStatus};
pub use memory::{MemoryConfig, MemoryLimiter};
pub use redis::{RedisConfig, RedisLimiter};

/// Checks and consumes rate limits and monthly quotas. Every decision takes `now`, read by the
/// caller from its [`keyward_core::Clock`], so tests are exact and nothing here reads the time.
///
/// The methods never fail: when the backing store cannot be reached, the implementation applies
/// its [`FailurePolicy`] and marks the decision `degraded`.
#[async_trait]
pub trait Limiter: Send + Sync + fmt::Debug {
    /// Checks `cost` against every window of `limits` for `subject` and consumes it in all of them
    /// only if every window admits it.
    async fn check(&self, subject: &str, limits: &RateLimits, cost: u64, now: DateTime<Utc>) -> RateDecision;

    /// Checks `cost` against `subject`'s quota for `now`'s UTC month (`limit: None`: count only) and
    /// consumes it only if it fits.
    async fn consume_quota(&self, subject: &str, limit: Option<u64>, cost: u64, now: DateTime<Utc>) -> QuotaDecision;

    /// Gives back `cost` that an admitting [`Limiter::check`] of `subject` consumed, for a request
    /// refused after it for another reason (its quota, the failure policy): only its rate limit may
    /// make a key rate-limited. Best effort: a limiter that cannot reach its backend gives nothing
    /// back, and one that keeps no count has nothing to give.
    async fn refund(&self, _subject: &str, _limits: &RateLimits, _cost: u64, _now: DateTime<Utc>) {}

    /// [`Limiter::check`] with the usual cost of 1.
    async fn hit(&self, subject: &str, limits: &RateLimits, now: DateTime<Utc>) -> RateDecision {
        self.check(subject, limits, 1, now).await
    }

    /// [`Limiter::check`] for a limit that must hold through an outage of the shared backend
    /// (Keyward's protection of itself: failed authentications, the management API, key creation).
    /// While the backend is down this node decides from its own memory instead of applying the
    /// [`FailurePolicy`]: its figures are real counts (this node's only), so the decision is not
    /// `degraded` and a refusal is a true one: an outage neither opens the limit (N nodes admit at
    /// most N times it) nor locks anybody out. [`Limiter::health`] says the backend is down. A
    /// limiter with no shared backend decides as [`Limiter::check`] does.
    async fn check_or_local(&self, subject: &str, limits: &RateLimits, cost: u64, now: DateTime<Utc>) -> RateDecision {
        self.check(subject, limits, cost, now).await
    }

    /// Whether the shared backend answers, and the time spent without it (for `/readyz`). A
    /// limiter with nothing to lose is always up.
    fn health(&self) -> LimiterHealth {
        LimiterHealth { up: true, degraded_for: None, degraded_total: Duration::ZERO }
    }
}

/// The health of a limiter's shared backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimiterHealth {
    /// The backend answers: decisions are exact. While false, every decision is `degraded`.
    pub up: bool,
    /// How long the current outage has lasted (`None` while up).
    pub degraded_for: Option<Duration>,
    /// Time spent degraded since this limiter was made, the current outage included.
    pub degraded_total: Duration,
}

/// What a limiter does when it cannot decide (Redis unreachable, quota store failing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Admit the request: availability over enforcement (the default).
    #[default]
    FailOpen,
    /// Deny the request (`Retry-After: 1`): enforcement over availability.
    FailClosed,
}

impl FailurePolicy {
    /// `fail_open` / `fail_closed`: the config value and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailOpen => "fail_open",
            Self::FailClosed => "fail_closed",
        }
    }

    pub fn allows(self) -> bool {
        self == Self::FailOpen
    }
}

/// The durable count of a monthly quota: how much a subject has already spent in a month. The
/// limiter asks only when it does not know the month's count yet (first use after a start, after
/// eviction, or when Redis lost the counter); the store is kept current by the usage writer.
#[async_trait]
pub trait QuotaSeed: Send + Sync + fmt::Debug {
    /// Units `subject` has spent in the UTC month that starts at `month_start`.
    async fn used_in_month(&self, subject: &str, month_start: DateTime<Utc>) -> Result<u64, LimitError>;
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("invalid Redis configuration: {0}")]
    Config(#[source] ::redis::RedisError),
    #[error("Redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply from the limiter script: {0}")]
    Protocol(String),
    #[error("quota store: {0}")]
    Seed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The names of this crate's metrics.
pub mod metric {
    /// Counter: decisions taken without the backend, labels `backend` (`redis`, `quota_store`),
    /// `op` (`rate`, `quota`) and `policy` (`fail_open`, `fail_closed`, or `local`: this node's
    /// own count, see [`crate::Limiter::check_or_local`]).
    pub const ERRORS: &str = "keyward_limiter_errors_total";
    /// Gauge: 1 while the backend answers, 0 during an outage; label `backend`.
    pub const BACKEND_UP: &str = "keyward_limiter_backend_up";
    /// Gauge, only ever growing: seconds spent without the backend since the process started
    /// (updated while an outage lasts, not only when it ends); label `backend`.
    pub const DEGRADED_SECONDS: &str = "keyward_limiter_degraded_seconds_total";
}
