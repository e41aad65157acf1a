//! A lean MQTT client connection on the `outpost-mqtt` codec: connect, subscribe, and
//! packet-at-a-time reads for the setup phase. The hot paths (publisher and subscriber
//! loops) take the socket and buffer apart and do their own batching.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::BytesMut;
use outpost_mqtt::codec;
use outpost_mqtt::{
    ConnAck, Connect, Disconnect, Packet, Properties, Protocol, QoS, ReasonCode, Subscribe,
    SubscribeFilter, SubscriptionOptions,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Largest packet the bench accepts; far above any payload it sends.
pub const MAX_PACKET: usize = 16 * 1024 * 1024;

/// How every connection of this process reaches the broker: plain TCP unless `--tls-ca`
/// set this once at start. A process-wide setting, so load, idle and startup modes (and
/// the readiness probe) all go through the same transport without threading it through
/// every call.
static TLS: OnceLock<TlsClient> = OnceLock::new();

/// A TLS client setup: the connector (rustls with ring, trusting one CA) and the name the
/// server certificate must carry.
#[derive(Clone)]
pub struct TlsClient {
    /// The connector.
    pub connector: TlsConnector,
    /// The name checked against the server certificate (an IP address or DNS name).
    pub server_name: ServerName<'static>,
    /// The CA file, so a mode can build a variant of this client.
    pub ca: std::path::PathBuf,
    /// The server name as given.
    pub server_name_text: String,
}

impl TlsClient {
    /// A client trusting the CA certificates in `ca` (PEM), verifying `server_name`;
    /// `resume` keeps a session cache (tickets and session IDs) across connections.
    pub fn new(ca: &Path, server_name_text: &str, resume: bool) -> Result<TlsClient> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading CA file {}", ca.display()))?
        {
            roots
                .add(cert.with_context(|| format!("parsing CA file {}", ca.display()))?)
                .with_context(|| format!("CA file {}", ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = if resume {
            // Large enough that every connection of a run can hold its own ticket.
            rustls::client::Resumption::in_memory_sessions(4096)
        } else {
            rustls::client::Resumption::disabled()
        };
        let server_name = ServerName::try_from(server_name_text.to_owned())
            .map_err(|e| anyhow!("--tls-server-name {server_name_text:?}: {e}"))?;
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            ca: ca.to_owned(),
            server_name_text: server_name_text.to_owned(),
        })
    }
}

/// Makes every later connection of this process use TLS.
pub fn use_tls(client: TlsClient) -> Result<()> {
    TLS.set(client)
        .map_err(|_| anyhow!("TLS was already configured"))
}

/// The process-wide TLS setup, if any.
pub fn tls() -> Option<&'static TlsClient> {
    TLS.get()
}

/// A connection's byte stream: plain TCP, or TLS over TCP.
pub enum Stream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

/// The read half of a [`Stream`]. TCP keeps tokio's lock-free owned halves, so plain-TCP
/// runs measure exactly what they did before TLS existed.
pub enum Reader {
    /// Plain TCP.
    Tcp(OwnedReadHalf),
    /// TLS over TCP.
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// The write half of a [`Stream`].
pub enum Writer {
    /// Plain TCP.
    Tcp(OwnedWriteHalf),
    /// TLS over TCP.
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

impl Stream {
    /// Opens TCP to `addr`, and TLS over it when `tls` is given.
    pub async fn open(addr: SocketAddr, tls: Option<&TlsClient>) -> Result<Stream> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        match tls {
            None => Ok(Stream::Tcp(tcp)),
            Some(t) => {
                let s = t
                    .connector
                    .connect(t.server_name.clone(), tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {addr}"))?;
                Ok(Stream::Tls(Box::new(s)))
            }
        }
    }

    /// Splits into halves a reader task and a writer task can own.
    pub fn into_split(self) -> (Reader, Writer) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Reader::Tcp(r), Writer::Tcp(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Reader::Tls(r), Writer::Tls(w))
            }
        }
    }

    /// The rustls connection state, for TLS streams.
    pub fn tls_state(&self) -> Option<&rustls::ClientConnection> {
        match self {
            Stream::Tcp(_) => None,
            Stream::Tls(s) => Some(s.get_ref().1),
        }
    }
}

macro_rules! delegate_read {
    ($t:ty, $($v:ident),+) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut TaskContext<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$v(s) => Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($t:ty, $($v:ident),+) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut TaskContext<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$v(s) => Pin::new(s).poll_write(cx, buf),)+
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$v(s) => Pin::new(s).poll_flush(cx),)+
                }
            }

            fn poll_shutdown(
                self: Pin<&mut Self>,
                cx: &mut TaskContext<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$v(s) => Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

delegate_read!(Stream, Tcp, Tls);
delegate_write!(Stream, Tcp, Tls);
delegate_read!(Reader, Tcp, Tls);
delegate_write!(Writer, Tcp, Tls);

/// An open, CONNACKed MQTT connection.
pub struct Connection {
    /// The socket.
    pub stream: Stream,
    /// Bytes read but not yet decoded.
    pub rbuf: BytesMut,
    /// The protocol this connection speaks.
    pub protocol: Protocol,
    /// The server's CONNACK.
    pub connack: ConnAck,
}

/// Parses "3.1.1", "4", "5" or "5.0" into a protocol.
pub fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s {
        "3.1.1" | "4" | "311" => Ok(Protocol::V3_1_1),
        "5" | "5.0" | "50" => Ok(Protocol::V5),
        "3.1" | "3" => Ok(Protocol::V3_1),
        _ => Err(format!("unknown MQTT version {s:?} (use 3.1.1 or 5)")),
    }
}

/// Opens a TCP connection and completes CONNECT/CONNACK within `limit`.
pub async fn connect(
    addr: SocketAddr,
    protocol: Protocol,
    client_id: &str,
    keep_alive: u16,
    limit: Duration,
) -> Result<Connection> {
    connect_with(
        addr,
        protocol,
        client_id,
        keep_alive,
        true,
        Properties::default(),
        limit,
    )
    .await
}

/// [`connect`] with Clean Start and CONNECT properties (5.0 only; 3.x ignores them).
pub async fn connect_with(
    addr: SocketAddr,
    protocol: Protocol,
    client_id: &str,
    keep_alive: u16,
    clean_start: bool,
    properties: Properties,
    limit: Duration,
) -> Result<Connection> {
    timeout(
        limit,
        connect_inner(
            addr,
            protocol,
            client_id,
            keep_alive,
            clean_start,
            properties,
        ),
    )
    .await
    .map_err(|_| anyhow!("CONNECT to {addr} as {client_id} timed out after {limit:?}"))?
}

async fn connect_inner(
    addr: SocketAddr,
    protocol: Protocol,
    client_id: &str,
    keep_alive: u16,
    clean_start: bool,
    properties: Properties,
) -> Result<Connection> {
    let stream = Stream::open(addr, tls()).await?;
    connect_on(
        stream,
        protocol,
        client_id,
        keep_alive,
        clean_start,
        properties,
    )
    .await
}

/// Completes CONNECT/CONNACK on an open stream.
pub async fn connect_on(
    stream: Stream,
    protocol: Protocol,
    client_id: &str,
    keep_alive: u16,
    clean_start: bool,
    properties: Properties,
) -> Result<Connection> {
    let mut conn = Connection {
        stream,
        rbuf: BytesMut::with_capacity(4096),
        protocol,
        connack: ConnAck {
            session_present: false,
            reason: ReasonCode::SUCCESS,
            properties: Properties::default(),
        },
    };
    let connect = Packet::Connect(Box::new(Connect {
        protocol,
        clean_start,
        keep_alive,
        properties,
        client_id: client_id.to_owned(),
        will: None,
        username: None,
        password: None,
    }));
    conn.send(&connect).await?;
    match conn.read_packet().await? {
        Packet::ConnAck(ack) if !ack.reason.is_error() => {
            conn.connack = ack;
            Ok(conn)
        }
        Packet::ConnAck(ack) => bail!("CONNACK refused {client_id}: {:?}", ack.reason),
        other => bail!("expected CONNACK, got {other:?}"),
    }
}

impl Connection {
    /// Encodes and writes one packet.
    pub async fn send(&mut self, packet: &Packet) -> Result<()> {
        let mut buf = BytesMut::with_capacity(128);
        codec::encode(packet, self.protocol, &mut buf)
            .map_err(|e| anyhow!("encoding {packet:?}: {e}"))?;
        self.stream.write_all(&buf).await?;
        Ok(())
    }

    /// Reads until one whole packet is decoded.
    pub async fn read_packet(&mut self) -> Result<Packet> {
        loop {
            if let Some(p) = codec::decode(&mut self.rbuf, self.protocol, MAX_PACKET)
                .map_err(|e| anyhow!("decoding from broker: {e}"))?
            {
                return Ok(p);
            }
            self.rbuf.reserve(4096);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                bail!("broker closed the connection");
            }
        }
    }

    /// Subscribes to one filter and checks the SUBACK grants `qos`.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS, limit: Duration) -> Result<()> {
        let sub = Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![SubscribeFilter {
                filter: filter.to_owned(),
                options: SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            }],
            properties: Properties::default(),
        });
        self.send(&sub).await?;
        let ack = timeout(limit, self.read_packet())
            .await
            .map_err(|_| anyhow!("SUBACK for {filter} timed out"))??;
        match ack {
            Packet::SubAck(a) => match a.reason_codes.first() {
                Some(rc) if rc.0 == qos as u8 => Ok(()),
                other => bail!(
                    "SUBACK for {filter} granted {other:?}, wanted QoS {}",
                    qos as u8
                ),
            },
            other => bail!("expected SUBACK, got {other:?}"),
        }
    }

    /// Sends DISCONNECT; errors are ignored because the socket is closing anyway.
    pub async fn disconnect(&mut self) {
        let _ = self.send(&disconnect_packet()).await;
        let _ = self.stream.shutdown().await;
    }
}

/// A normal DISCONNECT.
pub fn disconnect_packet() -> Packet {
    Packet::Disconnect(Disconnect {
        reason: ReasonCode::NORMAL_DISCONNECTION,
        properties: Properties::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names() {
        assert_eq!(parse_protocol("3.1.1"), Ok(Protocol::V3_1_1));
        assert_eq!(parse_protocol("5"), Ok(Protocol::V5));
        assert!(parse_protocol("6").is_err());
    }
}
