//! Simulated device identity and message construction.
//!
//! A [`Device`] carries what a connection needs to identify itself (id and, once the
//! gateway issues them, credentials), and a [`MessageSource`] turns the device's signal
//! and clock into encoded wire messages. Both transports share this so that MQTT and
//! WebSocket runs produce byte-identical payloads for the same settings.

use anyhow::anyhow;
use fluxgate_proto::{Frame, Point, Value};

use crate::clock::TsClock;
use crate::config::Encoding;
use crate::ids::device_id;
use crate::signal::{DeviceSignal, Reading};

// The transports and `provision` are named in plain text below, not linked: they sit
// above this module in the layering, and even a doc link would point upwards.
/// Credentials a device presents to the gateway: MQTT sends username = device id and
/// password = token; WebSocket sends `Authorization: Bearer <token>`. The `provision`
/// module fills them in.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// MQTT username; by the gateway's convention, the device id.
    pub username: String,
    /// The device token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // Tokens are secrets; keep them out of logs and panic messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// One simulated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Position in the fleet, 0-based; also seeds the device's signal.
    pub index: u64,
    /// Device id, `{prefix}-{index:05}`.
    pub id: String,
    /// Credentials per gateway node (`--mqtt a,b,c`), in node order: one entry when all
    /// nodes share a registry (or there is one node), none before provisioning.
    pub credentials: Vec<Credentials>,
}

impl Device {
    /// The credentials to present to node `node`: its own entry, or the one entry that
    /// every node shares.
    pub fn credentials(&self, node: usize) -> Option<&Credentials> {
        match self.credentials.len() {
            0 => None,
            len => self.credentials.get(node % len),
        }
    }
}

/// Builds the fleet of `devices` devices named with `prefix`.
pub fn fleet(prefix: &str, devices: usize) -> Vec<Device> {
    (0..devices as u64)
        .map(|index| Device {
            index,
            id: device_id(prefix, index),
            credentials: Vec::new(),
        })
        .collect()
}

/// An encoded message, ready for either transport.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// JSON text (MQTT `devices/{id}/telemetry`, WebSocket text frame).
    Json(String),
    /// Postcard frame (MQTT `devices/{id}/telemetry/bin`, WebSocket binary frame).
    Postcard(Vec<u8>),
}

impl Payload {
    /// The payload bytes, for MQTT.
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Payload::Json(s) => s.into_bytes(),
            Payload::Postcard(b) => b,
        }
    }
}

/// Generates a device's messages: one point per message with a device timestamp and the
/// four metrics.
#[derive(Debug, Clone)]
pub struct MessageSource {
    signal: DeviceSignal,
    clock: TsClock,
    encoding: Encoding,
}

impl MessageSource {
    /// Creates the source for `device`, with a signal "day" of `period_ms` and a clock
    /// that follows the wall clock.
    pub fn new(device: &Device, period_ms: u64, encoding: Encoding) -> Self {
        Self {
            signal: DeviceSignal::new(device.index, period_ms),
            clock: TsClock::new(),
            encoding,
        }
    }

    /// Produces the next message for wall-clock time `now_ms`.
    ///
    /// The message's timestamp is `now_ms` unless that would not be later than the
    /// previous message's, see [`TsClock`].
    pub fn next_message(&mut self, now_ms: u64) -> anyhow::Result<Payload> {
        let ts = self.clock.next(now_ms);
        let point = point(ts, self.signal.sample(ts));
        encode(self.encoding, point)
    }
}

/// Builds the wire-format point of one reading.
pub fn point(ts_ms: u64, r: Reading) -> Point {
    Point {
        ts_ms: Some(ts_ms),
        values: vec![
            ("temp".to_string(), Value::F64(r.temp)),
            ("humidity".to_string(), Value::F64(r.humidity)),
            ("pressure".to_string(), Value::F64(r.pressure)),
            ("battery".to_string(), Value::F64(r.battery)),
        ],
    }
}

/// Encodes one point with `encoding`.
pub fn encode(encoding: Encoding, point: Point) -> anyhow::Result<Payload> {
    match encoding {
        Encoding::Json => fluxgate_proto::encode_json(std::slice::from_ref(&point))
            .map(Payload::Json)
            .map_err(|e| anyhow!("encoding JSON: {e:?}")),
        Encoding::Postcard => fluxgate_proto::encode_frame(&Frame {
            readings: vec![point],
        })
        .map(Payload::Postcard)
        .map_err(|e| anyhow!("encoding postcard frame: {e:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_zero_padded() {
        assert_eq!(device_id("sim", 0), "sim-00000");
        assert_eq!(device_id("sim", 42), "sim-00042");
        assert_eq!(device_id("x", 123_456), "x-123456");
        let f = fleet("lab", 3);
        assert_eq!(f.len(), 3);
        assert_eq!(f[2].id, "lab-00002");
        assert_eq!(f[2].index, 2);
    }

    #[test]
    fn credentials_are_per_node_or_shared() {
        let mut device = fleet("sim", 1).remove(0);
        assert_eq!(device.credentials(0), None);
        let token = |t: &str| Credentials {
            username: "sim-00000".into(),
            password: t.into(),
        };
        device.credentials = vec![token("shared")];
        assert_eq!(
            device.credentials(2).map(|c| c.password.as_str()),
            Some("shared")
        );
        device.credentials = vec![token("a"), token("b"), token("c")];
        let per_node: Vec<&str> = (0..3)
            .filter_map(|n| device.credentials(n))
            .map(|c| c.password.as_str())
            .collect();
        assert_eq!(per_node, ["a", "b", "c"]);
    }

    #[test]
    fn credentials_are_redacted_in_debug() {
        let c = Credentials {
            username: "sim-00000".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn messages_encode_with_both_encodings() {
        let device = &fleet("sim", 1)[0];
        let mut json = MessageSource::new(device, 60_000, Encoding::Json);
        let Payload::Json(text) = json.next_message(1_700_000_000_000).expect("json") else {
            panic!("expected JSON payload");
        };
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(parsed["ts"], 1_700_000_000_000u64);
        for metric in ["temp", "humidity", "pressure", "battery"] {
            assert!(
                parsed["values"][metric].is_number(),
                "{metric} missing in {text}"
            );
        }

        let mut bin = MessageSource::new(device, 60_000, Encoding::Postcard);
        let Payload::Postcard(bytes) = bin.next_message(1_700_000_000_000).expect("postcard")
        else {
            panic!("expected postcard payload");
        };
        assert!(
            bytes.len() > 1,
            "a frame is at least a version byte plus data"
        );
    }

    #[test]
    fn consecutive_messages_never_share_a_timestamp() {
        let device = &fleet("sim", 1)[0];
        let mut source = MessageSource::new(device, 60_000, Encoding::Json);
        let mut last = 0;
        for _ in 0..100 {
            // The same wall-clock millisecond for every message, as in a tight bench loop.
            let Payload::Json(text) = source.next_message(5_000).expect("json") else {
                panic!("expected JSON payload");
            };
            let parsed: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
            let ts = parsed["ts"].as_u64().expect("numeric ts");
            assert!(ts > last || last == 0);
            last = ts;
        }
        assert_eq!(last, 5_099);
    }
}
