//! `fluxgate-proto`: the device wire format of fluxgate.
//!
//! This crate is what device firmware and the gateway share: the three
//! ThingsBoard-compatible JSON shapes, the versioned postcard [`Frame`], the MQTT topic
//! layout, name rules and decode [`Limits`]. It is `no_std` + `alloc` so that embedded
//! firmware can use the same code the gateway uses.
//!
//! Decoding is total: every input yields either readings or a [`DecodeError`] value
//! that names what was wrong. Nothing in this crate panics on input.
//!
//! ```
//! use fluxgate_proto::{Limits, Value, decode_json};
//!
//! let now_ms = 1_732_363_300_000;
//! let samples = decode_json(br#"{"temp": 21.5, "ok": true}"#, &Limits::default(), now_ms)?;
//! assert_eq!(samples[0].metric, "temp");
//! assert_eq!(samples[0].value, Value::F64(21.5));
//! assert_eq!(samples[1].ts_ms, now_ms);
//! # Ok::<(), fluxgate_proto::DecodeError>(())
//! ```
#![doc = include_str!("../README.md")]
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

mod check;
mod error;
mod frame;
mod json;
mod limits;
mod names;
pub mod topic;

pub use error::{DECODE_ERROR_REASONS, DecodeError, EncodeError};
pub use frame::{FRAME_VERSION, decode_frame, encode_frame};
pub use json::{JsonValue, decode_json, encode_json};
pub use limits::Limits;
pub use names::{MAX_NAME_LEN, NameError, validate_device_id, validate_metric_name};

/// A telemetry value as devices send it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Value {
    /// A floating point number (JSON numbers with a fraction or exponent).
    F64(f64),
    /// An integer (JSON numbers without fraction that fit in i64).
    I64(i64),
    /// A boolean.
    Bool(bool),
    /// A short string, at most [`Limits::max_string_len`] bytes.
    Str(String),
}

/// One timestamped set of values inside a binary [`Frame`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    /// Device timestamp in milliseconds since the Unix epoch; `None` = server time.
    pub ts_ms: Option<u64>,
    /// Metric name and value pairs.
    pub values: Vec<(String, Value)>,
}

/// The binary (postcard) message: a version byte, then the postcard encoding of this.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Frame {
    /// The points carried by this frame.
    pub readings: Vec<Point>,
}

/// One decoded reading: a metric's value at a time.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Milliseconds since the Unix epoch (device time or the `now_ms` given to decode).
    pub ts_ms: u64,
    /// Metric name, already validated.
    pub metric: String,
    /// The value.
    pub value: Value,
}
