//! What a store write changed that verification reads, so that a verify cache drops exactly that.
//!
//! A write that can change what a verification answers (a key's status, scopes, limits or
//! organization; a hash that was unknown until now) returns a [`Changed`]: the written value and the
//! [`Invalidation`]s it implies, computed here from the value, once for every backend. The value comes
//! out only through [`Changed::apply`], which hands the invalidations to an [`Invalidator`] (a node's
//! verify cache, which also tells the other nodes; [`NoCache`] where no cache stands in front of the
//! store), so no caller can lose them without saying so. Writes that cannot change a verification
//! return plain values: usage, audit rows, events, webhooks, a new organization (it has no keys yet)
//! and migrations (run by the CLI on a store no node's cache is in front of). Every kind of write that
//! can is a [`Write`]; the conformance suite has one case per variant.

use keyward_core::{KeyHash, OrgId};

use crate::{ApiKey, ImportOutcome, KeyImport, Organization, Rotation};

/// What a change made stale in a verify cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// The key stored under this hash, or the memory that no key is.
    Key(KeyHash),
    /// Every key of the organization (verification reads the organization's status and limits).
    Organization(OrgId),
    All,
}

impl Invalidation {
    /// The wire form between nodes: `k:<hex>`, `o:<uuid>`, `*`.
    pub fn encode(&self) -> String {
        match self {
            Self::Key(h) => format!("k:{}", h.to_hex()),
            Self::Organization(id) => format!("o:{id}"),
            Self::All => "*".to_owned(),
        }
    }

    pub fn decode(s: &str) -> Option<Self> {
        match s.split_once(':') {
            Some(("k", hex)) => KeyHash::from_hex(hex).map(Self::Key),
            Some(("o", id)) => id.parse().ok().map(Self::Organization),
            _ if s == "*" => Some(Self::All),
            _ => None,
        }
    }
}

/// Whatever remembers verification answers and must forget what a change made stale.
pub trait Invalidator: Send + Sync {
    fn invalidate(&self, change: &Invalidation);
}

/// For a store no verify cache stands in front of (migrations, tools, the store's own tests): there
/// is nothing to forget.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCache;

impl Invalidator for NoCache {
    fn invalidate(&self, _: &Invalidation) {}
}

/// Declares [`Write`] and its list of every variant together, so the list cannot miss one.
macro_rules! writes {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Every kind of store write that can change what a verification answers. Each returns a
        /// [`Changed`] made by its own constructor below, which says what it makes stale.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Write {
            $($(#[$doc])* $name,)*
        }

        impl Write {
            /// Every variant, in declaration order.
            pub const ALL: &'static [Write] = &[$(Write::$name),*];
        }
    };
}

writes! {
    /// [`crate::Store::insert_key`]: the hash may be remembered as unknown.
    InsertKey,
    /// [`crate::Store::update_key`]: status, scopes, allow-list, expiry, plan, limits, metadata.
    UpdateKey,
    /// [`crate::Store::revoke_key`].
    RevokeKey,
    /// [`crate::LifecycleStore::rotate_key`]: the old key's revocation is scheduled, the new key's
    /// hash was unknown.
    RotateKey,
    /// [`crate::LifecycleStore::expire_keys`]: expired keys are deactivated.
    ExpireKeys,
    /// [`crate::Store::import_keys`]: the imported hashes were unknown.
    ImportKeys,
    /// [`crate::Store::update_org`]: every key of the organization answers with its status and limits.
    UpdateOrg,
}

/// The result of a write that can change what a verification answers, with what it made stale.
/// Take the value out with [`Changed::apply`].
#[must_use = "a write's invalidations must reach the verify cache: take the value out with `.apply(..)`"]
#[derive(Debug)]
pub struct Changed<T> {
    write: Write,
    value: T,
    stale: Vec<Invalidation>,
}

impl<T> Changed<T> {
    /// Hands every invalidation to `cache`, then gives the written value.
    pub fn apply<I: Invalidator + ?Sized>(self, cache: &I) -> T {
        for change in &self.stale {
            cache.invalidate(change);
        }
        self.value
    }

    /// Which kind of write this was.
    pub fn write(&self) -> Write {
        self.write
    }

    /// What the write made stale.
    pub fn invalidations(&self) -> &[Invalidation] {
        &self.stale
    }
}

// What each write makes stale: the rule, once for every backend.

impl Changed<ApiKey> {
    /// A new key: a lookup of its hash may have been remembered as "no such key".
    pub fn inserted_key(key: ApiKey) -> Self {
        Self::key(Write::InsertKey, key)
    }

    pub fn updated_key(key: ApiKey) -> Self {
        Self::key(Write::UpdateKey, key)
    }

    pub fn revoked_key(key: ApiKey) -> Self {
        Self::key(Write::RevokeKey, key)
    }

    fn key(write: Write, key: ApiKey) -> Self {
        let stale = vec![Invalidation::Key(key.key_hash)];
        Self { write, value: key, stale }
    }
}

impl Changed<Rotation> {
    pub fn rotated(rotation: Rotation) -> Self {
        let stale = vec![Invalidation::Key(rotation.old.key_hash), Invalidation::Key(rotation.new.key_hash)];
        Self { write: Write::RotateKey, value: rotation, stale }
    }
}

impl Changed<Vec<ApiKey>> {
    /// The keys as they are after expiring.
    pub fn expired(keys: Vec<ApiKey>) -> Self {
        let stale = keys.iter().map(|key| Invalidation::Key(key.key_hash)).collect();
        Self { write: Write::ExpireKeys, value: keys, stale }
    }
}

impl Changed<Vec<ImportOutcome>> {
    /// `outcomes` are those of `keys`, in order; a dry run changed nothing.
    pub fn imported(outcomes: Vec<ImportOutcome>, keys: &[KeyImport], dry_run: bool) -> Self {
        let stale = match dry_run {
            true => Vec::new(),
            false => keys
                .iter()
                .zip(&outcomes)
                .filter(|(_, outcome)| **outcome == ImportOutcome::Imported)
                .map(|(import, _)| Invalidation::Key(import.key.key_hash))
                .collect(),
        };
        Self { write: Write::ImportKeys, value: outcomes, stale }
    }
}

impl Changed<Organization> {
    pub fn updated_org(org: Organization) -> Self {
        let stale = vec![Invalidation::Organization(org.id)];
        Self { write: Write::UpdateOrg, value: org, stale }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn invalidations_round_trip() {
        for change in [Invalidation::Key(KeyHash([7; 32])), Invalidation::Organization(OrgId::new()), Invalidation::All]
        {
            assert_eq!(Invalidation::decode(&change.encode()), Some(change));
        }
        assert_eq!(Invalidation::decode("k:zz"), None);
        assert_eq!(Invalidation::decode("nonsense"), None);
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Invalidation>>);

    impl Invalidator for Recorder {
        fn invalidate(&self, change: &Invalidation) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(change.clone());
        }
    }

    #[test]
    fn apply_hands_over_every_invalidation_and_gives_the_value() {
        let changed = Changed { write: Write::UpdateOrg, value: 7, stale: vec![Invalidation::All, Invalidation::All] };
        let recorder = Recorder::default();
        assert_eq!(changed.apply(&recorder), 7);
        assert_eq!(recorder.0.into_inner().unwrap_or_default(), vec![Invalidation::All, Invalidation::All]);
    }
}
