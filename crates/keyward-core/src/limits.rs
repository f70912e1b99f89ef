//! Rate-limit and quota math: GCRA for the minute/hour/day windows, UTC calendar months for the
//! monthly quota. Pure and synchronous: every function takes `now`, so tests are exact and the two
//! stateful limiters of `keyward-limit` (in memory, and a Lua script on Redis) share one definition.
//!
//! # GCRA, in microseconds
//!
//! A window allowing `limit` requests per `period` is a bucket of `limit` tokens refilled at
//! `limit / period`. GCRA stores one number per window, the *theoretical arrival time* `tat`: the
//! instant at which the bucket would be full again. A request of `cost` at `now` is admitted iff
//!
//! ```text
//! max(tat, now) + cost * interval - now <= capacity      where interval = ceil(period / limit)
//!                                                              capacity = interval * limit
//! ```
//!
//! and then `tat` becomes `max(tat, now) + cost * interval`; a denied request changes nothing.
//! Everything is an integer number of microseconds (the resolution of `ManualClock`, and small
//! enough that the Redis script's doubles stay exact, below 2^53). Consequences:
//!
//! - **Exact burst**: from idle, exactly `limit` requests (of cost 1) pass at one instant, the next is
//!   denied (60/min: the 61st is denied).
//! - **Exact refill**: one unit frees every `interval`; the whole window frees `capacity` after the
//!   last admitted request. When `period` is not a multiple of `limit` (in µs) the interval is
//!   rounded *up*, so refill is slower by less than 1 µs per unit: never more than the limit.
//! - **Sustained rate** never exceeds `limit` per `period`. Unlike a fixed window there is no
//!   boundary burst of twice the limit; like every token bucket, a client that was idle may spend
//!   its whole burst and then continue at the refill rate (at most `limit + t * limit / period`
//!   requests in any span of length `t`).
//! - A state equal to "full bucket" (`tat <= now`) is the same as no state, so idle entries can be
//!   dropped without changing any decision (that is how the limiters bound their memory).
//!
//! `limit = 0` blocks every request of cost ≥ 1. `cost = 0` admits and consumes nothing: a peek at
//! the current state (for `GET /v1/me`).

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

pub const MICROS_PER_SEC: i64 = 1_000_000;

/// Limits above this are clamped (2^40 ≈ 1.1 × 10^12 per window), which keeps every number the Redis
/// script handles below 2^53.
pub const MAX_LIMIT: u64 = 1 << 40;

/// Costs above this are clamped (such a request is denied by any limit that [`MAX_LIMIT`] allows).
pub const MAX_COST: u64 = 1 << 41;

/// A rate-limit window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    Minute,
    Hour,
    Day,
}

impl Window {
    pub const ALL: [Window; 3] = [Window::Minute, Window::Hour, Window::Day];

    pub fn period_secs(self) -> i64 {
        match self {
            Self::Minute => 60,
            Self::Hour => 3_600,
            Self::Day => 86_400,
        }
    }

    pub fn period_micros(self) -> i64 {
        self.period_secs() * MICROS_PER_SEC
    }

    /// Stable short name: used in `RateLimit-Policy` names, Redis hash fields and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }

    /// Position in [`Window::ALL`] (and in every per-window array of this module).
    pub fn index(self) -> usize {
        match self {
            Self::Minute => 0,
            Self::Hour => 1,
            Self::Day => 2,
        }
    }
}

/// Requests allowed per window; `None`: that window does not apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RateLimits {
    pub per_minute: Option<u64>,
    pub per_hour: Option<u64>,
    pub per_day: Option<u64>,
}

impl RateLimits {
    pub const UNLIMITED: RateLimits = RateLimits { per_minute: None, per_hour: None, per_day: None };

    /// Only a per-minute limit (the self-protection limits: management API, failed authentications).
    pub const fn per_minute(limit: u64) -> Self {
        Self { per_minute: Some(limit), per_hour: None, per_day: None }
    }

    pub fn get(&self, window: Window) -> Option<u64> {
        match window {
            Window::Minute => self.per_minute,
            Window::Hour => self.per_hour,
            Window::Day => self.per_day,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        *self == Self::UNLIMITED
    }

    /// The GCRA parameters of each window that applies, indexed by [`Window::index`].
    pub fn rules(&self) -> [Option<Gcra>; 3] {
        // Spelled out rather than `Window::ALL.map(..)`: this is the hot path, and array `map`
        // does not inline as well.
        [
            self.per_minute.map(|l| Gcra::new(Window::Minute, l)),
            self.per_hour.map(|l| Gcra::new(Window::Hour, l)),
            self.per_day.map(|l| Gcra::new(Window::Day, l)),
        ]
    }
}

/// One window's GCRA parameters, in microseconds (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    pub window: Window,
    pub limit: u64,
    /// Time for one unit to free.
    pub interval: i64,
    /// Time for the whole window to free: `interval * limit` (0 when `limit` is 0).
    pub capacity: i64,
}

impl Gcra {
    pub fn new(window: Window, limit: u64) -> Self {
        let limit = limit.min(MAX_LIMIT);
        let period = window.period_micros();
        if limit == 0 {
            return Self { window, limit, interval: period, capacity: 0 };
        }
        // Lossless: limit <= 2^40 fits an i64.
        let l = limit as i64;
        let interval = (period + l - 1) / l;
        Self { window, limit, interval, capacity: interval * l }
    }

    /// `tat` as it stands at `now`: never in the past.
    fn base(&self, tat: Option<i64>, now: i64) -> i64 {
        tat.map_or(now, |t| t.max(now))
    }

    /// The `tat` after admitting `cost` (saturating: a huge cost is simply denied).
    fn advanced(&self, base: i64, cost: u64) -> i64 {
        let cost = cost.min(MAX_COST) as i64;
        base.saturating_add(cost.saturating_mul(self.interval))
    }

    /// Would `cost` be admitted at `now` with state `tat`?
    pub fn admits(&self, tat: Option<i64>, now: i64, cost: u64) -> bool {
        self.advanced(self.base(tat, now), cost) - now <= self.capacity
    }

    /// The state after admitting `cost` (call only when [`Gcra::admits`]).
    pub fn consume(&self, tat: Option<i64>, now: i64, cost: u64) -> i64 {
        self.advanced(self.base(tat, now), cost)
    }

    /// What a client sees of this window with state `tat` after the decision; `denied_cost` is the
    /// cost of a denied request (to say when it would pass), `None` when the request was admitted.
    pub fn status(&self, tat: Option<i64>, now: i64, denied_cost: Option<u64>) -> WindowStatus {
        let used = self.base(tat, now) - now;
        let free = (self.capacity - used).max(0);
        let remaining = if self.limit == 0 { 0 } else { (free / self.interval) as u64 };
        let retry_after_micros = denied_cost.map(|cost| {
            if self.capacity == 0 || cost.min(MAX_COST) > self.limit {
                // Never passes: say "not before the window is whole again", at least a period.
                used.max(self.window.period_micros())
            } else {
                (self.advanced(self.base(tat, now), cost) - self.capacity - now).max(0)
            }
        });
        WindowStatus { window: self.window, limit: self.limit, remaining, reset_micros: used, retry_after_micros }
    }
}

/// One window as a client sees it after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowStatus {
    pub window: Window,
    pub limit: u64,
    /// Units that could be spent now.
    pub remaining: u64,
    /// Time until the window is whole again (`remaining == limit`).
    pub reset_micros: i64,
    /// Denied only: time until the same request would be admitted by this window.
    pub retry_after_micros: Option<i64>,
}

impl WindowStatus {
    /// `reset_micros` in whole seconds, rounded up (a client that waits that long is never early).
    pub fn reset_secs(&self) -> u64 {
        ceil_secs(self.reset_micros)
    }

    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after_micros.map(ceil_secs)
    }
}

/// Microseconds to whole seconds, rounded up; negative is 0.
pub fn ceil_secs(micros: i64) -> u64 {
    let micros = micros.max(0) as u64;
    micros.div_ceil(MICROS_PER_SEC as u64)
}

/// The answer of a rate-limit check over every window of one subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// Indexed by [`Window::index`]; `None` for windows that do not apply.
    pub windows: [Option<WindowStatus>; 3],
    /// The limiter could not decide (Redis unreachable) and applied its failure policy: `allowed` is
    /// the policy, and the window figures are the configured limits, not counts.
    pub degraded: bool,
}

impl RateDecision {
    /// Every window admits everything (no limits apply).
    pub const UNLIMITED: RateDecision = RateDecision { allowed: true, windows: [None; 3], degraded: false };

    /// The decision for states `tats` *after* the decision was applied (so `allowed` consumed
    /// `cost`, a denial consumed nothing). The memory limiter and the Redis script both end here.
    pub fn from_tats(limits: &RateLimits, tats: &[Option<i64>; 3], now: i64, cost: u64, allowed: bool) -> Self {
        Self::from_rules(&limits.rules(), tats, now, cost, allowed)
    }

    fn from_rules(rules: &[Option<Gcra>; 3], tats: &[Option<i64>; 3], now: i64, cost: u64, allowed: bool) -> Self {
        let denied_cost = (!allowed).then_some(cost);
        let status = |i: usize| rules[i].map(|r| r.status(tats[i], now, denied_cost));
        Self { allowed, windows: [status(0), status(1), status(2)], degraded: false }
    }

    /// Check `cost` against every window and, only if all admit it, consume it in every window.
    pub fn decide(limits: &RateLimits, tats: &mut [Option<i64>; 3], now: i64, cost: u64) -> Self {
        let rules = limits.rules();
        let allowed = rules.iter().flatten().all(|r| r.admits(tats[r.window.index()], now, cost));
        if allowed && cost > 0 {
            for r in rules.iter().flatten() {
                let i = r.window.index();
                tats[i] = Some(r.consume(tats[i], now, cost));
            }
        }
        Self::from_rules(&rules, tats, now, cost, allowed)
    }

    /// Gives back `cost` that [`RateDecision::decide`] consumed in every window, for a request the
    /// rate limit admitted and something after it refused: a refusal for another reason must not
    /// use up the rate limit. Never past a full bucket (`None`).
    pub fn refund(limits: &RateLimits, tats: &mut [Option<i64>; 3], now: i64, cost: u64) {
        for r in limits.rules().iter().flatten() {
            let i = r.window.index();
            let back = (cost.min(MAX_COST) as i64).saturating_mul(r.interval);
            tats[i] = tats[i].map(|t| t.saturating_sub(back)).filter(|&t| t > now);
        }
    }

    /// The decision of a limiter that could not decide and applies its failure policy.
    pub fn degraded(limits: &RateLimits, allowed: bool) -> Self {
        let retry_after_micros = (!allowed).then_some(MICROS_PER_SEC);
        let windows = limits.rules().map(|rule| {
            rule.map(|r| WindowStatus {
                window: r.window,
                limit: r.limit,
                remaining: if allowed { r.limit } else { 0 },
                reset_micros: 0,
                retry_after_micros,
            })
        });
        Self { allowed, windows, degraded: true }
    }

    /// The windows that apply, shortest first.
    pub fn statuses(&self) -> impl Iterator<Item = &WindowStatus> {
        self.windows.iter().flatten()
    }

    /// The window to report in `RateLimit`/`X-RateLimit-*`: when denied, the one that frees last
    /// (it decides `Retry-After`); when admitted, the one with the fewest units left (ties: the one
    /// that takes longest to reset). `None` when no window applies.
    pub fn tightest(&self) -> Option<&WindowStatus> {
        if self.allowed {
            self.statuses().min_by(|a, b| a.remaining.cmp(&b.remaining).then(b.reset_micros.cmp(&a.reset_micros)))
        } else {
            self.statuses().filter(|s| s.retry_after_micros.is_some()).max_by_key(|s| s.retry_after_micros)
        }
    }

    /// Denied only: when the same request would pass every window, in microseconds.
    pub fn retry_after_micros(&self) -> Option<i64> {
        self.statuses().filter_map(|s| s.retry_after_micros).max()
    }

    /// Denied only: `Retry-After` in whole seconds, rounded up.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after_micros().map(ceil_secs)
    }
}

/// The first instant of `now`'s UTC calendar month.
pub fn month_start(now: DateTime<Utc>) -> DateTime<Utc> {
    first_of(now.year(), now.month())
}

/// The first instant of the UTC calendar month after `now`'s: when a monthly quota resets.
pub fn next_month_start(now: DateTime<Utc>) -> DateTime<Utc> {
    if now.month() == 12 { first_of(now.year() + 1, 1) } else { first_of(now.year(), now.month() + 1) }
}

fn first_of(year: i32, month: u32) -> DateTime<Utc> {
    let date = NaiveDate::from_ymd_opt(year, month, 1).unwrap_or_default();
    Utc.from_utc_datetime(&date.and_time(chrono::NaiveTime::MIN))
}

/// `now`'s month as `yyyymm` (e.g. 202605): a stable name for a month's counter.
pub fn month_id(now: DateTime<Utc>) -> u32 {
    (now.year().max(0) as u32) * 100 + now.month()
}

/// A monthly quota as a client sees it after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaDecision {
    pub allowed: bool,
    /// `None`: no quota applies (usage is still counted).
    pub limit: Option<u64>,
    /// Spent this month, after the decision.
    pub used: u64,
    /// `None` when there is no limit.
    pub remaining: Option<u64>,
    /// When the quota resets: the next month's first instant (UTC).
    pub resets_at: DateTime<Utc>,
    /// Time until `resets_at`, in microseconds.
    pub reset_micros: i64,
    /// The limiter could not decide and applied its failure policy (`used` is then 0, unknown).
    pub degraded: bool,
}

impl QuotaDecision {
    /// Check `cost` against a quota of which `used` is spent this month; a denied request spends
    /// nothing. Returns the decision and the new `used`.
    pub fn decide(used: u64, limit: Option<u64>, cost: u64, now: DateTime<Utc>) -> Self {
        let allowed = limit.is_none_or(|l| used.checked_add(cost).is_some_and(|total| total <= l));
        let used = if allowed { used.saturating_add(cost) } else { used };
        Self::from_used(used, limit, allowed, now)
    }

    /// The decision once the new `used` is known (the Redis script decides, this reports).
    pub fn from_used(used: u64, limit: Option<u64>, allowed: bool, now: DateTime<Utc>) -> Self {
        let resets_at = next_month_start(now);
        let reset_micros = (resets_at - now).num_microseconds().unwrap_or(i64::MAX);
        let remaining = limit.map(|l| l.saturating_sub(used));
        Self { allowed, limit, used, remaining, resets_at, reset_micros, degraded: false }
    }

    /// The decision of a limiter that could not decide and applies its failure policy.
    pub fn degraded(limit: Option<u64>, allowed: bool, now: DateTime<Utc>) -> Self {
        Self { degraded: true, ..Self::from_used(0, limit, allowed, now) }
    }

    pub fn reset_secs(&self) -> u64 {
        ceil_secs(self.reset_micros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use proptest::prelude::*;

    const S: i64 = MICROS_PER_SEC;
    /// 2023-11-14T22:13:20Z, in µs: any instant works, GCRA is translation-invariant.
    const T0: i64 = 1_700_000_000 * S;

    fn free() -> RateLimits {
        RateLimits { per_minute: Some(60), per_hour: Some(1_000), per_day: Some(10_000) }
    }

    /// Sends `n` requests of `cost` at `now`; returns how many passed.
    fn burst(limits: &RateLimits, tats: &mut [Option<i64>; 3], now: i64, n: u64, cost: u64) -> u64 {
        (0..n).filter(|_| RateDecision::decide(limits, tats, now, cost).allowed).count() as u64
    }

    /// After a full burst of `n` at `T0`, the whole of it is free again exactly `window` later.
    fn frees_whole_after(limits: &RateLimits, n: u64, window: i64) {
        let mut tats = [None; 3];
        assert_eq!(burst(limits, &mut tats, T0, n, 1), n);
        assert_eq!(burst(limits, &mut tats, T0 + window, n + 1, 1), n);
    }

    #[test]
    fn a_refund_undoes_the_consume_and_never_overfills() {
        let limits = free();
        let now = T0 + S / 2;
        for spent_before in [0, 1, 30, 59] {
            let mut tats = [None; 3];
            burst(&limits, &mut tats, T0, spent_before, 1);
            let before = RateDecision::decide(&limits, &mut tats.clone(), now, 0);
            assert!(RateDecision::decide(&limits, &mut tats, now, 1).allowed);
            RateDecision::refund(&limits, &mut tats, now, 1);
            assert_eq!(RateDecision::decide(&limits, &mut tats, now, 0), before, "{spent_before} spent before");
        }
        let mut full = [None; 3];
        RateDecision::refund(&limits, &mut full, T0, 5);
        assert_eq!(full, [None; 3]);
    }

    #[test]
    fn gcra_parameters() {
        let cases = [
            (Window::Minute, 60, S, 60 * S),
            (Window::Hour, 1_000, 3_600_000, 3_600 * S),
            (Window::Day, 10_000, 8_640_000, 86_400 * S),
            (Window::Day, 10_000_000, 8_640, 86_400 * S),
            // 60 s / 7 is not whole: interval rounds up, capacity exceeds the period by < 7 µs.
            (Window::Minute, 7, 8_571_429, 60 * S + 3),
            (Window::Minute, 0, 60 * S, 0),
            // Above one per µs: the rate is capped at one per µs, the burst stays exact.
            (Window::Minute, 100_000_000, 1, 100_000_000),
        ];
        for (window, limit, interval, capacity) in cases {
            let g = Gcra::new(window, limit);
            assert_eq!((g.interval, g.capacity), (interval, capacity), "{window:?} {limit}");
        }
    }

    #[test]
    fn free_tier_61st_request_in_a_minute_is_denied_and_the_minute_frees_on_time() {
        let limits = free();
        let mut tats = [None; 3];
        for i in 1..=60 {
            let d = RateDecision::decide(&limits, &mut tats, T0, 1);
            assert!(d.allowed, "request {i}");
            let t = d.tightest().copied();
            assert_eq!(t.map(|t| (t.window, t.limit, t.remaining)), Some((Window::Minute, 60, 60 - i)));
        }
        let denied = RateDecision::decide(&limits, &mut tats, T0, 1);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after_micros(), Some(S));
        assert_eq!(denied.retry_after_secs(), Some(1));
        let minute = denied.windows[0].map(|w| (w.remaining, w.reset_secs()));
        assert_eq!(minute, Some((0, 60)));
        // A denial consumed nothing: the hour and day windows still count 60.
        assert_eq!(denied.windows[1].map(|w| w.remaining), Some(940));
        assert_eq!(denied.windows[2].map(|w| w.remaining), Some(9_940));

        // One unit frees each second, exactly on time.
        assert!(!RateDecision::decide(&limits, &mut tats, T0 + S - 1, 1).allowed);
        assert!(RateDecision::decide(&limits, &mut tats, T0 + S, 1).allowed);
        assert!(!RateDecision::decide(&limits, &mut tats, T0 + S, 1).allowed);
        // The whole minute frees 60 s after the last admitted request (at T0 + 1 s).
        assert_eq!(burst(&limits, &mut tats, T0 + 61 * S - 1, 60, 1), 59);
        frees_whole_after(&limits, 60, 60 * S);
    }

    #[test]
    fn hour_window_bounds_the_minutes_and_frees_one_unit_per_3_6_s() {
        let limits = free();
        let mut tats = [None; 3];
        let mut total = 0;
        // A full burst at the start of every minute. The minute window admits 60 each time until
        // the hour's bucket (1,000, refilled one per 3.6 s) binds, at minute 22; from then on it
        // admits exactly what the hour refilled.
        for m in 0..60 {
            total += burst(&limits, &mut tats, T0 + m * 60 * S, 61, 1);
            let hour_cap = ((3_600 * S + m * 60 * S) / 3_600_000) as u64;
            assert_eq!(total, (60 * (m as u64 + 1)).min(hour_cap), "minute {m}");
            let d = RateDecision::decide(&limits, &mut tats, T0 + m * 60 * S, 1);
            let binding = if m < 22 { Window::Minute } else { Window::Hour };
            assert_eq!(d.tightest().map(|t| t.window), Some(binding), "minute {m}");
        }
        // When the hour binds, the next unit frees exactly on time.
        let now = T0 + 59 * 60 * S;
        let wait = RateDecision::decide(&limits, &mut tats, now, 1).retry_after_micros().unwrap_or_default();
        assert!(wait > 0 && wait <= 3_600_000);
        assert!(!RateDecision::decide(&limits, &mut tats, now + wait - 1, 1).allowed);
        assert!(RateDecision::decide(&limits, &mut tats, now + wait, 1).allowed);
    }

    #[test]
    fn day_window_denies_the_10001st_and_frees_after_a_day() {
        let limits = RateLimits { per_minute: None, per_hour: None, per_day: Some(10_000) };
        let mut tats = [None; 3];
        assert_eq!(burst(&limits, &mut tats, T0, 10_001, 1), 10_000);
        let d = RateDecision::decide(&limits, &mut tats, T0, 1);
        assert_eq!(d.tightest().map(|t| (t.reset_secs(), t.retry_after_micros)), Some((86_400, Some(8_640_000))));
        // One µs before the day is whole again, all but one unit has freed.
        assert_eq!(burst(&limits, &mut tats, T0 + 86_400 * S - 1, 10_001, 1), 9_999);
        frees_whole_after(&limits, 10_000, 86_400 * S);
    }

    #[test]
    fn costs_count_and_a_denied_cost_spends_nothing() {
        let limits = RateLimits::per_minute(10);
        let mut tats = [None; 3];
        let cases: [(u64, bool, u64); 6] =
            [(4, true, 6), (6, true, 0), (1, false, 0), (0, true, 0), (11, false, 0), (0, true, 0)];
        for (cost, allowed, remaining) in cases {
            let d = RateDecision::decide(&limits, &mut tats, T0, cost);
            assert_eq!((d.allowed, d.windows[0].map(|w| w.remaining)), (allowed, Some(remaining)), "cost {cost}");
        }
        // Cost above the limit never passes; it is told to wait at least a period.
        let mut fresh = [None; 3];
        let d = RateDecision::decide(&limits, &mut fresh, T0, 11);
        assert_eq!((d.allowed, d.retry_after_secs(), fresh), (false, Some(60), [None; 3]));
        let d = RateDecision::decide(&limits, &mut fresh, T0, 10);
        assert_eq!(d.windows[0].map(|w| (w.remaining, w.reset_secs())), Some((0, 60)));
    }

    #[test]
    fn zero_limit_blocks_and_unlimited_admits_everything() {
        let mut tats = [None; 3];
        let d = RateDecision::decide(&RateLimits::per_minute(0), &mut tats, T0, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_secs(), Some(60));
        let d = RateDecision::decide(&RateLimits::UNLIMITED, &mut tats, T0, u64::MAX);
        assert_eq!(d, RateDecision::UNLIMITED);
        assert_eq!(d.tightest(), None);
        assert_eq!(tats, [None; 3]);
    }

    #[test]
    fn tightest_prefers_fewest_remaining_then_the_longest_reset() {
        let limits = RateLimits { per_minute: Some(10), per_hour: Some(10), per_day: Some(100) };
        let mut tats = [None; 3];
        let d = RateDecision::decide(&limits, &mut tats, T0, 1);
        assert_eq!(d.tightest().map(|t| (t.window, t.remaining)), Some((Window::Hour, 9)));
        let limits = RateLimits { per_minute: Some(2), per_hour: Some(100), per_day: None };
        let d = RateDecision::decide(&limits, &mut [None; 3], T0, 3);
        assert!(!d.allowed);
        assert_eq!(d.tightest().map(|t| t.window), Some(Window::Minute));
    }

    #[test]
    fn degraded_decisions_say_so() {
        let open = RateDecision::degraded(&free(), true);
        assert!(open.allowed && open.degraded);
        assert_eq!(open.retry_after_secs(), None);
        let closed = RateDecision::degraded(&free(), false);
        assert!(!closed.allowed && closed.degraded);
        assert_eq!(closed.retry_after_secs(), Some(1));
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).map(|d| d.with_timezone(&Utc)).unwrap_or_default()
    }

    #[test]
    fn calendar_months() {
        let cases = [
            ("2026-05-17T10:00:00Z", "2026-05-01T00:00:00Z", "2026-06-01T00:00:00Z", 202605),
            ("2026-12-31T23:59:59.999999Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z", 202612),
            ("2027-01-01T00:00:00Z", "2027-01-01T00:00:00Z", "2027-02-01T00:00:00Z", 202701),
            ("2028-02-29T12:00:00Z", "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z", 202802),
        ];
        for (now, start, next, id) in cases {
            let now = at(now);
            assert_eq!((month_start(now), next_month_start(now), month_id(now)), (at(start), at(next), id));
        }
    }

    #[test]
    fn quota_counts_cost_denies_without_spending_and_resets_at_the_month() {
        let now = at("2026-05-31T23:59:59Z");
        /// (used, limit, cost, allowed, used after, remaining)
        type Case = (u64, Option<u64>, u64, bool, u64, Option<u64>);
        let cases: [Case; 6] = [
            (0, Some(10_000), 1, true, 1, Some(9_999)),
            (9_999, Some(10_000), 1, true, 10_000, Some(0)),
            (10_000, Some(10_000), 1, false, 10_000, Some(0)),
            (9_990, Some(10_000), 11, false, 9_990, Some(10)),
            (5, None, 1_000, true, 1_005, None),
            (u64::MAX, Some(u64::MAX), 1, false, u64::MAX, Some(0)),
        ];
        for (used, limit, cost, allowed, used_after, remaining) in cases {
            let d = QuotaDecision::decide(used, limit, cost, now);
            assert_eq!((d.allowed, d.used, d.remaining), (allowed, used_after, remaining), "{used} {limit:?} {cost}");
            assert_eq!((d.resets_at, d.reset_secs()), (at("2026-06-01T00:00:00Z"), 1));
        }
    }

    proptest! {
        /// Any sequence of requests: the admitted cost in a burst never exceeds the limit, a denial
        /// changes no state, and the reported figures are consistent.
        #[test]
        fn gcra_never_admits_more_than_the_limit_plus_refill(
            limit in 0u64..200,
            steps in proptest::collection::vec((0i64..5 * S, 0u64..5), 1..300),
        ) {
            let limits = RateLimits::per_minute(limit);
            let g = Gcra::new(Window::Minute, limit);
            let mut tats = [None; 3];
            let mut now = T0;
            let mut admitted = 0u64;
            for (dt, cost) in steps {
                now += dt;
                let before = tats;
                let d = RateDecision::decide(&limits, &mut tats, now, cost);
                let w = d.windows[0].unwrap_or_else(|| unreachable!());
                if d.allowed {
                    admitted += cost;
                    prop_assert!(w.retry_after_micros.is_none());
                } else {
                    prop_assert_eq!(tats, before);
                    prop_assert!(cost > w.remaining);
                    // Waiting `retry_after` is exactly enough.
                    let wait = w.retry_after_micros.unwrap_or_default();
                    if cost <= limit {
                        prop_assert!(g.admits(tats[0], now + wait, cost));
                        prop_assert!(wait == 0 || !g.admits(tats[0], now + wait - 1, cost));
                    }
                }
                prop_assert!(w.remaining <= limit);
                prop_assert!(w.reset_micros <= g.capacity);
                // Token-bucket bound: burst plus what refilled since the start.
                let refilled = if limit == 0 { 0 } else { ((now - T0) / g.interval) as u64 };
                prop_assert!(admitted <= limit + refilled, "{} > {} + {}", admitted, limit, refilled);
            }
        }

        /// An idle state (tat <= now) decides exactly like no state: dropping it is lossless.
        #[test]
        fn expired_state_equals_no_state(limit in 1u64..1_000, age in 0i64..1_000 * S, cost in 0u64..2_000) {
            let limits = RateLimits { per_minute: Some(limit), per_hour: Some(limit * 10), per_day: None };
            let mut old = [Some(T0 - age), Some(T0 - age), None];
            let mut fresh = [None; 3];
            let a = RateDecision::decide(&limits, &mut old, T0, cost);
            let b = RateDecision::decide(&limits, &mut fresh, T0, cost);
            prop_assert_eq!(a, b);
            let live = |tats: [Option<i64>; 3]| tats.map(|t| t.filter(|&t| t > T0));
            prop_assert_eq!(live(old), live(fresh));
        }

        #[test]
        fn month_bounds_contain_now(secs in 0i64..4_102_444_800) {
            let now = DateTime::from_timestamp(secs, 0).unwrap_or_default();
            let (start, next) = (month_start(now), next_month_start(now));
            prop_assert!(start <= now && now < next);
            prop_assert!(next - start >= Duration::days(28) && next - start <= Duration::days(31));
            prop_assert_eq!(month_start(next - Duration::microseconds(1)), start);
        }
    }
}
