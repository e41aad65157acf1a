//! Routing: from an accepted message to each subscriber's connection or queue.

use std::sync::Arc;
use std::time::Instant;

use outpost_mqtt::QoS;
use tokio::sync::mpsc;
use tracing::warn;

use super::Core;
use super::persist::WRITE_GRACE;
use super::timers::Timer;
use crate::DurableReceipt;
use crate::message::Delivery;
use crate::message::Message;
use crate::outbound::Outbound;
use crate::session::{AckGate, GateWait, Inflight, Link, Session, SessionSub};
use crate::store::{DeliveryId, Store};
use crate::subscriptions::{Match, SessionKey, SubEntry};

impl Core {
    /// Accepts a message from any publisher: updates retained state, delivers it to
    /// subscribers, and offers it to the durable sinks. Returns the receipts its
    /// publisher's acknowledgement must wait for, and whether a subscription matched or
    /// a sink took it (see [`Core::sinks_want`] for the rest).
    pub(super) fn accept(
        &mut self,
        msg: &Arc<Message>,
        now: Instant,
    ) -> (Vec<DurableReceipt>, bool) {
        self.stats.messages_received += 1;
        self.stats.bytes_received += msg.payload.len() as u64;
        let mut retained_row = false;
        if msg.retain {
            let fits =
                self.retained
                    .fits_at(&msg.topic, msg.payload.len(), self.retained_limits(), now);
            // Before this message's own row, which may be for a topic that just expired.
            self.forget_expired_retained();
            if fits {
                self.retained.update(msg);
                if let Some(store) = &self.store {
                    store.retain(msg);
                    retained_row = true;
                }
            } else {
                // Delivered, not retained: 5.0 clients were refused before this
                // (`publish_refusal`), so this is a 3.x client or an in-process publisher.
                self.stats.limits.retained += 1;
                let n = self.stats.limits.retained;
                if n.is_power_of_two() {
                    warn!(
                        topic = %msg.topic,
                        retained = self.retained.len(),
                        retained_bytes = self.retained.bytes(),
                        not_retained = n,
                        "retained message not kept: broker.max_retained_messages or \
                         max_retained_bytes reached (delivered to current subscribers only)"
                    );
                }
            }
        }
        let routed = self.route(msg, now);
        let mut receipts: Vec<DurableReceipt> = self
            .sinks
            .iter()
            .enumerate()
            .filter(|(i, _)| msg.skip_sink != Some(*i))
            .filter_map(|(_, s)| s.offer(msg))
            .collect();
        let wanted = routed.matched || !receipts.is_empty();
        // Kept for a persistent session or as a retained message: the acknowledgement
        // waits until the store has committed it, as it waits for a bridge spool...
        if (routed.commit || retained_row)
            && msg.qos != QoS::AtMostOnce
            && let Some(store) = &self.store
        {
            receipts.push(store.receipt());
        }
        // ...or, for deliveries in flight to connected persistent sessions, until each is
        // acknowledged by its client or written (`persist.rs`).
        if let Some((gate, released)) = routed.gate {
            drop(gate);
            if msg.qos != QoS::AtMostOnce {
                receipts.push(Box::pin(async move {
                    if released.passed().await {
                        Ok(())
                    } else {
                        Err(Store::refusal())
                    }
                }));
            }
        }
        (receipts, wanted)
    }

    /// Removes from the store the rows of retained messages that expired in memory.
    pub(super) fn forget_expired_retained(&mut self) {
        for topic in self.retained.take_expired() {
            if let Some(store) = &self.store {
                store.forget_retained(topic);
            }
        }
    }

    /// The configured bounds of the retained messages.
    pub(super) fn retained_limits(&self) -> crate::retained::RetainedLimits {
        crate::retained::RetainedLimits {
            messages: self.settings.max_retained_messages,
            bytes: self.settings.max_retained_bytes,
        }
    }

    /// Whether a sink takes `msg`'s topic without a receipt (a QoS 0 bridge rule, say):
    /// asked only for a 5.0 publish nothing else wanted, before answering 0x10.
    pub(super) fn sinks_want(&self, msg: &Message) -> bool {
        self.sinks
            .iter()
            .enumerate()
            .any(|(i, s)| msg.skip_sink != Some(i) && s.wants(&msg.topic))
    }

    /// Delivers or queues `msg` for every matching subscription, and says what its
    /// publisher's acknowledgement has to wait for.
    pub(super) fn route(&mut self, msg: &Arc<Message>, now: Instant) -> Routed {
        let mut routed = Routed::default();
        let mut matches = std::mem::take(&mut self.scratch);
        matches.clear();
        let sessions = &self.sessions;
        self.tree.matches(
            &msg.topic,
            &|k| sessions.get(k).is_some_and(|s| s.link.is_some()),
            &mut matches,
        );
        // Non-shared matches of one session become one delivery with the highest QoS and
        // every subscription identifier (MQTT-3.3.5-1, 3.3.4 in 5.0); shared ones are
        // delivered on their own.
        matches.sort_unstable_by_key(|m| (m.shared, m.session));
        let mut i = 0;
        while i < matches.len() {
            let first = matches[i];
            let mut j = i + 1;
            if !first.shared {
                while j < matches.len() && !matches[j].shared && matches[j].session == first.session
                {
                    j += 1;
                }
            }
            if let Some(d) = merge(msg, &matches[i..j]) {
                self.deliver(first.session, d, now, &mut routed);
            }
            i = j;
        }
        routed.matched = !matches.is_empty();
        self.scratch = matches;
        routed
    }

    /// Sends or queues one delivery for one session, adding what it kept to `routed`.
    pub(super) fn deliver(
        &mut self,
        key: SessionKey,
        d: Delivery,
        now: Instant,
        routed: &mut Routed,
    ) {
        let limits = QueueLimits {
            messages: self.settings.max_queued_messages,
            bytes: self.settings.max_queued_bytes,
        };
        let queue_qos0 = self.settings.queue_qos0;
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if d.msg.is_expired(now) || s.acl.as_ref().is_some_and(|a| !a.can_read(&d.msg.topic)) {
            return;
        }
        if s.max_packet_size > 0
            && publish_size(&d, s.protocol.is_v5()) > s.max_packet_size as usize
        {
            // MQTT-3.1.2-25: a packet larger than the client accepts is discarded as if
            // it had been delivered.
            self.stats.dropped_too_large += 1;
            return;
        }
        match &s.link {
            Some(Link::Local(tx)) => {
                if tx.try_send(d.msg).is_err() {
                    self.stats.dropped_local += 1;
                    let n = self.stats.dropped_local;
                    // Logged at the 1st, 2nd, 4th, 8th... drop: visible, never a flood.
                    if n.is_power_of_two() {
                        warn!(
                            dropped = n,
                            "an in-process subscriber (sensor commands, bridge downlink) is not keeping up: messages dropped"
                        );
                    }
                } else {
                    self.stats.messages_sent += 1;
                }
            }
            Some(Link::Network { tx, .. }) => {
                if d.qos == QoS::AtMostOnce {
                    // Counted as sent; a drop for a slow client is told back when the
                    // task sends it (`transmit.rs`).
                    self.out.send_qos0(tx, d);
                    self.stats.messages_sent += 1;
                } else if !s.has_queued() && s.inflight_len() < usize::from(s.send_quota) {
                    let tx = tx.clone();
                    let packet_id = s.alloc_packet_id();
                    let mut f = Inflight {
                        packet_id,
                        delivery: d,
                        released: false,
                        stored: None,
                        written: false,
                        gate: None,
                    };
                    let mut wait = None;
                    if let Some(sid) = s.store_id
                        && let Some(store) = self.store.as_mut()
                    {
                        let id = store.new_delivery_id();
                        f.stored = Some(id);
                        if f.delivery.msg.qos == QoS::ExactlyOnce {
                            // QoS 2 is written at once, in the same transaction as its
                            // publisher's packet id (`on_publish`): after a crash the
                            // broker must know both, or a resent PUBLISH is delivered
                            // twice or never. A QoS 2 delivery also leaves only once its
                            // row is on disk, because its client keeps the packet id
                            // until PUBREL and a forgetful broker would reuse it.
                            store.put_delivery(id, sid, &f.delivery, Some(packet_id));
                            f.written = true;
                            routed.commit = true;
                            if f.delivery.qos == QoS::ExactlyOnce {
                                wait = Some(store.receipt());
                            }
                        } else {
                            // Not written yet: a client that acknowledges within the grace
                            // period costs no disk write; the publisher waits for either.
                            let (gate, _) = routed.gate.get_or_insert_with(AckGate::new);
                            f.gate = Some(gate.clone());
                            if self.deferred.is_empty() {
                                self.timers.push(now + WRITE_GRACE, Timer::Deferred);
                            }
                            self.deferred.push_back((now + WRITE_GRACE, key, id));
                        }
                    }
                    send_inflight(&mut self.out, s, &tx, f, wait);
                    self.stats.messages_sent += 1;
                } else {
                    match enqueue(s, d, limits, &mut self.store) {
                        Ok(written) => routed.commit |= written,
                        Err(full) => self.stats.count_queue_full(full),
                    }
                }
            }
            None => {
                if d.qos != QoS::AtMostOnce || queue_qos0 {
                    match enqueue(s, d, limits, &mut self.store) {
                        Ok(written) => routed.commit |= written,
                        Err(full) => self.stats.count_queue_full(full),
                    }
                }
            }
        }
    }

    /// Moves queued messages into free inflight slots of a connected session.
    pub(super) fn pump(&mut self, key: SessionKey, now: Instant) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        let Some(Link::Network { tx, .. }) = &s.link else {
            return;
        };
        let tx = tx.clone();
        while s.inflight_len() < usize::from(s.send_quota) {
            let Some((stored, d)) = s.pop_queued() else {
                break;
            };
            if d.msg.is_expired(now) {
                forget(&self.store, stored);
                continue;
            }
            self.stats.messages_sent += 1;
            if d.qos == QoS::AtMostOnce {
                // QoS 0 is done once it is handed to the connection.
                forget(&self.store, stored);
                self.out.send(
                    &tx,
                    Outbound::Publish {
                        delivery: d,
                        packet_id: None,
                        dup: false,
                    },
                );
            } else {
                let packet_id = s.alloc_packet_id();
                let mut wait = None;
                if let Some(id) = stored
                    && let Some(store) = &self.store
                {
                    store.set_packet_id(id, packet_id);
                    if d.qos == QoS::ExactlyOnce {
                        // The client keeps this id until PUBREL: on disk first.
                        wait = Some(store.receipt());
                    }
                }
                let f = Inflight {
                    packet_id,
                    delivery: d,
                    released: false,
                    stored,
                    written: stored.is_some(),
                    gate: None,
                };
                send_inflight(&mut self.out, s, &tx, f, wait);
            }
        }
    }

    /// Registers an in-process subscriber as a session of its own.
    pub(super) fn local_subscribe(
        &mut self,
        filter: &str,
        qos: QoS,
        tx: mpsc::Sender<Arc<Message>>,
    ) -> SessionKey {
        let key = self.sessions.next_key();
        let mut s = Session::new(format!("$local-{key}").into(), outpost_mqtt::Protocol::V5);
        s.link = Some(Link::Local(tx));
        s.expiry = u32::MAX;
        let (group, inner) = match outpost_mqtt::topic::parse_shared(filter) {
            Some((g, f)) => (Some(g.to_owned()), f.to_owned()),
            None => (None, filter.to_owned()),
        };
        let entry = SubEntry {
            options: outpost_mqtt::SubscriptionOptions {
                qos,
                ..Default::default()
            },
            id: None,
        };
        self.tree.insert(&inner, group.as_deref(), key, entry);
        s.subs.insert(
            filter.to_owned(),
            SessionSub {
                group,
                filter: inner,
            },
        );
        let inserted = self.sessions.insert(Box::new(s), false);
        debug_assert_eq!(inserted, key);
        key
    }
}

/// Sends a delivery that takes an inflight slot, after `wait` (its commit) if given.
fn send_inflight(
    out: &mut super::transmit::Transmits,
    s: &mut Session,
    tx: &crate::outbound::OutboundTx,
    f: Inflight,
    wait: Option<DurableReceipt>,
) {
    let item = match wait {
        Some(wait) => Outbound::PublishAfter {
            wait,
            delivery: f.delivery.clone(),
            packet_id: f.packet_id,
        },
        None => Outbound::Publish {
            delivery: f.delivery.clone(),
            packet_id: Some(f.packet_id),
            dup: false,
        },
    };
    out.send(tx, item);
    s.flows().inflight.push_back(f);
}

/// Queues a delivery for a session that is offline or has no free inflight slot: true
/// when it was also sent to the store, or which bound refused it when the queue is full.
fn enqueue(
    s: &mut Session,
    d: Delivery,
    limits: QueueLimits,
    store: &mut Option<Store>,
) -> Result<bool, QueueFull> {
    let full = if s.queued_len() >= limits.messages {
        Some(QueueFull::Messages)
    } else if limits.bytes != 0 && s.queued_bytes() + d.queued_size() > limits.bytes {
        Some(QueueFull::Bytes)
    } else {
        None
    };
    if let Some(why) = full {
        s.dropped = s.dropped.wrapping_add(1);
        if s.dropped.is_power_of_two() {
            let key = match why {
                QueueFull::Messages => "max_queued_messages",
                QueueFull::Bytes => "max_queued_bytes",
            };
            warn!(
                client_id = %s.client_id,
                dropped = s.dropped,
                queued = s.queued_len(),
                queued_bytes = s.queued_bytes(),
                "session queue full (broker.{key}): dropping new messages for this client"
            );
        }
        return Err(why);
    }
    let stored = keep(store, s, &d);
    s.push_queued(stored, d);
    Ok(stored.is_some())
}

impl crate::sys::Stats {
    /// Counts a message a full session queue refused.
    fn count_queue_full(&mut self, full: QueueFull) {
        self.dropped_queue_full += 1;
        if matches!(full, QueueFull::Bytes) {
            self.limits.queued_bytes += 1;
        }
    }
}

/// What routing one message did that its publisher's acknowledgement depends on.
///
/// Returned rather than kept on the core, so that routing done for no publisher (`$SYS`,
/// retained messages sent on subscribe) cannot hold back the next publisher's
/// acknowledgement: whoever routes decides what to do with it.
#[must_use = "a publisher's acknowledgement waits for what routing kept"]
#[derive(Default)]
pub(super) struct Routed {
    /// A subscription matched.
    pub matched: bool,
    /// A delivery was sent to the store: the acknowledgement waits for its commit.
    pub commit: bool,
    /// Deliveries in flight to connected persistent sessions whose write is deferred
    /// (`persist.rs`): the acknowledgement waits until each is acknowledged by its
    /// client or written.
    pub gate: Option<(Arc<AckGate>, GateWait)>,
}

/// The bounds of one session's queue.
#[derive(Clone, Copy)]
struct QueueLimits {
    messages: usize,
    bytes: usize,
}

/// Which bound a full queue hit.
#[derive(Clone, Copy)]
enum QueueFull {
    Messages,
    Bytes,
}

/// Writes a queued delivery of a persistent session to the store; its id there, or
/// `None` when the session is not kept there.
fn keep(store: &mut Option<Store>, s: &Session, d: &Delivery) -> Option<DeliveryId> {
    let (store, sid) = (store.as_mut()?, s.store_id?);
    let id = store.new_delivery_id();
    store.put_delivery(id, sid, d, None);
    Some(id)
}

/// Removes a delivery's row, if it has one.
pub(super) fn forget(store: &Option<Store>, stored: Option<DeliveryId>) {
    if let Some(id) = stored
        && let Some(store) = store
    {
        store.drop_delivery(id);
    }
}

/// Combines the matches of one session into a single delivery, or `None` when No Local
/// excludes every one of them.
fn merge(msg: &Arc<Message>, matches: &[Match]) -> Option<Delivery> {
    let mut qos = None::<QoS>;
    let mut retain = false;
    let mut sub_ids = Vec::new();
    for m in matches {
        let o = &m.entry.options;
        if o.no_local && msg.origin == Some(m.session) {
            continue;
        }
        qos = Some(qos.map_or(o.qos, |q| q.max(o.qos)));
        retain |= o.retain_as_published && msg.retain;
        if let Some(id) = m.entry.id {
            sub_ids.push(id);
        }
    }
    let qos = qos?.min(msg.qos);
    Some(Delivery {
        msg: msg.clone(),
        qos,
        retain,
        sub_ids,
    })
}

/// Encoded size of the PUBLISH for this delivery (before any outbound topic alias,
/// which only makes it smaller after the first use), for Maximum Packet Size.
fn publish_size(d: &Delivery, v5: bool) -> usize {
    fn varint(n: usize) -> usize {
        match n {
            0..=127 => 1,
            128..=16_383 => 2,
            16_384..=2_097_151 => 3,
            _ => 4,
        }
    }
    let mut rem = 2 + d.msg.topic.len() + d.msg.payload.len();
    if d.qos != QoS::AtMostOnce {
        rem += 2;
    }
    if v5 {
        let p = &d.msg.properties;
        let str3 = |s: &Option<String>| s.as_ref().map_or(0, |s| 3 + s.len());
        let plen = p.payload_format_indicator.map_or(0, |_| 2)
            + d.msg.expires_at.map_or(0, |_| 5)
            + str3(&p.content_type)
            + str3(&p.response_topic)
            + p.correlation_data.as_ref().map_or(0, |b| 3 + b.len())
            + d.sub_ids
                .iter()
                .map(|&i| 1 + varint(i as usize))
                .sum::<usize>()
            + p.user_properties
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>();
        rem += varint(plen) + plen;
    }
    1 + varint(rem) + rem
}
