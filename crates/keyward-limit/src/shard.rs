//! A map from subject to state, split into independently locked shards, with bounded memory.
//!
//! Why our own shards rather than `dashmap`: it is a few dozen lines with no `unsafe` dependency,
//! and eviction needs to run inside a shard's lock with the caller's `now`, which a generic
//! concurrent map does not offer. A decision locks one shard for a hash-map lookup and a few
//! integer operations; with 64 shards, two cores (or 64) rarely meet on the same lock, and there is
//! no global lock.
//!
//! A subject is stored as its 128-bit fingerprint: two SipHash-1-3 with independent random keys
//! (per process). No string is allocated or compared, an entry is 40 bytes, and an attacker who
//! chooses subjects (client IPs) can neither predict nor pile them into one shard or bucket. Two
//! subjects would share state only on a 128-bit collision: for a million subjects, about 10^-27.
//!
//! Memory: each entry knows when it `expires` (its state equals "no state" from then on). A shard
//! sweeps expired entries when it has doubled since its last sweep (amortised O(1) per insert), so
//! it holds at most about twice the subjects active within the longest window (a day). Above
//! `max_per_shard` live entries it also evicts those closest to expiry (the least state lost) down to
//! 90 % of the cap; for a rate entry that forgets part of a bucket (a little over-admission for that
//! subject), for a quota entry the count is re-seeded from the durable store.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::{Mutex, PoisonError};

/// Smallest sweep threshold: below this a shard never sweeps.
const MIN_SWEEP: usize = 64;

pub(crate) trait Expiring {
    /// The instant (µs) from which the entry decides like no entry at all.
    fn expires(&self) -> i64;
}

/// A subject's fingerprint: two independent keyed hashes of it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Fingerprint(u64, u64);

impl Hash for Fingerprint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: the map uses it as is (`.0` picked the shard, `.1` is independent).
        state.write_u64(self.1);
    }
}

/// Passes a `write_u64` through: the map's hasher for [`Fingerprint`]s.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `Fingerprint` is hashed here, through `write_u64`; fold anything else in anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

struct Shard<V> {
    map: HashMap<Fingerprint, V, BuildHasherDefault<PassThrough>>,
    next_sweep: usize,
}

pub(crate) struct ShardedMap<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    hashers: (RandomState, RandomState),
    max_per_shard: usize,
}

impl<V: Expiring + Default> ShardedMap<V> {
    /// `shards` is rounded up to a power of two; `max_entries` is shared evenly among them.
    pub(crate) fn new(shards: usize, max_entries: usize) -> Self {
        let n = shards.clamp(1, 1 << 16).next_power_of_two();
        let max_per_shard = (max_entries / n).max(1);
        let shards = (0..n).map(|_| Mutex::new(Shard { map: HashMap::default(), next_sweep: MIN_SWEEP })).collect();
        Self { shards, hashers: (RandomState::new(), RandomState::new()), max_per_shard }
    }

    fn shard(&self, subject: &str) -> (&Mutex<Shard<V>>, Fingerprint) {
        let f = Fingerprint(self.hashers.0.hash_one(subject), self.hashers.1.hash_one(subject));
        let i = (f.0 >> 32) as usize & (self.shards.len() - 1);
        (&self.shards[i], f)
    }

    /// Runs `f` on `subject`'s entry (a default one when absent) and keeps the entry only if it is
    /// still live at `now`.
    pub(crate) fn update<R>(&self, subject: &str, now: i64, f: impl FnOnce(&mut V) -> R) -> R {
        // A poisoned shard only means a panic elsewhere mid-update of plain integers: keep going.
        let (shard, key) = self.shard(subject);
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = shard.map.get_mut(&key) {
            return f(v);
        }
        let mut v = V::default();
        let r = f(&mut v);
        if v.expires() > now {
            shard.insert(key, v, now, self.max_per_shard);
        }
        r
    }

    /// Runs `f` on `subject`'s entry if there is one that is live at `now`.
    pub(crate) fn update_live<R>(&self, subject: &str, now: i64, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        let (shard, key) = self.shard(subject);
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        shard.map.get_mut(&key).filter(|v| v.expires() > now).map(f)
    }

    /// Entries held (live or not yet swept).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len()).sum()
    }
}

impl<V: Expiring> Shard<V> {
    fn insert(&mut self, key: Fingerprint, v: V, now: i64, max: usize) {
        if self.map.len() >= self.next_sweep.min(max) {
            self.map.retain(|_, v| v.expires() > now);
            if self.map.len() >= max {
                self.evict_soonest(max - max / 10);
            }
            self.next_sweep = (self.map.len() * 2).max(MIN_SWEEP);
        }
        self.map.insert(key, v);
    }

    /// Drops the entries that expire first until at most `keep` remain.
    fn evict_soonest(&mut self, keep: usize) {
        let drop = self.map.len().saturating_sub(keep);
        if drop == 0 {
            return;
        }
        let mut expiries: Vec<i64> = self.map.values().map(Expiring::expires).collect();
        let (_, threshold, _) = expiries.select_nth_unstable(drop - 1);
        let threshold = *threshold;
        self.map.retain(|_, v| v.expires() > threshold);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct E(i64);
    impl Expiring for E {
        fn expires(&self) -> i64 {
            self.0
        }
    }

    #[test]
    fn dead_entries_are_not_kept_and_expired_ones_are_swept() {
        let m: ShardedMap<E> = ShardedMap::new(1, 1_000_000);
        m.update("dead", 10, |e| e.0 = 10);
        assert_eq!(m.len(), 0);
        for i in 0..MIN_SWEEP {
            m.update(&format!("s{i}"), 10, |e| e.0 = 20);
        }
        assert_eq!(m.len(), MIN_SWEEP);
        assert_eq!(m.update_live("s1", 10, |e| e.0), Some(20));
        assert_eq!(m.update_live("s1", 20, |e| e.0), None);
        // The next insert at a later `now` sweeps every expired entry.
        m.update("fresh", 30, |e| e.0 = 40);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn memory_is_capped_by_evicting_the_soonest_to_expire() {
        let m: ShardedMap<E> = ShardedMap::new(4, 400);
        for i in 0..10_000 {
            m.update(&format!("s{i}"), 0, |e| e.0 = 1 + i);
        }
        assert!(m.len() <= 400, "{}", m.len());
        // The latest (longest-lived) entries survive.
        assert_eq!(m.update_live("s9999", 0, |e| e.0), Some(10_000));
    }
}
