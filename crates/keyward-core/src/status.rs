//! Key status, derived from stored facts and the clock; never stored itself.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{IpAllowList, Scope, ScopeSet, VerifyOutcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Disabled,
    Expired,
    Revoked,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Disabled => "disabled",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "disabled" => Some(Self::Disabled),
            "expired" => Some(Self::Expired),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

/// The stored facts status is derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyState {
    pub is_active: bool,
    /// May lie in the future: a rotated key keeps working until its grace period ends.
    pub revoked_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl KeyState {
    /// Revoked wins over disabled, disabled over expired, as the verify checks run.
    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        if self.revoked_at.is_some_and(|at| at <= now) {
            KeyStatus::Revoked
        } else if !self.is_active {
            KeyStatus::Disabled
        } else if self.expires_at.is_some_and(|at| at <= now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

/// What a found key is checked against.
#[derive(Debug, Clone, Copy)]
pub struct VerifyRequest<'a> {
    pub now: DateTime<Utc>,
    /// The end client's address; `None` when the caller did not say.
    pub client_ip: Option<IpAddr>,
    pub required_scopes: &'a [Scope],
}

/// The checks after the key was found, in the documented order: status, organization, IP, scopes.
/// A key with an allow-list is refused when the client address is unknown: failing closed is the only
/// safe answer when the rule cannot be checked.
pub fn check_found_key(
    state: &KeyState,
    org_active: bool,
    allowed_ips: &IpAllowList,
    scopes: &ScopeSet,
    request: &VerifyRequest<'_>,
) -> VerifyOutcome {
    match state.status(request.now) {
        KeyStatus::Revoked => return VerifyOutcome::Revoked,
        KeyStatus::Disabled => return VerifyOutcome::Disabled,
        KeyStatus::Expired => return VerifyOutcome::Expired,
        KeyStatus::Active => {}
    }
    if !org_active {
        return VerifyOutcome::OrgDisabled;
    }
    if !allowed_ips.is_empty() && !request.client_ip.is_some_and(|ip| allowed_ips.allows(ip)) {
        return VerifyOutcome::IpNotAllowed;
    }
    if !scopes.covers_all(request.required_scopes) {
        return VerifyOutcome::InsufficientScope;
    }
    VerifyOutcome::Valid
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Clock, ManualClock};
    use chrono::Duration;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    #[test]
    fn status_table_with_an_injected_clock() {
        let clock = ManualClock::new(t0());
        let now = clock.now();
        let later = now + Duration::hours(1);
        let earlier = now - Duration::hours(1);
        let st = |is_active, revoked_at, expires_at| KeyState { is_active, revoked_at, expires_at };
        let table = [
            (st(true, None, None), KeyStatus::Active),
            (st(false, None, None), KeyStatus::Disabled),
            (st(true, Some(earlier), None), KeyStatus::Revoked),
            (st(true, Some(now), None), KeyStatus::Revoked),
            (st(true, Some(later), None), KeyStatus::Active),
            (st(true, None, Some(later)), KeyStatus::Active),
            (st(true, None, Some(now)), KeyStatus::Expired),
            (st(true, None, Some(earlier)), KeyStatus::Expired),
            (st(false, Some(earlier), Some(earlier)), KeyStatus::Revoked),
            (st(false, None, Some(earlier)), KeyStatus::Disabled),
        ];
        for (state, want) in table {
            assert_eq!(state.status(now), want, "{state:?}");
        }
        // The same key expires when the clock passes its expiry, with no sleeping.
        let key = st(true, None, Some(later));
        assert_eq!(key.status(clock.now()), KeyStatus::Active);
        clock.advance(Duration::minutes(59));
        assert_eq!(key.status(clock.now()), KeyStatus::Active);
        clock.advance(Duration::minutes(1));
        assert_eq!(key.status(clock.now()), KeyStatus::Expired);
    }

    #[test]
    fn checks_run_in_the_documented_order() {
        let active = KeyState { is_active: true, revoked_at: None, expires_at: None };
        let ips = IpAllowList::parse(&["10.0.0.0/8"]).unwrap_or_default();
        let scopes = ScopeSet::parse(&["read:*"]).unwrap_or_default();
        let write = [Scope::parse("write:x").unwrap()];
        let read = [Scope::parse("read:x").unwrap()];
        let inside: IpAddr = [10, 1, 1, 1].into();
        let outside: IpAddr = [11, 1, 1, 1].into();
        let req = |ip, required| VerifyRequest { now: t0(), client_ip: ip, required_scopes: required };
        let check = |state: &KeyState, org, r: &VerifyRequest<'_>| check_found_key(state, org, &ips, &scopes, r);

        let revoked = KeyState { revoked_at: Some(t0()), is_active: false, ..active };
        assert_eq!(check(&revoked, false, &req(Some(outside), &write)), VerifyOutcome::Revoked);
        let disabled = KeyState { is_active: false, expires_at: Some(t0()), ..active };
        assert_eq!(check(&disabled, false, &req(None, &write)), VerifyOutcome::Disabled);
        let expired = KeyState { expires_at: Some(t0()), ..active };
        assert_eq!(check(&expired, false, &req(None, &write)), VerifyOutcome::Expired);
        assert_eq!(check(&active, false, &req(Some(outside), &write)), VerifyOutcome::OrgDisabled);
        assert_eq!(check(&active, true, &req(Some(outside), &write)), VerifyOutcome::IpNotAllowed);
        assert_eq!(check(&active, true, &req(None, &read)), VerifyOutcome::IpNotAllowed);
        assert_eq!(check(&active, true, &req(Some(inside), &write)), VerifyOutcome::InsufficientScope);
        assert_eq!(check(&active, true, &req(Some(inside), &read)), VerifyOutcome::Valid);
        assert_eq!(check(&active, true, &req(Some(inside), &[])), VerifyOutcome::Valid);
    }
}
