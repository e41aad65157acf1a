//! The common result of the line parsers.

use crate::error::{FieldError, FrameError};
use crate::point::Value;

/// What one frame yielded.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// Named fields, each a value or the reason it is bad.
    Fields(Vec<(String, Result<Value, FieldError>)>),
    /// A frame the parser recognises but does not publish (e.g. NMEA GSV).
    Ignored,
    /// An unusable frame; `fields` names the points it affects (empty: it names none, and
    /// no point is touched).
    Error {
        /// Affected fields.
        fields: Vec<String>,
        /// Why.
        reason: FrameError,
    },
}

impl Parsed {
    /// An error that names no field.
    pub fn error(reason: FrameError) -> Self {
        Parsed::Error {
            fields: Vec::new(),
            reason,
        }
    }
}

/// Parses a text value: integer, float, boolean, else text.
pub fn parse_scalar(s: &str) -> Value {
    let t = s.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Value::Int(i);
    }
    if let Ok(f) = t.parse::<f64>() {
        return Value::Float(f);
    }
    match t {
        "true" | "TRUE" | "True" => Value::Bool(true),
        "false" | "FALSE" | "False" => Value::Bool(false),
        _ => Value::Text(t.to_string()),
    }
}
