//! Why something was dropped, with one reason type per counted unit.
//!
//! A drop is counted in the unit that was lost where it happened: the pipeline refuses
//! whole messages, the durable destinations lose readings of a batch, and the InfluxDB
//! buffer loses line-protocol points (one line groups the readings of one device and
//! timestamp). Adding those numbers would be meaningless, so each unit has its own
//! counter, and each counter its own reason type. An event names its unit by the reason
//! it carries, which is why a count cannot land in the counter of another unit.
//!
//! The discriminant of each reason indexes its counter array, in the order of `ALL`; a
//! test checks that the two agree.

/// Why whole device messages were dropped (`fluxgate_dropped_messages_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageDropReason {
    /// The pipeline was gone (shutdown) when a message arrived.
    ShuttingDown,
    /// The device sent faster than `limits.device_rate` allows (its token bucket was
    /// empty): the message was refused before it was decoded.
    RateLimited,
}

impl MessageDropReason {
    /// Every reason, in discriminant order, so that each label is exported from the start.
    pub(super) const ALL: [MessageDropReason; 2] = [
        MessageDropReason::ShuttingDown,
        MessageDropReason::RateLimited,
    ];

    /// The metric label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            MessageDropReason::ShuttingDown => "shutting_down",
            MessageDropReason::RateLimited => "rate_limited",
        }
    }
}

/// Why decoded readings were dropped (`fluxgate_dropped_readings_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadingDropReason {
    /// The store failed to commit a batch (disk full, I/O error), or had stopped.
    StoreFailed,
    /// The InfluxDB sink's buffer failed to take a batch (disk error) or had stopped.
    SinkBufferFailed,
    /// The gateway stopped before a destination could take a batch.
    ShuttingDown,
    /// A reading named a new metric of a device that already has
    /// `limits.max_metrics_per_device` metrics: it would have created a series.
    TooManyMetrics,
    /// A reading named a new series while the gateway already holds `limits.max_series`.
    TooManySeries,
    /// Cluster mode: JetStream refused or did not acknowledge a batch (the stream is
    /// full under `discard = new`, no quorum, the connection was lost); its senders were
    /// told to retry.
    StreamFailed,
}

impl ReadingDropReason {
    /// Every reason, in discriminant order, so that each label is exported from the start.
    pub(super) const ALL: [ReadingDropReason; 6] = [
        ReadingDropReason::StoreFailed,
        ReadingDropReason::SinkBufferFailed,
        ReadingDropReason::ShuttingDown,
        ReadingDropReason::TooManyMetrics,
        ReadingDropReason::TooManySeries,
        ReadingDropReason::StreamFailed,
    ];

    /// The metric label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            ReadingDropReason::StoreFailed => "store_failed",
            ReadingDropReason::SinkBufferFailed => "sink_buffer_failed",
            ReadingDropReason::ShuttingDown => "shutting_down",
            ReadingDropReason::TooManyMetrics => "too_many_metrics",
            ReadingDropReason::TooManySeries => "too_many_series",
            ReadingDropReason::StreamFailed => "stream_failed",
        }
    }
}

/// Why InfluxDB line-protocol points (lines) were dropped from the sink's buffer
/// (`fluxgate_dropped_points_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointDropReason {
    /// The buffer was full (`when_full = "drop_oldest"`): its oldest unwritten lines were
    /// deleted.
    SinkBufferFull,
    /// The gateway stopped with unwritten lines in the memory buffer, which does not
    /// outlive the process.
    ShuttingDown,
}

impl PointDropReason {
    /// Every reason, in discriminant order, so that each label is exported from the start.
    pub(super) const ALL: [PointDropReason; 2] = [
        PointDropReason::SinkBufferFull,
        PointDropReason::ShuttingDown,
    ];

    /// The metric label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            PointDropReason::SinkBufferFull => "sink_buffer_full",
            PointDropReason::ShuttingDown => "shutting_down",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counters are indexed by discriminant and rendered in the order of `ALL`; if
    /// the two disagreed, a drop would be exported under another reason's label.
    #[test]
    fn discriminants_follow_all() {
        for (i, r) in MessageDropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, r) in ReadingDropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, r) in PointDropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }
}
