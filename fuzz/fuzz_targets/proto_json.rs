//! The JSON decoder takes any bytes: it returns samples or a `DecodeError`, never panics,
//! stays within the limits, and what it accepts survives the encoder and a second decode.
#![no_main]

use fluxgate_proto::{Limits, Point, decode_json, encode_json};
use libfuzzer_sys::fuzz_target;

/// A fixed server time, so that accepted timestamps do not depend on the clock.
const NOW_MS: u64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(samples) = decode_json(data, &limits, NOW_MS) {
        assert!(samples.len() <= limits.max_readings);
        let points: Vec<Point> = samples
            .iter()
            .map(|s| Point {
                ts_ms: Some(s.ts_ms),
                values: vec![(s.metric.clone(), s.value.clone())],
            })
            .collect();
        if let Ok(text) = encode_json(&points) {
            let again = decode_json(text.as_bytes(), &limits, NOW_MS)
                .unwrap_or_else(|e| panic!("re-decoding {text}: {e}"));
            assert_eq!(again, samples);
        }
    }
});
