//! Error types of the sensor layer.

use thiserror::Error;

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
