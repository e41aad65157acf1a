//! A lean MQTT client connection on the `outpost-mqtt` codec: connect, subscribe, and
//! packet-at-a-time reads for the setup phase. The hot paths (publisher and subscriber
//! loops) take the socket and buffer apart and do their own batching.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::BytesMut;
use outpost_mqtt::codec;
use outpost_mqtt::{
    ConnAck, Connect, Disconnect, Packet, Properties, Protocol, QoS, ReasonCode, Subscribe,
    SubscribeFilter, SubscriptionOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Largest packet the bench accepts; far above any payload it sends.
pub const MAX_PACKET: usize = 16 * 1024 * 1024;

/// An open, CONNACKed MQTT connection.
pub struct Connection {
    /// The socket.
    pub stream: TcpStream,
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
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    handshake(
        stream,
        protocol,
        client_id,
        keep_alive,
        clean_start,
        properties,
    )
    .await
}

/// Completes CONNECT/CONNACK on an open TCP stream (clean start, no properties when
/// called from outside this module).
pub async fn handshake(
    stream: TcpStream,
    protocol: Protocol,
    client_id: &str,
    keep_alive: u16,
    clean_start: bool,
    properties: Properties,
) -> Result<Connection> {
    stream.set_nodelay(true)?;
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
