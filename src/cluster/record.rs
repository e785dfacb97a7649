//! The telemetry record in the stream: one JetStream message holds one device's readings
//! from one pipeline batch, postcard-encoded after a format version byte (so a node can
//! refuse a record written by a newer version instead of misreading it).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{Reading, Value};

/// The format version of [`Record`].
const VERSION: u8 = 1;

/// Most readings in one record: positions in the live stream are the stream sequence
/// shifted by 16 bits plus the index within the record, which needs the bound.
pub const MAX_READINGS: usize = 1 << 16;

/// One device's readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    device: String,
    readings: Vec<(String, i64, Value)>,
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// Written in a format this node does not know (a newer node wrote it).
    #[error("record format {0} is unknown to this node (it reads format {VERSION})")]
    Version(u8),
    /// Not a record at all.
    #[error("malformed record: {0}")]
    Malformed(String),
}

/// Encode `readings`, all of one device (at most [`MAX_READINGS`]).
pub fn encode<'a>(device: &str, readings: impl IntoIterator<Item = &'a Reading>) -> Vec<u8> {
    let record = Record {
        device: device.to_owned(),
        readings: readings
            .into_iter()
            .map(|r| (r.metric.to_string(), r.ts_ms, r.value.clone()))
            .collect(),
    };
    let mut out = vec![VERSION];
    // Encoding plain owned data into a Vec cannot fail.
    if let Ok(bytes) = postcard::to_allocvec(&record) {
        out.extend_from_slice(&bytes);
    }
    out
}

/// Decode a record into readings.
pub fn decode(bytes: &[u8]) -> Result<Vec<Reading>, RecordError> {
    let (&version, rest) = bytes
        .split_first()
        .ok_or_else(|| RecordError::Malformed("empty".to_owned()))?;
    if version != VERSION {
        return Err(RecordError::Version(version));
    }
    let record: Record =
        postcard::from_bytes(rest).map_err(|e| RecordError::Malformed(e.to_string()))?;
    let device: Arc<str> = record.device.into();
    Ok(record
        .readings
        .into_iter()
        .map(|(metric, ts_ms, value)| Reading {
            device: device.clone(),
            metric: metric.into(),
            ts_ms,
            value,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_other_versions_are_refused() {
        let d: Arc<str> = "d.1".into();
        let readings = vec![
            Reading {
                device: d.clone(),
                metric: "temp".into(),
                ts_ms: 1_700_000_000_000,
                value: Value::F64(21.5),
            },
            Reading {
                device: d,
                metric: "state".into(),
                ts_ms: -1,
                value: Value::Str("ok".to_owned()),
            },
        ];
        let bytes = encode("d.1", &readings);
        assert_eq!(decode(&bytes), Ok(readings));
        let mut newer = bytes.clone();
        newer[0] = 2;
        assert_eq!(decode(&newer), Err(RecordError::Version(2)));
        assert!(matches!(
            decode(&bytes[..3]),
            Err(RecordError::Malformed(_))
        ));
        assert!(matches!(decode(&[]), Err(RecordError::Malformed(_))));
    }
}
