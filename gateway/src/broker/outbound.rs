//! What the broker core asks a connection's writer task to send.
//!
//! The core never waits on a client: it pushes onto an unbounded queue and the writer
//! encodes and writes at the client's pace. QoS 1/2 traffic is bounded by the inflight
//! window; QoS 0 traffic is bounded by counting the bytes queued per connection and
//! dropping (and counting) QoS 0 messages for a client that does not keep up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::future::BoxFuture;
use outpost_mqtt::{Packet, ReasonCode};
use tokio::sync::mpsc;

use super::session::Delivery;

/// Bytes of QoS 0 payload that may wait for one slow client before new QoS 0 messages
/// for it are dropped.
pub const QOS0_BACKLOG_LIMIT: usize = 8 << 20;

/// Result of making a message durable before acknowledging it.
pub type DurableResult = Result<(), super::Rejected>;

/// Which acknowledgement of the PUBLISH exchanges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // named after the packets
pub enum AckKind {
    /// PUBACK (QoS 1).
    PubAck,
    /// PUBREC (QoS 2, first half).
    PubRec,
    /// PUBREL (QoS 2, second half).
    PubRel,
    /// PUBCOMP (QoS 2 end).
    PubComp,
}

/// A compact PUBACK/PUBREC/PUBREL/PUBCOMP: these are per message, so they travel as a
/// few bytes instead of a full `Packet` with its properties.
#[derive(Debug, Clone)]
pub struct Ack {
    /// Which packet.
    pub kind: AckKind,
    /// Packet identifier.
    pub packet_id: u16,
    /// Reason code (5.0).
    pub reason: ReasonCode,
    /// Reason string (5.0), only on failures.
    pub reason_string: Option<Box<str>>,
}

impl Ack {
    /// A successful acknowledgement.
    pub fn new(kind: AckKind, packet_id: u16) -> Ack {
        Ack {
            kind,
            packet_id,
            reason: ReasonCode::SUCCESS,
            reason_string: None,
        }
    }

    /// The packet to encode.
    pub fn to_packet(&self) -> Packet {
        let r = outpost_mqtt::PubResponse {
            packet_id: self.packet_id,
            reason: self.reason,
            properties: outpost_mqtt::Properties {
                reason_string: self.reason_string.as_deref().map(str::to_owned),
                ..Default::default()
            },
        };
        match self.kind {
            AckKind::PubAck => Packet::PubAck(r),
            AckKind::PubRec => Packet::PubRec(r),
            AckKind::PubRel => Packet::PubRel(r),
            AckKind::PubComp => Packet::PubComp(r),
        }
    }
}

/// One item for a connection writer.
pub enum Outbound {
    /// An acknowledgement of the PUBLISH exchanges, sent in queue order.
    Ack(Ack),
    /// PINGRESP.
    PingResp,
    /// A rarer control packet (CONNACK, SUBACK, UNSUBACK), boxed to keep queue slots small.
    Control(Box<Packet>),
    /// An acknowledgement (PUBACK or PUBREC) that may only go out once `wait` resolves;
    /// acknowledgements behind it wait too, so they leave in the order PUBLISHes came in
    /// (MQTT-4.6.0-2). The closure builds the ack from the outcome (a reason code on
    /// rejection, or nothing at all for 3.x).
    AckAfter {
        /// Completes when every durable sink has committed the message.
        wait: BoxFuture<'static, DurableResult>,
        /// Builds the packet to send from the outcome; `None` sends nothing.
        ack: Box<dyn FnOnce(DurableResult) -> Option<Ack> + Send>,
    },
    /// An application message for the client.
    Publish {
        /// Message, QoS, retain and subscription ids.
        delivery: Delivery,
        /// Packet identifier for QoS 1/2.
        packet_id: Option<u16>,
        /// DUP flag (retransmission on session resume).
        dup: bool,
    },
    /// Close the connection, sending DISCONNECT with this reason first on 5.0.
    Disconnect(ReasonCode),
    /// Close the connection without sending anything more (after a refusing CONNACK).
    Close,
}

/// The sending side of a connection's outbound queue with a QoS 0 byte budget.
#[derive(Clone)]
pub struct OutboundTx {
    tx: mpsc::UnboundedSender<Outbound>,
    backlog: Arc<AtomicUsize>,
}

/// The writer's side.
pub struct OutboundRx {
    rx: mpsc::UnboundedReceiver<Outbound>,
    backlog: Arc<AtomicUsize>,
}

/// A new outbound queue.
pub fn channel() -> (OutboundTx, OutboundRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(AtomicUsize::new(0));
    (
        OutboundTx {
            tx,
            backlog: backlog.clone(),
        },
        OutboundRx { rx, backlog },
    )
}

impl OutboundTx {
    /// Queues an item; false if the connection is gone.
    pub fn send(&self, item: Outbound) -> bool {
        if let Some(size) = qos0_size(&item) {
            self.backlog.fetch_add(size, Ordering::Relaxed);
        }
        self.tx.send(item).is_ok()
    }

    /// Queues a QoS 0 delivery unless the client is too far behind; false if dropped.
    pub fn send_qos0(&self, delivery: Delivery) -> bool {
        let size = delivery.msg.payload.len() + delivery.msg.topic.len();
        if self.backlog.load(Ordering::Relaxed) + size > QOS0_BACKLOG_LIMIT {
            return false;
        }
        self.send(Outbound::Publish {
            delivery,
            packet_id: None,
            dup: false,
        })
    }
}

impl OutboundRx {
    /// Next item, or `None` when every sender is gone.
    pub async fn recv(&mut self) -> Option<Outbound> {
        self.rx.recv().await.inspect(|i| self.account(i))
    }

    /// Next item if one is ready now.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.rx.try_recv().ok().inspect(|i| self.account(i))
    }

    fn account(&self, item: &Outbound) {
        if let Some(size) = qos0_size(item) {
            self.backlog.fetch_sub(size, Ordering::Relaxed);
        }
    }
}

/// The bytes a QoS 0 delivery counts against the backlog budget; `None` for anything else.
fn qos0_size(item: &Outbound) -> Option<usize> {
    match item {
        Outbound::Publish {
            delivery,
            packet_id: None,
            ..
        } => Some(delivery.msg.payload.len() + delivery.msg.topic.len()),
        _ => None,
    }
}
