//! What the broker core asks a connection to send.
//!
//! The core never waits on a client: it appends to the connection's queue and wakes its
//! task, which encodes and writes at the client's pace. QoS 1/2 traffic is bounded by the
//! inflight window; QoS 0 traffic is bounded by counting the bytes queued per connection
//! and dropping (and counting) QoS 0 messages for a client that does not keep up.
//!
//! The queue is a `VecDeque` behind a mutex rather than a channel because an idle
//! connection must cost almost nothing: an empty `VecDeque` owns no memory, while a
//! channel allocates a block of slots up front.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_util::future::BoxFuture;
use outpost_mqtt::{Packet, ReasonCode};

use super::session::Delivery;

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

/// State shared by the core (producer) and one connection task (consumer).
struct Shared {
    queue: Mutex<Queue>,
    backlog: AtomicUsize,
    closed: AtomicBool,
}

/// The items and the waker of the connection task when it found the queue empty: a
/// plain waker slot under the queue's own lock costs less than a `Notify` and cannot
/// miss a push, since both sides take the same lock.
#[derive(Default)]
struct Queue {
    items: VecDeque<Outbound>,
    waker: Option<Waker>,
}

/// The core's side of a connection's queue.
#[derive(Clone)]
pub struct OutboundTx(Arc<Shared>);

/// The connection task's side.
pub struct OutboundRx(Arc<Shared>);

/// A new outbound queue.
pub fn channel() -> (OutboundTx, OutboundRx) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        backlog: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
    });
    (OutboundTx(shared.clone()), OutboundRx(shared))
}

impl OutboundTx {
    /// Queues an item; false if the connection is gone.
    pub fn send(&self, item: Outbound) -> bool {
        if self.0.closed.load(Ordering::Relaxed) {
            return false;
        }
        if let Some(size) = qos0_size(&item) {
            self.0.backlog.fetch_add(size, Ordering::Relaxed);
        }
        let waker = {
            let mut q = lock(&self.0.queue);
            q.items.push_back(item);
            q.waker.take()
        };
        // Woken outside the lock: the task may run at once on another thread.
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Queues a QoS 0 delivery unless the client is too far behind; false if dropped.
    pub fn send_qos0(&self, delivery: Delivery) -> bool {
        let size = delivery.msg.payload.len() + delivery.msg.topic.len();
        if self.0.backlog.load(Ordering::Relaxed) + size > QOS0_BACKLOG_LIMIT {
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
    /// Takes everything queued, or registers the task to be woken by the next push.
    /// Hand the emptied buffer back with [`Self::recycle`].
    pub fn poll_take(&self, cx: &mut Context<'_>) -> Poll<VecDeque<Outbound>> {
        let mut q = lock(&self.0.queue);
        if q.items.is_empty() {
            if !q.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                q.waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        let items = std::mem::take(&mut q.items);
        drop(q);
        let freed: usize = items.iter().filter_map(qos0_size).sum();
        if freed > 0 {
            self.0.backlog.fetch_sub(freed, Ordering::Relaxed);
        }
        Poll::Ready(items)
    }

    /// Takes everything queued without registering for a wake-up.
    pub fn take_now(&self) -> VecDeque<Outbound> {
        let items = std::mem::take(&mut lock(&self.0.queue).items);
        let freed: usize = items.iter().filter_map(qos0_size).sum();
        if freed > 0 {
            self.0.backlog.fetch_sub(freed, Ordering::Relaxed);
        }
        items
    }

    /// Returns a drained buffer so a busy stream reuses its allocation; after a burst or
    /// a trickle it is dropped instead, so an idle client holds no queue memory.
    pub fn recycle(&self, items: VecDeque<Outbound>, batch: usize) {
        if items.capacity() > 64 || batch <= 2 {
            return;
        }
        let mut q = lock(&self.0.queue);
        if q.items.is_empty() && q.items.capacity() == 0 {
            q.items = items;
        }
    }

    /// Marks the connection gone: further items are refused and queued ones dropped.
    pub fn close(&self) {
        self.0.closed.store(true, Ordering::Relaxed);
        let mut q = lock(&self.0.queue);
        q.items.clear();
        q.waker = None;
    }
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
        } => Some(delivery.msg.payload.len() + delivery.msg.topic.len()),
        _ => None,
    }
}
