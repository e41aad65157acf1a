//! A packet from a connected client, handed to the module that handles its kind:
//! `publish.rs`, `ack.rs` (PUBACK, PUBREC, PUBREL, PUBCOMP), `subscribe.rs`.

use std::time::Instant;

use outpost_mqtt::Packet;

use super::Core;
use crate::outbound::{AckKind, OutboundTx};
use crate::session::Link;
use crate::subscriptions::SessionKey;

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

    pub(super) fn link_tx(&self, key: SessionKey) -> Option<OutboundTx> {
        match &self.sessions.get(key)?.link {
            Some(Link::Network { tx, .. }) => Some(tx.clone()),
            _ => None,
        }
    }
}
