//! [`Deadlines`]: when each unfinished command must be looked at again: its `ttl`
//! while queued, its `timeout` once sent. One entry per arming; an entry whose command
//! was re-armed or finished since is skipped when it comes due (the dispatcher keeps
//! each command's current deadline and compares), so re-arming never searches.
//!
//! Bounded: every arming belongs to an unfinished command, and a command is armed at
//! most once per step (creation, send, loss), so stale entries are few and leave when
//! they come due.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

/// Deadlines in time order.
#[derive(Default)]
pub struct Deadlines {
    due: BTreeSet<(Instant, String)>,
}

impl Deadlines {
    /// Arm `id` for `at`.
    pub fn arm(&mut self, at: Instant, id: &str) {
        self.due.insert((at, id.to_owned()));
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }

    /// Take every entry due at `now`, earliest first.
    pub fn take_due(&mut self, now: Instant) -> Vec<(Instant, String)> {
        let mut out = Vec::new();
        while self.due.first().is_some_and(|(at, _)| *at <= now) {
            if let Some(e) = self.due.pop_first() {
                out.push(e);
            }
        }
        out
    }

    /// Entries held (stale ones included).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.due.len()
    }
}

/// The instant a wall-clock deadline (ms since the epoch) falls on, seen from
/// `now_ms`: deadlines read back from the database after a restart are re-armed on
/// the monotonic clock.
pub fn instant_of(deadline_ms: u64, now_ms: u64, now: Instant) -> Instant {
    now + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn entries_come_due_in_time_order() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        d.arm(t0 + Duration::from_secs(3), "b");
        d.arm(t0 + Duration::from_secs(1), "a");
        d.arm(t0 + Duration::from_secs(5), "c");
        assert_eq!(d.next(), Some(t0 + Duration::from_secs(1)));
        assert!(d.take_due(t0).is_empty());
        tokio::time::advance(Duration::from_secs(3)).await;
        let due: Vec<String> = d
            .take_due(Instant::now())
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        assert_eq!(due, ["a", "b"]);
        assert_eq!(d.len(), 1);
        assert_eq!(
            instant_of(1_500, 1_000, t0),
            t0 + Duration::from_millis(500)
        );
        assert_eq!(instant_of(500, 1_000, t0), t0);
    }
}
