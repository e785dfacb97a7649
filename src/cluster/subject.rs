//! The names cluster mode gives things in NATS: the stream, its subjects, the consumers
//! and the presence bucket. One place, so a node and its tests can never disagree.

/// The telemetry stream.
pub const STREAM: &str = "FLUXGATE";

/// The subjects the stream captures (`fluxgate.telemetry.{device}`).
pub const TELEMETRY_SUBJECTS: &str = "fluxgate.telemetry.>";

/// The shared durable consumer that feeds the InfluxDB sink: every node pulls from it,
/// so each batch is written by one node only.
pub const TSDB_CONSUMER: &str = "tsdb";

/// The key-value bucket of device presence.
pub const PRESENCE_BUCKET: &str = "fluxgate_presence";

/// Requests to node `node_id` about commands (offers from owners; receipts, replies,
/// losses and cancels from other nodes), answered with NATS request/reply.
pub fn commands(node_id: &str) -> String {
    format!("fluxgate.commands.{node_id}")
}

/// Every node's command state changes (each node publishes those of the commands it
/// owns and follows the others').
pub const COMMAND_EVENTS: &str = "fluxgate.command_events";

/// "Device `d` may be reachable at node `n` now", so that owners of its queued commands
/// offer them at once rather than at their next retry.
pub const COMMAND_REACHABLE: &str = "fluxgate.command_reachable";

/// The durable consumer through which node `node_id` follows the whole stream into its
/// local replica. The node id is validated by the config to `[A-Za-z0-9_-]`.
pub fn replica_consumer(node_id: &str) -> String {
    format!("replica-{node_id}")
}

/// The subject of a device's telemetry.
///
/// Device ids may contain `.`, which separates NATS subject tokens; an id such as `a.`
/// would even make the subject invalid. `.` is therefore written as `~`, a character
/// device ids never contain, so the mapping stays one to one.
pub fn telemetry(device: &str) -> String {
    let mut s = String::with_capacity(19 + device.len());
    s.push_str("fluxgate.telemetry.");
    s.extend(device.chars().map(|c| if c == '.' { '~' } else { c }));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_map_to_one_subject_token_each() {
        assert_eq!(telemetry("d1"), "fluxgate.telemetry.d1");
        assert_eq!(telemetry("a.b."), "fluxgate.telemetry.a~b~");
        assert_ne!(telemetry("a.b"), telemetry("a-b"));
        assert_eq!(replica_consumer("node-a"), "replica-node-a");
        assert_eq!(commands("node-a"), "fluxgate.commands.node-a");
    }
}
