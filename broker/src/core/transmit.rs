//! What the core asks to be sent to connections, as values: it gathers them here while it
//! handles events, and the task around it takes them ([`Core::poll_transmit`]) and does
//! the sends, as quinn-proto's connection hands out its datagrams. Tests read them the
//! same way, without a connection.
//!
//! Items are gathered per connection, in the order the core made them: the task then
//! queues each connection's items under one lock with one wake-up, instead of one of
//! each per item. The answer to a CONNECT travels with its connection's items and is
//! given after they are queued, so the connection finds its CONNACK once it hears back
//! (`net/connection/mod.rs`). The order between different connections was never promised:
//! each is its own task.

use tokio::sync::oneshot;
use tracing::warn;

use super::{Accepted, Core};
use crate::message::Delivery;
use crate::outbound::{Outbound, OutboundTx};

/// Connections' entries kept, with their room, after everything was taken: a fan-out
/// to more connections than this in one batch of events gives the rest back.
const KEEP_DESTS: usize = 256;
/// Items a kept entry may keep room for.
const KEEP_ITEMS: usize = 64;
/// Slots of the cache in front of the map of connections (a power of two).
const CACHE_SLOTS: usize = 64;
/// An empty cache slot.
const NONE: u32 = u32::MAX;

/// What the drop of a QoS 0 delivery for a slow client is reported with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Droppable {
    /// A retained message sent on subscribe: the index of its subscription's report.
    retained: Option<usize>,
}

/// What the core made for one connection since the task last took everything.
#[derive(Default)]
struct Dest {
    /// Its queue; `None` once sent.
    to: Option<OutboundTx>,
    /// The items, in order. Handed to the connection whole: when its queue is empty the
    /// two vectors are swapped, and this one comes back empty with the queue's room.
    items: Vec<Outbound>,
    /// The QoS 0 deliveries among `items` that may be dropped for a slow client, by
    /// index, with what their drop is reported with.
    droppable: Vec<(u32, Droppable)>,
    /// The answer to its CONNECT, given after its items are queued.
    answer: Option<(oneshot::Sender<Option<Accepted>>, Option<Accepted>)>,
}

/// Everything the core has for one connection, to be sent with [`Transmit::send`].
pub(crate) struct Transmit<'a> {
    dest: &'a mut Dest,
    /// Where the drops are told back to the core (read at its next poll).
    drops: &'a mut Vec<Droppable>,
}

impl Transmit<'_> {
    /// The items, in order.
    #[cfg(test)]
    pub(crate) fn items(&self) -> impl Iterator<Item = &Outbound> {
        self.dest.items.iter()
    }

    /// Whether it carries the answer to the connection's CONNECT.
    #[cfg(test)]
    pub(crate) fn answers_connect(&self) -> bool {
        self.dest.answer.is_some()
    }

    /// Queues the items on the connection (under one lock, with one wake-up), then
    /// answers its CONNECT if this carries the answer. A QoS 0 delivery its client has no
    /// room for is dropped, and counted at the core's next poll.
    pub(crate) fn send(self) {
        let Transmit { dest, drops } = self;
        if let Some(to) = dest.to.take() {
            to.push_all(&mut dest.items, &mut dest.droppable, |d| drops.push(d));
        }
        if let Some((reply, accepted)) = dest.answer.take() {
            let _ = reply.send(accepted);
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

/// Hashes a queue's address: the multiply spreads the bits that differ (the middle
/// ones) over the whole word, and the fold brings them down to the bits the table uses.
#[derive(Default)]
struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, n: usize) {
        let m = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = m ^ (m >> 29);
    }
}

/// What the core made for connections since the task last took everything, and what
/// the drops among it are reported to. Nothing here is allocated per message: entries,
/// vectors and the map keep their room from one batch to the next.
pub(super) struct Transmits {
    /// `[next, active)` wait for the task, in the order of each connection's first
    /// item; `[0, next)` were handed out; the rest are kept for reuse.
    dests: Vec<Dest>,
    active: usize,
    next: usize,
    /// A connection's entry in `dests`, by its queue's address.
    index: std::collections::HashMap<usize, u32, std::hash::BuildHasherDefault<AddrHasher>>,
    /// In front of `index`: the entry last found through each slot, checked against the
    /// entry's own queue (a hit costs a multiply and a compare, not a map lookup).
    cache: [u32; CACHE_SLOTS],
    /// Drops told back by [`Transmit::send`], counted at the next poll.
    drops: Vec<Droppable>,
    /// Set while retained messages are sent on subscribe: the report their QoS 0 drops
    /// count towards.
    retained: Option<usize>,
    reports: Vec<RetainedReport>,
}

impl Default for Transmits {
    fn default() -> Transmits {
        Transmits {
            dests: Vec::new(),
            active: 0,
            next: 0,
            index: Default::default(),
            cache: [NONE; CACHE_SLOTS],
            drops: Vec::new(),
            retained: None,
            reports: Vec::new(),
        }
    }
}

impl Transmits {
    /// The entry of the connection `to` that the task has not taken yet; a new one if
    /// there is none.
    fn dest(&mut self, to: &OutboundTx) -> &mut Dest {
        let id = to.id();
        let slot = ((id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            >> (64 - CACHE_SLOTS.trailing_zeros())) as usize;
        let live = |i: usize, dests: &[Dest], next: usize, active: usize| {
            i >= next && i < active && dests[i].to.as_ref().is_some_and(|t| t.id() == id)
        };
        let cached = self.cache[slot] as usize;
        if live(cached, &self.dests, self.next, self.active) {
            return &mut self.dests[cached];
        }
        if let Some(&i) = self.index.get(&id)
            && live(i as usize, &self.dests, self.next, self.active)
        {
            self.cache[slot] = i;
            return &mut self.dests[i as usize];
        }
        // New, or taken already (a test that sends between events): a new entry, which
        // the task takes after the older one.
        let i = self.active;
        if i == self.dests.len() {
            self.dests.push(Dest::default());
        }
        self.active += 1;
        let i32 = u32::try_from(i).unwrap_or(NONE);
        self.index.insert(id, i32);
        self.cache[slot] = i32;
        let dest = &mut self.dests[i];
        dest.to = Some(to.clone());
        dest
    }

    /// Queues `item` for the connection `to`.
    pub(super) fn send(&mut self, to: &OutboundTx, item: Outbound) {
        self.dest(to).items.push(item);
    }

    /// Queues a QoS 0 delivery, to be dropped if its client is too far behind.
    pub(super) fn send_qos0(&mut self, to: &OutboundTx, delivery: Delivery) {
        let droppable = Droppable {
            retained: self.retained,
        };
        let item = Outbound::Publish {
            delivery,
            packet_id: None,
            dup: false,
        };
        let dest = self.dest(to);
        let at = u32::try_from(dest.items.len()).unwrap_or(u32::MAX);
        dest.items.push(item);
        dest.droppable.push((at, droppable));
    }

    /// Answers the CONNECT of the connection `to` once what is queued for it is out.
    pub(super) fn answer(
        &mut self,
        to: &OutboundTx,
        reply: oneshot::Sender<Option<Accepted>>,
        accepted: Option<Accepted>,
    ) {
        self.dest(to).answer = Some((reply, accepted));
    }

    /// From here to [`Transmits::end_retained`], QoS 0 drops count towards a report on
    /// the retained messages (`total`) that `client_id`'s new subscription `filter`
    /// matched.
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

    /// Everything was taken: start over, keeping the room within bounds.
    fn reset(&mut self) {
        if self.active == 0 {
            return;
        }
        for d in &mut self.dests[..self.active] {
            // Anything not sent (a test that only looked) is dropped here.
            d.to = None;
            d.answer = None;
            d.items.clear();
            d.droppable.clear();
            if d.items.capacity() > KEEP_ITEMS {
                d.items = Vec::new();
                d.droppable = Vec::new();
            }
        }
        self.dests.truncate(KEEP_DESTS);
        self.index.clear();
        if self.index.capacity() > KEEP_DESTS * 4 {
            self.index.shrink_to(KEEP_DESTS);
        }
        self.active = 0;
        self.next = 0;
    }
}

impl Core {
    /// What is to be sent to the next connection; `None` once everything is out. Call
    /// after every [`Core::handle_event`] and [`Core::handle_timeout`] until `None`,
    /// sending each ([`Transmit::send`]).
    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        self.count_drops();
        if self.out.next < self.out.active {
            let out = &mut self.out;
            let i = out.next;
            out.next += 1;
            return Some(Transmit {
                dest: &mut out.dests[i],
                drops: &mut out.drops,
            });
        }
        self.out.reset();
        if !self.out.reports.is_empty() {
            // Everything is out, so every drop has been told.
            self.report_retained_cuts();
        }
        None
    }

    /// Counts the QoS 0 deliveries the last [`Transmit::send`] dropped because their
    /// clients are too far behind.
    fn count_drops(&mut self) {
        if self.out.drops.is_empty() {
            return;
        }
        let out = &mut self.out;
        for d in out.drops.drain(..) {
            // Counted as sent when it was queued.
            self.stats.messages_sent = self.stats.messages_sent.saturating_sub(1);
            self.stats.dropped_slow_client += 1;
            if let Some(r) = d.retained.and_then(|i| out.reports.get_mut(i)) {
                r.cut += 1;
            }
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
