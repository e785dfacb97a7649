//! The disk buffer against an in-memory model, under random append / read / ack /
//! crash / reopen sequences; plus the full-policies and the memory buffer.

use std::collections::VecDeque;
use std::path::Path;

use proptest::prelude::*;

use super::*;

fn limits(max_bytes: u64, segment_bytes: u64, when_full: WhenFull) -> Limits {
    Limits {
        max_bytes,
        segment_bytes,
        when_full,
    }
}

fn batch(records: &[Vec<u8>]) -> Records {
    let mut r = Records::default();
    for x in records {
        r.push(x);
    }
    r
}

fn lines(out: &[u8]) -> Vec<Vec<u8>> {
    out.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Vec<u8>>),
    Read(usize, usize),
    Ack,
    /// Drop without closing; `Some(k)`: also cut `k` bytes (fewer than the last
    /// record's framed size) off the end of the newest segment; `true`: the crash also
    /// came while a new cursor was being written, leaving a torn `cursor.tmp` of that
    /// many bytes (mod 21) behind, never renamed.
    Crash(Option<usize>, Option<usize>),
    /// A crash in the middle of appending a batch: its bytes reached the files only up to
    /// an arbitrary offset (`usize` modulo the batch's framed size), possibly inside a
    /// record and possibly in a segment the batch rolled to. Later segments the append
    /// created are left empty, as a crash right after their creation would.
    CrashMidAppend(Vec<Vec<u8>>, usize),
}

fn op() -> impl Strategy<Value = Op> {
    let record = proptest::collection::vec(b'a'..=b'z', 1..40);
    prop_oneof![
        4 => proptest::collection::vec(record, 1..6).prop_map(Op::Append),
        3 => (1usize..8, 1usize..200).prop_map(|(n, b)| Op::Read(n, b)),
        3 => Just(Op::Ack),
        1 => (proptest::option::of(1usize..1000), proptest::option::of(0usize..1000))
            .prop_map(|(cut, tmp)| Op::Crash(cut, tmp)),
        1 => (proptest::collection::vec(proptest::collection::vec(b'a'..=b'z', 1..40), 1..8), 0usize..10_000)
            .prop_map(|(records, at)| Op::CrashMidAppend(records, at)),
    ]
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs
}

/// Cut `bytes` off the end of the buffer's files, newest segment first (a segment cut
/// to nothing stays as an empty file).
fn cut_tail(dir: &Path, mut bytes: u64) {
    for seg in segments(dir).iter().rev() {
        if bytes == 0 {
            break;
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(seg)
            .expect("open seg");
        let len = f.metadata().expect("meta").len();
        let take = bytes.min(len);
        f.set_len(len - take).expect("cut");
        bytes -= take;
    }
    assert_eq!(bytes, 0, "cut more than the batch wrote");
}

fn newest_segment(dir: &Path) -> Option<std::path::PathBuf> {
    segments(dir).pop()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Model: the unacknowledged records in order, of which a prefix is read (split
    /// into outstanding reads). Reads return exactly the next unread records, acks
    /// release the oldest read, and after a crash the unacknowledged records come back
    /// in order, except a torn last record, which is reported as damage.
    #[test]
    fn disk_buffer_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let lim = limits(u64::MAX, 128, WhenFull::Block);
        let (mut b, rec) = DiskBuffer::open(dir.path(), lim).expect("open");
        prop_assert_eq!(rec, Recovery::default());
        let mut unacked: VecDeque<Vec<u8>> = VecDeque::new();
        let mut read = 0usize;
        let mut outstanding: VecDeque<usize> = VecDeque::new();
        // The newest record and whether it is still unacknowledged.
        let mut last: Option<Vec<u8>> = None;
        for op in ops {
            match op {
                Op::Append(records) => {
                    b.append(&batch(&records)).expect("append");
                    last = records.last().cloned();
                    unacked.extend(records);
                }
                Op::Read(n, bytes) => {
                    let mut out = Vec::new();
                    let got = b.read(n, bytes, &mut out).expect("read");
                    let got_lines = lines(&out);
                    prop_assert_eq!(got, got_lines.len());
                    let expected: Vec<Vec<u8>> = unacked.iter().skip(read).take(got).cloned().collect();
                    prop_assert_eq!(&got_lines, &expected);
                    prop_assert!(got <= n);
                    if read < unacked.len() {
                        prop_assert!(got >= 1, "nothing read while records are unread");
                    }
                    if got > 0 {
                        read += got;
                        outstanding.push_back(got);
                    }
                }
                Op::Ack => {
                    b.ack_oldest().expect("ack");
                    if let Some(n) = outstanding.pop_front() {
                        unacked.drain(..n);
                        read -= n;
                    }
                }
                Op::Crash(cut, stale_tmp) => {
                    drop(b);
                    if let Some(n) = stale_tmp {
                        // A cursor write that never reached its rename: the committed
                        // cursor is the one that counts, so the model is unchanged.
                        let garbage: Vec<u8> = (0..n % 21).map(|i| (i * 37 + n) as u8).collect();
                        std::fs::write(dir.path().join("cursor.tmp"), garbage).expect("tmp");
                    }
                    let mut expect_damage = 0;
                    if let (Some(cut), Some(rec)) = (cut, last.take()) {
                        let framed = rec.len() + RECORD_OVERHEAD as usize;
                        let k = 1 + cut % (framed - 1);
                        let seg = newest_segment(dir.path()).expect("a segment");
                        let f = std::fs::OpenOptions::new().write(true).open(&seg).expect("open seg");
                        let len = f.metadata().expect("meta").len();
                        f.set_len(len - k as u64).expect("cut");
                        expect_damage = 1;
                        // Torn before it was acknowledged: it is gone (its append
                        // would not have returned). If acknowledged, it was gone anyway.
                        if unacked.back() == Some(&rec) {
                            unacked.pop_back();
                        }
                    }
                    let (nb, rec) = DiskBuffer::open(dir.path(), lim).expect("reopen");
                    prop_assert_eq!(rec.regions, expect_damage, "{:?}", rec.details);
                    b = nb;
                    read = 0;
                    outstanding.clear();
                }
                Op::CrashMidAppend(records, at) => {
                    b.append(&batch(&records)).expect("append");
                    drop(b);
                    let framed: Vec<usize> =
                        records.iter().map(|r| r.len() + RECORD_OVERHEAD as usize).collect();
                    let total: usize = framed.iter().sum();
                    let kept = at % (total + 1);
                    cut_tail(dir.path(), (total - kept) as u64);
                    // Whole records before the cut survive (the append never returned, so
                    // nobody was told either way; replaying them is at-least-once); a
                    // record the cut went through is damage, reported once.
                    let mut end = 0;
                    let mut expect_damage = 0;
                    for (r, f) in records.iter().zip(&framed) {
                        if end + f <= kept {
                            unacked.push_back(r.clone());
                        } else if end < kept {
                            expect_damage = 1;
                        }
                        end += f;
                    }
                    last = None;
                    let (nb, rec) = DiskBuffer::open(dir.path(), lim).expect("reopen");
                    prop_assert_eq!(rec.regions, expect_damage, "{:?}", rec.details);
                    b = nb;
                    read = 0;
                    outstanding.clear();
                }
            }
            let s = b.stats();
            prop_assert_eq!(s.unacked_records, unacked.len() as u64);
            prop_assert_eq!(s.unread_records, (unacked.len() - read) as u64);
            let payload: usize = unacked.iter().map(Vec::len).sum();
            prop_assert_eq!(s.unacked_bytes, payload as u64 + RECORD_OVERHEAD * unacked.len() as u64);
            let unread_payload: usize = unacked.iter().skip(read).map(Vec::len).sum();
            prop_assert_eq!(s.unread_bytes, unread_payload as u64);
        }
        // Finally everything unacknowledged reads back, in order.
        drop(b);
        let (mut b, _) = DiskBuffer::open(dir.path(), lim).expect("reopen");
        let mut out = Vec::new();
        while b.read(usize::MAX, usize::MAX, &mut out).expect("read") > 0 {}
        prop_assert_eq!(lines(&out), unacked.iter().cloned().collect::<Vec<_>>());
    }
}

#[test]
fn acked_segments_are_deleted_and_replay_resumes_after_the_cursor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lim = limits(1 << 20, 4096, WhenFull::Block);
    let (mut b, _) = DiskBuffer::open(dir.path(), lim).expect("open");
    let rec: Vec<Vec<u8>> = (0..1000)
        .map(|i| format!("line {i:04}").into_bytes())
        .collect();
    b.append(&batch(&rec)).expect("append");
    assert!(b.stats().segments > 3, "{:?}", b.stats());
    let mut out = Vec::new();
    let first = b.read(600, usize::MAX, &mut out).expect("read");
    assert_eq!(first, lines(&out).len());
    assert!(first > 0);
    b.ack_oldest().expect("ack");
    let segments_after_ack = b.stats().segments;
    drop(b);
    let (mut b, rec2) = DiskBuffer::open(dir.path(), lim).expect("reopen");
    assert_eq!(rec2, Recovery::default());
    assert_eq!(b.stats().segments, segments_after_ack);
    let mut out = Vec::new();
    while b.read(usize::MAX, usize::MAX, &mut out).expect("read") > 0 {}
    assert_eq!(lines(&out), rec[first..].to_vec());
}

#[test]
fn block_refuses_and_drop_oldest_deletes_whole_segments() {
    let rec: Vec<Vec<u8>> = (0..100).map(|i| format!("{i:040}").into_bytes()).collect();
    // 48 bytes framed per record; 4096-byte segments hold 86 records.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut b, _) =
        DiskBuffer::open(dir.path(), limits(8192, 4096, WhenFull::Block)).expect("open");
    b.append(&batch(&rec)).expect("first batch fits");
    assert!(matches!(b.append(&batch(&rec)), Err(BufferError::Full)));
    assert_eq!(b.stats().unacked_records, 100);

    let dir = tempfile::tempdir().expect("tempdir");
    let (mut b, _) =
        DiskBuffer::open(dir.path(), limits(8192, 4096, WhenFull::DropOldest)).expect("open");
    b.append(&batch(&rec)).expect("append");
    let a = b.append(&batch(&rec)).expect("append");
    assert_eq!(a.dropped, 86, "the first segment went");
    assert_eq!(b.stats().unacked_records, 114);
    assert!(b.stats().unacked_bytes <= 8192);
    let mut out = Vec::new();
    while b.read(usize::MAX, usize::MAX, &mut out).expect("read") > 0 {}
    let got = lines(&out);
    assert_eq!(got.len(), 114);
    assert_eq!(got[0], rec[86], "the oldest records went first");

    let mut m = MemoryBuffer::new(limits(960, 4096, WhenFull::DropOldest));
    m.append(&batch(&rec[..20])).expect("append");
    let a = m.append(&batch(&rec[20..30])).expect("append");
    assert_eq!(a.dropped, 10);
    let mut out = Vec::new();
    m.read(usize::MAX, usize::MAX, &mut out).expect("read");
    assert_eq!(lines(&out), rec[10..30].to_vec());
}

/// Records already handed to a writer (read, not acknowledged) are still delivered by
/// it when `drop_oldest` deletes them from the buffer, so they are not counted as
/// dropped: a line must not be counted both written and dropped.
#[test]
fn drop_oldest_counts_only_records_never_read() {
    let rec: Vec<Vec<u8>> = (0..100).map(|i| format!("{i:040}").into_bytes()).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut b, _) =
        DiskBuffer::open(dir.path(), limits(8192, 4096, WhenFull::DropOldest)).expect("open");
    b.append(&batch(&rec)).expect("append");
    // 10 of the first segment's 86 records are in flight.
    let mut out = Vec::new();
    assert_eq!(b.read(10, usize::MAX, &mut out).expect("read"), 10);
    let a = b.append(&batch(&rec)).expect("append");
    assert_eq!(a.dropped, 76, "the first segment's unread records");
    // The writer's acknowledgement of the deleted records changes nothing.
    b.ack_oldest().expect("ack");
    assert_eq!(b.stats().unacked_records, 114);

    let mut m = MemoryBuffer::new(limits(960, 4096, WhenFull::DropOldest));
    m.append(&batch(&rec[..20])).expect("append");
    let mut out = Vec::new();
    assert_eq!(m.read(4, usize::MAX, &mut out).expect("read"), 4);
    let a = m.append(&batch(&rec[20..30])).expect("append");
    assert_eq!(a.dropped, 6, "10 deleted, 4 of them in flight");
    m.ack_oldest().expect("ack");
    let mut out = Vec::new();
    m.read(usize::MAX, usize::MAX, &mut out).expect("read");
    assert_eq!(lines(&out), rec[10..30].to_vec());
}

#[test]
fn corruption_in_the_middle_is_skipped_and_the_rest_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lim = limits(1 << 20, 1 << 20, WhenFull::Block);
    let (mut b, _) = DiskBuffer::open(dir.path(), lim).expect("open");
    let rec: Vec<Vec<u8>> = (0..10)
        .map(|i| format!("record-{i}").into_bytes())
        .collect();
    b.append(&batch(&rec)).expect("append");
    drop(b);
    let seg = newest_segment(dir.path()).expect("segment");
    let mut data = std::fs::read(&seg).expect("read");
    // Flip a payload byte of the fourth record (each is 8 + 8 bytes).
    data[3 * 16 + 10] ^= 0xff;
    std::fs::write(&seg, &data).expect("write");
    let (mut b, rec2) = DiskBuffer::open(dir.path(), lim).expect("reopen");
    assert_eq!(rec2.regions, 1, "{:?}", rec2.details);
    assert_eq!(rec2.bytes, 16);
    let mut out = Vec::new();
    while b.read(usize::MAX, usize::MAX, &mut out).expect("read") > 0 {}
    let mut expected = rec.clone();
    expected.remove(3);
    assert_eq!(lines(&out), expected);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The memory buffer obeys the same read/ack model (no crashes).
    #[test]
    fn memory_buffer_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        let mut b = MemoryBuffer::new(limits(u64::MAX, 4096, WhenFull::Block));
        let mut unacked: VecDeque<Vec<u8>> = VecDeque::new();
        let mut read = 0usize;
        let mut outstanding: VecDeque<usize> = VecDeque::new();
        for op in ops {
            match op {
                Op::Append(records) => {
                    b.append(&batch(&records)).expect("append");
                    unacked.extend(records);
                }
                Op::Read(n, bytes) => {
                    let mut out = Vec::new();
                    let got = b.read(n, bytes, &mut out).expect("read");
                    let expected: Vec<Vec<u8>> = unacked.iter().skip(read).take(got).cloned().collect();
                    prop_assert_eq!(lines(&out), expected);
                    if got > 0 {
                        read += got;
                        outstanding.push_back(got);
                    }
                }
                Op::Ack => {
                    b.ack_oldest().expect("ack");
                    if let Some(n) = outstanding.pop_front() {
                        unacked.drain(..n);
                        read -= n;
                    }
                }
                Op::Crash(..) | Op::CrashMidAppend(..) => {}
            }
            let s = b.stats();
            prop_assert_eq!(s.unacked_records, unacked.len() as u64);
            prop_assert_eq!(s.unread_records, (unacked.len() - read) as u64);
        }
    }
}
