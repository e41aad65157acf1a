//! Broker settings resolved from the config file, in the units the hot path wants.

use std::sync::Arc;
use std::time::Duration;

use super::deadlines::Deadlines;
use super::limits::ConnectionLimits;

use crate::auth::Users;
use crate::config::{AclRule, BrokerConfig};

/// Resolved broker settings shared by the core and every connection.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Accept clients without credentials.
    pub allow_anonymous: bool,
    /// Users and their password hashes.
    pub users: Users,
    /// Topic access rules; empty allows everything.
    pub acl: Vec<AclRule>,
    /// CONNECT deadline after accept.
    pub connect_timeout: Duration,
    /// Cap on 5.0 keep alive (Server Keep Alive).
    pub max_keepalive: u16,
    /// Largest inbound packet.
    pub max_packet_size: usize,
    /// Our Receive Maximum.
    pub receive_maximum: u16,
    /// Outbound inflight cap per client.
    pub max_inflight: u16,
    /// Queue bound per session.
    pub max_queued_messages: usize,
    /// Queue QoS 0 for offline sessions.
    pub queue_qos0: bool,
    /// Our Topic Alias Maximum.
    pub topic_alias_maximum: u16,
    /// Cap on session expiry, seconds.
    pub max_session_expiry: Option<u32>,
    /// Most levels in a topic name or filter; 0 for no limit.
    pub max_topic_levels: usize,
    /// Longest topic name or filter in bytes.
    pub max_topic_length: usize,
    /// Largest CONNECT (the first packet).
    pub max_connect_size: usize,
    /// Time to finish a packet once its first byte came.
    pub packet_timeout: Duration,
    /// Sessions in all; 0 for no limit.
    pub max_sessions: usize,
    /// Subscriptions per session; 0 for no limit.
    pub max_subscriptions_per_client: usize,
    /// Retained topics; 0 for no limit.
    pub max_retained_messages: usize,
    /// Retained payload bytes; 0 for no limit.
    pub max_retained_bytes: u64,
    /// Queued bytes per session.
    pub max_queued_bytes: usize,
    /// Open connections, in all and per address.
    pub connections: Arc<ConnectionLimits>,
    /// `$SYS` publish interval; zero disables.
    pub sys_interval: Duration,
    /// Keep-alive and close deadlines of this broker's connections.
    pub deadlines: Arc<Deadlines>,
}

impl Settings {
    /// Resolves a `[broker]` table.
    pub fn from_config(c: &BrokerConfig) -> Settings {
        Settings {
            allow_anonymous: c.anonymous_allowed(),
            users: Users::from_config(c),
            acl: c.acl.clone(),
            connect_timeout: c.connect_timeout,
            max_keepalive: c.max_keepalive,
            max_packet_size: usize::try_from(c.max_packet_size.0).unwrap_or(usize::MAX),
            receive_maximum: c.receive_maximum,
            max_inflight: c.max_inflight,
            max_queued_messages: c.max_queued_messages,
            queue_qos0: c.queue_qos0,
            topic_alias_maximum: c.topic_alias_maximum,
            max_session_expiry: c
                .max_session_expiry
                .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
            max_topic_levels: c.max_topic_levels,
            max_topic_length: c.max_topic_length,
            max_connect_size: usize::try_from(c.max_connect_size.0)
                .unwrap_or(usize::MAX)
                .min(usize::try_from(c.max_packet_size.0).unwrap_or(usize::MAX)),
            packet_timeout: c.packet_timeout,
            max_sessions: c.max_sessions,
            max_subscriptions_per_client: c.max_subscriptions_per_client,
            max_retained_messages: c.max_retained_messages,
            max_retained_bytes: c.max_retained_bytes.0,
            max_queued_bytes: usize::try_from(c.max_queued_bytes.0).unwrap_or(usize::MAX),
            connections: ConnectionLimits::new(c.max_connections, c.max_connections_per_address),
            sys_interval: c.sys_interval,
            deadlines: Deadlines::new(),
        }
    }
}
