//! Outage bookkeeping shared by the limiters: one warning when a backend goes down, one line when
//! it is back, a counter per decision taken by the failure policy.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::{FailurePolicy, LimitError, metric};

#[derive(Debug)]
pub(crate) struct Health {
    backend: &'static str,
    up: AtomicBool,
}

impl Health {
    pub(crate) fn new(backend: &'static str) -> Self {
        Self { backend, up: AtomicBool::new(true) }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// A decision fell to `policy` because of `error`. Returns whether this began an outage (and so
    /// was logged): the log says it once per outage, the counter counts every decision.
    pub(crate) fn failed(&self, op: &'static str, policy: FailurePolicy, error: &LimitError) -> bool {
        metrics::counter!(metric::ERRORS, "backend" => self.backend, "op" => op, "policy" => policy.as_str())
            .increment(1);
        let began = self.up.swap(false, Ordering::AcqRel);
        if began {
            metrics::gauge!(metric::BACKEND_UP, "backend" => self.backend).set(0.0);
            tracing::warn!(
                backend = self.backend,
                policy = policy.as_str(),
                %error,
                "rate limiter backend unreachable: requests are {} until it answers again",
                if policy.allows() { "admitted without limits" } else { "denied" }
            );
        }
        began
    }

    /// A decision was taken normally. Returns whether this ended an outage.
    pub(crate) fn succeeded(&self) -> bool {
        if self.up.load(Ordering::Relaxed) {
            return false;
        }
        let ended = !self.up.swap(true, Ordering::AcqRel);
        if ended {
            metrics::gauge!(metric::BACKEND_UP, "backend" => self.backend).set(1.0);
            tracing::info!(backend = self.backend, "rate limiter backend answers again: limits enforced");
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_logged_once_and_its_end_once() {
        let h = Health::new("redis");
        let err = || LimitError::Timeout(std::time::Duration::from_millis(5));
        assert!(!h.succeeded());
        assert!(h.failed("rate", FailurePolicy::FailOpen, &err()));
        assert!(!h.failed("rate", FailurePolicy::FailOpen, &err()));
        assert!(!h.failed("quota", FailurePolicy::FailOpen, &err()));
        assert!(!h.is_up());
        assert!(h.succeeded());
        assert!(!h.succeeded());
        assert!(h.failed("rate", FailurePolicy::FailClosed, &err()));
    }
}
