//! The verify cache's case of the conformance suite: every [`Write`] (each store write that can change
//! what a verification answers), made on a store with a cache in front of it and applied to that
//! cache, is seen by the very next verification through the cache. The cases are an exhaustive match
//! over `Write`, and [`Write::ALL`] is generated with the enum, so a write added to it without a case
//! here does not compile, and one with a case always runs.
//!
//! The cache here ([`Remembering`]) never forgets on its own (no TTL): it answers a change only if the
//! write's invalidations reached it. The server runs the same cases with its own cache
//! ([`writes_are_seen_through`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::{Environment, KeyHash, VerifyRequest};

use super::{Must, at, new_key, org};
use crate::{
    Actor, Changed, Invalidation, Invalidator, KeyImport, KeyLookup, KeyPatch, KeyRecord, NewKey, OrganizationPatch,
    Store, StoreResult, Write,
};

/// A cache in front of a lookup that remembers every answer, found or not, until an invalidation says
/// otherwise.
#[derive(Debug)]
pub struct Remembering<'a> {
    inner: &'a dyn KeyLookup,
    answers: Mutex<HashMap<KeyHash, Option<Arc<KeyRecord>>>>,
}

impl<'a> Remembering<'a> {
    pub fn new(inner: &'a dyn KeyLookup) -> Self {
        Self { inner, answers: Mutex::default() }
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, HashMap<KeyHash, Option<Arc<KeyRecord>>>> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl KeyLookup for Remembering<'_> {
    async fn find_key_record(&self, hash: &KeyHash) -> StoreResult<Option<Arc<KeyRecord>>> {
        if let Some(answer) = self.answers().get(hash) {
            return Ok(answer.clone());
        }
        let answer = self.inner.find_key_record(hash).await?;
        self.answers().insert(*hash, answer.clone());
        Ok(answer)
    }

    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
}

impl Invalidator for Remembering<'_> {
    fn invalidate(&self, change: &Invalidation) {
        match change {
            Invalidation::Key(hash) => {
                self.answers().remove(hash);
            }
            Invalidation::Organization(org) => {
                self.answers().retain(|_, answer| answer.as_ref().is_none_or(|r| r.organization_id != *org));
            }
            Invalidation::All => self.answers().clear(),
        }
    }
}

/// The conformance case: [`writes_are_seen_through`] a [`Remembering`] cache.
pub async fn every_write_is_seen_by_the_next_verification(store: &dyn Store) {
    writes_are_seen_through(store, &Remembering::new(store)).await;
}

/// Every [`Write`] on `store`, applied to `cache` (a cache in front of `store`), then verified through
/// `cache`: the answer is the changed one, and the cache agrees with the store on every key involved.
pub async fn writes_are_seen_through<C: KeyLookup + Invalidator>(store: &dyn Store, cache: &C) {
    for write in Write::ALL {
        write_is_seen(store, cache, *write).await;
    }
}

/// What verification answers at `now` for the key under `hash`.
async fn answer(lookup: &dyn KeyLookup, hash: &KeyHash, now: DateTime<Utc>) -> &'static str {
    let found = lookup.find_key_record(hash).await.must("find_key_record");
    let request = VerifyRequest { now, client_ip: None, required_scopes: &[] };
    found.map_or("NOT_FOUND", |record| record.check(&request).code())
}

/// The record without the time it was read, which every cache sets from its own clock.
async fn record(lookup: &dyn KeyLookup, hash: &KeyHash) -> Option<KeyRecord> {
    let found = lookup.find_key_record(hash).await.must("find_key_record");
    found.map(|r| KeyRecord { fetched_at: DateTime::UNIX_EPOCH, ..(*r).clone() })
}

/// Takes the value out of a write's result through `cache`, after checking which write it says it was.
fn applied<T, C: Invalidator>(changed: StoreResult<Changed<T>>, write: Write, cache: &C) -> T {
    let changed = changed.must(&format!("{write:?}"));
    assert_eq!(changed.write(), write, "the write names itself");
    changed.apply(cache)
}

/// Before the write, verification through the cache answers `before` for each key of the case (and
/// the cache remembers it); after it, `after`; and the cache then agrees with the store.
struct Expect<'a> {
    hashes: &'a [KeyHash],
    before: &'a [&'static str],
    after: &'a [&'static str],
    /// When the answers after the write are asked.
    at: DateTime<Utc>,
}

async fn check<C: KeyLookup>(store: &dyn Store, cache: &C, expect: &Expect<'_>, write: Write, after: bool) {
    let want = if after { expect.after } else { expect.before };
    for (hash, want) in expect.hashes.iter().zip(want) {
        let now = if after { expect.at } else { at(0) };
        assert_eq!(
            answer(cache, hash, now).await,
            *want,
            "{write:?}, {} the write",
            if after { "after" } else { "before" }
        );
        if after {
            assert_eq!(
                record(cache, hash).await,
                record(store, hash).await,
                "{write:?}: the cache agrees with the store"
            );
        }
    }
}

async fn write_is_seen<C: KeyLookup + Invalidator>(store: &dyn Store, cache: &C, write: Write) {
    let org = org(store, None).await;
    let actor = Actor::cli(at(1));
    let inserted =
        |new: NewKey| async move { store.insert_key(new, &Actor::cli(at(0))).await.must("insert_key").apply(cache) };
    // One arm per write; `Write::ALL` runs them all.
    match write {
        Write::InsertKey => {
            let new = new_key(&org, Environment::Live).1;
            let expect = Expect { hashes: &[new.key_hash], before: &["NOT_FOUND"], after: &["VALID"], at: at(2) };
            check(store, cache, &expect, write, false).await;
            applied(store.insert_key(new, &actor).await, write, cache);
            check(store, cache, &expect, write, true).await;
        }
        Write::UpdateKey => {
            let key = inserted(new_key(&org, Environment::Live).1).await;
            let expect = Expect { hashes: &[key.key_hash], before: &["VALID"], after: &["DISABLED"], at: at(2) };
            check(store, cache, &expect, write, false).await;
            let off = KeyPatch { is_active: Some(false), ..Default::default() };
            applied(store.update_key(key.id, off, &actor).await, write, cache);
            check(store, cache, &expect, write, true).await;
        }
        Write::RevokeKey => {
            let key = inserted(new_key(&org, Environment::Live).1).await;
            let expect = Expect { hashes: &[key.key_hash], before: &["VALID"], after: &["REVOKED"], at: at(2) };
            check(store, cache, &expect, write, false).await;
            applied(store.revoke_key(key.id, "leaked", at(1), &actor).await, write, cache);
            check(store, cache, &expect, write, true).await;
        }
        Write::RotateKey => {
            let old = inserted(new_key(&org, Environment::Live).1).await;
            let new = new_key(&org, Environment::Live).1;
            let expect = Expect {
                hashes: &[old.key_hash, new.key_hash],
                before: &["VALID", "NOT_FOUND"],
                after: &["REVOKED", "VALID"],
                at: at(2),
            };
            check(store, cache, &expect, write, false).await;
            applied(store.rotate_key(old.id, new, at(1), &actor).await, write, cache);
            check(store, cache, &expect, write, true).await;
        }
        Write::ExpireKeys => {
            let key = inserted(NewKey { expires_at: Some(at(1)), ..new_key(&org, Environment::Live).1 }).await;
            // Past its expiry the key answers EXPIRED from its record alone; deactivated by the sweep,
            // DISABLED, which only a fresh record says.
            let expect = Expect { hashes: &[key.key_hash], before: &["VALID"], after: &["DISABLED"], at: at(2) };
            check(store, cache, &expect, write, false).await;
            let expired = applied(store.expire_keys(Some(org.id), at(2), &actor).await, write, cache);
            assert_eq!(expired.len(), 1);
            check(store, cache, &expect, write, true).await;
        }
        Write::ImportKeys => {
            let import = KeyImport { key: new_key(&org, Environment::Live).1, legacy: false, created_at: None };
            let expect =
                Expect { hashes: &[import.key.key_hash], before: &["NOT_FOUND"], after: &["VALID"], at: at(2) };
            check(store, cache, &expect, write, false).await;
            let dry = vec![import.clone()];
            applied(store.import_keys(org.id, dry, &actor, true).await, write, cache);
            assert_eq!(answer(cache, &import.key.key_hash, at(2)).await, "NOT_FOUND", "a dry run changes nothing");
            applied(store.import_keys(org.id, vec![import], &actor, false).await, write, cache);
            check(store, cache, &expect, write, true).await;
        }
        Write::UpdateOrg => {
            let keys = [
                inserted(new_key(&org, Environment::Live).1).await,
                inserted(new_key(&org, Environment::Test).1).await,
            ];
            let expect = Expect {
                hashes: &[keys[0].key_hash, keys[1].key_hash],
                before: &["VALID", "VALID"],
                after: &["ORG_DISABLED", "ORG_DISABLED"],
                at: at(2),
            };
            check(store, cache, &expect, write, false).await;
            let off = OrganizationPatch { is_active: Some(false), ..Default::default() };
            applied(store.update_org(org.id, off, &actor).await, write, cache);
            check(store, cache, &expect, write, true).await;
        }
    }
}
