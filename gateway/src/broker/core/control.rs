//! Packets from connected clients: PUBLISH and its acknowledgements, SUBSCRIBE and
//! UNSUBSCRIBE.

use std::time::Instant;

use futures_util::FutureExt;
use outpost_mqtt::{
    Packet, Properties, PubResponse, Publish, QoS, ReasonCode, RetainHandling, SubAck, Subscribe,
    UnsubAck, Unsubscribe,
};

use super::Core;
use crate::broker::DurableReceipt;
use crate::broker::message::Message;
use crate::broker::outbound::{Ack, AckKind, DurableResult, Outbound, OutboundTx};
use crate::broker::router::{SessionKey, SubEntry};
use crate::broker::session::{Delivery, Link, SessionSub};

impl Core {
    pub(super) fn on_packet(&mut self, key: SessionKey, packet: Packet) {
        match packet {
            Packet::Publish(p) => self.on_publish(key, p),
            Packet::PubAck(r) | Packet::PubComp(r) => self.on_complete(key, r.packet_id),
            Packet::PubRec(r) => self.on_pubrec(key, r),
            Packet::PubRel(r) => self.on_pubrel(key, r.packet_id),
            Packet::Subscribe(s) => self.on_subscribe(key, s),
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

    fn on_publish(&mut self, key: SessionKey, p: Publish) {
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
            // message; acknowledge it again without delivering a second copy.
            tx.send(Outbound::Ack(Ack::new(AckKind::PubRec, packet_id)));
            return;
        }
        if p.qos == QoS::ExactlyOnce
            && s.store_id != 0
            && let Some(store) = &self.store
        {
            // Kept so that a resend after a restart is still known as the same message.
            store.put_qos2(s.store_id, packet_id);
            self.commit_needed = true;
        }
        let qos = p.qos;
        // $SYS belongs to the broker: a client must not forge its statistics (Mosquitto
        // refuses these too), whatever the ACL says.
        let sys = p.topic.starts_with("$SYS/") || &*p.topic == "$SYS";
        if sys || s.acl.as_ref().is_some_and(|a| !a.can_write(&p.topic)) {
            // Not allowed: 5.0 is told (0x87); 3.x cannot be, so, as Mosquitto does, the
            // message is acknowledged and dropped.
            if qos != QoS::AtMostOnce {
                let kind = if qos == QoS::AtLeastOnce {
                    AckKind::PubAck
                } else {
                    AckKind::PubRec
                };
                let mut ack = Ack::new(kind, packet_id);
                if v5 {
                    ack.reason = ReasonCode::NOT_AUTHORIZED;
                    if qos == QoS::ExactlyOnce {
                        // A failing PUBREC ends the exchange; no PUBREL will come.
                        s.end_incoming_qos2(packet_id);
                        if s.store_id != 0
                            && let Some(store) = &self.store
                        {
                            store.drop_qos2(s.store_id, packet_id);
                        }
                    }
                }
                tx.send(Outbound::Ack(ack));
            }
            self.commit_needed = false;
            return;
        }
        let msg = Message::new(p.topic, p.payload, p.qos, p.retain, p.properties, Some(key));
        let (receipts, wanted) = self.accept(&msg);
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

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) ends an outgoing exchange.
    fn on_complete(&mut self, key: SessionKey, packet_id: u16) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if let Some(f) = s.take_inflight(packet_id) {
            // Acknowledged before it was written: nothing on disk to remove.
            if f.written {
                super::route::forget(&self.store, f.stored);
            }
            self.pump(key, Instant::now());
        }
    }

    fn on_pubrec(&mut self, key: SessionKey, r: PubResponse) {
        let Some(tx) = self.link_tx(key) else {
            return;
        };
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
                self.pump(key, Instant::now());
            }
            return;
        }
        let mut rel = Ack::new(AckKind::PubRel, r.packet_id);
        let v5 = s.protocol.is_v5();
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
                if f.written
                    && let Some(store) = &self.store
                {
                    store.released(f.stored);
                }
            }
            None if v5 => rel.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            None => {}
        }
        s.release_flows_if_empty();
        tx.send(Outbound::Ack(rel));
    }

    fn on_pubrel(&mut self, key: SessionKey, packet_id: u16) {
        let Some(tx) = self.link_tx(key) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        let mut comp = Ack::new(AckKind::PubComp, packet_id);
        if s.end_incoming_qos2(packet_id) {
            if s.store_id != 0
                && let Some(store) = &self.store
            {
                store.drop_qos2(s.store_id, packet_id);
            }
        } else if s.protocol.is_v5() {
            comp.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
        }
        tx.send(Outbound::Ack(comp));
    }

    fn on_subscribe(&mut self, key: SessionKey, sub: Subscribe) {
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
            if s.store_id != 0
                && let Some(store) = &self.store
            {
                store.put_sub(s.store_id, &f.filter, f.options, sub_id);
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
        tx.send(Outbound::Control(Box::new(Packet::SubAck(SubAck {
            packet_id: sub.packet_id,
            reason_codes,
            properties: Properties::default(),
        }))));
        let now = Instant::now();
        for (filter, entry) in retained_for {
            for msg in self.retained.matching(&filter, now) {
                // MQTT-3.3.1-8: retained messages sent on subscribe carry RETAIN=1.
                let d = Delivery {
                    qos: msg.qos.min(entry.options.qos),
                    msg,
                    retain: true,
                    sub_ids: entry.id.into_iter().collect(),
                };
                self.deliver(key, d, now);
            }
        }
        // Retained messages queued for a persistent session here belong to no publisher's
        // acknowledgement.
        self.commit_needed = false;
        self.pending_gate = None;
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
                    if s.store_id != 0
                        && let Some(store) = &self.store
                    {
                        store.drop_sub(s.store_id, f);
                    }
                    self.tree.remove(&sub.filter, sub.group.as_deref(), key);
                    ReasonCode::SUCCESS
                }
                None => ReasonCode::NO_SUBSCRIPTION_EXISTED,
            };
            reason_codes.push(code);
        }
        tx.send(Outbound::Control(Box::new(Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reason_codes,
            properties: Properties::default(),
        }))));
    }
}

/// Resolves when every receipt is committed, or with the first refusal.
async fn all_committed(receipts: Vec<DurableReceipt>) -> DurableResult {
    for r in receipts {
        r.await?;
    }
    Ok(())
}
