//! Decoding: an [`Envelope`]'s bytes into [`Reading`]s. Pure apart from the interner,
//! and total: bad input is a [`DecodeError`] value, never a panic.

use std::sync::Arc;

use fluxgate_proto::{Limits, Sample, decode_frame, decode_json};

use crate::model::{DecodeError, Encoding, Envelope, MetricName, Reading};

/// Shares one `Arc<str>` per metric name so a reading costs no allocation for its name.
/// Bounded: past `MAX` distinct names it stops remembering and just allocates.
#[derive(Debug, Default)]
pub struct Interner {
    names: foldhash::HashSet<Arc<str>>,
}

impl Interner {
    const MAX: usize = 100_000;

    /// The shared copy of `name`.
    pub fn intern(&mut self, name: &str) -> MetricName {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        if self.names.len() < Self::MAX {
            self.names.insert(n.clone());
        }
        n
    }
}

/// Decode one envelope into readings (appended to `out`); returns how many.
pub fn decode(
    envelope: &Envelope,
    limits: &Limits,
    interner: &mut Interner,
    out: &mut Vec<Reading>,
) -> Result<usize, DecodeError> {
    let samples = match envelope.encoding {
        Encoding::Json => decode_json(&envelope.payload, limits, envelope.received_at_ms)?,
        Encoding::Postcard => decode_frame(&envelope.payload, limits, envelope.received_at_ms)?,
    };
    let n = samples.len();
    out.reserve(n);
    out.extend(samples.into_iter().map(
        |Sample {
             ts_ms,
             metric,
             value,
         }| Reading {
            device: envelope.device.clone(),
            metric: interner.intern(&metric),
            // The decoder bounds timestamps to now +- the configured skew, far inside i64.
            ts_ms: i64::try_from(ts_ms).unwrap_or(i64::MAX),
            value,
        },
    ));
    Ok(n)
}
