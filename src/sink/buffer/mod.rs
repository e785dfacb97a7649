//! The buffer between the pipeline and the InfluxDB writer: an ordered queue of records
//! (one line protocol line each) with a separate read position and acknowledged
//! position.
//!
//! * `append` adds a batch of records durably (disk: one `fdatasync` per batch: group
//!   commit) and enforces `max_bytes` with the `when_full` policy.
//! * `read` hands out the next records (never across a segment boundary) and remembers
//!   the read as outstanding.
//! * `ack_oldest` acknowledges the oldest outstanding read: only then is the space
//!   released and the persisted cursor moved, so a crash replays everything that was not
//!   acknowledged, in order.
//!
//! Two implementations: [`DiskBuffer`] (segment files, crash-safe) and [`MemoryBuffer`].
//! Both are synchronous and single-owner: they run on the sink's spool thread, never on
//! a tokio worker.

mod disk;
mod memory;

pub use disk::{DiskBuffer, Recovery};
pub use memory::MemoryBuffer;

use crate::config::WhenFull;

/// Framing bytes per record on disk (length + CRC). Memory mode counts them too, so that
/// `max_bytes` means the same in both modes.
pub const RECORD_OVERHEAD: u64 = 8;

/// The largest record payload. Lines are far smaller (the encoder closes a line after
/// 100 fields of at most a few hundred bytes); the bound keeps a corrupt length field
/// from being believed.
pub const MAX_RECORD: usize = 1 << 20;

/// Errors of a buffer.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// `when_full = "block"` and the batch does not fit: retry after acknowledgements.
    #[error("buffer full")]
    Full,
    /// A record is larger than [`MAX_RECORD`].
    #[error("record of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// File I/O failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Limits shared by both implementations.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most unacknowledged bytes (payload + framing).
    pub max_bytes: u64,
    /// Segment size (disk only).
    pub segment_bytes: u64,
    /// What to do when `max_bytes` is reached.
    pub when_full: WhenFull,
}

/// A snapshot of a buffer's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records not yet acknowledged.
    pub unacked_records: u64,
    /// Bytes (with framing) not yet acknowledged.
    pub unacked_bytes: u64,
    /// Records not yet read.
    pub unread_records: u64,
    /// Payload bytes not yet read.
    pub unread_bytes: u64,
    /// Segment files (0 in memory).
    pub segments: usize,
}

/// The outcome of an append.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    /// Unacknowledged records deleted to make room (`drop_oldest`).
    pub dropped: u64,
}

/// A buffer of records.
pub trait Buffer: Send {
    /// Append `records` (durably, for disk), applying the `when_full` policy.
    fn append(&mut self, records: &Records) -> Result<Appended, BufferError>;
    /// Read up to `max_records` records / about `max_bytes` payload bytes (at least one
    /// record when any is unread), appending each payload and a `\n` to `out`. Returns
    /// the number of records; a non-empty read must later be acknowledged with
    /// [`Buffer::ack_oldest`].
    fn read(
        &mut self,
        max_records: usize,
        max_bytes: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, BufferError>;
    /// Acknowledge the oldest outstanding read.
    fn ack_oldest(&mut self) -> Result<(), BufferError>;
    /// Damage found while reading (records skipped), to be reported once.
    fn take_damage(&mut self) -> Option<String> {
        None
    }
    /// Counters.
    fn stats(&self) -> Stats;
}

/// A batch of records in one allocation: payloads back to back and their end offsets.
#[derive(Debug, Clone, Default)]
pub struct Records {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl Records {
    /// Start a record: its bytes are whatever is pushed to the returned buffer until
    /// [`Records::commit`] (or [`Records::abandon`]).
    pub fn begin(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }

    /// Close the record started last.
    pub fn commit(&mut self) {
        self.ends.push(self.data.len());
    }

    /// Forget the bytes pushed since the last commit.
    pub fn abandon(&mut self) {
        self.data.truncate(self.ends.last().copied().unwrap_or(0));
    }

    /// Add a whole record.
    pub fn push(&mut self, record: &[u8]) {
        self.data.extend_from_slice(record);
        self.commit();
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Payload bytes of all records.
    pub fn payload_bytes(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    /// Bytes the records take in a buffer (payload + framing).
    pub fn framed_bytes(&self) -> u64 {
        self.payload_bytes() as u64 + RECORD_OVERHEAD * self.ends.len() as u64
    }

    /// The records in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let r = &self.data[start..end];
            start = end;
            r
        })
    }

    /// Remove every record, keeping the allocations.
    pub fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
    }
}

/// Open the buffer the config asks for.
pub fn open(
    mode: crate::config::BufferMode,
    dir: &std::path::Path,
    limits: Limits,
) -> Result<(Box<dyn Buffer>, Recovery), BufferError> {
    match mode {
        crate::config::BufferMode::Disk => {
            let (b, recovery) = DiskBuffer::open(dir, limits)?;
            Ok((Box::new(b), recovery))
        }
        crate::config::BufferMode::Memory => {
            Ok((Box::new(MemoryBuffer::new(limits)), Recovery::default()))
        }
    }
}

#[cfg(test)]
mod tests;
