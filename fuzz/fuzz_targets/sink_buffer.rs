//! The sink buffer's recovery reads segment and cursor files that a crash, a full disk or
//! another process may have left in any state: opening never fails on damaged data and
//! never panics, and reading returns whole records only.
//!
//! Input: 1 byte choosing whether a cursor file is written (its 20 bytes follow), then
//! the bytes of one segment file.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};

use fluxgate::config::WhenFull;
use fluxgate::sink::buffer::{Buffer, DiskBuffer, Limits};
use libfuzzer_sys::fuzz_target;

static RUN: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (cursor, segment) = if flags & 1 == 1 && rest.len() >= 20 {
        let (c, s) = rest.split_at(20);
        (Some(c), s)
    } else {
        (None, rest)
    };
    let dir = std::env::temp_dir().join(format!(
        "fluxgate-fuzz-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("0000000000000000.seg"), segment).expect("segment");
    if let Some(c) = cursor {
        std::fs::write(dir.join("cursor"), c).expect("cursor");
    }
    let limits = Limits {
        max_bytes: 1 << 20,
        segment_bytes: 1 << 16,
        when_full: WhenFull::DropOldest,
    };
    if let Ok((mut buffer, _recovery)) = DiskBuffer::open(&dir, limits) {
        let mut out = Vec::new();
        let mut total = 0;
        loop {
            match buffer.read(1000, 1 << 20, &mut out) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
            assert!(total <= segment.len(), "more records than bytes");
        }
        // Every record read ends with the newline the reader adds.
        assert!(out.is_empty() || out.ends_with(b"\n"));
    }
    let _ = std::fs::remove_dir_all(&dir);
});
