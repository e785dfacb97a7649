//! The memory-only buffer: the same contract as the disk buffer without persistence
//! (`buffer.mode = "memory"`). It rides out database outages, not gateway restarts.

use std::collections::VecDeque;

use super::{Appended, Buffer, BufferError, Limits, RECORD_OVERHEAD, Records, Stats};
use crate::config::WhenFull;

/// Records in a deque; sequence numbers track the read and acknowledged positions.
#[derive(Debug)]
pub struct MemoryBuffer {
    limits: Limits,
    /// Unacknowledged records, oldest first; `records[0]` has sequence number `first`.
    records: VecDeque<Box<[u8]>>,
    first: u64,
    /// Sequence number of the next record to read.
    read: u64,
    /// End sequence numbers of outstanding reads, oldest first.
    outstanding: VecDeque<u64>,
    bytes: u64,
    unread_bytes: u64,
}

impl MemoryBuffer {
    /// An empty buffer.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            records: VecDeque::new(),
            first: 0,
            read: 0,
            outstanding: VecDeque::new(),
            bytes: 0,
            unread_bytes: 0,
        }
    }

    fn pop_front(&mut self) -> Option<u64> {
        let r = self.records.pop_front()?;
        let framed = r.len() as u64 + RECORD_OVERHEAD;
        self.bytes -= framed;
        if self.read <= self.first {
            // Never read: it leaves the unread region too.
            self.unread_bytes -= r.len() as u64;
            self.read += 1;
        }
        self.first += 1;
        Some(framed)
    }
}

impl Buffer for MemoryBuffer {
    fn append(&mut self, records: &Records) -> Result<Appended, BufferError> {
        let need = records.framed_bytes();
        let mut dropped = 0;
        while self.bytes > 0 && self.bytes + need > self.limits.max_bytes {
            match self.limits.when_full {
                WhenFull::Block => return Err(BufferError::Full),
                WhenFull::DropOldest => {
                    // A record already read is in a writer's request, which still
                    // delivers it (counted as written or dead-lettered there); only a
                    // record never read is lost here.
                    let was_unread = self.read <= self.first;
                    if self.pop_front().is_some() && was_unread {
                        dropped += 1;
                    }
                }
            }
        }
        for r in records.iter() {
            if r.len() > super::MAX_RECORD {
                return Err(BufferError::TooLarge(r.len()));
            }
        }
        for r in records.iter() {
            self.records.push_back(r.into());
        }
        self.bytes += need;
        self.unread_bytes += records.payload_bytes() as u64;
        Ok(Appended { dropped })
    }

    fn read(
        &mut self,
        max_records: usize,
        max_bytes: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, BufferError> {
        let end = self.first + self.records.len() as u64;
        let mut n = 0;
        let mut bytes = 0;
        while self.read < end && n < max_records.max(1) {
            let r = &self.records[(self.read - self.first) as usize];
            if n > 0 && bytes + r.len() > max_bytes {
                break;
            }
            out.extend_from_slice(r);
            out.push(b'\n');
            bytes += r.len();
            self.unread_bytes -= r.len() as u64;
            self.read += 1;
            n += 1;
        }
        if n > 0 {
            self.outstanding.push_back(self.read);
        }
        Ok(n)
    }

    fn ack_oldest(&mut self) -> Result<(), BufferError> {
        if let Some(end) = self.outstanding.pop_front() {
            while self.first < end && self.pop_front().is_some() {}
        }
        Ok(())
    }

    fn stats(&self) -> Stats {
        Stats {
            unacked_records: self.records.len() as u64,
            unacked_bytes: self.bytes,
            unread_records: self.first + self.records.len() as u64 - self.read,
            unread_bytes: self.unread_bytes,
            segments: 0,
        }
    }
}
