//! The answer of a verification. A value, not an error: `/v1/verify` answers 200 with it; the gateway
//! and the layer answer a refusal with the error it maps to in keyward-server's error table.

use serde::{Deserialize, Serialize};

/// Every possible result of checking a key, in the order the checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VerifyOutcome {
    Valid,
    Malformed,
    NotFound,
    Disabled,
    Revoked,
    Expired,
    OrgDisabled,
    IpNotAllowed,
    InsufficientScope,
    RateLimited,
    QuotaExceeded,
    /// The shared limiter (Redis) is unreachable and the failure policy is `fail_closed`: the key
    /// passed every other check, but its limits cannot be enforced. Not the key's fault, nor a
    /// limit it ran into: retry shortly (`Retry-After`).
    LimiterUnavailable,
}

impl VerifyOutcome {
    pub const ALL: [VerifyOutcome; 12] = [
        Self::Valid,
        Self::Malformed,
        Self::NotFound,
        Self::Disabled,
        Self::Revoked,
        Self::Expired,
        Self::OrgDisabled,
        Self::IpNotAllowed,
        Self::InsufficientScope,
        Self::RateLimited,
        Self::QuotaExceeded,
        Self::LimiterUnavailable,
    ];

    pub fn is_valid(self) -> bool {
        self == Self::Valid
    }

    /// The wire code: `code` in `/v1/verify`'s 200 answer (a result, in upper case). A surface that
    /// refuses the request instead answers the error code keyward-server's error table maps the
    /// outcome to (`ErrorCode::of_outcome`: `REVOKED` is `key_revoked`).
    pub fn code(self) -> &'static str {
        match self {
            Self::Valid => "VALID",
            Self::Malformed => "MALFORMED",
            Self::NotFound => "NOT_FOUND",
            Self::Disabled => "DISABLED",
            Self::Revoked => "REVOKED",
            Self::Expired => "EXPIRED",
            Self::OrgDisabled => "ORG_DISABLED",
            Self::IpNotAllowed => "IP_NOT_ALLOWED",
            Self::InsufficientScope => "INSUFFICIENT_SCOPE",
            Self::RateLimited => "RATE_LIMITED",
            Self::QuotaExceeded => "QUOTA_EXCEEDED",
            Self::LimiterUnavailable => "LIMITER_UNAVAILABLE",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_match_serde_names() {
        for outcome in VerifyOutcome::ALL {
            let json = serde_json::to_value(outcome).unwrap_or_default();
            assert_eq!(json, serde_json::Value::from(outcome.code()));
        }
    }
}
