//! A reading's place in the live stream: [`Position`] (`{epoch}:{seq}`, what clients
//! resume from) and [`LiveReading`] (a reading with its position and series hash).

use crate::model::{Reading, Value};

/// A reading with its stream position.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveReading {
    /// Sequence number within this gateway run's epoch (starts at 1).
    pub seq: u64,
    /// A hash of (device, metric), computed once at publish so that conflating queues
    /// key by a number instead of hashing both strings for every subscriber.
    pub series: u64,
    /// When the hub received it, ms since the Unix epoch.
    pub arrival_ms: u64,
    /// The reading.
    pub reading: Reading,
}

impl LiveReading {
    /// Approximate memory held by this entry, for the ring's byte bound.
    pub(super) fn size(&self) -> usize {
        let r = &self.reading;
        96 + r.device.len()
            + r.metric.len()
            + match &r.value {
                Value::Str(s) => s.len(),
                _ => 0,
            }
    }
}

/// A stream position: `{epoch}:{seq}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The gateway run.
    pub epoch: u64,
    /// The sequence number within it.
    pub seq: u64,
}

impl Position {
    /// Parse `{epoch}:{seq}`.
    pub fn parse(s: &str) -> Option<Position> {
        let (e, q) = s.trim().split_once(':')?;
        Some(Position {
            epoch: e.parse().ok()?,
            seq: q.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}
