//! The negative cache of operator keys: hashes of keys that were presented, looked up in
//! the database and not found. A key presented again is refused from here, without a
//! lookup, until its entry expires.
//!
//! Bounded in size and in time. Entries are kept in insertion order; since every entry
//! lives for the same `ttl`, that is also expiry order, so expired entries are always at
//! the front. Full-policy: evict the oldest entry (counted by the caller).
//!
//! Why a TTL is enough for keys created by the `fluxgate keys create` CLI while the
//! gateway runs: a new key's secret is 256 random bits generated at creation, so nobody
//! can have presented it before, and its hash cannot be in this cache; it goes to the
//! database on first use. The TTL only matters for a key that was presented before it
//! existed, which cannot happen with generated secrets. It also bounds how long a key
//! deleted and then restored into the database by hand stays refused.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::secret::Hash;

/// A bounded, expiring set of key hashes known not to exist.
pub struct NegativeCache {
    /// Hash -> when it was inserted.
    entries: HashMap<Hash, Instant>,
    /// Insertion order, with the insertion time, so that a stale slot (its key was
    /// re-inserted later) is recognised and skipped.
    order: VecDeque<(Hash, Instant)>,
    capacity: usize,
    ttl: Duration,
}

impl NegativeCache {
    /// An empty cache of at most `capacity` entries, each living `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            ttl,
        }
    }

    /// Whether `hash` is known not to exist at `now`.
    pub fn contains(&self, hash: &Hash, now: Instant) -> bool {
        self.entries
            .get(hash)
            .is_some_and(|at| now.saturating_duration_since(*at) < self.ttl)
    }

    /// Remember that `hash` does not exist. Returns how many live entries were evicted
    /// to make room (the full-policy: the oldest goes).
    pub fn insert(&mut self, hash: Hash, now: Instant) -> u64 {
        self.expire(now);
        self.entries.insert(hash, now);
        self.order.push_back((hash, now));
        let mut evicted = 0;
        // The order queue holds one slot per insertion, so bounding it bounds the map
        // too (every entry has a slot carrying its insertion time).
        while self.order.len() > self.capacity {
            if let Some((old, at)) = self.order.pop_front()
                && self.entries.get(&old) == Some(&at)
            {
                self.entries.remove(&old);
                evicted += 1;
            }
        }
        evicted
    }

    /// Forget `hash` (it was found after all, e.g. created meanwhile).
    pub fn remove(&mut self, hash: &Hash) {
        // Its slot in `order` becomes stale and is skipped when it reaches the front.
        self.entries.remove(hash);
    }

    /// Entries held now (expired ones included until they are pruned).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((hash, at)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.ttl {
                break;
            }
            if self.entries.get(hash) == Some(at) {
                self.entries.remove(hash);
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: u32) -> Hash {
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&i.to_le_bytes());
        h
    }

    #[test]
    fn stays_at_capacity_and_evicts_the_oldest() {
        let now = Instant::now();
        let mut cache = NegativeCache::new(100, Duration::from_secs(60));
        let mut evicted = 0;
        for i in 0..10_000 {
            evicted += cache.insert(hash(i), now);
            assert!(cache.len() <= 100);
            assert!(cache.order.len() <= 100);
        }
        assert_eq!(cache.len(), 100);
        assert_eq!(evicted, 9_900);
        // The newest 100 are kept, the older ones were evicted.
        assert!(cache.contains(&hash(9_999), now));
        assert!(cache.contains(&hash(9_900), now));
        assert!(!cache.contains(&hash(9_899), now));
        assert!(!cache.contains(&hash(0), now));
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut cache = NegativeCache::new(100, ttl);
        cache.insert(hash(1), t0);
        assert!(cache.contains(&hash(1), t0 + ttl - Duration::from_millis(1)));
        assert!(!cache.contains(&hash(1), t0 + ttl));
        // The next insert prunes it: nothing expired is kept.
        assert_eq!(cache.insert(hash(2), t0 + ttl), 0);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn reinserting_and_removing_keep_the_bound() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(1);
        let mut cache = NegativeCache::new(3, ttl);
        for round in 0..50u32 {
            let now = t0 + Duration::from_millis(u64::from(round) * 400);
            cache.insert(hash(round % 4), now);
            if round % 5 == 0 {
                cache.remove(&hash(round % 4));
            }
            assert!(cache.len() <= 3);
            assert!(cache.order.len() <= 3);
        }
        cache.remove(&hash(1));
        assert!(!cache.contains(&hash(1), t0 + Duration::from_secs(20)));
    }
}
