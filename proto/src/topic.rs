//! The MQTT topic layout: `devices/{device_id}/{kind}`.
//!
//! The formatting functions do not validate the device id; callers that take ids
//! from outside should check them with [`crate::validate_device_id`]
//! first. [`parse`] does validate, so a topic it accepts always names a valid device.

use alloc::format;
use alloc::string::String;

use crate::names::validate_device_id;

/// Subscription filter matching every device's JSON telemetry topic.
pub const TELEMETRY_FILTER: &str = "devices/+/telemetry";
/// Subscription filter matching every device's binary telemetry topic.
pub const TELEMETRY_BIN_FILTER: &str = "devices/+/telemetry/bin";

/// The JSON telemetry topic of a device: `devices/{id}/telemetry`.
pub fn telemetry(device_id: &str) -> String {
    format!("devices/{device_id}/telemetry")
}

/// The binary telemetry topic of a device: `devices/{id}/telemetry/bin`.
pub fn telemetry_bin(device_id: &str) -> String {
    format!("devices/{device_id}/telemetry/bin")
}

/// The status topic of a device: `devices/{id}/status`.
pub fn status(device_id: &str) -> String {
    format!("devices/{device_id}/status")
}

/// The command topic of a device: `devices/{id}/commands`.
pub fn commands(device_id: &str) -> String {
    format!("devices/{device_id}/commands")
}

/// What a device topic is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// JSON telemetry, `devices/{id}/telemetry`.
    Telemetry,
    /// Binary telemetry frames, `devices/{id}/telemetry/bin`.
    TelemetryBin,
    /// Device status, `devices/{id}/status`.
    Status,
    /// Commands to the device, `devices/{id}/commands`.
    Commands,
}

/// Parses `devices/{id}/<kind>` into the device id and the kind.
///
/// Returns `None` for anything else, including topics whose device id breaks the
/// naming rule, so the caller never sees an id it would have to re-check.
pub fn parse(topic: &str) -> Option<(&str, TopicKind)> {
    let rest = topic.strip_prefix("devices/")?;
    let (id, kind) = rest.split_once('/')?;
    let kind = match kind {
        "telemetry" => TopicKind::Telemetry,
        "telemetry/bin" => TopicKind::TelemetryBin,
        "status" => TopicKind::Status,
        "commands" => TopicKind::Commands,
        _ => return None,
    };
    validate_device_id(id).ok()?;
    Some((id, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_examples() {
        assert_eq!(
            parse("devices/d1/telemetry"),
            Some(("d1", TopicKind::Telemetry))
        );
        assert_eq!(
            parse("devices/d1/telemetry/bin"),
            Some(("d1", TopicKind::TelemetryBin))
        );
        assert_eq!(parse("devices/d1/status"), Some(("d1", TopicKind::Status)));
        assert_eq!(
            parse("devices/d1/commands"),
            Some(("d1", TopicKind::Commands))
        );
        for bad in [
            "",
            "devices",
            "devices/",
            "devices//telemetry",
            "devices/+/telemetry",
            "devices/#",
            "devices/d1",
            "devices/d1/",
            "devices/d1/telemetry/",
            "devices/d1/telemetry/json",
            "devices/d1/other",
            "/devices/d1/telemetry",
            "Devices/d1/telemetry",
            "devices/dé/telemetry",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
