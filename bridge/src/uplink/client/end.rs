//! How a session ends, and which DISCONNECT reasons from the cloud may be about a message
//! (and so count against the row in flight) rather than about the link.

use outpost_mqtt::ReasonCode;

/// How a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// Shutdown was requested and the goodbye was sent.
    Shutdown,
    /// The link failed in a way no message can cause (keep alive, spool, protocol errors);
    /// reconnect.
    Lost(String),
    /// The cloud closed or reset an established link, or sent DISCONNECT; reconnect.
    Dropped {
        /// What happened.
        why: String,
        /// The row to blame (see `Client::suspect`).
        suspect: Option<i64>,
        /// When rows were out unacknowledged: the newest row sent in this session.
        out_through: Option<i64>,
        /// A QoS 2 PUBLISH was out and the cloud had answered none with PUBREC in this
        /// session: what a cloud without QoS 2 does (RabbitMQ, AWS IoT, Mosquitto's
        /// `max_qos 1` towards 3.1.1 clients), which 3.1.1 has no other way to say.
        qos2_unanswered: bool,
    },
}

/// The link failed for a reason no message can cause.
pub(crate) fn lost(why: impl Into<String>) -> SessionEnd {
    SessionEnd::Lost(why.into())
}

/// The cloud dropped the link; nobody is blamed yet (see `Client::on_drop`).
pub(crate) fn dropped(why: impl Into<String>) -> SessionEnd {
    SessionEnd::Dropped {
        why: why.into(),
        suspect: None,
        out_through: None,
        qos2_unanswered: false,
    }
}

/// False for DISCONNECT reasons that say the link itself is unwelcome (server busy or
/// going away, session taken over, keep alive, rate limits): such a loss never counts
/// against the message in flight. Unknown and message-level reasons may be about it.
pub(super) fn may_be_about_a_message(reason: ReasonCode) -> bool {
    !matches!(
        reason,
        ReasonCode::NORMAL_DISCONNECTION
            | ReasonCode::SERVER_UNAVAILABLE
            | ReasonCode::SERVER_BUSY
            | ReasonCode::BANNED
            | ReasonCode::SERVER_SHUTTING_DOWN
            | ReasonCode::KEEP_ALIVE_TIMEOUT
            | ReasonCode::SESSION_TAKEN_OVER
            | ReasonCode::MESSAGE_RATE_TOO_HIGH
            | ReasonCode::ADMINISTRATIVE_ACTION
            | ReasonCode::USE_ANOTHER_SERVER
            | ReasonCode::SERVER_MOVED
            | ReasonCode::CONNECTION_RATE_EXCEEDED
            | ReasonCode::MAXIMUM_CONNECT_TIME
    )
}
