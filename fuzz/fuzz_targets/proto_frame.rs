//! The postcard frame decoder takes any bytes: samples or a `DecodeError`, never a panic
//! or an allocation the limits do not allow; an accepted frame re-encodes and decodes to
//! the same samples.
#![no_main]

use fluxgate_proto::{Frame, Limits, Point, decode_frame, encode_frame};
use libfuzzer_sys::fuzz_target;

/// A fixed server time, so that accepted timestamps do not depend on the clock.
const NOW_MS: u64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(samples) = decode_frame(data, &limits, NOW_MS) {
        assert!(samples.len() <= limits.max_readings);
        let frame = Frame {
            readings: samples
                .iter()
                .map(|s| Point {
                    ts_ms: Some(s.ts_ms),
                    values: vec![(s.metric.clone(), s.value.clone())],
                })
                .collect(),
        };
        if let Ok(bytes) = encode_frame(&frame) {
            let again = decode_frame(&bytes, &limits, NOW_MS).expect("re-decoding a frame");
            assert_eq!(again, samples);
        }
    }
});
