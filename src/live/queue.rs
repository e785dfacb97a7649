//! A subscriber's bounded, conflating queue, and the series hash it is keyed by. This
//! is the hub's only per-client work on publish, so its cost bounds what a stalled
//! dashboard can cost ingest.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use super::position::LiveReading;

/// A subscriber's queue. Up to its capacity it is a FIFO; past it, it switches to
/// conflated mode: one slot per series (keyed by the series hash), so each further
/// reading costs one map insert, however long the client stays stalled, instead of
/// re-conflating the whole queue on every publish.
#[derive(Default)]
pub(super) struct ClientQueue {
    items: VecDeque<Arc<LiveReading>>,
    latest: HashMap<u64, Arc<LiveReading>, BuildHasherDefault<SeriesHasher>>,
    pub(super) conflated: u64,
}

impl ClientQueue {
    pub(super) fn len(&self) -> usize {
        self.items.len() + self.latest.len()
    }

    /// Queue one reading; returns how many queued readings it replaced (0 or 1, or more
    /// when this push switched the queue to conflated mode).
    pub(super) fn push(&mut self, l: Arc<LiveReading>, capacity: usize) -> u64 {
        if self.latest.is_empty() && self.items.len() < capacity {
            self.items.push_back(l);
            return 0;
        }
        let mut replaced = 0;
        if self.latest.is_empty() {
            for old in self.items.drain(..) {
                replaced += u64::from(Self::insert(&mut self.latest, old));
            }
        }
        replaced += u64::from(Self::insert(&mut self.latest, l));
        self.conflated += replaced;
        replaced
    }

    /// Keep the newer of two readings of a series; true when one was replaced. Two
    /// different series with the same 64-bit hash are both kept (the second under a key
    /// derived from its sequence number), so a collision never loses a series.
    fn insert(
        latest: &mut HashMap<u64, Arc<LiveReading>, BuildHasherDefault<SeriesHasher>>,
        l: Arc<LiveReading>,
    ) -> bool {
        match latest.get_mut(&l.series) {
            Some(slot)
                if slot.reading.device == l.reading.device
                    && slot.reading.metric == l.reading.metric =>
            {
                *slot = l;
                true
            }
            Some(_) => {
                // A hash collision between two different series: keep both, under a
                // key that cannot collide with a series hash's slot in practice.
                latest.insert(l.seq ^ 0x9e37_79b9_7f4a_7c15, l);
                false
            }
            None => {
                latest.insert(l.series, l);
                false
            }
        }
    }

    /// Take up to `max` readings in stream order.
    pub(super) fn take(&mut self, max: usize) -> Vec<Arc<LiveReading>> {
        if !self.latest.is_empty() {
            let mut rest: Vec<_> = self.latest.drain().map(|(_, l)| l).collect();
            rest.sort_by_key(|l| l.seq);
            self.items.extend(rest);
        }
        let n = self.items.len().min(max);
        self.items.drain(..n).collect()
    }
}

/// The series hash is already a hash: use it as is.
#[derive(Default)]
struct SeriesHasher(u64);

impl std::hash::Hasher for SeriesHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub(super) fn series_hash(device: &str, metric: &str) -> u64 {
    use std::hash::BuildHasher;
    // One randomly seeded state for the whole process: the value only has to be stable
    // within it, and a seed nobody outside knows keeps devices from choosing names that
    // collide with another series. foldhash, because this runs for every reading.
    static STATE: std::sync::LazyLock<foldhash::fast::RandomState> =
        std::sync::LazyLock::new(foldhash::fast::RandomState::default);
    STATE.hash_one((device, metric))
}
