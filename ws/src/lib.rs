//! MQTT over WebSocket: the server and client handshakes, and an adapter that makes a
//! WebSocket look like a byte stream so MQTT code is the same for every transport.
//!
//! The broker (accepting `ws://` listeners) and the bridge (dialling a `ws://`/`wss://`
//! cloud) need the same adapter. It cannot live in `outpost-mqtt`, which stays free of
//! async I/O, and the bridge must not depend on the gateway, so both use this crate.
//! TLS is not handled here: the adapter wraps whatever stream it is given, plain TCP or
//! a TLS stream the caller has already set up.

#![forbid(unsafe_code)]
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// What a frame or message may hold beyond one largest MQTT packet: a peer may batch
/// several packets in one frame (MQTT-6.0.0-2), but not hold our memory hostage.
const BATCH_SLACK: usize = 64 * 1024;

/// The limits for a peer whose packets may be up to `max_packet_size` bytes: tungstenite's
/// own (64 MiB a message, 16 MiB a frame) would let the peer make us buffer that much
/// before the MQTT codec ever sees the packet's length.
fn limited(config: WebSocketConfig, max_packet_size: usize) -> WebSocketConfig {
    let limit = max_packet_size.saturating_add(BATCH_SLACK);
    config
        .max_frame_size(Some(limit))
        .max_message_size(Some(limit))
}

/// tungstenite allocates its read buffer up front (128 KiB by default); a broker with
/// many WebSocket clients on a small board cannot spend that on each.
const READ_BUFFER: usize = 16 * 1024;

/// Accepts the HTTP upgrade on `path`, answering with the subprotocol the client offers
/// (MQTT-6.0.0-4; the offer is MQTT-6.0.0-3): `mqtt`, or `mqttv3.1` for 3.1 clients.
///
/// A frame or message larger than `max_packet_size` plus a little room for batching
/// closes the connection as soon as its header announces it, as an oversized packet
/// does on TCP; tungstenite's own limits (64 MiB) would let an unauthenticated client
/// hold that much memory until the connect timeout.
pub async fn accept<S>(stream: S, path: &str, max_packet_size: usize) -> io::Result<WsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let path = path.to_owned();
    #[allow(clippy::result_large_err)] // the signature is tungstenite's callback contract
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != path {
            let mut e = ErrorResponse::new(Some(format!("MQTT is served at {path}")));
            *e.status_mut() = StatusCode::NOT_FOUND;
            return Err(e);
        }
        if let Some(chosen) = choose_subprotocol(req) {
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(chosen));
        }
        Ok(resp)
    };
    let config = limited(
        WebSocketConfig::default().read_buffer_size(READ_BUFFER),
        max_packet_size,
    );
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
        .map_err(io_err)?;
    Ok(WsStream::new(ws))
}

/// The subprotocol to answer with: `mqtt` if offered, else `mqttv3.1` (what 3.1 clients
/// such as old Paho JavaScript offer), matched case-sensitively (RFC 7936) so the answer
/// is one of the client's own tokens. None when neither is offered: the upgrade then goes
/// ahead without the header, which non-browser clients that offer nothing accept.
fn choose_subprotocol(req: &Request) -> Option<&'static str> {
    let offered = || {
        req.headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    ["mqtt", "mqttv3.1"]
        .into_iter()
        .find(|want| offered().any(|p| p == *want))
}

/// WebSocket handshake over `stream` for `url`, offering the `mqtt` subprotocol.
///
/// As in [`accept`], a frame or message from the server larger than `max_packet_size`
/// (the largest packet we take) plus a little room for batching is refused as soon as
/// its header announces it: the read fails and the caller drops the link.
pub async fn connect<S>(url: &str, stream: S, max_packet_size: usize) -> io::Result<WsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request = url
        .into_client_request()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let config = limited(WebSocketConfig::default(), max_packet_size);
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config))
            .await
            .map_err(io_err)?;
    Ok(WsStream::new(ws))
}

/// Unwraps tungstenite's I/O errors so callers see the socket's own error kind (a reset
/// stays `ConnectionReset`); a frame over the limit is `InvalidData` saying which limit;
/// anything else becomes `Other` with tungstenite's message.
fn io_err(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::Capacity(c) => io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the peer sent a WebSocket frame larger than the largest MQTT packet we take \
                 plus {BATCH_SLACK} bytes: {c}"
            ),
        ),
        other => io::Error::other(other),
    }
}

/// A WebSocket carrying MQTT in binary frames, seen as a byte stream; each write is
/// one binary message.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// The rest of the last binary message, which may hold several MQTT packets or part
    /// of one (MQTT-6.0.0-2: packets are not aligned on frames).
    pending: Bytes,
}

impl<S> WsStream<S> {
    fn new(inner: WebSocketStream<S>) -> Self {
        WsStream {
            inner,
            pending: Bytes::new(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => self.pending = data,
                // MQTT-6.0.0-1: MQTT travels in binary frames only.
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text frame on an MQTT WebSocket",
                    )));
                }
                // Pings are answered by tungstenite.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_err(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.inner).poll_ready(cx)).map_err(io_err)?;
        Pin::new(&mut self.inner)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io_err)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(io_err)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_cross_in_both_directions() {
        let (c, s) = tokio::io::duplex(4096);
        let (client, server) = tokio::join!(
            connect("ws://localhost/mqtt", c, 1024),
            accept(s, "/mqtt", 1024)
        );
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        client.write_all(b"\x10\x02ab").await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x10\x02ab");
        server.write_all(b"\x20\x02\x00\x00").await.unwrap();
        server.flush().await.unwrap();
        // Read in pieces: a message longer than the caller's buffer is kept for later.
        let mut first = [0; 1];
        client.read_exact(&mut first).await.unwrap();
        let mut rest = [0; 3];
        client.read_exact(&mut rest).await.unwrap();
        assert_eq!((first, rest), ([0x20], [0x02, 0, 0]));
        client.shutdown().await.unwrap();
        assert_eq!(
            server.read(&mut got).await.unwrap(),
            0,
            "close reads as EOF"
        );
    }

    #[tokio::test]
    async fn a_frame_beyond_the_packet_limit_is_refused() {
        let (c, s) = tokio::io::duplex(1 << 20);
        let (client, server) = tokio::join!(
            connect("ws://localhost/mqtt", c, 1 << 20),
            accept(s, "/mqtt", 1024)
        );
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        let big = vec![0u8; 1024 + BATCH_SLACK + 1];
        let send = async {
            let _ = client.write_all(&big).await;
            let _ = client.flush().await;
        };
        let mut buf = [0; 16];
        let (_, read) = tokio::join!(send, server.read(&mut buf));
        assert!(read.is_err(), "an oversized frame was taken: {read:?}");
    }

    #[tokio::test]
    async fn a_frame_from_the_server_beyond_our_packet_limit_is_refused() {
        // The bridge's side: a cloud (or whatever answers at its address) must not make
        // it buffer tungstenite's 64 MiB; the read fails once the header says too much.
        let (c, s) = tokio::io::duplex(1 << 20);
        let (client, server) = tokio::join!(
            connect("ws://localhost/mqtt", c, 1024),
            accept(s, "/mqtt", 1 << 20)
        );
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        let big = vec![0u8; 1024 + BATCH_SLACK + 1];
        let send = async {
            let _ = server.write_all(&big).await;
            let _ = server.flush().await;
        };
        let mut buf = [0; 16];
        let (_, read) = tokio::join!(send, client.read(&mut buf));
        let e = read.expect_err("an oversized frame was taken");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(
            e.to_string()
                .contains("larger than the largest MQTT packet"),
            "{e}"
        );
        // Up to the limit is taken.
        let (c, s) = tokio::io::duplex(1 << 20);
        let (client, server) = tokio::join!(
            connect("ws://localhost/mqtt", c, 1024),
            accept(s, "/mqtt", 1 << 20)
        );
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        let fits = vec![7u8; 1024 + BATCH_SLACK];
        let send = async {
            server.write_all(&fits).await.unwrap();
            server.flush().await.unwrap();
        };
        let mut got = vec![0u8; fits.len()];
        let (_, read) = tokio::join!(send, client.read_exact(&mut got));
        read.unwrap();
        assert_eq!(got, fits);
    }

    /// The raw HTTP answer to an upgrade offering `protocols`.
    async fn handshake_reply(protocols: &str) -> String {
        let (mut c, s) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { accept(s, "/mqtt", 1024).await.map(|_| ()) });
        let req = format!(
            "GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: {protocols}\r\n\r\n"
        );
        c.write_all(req.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        let mut buf = [0; 512];
        while !reply.ends_with(b"\r\n\r\n") {
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed during the handshake");
            reply.extend_from_slice(&buf[..n]);
        }
        server.await.unwrap().unwrap();
        String::from_utf8(reply).unwrap().to_ascii_lowercase()
    }

    #[tokio::test]
    async fn the_answer_is_one_of_the_offered_subprotocols() {
        let header = "sec-websocket-protocol:";
        let chosen = |reply: &str| {
            reply
                .lines()
                .find_map(|l| l.strip_prefix(header).map(|v| v.trim().to_owned()))
        };
        assert_eq!(
            chosen(&handshake_reply("foo, mqtt").await).as_deref(),
            Some("mqtt")
        );
        assert_eq!(
            chosen(&handshake_reply("mqttv3.1").await).as_deref(),
            Some("mqttv3.1")
        );
        assert_eq!(
            chosen(&handshake_reply("mqttv3.1, mqtt").await).as_deref(),
            Some("mqtt")
        );
        // RFC 7936: tokens are case-sensitive; "MQTT" is not ours to answer as "mqtt".
        assert_eq!(chosen(&handshake_reply("MQTT").await), None);
    }

    #[tokio::test]
    async fn another_path_is_refused() {
        let (c, s) = tokio::io::duplex(4096);
        let (client, server) = tokio::join!(
            connect("ws://localhost/elsewhere", c, 1024),
            accept(s, "/mqtt", 1024)
        );
        assert!(client.is_err() && server.is_err());
    }
}
