//! What the core asks to be sent to connections, as values: it queues them here while it
//! handles events, and the task around it takes them ([`Core::poll_transmit`]) and does
//! the sends, as quinn-proto's connection hands out its datagrams. Tests read them the
//! same way, without a connection.
//!
//! One queue for every connection keeps the order the core made things in: a CONNACK
//! is queued for its connection before the CONNECT is answered, so the connection finds
//! it once it hears back (`connection/mod.rs`).

use std::collections::VecDeque;

use tokio::sync::oneshot;
use tracing::warn;

use super::{Accepted, Core};
use crate::message::Delivery;
use crate::outbound::{Outbound, OutboundTx};

/// One thing for a connection, in the order the core made it.
pub(crate) enum Transmit {
    /// An item for a connection's queue.
    Queue {
        /// The connection's queue.
        to: OutboundTx,
        /// The item.
        item: Outbound,
        /// A QoS 0 delivery that is dropped instead when its client is too far behind.
        droppable: Option<Droppable>,
    },
    /// The answer to a CONNECT (`None`: refused), given after what the core queued for
    /// the connection while handling it.
    Answer {
        /// Where the connection waits for it.
        reply: oneshot::Sender<Option<Accepted>>,
        /// The session and connection ids, or `None` if refused.
        accepted: Option<Accepted>,
    },
}

/// What the drop of a QoS 0 delivery for a slow client is reported with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Droppable {
    /// A retained message sent on subscribe: the index of its subscription's report.
    retained: Option<usize>,
}

impl Transmit {
    /// Does the send; the delivery back when a droppable QoS 0 one was dropped (its
    /// client does not keep up), to be told to [`Core::handle_dropped`].
    pub(crate) fn send(self) -> Option<Droppable> {
        match self {
            Transmit::Queue {
                to,
                item,
                droppable,
            } => match droppable {
                Some(d) => (!to.push(item, true)).then_some(d),
                None => {
                    to.send(item);
                    None
                }
            },
            Transmit::Answer { reply, accepted } => {
                let _ = reply.send(accepted);
                None
            }
        }
    }
}

/// A subscription that was sent retained messages: told once the drops among them are
/// known.
struct RetainedReport {
    client_id: String,
    filter: String,
    /// Retained messages that matched.
    total: usize,
    /// How many of them were not sent.
    cut: u64,
}

/// The transmits not taken yet, and what the drops among them are reported to.
#[derive(Default)]
pub(super) struct Transmits {
    queue: VecDeque<Transmit>,
    /// Set while retained messages are sent on subscribe: the report their QoS 0 drops
    /// count towards.
    retained: Option<usize>,
    reports: Vec<RetainedReport>,
}

impl Transmits {
    /// Queues `item` for the connection `to`.
    pub(super) fn send(&mut self, to: &OutboundTx, item: Outbound) {
        self.queue.push_back(Transmit::Queue {
            to: to.clone(),
            item,
            droppable: None,
        });
    }

    /// Queues a QoS 0 delivery, to be dropped if its client is too far behind.
    pub(super) fn send_qos0(&mut self, to: &OutboundTx, delivery: Delivery) {
        self.queue.push_back(Transmit::Queue {
            to: to.clone(),
            item: Outbound::Publish {
                delivery,
                packet_id: None,
                dup: false,
            },
            droppable: Some(Droppable {
                retained: self.retained,
            }),
        });
    }

    /// Queues the answer to a CONNECT.
    pub(super) fn answer(
        &mut self,
        reply: oneshot::Sender<Option<Accepted>>,
        accepted: Option<Accepted>,
    ) {
        self.queue.push_back(Transmit::Answer { reply, accepted });
    }

    /// From here to [`Transmits::end_retained`], QoS 0 drops count towards a report on
    /// the retained messages `client_id`'s new subscription `filter` matched (`total`),
    /// `cut` of which were already refused.
    pub(super) fn begin_retained(&mut self, client_id: String, filter: String, total: usize) {
        self.retained = Some(self.reports.len());
        self.reports.push(RetainedReport {
            client_id,
            filter,
            total,
            cut: 0,
        });
    }

    /// Ends what [`Transmits::begin_retained`] began; `cut` more were not sent (a full
    /// session queue).
    pub(super) fn end_retained(&mut self, cut: u64) {
        if let Some(r) = self.retained.take().and_then(|i| self.reports.get_mut(i)) {
            r.cut += cut;
        }
    }
}

impl Core {
    /// The next thing to send to a connection, in order; `None` once everything is out.
    /// Call after every [`Core::handle_event`] and [`Core::handle_timeout`] until `None`.
    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        let next = self.out.queue.pop_front();
        if next.is_none() && !self.out.reports.is_empty() {
            // Everything is out, so every drop has been told.
            self.report_retained_cuts();
        }
        next
    }

    /// A droppable QoS 0 delivery was not sent: its client is too far behind.
    pub(crate) fn handle_dropped(&mut self, d: Droppable) {
        // Counted as sent when it was queued.
        self.stats.messages_sent = self.stats.messages_sent.saturating_sub(1);
        self.stats.dropped_slow_client += 1;
        if let Some(r) = d.retained.and_then(|i| self.out.reports.get_mut(i)) {
            r.cut += 1;
        }
    }

    fn report_retained_cuts(&mut self) {
        for r in self.out.reports.drain(..) {
            if r.cut > 0 {
                // The bounds: QoS 0 ones what the client's socket backlog holds (8 MiB),
                // QoS 1/2 ones its session queue (max_queued_messages/_bytes). Counted in
                // $SYS/broker/messages/dropped/{slow_client,queue_full}.
                warn!(
                    client_id = %r.client_id,
                    filter = %r.filter,
                    retained = r.total,
                    not_sent = r.cut,
                    "a new subscription matched more retained messages than the client's \
                     backlog holds; the rest were not sent (subscribe to narrower filters, \
                     or at QoS 1 with a larger broker.max_queued_messages)"
                );
            }
        }
    }
}
