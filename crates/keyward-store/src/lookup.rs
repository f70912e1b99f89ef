//! [`KeyLookup`]: all the verify path asks of storage. A verify cache wraps this trait and nothing
//! wider; what it must forget after a write comes from the write's result ([`crate::Changed`]), not
//! from a wrapper around every store method.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use keyward_core::KeyHash;

use crate::{KeyRecord, KeyWithOrg, StoreResult};

/// A key's verification record by the hash of what a caller presented.
#[async_trait]
pub trait KeyLookup: Send + Sync + fmt::Debug {
    /// What verification needs of the key stored under `hash`, compact and shared. SECURITY: the stored
    /// hash is compared with `hash` in constant time, so a near match from an index is never acted on
    /// (see [`key_record`]).
    async fn find_key_record(&self, hash: &KeyHash) -> StoreResult<Option<Arc<KeyRecord>>>;

    /// Whether storage answers at all (the verify cache probes with it while the store is down).
    async fn ping(&self) -> StoreResult<()>;
}

/// The record of a key found by `hash`, if its stored hash is `hash` (compared in constant time).
pub fn key_record(found: Option<KeyWithOrg>, hash: &KeyHash) -> Option<Arc<KeyRecord>> {
    found.filter(|f| f.key.key_hash.ct_eq(hash)).map(|f| Arc::new(KeyRecord::from(f)))
}
