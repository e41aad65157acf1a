//! CONNECT, takeover, session resume and the end of a connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_mqtt::{ConnAck, Disconnect, Packet, Properties, Protocol, ReasonCode};
use tracing::{info, warn};

use super::timers::Timer;
use super::{ConnectRequest, Core};
use crate::acl::ClientAcl;
use crate::message::Message;
use crate::outbound::{Ack, AckKind, Outbound};
use crate::session::{ClientId, Link, Session};
use crate::subscriptions::SessionKey;

impl Core {
    pub(super) fn on_connect(&mut self, req: ConnectRequest, now: Instant) {
        let ConnectRequest {
            connect,
            peer,
            listener,
            tx,
            reply,
        } = req;
        let v5 = connect.protocol.is_v5();
        let refuse = |out: &mut super::transmit::Transmits, reason: ReasonCode, reply| {
            out.send(
                &tx,
                Outbound::Control(Box::new(Packet::ConnAck(ConnAck {
                    session_present: false,
                    reason,
                    properties: Properties::default(),
                }))),
            );
            out.send(&tx, Outbound::Close);
            // Answered after its CONNACK and close are queued: the connection takes them
            // from its queue once it hears back.
            out.answer(&tx, reply, None);
        };

        let mut assigned = None;
        let client_id: ClientId = if connect.client_id.is_empty() {
            // MQTT-3.1.3-8: 3.1.1 needs clean session for a server-assigned id; 3.1
            // requires an id outright.
            if !v5 && (!connect.clean_start || connect.protocol == Protocol::V3_1) {
                refuse(
                    &mut self.out,
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    reply,
                );
                return;
            }
            let id = format!("outpost-{:016x}", rand_u64());
            if v5 {
                assigned = Some(id.clone());
            }
            id.into()
        } else {
            connect.client_id.as_str().into()
        };

        let mut expiry = if v5 {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        if let Some(max) = self.settings.max_session_expiry {
            expiry = expiry.min(max);
        }

        let max_sessions = self.settings.max_sessions;
        if max_sessions != 0
            && self.sessions.key_of(&client_id).is_none()
            && self.sessions.len() >= max_sessions
        {
            self.stats.limits.sessions += 1;
            warn!(
                client_id = %client_id,
                max_sessions,
                "connection refused: the broker holds broker.max_sessions sessions \
                 (persistent ones included); raise it or lower max_session_expiry"
            );
            // 5.0: 0x97 Quota exceeded; 3.1.1: 3 Server unavailable.
            refuse(&mut self.out, ReasonCode::QUOTA_EXCEEDED, reply);
            return;
        }

        let conn_id = self.next_conn_id;
        self.next_conn_id = conn_id.next();

        let mut session_present = false;
        if let Some(key) = self.sessions.key_of(&client_id) {
            // A session with expiry 0 (3.1.1 clean session) ends with its connection, so
            // a takeover never resumes it (MQTT-3.1.2-6, MQTT-3.2.2-3).
            let ends = connect.clean_start || self.sessions.get(key).is_some_and(|s| s.expiry == 0);
            self.take_over(key, ends, now);
            if ends {
                // A delayed will still pending is due when its session ends (MQTT-3.1.3-9).
                if let Some(w) = self.sessions.get_mut(key).and_then(|s| s.will.take()) {
                    self.publish_will(key, w, now);
                }
                self.end_session(key);
            } else {
                session_present = true;
            }
        }
        let existing = if session_present {
            self.sessions.key_of(&client_id)
        } else {
            None
        };
        let key = match existing {
            Some(key) => key,
            None => self.sessions.insert(
                Box::new(Session::new(client_id.clone(), connect.protocol)),
                true,
            ),
        };

        let s = self.sessions.get_mut(key).expect("session just ensured");
        s.protocol = connect.protocol;
        s.expiry = expiry;
        s.generation = s.generation.wrapping_add(1);
        // Connected again: the will and expiry set at its last disconnect are void.
        self.timers.cancel_session(key);
        s.acl = ClientAcl::resolve(
            self.settings.acl_for(listener),
            connect.username.as_deref(),
            &client_id,
        )
        .map(Box::new);
        if connect.username.is_some() || listener.is_some() {
            let origin = super::ClientOrigin {
                user: connect.username.as_deref().map(Arc::from),
                listener,
            };
            self.users.insert(key, origin);
        } else {
            self.users.remove(&key);
        }
        // A will on a topic the client may not publish to is dropped at connect, as
        // Mosquitto does; it could never be delivered.
        s.will = connect
            .will
            .clone()
            .filter(|w| s.acl.as_ref().is_none_or(|a| a.can_write(&w.topic)))
            .map(|w| Box::new(detach_will(w)));
        s.send_quota = connect
            .properties
            .receive_maximum
            .unwrap_or(u16::MAX)
            .min(self.settings.max_inflight);
        s.max_packet_size = connect.properties.maximum_packet_size.unwrap_or(0);
        s.link = Some(Link::Network {
            conn_id,
            tx: tx.clone(),
        });
        self.persist_session(key);

        let mut properties = Properties::default();
        if v5 {
            properties.assigned_client_identifier = assigned;
            properties.receive_maximum = Some(self.settings.receive_maximum);
            properties.maximum_packet_size =
                Some(u32::try_from(self.settings.max_packet_size).unwrap_or(u32::MAX));
            properties.topic_alias_maximum = Some(self.settings.topic_alias_maximum);
            if connect
                .properties
                .session_expiry_interval
                .is_some_and(|e| e > expiry)
            {
                properties.session_expiry_interval = Some(expiry);
            }
            if connect.keep_alive > self.settings.max_keepalive
                || (connect.keep_alive == 0 && self.settings.max_keepalive < u16::MAX)
            {
                properties.server_keep_alive = Some(self.settings.max_keepalive);
            }
        }
        self.out.send(
            &tx,
            Outbound::Control(Box::new(Packet::ConnAck(ConnAck {
                session_present,
                reason: ReasonCode::SUCCESS,
                properties,
            }))),
        );
        self.stats.connects += 1;
        info!(
            %conn_id,
            %peer,
            client_id = %client_id,
            user = connect.username.as_deref().unwrap_or(""),
            protocol = connect.protocol.name(),
            session_present,
            "client connected"
        );

        // MQTT-4.4.0-1: resend unacknowledged PUBLISH (DUP) and PUBREL in original order.
        let s = self.sessions.get_mut(key).expect("session exists");
        for f in s.inflight() {
            if f.released {
                self.out
                    .send(&tx, Outbound::Ack(Ack::new(AckKind::PubRel, f.packet_id)));
            } else {
                self.out.send(
                    &tx,
                    Outbound::Publish {
                        delivery: f.delivery.clone(),
                        packet_id: Some(f.packet_id),
                        dup: true,
                    },
                );
            }
        }
        self.pump(key, now);
        // After everything queued for the connection above: it takes that from its
        // queue once it hears back.
        self.out.answer(
            &tx,
            reply,
            Some(super::Accepted {
                session: key,
                conn_id,
            }),
        );
    }

    /// Closes the current connection of a session that a new CONNECT claims.
    fn take_over(&mut self, key: SessionKey, clean_start: bool, now: Instant) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if let Some(Link::Network { tx, .. }) = s.link.take() {
            info!(client_id = %s.client_id, "session taken over by a new connection");
            self.out
                .send(&tx, Outbound::Disconnect(ReasonCode::SESSION_TAKEN_OVER));
            // The old connection ended without DISCONNECT: its will is due. A delayed will
            // is cancelled by the new connection (MQTT-3.1.3-9) unless the session ends now.
            let will = s.will.take();
            let delay = will
                .as_ref()
                .and_then(|w| w.properties.will_delay_interval)
                .unwrap_or(0);
            if let Some(w) = will
                && (delay == 0 || clean_start)
            {
                self.publish_will(key, w, now);
            }
        }
    }

    pub(super) fn on_closed(
        &mut self,
        key: SessionKey,
        conn_id: super::ConnId,
        disconnect: Option<Disconnect>,
        reason: Option<ReasonCode>,
        now: Instant,
    ) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.conn_id() != Some(conn_id) {
            return;
        }
        s.link = None;
        let user = self.users.remove(&key);
        let publish_will = match &disconnect {
            None => true,
            Some(d) => {
                // 5.0: a DISCONNECT may shorten or extend the session expiry, except from
                // zero (MQTT-3.14.2-2 makes that a protocol error; we keep zero).
                if let Some(e) = d.properties.session_expiry_interval
                    && s.expiry != 0
                {
                    s.expiry = self.settings.max_session_expiry.map_or(e, |m| e.min(m));
                }
                d.reason == ReasonCode::DISCONNECT_WITH_WILL_MESSAGE
            }
        };
        let why = match (&disconnect, reason) {
            (_, Some(r)) => r.describe(),
            (Some(_), None) => "client sent DISCONNECT",
            (None, None) => "connection lost",
        };
        info!(
            %conn_id,
            client_id = %s.client_id,
            user = user.as_ref().and_then(|o| o.user.as_deref()).unwrap_or(""),
            reason = why,
            "client disconnected"
        );
        if !publish_will {
            s.will = None;
        }
        let expiry = s.expiry;
        let generation = s.generation;
        let will_delay = s
            .will
            .as_ref()
            .map(|w| w.properties.will_delay_interval.unwrap_or(0));

        if expiry == 0 {
            if let Some(w) = self.sessions.get_mut(key).and_then(|s| s.will.take()) {
                self.publish_will(key, w, now);
            }
            self.end_session(key);
            return;
        }
        self.persist_session(key);
        // Offline now: what it still owes the client is written at once.
        self.flush_session(key);
        match will_delay {
            Some(0) => {
                if let Some(w) = self.sessions.get_mut(key).and_then(|s| s.will.take()) {
                    self.publish_will(key, w, now);
                }
            }
            Some(delay) => {
                // MQTT-3.1.3-9: the will waits for the delay or the end of the session,
                // whichever comes first.
                let after = Duration::from_secs(u64::from(delay.min(expiry)));
                self.timers
                    .push_after(now, after, Timer::Will { key, generation });
            }
            None => {}
        }
        if expiry != u32::MAX {
            let after = Duration::from_secs(u64::from(expiry));
            self.timers
                .push_after(now, after, Timer::Expire { key, generation });
        }
    }

    /// Publishes a session's will at `now`.
    pub(super) fn publish_will(
        &mut self,
        key: SessionKey,
        will: Box<outpost_mqtt::Will>,
        now: Instant,
    ) {
        let mut will = *will;
        // Will Delay Interval is a will property only; PUBLISH may not carry it.
        will.properties.will_delay_interval = None;
        self.stats.wills += 1;
        let msg = Message::new_at(
            will.topic,
            will.payload,
            will.qos,
            will.retain,
            will.properties,
            Some(key),
            now,
        );
        // A will is not acknowledged to anyone, so durable receipts are not awaited.
        let _ = self.accept(&msg, now);
    }

    /// Removes a session and everything it subscribed to.
    pub(crate) fn end_session(&mut self, key: SessionKey) {
        self.users.remove(&key);
        self.timers.cancel_session(key);
        let Some(s) = self.sessions.remove(key) else {
            return;
        };
        if let Some(sid) = s.store_id
            && let Some(store) = &self.store
        {
            store.drop_session(sid);
        }
        for sub in s.subs.values() {
            self.tree.remove(&sub.filter, sub.group.as_deref(), key);
        }
    }
}

/// A random value for assigned client identifiers, without pulling in an RNG crate:
/// std's hasher keys are random per process and step with every `RandomState`, so each
/// call gives a new value without reading the clock.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish()
}

/// Copies the will's topic and payload out of the CONNECT's receive buffer, so a
/// long-lived session does not keep that whole buffer alive.
fn detach_will(mut w: outpost_mqtt::Will) -> outpost_mqtt::Will {
    w.topic = bytestring::ByteString::from(&*w.topic);
    w.payload = bytes::Bytes::copy_from_slice(&w.payload);
    w
}
