//! Observability: every countable thing that happens is an [`Event`], and
//! [`Metrics::emit`] is the one place that turns it into both a counter and (where it is
//! worth a line) a log record, so the two can never disagree.
//!
//! The registry is a fixed set of atomics rendered as Prometheus text on `/metrics`. Label
//! sets are closed enumerations (transports, decode reasons, drop reasons), so there is no
//! per-device label and no unbounded cardinality. Every counter counts one unit, and the
//! unit is in its name: a drop is counted in messages, readings or points, and the type of
//! its reason decides which, so no call site can add readings to a message counter.
//!
//! One concept per file:
//! - `event`: [`Event`], what callers report.
//! - `drop_reason`: why something was dropped, one reason type per counted unit.
//! - `labels`: the other closed label sets ([`Queue`], [`HttpCloseReason`],
//!   [`ResumeSource`], transports, [`MqttViolation`], [`MqttCloseReason`],
//!   [`CommandRefusal`]).
//! - `metrics`: [`Metrics`], the registry of atomics, and `emit`.
//! - `histogram`: fixed-bucket histograms.
//! - `prometheus`: the text exposition of the registry.
//! - `log_budget`: per-class rate limits for log lines caused by outside input.
//! - `tls_metrics`: failed TLS handshakes by listener and reason ([`TlsListener`],
//!   [`TlsFailure`]), refused client certificates included.
//! - `auth_metrics`: operator authentication and its defences (refusals, key cache
//!   misses, throttling, table evictions, live streams per key), with their label sets.

mod auth_metrics;
mod drop_reason;
mod event;
mod histogram;
mod labels;
mod log_budget;
mod metrics;
mod prometheus;
mod tls_metrics;

pub use auth_metrics::{AuthTable, Credential, KeyMiss, OperatorRefusal};
pub use drop_reason::{MessageDropReason, PointDropReason, ReadingDropReason};
pub use event::Event;
pub use labels::{
    CommandRefusal, CommandRouteFailure, HttpCloseReason, MqttCloseReason, MqttViolation, Queue,
    ResumeSource,
};
pub use metrics::Metrics;
pub use tls_metrics::{TlsFailure, TlsListener};
