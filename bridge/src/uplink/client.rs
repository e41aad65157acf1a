//! The uplink's MQTT client as a state machine without I/O, in the style of quinn-proto's
//! connection: spooled rows, packets from the cloud, commits done and the current time go
//! in; bytes to write, stage and downlink-id commits to make durable, rows to delete and
//! downlink deliveries come out. The async driver (`session.rs`) owns the socket, the
//! spool and the timers and only moves data between them and this type, so the publish
//! window, QoS 2 staging, careful resend after drops and downlink QoS 2 are tested in
//! memory (see the tests below).
//!
//! Durability rules the driver must keep: what [`Client::poll_commit`] hands out is
//! applied to the spool before [`Client::on_stages_committed`] is called (the PUBLISH or
//! PUBREL waiting for it is only then encoded), and rows from [`Client::take_acked`] are
//! handed to the spool before any stage commit started after them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytestring::ByteString;
use outpost_mqtt::{
    Disconnect, Packet, Properties, Protocol, PubResponse, Publish, QoS, ReasonCode,
    codec::{decode, encode, encode_publish},
};

use super::aliases::TopicAliases;
use super::careful::{Careful, Gate};
use super::downlink::Downlink;
use super::inflight::{Inflight, Outstanding};
use super::packet_ids::PacketIds;
use super::window::Window;
use crate::LocalPublish;
use crate::rules::{RetainMode, Rules};
use crate::spool::{IncomingOp, NewMessage, Stage, StageUpdate, StoredMessage};
use crate::stats::BridgeStats;
use crate::status::{OfflineReason, Status};

/// Largest packet accepted from the cloud (advertised in 5.0 CONNECT).
pub(crate) const MAX_INCOMING_PACKET: usize = 16 << 20;

/// How a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// Shutdown was requested and the goodbye was sent.
    Shutdown,
    /// The link failed in a way no message can cause (keep alive, spool, protocol errors);
    /// reconnect.
    Lost(String),
    /// The cloud closed or reset an established link, or sent DISCONNECT; reconnect.
    Dropped {
        /// What happened.
        why: String,
        /// The row to blame (see `Client::suspect`).
        suspect: Option<i64>,
        /// When rows were out unacknowledged: the newest row sent in this session.
        out_through: Option<i64>,
        /// A QoS 2 PUBLISH was out and the cloud had answered none with PUBREC in this
        /// session: what a cloud without QoS 2 does (RabbitMQ, AWS IoT, Mosquitto's
        /// `max_qos 1` towards 3.1.1 clients), which 3.1.1 has no other way to say.
        qos2_unanswered: bool,
    },
}

pub(crate) fn lost(why: impl Into<String>) -> SessionEnd {
    SessionEnd::Lost(why.into())
}

/// False for DISCONNECT reasons that say the link itself is unwelcome (server busy or
/// going away, session taken over, keep alive, rate limits): such a loss never counts
/// against the message in flight. Unknown and message-level reasons may be about it.
fn may_be_about_a_message(reason: ReasonCode) -> bool {
    !matches!(
        reason,
        ReasonCode::NORMAL_DISCONNECTION
            | ReasonCode::SERVER_UNAVAILABLE
            | ReasonCode::SERVER_BUSY
            | ReasonCode::BANNED
            | ReasonCode::SERVER_SHUTTING_DOWN
            | ReasonCode::KEEP_ALIVE_TIMEOUT
            | ReasonCode::SESSION_TAKEN_OVER
            | ReasonCode::MESSAGE_RATE_TOO_HIGH
            | ReasonCode::ADMINISTRATIVE_ACTION
            | ReasonCode::USE_ANOTHER_SERVER
            | ReasonCode::SERVER_MOVED
            | ReasonCode::CONNECTION_RATE_EXCEEDED
            | ReasonCode::MAXIMUM_CONNECT_TIME
    )
}

pub(crate) fn dropped(why: impl Into<String>) -> SessionEnd {
    SessionEnd::Dropped {
        why: why.into(),
        suspect: None,
        out_through: None,
        qos2_unanswered: false,
    }
}

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
    /// A stage commit is out: nothing more goes into the window until it is done.
    committing: bool,
    /// Stage updates to make durable, not yet taken by the driver.
    commit: Option<Vec<StageUpdate>>,
    /// What goes on the wire once the stage commit is durable.
    gated: Vec<Out>,
    rel_pending: Vec<(u16, i64)>,
    /// Rows acknowledged (or dropped) since the last hand-off to the spool writer.
    acked: Vec<i64>,
    /// The receiving side: downlink deliveries and their answers.
    downlink: Downlink,
    /// Careful one-at-a-time resend of the rows that were out at the last drops.
    careful: Careful,
    started_ms: i64,
    replay_next: Instant,
    replay_wake: Option<Instant>,
    last_sent: Instant,
    last_recv: Instant,
    ping_out: bool,
    downgrade_logged: bool,
    /// The cloud answered a QoS 2 PUBLISH with PUBREC in this session.
    pubrec_seen: bool,
    goodbye_pid: Option<u16>,
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
        let client = Client {
            setup,
            wbuf: BytesMut::with_capacity(64 * 1024),
            limits,
            ids: PacketIds::default(),
            inflight: Outstanding::default(),
            queue: VecDeque::new(),
            cursor: 0,
            exhausted: false,
            committing: false,
            commit: None,
            gated: Vec::new(),
            rel_pending: Vec::new(),
            acked: Vec::new(),
            downlink: Downlink::default(),
            careful: Careful::new(careful_through),
            started_ms: now_ms,
            replay_next: now,
            replay_wake: None,
            last_sent: now,
            last_recv: now,
            ping_out: false,
            downgrade_logged: false,
            pubrec_seen: false,
            goodbye_pid: None,
            birth_after: None,
            aliases,
            window,
            farewell: false,
            resend: HashMap::new(),
        };
        client.show_window();
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
        self.commit.take()
    }

    /// The stage updates from [`Client::poll_commit`] are durable: what waited for them
    /// goes out.
    pub(crate) fn on_stages_committed(&mut self, now: Instant) -> Result<(), SessionEnd> {
        self.committing = false;
        for out in std::mem::take(&mut self.gated) {
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

    /// When the replay rate next lets a row go, if it is what holds the window.
    pub(crate) fn replay_wake(&self) -> Option<Instant> {
        self.replay_wake
    }

    /// The replay wake-up came.
    pub(crate) fn on_replay_wake(&mut self) {
        self.replay_wake = None;
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
        self.gated
            .iter()
            .filter_map(|o| match o {
                Out::Publish { row, .. } => Some(*row),
                Out::PubRel(_) | Out::Status(_) => None,
            })
            .collect()
    }

    /// True when a row's PUBLISH is out and not acknowledged.
    fn rows_out(&self) -> bool {
        self.inflight.rows_out()
    }

    fn encode(&mut self, packet: &Packet) -> Result<(), SessionEnd> {
        encode(packet, self.setup.protocol, &mut self.wbuf)
            .map_err(|e| lost(format!("encode: {e}")))
    }

    fn subscribe(&mut self) -> Result<(), SessionEnd> {
        let subs = self.setup.rules.remote_subscriptions();
        if subs.is_empty() {
            return Ok(());
        }
        let Some(pid) = self.ids.alloc() else {
            return Err(lost("no free packet identifier"));
        };
        // Subscribe identifiers are freed on SUBACK; they never enter the publish window.
        let filters = subs
            .into_iter()
            .map(|(filter, qos, retain)| outpost_mqtt::SubscribeFilter {
                filter,
                options: outpost_mqtt::SubscriptionOptions {
                    qos: qos.min(self.limits.max_qos.max(QoS::AtLeastOnce)),
                    // Without No Local a `both` rule would echo our own uplink back down.
                    no_local: true,
                    retain_as_published: retain == RetainMode::Keep,
                    retain_handling: Default::default(),
                },
            })
            .collect();
        self.encode(&Packet::Subscribe(outpost_mqtt::Subscribe {
            packet_id: pid,
            filters,
            properties: Properties::default(),
        }))
    }

    fn send_control(&mut self, payload: bytes::Bytes, now: Instant) -> Result<u16, SessionEnd> {
        let (pid, publish) = self.status_publish(payload)?;
        self.write_out(Out::Status(publish), now)?;
        Ok(pid)
    }

    /// A status PUBLISH under a fresh identifier, counted in flight.
    fn status_publish(&mut self, payload: bytes::Bytes) -> Result<(u16, Publish), SessionEnd> {
        let pid = self
            .ids
            .alloc()
            .ok_or_else(|| lost("no free packet identifier"))?;
        let topic = self
            .setup
            .status
            .map(|s| s.topic.clone())
            .unwrap_or_default();
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: self.limits.retain_available,
            topic: ByteString::from(topic),
            packet_id: Some(pid),
            properties: Properties::default(),
            payload,
        };
        self.inflight.insert(pid, Inflight::Control);
        Ok((pid, publish))
    }

    /// Queues the deferred birth once the resumed rows ahead of `next` (the next row to
    /// go, if any) are out; false while it must still wait.
    fn birth_due(&mut self, next: Option<i64>, outs: &mut Vec<Out>) -> Result<bool, SessionEnd> {
        let Some(last) = self.birth_after else {
            return Ok(true);
        };
        let resumed_out = match next {
            Some(id) => id > last,
            None => self.exhausted,
        };
        if !resumed_out || self.inflight.len() >= self.window.limit() {
            return Ok(false);
        }
        self.birth_after = None;
        let Some(status) = self.setup.status else {
            return Ok(true);
        };
        let payload = status.birth();
        let (_, publish) = self.status_publish(payload)?;
        outs.push(Out::Status(publish));
        Ok(true)
    }

    /// Start the commit that the oldest downlink answers wait for (one at a time, so their
    /// order is kept); answers that change nothing go out at once.
    pub(crate) fn pump_downlink(&mut self) -> Result<(), SessionEnd> {
        for answer in self.downlink.pump() {
            self.encode(&answer)?;
        }
        Ok(())
    }

    /// Move spooled rows into the window at `now` (`now_ms` on the wall clock), asking
    /// for QoS 2 stages to be persisted first when needed ([`Client::poll_commit`]).
    pub(crate) fn fill(
        &mut self,
        now: Instant,
        now_ms: i64,
        marks: &mut dyn Claims,
    ) -> Result<(), SessionEnd> {
        if self.committing {
            return Ok(());
        }
        let mut updates = Vec::new();
        let mut outs = Vec::new();
        for (pid, id) in self.rel_pending.drain(..) {
            updates.push(StageUpdate {
                id,
                packet_id: pid,
                stage: Stage::Released,
            });
            outs.push(Out::PubRel(pid));
        }
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
                    self.replay_wake = Some(self.replay_next);
                    break;
                }
                self.replay_next = self.replay_next.max(now) + Duration::from_secs(1) / rate.max(1);
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
        if updates.is_empty() {
            for out in outs {
                self.write_out(out, now)?;
            }
        } else {
            self.committing = true;
            self.commit = Some(updates);
            self.gated = outs;
        }
        Ok(())
    }

    /// True when row `id` must wait: while the rows that were out at the last link drops
    /// are resent, one at a time behind a ping barrier (see `careful.rs`), which this
    /// sends when due. Free in the normal case (no recent drop, or past those rows): the
    /// window scan only runs while resending.
    fn must_wait(&mut self, id: i64) -> Result<bool, SessionEnd> {
        let gate = self.careful.gate(id, || {
            self.rows_out()
                || self.inflight.status_out()
                || self.gated.iter().any(|o| matches!(o, Out::Publish { .. }))
        });
        match gate {
            Gate::Go => Ok(false),
            Gate::Wait => Ok(true),
            Gate::Barrier => {
                if !self.ping_out {
                    self.ping_out = true;
                    self.careful.on_barrier_sent();
                    self.encode(&Packet::PingReq)?;
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
        match (row.stage, row.packet_id) {
            (Stage::Released | Stage::Published, Some(pid)) if self.limits.moved => {
                // Another broker has (or had) these: this one never saw them, so they go
                // up here as new exchanges under fresh identifiers.
                self.ids.release(pid);
            }
            (Stage::Released, Some(pid)) => {
                self.inflight.insert(
                    pid,
                    Inflight::Row {
                        id,
                        stage: Stage::Released,
                    },
                );
                return Ok(Some(Out::PubRel(pid)));
            }
            (Stage::Published, Some(pid)) if self.limits.max_qos == QoS::ExactlyOnce => {
                self.inflight.insert(
                    pid,
                    Inflight::Row {
                        id,
                        stage: Stage::Published,
                    },
                );
                let publish = self.publish_of(row, QoS::ExactlyOnce, Some(pid), true);
                return Ok(Some(Out::Publish { row: id, publish }));
            }
            (Stage::Published, Some(pid)) => {
                // The cloud no longer takes QoS 2 (a QoS 2 PUBLISH would get us disconnected
                // over and over): send it as QoS 1 under a fresh identifier.
                self.ids.release(pid);
            }
            _ => {}
        }
        let mut row = row;
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
        let stage = if qos == QoS::ExactlyOnce {
            updates.push(StageUpdate {
                id,
                packet_id: pid,
                stage: Stage::Published,
            });
            Stage::Published
        } else {
            Stage::New
        };
        self.inflight.insert(pid, Inflight::Row { id, stage });
        let publish = self.publish_of(row, qos, Some(pid), false);
        Ok(Some(Out::Publish { row: id, publish }))
    }

    fn publish_of(&self, row: StoredMessage, qos: QoS, pid: Option<u16>, dup: bool) -> Publish {
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

    fn write_out(&mut self, out: Out, now: Instant) -> Result<(), SessionEnd> {
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

    /// An unspooled QoS 0 message: straight into the write buffer, or dropped (counted)
    /// when it cannot go.
    pub(crate) fn send_live_qos0(&mut self, msg: NewMessage) {
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

    /// The keep-alive tick at `now`: a PINGREQ when the link was quiet, an error when the
    /// cloud has been silent too long.
    pub(crate) fn keep_alive(&mut self, now: Instant) -> Result<(), SessionEnd> {
        let ka = self.limits.keep_alive;
        if ka.is_zero() {
            return Ok(());
        }
        let since_recv = now.saturating_duration_since(self.last_recv);
        if since_recv > ka + ka / 2 {
            return Err(lost(
                "keep alive timeout: no packet from the cloud (half-open link?)",
            ));
        }
        if !self.ping_out
            && (now.saturating_duration_since(self.last_sent) >= ka || since_recv >= ka)
        {
            self.ping_out = true;
            self.encode(&Packet::PingReq)?;
        }
        Ok(())
    }

    fn on_puback(&mut self, r: PubResponse, now: Instant) -> Result<(), SessionEnd> {
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

    fn count_ack(&self, row: i64, reason: ReasonCode) {
        if reason.is_error() {
            BridgeStats::bump(&self.setup.stats.dropped_refused);
            tracing::warn!(bridge = %self.setup.name, row, reason = format!("0x{:02x}", reason.0),
                "cloud refused a message (error reason code): dropped, counted in dropped/refused");
        } else {
            BridgeStats::bump(&self.setup.stats.forwarded);
        }
    }

    fn on_pubrec(&mut self, r: PubResponse, now: Instant) -> Result<(), SessionEnd> {
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
                    self.rel_pending.push((pid, id));
                } else if !self.rel_pending.iter().any(|(p, _)| *p == pid)
                    && !self
                        .gated
                        .iter()
                        .any(|o| matches!(o, Out::PubRel(p) if *p == pid))
                {
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

    fn on_pubcomp(&mut self, r: PubResponse) -> Result<(), SessionEnd> {
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
        Ok(true)
    }

    /// The clean offline status is still unacknowledged.
    pub(crate) fn goodbye_pending(&self) -> bool {
        self.goodbye_pid
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
