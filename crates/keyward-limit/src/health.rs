//! Outage bookkeeping shared by the limiters: one warning when a backend goes down, one line when
//! it is back, a counter per decision taken without it, and the time spent degraded.
//!
//! Metric handles are registered once and kept: a decision taken during an outage is on the hot
//! path, and must cost no more than the policy it applies (no label vector, no registry lookup).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge};

use crate::{FailurePolicy, LimitError, LimiterHealth, metric};

/// What a decision that could not reach its backend was: a rate check or a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Rate,
    Quota,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Self::Rate => "rate",
            Self::Quota => "quota",
        }
    }
}

/// Who took a decision the backend could not: the configured policy, or this node's own memory
/// (limits that hold through an outage, `Limiter::check_or_local`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecidedBy {
    Policy(FailurePolicy),
    Local,
}

impl DecidedBy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Policy(p) => p.as_str(),
            Self::Local => "local",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Policy(FailurePolicy::FailOpen) => 0,
            Self::Policy(FailurePolicy::FailClosed) => 1,
            Self::Local => 2,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Health {
    backend: &'static str,
    up: AtomicBool,
    epoch: Instant,
    /// When the current outage began, in µs since `epoch` (meaningful while down).
    down_since: AtomicU64,
    /// Outages that ended, in µs.
    degraded_before: AtomicU64,
    /// `keyward_limiter_errors_total`, per op × decided-by.
    errors: [OnceLock<Counter>; 6],
    up_gauge: OnceLock<Gauge>,
    degraded_gauge: OnceLock<Gauge>,
}

impl Health {
    pub(crate) fn new(backend: &'static str) -> Self {
        Self {
            backend,
            up: AtomicBool::new(true),
            epoch: Instant::now(),
            down_since: AtomicU64::new(0),
            degraded_before: AtomicU64::new(0),
            errors: Default::default(),
            up_gauge: OnceLock::new(),
            degraded_gauge: OnceLock::new(),
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn micros(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Up or down, and for how long it has been degraded (now and in total).
    pub(crate) fn status(&self) -> LimiterHealth {
        let before = self.degraded_before.load(Ordering::Acquire);
        if self.is_up() {
            return LimiterHealth { up: true, degraded_for: None, degraded_total: Duration::from_micros(before) };
        }
        let current = self.micros().saturating_sub(self.down_since.load(Ordering::Acquire));
        LimiterHealth {
            up: false,
            degraded_for: Some(Duration::from_micros(current)),
            degraded_total: Duration::from_micros(before.saturating_add(current)),
        }
    }

    /// Counts one decision taken without the backend.
    pub(crate) fn count(&self, op: Op, by: DecidedBy) {
        let slot = (op as usize) * 3 + by.index();
        self.errors[slot]
            .get_or_init(|| {
                metrics::counter!(metric::ERRORS, "backend" => self.backend, "op" => op.as_str(), "policy" => by.as_str())
            })
            .increment(1);
    }

    /// A decision fell to `by` because of `error`: counted, and the outage begins if it had not.
    /// Returns whether this began an outage.
    pub(crate) fn failed(&self, op: Op, by: DecidedBy, policy: FailurePolicy, error: &LimitError) -> bool {
        self.count(op, by);
        self.went_down(policy, error)
    }

    /// The backend is unreachable (a decision or a probe failed). Returns whether this began an
    /// outage (and so was logged: once per outage).
    pub(crate) fn went_down(&self, policy: FailurePolicy, error: &LimitError) -> bool {
        let now = self.micros();
        let began = self.up.swap(false, Ordering::AcqRel);
        if began {
            self.down_since.store(now, Ordering::Release);
            self.up_gauge().set(0.0);
            tracing::warn!(
                backend = self.backend,
                policy = policy.as_str(),
                %error,
                "rate limiter backend unreachable: requests are {} until it answers again",
                if policy.allows() { "admitted without limits" } else { "refused (limiter_unavailable)" }
            );
        }
        began
    }

    /// The backend answered. Returns whether this ended an outage.
    pub(crate) fn succeeded(&self) -> bool {
        if self.is_up() {
            return false;
        }
        let now = self.micros();
        let ended = !self.up.swap(true, Ordering::AcqRel);
        if ended {
            let lasted = now.saturating_sub(self.down_since.load(Ordering::Acquire));
            self.degraded_before.fetch_add(lasted, Ordering::AcqRel);
            self.up_gauge().set(1.0);
            self.publish_degraded();
            tracing::info!(
                backend = self.backend,
                degraded_ms = lasted / 1000,
                "rate limiter backend answers again: limits enforced"
            );
        }
        ended
    }

    /// Sets `keyward_limiter_degraded_seconds_total` to the time spent degraded so far (called
    /// while an outage lasts, so that the metric grows during it, not only once it ends).
    pub(crate) fn publish_degraded(&self) {
        let total = self.status().degraded_total.as_secs_f64();
        self.degraded_gauge
            .get_or_init(|| metrics::gauge!(metric::DEGRADED_SECONDS, "backend" => self.backend))
            .set(total);
    }

    fn up_gauge(&self) -> &Gauge {
        self.up_gauge.get_or_init(|| metrics::gauge!(metric::BACKEND_UP, "backend" => self.backend))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_logged_once_and_its_end_once_and_its_time_is_kept() {
        let h = Health::new("redis");
        let err = || LimitError::Timeout(std::time::Duration::from_millis(5));
        let open = DecidedBy::Policy(FailurePolicy::FailOpen);
        assert!(!h.succeeded());
        assert_eq!(h.status(), LimiterHealth { up: true, degraded_for: None, degraded_total: Duration::ZERO });
        assert!(h.failed(Op::Rate, open, FailurePolicy::FailOpen, &err()));
        assert!(!h.failed(Op::Rate, open, FailurePolicy::FailOpen, &err()));
        assert!(!h.failed(Op::Quota, DecidedBy::Local, FailurePolicy::FailOpen, &err()));
        assert!(!h.went_down(FailurePolicy::FailOpen, &err()));
        assert!(!h.is_up());
        let down = h.status();
        assert!(!down.up && down.degraded_for.is_some() && down.degraded_total == down.degraded_for.unwrap());
        assert!(h.succeeded());
        assert!(!h.succeeded());
        let up = h.status();
        assert!(up.up && up.degraded_for.is_none() && up.degraded_total >= down.degraded_total);
        assert!(h.failed(Op::Rate, DecidedBy::Policy(FailurePolicy::FailClosed), FailurePolicy::FailClosed, &err()));
        assert!(h.status().degraded_total >= up.degraded_total, "the total only grows");
    }
}
