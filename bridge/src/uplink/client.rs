//! The uplink's MQTT client as a state machine without I/O, in the style of quinn-proto's
//! connection: spooled rows, packets from the cloud, commits done and the current time go
//! in; bytes to write, stage and downlink-id commits to make durable, rows to delete and
//! downlink deliveries come out. The async driver (`session.rs`) owns the socket, the
//! spool and the clock and only moves data between them and this type, so the publish
//! window, QoS 2 staging, careful resend after drops and downlink QoS 2 are tested in
//! memory (see `client/tests.rs`).
//!
//! This file is the surface the driver calls; the work is done by concern in `client/`:
//! `send.rs` (rows into the window, PUBLISHes encoded), `qos2.rs` (QoS 2 stages and what
//! waits for them), `acks.rs` (PUBACK, PUBREC, PUBCOMP), `control.rs` (SUBSCRIBE and the
//! status messages), `timers.rs` (keep alive, replay rate, goodbye), `end.rs` (how a
//! session ends).
//!
//! Durability rules the driver must keep: what [`Client::poll_commit`] hands out is
//! applied to the spool before [`Client::on_stages_committed`] is called (the PUBLISH or
//! PUBREL waiting for it is only then encoded), and rows from [`Client::take_acked`] are
//! handed to the spool before any stage commit started after them.

mod acks;
mod control;
mod end;
mod qos2;
mod send;
mod timers;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use outpost_mqtt::{
    Disconnect, Packet, Properties, Protocol, Publish, QoS, ReasonCode,
    codec::{decode, encode},
};

use super::aliases::TopicAliases;
use super::careful::Careful;
use super::downlink::Downlink;
use super::inflight::Outstanding;
use super::packet_ids::PacketIds;
use super::window::Window;
use crate::LocalPublish;
use crate::rules::Rules;
use crate::spool::{IncomingOp, Stage, StageUpdate, StoredMessage};
use crate::stats::BridgeStats;
use crate::status::{OfflineReason, Status};
use end::may_be_about_a_message;
pub(crate) use end::{SessionEnd, dropped, lost};
use qos2::Staging;
pub(crate) use timers::Timer;
use timers::{GOODBYE_TIMEOUT, TimerTable};

/// Largest packet accepted from the cloud (advertised in 5.0 CONNECT).
pub(crate) const MAX_INCOMING_PACKET: usize = 16 << 20;

/// Limits the cloud announced in CONNACK, combined with configuration.
pub(crate) struct Limits {
    pub window: usize,
    pub max_qos: QoS,
    pub max_packet: usize,
    pub retain_available: bool,
    pub keep_alive: Duration,
    pub session_present: bool,
    /// A fresh session at another broker than the spool's QoS 2 stages were made with.
    pub moved: bool,
    /// The cloud's Topic Alias Maximum from CONNACK (0: none; always 0 on 3.1.1).
    pub topic_alias_max: u16,
}

/// What the client reads from the link's configuration; borrowed for one session.
pub(crate) struct Setup<'a> {
    /// The bridge's name, for logs.
    pub name: &'a str,
    /// MQTT version of the link.
    pub protocol: Protocol,
    /// Topic rules: downlink mapping and the cloud subscriptions.
    pub rules: &'a Rules,
    /// The status messages (birth, clean offline), when `status.enabled`.
    pub status: Option<&'a Status>,
    /// Spooled messages from before this session per second (0: no limit).
    pub replay_rate: u32,
    /// Counters (forwarded, dropped, the window shown in `$SYS`).
    pub stats: &'a BridgeStats,
}

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

// Outs live briefly in a Vec of at most one window; boxing would allocate per message.
#[allow(clippy::large_enum_variant)]
enum Out {
    Publish {
        row: i64,
        publish: Publish,
    },
    PubRel(u16),
    /// The birth, in its place behind the exchanges resumed from the last session.
    Status(Publish),
}

/// One session's client state; see the module documentation.
pub(crate) struct Client<'a> {
    setup: Setup<'a>,
    /// Encoded packets for the driver to write ([`Client::transmit`]).
    wbuf: BytesMut,
    limits: Limits,
    ids: PacketIds,
    inflight: Outstanding,
    queue: VecDeque<StoredMessage>,
    cursor: i64,
    exhausted: bool,
    /// QoS 2 stages being made durable, and what waits for them.
    staging: Staging,
    /// Rows acknowledged (or dropped) since the last hand-off to the spool writer.
    acked: Vec<i64>,
    /// The receiving side: downlink deliveries and their answers.
    downlink: Downlink,
    /// Careful one-at-a-time resend of the rows that were out at the last drops.
    careful: Careful,
    started_ms: i64,
    replay_next: Instant,
    /// When the keep-alive, replay and goodbye timers fire.
    timers: TimerTable,
    last_sent: Instant,
    last_recv: Instant,
    ping_out: bool,
    downgrade_logged: bool,
    /// The cloud answered a QoS 2 PUBLISH with PUBREC in this session.
    pubrec_seen: bool,
    goodbye_pid: Option<u16>,
    /// The cloud did not acknowledge the clean offline status in time: go without it.
    goodbye_timed_out: bool,
    /// The birth waits until the rows up to this one, resumed from the last session, are
    /// out, and a window slot is free.
    birth_after: Option<i64>,
    aliases: TopicAliases,
    /// How many messages may be out now, sized to the link (at most `limits.window`).
    window: Window,
    /// A malformed packet came in and a DISCONNECT saying so is in the write buffer.
    farewell: bool,
    /// QoS 1 rows the previous connection of this session left without PUBACK, by row,
    /// with the identifiers they went out under (reserved until they go again).
    resend: HashMap<i64, u16>,
}

impl<'a> Client<'a> {
    /// The state of a session that just got its CONNACK at `now` (`now_ms` on the wall
    /// clock, to compare with the rows' accept times).
    pub(crate) fn new(
        setup: Setup<'a>,
        limits: Limits,
        careful_through: i64,
        now: Instant,
        now_ms: i64,
    ) -> Self {
        let window = Window::new(limits.window, now);
        let aliases = TopicAliases::new(if setup.protocol.is_v5() {
            limits.topic_alias_max
        } else {
            0
        });
        let mut client = Client {
            setup,
            wbuf: BytesMut::with_capacity(64 * 1024),
            limits,
            ids: PacketIds::default(),
            inflight: Outstanding::default(),
            queue: VecDeque::new(),
            cursor: 0,
            exhausted: false,
            staging: Staging::default(),
            acked: Vec::new(),
            downlink: Downlink::default(),
            careful: Careful::new(careful_through),
            started_ms: now_ms,
            replay_next: now,
            timers: TimerTable::default(),
            last_sent: now,
            last_recv: now,
            ping_out: false,
            downgrade_logged: false,
            pubrec_seen: false,
            goodbye_pid: None,
            goodbye_timed_out: false,
            birth_after: None,
            aliases,
            window,
            farewell: false,
            resend: HashMap::new(),
        };
        client.show_window();
        client.arm_keep_alive();
        client
    }

    /// Opens the session: `in_progress` are the spool's rows in a QoS 2 exchange,
    /// `incoming` the downlink QoS 2 ids remembered from the cloud's session (empty when
    /// it has none). Subscribes, and sends the birth or schedules it behind the resumed
    /// exchanges.
    pub(crate) fn start(
        &mut self,
        in_progress: &[StoredMessage],
        incoming: Vec<u16>,
        now: Instant,
    ) -> Result<(), SessionEnd> {
        if self.limits.moved && !in_progress.is_empty() {
            let released = in_progress
                .iter()
                .filter(|r| r.stage == Stage::Released)
                .count();
            tracing::info!(bridge = %self.setup.name, rows = in_progress.len(), released,
                "moved to another broker: {} QoS 2 messages the previous broker had not \
                 completed ({released} past PUBREC there) go up here as new messages",
                in_progress.len());
        } else if !in_progress.is_empty() && !self.limits.session_present {
            tracing::warn!(bridge = %self.setup.name, rows = in_progress.len(),
                "cloud has no session for us: QoS 2 messages in flight are resent and may be duplicated");
        }
        // Persisted QoS 2 identifiers stay reserved until their rows come round again.
        for row in in_progress {
            if let Some(pid) = row.packet_id {
                self.ids.reserve(pid);
            }
        }
        self.downlink = Downlink::new(incoming);
        self.subscribe()?;
        if let Some(status) = self.setup.status {
            match in_progress.iter().map(|r| r.id).max() {
                None => {
                    let payload = status.birth();
                    self.send_control(payload, now)?;
                }
                // The cloud still holds these QoS 2 exchanges and counts them against its
                // Receive Maximum until PUBCOMP (section 4.9). Sent first, the birth would
                // exceed it: Mosquitto refuses it (0x97), leaving the status "offline",
                // and with max_queued_messages 0 also drops the link, every time.
                Some(last) => self.birth_after = Some(last),
            }
        }
        Ok(())
    }

    /// Where the next spool read starts, when the queue wants more rows.
    pub(crate) fn wants_rows(&self, low_water: usize) -> Option<i64> {
        (!self.exhausted && self.queue.len() < low_water).then_some(self.cursor)
    }

    /// Rows read from the spool after [`Client::wants_rows`]; `last` when the read found
    /// all there was.
    pub(crate) fn on_rows(&mut self, rows: Vec<StoredMessage>, last: bool) {
        if last {
            self.exhausted = true;
        }
        if let Some(row) = rows.last() {
            self.cursor = row.id;
        }
        self.queue.extend(rows);
    }

    /// True when the last read found all there was: the driver waits for new commits.
    pub(crate) fn exhausted(&self) -> bool {
        self.exhausted
    }

    /// New rows were committed to the spool: read again.
    pub(crate) fn on_more_rows(&mut self) {
        self.exhausted = false;
    }

    /// The encoded packets to write; the driver writes them all, clears the buffer and
    /// calls [`Client::on_flushed`].
    pub(crate) fn transmit(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Everything in [`Client::transmit`] went on the wire at `now`.
    pub(crate) fn on_flushed(&mut self, now: Instant) {
        self.wbuf.clear();
        self.last_sent = now;
        if self.goodbye_pid.is_some()
            && !self.goodbye_timed_out
            && self.timers.get(Timer::Goodbye).is_none()
        {
            // The offline status is on the wire: its acknowledgement has this long.
            self.timers.set(Timer::Goodbye, now + GOODBYE_TIMEOUT);
        }
        self.arm_keep_alive();
    }

    /// Rows acknowledged or dropped since the last call, for the spool to delete.
    pub(crate) fn take_acked(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.acked)
    }

    /// How many rows wait in [`Client::take_acked`].
    pub(crate) fn acked_len(&self) -> usize {
        self.acked.len()
    }

    /// Stage updates to make durable now; answer with [`Client::on_stages_committed`].
    pub(crate) fn poll_commit(&mut self) -> Option<Vec<StageUpdate>> {
        self.staging.poll_commit()
    }

    /// The stage updates from [`Client::poll_commit`] are durable: what waited for them
    /// goes out.
    pub(crate) fn on_stages_committed(&mut self, now: Instant) -> Result<(), SessionEnd> {
        for out in self.staging.committed() {
            self.write_out(out, now)?;
        }
        Ok(())
    }

    /// Downlink id-set changes to make durable now; answer with
    /// [`Client::on_incoming_committed`].
    pub(crate) fn poll_incoming_commit(&mut self) -> Option<Vec<IncomingOp>> {
        self.downlink.poll_commit()
    }

    /// The changes from [`Client::poll_incoming_commit`] are durable: their answers go
    /// out.
    pub(crate) fn on_incoming_committed(&mut self) -> Result<(), SessionEnd> {
        for answer in self.downlink.on_committed() {
            self.encode(&answer)?;
        }
        Ok(())
    }

    /// The next downlink message for the local broker.
    pub(crate) fn poll_delivery(&mut self) -> Option<LocalPublish> {
        self.downlink.poll_delivery()
    }

    /// When [`Client::handle_timeout`] is next due: the driver sleeps until then.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_timeout()
    }

    /// The time is `now`: a PINGREQ when the link was quiet one Keep Alive interval, the
    /// end of the session when the cloud was silent one and a half (see `timers.rs`), the
    /// next row when the replay rate lets it go, the goodbye given up when the cloud does
    /// not acknowledge the offline status in time.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionEnd> {
        self.expire_timers(now)
    }

    /// QoS 1 rows the last connection left without PUBACK (`(row, packet id)`): when the
    /// cloud kept the session at the same broker, they go again under the same
    /// identifiers with DUP set (MQTT-4.4.0-1, MQTT-3.3.1-1). Call before [`Client::start`].
    pub(crate) fn resume_qos1(&mut self, rows: Vec<(i64, u16)>) {
        if !self.limits.session_present || self.limits.moved {
            return;
        }
        for (row, pid) in rows {
            self.ids.reserve(pid);
            self.resend.insert(row, pid);
        }
    }

    /// QoS 1 rows out without PUBACK now, with their identifiers, for the next
    /// connection's [`Client::resume_qos1`].
    pub(crate) fn unacked_qos1(&self) -> Vec<(i64, u16)> {
        self.inflight.qos1_rows()
    }

    /// The cloud kept our session (CONNACK Session Present).
    pub(crate) fn session_present(&self) -> bool {
        self.limits.session_present
    }

    /// Messages out without their final answer (rows and status).
    pub(crate) fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// A malformed packet was answered with a DISCONNECT that should be written before
    /// the link is closed.
    pub(crate) fn farewell(&self) -> bool {
        self.farewell
    }

    /// How the session ends when the cloud dropped the link: `why`, with the row to blame
    /// and what was out.
    pub(crate) fn on_drop(&self, why: String) -> SessionEnd {
        SessionEnd::Dropped {
            why,
            suspect: self.suspect(),
            out_through: self.rows_out().then_some(self.careful.newest_sent()),
            qos2_unanswered: !self.pubrec_seen && self.qos2_out(),
        }
    }

    /// Handles the next whole packet in `rbuf`, received at `now`; false when none is
    /// complete.
    pub(crate) fn handle_next(
        &mut self,
        rbuf: &mut BytesMut,
        now: Instant,
    ) -> Result<bool, SessionEnd> {
        self.last_recv = now;
        self.arm_keep_alive();
        match decode(rbuf, self.setup.protocol, MAX_INCOMING_PACKET) {
            Ok(Some(packet)) => {
                self.handle_packet(packet, now)?;
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => {
                if self.setup.protocol.is_v5() {
                    self.farewell = self
                        .encode(&Packet::Disconnect(Disconnect {
                            reason: e.reason_code(),
                            properties: Properties::default(),
                        }))
                        .is_ok();
                }
                Err(lost(format!("malformed packet from the cloud: {e}")))
            }
        }
    }

    /// After the cloud dropped the link, takes the final acknowledgements among what it
    /// sent before closing (`rbuf`); anything else would need an answer we can no longer
    /// send, and the cloud repeats it on the next session.
    pub(crate) fn salvage(&mut self, rbuf: &mut BytesMut, now: Instant) {
        while let Ok(Some(packet)) = decode(rbuf, self.setup.protocol, MAX_INCOMING_PACKET) {
            let _ = match packet {
                Packet::PubAck(r) => self.on_puback(r, now),
                Packet::PubComp(r) => self.on_pubcomp(r),
                _ => Ok(()),
            };
        }
    }

    /// One packet from the cloud.
    pub(crate) fn handle_packet(&mut self, packet: Packet, now: Instant) -> Result<(), SessionEnd> {
        match packet {
            Packet::PubAck(r) => self.on_puback(r, now),
            Packet::PubRec(r) => self.on_pubrec(r, now),
            Packet::PubComp(r) => self.on_pubcomp(r),
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubRel(r) => {
                self.downlink.on_pubrel(r.packet_id);
                Ok(())
            }
            Packet::PingResp => {
                self.ping_out = false;
                self.careful.on_pingresp();
                self.arm_keep_alive();
                Ok(())
            }
            Packet::SubAck(s) => {
                self.ids.release(s.packet_id);
                for (i, code) in s.reason_codes.iter().enumerate() {
                    if code.is_error() {
                        tracing::error!(bridge = %self.setup.name, filter = i, reason = code.0,
                            "cloud refused a downlink subscription");
                    }
                }
                Ok(())
            }
            Packet::Disconnect(d) => {
                let why = format!(
                    "cloud sent DISCONNECT (reason 0x{:02x}{})",
                    d.reason.0,
                    d.properties
                        .reason_string
                        .map(|s| format!(": {s}"))
                        .unwrap_or_default()
                );
                Err(if may_be_about_a_message(d.reason) {
                    dropped(why)
                } else {
                    lost(why)
                })
            }
            other => Err(lost(format!("unexpected packet from the cloud: {other:?}"))),
        }
    }

    /// The row to blame for the cloud dropping the link: the oldest one whose PUBLISH went
    /// out unacknowledged. Only that one, on purpose: the cloud handles packets in order, so
    /// rows before it were accepted, and rows behind it were most likely never read; blaming
    /// the whole window would set innocent messages aside, while one suspect per loss keeps
    /// "the same row at N consecutive losses" meaningful.
    ///
    /// Nobody is blamed while a status message (sent first in every session) is still
    /// unacknowledged: a cloud that refuses our status topic by disconnecting must not
    /// cost us the messages behind it. And since a cloud may drop us without sending the
    /// acknowledgements of what it accepted (Mosquitto does), the oldest row of a full
    /// window can be innocent: that is why, when the same row is blamed at two drops in a
    /// row, the rows that were out are resent one at a time behind a ping barrier
    /// ([`Client::must_wait`]), which makes the next blame exact. An innocent row blamed
    /// once is acknowledged then, and the count starts over.
    fn suspect(&self) -> Option<i64> {
        self.inflight.suspect(&self.unsent_rows())
    }

    /// True when a QoS 2 PUBLISH went on the wire and has no answer.
    fn qos2_out(&self) -> bool {
        self.inflight.qos2_out(&self.unsent_rows())
    }

    /// Rows given a window slot whose PUBLISH still waits for its stage commit.
    fn unsent_rows(&self) -> HashSet<i64> {
        self.staging.unsent_rows()
    }

    /// True when a row's PUBLISH is out and not acknowledged.
    fn rows_out(&self) -> bool {
        self.inflight.rows_out()
    }

    fn encode(&mut self, packet: &Packet) -> Result<(), SessionEnd> {
        encode(packet, self.setup.protocol, &mut self.wbuf)
            .map_err(|e| lost(format!("encode: {e}")))
    }

    /// Start the commit that the oldest downlink answers wait for (one at a time, so their
    /// order is kept); answers that change nothing go out at once.
    pub(crate) fn pump_downlink(&mut self) -> Result<(), SessionEnd> {
        for answer in self.downlink.pump() {
            self.encode(&answer)?;
        }
        Ok(())
    }

    /// Publishes the window for `$SYS`, `/metrics` and the status page.
    fn show_window(&self) {
        let limit = self.window.limit() as u64;
        let shown = &self.setup.stats.inflight_window;
        if shown.load(std::sync::atomic::Ordering::Relaxed) != limit {
            shown.store(limit, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn forget(&mut self, pid: u16) {
        self.window.forget(pid);
        self.inflight.remove(pid);
        self.ids.release(pid);
    }

    fn on_publish(&mut self, p: Publish) -> Result<(), SessionEnd> {
        match self.downlink.on_publish(p, self.setup.rules) {
            Some(answer) => self.encode(&answer),
            None => Ok(()),
        }
    }

    /// Starts the goodbye: the clean offline status, when statuses are on. True when one
    /// went into the write buffer; wait for [`Client::goodbye_pending`] to turn false.
    pub(crate) fn start_goodbye(&mut self, now: Instant) -> Result<bool, SessionEnd> {
        let Some(status) = self.setup.status else {
            return Ok(false);
        };
        let payload = status.offline(OfflineReason::Clean);
        self.goodbye_pid = Some(self.send_control(payload, now)?);
        // Keep alive stops: the goodbye has its own deadline, from when the status is
        // on the wire.
        self.arm_keep_alive();
        Ok(true)
    }

    /// The clean offline status is still unacknowledged, and its time is not up.
    pub(crate) fn goodbye_pending(&self) -> bool {
        !self.goodbye_timed_out
            && self
                .goodbye_pid
                .is_some_and(|pid| self.inflight.contains(pid))
    }

    /// The DISCONNECT that ends the session cleanly (so the will is not published).
    pub(crate) fn disconnect(&mut self) -> Result<(), SessionEnd> {
        self.encode(&Packet::Disconnect(Disconnect {
            reason: ReasonCode::NORMAL_DISCONNECTION,
            properties: Properties::default(),
        }))
    }
}

#[cfg(test)]
mod tests;
