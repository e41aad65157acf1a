//! One connected session with the cloud: a pipelined window of spooled messages, QoS 2
//! stages persisted before PUBLISH and before PUBREL, downlink deliveries, keep alive, and
//! the clean goodbye on shutdown.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytestring::ByteString;
use outpost_mqtt::{
    Disconnect, Packet, Properties, Protocol, PubResponse, Publish, QoS, ReasonCode,
    codec::{decode, encode, encode_publish},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::Ctx;
use super::aliases::TopicAliases;
use super::packet_ids::PacketIds;
use super::transport::Io;
use super::window::Window;
use crate::LocalPublish;
use crate::clock::now_ms;
use crate::error::SpoolError;
use crate::rules::RetainMode;
use crate::spool::{IncomingOp, NewMessage, Stage, StageUpdate, StoredMessage};
use crate::stats::BridgeStats;
use crate::status::OfflineReason;

/// Rows read from the spool at a time.
const FETCH_LIMIT: usize = 4096;
/// Largest packet accepted from the cloud (advertised in 5.0 CONNECT).
pub(super) const MAX_INCOMING_PACKET: usize = 16 << 20;
/// Acknowledged rows are deleted in groups: this many, or whatever gathered in
/// [`ACK_FLUSH_EVERY`]. A crash in between only resends a few acknowledged QoS 1 messages
/// (QoS 2 rows that lost their delete get a harmless PUBREL again).
const ACK_BATCH: usize = 4096;
/// Longest an acknowledged row waits for its delete to be queued.
const ACK_FLUSH_EVERY: Duration = Duration::from_millis(50);
/// How long a write may block before the link counts as dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for the cloud to acknowledge the clean offline status.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to read what the cloud sent before it dropped the link.
const SALVAGE_TIME: Duration = Duration::from_millis(200);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

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
        /// The row to blame (see `Session::suspect`).
        suspect: Option<i64>,
        /// When rows were out unacknowledged: the newest row sent in this session.
        out_through: Option<i64>,
        /// A QoS 2 PUBLISH was out and the cloud had answered none with PUBREC in this
        /// session: what a cloud without QoS 2 does (RabbitMQ, AWS IoT, Mosquitto's
        /// `max_qos 1` towards 3.1.1 clients), which 3.1.1 has no other way to say.
        qos2_unanswered: bool,
    },
}

fn lost(why: impl Into<String>) -> SessionEnd {
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

fn dropped(why: impl Into<String>) -> SessionEnd {
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

enum Inflight {
    /// A spooled row; `stage` is `Released` once PUBREC arrived (QoS 2).
    Row { id: i64, stage: Stage },
    /// Birth or offline status (not spooled).
    Control,
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

pub(crate) struct Session<'a> {
    ctx: &'a Ctx,
    io: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    protocol: Protocol,
    limits: Limits,
    ids: PacketIds,
    inflight: HashMap<u16, Inflight>,
    queue: VecDeque<StoredMessage>,
    cursor: i64,
    exhausted: bool,
    committed: watch::Receiver<i64>,
    fetch: Option<BoxFuture<Result<Vec<StoredMessage>, SpoolError>>>,
    gate: Option<BoxFuture<Result<(), SpoolError>>>,
    gated: Vec<Out>,
    rel_pending: Vec<(u16, i64)>,
    /// Rows acknowledged (or dropped) since the last hand-off to the spool writer.
    acked: Vec<i64>,
    /// QoS 2 ids received from the cloud and not released yet; mirrored in the spool so a
    /// resent PUBLISH (DUP) after our restart is not delivered twice.
    incoming_qos2: HashSet<u16>,
    /// Downlink QoS 2 answers (PUBREC, PUBCOMP) in order, with the id-set change that must
    /// be durable before each goes out.
    down_pending: Vec<(Option<IncomingOp>, Packet)>,
    down_gate: Option<BoxFuture<Result<(), SpoolError>>>,
    down_gated: Vec<Packet>,
    /// Rows up to here were out when the cloud last dropped the link: they go up one at a
    /// time, so that if the cloud drops it again the row to blame is the only one out.
    careful_through: i64,
    newest_sent: i64,
    /// Careful mode: the cloud answered a PINGREQ sent while nothing was out, so it is done
    /// with everything before and still willing; the next row may go.
    careful_ready: bool,
    /// The outstanding PINGREQ is such a barrier.
    barrier_out: bool,
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
}

async fn opt<T>(f: &mut Option<BoxFuture<T>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

impl<'a> Session<'a> {
    pub(crate) fn new(
        ctx: &'a Ctx,
        io: Box<dyn Io>,
        rbuf: BytesMut,
        limits: Limits,
        careful_through: i64,
    ) -> Self {
        let now = Instant::now();
        let window = Window::new(limits.window, now);
        let aliases = TopicAliases::new(if ctx.protocol.is_v5() {
            limits.topic_alias_max
        } else {
            0
        });
        Session {
            ctx,
            io,
            rbuf,
            wbuf: BytesMut::with_capacity(64 * 1024),
            protocol: ctx.protocol,
            limits,
            ids: PacketIds::default(),
            inflight: HashMap::new(),
            queue: VecDeque::new(),
            cursor: 0,
            exhausted: false,
            committed: ctx.spool.committed(),
            fetch: None,
            gate: None,
            gated: Vec::new(),
            rel_pending: Vec::new(),
            acked: Vec::new(),
            incoming_qos2: HashSet::new(),
            down_pending: Vec::new(),
            down_gate: None,
            down_gated: Vec::new(),
            careful_through,
            newest_sent: 0,
            careful_ready: false,
            barrier_out: false,
            started_ms: now_ms(),
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
        }
    }

    /// Run until the link fails or shutdown completes.
    pub(crate) async fn run(
        mut self,
        shutdown: &mut watch::Receiver<bool>,
        live0: &mut mpsc::Receiver<NewMessage>,
    ) -> SessionEnd {
        self.show_window();
        let end = match self.drive(shutdown, live0).await {
            Ok(()) => SessionEnd::Shutdown,
            Err(SessionEnd::Dropped { why, .. }) => {
                self.salvage_acks().await;
                SessionEnd::Dropped {
                    why,
                    suspect: self.suspect(),
                    out_through: self.rows_out().then_some(self.newest_sent),
                    qos2_unanswered: !self.pubrec_seen && self.qos2_out(),
                }
            }
            Err(end) => end,
        };
        self.send_acked();
        // Queued after the deletes: acknowledged rows stay spared from drop-oldest until
        // their delete is applied, so none is counted both forwarded and dropped.
        self.ctx.spool.untake_all();
        end
    }

    /// After the cloud dropped the link, read what it sent before closing: a write that
    /// failed on the reset may have kept us from reading acknowledgements of rows it had
    /// accepted, and those rows must be neither blamed nor resent.
    async fn salvage_acks(&mut self) {
        let deadline = tokio::time::Instant::now() + SALVAGE_TIME;
        loop {
            while let Ok(Some(packet)) = decode(&mut self.rbuf, self.protocol, MAX_INCOMING_PACKET)
            {
                // Only final acknowledgements: anything else would need an answer we can no
                // longer send, and the cloud repeats it on the next session.
                let _ = match packet {
                    Packet::PubAck(r) => self.on_puback(r),
                    Packet::PubComp(r) => self.on_pubcomp(r),
                    _ => Ok(()),
                };
            }
            match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.rbuf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
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
    /// ([`Session::must_wait`]), which makes the next blame exact. An innocent row blamed once is acknowledged then, and the count starts over.
    fn suspect(&self) -> Option<i64> {
        if self
            .inflight
            .values()
            .any(|f| matches!(f, Inflight::Control))
        {
            return None;
        }
        let unsent = self.unsent_rows();
        self.inflight
            .values()
            .filter_map(|f| match f {
                // PUBREC came back: its PUBLISH was accepted.
                Inflight::Row { id, stage } if *stage != Stage::Released => Some(*id),
                _ => None,
            })
            .filter(|id| !unsent.contains(id))
            .min()
    }

    /// True when a QoS 2 PUBLISH went on the wire and has no answer.
    fn qos2_out(&self) -> bool {
        let unsent = self.unsent_rows();
        self.inflight.values().any(|f| {
            matches!(f, Inflight::Row { id, stage } if *stage == Stage::Published && !unsent.contains(id))
        })
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
        self.inflight
            .values()
            .any(|f| matches!(f, Inflight::Row { stage, .. } if *stage != Stage::Released))
    }

    async fn drive(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        live0: &mut mpsc::Receiver<NewMessage>,
    ) -> Result<(), SessionEnd> {
        // The reader sees committed state only: let the previous session's deletes and
        // stage changes land first, or acknowledged rows would be sent again.
        self.ctx
            .spool
            .flush()
            .await
            .map_err(|e| lost(format!("spool: {e}")))?;
        // Persisted QoS 2 identifiers stay reserved until their rows come round again.
        let in_progress = self
            .ctx
            .spool
            .in_progress()
            .await
            .map_err(|e| lost(format!("spool: {e}")))?;
        if self.limits.moved && !in_progress.is_empty() {
            let released = in_progress
                .iter()
                .filter(|r| r.stage == Stage::Released)
                .count();
            tracing::info!(bridge = %self.ctx.name, rows = in_progress.len(), released,
                "moved to another broker: {} QoS 2 messages the previous broker had not \
                 completed ({released} past PUBREC there) go up here as new messages",
                in_progress.len());
        } else if !in_progress.is_empty() && !self.limits.session_present {
            tracing::warn!(bridge = %self.ctx.name, rows = in_progress.len(),
                "cloud has no session for us: QoS 2 messages in flight are resent and may be duplicated");
        }
        for row in &in_progress {
            if let Some(pid) = row.packet_id {
                self.ids.reserve(pid);
            }
        }
        // The cloud resends unreleased QoS 2 PUBLISHes only within its session.
        if self.limits.session_present {
            let received = self
                .ctx
                .spool
                .incoming(&self.ctx.name)
                .await
                .map_err(|e| lost(format!("spool: {e}")))?;
            self.incoming_qos2.extend(received);
        } else {
            self.ctx
                .spool
                .clear_incoming(&self.ctx.name)
                .await
                .map_err(|e| lost(format!("spool: {e}")))?;
        }
        self.subscribe()?;
        if self.ctx.config.status.enabled {
            match in_progress.iter().map(|r| r.id).max() {
                None => {
                    let payload = self.ctx.status.birth();
                    self.send_control(payload)?;
                }
                // The cloud still holds these QoS 2 exchanges and counts them against its
                // Receive Maximum until PUBCOMP (section 4.9). Sent first, the birth would
                // exceed it: Mosquitto refuses it (0x97), leaving the status "offline",
                // and with max_queued_messages 0 also drops the link, every time.
                Some(last) => self.birth_after = Some(last),
            }
        }
        let mut tick = tokio::time::interval(ACK_FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.fill()?;
            self.pump_downlink()?;
            self.flush().await?;
            if self.fetch.is_none() && !self.exhausted && self.queue.len() < FETCH_LIMIT / 2 {
                let spool = self.ctx.spool.clone();
                let after = self.cursor;
                self.fetch = Some(Box::pin(
                    async move { spool.fetch(after, FETCH_LIMIT).await },
                ));
            }
            let replay_wake = self.replay_wake;
            tokio::select! {
                r = self.io.read_buf(&mut self.rbuf) => {
                    match r {
                        Ok(0) => return Err(dropped("connection closed by the cloud")),
                        Ok(_) => self.on_bytes().await?,
                        Err(e) => return Err(dropped(format!("read: {e}"))),
                    }
                }
                rows = opt(&mut self.fetch) => {
                    self.fetch = None;
                    let rows = rows.map_err(|e| lost(format!("spool: {e}")))?;
                    if rows.len() < FETCH_LIMIT {
                        self.exhausted = true;
                    }
                    if let Some(last) = rows.last() {
                        self.cursor = last.id;
                    }
                    self.queue.extend(rows);
                }
                done = opt(&mut self.down_gate) => {
                    self.down_gate = None;
                    done.map_err(|e| lost(format!("spool: {e}")))?;
                    for answer in std::mem::take(&mut self.down_gated) {
                        self.encode(&answer)?;
                    }
                }
                done = opt(&mut self.gate) => {
                    self.gate = None;
                    done.map_err(|e| lost(format!("spool: {e}")))?;
                    for out in std::mem::take(&mut self.gated) {
                        self.write_out(out)?;
                    }
                }
                changed = self.committed.changed(), if self.exhausted => {
                    changed.map_err(|_| lost("spool writer stopped"))?;
                    self.committed.borrow_and_update();
                    self.exhausted = false;
                }
                Some(msg) = live0.recv() => self.send_live_qos0(msg)?,
                _ = tick.tick() => {
                    self.send_acked();
                    self.keep_alive()?;
                }
                _ = async { if let Some(at) = replay_wake { tokio::time::sleep_until(at.into()).await } }, if replay_wake.is_some() => {
                    self.replay_wake = None;
                }
                _ = super::stop_requested(shutdown) => return self.goodbye().await,
            }
        }
    }

    fn encode(&mut self, packet: &Packet) -> Result<(), SessionEnd> {
        encode(packet, self.protocol, &mut self.wbuf).map_err(|e| lost(format!("encode: {e}")))
    }

    async fn flush(&mut self) -> Result<(), SessionEnd> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let io = &mut self.io;
        let wbuf = &self.wbuf;
        let write = async move {
            io.write_all(wbuf).await?;
            // TLS and WebSocket buffer inside; a flush puts the bytes on the wire.
            io.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(dropped(format!("write: {e}"))),
            Err(_) => return Err(lost("write timed out")),
        }
        self.wbuf.clear();
        self.last_sent = Instant::now();
        Ok(())
    }

    fn subscribe(&mut self) -> Result<(), SessionEnd> {
        let subs = self.ctx.rules.remote_subscriptions();
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

    fn send_control(&mut self, payload: bytes::Bytes) -> Result<u16, SessionEnd> {
        let (pid, publish) = self.status_publish(payload)?;
        self.write_out(Out::Status(publish))?;
        Ok(pid)
    }

    /// A status PUBLISH under a fresh identifier, counted in flight.
    fn status_publish(&mut self, payload: bytes::Bytes) -> Result<(u16, Publish), SessionEnd> {
        let pid = self
            .ids
            .alloc()
            .ok_or_else(|| lost("no free packet identifier"))?;
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: self.limits.retain_available,
            topic: ByteString::from(self.ctx.status.topic.clone()),
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
        let payload = self.ctx.status.birth();
        let (_, publish) = self.status_publish(payload)?;
        outs.push(Out::Status(publish));
        Ok(true)
    }

    /// Hand acknowledged rows to the spool writer. Always before any stage write, so a
    /// freed packet id is never persisted for a new row while the old row still holds it.
    fn send_acked(&mut self) {
        if !self.acked.is_empty() {
            self.ctx.spool.delete_many(std::mem::take(&mut self.acked));
        }
    }

    /// Start the commit that the oldest downlink answers wait for (one at a time, so their
    /// order is kept); answers that change nothing go out at once.
    fn pump_downlink(&mut self) -> Result<(), SessionEnd> {
        if self.down_gate.is_some() || self.down_pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.down_pending);
        let ops: Vec<IncomingOp> = pending.iter().filter_map(|(op, _)| *op).collect();
        let answers = pending.into_iter().map(|(_, answer)| answer);
        if ops.is_empty() {
            for answer in answers {
                self.encode(&answer)?;
            }
        } else {
            self.down_gated = answers.collect();
            let spool = self.ctx.spool.clone();
            let bridge = self.ctx.name.clone();
            self.down_gate = Some(Box::pin(
                async move { spool.apply_incoming(&bridge, ops).await },
            ));
        }
        Ok(())
    }

    /// Move spooled rows into the window, persisting QoS 2 stages first when needed.
    fn fill(&mut self) -> Result<(), SessionEnd> {
        if self.acked.len() >= ACK_BATCH {
            self.send_acked();
        }
        if self.gate.is_some() {
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
        let rate = self.ctx.config.replay_rate;
        let now = Instant::now();
        let now_ms = now_ms();
        let ctx = self.ctx;
        // One uncontended lock per refill; drop-oldest takes it only when the spool is full.
        let mut marks = ctx.spool.fence().lock();
        while self.inflight.len() < self.window.limit() && self.goodbye_pid.is_none() {
            let Some(front) = self.queue.front() else {
                break;
            };
            if marks.claimed(front.id, front.stage) {
                // drop-oldest deleted it after we read it; it is counted as dropped there.
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
                        self.newest_sent = self.newest_sent.max(*row);
                        self.careful_ready = false;
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
        drop(marks);
        if self.queue.is_empty() && self.goodbye_pid.is_none() {
            self.birth_due(None, &mut outs)?;
        }
        if updates.is_empty() {
            for out in outs {
                self.write_out(out)?;
            }
        } else {
            self.send_acked();
            let spool = self.ctx.spool.clone();
            self.gate = Some(Box::pin(async move { spool.set_stages(updates).await }));
            self.gated = outs;
        }
        Ok(())
    }

    /// True when row `id` must wait. While the rows that were out at the last link drop
    /// are resent, a row goes only when nothing else is out and the cloud has answered a
    /// PINGREQ sent after that (which this sends when needed): a drop after that can only
    /// be about this row, not about something before it that the cloud acknowledged and
    /// then disconnected us for. Free in the normal case (no recent drop, or past those
    /// rows): the window scan only runs while resending.
    fn must_wait(&mut self, id: i64) -> Result<bool, SessionEnd> {
        if self.careful_through == 0
            || (id > self.careful_through && self.newest_sent > self.careful_through)
        {
            return Ok(false);
        }
        let publish_out = self.rows_out()
            || self
                .inflight
                .values()
                .any(|f| matches!(f, Inflight::Control))
            || self.gated.iter().any(|o| matches!(o, Out::Publish { .. }));
        if publish_out {
            return Ok(true);
        }
        if self.careful_ready {
            return Ok(false);
        }
        if !self.ping_out {
            self.ping_out = true;
            self.barrier_out = true;
            self.encode(&Packet::PingReq)?;
        }
        Ok(true)
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
                self.acked.push(id);
                BridgeStats::bump(&self.ctx.stats.dropped_expired);
                tracing::info!(bridge = %self.ctx.name, topic = %row.topic, "message expired in the spool");
                return Ok(None);
            }
            row.properties.message_expiry_interval = Some(expiry - age as u32);
        }
        let qos = row.qos.min(self.limits.max_qos);
        if qos < row.qos && row.qos == QoS::ExactlyOnce && !self.downgrade_logged {
            self.downgrade_logged = true;
            tracing::warn!(bridge = %self.ctx.name, max_qos = self.limits.max_qos as u8,
                "cloud (or config) allows no QoS 2: QoS 2 messages go up as QoS {}", qos as u8);
        }
        if qos == QoS::AtMostOnce {
            let publish = self.publish_of(row, QoS::AtMostOnce, None, false);
            return Ok(Some(Out::Publish { row: id, publish }));
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
        let shown = &self.ctx.stats.inflight_window;
        if shown.load(std::sync::atomic::Ordering::Relaxed) != limit {
            shown.store(limit, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn forget(&mut self, pid: u16) {
        self.window.forget(pid);
        self.inflight.remove(&pid);
        self.ids.release(pid);
    }

    fn write_out(&mut self, out: Out) -> Result<(), SessionEnd> {
        match out {
            Out::PubRel(pid) => self.encode(&Packet::PubRel(PubResponse::new(pid))),
            Out::Status(mut publish) => {
                let topic = publish.topic.clone();
                let sets = self.aliases.apply(&mut publish);
                let encoded = encode_publish(&publish, self.protocol, &mut self.wbuf);
                if encoded.is_err() && sets == Some(true) {
                    self.aliases.withdraw(&topic);
                }
                encoded.map_err(|e| lost(format!("encode status: {e}")))
            }
            Out::Publish { row, mut publish } => {
                let topic = publish.topic.clone();
                let sets = self.aliases.apply(&mut publish);
                let before = self.wbuf.len();
                let encoded = encode_publish(&publish, self.protocol, &mut self.wbuf);
                let size = self.wbuf.len() - before;
                let refused = match encoded {
                    Err(e) => Some((
                        format!("cannot encode: {e}"),
                        &self.ctx.stats.dropped_refused,
                    )),
                    Ok(()) if size > self.limits.max_packet => Some((
                        format!(
                            "{size} bytes exceed the cloud's Maximum Packet Size {}",
                            self.limits.max_packet
                        ),
                        &self.ctx.stats.dropped_too_large,
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
                    tracing::error!(bridge = %self.ctx.name, row, %topic,
                        payload_bytes = publish.payload.len(), "message dropped: {why}");
                } else if publish.qos == QoS::AtMostOnce {
                    self.acked.push(row);
                    BridgeStats::bump(&self.ctx.stats.forwarded);
                } else if let Some(pid) = publish.packet_id {
                    self.window
                        .on_send(pid, Instant::now(), self.inflight.len());
                }
                Ok(())
            }
        }
    }

    fn send_live_qos0(&mut self, msg: NewMessage) -> Result<(), SessionEnd> {
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
        match encode_publish(&publish, self.protocol, &mut self.wbuf) {
            Ok(()) if self.wbuf.len() - before <= self.limits.max_packet => {
                BridgeStats::bump(&self.ctx.stats.forwarded);
            }
            _ => {
                self.wbuf.truncate(before);
                if sets == Some(true) {
                    self.aliases.withdraw(&topic);
                }
                BridgeStats::bump(&self.ctx.stats.dropped_qos0);
            }
        }
        Ok(())
    }

    fn keep_alive(&mut self) -> Result<(), SessionEnd> {
        let ka = self.limits.keep_alive;
        if ka.is_zero() {
            return Ok(());
        }
        if self.last_recv.elapsed() > ka + ka / 2 {
            return Err(lost(
                "keep alive timeout: no packet from the cloud (half-open link?)",
            ));
        }
        if !self.ping_out && (self.last_sent.elapsed() >= ka || self.last_recv.elapsed() >= ka) {
            self.ping_out = true;
            self.encode(&Packet::PingReq)?;
        }
        Ok(())
    }

    async fn on_bytes(&mut self) -> Result<(), SessionEnd> {
        self.last_recv = Instant::now();
        loop {
            match decode(&mut self.rbuf, self.protocol, MAX_INCOMING_PACKET) {
                Ok(Some(packet)) => self.on_packet(packet).await?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    if self.protocol.is_v5() {
                        let _ = self.encode(&Packet::Disconnect(Disconnect {
                            reason: e.reason_code(),
                            properties: Properties::default(),
                        }));
                        let _ = self.flush().await;
                    }
                    return Err(lost(format!("malformed packet from the cloud: {e}")));
                }
            }
        }
    }

    async fn on_packet(&mut self, packet: Packet) -> Result<(), SessionEnd> {
        match packet {
            Packet::PubAck(r) => self.on_puback(r),
            Packet::PubRec(r) => self.on_pubrec(r),
            Packet::PubComp(r) => self.on_pubcomp(r),
            Packet::Publish(p) => self.on_publish(p).await,
            Packet::PubRel(r) => {
                let pid = r.packet_id;
                // PUBCOMP only once the id is forgotten durably: after PUBCOMP the cloud may
                // reuse it for a new message, which a stale entry would swallow as a DUP.
                let op = self
                    .incoming_qos2
                    .remove(&pid)
                    .then_some(IncomingOp::Remove(pid));
                self.down_pending
                    .push((op, Packet::PubComp(PubResponse::new(pid))));
                Ok(())
            }
            Packet::PingResp => {
                self.ping_out = false;
                if std::mem::take(&mut self.barrier_out) {
                    self.careful_ready = true;
                }
                Ok(())
            }
            Packet::SubAck(s) => {
                self.ids.release(s.packet_id);
                for (i, code) in s.reason_codes.iter().enumerate() {
                    if code.is_error() {
                        tracing::error!(bridge = %self.ctx.name, filter = i, reason = code.0,
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

    fn on_puback(&mut self, r: PubResponse) -> Result<(), SessionEnd> {
        match self.inflight.get(&r.packet_id) {
            Some(Inflight::Row { id, .. }) => {
                let id = *id;
                self.window.on_ack(r.packet_id, Instant::now());
                self.show_window();
                self.forget(r.packet_id);
                self.acked.push(id);
                self.count_ack(id, r.reason);
            }
            Some(Inflight::Control) => {
                self.forget(r.packet_id);
                if r.reason.is_error() {
                    tracing::warn!(bridge = %self.ctx.name, topic = %self.ctx.status.topic,
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
            BridgeStats::bump(&self.ctx.stats.dropped_refused);
            tracing::warn!(bridge = %self.ctx.name, row, reason = format!("0x{:02x}", reason.0),
                "cloud refused a message (error reason code): dropped, counted in dropped/refused");
        } else {
            BridgeStats::bump(&self.ctx.stats.forwarded);
        }
    }

    fn on_pubrec(&mut self, r: PubResponse) -> Result<(), SessionEnd> {
        let pid = r.packet_id;
        self.pubrec_seen = true;
        // The first answer to a QoS 2 PUBLISH times the round trip; the PUBCOMP does not.
        self.window.on_ack(pid, Instant::now());
        self.show_window();
        match self.inflight.get_mut(&pid) {
            Some(Inflight::Row { id, stage }) => {
                let id = *id;
                if r.reason.is_error() {
                    self.forget(pid);
                    self.acked.push(id);
                    self.count_ack(id, r.reason);
                } else if *stage == Stage::Published {
                    // PUBREL goes out only after "released" is durable: a crash before that
                    // resends PUBLISH (DUP) with the same id, which the cloud deduplicates.
                    *stage = Stage::Released;
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
        if let Some(Inflight::Row { id, .. }) = self.inflight.get(&r.packet_id) {
            let id = *id;
            self.forget(r.packet_id);
            self.acked.push(id);
            if r.reason == ReasonCode::PACKET_IDENTIFIER_NOT_FOUND {
                tracing::info!(bridge = %self.ctx.name, pid = r.packet_id,
                    "PUBCOMP: cloud had already completed this QoS 2 message");
            }
            BridgeStats::bump(&self.ctx.stats.forwarded);
        }
        Ok(())
    }

    async fn on_publish(&mut self, p: Publish) -> Result<(), SessionEnd> {
        let pid = p.packet_id;
        let duplicate =
            p.qos == QoS::ExactlyOnce && pid.is_some_and(|id| self.incoming_qos2.contains(&id));
        if !duplicate {
            match self.ctx.rules.map_in(&p.topic) {
                Some(m) => {
                    let local = LocalPublish {
                        topic: m.topic,
                        payload: p.payload,
                        qos: p.qos.min(m.qos),
                        retain: p.retain && m.retain == RetainMode::Keep,
                    };
                    if self.ctx.local.send(local).await.is_err() {
                        tracing::warn!(bridge = %self.ctx.name, "local broker gone: downlink message not delivered");
                    }
                }
                None => tracing::debug!(topic = %p.topic, "downlink message matches no `in` rule"),
            }
        }
        match (p.qos, pid) {
            (QoS::AtLeastOnce, Some(id)) => self.encode(&Packet::PubAck(PubResponse::new(id))),
            (QoS::ExactlyOnce, Some(id)) => {
                // Delivered first, remembered durably second, PUBREC last: a crash in between
                // can at worst deliver twice, never lose the message.
                let op =
                    (!duplicate && self.incoming_qos2.insert(id)).then_some(IncomingOp::Add(id));
                self.down_pending
                    .push((op, Packet::PubRec(PubResponse::new(id))));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Publish the clean offline status, wait (bounded) for its ack while still taking
    /// acknowledgements of the window, then DISCONNECT so the will is not published.
    async fn goodbye(&mut self) -> Result<(), SessionEnd> {
        if self.ctx.config.status.enabled {
            let payload = self.ctx.status.offline(OfflineReason::Clean);
            self.goodbye_pid = Some(self.send_control(payload)?);
            self.flush().await?;
            let deadline = tokio::time::Instant::now() + GOODBYE_TIMEOUT;
            while self
                .goodbye_pid
                .is_some_and(|pid| self.inflight.contains_key(&pid))
            {
                match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.rbuf)).await {
                    Ok(Ok(n)) if n > 0 => {
                        self.on_bytes().await?;
                        self.flush().await?;
                    }
                    Ok(_) => return Err(lost("connection closed during shutdown")),
                    Err(_) => {
                        tracing::warn!(bridge = %self.ctx.name, "cloud did not acknowledge the offline status in time");
                        break;
                    }
                }
            }
        }
        self.encode(&Packet::Disconnect(Disconnect {
            reason: ReasonCode::NORMAL_DISCONNECTION,
            properties: Properties::default(),
        }))?;
        self.flush().await?;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
        tracing::info!(bridge = %self.ctx.name, inflight = self.inflight.len(), "disconnected cleanly");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_message_level_disconnect_reasons_can_blame_a_message() {
        for about_a_message in [
            ReasonCode::PACKET_TOO_LARGE,
            ReasonCode::PAYLOAD_FORMAT_INVALID,
            ReasonCode::TOPIC_NAME_INVALID,
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::MALFORMED_PACKET,
            ReasonCode::UNSPECIFIED_ERROR,
            ReasonCode(0xFE),
        ] {
            assert!(
                may_be_about_a_message(about_a_message),
                "{about_a_message:?}"
            );
        }
        for about_the_link in [
            ReasonCode::SESSION_TAKEN_OVER,
            ReasonCode::SERVER_SHUTTING_DOWN,
            ReasonCode::SERVER_BUSY,
            ReasonCode::KEEP_ALIVE_TIMEOUT,
            ReasonCode::MESSAGE_RATE_TOO_HIGH,
            ReasonCode::NORMAL_DISCONNECTION,
        ] {
            assert!(
                !may_be_about_a_message(about_the_link),
                "{about_the_link:?}"
            );
        }
    }
}
