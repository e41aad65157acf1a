//! What a session's client is given: the link's configuration and what the cloud
//! announced in CONNACK.

use std::time::Duration;

use outpost_mqtt::{Protocol, QoS};

use crate::rules::Rules;
use crate::stats::BridgeStats;
use crate::status::Status;

/// Limits the cloud announced in CONNACK, combined with configuration.
pub(crate) struct Limits {
    pub window: usize,
    pub max_qos: QoS,
    pub max_packet: usize,
    pub retain_available: bool,
    pub keep_alive: Duration,
    pub session_present: bool,
    /// A fresh session at another broker than the spool's QoS 2 stages were made with.
    pub moved: bool,
    /// The cloud's Topic Alias Maximum from CONNACK (0: none; always 0 on 3.1.1).
    pub topic_alias_max: u16,
}

/// What the client reads from the link's configuration; borrowed for one session.
pub(crate) struct Setup<'a> {
    /// The bridge's name, for logs.
    pub name: &'a str,
    /// MQTT version of the link.
    pub protocol: Protocol,
    /// Topic rules: downlink mapping and the cloud subscriptions.
    pub rules: &'a Rules,
    /// The status messages (birth, clean offline), when `status.enabled`.
    pub status: Option<&'a Status>,
    /// Spooled messages from before this session per second (0: no limit).
    pub replay_rate: u32,
    /// Counters (forwarded, dropped, the window shown in `$SYS`).
    pub stats: &'a BridgeStats,
}
