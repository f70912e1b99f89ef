//! Scopes: `action:resource` strings for the customer's API, and Keyward's own reserved `keyward:`
//! scopes. A required scope is satisfied by an exact match or a wildcard that covers it; no wildcard,
//! not even `*`, covers a `keyward:` scope.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::key::quote_if_not_key;

const MAX_SCOPE_LEN: usize = 128;
const RESERVED_PREFIX: &str = "keyward:";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("scope is empty")]
    Empty,
    #[error("scope {} is longer than 128 characters", quote_if_not_key(.0))]
    TooLong(String),
    #[error("scope {} must look like `action:resource`, `action:*` or `*`", quote_if_not_key(.0))]
    BadShape(String),
    #[error("scope {} is in the reserved `keyward:` namespace but is not one of keyward's scopes", quote_if_not_key(.0))]
    UnknownReserved(String),
}

/// Keyward's own permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeywardScope {
    KeysRead,
    KeysWrite,
    Verify,
    AuditRead,
    /// A customer manages the keys of its own `owner_id`.
    SelfService,
    /// Everything, every organization.
    Admin,
}

impl KeywardScope {
    pub const ALL: [KeywardScope; 6] =
        [Self::KeysRead, Self::KeysWrite, Self::Verify, Self::AuditRead, Self::SelfService, Self::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeysRead => "keyward:keys:read",
            Self::KeysWrite => "keyward:keys:write",
            Self::Verify => "keyward:verify",
            Self::AuditRead => "keyward:audit:read",
            Self::SelfService => "keyward:self",
            Self::Admin => "keyward:admin",
        }
    }

    pub fn scope(self) -> Scope {
        Scope(self.as_str().to_owned())
    }
}

impl fmt::Display for KeywardScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated scope string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Scope(String);

impl Scope {
    pub fn parse(s: &str) -> Result<Self, ScopeError> {
        if s.is_empty() {
            return Err(ScopeError::Empty);
        }
        if s.len() > MAX_SCOPE_LEN {
            return Err(ScopeError::TooLong(s.chars().take(32).collect()));
        }
        if s == "*" {
            return Ok(Self(s.to_owned()));
        }
        let segments: Vec<&str> = s.split(':').collect();
        let last = segments.len() - 1;
        let well_formed = segments.len() >= 2
            && segments.iter().enumerate().all(|(i, seg)| {
                (i == last && i > 0 && *seg == "*")
                    || (!seg.is_empty() && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)))
            });
        if !well_formed {
            return Err(ScopeError::BadShape(s.to_owned()));
        }
        if s.starts_with(RESERVED_PREFIX) && !KeywardScope::ALL.iter().any(|k| k.as_str() == s) {
            return Err(ScopeError::UnknownReserved(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is one of Keyward's own `keyward:` scopes.
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with(RESERVED_PREFIX)
    }

    pub fn keyward(&self) -> Option<KeywardScope> {
        KeywardScope::ALL.into_iter().find(|k| k.as_str() == self.0)
    }

    /// Whether holding `self` satisfies a requirement of `required`.
    pub fn covers(&self, required: &Scope) -> bool {
        if self == required {
            return true;
        }
        // SECURITY: reserved scopes are granted one by one, never through a wildcard.
        if required.is_reserved() {
            return false;
        }
        match self.0.as_str() {
            "*" => true,
            s => s.strip_suffix('*').is_some_and(|stem| required.0.starts_with(stem)),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Scope::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The scopes a key holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ScopeSet(Vec<Scope>);

impl ScopeSet {
    /// Sorted and de-duplicated, so equal sets compare and diff equal.
    pub fn new(mut scopes: Vec<Scope>) -> Self {
        scopes.sort();
        scopes.dedup();
        Self(scopes)
    }

    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, ScopeError> {
        items.iter().map(|s| Scope::parse(s.as_ref())).collect::<Result<Vec<_>, _>>().map(Self::new)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn covers(&self, required: &Scope) -> bool {
        self.0.iter().any(|held| held.covers(required))
    }

    pub fn covers_all<'a>(&self, required: impl IntoIterator<Item = &'a Scope>) -> bool {
        required.into_iter().all(|r| self.covers(r))
    }

    /// Holds exactly this reserved scope.
    pub fn holds(&self, scope: KeywardScope) -> bool {
        self.0.iter().any(|s| s.as_str() == scope.as_str())
    }

    /// Keyward's permission check: `keyward:admin` allows everything, `keys:write` implies `keys:read`.
    pub fn permits(&self, scope: KeywardScope) -> bool {
        self.holds(scope)
            || self.holds(KeywardScope::Admin)
            || (scope == KeywardScope::KeysRead && self.holds(KeywardScope::KeysWrite))
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|s| s.0.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(x: &str) -> Scope {
        Scope::parse(x).unwrap_or_else(|e| panic!("{x}: {e}"))
    }

    #[test]
    fn parse_table() {
        let ok = [
            "*",
            "read:projects",
            "write:*",
            "admin:all",
            "read:projects:archive",
            "read:v2.users",
            "billing-ops:read_only",
            "keyward:keys:read",
            "keyward:keys:write",
            "keyward:verify",
            "keyward:audit:read",
            "keyward:self",
            "keyward:admin",
        ];
        for x in ok {
            assert!(Scope::parse(x).is_ok(), "{x} should parse");
        }
        type MakeError = fn(String) -> ScopeError;
        let bad: [(&str, MakeError); 12] = [
            ("read", ScopeError::BadShape),
            (":projects", ScopeError::BadShape),
            ("read:", ScopeError::BadShape),
            ("read::x", ScopeError::BadShape),
            ("*:projects", ScopeError::BadShape),
            ("read:*:x", ScopeError::BadShape),
            ("read projects", ScopeError::BadShape),
            ("read:proj/ects", ScopeError::BadShape),
            ("**", ScopeError::BadShape),
            ("keyward:*", ScopeError::UnknownReserved),
            ("keyward:superuser", ScopeError::UnknownReserved),
            ("keyward:keys:delete", ScopeError::UnknownReserved),
        ];
        for (x, want) in bad {
            assert_eq!(Scope::parse(x), Err(want(x.to_owned())), "{x}");
        }
        assert_eq!(Scope::parse(""), Err(ScopeError::Empty));
        assert!(matches!(Scope::parse(&"a:".repeat(100)), Err(ScopeError::TooLong(_))));
    }

    #[test]
    fn covers_table() {
        let table = [
            ("read:projects", "read:projects", true),
            ("read:projects", "read:users", false),
            ("read:projects", "write:projects", false),
            ("read:*", "read:projects", true),
            ("read:*", "read:projects:archive", true),
            ("read:*", "write:projects", false),
            ("read:*", "reader:projects", false),
            ("read:projects:*", "read:projects:archive", true),
            ("read:projects:*", "read:projects", false),
            ("*", "read:projects", true),
            ("*", "admin:all", true),
            ("admin:all", "read:projects", false),
            // SECURITY: no wildcard reaches keyward's own scopes.
            ("*", "keyward:verify", false),
            ("*", "keyward:admin", false),
            ("keyward:admin", "keyward:admin", true),
            ("keyward:admin", "keyward:keys:read", false),
            ("keyward:keys:write", "keyward:keys:read", false),
            ("keyward:verify", "keyward:verify", true),
        ];
        for (held, required, want) in table {
            assert_eq!(s(held).covers(&s(required)), want, "{held} covers {required}");
        }
    }

    #[test]
    fn permits_follows_keyward_rules() {
        let admin = ScopeSet::parse(&["keyward:admin"]).unwrap_or_default();
        let writer = ScopeSet::parse(&["keyward:keys:write"]).unwrap_or_default();
        let star = ScopeSet::parse(&["*"]).unwrap_or_default();
        for k in KeywardScope::ALL {
            assert!(admin.permits(k));
            assert!(!star.permits(k), "* must not permit {k}");
        }
        assert!(writer.permits(KeywardScope::KeysRead));
        assert!(writer.permits(KeywardScope::KeysWrite));
        assert!(!writer.permits(KeywardScope::Verify));
    }

    #[test]
    fn set_is_sorted_and_deduplicated() {
        let set = ScopeSet::parse(&["b:x", "a:y", "b:x"]).unwrap_or_default();
        assert_eq!(set.to_strings(), vec!["a:y", "b:x"]);
    }

    proptest! {
        #[test]
        fn a_wildcard_covers_exactly_its_stem(action in "[a-z]{1,8}", resource in "[a-z]{1,8}", other in "[a-z]{1,8}") {
            let wildcard = s(&format!("{action}:*"));
            let own = s(&format!("{action}:{resource}"));
            let foreign = s(&format!("{other}:{resource}"));
            prop_assert!(wildcard.covers(&own));
            prop_assert_eq!(wildcard.covers(&foreign), other == action);
            prop_assert!(!wildcard.covers(&s("keyward:verify")));
        }

        #[test]
        fn parse_never_panics(input in ".{0,140}") {
            let _ = Scope::parse(&input);
        }
    }
}
