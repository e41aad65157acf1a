//! Broker settings resolved from the config file, in the units the hot path wants.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    /// What individual listeners decide for themselves (`per_listener_settings`).
    pub listener_rules: Vec<ListenerRules>,
    /// In a listener's own copy: that listener (its configured address), whose
    /// [`ListenerRules`] apply to its clients.
    pub listener: Option<SocketAddr>,
    /// In a listener's own copy: the client certificate names the user.
    pub identity_as_username: bool,
}

/// Anonymous access and topic rules of one listener.
#[derive(Debug, Clone)]
pub struct ListenerRules {
    /// The listener's configured address (its identity across reloads).
    pub bind: SocketAddr,
    /// Anonymous clients may connect here.
    pub allow_anonymous: bool,
    /// Topic rules of this listener's clients; `None` uses the broker's.
    pub acl: Option<Vec<AclRule>>,
    /// The client certificate's Common Name is the user name.
    pub identity_as_username: bool,
}

/// The settings a new connection starts with; a reload replaces them. A connection keeps
/// the settings it was accepted with, so only logins after a reload see new users; the
/// core re-resolves the topic rules of connected clients itself.
#[derive(Clone)]
pub struct SharedSettings(Arc<std::sync::RwLock<Arc<Resolved>>>);

/// The broker's settings and each listener's copy of them.
struct Resolved {
    global: Arc<Settings>,
    per_listener: Vec<(SocketAddr, Arc<Settings>)>,
}

impl Resolved {
    fn new(global: Arc<Settings>) -> Arc<Resolved> {
        let per_listener = global
            .listener_rules
            .iter()
            .map(|r| (r.bind, global.for_listener(r.bind)))
            .collect();
        Arc::new(Resolved {
            global,
            per_listener,
        })
    }
}

impl SharedSettings {
    /// Wraps the settings of the first start.
    pub fn new(s: Arc<Settings>) -> SharedSettings {
        SharedSettings(Arc::new(std::sync::RwLock::new(Resolved::new(s))))
    }

    fn resolved(&self) -> Arc<Resolved> {
        // A poisoned lock only means a panic elsewhere while replacing an Arc; the value
        // inside is still whole.
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The current settings (read once per accepted connection, never per message).
    pub fn get(&self) -> Arc<Settings> {
        self.resolved().global.clone()
    }

    /// The current settings for a connection accepted by the listener configured at
    /// `bind`.
    pub fn get_for(&self, bind: SocketAddr) -> Arc<Settings> {
        let r = self.resolved();
        r.per_listener
            .iter()
            .find(|(b, _)| *b == bind)
            .map_or_else(|| r.global.clone(), |(_, s)| s.clone())
    }

    pub(crate) fn set(&self, s: Arc<Settings>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Resolved::new(s);
    }
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
            listener_rules: c
                .listeners
                .iter()
                .map(|l| ListenerRules {
                    bind: l.bind,
                    allow_anonymous: c.anonymous_allowed_on(l),
                    acl: l.acl.clone(),
                    identity_as_username: l.use_identity_as_username && l.tls.is_some(),
                })
                .collect(),
            listener: None,
            identity_as_username: false,
        }
    }

    /// The topic rules for a client of `listener` (`None`: the broker's own).
    pub fn acl_for(&self, listener: Option<SocketAddr>) -> &[AclRule] {
        listener
            .and_then(|b| self.listener_rules.iter().find(|r| r.bind == b))
            .and_then(|r| r.acl.as_deref())
            .unwrap_or(&self.acl)
    }

    /// The copy a listener's connections use: the same settings with that listener's
    /// anonymous access and identity. Shares `self` when the listener overrides nothing.
    fn for_listener(self: &Arc<Settings>, bind: SocketAddr) -> Arc<Settings> {
        match self.listener_rules.iter().find(|r| r.bind == bind) {
            Some(r)
                if r.allow_anonymous != self.allow_anonymous
                    || r.acl.is_some()
                    || r.identity_as_username =>
            {
                let mut s = Settings::clone(self);
                s.allow_anonymous = r.allow_anonymous;
                s.identity_as_username = r.identity_as_username;
                s.listener = Some(bind);
                Arc::new(s)
            }
            _ => self.clone(),
        }
    }
}
