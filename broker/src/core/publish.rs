//! PUBLISH from a connected client: checks (ACL, topic bounds, the store's room), the
//! refusal a 5.0 client is told, and acceptance (routing is in `route.rs`).

use std::time::Instant;

use futures_util::FutureExt;
use outpost_mqtt::{Publish, QoS, ReasonCode};

use super::Core;
use super::ack::all_committed;
use crate::message::Message;
use crate::outbound::{Ack, AckKind, DurableResult, Outbound, OutboundTx};
use crate::subscriptions::SessionKey;

impl Core {
    pub(super) fn on_publish(&mut self, key: SessionKey, p: Publish, now: Instant) {
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
            self.out
                .send(&tx, Outbound::Ack(Ack::new(AckKind::PubRec, packet_id)));
            return;
        }
        let qos = p.qos;
        if let Some(refusal) = self.publish_refusal(key, &p, now) {
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
            self.out.send(&tx, Outbound::Ack(make_ack(success, None)));
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
        self.out.send(
            &tx,
            Outbound::AckAfter {
                wait: wait.boxed(),
                ack: Box::new(move |outcome: DurableResult| match outcome {
                    Ok(()) => Some(make_ack(success, None)),
                    // 5.0 publishers learn why; 3.x has no way to say no, so the message is
                    // left unacknowledged and the client will send it again.
                    Err(e) if v5 => Some(make_ack(e.code, Some(e.reason))),
                    Err(_) => None,
                }),
            },
        );
    }

    /// Why the broker will not take this PUBLISH, if it will not.
    fn publish_refusal(&mut self, key: SessionKey, p: &Publish, now: Instant) -> Option<Refusal> {
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
                .fits_at(&p.topic, p.payload.len(), self.retained_limits(), now)
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
    pub(super) fn topic_bound(&self, topic: &str) -> Option<&'static str> {
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
            self.out.send(tx, Outbound::Ack(ack));
        }
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
