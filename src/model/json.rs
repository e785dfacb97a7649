//! A reading's value as plain JSON, shared by the live streams and the history API so
//! both render values the same way.

use serde::ser::{Serialize, Serializer};

use super::Value;

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
