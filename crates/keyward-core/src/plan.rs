//! Plans and the limits a key ends up with: per-key override → organization override → plan.
//!
//! Default plans (docs/architecture.md), all configurable:
//!
//! | plan | per minute | per hour | per day | per month |
//! |---|---:|---:|---:|---:|
//! | `free` | 60 | 1,000 | 10,000 | 10,000 |
//! | `pro` | 600 | 20,000 | 500,000 | none |
//! | `enterprise` | 6,000 | 200,000 | 10,000,000 | none |
//!
//! Paid plans have no monthly quota by default: their daily limits already bound a month (15.5 M and
//! 310 M), and a paid quota is a billing decision set per organization (`monthly_request_limit`) or
//! in the plan's config.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::limits::RateLimits;

/// Every limit that applies to a key; `None`: no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub per_minute: Option<u64>,
    pub per_hour: Option<u64>,
    pub per_day: Option<u64>,
    /// Monthly quota (UTC calendar months), in cost units (1 per request unless told otherwise).
    pub per_month: Option<u64>,
}

impl Limits {
    pub const UNLIMITED: Limits = Limits { per_minute: None, per_hour: None, per_day: None, per_month: None };

    /// The rate-limit windows (minute, hour, day).
    pub fn rate(&self) -> RateLimits {
        RateLimits { per_minute: self.per_minute, per_hour: self.per_hour, per_day: self.per_day }
    }

    /// The first window in which `self` allows more than `bound` (`None`: no limit, the loosest), with
    /// both values; `None` when `self` is at least as tight as `bound` everywhere.
    pub fn looser_than(&self, bound: &Limits) -> Option<LooserWindow> {
        let windows = [
            ("per_minute", self.per_minute, bound.per_minute),
            ("per_hour", self.per_hour, bound.per_hour),
            ("per_day", self.per_day, bound.per_day),
            ("per_month", self.per_month, bound.per_month),
        ];
        windows.into_iter().find_map(|(window, mine, theirs)| match (mine, theirs) {
            (_, None) => None,
            (Some(m), Some(b)) if m <= b => None,
            (mine, Some(bound)) => Some(LooserWindow { window, limit: mine, bound }),
        })
    }
}

/// Where one set of limits allows more than another: `limit` (`None`: unlimited) against `bound`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LooserWindow {
    pub window: &'static str,
    pub limit: Option<u64>,
    pub bound: u64,
}

/// Limits set on an organization or a key, the same windows as [`Limits`]; here `None` means
/// "inherit from the level below", not "no limit".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LimitOverrides(pub Limits);

impl LimitOverrides {
    pub const NONE: LimitOverrides = LimitOverrides(Limits::UNLIMITED);

    /// From the store's signed columns (`rate_limit_per_minute`, …, `monthly_request_limit`). A
    /// negative value cannot be a limit and is read as "inherit" (the API refuses to write one).
    pub fn from_signed(
        per_minute: Option<i64>,
        per_hour: Option<i64>,
        per_day: Option<i64>,
        per_month: Option<i64>,
    ) -> Self {
        let u = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
        Self(Limits { per_minute: u(per_minute), per_hour: u(per_hour), per_day: u(per_day), per_month: u(per_month) })
    }

    /// `self` where set, `base` elsewhere.
    pub fn over(&self, base: Limits) -> Limits {
        let set = &self.0;
        Limits {
            per_minute: set.per_minute.or(base.per_minute),
            per_hour: set.per_hour.or(base.per_hour),
            per_day: set.per_day.or(base.per_day),
            per_month: set.per_month.or(base.per_month),
        }
    }
}

/// The limits of a key, field by field: the key's override, else its organization's override, else
/// the plan (the key's own plan when it names one, else the organization's).
pub fn resolve_limits(plan: &Limits, organization: &LimitOverrides, key: &LimitOverrides) -> Limits {
    key.over(organization.over(*plan))
}

/// The named plans of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Plans(BTreeMap<String, Limits>);

impl Default for Plans {
    fn default() -> Self {
        Self::defaults()
    }
}

impl Plans {
    pub const FREE: &'static str = "free";
    pub const PRO: &'static str = "pro";
    pub const ENTERPRISE: &'static str = "enterprise";

    /// The default tiers (see the module docs).
    pub fn defaults() -> Self {
        let plan =
            |m, h, d, month| Limits { per_minute: Some(m), per_hour: Some(h), per_day: Some(d), per_month: month };
        Self(BTreeMap::from([
            (Self::FREE.to_owned(), plan(60, 1_000, 10_000, Some(10_000))),
            (Self::PRO.to_owned(), plan(600, 20_000, 500_000, None)),
            (Self::ENTERPRISE.to_owned(), plan(6_000, 200_000, 10_000_000, None)),
        ]))
    }

    pub fn new(plans: impl IntoIterator<Item = (String, Limits)>) -> Self {
        Self(plans.into_iter().collect())
    }

    /// The defaults, with each plan of `configured` added or replacing the default of that name.
    pub fn with(mut self, configured: impl IntoIterator<Item = (String, Limits)>) -> Self {
        self.0.extend(configured);
        self
    }

    pub fn get(&self, name: &str) -> Option<&Limits> {
        self.0.get(name)
    }

    /// Plan names, sorted (for validation messages).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The limits of a key: `key_plan` (the key's own plan) or else `org_plan` gives the base, then
    /// the overrides apply. An unknown plan name (removed from config after keys were given it)
    /// resolves to the free plan's limits, or none if the config has no `free` plan either: the
    /// strictest reasonable reading, logged by the caller.
    pub fn resolve(
        &self,
        org_plan: &str,
        key_plan: Option<&str>,
        organization: &LimitOverrides,
        key: &LimitOverrides,
    ) -> Limits {
        let name = key_plan.unwrap_or(org_plan);
        let plan = self.get(name).or_else(|| self.get(Self::FREE)).copied().unwrap_or_default();
        resolve_limits(&plan, organization, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(m: Option<u64>, h: Option<u64>, d: Option<u64>, month: Option<u64>) -> LimitOverrides {
        LimitOverrides(l(m, h, d, month))
    }

    fn l(m: Option<u64>, h: Option<u64>, d: Option<u64>, month: Option<u64>) -> Limits {
        Limits { per_minute: m, per_hour: h, per_day: d, per_month: month }
    }

    #[test]
    fn looser_than_compares_every_window_and_unlimited_is_loosest() {
        let free = Plans::defaults().get("free").copied().unwrap_or_default();
        let enterprise = Plans::defaults().get("enterprise").copied().unwrap_or_default();
        let found = enterprise.looser_than(&free).map(|w| (w.window, w.limit, w.bound));
        assert_eq!(found, Some(("per_minute", Some(6_000), 60)));
        assert_eq!(free.looser_than(&enterprise), None, "tighter everywhere; no bound on the month");
        assert_eq!(free.looser_than(&free), None, "equal is not looser");
        let no_month = l(Some(1), Some(1), Some(1), None);
        let found = no_month.looser_than(&free).map(|w| (w.window, w.limit, w.bound));
        assert_eq!(found, Some(("per_month", None, 10_000)), "no quota is looser than any quota");
        assert_eq!(Limits::UNLIMITED.looser_than(&Limits::UNLIMITED), None);
        let one_more = l(Some(60), Some(1_000), Some(10_001), Some(10_000));
        assert_eq!(one_more.looser_than(&free).map(|w| w.window), Some("per_day"));
    }

    #[test]
    fn default_plans_are_the_design_tiers() {
        let p = Plans::defaults();
        assert_eq!(p.names().collect::<Vec<_>>(), ["enterprise", "free", "pro"]);
        assert_eq!(p.get("free"), Some(&l(Some(60), Some(1_000), Some(10_000), Some(10_000))));
        assert_eq!(p.get("pro"), Some(&l(Some(600), Some(20_000), Some(500_000), None)));
        assert_eq!(p.get("enterprise"), Some(&l(Some(6_000), Some(200_000), Some(10_000_000), None)));
        assert_eq!(
            p.get("free").map(Limits::rate),
            Some(RateLimits { per_minute: Some(60), per_hour: Some(1_000), per_day: Some(10_000) })
        );
    }

    #[test]
    fn resolution_order_key_then_org_then_plan() {
        let plans = Plans::defaults();
        let none = LimitOverrides::NONE;
        let cases = [
            // (org plan, key plan, org override, key override, expected)
            ("free", None, none, none, l(Some(60), Some(1_000), Some(10_000), Some(10_000))),
            ("free", Some("pro"), none, none, l(Some(600), Some(20_000), Some(500_000), None)),
            (
                "free",
                None,
                o(Some(100), None, None, Some(50_000)),
                none,
                l(Some(100), Some(1_000), Some(10_000), Some(50_000)),
            ),
            (
                "free",
                None,
                o(Some(100), Some(2_000), None, None),
                o(Some(5), None, None, Some(7)),
                l(Some(5), Some(2_000), Some(10_000), Some(7)),
            ),
            // The org's override still applies over a key's own plan; the key's override over both.
            (
                "free",
                Some("enterprise"),
                o(Some(100), None, None, None),
                none,
                l(Some(100), Some(200_000), Some(10_000_000), None),
            ),
            ("pro", None, none, o(None, None, Some(0), None), l(Some(600), Some(20_000), Some(0), None)),
            // A plan removed from config: the free plan's limits.
            ("gold", None, none, none, l(Some(60), Some(1_000), Some(10_000), Some(10_000))),
        ];
        for (org_plan, key_plan, org, key, expected) in cases {
            assert_eq!(
                plans.resolve(org_plan, key_plan, &org, &key),
                expected,
                "{org_plan} {key_plan:?} {org:?} {key:?}"
            );
        }
        assert_eq!(Plans::new([]).resolve("free", None, &none, &none), Limits::UNLIMITED);
    }

    #[test]
    fn signed_store_columns() {
        assert_eq!(LimitOverrides::from_signed(Some(10), None, Some(-1), Some(0)), o(Some(10), None, None, Some(0)));
    }

    #[test]
    fn plans_from_config_replace_or_extend_the_defaults() {
        let configured: BTreeMap<String, Limits> = serde_json::from_str(
            r#"{"pro": {"per_minute": 1000, "per_month": 1000000}, "startup": {"per_minute": 120}}"#,
        )
        .unwrap();
        let plans = Plans::defaults().with(configured);
        assert_eq!(plans.get("pro"), Some(&l(Some(1_000), None, None, Some(1_000_000))));
        assert_eq!(plans.get("startup"), Some(&l(Some(120), None, None, None)));
        assert_eq!(plans.get("free").and_then(|p| p.per_month), Some(10_000));
        assert!(serde_json::from_str::<Limits>(r#"{"per_second": 1}"#).is_err());
    }
}
