//! Live fan-out: the [`Hub`] and its two transports, Server-Sent Events (`sse`) and
//! WebSocket (`ws`). Both speak the same JSON messages, built here:
//!
//! - `{"type":"snapshot","epoch":"…","readings":[…]}` once, first: the latest value of
//!   every matching series;
//! - `{"type":"readings","readings":[…]}` for every delivery (many readings per frame);
//! - `{"type":"conflated","count":N}` when a slow client had N readings replaced by newer
//!   readings of the same series.
//!
//! A reading is `{"pos":"{epoch}:{seq}","device":…,"metric":…,"ts":ms,"value":…}`.

pub mod hub;
pub mod sse;
pub mod ws;

use std::sync::Arc;

use serde::ser::{Serialize, SerializeMap, Serializer};

pub use hub::{Filter, Hub, HubLimits, LiveError, LiveReading, Subscription};

use crate::model::Value;

/// Most readings in one frame.
pub const MAX_FRAME_READINGS: usize = 1_000;

/// Serializes a [`Value`] as the plain JSON value.
pub struct JsonValue<'a>(pub &'a Value);

impl Serialize for JsonValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::F64(v) => s.serialize_f64(*v),
            Value::I64(v) => s.serialize_i64(*v),
            Value::Bool(v) => s.serialize_bool(*v),
            Value::Str(v) => s.serialize_str(v),
        }
    }
}

struct JsonReading<'a> {
    epoch: u64,
    live: &'a LiveReading,
}

impl Serialize for JsonReading<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = &self.live.reading;
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("pos", &position(self.epoch, self.live.seq))?;
        m.serialize_entry("device", &*r.device)?;
        m.serialize_entry("metric", &*r.metric)?;
        m.serialize_entry("ts", &r.ts_ms)?;
        m.serialize_entry("value", &JsonValue(&r.value))?;
        m.end()
    }
}

/// The position string of a reading: `{epoch}:{seq}`.
pub fn position(epoch: u64, seq: u64) -> String {
    format!("{epoch}:{seq}")
}

fn readings_json(kind: &str, epoch: u64, readings: &[Arc<LiveReading>]) -> String {
    struct Msg<'a> {
        kind: &'a str,
        epoch: u64,
        readings: &'a [Arc<LiveReading>],
    }
    impl Serialize for Msg<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(None)?;
            m.serialize_entry("type", self.kind)?;
            if self.kind == "snapshot" {
                m.serialize_entry("epoch", &self.epoch.to_string())?;
            }
            let readings: Vec<JsonReading<'_>> = self
                .readings
                .iter()
                .map(|live| JsonReading {
                    epoch: self.epoch,
                    live,
                })
                .collect();
            m.serialize_entry("readings", &readings)?;
            m.end()
        }
    }
    // Serializing plain strings and numbers into a String cannot fail; non-finite floats
    // never reach the hub because the decoder rejects them.
    serde_json::to_string(&Msg {
        kind,
        epoch,
        readings,
    })
    .unwrap_or_default()
}

/// The snapshot message.
pub fn snapshot_json(epoch: u64, readings: &[Arc<LiveReading>]) -> String {
    readings_json("snapshot", epoch, readings)
}

/// A readings message.
pub fn delivery_json(epoch: u64, readings: &[Arc<LiveReading>]) -> String {
    readings_json("readings", epoch, readings)
}

/// The conflation notice.
pub fn conflated_json(count: u64) -> String {
    format!("{{\"type\":\"conflated\",\"count\":{count}}}")
}

/// Parse a live query string: `device=a&device=b,c&metric=temp` (repeated keys and
/// comma lists both work).
pub fn parse_filter(query: Option<&str>) -> Result<Filter, String> {
    let mut filter = Filter::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let target = match &*key {
            "device" | "devices" => &mut filter.devices,
            "metric" | "metrics" => &mut filter.metrics,
            // Authentication (see `api::auth::StreamViewer`), not a filter.
            "access_token" => continue,
            other => return Err(format!("unknown query parameter `{other}`")),
        };
        for item in value.split(',').filter(|s| !s.is_empty()) {
            fluxgate_proto::validate_device_id(item)
                .map_err(|e| format!("invalid {key} `{}`: {e}", truncate(item)))?;
            target.insert(item.to_owned());
        }
    }
    Ok(filter)
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Reading;

    #[test]
    fn filter_parsing() {
        let f = parse_filter(Some("device=a&device=b,c&metric=temp")).expect("ok");
        assert_eq!(f.devices.len(), 3);
        assert!(f.metrics.contains("temp"));
        assert!(parse_filter(Some("device=bad%20id")).is_err());
        assert!(parse_filter(Some("color=red")).is_err());
        assert_eq!(parse_filter(None).expect("empty"), Filter::default());
    }

    #[test]
    fn messages_are_json() {
        let live = Arc::new(LiveReading {
            seq: 3,
            reading: Reading {
                device: "d".into(),
                metric: "m".into(),
                ts_ms: 5,
                value: Value::Str("x\"y".into()),
            },
        });
        let text = delivery_json(9, &[live]);
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["type"], "readings");
        assert_eq!(v["readings"][0]["pos"], "9:3");
        assert_eq!(v["readings"][0]["value"], "x\"y");
        assert_eq!(conflated_json(4), r#"{"type":"conflated","count":4}"#);
    }
}
