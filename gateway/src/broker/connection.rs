//! One network connection: decode what the client sends, encode what the core sends.
//!
//! A single task per connection multiplexes reading, writing, the core's queue and the
//! keep-alive timer, so an idle client costs one small task and no buffers. It runs the
//! protocol checks that need no shared state (CONNECT first, keep alive, inbound topic
//! aliases, Receive Maximum), forwards the rest to the core, applies outbound topic
//! aliases and keeps PUBACK/PUBREC in the order the PUBLISHes arrived even when some wait
//! for the bridge spool. Any protocol violation ends this connection only.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytestring::ByteString;
use futures_util::future::BoxFuture;
use outpost_mqtt::{
    ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, Protocol, Publish, QoS,
    ReasonCode,
};
use tokio::net::TcpStream;
use tokio::time::sleep_until;
use tracing::{debug, info};

use super::auth;
use super::core::{ConnectRequest, CoreEvent};
use super::handle::BrokerHandle;
use super::outbound::{self, Ack, AckKind, DurableResult, Outbound, OutboundRx};
use super::router::SessionKey;
use super::session::Delivery;
use super::settings::Settings;
use super::transport::{self, ReadSide, WriteSide};

/// Stop taking items from the core while this much is waiting to be written.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// A write buffer above this size is released once it drains.
const WRITE_BUF_KEEP: usize = 16 * 1024;
/// How long a closing connection may take to flush its last packets.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves a plain TCP connection.
pub async fn serve_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    core: BrokerHandle,
    settings: Arc<Settings>,
) {
    let (rd, wr) = transport::tcp(stream);
    serve(rd, wr, peer, core, settings).await;
}

/// Serves a connection over any byte stream (TLS, WebSocket).
pub async fn serve_stream<S>(
    stream: S,
    peer: SocketAddr,
    core: BrokerHandle,
    settings: Arc<Settings>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (rd, wr) = transport::stream(stream);
    serve(rd, wr, peer, core, settings).await;
}

async fn serve<R: ReadSide, W: WriteSide>(
    mut rd: R,
    mut wr: W,
    peer: SocketAddr,
    core: BrokerHandle,
    settings: Arc<Settings>,
) {
    let mut rbuf = BytesMut::new();
    let Some(connect) = handshake_boxed(&mut rd, &mut wr, &mut rbuf, peer, &settings).await else {
        return;
    };
    let keep_alive = effective_keep_alive(&connect, &settings);
    let (tx, rx) = outbound::channel();
    let mut conn = Conn {
        protocol: connect.protocol,
        session: 0,
        conn_id: 0,
        core: core.clone(),
        settings,
        in_aliases: HashMap::new(),
        unacked_qos1: 0,
        pending_qos2: HashSet::new(),
        acks: VecDeque::new(),
        out_aliases: HashMap::new(),
        out_alias_max: connect.properties.topic_alias_maximum.unwrap_or(0),
        max_packet_size: connect.properties.maximum_packet_size.map(|m| m as usize),
        closing: false,
    };
    let (reply, accepted) = tokio::sync::oneshot::channel();
    let request = ConnectRequest { connect, tx, reply };
    if Box::pin(core.send(CoreEvent::Connect(request)))
        .await
        .is_err()
    {
        return;
    }
    let accepted = accepted.await.ok().flatten();
    if let Some((session, conn_id)) = accepted {
        conn.session = session;
        conn.conn_id = conn_id;
    } else {
        // Refused: the core queued the CONNACK and a Close; flush them.
        conn.closing = true;
    }
    if rbuf.is_empty() {
        // Do not hold the CONNECT's receive buffer while the client idles.
        rbuf = BytesMut::new();
    }
    let disconnect = conn
        .run(&mut rd, &mut wr, &rx, rbuf, keep_alive)
        .await
        .map(|d| *d);
    rx.close();
    // Tell the core before the client can see the socket close, so a client that
    // reconnects at once finds its will published and its session ended or kept.
    if let Some((session, conn_id)) = accepted {
        let _ = Box::pin(core.send(CoreEvent::Closed {
            session,
            conn_id,
            disconnect,
        }))
        .await;
    }
    wr.close().await;
}

/// [`handshake`] on the heap, so the long-lived connection future does not keep room
/// for it (see [`Conn::on_bytes_boxed`]).
fn handshake_boxed<'a, R: ReadSide, W: WriteSide>(
    rd: &'a mut R,
    wr: &'a mut W,
    rbuf: &'a mut BytesMut,
    peer: SocketAddr,
    settings: &'a Settings,
) -> BoxFuture<'a, Option<Box<Connect>>> {
    Box::pin(handshake(rd, wr, rbuf, peer, settings))
}

/// Reads the CONNECT and authenticates it; `None` if the connection is to end.
async fn handshake<R: ReadSide, W: WriteSide>(
    rd: &mut R,
    wr: &mut W,
    rbuf: &mut BytesMut,
    peer: SocketAddr,
    settings: &Settings,
) -> Option<Box<Connect>> {
    let max = settings.max_packet_size;
    // MQTT-3.1.0-1: the first packet must be CONNECT, within the configured time.
    let first = tokio::time::timeout(settings.connect_timeout, async {
        loop {
            if let Some(p) = outpost_mqtt::decode(rbuf, Protocol::V5, max)? {
                return Ok(Some(p));
            }
            if rd.read_into(rbuf).await? == 0 {
                return Ok(None);
            }
        }
    })
    .await;
    let connect = match first {
        Err(_) => {
            debug!(%peer, "no CONNECT within the connect timeout; closing");
            return None;
        }
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(Some(other))) => {
            debug!(%peer, packet = kind(&other), "first packet is not CONNECT; closing");
            return None;
        }
        Ok(Ok(None)) => return None,
        Ok(Err(ReadError::Decode(DecodeError::UnsupportedProtocol { level, .. }))) => {
            // MQTT-3.1.2-2: answer an unknown protocol level with return code 1 (3.1.1
            // format, which every version's client can parse), then close.
            info!(%peer, level, "unsupported protocol level; refusing");
            refuse(
                wr,
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                Protocol::V3_1_1,
            )
            .await;
            return None;
        }
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "bad CONNECT; closing");
            return None;
        }
    };
    if let Err(reason) = auth::check(&connect, settings).await {
        info!(%peer, client_id = %connect.client_id, ?reason, "connection refused");
        refuse(wr, reason, connect.protocol).await;
        return None;
    }
    Some(connect)
}

async fn refuse<W: WriteSide>(wr: &mut W, reason: ReasonCode, protocol: Protocol) {
    let p = Packet::ConnAck(ConnAck {
        session_present: false,
        reason,
        properties: Properties::default(),
    });
    let mut b = BytesMut::new();
    if outpost_mqtt::encode(&p, protocol, &mut b).is_ok() {
        let _ = write_all(wr, &b).await;
    }
    wr.close().await;
}

async fn write_all<W: WriteSide>(wr: &mut W, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = wr.write_from(data).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

/// Keep alive the server enforces: the client's value, capped for 5.0 clients by
/// `max_keepalive` (announced as Server Keep Alive). 3.x clients cannot be told a
/// different value, so theirs is honoured as is.
fn effective_keep_alive(c: &Connect, s: &Settings) -> Option<Duration> {
    let capped =
        c.keep_alive > s.max_keepalive || (c.keep_alive == 0 && s.max_keepalive < u16::MAX);
    let secs = if c.protocol.is_v5() && capped {
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

/// An acknowledgement waiting its turn.
enum PendingAck {
    Waiting {
        wait: BoxFuture<'static, DurableResult>,
        ack: Box<dyn FnOnce(DurableResult) -> Option<Ack> + Send>,
    },
    Ready(Ack),
}

/// Per-connection protocol state.
struct Conn {
    protocol: Protocol,
    session: SessionKey,
    conn_id: u64,
    core: BrokerHandle,
    settings: Arc<Settings>,
    /// Inbound topic aliases (5.0): alias -> topic.
    in_aliases: HashMap<u16, ByteString>,
    /// QoS 1 PUBLISHes received and not yet acknowledged.
    unacked_qos1: u32,
    /// QoS 2 packet ids between PUBLISH and PUBREL.
    pending_qos2: HashSet<u16>,
    /// Acknowledgements held back behind one that waits for durability.
    acks: VecDeque<PendingAck>,
    /// Outbound topic aliases (5.0): topic -> alias.
    out_aliases: HashMap<ByteString, u16>,
    out_alias_max: u16,
    /// The client's Maximum Packet Size.
    max_packet_size: Option<usize>,
    /// Set once DISCONNECT or a close was queued: flush, then end.
    closing: bool,
}

/// How the read side ended.
enum End {
    /// The client sent DISCONNECT.
    Graceful(Box<Disconnect>),
    /// Anything else: the will is due.
    Abnormal,
}

impl Conn {
    /// Runs the connection until it ends; returns the client's DISCONNECT if it sent one.
    async fn run<R: ReadSide, W: WriteSide>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        rx: &OutboundRx,
        mut rbuf: BytesMut,
        keep_alive: Option<Duration>,
    ) -> Option<Box<Disconnect>> {
        let mut wbuf = BytesMut::new();
        let mut wpos = 0usize;
        let mut items = VecDeque::new();
        let mut end = None::<End>;
        let mut last_rx = Instant::now();
        // One timer for keep alive and the close grace period, re-armed lazily: it fires
        // at most once per keep-alive period instead of being reset on every packet.
        let mut armed = keep_alive.is_some();
        let timer = sleep_until((last_rx + keep_alive.unwrap_or(CLOSE_GRACE)).into());
        tokio::pin!(timer);
        let mut closing_armed = false;

        // What the core queued while the connection was set up (CONNACK, resent
        // messages); a refused connection has its CONNACK and nothing else to send.
        rx.drain_into(&mut items);
        while let Some(item) = items.pop_front() {
            if self.add(item, &mut wbuf) {
                self.closing = true;
                items.clear();
            }
        }

        // Bytes that arrived together with CONNECT.
        if !rbuf.is_empty()
            && let Err(e) = self.on_bytes_boxed(&mut rbuf, &mut wbuf).await
        {
            end = Some(e);
        }

        loop {
            if end.is_some() {
                self.closing = true;
            }
            if self.closing && wpos == wbuf.len() {
                break;
            }
            if self.closing && !closing_armed {
                closing_armed = true;
                armed = true;
                timer.as_mut().reset((Instant::now() + CLOSE_GRACE).into());
            }
            let waiting_ack = matches!(self.acks.front(), Some(PendingAck::Waiting { .. }));
            tokio::select! {
                biased;
                r = wr.write_from(&wbuf[wpos..]), if wpos < wbuf.len() => match r {
                    Ok(n) if n > 0 => {
                        wpos += n;
                        if wpos == wbuf.len() {
                            wpos = 0;
                            if wbuf.capacity() > WRITE_BUF_KEEP {
                                wbuf = BytesMut::new();
                            } else {
                                wbuf.clear();
                            }
                        }
                    }
                    _ => {
                        end.get_or_insert(End::Abnormal);
                        break;
                    }
                },
                () = rx.notified(), if !self.closing && wbuf.len() < WRITE_HIGH_WATER => {
                    rx.drain_into(&mut items);
                    let batch = items.len();
                    while let Some(item) = items.pop_front() {
                        if self.add(item, &mut wbuf) {
                            self.closing = true;
                            items.clear();
                            break;
                        }
                    }
                    // Keep the buffer for a busy stream; give it back after a burst or a
                    // trickle, so an idle client holds no queue memory.
                    if items.capacity() > 64 || batch <= 2 {
                        items = VecDeque::new();
                    }
                }
                outcome = head_wait(&mut self.acks), if waiting_ack => {
                    self.release_acks(outcome, &mut wbuf);
                }
                r = rd.read_into(&mut rbuf), if !self.closing => match r {
                    Ok(0) | Err(_) => {
                        end.get_or_insert(End::Abnormal);
                        break;
                    }
                    Ok(n) => {
                        last_rx = Instant::now();
                        let trickle = n < rbuf.capacity() / 2;
                        if let Err(e) = self.on_bytes_boxed(&mut rbuf, &mut wbuf).await {
                            end = Some(e);
                        }
                        if rbuf.is_empty() && trickle {
                            // A client that sends a little now and then (the idle
                            // majority) holds no receive buffer between packets; a busy
                            // one keeps its buffer and its read size.
                            rbuf = BytesMut::new();
                        }
                    }
                },
                () = &mut timer, if armed => {
                    if self.closing {
                        break;
                    }
                    let k = keep_alive.unwrap_or(CLOSE_GRACE);
                    if last_rx.elapsed() >= k {
                        debug!(conn_id = self.conn_id, "keep alive expired");
                        self.violation(ReasonCode::KEEP_ALIVE_TIMEOUT, &mut wbuf);
                        end = Some(End::Abnormal);
                    } else {
                        timer.as_mut().reset((last_rx + k).into());
                    }
                }
            }
        }
        match end {
            Some(End::Graceful(d)) => Some(d),
            _ => None,
        }
    }

    /// [`Self::on_bytes`] on the heap. Built in a plain function so the caller's future
    /// does not reserve room for it (rustc keeps moved-from temporaries in an async
    /// state machine): that state exists only while bytes are in hand.
    fn on_bytes_boxed<'a>(
        &'a mut self,
        rbuf: &'a mut BytesMut,
        wbuf: &'a mut BytesMut,
    ) -> BoxFuture<'a, Result<(), End>> {
        Box::pin(self.on_bytes(rbuf, wbuf))
    }

    /// Decodes and handles every whole packet in `rbuf`.
    async fn on_bytes(&mut self, rbuf: &mut BytesMut, wbuf: &mut BytesMut) -> Result<(), End> {
        let max = self.settings.max_packet_size;
        loop {
            let packet = match outpost_mqtt::decode(rbuf, self.protocol, max) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(e) => {
                    info!(conn_id = self.conn_id, error = %e, "malformed packet; closing the connection");
                    self.violation(e.reason_code(), wbuf);
                    return Err(End::Abnormal);
                }
            };
            match self.on_packet(packet, wbuf).await {
                Ok(None) => {}
                Ok(Some(d)) => return Err(End::Graceful(Box::new(d))),
                Err(reason) => {
                    self.violation(reason, wbuf);
                    return Err(End::Abnormal);
                }
            }
        }
    }

    /// Queues a DISCONNECT with `reason` (5.0 only; 3.x just closes).
    fn violation(&mut self, reason: ReasonCode, wbuf: &mut BytesMut) {
        if self.protocol.is_v5() {
            self.encode(
                &Packet::Disconnect(Disconnect {
                    reason,
                    properties: Properties::default(),
                }),
                wbuf,
            );
        }
        self.closing = true;
    }

    async fn forward(&mut self, packet: Packet) -> Result<(), ReasonCode> {
        self.core
            .send(CoreEvent::Packet {
                session: self.session,
                conn_id: self.conn_id,
                packet,
            })
            .await
            .map_err(|_| ReasonCode::SERVER_SHUTTING_DOWN)
    }

    async fn on_packet(
        &mut self,
        packet: Packet,
        wbuf: &mut BytesMut,
    ) -> Result<Option<Disconnect>, ReasonCode> {
        match packet {
            Packet::Publish(p) => self.on_publish(p).await?,
            Packet::PingReq => self.encode(&Packet::PingResp, wbuf),
            Packet::PubRel(r) => {
                self.pending_qos2.remove(&r.packet_id);
                self.forward(Packet::PubRel(r)).await?;
            }
            p @ (Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubComp(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)) => self.forward(p).await?,
            Packet::Disconnect(d) => return Ok(Some(d)),
            // MQTT-3.1.0-2: a second CONNECT is a protocol violation; so are packets only
            // a server sends, and AUTH, since no enhanced authentication is offered.
            _ => return Err(ReasonCode::PROTOCOL_ERROR),
        }
        Ok(None)
    }

    async fn on_publish(&mut self, mut p: Publish) -> Result<(), ReasonCode> {
        if self.protocol.is_v5() {
            self.resolve_alias(&mut p)?;
            if !p.properties.subscription_identifiers.is_empty() {
                // MQTT-3.3.4-6: only the server sends subscription identifiers.
                return Err(ReasonCode::PROTOCOL_ERROR);
            }
            if p.qos != QoS::AtMostOnce {
                let id = p.packet_id.unwrap_or(0);
                let new_qos2 = p.qos == QoS::ExactlyOnce && !self.pending_qos2.contains(&id);
                let inflight = self.unacked_qos1 as usize
                    + self.pending_qos2.len()
                    + usize::from(p.qos == QoS::AtLeastOnce || new_qos2);
                if inflight > usize::from(self.settings.receive_maximum) {
                    // MQTT-3.3.4-9: more unacknowledged QoS 1/2 PUBLISHes than our
                    // Receive Maximum.
                    return Err(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
                }
            }
        }
        match p.qos {
            QoS::AtLeastOnce => self.unacked_qos1 += 1,
            QoS::ExactlyOnce => {
                self.pending_qos2.insert(p.packet_id.unwrap_or(0));
            }
            QoS::AtMostOnce => {}
        }
        self.forward(Packet::Publish(p)).await
    }

    /// MQTT-3.3.2-12 and following: replace a Topic Alias by its topic, or remember a new
    /// mapping.
    fn resolve_alias(&mut self, p: &mut Publish) -> Result<(), ReasonCode> {
        let Some(alias) = p.properties.topic_alias.take() else {
            return if p.topic.is_empty() {
                Err(ReasonCode::PROTOCOL_ERROR)
            } else {
                Ok(())
            };
        };
        if alias == 0 || alias > self.settings.topic_alias_maximum {
            return Err(ReasonCode::TOPIC_ALIAS_INVALID);
        }
        if p.topic.is_empty() {
            match self.in_aliases.get(&alias) {
                Some(t) => p.topic = t.clone(),
                None => return Err(ReasonCode::PROTOCOL_ERROR),
            }
        } else {
            self.in_aliases.insert(alias, p.topic.clone());
        }
        Ok(())
    }

    /// Encodes one item from the core; true when the connection must close after it.
    fn add(&mut self, item: Outbound, wbuf: &mut BytesMut) -> bool {
        match item {
            Outbound::Ack(a)
                if matches!(a.kind, AckKind::PubAck | AckKind::PubRec) && !self.acks.is_empty() =>
            {
                self.acks.push_back(PendingAck::Ready(a));
            }
            Outbound::Ack(a) => self.encode_ack(&a, wbuf),
            Outbound::Control(p) => self.encode(&p, wbuf),
            Outbound::AckAfter { wait, ack } => {
                self.acks.push_back(PendingAck::Waiting { wait, ack });
            }
            Outbound::Publish {
                delivery,
                packet_id,
                dup,
            } => self.encode_publish(delivery, packet_id, dup, wbuf),
            Outbound::Disconnect(reason) => {
                self.violation(reason, wbuf);
                return true;
            }
            Outbound::Close => return true,
        }
        false
    }

    /// The head acknowledgement resolved: send it and every ready one behind it.
    fn release_acks(&mut self, outcome: DurableResult, wbuf: &mut BytesMut) {
        if let Some(PendingAck::Waiting { ack, .. }) = self.acks.pop_front()
            && let Some(a) = ack(outcome)
        {
            self.encode_ack(&a, wbuf);
        }
        while let Some(PendingAck::Ready(_)) = self.acks.front() {
            if let Some(PendingAck::Ready(a)) = self.acks.pop_front() {
                self.encode_ack(&a, wbuf);
            }
        }
    }

    fn encode_ack(&mut self, a: &Ack, wbuf: &mut BytesMut) {
        if a.kind == AckKind::PubAck {
            self.unacked_qos1 = self.unacked_qos1.saturating_sub(1);
        }
        self.encode(&a.to_packet(), wbuf);
    }

    fn encode(&self, p: &Packet, wbuf: &mut BytesMut) {
        if let Err(e) = outpost_mqtt::encode(p, self.protocol, wbuf) {
            debug!(error = %e, "cannot encode a control packet; skipped");
        }
    }

    fn encode_publish(
        &mut self,
        d: Delivery,
        packet_id: Option<u16>,
        dup: bool,
        wbuf: &mut BytesMut,
    ) {
        let v5 = self.protocol.is_v5();
        let mut properties = if v5 {
            d.msg.properties.clone()
        } else {
            Properties::default()
        };
        let mut topic = d.msg.topic.clone();
        let mut new_alias = None;
        if v5 {
            properties.subscription_identifiers = d.sub_ids;
            properties.message_expiry_interval = d.msg.remaining_expiry(Instant::now());
            if self.out_alias_max > 0 {
                if let Some(&a) = self.out_aliases.get(&topic) {
                    properties.topic_alias = Some(a);
                    topic = ByteString::new();
                } else if self.out_aliases.len() < usize::from(self.out_alias_max) {
                    let a = self.out_aliases.len() as u16 + 1;
                    properties.topic_alias = Some(a);
                    new_alias = Some(a);
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
        let start = wbuf.len();
        if let Err(e) = outpost_mqtt::codec::encode_publish(&publish, self.protocol, wbuf) {
            debug!(error = %e, "cannot encode a PUBLISH; skipped");
            wbuf.truncate(start);
            return;
        }
        if self.max_packet_size.is_some_and(|m| wbuf.len() - start > m) {
            // MQTT-3.1.2-25: never send more than the client's Maximum Packet Size.
            wbuf.truncate(start);
            return;
        }
        if let Some(a) = new_alias {
            self.out_aliases.insert(d.msg.topic.clone(), a);
        }
    }
}

/// Waits for the head acknowledgement's durability outcome.
async fn head_wait(acks: &mut VecDeque<PendingAck>) -> DurableResult {
    match acks.front_mut() {
        Some(PendingAck::Waiting { wait, .. }) => wait.await,
        _ => std::future::pending().await,
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
