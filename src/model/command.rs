//! Downlink commands: the contract between the command component (`commands`), the
//! registry that persists them, the transports that deliver them and the API that
//! creates and shows them. It lives in the bottom layer so that every one of those
//! depends downward on it (the API may not import `ingest`, and `ingest` may not be
//! imported by `commands`).
//!
//! The wire shapes (fixed, firmware answers them):
//! - to a device: `{"id":"<cmd>","name":"..","params":{..}}` (MQTT payload on
//!   `devices/{id}/commands`; over WS the same object with `"type":"command"`; over
//!   HTTP the long-poll answer);
//! - from a device: `{"ok":true,"result":<any JSON>}` or `{"ok":false,"error":"<text>"}`
//!   (over WS with `"type":"reply","id":"<cmd>"`).

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use serde::Deserialize;

/// Longest error text of a reply that is kept (longer ones are cut at a character
/// boundary): a device cannot make the registry hold unbounded text per command.
pub const MAX_REPLY_ERROR_CHARS: usize = 1024;

/// Where a command is in its life. `queued -> sent -> delivered -> replied | failed`,
/// and `expired` (its `ttl` passed while queued) or `cancelled` (by an operator while
/// queued). A `sent` command whose transport lost it goes back to `queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandState {
    /// Waiting for the device to be reachable (kept until `ttl`).
    Queued,
    /// Handed to a transport; not yet confirmed by the device.
    Sent,
    /// The device confirmed receipt (MQTT PUBACK, WS `received`, HTTP long-poll answer).
    Delivered,
    /// The device answered `ok: true`.
    Replied,
    /// The device answered `ok: false`, or no reply came within `timeout`.
    Failed,
    /// `ttl` passed before the command could be sent.
    Expired,
    /// Cancelled by an operator while queued.
    Cancelled,
}

impl CommandState {
    /// Every state, in life order (metric labels, filters).
    pub const ALL: [CommandState; 7] = [
        CommandState::Queued,
        CommandState::Sent,
        CommandState::Delivered,
        CommandState::Replied,
        CommandState::Failed,
        CommandState::Expired,
        CommandState::Cancelled,
    ];

    /// The wire and label name.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Sent => "sent",
            CommandState::Delivered => "delivered",
            CommandState::Replied => "replied",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
            CommandState::Cancelled => "cancelled",
        }
    }

    /// The state with this name.
    pub fn parse(s: &str) -> Option<CommandState> {
        CommandState::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// No transition leaves this state.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandState::Replied
                | CommandState::Failed
                | CommandState::Expired
                | CommandState::Cancelled
        )
    }
}

/// One command and its history, as persisted and shown.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// Creation order (the list's cursor); 0 before it is persisted.
    pub seq: i64,
    /// The id (URL- and topic-safe).
    pub id: String,
    /// The device it is for.
    pub device: String,
    /// The command name, `[A-Za-z0-9_.-]{1,64}`.
    pub name: String,
    /// A JSON object.
    pub params: serde_json::Value,
    /// How long after it was sent a reply may come.
    pub timeout_ms: u64,
    /// How long after creation it may wait to be sent.
    pub ttl_ms: u64,
    /// Where it is.
    pub state: CommandState,
    /// Created, ms since the Unix epoch.
    pub created_ms: u64,
    /// Last handed to a transport.
    pub sent_ms: Option<u64>,
    /// Confirmed by the device.
    pub delivered_ms: Option<u64>,
    /// Reached its final state.
    pub finished_ms: Option<u64>,
    /// The device's `result` (`replied`).
    pub result: Option<serde_json::Value>,
    /// The device's `error`, or why the gateway ended it (`timeout`).
    pub error: Option<String>,
    /// Cluster mode: the node that created it and runs its life until it finishes
    /// (`cluster.node_id`); empty on a single node.
    pub node: String,
}

impl Command {
    /// What the device receives.
    pub fn outgoing(&self) -> Outgoing {
        Outgoing {
            id: self.id.clone(),
            name: self.name.clone(),
            params: self.params.clone(),
        }
    }
}

/// A command as a device receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The command id (the device answers with it).
    pub id: String,
    /// The name.
    pub name: String,
    /// The parameters (a JSON object).
    pub params: serde_json::Value,
}

impl Outgoing {
    /// `{"id","name","params"}`: the MQTT payload and the HTTP long-poll answer.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"id": self.id, "name": self.name, "params": self.params})
    }

    /// The MQTT payload.
    pub fn mqtt_payload(&self) -> Bytes {
        Bytes::from(self.to_json().to_string())
    }

    /// The WebSocket text frame: the same object with `"type":"command"`.
    pub fn ws_frame(&self) -> String {
        serde_json::json!({
            "type": "command", "id": self.id, "name": self.name, "params": self.params
        })
        .to_string()
    }
}

/// A device's answer to a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `{"ok":true,"result":..}` (`result` absent is `null`).
    Ok(serde_json::Value),
    /// `{"ok":false,"error":".."}`.
    Err(String),
}

/// The body of a reply on every transport (WS adds `type` and `id`, checked by the
/// caller).
#[derive(Deserialize)]
struct ReplyBody {
    ok: bool,
    #[serde(default)]
    result: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default, rename = "type")]
    _type: Option<String>,
    #[serde(default, rename = "id")]
    _id: Option<String>,
}

impl Reply {
    /// Parse a reply body; the error names what was wrong (for the device).
    pub fn parse(bytes: &[u8]) -> Result<Reply, String> {
        let body: ReplyBody = serde_json::from_slice(bytes).map_err(|e| {
            format!("a reply must be {{\"ok\":true,\"result\":..}} or {{\"ok\":false,\"error\":\"..\"}}: {e}")
        })?;
        Reply::from_parts(body.ok, body.result, body.error)
    }

    /// A reply from its fields.
    pub fn from_parts(
        ok: bool,
        result: Option<serde_json::Value>,
        error: Option<String>,
    ) -> Result<Reply, String> {
        if ok {
            Ok(Reply::Ok(result.unwrap_or(serde_json::Value::Null)))
        } else {
            let mut text = error.ok_or("a reply with \"ok\":false needs an \"error\" string")?;
            if let Some((cut, _)) = text.char_indices().nth(MAX_REPLY_ERROR_CHARS) {
                text.truncate(cut);
            }
            Ok(Reply::Err(text))
        }
    }
}

/// A transport that pushes commands to connected devices and reports whether the
/// device acknowledged them (MQTT QoS 1). The command component offers a device's
/// next command to it; `None` means the device is not reachable this way now.
pub trait Downlink: Send + Sync {
    /// Offer `payload` for `device`'s command topic. The future resolves to true when
    /// the device acknowledged it, false when the transport lost it (the connection
    /// ended first).
    fn offer(&self, device: &str, payload: Bytes) -> Option<DownlinkOutcome>;
}

/// The outcome of one offer that a [`Downlink`] took.
pub type DownlinkOutcome = Pin<Box<dyn Future<Output = bool> + Send + Sync>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_both_shapes_and_refuse_others() {
        assert_eq!(
            Reply::parse(br#"{"ok":true,"result":{"a":1}}"#),
            Ok(Reply::Ok(serde_json::json!({"a":1})))
        );
        assert_eq!(
            Reply::parse(br#"{"ok":true}"#),
            Ok(Reply::Ok(serde_json::Value::Null))
        );
        assert_eq!(
            Reply::parse(br#"{"ok":false,"error":"no"}"#),
            Ok(Reply::Err("no".into()))
        );
        assert!(Reply::parse(br#"{"ok":false}"#).is_err());
        assert!(Reply::parse(br#"{"result":1}"#).is_err());
        assert!(Reply::parse(b"not json").is_err());
        let long = format!(r#"{{"ok":false,"error":"{}"}}"#, "é".repeat(5000));
        let Ok(Reply::Err(text)) = Reply::parse(long.as_bytes()) else {
            panic!("long error refused");
        };
        assert_eq!(text.chars().count(), MAX_REPLY_ERROR_CHARS);
    }

    #[test]
    fn states_round_trip_by_name() {
        for s in CommandState::ALL {
            assert_eq!(CommandState::parse(s.as_str()), Some(s));
        }
        assert_eq!(CommandState::parse("nope"), None);
    }
}
