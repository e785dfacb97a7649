//! How a simulated device answers the gateway's commands, shared by both transports.
//!
//! The wire is the gateway's contract: over MQTT a command arrives on
//! `devices/{id}/commands` as `{"id":"<cmd>","name":"..","params":{..}}` and is answered
//! on `devices/{id}/commands/{cmd}/reply` with `{"ok":true,"result":..}` or
//! `{"ok":false,"error":".."}`; over WebSocket it arrives as a
//! `{"type":"command","id","name","params"}` text frame, is acknowledged at once with
//! `{"type":"received","id"}` and answered with `{"type":"reply","id","ok",..}`.
//!
//! What a device does: `set_period` with `{"period_ms":N}` changes its sending period
//! (the caller applies the returned [`Effect`]); `ping` answers `{"pong":true}`; any
//! other name is answered `ok:false`, `"unknown command"`. A known command fails with
//! probability `failure_rate` (a simulated device fault), and every answer waits
//! `reply_latency` (the caller schedules it).

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

/// The longest sending period `set_period` accepts (one day).
pub const MAX_PERIOD_MS: u64 = 86_400_000;
/// The longest command id a device accepts (it becomes a topic level).
const MAX_ID_LEN: usize = 128;

/// How devices answer commands (`--reply-latency`, `--reply-failure-rate`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CommandSettings {
    /// Time from receiving a command to sending its reply.
    pub reply_latency: Duration,
    /// Probability (0..=1) that a known command fails.
    pub failure_rate: f64,
}

impl Default for CommandSettings {
    fn default() -> Self {
        Self {
            reply_latency: Duration::ZERO,
            failure_rate: 0.0,
        }
    }
}

/// A command as the gateway sends it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Command {
    /// The command's id, echoed in the reply.
    pub id: String,
    /// What to do.
    pub name: String,
    /// Its parameters (an object; absent means none).
    #[serde(default)]
    pub params: Value,
}

/// A WebSocket frame from the gateway that is a command.
#[derive(Deserialize)]
struct WsCommand {
    #[serde(rename = "type")]
    kind: String,
    #[serde(flatten)]
    command: Command,
}

/// What answering a command changes in the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing.
    None,
    /// Send one message every this long from now on.
    SetPeriod(Duration),
}

/// The answer to a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done, with a result.
    Ok(Value),
    /// Not done, with the reason.
    Failed(String),
}

/// Parse an MQTT command payload; the id must be usable as a topic level.
pub fn parse_mqtt(payload: &[u8]) -> Result<Command, String> {
    let command: Command =
        serde_json::from_slice(payload).map_err(|e| format!("malformed command: {e}"))?;
    check_id(&command.id)?;
    Ok(command)
}

/// The command in a WebSocket text frame, if the frame is one (`Err` for a command
/// frame that is malformed; `Ok(None)` for any other frame).
pub fn parse_ws(text: &str) -> Result<Option<Command>, String> {
    // Cheap test first: most frames are acks.
    if !text.contains("\"command\"") {
        return Ok(None);
    }
    match serde_json::from_str::<WsCommand>(text) {
        Ok(frame) if frame.kind == "command" => {
            check_id(&frame.command.id)?;
            Ok(Some(frame.command))
        }
        Ok(_) => Ok(None),
        Err(e) => Err(format!("malformed command frame: {e}")),
    }
}

fn check_id(id: &str) -> Result<(), String> {
    let usable = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.contains(['/', '+', '#'])
        && !id.chars().any(char::is_control);
    if usable {
        Ok(())
    } else {
        Err(format!("command id {id:?} cannot be answered on a topic"))
    }
}

/// Carry out `command`. `roll` is a uniform random number in 0..1, compared with the
/// failure rate (passed in so that tests decide it).
pub fn execute(command: &Command, settings: &CommandSettings, roll: f64) -> (Outcome, Effect) {
    let known = matches!(command.name.as_str(), "set_period" | "ping");
    if !known {
        return (Outcome::Failed("unknown command".to_owned()), Effect::None);
    }
    if roll < settings.failure_rate {
        return (
            Outcome::Failed("simulated device failure".to_owned()),
            Effect::None,
        );
    }
    match command.name.as_str() {
        "set_period" => match command.params.get("period_ms").and_then(Value::as_u64) {
            Some(ms) if (1..=MAX_PERIOD_MS).contains(&ms) => (
                Outcome::Ok(json!({ "period_ms": ms })),
                Effect::SetPeriod(Duration::from_millis(ms)),
            ),
            _ => (
                Outcome::Failed(format!(
                    "params.period_ms must be an integer from 1 to {MAX_PERIOD_MS}"
                )),
                Effect::None,
            ),
        },
        _ => (Outcome::Ok(json!({ "pong": true })), Effect::None),
    }
}

/// The MQTT reply topic of command `id` of `device`.
pub fn reply_topic(device: &str, id: &str) -> String {
    format!("devices/{device}/commands/{id}/reply")
}

/// The MQTT reply payload.
pub fn mqtt_reply(outcome: &Outcome) -> Vec<u8> {
    let body = match outcome {
        Outcome::Ok(result) => json!({ "ok": true, "result": result }),
        Outcome::Failed(error) => json!({ "ok": false, "error": error }),
    };
    body.to_string().into_bytes()
}

/// The WebSocket frame that acknowledges receipt of command `id`.
pub fn ws_received(id: &str) -> String {
    json!({ "type": "received", "id": id }).to_string()
}

/// The WebSocket reply frame.
pub fn ws_reply(id: &str, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ok(result) => json!({ "type": "reply", "id": id, "ok": true, "result": result }),
        Outcome::Failed(error) => {
            json!({ "type": "reply", "id": id, "ok": false, "error": error })
        }
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(name: &str, params: Value) -> Command {
        Command {
            id: "c1".into(),
            name: name.into(),
            params,
        }
    }

    #[test]
    fn set_period_changes_the_period() {
        let settings = CommandSettings::default();
        let (outcome, effect) = execute(
            &command("set_period", json!({"period_ms": 250})),
            &settings,
            0.5,
        );
        assert_eq!(outcome, Outcome::Ok(json!({"period_ms": 250})));
        assert_eq!(effect, Effect::SetPeriod(Duration::from_millis(250)));
        for bad in [
            json!({}),
            json!({"period_ms": 0}),
            json!({"period_ms": -5}),
            json!({"period_ms": "1s"}),
            json!({"period_ms": MAX_PERIOD_MS + 1}),
        ] {
            let (outcome, effect) = execute(&command("set_period", bad.clone()), &settings, 0.5);
            assert!(matches!(outcome, Outcome::Failed(_)), "{bad}");
            assert_eq!(effect, Effect::None, "{bad}");
        }
    }

    #[test]
    fn unknown_commands_are_refused_whatever_the_failure_roll() {
        let settings = CommandSettings {
            reply_latency: Duration::ZERO,
            failure_rate: 0.0,
        };
        let (outcome, _) = execute(&command("reboot", json!({})), &settings, 0.9);
        assert_eq!(outcome, Outcome::Failed("unknown command".into()));
    }

    #[test]
    fn the_failure_rate_fails_known_commands() {
        let settings = CommandSettings {
            reply_latency: Duration::ZERO,
            failure_rate: 0.1,
        };
        let ping = command("ping", json!({}));
        let (failed, effect) = execute(&ping, &settings, 0.05);
        assert_eq!(failed, Outcome::Failed("simulated device failure".into()));
        assert_eq!(effect, Effect::None);
        let (ok, _) = execute(&ping, &settings, 0.1);
        assert_eq!(ok, Outcome::Ok(json!({"pong": true})));
    }

    #[test]
    fn mqtt_wire_shapes() {
        let c = parse_mqtt(br#"{"id":"c-9","name":"ping","params":{"a":1}}"#).expect("command");
        assert_eq!(c.id, "c-9");
        assert_eq!(c.params, json!({"a":1}));
        assert_eq!(reply_topic("d1", &c.id), "devices/d1/commands/c-9/reply");
        let ok: Value = serde_json::from_slice(&mqtt_reply(&Outcome::Ok(json!(3)))).expect("json");
        assert_eq!(ok, json!({"ok": true, "result": 3}));
        let failed: Value =
            serde_json::from_slice(&mqtt_reply(&Outcome::Failed("no".into()))).expect("json");
        assert_eq!(failed, json!({"ok": false, "error": "no"}));
        // Params may be absent; ids that are not a topic level are refused.
        assert_eq!(
            parse_mqtt(br#"{"id":"c","name":"ping"}"#)
                .expect("command")
                .params,
            Value::Null
        );
        for bad in [
            &br#"{"id":"a/b","name":"ping"}"#[..],
            br##"{"id":"#","name":"ping"}"##,
            br#"{"id":"","name":"ping"}"#,
            br#"{"name":"ping"}"#,
            b"not json",
        ] {
            assert!(parse_mqtt(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn ws_wire_shapes() {
        let frame =
            r#"{"type":"command","id":"c2","name":"set_period","params":{"period_ms":100}}"#;
        let c = parse_ws(frame).expect("valid").expect("a command");
        assert_eq!((c.id.as_str(), c.name.as_str()), ("c2", "set_period"));
        assert_eq!(
            parse_ws(r#"{"type":"ack","seq":1,"readings":4}"#).expect("valid"),
            None
        );
        assert!(parse_ws(r#"{"type":"command","name":"x"}"#).is_err());
        let received: Value = serde_json::from_str(&ws_received("c2")).expect("json");
        assert_eq!(received, json!({"type": "received", "id": "c2"}));
        let reply: Value =
            serde_json::from_str(&ws_reply("c2", &Outcome::Ok(json!({"period_ms": 100}))))
                .expect("json");
        assert_eq!(
            reply,
            json!({"type": "reply", "id": "c2", "ok": true, "result": {"period_ms": 100}})
        );
        let failed: Value =
            serde_json::from_str(&ws_reply("c2", &Outcome::Failed("unknown command".into())))
                .expect("json");
        assert_eq!(
            failed,
            json!({"type": "reply", "id": "c2", "ok": false, "error": "unknown command"})
        );
    }
}
