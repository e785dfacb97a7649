//! The batcher: a pure state machine that groups items into batches by size and age.
//!
//! It knows nothing of tasks or clocks: callers pass `now` in, which is what lets the
//! property tests drive it against a simple model. A message is never split across
//! batches, because its acknowledgement covers all of its readings.

use std::time::{Duration, Instant};

/// Items and the acknowledgements that wait for them.
#[derive(Debug)]
pub struct Batch<T, A> {
    /// The items in arrival order.
    pub items: Vec<T>,
    /// The acknowledgements of the messages whose items are in `items`.
    pub acks: Vec<A>,
}

impl<T, A> Default for Batch<T, A> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            acks: Vec::new(),
        }
    }
}

/// Groups items into batches of at most `max_rows` (a single larger message becomes a
/// batch of its own). A batch is due when its oldest item is `max_age` old, or sooner,
/// `ack_max_age` after the first message that waits for an acknowledgement arrived:
/// senders that wait get group commit with a short delay, while fire-and-forget traffic
/// (MQTT) is written in fewer, larger transactions.
#[derive(Debug)]
pub struct Batcher<T, A> {
    max_rows: usize,
    max_age: Duration,
    ack_max_age: Duration,
    pending: Batch<T, A>,
    oldest: Option<Instant>,
    first_ack: Option<Instant>,
}

impl<T, A> Batcher<T, A> {
    /// A batcher with the given bounds (`max_rows` >= 1).
    pub fn new(max_rows: usize, max_age: Duration, ack_max_age: Duration) -> Self {
        Self {
            max_rows: max_rows.max(1),
            max_age,
            ack_max_age,
            pending: Batch::default(),
            oldest: None,
            first_ack: None,
        }
    }

    /// Add one message's items (and its ack, if any). Batches that became due are
    /// appended to `out`: the pending batch when this message would overflow it, and
    /// then the batch holding this message if it reached `max_rows`.
    pub fn push(
        &mut self,
        items: impl ExactSizeIterator<Item = T>,
        ack: Option<A>,
        now: Instant,
        out: &mut Vec<Batch<T, A>>,
    ) {
        let n = items.len();
        if !self.pending.items.is_empty() && self.pending.items.len() + n > self.max_rows {
            out.extend(self.flush());
        }
        if n == 0 && ack.is_none() {
            return;
        }
        self.oldest.get_or_insert(now);
        if ack.is_some() {
            self.first_ack.get_or_insert(now);
        }
        self.pending.items.extend(items);
        self.pending.acks.extend(ack);
        if self.pending.items.len() >= self.max_rows {
            out.extend(self.flush());
        }
    }

    /// When the pending batch becomes due by age, if anything is pending.
    pub fn deadline(&self) -> Option<Instant> {
        let by_age = self.oldest.map(|t| t + self.max_age);
        let by_ack = self.first_ack.map(|t| t + self.ack_max_age);
        match (by_age, by_ack) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The pending batch if it is due by age at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Batch<T, A>> {
        match self.deadline() {
            Some(d) if d <= now => self.flush(),
            _ => None,
        }
    }

    /// Take whatever is pending (shutdown, or a deadline).
    pub fn flush(&mut self) -> Option<Batch<T, A>> {
        self.oldest = None;
        self.first_ack = None;
        if self.pending.items.is_empty() && self.pending.acks.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut self.pending))
    }

    /// Items pending.
    pub fn len(&self) -> usize {
        self.pending.items.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.items.is_empty() && self.pending.acks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// A message of n items, with an ack or not.
        Push(usize, bool),
        /// Time passes by this many ms, then the driver polls.
        Wait(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..40, any::<bool>()).prop_map(|(n, a)| Op::Push(n, a)),
            1 => (0u64..30).prop_map(Op::Wait),
        ]
    }

    proptest! {
        /// Against the model "a FIFO of items": nothing is lost, duplicated or reordered,
        /// batches respect max_rows unless one message alone exceeds it, messages are never
        /// split, and when the driver polls nothing stays pending longer than max_age and
        /// no acknowledgement waits longer than ack_max_age.
        #[test]
        fn batches_match_fifo_model(
            max_rows in 1usize..64,
            max_age_ms in 1u64..40,
            ack_max_age_ms in 1u64..20,
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let start = Instant::now();
            let mut now = start;
            let max_age = Duration::from_millis(max_age_ms);
            let ack_max_age = Duration::from_millis(ack_max_age_ms);
            let mut b: Batcher<(u32, usize), u32> = Batcher::new(max_rows, max_age, ack_max_age);
            // When each still-pending message arrived, with whether it waits for an ack.
            let mut pending: Vec<(Instant, bool)> = Vec::new();
            let mut out = Vec::new();
            let mut model_items = Vec::new();
            let mut model_acks = Vec::new();
            let mut sizes = Vec::new();
            let mut next_msg = 0u32;
            let mut pushed_at: Vec<Instant> = Vec::new();
            for op in ops {
                match op {
                    Op::Push(n, with_ack) => {
                        let id = next_msg;
                        next_msg += 1;
                        pushed_at.push(now);
                        sizes.push(n);
                        let items: Vec<(u32, usize)> = (0..n).map(|i| (id, i)).collect();
                        model_items.extend(items.iter().copied());
                        if with_ack { model_acks.push(id); }
                        let before = out.len();
                        b.push(items.into_iter(), with_ack.then_some(id), now, &mut out);
                        if out.len() > before { pending.clear(); }
                        if !b.is_empty() { pending.push((now, with_ack)); }
                    }
                    Op::Wait(ms) => {
                        now += Duration::from_millis(ms);
                        if let Some(batch) = b.poll(now) {
                            out.push(batch);
                            pending.clear();
                        }
                        for (at, acked) in &pending {
                            prop_assert!(now < *at + max_age, "a reading outlived max_age");
                            prop_assert!(!acked || now < *at + ack_max_age, "an ack outlived ack_max_age");
                        }
                    }
                }
            }
            out.extend(b.flush());
            prop_assert!(b.is_empty());
            let items: Vec<_> = out.iter().flat_map(|x| x.items.iter().copied()).collect();
            let acks: Vec<_> = out.iter().flat_map(|x| x.acks.iter().copied()).collect();
            prop_assert_eq!(items, model_items);
            prop_assert_eq!(acks, model_acks);
            for batch in &out {
                let mut msgs: Vec<u32> = batch.items.iter().map(|(m, _)| *m).collect();
                msgs.dedup();
                if batch.items.len() > max_rows {
                    prop_assert_eq!(msgs.len(), 1, "only a single oversized message may exceed max_rows");
                }
                // Every message's items are all in this batch (never split).
                for m in msgs {
                    let here = batch.items.iter().filter(|(x, _)| *x == m).count();
                    prop_assert_eq!(here, sizes[m as usize]);
                }
            }
        }
    }

    #[test]
    fn deadline_follows_oldest_item_and_first_ack() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b: Batcher<u8, ()> = Batcher::new(10, ms(100), ms(5));
        let mut out = Vec::new();
        assert_eq!(b.deadline(), None);
        b.push([1u8].into_iter(), None, t0, &mut out);
        assert_eq!(b.deadline(), Some(t0 + ms(100)));
        // A message waiting for its ack pulls the deadline in to ack_max_age.
        b.push([2u8].into_iter(), Some(()), t0 + ms(3), &mut out);
        assert_eq!(b.deadline(), Some(t0 + ms(8)));
        assert!(b.poll(t0 + ms(7)).is_none());
        let batch = b.poll(t0 + ms(8)).expect("due");
        assert_eq!(batch.items, vec![1, 2]);
        assert!(out.is_empty());
        assert_eq!(b.deadline(), None);
    }
}
