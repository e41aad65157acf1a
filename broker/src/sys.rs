//! Broker statistics and their `$SYS/broker/...` topics.

/// Counters kept by the core.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Application messages accepted from any publisher.
    pub messages_received: u64,
    /// Deliveries handed to subscribers.
    pub messages_sent: u64,
    /// Payload bytes accepted.
    pub bytes_received: u64,
    /// In-process publishes.
    pub local_publishes: u64,
    /// Successful CONNECTs.
    pub connects: u64,
    /// Wills published.
    pub wills: u64,
    /// Messages dropped because a session queue was full.
    pub dropped_queue_full: u64,
    /// QoS 0 messages dropped for a client that did not keep up.
    pub dropped_slow_client: u64,
    /// Messages not sent because they exceed the client's Maximum Packet Size.
    pub dropped_too_large: u64,
    /// Messages an in-process subscriber (sensor commands, bridge downlink) had no room for.
    pub dropped_local: u64,
    /// What the configured bounds refused, each counted where it bit.
    pub limits: LimitCounters,
}

/// Refusals by the broker's bounds (`$SYS/broker/limits/...`).
#[derive(Debug, Default, Clone)]
pub struct LimitCounters {
    /// Topic names and filters deeper than `max_topic_levels` or longer than
    /// `max_topic_length`.
    pub topic_levels: u64,
    /// CONNECTs refused by `max_sessions`.
    pub sessions: u64,
    /// Filters refused by `max_subscriptions_per_client`.
    pub subscriptions: u64,
    /// Retained messages not kept because of `max_retained_messages`/`_bytes`.
    pub retained: u64,
    /// Messages not queued for a session because of `max_queued_bytes`.
    pub queued_bytes: u64,
}

/// Everything `$SYS/broker/...` reports, taken at one instant by the core. The `$SYS`
/// publisher and the gateway's HTTP side both read this, so the numbers agree.
#[derive(Debug, Default, Clone)]
pub struct SysSnapshot {
    /// Time since the core started.
    pub uptime: std::time::Duration,
    /// Sessions with a network connection.
    pub clients_connected: u64,
    /// Sessions, connected or kept for a persistent client.
    pub clients_total: u64,
    /// Subscriptions in the tree.
    pub subscriptions: u64,
    /// Retained messages kept.
    pub retained_messages: u64,
    /// Bytes of retained messages kept.
    pub retained_bytes: u64,
    /// The core's counters.
    pub stats: Stats,
    /// Store batches that failed to write.
    pub store_failed_writes: u64,
    /// Deliveries to persistent sessions written to the store.
    pub store_messages_written: u64,
    /// Messages the store refused.
    pub store_refused: u64,
    /// Transactions the store committed.
    pub store_commits: u64,
    /// The store refuses what it would keep.
    pub store_refusing: bool,
    /// Connections refused by `max_connections`.
    pub refused_connections: u64,
    /// Connections refused by `max_connections_per_address`.
    pub refused_connections_per_address: u64,
    /// CONNECT packets over `max_connect_size`.
    pub connect_too_large: u64,
    /// Packets over `max_packet_size`.
    pub packet_too_large: u64,
    /// Connections closed for a packet that did not arrive in time.
    pub packet_timeouts: u64,
}

impl SysSnapshot {
    /// `$SYS/broker/{name}` and value pairs.
    pub fn entries(&self) -> Vec<(&'static str, String)> {
        let st = &self.stats;
        vec![
            ("version", format!("outpost {}", env!("CARGO_PKG_VERSION"))),
            ("uptime", format!("{} seconds", self.uptime.as_secs())),
            ("clients/connected", self.clients_connected.to_string()),
            ("clients/total", self.clients_total.to_string()),
            ("subscriptions/count", self.subscriptions.to_string()),
            (
                "retained messages/count",
                self.retained_messages.to_string(),
            ),
            ("messages/received", st.messages_received.to_string()),
            ("messages/sent", st.messages_sent.to_string()),
            ("load/bytes/received", st.bytes_received.to_string()),
            (
                "messages/dropped/queue_full",
                st.dropped_queue_full.to_string(),
            ),
            (
                "messages/dropped/slow_client",
                st.dropped_slow_client.to_string(),
            ),
            ("messages/dropped/local", st.dropped_local.to_string()),
            (
                "messages/dropped/too_large",
                st.dropped_too_large.to_string(),
            ),
            // Batches the broker store could not write (disk full, failing card): what
            // they held is kept in memory only.
            ("store/failed_writes", self.store_failed_writes.to_string()),
            // Messages owed to persistent sessions that had to be written (queued, or
            // unacknowledged past the grace period): what persistence costs the disk.
            (
                "store/messages_written",
                self.store_messages_written.to_string(),
            ),
            // Transactions committed: messages written over this is what the commit window
            // (broker.commit_window) saves the card.
            ("store/commits", self.store_commits.to_string()),
            ("retained messages/bytes", self.retained_bytes.to_string()),
            // What the configured bounds refused (broker.max_*), one counter per bound.
            ("limits/topic_levels", st.limits.topic_levels.to_string()),
            ("limits/sessions", st.limits.sessions.to_string()),
            ("limits/subscriptions", st.limits.subscriptions.to_string()),
            ("limits/retained", st.limits.retained.to_string()),
            ("limits/queued_bytes", st.limits.queued_bytes.to_string()),
            ("limits/connections", self.refused_connections.to_string()),
            (
                "limits/connections_per_address",
                self.refused_connections_per_address.to_string(),
            ),
            ("limits/connect_size", self.connect_too_large.to_string()),
            ("limits/packet_size", self.packet_too_large.to_string()),
            ("limits/packet_timeout", self.packet_timeouts.to_string()),
            // Messages the store refused (full disk or broker.max_store_size).
            ("store/refused", self.store_refused.to_string()),
            // Set while the broker store cannot write and refuses what it would keep.
            ("store/refusing", u8::from(self.store_refusing).to_string()),
        ]
    }
}
