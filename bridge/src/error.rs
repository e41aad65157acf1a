//! Error types of the bridge.

use std::path::PathBuf;

use outpost_mqtt::ReasonCode;

/// A configuration problem found before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that parses but makes no sense.
    #[error("{0}")]
    Invalid(String),
}

/// A spool (SQLite) failure.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// SQLite reported an error.
    #[error("spool {path}: {source}")]
    Sqlite {
        /// The spool file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// A file operation around the spool failed (directory creation, quarantine).
    #[error("spool {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The spool writer thread has stopped.
    #[error("spool writer stopped")]
    Closed,
}

impl From<outpost_sqlite::OpenError> for SpoolError {
    fn from(e: outpost_sqlite::OpenError) -> SpoolError {
        match e {
            outpost_sqlite::OpenError::Sqlite { path, source } => {
                SpoolError::Sqlite { path, source }
            }
            outpost_sqlite::OpenError::Io { path, source } => SpoolError::Io { path, source },
        }
    }
}

/// Why `start` failed.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The spool could not be opened.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// TLS material could not be loaded.
    #[error("tls: {0}")]
    Tls(String),
    /// The bridge was shut down (or its uplink task failed) before it could be changed.
    #[error("the bridge has stopped")]
    Stopped,
}

/// Why an offered message was not taken into the spool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// The spool is at `max_bytes` under `when_full = "reject-new"` (or one message is
    /// larger than the whole bound).
    #[error("the spool is full (when_full = \"reject-new\")")]
    SpoolFull,
    /// SQLite could not commit (disk full, I/O error, corruption); the text says which.
    #[error("the spool could not commit: {0}")]
    Storage(String),
    /// The bridge is shutting down.
    #[error("the bridge is shutting down")]
    ShuttingDown,
}

/// An offered message that the spool refused; the publisher must not get a success ack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bridge spool rejected the message: {reason}")]
pub struct Rejected {
    /// Why.
    pub reason: RejectReason,
}

impl Rejected {
    /// Reason code for a 5.0 PUBACK/PUBREC: 0x97 Quota exceeded when full, 0x80 otherwise.
    pub fn reason_code(&self) -> ReasonCode {
        match self.reason {
            RejectReason::SpoolFull => ReasonCode::QUOTA_EXCEEDED,
            RejectReason::Storage(_) => ReasonCode::UNSPECIFIED_ERROR,
            RejectReason::ShuttingDown => ReasonCode::SERVER_SHUTTING_DOWN,
        }
    }
}
