//! SUBSCRIBE and UNSUBSCRIBE from a connected client: ACL and bounds, the subscription
//! tree, retained messages on subscribe, and SUBACK/UNSUBACK after their commit.

use std::time::Instant;

use outpost_mqtt::{
    Packet, Properties, ReasonCode, RetainHandling, SubAck, Subscribe, UnsubAck, Unsubscribe,
};

use super::Core;
use super::publish::topic_levels;
use crate::message::Delivery;
use crate::outbound::Outbound;
use crate::session::SessionSub;
use crate::subscriptions::{SessionKey, SubEntry};

impl Core {
    pub(super) fn on_subscribe(&mut self, key: SessionKey, sub: Subscribe, now: Instant) {
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
                self.out
                    .send(&tx, Outbound::Disconnect(ReasonCode::PROTOCOL_ERROR));
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
            let before = self.stats.dropped_queue_full;
            let matching = self.retained.matching(&filter, now);
            self.forget_expired_retained();
            let client_id = self
                .sessions
                .get(key)
                .map_or_else(String::new, |s| s.client_id.to_string());
            // Told once the QoS 0 ones a slow client's backlog refuses are known
            // (`transmit.rs`), with those a full session queue refused here.
            self.out.begin_retained(client_id, filter, matching.len());
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
            self.out
                .end_retained(self.stats.dropped_queue_full - before);
        }
    }

    pub(super) fn on_unsubscribe(&mut self, key: SessionKey, u: Unsubscribe) {
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
