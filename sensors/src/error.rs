//! Error types of the sensor layer.

use std::sync::Arc;

use thiserror::Error;
use tokio_modbus::ExceptionCode;

use crate::point::DecodeError;

/// A semantic configuration error; `path` names the offending key (e.g. `sensors.modbus[0].points[2].address`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Key path of the offending value.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// Builds an error for `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Errors that stop the sensor layer as a whole.
#[derive(Debug, Error)]
pub enum SensorsError {
    /// The configuration failed validation.
    #[error("invalid sensors configuration: {0}")]
    Config(#[from] ConfigError),
    /// The channel to the gateway closed while the layer was running.
    #[error("the gateway closed the sensor message channel")]
    OutputClosed,
    /// A worker task failed unexpectedly.
    #[error("sensor task failed: {0}")]
    Task(String),
}

/// A value outside the point's configured `min`/`max`.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
#[error("out of range: {0}")]
pub struct OutOfRange(pub f64);

/// Why a Modbus request got no answer after its retries; the device's error and the
/// quality reason of its points.
#[derive(Debug, Clone, Error)]
pub enum LinkError {
    /// No attempt was made (a request with no tries left; not expected in practice).
    #[error("no attempt")]
    NoAttempt,
    /// The TCP connection or the serial port could not be opened.
    #[error("connect failed: {0}")]
    Connect(Arc<std::io::Error>),
    /// The device (or a gateway in front of it) closed the TCP connection.
    #[error("connection closed by device")]
    ClosedByDevice,
    /// The serial port went away (unplugged adapter).
    #[error("serial port closed")]
    SerialPortClosed,
    /// The device reset the TCP connection.
    #[error("connection reset by device")]
    ResetByDevice,
    /// Another I/O error on the link.
    #[error("transport error: {0}")]
    Transport(Arc<std::io::Error>),
    /// A response for another unit or function (tokio-modbus's protocol error).
    #[error("unexpected response (wrong unit or function)")]
    WrongResponse,
    /// No response within the device's `timeout`.
    #[error("timeout")]
    Timeout,
}

/// Why one field of a serial frame has no value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FieldError {
    /// A JSON `null`.
    #[error("null")]
    Null,
    /// An empty NMEA field.
    #[error("empty field")]
    EmptyField,
    /// An empty CSV cell or `key=` pair.
    #[error("empty value")]
    EmptyValue,
    /// A field that should be a number and is not.
    #[error("unparsable {0:?}")]
    Unparsable(String),
    /// An NMEA position without a fix (empty coordinate).
    #[error("no fix")]
    NoFix,
    /// An NMEA coordinate that is not a number.
    #[error("unparsable coordinate {0:?}")]
    UnparsableCoordinate(String),
    /// An NMEA coordinate whose minutes are not below 60.
    #[error("bad minutes in {0:?}")]
    BadMinutes(String),
    /// An NMEA coordinate beyond 90 (latitude) or 180 (longitude) degrees.
    #[error("coordinate out of range {0:?}")]
    CoordinateOutOfRange(String),
    /// An NMEA hemisphere other than N, S, E or W.
    #[error("bad hemisphere {0:?}")]
    BadHemisphere(String),
    /// An RMC status other than A or V.
    #[error("bad status {0:?}")]
    BadStatus(String),
}

/// Why a whole serial frame is unusable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The bytes are not UTF-8.
    #[error("frame is not UTF-8 text")]
    NotUtf8,
    /// A line longer than the sensor's `frame_length`.
    #[error(
        "line longer than frame_length = {0} bytes; dropped (raise frame_length if the device \
         sends longer lines)"
    )]
    TooLong(usize),
    /// A JSON line that parses to something other than an object.
    #[error("JSON line is not an object")]
    JsonNotObject,
    /// A line that is not JSON (the parser's message, the line shortened).
    #[error("invalid JSON ({error}): {line:?}")]
    InvalidJson {
        /// serde_json's message.
        error: String,
        /// The line, shortened.
        line: String,
    },
    /// A key=value line without a single pair (the line shortened).
    #[error("unparsable line: {0:?}")]
    UnparsableLine(String),
    /// A CSV record with the wrong number of cells.
    #[error("expected {expected} columns, got {got}: {line:?}")]
    Columns {
        /// Configured columns.
        expected: usize,
        /// Cells in the record.
        got: usize,
        /// The line, shortened.
        line: String,
    },
    /// A line that does not start with `$` or `!`.
    #[error("not an NMEA sentence")]
    NotNmea,
    /// A checksum that is not two hex digits.
    #[error("malformed checksum {0:?}")]
    MalformedChecksum(String),
    /// A checksum that does not match the sentence.
    #[error("bad checksum: expected {expected:02X}, computed {actual:02X}")]
    BadChecksum {
        /// The checksum the sentence carries.
        expected: u8,
        /// The checksum of what arrived.
        actual: u8,
    },
    /// No checksum, and `allow_missing_checksum` is off.
    #[error("missing checksum")]
    MissingChecksum,
}

/// Why a point has no good value now; published as its reading's quality reason.
#[derive(Debug, Clone, Error)]
pub enum ReadingError {
    /// Outside `min`/`max`.
    #[error(transparent)]
    OutOfRange(#[from] OutOfRange),
    /// The device answered with a Modbus exception.
    #[error("exception: {0}")]
    Exception(ExceptionCode),
    /// The device did not answer.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// A read answered with a response of another kind (its debug text).
    #[error("unexpected response {0}")]
    UnexpectedResponse(String),
    /// Fewer coils or inputs than asked for.
    #[error("short response")]
    ShortResponse,
    /// The registers do not decode into a value.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The serial field has no value.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// The serial frame carrying the field is unusable.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A field that was numeric before sent something else (the value, quoted).
    #[error("not a number: {0}")]
    NotANumber(String),
    /// The serial device went away.
    #[error("device disconnected")]
    Disconnected,
}

/// Why a command payload (`.../set`) cannot be read as a value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CommandError {
    /// The payload is not UTF-8.
    #[error("payload is not UTF-8")]
    NotUtf8,
    /// The payload is empty.
    #[error("empty payload")]
    Empty,
    /// A JSON object without `value`.
    #[error("object payload needs a \"value\" key")]
    NoValueKey,
    /// A JSON number that fits none of i64, u64, f64.
    #[error("unrepresentable number")]
    UnrepresentableNumber,
    /// A JSON array, object or null as the value.
    #[error("value must be a number, boolean or string")]
    BadValueType,
}

#[cfg(test)]
mod tests {
    use super::*;

    // These texts are published as quality reasons and device errors, which dashboards
    // and alert rules match on: the typed errors must read as the old strings did.
    #[test]
    fn reasons_read_as_published_before() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let cases: [(ReadingError, &str); 6] = [
            (OutOfRange(120.5).into(), "out of range: 120.5"),
            (
                ReadingError::Exception(ExceptionCode::IllegalDataAddress),
                "exception: Illegal data address",
            ),
            (LinkError::Timeout.into(), "timeout"),
            (
                LinkError::Connect(Arc::new(refused)).into(),
                "connect failed: connection refused",
            ),
            (
                FieldError::Unparsable("x1".into()).into(),
                "unparsable \"x1\"",
            ),
            (
                FrameError::BadChecksum {
                    expected: 0x4A,
                    actual: 0x0b,
                }
                .into(),
                "bad checksum: expected 4A, computed 0B",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
    }
}
