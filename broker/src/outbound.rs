//! What the broker core asks a connection to send.
//!
//! The core never waits on a client: what it made for a connection is appended to the
//! connection's queue (by the core's task, all of a batch under one lock) and wakes its
//! task, which encodes and writes at the client's pace. QoS 1/2 traffic is bounded by the
//! inflight window; QoS 0 traffic is bounded by counting the bytes queued per connection
//! and dropping (and counting) QoS 0 messages for a client that does not keep up.
//!
//! The queue is a `Vec` behind a mutex rather than a channel because an idle connection
//! must cost almost nothing: an empty `Vec` owns no memory, while a channel allocates a
//! block of slots up front. The consumer always takes the whole queue at once, so a
//! `Vec` keeps order without a ring buffer.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_util::future::BoxFuture;
use outpost_mqtt::{Packet, ReasonCode};

use super::message::Delivery;

/// Bytes of QoS 0 messages that may wait for one slow client before new QoS 0 messages
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

/// One item for a connection.
pub enum Outbound {
    /// An acknowledgement of the PUBLISH exchanges, sent in queue order.
    Ack(Ack),
    /// A rarer control packet (CONNACK, SUBACK, UNSUBACK), boxed to keep items small.
    Control(Box<Packet>),
    /// An acknowledgement (PUBACK or PUBREC) that may only go out once `wait` resolves;
    /// acknowledgements behind it wait too, so they leave in the order PUBLISHes came in
    /// (MQTT-4.6.0-2). The closure builds the ack from the outcome (a reason code on
    /// rejection, or nothing at all for 3.x).
    AckAfter {
        /// Completes when every durable sink has committed the message.
        wait: BoxFuture<'static, DurableResult>,
        /// Builds the acknowledgement from the outcome; `None` sends nothing.
        ack: Box<dyn FnOnce(DurableResult) -> Option<Ack> + Send>,
    },
    /// A QoS 2 message for a persistent session, sent once `wait` (the commit of its
    /// row) resolves: the client holds its packet id until PUBREL, so the broker must
    /// not be able to forget it in a crash. Publishes behind it wait too (order).
    PublishAfter {
        /// The commit of the delivery's row (and packet id).
        wait: BoxFuture<'static, DurableResult>,
        /// Message, QoS, retain and subscription ids.
        delivery: Delivery,
        /// Packet identifier.
        packet_id: u16,
    },
    /// A SUBACK or UNSUBACK that may only go out once `wait` (the commit of the
    /// session's subscription rows) resolves; it takes its place in the line of
    /// acknowledgements.
    ControlAfter {
        /// The commit.
        wait: BoxFuture<'static, DurableResult>,
        /// The packet.
        packet: Box<Packet>,
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

/// State shared by the core (producer) and one connection task (consumer): everything
/// under one lock, in one small allocation per client (88 bytes with the connection
/// slot inline, 104 in its `Arc`: one malloc chunk of 112).
struct Shared {
    queue: Mutex<Queue>,
    /// The connection's place under the connection limits: it lives as long as either
    /// side, which is as long as the connection (the core lets go when it closes), and
    /// keeping it here instead of in the connection's task keeps that a cache line
    /// smaller.
    _slot: Option<super::limits::ConnectionSlot>,
}

/// The items, the waker of the connection task when it found the queue empty (a plain
/// slot under the queue's own lock costs less than a `Notify` and cannot miss a push),
/// and the QoS 0 bytes queued.
#[derive(Default)]
struct Queue {
    items: Vec<Outbound>,
    waker: Option<Waker>,
    /// Bytes of QoS 0 deliveries queued; bounded by [`QOS0_BACKLOG_LIMIT`].
    backlog: u32,
    closed: bool,
}

/// The core's side of a connection's queue.
#[derive(Clone)]
pub struct OutboundTx(Arc<Shared>);

/// The connection task's side.
pub struct OutboundRx(Arc<Shared>);

/// A new outbound queue.
pub fn channel(slot: Option<Box<super::limits::ConnectionSlot>>) -> (OutboundTx, OutboundRx) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        // Inline rather than boxed: one heap chunk less per client (the box the listener
        // made is freed once the connection is set up).
        _slot: slot.map(|s| *s),
    });
    (OutboundTx(shared.clone()), OutboundRx(shared))
}

impl OutboundTx {
    /// Queues `items` in order under one lock, with at most one wake-up, leaving `items`
    /// empty (with room: when the connection's queue is empty the two are swapped, so
    /// nothing is copied). `droppable` marks, by index in `items`, the QoS 0 deliveries
    /// that are dropped instead, and their `D` handed to `dropped`, when the client is
    /// too far behind (or gone); it is left empty too.
    pub(crate) fn push_all<D: Copy>(
        &self,
        items: &mut Vec<Outbound>,
        droppable: &mut Vec<(u32, D)>,
        mut dropped: impl FnMut(D),
    ) {
        let mut q = lock(&self.0.queue);
        if q.closed {
            // Gone: nothing is queued, and what is dropped is dropped outside the lock.
            drop(q);
            droppable.drain(..).for_each(|(_, d)| dropped(d));
            items.clear();
            return;
        }
        let mut pushed = false;
        let added: usize = items.iter().filter_map(qos0_size).sum();
        let added = u32::try_from(added).unwrap_or(u32::MAX);
        if droppable.is_empty() || q.backlog.saturating_add(added) as usize <= QOS0_BACKLOG_LIMIT {
            // Everything fits (then so does every prefix: nothing would be dropped).
            q.backlog = q.backlog.saturating_add(added);
            pushed = !items.is_empty();
            if q.items.is_empty() {
                std::mem::swap(&mut q.items, items);
            } else {
                q.items.append(items);
            }
        } else {
            let mut marks = droppable.iter().peekable();
            for (i, item) in items.drain(..).enumerate() {
                let mark = marks.next_if(|(at, _)| *at as usize == i).map(|&(_, d)| d);
                if let Some(size) = qos0_size(&item) {
                    let size = u32::try_from(size).unwrap_or(u32::MAX);
                    if let Some(d) = mark
                        && q.backlog.saturating_add(size) as usize > QOS0_BACKLOG_LIMIT
                    {
                        dropped(d);
                        continue;
                    }
                    q.backlog = q.backlog.saturating_add(size);
                }
                q.items.push(item);
                pushed = true;
            }
        }
        droppable.clear();
        let waker = if pushed { q.waker.take() } else { None };
        drop(q);
        // Woken outside the lock: the task may run at once on another thread.
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Tells queues apart while they live (the address of their shared state).
    pub(crate) fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }
}

impl OutboundRx {
    /// Takes everything queued, in order, or registers the task to be woken by the next
    /// push. Hand the emptied buffer back with [`Self::recycle`].
    pub fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Vec<Outbound>> {
        let mut q = lock(&self.0.queue);
        if q.items.is_empty() {
            if !q.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                q.waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        Poll::Ready(take(&mut q))
    }

    /// Has `waker` woken by the next push; true if items are already waiting (then
    /// nothing will push a wake-up for them).
    pub fn register(&self, waker: &Waker) -> bool {
        let mut q = lock(&self.0.queue);
        q.waker = Some(waker.clone());
        !q.items.is_empty()
    }

    /// Takes everything queued without registering for a wake-up.
    pub fn take_now(&self) -> Vec<Outbound> {
        take(&mut lock(&self.0.queue))
    }

    /// Returns a drained buffer so a busy stream reuses its allocation; after a burst or
    /// a trickle it is dropped instead, so an idle client holds no queue memory.
    pub fn recycle(&self, mut items: Vec<Outbound>, batch: usize) {
        if items.capacity() > 64 || batch <= 2 {
            return;
        }
        items.clear();
        let mut q = lock(&self.0.queue);
        if q.items.is_empty() && q.items.capacity() == 0 {
            q.items = items;
        }
    }

    /// Gives back the room [`Self::recycle`] kept for a busy stream: a connection that
    /// parks holds no queue memory however it was busy before.
    pub fn shed(&self) {
        let mut q = lock(&self.0.queue);
        if q.items.is_empty() {
            q.items = Vec::new();
        }
    }

    /// Marks the connection gone: further items are refused and queued ones dropped.
    pub fn close(&self) {
        let mut q = lock(&self.0.queue);
        q.closed = true;
        q.items = Vec::new();
        q.backlog = 0;
        q.waker = None;
    }
}

fn take(q: &mut Queue) -> Vec<Outbound> {
    let items = std::mem::take(&mut q.items);
    let freed: usize = items.iter().filter_map(qos0_size).sum();
    q.backlog = q
        .backlog
        .saturating_sub(u32::try_from(freed).unwrap_or(u32::MAX));
    items
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the queue inconsistent (push/drain
    // are single operations), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The bytes a QoS 0 delivery counts against the backlog budget; `None` for anything else.
fn qos0_size(item: &Outbound) -> Option<usize> {
    match item {
        Outbound::Publish {
            delivery,
            packet_id: None,
            ..
        } => Some(delivery.msg.payload.len() + delivery.msg.topic.len() + QOS0_ITEM_OVERHEAD),
        _ => None,
    }
}

/// What one queued QoS 0 delivery costs beyond its payload and topic: the queue item and
/// the message it holds (often its only holder). Without it, two million empty payloads
/// fitted the byte budget while holding 890 MB.
const QOS0_ITEM_OVERHEAD: usize =
    std::mem::size_of::<Outbound>() + std::mem::size_of::<super::message::Message>();

#[cfg(test)]
mod tests {
    /// Every client holds one `Shared` in an `Arc`: at 88 bytes that is a 112-byte heap
    /// chunk, the connection slot included (a separate box was 48 more).
    #[test]
    fn shared_stays_small() {
        let size = std::mem::size_of::<super::Shared>();
        assert!(size <= 88, "outbound Shared is {size} bytes");
    }

    /// A burst of three PUBLISHes from every idle client left each queue holding room for
    /// its three acknowledgements after the client parked again: about 500 bytes a client
    /// at 10,000 clients (`bench/RESULTS-idle.md`, "After a burst").
    #[test]
    fn a_queue_gives_back_the_room_kept_for_a_busy_stream_when_its_connection_parks() {
        use super::{Ack, AckKind, Outbound, channel, lock};
        let (_tx, rx) = channel(None);
        let batch: Vec<Outbound> = (1..=3)
            .map(|id| Outbound::Ack(Ack::new(AckKind::PubAck, id)))
            .collect();
        rx.recycle(batch, 3);
        assert!(
            lock(&rx.0.queue).items.capacity() >= 3,
            "a busy stream keeps its buffer"
        );
        rx.shed();
        assert_eq!(
            lock(&rx.0.queue).items.capacity(),
            0,
            "a parked one does not"
        );
    }
}
