//! [`BrokerChurnFilter`]: keeps rumqttd's log lines about normal device churn out of the
//! log, and lets its real errors through.
//!
//! rumqttd logs ordinary events at ERROR: every DISCONNECT ends with "no-connection id
//! .. is already gone" (the router removes the connection, then the connection task
//! reports the end again), a keep-alive timeout or a reset socket is "disconnected", a
//! duplicate client id (and so every kick) is "Duplicate client_id, dropping previous
//! connection" plus "router-drop", and every refused or silent login is "Error while
//! handling MQTT connect packet". A per-target level directive cannot separate these
//! from real errors: both come from the same two targets (`rumqttd::router::routing`,
//! `rumqttd::server::broker`) at the same level, so lowering those targets would also
//! hide "no space for new connection" (the broker is full), "Unable to accept socket"
//! and "Router done!". So the directive keeps rumqttd at `warn` (its info lines are one
//! per connection) and this filter drops exactly the known churn lines by target and
//! message. Each of them is an event fluxgate counts and logs itself at debug, with the
//! device and a reason: `fluxgate_mqtt_connections_closed_total{reason}`, kicks,
//! `fluxgate_auth_refused_total` and `fluxgate_mqtt_protocol_violations_total`.
//!
//! It applies whatever the level (also under `RUST_LOG=debug`), so a debug log shows
//! the gateway's own churn lines instead of rumqttd's mislabelled ERRORs.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// rumqttd's churn lines: (target, message prefix).
const CHURN: [(&str, &str); 5] = [
    ("rumqttd::router::routing", "no-connection id "),
    (
        "rumqttd::router::routing",
        "Duplicate client_id, dropping previous connection",
    ),
    ("rumqttd::server::broker", "router-drop"),
    ("rumqttd::server::broker", "disconnected"),
    (
        "rumqttd::server::broker",
        "Error while handling MQTT connect packet",
    ),
];

/// Whether a log line of rumqttd is normal device churn (see the module docs).
pub fn is_broker_churn(target: &str, message: &str) -> bool {
    CHURN
        .iter()
        .any(|(t, m)| target == *t && message.starts_with(m))
}

/// A per-layer filter that drops rumqttd's churn lines (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct BrokerChurnFilter;

impl<S> Filter<S> for BrokerChurnFilter {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        // Decided per event, from its message; the level filter runs first.
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        let target = event.metadata().target();
        if !target.starts_with("rumqttd") {
            return true;
        }
        let mut message = Message::default();
        event.record(&mut message);
        !is_broker_churn(target, &message.0)
    }
}

/// Collects an event's `message` field.
#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            value.clone_into(&mut self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn churn_lines_are_recognised_by_target_and_message() {
        assert!(is_broker_churn(
            "rumqttd::router::routing",
            "no-connection id 7 is already gone"
        ));
        assert!(is_broker_churn("rumqttd::server::broker", "router-drop"));
        // Real errors of the same targets stay.
        assert!(!is_broker_churn(
            "rumqttd::router::routing",
            "no space for new connection"
        ));
        assert!(!is_broker_churn(
            "rumqttd::server::broker",
            "Unable to accept socket."
        ));
        // The same words from another target are not rumqttd's churn.
        assert!(!is_broker_churn("fluxgate::app", "disconnected"));
    }

    /// A layer that records the messages it was given.
    struct Record(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Record {
        fn on_event(&self, event: &Event<'_>, _cx: tracing_subscriber::layer::Context<'_, S>) {
            let mut m = Message::default();
            event.record(&mut m);
            self.0.lock().unwrap().push(m.0);
        }
    }

    #[test]
    fn the_filter_drops_churn_and_keeps_real_errors() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry()
            .with(Record(seen.clone()).with_filter(BrokerChurnFilter));
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "rumqttd::router::routing", "no-connection id {} is already gone", 3);
            tracing::error!(target: "rumqttd::server::broker", error = "KeepAlive", "disconnected");
            tracing::error!(target: "rumqttd::router::routing", "no space for new connection");
            tracing::error!(target: "fluxgate::ingest", "disconnected");
        });
        assert_eq!(
            *seen.lock().unwrap(),
            ["no space for new connection", "disconnected"]
        );
    }
}
