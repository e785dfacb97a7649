//! The MQTT front's protocol discipline as pure functions over plain values (no codec
//! types), so the same rules hold whatever codec or front carries them:
//!
//! - identity is fixed by the first CONNECT; a second CONNECT or any packet before it
//!   is a violation (MQTT 3.1.1, 3.1.0-1 and 3.1.0-2);
//! - a device publishes only to its exact topics `devices/{id}/telemetry`,
//!   `devices/{id}/telemetry/bin`, `devices/{id}/status` and
//!   `devices/{id}/commands/{cmd}/reply`, never retained, never with a wildcard, and
//!   its will obeys the same rules;
//! - it subscribes only to `devices/{id}/commands`.

use fluxgate_proto::topic;

use crate::observe::MqttViolation;

/// The longest topic excerpt written to a log line.
const LOG_TOPIC_CHARS: usize = 96;

/// Check a PUBLISH (or will) topic and retain flag of device `device`.
pub(super) fn check_publish(device: &str, topic: &[u8], retain: bool) -> Result<(), MqttViolation> {
    let Ok(topic) = std::str::from_utf8(topic) else {
        return Err(MqttViolation::InvalidTopic);
    };
    // MQTT forbids U+0000 in topic names (1.5.3-2).
    if topic.contains('\0') {
        return Err(MqttViolation::InvalidTopic);
    }
    if topic.contains(['+', '#']) {
        return Err(MqttViolation::WildcardTopic);
    }
    if !is_device_publish_topic(device, topic) {
        return Err(MqttViolation::ForeignTopic);
    }
    // Retained messages are kept by the broker until overwritten: memory a device could
    // fill at will, and data nobody reads.
    if retain {
        return Err(MqttViolation::Retained);
    }
    Ok(())
}

/// Check a will: the publish rules, with a foreign topic counted as a foreign will.
pub(super) fn check_will(device: &str, topic: &[u8], retain: bool) -> Result<(), MqttViolation> {
    check_publish(device, topic, retain).map_err(|v| match v {
        MqttViolation::ForeignTopic => MqttViolation::ForeignWill,
        other => other,
    })
}

/// Check one SUBSCRIBE filter of device `device`: only its own command topic.
pub(super) fn check_subscribe(device: &str, filter: &str) -> Result<(), MqttViolation> {
    if filter == topic::commands(device) {
        Ok(())
    } else {
        Err(MqttViolation::ForeignSubscribe)
    }
}

/// Whether `topic` is one of the exact topics device `device` may publish to.
fn is_device_publish_topic(device: &str, topic: &str) -> bool {
    let Some(kind) = topic
        .strip_prefix("devices/")
        .and_then(|rest| rest.strip_prefix(device))
        .and_then(|rest| rest.strip_prefix('/'))
    else {
        return false;
    };
    match kind {
        "telemetry" | "telemetry/bin" | "status" => true,
        _ => kind
            .strip_prefix("commands/")
            .and_then(|rest| rest.strip_suffix("/reply"))
            .is_some_and(|cmd| !cmd.is_empty() && !cmd.contains('/')),
    }
}

/// A topic as it may appear in a log line: lossy UTF-8, at most [`LOG_TOPIC_CHARS`]
/// characters, so a hostile 64 KiB topic cannot bloat the log.
pub(super) fn topic_for_log(topic: &[u8]) -> String {
    let text = String::from_utf8_lossy(topic);
    match text.char_indices().nth(LOG_TOPIC_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_device_topics_are_publishable() {
        for ok in [
            "devices/d1/telemetry",
            "devices/d1/telemetry/bin",
            "devices/d1/status",
            "devices/d1/commands/c-7/reply",
        ] {
            assert_eq!(check_publish("d1", ok.as_bytes(), false), Ok(()), "{ok}");
        }
        for (topic, reason) in [
            ("devices/d2/telemetry", MqttViolation::ForeignTopic),
            ("devices/d1x/telemetry", MqttViolation::ForeignTopic),
            ("devices/d/telemetry", MqttViolation::ForeignTopic),
            ("devices/d1", MqttViolation::ForeignTopic),
            ("devices/d1/", MqttViolation::ForeignTopic),
            ("devices/d1/telemetry/", MqttViolation::ForeignTopic),
            ("devices/d1/telemetry/json", MqttViolation::ForeignTopic),
            ("devices/d1/commands", MqttViolation::ForeignTopic),
            ("devices/d1/commands//reply", MqttViolation::ForeignTopic),
            ("devices/d1/commands/a/b/reply", MqttViolation::ForeignTopic),
            ("devices/d1/other", MqttViolation::ForeignTopic),
            ("/devices/d1/telemetry", MqttViolation::ForeignTopic),
            ("", MqttViolation::ForeignTopic),
            ("devices/+/telemetry", MqttViolation::WildcardTopic),
            ("devices/d1/#", MqttViolation::WildcardTopic),
            ("devices/d1/commands/+/reply", MqttViolation::WildcardTopic),
            ("devices/d1/telemetry\0", MqttViolation::InvalidTopic),
        ] {
            assert_eq!(
                check_publish("d1", topic.as_bytes(), false),
                Err(reason),
                "{topic:?}"
            );
        }
        assert_eq!(
            check_publish("d1", b"devices/d1/telemetry\xff", false),
            Err(MqttViolation::InvalidTopic)
        );
    }

    #[test]
    fn retained_publishes_and_wills_are_refused() {
        assert_eq!(
            check_publish("d1", b"devices/d1/telemetry", true),
            Err(MqttViolation::Retained)
        );
        assert_eq!(
            check_will("d1", b"devices/d1/status", true),
            Err(MqttViolation::Retained)
        );
        assert_eq!(check_will("d1", b"devices/d1/status", false), Ok(()));
        assert_eq!(
            check_will("d1", b"devices/d2/status", false),
            Err(MqttViolation::ForeignWill)
        );
        // A foreign topic is reported as foreign even when retained too.
        assert_eq!(
            check_publish("d1", b"devices/d2/status", true),
            Err(MqttViolation::ForeignTopic)
        );
    }

    #[test]
    fn only_the_own_command_topic_is_subscribable() {
        assert_eq!(check_subscribe("d1", "devices/d1/commands"), Ok(()));
        for filter in [
            "devices/d2/commands",
            "devices/d1/+",
            "devices/d1/#",
            "#",
            "devices/d1/commands/#",
            "$share/g/devices/d1/commands",
        ] {
            assert_eq!(
                check_subscribe("d1", filter),
                Err(MqttViolation::ForeignSubscribe),
                "{filter}"
            );
        }
    }

    #[test]
    fn log_topics_are_short() {
        assert_eq!(topic_for_log(b"devices/d1/x"), "devices/d1/x");
        let long = "a".repeat(1_000);
        assert_eq!(topic_for_log(long.as_bytes()).len(), LOG_TOPIC_CHARS + 3);
        assert_eq!(topic_for_log(b"\xff"), "\u{fffd}");
    }
}
