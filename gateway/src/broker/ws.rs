//! MQTT over WebSocket: the handshake, and an adapter that makes a WebSocket look like
//! a byte stream so the connection code is the same for every transport.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};

/// Accepts the HTTP upgrade on `path`, agreeing to the `mqtt` subprotocol (MQTT-6.0.0-3).
pub async fn accept<S>(
    stream: S,
    path: &str,
) -> Result<WsStream<S>, tokio_tungstenite::tungstenite::Error>
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
        let offers_mqtt = req
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim().eq_ignore_ascii_case("mqtt"));
        if offers_mqtt {
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        }
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async(stream, callback).await?;
    Ok(WsStream {
        inner: ws,
        pending: Bytes::new(),
    })
}

/// A WebSocket carrying MQTT in binary frames, seen as a byte stream.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    pending: Bytes,
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
                None | Some(Ok(WsMessage::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(WsMessage::Binary(data))) => self.pending = data,
                // MQTT-6.0.0-1: MQTT travels in binary frames only.
                Some(Ok(WsMessage::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text frame on an MQTT WebSocket",
                    )));
                }
                Some(Ok(_)) => {} // ping/pong are answered by tungstenite
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
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
        let inner = Pin::new(&mut self.inner);
        ready!(inner.poll_ready(cx)).map_err(io::Error::other)?;
        Pin::new(&mut self.inner)
            .start_send(WsMessage::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}
