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
use super::packet_ids::PacketIds;
use super::transport::Io;
use crate::LocalPublish;
use crate::error::SpoolError;
use crate::rules::RetainMode;
use crate::spool::{NewMessage, Stage, StageUpdate, StoredMessage};
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

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// Shutdown was requested and the goodbye was sent.
    Shutdown,
    /// The link failed; reconnect.
    Lost(String),
}

fn lost(why: impl Into<String>) -> SessionEnd {
    SessionEnd::Lost(why.into())
}

/// Limits the cloud announced in CONNACK, combined with configuration.
pub(crate) struct Limits {
    pub window: usize,
    pub max_qos: u8,
    pub max_packet: usize,
    pub retain_available: bool,
    pub keep_alive: Duration,
    pub session_present: bool,
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
    Publish { row: i64, publish: Publish },
    PubRel(u16),
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
    incoming_qos2: HashSet<u16>,
    started_ms: i64,
    replay_next: Instant,
    replay_wake: Option<Instant>,
    last_sent: Instant,
    last_recv: Instant,
    ping_out: bool,
    downgrade_logged: bool,
    goodbye_pid: Option<u16>,
}

async fn opt<T>(f: &mut Option<BoxFuture<T>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn qos_of(v: u8) -> QoS {
    QoS::from_u8(v).unwrap_or(QoS::AtLeastOnce)
}

impl<'a> Session<'a> {
    pub(crate) fn new(ctx: &'a Ctx, io: Box<dyn Io>, rbuf: BytesMut, limits: Limits) -> Self {
        let now = Instant::now();
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
            started_ms: now_ms(),
            replay_next: now,
            replay_wake: None,
            last_sent: now,
            last_recv: now,
            ping_out: false,
            downgrade_logged: false,
            goodbye_pid: None,
        }
    }

    /// Run until the link fails or shutdown completes.
    pub(crate) async fn run(
        mut self,
        shutdown: &mut watch::Receiver<bool>,
        live0: &mut mpsc::Receiver<NewMessage>,
    ) -> SessionEnd {
        let end = match self.drive(shutdown, live0).await {
            Ok(()) => SessionEnd::Shutdown,
            Err(end) => end,
        };
        self.send_acked();
        end
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
        if !in_progress.is_empty() && !self.limits.session_present {
            tracing::warn!(bridge = %self.ctx.name, rows = in_progress.len(),
                "cloud has no session for us: QoS 2 messages in flight are resent and may be duplicated");
        }
        for row in &in_progress {
            if let Some(pid) = row.packet_id {
                self.ids.reserve(pid);
            }
        }
        self.subscribe()?;
        if self.ctx.config.status.enabled {
            let payload = self.ctx.status.birth();
            self.send_control(payload)?;
        }
        let mut tick = tokio::time::interval(ACK_FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.fill()?;
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
                        Ok(0) => return Err(lost("connection closed by the cloud")),
                        Ok(_) => self.on_bytes().await?,
                        Err(e) => return Err(lost(format!("read: {e}"))),
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
            Ok(Err(e)) => return Err(lost(format!("write: {e}"))),
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
                    qos: qos_of(qos.min(self.limits.max_qos.max(1))),
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
        encode_publish(&publish, self.protocol, &mut self.wbuf)
            .map_err(|e| lost(format!("encode status: {e}")))?;
        self.inflight.insert(pid, Inflight::Control);
        Ok(pid)
    }

    /// Hand acknowledged rows to the spool writer. Always before any stage write, so a
    /// freed packet id is never persisted for a new row while the old row still holds it.
    fn send_acked(&mut self) {
        if !self.acked.is_empty() {
            self.ctx.spool.delete_many(std::mem::take(&mut self.acked));
        }
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
        while self.inflight.len() < self.limits.window && self.goodbye_pid.is_none() {
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
            match self.prepare(row, now_ms, &mut updates) {
                Ok(Some(out)) => outs.push(out),
                Ok(None) => {}
                Err(row) => {
                    self.queue.push_front(*row);
                    break;
                }
            }
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

    /// Turn a row into what goes on the wire; `Err(row)` when no identifier is free.
    fn prepare(
        &mut self,
        row: StoredMessage,
        now_ms: i64,
        updates: &mut Vec<StageUpdate>,
    ) -> Result<Option<Out>, Box<StoredMessage>> {
        let id = row.id;
        match (row.stage, row.packet_id) {
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
            (Stage::Published, Some(pid)) if self.limits.max_qos >= 2 => {
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
        if qos < row.qos && row.qos == 2 && !self.downgrade_logged {
            self.downgrade_logged = true;
            tracing::warn!(bridge = %self.ctx.name, max_qos = self.limits.max_qos,
                "cloud (or config) allows no QoS 2: QoS 2 messages go up as QoS {qos}");
        }
        if qos == 0 {
            let publish = self.publish_of(row, QoS::AtMostOnce, None, false);
            return Ok(Some(Out::Publish { row: id, publish }));
        }
        let Some(pid) = self.ids.alloc() else {
            return Err(Box::new(row));
        };
        let stage = if qos == 2 {
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
        let publish = self.publish_of(row, qos_of(qos), Some(pid), false);
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

    fn forget(&mut self, pid: u16) {
        self.inflight.remove(&pid);
        self.ids.release(pid);
    }

    fn write_out(&mut self, out: Out) -> Result<(), SessionEnd> {
        match out {
            Out::PubRel(pid) => self.encode(&Packet::PubRel(PubResponse::new(pid))),
            Out::Publish { row, publish } => {
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
                    if let Some(pid) = publish.packet_id {
                        self.forget(pid);
                    }
                    self.acked.push(row);
                    BridgeStats::bump(counter);
                    tracing::error!(bridge = %self.ctx.name, topic = %publish.topic, "message dropped: {why}");
                } else if publish.qos == QoS::AtMostOnce {
                    self.acked.push(row);
                    BridgeStats::bump(&self.ctx.stats.forwarded);
                }
                Ok(())
            }
        }
    }

    fn send_live_qos0(&mut self, msg: NewMessage) -> Result<(), SessionEnd> {
        let publish = Publish {
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
        let before = self.wbuf.len();
        match encode_publish(&publish, self.protocol, &mut self.wbuf) {
            Ok(()) if self.wbuf.len() - before <= self.limits.max_packet => {
                BridgeStats::bump(&self.ctx.stats.forwarded);
            }
            _ => {
                self.wbuf.truncate(before);
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
                self.incoming_qos2.remove(&r.packet_id);
                self.encode(&Packet::PubComp(PubResponse::new(r.packet_id)))
            }
            Packet::PingResp => {
                self.ping_out = false;
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
            Packet::Disconnect(d) => Err(lost(format!(
                "cloud sent DISCONNECT (reason 0x{:02x}{})",
                d.reason.0,
                d.properties
                    .reason_string
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default()
            ))),
            other => Err(lost(format!("unexpected packet from the cloud: {other:?}"))),
        }
    }

    fn on_puback(&mut self, r: PubResponse) -> Result<(), SessionEnd> {
        match self.inflight.get(&r.packet_id) {
            Some(Inflight::Row { id, .. }) => {
                let id = *id;
                self.forget(r.packet_id);
                self.acked.push(id);
                self.count_ack(r.reason);
            }
            Some(Inflight::Control) => self.forget(r.packet_id),
            None => tracing::debug!(pid = r.packet_id, "PUBACK for an unknown packet id"),
        }
        Ok(())
    }

    fn count_ack(&self, reason: ReasonCode) {
        if reason.is_error() {
            BridgeStats::bump(&self.ctx.stats.dropped_refused);
            tracing::warn!(bridge = %self.ctx.name, reason = reason.0, "cloud refused a message");
        } else {
            BridgeStats::bump(&self.ctx.stats.forwarded);
        }
    }

    fn on_pubrec(&mut self, r: PubResponse) -> Result<(), SessionEnd> {
        let pid = r.packet_id;
        match self.inflight.get_mut(&pid) {
            Some(Inflight::Row { id, stage }) => {
                let id = *id;
                if r.reason.is_error() {
                    self.forget(pid);
                    self.acked.push(id);
                    self.count_ack(r.reason);
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
                        qos: p.qos.min(qos_of(m.qos)),
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
                self.incoming_qos2.insert(id);
                self.encode(&Packet::PubRec(PubResponse::new(id)))
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
