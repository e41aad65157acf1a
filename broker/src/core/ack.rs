//! Acknowledgements: PUBACK, PUBREC, PUBREL and PUBCOMP from clients, and the order in
//! which the broker's own acknowledgements leave.
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

use outpost_mqtt::{Packet, PubResponse, QoS, ReasonCode};

use super::Core;
use crate::DurableReceipt;
use crate::outbound::{Ack, AckKind, DurableResult, Outbound, OutboundTx};
use crate::subscriptions::SessionKey;

impl Core {
    /// Sends `ack` once everything the store was given so far is committed, when the
    /// session's state is kept on disk (`kept`); at once otherwise. Every acknowledgement
    /// that promises something about state on disk goes through here (see the ordering
    /// note at the top of this file).
    fn ack_after_commit(&mut self, tx: &OutboundTx, ack: Ack, kept: bool) {
        match self.store.as_ref().filter(|_| kept) {
            Some(store) => {
                self.out.send(
                    tx,
                    Outbound::AckAfter {
                        wait: store.receipt(),
                        // Not committed: the client is not told, so it sends its packet again
                        // after reconnecting and the change is made again.
                        ack: Box::new(move |outcome: DurableResult| outcome.is_ok().then_some(ack)),
                    },
                );
            }
            None => {
                self.out.send(tx, Outbound::Ack(ack));
            }
        }
    }

    /// Sends a SUBACK or UNSUBACK once the session's subscription rows are committed,
    /// when they are kept on disk (`kept`); at once otherwise.
    pub(super) fn control_after_commit(&mut self, tx: &OutboundTx, packet: Packet, kept: bool) {
        match self.store.as_ref().filter(|_| kept) {
            Some(store) => {
                self.out.send(
                    tx,
                    Outbound::ControlAfter {
                        wait: store.receipt(),
                        packet: Box::new(packet),
                    },
                );
            }
            None => {
                self.out.send(tx, Outbound::Control(Box::new(packet)));
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
                self.out
                    .send(&tx, Outbound::Disconnect(ReasonCode::PROTOCOL_ERROR));
            }
        }
        fits
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) ends an outgoing exchange.
    pub(super) fn on_complete(
        &mut self,
        key: SessionKey,
        packet_id: u16,
        kind: AckKind,
        now: Instant,
    ) {
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

    pub(super) fn on_pubrec(&mut self, key: SessionKey, r: PubResponse, now: Instant) {
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

    pub(super) fn on_pubrel(&mut self, key: SessionKey, packet_id: u16) {
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
}

/// Resolves when every receipt is committed, or with the first refusal.
pub(super) async fn all_committed(receipts: Vec<DurableReceipt>) -> DurableResult {
    for r in receipts {
        r.await?;
    }
    Ok(())
}
