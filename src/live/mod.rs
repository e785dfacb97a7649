//! Live fan-out: the [`Hub`], a transport-independent [`session`] (start, resume,
//! gap-fill, throttling), and its two transports, Server-Sent Events (`sse`) and
//! WebSocket (`ws`). Both speak the same JSON messages, built here:
//!
//! - `{"type":"snapshot","epoch":"…","position":"…","readings":[…]}`: the latest value of
//!   every matching series (first, unless resuming);
//! - `{"type":"readings","readings":[…]}` for every delivery (many readings per frame);
//! - `{"type":"gapfill","readings":[…]}`: readings from the store for a resume older
//!   than the ring (no positions; clients de-duplicate by device, metric and ts);
//! - `{"type":"reset","reason":…}`, then a snapshot: a resume that cannot be served;
//! - `{"type":"conflated","count":N}` when a slow client had N readings replaced by newer
//!   readings of the same series (also when `max_rate` held readings back).
//!
//! - `{"type":"command","id":…,"device":…,"name":…,"state":…,"at":ms,"result"|"error":…}`
//!   when a downlink command of a selected device changes state (any metric filter
//!   aside), and `{"type":"commands_missed","count":N}` when the stream fell behind
//!   the command events (read them with the command API).
//!
//! A reading is `{"pos":"{epoch}:{seq}","device":…,"metric":…,"ts":ms,"value":…}`.

mod error;
mod filter;
pub mod hub;
mod position;
mod queue;
pub mod session;
pub mod sse;
pub mod ws;

use std::sync::Arc;

use serde::ser::{Serialize, SerializeMap, Serializer};

pub use error::LiveError;
pub use filter::Filter;
pub use hub::{Hub, HubLimits, Subscription};
pub use position::{LiveReading, Position};
pub use session::SessionDeps;

use crate::model::JsonValue;

/// Most readings in one frame.
pub const MAX_FRAME_READINGS: usize = 1_000;

struct JsonReading<'a> {
    epoch: u64,
    live: &'a LiveReading,
}

impl Serialize for JsonReading<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = &self.live.reading;
        let mut m = s.serialize_map(Some(5))?;
        let pos = Position {
            epoch: self.epoch,
            seq: self.live.seq,
        };
        m.serialize_entry("pos", &pos.to_string())?;
        m.serialize_entry("device", &*r.device)?;
        m.serialize_entry("metric", &*r.metric)?;
        m.serialize_entry("ts", &r.ts_ms)?;
        m.serialize_entry("value", &JsonValue(&r.value))?;
        m.end()
    }
}

fn readings_json(
    kind: &str,
    epoch: u64,
    readings: &[Arc<LiveReading>],
    at: Option<Position>,
) -> String {
    struct Msg<'a> {
        kind: &'a str,
        epoch: u64,
        readings: &'a [Arc<LiveReading>],
        at: Option<Position>,
    }
    impl Serialize for Msg<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(None)?;
            m.serialize_entry("type", self.kind)?;
            if let Some(at) = self.at {
                m.serialize_entry("epoch", &self.epoch.to_string())?;
                m.serialize_entry("position", &at.to_string())?;
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
        at,
    })
    .unwrap_or_default()
}

/// The snapshot message; `at` is the stream position it reflects.
pub fn snapshot_json(at: Position, readings: &[Arc<LiveReading>]) -> String {
    readings_json("snapshot", at.epoch, readings, Some(at))
}

/// A readings message.
pub fn delivery_json(epoch: u64, readings: &[Arc<LiveReading>]) -> String {
    readings_json("readings", epoch, readings, None)
}

/// A gap-fill message with readings from the store.
pub fn gapfill_json(readings: &[crate::store::StoredReading]) -> String {
    let items: Vec<serde_json::Value> = readings
        .iter()
        .map(|r| {
            serde_json::json!({
                "device": r.device,
                "metric": r.metric,
                "ts": r.ts_ms,
                "value": JsonValue(&r.value),
            })
        })
        .collect();
    serde_json::json!({"type": "gapfill", "readings": items}).to_string()
}

/// The reset notice.
pub fn reset_json(reason: &str) -> String {
    serde_json::json!({"type": "reset", "reason": reason}).to_string()
}

/// The conflation notice.
pub fn conflated_json(count: u64) -> String {
    format!("{{\"type\":\"conflated\",\"count\":{count}}}")
}

/// A parsed live-stream query string.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveQuery {
    /// What to subscribe to.
    pub filter: Filter,
    /// Resume after this position.
    pub since: Option<Position>,
    /// At most this many readings per second per series.
    pub max_rate: Option<f64>,
}

/// Parse a live query string: `device=a&device=b,c&device=sensor-*&label=site=berlin&
/// metric=temp&since=E:S&max_rate=2` (repeated keys and comma lists both work; a device
/// with `*` or `?` is a glob).
pub fn parse_query(query: Option<&str>) -> Result<LiveQuery, String> {
    let mut q = LiveQuery::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "device" | "devices" => {
                for item in value.split(',').filter(|s| !s.is_empty()) {
                    if item.contains(['*', '?']) {
                        let plain: String =
                            item.chars().filter(|c| !matches!(c, '*' | '?')).collect();
                        if !plain.is_empty() {
                            fluxgate_proto::validate_device_id(&plain).map_err(|e| {
                                format!("invalid device glob `{}`: {e}", truncate(item))
                            })?;
                        }
                        q.filter.globs.push(item.to_owned());
                    } else {
                        fluxgate_proto::validate_device_id(item)
                            .map_err(|e| format!("invalid device `{}`: {e}", truncate(item)))?;
                        q.filter.devices.insert(item.to_owned());
                    }
                }
            }
            "metric" | "metrics" => {
                for item in value.split(',').filter(|s| !s.is_empty()) {
                    fluxgate_proto::validate_metric_name(item)
                        .map_err(|e| format!("invalid metric `{}`: {e}", truncate(item)))?;
                    q.filter.metrics.insert(item.to_owned());
                }
            }
            "label" | "labels" => {
                let (k, v) = value.split_once('=').ok_or_else(|| {
                    format!("`label` must be key=value, got `{}`", truncate(&value))
                })?;
                q.filter.labels.push((k.to_owned(), v.to_owned()));
            }
            "since" => {
                q.since = Some(Position::parse(&value).ok_or_else(|| {
                    format!(
                        "`since` must be a position EPOCH:SEQ, got `{}`",
                        truncate(&value)
                    )
                })?);
            }
            "max_rate" => {
                let rate: f64 = value
                    .parse()
                    .ok()
                    .filter(|r: &f64| r.is_finite() && *r > 0.0 && *r <= 1000.0)
                    .ok_or_else(|| {
                        format!(
                            "`max_rate` must be a number in (0, 1000], got `{}`",
                            truncate(&value)
                        )
                    })?;
                q.max_rate = Some(rate);
            }
            // Authentication (see `api::auth::StreamViewer`), not a filter.
            "access_token" => {}
            other => return Err(format!("unknown query parameter `{}`", truncate(other))),
        }
    }
    Ok(q)
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
    use crate::model::{Reading, Value};

    #[test]
    fn query_parsing() {
        let q = parse_query(Some(
            "device=a&device=b,c,sensor-*&metric=temp&label=site=berlin&since=5:9&max_rate=2.5",
        ))
        .expect("ok");
        assert_eq!(q.filter.devices.len(), 3);
        assert_eq!(q.filter.globs, ["sensor-*"]);
        assert_eq!(q.filter.labels, [("site".to_owned(), "berlin".to_owned())]);
        assert!(q.filter.metrics.contains("temp"));
        assert_eq!(q.since, Some(Position { epoch: 5, seq: 9 }));
        assert_eq!(q.max_rate, Some(2.5));
        assert!(parse_query(Some("device=bad%20id")).is_err());
        assert!(parse_query(Some("color=red")).is_err());
        assert!(parse_query(Some("since=yesterday")).is_err());
        assert!(parse_query(Some("max_rate=0")).is_err());
        assert_eq!(parse_query(None).expect("empty"), LiveQuery::default());
    }

    #[test]
    fn messages_are_json() {
        let live = Arc::new(LiveReading {
            seq: 3,
            series: 0,
            arrival_ms: 0,
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
