//! Rate limits for log lines that outside input can cause.
//!
//! A device sending garbage, a fleet with a wrong token or a database outage can each
//! produce thousands of events per second; logging every one would flood the log and
//! cost more than the events themselves. Each class of such lines therefore gets a few
//! lines per second, and the next line it writes carries how many were suppressed in
//! between (the counters still count every event).
//!
//! Every class has a budget of its own, so a flood of one kind never hides another: a
//! stream of undecodable messages must not silence the line that says a device's
//! credentials were refused, or that readings were dropped.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A kind of log line with its own rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LogClass {
    /// A message failed to decode.
    DecodeFailed,
    /// A device's credentials were refused.
    AuthRefused,
    /// An MQTT client broke the protocol discipline.
    MqttViolation,
    /// Whole messages were dropped.
    MessagesDropped,
    /// Readings were dropped.
    ReadingsDropped,
    /// InfluxDB points were dropped.
    PointsDropped,
    /// An InfluxDB write failed and will be retried (an outage retries for as long as it
    /// lasts).
    SinkRetry,
    /// A store query was refused because every query slot was busy (a client can cause
    /// it by flooding history requests).
    StoreQueryRejected,
    /// The HTTP server refused a connection over `http.max_connections`.
    HttpRefused,
    /// A command request or a device's reply to a command was refused.
    CommandRefused,
    /// Routing a command between cluster nodes failed.
    CommandRoute,
}

impl LogClass {
    /// How many classes there are; the discriminant indexes [`LogBudgets`].
    const COUNT: usize = 11;
}

/// One budget per [`LogClass`].
#[derive(Default)]
pub(super) struct LogBudgets {
    budgets: [LogBudget; LogClass::COUNT],
}

impl LogBudgets {
    /// `Some(suppressed_since_last_line)` when a line of `class` may be written now.
    pub(super) fn take(&self, class: LogClass) -> Option<u64> {
        self.take_at(class, crate::model::now_ms() / 1000)
    }

    /// [`take`](Self::take) at a given second, so tests need not wait for the clock.
    fn take_at(&self, class: LogClass, second: u64) -> Option<u64> {
        self.budgets[class as usize].take_at(second)
    }
}

/// A per-second budget for one class of log lines.
#[derive(Default)]
struct LogBudget {
    /// The second the budget was last used in.
    second: AtomicU64,
    /// Lines written in that second.
    used: AtomicU64,
    /// Lines suppressed since the last line that was written.
    suppressed: AtomicU64,
}

impl LogBudget {
    /// Lines per second per class: enough to see what is happening, few enough that a
    /// flood costs nothing noticeable.
    const PER_SECOND: u64 = 20;

    /// `Some(suppressed_since_last_line)` when a line may be written in `second`.
    fn take_at(&self, second: u64) -> Option<u64> {
        // Two threads crossing into a new second at once may both reset the count; the
        // budget is approximate by design and never blocks.
        if self.second.swap(second, Relaxed) != second {
            self.used.store(0, Relaxed);
        }
        if self.used.fetch_add(1, Relaxed) < Self::PER_SECOND {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [LogClass; LogClass::COUNT] = [
        LogClass::DecodeFailed,
        LogClass::AuthRefused,
        LogClass::MqttViolation,
        LogClass::MessagesDropped,
        LogClass::ReadingsDropped,
        LogClass::PointsDropped,
        LogClass::SinkRetry,
        LogClass::StoreQueryRejected,
        LogClass::HttpRefused,
        LogClass::CommandRefused,
        LogClass::CommandRoute,
    ];

    /// Uses up the budget of `class` in `second` and checks that the next line is
    /// suppressed.
    fn exhaust(budgets: &LogBudgets, class: LogClass, second: u64) {
        for _ in 0..LogBudget::PER_SECOND {
            assert!(budgets.take_at(class, second).is_some(), "{class:?}");
        }
        assert_eq!(budgets.take_at(class, second), None, "{class:?}");
    }

    #[test]
    fn every_class_has_its_own_budget() {
        for (i, class) in ALL.iter().enumerate() {
            assert_eq!(*class as usize, i, "{class:?} indexes its own budget");
        }
        for flooded in ALL {
            let budgets = LogBudgets::default();
            exhaust(&budgets, flooded, 7);
            for other in ALL.into_iter().filter(|c| *c != flooded) {
                assert_eq!(
                    budgets.take_at(other, 7),
                    Some(0),
                    "a flood of {flooded:?} suppressed {other:?}"
                );
            }
        }
    }

    #[test]
    fn decode_flood_does_not_hide_drops_or_auth_refusals() {
        let budgets = LogBudgets::default();
        exhaust(&budgets, LogClass::DecodeFailed, 100);
        for _ in 0..1_000 {
            assert_eq!(budgets.take_at(LogClass::DecodeFailed, 100), None);
        }
        assert_eq!(budgets.take_at(LogClass::MessagesDropped, 100), Some(0));
        assert_eq!(budgets.take_at(LogClass::AuthRefused, 100), Some(0));
        // The next second, the flooded class writes again and reports what it
        // suppressed: the exhausting attempt plus the thousand after it.
        assert_eq!(budgets.take_at(LogClass::DecodeFailed, 101), Some(1_001));
        assert_eq!(budgets.take_at(LogClass::DecodeFailed, 101), Some(0));
    }
}
