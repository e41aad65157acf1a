//! A raw MQTT client over TCP: exact packets in, exact packets out, for the tests that
//! must see reason codes, flags and packet identifiers on the wire, or send bad bytes.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use outpost_mqtt::{
    ConnAck, Connect, Disconnect, Packet, Properties, Protocol, PubResponse, Publish, QoS,
    ReasonCode, Subscribe, SubscribeFilter, SubscriptionOptions, Will, codec,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// Largest packet the raw client accepts from the broker.
const MAX_INBOUND: usize = 268_435_460;

/// Why a raw receive produced no packet.
#[derive(Debug)]
pub enum RawError {
    /// Nothing arrived in time.
    Timeout,
    /// The broker closed the connection (EOF or reset).
    Closed,
    /// The broker sent bytes the codec rejects.
    Decode(outpost_mqtt::DecodeError),
}

/// A TCP connection speaking MQTT through the `outpost_mqtt` codec.
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
    /// Protocol used to encode and decode.
    pub protocol: Protocol,
}

impl RawClient {
    /// Open a TCP connection to the broker on loopback, without sending anything.
    pub async fn tcp(port: u16, protocol: Protocol) -> RawClient {
        let stream = timeout(
            Duration::from_secs(5),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .expect("tcp connect timed out")
        .expect("tcp connect");
        stream.set_nodelay(true).ok();
        RawClient {
            stream,
            buf: BytesMut::with_capacity(4096),
            protocol,
        }
    }

    /// Connect, send `connect` and return the CONNACK (panics if anything else comes).
    pub async fn connect(port: u16, connect: Connect) -> (RawClient, ConnAck) {
        let mut c = RawClient::tcp(port, connect.protocol).await;
        c.send(&Packet::Connect(Box::new(connect))).await;
        match c.recv(Duration::from_secs(5)).await {
            Ok(Packet::ConnAck(ack)) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Encode and send one packet.
    pub async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        codec::encode(packet, self.protocol, &mut out).expect("encode packet");
        self.send_bytes(&out).await;
    }

    /// Send raw bytes; write errors are ignored because the broker may already have closed.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = timeout(Duration::from_secs(5), self.stream.write_all(bytes)).await;
    }

    /// Try to write bytes, reporting whether the write reached the socket.
    pub async fn try_send_bytes(&mut self, bytes: &[u8]) -> bool {
        matches!(
            timeout(Duration::from_secs(5), self.stream.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// Receive the next packet within `wait`.
    pub async fn recv(&mut self, wait: Duration) -> Result<Packet, RawError> {
        let deadline = Instant::now() + wait;
        loop {
            match codec::decode(&mut self.buf, self.protocol, MAX_INBOUND) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(RawError::Decode(e)),
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(RawError::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(RawError::Closed),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Read exactly `n` raw bytes (for checking 3.x replies byte by byte, independent of
    /// the codec). Returns what arrived before a close or the timeout.
    pub async fn read_bytes(&mut self, n: usize, wait: Duration) -> Vec<u8> {
        let deadline = Instant::now() + wait;
        while self.buf.len() < n {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(k)) if k > 0 => self.buf.extend_from_slice(&chunk[..k]),
                _ => break,
            }
        }
        let take = n.min(self.buf.len());
        self.buf.split_to(take).to_vec()
    }

    /// True when the broker closes the connection within `wait` (bytes sent before the
    /// close are discarded).
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Receive the next packet, skipping PINGRESP; panics on timeout or close.
    pub async fn expect_packet(&mut self, wait: Duration) -> Packet {
        loop {
            match self.recv(wait).await {
                Ok(Packet::PingResp) => continue,
                Ok(p) => return p,
                Err(e) => panic!("expected a packet within {wait:?}, got {e:?}"),
            }
        }
    }

    /// Receive the next packet, PINGRESP included; panics on timeout or close.
    pub async fn expect_packet_raw(&mut self, wait: Duration) -> Packet {
        match self.recv(wait).await {
            Ok(p) => p,
            Err(e) => panic!("expected a packet within {wait:?}, got {e:?}"),
        }
    }

    /// Receive the next PUBLISH; panics on anything else.
    pub async fn expect_publish(&mut self, wait: Duration) -> Publish {
        match self.expect_packet(wait).await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Assert that nothing but PINGRESP arrives for `wait` and the connection stays open.
    pub async fn expect_silence(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Err(RawError::Timeout) => return,
                Ok(Packet::PingResp) => continue,
                other => panic!("expected silence for {wait:?}, got {other:?}"),
            }
        }
    }

    /// Wait until the broker closes the connection; returns the packets it sent first
    /// (e.g. a 5.0 DISCONNECT). Panics if it is still open after `wait`.
    pub async fn expect_closed(&mut self, wait: Duration) -> Vec<Packet> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Ok(p) => got.push(p),
                Err(RawError::Closed) => return got,
                // Bytes after a DISCONNECT are not parsed; the socket state is what counts.
                Err(RawError::Decode(_)) => {
                    self.buf.clear();
                }
                Err(RawError::Timeout) => {
                    panic!("connection still open after {wait:?}; received {got:?}")
                }
            }
        }
    }

    /// Wait for the close and return the reason code of the DISCONNECT sent before it, if any.
    pub async fn expect_closed_with_disconnect(&mut self, wait: Duration) -> Option<ReasonCode> {
        let got = self.expect_closed(wait).await;
        got.iter().rev().find_map(|p| match p {
            Packet::Disconnect(d) => Some(d.reason),
            _ => None,
        })
    }

    /// Subscribe to one filter and return the SUBACK reason code.
    pub async fn subscribe(
        &mut self,
        packet_id: u16,
        filter: &str,
        options: SubscriptionOptions,
        properties: Properties,
    ) -> ReasonCode {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id,
            filters: vec![SubscribeFilter {
                filter: filter.to_string(),
                options,
            }],
            properties,
        }))
        .await;
        match self.expect_packet(Duration::from_secs(5)).await {
            Packet::SubAck(ack) => {
                assert_eq!(ack.packet_id, packet_id, "SUBACK packet id");
                assert_eq!(ack.reason_codes.len(), 1, "one reason code per filter");
                ack.reason_codes[0]
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Send PUBACK for `packet_id`.
    pub async fn puback(&mut self, packet_id: u16) {
        self.send(&Packet::PubAck(PubResponse::new(packet_id)))
            .await;
    }

    /// Send a normal DISCONNECT.
    pub async fn disconnect(&mut self) {
        self.send(&Packet::Disconnect(Disconnect {
            reason: ReasonCode::NORMAL_DISCONNECTION,
            properties: Properties::default(),
        }))
        .await;
    }

    /// Close the socket without sending DISCONNECT (an abnormal disconnect for MQTT).
    pub fn drop_abruptly(self) {
        drop(self);
    }
}

/// A CONNECT for `protocol` with the given client id and clean start, keep alive 30 s.
pub fn connect_packet(protocol: Protocol, client_id: &str, clean_start: bool) -> Connect {
    Connect {
        protocol,
        clean_start,
        keep_alive: 30,
        properties: Properties::default(),
        client_id: client_id.to_string(),
        will: None,
        username: None,
        password: None,
    }
}

/// A will for CONNECT.
pub fn will(topic: &str, payload: &str, qos: QoS, retain: bool) -> Will {
    Will {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos,
        retain,
        properties: Properties::default(),
    }
}

/// A PUBLISH with no properties.
pub fn publish(topic: &str, qos: QoS, packet_id: Option<u16>, payload: &[u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

/// Subscription options with only a QoS.
pub fn sub_opts(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..SubscriptionOptions::default()
    }
}

/// Hand-encoded MQTT fragments, for bytes the codec would refuse to produce.
pub mod bytes_of {
    /// Encode a remaining length as a variable byte integer.
    pub fn var_int(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                return out;
            }
        }
    }

    /// A length-prefixed MQTT string (any bytes, valid UTF-8 or not).
    pub fn string(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    /// A whole packet from its first byte and body.
    pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        out.extend(var_int(body.len()));
        out.extend_from_slice(body);
        out
    }

    /// A PUBLISH with arbitrary topic bytes, flags and body; `v5` adds an empty property block.
    pub fn publish(
        flags: u8,
        topic: &[u8],
        packet_id: Option<u16>,
        v5: bool,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut body = string(topic);
        if let Some(id) = packet_id {
            body.extend_from_slice(&id.to_be_bytes());
        }
        if v5 {
            body.push(0);
        }
        body.extend_from_slice(payload);
        packet(0x30 | flags, &body)
    }

    /// A CONNECT with the given protocol name and level, clean start, no will, keep alive 30.
    pub fn connect(name: &[u8], level: u8, client_id: &str) -> Vec<u8> {
        let mut body = string(name);
        body.push(level);
        body.push(0x02);
        body.extend_from_slice(&30u16.to_be_bytes());
        if level == 5 {
            body.push(0);
        }
        body.extend(string(client_id.as_bytes()));
        packet(0x10, &body)
    }
}
