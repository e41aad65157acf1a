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
//! applied to the spool before [`Client::handle_stages_committed`] is called (the PUBLISH or
//! PUBREL waiting for it is only then encoded), and rows from [`Client::poll_acked`] are
//! handed to the spool before any stage commit started after them.

mod acks;
mod control;
mod end;
mod qos2;
mod send;
mod setup;
mod timers;

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use bytes::BytesMut;
use outpost_mqtt::{
    Disconnect, Packet, Properties, Publish, ReasonCode,
    codec::{decode, encode},
};

use super::aliases::TopicAliases;
use super::careful::Careful;
use super::downlink::Downlink;
use super::inflight::Outstanding;
use super::packet_ids::PacketIds;
use super::window::Window;
use crate::LocalPublish;
use crate::spool::{IncomingOp, NewMessage, StageUpdate, StoredMessage};
use crate::status::OfflineReason;
use end::disconnected;
pub(crate) use end::{SessionEnd, dropped, lost};
use qos2::Staging;
use send::Claims;
pub(crate) use setup::{Limits, Setup};
use timers::{GOODBYE_TIMEOUT, Timer, TimerTable};

/// Largest packet accepted from the cloud (advertised in 5.0 CONNECT).
pub(crate) const MAX_INCOMING_PACKET: usize = 16 << 20;

/// QoS 1 and 2 PUBLISHes the cloud may have open towards us (advertised in 5.0
/// CONNECT); one more is refused rather than remembered (MQTT-3.3.4-9).
pub(crate) const RECEIVE_MAXIMUM: u16 = 256;

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
    /// Encoded packets for the driver to write ([`Client::poll_transmit`]).
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
    // Construction.
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
        self.resume_stages(in_progress);
        self.downlink = Downlink::new(incoming);
        self.subscribe()?;
        self.birth_or_schedule(in_progress, now)?;
        Ok(())
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

    // Events in: packets from the cloud, rows and commits from the spool, the clock.
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
            Err(e) => Err(self.protocol_error(
                e.reason_code(),
                format!("malformed packet from the cloud: {e}"),
            )),
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
                self.on_suback(s);
                Ok(())
            }
            Packet::Disconnect(d) => Err(disconnected(d)),
            other => Err(lost(format!("unexpected packet from the cloud: {other:?}"))),
        }
    }

    /// Rows read from the spool after [`Client::wants_rows`]; `last` when the read found
    /// all there was.
    pub(crate) fn handle_rows(&mut self, rows: Vec<StoredMessage>, last: bool) {
        if last {
            self.exhausted = true;
        }
        if let Some(row) = rows.last() {
            self.cursor = row.id;
        }
        self.queue.extend(rows);
    }

    /// New rows were committed to the spool: read again.
    pub(crate) fn handle_more_rows(&mut self) {
        self.exhausted = false;
    }

    /// The stage updates from [`Client::poll_commit`] are durable: what waited for them
    /// goes out.
    pub(crate) fn handle_stages_committed(&mut self, now: Instant) -> Result<(), SessionEnd> {
        for out in self.staging.committed() {
            self.write_out(out, now)?;
        }
        Ok(())
    }

    /// The changes from [`Client::poll_incoming_commit`] are durable: their answers go
    /// out.
    pub(crate) fn handle_incoming_committed(&mut self) -> Result<(), SessionEnd> {
        for answer in self.downlink.on_committed() {
            self.encode(&answer)?;
        }
        Ok(())
    }

    /// An unspooled QoS 0 message: straight into the write buffer, or dropped (counted)
    /// when it cannot go.
    pub(crate) fn handle_live_qos0(&mut self, msg: NewMessage) {
        self.encode_live_qos0(msg);
    }

    /// Everything in [`Client::poll_transmit`] went on the wire at `now`.
    pub(crate) fn handle_flushed(&mut self, now: Instant) {
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

    /// The time is `now`: a PINGREQ when the link was quiet one Keep Alive interval, the
    /// end of the session when the cloud was silent one and a half (see `timers.rs`), the
    /// next row when the replay rate lets it go, the goodbye given up when the cloud does
    /// not acknowledge the offline status in time.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionEnd> {
        self.expire_timers(now)
    }

    /// Starts the goodbye: the clean offline status, when statuses are on. True when one
    /// went into the write buffer; wait for [`Client::goodbye_pending`] to turn false.
    pub(crate) fn handle_shutdown(&mut self, now: Instant) -> Result<bool, SessionEnd> {
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

    /// The cloud dropped the link (`why`): how the session ends, with the row to blame
    /// and what was out.
    pub(crate) fn handle_drop(&self, why: String) -> SessionEnd {
        self.drop_end(why)
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

    // What to do and send: the driver's turn, then what it takes out.
    /// The driver's turn to send: moves spooled rows into the window at `now` (`now_ms` on
    /// the wall clock) under the drop-oldest fence `marks`, asking for QoS 2 stages to be
    /// made durable first when needed ([`Client::poll_commit`]).
    pub(crate) fn fill(
        &mut self,
        now: Instant,
        now_ms: i64,
        marks: &mut dyn Claims,
    ) -> Result<(), SessionEnd> {
        self.fill_window(now, now_ms, marks)
    }

    /// Start the commit that the oldest downlink answers wait for (one at a time, so their
    /// order is kept); answers that change nothing go out at once.
    pub(crate) fn pump_downlink(&mut self) -> Result<(), SessionEnd> {
        for answer in self.downlink.pump() {
            self.encode(&answer)?;
        }
        Ok(())
    }

    /// The encoded packets to write; the driver writes them all, clears the buffer and
    /// calls [`Client::handle_flushed`].
    pub(crate) fn poll_transmit(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Rows acknowledged or dropped since the last call, for the spool to delete.
    pub(crate) fn poll_acked(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.acked)
    }

    /// Stage updates to make durable now; answer with [`Client::handle_stages_committed`].
    pub(crate) fn poll_commit(&mut self) -> Option<Vec<StageUpdate>> {
        self.staging.poll_commit()
    }

    /// Downlink id-set changes to make durable now; answer with
    /// [`Client::handle_incoming_committed`].
    pub(crate) fn poll_incoming_commit(&mut self) -> Option<Vec<IncomingOp>> {
        self.downlink.poll_commit()
    }

    /// The next downlink message for the local broker.
    pub(crate) fn poll_delivery(&mut self) -> Option<LocalPublish> {
        self.downlink.poll_delivery()
    }

    /// When [`Client::handle_timeout`] is next due: the driver sleeps until then.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_timeout()
    }

    /// The DISCONNECT that ends the session cleanly (so the will is not published).
    pub(crate) fn disconnect(&mut self) -> Result<(), SessionEnd> {
        self.encode(&Packet::Disconnect(Disconnect {
            reason: ReasonCode::NORMAL_DISCONNECTION,
            properties: Properties::default(),
        }))
    }

    // State the driver asks about.
    /// Where the next spool read starts, when the queue wants more rows.
    pub(crate) fn wants_rows(&self, low_water: usize) -> Option<i64> {
        (!self.exhausted && self.queue.len() < low_water).then_some(self.cursor)
    }

    /// True when the last read found all there was: the driver waits for new commits.
    pub(crate) fn exhausted(&self) -> bool {
        self.exhausted
    }

    /// How many rows wait in [`Client::poll_acked`].
    pub(crate) fn acked_len(&self) -> usize {
        self.acked.len()
    }

    /// The clean offline status is still unacknowledged, and its time is not up.
    pub(crate) fn goodbye_pending(&self) -> bool {
        !self.goodbye_timed_out
            && self
                .goodbye_pid
                .is_some_and(|pid| self.inflight.contains(pid))
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

    // Shared by the parts in `client/`.
    fn on_publish(&mut self, p: Publish) -> Result<(), SessionEnd> {
        if self.setup.protocol.is_v5() {
            // Our CONNECT announces no Topic Alias Maximum, so the cloud may send no alias
            // at all (MQTT-3.1.2-27, MQTT-3.3.2-11); taken as it came, the empty topic of
            // an aliased PUBLISH would go through the `in` rules as a topic of its own.
            if let Some(alias) = p.properties.topic_alias {
                return Err(self.protocol_error(
                    ReasonCode::TOPIC_ALIAS_INVALID,
                    format!(
                        "the cloud sent Topic Alias {alias}, but the bridge accepts none \
                         (its CONNECT announces no Topic Alias Maximum)"
                    ),
                ));
            }
            if self.downlink.exceeds(&p, RECEIVE_MAXIMUM) {
                return Err(self.protocol_error(
                    ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                    format!(
                        "the cloud sent more than {RECEIVE_MAXIMUM} QoS 1/2 PUBLISHes we had \
                         not completed, our Receive Maximum"
                    ),
                ));
            }
        }
        match self.downlink.on_publish(p, self.setup.rules) {
            Some(answer) => self.encode(&answer),
            None => Ok(()),
        }
    }

    /// True when a row's PUBLISH is out and not acknowledged.
    fn rows_out(&self) -> bool {
        self.inflight.rows_out()
    }

    fn encode(&mut self, packet: &Packet) -> Result<(), SessionEnd> {
        encode(packet, self.setup.protocol, &mut self.wbuf)
            .map_err(|e| lost(format!("encode: {e}")))
    }
}

#[cfg(test)]
mod tests;
