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
