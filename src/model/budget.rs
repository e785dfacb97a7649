//! [`QueueBudget`]: the byte bound of the ingest -> pipeline queue.
//!
//! The queue is a bounded channel of messages, but messages differ in size by four
//! orders of magnitude: 8,192 messages of the 2 MiB frame cap would be 16 GiB. So every
//! message also takes its size from a shared byte budget before it is queued, and the
//! [`BudgetPermit`] it gets travels inside its `Envelope`: the bytes return to the budget
//! when the pipeline has decoded the message and drops the envelope. What a transport
//! does when the budget is used up is its full-policy, named where the queue is created
//! (every transport waits: backpressure to the device).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes a message is charged beyond its payload (the envelope, its device id).
pub const ENVELOPE_OVERHEAD: usize = 64;

/// The shared byte budget of the ingest -> pipeline queue. Cloning shares it.
#[derive(Debug, Clone)]
pub struct QueueBudget {
    bytes: Arc<Semaphore>,
    capacity: usize,
}

/// Bytes taken from a [`QueueBudget`]; they return to it when this is dropped.
#[derive(Debug)]
pub struct BudgetPermit {
    _permit: OwnedSemaphorePermit,
}

impl QueueBudget {
    /// A budget of `capacity` bytes (at most `Semaphore::MAX_PERMITS`; config validation
    /// ensures it).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    /// What a message of `payload` bytes costs, capped at the whole budget so that even
    /// an oversized message can be admitted (alone) rather than wait forever.
    fn cost(&self, payload: usize) -> u32 {
        let bytes = payload.saturating_add(ENVELOPE_OVERHEAD).min(self.capacity);
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    /// Take the bytes for a message of `payload` bytes now, or `None` when the budget
    /// has not enough left.
    pub fn try_take(&self, payload: usize) -> Option<BudgetPermit> {
        self.bytes
            .clone()
            .try_acquire_many_owned(self.cost(payload))
            .ok()
            .map(|p| BudgetPermit { _permit: p })
    }

    /// Take the bytes for a message of `payload` bytes, waiting until they are free.
    /// The budget is never closed, so this only ends by getting them.
    pub async fn take(&self, payload: usize) -> BudgetPermit {
        loop {
            if let Ok(p) = self
                .bytes
                .clone()
                .acquire_many_owned(self.cost(payload))
                .await
            {
                return BudgetPermit { _permit: p };
            }
        }
    }

    /// Bytes currently taken.
    pub fn used(&self) -> usize {
        self.capacity - self.bytes.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_return_their_bytes_when_dropped() {
        let budget = QueueBudget::new(1_000);
        let a = budget.try_take(400).expect("fits");
        assert_eq!(budget.used(), 464);
        let b = budget.try_take(400).expect("fits");
        assert_eq!(budget.used(), 928);
        assert!(budget.try_take(100).is_none(), "over the budget");
        drop(a);
        assert_eq!(budget.used(), 464);
        assert!(budget.try_take(100).is_some());
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn an_oversized_message_takes_the_whole_budget_instead_of_waiting_forever() {
        let budget = QueueBudget::new(1_000);
        let p = budget.try_take(5_000).expect("admitted alone");
        assert_eq!(budget.used(), 1_000);
        assert!(budget.try_take(0).is_none());
        drop(p);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn take_waits_until_bytes_are_returned() {
        let budget = QueueBudget::new(1_000);
        let held = budget.try_take(900).expect("fits");
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(500).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        let got = waiter.await.expect("joined");
        assert_eq!(budget.used(), 564);
        drop(got);
    }
}
