//! One network connection: decode what the client sends, encode what the core sends.
//!
//! The reader half runs the protocol checks that need no shared state (CONNECT first,
//! keep alive, inbound topic aliases, Receive Maximum) and forwards the rest to the core.
//! The writer half encodes deliveries, applies outbound topic aliases and keeps
//! PUBACK/PUBREC in the order the PUBLISHes arrived even when some wait for the bridge
//! spool. Any protocol violation ends this connection only.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytestring::ByteString;
use futures_util::future::BoxFuture;
use outpost_mqtt::{
    ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, Protocol, Publish, QoS,
    ReasonCode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info};

use super::auth;
use super::core::{ConnectRequest, CoreEvent};
use super::handle::BrokerHandle;
use super::outbound::{self, Ack, AckKind, DurableResult, Outbound, OutboundRx, OutboundTx};
use super::router::SessionKey;
use super::settings::Settings;

/// Writes are batched up to this many items before one `write_all`.
const WRITE_BATCH: usize = 512;

/// Serves one accepted connection until it closes.
pub async fn serve<S>(stream: S, peer: SocketAddr, core: BrokerHandle, settings: Arc<Settings>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(1024);
    let max = settings.max_packet_size;

    // MQTT-3.1.0-1: the first packet must be CONNECT, within the configured time.
    let first = tokio::time::timeout(
        settings.connect_timeout,
        read_packet(&mut rd, &mut buf, Protocol::V5, max),
    )
    .await;
    let connect = match first {
        Err(_) => {
            debug!(%peer, "no CONNECT within the connect timeout; closing");
            return;
        }
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(Some(other))) => {
            debug!(%peer, packet = ?kind(&other), "first packet is not CONNECT; closing");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(ReadError::Decode(DecodeError::UnsupportedProtocol { level, .. }))) => {
            // MQTT-3.1.2-2: answer an unknown protocol level with return code 1 (3.1.1
            // format, which every version's client can parse), then close.
            info!(%peer, level, "unsupported protocol level; refusing");
            let _ = write_packet(
                &mut wr,
                &refusal(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
                Protocol::V3_1_1,
            )
            .await;
            return;
        }
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "bad CONNECT; closing");
            return;
        }
    };
    let protocol = connect.protocol;

    if let Err(reason) = auth::check(&connect, &settings).await {
        info!(%peer, client_id = %connect.client_id, reason = ?reason, "connection refused");
        let _ = write_packet(&mut wr, &refusal(reason), protocol).await;
        return;
    }

    let keep_alive = effective_keep_alive(&connect, &settings);
    let (tx, rx) = outbound::channel();
    let (closed_tx, mut closed_rx) = watch::channel(false);
    let unacked_qos1 = Arc::new(AtomicU32::new(0));
    let writer = Writer {
        protocol,
        buf: BytesMut::with_capacity(1024),
        acks: VecDeque::new(),
        aliases: HashMap::new(),
        alias_max: connect.properties.topic_alias_maximum.unwrap_or(0),
        max_packet_size: connect.properties.maximum_packet_size.map(|m| m as usize),
        unacked_qos1: unacked_qos1.clone(),
    };
    let writer_task = tokio::spawn(writer.run(wr, rx, closed_tx));

    let (reply, accepted) = oneshot::channel();
    let request = ConnectRequest {
        connect,
        tx: tx.clone(),
        reply,
    };
    if core.send(CoreEvent::Connect(request)).await.is_err() {
        return;
    }
    let Ok(Some((session, conn_id))) = accepted.await else {
        drop(tx);
        let _ = writer_task.await;
        return;
    };

    let mut reader = Reader {
        protocol,
        session,
        conn_id,
        core: core.clone(),
        tx,
        settings,
        aliases: HashMap::new(),
        unacked_qos1,
        pending_qos2: HashSet::new(),
    };
    let disconnect = tokio::select! {
        d = reader.run(&mut rd, &mut buf, keep_alive) => d,
        _ = closed_rx.wait_for(|c| *c) => None,
    };
    let _ = core
        .send(CoreEvent::Closed {
            session,
            conn_id,
            disconnect,
        })
        .await;
    drop(reader);
    let _ = writer_task.await;
}

fn refusal(reason: ReasonCode) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present: false,
        reason,
        properties: Properties::default(),
    })
}

/// Keep alive the server enforces: the client's value, capped for 5.0 clients by
/// `max_keepalive` (announced as Server Keep Alive). 3.x clients cannot be told a
/// different value, so theirs is honoured as is.
fn effective_keep_alive(c: &Connect, s: &Settings) -> Option<Duration> {
    let secs = if c.protocol.is_v5()
        && (c.keep_alive > s.max_keepalive || (c.keep_alive == 0 && s.max_keepalive < u16::MAX))
    {
        s.max_keepalive
    } else {
        c.keep_alive
    };
    // MQTT-3.1.2-24: one and a half times the keep alive without a packet ends it.
    (secs > 0).then(|| Duration::from_millis(u64::from(secs) * 1500))
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

/// Reads until one whole packet is decoded; `Ok(None)` on a clean end of stream.
async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    protocol: Protocol,
    max: usize,
) -> Result<Option<Packet>, ReadError> {
    loop {
        if let Some(p) = outpost_mqtt::decode(buf, protocol, max)? {
            return Ok(Some(p));
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(4096);
        }
        if rd.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            };
        }
    }
}

async fn write_packet<W: AsyncWrite + Unpin>(
    wr: &mut W,
    p: &Packet,
    protocol: Protocol,
) -> std::io::Result<()> {
    let mut b = BytesMut::new();
    outpost_mqtt::encode(p, protocol, &mut b).map_err(std::io::Error::other)?;
    wr.write_all(&b).await?;
    wr.flush().await
}

struct Reader {
    protocol: Protocol,
    session: SessionKey,
    conn_id: u64,
    core: BrokerHandle,
    tx: OutboundTx,
    settings: Arc<Settings>,
    /// Inbound topic aliases (5.0): alias -> topic.
    aliases: HashMap<u16, ByteString>,
    /// QoS 1 PUBLISHes not yet acknowledged (the writer decrements).
    unacked_qos1: Arc<AtomicU32>,
    /// QoS 2 packet ids between PUBLISH and PUBREL.
    pending_qos2: HashSet<u16>,
}

/// Why the reader stopped; a protocol violation also tells the writer what to send.
enum Violation {
    Reason(ReasonCode),
}

impl Reader {
    /// Reads packets until the client disconnects (returns its DISCONNECT) or the
    /// connection ends abnormally (returns `None`).
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        buf: &mut BytesMut,
        keep_alive: Option<Duration>,
    ) -> Option<Disconnect> {
        let max = self.settings.max_packet_size;
        loop {
            let next = match keep_alive {
                Some(t) => {
                    match tokio::time::timeout(t, read_packet(rd, buf, self.protocol, max)).await {
                        Ok(r) => r,
                        Err(_) => {
                            debug!(conn_id = self.conn_id, "keep alive expired");
                            self.violation(Violation::Reason(ReasonCode::KEEP_ALIVE_TIMEOUT));
                            return None;
                        }
                    }
                }
                None => read_packet(rd, buf, self.protocol, max).await,
            };
            let packet = match next {
                Ok(Some(p)) => p,
                Ok(None) => return None,
                Err(ReadError::Io(e)) => {
                    debug!(conn_id = self.conn_id, error = %e, "connection lost");
                    return None;
                }
                Err(ReadError::Decode(e)) => {
                    info!(conn_id = self.conn_id, error = %e, "malformed packet; closing the connection");
                    self.violation(Violation::Reason(e.reason_code()));
                    return None;
                }
            };
            match self.on_packet(packet).await {
                Ok(None) => {}
                Ok(Some(d)) => return Some(d),
                Err(v) => {
                    self.violation(v);
                    return None;
                }
            }
        }
    }

    fn violation(&self, v: Violation) {
        let Violation::Reason(r) = v;
        self.tx.send(Outbound::Disconnect(r));
    }

    async fn forward(&self, packet: Packet) -> Result<(), Violation> {
        self.core
            .send(CoreEvent::Packet {
                session: self.session,
                conn_id: self.conn_id,
                packet,
            })
            .await
            .map_err(|_| Violation::Reason(ReasonCode::SERVER_SHUTTING_DOWN))
    }

    async fn on_packet(&mut self, packet: Packet) -> Result<Option<Disconnect>, Violation> {
        match packet {
            Packet::Publish(p) => self.on_publish(p).await?,
            Packet::PingReq => {
                self.tx.send(Outbound::PingResp);
            }
            Packet::PubRel(r) => {
                self.pending_qos2.remove(&r.packet_id);
                self.forward(Packet::PubRel(r)).await?;
            }
            p @ (Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubComp(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)) => {
                self.forward(p).await?;
            }
            Packet::Disconnect(d) => return Ok(Some(d)),
            // MQTT-3.1.0-2: a second CONNECT is a protocol violation; so are packets only
            // a server sends, and AUTH, since no enhanced authentication is offered.
            _ => return Err(Violation::Reason(ReasonCode::PROTOCOL_ERROR)),
        }
        Ok(None)
    }

    async fn on_publish(&mut self, mut p: Publish) -> Result<(), Violation> {
        if self.protocol.is_v5() {
            self.resolve_alias(&mut p)?;
            if p.qos != QoS::AtMostOnce {
                let new_qos2 = p.qos == QoS::ExactlyOnce
                    && !self.pending_qos2.contains(&p.packet_id.unwrap_or(0));
                let inflight = self.unacked_qos1.load(Ordering::Relaxed) as usize
                    + self.pending_qos2.len()
                    + usize::from(p.qos == QoS::AtLeastOnce || new_qos2);
                if inflight > usize::from(self.settings.receive_maximum) {
                    // MQTT-3.3.4-7: more unacknowledged QoS 1/2 PUBLISHes than our
                    // Receive Maximum.
                    return Err(Violation::Reason(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED));
                }
            }
        }
        match p.qos {
            QoS::AtLeastOnce => {
                self.unacked_qos1.fetch_add(1, Ordering::Relaxed);
            }
            QoS::ExactlyOnce => {
                self.pending_qos2.insert(p.packet_id.unwrap_or(0));
            }
            QoS::AtMostOnce => {}
        }
        self.forward(Packet::Publish(p)).await
    }

    /// MQTT-3.3.2-12..: replace a Topic Alias by its topic, or remember a new mapping.
    fn resolve_alias(&mut self, p: &mut Publish) -> Result<(), Violation> {
        let Some(alias) = p.properties.topic_alias.take() else {
            return if p.topic.is_empty() {
                Err(Violation::Reason(ReasonCode::PROTOCOL_ERROR))
            } else {
                Ok(())
            };
        };
        if alias == 0 || alias > self.settings.topic_alias_maximum {
            return Err(Violation::Reason(ReasonCode::TOPIC_ALIAS_INVALID));
        }
        if p.topic.is_empty() {
            match self.aliases.get(&alias) {
                Some(t) => p.topic = t.clone(),
                None => return Err(Violation::Reason(ReasonCode::PROTOCOL_ERROR)),
            }
        } else {
            self.aliases.insert(alias, p.topic.clone());
        }
        Ok(())
    }
}

/// An acknowledgement waiting its turn.
enum PendingAck {
    Waiting {
        wait: BoxFuture<'static, DurableResult>,
        ack: Box<dyn FnOnce(DurableResult) -> Option<Ack> + Send>,
    },
    Ready(Ack),
}

struct Writer {
    protocol: Protocol,
    buf: BytesMut,
    /// Acknowledgements held back behind one that waits for durability.
    acks: VecDeque<PendingAck>,
    /// Outbound topic aliases (5.0): topic -> alias.
    aliases: HashMap<ByteString, u16>,
    alias_max: u16,
    max_packet_size: Option<usize>,
    unacked_qos1: Arc<AtomicU32>,
}

impl Writer {
    async fn run<W: AsyncWrite + Unpin>(
        mut self,
        mut wr: W,
        mut rx: OutboundRx,
        closed: watch::Sender<bool>,
    ) {
        loop {
            let first = if let Some(PendingAck::Waiting { wait, .. }) = self.acks.front_mut() {
                tokio::select! {
                    outcome = wait => {
                        self.release_acks(Some(outcome));
                        None
                    }
                    item = rx.recv() => match item {
                        Some(i) => Some(i),
                        None => break,
                    },
                }
            } else {
                match rx.recv().await {
                    Some(i) => Some(i),
                    None => break,
                }
            };
            let mut stop = false;
            if let Some(item) = first {
                stop = self.add(item);
                let mut n = 1;
                while !stop && n < WRITE_BATCH {
                    let Some(item) = rx.try_recv() else { break };
                    stop = self.add(item);
                    n += 1;
                }
            }
            if !self.buf.is_empty() {
                if wr.write_all(&self.buf).await.is_err() {
                    break;
                }
                self.buf.clear();
                // Give an idle connection's buffer back instead of holding the high-water mark.
                if self.buf.capacity() > 64 * 1024 {
                    self.buf = BytesMut::with_capacity(1024);
                }
            }
            if stop {
                let _ = wr.flush().await;
                break;
            }
        }
        let _ = wr.shutdown().await;
        let _ = closed.send(true);
    }

    /// Encodes one item into the buffer; true when the connection must close after it.
    fn add(&mut self, item: Outbound) -> bool {
        match item {
            Outbound::Ack(a)
                if matches!(a.kind, AckKind::PubAck | AckKind::PubRec) && !self.acks.is_empty() =>
            {
                self.acks.push_back(PendingAck::Ready(a));
            }
            Outbound::Ack(a) => self.encode_ack(&a),
            Outbound::PingResp => self.encode(&Packet::PingResp),
            Outbound::Control(p) => self.encode(&p),
            Outbound::AckAfter { wait, ack } => {
                self.acks.push_back(PendingAck::Waiting { wait, ack });
            }
            Outbound::Publish {
                delivery,
                packet_id,
                dup,
            } => self.encode_publish(delivery, packet_id, dup),
            Outbound::Disconnect(reason) => {
                if self.protocol.is_v5() {
                    self.encode(&Packet::Disconnect(Disconnect {
                        reason,
                        properties: Properties::default(),
                    }));
                }
                return true;
            }
            Outbound::Close => return true,
        }
        false
    }

    /// The head acknowledgement resolved: send it and every ready one behind it.
    fn release_acks(&mut self, outcome: Option<DurableResult>) {
        if let (Some(outcome), Some(PendingAck::Waiting { ack, .. })) =
            (outcome, self.acks.pop_front())
            && let Some(a) = ack(outcome)
        {
            self.encode_ack(&a);
        }
        while let Some(PendingAck::Ready(_)) = self.acks.front() {
            if let Some(PendingAck::Ready(a)) = self.acks.pop_front() {
                self.encode_ack(&a);
            }
        }
    }

    fn encode_ack(&mut self, a: &Ack) {
        if a.kind == AckKind::PubAck {
            self.unacked_qos1.fetch_sub(1, Ordering::Relaxed);
        }
        self.encode(&a.to_packet());
    }

    fn encode(&mut self, p: &Packet) {
        if let Err(e) = outpost_mqtt::encode(p, self.protocol, &mut self.buf) {
            debug!(error = %e, "cannot encode a control packet; skipped");
        }
    }

    fn encode_publish(&mut self, d: super::session::Delivery, packet_id: Option<u16>, dup: bool) {
        let v5 = self.protocol.is_v5();
        let mut properties = if v5 {
            d.msg.properties.clone()
        } else {
            Properties::default()
        };
        let mut topic = d.msg.topic.clone();
        if v5 {
            properties.subscription_identifiers = d.sub_ids;
            properties.message_expiry_interval = d.msg.remaining_expiry(Instant::now());
            if self.alias_max > 0 {
                if let Some(&a) = self.aliases.get(&topic) {
                    properties.topic_alias = Some(a);
                    topic = ByteString::new();
                } else if self.aliases.len() < usize::from(self.alias_max) {
                    let a = self.aliases.len() as u16 + 1;
                    self.aliases.insert(topic.clone(), a);
                    properties.topic_alias = Some(a);
                }
            }
        }
        let publish = Publish {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic,
            packet_id,
            properties,
            payload: d.msg.payload.clone(),
        };
        let start = self.buf.len();
        if let Err(e) = outpost_mqtt::codec::encode_publish(&publish, self.protocol, &mut self.buf)
        {
            debug!(error = %e, "cannot encode a PUBLISH; skipped");
            self.buf.truncate(start);
            return;
        }
        if self
            .max_packet_size
            .is_some_and(|m| self.buf.len() - start > m)
        {
            // MQTT-3.1.2-25: never send more than the client's Maximum Packet Size.
            self.buf.truncate(start);
        }
    }
}

fn kind(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
        Packet::Auth(_) => "AUTH",
    }
}
