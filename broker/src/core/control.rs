//! Packets from connected clients: PUBLISH and its acknowledgements, SUBSCRIBE and
//! UNSUBSCRIBE.
//!
//! # Acknowledgements and the store
//!
//! Every packet the broker sends that tells a client "this is done" leaves only after what
//! it promises is committed, when the session or message is kept on disk:
//!
//! | packet  | promises                                   | waits for                                   |
//! |---------|--------------------------------------------|---------------------------------------------|
//! | PUBACK  | the message is the broker's                | sinks, retained row, queued deliveries      |
//! | PUBREC  | the message is the broker's, once          | the same, and the incoming QoS 2 id row     |
//! | PUBCOMP | the packet id is free for a new message    | deletion of the incoming QoS 2 id row       |
//! | PUBREL  | the broker will not send that PUBLISH again| the delivery's "released" flag              |
//! | SUBACK  | the subscription holds, also after a crash | the subscription row                        |
//! | UNSUBACK| nothing more arrives on the filter          | deletion of the subscription row           |
//!
//! Acknowledgements leave in order behind each other (`Outbound::AckAfter` and
//! `ControlAfter`, MQTT-4.6.0-2), and a client's DISCONNECT closes the connection only
//! after the replies to what it sent before it.
//! Clean sessions keep nothing, so nothing of theirs waits.

use std::time::Instant;

use futures_util::FutureExt;
use outpost_mqtt::{
    Packet, Properties, PubResponse, Publish, QoS, ReasonCode, RetainHandling, SubAck, Subscribe,
    UnsubAck, Unsubscribe,
};

use super::Core;
use crate::DurableReceipt;
use crate::message::Delivery;
use crate::message::Message;
use crate::outbound::{Ack, AckKind, DurableResult, Outbound, OutboundTx};
use crate::router::{SessionKey, SubEntry};
use crate::session::{Link, SessionSub};

impl Core {
    /// Handles a packet from a connected client, received at `now`.
    pub(super) fn on_packet(&mut self, key: SessionKey, packet: Packet, now: Instant) {
        match packet {
            Packet::Publish(p) => self.on_publish(key, p, now),
            Packet::PubAck(r) => self.on_complete(key, r.packet_id, AckKind::PubAck, now),
            Packet::PubComp(r) => self.on_complete(key, r.packet_id, AckKind::PubComp, now),
            Packet::PubRec(r) => self.on_pubrec(key, r, now),
            Packet::PubRel(r) => self.on_pubrel(key, r.packet_id),
            Packet::Subscribe(s) => self.on_subscribe(key, s, now),
            Packet::Unsubscribe(u) => self.on_unsubscribe(key, u),
            // The connection task handles or rejects everything else.
            _ => {}
        }
    }

    fn link_tx(&self, key: SessionKey) -> Option<OutboundTx> {
        match &self.sessions.get(key)?.link {
            Some(Link::Network { tx, .. }) => Some(tx.clone()),
            _ => None,
        }
    }

    fn on_publish(&mut self, key: SessionKey, p: Publish, now: Instant) {
        let Some(tx) = self.link_tx(key) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        let v5 = s.protocol.is_v5();
        let packet_id = p.packet_id.unwrap_or(0);
        if p.qos == QoS::ExactlyOnce && !s.flows().incoming_qos2.insert(packet_id) {
            // MQTT-4.3.3-9 (3.1.1: 4.3.3-2): a re-sent PUBLISH before PUBREL is the same
            // message; acknowledge it again without delivering a second copy. It queues
            // behind the first one's PUBREC, so it cannot leave before that is committed.
            tx.send(Outbound::Ack(Ack::new(AckKind::PubRec, packet_id)));
            return;
        }
        let qos = p.qos;
        if let Some(refusal) = self.publish_refusal(key, &p) {
            self.refuse_publish(key, &tx, qos, packet_id, refusal);
            return;
        }
        let msg = Message::new_at(
            p.topic,
            p.payload,
            p.qos,
            p.retain,
            p.properties,
            Some(key),
            now,
        );
        let keep_id = qos == QoS::ExactlyOnce
            && self.store.is_some()
            && self.sessions.get(key).is_some_and(|s| s.store_id.is_some());
        let (receipts, wanted) = if keep_id {
            // The packet id is kept so that a resend after a restart is known as the same
            // message, in one transaction with what routing wrote (QoS 2 deliveries are
            // never deferred): after a crash the broker has either both, and answers a
            // resend with PUBREC alone, or neither, and routes the resend as new. The
            // PUBREC waits for that commit (`accept` adds the store's receipt).
            let store = self.store.as_ref().expect("checked above");
            store.begin_group();
            let (mut receipts, wanted) = self.accept(&msg, now);
            let sid = self.sessions.get(key).and_then(|s| s.store_id);
            if let (Some(store), Some(sid)) = (self.store.as_ref(), sid) {
                store.put_qos2(sid, packet_id);
                store.end_group();
                receipts.push(store.receipt());
            }
            (receipts, wanted)
        } else {
            self.accept(&msg, now)
        };
        if qos == QoS::AtMostOnce {
            return;
        }
        // 5.0: "accepted, but nobody subscribes" (a MAY; Mosquitto, EMQX and HiveMQ say
        // it too), so a publisher can notice a typo in its topic.
        let success = if v5 && !wanted && !self.sinks_want(&msg) {
            ReasonCode::NO_MATCHING_SUBSCRIBERS
        } else {
            ReasonCode::SUCCESS
        };
        let kind = if qos == QoS::AtLeastOnce {
            AckKind::PubAck
        } else {
            AckKind::PubRec
        };
        let make_ack = move |reason: ReasonCode, reason_string: Option<String>| Ack {
            kind,
            packet_id,
            reason,
            reason_string: reason_string.map(String::into_boxed_str),
        };
        if receipts.is_empty() {
            tx.send(Outbound::Ack(make_ack(success, None)));
            return;
        }
        let inbox = (qos == QoS::ExactlyOnce).then(|| self.inbox.clone());
        let wait = async move {
            let outcome = all_committed(receipts).await;
            // Tell the core before the refusal reaches the client, so a resend with
            // the same packet id is taken as a new message, not as a duplicate.
            if outcome.is_err()
                && let Some(core) = inbox.and_then(|w| w.upgrade())
            {
                let _ = core
                    .send(super::CoreEvent::Qos2Refused {
                        session: key,
                        packet_id,
                    })
                    .await;
            }
            outcome
        };
        tx.send(Outbound::AckAfter {
            wait: wait.boxed(),
            ack: Box::new(move |outcome: DurableResult| match outcome {
                Ok(()) => Some(make_ack(success, None)),
                // 5.0 publishers learn why; 3.x has no way to say no, so the message is
                // left unacknowledged and the client will send it again.
                Err(e) if v5 => Some(make_ack(e.code, Some(e.reason))),
                Err(_) => None,
            }),
        });
    }

    /// Why the broker will not take this PUBLISH, if it will not.
    fn publish_refusal(&mut self, key: SessionKey, p: &Publish) -> Option<Refusal> {
        let s = self.sessions.get(key)?;
        // $SYS belongs to the broker: a client must not forge its statistics (Mosquitto
        // refuses these too), whatever the ACL says.
        let sys = p.topic.starts_with("$SYS/") || &*p.topic == "$SYS";
        if sys || s.acl.as_ref().is_some_and(|a| !a.can_write(&p.topic)) {
            return Some(Refusal::NotAuthorized);
        }
        if let Some(bound) = self.topic_bound(&p.topic) {
            self.stats.limits.topic_levels += 1;
            tracing::warn!(
                client_id = %s.client_id,
                levels = topic_levels(&p.topic),
                bytes = p.topic.len(),
                "publish refused: its topic is longer or deeper than broker.{bound}"
            );
            return Some(Refusal::TopicTooDeep);
        }
        if p.retain
            && s.protocol.is_v5()
            && !self
                .retained
                .fits(&p.topic, p.payload.len(), self.retained_limits())
        {
            {
                self.stats.limits.retained += 1;
                tracing::warn!(
                    client_id = %s.client_id,
                    topic = %p.topic,
                    "publish refused (0x97): broker.max_retained_messages or \
                     max_retained_bytes reached"
                );
                return Some(Refusal::RetainedFull);
            }
        }
        if p.retain
            && self.store.as_ref().is_some_and(|st| st.is_refusing())
            && p.qos != QoS::AtMostOnce
        {
            // Refused before it changes anything: the retained value in memory stays the
            // one on disk, and the publisher sends it again once the disk has room.
            return Some(Refusal::StoreFull);
        }
        None
    }

    /// The bound a topic name or filter breaks, if any.
    fn topic_bound(&self, topic: &str) -> Option<&'static str> {
        let levels = self.settings.max_topic_levels;
        if levels != 0 && topic_levels(topic) > levels {
            Some("max_topic_levels")
        } else if topic.len() > self.settings.max_topic_length {
            Some("max_topic_length")
        } else {
            None
        }
    }

    /// Answers a PUBLISH that is refused: 5.0 learns why; 3.x cannot be told, so a message
    /// refused by policy is acknowledged and dropped (as Mosquitto does), and one the
    /// store cannot keep is left unacknowledged, to be sent again.
    fn refuse_publish(
        &mut self,
        key: SessionKey,
        tx: &OutboundTx,
        qos: QoS,
        packet_id: u16,
        refusal: Refusal,
    ) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if qos == QoS::AtMostOnce {
            return;
        }
        let v5 = s.protocol.is_v5();
        let kind = if qos == QoS::AtLeastOnce {
            AckKind::PubAck
        } else {
            AckKind::PubRec
        };
        let mut ack = Ack::new(kind, packet_id);
        let ends_exchange = v5 || refusal == Refusal::StoreFull;
        if v5 {
            ack.reason = match refusal {
                Refusal::NotAuthorized => ReasonCode::NOT_AUTHORIZED,
                Refusal::TopicTooDeep => ReasonCode::TOPIC_NAME_INVALID,
                Refusal::StoreFull | Refusal::RetainedFull => ReasonCode::QUOTA_EXCEEDED,
            };
        }
        if qos == QoS::ExactlyOnce && ends_exchange {
            // A failing PUBREC (or none at all) ends the exchange; no PUBREL will come,
            // and a resend is a new message. The id was never written for this PUBLISH.
            s.end_incoming_qos2(packet_id);
        }
        if v5 || refusal != Refusal::StoreFull {
            tx.send(Outbound::Ack(ack));
        }
    }

    /// Sends `ack` once everything the store was given so far is committed, when the
    /// session's state is kept on disk (`kept`); at once otherwise. Every acknowledgement
    /// that promises something about state on disk goes through here (see the ordering
    /// note at the top of this file).
    fn ack_after_commit(&self, tx: &OutboundTx, ack: Ack, kept: bool) {
        match self.store.as_ref().filter(|_| kept) {
            Some(store) => {
                tx.send(Outbound::AckAfter {
                    wait: store.receipt(),
                    // Not committed: the client is not told, so it sends its packet again
                    // after reconnecting and the change is made again.
                    ack: Box::new(move |outcome: DurableResult| outcome.is_ok().then_some(ack)),
                });
            }
            None => {
                tx.send(Outbound::Ack(ack));
            }
        }
    }

    /// Sends a SUBACK or UNSUBACK once the session's subscription rows are committed,
    /// when they are kept on disk (`kept`); at once otherwise.
    fn control_after_commit(&self, tx: &OutboundTx, packet: Packet, kept: bool) {
        match self.store.as_ref().filter(|_| kept) {
            Some(store) => {
                tx.send(Outbound::ControlAfter {
                    wait: store.receipt(),
                    packet: Box::new(packet),
                });
            }
            None => {
                tx.send(Outbound::Control(Box::new(packet)));
            }
        }
    }

    /// Whether the client's acknowledgement `kind` fits the exchange in flight with its
    /// packet id; a wrong one closes the connection (3.1.1 MQTT-4.8.0-1, 5.0 4.13: a
    /// protocol violation, 0x82). Unknown ids are let pass: a late acknowledgement after
    /// a resend is not a violation.
    fn ack_fits(&mut self, key: SessionKey, packet_id: u16, kind: AckKind) -> bool {
        let Some(s) = self.sessions.get_mut(key) else {
            return false;
        };
        let Some(f) = s.inflight().find(|f| f.packet_id == packet_id) else {
            return true;
        };
        let fits = match kind {
            AckKind::PubAck => f.delivery.qos == QoS::AtLeastOnce,
            AckKind::PubRec => f.delivery.qos == QoS::ExactlyOnce,
            AckKind::PubComp => f.delivery.qos == QoS::ExactlyOnce && f.released,
            AckKind::PubRel => false,
        };
        if !fits {
            tracing::info!(
                client_id = %s.client_id,
                packet_id,
                ack = ?kind,
                qos = f.delivery.qos as u8,
                "protocol error: an acknowledgement of the wrong kind for the message in \
                 flight; closing the connection"
            );
            if let Some(tx) = self.link_tx(key) {
                tx.send(Outbound::Disconnect(ReasonCode::PROTOCOL_ERROR));
            }
        }
        fits
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) ends an outgoing exchange.
    fn on_complete(&mut self, key: SessionKey, packet_id: u16, kind: AckKind, now: Instant) {
        if !self.ack_fits(key, packet_id, kind) {
            return;
        }
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if let Some(f) = s.take_inflight(packet_id) {
            // Acknowledged before it was written: nothing on disk to remove.
            if f.written {
                super::route::forget(&self.store, f.stored);
            }
            self.pump(key, now);
        }
    }

    fn on_pubrec(&mut self, key: SessionKey, r: PubResponse, now: Instant) {
        let Some(tx) = self.link_tx(key) else {
            return;
        };
        if !self.ack_fits(key, r.packet_id, AckKind::PubRec) {
            return;
        }
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if r.reason.is_error() {
            // 5.0: PUBREL only follows a PUBREC below 0x80 (MQTT-4.3.3-4); a failing one
            // ends the exchange, so free the slot.
            if let Some(f) = s.take_inflight(r.packet_id) {
                if f.written {
                    super::route::forget(&self.store, f.stored);
                }
                self.pump(key, now);
            }
            return;
        }
        let mut rel = Ack::new(AckKind::PubRel, r.packet_id);
        let v5 = s.protocol.is_v5();
        let mut kept = false;
        let sid = s.store_id;
        let found = s
            .flows()
            .inflight
            .iter_mut()
            .find(|f| f.packet_id == r.packet_id);
        match found {
            Some(f) => {
                f.released = true;
                // The client has the message: its publisher need not wait for it.
                f.gate = None;
                if let Some(store) = &self.store
                    && let Some(stored) = f.stored
                    && let Some(sid) = sid
                {
                    if !f.written {
                        // Acknowledged inside the write grace, but the client now holds
                        // the packet id until PUBREL: that PUBREL must survive a crash, or
                        // a resumed session never completes the exchange and the id's next
                        // message is taken for a duplicate. Only PUBREL is ever resent
                        // from here, so the row needs no payload.
                        let mut stub = f.delivery.clone();
                        let mut msg = (*stub.msg).clone();
                        msg.payload = bytes::Bytes::new();
                        stub.msg = std::sync::Arc::new(msg);
                        store.put_delivery(stored, sid, &stub, Some(f.packet_id));
                        f.written = true;
                    }
                    store.released(stored);
                    kept = true;
                }
            }
            None if v5 => rel.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            None => {}
        }
        s.release_flows_if_empty();
        // PUBREL after "released" is on disk: a restart then resends PUBREL, never the
        // PUBLISH that the client, having completed the exchange, would take as new.
        self.ack_after_commit(&tx, rel, kept);
    }

    fn on_pubrel(&mut self, key: SessionKey, packet_id: u16) {
        let Some(tx) = self.link_tx(key) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        let mut comp = Ack::new(AckKind::PubComp, packet_id);
        let mut kept = false;
        if s.end_incoming_qos2(packet_id) {
            if let Some(sid) = s.store_id
                && let Some(store) = &self.store
            {
                store.drop_qos2(sid, packet_id);
                kept = true;
            }
        } else if s.protocol.is_v5() {
            comp.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
        }
        // PUBCOMP frees the packet id for the client's next message: the id must be gone
        // from disk first, or after a crash that next message is taken for a duplicate of
        // this one and never delivered (issue #17).
        self.ack_after_commit(&tx, comp, kept);
    }

    fn on_subscribe(&mut self, key: SessionKey, sub: Subscribe, now: Instant) {
        let Some(tx) = self.link_tx(key) else {
            return;
        };
        let sub_id = sub.properties.subscription_identifiers.first().copied();
        let mut reason_codes = Vec::with_capacity(sub.filters.len());
        let mut retained_for = Vec::new();
        for f in sub.filters {
            let (group, inner) = match outpost_mqtt::topic::parse_shared(&f.filter) {
                Some((g, i)) => (Some(g.to_owned()), i.to_owned()),
                None => (None, f.filter.clone()),
            };
            if group.is_some() && f.options.no_local {
                // MQTT-3.8.3-4: No Local on a shared subscription is a protocol error.
                tx.send(Outbound::Disconnect(ReasonCode::PROTOCOL_ERROR));
                return;
            }
            if self
                .sessions
                .get(key)
                .and_then(|s| s.acl.as_ref())
                .is_some_and(|a| !a.can_subscribe(&inner))
            {
                // Nothing on this filter could ever be delivered: 0x87 on 5.0, which the
                // codec sends as 0x80, the one failure code of 3.1.1 (MQTT-3.9.3-2).
                reason_codes.push(ReasonCode::NOT_AUTHORIZED);
                continue;
            }
            if let Some(bound) = self.topic_bound(&inner) {
                // Well formed but not allowed here: 0x8F (3.1.1: 0x80). The tree would be
                // safe at any depth; this bounds the memory one filter can take.
                self.stats.limits.topic_levels += 1;
                tracing::warn!(
                    client_id = %self.sessions.get(key).map_or("", |s| &s.client_id),
                    levels = topic_levels(&inner),
                    bytes = inner.len(),
                    "subscription refused: its filter is longer or deeper than broker.{bound}"
                );
                reason_codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                continue;
            }
            let max_subs = self.settings.max_subscriptions_per_client;
            if max_subs != 0
                && let Some(s) = self.sessions.get(key)
                && !s.subs.contains_key(&f.filter)
                && s.subs.len() >= max_subs
            {
                // 0x97 Quota exceeded (3.1.1: 0x80); the client may replace or drop one.
                self.stats.limits.subscriptions += 1;
                tracing::warn!(
                    client_id = %s.client_id,
                    max_subscriptions_per_client = max_subs,
                    "subscription refused: the session holds broker.max_subscriptions_per_client"
                );
                reason_codes.push(ReasonCode::QUOTA_EXCEEDED);
                continue;
            }
            let entry = SubEntry {
                options: f.options,
                id: sub_id,
            };
            let existed = self.tree.insert(&inner, group.as_deref(), key, entry);
            let s = self.sessions.get_mut(key).expect("connected session");
            s.subs.insert(
                f.filter.clone(),
                SessionSub {
                    group: group.clone(),
                    filter: inner.clone(),
                },
            );
            if let Some(sid) = s.store_id
                && let Some(store) = &self.store
            {
                store.put_sub(sid, &f.filter, f.options, sub_id);
            }
            reason_codes.push(ReasonCode(f.options.qos as u8));
            // Shared subscriptions never receive retained messages on subscribe.
            let send_retained = group.is_none()
                && match f.options.retain_handling {
                    RetainHandling::SendAtSubscribe => true,
                    RetainHandling::SendIfNew => !existed,
                    RetainHandling::DoNotSend => false,
                };
            if send_retained {
                retained_for.push((inner, entry));
            }
        }
        let kept = self.sessions.get(key).is_some_and(|s| s.store_id.is_some());
        let suback = Packet::SubAck(SubAck {
            packet_id: sub.packet_id,
            reason_codes,
            properties: Properties::default(),
        });
        self.control_after_commit(&tx, suback, kept);
        // Retained messages queued for a persistent session here belong to no publisher's
        // acknowledgement: what routing them keeps is nobody's to wait for.
        let mut for_no_publisher = super::route::Routed::default();
        for (filter, entry) in retained_for {
            let before = self.stats.dropped_slow_client + self.stats.dropped_queue_full;
            let matching = self.retained.matching(&filter, now);
            let total = matching.len();
            for msg in matching {
                // MQTT-3.3.1-8: retained messages sent on subscribe carry RETAIN=1.
                let d = Delivery {
                    qos: msg.qos.min(entry.options.qos),
                    msg,
                    retain: true,
                    sub_ids: entry.id.into_iter().collect(),
                };
                self.deliver(key, d, now, &mut for_no_publisher);
            }
            let cut = self.stats.dropped_slow_client + self.stats.dropped_queue_full - before;
            if cut > 0 {
                // The bounds: QoS 0 ones what the client's socket backlog holds (8 MiB),
                // QoS 1/2 ones its session queue (max_queued_messages/_bytes). Counted in
                // $SYS/broker/messages/dropped/{slow_client,queue_full}.
                tracing::warn!(
                    client_id = %self.sessions.get(key).map_or("", |s| &s.client_id),
                    filter = %filter,
                    retained = total,
                    not_sent = cut,
                    "a new subscription matched more retained messages than the client's \
                     backlog holds; the rest were not sent (subscribe to narrower filters, \
                     or at QoS 1 with a larger broker.max_queued_messages)"
                );
            }
        }
    }

    fn on_unsubscribe(&mut self, key: SessionKey, u: Unsubscribe) {
        let Some(tx) = self.link_tx(key) else {
            return;
        };
        let mut reason_codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let s = self.sessions.get_mut(key).expect("connected session");
            let code = match s.subs.remove(f) {
                Some(sub) => {
                    if let Some(sid) = s.store_id
                        && let Some(store) = &self.store
                    {
                        store.drop_sub(sid, f);
                    }
                    self.tree.remove(&sub.filter, sub.group.as_deref(), key);
                    ReasonCode::SUCCESS
                }
                None => ReasonCode::NO_SUBSCRIPTION_EXISTED,
            };
            reason_codes.push(code);
        }
        let kept = self.sessions.get(key).is_some_and(|s| s.store_id.is_some());
        let unsuback = Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reason_codes,
            properties: Properties::default(),
        });
        self.control_after_commit(&tx, unsuback, kept);
    }
}

/// Why a PUBLISH is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// `$SYS`, or the ACL does not let the client write there.
    NotAuthorized,
    /// More topic levels than `max_topic_levels`.
    TopicTooDeep,
    /// The store cannot write and the message would have to be kept.
    StoreFull,
    /// A retained message past `max_retained_messages`/`_bytes` (5.0 only).
    RetainedFull,
}

/// Levels of a topic name or filter.
pub(super) fn topic_levels(topic: &str) -> usize {
    topic.bytes().filter(|&b| b == b'/').count() + 1
}

/// Resolves when every receipt is committed, or with the first refusal.
async fn all_committed(receipts: Vec<DurableReceipt>) -> DurableResult {
    for r in receipts {
        r.await?;
    }
    Ok(())
}
