//! Acknowledgements shared by several durable destinations, and the batch that carries
//! them from the pipeline to each destination.
//!
//! A WS/HTTP message is acknowledged only when every enabled durable destination (the
//! embedded store's commit, the InfluxDB sink's buffer append) has confirmed it. The
//! pipeline splits the message's [`AckSender`] into one [`AckPart`] per destination; a
//! small shared countdown answers the sender when the last part completes: with the
//! reading count if all confirmed, with [`Rejection::Unavailable`] if any failed. A part
//! that is dropped without being confirmed (a destination stopped, a batch was lost)
//! counts as a failure, so no sender can wait forever.
//!
//! MQTT messages have no sender and get no parts: fire-and-forget traffic pays nothing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::{AckSender, Reading, Rejection};

/// What every durable destination receives: the batch's readings (shared, not copied,
/// between destinations) and this destination's parts of the waiting acknowledgements.
#[derive(Debug)]
pub struct DurableBatch {
    /// The readings in arrival order.
    pub readings: Arc<Vec<Reading>>,
    /// Confirm each after the readings are durable here (or fail it).
    pub acks: Vec<AckPart>,
    /// Cluster mode, for the local store: the cluster stream's sequence of the last
    /// record in this batch, committed with it (see `cluster::Follower`).
    pub stream_position: Option<u64>,
}

struct Shared {
    remaining: AtomicUsize,
    failed: AtomicBool,
    readings: usize,
    /// Answered instead of `Ok(readings)` when every destination confirmed: the message
    /// was accepted only in part (see [`Rejection::Capped`]).
    partial: Option<Rejection>,
    sender: Mutex<Option<AckSender>>,
}

/// One destination's share of a message's acknowledgement.
pub struct AckPart {
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for AckPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckPart")
            .field("pending", &self.shared.is_some())
            .finish()
    }
}

impl AckPart {
    /// Split `sender` (a message of `readings` readings) into `destinations` parts
    /// (at least one).
    pub fn split(sender: AckSender, readings: usize, destinations: usize) -> Vec<AckPart> {
        Self::split_partial(sender, readings, destinations, None)
    }

    /// Like [`split`](Self::split), but once every part confirmed the sender hears
    /// `partial` (when set) instead of `Ok(readings)`: the readings are durable, and the
    /// rejection says what else of the message was refused.
    pub fn split_partial(
        sender: AckSender,
        readings: usize,
        destinations: usize,
        partial: Option<Rejection>,
    ) -> Vec<AckPart> {
        let n = destinations.max(1);
        let shared = Arc::new(Shared {
            remaining: AtomicUsize::new(n),
            failed: AtomicBool::new(false),
            readings,
            partial,
            sender: Mutex::new(Some(sender)),
        });
        (0..n)
            .map(|_| AckPart {
                shared: Some(shared.clone()),
            })
            .collect()
    }

    /// This destination has the readings durably.
    pub fn confirm(mut self) {
        self.finish(true);
    }

    /// This destination failed to store the readings.
    pub fn fail(mut self) {
        self.finish(false);
    }

    /// Confirm or fail.
    pub fn complete(self, ok: bool) {
        if ok { self.confirm() } else { self.fail() }
    }

    fn finish(&mut self, ok: bool) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        if !ok {
            shared.failed.store(true, Ordering::Release);
        }
        // AcqRel: the last part sees every other part's `failed` store.
        if shared.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let sender = shared.sender.lock().ok().and_then(|mut s| s.take());
            if let Some(sender) = sender {
                let outcome = if shared.failed.load(Ordering::Acquire) {
                    Err(Rejection::Unavailable)
                } else if let Some(partial) = &shared.partial {
                    Err(partial.clone())
                } else {
                    Ok(shared.readings)
                };
                // A sender that stopped waiting (client gone) is not an error.
                let _ = sender.send(outcome);
            }
        }
    }
}

impl Drop for AckPart {
    fn drop(&mut self) {
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;

    #[test]
    fn answers_once_all_parts_confirmed() {
        let (tx, mut rx) = oneshot::channel();
        let mut parts = AckPart::split(tx, 4, 2);
        parts.pop().expect("part").confirm();
        assert!(rx.try_recv().is_err(), "answered before the last part");
        parts.pop().expect("part").confirm();
        assert_eq!(rx.try_recv().expect("answer"), Ok(4));
    }

    #[test]
    fn a_partial_answer_comes_after_durability_and_failure_wins() {
        let partial = Rejection::RateLimited;
        let (tx, mut rx) = oneshot::channel();
        let mut parts = AckPart::split_partial(tx, 2, 2, Some(partial.clone()));
        parts.pop().expect("part").confirm();
        assert!(rx.try_recv().is_err(), "answered before the last part");
        parts.pop().expect("part").confirm();
        assert_eq!(rx.try_recv().expect("answer"), Err(partial.clone()));

        let (tx, mut rx) = oneshot::channel();
        let mut parts = AckPart::split_partial(tx, 2, 2, Some(partial));
        parts.pop().expect("part").fail();
        parts.pop().expect("part").confirm();
        assert_eq!(rx.try_recv().expect("answer"), Err(Rejection::Unavailable));
    }

    #[test]
    fn any_failure_or_drop_rejects() {
        let (tx, mut rx) = oneshot::channel();
        let mut parts = AckPart::split(tx, 4, 2);
        parts.pop().expect("part").fail();
        parts.pop().expect("part").confirm();
        assert_eq!(rx.try_recv().expect("answer"), Err(Rejection::Unavailable));

        let (tx, mut rx) = oneshot::channel();
        let parts = AckPart::split(tx, 1, 3);
        drop(parts);
        assert_eq!(rx.try_recv().expect("answer"), Err(Rejection::Unavailable));
    }
}
