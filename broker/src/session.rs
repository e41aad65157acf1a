//! Per-client session state: subscriptions, messages in flight, the offline queue, and
//! the QoS 2 packet identifiers awaiting PUBREL.
//!
//! A session outlives its network connection when the client asked for that (3.1.1
//! clean session off, 5.0 session expiry above zero), which is why this state lives in
//! the broker core and not in the connection task.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use outpost_mqtt::{Protocol, Will};

use super::message::{Delivery, Message};
use super::outbound::OutboundTx;
use crate::store::DeliveryId;

/// Longest client identifier kept inside the session itself.
const INLINE_ID: usize = 22;

/// A client identifier, kept inside its session: one that fits (22 bytes; MQTT-3.1.3-5
/// has servers accept 1 to 23, and most ids are shorter) costs no allocation of its own.
/// As an `Arc<str>` a 16-character id was a 48-byte heap chunk per client beside the
/// session, a tenth of what an idle client costs; inline it makes the session 8 bytes
/// longer within the same 128-byte chunk.
#[derive(Clone, PartialEq, Eq)]
pub enum ClientId {
    /// Up to [`INLINE_ID`] bytes, always valid UTF-8 (written only from a `&str`).
    Inline {
        /// Bytes used in `bytes`.
        len: u8,
        /// The identifier, then zeros.
        bytes: [u8; INLINE_ID],
    },
    /// A longer identifier.
    Heap(Box<str>),
}

impl ClientId {
    /// The identifier as a string.
    pub fn as_str(&self) -> &str {
        match self {
            // Valid by construction (a prefix of a `&str` that ends on its end), so the
            // fallback is never taken; the check keeps this crate free of `unsafe`.
            ClientId::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or("")
            }
            ClientId::Heap(s) => s,
        }
    }
}

impl From<&str> for ClientId {
    fn from(s: &str) -> ClientId {
        match u8::try_from(s.len()) {
            Ok(len) if s.len() <= INLINE_ID => {
                let mut bytes = [0; INLINE_ID];
                bytes[..s.len()].copy_from_slice(s.as_bytes());
                ClientId::Inline { len, bytes }
            }
            _ => ClientId::Heap(s.into()),
        }
    }
}

impl From<String> for ClientId {
    fn from(s: String) -> ClientId {
        if s.len() <= INLINE_ID {
            ClientId::from(s.as_str())
        } else {
            ClientId::Heap(s.into_boxed_str())
        }
    }
}

impl std::ops::Deref for ClientId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Where a session's deliveries go while it is connected.
pub enum Link {
    /// A network client: deliveries are encoded by its connection's writer task.
    Network {
        /// Identifies the connection, so events from a replaced one are ignored.
        conn_id: crate::events::ConnId,
        /// The writer task's queue.
        tx: OutboundTx,
    },
    /// An in-process subscriber (sensors, bridge): deliveries are handed over as is.
    Local(tokio::sync::mpsc::Sender<Arc<Message>>),
}

/// A message waiting for an acknowledgement from the client.
pub struct Inflight {
    /// Packet identifier used towards the client.
    pub packet_id: u16,
    /// The message.
    pub delivery: Delivery,
    /// True once PUBREC arrived and PUBREL went out (QoS 2 second half).
    pub released: bool,
    /// Its id in the broker store when its session is kept there.
    pub stored: Option<crate::store::DeliveryId>,
    /// The row is on disk. A message in flight to a connected client is written only if
    /// the client has not acknowledged it within a grace period (`core/persist.rs`).
    pub written: bool,
    /// Held while the publisher's acknowledgement waits for this delivery to be
    /// acknowledged or written; dropping it is what releases the publisher.
    pub gate: Option<Arc<AckGate>>,
}

/// The publisher's side of a message owed to persistent sessions: its PUBACK/PUBREC
/// waits until every clone of this is gone (each delivery acknowledged by its client,
/// written to the store, or no longer owed).
pub struct AckGate {
    /// Never sent on: the receiver resolves when this is dropped.
    _release: tokio::sync::oneshot::Sender<()>,
    /// Set when a delivery behind the gate could not be written: the publisher is refused.
    failed: Arc<AtomicBool>,
}

impl AckGate {
    /// A gate and what resolves once the last clone of it is dropped.
    pub fn new() -> (Arc<AckGate>, GateWait) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let gate = AckGate {
            _release: tx,
            failed: failed.clone(),
        };
        (Arc::new(gate), GateWait { rx, failed })
    }

    /// A delivery behind this gate could not be written: its publisher must be refused.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }
}

/// The publisher's side of an [`AckGate`].
pub struct GateWait {
    rx: tokio::sync::oneshot::Receiver<()>,
    failed: Arc<AtomicBool>,
}

impl GateWait {
    /// Resolves once every clone of the gate is gone: true when nothing behind it failed.
    pub async fn passed(self) -> bool {
        let _ = self.rx.await;
        !self.failed.load(Ordering::Relaxed)
    }
}

/// A queued delivery is accounted in the session that queues it (with its store row id).
impl Delivery {
    /// What the delivery holds while queued: payload, topic and the fixed cost of the
    /// message and its queue entry, so empty payloads are not free.
    pub fn queued_size(&self) -> usize {
        self.msg.payload.len()
            + self.msg.topic.len()
            + std::mem::size_of::<Message>()
            + std::mem::size_of::<(Option<DeliveryId>, Delivery)>()
    }
}

/// One subscription as the session remembers it (to rebuild or remove tree entries).
pub struct SessionSub {
    /// Shared group, for `$share/...` filters.
    pub group: Option<String>,
    /// Filter without the `$share/{group}/` prefix.
    pub filter: String,
}

/// A session's messages in flight and waiting, in both directions.
#[derive(Default)]
pub struct Flows {
    /// Outgoing QoS 1/2 messages awaiting acknowledgement, in send order.
    pub inflight: VecDeque<Inflight>,
    /// Messages waiting for a free inflight slot or for the client to reconnect, with
    /// their row in the broker store when they have one.
    pub queue: VecDeque<(Option<crate::store::DeliveryId>, Delivery)>,
    /// What the queue holds, as [`Delivery::queued_size`] counts it.
    pub queued_bytes: usize,
    /// Inbound QoS 2 packet ids for which PUBREC was sent and PUBREL is awaited.
    pub incoming_qos2: BTreeSet<u16>,
}

impl Flows {
    fn is_empty(&self) -> bool {
        self.inflight.is_empty() && self.queue.is_empty() && self.incoming_qos2.is_empty()
    }
}

/// The broker's view of one client.
pub struct Session {
    /// Client identifier.
    pub client_id: ClientId,
    /// Protocol of the current (or last) connection.
    pub protocol: Protocol,
    /// Present while connected.
    pub link: Option<Link>,
    /// Subscriptions by their full filter as the client wrote it. B-tree collections
    /// here because an empty one owns nothing and takes half the room of a hash table
    /// inside every session, and per-client counts are small.
    pub subs: BTreeMap<String, SessionSub>,
    /// Session expiry interval in seconds; `u32::MAX` never expires.
    pub expiry: u32,
    /// Messages in flight and queued, both directions; allocated when the first one
    /// comes and released when all are done, so an idle client carries none of it.
    flows: Option<Box<Flows>>,
    /// Next packet id to try for outgoing messages.
    pub next_packet_id: u16,
    /// How many QoS 1/2 messages may be in flight towards the client.
    pub send_quota: u16,
    /// Largest packet the client accepts (5.0 Maximum Packet Size); 0 when unlimited
    /// (0 is not a valid Maximum Packet Size, so it cannot mean anything else).
    pub max_packet_size: u32,
    /// Will message of the current connection.
    pub will: Option<Box<Will>>,
    /// Topic rules of the current connection; `None` allows everything.
    pub acl: Option<Box<super::acl::ClientAcl>>,
    /// Bumped on every connect so timers of an earlier disconnect are recognised as
    /// stale (wrapping: only equality with a recent value matters).
    pub generation: u32,
    /// Messages dropped because the queue was full (for throttling the warning; it wraps,
    /// which only means the warning comes again).
    pub dropped: u16,
    /// Its id in the broker store while it is persistent there.
    pub store_id: Option<crate::store::StoreId>,
}

impl Session {
    /// A new, empty, offline session.
    pub fn new(client_id: ClientId, protocol: Protocol) -> Session {
        Session {
            client_id,
            protocol,
            link: None,
            subs: BTreeMap::new(),
            expiry: 0,
            flows: None,
            next_packet_id: 1,
            send_quota: 20,
            max_packet_size: 0,
            will: None,
            acl: None,
            generation: 0,
            dropped: 0,
            store_id: None,
        }
    }

    /// The connection id if connected over the network.
    pub fn conn_id(&self) -> Option<crate::events::ConnId> {
        match &self.link {
            Some(Link::Network { conn_id, .. }) => Some(*conn_id),
            _ => None,
        }
    }

    /// The message flows, made on first use.
    pub fn flows(&mut self) -> &mut Flows {
        self.flows.get_or_insert_with(Default::default)
    }

    /// The message flows, if there are any.
    pub fn flows_mut(&mut self) -> Option<&mut Flows> {
        self.flows.as_deref_mut()
    }

    /// Outgoing QoS 1/2 messages awaiting acknowledgement, in send order.
    pub fn inflight(&self) -> impl Iterator<Item = &Inflight> {
        self.flows.iter().flat_map(|f| f.inflight.iter())
    }

    /// How many outgoing messages await acknowledgement.
    pub fn inflight_len(&self) -> usize {
        self.flows.as_ref().map_or(0, |f| f.inflight.len())
    }

    /// Whether messages wait for an inflight slot or for the client to reconnect.
    pub fn has_queued(&self) -> bool {
        self.flows.as_ref().is_some_and(|f| !f.queue.is_empty())
    }

    /// Allocates a packet identifier not used by any message in flight.
    pub fn alloc_packet_id(&mut self) -> u16 {
        // The window is small (<= 65535 and usually ~20), so a linear probe is cheap and
        // needs no second index.
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.wrapping_add(1).max(1);
            if !self.inflight().any(|f| f.packet_id == id) {
                return id;
            }
        }
    }

    /// Removes the inflight entry with `packet_id`, if any.
    pub fn take_inflight(&mut self, packet_id: u16) -> Option<Inflight> {
        let flows = self.flows.as_mut()?;
        let pos = flows
            .inflight
            .iter()
            .position(|f| f.packet_id == packet_id)?;
        let taken = flows.inflight.remove(pos);
        self.release_flows_if_empty();
        taken
    }

    /// Ends an inbound QoS 2 exchange; false if `packet_id` was not awaiting PUBREL.
    pub fn end_incoming_qos2(&mut self, packet_id: u16) -> bool {
        let removed = self
            .flows
            .as_mut()
            .is_some_and(|f| f.incoming_qos2.remove(&packet_id));
        self.release_flows_if_empty();
        removed
    }

    /// The next queued message with its store row, if any.
    pub fn pop_queued(&mut self) -> Option<(Option<crate::store::DeliveryId>, Delivery)> {
        let flows = self.flows.as_mut()?;
        let d = flows.queue.pop_front();
        if let Some((_, d)) = &d {
            flows.queued_bytes = flows.queued_bytes.saturating_sub(d.queued_size());
        }
        self.release_flows_if_empty();
        d
    }

    /// Queues a delivery at the back, counting its bytes.
    pub fn push_queued(&mut self, stored: Option<crate::store::DeliveryId>, d: Delivery) {
        let flows = self.flows();
        flows.queued_bytes += d.queued_size();
        flows.queue.push_back((stored, d));
    }

    /// Bytes of the queued deliveries.
    pub fn queued_bytes(&self) -> usize {
        self.flows.as_ref().map_or(0, |f| f.queued_bytes)
    }

    /// How many messages wait in the queue.
    pub fn queued_len(&self) -> usize {
        self.flows.as_ref().map_or(0, |f| f.queue.len())
    }

    /// Drops the flows once nothing is in them.
    pub fn release_flows_if_empty(&mut self) {
        if self.flows.as_ref().is_some_and(|f| f.is_empty()) {
            self.flows = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inline, the id is as long as the `Arc<str>` it replaced plus 8 bytes, which the
    /// session's 128-byte chunk has room for (`idle_connection_state_stays_small`).
    #[test]
    fn client_id_stays_small_and_round_trips() {
        assert_eq!(std::mem::size_of::<ClientId>(), 24);
        for id in [
            "",
            "a",
            "sensor-0000000001",
            "exactly-22-bytes-long!",
            "ü".repeat(11).as_str(),
        ] {
            let c = ClientId::from(id);
            assert!(matches!(c, ClientId::Inline { .. }), "{id:?} is not inline");
            assert_eq!(c.as_str(), id);
            assert_eq!(ClientId::from(id.to_owned()), c);
        }
        let long = "a-client-id-of-23-bytes";
        let c = ClientId::from(long);
        assert!(matches!(c, ClientId::Heap(_)));
        assert_eq!(&*c, long);
        assert_eq!(ClientId::from(long.to_owned()), c);
        assert_eq!(c.to_string(), long);
    }
}
