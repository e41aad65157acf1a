//! One network connection: decode what the client sends, encode what the core sends.
//!
//! A connection goes through three phases, each its own piece: the handshake (read and
//! authenticate CONNECT, on the heap while it lasts), the connected phase ([`driver`],
//! a small hand-written future so an idle client costs little), and the close (tell the
//! core, shut the socket). [`state`] holds the protocol rules that need no shared state
//! (CONNECT first, inbound topic aliases, Receive Maximum, ack order behind durable
//! commits); everything else goes to the core. Any violation ends this connection only.

mod driver;
mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::future::BoxFuture;
use outpost_mqtt::{ConnAck, Connect, DecodeError, Packet, Properties, Protocol, ReasonCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::auth;
use crate::events::CoreInbox;
use crate::events::{ConnectRequest, CoreEvent};
use crate::limits::{ConnectionLimits, ConnectionSlot};
use crate::net::ConnContext;
use crate::net::transport::{self, StreamIo, Transport};
use crate::outbound;
use crate::settings::Settings;
use driver::Driver;
use state::Conn;

/// Serves a plain TCP connection; spawn the returned future as the connection's task.
pub fn serve_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
    core: CoreInbox,
    ctx: Arc<ConnContext>,
) -> Connection<TcpStream> {
    let deadline = Instant::now() + ctx.settings.connect_timeout;
    Connection::new(
        stream,
        peer,
        Some(Box::new(slot)),
        core,
        ctx,
        deadline,
        None,
    )
}

/// Serves a connection over any byte stream (TLS, WebSocket). `connect_by` is when the
/// CONNECT must have arrived: the connect timeout runs from the TCP accept, across the
/// TLS and WebSocket handshakes, so stalling each stage does not stretch it. `identity`
/// is the Common Name of the client's certificate (mTLS), the user name on a listener
/// with `use_identity_as_username`.
pub(crate) async fn serve_stream<S>(
    stream: S,
    peer: SocketAddr,
    core: CoreInbox,
    ctx: Arc<ConnContext>,
    connect_by: Instant,
    identity: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    // TLS and WebSocket tasks hold their connection slot themselves.
    Connection::new(
        StreamIo::new(stream),
        peer,
        None,
        core,
        ctx,
        connect_by,
        identity,
    )
    .await;
}

/// A connection's task, one phase at a time. Written by hand rather than as nested
/// `async fn`s: those would keep room for every phase and copies of their arguments in
/// every task, while this is as large as its largest phase, the driver.
pub struct Connection<T> {
    phase: Phase<T>,
}

// The running phase is inline on purpose: it is where a connection spends its life,
// and boxing it would add an allocation per client.
#[allow(clippy::large_enum_variant)]
enum Phase<T> {
    /// Handshake and session set-up, on the heap while they last.
    Opening(BoxFuture<'static, Option<Driver<T>>>),
    Running(Driver<T>),
    Closing(BoxFuture<'static, ()>),
    Done,
}

impl<T: Transport> Connection<T> {
    fn new(
        io: T,
        peer: SocketAddr,
        slot: Option<Box<ConnectionSlot>>,
        core: CoreInbox,
        ctx: Arc<ConnContext>,
        connect_by: Instant,
        identity: Option<String>,
    ) -> Self {
        let opening = Box::pin(async move {
            let mut io = io;
            let mut rbuf = BytesMut::new();
            let connect = handshake(
                &mut io,
                &mut rbuf,
                peer,
                &ctx.settings,
                connect_by,
                identity,
            )
            .await?;
            open(io, rbuf, connect, peer, slot, core, ctx).await
        });
        Connection {
            phase: Phase::Opening(opening),
        }
    }
}

impl<T> Connection<T> {
    /// The task of a connection resumed from the parked-socket lot.
    fn running(driver: Driver<T>) -> Self {
        Connection {
            phase: Phase::Running(driver),
        }
    }
}

impl<T: Transport> Future for Connection<T> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match &mut this.phase {
                Phase::Opening(f) => match ready!(f.as_mut().poll(cx)) {
                    Some(driver) => this.phase = Phase::Running(driver),
                    None => this.phase = Phase::Done,
                },
                Phase::Running(driver) => {
                    let exit = ready!(driver.poll_run(cx));
                    if let Phase::Running(driver) = std::mem::replace(&mut this.phase, Phase::Done)
                    {
                        this.phase = match exit {
                            driver::Exit::Closed(d) => Phase::Closing(close(driver, d)),
                            // Quiet: the task ends, the socket waits in the lot.
                            driver::Exit::Park => {
                                driver::park(driver).map_or(Phase::Done, Phase::Running)
                            }
                        };
                    }
                }
                Phase::Closing(f) => {
                    ready!(f.as_mut().poll(cx));
                    this.phase = Phase::Done;
                }
                Phase::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Hands the CONNECT to the core and builds the connected phase; `None` if the core
/// is gone. A refused client gets a driver that only flushes its CONNACK.
async fn open<T: Transport>(
    io: T,
    rbuf: BytesMut,
    connect: Box<Connect>,
    peer: SocketAddr,
    slot: Option<Box<ConnectionSlot>>,
    core: CoreInbox,
    ctx: Arc<ConnContext>,
) -> Option<Driver<T>> {
    let keep_alive = effective_keep_alive(&connect, &ctx.settings);
    let listener = ctx.settings.listener;
    let (tx, rx) = outbound::channel(slot);
    let mut conn = Conn::new(&connect, core.clone(), ctx);
    let (reply, accepted) = tokio::sync::oneshot::channel();
    let request = ConnectRequest {
        connect,
        peer,
        listener,
        tx,
        reply,
    };
    core.send(CoreEvent::Connect(request)).await.ok()?;
    match accepted.await.ok().flatten() {
        Some(a) => {
            conn.accepted = true;
            conn.session = a.session;
            conn.conn_id = a.conn_id;
        }
        // Refused: the core queued the CONNACK and a Close; flush them.
        None => conn.closing = true,
    }
    Some(Driver::new(io, conn, rx, rbuf, keep_alive))
}

/// Tells the core the connection ended, then closes the socket. The core hears first,
/// so a client that reconnects at once finds its will published and its session ended
/// or kept.
fn close<T: Transport>(
    mut driver: Driver<T>,
    disconnect: Option<Box<outpost_mqtt::Disconnect>>,
) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        driver.rx.close();
        let conn = &driver.conn;
        if conn.accepted {
            let _ = conn
                .core
                .send(CoreEvent::Closed {
                    session: conn.session,
                    conn_id: conn.conn_id,
                    disconnect: disconnect.map(|d| *d),
                    reason: conn.close_reason,
                })
                .await;
        }
        transport::close(&mut driver.io).await;
        linger(&mut driver.io).await;
    })
}

/// How long a closed connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// Bytes a closed connection reads and discards at most.
const LINGER_BYTES: usize = 64 * 1024;

/// After our side is shut, reads and discards what the client still sends until it
/// closes too (bounded in time and bytes). Closing a socket with unread bytes makes the
/// kernel send a reset instead of a FIN, and a reset can destroy the DISCONNECT with its
/// reason code before the client reads it; a client that is still sending when the
/// server ends the connection (Receive Maximum exceeded, a malformed packet) is exactly
/// the one that needs that reason.
async fn linger<T: Transport>(io: &mut T) {
    let mut buf = BytesMut::new();
    let _ = tokio::time::timeout(LINGER, async {
        let mut total = 0;
        while total < LINGER_BYTES {
            buf.clear();
            match transport::read_into(io, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// Reads the CONNECT and authenticates it; `None` if the connection is to end.
async fn handshake<T: Transport>(
    io: &mut T,
    rbuf: &mut BytesMut,
    peer: SocketAddr,
    settings: &Settings,
    connect_by: Instant,
    identity: Option<String>,
) -> Option<Box<Connect>> {
    // A peer that has not authenticated gets a small buffer: `max_connect_size`, not
    // `max_packet_size`.
    let max = settings.max_connect_size;
    // MQTT-3.1.0-1: the first packet must be CONNECT, within the configured time.
    let first = tokio::time::timeout_at(connect_by.into(), async {
        loop {
            if let Some(p) = outpost_mqtt::decode(rbuf, Protocol::V5, max)? {
                return Ok(Some(p));
            }
            if transport::read_into(io, rbuf).await? == 0 {
                return Ok(None);
            }
        }
    })
    .await;
    let mut connect = match first {
        Err(_) => {
            info!(%peer, "connection closed: no CONNECT within broker.connect_timeout");
            return None;
        }
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(Some(other))) => {
            info!(%peer, packet = kind(&other), "connection closed: the first packet was not CONNECT");
            return None;
        }
        Ok(Ok(None)) => return None,
        Ok(Err(ReadError::Decode(DecodeError::UnsupportedProtocol { level, name })))
            if name == "MQTT" || name == "MQIsdp" =>
        {
            // MQTT-3.1.2-2: answer an unknown protocol level with return code 1 (3.1.1
            // format, which every version's client can parse), then close. An unknown
            // protocol name is not MQTT at all: it closes below without a CONNACK
            // (MQTT-3.1.2-1, MQTT-3.1.4-1).
            info!(%peer, level, "unsupported protocol level; refusing");
            refuse(
                io,
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                Protocol::V3_1_1,
            )
            .await;
            return None;
        }
        Ok(Err(ReadError::Decode(DecodeError::PacketTooLarge { size, .. }))) => {
            ConnectionLimits::count(&settings.connections.connect_too_large);
            info!(%peer, size, max_connect_size = max,
                "connection closed: the CONNECT is larger than broker.max_connect_size");
            return None;
        }
        Ok(Err(ReadError::Decode(e))) => {
            info!(%peer, error = %e, "connection closed: malformed CONNECT");
            return None;
        }
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "connection closed before CONNECT");
            return None;
        }
    };
    if settings.identity_as_username {
        // mTLS names the user: the certificate the listener's CA signed is the proof, so
        // no password is asked (Mosquitto's use_identity_as_username).
        let Some(name) = identity else {
            info!(%peer, client_id = %connect.client_id,
                "login refused: the listener takes the user name from the client certificate, \
                 and this one has no Common Name");
            refuse(io, ReasonCode::NOT_AUTHORIZED, connect.protocol).await;
            return None;
        };
        connect.username = Some(name);
        connect.password = None;
        return Some(connect);
    }
    if let Err(why) = auth::check(&connect, settings.allow_anonymous, &settings.users).await {
        let reason = why.reason();
        // Named, not numbered: the operator needs the user and the cause, and the code
        // the client got for matching its own log.
        info!(
            %peer,
            client_id = %connect.client_id,
            user = %connect.username.as_deref().unwrap_or("(none)"),
            protocol = %connect.protocol.name(),
            code = format_args!("0x{:02X}", reason.0),
            "login refused: {why}"
        );
        refuse(io, reason, connect.protocol).await;
        return None;
    }
    Some(connect)
}

async fn refuse<T: Transport>(io: &mut T, reason: ReasonCode, protocol: Protocol) {
    let p = Packet::ConnAck(ConnAck {
        session_present: false,
        reason,
        properties: Properties::default(),
    });
    let mut b = BytesMut::new();
    if outpost_mqtt::encode(&p, protocol, &mut b).is_ok() {
        let _ = transport::write_all(io, &b).await;
    }
    transport::close(io).await;
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
