//! `outpost-mqtt`: the MQTT protocol without I/O.
//!
//! Packets of MQTT 3.1, 3.1.1 and 5.0 ([`packet`]), their properties ([`properties`]) and
//! reason codes ([`reason`]), a strict codec that turns bytes into packets and back
//! ([`codec`]), and topic name and filter rules with matching ([`topic`]). Nothing here
//! touches a socket, so the broker, the bridge's client side and the load generator
//! share one implementation that is tested and fuzzed on its own.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod error;
pub mod packet;
pub mod properties;
pub mod reason;
pub mod topic;

pub use codec::{decode, encode, encoded_len};
pub use error::{DecodeError, EncodeError};
pub use packet::*;
pub use properties::Properties;
pub use reason::ReasonCode;
