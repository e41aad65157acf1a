//! How a session ends, and which DISCONNECT reasons from the cloud may be about a message
//! (and so count against the row in flight) rather than about the link.

use std::collections::HashSet;

use outpost_mqtt::{Disconnect, Packet, Properties, ReasonCode};

use super::Client;

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

/// The cloud dropped the link; nobody is blamed yet (see `Client::handle_drop`).
pub(crate) fn dropped(why: impl Into<String>) -> SessionEnd {
    SessionEnd::Dropped {
        why: why.into(),
        suspect: None,
        out_through: None,
        qos2_unanswered: false,
    }
}

/// The session end for a DISCONNECT from the cloud: a drop that may blame the row in
/// flight, or a loss when the reason is about the link.
pub(super) fn disconnected(d: Disconnect) -> SessionEnd {
    let why = format!(
        "cloud sent DISCONNECT (reason 0x{:02x}{})",
        d.reason.0,
        d.properties
            .reason_string
            .map(|s| format!(": {s}"))
            .unwrap_or_default()
    );
    if may_be_about_a_message(d.reason) {
        dropped(why)
    } else {
        lost(why)
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

impl Client<'_> {
    /// The cloud broke the protocol (`why`): on 5.0 a DISCONNECT with `reason` goes into
    /// the write buffer for the driver to flush before it closes the link, so the cloud's
    /// log says what it did wrong. The link is lost, not dropped: no message is to blame.
    pub(super) fn protocol_error(&mut self, reason: ReasonCode, why: String) -> SessionEnd {
        if self.setup.protocol.is_v5() {
            self.farewell = self
                .encode(&Packet::Disconnect(Disconnect {
                    reason,
                    properties: Properties::default(),
                }))
                .is_ok();
        }
        lost(why)
    }

    /// How the session ends when the cloud dropped the link: `why`, with the row to blame
    /// and what was out.
    pub(super) fn drop_end(&self, why: String) -> SessionEnd {
        SessionEnd::Dropped {
            why,
            suspect: self.suspect(),
            out_through: self.rows_out().then_some(self.careful.newest_sent()),
            qos2_unanswered: !self.pubrec_seen && self.qos2_out(),
        }
    }

    /// The row to blame for the cloud dropping the link: the oldest one whose PUBLISH went
    /// out unacknowledged. Only that one, on purpose: the cloud handles packets in order, so
    /// rows before it were accepted, and rows behind it were most likely never read; blaming
    /// the whole window would set innocent messages aside, while one suspect per loss keeps
    /// "the same row at N consecutive losses" meaningful.
    ///
    /// Nobody is blamed while a status message (sent first in every session) is still
    /// unacknowledged: a cloud that refuses our status topic by disconnecting must not
    /// cost us the messages behind it. And since a cloud may drop us without sending the
    /// acknowledgements of what it accepted (Mosquitto does), the oldest row of a full
    /// window can be innocent: that is why, when the same row is blamed at two drops in a
    /// row, the rows that were out are resent one at a time behind a ping barrier
    /// ([`Client::must_wait`]), which makes the next blame exact. An innocent row blamed
    /// once is acknowledged then, and the count starts over.
    fn suspect(&self) -> Option<i64> {
        self.inflight.suspect(&self.unsent_rows())
    }

    /// True when a QoS 2 PUBLISH went on the wire and has no answer.
    fn qos2_out(&self) -> bool {
        self.inflight.qos2_out(&self.unsent_rows())
    }

    /// Rows given a window slot whose PUBLISH still waits for its stage commit.
    fn unsent_rows(&self) -> HashSet<i64> {
        self.staging.unsent_rows()
    }
}
