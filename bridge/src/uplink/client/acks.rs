//! The cloud's answers to what we sent: PUBACK (QoS 1 and the status messages), PUBREC
//! and PUBCOMP (QoS 2). A final answer frees the identifier and the window slot and hands
//! the row to the spool for deletion; PUBREC moves a QoS 2 row to its `released` stage
//! (see `qos2.rs`), after which PUBREL goes.

use std::time::Instant;

use outpost_mqtt::{Packet, PubResponse, ReasonCode};

use super::super::inflight::Inflight;
use super::{Client, SessionEnd};
use crate::stats::BridgeStats;

impl Client<'_> {
    pub(super) fn on_puback(&mut self, r: PubResponse, now: Instant) -> Result<(), SessionEnd> {
        match self.inflight.get(r.packet_id) {
            Some(Inflight::Row { id, .. }) => {
                self.window.on_ack(r.packet_id, now);
                self.show_window();
                self.forget(r.packet_id);
                self.acked.push(id);
                self.count_ack(id, r.reason);
            }
            Some(Inflight::Control) => {
                self.forget(r.packet_id);
                if r.reason.is_error() {
                    let topic = self.setup.status.map(|s| s.topic.as_str()).unwrap_or("");
                    tracing::warn!(bridge = %self.setup.name, topic,
                        reason = format!("0x{:02x}", r.reason.0),
                        "cloud refused the gateway status message: the status topic there may be stale; check the cloud's ACL and quotas");
                }
            }
            None => tracing::debug!(pid = r.packet_id, "PUBACK for an unknown packet id"),
        }
        Ok(())
    }

    /// Publishes the window for `$SYS`, `/metrics` and the status page.
    pub(super) fn show_window(&self) {
        let limit = self.window.limit() as u64;
        let shown = &self.setup.stats.inflight_window;
        if shown.load(std::sync::atomic::Ordering::Relaxed) != limit {
            shown.store(limit, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// `pid` has its final answer (or was never sent): out of the window and free.
    pub(super) fn forget(&mut self, pid: u16) {
        self.window.forget(pid);
        self.inflight.remove(pid);
        self.ids.release(pid);
    }

    fn count_ack(&self, row: i64, reason: ReasonCode) {
        if reason.is_error() {
            BridgeStats::bump(&self.setup.stats.dropped_refused);
            tracing::warn!(bridge = %self.setup.name, row, reason = format!("0x{:02x}", reason.0),
                "cloud refused a message (error reason code): dropped, counted in dropped/refused");
        } else {
            BridgeStats::bump(&self.setup.stats.forwarded);
        }
    }

    pub(super) fn on_pubrec(&mut self, r: PubResponse, now: Instant) -> Result<(), SessionEnd> {
        let pid = r.packet_id;
        self.pubrec_seen = true;
        // The first answer to a QoS 2 PUBLISH times the round trip; the PUBCOMP does not.
        self.window.on_ack(pid, now);
        self.show_window();
        match self.inflight.get(pid) {
            Some(Inflight::Row { id, .. }) => {
                if r.reason.is_error() {
                    self.forget(pid);
                    self.acked.push(id);
                    self.count_ack(id, r.reason);
                } else if self.inflight.release(pid) {
                    // PUBREL goes out only after "released" is durable: a crash before that
                    // resends PUBLISH (DUP) with the same id, which the cloud deduplicates.
                    self.staging.on_released(pid, id);
                } else if !self.staging.pubrel_queued(pid) {
                    self.encode(&Packet::PubRel(PubResponse::new(pid)))?;
                }
                Ok(())
            }
            _ => {
                tracing::debug!(pid, "PUBREC for an unknown packet id");
                Ok(())
            }
        }
    }

    pub(super) fn on_pubcomp(&mut self, r: PubResponse) -> Result<(), SessionEnd> {
        if let Some(Inflight::Row { id, .. }) = self.inflight.get(r.packet_id) {
            self.forget(r.packet_id);
            self.acked.push(id);
            if r.reason == ReasonCode::PACKET_IDENTIFIER_NOT_FOUND {
                tracing::info!(bridge = %self.setup.name, pid = r.packet_id,
                    "PUBCOMP: cloud had already completed this QoS 2 message");
            }
            BridgeStats::bump(&self.setup.stats.forwarded);
        }
        Ok(())
    }
}
