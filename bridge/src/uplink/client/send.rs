//! The send side: taking spooled rows into the publish window (under the drop-oldest
//! fence, the replay rate, the careful resend after drops and the deferred birth), turning
//! each into its PUBLISH (QoS, expiry, identifier) and encoding what goes on the wire,
//! refusing what the cloud's Maximum Packet Size will not take.

use std::time::{Duration, Instant};

use bytestring::ByteString;
use outpost_mqtt::{Packet, PubResponse, Publish, QoS, codec::encode_publish};

use super::super::careful::Gate;
use super::super::inflight::Inflight;
use super::{Client, Out, SessionEnd, Timer, lost};
use crate::spool::{NewMessage, Stage, StageUpdate, StoredMessage};
use crate::stats::BridgeStats;

/// Sending time the replay rate may make up for at once after a wait: at most a tenth of
/// a second's messages go in one burst, so no second carries more than 1.1 × the rate
/// and one message.
const REPLAY_BURST: Duration = Duration::from_millis(100);

/// The drop-oldest fence as the client sees it (see `spool::fence`): in the driver the
/// spool's locked marks, in tests nothing is ever claimed.
pub(crate) trait Claims {
    /// Row `id` was claimed for dropping: skip it.
    fn claimed(&self, id: i64, stage: Stage) -> bool;
    /// Row `id` was taken for sending.
    fn take(&mut self, id: i64);
    /// Row `id` was passed over.
    fn pass(&mut self, id: i64);
}

impl Claims for crate::spool::Marks {
    fn claimed(&self, id: i64, stage: Stage) -> bool {
        crate::spool::Marks::claimed(self, id, stage)
    }
    fn take(&mut self, id: i64) {
        crate::spool::Marks::take(self, id);
    }
    fn pass(&mut self, id: i64) {
        crate::spool::Marks::pass(self, id);
    }
}

impl Client<'_> {
    /// Moves spooled rows into the window; see [`Client::fill`].
    pub(super) fn fill_window(
        &mut self,
        now: Instant,
        now_ms: i64,
        marks: &mut dyn Claims,
    ) -> Result<(), SessionEnd> {
        if self.staging.committing() {
            return Ok(());
        }
        let mut updates = Vec::new();
        let mut outs = Vec::new();
        self.staging.take_released(&mut updates, &mut outs);
        let rate = self.setup.replay_rate;
        while self.inflight.len() < self.window.limit() && self.goodbye_pid.is_none() {
            let Some(front) = self.queue.front() else {
                break;
            };
            if marks.claimed(front.id, front.stage) {
                // drop-oldest deleted it after we read it; it is counted as dropped there.
                if let Some(pid) = self.resend.remove(&front.id) {
                    self.ids.release(pid);
                }
                marks.pass(front.id);
                self.queue.pop_front();
                continue;
            }
            let front_id = front.id;
            if self.birth_after.is_some_and(|last| front_id > last) {
                // The resumed rows are out: the birth takes the next slot, before any
                // new row.
                if !self.birth_due(Some(front_id), &mut outs)? {
                    break;
                }
                continue;
            }
            if self.must_wait(front_id)? {
                break;
            }
            let Some(front) = self.queue.front() else {
                break;
            };
            if rate > 0 && front.accepted_ms < self.started_ms {
                if now < self.replay_next {
                    self.timers.set(Timer::Replay, self.replay_next);
                    break;
                }
                // A token bucket holding up to REPLAY_BURST of credit: sending that waited
                // (for a stage commit, a full window) makes up for the wait with one batch.
                // Without the credit, each fill after a wait sent one message, and QoS 2
                // stages then committed one message at a time: a drain at 300/s fell to
                // one per commit window (10/s) on a loaded machine and stayed there.
                let floor = now.checked_sub(REPLAY_BURST).unwrap_or(now);
                self.replay_next =
                    self.replay_next.max(floor) + Duration::from_secs(1) / rate.max(1);
            }
            let Some(row) = self.queue.pop_front() else {
                break;
            };
            marks.take(row.id);
            match self.prepare(row, now_ms, &mut updates) {
                Ok(Some(out)) => {
                    if let Out::Publish { row, .. } = &out {
                        self.careful.on_publish(*row);
                    }
                    outs.push(out);
                }
                Ok(None) => {}
                Err(row) => {
                    self.queue.push_front(*row);
                    break;
                }
            }
        }
        if self.queue.is_empty() && self.goodbye_pid.is_none() {
            self.birth_due(None, &mut outs)?;
        }
        if let Some(outs) = self.staging.hold(updates, outs) {
            for out in outs {
                self.write_out(out, now)?;
            }
        }
        Ok(())
    }

    /// True when row `id` must wait: while the rows that were out at the last link drops
    /// are resent, one at a time behind a ping barrier (see `careful.rs`), which this
    /// sends when due. Free in the normal case (no recent drop, or past those rows): the
    /// window scan only runs while resending.
    fn must_wait(&mut self, id: i64) -> Result<bool, SessionEnd> {
        let gate = self.careful.gate(id, || {
            self.rows_out() || self.inflight.status_out() || self.staging.publish_held()
        });
        match gate {
            Gate::Go => Ok(false),
            Gate::Wait => Ok(true),
            Gate::Barrier => {
                if !self.ping_out {
                    self.ping_out = true;
                    self.careful.on_barrier_sent();
                    self.encode(&Packet::PingReq)?;
                    self.arm_keep_alive();
                }
                Ok(true)
            }
        }
    }

    /// Turn a row into what goes on the wire; `Err(row)` when no identifier is free.
    fn prepare(
        &mut self,
        row: StoredMessage,
        now_ms: i64,
        updates: &mut Vec<StageUpdate>,
    ) -> Result<Option<Out>, Box<StoredMessage>> {
        let id = row.id;
        let mut row = match self.resume_qos2(row) {
            Ok(out) => return Ok(Some(out)),
            Err(row) => row,
        };
        if let Some(expiry) = row.properties.message_expiry_interval {
            let age = ((now_ms - row.accepted_ms).max(0) / 1000) as u64;
            if age >= u64::from(expiry) {
                if let Some(pid) = self.resend.remove(&id) {
                    self.ids.release(pid);
                }
                self.acked.push(id);
                BridgeStats::bump(&self.setup.stats.dropped_expired);
                tracing::info!(bridge = %self.setup.name, topic = %row.topic, "message expired in the spool");
                return Ok(None);
            }
            row.properties.message_expiry_interval = Some(expiry - age as u32);
        }
        let qos = row.qos.min(self.limits.max_qos);
        if qos < row.qos && row.qos == QoS::ExactlyOnce && !self.downgrade_logged {
            self.downgrade_logged = true;
            tracing::warn!(bridge = %self.setup.name, max_qos = self.limits.max_qos as u8,
                "cloud (or config) allows no QoS 2: QoS 2 messages go up as QoS {}", qos as u8);
        }
        if qos == QoS::AtMostOnce {
            let publish = self.publish_of(row, QoS::AtMostOnce, None, false);
            return Ok(Some(Out::Publish { row: id, publish }));
        }
        if let Some(pid) = self.resend.remove(&id) {
            if qos == QoS::AtLeastOnce {
                self.inflight.insert(
                    pid,
                    Inflight::Row {
                        id,
                        stage: Stage::New,
                    },
                );
                let publish = self.publish_of(row, qos, Some(pid), true);
                return Ok(Some(Out::Publish { row: id, publish }));
            }
            self.ids.release(pid);
        }
        let Some(pid) = self.ids.alloc() else {
            return Err(Box::new(row));
        };
        if qos == QoS::ExactlyOnce {
            self.stage_published(id, pid, updates);
        } else {
            self.inflight.insert(
                pid,
                Inflight::Row {
                    id,
                    stage: Stage::New,
                },
            );
        }
        let publish = self.publish_of(row, qos, Some(pid), false);
        Ok(Some(Out::Publish { row: id, publish }))
    }

    pub(super) fn publish_of(
        &self,
        row: StoredMessage,
        qos: QoS,
        pid: Option<u16>,
        dup: bool,
    ) -> Publish {
        Publish {
            dup,
            qos,
            retain: row.retain && self.limits.retain_available,
            topic: ByteString::from(row.topic),
            packet_id: pid,
            properties: row.properties,
            payload: row.payload,
        }
    }

    /// Encodes `out` into the write buffer; a row's PUBLISH the cloud cannot take is
    /// dropped (counted) instead.
    pub(super) fn write_out(&mut self, out: Out, now: Instant) -> Result<(), SessionEnd> {
        match out {
            Out::PubRel(pid) => self.encode(&Packet::PubRel(PubResponse::new(pid))),
            Out::Status(mut publish) => {
                let topic = publish.topic.clone();
                let sets = self.aliases.apply(&mut publish);
                let encoded = encode_publish(&publish, self.setup.protocol, &mut self.wbuf);
                if encoded.is_err() && sets == Some(true) {
                    self.aliases.withdraw(&topic);
                }
                encoded.map_err(|e| lost(format!("encode status: {e}")))
            }
            Out::Publish { row, mut publish } => {
                let topic = publish.topic.clone();
                let sets = self.aliases.apply(&mut publish);
                let before = self.wbuf.len();
                let encoded = encode_publish(&publish, self.setup.protocol, &mut self.wbuf);
                let size = self.wbuf.len() - before;
                let refused = match encoded {
                    Err(e) => Some((
                        format!("cannot encode: {e}"),
                        &self.setup.stats.dropped_refused,
                    )),
                    Ok(()) if size > self.limits.max_packet => Some((
                        format!(
                            "{size} bytes exceed the cloud's Maximum Packet Size {}",
                            self.limits.max_packet
                        ),
                        &self.setup.stats.dropped_too_large,
                    )),
                    Ok(()) => None,
                };
                if let Some((why, counter)) = refused {
                    self.wbuf.truncate(before);
                    if sets == Some(true) {
                        self.aliases.withdraw(&topic);
                    }
                    if let Some(pid) = publish.packet_id {
                        self.forget(pid);
                    }
                    self.acked.push(row);
                    BridgeStats::bump(counter);
                    tracing::error!(bridge = %self.setup.name, row, %topic,
                        payload_bytes = publish.payload.len(), "message dropped: {why}");
                } else if publish.qos == QoS::AtMostOnce {
                    self.acked.push(row);
                    BridgeStats::bump(&self.setup.stats.forwarded);
                } else if let Some(pid) = publish.packet_id {
                    self.window.on_send(pid, now, self.inflight.len());
                }
                Ok(())
            }
        }
    }

    /// Encodes an unspooled QoS 0 message; see [`Client::handle_live_qos0`].
    pub(super) fn encode_live_qos0(&mut self, msg: NewMessage) {
        let mut publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: msg.retain && self.limits.retain_available,
            topic: ByteString::from(msg.topic),
            packet_id: None,
            properties: msg
                .props
                .as_deref()
                .and_then(crate::spool::decode_properties)
                .unwrap_or_default(),
            payload: msg.payload,
        };
        let topic = publish.topic.clone();
        let sets = self.aliases.apply(&mut publish);
        let before = self.wbuf.len();
        match encode_publish(&publish, self.setup.protocol, &mut self.wbuf) {
            Ok(()) if self.wbuf.len() - before <= self.limits.max_packet => {
                BridgeStats::bump(&self.setup.stats.forwarded);
            }
            _ => {
                self.wbuf.truncate(before);
                if sets == Some(true) {
                    self.aliases.withdraw(&topic);
                }
                BridgeStats::bump(&self.setup.stats.dropped_qos0);
            }
        }
    }
}
