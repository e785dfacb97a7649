//! The crash-safe disk buffer: append-only segment files of CRC-checked records and a
//! persisted read cursor.
//!
//! Layout of `dir`:
//! * `{id:016}.seg`: segments, appended in id order. A record is
//!   `len: u32 LE | crc: u32 LE | payload`, where the CRC-32 covers the length bytes and
//!   the payload, so a damaged length is caught too.
//! * `cursor`: `segment id: u64 LE | offset: u64 LE | crc: u32 LE`: everything before
//!   it was acknowledged (written to the database). Replaced atomically (write to
//!   `cursor.tmp`, fsync, rename) on every acknowledgement.
//!
//! Appends are made durable with one `fdatasync` per batch (group commit), and a new
//! segment's name with an fsync of `dir` (an append fails if either fails). A segment is
//! deleted once the cursor has passed its end. On open every segment is scanned: a torn
//! tail (a crash during an append) is truncated, a damaged region in the middle is
//! skipped by searching for the next record whose CRC matches (the segment is rewritten
//! without it); both are reported in [`Recovery`], never a reason not to start.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{Appended, Buffer, BufferError, Limits, MAX_RECORD, RECORD_OVERHEAD, Records, Stats};
use crate::config::WhenFull;

const CURSOR: &str = "cursor";
const CURSOR_TMP: &str = "cursor.tmp";
const HEADER: usize = RECORD_OVERHEAD as usize;

/// Damage found (and skipped) when the buffer was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Damaged regions skipped (each a torn tail or a corrupt stretch).
    pub regions: u64,
    /// Bytes skipped.
    pub bytes: u64,
    /// One line per region: file and offset.
    pub details: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    seg: u64,
    off: u64,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    /// Bytes of valid records.
    len: u64,
    records: u64,
    /// Records before the cursor (only for the segment the cursor is in).
    acked_records: u64,
    /// Records before the read position (only for the segment being read).
    read_records: u64,
}

#[derive(Debug)]
struct Mark {
    end: Pos,
    records: u64,
    bytes: u64,
    /// Its segment was deleted by `drop_oldest`; acknowledging it changes nothing.
    dropped: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub struct DiskBuffer {
    dir: PathBuf,
    limits: Limits,
    /// Oldest first; the last one takes appends.
    segments: VecDeque<Segment>,
    writer: Option<File>,
    reader: Option<(u64, BufReader<File>)>,
    read: Pos,
    acked: Pos,
    outstanding: VecDeque<Mark>,
    next_id: u64,
    unacked_records: u64,
    unacked_bytes: u64,
    unread_records: u64,
    unread_bytes: u64,
    scratch: Vec<u8>,
    /// Damage found while reading, until the spool thread reports it.
    damage: Option<String>,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BufferError + 'a {
    move |source| BufferError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn record_crc(header_len: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header_len);
    h.update(payload);
    h.finalize()
}

/// The end of the valid record starting at `p`, if one does.
fn record_at(data: &[u8], p: usize) -> Option<usize> {
    let header = data.get(p..p + HEADER)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let payload = data.get(p + HEADER..p + HEADER + len)?;
    (record_crc(&header[..4], payload) == crc).then_some(p + HEADER + len)
}

fn encode_record(out: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&record_crc(&len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

impl DiskBuffer {
    fn seg_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016}.seg"))
    }

    /// Open (creating if needed) the buffer in `dir`, recovering from torn writes and
    /// corruption.
    pub fn open(dir: &Path, limits: Limits) -> Result<(Self, Recovery), BufferError> {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
            let entry = entry.map_err(io("list", dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_suffix(".seg")
                .and_then(|s| s.parse::<u64>().ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut recovery = Recovery::default();
        let mut b = DiskBuffer {
            dir: dir.to_owned(),
            limits,
            segments: VecDeque::new(),
            writer: None,
            reader: None,
            read: Pos { seg: 0, off: 0 },
            acked: Pos { seg: 0, off: 0 },
            outstanding: VecDeque::new(),
            next_id: ids.last().map_or(1, |l| l + 1),
            unacked_records: 0,
            unacked_bytes: 0,
            unread_records: 0,
            unread_bytes: 0,
            scratch: Vec::new(),
            damage: None,
        };
        let mut cursor = b.read_cursor(&mut recovery);
        if let Some(c) = cursor {
            b.next_id = b.next_id.max(c.seg);
        }
        for id in ids {
            if cursor.is_some_and(|c| id < c.seg) {
                // Acknowledged before a crash that came before its deletion.
                let path = b.seg_path(id);
                std::fs::remove_file(&path).map_err(io("remove", &path))?;
                continue;
            }
            let at_cursor = cursor.filter(|c| c.seg == id).map(|c| c.off);
            let (seg, new_cursor_off) = b.recover_segment(id, at_cursor, &mut recovery)?;
            if let Some(off) = new_cursor_off {
                cursor = Some(Pos { seg: id, off });
            }
            b.segments.push_back(seg);
        }
        // The acknowledged position: the cursor if it names a segment we have, else the
        // start of the oldest segment.
        let acked = match (cursor, b.segments.front()) {
            (Some(c), Some(_)) if b.segments.iter().any(|s| s.id == c.seg) => c,
            (_, Some(front)) => Pos {
                seg: front.id,
                off: 0,
            },
            (_, None) => Pos {
                seg: b.next_id,
                off: 0,
            },
        };
        b.acked = acked;
        b.read = acked;
        for s in &mut b.segments {
            if s.id == acked.seg {
                s.read_records = s.acked_records;
            }
            b.unacked_records += s.records - s.acked_records;
            b.unacked_bytes += s.len - if s.id == acked.seg { acked.off } else { 0 };
        }
        b.unread_records = b.unacked_records;
        b.unread_bytes = b.unacked_bytes - RECORD_OVERHEAD * b.unacked_records;
        b.delete_passed_segments()?;
        b.write_cursor()?;
        Ok((b, recovery))
    }

    fn read_cursor(&self, recovery: &mut Recovery) -> Option<Pos> {
        let path = self.dir.join(CURSOR);
        let data = std::fs::read(&path).ok()?;
        let ok = data.len() == 20 && {
            let crc = u32::from_le_bytes([data[16], data[17], data[18], data[19]]);
            crc32fast::hash(&data[..16]) == crc
        };
        if !ok {
            recovery.regions += 1;
            recovery.bytes += data.len() as u64;
            recovery.details.push(format!(
                "{}: damaged cursor, replaying from the oldest segment",
                path.display()
            ));
            return None;
        }
        let mut seg = [0u8; 8];
        let mut off = [0u8; 8];
        seg.copy_from_slice(&data[..8]);
        off.copy_from_slice(&data[8..16]);
        Some(Pos {
            seg: u64::from_le_bytes(seg),
            off: u64::from_le_bytes(off),
        })
    }

    fn write_cursor(&self) -> Result<(), BufferError> {
        let mut data = Vec::with_capacity(20);
        data.extend_from_slice(&self.acked.seg.to_le_bytes());
        data.extend_from_slice(&self.acked.off.to_le_bytes());
        data.extend_from_slice(&crc32fast::hash(&data).to_le_bytes());
        let tmp = self.dir.join(CURSOR_TMP);
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&data).map_err(io("write", &tmp))?;
        f.sync_data().map_err(io("sync", &tmp))?;
        let path = self.dir.join(CURSOR);
        std::fs::rename(&tmp, &path).map_err(io("rename", &path))
    }

    /// Scan one segment; cut or rewrite damage away. Returns its metadata and, when the
    /// cursor is in it, the cursor's offset in the (possibly rewritten) file.
    fn recover_segment(
        &self,
        id: u64,
        cursor_off: Option<u64>,
        recovery: &mut Recovery,
    ) -> Result<(Segment, Option<u64>), BufferError> {
        let path = self.seg_path(id);
        let data = std::fs::read(&path).map_err(io("read", &path))?;
        let mut valid: Vec<(usize, usize)> = Vec::new();
        let mut damaged_mid = false;
        let mut p = 0;
        while p < data.len() {
            if let Some(end) = record_at(&data, p) {
                valid.push((p, end));
                p = end;
                continue;
            }
            // Search for the next intact record. A CRC over the length and payload makes
            // a false match on garbage about one in four billion.
            let next = (p + 1..data.len()).find(|&q| record_at(&data, q).is_some());
            let until = next.unwrap_or(data.len());
            recovery.regions += 1;
            recovery.bytes += (until - p) as u64;
            recovery.details.push(format!(
                "{}: {} damaged bytes at offset {p}{}",
                path.display(),
                until - p,
                if next.is_none() {
                    " (torn tail, truncated)"
                } else {
                    " (skipped)"
                }
            ));
            damaged_mid |= next.is_some();
            p = until;
        }
        // Records before the cursor, and the cursor's offset in the kept layout.
        let mut kept_off = 0u64;
        let mut acked_records = 0u64;
        let mut cursor_new = None;
        if let Some(c) = cursor_off {
            for &(s, e) in &valid {
                if e as u64 <= c {
                    acked_records += 1;
                    kept_off += (e - s) as u64;
                }
            }
            cursor_new = Some(kept_off);
        }
        let len: u64 = valid.iter().map(|(s, e)| (e - s) as u64).sum();
        if damaged_mid {
            let mut out = Vec::with_capacity(len as usize);
            for &(s, e) in &valid {
                out.extend_from_slice(&data[s..e]);
            }
            let tmp = self.dir.join(format!("{id:016}.seg.tmp"));
            let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
            f.write_all(&out).map_err(io("write", &tmp))?;
            f.sync_data().map_err(io("sync", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io("rename", &path))?;
        } else if len < data.len() as u64 {
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io("open", &path))?;
            f.set_len(len).map_err(io("truncate", &path))?;
            f.sync_data().map_err(io("sync", &path))?;
        }
        Ok((
            Segment {
                id,
                len,
                records: valid.len() as u64,
                acked_records,
                read_records: 0,
            },
            cursor_new,
        ))
    }

    /// Start a new segment file for appends.
    fn roll(&mut self) -> Result<(), BufferError> {
        if let Some(w) = self.writer.take() {
            let path = self.seg_path(self.segments.back().map_or(0, |s| s.id));
            w.sync_data().map_err(io("sync", &path))?;
        }
        let id = self.next_id;
        self.next_id += 1;
        let path = self.seg_path(id);
        let f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io("create", &path))?;
        // The new name must survive a power loss too, or the records in it would not:
        // fsync the directory, and fail the append if that fails (the segment is not
        // used; an empty file left behind is harmless when the buffer is opened).
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &self.dir))?;
        self.segments.push_back(Segment {
            id,
            len: 0,
            records: 0,
            acked_records: 0,
            read_records: 0,
        });
        if self.segments.len() == 1 {
            self.acked = Pos { seg: id, off: 0 };
            self.read = self.acked;
        }
        self.writer = Some(f);
        Ok(())
    }

    fn ensure_writer(&mut self) -> Result<(), BufferError> {
        if self.writer.is_some() {
            return Ok(());
        }
        match self.segments.back() {
            None => self.roll(),
            Some(last) => {
                let path = self.seg_path(last.id);
                let f = OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(io("open", &path))?;
                self.writer = Some(f);
                Ok(())
            }
        }
    }

    /// Delete the oldest segment with whatever it still holds (`drop_oldest`). Returns
    /// the records deleted that were never read: a record already read is in a writer's
    /// request, which still delivers it (and counts it as written or dead-lettered), so
    /// counting it here too would count one line twice.
    fn drop_oldest_segment(&mut self) -> Result<u64, BufferError> {
        if self.segments.len() <= 1 {
            self.roll()?;
        }
        let Some(s) = self.segments.pop_front() else {
            return Ok(0);
        };
        let acked_off = if self.acked.seg == s.id {
            self.acked.off
        } else {
            0
        };
        let records = s.records - s.acked_records;
        self.unacked_records -= records;
        self.unacked_bytes -= s.len - acked_off;
        let mut lost = 0;
        if self.read.seg == s.id {
            let unread = s.records - s.read_records;
            self.unread_records -= unread;
            self.unread_bytes -= (s.len - self.read.off) - RECORD_OVERHEAD * unread;
            lost = unread;
        } else if self.read.seg < s.id {
            // Not reached by the reader yet (cannot happen for the oldest segment, but
            // the count stays right if it did).
            lost = records;
        }
        for m in &mut self.outstanding {
            if m.end.seg == s.id {
                m.dropped = true;
            }
        }
        let next = self.segments.front().map_or(self.next_id, |f| f.id);
        if self.acked.seg <= s.id {
            self.acked = Pos { seg: next, off: 0 };
        }
        if self.read.seg <= s.id {
            self.read = Pos { seg: next, off: 0 };
            self.reader = None;
        }
        let path = self.seg_path(s.id);
        std::fs::remove_file(&path).map_err(io("remove", &path))?;
        self.write_cursor()?;
        Ok(lost)
    }

    /// Delete segments (never the last) that the cursor has passed.
    fn delete_passed_segments(&mut self) -> Result<(), BufferError> {
        while self.segments.len() > 1 {
            let Some(front) = self.segments.front() else {
                break;
            };
            let passed = front.id < self.acked.seg
                || (front.id == self.acked.seg && self.acked.off >= front.len);
            if !passed {
                break;
            }
            let id = front.id;
            self.segments.pop_front();
            let next = self.segments.front().map_or(self.next_id, |f| f.id);
            if self.acked.seg <= id {
                self.acked = Pos { seg: next, off: 0 };
            }
            if self.read.seg == id {
                self.read = self.acked;
                self.reader = None;
            }
            let path = self.seg_path(id);
            std::fs::remove_file(&path).map_err(io("remove", &path))?;
        }
        Ok(())
    }

    fn segment_mut(&mut self, id: u64) -> Option<&mut Segment> {
        self.segments.iter_mut().find(|s| s.id == id)
    }

    fn write_records(&mut self, records: &Records) -> Result<(), BufferError> {
        self.ensure_writer()?;
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut pending = 0u64;
        for r in records.iter() {
            let full = self
                .segments
                .back()
                .is_some_and(|s| s.records > 0 && s.len + pending >= self.limits.segment_bytes);
            if full {
                self.flush_scratch(&mut scratch, pending)?;
                pending = 0;
                self.roll()?;
            }
            let before = scratch.len();
            encode_record(&mut scratch, r);
            pending += (scratch.len() - before) as u64;
            if let Some(s) = self.segments.back_mut() {
                // Counted before the write so the roll check above sees them; undone by
                // `flush_scratch` on failure.
                s.records += 1;
            }
        }
        self.flush_scratch(&mut scratch, pending)?;
        self.scratch = scratch;
        let id = self.segments.back().map_or(0, |s| s.id);
        if let Some(w) = &self.writer {
            w.sync_data().map_err(io("sync", &self.seg_path(id)))?;
        }
        Ok(())
    }

    fn flush_scratch(&mut self, scratch: &mut Vec<u8>, pending: u64) -> Result<(), BufferError> {
        let Some(seg) = self.segments.back() else {
            return Ok(());
        };
        let (id, len) = (seg.id, seg.len);
        let path = self.seg_path(id);
        let result = match &mut self.writer {
            Some(w) => w.write_all(scratch),
            None => Ok(()),
        };
        scratch.clear();
        match result {
            Ok(()) => {
                if let Some(s) = self.segments.back_mut() {
                    s.len += pending;
                }
                Ok(())
            }
            Err(e) => {
                // Cut a partial write off so the file stays a sequence of whole records
                // (the records counted for it are forgotten with it).
                if let Some(w) = &self.writer {
                    let _ = w.set_len(len);
                }
                self.writer = None;
                let kept = self.records_in(id, len);
                if let Some(s) = self.segments.back_mut() {
                    s.records = s.records.min(kept);
                }
                Err(BufferError::Io {
                    op: "write",
                    path,
                    source: e,
                })
            }
        }
    }

    /// Recompute the counters from the segments (after a failed write).
    fn recount(&mut self) {
        let (mut ur, mut ub, mut rr, mut rb) = (0, 0, 0, 0);
        for s in &self.segments {
            let acked_off = if s.id == self.acked.seg {
                self.acked.off
            } else {
                0
            };
            if s.id >= self.acked.seg {
                ur += s.records - s.acked_records.min(s.records);
                ub += s.len.saturating_sub(acked_off);
            }
            if s.id >= self.read.seg {
                let (read_off, read_recs) = if s.id == self.read.seg {
                    (self.read.off, s.read_records.min(s.records))
                } else {
                    (0, 0)
                };
                let n = s.records - read_recs;
                rr += n;
                rb += s
                    .len
                    .saturating_sub(read_off)
                    .saturating_sub(RECORD_OVERHEAD * n);
            }
        }
        self.unacked_records = ur;
        self.unacked_bytes = ub;
        self.unread_records = rr;
        self.unread_bytes = rb;
    }

    /// Records in the first `len` bytes of a segment (rare path: after a failed write).
    fn records_in(&self, id: u64, len: u64) -> u64 {
        let Ok(data) = std::fs::read(self.seg_path(id)) else {
            return 0;
        };
        let mut p = 0;
        let mut n = 0;
        while (p as u64) < len {
            match record_at(&data, p) {
                Some(e) => {
                    p = e;
                    n += 1;
                }
                None => break,
            }
        }
        n
    }
}

impl Buffer for DiskBuffer {
    fn append(&mut self, records: &Records) -> Result<Appended, BufferError> {
        if let Some(r) = records
            .iter()
            .find(|r| r.len() > MAX_RECORD || r.is_empty())
        {
            return Err(BufferError::TooLarge(r.len()));
        }
        let need = records.framed_bytes();
        let mut dropped = 0;
        // An empty buffer takes even a batch larger than max_bytes, so nothing can wait
        // forever for room that cannot appear.
        while self.unacked_bytes > 0 && self.unacked_bytes + need > self.limits.max_bytes {
            match self.limits.when_full {
                WhenFull::Block => return Err(BufferError::Full),
                WhenFull::DropOldest => dropped += self.drop_oldest_segment()?,
            }
        }
        if let Err(e) = self.write_records(records) {
            // Part of the batch may have reached earlier segments: count from the
            // segments' own metadata rather than guess.
            self.recount();
            return Err(e);
        }
        self.unacked_records += records.len() as u64;
        self.unacked_bytes += need;
        self.unread_records += records.len() as u64;
        self.unread_bytes += records.payload_bytes() as u64;
        Ok(Appended { dropped })
    }

    fn read(
        &mut self,
        max_records: usize,
        max_bytes: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, BufferError> {
        // Step over finished segments (the last one may still grow).
        loop {
            let Some(idx) = self.segments.iter().position(|s| s.id == self.read.seg) else {
                // The read position is before every segment (all dropped): restart at
                // the oldest.
                match self.segments.front() {
                    Some(f) if f.id > self.read.seg => {
                        self.read = Pos { seg: f.id, off: 0 };
                        self.reader = None;
                        continue;
                    }
                    _ => return Ok(0),
                }
            };
            let s = &self.segments[idx];
            if self.read.off >= s.len && idx + 1 < self.segments.len() {
                self.read = Pos {
                    seg: self.segments[idx + 1].id,
                    off: 0,
                };
                self.reader = None;
                continue;
            }
            break;
        }
        if self.unread_records == 0 {
            return Ok(0);
        }
        let seg_id = self.read.seg;
        let Some(seg_len) = self.segments.iter().find(|s| s.id == seg_id).map(|s| s.len) else {
            return Ok(0);
        };
        let path = self.seg_path(seg_id);
        if self.reader.as_ref().is_none_or(|(id, _)| *id != seg_id) {
            let mut f = File::open(&path).map_err(io("open", &path))?;
            f.seek(SeekFrom::Start(self.read.off))
                .map_err(io("seek", &path))?;
            self.reader = Some((seg_id, BufReader::with_capacity(256 * 1024, f)));
        }
        let Some((_, reader)) = self.reader.as_mut() else {
            return Ok(0);
        };
        let mut n = 0u64;
        let mut payload = 0usize;
        let mut off = self.read.off;
        let mut header = [0u8; HEADER];
        let mut damaged_at = None;
        while off < seg_len && (n as usize) < max_records.max(1) {
            reader.read_exact(&mut header).map_err(io("read", &path))?;
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            if n > 0 && payload + len > max_bytes {
                reader
                    .seek_relative(-(HEADER as i64))
                    .map_err(io("seek", &path))?;
                break;
            }
            let ok = len > 0 && len <= MAX_RECORD && off + (HEADER + len) as u64 <= seg_len;
            let start = out.len();
            if ok {
                out.resize(start + len, 0);
                reader
                    .read_exact(&mut out[start..])
                    .map_err(io("read", &path))?;
            }
            if !ok || record_crc(&header[..4], &out[start..]) != crc {
                // Damaged after it was verified at open (disk rot): the rest of this
                // segment cannot be trusted. Skip it, counted; what was read before it
                // is returned as usual.
                out.truncate(start);
                damaged_at = Some(off);
                break;
            }
            out.push(b'\n');
            payload += len;
            off += (HEADER + len) as u64;
            n += 1;
        }
        if n > 0 {
            let bytes = off - self.read.off;
            self.read.off = off;
            self.unread_records -= n;
            self.unread_bytes -= bytes - RECORD_OVERHEAD * n;
            if let Some(s) = self.segment_mut(seg_id) {
                s.read_records += n;
            }
            self.outstanding.push_back(Mark {
                end: self.read,
                records: n,
                bytes,
                dropped: false,
            });
        }
        if let Some(at) = damaged_at {
            let rest_records = self.segment_mut(seg_id).map_or(0, |s| {
                let rest = s.records - s.read_records;
                s.read_records = s.records;
                // Never acknowledged record by record: keep drop counting right.
                s.acked_records += rest;
                rest
            });
            let rest_bytes = seg_len - at;
            self.read.off = seg_len;
            self.reader = None;
            self.unread_records -= rest_records;
            self.unread_bytes -= rest_bytes.saturating_sub(RECORD_OVERHEAD * rest_records);
            self.unacked_records -= rest_records;
            self.unacked_bytes -= rest_bytes;
            self.damage = Some(format!(
                "{}: record at offset {at} fails its CRC; skipped {rest_records} records",
                path.display()
            ));
        }
        Ok(n as usize)
    }

    fn ack_oldest(&mut self) -> Result<(), BufferError> {
        let Some(mark) = self.outstanding.pop_front() else {
            return Ok(());
        };
        if mark.dropped {
            return Ok(());
        }
        self.acked = self.acked.max(mark.end);
        if let Some(s) = self.segment_mut(mark.end.seg) {
            s.acked_records += mark.records;
        }
        self.unacked_records -= mark.records;
        self.unacked_bytes -= mark.bytes;
        self.delete_passed_segments()?;
        self.write_cursor()
    }

    fn take_damage(&mut self) -> Option<String> {
        self.damage.take()
    }

    fn stats(&self) -> Stats {
        Stats {
            unacked_records: self.unacked_records,
            unacked_bytes: self.unacked_bytes,
            unread_records: self.unread_records,
            unread_bytes: self.unread_bytes,
            segments: self.segments.len(),
        }
    }
}
