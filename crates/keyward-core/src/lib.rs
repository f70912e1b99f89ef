//! Keyward's domain, with no I/O and no async: key format (generate, parse, checksum), hashing,
//! scopes, IP allow-lists, key status, verify outcomes, ids, the clock, plans and the rate-limit and
//! quota math.
//!
//! Everything here is pure so it can be tested with tables and properties, and shared by the store,
//! the server, the CLI and the embeddable layer.

pub mod audit_chain;
pub mod clock;
pub mod diff;
pub mod hash;
pub mod identity;
pub mod ids;
pub mod ip;
pub mod key;
pub mod limits;
pub mod outcome;
pub mod path;
pub mod plan;
pub mod scope;
pub mod status;
pub mod webhook;

pub use clock::{Clock, ManualClock, SystemClock};

/// Lower-case hex of `bytes`: how digests, tokens and signatures are written everywhere.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub use hash::{HashAlgorithm, KeyHash, KeyHasher, PepperError};
pub use ids::{KeyId, OrgId};
pub use ip::{IpAllowList, IpListError};
pub use key::{Environment, KeyFormatError, KeyPrefix, PlainKey};
pub use limits::{QuotaDecision, RateDecision, RateLimits, Window, WindowStatus};
pub use outcome::VerifyOutcome;
pub use path::{NormalizedPath, PathError};
pub use plan::{LimitOverrides, Limits, Plans};
pub use scope::{KeywardScope, Scope, ScopeError, ScopeSet};
pub use status::{KeyState, KeyStatus, VerifyRequest, check_found_key};
